"""The application's RSO recipe: official leaf order, He step, anneal, fresh batches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _rso_nets import small_paper_model
from flax import nnx

import optax_neuron as on
from optax_neuron.mnist.models import make_model
from optax_neuron.mnist.rso import (
    RSO_NORM_SIGMA,
    RSOSearch,
    he_sigma,
    official_anneal,
    official_order,
    rso_layers,
)


@pytest.fixture(scope="module")
def paper():
    """The paper net with 2 channels: the same kernel shapes as ``small_paper_model``, so
    their random initialisers compile once."""
    model = make_model("rso-paper", nnx.Rngs(0), channels=2)
    model.train()
    return model


def test_official_leaf_order_of_the_paper_net(paper):
    model = paper
    # Layer indices of rso-paper: convs 1, 4, 8, 11, 15, 18; BatchNorms 2, 6, 9, 13, 16, 19;
    # dense 21.
    expected = ["layers/21/kernel"]
    for conv, bn in ((18, 19), (15, 16), (11, 13), (8, 9), (4, 6), (1, 2)):
        expected += [f"layers/{conv}/kernel", f"layers/{bn}/bias", f"layers/{bn}/scale"]
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = on.rso(order=official_order(model), sigma=he_sigma(model)).init(params)
    assert list(state.rso_sigma) == expected  # the state lists the leaves in visiting order


def test_he_step_and_norm_step(paper):
    model = paper
    sig = on.rso(sigma=he_sigma(model)).init(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    sig = sig.rso_sigma
    fan_in = {"layers/1/kernel": 9 * 1, "layers/4/kernel": 9 * 2, "layers/21/kernel": 2}
    for path, f in fan_in.items():
        np.testing.assert_allclose(float(sig[path]), np.sqrt(2.0 / f), rtol=1e-6)
    assert RSO_NORM_SIGMA == 0.167
    for bn in (2, 6, 9, 13, 16, 19):
        assert (
            float(sig[f"layers/{bn}/scale"]) == float(sig[f"layers/{bn}/bias"]) == np.float32(0.167)
        )


def test_official_anneal():
    anneal = official_anneal(50)
    for c in (0, 1, 25, 49):
        np.testing.assert_allclose(anneal(c), 0.1 + 0.9 * (50 - c) / 50)
    assert anneal(0) == 1.0


def _data(n=64, seed=0, side=8):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(0, 1, (n, side, side, 1)), jnp.float32), jnp.asarray(
        rng.integers(0, 10, n)
    )


def _ce(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


# The searches below run on the paper layout cut to two conv blocks (7 searched leaves,
# 82 weights) and 8x8 images: the recipe is the same, the compiled search far smaller.
CHUNK_ARGS = {"batch": 16, "cycles": 3, "chunk": 41}


@pytest.fixture(scope="module")
def chunk_runs():
    """One cycle of the chunk-mode search (2 calls of 41 weights) on each fast path."""
    x, y = _data()
    runs = {}
    for fast_path in ("incremental", "cache"):
        search = RSOSearch(small_paper_model(), x, y, fast_path=fast_path, **CHUNK_ARGS)
        runs[fast_path] = (search, *search.cycle(search.params, search.state, 0, x, y))
    return x, y, runs


def test_chunk_mode_scores_each_chunk_on_the_next_minibatch_of_the_shuffle(chunk_runs):
    """Replayed on the ``"cache"`` path (the same losses as the black box): the fast path
    does not choose the minibatches, and the next test ties ``"incremental"`` to it."""
    x, y, runs = chunk_runs
    search, params, state = runs["cache"]
    assert search.calls == 2 and search.calls * search.chunk == search.total == 82
    assert int(state.rso_cursor) == 0 and int(state.rso_cycle) == 1  # every weight visited once
    # Reference: the library transformation called by hand on the minibatches the recipe promises.
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.PRNGKey(1), 0), 64))
    ref, ref_state = search.params, search.state
    model = small_paper_model()
    model.layers[0].mean[...] = jnp.mean(x)  # the model subtracts the training-set mean
    layers = rso_layers(model)
    step = jax.jit(
        lambda p, s, xb, yb: search.tx.update(p, s, p, value_fn=on.LayerStack(layers, _ce, xb, yb))
    )
    for c in range(search.calls):
        idx = perm[(c * 16 + np.arange(16)) % 64]
        u, ref_state = step(ref, ref_state, x[idx], y[idx])
        ref = optax.apply_updates(ref, u)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sum(int(v) for v in state.rso_accepted.values()) > 5


def test_channelwise_declarations_keep_the_exact_decisions(chunk_runs):
    """The incremental path (one channel carried through BatchNorm, ReLU, pooling) against
    ``fast_path="cache"``, which re-runs the layers in full: same search, same parameters."""
    _, _, runs = chunk_runs
    (_, p_inc, s_inc), (_, p_full, s_full) = runs["incremental"], runs["cache"]
    np.testing.assert_allclose(float(s_inc.rso_loss), float(s_full.rso_loss), rtol=1e-5)
    assert {k: int(v) for k, v in s_inc.rso_accepted.items()} == {
        k: int(v) for k, v in s_full.rso_accepted.items()
    }
    # rounding-only loss differences: on this setup no decision flips, the weights are equal
    for a, b in zip(jax.tree.leaves(p_inc), jax.tree.leaves(p_full), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_weight_mode_runs_a_cycle_with_fresh_rows_per_weight(monkeypatch):
    """``fresh_batch="weight"``: the library's per-weight rows (``per_weight_batch`` and a
    ``LayerStack`` over the whole training set with ``batch=``), and a whole cycle moves the
    weights. (Those draws on both fast paths against an explicit replay: test_rso_sampled.)"""
    seen = {"rso": [], "stack": []}
    real_rso, real_stack = on.rso, on.LayerStack

    def rso_spy(*args, **kwargs):
        seen["rso"].append(kwargs.get("per_weight_batch", False))
        return real_rso(*args, **kwargs)

    def stack_spy(layers, loss, x, y, **kwargs):
        seen["stack"].append((x.shape[0], kwargs.get("batch")))
        return real_stack(layers, loss, x, y, **kwargs)

    monkeypatch.setattr(on, "rso", rso_spy)
    monkeypatch.setattr(on, "LayerStack", stack_spy)
    x, y = _data(n=48)
    search = RSOSearch(
        small_paper_model(), x, y, batch=16, cycles=2, chunk=64, fresh_batch="weight"
    )
    assert search.calls > 1  # calls start inside leaves
    params, state = search.cycle(search.params, search.state, 0, x, y)
    assert seen["rso"][-1] is True and set(seen["stack"]) == {(48, 16)}
    assert int(state.rso_cursor) == 0 and int(state.rso_cycle) == 1
    assert np.isfinite(float(state.rso_loss))
    assert sum(int(v) for v in state.rso_accepted.values()) > 0
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(search.params), strict=True)
    )


def test_bad_fresh_batch():
    x, y = _data(n=16)
    with pytest.raises(ValueError, match="rso fresh batch must be one of"):
        RSOSearch(small_paper_model(), x, y, batch=8, cycles=1, fresh_batch="epoch")


def test_model_mean_is_set_from_the_training_set():
    x, y = _data(n=16)
    model = small_paper_model()
    search = RSOSearch(model, x, y, batch=8, cycles=1)
    np.testing.assert_allclose(
        float(search.to_model(search.params, x).layers[0].mean[...]), float(jnp.mean(x))
    )
