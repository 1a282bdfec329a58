"""The cost of one optimizer step, and the bytes of its state.

8.1 times ``update`` + ``optax.apply_updates`` (jitted, params and optimizer
state donated, the same fixed gradients every step) for

* ``optax.sgd`` without momentum (the floor: one pass over params and grads),
* ``optax.sgd(momentum=0.9)`` and ``optax.sgd(momentum=0.9, nesterov=True)``,
* ``optax_neuron.neuron_mean_sgd`` (plain and Nesterov),

on three parameter trees: an MLP 784-1024-1024-10, the MNIST CNN of the
application (``optax_neuron.mnist.models.cnn``) and a transformer-shaped tree
of about 55M parameters (d_model 1024, 4 blocks of q/k/v/out attention
projections and a 4096-wide MLP, a 4096-token embedding) with Flax-like paths,
so the default ``FLAX`` fan-in rules apply. Ratios are against optax momentum
and against plain SGD, candidates interleaved, median of repeats.

8.2 counts the bytes of the optimizer state against ``optax.sgd(momentum)``;
for a kernel the neuron-mean state is ``1/fan_in`` of the momentum trace.

Run: ``python benchmarks/bench_update_step.py [--quick] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Runner, add_common_args, format_table, machine_line, time_interleaved, tree_bytes

import optax_neuron as on
from optax_neuron import _random
from optax_neuron._tree import fan_in_mean
from optax_neuron.fan_in import fan_in_size, neuron_shape, path_str

LEARNING_RATE = 1e-3
MOMENTUM = 0.9


# --------------------------------------------------------------------------- parameter trees


def _dense(key, n_in, n_out):
    return {
        "kernel": jax.random.normal(key, (n_in, n_out)) / math.sqrt(n_in),
        "bias": jnp.zeros(n_out),
    }


def mlp_params(key, sizes=(784, 1024, 1024, 10)):
    """``layers/i/{kernel,bias}`` for an MLP with the given widths."""
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        "layers": {
            str(i): _dense(k, a, b)
            for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
        }
    }


def cnn_params(key):
    """The parameters of the application's MNIST CNN (``optax_neuron.mnist.models.cnn``), a dict."""
    from flax import nnx

    from optax_neuron.mnist.models import cnn

    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    params = nnx.to_pure_dict(nnx.state(cnn(nnx.Rngs(seed)), nnx.Param))
    return jax.tree.map(jnp.asarray, params)


def transformer_params(key, d_model=1024, layers=4, heads=16, mlp=4096, vocab=4096):
    """A transformer-shaped tree with Flax NNX-like names.

    Per block: ``attn/{query,key,value}/kernel`` ``(d, heads, d/heads)``
    (fan-in axis 0), ``attn/out/kernel`` ``(heads, d/heads, d)`` (fan-in axes
    0, 1), ``mlp/{up,down}/{kernel,bias}`` and two layer norms.
    """
    head_dim = d_model // heads
    keys = iter(jax.random.split(key, 6 * layers + 1))

    def normal(shape, fan_in):
        return _random.normal(next(keys), shape) / math.sqrt(fan_in)

    def norm():
        return {"scale": jnp.ones(d_model), "bias": jnp.zeros(d_model)}

    blocks = {}
    for i in range(layers):
        blocks[str(i)] = {
            "norm1": norm(),
            "attn": {
                "query": {"kernel": normal((d_model, heads, head_dim), d_model)},
                "key": {"kernel": normal((d_model, heads, head_dim), d_model)},
                "value": {"kernel": normal((d_model, heads, head_dim), d_model)},
                "out": {"kernel": normal((heads, head_dim, d_model), d_model)},
            },
            "norm2": norm(),
            "mlp": {
                "up": {"kernel": normal((d_model, mlp), d_model), "bias": jnp.zeros(mlp)},
                "down": {"kernel": normal((mlp, d_model), mlp), "bias": jnp.zeros(d_model)},
            },
        }
    return {
        "embed": {"embedding": normal((vocab, d_model), 1)},
        "blocks": blocks,
        "final_norm": norm(),
    }


def trees(quick: bool) -> dict:
    """name -> a function building the parameter tree."""
    key = jax.random.PRNGKey(0)
    if quick:  # proves the script runs: the app's CNN and a tiny transformer-shaped tree
        return {
            "MNIST CNN (app)": lambda: cnn_params(key),
            "transformer (tiny)": lambda: transformer_params(
                key, d_model=64, layers=1, heads=4, mlp=128, vocab=64
            ),
        }
    return {
        "MLP 784-1024-1024-10": lambda: mlp_params(key),
        "MNIST CNN (app)": lambda: cnn_params(key),
        "transformer ~55M": lambda: transformer_params(key),
    }


# --------------------------------------------------------------------------- optimizers and steps


def optimizers() -> dict[str, optax.GradientTransformation]:
    return {
        "optax sgd (floor)": optax.sgd(LEARNING_RATE),
        "optax momentum": optax.sgd(LEARNING_RATE, momentum=MOMENTUM),
        "optax nesterov": optax.sgd(LEARNING_RATE, momentum=MOMENTUM, nesterov=True),
        "neuron_mean_sgd": on.neuron_mean_sgd(LEARNING_RATE, momentum=MOMENTUM),
        "neuron_mean_sgd nesterov": on.neuron_mean_sgd(
            LEARNING_RATE, momentum=MOMENTUM, nesterov=True
        ),
    }


def make_runner(name, tx, params, grads) -> Runner:
    """``(params, opt_state) -> (params, opt_state)``, jitted, both donated; ``grads`` fixed."""

    @functools.partial(jax.jit, donate_argnums=0)
    def step(carry, grads):
        params, opt_state = carry
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # Each runner owns a copy of the params (they are donated and updated in place).
    own = jax.tree.map(jnp.copy, params)
    return Runner(name, lambda carry: step(carry, grads), (own, tx.init(own)))


def reduction_runner(params, grads) -> Runner:
    """Diagnostic: only the fan-in means of the gradients (what neuron-mean adds to plain SGD)."""
    axes = on.fan_in_axes(params)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(acc, grads):
        means = jax.tree.map(lambda g, a: fan_in_mean(g, a, g.dtype) if a else g, grads, axes)
        return jax.tree.map(jnp.add, acc, means)

    acc = jax.tree.map(lambda g, a: jnp.zeros(neuron_shape(g.shape, a), g.dtype), grads, axes)
    return Runner("(fan-in means only)", lambda a: step(a, grads), acc)


def n_params(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- 8.2 memory


def memory_rows(tree_name, params) -> list:
    momentum = optax.sgd(LEARNING_RATE, momentum=MOMENTUM).init(params)
    neuron = on.neuron_mean_sgd(LEARNING_RATE, momentum=MOMENTUM).init(params)
    m_bytes, n_bytes = tree_bytes(momentum), tree_bytes(neuron)
    # Kernels only (leaves with fan-in axes): measured state vs the 1/fan_in prediction.
    axes = on.fan_in_axes(params)
    state = optax.tree.get(neuron, "neuron_momentum")
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_a = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat_s = jax.tree.leaves(state)
    k_full = k_state = k_pred = 0.0
    kernel_rows = []
    for (path, p), ax, s in zip(flat_p, flat_a, flat_s, strict=True):
        if not ax:
            continue
        fan = fan_in_size(p.shape, ax)
        k_full += p.size
        k_state += s.size
        k_pred += p.size / fan
        kernel_rows.append((path_str(path), p.shape, fan, s.size / p.size))
    row = [
        tree_name,
        f"{n_params(params) / 1e6:.2f}M",
        f"{m_bytes / 2**20:.2f}",
        f"{n_bytes / 2**20:.3f}",
        f"{n_bytes / m_bytes:.4f}",
        f"{k_state / k_full:.5f}",
        f"{k_pred / k_full:.5f}",
    ]
    return row, kernel_rows


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 21)
    print(machine_line())
    print(
        f"update step = tx.update + optax.apply_updates, jitted, params+state donated; "
        f"lr {LEARNING_RATE}, momentum {MOMENTUM}; median of {repeats} interleaved repeats\n"
    )

    time_rows, mem_rows, results = [], [], {}
    for tree_name, build in trees(args.quick).items():
        params = build()
        grads = jax.tree.map(
            lambda p: _random.normal(jax.random.PRNGKey(1), p.shape, p.dtype), params
        )
        # The 55M tree: fewer repeats (each step moves about 1 GB).
        r = max(3, repeats // 2) if n_params(params) > 20e6 else repeats
        runners = [make_runner(n, tx, params, grads) for n, tx in optimizers().items()]
        runners.append(reduction_runner(params, grads))
        time_interleaved(runners, repeats=r, warmup=2)
        med = {x.name: x.median for x in runners}
        results[tree_name] = med
        mom, sgd, nes = med["optax momentum"], med["optax sgd (floor)"], med["optax nesterov"]
        for x in runners:
            ref_mom = nes if "nesterov" in x.name else mom
            time_rows.append(
                [
                    tree_name,
                    x.name,
                    f"{x.median * 1e3:.3f}",
                    f"{x.median / ref_mom:.2f}",
                    f"{x.median / sgd:.2f}",
                ]
            )
        row, _kernel_rows = memory_rows(tree_name, params)
        mem_rows.append(row)
        del runners, params, grads

    print("## 8.1 update step (ratio vs momentum: against optax nesterov for the Nesterov rows)\n")
    print(format_table(["tree", "optimizer", "ms", "/ optax momentum", "/ optax sgd"], time_rows))
    print("\n## 8.2 optimizer state bytes\n")
    print(
        format_table(
            [
                "tree",
                "params",
                "momentum state MiB",
                "neuron-mean state MiB",
                "ratio (all)",
                "ratio (kernels)",
                "predicted sum(size/fan_in)/sum(size)",
            ],
            mem_rows,
        )
    )
    return results


if __name__ == "__main__":
    main()
