"""Tests for optax_neuron.neuron_adam.

The reference is a plain NumPy neuron-wise Adam that keeps the FULL
per-connection first moment: for ``first_moment="neuron"`` the accumulator
``a <- (1 - b1) g + b1 * mean_fanin(a)`` of every connection (the library keeps
only its per-neuron mean), for ``"full"`` Adam's ``m``. The second moment is
``v <- b2 v + (1 - b2) mean_fanin(g**2)``. The fan-in axes of every reference
tree are written out by hand, independently of fan_in.py. With no fan-in axes
at all both modes must be Optax's own Adam / AdamW.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _param_trees import TREES, flatten, nest, params_of, random_grads, step_and_compare
from flax import nnx

import optax_neuron as on
from optax_neuron import neuron_adam, neuron_adamw, scale_by_neuron_adam
from optax_neuron.neuron_adam import ScaleByNeuronAdamState

# Adam-mini's partition for attention: one second moment per head for queries and keys
# (mean over `in` and `head_dim`), per output neuron for values and the output projection.
ADAM_MINI_RULES = [("*query/kernel", (0, 2)), ("*key/kernel", (0, 2)), *on.fan_in.FLAX]
ADAM_MINI_AXES = {
    **TREES["attention"],
    "query/kernel": ((6, 2, 4), (0, 2)),
    "key/kernel": ((6, 2, 4), (0, 2)),
}


class NumpyNeuronAdam:
    """Neuron-wise Adam in NumPy with a full per-connection first moment."""

    def __init__(self, shapes_axes, b1, b2, eps, first_moment, dtype):
        self.axes = {p: ax for p, (_, ax) in shapes_axes.items()}
        self.m = {p: np.zeros(s, dtype) for p, (s, _) in shapes_axes.items()}
        self.v = {p: np.zeros(s, dtype) for p, (s, _) in shapes_axes.items()}  # kept full, too
        self.b1, self.b2, self.eps = dtype(b1), dtype(b2), dtype(eps)
        self.first_moment, self.dtype, self.t = first_moment, dtype, 0

    def mean(self, p, x):
        ax = self.axes[p]
        return (
            np.broadcast_to(x.mean(axis=ax, keepdims=True, dtype=self.dtype), x.shape) if ax else x
        )

    def step(self, grads):
        self.t += 1
        one, out = self.dtype(1), {}
        for p, g in grads.items():
            self.v[p] = self.b2 * self.v[p] + (one - self.b2) * self.mean(p, g * g)
            if self.first_moment == "neuron":
                self.m[p] = (one - self.b1) * g + self.b1 * self.mean(p, self.m[p])
            else:
                self.m[p] = self.b1 * self.m[p] + (one - self.b1) * g
            m_hat = self.m[p] / (one - self.b1**self.t)
            v_hat = self.v[p] / (one - self.b2**self.t)
            out[p] = m_hat / (np.sqrt(v_hat) + self.eps)
        return out


STEPS = 25


def _against_reference(shapes_axes, first_moment, dtype, rtol, fan_in=None):
    b1, b2, eps = 0.9, 0.999, 1e-8
    ref = NumpyNeuronAdam(shapes_axes, b1, b2, eps, first_moment, dtype)
    tx = scale_by_neuron_adam(b1, b2, eps, first_moment=first_moment, fan_in=fan_in)
    params = params_of(shapes_axes, dtype)
    # The library resolves the same axes as the hand-written table.
    resolved = {p: tuple(ax) for p, ax in _flat_axes(on.fan_in_axes(params, fan_in)).items()}
    assert resolved == {p: ax for p, (_, ax) in shapes_axes.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(7)
    for step in range(STEPS):
        # Gradients of very different sizes per leaf, so the per-neuron scaling matters.
        grads = {
            p: g * 10.0 ** rng.integers(-3, 2)
            for p, g in random_grads(rng, shapes_axes, dtype).items()
        }
        expected = ref.step(grads)
        state = step_and_compare(update, state, grads, expected, dtype, rtol, step)
    return state


def _flat_axes(axes_tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(
        axes_tree, is_leaf=lambda x: isinstance(x, tuple)
    )[0]
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}


@pytest.mark.parametrize("first_moment", ["full", "neuron"])
@pytest.mark.parametrize("tree_name", sorted(TREES))
def test_matches_full_accumulator_reference_float32(tree_name, first_moment):
    _against_reference(TREES[tree_name], first_moment, np.float32, 1e-6)


@pytest.mark.parametrize("first_moment", ["full", "neuron"])
@pytest.mark.parametrize("tree_name", sorted(TREES))
def test_matches_full_accumulator_reference_float64(tree_name, first_moment):
    with jax.enable_x64(True):
        _against_reference(TREES[tree_name], first_moment, np.float64, 1e-12)


@pytest.mark.parametrize("first_moment", ["full", "neuron"])
def test_adam_mini_per_head_rule_for_queries_and_keys(first_moment):
    state = _against_reference(
        ADAM_MINI_AXES, first_moment, np.float32, 1e-6, fan_in=ADAM_MINI_RULES
    )
    nu = flatten(state.neuron_adam_nu)
    assert nu["query/kernel"].shape == nu["key/kernel"].shape == (1, 2, 1)  # one value per head
    assert nu["value/kernel"].shape == (1, 2, 4)  # one per output neuron
    assert nu["out/kernel"].shape == (1, 1, 5)


def test_adam_mini_rule_on_a_real_nnx_attention_layer():
    layer = nnx.MultiHeadAttention(
        num_heads=2, in_features=6, qkv_features=8, out_features=5, decode=False, rngs=nnx.Rngs(0)
    )
    params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    state = scale_by_neuron_adam(fan_in=ADAM_MINI_RULES).init(params)
    shapes = {p: x.shape for p, x in flatten(state.neuron_adam_nu).items()}
    assert shapes["query/kernel"] == shapes["key/kernel"] == (1, 2, 1)
    assert shapes["value/kernel"] == (1, 2, 4) and shapes["query/bias"] == (2, 4)


@pytest.mark.parametrize("first_moment", ["full", "neuron"])
def test_no_fan_in_axes_is_optax_adam_and_adamw(first_moment):
    # b1, b2 exactly representable, so that 1 - b is formed alike (see the docstring).
    b1, b2, lr = 0.875, 1 - 2**-10, 0.01
    everything_own_neuron = [("*", on.fan_in.NO_AXES)]
    params = params_of(TREES["cnn"])
    mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    pairs = [
        (
            neuron_adam(lr, b1, b2, first_moment=first_moment, fan_in=everything_own_neuron),
            optax.adam(lr, b1, b2),
        ),
        (
            neuron_adamw(
                lr,
                b1,
                b2,
                weight_decay=0.1,
                mask=mask,
                first_moment=first_moment,
                fan_in=everything_own_neuron,
            ),
            optax.adamw(lr, b1, b2, weight_decay=0.1, mask=mask),
        ),
    ]
    rng = np.random.default_rng(3)
    for tx, ref in pairs:
        s, r, p = tx.init(params), ref.init(params), params
        for _ in range(10):
            g = nest(
                {k: jnp.asarray(v) for k, v in random_grads(rng, TREES["cnn"], np.float32).items()}
            )
            u, s = tx.update(g, s, p)
            w, r = ref.update(g, r, p)
            for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(w), strict=True):
                np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
            p = optax.apply_updates(p, u)


def _bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_state_shapes_and_bytes_are_per_neuron():
    for shapes_axes in TREES.values():
        params = params_of(shapes_axes)
        full = flatten(scale_by_neuron_adam().init(params).neuron_adam_mu)
        st = scale_by_neuron_adam(first_moment="neuron").init(params)
        mu, nu = flatten(st.neuron_adam_mu), flatten(st.neuron_adam_nu)
        for p, (shape, axes) in shapes_axes.items():
            neuron = tuple(1 if i in axes else d for i, d in enumerate(shape))
            fan_in = math.prod(shape[a] for a in axes)
            assert mu[p].shape == nu[p].shape == neuron, p
            assert nu[p].nbytes * fan_in == math.prod(shape) * 4, p
            assert full[p].shape == shape, p
    # The CNN tree: Adam keeps 2 x 328 floats (+ a count); neuron-wise Adam keeps
    # 328 + 20 ("full") or 20 + 20 ("neuron") floats: 4 + 4 + 6 + 6 neurons.
    params = params_of(TREES["cnn"])
    n_params = 3 * 3 * 2 * 4 + 4 + 36 * 6 + 6
    assert n_params == 298
    assert _bytes(optax.adam(1e-3).init(params)) == 4 * (2 * 298 + 1)
    assert _bytes(scale_by_neuron_adam().init(params)) == 4 * (298 + 20 + 1)
    assert _bytes(scale_by_neuron_adam(first_moment="neuron").init(params)) == 4 * (20 + 20 + 1)


def test_state_names_findable_and_dtypes():
    params = {
        "dense": {"kernel": jnp.zeros((4, 3), jnp.bfloat16), "bias": jnp.zeros(3, jnp.bfloat16)}
    }
    tx = neuron_adamw(1e-3, mu_dtype=jnp.float32)
    state = tx.init(params)
    assert isinstance(state[0], ScaleByNeuronAdamState)
    assert optax.tree.get(state, "neuron_adam_count").dtype == jnp.int32
    assert (
        optax.tree.get(state, "neuron_adam_mu")["dense"]["kernel"].dtype == jnp.float32
    )  # mu_dtype
    # The per-neuron second moment is kept in at least float32.
    assert optax.tree.get(state, "neuron_adam_nu")["dense"]["kernel"].dtype == jnp.float32
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 1e-3, x.dtype), params)
    updates, state2 = jax.jit(tx.update)(grads, state, params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert jax.tree.map(lambda x: x.dtype, state2) == jax.tree.map(lambda x: x.dtype, state)
    assert int(optax.tree.get(state2, "neuron_adam_count")) == 1
    # First Adam step: m_hat / sqrt(v_hat) = g / |g| = 1 per connection, so -lr (and decay).
    np.testing.assert_allclose(np.asarray(updates["dense"]["bias"], np.float32), -1e-3, rtol=1e-2)


def test_float16_small_gradients_stay_finite():
    # g**2 = 1e-10 underflows float16; the second moment is kept in float32.
    params = {"kernel": jnp.zeros((8, 2), jnp.float16), "bias": jnp.zeros(2, jnp.float16)}
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 1e-5, jnp.float16), params)
    tx = neuron_adam(1e-3)
    updates, _ = tx.update(grads, tx.init(params))
    for u in jax.tree.leaves(updates):
        assert u.dtype == jnp.float16
        np.testing.assert_allclose(np.asarray(u, np.float32), -1e-3, rtol=1e-2)


def test_nnx_optimizer_matches_the_plain_transformation():
    def make():
        return nnx.Sequential(
            nnx.Linear(6, 4, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(4, 3, rngs=nnx.Rngs(1))
        )

    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 6)), jnp.float32)
    loss = lambda m: jnp.mean(m(x) ** 2)
    model = make()
    opt = nnx.Optimizer(model, neuron_adam(0.01, first_moment="neuron"), wrt=nnx.Param)
    tx = neuron_adam(0.01, first_moment="neuron")
    ref_model = make()
    params = nnx.to_pure_dict(nnx.state(ref_model, nnx.Param))
    state = tx.init(params)

    @nnx.jit
    def step(model, opt):
        opt.update(model, nnx.grad(loss)(model))

    for _ in range(3):
        step(model, opt)
        nnx.update(ref_model, params)
        grads = nnx.to_pure_dict(nnx.grad(loss)(ref_model))
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    nu = optax.tree.get(opt.opt_state, "neuron_adam_nu")
    assert jnp.shape(nu["layers"][0]["kernel"]) == (1, 4) and jnp.shape(
        nu["layers"][2]["kernel"]
    ) == (1, 3)


def _train_step(tx, loss):
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    return step


def test_neuron_adam_trains_a_small_regression():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
    w_true = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
    y = x @ w_true
    loss = lambda p: jnp.mean((x @ p["kernel"] + p["bias"] - y) ** 2)
    for first_moment in ("full", "neuron"):
        params = {"kernel": jnp.zeros((8, 3)), "bias": jnp.zeros(3)}
        tx = neuron_adam(0.05, first_moment=first_moment)
        state = tx.init(params)

        step = jax.jit(_train_step(tx, loss))

        # Measured (CPU, float32): from 6.98, "full" 1.8e-13 after 300 steps, 3.6e-7 after 1000
        # (Adam's constant-lr jitter); "neuron" 0.045 after 300, 6.8e-9 after 1000: a per-neuron
        # first moment leaves only (1 - b1) g to tell the connections of a neuron apart.
        l0 = float(loss(params))
        for _ in range(1000):
            params, state = step(params, state)
        assert float(loss(params)) < 1e-3 * l0, first_moment


# ---------------------------------------------------------------------------
# bad input: one-line errors naming the argument or the parameter path
# ---------------------------------------------------------------------------


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("bad", ["Full", "per-neuron", None, 1])
def test_bad_first_moment(bad):
    with pytest.raises(ValueError, match="first_moment must be 'full' or 'neuron'") as e:
        scale_by_neuron_adam(first_moment=bad)
    _one_line(e)
    with pytest.raises(ValueError, match="first_moment"):
        neuron_adamw(1e-3, first_moment=bad)


@pytest.mark.parametrize("name", ["b1", "b2"])
@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), None, np.ones(2)])
def test_decays_out_of_range(name, bad):
    with pytest.raises(ValueError, match=name) as e:
        neuron_adam(1e-3, **{name: bad})
    _one_line(e)


@pytest.mark.parametrize("bad", [-1e-8, float("inf"), float("nan"), None])
def test_bad_eps(bad):
    with pytest.raises(ValueError, match="eps") as e:
        scale_by_neuron_adam(eps=bad)
    _one_line(e)


def test_bad_mu_dtype():
    with pytest.raises(ValueError, match="mu_dtype must be a floating-point dtype") as e:
        scale_by_neuron_adam(mu_dtype=jnp.int32)
    _one_line(e)


def test_integer_leaves_name_the_path():
    params = {"dense": {"kernel": jnp.zeros((3, 2)), "step": jnp.zeros((), jnp.int32)}}
    tx = neuron_adam(1e-3)
    with pytest.raises(TypeError, match=r"'dense/step'.*int32") as e:
        tx.init(params)
    _one_line(e)
    good = {"dense": {"kernel": jnp.zeros((3, 2))}}
    state = tx.init(good)
    with pytest.raises(TypeError, match=r"'dense/kernel'.*int32"):
        tx.update({"dense": {"kernel": jnp.zeros((3, 2), jnp.int32)}}, state)


def test_state_of_another_mode_or_fan_in_names_the_path():
    params = {"dense": {"kernel": jnp.zeros((3, 2))}}
    full_state = scale_by_neuron_adam().init(params)
    with pytest.raises(ValueError, match=r"'dense/kernel'.*first_moment") as e:
        scale_by_neuron_adam(first_moment="neuron").update(params, full_state)
    _one_line(e)
    with pytest.raises(ValueError, match="dense/kernel"):
        scale_by_neuron_adam(fan_in=[("*", on.fan_in.NO_AXES)]).update(params, full_state)
