"""The overhead of gradient monitoring on a full MNIST CNN train step.

One step = forward, backward and optimizer update of the application's CNN
(``optax_neuron.mnist.models.cnn``, about 420k parameters) on a batch of real
MNIST images, jitted, the ``(model, optimizer)`` state donated, through
``nnx.Optimizer`` as the application trains. Each optimizer ``tx`` is timed
alone and as ``optax.chain(running_gradient_mean(), gradient_norms(), tx)``
(per-neuron norms on, the fullest monitoring the library offers), and as the
application's ``--grad-stats`` chain (EMA mean, no per-neuron norms).
Ratios are monitored / plain, interleaved, median of repeats. Target: <= 1.05.

Run: ``python benchmarks/bench_monitoring.py [--quick] [--repeats N] [--batch-size B]``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Runner, add_common_args, format_table, machine_line, time_interleaved

import optax_neuron as on
from optax_neuron.mnist.data import load_mnist
from optax_neuron.mnist.models import cnn


def make_runner(
    name: str, tx: optax.GradientTransformation, x: jax.Array, y: jax.Array, seed: int = 0
) -> Runner:
    """A jitted train step ``state -> state`` of a fresh CNN trained with ``tx`` on ``(x, y)``."""
    model = cnn(nnx.Rngs(seed))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, x, y):
        model, opt = nnx.merge(graphdef, state)

        def loss_fn(model):
            logits = model(x)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

        grads = nnx.grad(loss_fn)(model)
        opt.update(model, grads)
        return nnx.state((model, opt))

    return Runner(name, lambda s: step(s, x, y), state)


def monitored(tx):
    return optax.chain(on.running_gradient_mean(), on.gradient_norms(), tx)


def app_monitored(tx):
    # What `python -m optax_neuron.mnist --grad-stats` puts in front (train.make_optimizer).
    return optax.chain(
        on.gradient_norms(per_neuron=False), on.running_gradient_mean(decay=0.99), tx
    )


def main(argv=None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 31)
    batch = 16 if args.quick else args.batch_size
    data = load_mnist()
    x = jnp.asarray(data.train_images[:batch])
    y = jnp.asarray(data.train_labels[:batch])
    print(machine_line())
    print(
        "MNIST CNN train step (forward + backward + update), "
        f"batch {batch}, jitted, state donated; "
        f"median of {repeats} interleaved repeats\n"
    )

    bases = {"optax momentum": optax.sgd(0.02, momentum=0.9)}
    if not args.quick:
        bases["neuron_mean_sgd"] = on.neuron_mean_sgd(0.1, momentum=0.9)
        bases["adam"] = optax.adam(1e-3)
    rows, results = [], {}
    for base, tx in bases.items():
        runners = [
            make_runner(base, tx, x, y),
            make_runner(f"{base} + mean + norms (per-neuron)", monitored(tx), x, y),
            make_runner(f"{base} + app --grad-stats", app_monitored(tx), x, y),
        ]
        time_interleaved(runners, repeats=repeats, warmup=3)
        plain = runners[0].median
        for r in runners:
            rows.append([r.name, f"{r.median * 1e3:.3f}", f"{r.median / plain:.3f}"])
            results[r.name] = r.median / plain
    print(format_table(["train step", "ms", "/ unmonitored"], rows))
    return results


if __name__ == "__main__":
    main()
