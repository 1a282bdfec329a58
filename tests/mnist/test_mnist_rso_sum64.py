"""RSO's loss as the official code computes it: the cross-entropy summed in float64.

Checked against NumPy in float64: the loss itself, and the decisions of a search whose
candidates differ by less than float32 can resolve. Also: the float64 switch
(``jax.enable_x64`` around the step) leaves every other computation of the search as it
is in float32, and the application's step keeps its dtypes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_neuron as on
from optax_neuron.mnist.rso import cross_entropy_sum64


def _numpy_sum64(logits, labels):
    """-sum_i log softmax(z_i)[y_i], every step in float64 (log-sum-exp with the max)."""
    z = np.asarray(logits, np.float64)
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return float(-np.sum(z[np.arange(len(z)), np.asarray(labels)] - lse))


def test_cross_entropy_sum64_matches_numpy_float64():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(300, 10)) * np.array([1.0] * 9 + [40.0])).astype(np.float32)
    labels = rng.integers(0, 10, 300)
    with jax.enable_x64(True):
        got = jax.jit(cross_entropy_sum64)(jnp.asarray(logits), jnp.asarray(labels, jnp.int32))
    assert got.dtype == jnp.float64
    assert float(got) == pytest.approx(_numpy_sum64(logits, labels), rel=1e-13)


def test_cross_entropy_sum64_refuses_float32():
    with pytest.raises(ValueError, match="enable_x64"):
        cross_entropy_sum64(jnp.zeros((2, 10)), jnp.zeros(2, jnp.int32))


def test_search_orders_candidates_by_the_float64_sum():
    """Ten weights of a 1 -> 10 dense layer, steps so small that the candidates' losses
    differ by less than float32's resolution: the search takes what the float64 NumPy
    losses say, weight by weight (with one input feature every logit is one float32
    product, the same in NumPy)."""
    rng = np.random.default_rng(1)
    n, sigma, seed = 2048, 2e-5, 3
    x = rng.normal(size=(n, 1)).astype(np.float32)
    y = rng.integers(0, 10, n)
    w0 = rng.normal(size=(1, 10)).astype(np.float32)
    tx = on.rso(seed=seed, weights_per_step=10, sigma=sigma, search=[("*", True)])
    stack = on.LayerStack([on.dense_layer("w")], cross_entropy_sum64, jnp.asarray(x),
                          jnp.asarray(y, jnp.int32))  # fmt: skip

    def step(params, state):
        updates, state = tx.update(params, state, params, value_fn=stack)
        return optax.apply_updates(params, updates), state

    params = {"w": jnp.asarray(w0)}
    with jax.enable_x64(True):
        new, state = jax.jit(step)(params, tx.init(params))
    # The reference: the draw of weight n of cycle 0 (documented in optax_neuron.rso.rule),
    # the three candidates in float32, their losses in float64, the strict argmin.
    w, decisions, gaps = w0.copy(), [], []
    for i in range(10):
        k = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), i)
        z = jax.random.normal(jax.random.split(k)[0], (), jnp.float32)
        dw = np.float32(np.float32(sigma) * np.float32(z))
        losses = []
        for s in (0.0, 1.0, -1.0):
            cand = w.copy()
            cand[0, i] = w[0, i] + np.float32(s) * dw
            losses.append(_numpy_sum64(x * cand, y))
        best = 0
        if losses[1] < losses[best]:
            best = 1
        if losses[2] < losses[best]:
            best = 2
        w[0, i] += np.float32((0.0, 1.0, -1.0)[best]) * dw
        decisions.append(best)
        gaps.append(abs(losses[best] - losses[0]) / losses[0])
    np.testing.assert_array_equal(np.asarray(new["w"]), w)
    assert int(state.rso_accepted["w"]) == sum(d != 0 for d in decisions)
    assert {1, 2} <= set(decisions), decisions  # both directions taken
    # decisions that a float32 loss could not make: gains below float32's relative step
    assert any(0 < g < 2.0**-24 for g in gaps), gaps


def _conv_net():
    """conv 3x3 (1 -> 2) -> ReLU and global mean -> dense 2 -> 3: two searched leaves."""
    layers = [
        on.conv_layer("conv0/kernel"),
        on.channelwise(lambda p, h: jnp.mean(jax.nn.relu(h), axis=(1, 2))),
        on.dense_layer("dense/kernel"),
    ]
    rng = np.random.default_rng(2)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    params = {"conv0": {"kernel": normal(3, 3, 1, 2)}, "dense": {"kernel": normal(2, 3)}}
    x, y = normal(16, 5, 5, 1), jnp.asarray(rng.integers(0, 3, 16), jnp.int32)
    return layers, params, x, y


def test_float64_mode_leaves_a_float32_search_unchanged():
    """With a float32 loss, the search traced with x64 enabled is the float32 search bit for
    bit (the int32 indices, the rows drawn per weight and the steps keep their types), so
    ``loss="sum64"`` changes the loss and nothing else. (A fresh batch per weight on the
    incremental path, the convolution searched: the path that met 64-bit indices.)"""
    layers, params, x, y = _conv_net()
    ce = lambda out, t: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, t))
    tx = on.rso(weights_per_step=18, sigma="he", within="neuron", weight_decay=1e-4,
                search=[("conv0/*", True), ("*", False)],
                anneal=optax.linear_schedule(1.0, 0.1, 5), per_weight_batch=True)  # fmt: skip
    stack = on.LayerStack(layers, ce, x, y, batch=8)

    def step(params, state):
        updates, state = tx.update(params, state, params, value_fn=stack)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    plain = jax.jit(step)(params, state)
    with jax.enable_x64(True):
        wide = jax.jit(step)(params, state)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(wide), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sum(int(v) for v in plain[1].rso_accepted.values()) > 0


def test_application_search_with_the_sum64_loss(monkeypatch):
    """The step is traced with float64 and keeps every type of its state (the next call
    reuses the compiled step; checkpoints do not change), its loss is float64 inside; a
    bad loss name is refused. (Shapes only: compiling the step takes half a minute.)"""
    from _rso_nets import paper_search_as_shapes

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.random((32, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 32), jnp.int32)
    with pytest.raises(ValueError, match="rso loss must be one of"):
        paper_search_as_shapes(monkeypatch, x, y, batch=8, cycles=2, loss="sum")
    search = paper_search_as_shapes(monkeypatch, x, y, batch=8, cycles=2, chunk=60,
                                    loss="sum64")  # fmt: skip
    args = (search.params, search.state, x, y, jnp.arange(32), 0)
    jaxpr = jax.make_jaxpr(search._step)(*args)  # the step enters enable_x64 itself
    want = [(a.shape, a.dtype) for a in jax.tree.leaves(args[:2])]
    assert [(a.shape, a.dtype) for a in jaxpr.out_avals] == want
    assert "f64[8,10]" in str(jaxpr)  # the logits of the 8 images, cast for the loss
    with pytest.raises(ValueError, match="enable_x64"):
        jax.eval_shape(search._step.jitted, *args)  # the float64 loss outside enable_x64


def test_cli_rso_loss_flag():
    from optax_neuron.mnist.__main__ import UsageError, _config, parse_args

    args = parse_args(["--optimizer", "rso", "--rso-loss", "sum64"])
    assert _config(args, "rso", None).rso_loss == "sum64"
    assert parse_args(["--optimizer", "rso"]).rso_loss == "mean"
    with pytest.raises(UsageError, match="--rso-loss does not apply to sgd"):
        parse_args(["--optimizer", "sgd", "--rso-loss", "sum64"])
    with pytest.raises(UsageError, match="invalid choice"):
        parse_args(["--optimizer", "rso", "--rso-loss", "sum32"])
