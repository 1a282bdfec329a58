"""RSO: whole search cycles of the application against the plain loop a user would write.

Baseline ("plain loop"): the RSO paper's MNIST net in the layout of its official
code (rohun-tripathi/RSO-gradient-free), written in plain JAX with
``jax.lax.conv_general_dilated``, and a Python loop over every searched weight.
Each searched leaf has one jitted function ``(params, index, key) -> params``
that decays the weight (``w * (1 - 1e-4)``), draws ``dw`` (He std of the leaf,
0.167 for BatchNorm scale and shift), scores ``w``, ``w + dw`` and ``w - dw``
with three full forward passes from the input on one batch, and keeps the best
(NaN never wins). XLA may share the unchanged part of the three passes by itself.
The weights are visited in the official order (dense layer, then each conv from
last to first, kernel before BatchNorm shift and scale; neuron by neuron).

Application: one whole cycle of ``python -m optax_neuron.mnist --optimizer rso
--model rso-paper`` (its cycle function, :class:`optax_neuron.mnist.rso.RSOSearch`)
on real MNIST, with a fresh minibatch per chunk of weights (``--rso-fresh-batch
chunk``) at batch 256, 1000 and 5000, and with a fresh minibatch per weight
(``--rso-fresh-batch weight``) beside it.

Floor: beside every application row, the floor of an exact search at that batch (the
three suffix passes per weight alone -- the layers after the next linear layer, or
from the first layer that is not channel-wise -- summed over the cycle's weights, see
:class:`Floor`) and the cycle / floor ratio; ``--no-floor`` skips it. It also prints
what one segment per leaf costs over one per owner layer (one forward pass for every
leaf read by the same layer as the leaf before it: BatchNorm scale after shift).

Every figure is a whole cycle (every leaf, every weight), measured, never
extrapolated; compilation is excluded (one warm-up call of every jitted
function). The plain loop and the application at batch 256 run interleaved in
one process, ``--repeats`` times; the medians are printed.

    python benchmarks/bench_rso.py                  # full run (the plain loop is long)
    python benchmarks/bench_rso.py --no-plain --batches 256 --weight-batches ''  # cycle, floor
    python benchmarks/bench_rso.py --quick  # smoke: 1 block of 1 channel, batch 32, 512 images
    python benchmarks/bench_rso.py --no-plain --batches 256 --weight-batches '' --by-call

``--by-call`` also times one cycle of the first application row call by call (two rounds),
each call against the floor of its own weights: where the time above the floor goes.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import batch_norm

from optax_neuron import _random

WEIGHT_DECAY = 1e-4
NORM_STEP = 0.167

# --------------------------------------------------------------------- the plain loop


def paper_params(key: jax.Array, channels: int = 16, blocks: int = 6) -> dict:
    """He-initialised parameters of the paper net: conv{i}/kernel (HWIO), norm{i}, head/kernel
    (``blocks`` conv blocks: 6 in the paper)."""
    params, c_in = {}, 1
    keys = jax.random.split(key, 7)
    for i in range(blocks):
        std = np.sqrt(2.0 / (9 * c_in))
        params[f"conv{i}"] = {"kernel": std * _random.normal(keys[i], (3, 3, c_in, channels))}
        params[f"norm{i}"] = {"scale": jnp.ones(channels), "bias": jnp.zeros(channels)}
        c_in = channels
    params["head"] = {
        "kernel": np.sqrt(2.0 / channels) * jax.random.normal(keys[6], (channels, 10))
    }
    return params


def _avg_pool(h: jax.Array) -> jax.Array:
    n, hh, ww, c = h.shape
    return h.reshape(n, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))


def conv_blocks(params: dict) -> int:
    """How many conv blocks (``conv0``, ``conv1``, ...) the paper net's params hold."""
    return sum(name.startswith("conv") for name in params)


def paper_forward(
    params: dict,
    x: jax.Array,
    conv: Callable = jax.lax.conv_general_dilated,
    norm: Callable = batch_norm,
) -> jax.Array:
    """Logits of the paper net (official layout, batch statistics); ``lax.conv`` by default.

    ``norm(p, h)`` is the BatchNorm (default: the statistics of the batch ``h``).
    """
    h = x
    for i in range(conv_blocks(params)):
        if i > 0:
            h = jax.nn.relu(h)
        h = conv(
            h,
            params[f"conv{i}"]["kernel"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if i in (1, 3):
            h = _avg_pool(h)
        h = norm(params[f"norm{i}"], h)
    return jnp.mean(h, axis=(1, 2)) @ params["head"]["kernel"]


def official_order(params: dict) -> list[tuple[str, str, np.ndarray]]:
    """``(module, name, flat indices)`` of every searched leaf, in the official visiting order."""
    out = []

    def neuron_major(shape):  # for each output neuron, its inputs (then kernel positions)
        idx = np.arange(int(np.prod(shape))).reshape(shape)
        if len(shape) == 2:  # dense (in, out)
            return idx.T.ravel()
        return idx.transpose(3, 2, 0, 1).ravel()  # HWIO -> O, I, H, W

    out.append(("head", "kernel", neuron_major(params["head"]["kernel"].shape)))
    for i in reversed(range(conv_blocks(params))):
        out.append((f"conv{i}", "kernel", neuron_major(params[f"conv{i}"]["kernel"].shape)))
        out.append((f"norm{i}", "bias", np.arange(params[f"norm{i}"]["bias"].size)))
        out.append((f"norm{i}", "scale", np.arange(params[f"norm{i}"]["scale"].size)))
    return out


def _ce(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def plain_step(module: str, name: str, sigma: float) -> Callable:
    """The jitted per-weight function of one leaf: three full forward passes, keep the best."""

    @jax.jit
    def step(params, index, key, x, y):
        leaf = params[module][name]
        w = leaf.ravel()[index] * (1 - WEIGHT_DECAY)
        dw = sigma * jax.random.normal(key, ())
        cands = [w, w + dw, w - dw]

        def with_value(v):
            new = leaf.ravel().at[index].set(v).reshape(leaf.shape)
            return {**params, module: {**params[module], name: new}}

        losses = jnp.stack([_ce(paper_forward(with_value(v), x), y) for v in cands])
        best = jnp.argmin(jnp.where(jnp.isnan(losses), jnp.inf, losses))
        return with_value(jnp.stack(cands)[best])

    return step


def _sigma(params: dict, module: str, name: str) -> float:
    if module.startswith("norm"):
        return NORM_STEP
    shape = params[module][name].shape
    return float(np.sqrt(2.0 / np.prod(shape[:-1])))


class PlainLoop:
    """The plain loop: one whole cycle per call of :meth:`cycle` (every searched weight)."""

    def __init__(self, params: dict, x: jax.Array, y: jax.Array):
        self.params, self.x, self.y = params, x, y
        self.order = official_order(params)
        self.steps = {(m, n): plain_step(m, n, _sigma(params, m, n)) for m, n, _ in self.order}
        key = jax.random.key(0)
        for f in self.steps.values():  # compile every leaf's function
            jax.block_until_ready(f(params, 0, key, x, y))
        self.weights = sum(len(idx) for *_, idx in self.order)
        self.calls = 0

    def cycle(self) -> float:
        """Run one whole cycle; returns its seconds."""
        p, base = self.params, jax.random.key(self.calls + 1)
        t = time.perf_counter()
        for m, n, idx in self.order:
            f = self.steps[(m, n)]
            for i in idx:
                p = f(p, int(i), jax.random.fold_in(base, self.calls), self.x, self.y)
                self.calls += 1
        jax.block_until_ready(p)
        self.params = p
        return time.perf_counter() - t


def plain_accuracy(params: dict, x: jax.Array, y: jax.Array) -> float:
    logits = jax.jit(paper_forward)(params, x)
    return float(jnp.mean(jnp.argmax(logits, -1) == y))


# ------------------------------------------------------------------------ application


class AppCycle:
    """Whole cycles of the application's search (:class:`optax_neuron.mnist.rso.RSOSearch`)."""

    def __init__(
        self, x_train, y_train, *, batch, channels, blocks=6, fresh_batch="chunk", chunk=1000
    ):
        from flax import nnx

        from optax_neuron.mnist.models import make_model
        from optax_neuron.mnist.rso import RSOSearch

        model = make_model("rso-paper", nnx.Rngs(0), channels=channels, blocks=blocks)
        model.train()
        self.x, self.y = x_train, y_train
        self.search = RSOSearch(
            model, x_train, y_train, batch=batch, cycles=50, chunk=chunk, fresh_batch=fresh_batch
        )
        self.params, self.state = self.search.params, self.search.state
        self.weights, self.done = self.search.total, 0
        perm = jnp.arange(x_train.shape[0])
        jax.block_until_ready(
            self.search._step(self.params, self.state, self.x, self.y, perm, 0)
        )  # compile

    def cycle(self) -> float:
        t = time.perf_counter()
        self.params, self.state = self.search.cycle(
            self.params, self.state, self.done, self.x, self.y
        )
        jax.block_until_ready(self.params)
        self.done += 1
        return time.perf_counter() - t

    def call_seconds(self) -> list[float]:
        """One cycle, each of its jitted calls timed (the batches drawn from a fixed shuffle)."""
        perm = jax.random.permutation(jax.random.key(self.done), self.x.shape[0])
        times = []
        for c in range(self.search.calls):
            t = time.perf_counter()
            self.params, self.state = self.search._step(
                self.params, self.state, self.x, self.y, perm, c
            )
            jax.block_until_ready(self.params)
            times.append(time.perf_counter() - t)
        self.done += 1
        return times


# ----------------------------------------------------------------------------- the floor


def _suffix_start(layers: list, k: int) -> int:
    """The first layer a candidate of a leaf owned by layer ``k`` must run in full.

    The layers after ``k`` declared channel-wise carry one channel; the next linear layer
    gets one input-channel slice; everything after it runs in full (from its output).
    A layer that is neither ends the one-channel path and runs in full itself.
    """
    from optax_neuron import ChannelwiseLayer, LinearLayer

    m = k + 1
    while m < len(layers) and isinstance(layers[m], ChannelwiseLayer):
        m += 1
    return m + 1 if m < len(layers) and isinstance(layers[m], LinearLayer) else m


class Floor:
    """The floor of an exact search: the three suffix passes per weight alone.

    For every searched leaf of the application (owner layer ``k`` from the stack), one
    jitted loop over the leaf's weights runs the layers from :func:`_suffix_start` to
    the loss three times per weight on the cached activation at batch ``batch`` (made
    to depend on the loop so XLA cannot hoist it), and nothing else: no draw, no
    column, no input-channel update, no commit. The figure is the sum over the leaves
    of a whole cycle, measured (compiled first).
    """

    def __init__(self, app: AppCycle, batch: int):
        from optax_neuron import LayerStack
        from optax_neuron.mnist.rso import _cross_entropy
        from optax_neuron.rso.plan import make_plan, owners

        search = app.search
        params = search.params
        x, y = app.x[:batch], app.y[:batch]
        stack = LayerStack(search.layers, _cross_entropy, x, y)
        plan, leaves = make_plan(params, [(p, True) for p in search.state.rso_sigma], None)
        owner = owners(stack, params, leaves, plan.treedef)
        acts = jax.jit(lambda p: stack.activations(p)[0])(params)
        self.params, self.stack, self.acts = params, stack, acts
        self.leaves = [(min(owner[i], len(stack.layers) - 1), int(plan.sizes[t]))
                       for t, i in enumerate(plan.visit)]  # fmt: skip
        self.paths = [plan.paths[i] for i in plan.visit]
        self.loops = {}
        for k, _ in self.leaves:
            start = _suffix_start(list(stack.layers), k)
            if start not in self.loops:
                self.loops[start] = jax.jit(self._loop(start))
                jax.block_until_ready(self.loops[start](params, acts[start], 2))
        self.forward = jax.jit(lambda p: stack.activations(p)[0])

    def _loop(self, start: int) -> Callable:
        stack = self.stack

        def loop(params, h, n):
            def body(i, acc):
                for c in range(3):
                    acc = acc + stack.from_layer(start, params, h + (acc + c) * 1e-30)
                return acc

            return jax.lax.fori_loop(0, n, body, jnp.float32(0.0))

        return loop

    def seconds(self, lo: int = 0, hi: int | None = None) -> float:
        """The floor of the weights at cycle positions ``lo .. hi - 1`` (default: the whole
        cycle), measured."""
        t = time.perf_counter()
        for _, k, count in self._overlaps(lo, hi):
            start = _suffix_start(list(self.stack.layers), k)
            jax.block_until_ready(self.loops[start](self.params, self.acts[start], count))
        return time.perf_counter() - t

    def _overlaps(self, lo: int, hi: int | None) -> list[tuple[str, int, int]]:
        """``(path, owner layer, weights)`` of every visited leaf with weights at cycle
        positions ``lo .. hi - 1`` (``hi=None``: to the end of the cycle)."""
        out, first = [], 0
        for path, (k, n) in zip(self.paths, self.leaves, strict=True):
            count = min(first + n, first + n if hi is None else hi) - max(first, lo)
            if count > 0:
                out.append((path, k, count))
            first += n
        return out

    def leaves_in(self, lo: int, hi: int) -> str:
        """The visited leaves with weights at positions ``lo .. hi - 1``, with their counts."""
        return ", ".join(f"{path} {count}" for path, _, count in self._overlaps(lo, hi))

    def start_seconds(self, repeats: int = 5) -> float:
        """One forward pass that fills an evaluator's cache (median of ``repeats``)."""
        jax.block_until_ready(self.forward(self.params))
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(self.forward(self.params))
            times.append(time.perf_counter() - t)
        return statistics.median(times)


def _shared_owner_leaves(app: AppCycle) -> int:
    """Searched leaves read by the same layer as the leaf visited before them."""
    paths = list(app.search.state.rso_sigma)
    parents = [p.rsplit("/", 1)[0] for p in paths]
    return sum(a == b for a, b in itertools.pairwise(parents))


def _print_by_call(key: tuple, app: AppCycle, rounds: int) -> None:
    """The calls of one cycle, each against the floor of its weights (medians of ``rounds``)."""
    floor, chunk = Floor(app, key[1]), app.search.chunk
    calls: list = [[] for _ in range(app.search.calls)]
    floors: list = [[] for _ in range(app.search.calls)]
    for _ in range(rounds):
        for c, t in enumerate(app.call_seconds()):
            calls[c].append(t)
        for c in range(app.search.calls):
            floors[c].append(floor.seconds(c * chunk, (c + 1) * chunk))
    print(f"\ncalls of one cycle, fresh batch per {key[0]}, batch {key[1]} (medians of {rounds})")
    print("| call | weights (leaf count) | s | floor s | above the floor, ms per weight |")
    print("|---:|---|---:|---:|---:|")
    for c in range(app.search.calls):
        t, f = statistics.median(calls[c]), statistics.median(floors[c])
        leaves = floor.leaves_in(c * chunk, (c + 1) * chunk)
        print(f"| {c} | {leaves} | {t:.3f} | {f:.3f} | {(t - f) / chunk * 1e3:.2f} |")


# ------------------------------------------------------------------------------ main


def _mnist(limit: int | None):
    from optax_neuron.mnist.data import load_mnist

    data = load_mnist()
    x = jnp.asarray(data.train_images[:limit])
    y = jnp.asarray(data.train_labels[:limit])
    return x, y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: the first 2 conv blocks, 1 channel, batch 32, 512 images",
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="interleaved rounds of plain loop + app at batch 256"
    )
    ap.add_argument("--batches", default="256,1000,5000", help="application batches (chunk mode)")
    ap.add_argument(
        "--weight-batches", default="256", help="application batches with a fresh batch per weight"
    )
    ap.add_argument(
        "--no-plain", action="store_true", help="skip the plain loop (no speed-up column)"
    )
    ap.add_argument("--only-plain", action="store_true", help="time the plain loop alone")
    ap.add_argument(
        "--no-floor", action="store_true", help="skip the floor (three suffix passes per weight)"
    )
    ap.add_argument(
        "--by-call",
        action="store_true",
        help="also time one cycle of the first application row call by call, each call "
        "against the floor of its own weights (where the time above the floor goes)",
    )
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    channels, limit = (1, 512) if args.quick else (16, None)
    blocks = 1 if args.quick else 6
    batches = [32] if args.quick else [int(b) for b in args.batches.split(",") if b]
    weight_batches = [] if args.quick else [int(b) for b in args.weight_batches.split(",") if b]
    if not batches:
        ap.error("--batches needs at least one batch size")
    x_train, y_train = _mnist(limit)
    mean = jnp.mean(x_train)
    base_batch = batches[0]
    print(
        f"## RSO whole cycles, paper net ({blocks} conv blocks of {channels} channels), "
        f"device {jax.devices()[0].platform}",
        flush=True,
    )
    plain = None
    if not args.no_plain:
        plain = PlainLoop(
            paper_params(jax.random.key(0), channels, blocks),
            x_train[:base_batch] - mean,
            y_train[:base_batch],
        )
    if args.only_plain:
        batches, weight_batches = batches[:1], []
    apps = {
        ("chunk", b): AppCycle(x_train, y_train, batch=b, channels=channels, blocks=blocks)
        for b in batches[:1]
        if not args.only_plain
    }
    times: dict = {"plain": [], **{k: [] for k in apps}}
    for _ in range(args.repeats):  # interleaved: plain loop, application at the base batch
        if plain is not None:
            times["plain"].append(plain.cycle())
            print(f"plain loop, batch {base_batch}: {times['plain'][-1]:.1f} s", flush=True)
        for k, app in apps.items():
            times[k].append(app.cycle())
            print(
                f"application, fresh batch per {k[0]}, batch {k[1]}: {times[k][-1]:.1f} s",
                flush=True,
            )
    for mode, bs in (("weight", weight_batches), ("chunk", batches[1:])):
        for b in bs:
            app = AppCycle(
                x_train, y_train, batch=b, channels=channels, blocks=blocks, fresh_batch=mode
            )
            times[(mode, b)] = [app.cycle()]
            apps[(mode, b)] = app
            print(
                f"application, fresh batch per {mode}, batch {b}: {times[(mode, b)][-1]:.1f} s",
                flush=True,
            )
    if args.only_plain and plain is None:
        ap.error("--only-plain and --no-plain exclude each other")
    weights = plain.weights if plain is not None else next(iter(apps.values())).weights
    base = statistics.median(times["plain"]) if plain is not None else float("nan")
    print(
        f"\n{weights} searched weights per cycle; whole cycles, median of {args.repeats} "
        "interleaved round(s) for the plain loop and the first application row, one cycle "
        "for the others"
    )
    floors: dict = {}
    if not args.no_floor:
        for (_, b), app in apps.items():
            if b not in floors:
                floor = Floor(app, b)
                floors[b] = floor.seconds()
                extra = floor.start_seconds() * _shared_owner_leaves(app)
                print(
                    f"floor, batch {b}: {floors[b]:.1f} s; one segment per leaf costs "
                    f"{extra:.3f} s more per cycle than one per owner layer",
                    flush=True,
                )
    if args.by_call and not args.no_floor:
        _print_by_call(*next(iter(apps.items())), rounds=2)
    print("| method | batch | s/cycle | plain loop / method | floor s/cycle | cycle / floor |")
    print("|---|---:|---:|---:|---:|---:|")
    if plain is not None:
        label = "plain loop (3 full lax.conv passes per weight, jitted per leaf)"
        print(f"| {label} | {base_batch} | {base:.1f} | 1.0x | | |")
    for (mode, b), ts in [(k, v) for k, v in times.items() if k != "plain"]:
        med = statistics.median(ts)
        if plain is None:
            ratio = ""  # --no-plain: nothing to compare with
        else:
            ratio = f"{base / med:.1f}x" if b == base_batch else "(other batch)"
        fl = floors.get(b, float("nan"))
        print(
            f"| application, fresh batch per {mode} | {b} | {med:.1f} | {ratio} "
            f"| {fl:.1f} | {med / fl:.2f}x |"
        )
    return {
        "plain": base,
        **{
            f"{m}@{b}": statistics.median(v)
            for (m, b), v in [(k, v) for k, v in times.items() if k != "plain"]
        },
    }


if __name__ == "__main__":
    main()
