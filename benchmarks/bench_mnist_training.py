"""MNIST training throughput and accuracy, neuron-mean SGD against Optax.

Trains the application's CNN (``optax_neuron.mnist.models.cnn``) on real
MNIST (50,000 training images, batch 128) with the application's optimizers
and default learning rates (``optax_neuron.mnist.train.make_optimizer``):
``neuron-mean-sgd``, ``momentum`` (optax.sgd with momentum) and ``adam``,
from the same initial weights and the same batch order (same seed).

Each epoch is the application's jitted ``lax.scan`` over minibatches
(``train.make_train_epoch``), compiled ahead of time, so the timing holds no
compilation. The optimizers' epochs run interleaved (epoch 1 of each, then
epoch 2 of each, ...); throughput is training images per second over the
median epoch time, and the ratio is against optax momentum. Test accuracy is
measured after epochs 1 and 3 (not timed). Target: throughput >= 0.95x
optax momentum.

Run: ``python benchmarks/bench_mnist_training.py [--quick] [--epochs N] [--limit-train N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table, machine_line

from optax_neuron.mnist.data import load_mnist
from optax_neuron.mnist.models import make_model
from optax_neuron.mnist.train import DEFAULTS, evaluate, make_optimizer, make_train_epoch

OPTIMIZERS = ("neuron-mean-sgd", "momentum", "adam")
BASELINE = "momentum"


class Trainee:
    """One optimizer's model, its compiled epoch and its record."""

    def __init__(self, name, model_name, seed, batch_size, x, y):
        model = make_model(model_name, nnx.Rngs(seed))
        model.train()
        opt = nnx.Optimizer(model, make_optimizer(name), wrt=nnx.Param)
        self.name = name
        self.graphdef, self.state = nnx.split((model, opt))
        key = jax.random.PRNGKey(seed)
        self.epoch = (
            make_train_epoch(self.graphdef, batch_size).lower(self.state, x, y, key).compile()
        )
        self.times: list[float] = []
        self.accuracy: dict[int, float] = {}
        self.train_loss: float = float("nan")

    def run_epoch(self, x, y, key) -> None:
        t0 = time.perf_counter()
        self.state, loss, _ = jax.block_until_ready(self.epoch(self.state, x, y, key))
        self.times.append(time.perf_counter() - t0)
        self.train_loss = float(loss)

    def test(self, epoch, images, labels) -> None:
        model, _ = nnx.merge(self.graphdef, self.state)
        self.accuracy[epoch] = evaluate(model, images, labels)[1]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny run that only proves the script works"
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 3; quick 1)")
    parser.add_argument(
        "--limit-train", type=int, default=None, help="use the first N training images"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default=None, help="application model (default cnn; quick: mlp)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    epochs = args.epochs or (1 if args.quick else 3)
    limit = args.limit_train or (512 if args.quick else None)
    model = args.model or ("mlp" if args.quick else "cnn")

    data = load_mnist()
    n = len(data.train_labels) if limit is None else min(limit, len(data.train_labels))
    x, y = jnp.asarray(data.train_images[:n]), jnp.asarray(data.train_labels[:n])
    test_x, test_y = (
        (data.test_images[:500], data.test_labels[:500])
        if args.quick
        else (data.test_images, data.test_labels)
    )
    batch = min(args.batch_size, n)
    images_per_epoch = (n // batch) * batch

    print(machine_line())
    print(
        f"MNIST {model}, {n} training images, batch {batch}, {epochs} epochs, seed {args.seed}; "
        "epochs interleaved across optimizers, compiled ahead of time; "
        f"test set {len(test_y)} images\n"
    )
    trainees = [Trainee(name, model, args.seed, batch, x, y) for name in OPTIMIZERS]
    report_epochs = sorted({1, epochs} & set(range(1, epochs + 1)))
    for epoch in range(epochs):
        key = jax.random.fold_in(
            jax.random.PRNGKey(args.seed), epoch
        )  # the application's shuffle key
        for t in trainees:
            t.run_epoch(x, y, key)
        if epoch + 1 in report_epochs:
            for t in trainees:
                t.test(epoch + 1, test_x, test_y)

    base = next(t for t in trainees if t.name == BASELINE)
    base_rate = images_per_epoch / statistics.median(base.times)
    rows, results = [], {}
    for t in trainees:
        rate = images_per_epoch / statistics.median(t.times)
        lr = DEFAULTS[t.name]["learning_rate"]
        acc = [f"{100 * t.accuracy[e]:.2f}%" for e in report_epochs]
        rows.append(
            [
                t.name,
                f"{lr:g}",
                f"{rate:,.0f}",
                f"{rate / base_rate:.3f}",
                *acc,
                f"{t.train_loss:.4f}",
            ]
        )
        results[t.name] = {
            "images_per_s": rate,
            "ratio": rate / base_rate,
            "accuracy": dict(t.accuracy),
        }
    header = ["optimizer", "lr", "images/s", f"/ {BASELINE}"]
    header += [f"test acc epoch {e}" for e in report_epochs] + ["last train loss"]
    print(format_table(header, rows))
    return results


if __name__ == "__main__":
    main()
