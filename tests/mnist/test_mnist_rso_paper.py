"""The ``rso-paper`` model in the layout of the official RSO code, against a plain NumPy net.

The reference below is written from the layout of the official code (facts of
rohun-tripathi/RSO-gradient-free, ``train.py``): input minus the training-set
mean; conv0 -> BN; then for convs 1..5: ReLU -> conv -> [2x2 average pool after
convs 1 and 3 (0-based)] -> BN with batch statistics; global average pool (no
ReLU) -> dense 16 -> 10; 3x3 convs, padding 1, no biases anywhere.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from optax_neuron.mnist.models import InputMean, SubtractMean, make_model


def _np_conv3x3(h, w):
    """``h (n, H, W, cin)``, ``w (3, 3, cin, cout)``, zero padding 1, stride 1: loops over taps."""
    n, hh, ww, _ = h.shape
    hp = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, hh, ww, w.shape[-1]))
    for a in range(3):
        for b in range(3):
            out += np.einsum("nhwc,co->nhwo", hp[:, a : a + hh, b : b + ww, :], w[a, b])
    return out


def _np_bn(h, scale, shift, eps):
    mean = h.mean(axis=(0, 1, 2))
    var = ((h - mean) ** 2).mean(axis=(0, 1, 2))
    return (h - mean) / np.sqrt(var + eps) * scale + shift


def _np_pool(h):
    n, hh, ww, c = h.shape
    return h.reshape(n, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))


def _np_paper_net(x, mean, kernels, scales, shifts, dense, eps):
    h = np.asarray(x, np.float64) - mean
    for i in range(6):
        if i > 0:
            h = np.maximum(h, 0.0)
        h = _np_conv3x3(h, kernels[i])
        if i in (1, 3):
            h = _np_pool(h)
        h = _np_bn(h, scales[i], shifts[i], eps)
    return h.mean(axis=(1, 2)) @ dense


def test_rso_paper_layer_order():
    model = make_model("rso-paper", nnx.Rngs(0))
    kinds = []
    for layer in model.layers:
        if isinstance(layer, nnx.Module):
            kinds.append(type(layer).__name__)
        elif getattr(layer, "func", None) is nnx.avg_pool:
            kinds.append("pool")
        elif layer is nnx.relu:
            kinds.append("relu")
        else:
            kinds.append(layer.__name__)
    block = lambda pool: ["relu", "Conv"] + (["pool"] if pool else []) + ["BatchNorm"]
    expected = ["SubtractMean", "Conv", "BatchNorm"]
    for i in range(1, 6):
        expected += block(i in (1, 3))
    expected += ["_global_avg_pool", "Linear"]
    assert kinds == expected
    convs = [m for m in model.layers if isinstance(m, nnx.Conv)]
    assert [c.kernel.shape for c in convs] == [(3, 3, 1, 16)] + [(3, 3, 16, 16)] * 5
    assert all(c.bias is None and c.padding == "SAME" for c in convs)
    assert model.layers[-1].kernel.shape == (16, 10) and model.layers[-1].bias is None
    params = nnx.state(model, nnx.Param)
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == 12016
    assert isinstance(model.layers[0].mean, InputMean)  # a data constant, not a Param
    assert not any(
        isinstance(v, InputMean) for v in jax.tree.leaves(params, is_leaf=lambda v: True)
    )


@pytest.mark.parametrize("channels", [3, 16])
def test_rso_paper_matches_numpy_reference(channels):
    model = make_model("rso-paper", nnx.Rngs(4), channels=channels)
    model.train()  # batch statistics, as the official code's forward
    rng = np.random.default_rng(0)
    bns = [m for m in model.layers if isinstance(m, nnx.BatchNorm)]
    for bn in bns:  # non-trivial scale and shift, so their placement matters
        bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, channels), jnp.float32)
        bn.bias[...] = jnp.asarray(rng.normal(0, 0.3, channels), jnp.float32)
    mean = 0.13
    model.layers[0].mean[...] = jnp.float32(mean)
    x = rng.uniform(0, 1, (5, 28, 28, 1)).astype(np.float32)
    convs = [m for m in model.layers if isinstance(m, nnx.Conv)]
    ref = _np_paper_net(
        x,
        mean,
        [np.asarray(c.kernel[...], np.float64) for c in convs],
        [np.asarray(b.scale[...], np.float64) for b in bns],
        [np.asarray(b.bias[...], np.float64) for b in bns],
        np.asarray(model.layers[-1].kernel[...], np.float64),
        bns[0].epsilon,
    )
    got = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x))
    assert got.shape == (5, 10)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-4, atol=2e-4)


def test_subtract_mean_is_a_constant():
    layer = SubtractMean(0.25)
    np.testing.assert_allclose(layer(jnp.ones((1, 2, 2, 1))), 0.75)
