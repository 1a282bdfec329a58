"""RSO: weights searched per second, the fast paths against a plain jitted per-weight loop.

Baseline ("plain loop"): a Python loop over weights, one jitted call per weight
that evaluates ``F(w)``, ``F(w + dw)``, ``F(w - dw)`` with a black-box loss on the
same batch of 256 and keeps the best (the straightforward port of the paper's
loop). Compared with ``optax_neuron.rso`` on the same batch:

* ``rso black-box``: one jitted ``update`` for many weights (no per-weight
  dispatch), the current loss carried, so two evaluations per weight;
* ``rso + LayerStack``: the same with the value given as a
  :class:`optax_neuron.LayerStack`, so each candidate re-runs only the layers
  from the one holding the searched weight;
* ``speculate=m``: exact speculative batching, the candidates of the next m
  weights evaluated against one base in one vmapped call (fewer, wider passes;
  it pays only when most proposals are rejected, so the ``sigma xF`` rows scale
  every sigma by F to show the few-accepted regime next to the same rows
  without speculation). The ``accepted`` column is the fraction of the timed
  weights accepted.

Per-cycle figures are extrapolated: each searched leaf is timed on its first
few weights (a cursor placed at its start) and multiplied by its size; the plain
loop costs the same for every weight. Runs are interleaved and the median of
``--repeats`` is taken. Nets: the paper's MNIST net (6 conv3x3 x 16 + BatchNorm,
batch statistics, avg-pool after conv 2 and 4, global average pool, dense 16->10,
no biases, ~12k searched weights) and an MLP 784-128-10.

    python benchmarks/bench_rso.py            # full run
    python benchmarks/bench_rso.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_neuron import LayerStack, conv_layer, dense_layer, rso, rso_init


# ----------------------------------------------------------------------------- nets


def _batch_norm(p, h):
    mean = jnp.mean(h, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(h - mean), axis=(0, 1, 2))
    return (h - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def _avg_pool(h):
    n, hh, ww, c = h.shape
    return h.reshape(n, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))


def paper_net(key, channels=16):
    """Params and layer functions of the RSO paper's MNIST net."""
    params, layers = {}, []
    c_in = 1
    for i in range(6):
        params[f"conv{i}"] = {"kernel": jnp.zeros((3, 3, c_in, channels))}
        params[f"norm{i}"] = {"scale": jnp.ones(channels), "bias": jnp.zeros(channels)}
        layers.append(conv_layer(f"conv{i}/kernel"))
        pool = i in (1, 3)
        layers.append(lambda p, h, i=i, pool=pool: (_avg_pool if pool else (lambda x: x))(
            jax.nn.relu(_batch_norm(p[f"norm{i}"], h))))
        c_in = channels
    params["zhead"] = {"kernel": jnp.zeros((channels, 10))}  # "z": last in tree order
    layers.append(lambda p, h: jnp.mean(h, axis=(1, 2)))
    layers.append(dense_layer("zhead/kernel"))
    return rso_init(key, params), layers


def mlp_net(key, hidden=128):
    params = {"dense0": {"kernel": jnp.zeros((784, hidden)), "bias": jnp.zeros(hidden)},
              "dense1": {"kernel": jnp.zeros((hidden, 10)), "bias": jnp.zeros(10)}}
    layers = [lambda p, h: h.reshape(h.shape[0], -1),
              dense_layer("dense0/kernel"),
              lambda p, h: jax.nn.relu(h + p["dense0"]["bias"]),
              dense_layer("dense1/kernel"),
              lambda p, h: h + p["dense1"]["bias"]]
    return rso_init(key, params), layers


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# ------------------------------------------------------------------------- timing


def _visit(params, searched):
    """(path, leaf) of searched leaves, last first (rso's default order)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = [("/".join(str(k.key) for k in p), x) for p, x in flat]
    return [(p, x) for p, x in out if searched(p)][::-1]


def plain_loop(params, layers, x, y, sigma):
    """Seconds per weight of the plain loop (one jitted call per weight, 3 evaluations)."""
    value = LayerStack(layers, _ce, x, y)  # called as a black box

    @jax.jit
    def one_weight(p, path_index, flat_index, key):
        leaves, treedef = jax.tree_util.tree_flatten(p)
        dw = sigma * jax.random.normal(key, ())
        cands = []
        for sign in (0.0, 1.0, -1.0):
            new = [jnp.where(path_index == n, leaf.ravel().at[flat_index].add(sign * dw).reshape(leaf.shape), leaf)
                   for n, leaf in enumerate(leaves)]
            cands.append(jax.tree_util.tree_unflatten(treedef, new))
        losses = jnp.stack([value(c) for c in cands])
        best = jnp.argmin(jnp.where(jnp.isnan(losses), jnp.inf, losses))
        return jax.tree.map(lambda a, b, c: jnp.where(best == 0, a, jnp.where(best == 1, b, c)), *cands)

    def run(n_weights):
        p = params
        key = jax.random.key(0)
        jax.block_until_ready(one_weight(p, 0, 0, key))  # compiled
        t = time.perf_counter()
        for w in range(n_weights):
            p = one_weight(p, len(jax.tree.leaves(p)) - 1, w, jax.random.fold_in(key, w))
        jax.block_until_ready(p)
        return (time.perf_counter() - t) / n_weights

    return run


def rso_timer(params, layers, x, y, weights, layered, fast_path="incremental", speculate=1, sigma_factor=1.0):
    """Seconds per weight of rso (``weights`` per ``update`` call) from the start of each leaf.

    Returns run() -> {path: (seconds per weight, leaf size, fraction accepted)}. The
    black-box path without speculation costs the same for every weight, so it is
    timed on the first leaf only. ``sigma_factor`` scales every sigma (through
    ``anneal``) to set the acceptance rate.
    """
    anneal = None if sigma_factor == 1.0 else (lambda c: sigma_factor)
    tx = rso(weights_per_step=weights, sigma=[("*scale", 0.1), ("*bias", 0.1), ("*", None)], fast_path=fast_path,
             speculate=speculate, anneal=anneal)
    state0 = tx.init(params)
    stack = LayerStack(layers, _ce, x, y)

    @jax.jit
    def step(p, s, stack):
        u, s = tx.update(p, s, p, value_fn=stack if layered else (lambda q: stack(q)))
        return optax.apply_updates(p, u), s

    searched = set(state0.rso_sigma)
    visit = _visit(params, lambda q: q in searched)
    starts = np.cumsum([0] + [v.size for _, v in visit])[:-1]
    jax.block_until_ready(step(params, state0, stack))  # compiled

    def run():
        per = {}
        for (path, leaf), start in zip(visit, starts):
            if per and not layered and speculate == 1:
                per[path] = (next(iter(per.values()))[0], leaf.size, next(iter(per.values()))[2])
                continue
            s = state0._replace(rso_cursor=jnp.asarray(start, jnp.int32))
            t = time.perf_counter()
            _, s = jax.block_until_ready(step(params, s, stack))
            n_acc = sum(int(v) for v in s.rso_accepted.values())
            per[path] = ((time.perf_counter() - t) / weights, leaf.size, n_acc / weights)
        return per

    return run


def bench(name, params, layers, x, y, weights, plain_weights, repeats, m, big_sigma):
    print(f"\n## {name}: batch {x.shape[0]}, device {jax.devices()[0].platform}")
    plain = plain_loop(params, layers, x, y, 0.1)
    timers = {
        "rso black-box": rso_timer(params, layers, x, y, weights, layered=False),
        "rso + LayerStack, cache": rso_timer(params, layers, x, y, weights, layered=True, fast_path="cache"),
        "rso + LayerStack, incremental": rso_timer(params, layers, x, y, weights, layered=True),
    }
    if m > 1:  # --speculate 1: no speculative rows
        timers[f"rso black-box, speculate={m}"] = rso_timer(params, layers, x, y, weights, layered=False, speculate=m)
        timers[f"rso + LayerStack, incremental, speculate={m}"] = rso_timer(
            params, layers, x, y, weights, layered=True, speculate=m)
    if big_sigma:  # few proposals accepted: the regime speculation is for
        timers[f"rso black-box, sigma x{big_sigma:g}"] = rso_timer(
            params, layers, x, y, weights, layered=False, sigma_factor=big_sigma)
        timers[f"rso + LayerStack, incremental, sigma x{big_sigma:g}"] = rso_timer(
            params, layers, x, y, weights, layered=True, sigma_factor=big_sigma)
        if m > 1:
            timers[f"rso black-box, speculate={m}, sigma x{big_sigma:g}"] = rso_timer(
                params, layers, x, y, weights, layered=False, speculate=m, sigma_factor=big_sigma)
            timers[f"rso + LayerStack, incremental, speculate={m}, sigma x{big_sigma:g}"] = rso_timer(
                params, layers, x, y, weights, layered=True, speculate=m, sigma_factor=big_sigma)
    results = {"plain loop": [], **{k: [] for k in timers}}
    accepted = {"plain loop": float("nan")}
    n_searched = None
    for _ in range(repeats):  # interleaved
        per_w = plain(plain_weights)
        for label, timer in timers.items():
            per = timer()
            n_searched = sum(v[1] for v in per.values())
            results[label].append(sum(t * n for t, n, _ in per.values()))  # s per cycle
            accepted[label] = sum(a * n for _, n, a in per.values()) / n_searched
        results["plain loop"].append(per_w * n_searched)
    base = statistics.median(results["plain loop"])
    print(f"{n_searched} searched weights; min/cycle extrapolated from one update of {weights} weights "
          f"(weights_per_step={weights}) from the start of each leaf ({plain_weights} weights for the plain loop, "
          f"one leaf for the black-box path, whose cost per weight is uniform); median of {repeats}")
    print("| method | weights/s | min/cycle | speed-up | accepted |")
    print("|---|---:|---:|---:|---:|")
    for label, vals in results.items():
        cyc = statistics.median(vals)
        acc = "" if label == "plain loop" else f"{accepted[label]:.0%}"
        print(f"| {label} | {n_searched / cyc:,.0f} | {cyc / 60:.2f} | {base / cyc:.1f}x | {acc} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny timings")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--weights-per-step", type=int, default=64, help="weights per rso update call")
    ap.add_argument("--speculate", type=int, default=1,
                    help="m of the speculative rows (default 1: none; they take minutes each on the paper net)")
    ap.add_argument("--big-sigma", type=float, default=0.0,
                    help="sigma factor of the few-accepted rows (default 0: no such rows; the README used 1e4)")
    ap.add_argument("--nets", default="paper,mlp", help="comma-separated: paper, mlp")
    args = ap.parse_args()
    key = jax.random.key(0)
    batch = min(args.batch, 32) if args.quick else args.batch
    x = jax.random.uniform(key, (batch, 28, 28, 1))
    y = jax.random.randint(key, (batch,), 0, 10)
    repeats = 1 if args.quick else args.repeats
    weights = 4 if args.quick else args.weights_per_step
    plain_weights = 3 if args.quick else 10
    nets = args.nets.split(",")
    extra = (args.speculate, args.big_sigma)
    if "paper" in nets:
        bench("paper MNIST net", *paper_net(key), x, y, weights, plain_weights, repeats, *extra)
    if "mlp" in nets:
        bench("MLP 784-128-10", *mlp_net(key), x, y, weights, plain_weights, repeats, *extra)


if __name__ == "__main__":
    main()
