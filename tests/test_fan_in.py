"""Tests for ``optax_neuron.fan_in``: fan-in axes keyed on parameter paths.

The expected axes come from first principles, not from the code under test:
the documented kernel layout of each layer (Flax kernels are ``(..., in,
out)``, PyTorch/Equinox weights are ``(out, in, ...)``), and, for the weight
layers, the layer's own connectivity measured with ``jax.jacrev``: kernel entry
``k`` feeds output unit ``o`` exactly when the derivative of ``o`` with
respect to ``k`` is non-zero. Parameters are built by the real libraries
(Flax NNX, Flax Linen, Equinox) wherever one is installed.
"""

from __future__ import annotations

import re

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from optax_neuron import _random
from optax_neuron.fan_in import (
    ALL_BUT_FIRST,
    ALL_BUT_LAST,
    FLAX,
    FLAX_STRICT,
    NO_AXES,
    TORCH,
    fan_in_axes,
    fan_in_size,
    first_match,
    neuron_shape,
    path_str,
)
from optax_neuron.neuron_mean import neuron_mean_sgd


def _is_axes(x):
    return isinstance(x, tuple) and all(isinstance(a, int) for a in x)


def by_path(axes_tree):
    """``{path: axes}`` for a tree of resolved axes (NNX State, dicts, Equinox modules)."""
    flat = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=_is_axes)[0]
    return {path_str(p): a for p, a in flat}


def _is_shape(x):
    return isinstance(x, jax.ShapeDtypeStruct)


def nnx_params(module, kind=nnx.Param):
    return nnx.state(module, kind)


def abstract_nnx(make):
    """The NNX module built by ``make(rngs)``, with shape-only leaves (nothing computed)."""
    return nnx.eval_shape(lambda: make(nnx.Rngs(0)))


def abstract_linen(module, x_shape, x_dtype=jnp.float32):
    """Linen variables from ``module.init``, with shape-only leaves (nothing computed)."""
    return jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct(x_shape, x_dtype))


# --------------------------------------------------------------------------
# Ground truth: which kernel entries feed which output unit.
# --------------------------------------------------------------------------


def measured_incoming(out_of_kernel, kernel):
    """Boolean ``(*unit_shape, *kernel.shape)``: does kernel entry k feed unit o.

    ``out_of_kernel(k)`` runs the real layer with kernel ``k`` on a positive
    input and returns its output summed over batch and positions, one value
    per output unit; positive inputs keep the sums of input values that form
    the derivative away from zero.
    """
    jac = jax.jit(jax.jacrev(out_of_kernel))(jnp.asarray(kernel, jnp.float32))
    return np.asarray(jac) != 0


def incoming_from_axes(kernel_shape, axes):
    """Boolean ``(*unit_shape, *kernel_shape)`` implied by fan-in ``axes``:
    unit ``o`` owns the entries whose non-fan-in coordinates equal ``o``."""
    rest = [i for i in range(len(kernel_shape)) if i not in axes]
    unit_shape = tuple(kernel_shape[i] for i in rest)
    out = np.zeros(unit_shape + tuple(kernel_shape), bool)
    for k in np.ndindex(*kernel_shape):
        out[tuple(k[i] for i in rest) + k] = True
    return out


def _ones_like(a):
    return jnp.ones(a.shape, a.dtype) if isinstance(a, (jax.Array, jax.ShapeDtypeStruct)) else a


def positive(*shape, seed=0):
    return _random.uniform(jax.random.key(seed), shape, minval=0.5, maxval=1.5)


def nnx_apply_with(module, name, x, n_unit_axes):
    """``kernel -> output per unit`` for an NNX module whose leaf ``name`` is replaced."""
    graphdef, state = nnx.split(module)
    state = jax.tree.map(_ones_like, state)  # values do not change which entries feed which unit

    def run(kernel):
        new = jax.tree_util.tree_map_with_path(
            lambda p, v: kernel if path_str(p) == name else v, state
        )
        y = nnx.merge(graphdef, new)(x)
        return y.reshape((-1, *y.shape[y.ndim - n_unit_axes :])).sum(0)

    kernel = next(
        v for p, v in jax.tree_util.tree_flatten_with_path(state)[0] if path_str(p) == name
    )
    return run, kernel


def nnx_case(make, x_shape, sub=None, n_unit_axes=1):
    """Axes resolved on the whole module; connectivity measured on its part ``sub``."""

    def build():
        module = abstract_nnx(make)
        part = module if sub is None else getattr(module, sub)
        run, kernel = nnx_apply_with(part, "kernel", positive(*x_shape), n_unit_axes)
        name = "kernel" if sub is None else f"{sub}/kernel"
        return run, kernel, by_path(fan_in_axes(nnx_params(module)))[name]

    return build


def linen_case(module, x_shape):
    def build():
        x = positive(*x_shape)
        # The kernel's value does not change which entries feed which unit.
        params = jax.tree.map(_ones_like, abstract_linen(module, x_shape)["params"])

        def run(kernel):
            y = module.apply({"params": {**params, "kernel": kernel}}, x)
            return y.reshape(-1, y.shape[-1]).sum(0)

        return run, params["kernel"], fan_in_axes({"params": params})["params"]["kernel"]

    return build


def eqx_case(make, x_shape):
    def build():
        module = jax.tree.map(_ones_like, eqx.filter_eval_shape(make, jax.random.key(0)))
        x = positive(*x_shape)

        def run(weight):
            y = eqx.tree_at(lambda m: m.weight, module, weight)(x)
            return y.reshape(y.shape[0], -1).sum(1)  # Equinox: channels first, no batch

        axes = fan_in_axes(eqx.filter(module, eqx.is_array), TORCH)
        return run, module.weight, axes.weight

    return build


CONNECTIVITY = {
    # name: (builder, axes expected from the documented layout)
    "nnx_linear": (nnx_case(lambda r: nnx.Linear(3, 4, rngs=r), (2, 3)), (0,)),
    "nnx_conv1d": (nnx_case(lambda r: nnx.Conv(2, 3, kernel_size=(3,), rngs=r), (1, 5, 2)), (0, 1)),
    "nnx_conv3d": (
        nnx_case(lambda r: nnx.Conv(2, 3, kernel_size=(2, 2, 2), rngs=r), (1, 3, 3, 3, 2)),
        (0, 1, 2, 3),
    ),
    "nnx_conv_transpose": (
        nnx_case(lambda r: nnx.ConvTranspose(2, 3, kernel_size=(3, 3), rngs=r), (1, 4, 4, 2)),
        (0, 1, 2),
    ),
    # MultiHeadAttention projections, measured on the projection modules the
    # attention layer owns: query (in, heads, head_dim) and out (heads, head_dim, out).
    "nnx_mha_query": (
        nnx_case(
            lambda r: nnx.MultiHeadAttention(
                num_heads=2, in_features=6, qkv_features=8, out_features=5, rngs=r
            ),
            (1, 3, 6),
            sub="query",
            n_unit_axes=2,
        ),
        (0,),
    ),
    "nnx_mha_out": (
        nnx_case(
            lambda r: nnx.MultiHeadAttention(
                num_heads=2, in_features=6, qkv_features=8, out_features=5, rngs=r
            ),
            (1, 3, 2, 4),
            sub="out",
        ),
        (0, 1),
    ),
    "linen_dense": (linen_case(nn.Dense(4), (2, 3)), (0,)),
    "linen_conv2d": (linen_case(nn.Conv(3, (2, 3)), (1, 4, 5, 2)), (0, 1, 2)),
    "eqx_linear": (eqx_case(lambda k: eqx.nn.Linear(3, 4, key=k), (3,)), (1,)),
    "eqx_conv2d": (eqx_case(lambda k: eqx.nn.Conv2d(2, 3, (3, 2), key=k), (2, 5, 4)), (1, 2, 3)),
}


@pytest.mark.parametrize("name", sorted(CONNECTIVITY))
def test_resolved_axes_are_the_measured_incoming_connections(name):
    build, expected = CONNECTIVITY[name]
    run, kernel, axes = build()
    assert axes == expected
    np.testing.assert_array_equal(
        measured_incoming(run, kernel), incoming_from_axes(kernel.shape, axes)
    )


def test_measurement_tells_fan_in_from_fan_out():
    # The reference is not vacuous: the outgoing axes of a Dense kernel do not fit it.
    run, kernel, _ = CONNECTIVITY["nnx_linear"][0]()
    assert not np.array_equal(
        measured_incoming(run, kernel), incoming_from_axes(kernel.shape, (1,))
    )


# --------------------------------------------------------------------------
# Every layer type, whole parameter trees, Flax NNX.
# --------------------------------------------------------------------------


class _Lists(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List(
            [nnx.Linear(3, 4, rngs=rngs), nnx.Conv(2, 3, kernel_size=(3, 2), rngs=rngs)]
        )
        self.heads = nnx.data([nnx.Linear(3, 4, rngs=rngs)])


NNX_MODELS = {
    "linear": (lambda r: nnx.Linear(3, 4, rngs=r), {"kernel": (0,), "bias": ()}),
    "conv1d": (lambda r: nnx.Conv(2, 3, kernel_size=(3,), rngs=r), {"kernel": (0, 1), "bias": ()}),
    "conv2d": (
        lambda r: nnx.Conv(2, 3, kernel_size=(3, 2), rngs=r),
        {"kernel": (0, 1, 2), "bias": ()},
    ),
    "conv3d": (
        lambda r: nnx.Conv(2, 3, kernel_size=(2, 2, 2), rngs=r),
        {"kernel": (0, 1, 2, 3), "bias": ()},
    ),
    "conv_transpose": (
        lambda r: nnx.ConvTranspose(2, 3, kernel_size=(3, 3), rngs=r),
        {"kernel": (0, 1, 2), "bias": ()},
    ),
    "mha": (
        lambda r: nnx.MultiHeadAttention(
            num_heads=2, in_features=6, qkv_features=8, out_features=5, rngs=r
        ),
        {
            "query/kernel": (0,), "query/bias": (),
            "key/kernel": (0,), "key/bias": (),
            "value/kernel": (0,), "value/bias": (),
            "out/kernel": (0, 1), "out/bias": (),
        },
    ),
    "embed": (lambda r: nnx.Embed(10, 4, rngs=r), {"embedding": ()}),
    "layer_norm": (lambda r: nnx.LayerNorm(4, rngs=r), {"scale": (), "bias": ()}),
    "rms_norm": (lambda r: nnx.RMSNorm(4, rngs=r), {"scale": ()}),
    "sequential": (
        lambda r: nnx.Sequential(
            nnx.Linear(3, 4, rngs=r), nnx.Sequential(nnx.Conv(2, 3, kernel_size=(3,), rngs=r))
        ),
        {
            "layers/0/kernel": (0,), "layers/0/bias": (),
            "layers/1/layers/0/kernel": (0, 1), "layers/1/layers/0/bias": (),
        },
    ),
    "lists": (
        _Lists,
        {
            "blocks/0/kernel": (0,), "blocks/0/bias": (),
            "blocks/1/kernel": (0, 1, 2), "blocks/1/bias": (),
            "heads/0/kernel": (0,), "heads/0/bias": (),
        },
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(NNX_MODELS))
def test_nnx_layer(name):
    make, expected = NNX_MODELS[name]
    assert by_path(fan_in_axes(nnx_params(abstract_nnx(make)))) == expected


def test_nnx_batch_norm_params_and_batch_stats():
    bn = abstract_nnx(lambda r: nnx.BatchNorm(4, rngs=r))
    assert by_path(fan_in_axes(nnx_params(bn))) == {"scale": (), "bias": ()}
    assert by_path(fan_in_axes(nnx.state(bn))) == {"scale": (), "bias": (), "mean": (), "var": ()}


# --------------------------------------------------------------------------
# Flax Linen (paths start with the "params" / "batch_stats" collections).
# --------------------------------------------------------------------------

LINEN_MODELS = {
    "dense": (nn.Dense(4), (1, 3), {"kernel": (0,), "bias": ()}),
    "conv1d": (nn.Conv(5, (3,)), (1, 6, 2), {"kernel": (0, 1), "bias": ()}),
    "conv2d": (nn.Conv(5, (3, 3)), (1, 5, 5, 2), {"kernel": (0, 1, 2), "bias": ()}),
    "conv3d": (nn.Conv(5, (3, 3, 3)), (1, 4, 4, 4, 2), {"kernel": (0, 1, 2, 3), "bias": ()}),
    "conv_transpose": (
        nn.ConvTranspose(5, (3, 3)),
        (1, 5, 5, 2),
        {"kernel": (0, 1, 2), "bias": ()},
    ),
    "mha": (
        nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=6),
        (1, 3, 8),
        {
            "query/kernel": (0,), "query/bias": (),
            "key/kernel": (0,), "key/bias": (),
            "value/kernel": (0,), "value/bias": (),
            "out/kernel": (0, 1), "out/bias": (),
        },
    ),
    "layer_norm": (nn.LayerNorm(), (1, 4), {"scale": (), "bias": ()}),
    "rms_norm": (nn.RMSNorm(), (1, 4), {"scale": ()}),
    "sequential": (
        nn.Sequential([nn.Dense(4), nn.Sequential([nn.Conv(2, (3,))])]),
        (1, 5, 3),
        {
            "layers_0/kernel": (0,), "layers_0/bias": (),
            "layers_1/layers_0/kernel": (0, 1), "layers_1/layers_0/bias": (),
        },
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LINEN_MODELS))
def test_linen_layer(name):
    module, x_shape, expected = LINEN_MODELS[name]
    variables = abstract_linen(module, x_shape)
    assert by_path(fan_in_axes(variables)) == {f"params/{p}": a for p, a in expected.items()}


def test_linen_embed():
    variables = abstract_linen(nn.Embed(10, 4), (1,), jnp.int32)
    assert by_path(fan_in_axes(variables)) == {"params/embedding": ()}


def test_linen_batch_norm():
    variables = abstract_linen(nn.BatchNorm(use_running_average=False), (2, 4))
    assert by_path(fan_in_axes(variables)) == {
        "params/scale": (),
        "params/bias": (),
        "batch_stats/mean": (),
        "batch_stats/var": (),
    }


def test_haiku_style_w_and_b():
    # Haiku's layout (hk.Linear w: (in, out), hk.Conv2D w: (kh, kw, in, out)),
    # module names as Haiku writes them.
    params = {
        "mlp/~/linear_0": {"w": np.zeros((3, 4)), "b": np.zeros(4)},
        "conv2_d": {"w": np.zeros((3, 3, 2, 8)), "b": np.zeros(8)},
    }
    assert fan_in_axes(params) == {
        "mlp/~/linear_0": {"w": (0,), "b": ()},
        "conv2_d": {"w": (0, 1, 2), "b": ()},
    }


# --------------------------------------------------------------------------
# TORCH: out-first layouts (Equinox modules, PyTorch state dicts).
# --------------------------------------------------------------------------


class _EqxNet(eqx.Module):
    embedding: eqx.nn.Embedding
    conv: eqx.nn.Conv2d
    norm: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embedding = eqx.nn.Embedding(10, 4, key=k1)
        self.conv = eqx.nn.Conv2d(2, 5, 3, key=k2)
        self.norm = eqx.nn.LayerNorm(4)
        self.mlp = eqx.nn.MLP(3, 2, 8, 1, key=k3)  # layers are a *tuple* of Linear


def test_torch_equinox_modules():
    params = eqx.filter(eqx.filter_eval_shape(_EqxNet, jax.random.key(0)), _is_shape)
    assert by_path(fan_in_axes(params, TORCH)) == {
        "embedding/weight": (),  # (num, dim): one neuron per element
        "conv/weight": (1, 2, 3),  # (out, in, kh, kw)
        "conv/bias": (),  # (out, 1, 1)
        "norm/weight": (),
        "norm/bias": (),
        "mlp/layers/0/weight": (1,),  # (out, in)
        "mlp/layers/0/bias": (),
        "mlp/layers/1/weight": (1,),
        "mlp/layers/1/bias": (),
    }


def test_torch_state_dict():
    state_dict = {
        "embed.weight": np.zeros((10, 4)),
        "features.0.weight": np.zeros((16, 3, 3, 3)),  # Conv2d (out, in, kh, kw)
        "features.0.bias": np.zeros(16),
        "features.1.weight": np.zeros(16),  # BatchNorm2d scale
        "features.1.bias": np.zeros(16),
        "features.1.running_mean": np.zeros(16),
        "features.1.running_var": np.zeros(16),
        "features.1.num_batches_tracked": np.zeros((), np.int64),
        "features.3.weight": np.zeros((8, 16, 5)),  # Conv1d
        "classifier.weight": np.zeros((10, 8)),  # Linear (out, in)
        "classifier.bias": np.zeros(10),
    }
    assert fan_in_axes(state_dict, TORCH) == {
        "embed.weight": (),
        "features.0.weight": (1, 2, 3),
        "features.0.bias": (),
        "features.1.weight": (),
        "features.1.bias": (),
        "features.1.running_mean": (),
        "features.1.running_var": (),
        "features.1.num_batches_tracked": (),
        "features.3.weight": (1, 2),
        "classifier.weight": (1,),
        "classifier.bias": (),
    }


# --------------------------------------------------------------------------
# nnx.Optimizer: init sees Variable wrappers (paths end in `.value`), update
# sees plain arrays. Both must resolve the same axes.
# --------------------------------------------------------------------------


class _Net(nnx.Module):
    # Only the parameters matter here (the model is never called).
    def __init__(self, rngs):
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        self.conv = nnx.Conv(2, 3, kernel_size=(3,), rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=6, qkv_features=8, out_features=5, rngs=rngs
        )
        self.norm = nnx.LayerNorm(4, rngs=rngs)


def _spy(record):
    def keypaths(tree):
        return [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]

    def init_fn(params):
        record["init"] = (keypaths(params), by_path(fan_in_axes(params, None)))
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        record["update"] = (keypaths(updates), by_path(fan_in_axes(updates, None)))
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def test_nnx_optimizer_init_and_update_resolve_the_same_axes():
    record = {}
    graphdef, state = nnx.split(abstract_nnx(_Net))
    model = nnx.merge(graphdef, jax.tree.map(_ones_like, state))  # skip the random initialisers
    opt = nnx.Optimizer(model, _spy(record), wrt=nnx.Param)
    grads = nnx.state(model, nnx.Param)  # any tree of the parameters' structure will do
    opt.update(model, grads)

    init_paths, init_axes = record["init"]
    update_paths, update_axes = record["update"]
    # The two views really differ: init's key paths end in the Variable's `value`.
    assert all(
        isinstance(p[-1], jax.tree_util.GetAttrKey) and p[-1].name == "value" for p in init_paths
    )
    assert not any(isinstance(p[-1], jax.tree_util.GetAttrKey) for p in update_paths)
    assert init_axes == update_axes
    assert init_axes["dense/kernel"] == (0,)
    assert init_axes["conv/kernel"] == (0, 1)
    assert init_axes["attn/query/kernel"] == (0,)
    assert init_axes["attn/out/kernel"] == (0, 1)
    assert init_axes["norm/scale"] == ()
    assert len(init_axes) == 14


# --------------------------------------------------------------------------
# LinearGeneral: indistinguishable from a Conv1D kernel by path and rank.
# --------------------------------------------------------------------------


class _Projection(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.LinearGeneral(in_features=8, out_features=(2, 4), rngs=rngs)


def test_linear_general_needs_a_user_rule():
    model = abstract_nnx(_Projection)
    params = nnx_params(model)
    run, kernel = nnx_apply_with(model.proj, "kernel", positive(3, 8), n_unit_axes=2)
    measured = measured_incoming(run, kernel)  # (2, 4, 8, 2, 4)
    assert kernel.shape == (8, 2, 4)

    default = by_path(fan_in_axes(params))["proj/kernel"]
    assert default == ALL_BUT_LAST((8, 2, 4)) == (0, 1)  # what a Conv1D kernel needs, wrong here
    # The layer has 2 x 4 output units with 8 incoming connections each; the
    # default would make 4 units of 16 connections, merging the 2 "heads".
    assert measured.shape[:2] == (2, 4) and (measured.reshape(8, -1).sum(1) == 8).all()
    assert fan_in_size(kernel.shape, default) == 16

    fixed = by_path(fan_in_axes(params, [("*proj/kernel", (0,)), *FLAX]))
    assert fixed == {"proj/kernel": (0,), "proj/bias": ()}
    np.testing.assert_array_equal(measured, incoming_from_axes(kernel.shape, fixed["proj/kernel"]))


# --------------------------------------------------------------------------
# Errors and None leaves.
# --------------------------------------------------------------------------


def test_unmatched_leaf_names_path_in_one_line():
    params = {"encoder": {"weird": np.zeros((2, 3))}}
    with pytest.raises(ValueError, match=r"encoder/weird") as err:
        fan_in_axes(params, FLAX_STRICT)
    message = str(err.value)
    assert "\n" not in message and "(2, 3)" in message
    # The long preset is counted, not listed glob by glob (a 30-glob list is unreadable).
    assert f"none of the {len(FLAX_STRICT)} rules" in message and "'*/bias'" not in message
    assert "fan_in=None" in message  # says how to get the x @ W guess
    # A short rules list is listed.
    with pytest.raises(ValueError, match=r"rules tried: \['\*\.weight'\]"):
        fan_in_axes({"w": np.zeros(3)}, [("*.weight", ALL_BUT_FIRST)])
    with pytest.raises(ValueError, match=r"'w'"):
        fan_in_axes({"w": np.zeros(3)}, TORCH)  # TORCH stays strict


# --------------------------------------------------------------------------
# Plain pytrees: the default preset guesses by the x @ W convention.
# --------------------------------------------------------------------------


def test_plain_pytrees_follow_the_x_at_w_convention():
    # Expected axes from the convention itself: y = x @ W, W (in, out): output j's
    # inputs are W[:, j] (axis 0); a conv-like (k, in, out) reduces over (0, 1).
    params = {
        "W1": np.zeros((784, 64)),
        "b1": np.zeros(64),
        "W2": np.zeros((3, 16, 8)),
        "s": np.zeros(()),
        "nested": [np.zeros((5, 2)), np.zeros(2)],
    }
    assert fan_in_axes(params) == {
        "W1": (0,),
        "b1": (),
        "W2": (0, 1),
        "s": (),
        "nested": [(0,), ()],
    }
    assert fan_in_axes([np.zeros((4, 3)), np.zeros(3)]) == [(0,), ()]
    # The named rules still come first: an attention query kernel is not guessed.
    assert fan_in_axes({"attn": {"query": {"kernel": np.zeros((6, 2, 4))}}}) == {
        "attn": {"query": {"kernel": (0,)}}
    }
    # The strict preset refuses the same tree, naming the first unknown path.
    with pytest.raises(ValueError, match=r"parameter 'W1' \(shape \(784, 64\)\)"):
        fan_in_axes(params, FLAX_STRICT)


def test_plain_pytree_guess_matches_measured_connectivity():
    # The measured incoming connections of y = x @ W + b agree with the guess.
    w = positive(5, 3)

    def run(kernel):
        return positive(5, seed=1) @ kernel  # one output per unit

    measured = measured_incoming(run, w)
    np.testing.assert_array_equal(measured, incoming_from_axes(w.shape, fan_in_axes({"W": w})["W"]))


def test_default_refuses_out_first_weight_names():
    # Equinox / PyTorch call an (out, in) matrix `weight`: the x @ W guess would
    # average its outgoing connections, so the default preset refuses it.
    params = {"layers": [{"weight": np.zeros((64, 784)), "bias": np.zeros(64)}]}
    with pytest.raises(ValueError, match=r"'layers/0/weight' \(shape \(64, 784\)\).*TORCH") as err:
        fan_in_axes(params)
    assert "\n" not in str(err.value)
    assert fan_in_axes(params, TORCH) == {"layers": [{"weight": (1,), "bias": ()}]}
    # Rank-1 `weight` (a LayerNorm scale in Equinox) is one neuron per element.
    assert fan_in_axes({"norm": {"weight": np.zeros(8)}}) == {"norm": {"weight": ()}}
    # A user rule ahead of the preset settles an (in, out) `weight`.
    rules = [("*weight", ALL_BUT_LAST), *FLAX]
    assert fan_in_axes(params, rules)["layers"][0]["weight"] == (0,)


# A ResNet-style PyTorch state dict (shapes only): keys are dotted, weights out-first.
_RESNET_STATE_DICT = {
    "conv1.weight": (8, 3, 7, 7),
    "bn1.weight": (8,),
    "bn1.bias": (8,),
    "bn1.running_mean": (8,),
    "bn1.running_var": (8,),
    "bn1.num_batches_tracked": (),
    "layer1.0.conv1.weight": (8, 8, 3, 3),
    "layer1.0.bn1.weight": (8,),
    "layer1.0.downsample.0.weight": (8, 8, 1, 1),
    "fc.weight": (10, 8),
    "fc.bias": (10,),
}


@pytest.mark.parametrize("name", ["fc.weight", "conv1.weight", "layer1.0.conv1.weight"])
def test_default_refuses_dotted_out_first_weight_names(name):
    # A state dict's dotted key must not get the x @ W guess: for fc.weight (10, 8)
    # it would average over the 10 outputs and keep 8 "neurons".
    leaf = np.zeros(_RESNET_STATE_DICT[name])
    with pytest.raises(ValueError, match=rf"'{re.escape(name)}' \(shape .*fan_in\.TORCH") as err:
        fan_in_axes({name: leaf})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=re.escape(name)):  # also through a transformation
        neuron_mean_sgd(0.1).init({name: jnp.zeros(leaf.shape)})


def test_torch_reads_a_dotted_state_dict():
    state_dict = {k: np.zeros(shape) for k, shape in _RESNET_STATE_DICT.items()}
    with pytest.raises(ValueError, match="TORCH"):
        fan_in_axes(state_dict)
    # Out-first: every axis but the first is fan-in; rank <= 1 entries have none.
    expected = {
        k: tuple(range(1, len(s))) if len(s) >= 2 else () for k, s in _RESNET_STATE_DICT.items()
    }
    assert expected["fc.weight"] == (1,) and expected["conv1.weight"] == (1, 2, 3)
    assert fan_in_axes(state_dict, TORCH) == expected
    # Rank-1 dotted weights (BatchNorm scales) pass under the default preset too.
    assert fan_in_axes({"bn1.weight": np.zeros(8)}) == {"bn1.weight": ()}


def test_rules_after_the_catch_all_are_refused():
    # [*FLAX, rule] would silently never use `rule`: FLAX ends in ("*", ...).
    params = {"proj": {"kernel": np.zeros((8, 2, 4))}}
    with pytest.raises(ValueError, match=r"\['\*proj/kernel'\] come after the catch-all"):
        fan_in_axes(params, [*FLAX, ("*proj/kernel", (0,))])
    assert fan_in_axes(params, [("*proj/kernel", (0,)), *FLAX]) == {"proj": {"kernel": (0,)}}
    # Appending to the strict preset is fine: it has no catch-all.
    assert fan_in_axes({"x": np.zeros((3, 4))}, [*FLAX_STRICT, ("x", (1,))]) == {"x": (1,)}


def test_default_preset_is_strict_preset_plus_fallback():
    assert FLAX[: len(FLAX_STRICT)] == FLAX_STRICT
    assert FLAX[-1] == ("*", ALL_BUT_LAST)


@pytest.mark.parametrize("axes", [(2,), (-3,), 5, (0, 2)])
def test_out_of_range_axes_name_path_and_shape(axes):
    params = {"dense": {"kernel": np.zeros((3, 4))}}
    with pytest.raises(ValueError, match=r"'dense/kernel'.*\(3, 4\)"):
        fan_in_axes(params, [("*", axes)])
    with pytest.raises(ValueError, match=r"'dense/kernel'.*\(3, 4\)"):
        fan_in_axes(params, {"dense": {"kernel": axes}})


def test_repeated_axis_is_an_error():
    with pytest.raises(ValueError, match=r"'k'.*repeat"):
        fan_in_axes({"k": np.zeros((3, 4))}, {"k": (0, -2)})


def test_callable_rule_returning_bad_axes_is_checked():
    with pytest.raises(ValueError, match=r"'k'.*\(3, 4\)"):
        fan_in_axes({"k": np.zeros((3, 4))}, [("k", lambda shape: (len(shape),))])


def test_leaf_without_shape():
    with pytest.raises(ValueError, match="no shape"):
        fan_in_axes({"kernel": 3.0})


@pytest.mark.parametrize(
    "spec",
    [
        {"a": (0,)},  # a parameter without axes
        {"a": (0,), "b": [(), ()], "c": ()},  # axes without a parameter
        {"a": (0,), "b": [()]},  # a list of the wrong length
        {"a": (0,), "b": {"0": (), "1": ()}},  # a dict where the params have a list
        {"a": {"x": (0,)}, "b": [(), ()]},  # a dict where the params have an array
        {"a": None, "b": [(), ()]},  # None for an array
    ],
)
def test_fan_in_tree_structure_mismatch(spec):
    params = {"a": np.zeros((3, 4)), "b": [np.zeros(4), np.zeros(2)]}
    with pytest.raises(ValueError, match=r"fan_in tree|parameter 'a'"):
        fan_in_axes(params, spec)


def test_fan_in_tree_mismatch_names_the_missing_path():
    params = {"a": np.zeros((3, 4)), "b": np.zeros(4)}
    with pytest.raises(ValueError, match=r"does not match the structure.*\['b'\]"):
        fan_in_axes(params, {"a": (0,)})


def test_none_leaves_pass_through_every_form():
    params = {"frozen": None, "dense": {"kernel": np.zeros((3, 4)), "bias": None}}
    expected = {"frozen": None, "dense": {"kernel": (0,), "bias": None}}
    assert fan_in_axes(params) == expected
    assert fan_in_axes(params, None) == expected
    assert fan_in_axes(params, [("*kernel", ALL_BUT_LAST)]) == expected  # no rule needed for None
    assert fan_in_axes(params, {"frozen": None, "dense": {"kernel": -2, "bias": None}}) == expected
    assert fan_in_axes(params, lambda t: [("*", (0,))]) == expected


# --------------------------------------------------------------------------
# Accepted forms of fan_in=.
# --------------------------------------------------------------------------


def test_resolve_accepts_every_form():
    params = {
        "conv": {"kernel": np.zeros((3, 3, 2, 8)), "bias": np.zeros(8)},
        "head": [np.zeros((8, 10))],
    }
    expected = {"conv": {"kernel": (0, 1, 2), "bias": ()}, "head": [(0,)]}
    assert fan_in_axes({"conv": params["conv"]}, None) == {"conv": expected["conv"]}
    rules = [("*kernel", ALL_BUT_LAST), ("*bias", NO_AXES), ("head/*", (-2,))]
    assert fan_in_axes(params, rules) == expected
    assert fan_in_axes(params, tuple(rules)) == expected
    tree = {"conv": {"kernel": (2, -3, 0), "bias": NO_AXES}, "head": [0]}
    assert fan_in_axes(params, tree) == expected
    tree = {
        "conv": {"kernel": lambda shape: range(len(shape) - 1), "bias": ()},
        "head": [ALL_BUT_LAST],
    }
    assert fan_in_axes(params, tree) == expected
    assert fan_in_axes(params, lambda t: rules) == expected  # callable -> rules
    assert fan_in_axes(params, lambda t: jax.tree.map(lambda x: ALL_BUT_LAST, t)) == {
        "conv": {"kernel": (0, 1, 2), "bias": ()},
        "head": [(0,)],
    }


def test_resolve_tree_of_axes_for_tuple_and_module_containers():
    # Tuples are containers in the params (Equinox MLP layers) and axes in the
    # fan_in tree; the tree is read up to the params' structure.
    params = (np.zeros((3, 4)), np.zeros(4))
    assert fan_in_axes(params, ((0,), ())) == ((0,), ())
    mlp = eqx.filter(
        eqx.filter_eval_shape(eqx.nn.MLP, 3, 2, 8, 1, key=jax.random.key(0)), _is_shape
    )
    axes = fan_in_axes(mlp, lambda t: fan_in_axes(t, TORCH))
    assert [layer.weight for layer in axes.layers] == [(1,), (1,)]
    assert fan_in_axes(mlp, fan_in_axes(mlp, TORCH)).layers[0].weight == (1,)
    state = nnx_params(abstract_nnx(lambda r: nnx.Linear(2, 3, rngs=r)))
    assert by_path(fan_in_axes(state, fan_in_axes(state))) == {"kernel": (0,), "bias": ()}


def test_axes_tree_pairs_with_updates_under_tree_map():
    updates = {
        "conv": {"kernel": jnp.ones((3, 3, 2, 8))},
        "dense": {"kernel": jnp.ones((4, 5)), "bias": None},
    }
    axes = fan_in_axes(updates, None)
    sums = jax.tree.map(lambda u, a: u.sum(axis=a, keepdims=True), updates, axes)
    assert sums["conv"]["kernel"].shape == neuron_shape((3, 3, 2, 8), (0, 1, 2)) == (1, 1, 1, 8)
    np.testing.assert_array_equal(sums["dense"]["kernel"], np.full((1, 5), 4.0))
    assert sums["dense"]["bias"] is None


def test_first_match_order_and_helpers():
    rules = [("*/special/kernel", NO_AXES), ("*kernel", ALL_BUT_LAST)]
    assert first_match("a/special/kernel", rules) == (True, NO_AXES)
    assert first_match("a/kernel", rules) == (True, ALL_BUT_LAST)
    assert first_match("a/bias", rules) == (False, None)
    assert fan_in_size((3, 3, 2, 8), (0, 1, 2)) == 18
    assert fan_in_size((5,), ()) == 1
    assert neuron_shape((4, 5), ()) == (4, 5)
    keypath = (
        jax.tree_util.DictKey("a"),
        jax.tree_util.SequenceKey(0),
        jax.tree_util.GetAttrKey("kernel"),
    )
    assert path_str(keypath) == "a/0/kernel"
    assert path_str((*keypath, jax.tree_util.GetAttrKey("value"))) == "a/0/kernel"
    # A module *named* value (a dict key) keeps its name.
    assert path_str((jax.tree_util.DictKey("value"),)) == "value"


def test_attention_rule_keeps_dense_rule_for_rank_two_query():
    # A plain Dense layer named "query" has a (in, out) kernel: fan-in axis 0.
    assert fan_in_axes({"query": {"kernel": np.zeros((5, 3))}}) == {"query": {"kernel": (0,)}}


# --------------------------------------------------------------------------
# Property: resolved axes are always valid and equal an independent computation.
# --------------------------------------------------------------------------

_CONSTANTS = {"ALL_BUT_LAST": ALL_BUT_LAST, "ALL_BUT_FIRST": ALL_BUT_FIRST, "NO_AXES": NO_AXES}


def _reference_constant(name, rank):
    if name == "ALL_BUT_LAST":
        return list(range(rank - 1))
    if name == "ALL_BUT_FIRST":
        return list(range(1, rank))
    return []


@st.composite
def _leaf_and_spec(draw):
    """A shape, an axes spec for it, and the axes the spec means (by hand)."""
    shape = tuple(draw(st.lists(st.integers(1, 3), max_size=5)))
    rank = len(shape)
    kinds = ["tuple", "int", "constant", "callable"] if rank else ["tuple", "constant", "callable"]
    kind = draw(st.sampled_from(kinds))
    if kind == "constant":
        name = draw(st.sampled_from(sorted(_CONSTANTS)))
        return shape, _CONSTANTS[name], sorted(_reference_constant(name, rank))
    order = draw(st.permutations(list(range(rank))))
    chosen = order[: 1 if kind == "int" else draw(st.integers(0, rank))]
    signed = [a - rank if draw(st.booleans()) else a for a in chosen]  # negative or not
    meaning = sorted(chosen)
    if kind == "int":
        return shape, signed[0], meaning
    if kind == "tuple":
        return shape, tuple(signed), meaning
    return shape, (lambda s, axes=tuple(signed): list(axes)), meaning


@settings(max_examples=150, deadline=None)
@given(st.lists(_leaf_and_spec(), min_size=1, max_size=4), st.data())
def test_property_resolved_axes_are_valid(leaves, data):
    names = [f"layer{i}/w{i}" for i in range(len(leaves))]
    params = {f"layer{i}": {f"w{i}": np.zeros(shape)} for i, (shape, _, _) in enumerate(leaves)}
    # Rules in random order, with a decoy rule that matches nothing and a
    # catch-all that is shadowed by the specific rules in front of it.
    rules = [(name, spec) for name, (_, spec, _) in zip(names, leaves, strict=True)]
    rules = [*data.draw(st.permutations(rules)), ("*", (0, 0, 0))]
    rules.insert(0, ("nothing/*", (99,)))
    expected = {name: tuple(meaning) for name, (_, _, meaning) in zip(names, leaves, strict=True)}

    for fan_in in (
        rules,
        {f"layer{i}": {f"w{i}": spec} for i, (_, spec, _) in enumerate(leaves)},
        lambda tree: rules,
    ):
        got = by_path(fan_in_axes(params, fan_in))
        assert got == expected
        for name, (shape, _, _) in zip(names, leaves, strict=True):
            axes = got[name]
            assert list(axes) == sorted(set(axes))
            assert all(0 <= a < len(shape) for a in axes)
            assert fan_in_size(shape, axes) * int(np.prod(neuron_shape(shape, axes))) == int(
                np.prod(shape)
            )


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 3), max_size=5), st.integers(-8, 8))
def test_property_out_of_range_axis_is_rejected(shape, axis):
    shape = tuple(shape)
    params = {"k": np.zeros(shape)}
    if -len(shape) <= axis < len(shape):
        assert fan_in_axes(params, {"k": axis}) == {"k": (axis % len(shape),)}
    else:
        with pytest.raises(ValueError, match=r"'k'.*" + re_shape(shape)):
            fan_in_axes(params, {"k": axis})


def re_shape(shape):
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")
