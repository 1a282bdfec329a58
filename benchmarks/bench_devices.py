"""MNIST epoch throughput data-parallel over 2 devices against 1 (``--devices``).

One process with two CPU devices (``--xla_force_host_platform_device_count=2``, set here
before JAX starts, as the CLI's ``--devices 2`` does). Both candidates are the
application's compiled epoch (``train.make_train_epoch``, a jitted ``lax.scan`` over
minibatches) from the same initial weights and batch order:

* ``1 device``: state and data on the first device, as ``--devices 1``;
* ``2 devices``: state and data replicated on a 2-device mesh, every batch split over the
  devices (``batch_sharding=P(None, "data")``), the gradients all-reduced, as ``--devices 2``.

Epochs are compiled ahead of time and run interleaved (1, 2, 1, 2, ...); throughput is
training images per second over the median epoch time, and the ratio is against one
device. The last train loss of both is printed (they must agree up to float rounding).
On a CPU the two "devices" share the same cores, so no speed-up is to be expected there;
the figure says what ``--devices`` costs or gains on such a machine.

Run: ``python benchmarks/bench_devices.py [--quick] [--model cnn] [--epochs N]``.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [*os.environ.get("XLA_FLAGS", "").split(), "--xla_force_host_platform_device_count=2"]
)

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table, machine_line

from optax_neuron.mnist.data import load_mnist
from optax_neuron.mnist.models import make_model
from optax_neuron.mnist.train import make_optimizer, make_train_epoch


class Trainee:
    """One device count: its state, data, compiled epoch and epoch times."""

    def __init__(self, devices: int, model_name: str, seed: int, batch: int, x, y):
        model = make_model(model_name, nnx.Rngs(seed))
        model.train()
        opt = nnx.Optimizer(model, make_optimizer("neuron-mean-sgd"), wrt=nnx.Param)
        self.graphdef, state = nnx.split((model, opt))
        mesh = jax.make_mesh(
            (devices,), ("data",), (AxisType.Auto,), devices=jax.devices()[:devices]
        )
        sharding = NamedSharding(mesh, P(None, "data")) if devices > 1 else None
        self.state, self.x, self.y = jax.device_put((state, x, y), NamedSharding(mesh, P()))
        key = jax.random.PRNGKey(seed)
        epoch = make_train_epoch(self.graphdef, batch, sharding)
        self.epoch = epoch.lower(self.state, self.x, self.y, key).compile()
        self.name = f"{devices} device{'s' if devices > 1 else ''}"
        self.times: list[float] = []
        self.loss = float("nan")

    def run_epoch(self, key) -> None:
        t0 = time.perf_counter()
        self.state, loss, _ = jax.block_until_ready(self.epoch(self.state, self.x, self.y, key))
        self.times.append(time.perf_counter() - t0)
        self.loss = float(loss)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny run that proves the script works"
    )
    parser.add_argument("--model", default="mlp", help="application model (default mlp)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs each (default 3; quick 1)")
    parser.add_argument("--batch-size", type=int, default=64, help="default 64, the CLI's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    epochs = args.epochs or (1 if args.quick else 3)
    data = load_mnist()
    n = 512 if args.quick else len(data.train_labels)
    x, y = jnp.asarray(data.train_images[:n]), jnp.asarray(data.train_labels[:n])
    images_per_epoch = (n // args.batch_size) * args.batch_size

    print(machine_line())
    print(f"MNIST {args.model}, {n} training images, batch {args.batch_size}, neuron-mean-sgd, "
          f"{epochs} epochs each, interleaved, compiled ahead of time\n")  # fmt: skip
    trainees = [Trainee(d, args.model, args.seed, args.batch_size, x, y) for d in (1, 2)]
    for epoch in range(epochs):
        key = jax.random.fold_in(jax.random.PRNGKey(args.seed), epoch)
        for t in trainees:
            t.run_epoch(key)
    base = images_per_epoch / statistics.median(trainees[0].times)
    rows, results = [], {}
    for t in trainees:
        rate = images_per_epoch / statistics.median(t.times)
        times = ", ".join(f"{s:.1f}" for s in t.times)
        rows.append([t.name, f"{rate:,.0f}", f"{rate / base:.2f}", times, f"{t.loss:.6f}"])
        results[t.name] = {"images_per_s": rate, "ratio": rate / base, "loss": t.loss}
    header = ["data parallel", "images/s", "/ 1 device", "epoch times (s)", "last train loss"]
    print(format_table(header, rows))
    return results


if __name__ == "__main__":
    main()
