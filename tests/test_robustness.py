"""Robustness: NaN/Inf, empty trees, zero-size leaves, integer leaves, float16 fan-in.

What each piece does with a non-finite gradient (also in the README table):

* ``neuron_mean_trace`` / ``neuron_mean_sgd``: a NaN/Inf in one connection enters
  the fan-in mean, so the state of that whole *neuron* becomes NaN/Inf and,
  from the next step on, every update of that neuron; other neurons are
  unaffected. Wrap in ``optax.apply_if_finite`` to skip such steps.
* ``running_gradient_mean``: the NaN/Inf stays in that element of the mean for
  good (cumulative and EMA; an Inf turns into NaN at the next step, as
  ``m + w (g - m)`` computes ``inf - inf``); ``emit="mean"`` emits it every step.
* ``gradient_norms``: the norms of that step are NaN/Inf (a detector); the
  state is recomputed each step, so the next finite step reads finite again.
* ``rso``: a candidate with a NaN loss is never accepted (strict ``<``); if the
  loss of the current params is NaN nothing is accepted and the update is zero.

``optax.apply_if_finite`` around each gradient-based case: the NaN step gives a
zero update and leaves the inner state untouched, so the run continues exactly
as if the bad step had not happened.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_conformance import GRADIENT_CASES, as_optimizer, assert_trees_equal, random_tree

import optax_neuron as on

GIDS = [c.name for c in GRADIENT_CASES]


def _nan_grads(seed=1):
    g = random_tree(seed)
    g["dense"]["kernel"] = g["dense"]["kernel"].at[2, 1].set(jnp.nan)
    g["dense"]["bias"] = g["dense"]["bias"].at[0].set(jnp.inf)
    return g


# ------------------------------------------------------------------ NaN / Inf
def test_neuron_mean_nan_poisons_exactly_one_neuron():
    params = random_tree(0)
    tx = on.neuron_mean_trace(0.9)
    _, state = tx.update(_nan_grads(), tx.init(params), params)
    m = np.asarray(state.neuron_momentum["dense"]["kernel"])  # (1, 3)
    assert np.isnan(m[0, 1]) and np.all(np.isfinite(m[0, [0, 2]]))
    assert np.isinf(state.neuron_momentum["dense"]["bias"][0])
    u, _ = tx.update(random_tree(2), state, params)  # finite gradient, poisoned state
    k = np.asarray(u["dense"]["kernel"])
    assert np.all(np.isnan(k[:, 1])) and np.all(np.isfinite(k[:, [0, 2]]))
    assert np.all(np.isfinite(np.asarray(u["out"]["kernel"])))


def test_running_mean_keeps_the_nan_in_its_element_only():
    params = random_tree(0)
    for decay in (None, 0.9):
        tx = on.running_gradient_mean(decay, emit="mean")
        state = tx.init(params)
        for g in (_nan_grads(), random_tree(2)):
            u, state = tx.update(g, state, params)
        k = np.asarray(u["dense"]["kernel"])
        assert np.isnan(k[2, 1]) and np.isfinite(np.delete(k.ravel(), 2 * 3 + 1)).all()
        assert np.isnan(u["dense"]["bias"][0])  # inf + w * (g - inf) = inf - inf = NaN


def test_gradient_norms_flag_the_bad_step_and_recover():
    params = random_tree(0)
    tx = on.gradient_norms()
    _, state = tx.update(_nan_grads(), tx.init(params), params)
    assert np.isnan(state.gradient_global_norm) and np.isinf(state.gradient_norm["dense"]["bias"])
    good = random_tree(2)
    _, state = tx.update(good, state, params)
    want = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(good)))
    np.testing.assert_allclose(float(state.gradient_global_norm), want, rtol=1e-6)


def test_rso_never_accepts_nan_and_stalls_on_nan_loss():
    params = {"dense": {"kernel": jnp.array([[0.5, -0.5], [1.0, 2.0]])}}
    tx = on.rso(weights_per_step=4, sigma=0.5)
    # Candidates above 0.6 in the first entry evaluate to NaN; they must be rejected.
    loss = lambda p: jnp.where(
        p["dense"]["kernel"][0, 0] > 0.6, jnp.nan, jnp.sum(p["dense"]["kernel"] ** 2)
    )
    state = tx.init(params)
    for _ in range(5):
        u, state = tx.update(params, state, params, value_fn=loss)
        params = optax.apply_updates(params, u)
        assert np.isfinite(float(loss(params)))
    u, state = tx.update(params, tx.init(params), params, value_fn=lambda p: jnp.float32(jnp.nan))
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
    assert int(sum(state.rso_accepted.values())) == 0


@pytest.mark.parametrize("case", GRADIENT_CASES, ids=GIDS)
def test_apply_if_finite_skips_the_bad_step(case):
    params = random_tree(0)
    tx = optax.apply_if_finite(as_optimizer(case, 0.1), max_consecutive_errors=3)
    ref = as_optimizer(case, 0.1)
    state, ref_state = tx.init(params), ref.init(params)
    u, state = tx.update(_nan_grads(), state, params)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
    assert_trees_equal(state.inner_state, ref_state)
    assert int(state.notfinite_count) == 1
    for t in range(2):
        g = random_tree(5 + t)
        u, state = tx.update(g, state, params)
        ref_u, ref_state = ref.update(g, ref_state, params)
        # apply_if_finite selects inside one compiled step: equal up to rounding.
        assert_trees_equal(u, ref_u, exact=False, rtol=1e-6)
        assert_trees_equal(state.inner_state, ref_state, exact=False, rtol=1e-6)


# ------------------------------------------------------------------ empty and zero-size
@pytest.mark.parametrize("case", GRADIENT_CASES, ids=GIDS)
def test_empty_tree(case):
    tx = case.make()
    state = tx.init({})
    u, state2 = tx.update({}, state, {})
    assert u == {}
    assert jax.tree.structure(state2) == jax.tree.structure(state)


def test_rso_empty_tree_is_a_clear_error():
    with pytest.raises(ValueError, match="no parameter is searched"):
        on.rso().init({})


ZERO = {
    "dense": {"kernel": (0, 3), "bias": (0,)},
    "out": {"kernel": (3, 0)},
    "ok": {"kernel": (2, 2)},
}


@pytest.mark.parametrize("case", GRADIENT_CASES, ids=GIDS)
def test_zero_size_leaves(case):
    params, grads = random_tree(0, shapes=ZERO), random_tree(1, shapes=ZERO)
    tx = case.make()
    state = tx.init(params)
    for _ in range(2):
        u, state = tx.update(grads, state, params)
    assert jax.tree.map(jnp.shape, u) == jax.tree.map(jnp.shape, params)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))
    # The part with weights behaves as it would alone.
    alone = case.make()
    a_state = alone.init({"ok": params["ok"]})
    for _ in range(2):
        a_u, a_state = alone.update({"ok": grads["ok"]}, a_state, {"ok": params["ok"]})
    assert_trees_equal(u["ok"], a_u["ok"])


def test_neuron_mean_zero_fan_in_neurons_get_zero_mean():
    # (0, 3): three neurons with no inputs; their mean is defined as 0 (not NaN).
    params = {"dense": {"kernel": jnp.zeros((0, 3))}}
    tx = on.neuron_mean_trace(0.9)
    _, state = tx.update(params, tx.init(params), params)
    np.testing.assert_array_equal(state.neuron_momentum["dense"]["kernel"], np.zeros((1, 3)))


def test_rso_skips_zero_size_leaves():
    params = {
        "a": {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]])},
        "e": {"kernel": jnp.zeros((3, 0))},
    }
    loss = lambda p: jnp.sum((p["a"]["kernel"] - 1.0) ** 2)
    for sigma in (None, 0.3):
        tx = on.rso(weights_per_step=8, sigma=sigma)
        state = tx.init(params)
        assert set(state.rso_sigma) == {"a/kernel"}
        u, state = tx.update(params, state, params, value_fn=loss)
        assert u["e"]["kernel"].shape == (3, 0)
        assert float(loss(optax.apply_updates(params, u))) < float(loss(params))


# ------------------------------------------------------------------ integer leaves
INT_PARAMS = {"dense": {"kernel": jnp.ones((3, 2), jnp.int32)}}


def test_neuron_mean_integer_leaf_is_a_clear_error():
    with pytest.raises(TypeError, match=r"'dense/kernel' has dtype int32"):
        on.neuron_mean_trace(0.9).init(INT_PARAMS)
    tx = on.neuron_mean_sgd(0.1)
    state = tx.init({"dense": {"kernel": jnp.ones((3, 2))}})
    with pytest.raises(TypeError, match=r"updates.*'dense/kernel' has dtype int32"):
        tx.update(INT_PARAMS, state)


def test_rso_integer_leaf_is_a_clear_error():
    with pytest.raises(TypeError, match=r"'dense/kernel'.*int32"):
        on.rso().init(INT_PARAMS)


def test_monitors_measure_integer_leaves_in_float32():
    # README: "grad_stats measures them in float32". Reference: NumPy in float64.
    g = {"dense": {"kernel": jnp.array([[1, 2], [3, 4], [5, 6]], jnp.int32)}}
    expected = np.sqrt(np.sum(np.arange(1.0, 7.0) ** 2))
    for tx in (on.gradient_norms(), on.running_gradient_mean()):
        for params in (g, {"dense": {"kernel": jnp.ones((3, 2))}}):  # int or float params
            out, state = tx.update(g, tx.init(params), params)
            assert out is g
            values = on.collect_metrics(state)
            key = next(k for k in values if k.endswith("dense/kernel"))
            assert values[key].dtype == jnp.float32
            np.testing.assert_allclose(values[key], expected, rtol=1e-6)


# ------------------------------------------------------------------ float16, large fan-in
def test_float16_large_fan_in_does_not_overflow():
    # 70000 ones: the fan-in sum (70000) is above float16's max (65504).
    params = {"dense": {"kernel": jnp.ones((70000, 2), jnp.float16)}}
    tx = on.neuron_mean_trace(0.9)
    state = tx.init(params)
    u1, state = tx.update(params, state, params)
    assert state.neuron_momentum["dense"]["kernel"].dtype == jnp.float16
    np.testing.assert_array_equal(
        np.asarray(state.neuron_momentum["dense"]["kernel"], np.float32), [[1.0, 1.0]]
    )
    assert u1["dense"]["kernel"].dtype == jnp.float16
    u2, state = tx.update(params, state, params)
    np.testing.assert_allclose(
        np.asarray(u2["dense"]["kernel"], np.float32), 1.9, rtol=1e-3
    )  # 1 + 0.9 * 1
    norms = on.gradient_norms()
    _, s = norms.update(params, norms.init(params), params)
    np.testing.assert_allclose(
        np.asarray(s.gradient_neuron_norm["dense"]["kernel"]), np.sqrt(70000.0), rtol=1e-6
    )
    np.testing.assert_allclose(float(s.gradient_global_norm), np.sqrt(140000.0), rtol=1e-6)
    mean = on.running_gradient_mean()
    _, s = mean.update(params, mean.init(params), params)
    np.testing.assert_array_equal(np.asarray(s.gradient_mean["dense"]["kernel"]), 1.0)
