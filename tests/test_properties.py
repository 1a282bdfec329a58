"""Property tests (hypothesis) for the library's invariants.

* neuron-mean momentum: for random shapes, random fan-in axes, random
  momentum and Nesterov, the per-neuron state reproduces the TensorFlow
  optimizer from the original question, which keeps a FULL per-connection
  accumulator (plain NumPy loop below):
  ``a_t = g_t + mu * mean_fanin(a_{t-1})``, update ``a_t``
  (Nesterov: ``g_t + mu * mean_fanin(a_t)``), and the state equals
  ``mean_fanin(a_t)``;
* running_gradient_mean(decay=None): the cumulative mean equals the batch
  mean ``np.mean`` of every update seen so far;
* RSO never increases the loss on a fixed batch (each accepted move is a
  strict improvement), and its recorded loss is the loss of the new params.

Float64 (``jax.enable_x64``) so that the comparisons can be tight.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_neuron as on

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


@st.composite
def shapes_and_axes(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    axes = tuple(sorted(draw(st.sets(st.integers(0, len(shape) - 1)))))
    return shape, axes


def question_reference(grads, axes, mu, nesterov):
    """The optimizer of the original question with a full accumulator, as a NumPy loop."""
    acc = np.zeros_like(grads[0])
    updates = []
    for g in grads:
        mean_prev = acc.mean(axis=axes, keepdims=True) if axes else acc
        acc = g + mu * mean_prev
        mean_new = acc.mean(axis=axes, keepdims=True) if axes else acc
        updates.append(g + mu * mean_new if nesterov else acc.copy())
    return updates, (acc.mean(axis=axes, keepdims=True) if axes else acc)


@SETTINGS
@given(
    shapes_and_axes(), st.floats(0.0, 0.99), st.booleans(), st.integers(1, 4), st.integers(0, 2**16)
)
def test_neuron_mean_state_equals_full_accumulator(shape_axes, mu, nesterov, steps, seed):
    shape, axes = shape_axes
    rng = np.random.default_rng(seed)
    grads = [rng.normal(size=shape) for _ in range(steps)]
    want_updates, want_state = question_reference(grads, axes, mu, nesterov)
    with jax.enable_x64(True):
        params = {"w": jnp.zeros(shape, jnp.float64)}
        tx = on.neuron_mean_trace(mu, nesterov=nesterov, fan_in={"w": axes})
        state = tx.init(params)
        assert state.neuron_momentum["w"].shape == tuple(
            1 if i in axes else d for i, d in enumerate(shape)
        )
        for g, want in zip(grads, want_updates, strict=True):
            u, state = tx.update({"w": jnp.asarray(g)}, state, params)
            np.testing.assert_allclose(np.asarray(u["w"]), want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(
            np.asarray(state.neuron_momentum["w"]), want_state, rtol=1e-12, atol=1e-12
        )


@SETTINGS
@given(
    st.lists(st.integers(1, 5), min_size=0, max_size=3), st.integers(1, 12), st.integers(0, 2**16)
)
def test_cumulative_mean_equals_batch_mean(shape, steps, seed):
    rng = np.random.default_rng(seed)
    grads = [rng.normal(size=shape) * rng.uniform(0.1, 100.0) for _ in range(steps)]
    with jax.enable_x64(True):
        params = {"g": jnp.zeros(shape, jnp.float64)}
        tx = on.running_gradient_mean()
        state = tx.init(params)
        for t, g in enumerate(grads):
            _, state = tx.update({"g": jnp.asarray(g)}, state, params)
            want = np.mean(np.stack(grads[: t + 1]), axis=0)
            np.testing.assert_allclose(
                np.asarray(state.gradient_mean["g"]), want, rtol=1e-12, atol=1e-12
            )
        assert int(state.gradient_mean_count) == steps


@functools.cache
def _rso_step(seed: int):
    tx = on.rso(seed=seed, weights_per_step=5)

    def loss(p, x, y):
        h = jnp.tanh(x @ p["dense"]["kernel"])
        return jnp.mean((h @ p["out"]["kernel"] - y) ** 2)

    @jax.jit
    def step(p, s, x, y):
        u, s = tx.update(p, s, p, value_fn=lambda q: loss(q, x, y))
        return optax.apply_updates(p, u), s

    return tx, step, jax.jit(loss)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(st.sampled_from([0, 1]), st.integers(0, 2**16), st.floats(0.05, 3.0), st.integers(1, 6))
def test_rso_never_increases_the_loss_on_a_fixed_batch(seed, data_seed, scale, steps):
    rng = np.random.default_rng(data_seed)
    x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
    params = {
        "dense": {"kernel": jnp.asarray(scale * rng.normal(size=(4, 3)), jnp.float32)},
        "out": {"kernel": jnp.asarray(scale * rng.normal(size=(3, 2)), jnp.float32)},
    }
    tx, step, loss = _rso_step(seed)
    state = tx.init(params)
    before = float(loss(params, x, y))
    for _ in range(steps):
        params, state = step(params, state, x, y)
        now = float(loss(params, x, y))
        assert now <= before, (before, now)
        np.testing.assert_allclose(float(state.rso_loss), now, rtol=1e-6)
        before = now
