"""A peer for RSO: evosax PGPE on the same net, the same data, the same wall-clock budget.

The net is the RSO paper's MNIST net in the layout of its official code
(:func:`bench_rso.paper_forward`: 6 conv3x3 x 16, no bias, BatchNorm with batch
statistics, average pooling after convs 2 and 4, global average pool, dense 16 -> 10;
12,016 parameters, He initialisation; XLA's own convolution, one member after
another with ``lax.map``: a ``vmap`` over members would make it a grouped
convolution, and the im2col ``patch_conv`` is 7-14x slower forward on this CPU at
batch 256), inputs minus the training-set mean, on
the application's MNIST split (train 50,000, test 10,000).

PGPE (Sehnke et al., 2010) as implemented by evosax (``evosax.algorithms.PGPE``,
antithetic sampling, centred-rank fitness shaping, ClipUp updates) searches all
12,016 parameters. One generation draws a fresh training minibatch, scores every
member of the population on it (mean cross-entropy, one ``vmap``-ed jitted
call) and updates the search distribution. The test accuracy of the distribution
mean is measured every ``--eval-every`` seconds of search (evaluation time is
not counted in the budget), with BatchNorm statistics from 1,000 training
images (the RSO application recalibrates them on 2,000).

Forward passes are counted in images: a generation costs ``pop x batch``
image-forward passes. ``--rso PATH`` reads a ``metrics.json`` of the RSO
application (``python -m optax_neuron.mnist --optimizer rso --model rso-paper
--out DIR``) and puts its per-cycle test accuracy on the same plot against its
search time (``epoch_time`` summed) and its images evaluated (three candidates
per weight on one minibatch each: ``3 x weights x batch`` per cycle, an upper
bound since RSO re-runs only the layers after the searched one).

    python benchmarks/bench_rso_peer.py --budget 1200 --rso outputs/rso-paper/metrics.json \\
        --out benchmarks/rso_peer.png
    python benchmarks/bench_rso_peer.py --quick
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rso import paper_forward, paper_params
from common import batch_norm


def forward_with_stats(params: dict, x: jax.Array, calib: jax.Array) -> jax.Array:
    """Logits of ``x`` with every BatchNorm using the statistics of ``calib`` (eval mode)."""
    both = jnp.concatenate([calib, x])
    n = calib.shape[0]

    # The net normalises with the batch's statistics: run calib and x as one batch
    # whose BatchNorms take their statistics from calib's rows only.
    return paper_forward(params, both, norm=functools.partial(batch_norm, stats_rows=n))[n:]


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def run_pgpe(
    data,
    mean,
    *,
    budget,
    pop,
    batch,
    std_init,
    lr,
    max_velocity,
    eval_every,
    seed=0,
    test_limit=None,
    blocks=6,
    log=print,
):
    """PGPE for ``budget`` seconds of search on the paper net's first ``blocks`` conv blocks
    (all 6 by default); returns the list of evaluation records."""
    from evosax.algorithms import PGPE
    from evosax.core.optimizer import clipup

    x_train = jnp.asarray(data.train_images - mean)
    y_train = jnp.asarray(data.train_labels)
    x_test = jnp.asarray(data.test_images[:test_limit] - mean)
    y_test = jnp.asarray(data.test_labels[:test_limit])
    calib = x_train[:1000]
    init = paper_params(jax.random.key(seed), blocks=blocks)
    es = PGPE(
        population_size=pop,
        solution=init,
        optimizer=clipup(learning_rate=lr, max_velocity=max_velocity),
    )
    es_params = es.default_params.replace(std_init=std_init)
    key = jax.random.key(seed + 1)
    state = es.init(key, init, es_params)
    # strongly typed like the state ``generation`` returns: a weak-typed init state would
    # compile ``generation`` a second time, inside the measured budget
    state = jax.tree.map(
        lambda a: jnp.asarray(a, a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state
    )
    n = x_train.shape[0]

    @jax.jit
    def generation(state, key):
        k_ask, k_batch, k_tell = jax.random.split(key, 3)
        idx = jax.random.randint(k_batch, (batch,), 0, n)
        x, y = x_train[idx], y_train[idx]
        population, state = es.ask(k_ask, state, es_params)
        # one member after another (module docstring)
        fitness = jax.lax.map(lambda p: _ce(paper_forward(p, x), y), population)
        fitness = jnp.where(jnp.isnan(fitness), jnp.inf, fitness)  # a NaN member is the worst
        state, _ = es.tell(k_tell, population, fitness, state, es_params)
        return state, jnp.mean(fitness)

    @jax.jit
    def test_accuracy(state):
        p = es.get_mean(state)

        def chunk(_, xy):
            x, y = xy
            return None, jnp.sum(jnp.argmax(forward_with_stats(p, x, calib), -1) == y)

        m = (x_test.shape[0] // 250) * 250
        xs = x_test[:m].reshape(-1, 250, *x_test.shape[1:])
        ys = y_test[:m].reshape(-1, 250)
        return jnp.sum(jax.lax.scan(chunk, None, (xs, ys))[1]) / m

    jax.block_until_ready(generation(state, key))  # compile (the result is discarded)
    jax.block_until_ready(test_accuracy(state))
    records = [
        {
            "wall_time": 0.0,
            "generation": 0,
            "images": 0,
            "test_accuracy": float(test_accuracy(state)),
        }
    ]
    spent, gen, next_eval = 0.0, 0, eval_every
    while spent < budget:
        t = time.perf_counter()
        state, loss = generation(state, jax.random.fold_in(key, gen))
        loss = float(loss)
        spent += time.perf_counter() - t
        gen += 1
        if spent >= next_eval or spent >= budget:
            acc = float(test_accuracy(state))
            records.append(
                {
                    "wall_time": spent,
                    "generation": gen,
                    "images": gen * pop * batch,
                    "train_loss": loss,
                    "test_accuracy": acc,
                }
            )
            log(
                f"pgpe: {spent:7.1f} s, generation {gen}, "
                f"mean population loss {loss:.4f}, test acc {acc:.4f}"
            )
            next_eval += eval_every
    return records


def rso_records(path: str) -> tuple[list[dict], dict]:
    """Per-cycle (search seconds, images evaluated, test accuracy) of an RSO ``metrics.json``."""
    doc = json.loads(Path(path).read_text())
    batch = doc["config"]["rso_batch_size"]
    spent, images, out = 0.0, 0, []
    for e in doc["epochs"]:
        spent += e["epoch_time"]
        images += 3 * e["rso_weights"] * batch
        out.append(
            {
                "wall_time": spent,
                "images": images,
                "test_accuracy": e["test_accuracy"],
                "cycle": e["epoch"],
            }
        )
    return out, doc["config"]


def plot(pgpe: list[dict], rso: list[dict] | None, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in (
        (axes[0], "wall_time", "search time (s)"),
        (axes[1], "images", "image forward passes"),
    ):
        ax.plot(
            [r[key] for r in pgpe], [r["test_accuracy"] for r in pgpe], ".-", label="evosax PGPE"
        )
        if rso:
            ax.plot(
                [r[key] for r in rso], [r["test_accuracy"] for r in rso], "o-", label="RSO (app)"
            )
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: the first conv block, 0.5 s budget, population 8, batch 32",
    )
    ap.add_argument("--budget", type=float, default=1200.0, help="seconds of search (default 1200)")
    ap.add_argument("--pop", type=int, default=64, help="population size (even; default 64)")
    ap.add_argument(
        "--batch", type=int, default=256, help="training images per generation (default 256)"
    )
    ap.add_argument("--std-init", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=0.02, help="ClipUp learning rate")
    ap.add_argument("--max-velocity", type=float, default=0.04, help="ClipUp maximum step norm")
    ap.add_argument(
        "--eval-every", type=float, default=60.0, help="seconds of search between test evaluations"
    )
    ap.add_argument(
        "--rso", default=None, metavar="METRICS_JSON", help="an RSO app run to plot beside PGPE"
    )
    ap.add_argument(
        "--out", default=None, metavar="PNG", help="write the plot here (and the records as .json)"
    )
    args = ap.parse_args(argv)
    if args.pop < 2 or args.pop % 2:
        ap.error(f"--pop must be an even number >= 2, got {args.pop}")
    from optax_neuron.mnist.data import load_mnist

    data = load_mnist()
    mean = float(np.mean(data.train_images))
    if args.quick:
        args.budget, args.pop, args.batch, args.eval_every = 0.5, 8, 32, 0.25
    records = run_pgpe(
        data,
        mean,
        budget=args.budget,
        pop=args.pop,
        batch=args.batch,
        std_init=args.std_init,
        lr=args.lr,
        max_velocity=args.max_velocity,
        eval_every=args.eval_every,
        test_limit=1000 if args.quick else None,
        blocks=1 if args.quick else 6,
    )
    rso = rso_records(args.rso)[0] if args.rso else None
    print(
        f"\n## evosax PGPE on the paper net: pop {args.pop}, batch {args.batch}, "
        f"budget {args.budget:g} s, "
        f"device {jax.devices()[0].platform}"
    )
    print("| method | search time (s) | image forward passes | test accuracy |")
    print("|---|---:|---:|---:|")
    for r in records[1:]:
        print(
            f"| PGPE gen {r['generation']} | {r['wall_time']:.0f} | {r['images']:.3g} "
            f"| {r['test_accuracy']:.4f} |"
        )
    for r in rso or []:
        print(
            f"| RSO cycle {r['cycle']} | {r['wall_time']:.0f} | {r['images']:.3g} "
            f"| {r['test_accuracy']:.4f} |"
        )
    if args.out:
        plot(
            records,
            rso,
            args.out,
            f"paper MNIST net, CPU: PGPE pop {args.pop} batch {args.batch} vs RSO",
        )
        Path(args.out).with_suffix(".json").write_text(
            json.dumps({"pgpe": records, "rso": rso}, indent=1)
        )
        print(f"plot: {args.out}")
    return records


if __name__ == "__main__":
    main()
