"""The incremental evaluator through channel-wise layers, against the plain evaluation.

A candidate changes one output channel of a :class:`LinearLayer`; through layers
declared :func:`channelwise` (BatchNorm with batch statistics, ReLU, average pooling,
global average pooling) only that channel is carried, and the next linear layer's output
gets one input-channel slice of its kernel. Compared with the full ``LayerStack``
evaluation of the moved parameters (float32; tolerance stated below, measured max
relative difference printed by ``-s``).

A whole search through these layers (conv -> BN -> ReLU -> conv -> pool -> BN -> global
pool -> dense) on the incremental path makes the same decisions as on ``"cache"``
(tests/mnist/test_mnist_rso_recipe.py), which scores the black box's losses bit for bit
(tests/test_rso.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _rso_nets import bn_layer, ce

from optax_neuron import LayerStack, _random, channelwise, conv_layer, dense_layer, rso_init
from optax_neuron._tree import leaves_with_paths
from optax_neuron.rso.evaluators import Change, Incremental, Target

RTOL = 2e-5  # measured: at most 7.6e-8 relative (float32 rounding, another summation order)


relu = channelwise(lambda p, h: jax.nn.relu(h))
pool = channelwise(
    lambda p, h: h.reshape(h.shape[0], h.shape[1] // 2, 2, h.shape[2] // 2, 2, h.shape[3]).mean(
        axis=(2, 4)
    )
)  # 2x2 average
global_pool = channelwise(lambda p, h: h.mean(axis=(1, 2)))


def _net(ch=4):
    params = {
        "conv0": {"kernel": jnp.zeros((3, 3, 1, ch))},
        "conv1": {"kernel": jnp.zeros((3, 3, ch, ch))},
        "conv2": {"kernel": jnp.zeros((3, 3, ch, ch))},
        "head": {"kernel": jnp.zeros((ch, 5))},
    }
    for i in range(3):
        params[f"bn{i}"] = {"scale": jnp.ones(ch), "bias": jnp.zeros(ch)}
    params = rso_init(jax.random.key(0), params)
    # the official layout: conv, [pool], BN; ReLU opens the next conv; global pool, dense
    layers = [
        conv_layer("conv0/kernel"),
        bn_layer("bn0"),
        relu,
        conv_layer("conv1/kernel"),
        pool,
        bn_layer("bn1"),
        relu,
        conv_layer("conv2/kernel"),
        bn_layer("bn2"),
        global_pool,
        dense_layer("head/kernel"),
    ]
    return params, layers


_ce = ce


def _data(n=16, seed=1):
    kx, ky = jax.random.split(jax.random.key(seed))
    return _random.normal(kx, (n, 8, 8, 1)), jax.random.randint(ky, (n,), 0, 5)


def _target(params, path, runs=False):
    """The leaf at ``path``; ``runs``: visited neuron by neuron (one output channel at a time)."""
    paths = [p for p, _ in leaves_with_paths(params)[0]]
    leaf = leaves_with_paths(params)[0][paths.index(path)][1]
    run = leaf.size // leaf.shape[-1] if runs else 1
    return Target(leaves_with_paths(params)[1], paths.index(path), path, leaf.shape, run)


def _cached_inputs(ev, cache, params):
    """``{layer i: its input}`` (channels last) from the named fields of the cache; in the run
    form, layer m's output is the cached one plus input channel ``without``'s contribution."""
    last = lambda x: jnp.moveaxis(x, 0, -1)
    out = {ev.k: last(cache.owner_in), ev.k + 1: last(cache.owner_out)}
    if cache.next_in is not None:
        out[ev.m] = last(cache.next_in)
    if cache.next_out is not None:
        out[ev.m + 1] = cache.next_out
    if cache.without is not None:
        r = cache.without
        h_r = jnp.moveaxis(ev._next_in(cache), 0, -1)[..., r][..., None]
        out[ev.m + 1] = ev.stack.layers[ev.m].add_input_channel(params, cache.next_out, h_r, r)
    return out


def _change(params, target, flat, deltas):
    w = params[target.path.split("/")[0]][target.path.split("/")[1]].ravel()[flat]
    values = w + jnp.asarray(deltas, jnp.float32)
    return Change(flat, values, (values - w).astype(jnp.float32), jax.random.key(0))


@pytest.mark.parametrize(
    "k,path,m",
    [(0, "conv0/kernel", 3), (3, "conv1/kernel", 7), (7, "conv2/kernel", 10),
     (1, "bn0/scale", 3), (5, "bn1/bias", 7), (8, "bn2/scale", 10)],
)  # fmt: skip
def test_incremental_scores_and_commit_match_full_evaluation(k, path, m):
    params, layers = _net()
    x, y = _data()
    stack = LayerStack(layers, _ce, x, y)
    target = _target(params, path)
    ev = Incremental(stack, k, target)
    assert Incremental.applies(stack, k, target)
    assert ev.m == m and ev.linear_m  # the path runs through the channel-wise layers

    @jax.jit
    def check(flat, deltas):
        change = _change(params, target, flat, deltas)
        moved = [target.moved(params, flat, v) for v in change.values]
        cache = ev.start(params)
        losses, aux = ev.scores(params, cache, change)
        kept = ev.commit(params, cache, aux, 0, False)
        committed = ev.commit(params, cache, aux, 0, True)
        want = [stack(p) for p in moved]
        return losses, want, kept, committed, stack.activations(moved[0])[0], cache

    worst = 0.0
    size = int(np.prod(target.shape))
    for flat, delta in [(0, 0.3), (size // 3, -0.7), (size - 1, 1.5), (size // 2, 0.0)]:
        got, want, kept, committed, acts, cache = check(jnp.int32(flat), [delta, -delta])
        for g, w in zip(got, want, strict=True):
            worst = max(worst, abs(float(g) - float(w)) / abs(float(w)))
            np.testing.assert_allclose(float(g), float(w), rtol=RTOL)
        for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(cache), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # not applied: unchanged
        inputs = _cached_inputs(ev, committed, params)
        assert sorted(inputs) == sorted({k, k + 1, m, m + 1})
        for j, h in inputs.items():  # applied: the cached activations of the moved params
            np.testing.assert_allclose(np.asarray(h), np.asarray(acts[j]), rtol=1e-4, atol=1e-5)
    print(f"{path}: max relative loss difference {worst:.2e}")


@pytest.mark.parametrize(
    "k,path", [(0, "conv0/kernel"), (3, "conv1/kernel"), (7, "conv2/kernel"), (10, "head/kernel")]
)
def test_run_form_follows_a_neuron_order_visit_against_full_evaluation(k, path):
    """Visited neuron by neuron, the cache keeps layer m's output without the current output
    channel's contribution: several weights of one channel, then a new channel and back,
    each kept candidate committed, every loss and cached input against the full evaluation
    of the parameters as they stand."""
    params, layers = _net()
    x, y = _data()
    stack = LayerStack(layers, _ce, x, y)
    target = _target(params, path, runs=True)
    ev = Incremental(stack, k, target)
    assert ev.runs == (path != "head/kernel")  # the head is the last layer: no layer m
    ch = target.shape[-1]
    flats = [ch + 1, 2 * ch + 1, 1, ch + 2, 2, 5 * ch + 1] if ev.runs else [1, ch + 2]
    flats = [f for f in flats if f < np.prod(target.shape)]

    @jax.jit
    def step(params, cache, flat, deltas, kept):
        change = _change(params, target, flat, deltas)
        losses, aux = ev.scores(params, cache, change)
        want = jnp.stack([stack(target.moved(params, flat, v)) for v in change.values])
        params = target.moved(params, flat, change.values[kept])
        return params, ev.commit(params, cache, aux, kept, True), losses, want

    cache = ev.start(params)
    for i, flat in enumerate(flats):
        params, cache, got, want = step(params, cache, jnp.int32(flat), [0.4, -0.6], i % 2)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL)
        if ev.runs:
            assert int(cache.without) == flat % ch
        acts = stack.activations(params)[0]
        for j, h in _cached_inputs(ev, cache, params).items():
            np.testing.assert_allclose(np.asarray(h), np.asarray(acts[j]), rtol=1e-4, atol=1e-5)


def test_incremental_between_two_adjacent_linear_layers():
    """conv -> conv: the changed output channel is the next layer's changed input channel."""
    params = rso_init(
        jax.random.key(2),
        {"a": {"kernel": jnp.zeros((3, 3, 2, 3))}, "b": {"kernel": jnp.zeros((3, 3, 3, 4))},
         "head": {"kernel": jnp.zeros((4, 5))}},
    )  # fmt: skip
    layers = [
        conv_layer("a/kernel"),
        conv_layer("b/kernel"),
        global_pool,
        dense_layer("head/kernel"),
    ]
    x, y = _data()
    stack = LayerStack(layers, _ce, jnp.concatenate([x, -x], axis=-1), y)
    target = _target(params, "a/kernel")
    ev = Incremental(stack, 0, target)
    cache = ev.start(params)
    assert ev.m == 1 and ev.linear_m and cache.next_in is None

    @jax.jit
    def check(flat, deltas):
        change = _change(params, target, flat, deltas)
        moved = target.moved(params, change.flat_index, change.values[0])
        losses, aux = ev.scores(params, cache, change)
        committed = ev.commit(params, cache, aux, 0, True)
        return losses[0], stack(moved), stack.activations(moved)[0], committed

    for flat, delta in [(0, 0.4), (25, -1.1), (53, 2.0)]:
        got_loss, want_loss, acts, committed = check(jnp.int32(flat), [delta])
        np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=RTOL)
        for j, got in _cached_inputs(ev, committed, params).items():
            np.testing.assert_allclose(np.asarray(got), np.asarray(acts[j]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(
    "kshape, padding", [((3, 3, 4, 5), "SAME"), ((2, 3, 4, 5), "SAME"), ((3, 2, 4, 5), "VALID")]
)
def test_add_input_channel_matches_a_numpy_loop(kshape, padding, fused):
    """``out + A(W[..., c:c+1, :], d)`` against the convolution sum written out in NumPy, as one
    matrix product of the taps and as the taps' broadcast products (``fused``)."""
    kh, kw, cin, _ = kshape
    w = np.asarray(_random.normal(jax.random.key(0), kshape))
    x = np.asarray(_random.normal(jax.random.key(1), (2, 6, 7, 1)))
    layer = conv_layer("c/kernel", padding=padding)
    out = np.asarray(layer({"c": {"kernel": jnp.asarray(w)}}, jnp.zeros((2, 6, 7, cin))))
    base = np.asarray(_random.normal(jax.random.key(2), out.shape))
    (top, _), (left, _) = layer._pads(kshape)
    c = 2
    want = base.astype(np.float64).copy()
    for n in range(2):
        for yo in range(out.shape[1]):
            for xo in range(out.shape[2]):
                for a in range(kh):
                    for b in range(kw):
                        yi, xi = yo + a - top, xo + b - left
                        if 0 <= yi < 6 and 0 <= xi < 7:
                            want[n, yo, xo] += x[n, yi, xi, 0] * w[a, b, c].astype(np.float64)
    kernel = {"c": {"kernel": jnp.asarray(w)}}
    got = layer.add_input_channel(kernel, jnp.asarray(base), x, c, fused)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    dense = dense_layer("d/kernel")
    wd = np.asarray(jax.random.normal(jax.random.key(3), (4, 5)))
    got = dense.add_input_channel(
        {"d": {"kernel": jnp.asarray(wd)}}, jnp.asarray(base[:, 0, 0]), x[:, 0, 0], c, fused
    )
    np.testing.assert_allclose(np.asarray(got), base[:, 0, 0] + x[:, 0, 0] * wd[c], rtol=1e-6)


def test_channelwise_bad_input():
    with pytest.raises(TypeError, match="callable"):
        channelwise(0.5)
    with pytest.raises(TypeError, match="per_channel"):
        channelwise(lambda p, h: h, per_channel="bn/scale")
    with pytest.raises(ValueError, match="nope/scale"):
        channelwise(lambda p, h: h * p["nope"]["scale"], per_channel=["nope/scale"]).one_channel(
            {"bn": {"scale": jnp.ones(2)}}, jnp.ones((1, 1)), 0
        )
