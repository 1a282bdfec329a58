"""Neuron-wise Adam against Adam, AdamW, Adafactor, Lion and momentum on MNIST.

Trains the application's CNN (``--model cnn``) and its small vision
transformer (``--model vit``, ``nnx.MultiHeadAttention``, so the attention
fan-in rules are used) with the application's optimizers and default learning
rates (``optax_neuron.mnist.train.make_optimizer``, cosine decay over the run,
batch 64), all from the same initial weights and the same batch order:

* ``adam``, ``adamw`` (weight decay 1e-4), ``adafactor`` (Optax defaults:
  factored only for dims >= 128, relative to the parameter scale), ``lion``;
* ``neuron-adam``: :func:`optax_neuron.neuron_adam`, one second moment per
  neuron, the first moment per connection (Adam-mini's rule);
* ``neuron-adam-neuron``: the same with ``first_moment="neuron"`` (the whole
  state per neuron);
* ``neuron-mean-sgd`` and ``momentum`` (optax.sgd, momentum 0.9).

Reported per model and optimizer: optimizer-state bytes (``tx.init`` of the
model's parameters; every array leaf counted, counters included) and its ratio
to Adam's, test accuracy on the 10,000 official test images after every
epoch, the mean training loss of the last epoch, and images/s relative to
Adam (median epoch time; the epochs of all optimizers run interleaved, each a
jitted ``lax.scan`` compiled ahead of time). The per-step training losses go
into a plot (``--plot``; a running mean over ``--smooth`` steps).

Run: ``python benchmarks/bench_neuron_adam.py [--quick] [--epochs N] [--limit-train N]
[--models cnn,vit] [--plot PATH]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table, machine_line, tree_bytes

from optax_neuron.mnist.data import load_mnist
from optax_neuron.mnist.models import make_model
from optax_neuron.mnist.train import DEFAULTS, evaluate, make_optimizer

OPTIMIZERS = (
    "adam",
    "adamw",
    "adafactor",
    "lion",
    "neuron-adam",
    "neuron-adam-neuron",
    "neuron-mean-sgd",
    "momentum",
)
BASELINE = "adam"
DEFAULT_PLOT = Path(__file__).resolve().parent / "figures" / "neuron_adam.png"


def make_epoch(graphdef, batch_size: int):
    """``epoch(state, x, y, key) -> (state, per-step losses)``: the application's epoch
    (``train.make_train_epoch``: shuffle with ``key``, full batches, one ``lax.scan``),
    returning every step's loss instead of their mean."""

    def step(state, batch):
        model, opt = nnx.merge(graphdef, state)
        x, y = batch

        def loss_fn(model):
            logits = model(x)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    @jax.jit
    def epoch(state, images, labels, key):
        steps = images.shape[0] // batch_size
        perm = jax.random.permutation(key, images.shape[0])[: steps * batch_size]
        perm = perm.reshape(steps, batch_size)
        return jax.lax.scan(step, state, (images[perm], labels[perm]))

    return epoch


class Trainee:
    """One optimizer on one model: its compiled epoch, losses, accuracies and state size."""

    def __init__(self, name, model_name, seed, batch_size, total_steps, x, y):
        model = make_model(model_name, nnx.Rngs(seed))
        model.train()
        tx = make_optimizer(name, schedule="cosine", total_steps=total_steps)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        self.param_bytes = tree_bytes(params)
        self.state_bytes = tree_bytes(tx.init(params))
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        self.name = name
        self.graphdef, self.state = nnx.split((model, opt))
        key = jax.random.PRNGKey(seed)
        epoch = make_epoch(self.graphdef, batch_size)
        self.epoch = epoch.lower(self.state, x, y, key).compile()
        self.times: list[float] = []
        self.losses: list[float] = []
        self.epoch_loss: list[float] = []
        self.accuracy: list[float] = []

    def run_epoch(self, x, y, key) -> None:
        t0 = time.perf_counter()
        self.state, losses = jax.block_until_ready(self.epoch(self.state, x, y, key))
        self.times.append(time.perf_counter() - t0)
        losses = np.asarray(losses, np.float64)
        self.losses.extend(losses.tolist())
        self.epoch_loss.append(float(np.mean(losses)))

    def test(self, images, labels) -> None:
        model, _ = nnx.merge(self.graphdef, self.state)
        self.accuracy.append(evaluate(model, images, labels)[1])


def run_model(model_name, args, data, n, test_x, test_y) -> dict:
    x, y = jnp.asarray(data.train_images[:n]), jnp.asarray(data.train_labels[:n])
    batch = min(args.batch_size, n)
    steps = n // batch
    trainees = [
        Trainee(name, model_name, args.seed, batch, steps * args.epochs, x, y)
        for name in args.optimizers
    ]
    for epoch in range(args.epochs):
        key = jax.random.fold_in(jax.random.PRNGKey(args.seed), epoch)  # the application's key
        for t in trainees:
            t.run_epoch(x, y, key)
        for t in trainees:
            t.test(test_x, test_y)
    base = next((t for t in trainees if t.name == BASELINE), trainees[0])
    base_time = statistics.median(base.times)
    rows, results = [], {}
    for t in trainees:
        speed = base_time / statistics.median(t.times)
        finite = np.isfinite(t.epoch_loss[-1])
        rows.append(
            [
                t.name,
                f"{DEFAULTS[t.name]['learning_rate']:g}",
                f"{t.state_bytes:,}",
                f"{t.state_bytes / base.state_bytes:.3f}",
                *[f"{100 * a:.2f}%" for a in t.accuracy],
                f"{t.epoch_loss[-1]:.4f}" if finite else "nan",
                f"{speed:.2f}",
            ]
        )
        results[t.name] = {
            "state_bytes": t.state_bytes,
            "param_bytes": t.param_bytes,
            "state_ratio": t.state_bytes / base.state_bytes,
            "accuracy": list(t.accuracy),
            "epoch_loss": list(t.epoch_loss),
            "losses": list(t.losses),
            "speed": speed,
        }
    header = ["optimizer", "lr", "state bytes", f"/ {base.name}"]
    header += [f"test acc ep {e + 1}" for e in range(args.epochs)]
    header += ["train loss (last ep)", f"speed / {base.name}"]
    print(
        f"\n### {model_name}: {base.param_bytes:,} parameter bytes, {n} training images, "
        f"{steps} steps per epoch\n"
    )
    print(format_table(header, rows), flush=True)
    return results


def plot(results: dict, path: Path, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "neuron-adam": ("tab:red", "-"),
        "neuron-adam-neuron": ("tab:red", "--"),
        "adam": ("k", "-"),
        "adamw": ("0.5", ":"),
        "adafactor": ("tab:green", "-"),
        "lion": ("tab:purple", "-"),
        "neuron-mean-sgd": ("tab:blue", "--"),
        "momentum": ("tab:blue", "-"),
    }
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.6), squeeze=False)
    for ax, (model_name, runs) in zip(axes[0], results.items(), strict=True):
        for name, r in runs.items():
            loss = np.asarray(r["losses"])
            k = max(1, min(smooth, len(loss)))
            curve = np.convolve(loss, np.ones(k) / k, mode="valid")
            color, ls = styles.get(name, (None, "-"))
            ax.plot(
                np.arange(k, len(loss) + 1),
                curve,
                ls,
                color=color,
                lw=1.2,
                label=f"{name} ({100 * r['accuracy'][-1]:.1f}%)",
            )
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss (mean of {smooth} steps)")
        ax.set_title(f"MNIST {model_name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    print(f"\nplot: {path} ({path.stat().st_size / 1e3:.0f} kB)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny run that only proves the script works"
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 2; quick 1)")
    parser.add_argument(
        "--limit-train",
        type=int,
        default=None,
        help="first N training images (default 10000; quick 256)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--models", default=None, help="comma-separated (default cnn,vit; quick vit)"
    )
    parser.add_argument(
        "--optimizers",
        default=None,
        help="comma-separated (default: all eight; quick: adam and the two neuron-adam)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smooth", type=int, default=None, help="running mean of the plotted losses"
    )
    parser.add_argument(
        "--plot", default=None, help=f"PNG path (default {DEFAULT_PLOT}; quick: none)"
    )
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (1 if args.quick else 2)
    limit = args.limit_train or (256 if args.quick else 10000)
    models = (args.models or ("vit" if args.quick else "cnn,vit")).split(",")
    quick_set = "adam,neuron-adam,neuron-adam-neuron"
    args.optimizers = (
        args.optimizers or (quick_set if args.quick else ",".join(OPTIMIZERS))
    ).split(",")
    bad = [o for o in args.optimizers if o not in DEFAULTS or o == "rso"]
    if bad:
        raise SystemExit(f"--optimizers: unknown {bad}; choose from {', '.join(OPTIMIZERS)}")
    smooth = args.smooth or (4 if args.quick else 25)
    plot_path = Path(args.plot) if args.plot else (None if args.quick else DEFAULT_PLOT)

    data = load_mnist()
    n = min(limit, len(data.train_labels))
    test_x, test_y = data.test_images, data.test_labels
    if args.quick:
        test_x, test_y = test_x[:500], test_y[:500]
    print(machine_line())
    print(
        f"MNIST, first {n} training images, batch {args.batch_size}, {args.epochs} epochs, "
        f"cosine decay, seed {args.seed}; application defaults for the learning rates; "
        f"epochs interleaved across optimizers; test set {len(test_y)} images"
    )
    t0 = time.perf_counter()
    results = {m: run_model(m, args, data, n, test_x, test_y) for m in models}
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if plot_path is not None:
        plot(results, plot_path, smooth)
    return results


if __name__ == "__main__":
    main()
