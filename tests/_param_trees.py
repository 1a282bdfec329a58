"""Parameter trees written by hand, shared by the tests of neuron_mean and neuron_adam.

A tree is a flat dict ``path -> (shape, fan-in axes)``; the axes are written out by hand
(not computed by :mod:`optax_neuron.fan_in`) so that the tests check the resolver too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

TREES = {
    "mlp": {
        "layers/0/kernel": ((7, 5), (0,)),
        "layers/0/bias": ((5,), ()),
        "layers/1/kernel": ((5, 3), (0,)),
        "layers/1/bias": ((3,), ()),
    },
    "cnn": {
        "conv/kernel": ((3, 3, 2, 4), (0, 1, 2)),
        "conv/bias": ((4,), ()),
        "dense/kernel": ((36, 6), (0,)),
        "dense/bias": ((6,), ()),
    },
    # nnx.MultiHeadAttention(num_heads=2, in_features=6, qkv_features=8, out_features=5):
    # q/k/v kernels (in, heads, head_dim) reduce over `in`; out (heads, head_dim, out) over 0, 1.
    "attention": {
        "query/kernel": ((6, 2, 4), (0,)),
        "query/bias": ((2, 4), ()),
        "key/kernel": ((6, 2, 4), (0,)),
        "key/bias": ((2, 4), ()),
        "value/kernel": ((6, 2, 4), (0,)),
        "value/bias": ((2, 4), ()),
        "out/kernel": ((2, 4, 5), (0, 1)),
        "out/bias": ((5,), ()),
    },
}


def nest(flat: dict) -> dict:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def flatten(tree) -> dict:
    """A nested dict of arrays -> ``{"a/b": np.ndarray}``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): np.asarray(leaf) for path, leaf in leaves}


def random_grads(rng, shapes_axes, dtype):
    """Standard-normal NumPy gradients, flat, for every path of ``shapes_axes``."""
    return {p: rng.standard_normal(shape).astype(dtype) for p, (shape, _) in shapes_axes.items()}


def params_of(shapes_axes, dtype=np.float32, rng=None):
    """Standard-normal JAX parameters, nested (``rng`` defaults to ``default_rng(0)``)."""
    rng = rng or np.random.default_rng(0)
    return nest(
        {p: jnp.asarray(rng.standard_normal(shape), dtype) for p, (shape, _) in shapes_axes.items()}
    )


def step_and_compare(update, state, grads, expected, dtype, rtol, step):
    """One ``update`` of flat NumPy ``grads``; its updates must equal ``expected`` (flat).

    ``atol`` is one rounding of the leaf's largest value, for entries where the two
    terms of the update cancel to near zero. Returns the new state.
    """
    updates, state = update(nest({p: jnp.asarray(g) for p, g in grads.items()}), state)
    got = flatten(updates)
    for p in expected:
        assert got[p].dtype == dtype, p
        atol = rtol * np.abs(expected[p]).max()
        np.testing.assert_allclose(
            got[p], expected[p], rtol=rtol, atol=atol, err_msg=f"{p} step {step}"
        )
    return state
