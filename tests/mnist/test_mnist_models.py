"""Models: shapes, parameter counts from the architecture, the im2col convolution."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_neuron as on
from optax_neuron import _random
from optax_neuron.mnist.models import make_model, patch_conv
from optax_neuron.mnist.rso import _tiled_pool, calibrate_batch_norm, rso_layers


@pytest.mark.parametrize(
    "shape, kernel, padding",
    [
        ((2, 9, 9, 1), (3, 3, 1, 4), "SAME"),
        ((3, 7, 6, 5), (3, 3, 5, 2), "SAME"),
        ((2, 8, 8, 3), (2, 2, 3, 4), "SAME"),  # even kernel: asymmetric SAME padding
        ((2, 8, 7, 3), (3, 2, 3, 4), "VALID"),
        ((1, 6, 6, 2), (3, 3, 2, 3), ((2, 0), (1, 1))),
    ],
)
def test_patch_conv_equals_lax_conv(shape, kernel, padding):
    kx, kw = jax.random.split(jax.random.key(0))
    x, w = _random.normal(kx, shape), _random.normal(kw, kernel)
    dn = jax.lax.conv_dimension_numbers(shape, kernel, ("NHWC", "HWIO", "NHWC"))
    hi = jax.lax.Precision.HIGHEST

    @jax.jit
    def both(x, w):  # values and gradients (what training uses) of both implementations
        out = []
        for conv in (patch_conv, jax.lax.conv_general_dilated):
            f = lambda w, conv=conv: conv(x, w, (1, 1), padding, dimension_numbers=dn, precision=hi)
            out.append((f(w), jax.grad(lambda w, f=f: jnp.sum(jnp.sin(f(w))))(w)))
        return out

    (got, got_grad), (ref, ref_grad) = both(x, w)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_grad, ref_grad, rtol=1e-4, atol=1e-4)


def test_patch_conv_falls_back_for_strides():
    x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 3))
    ref = jax.lax.conv_general_dilated(
        x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(patch_conv(x, w, (2, 2), "SAME", dimension_numbers=dn), ref)


def _abstract(name, **kwargs):
    """Output shape and parameter count, traced with shapes only (nothing runs)."""
    x = jnp.zeros((3, 28, 28, 1))

    def build_and_call():
        model = make_model(name, nnx.Rngs(0), **kwargs)
        model.eval()
        return model(x), nnx.state(model, nnx.Param), model

    out, params, model = nnx.eval_shape(build_and_call)
    return out.shape, sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)), model


def test_models_shapes_and_sizes():
    shape, n, _ = _abstract("mlp", hidden=20)
    assert shape == (3, 10) and n == 784 * 20 + 20 + 20 * 10 + 10
    shape, n, _ = _abstract("cnn")
    assert shape == (3, 10)
    assert n == (9 * 32 + 32) + (9 * 32 * 64 + 64) + (7 * 7 * 64 * 128 + 128) + (128 * 10 + 10)
    shape, n, paper = _abstract("rso-paper")
    assert shape == (3, 10)
    # 6 conv3x3 (16 filters, no bias) + 6 BatchNorm (scale, shift) + dense 16 -> 10 without bias
    assert n == 9 * 16 + 5 * 9 * 16 * 16 + 6 * 2 * 16 + 16 * 10
    convs = [layer for layer in paper.layers if isinstance(layer, nnx.Conv)]
    pools = [
        i for i, layer in enumerate(paper.layers) if getattr(layer, "func", None) is nnx.avg_pool
    ]
    assert len(convs) == 6 and len(pools) == 2
    # the first two blocks: conv 1 -> 16, BN, conv 16 -> 16, avgpool, BN, dense 16 -> 10
    shape, n, small = _abstract("rso-paper", blocks=2)
    assert shape == (3, 10) and n == 9 * 16 + 9 * 16 * 16 + 2 * 2 * 16 + 16 * 10
    assert [type(layer).__name__ for layer in small.layers if isinstance(layer, nnx.Module)] == [
        "SubtractMean", "Conv", "BatchNorm", "Conv", "BatchNorm", "Linear"
    ]  # fmt: skip
    for blocks in (0, 7):
        with pytest.raises(ValueError, match=f"rso_paper: blocks must be 1 to 6, got {blocks}"):
            make_model("rso-paper", nnx.Rngs(0), blocks=blocks)
    with pytest.raises(ValueError, match="model must be one of"):
        make_model("resnet", nnx.Rngs(0))


@pytest.mark.parametrize("name", ["mlp", "rso-paper"])
def test_rso_layers_compute_the_model(name):
    model = make_model(name, nnx.Rngs(1), **({"hidden": 8} if name == "mlp" else {"channels": 4}))
    model.train()  # BatchNorm with batch statistics, as RSO's loss uses
    x = _random.uniform(jax.random.key(2), (16, 28, 28, 1))
    y = jnp.arange(16) % 10
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ce = lambda logits, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    stack = on.LayerStack(rso_layers(model), ce, x, y)
    forward = nnx.jit(lambda model, x: model(x))
    stack_loss = jax.jit(lambda p: stack(p))(params)
    np.testing.assert_allclose(stack_loss, ce(forward(model, x), y), rtol=1e-5)
    if name == "rso-paper":
        calibrate_batch_norm(model, x)
        model.eval()  # running averages now equal the statistics of x
        np.testing.assert_allclose(ce(forward(model, x), y), stack_loss, rtol=1e-4)


@pytest.mark.parametrize("pool", [nnx.avg_pool, nnx.max_pool])
@pytest.mark.parametrize("window", [(2, 2), (3, 3), (2, 3)])
def test_tiled_pool_is_the_pooling(pool, window):
    """RSO's pooling over non-overlapping windows against a NumPy loop over the windows and
    against Flax's pooling (bit for bit for the models' 2x2 window: XLA:CPU adds a 2x2 window
    pairwise, as the tiled pooling does); odd sizes drop the last row and column as Flax does."""
    fn = functools.partial(pool, window_shape=window, strides=window)
    tiled = jax.jit(_tiled_pool(fn))
    kh, kw = window
    for shape in [(3, 28, 28, 4), (2, 7, 8, 1)]:
        x = np.asarray(_random.normal(jax.random.key(sum(shape)), shape))
        got = np.asarray(tiled(jnp.asarray(x)))
        ho, wo = shape[1] // kh, shape[2] // kw
        want = np.zeros((shape[0], ho, wo, shape[3]), np.float64)
        for i in range(ho):
            for j in range(wo):
                block = x[:, i * kh : i * kh + kh, j * kw : j * kw + kw].astype(np.float64)
                want[:, i, j] = block.mean((1, 2)) if pool is nnx.avg_pool else block.max((1, 2))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        flax_out = np.asarray(jax.jit(fn)(jnp.asarray(x)))
        assert got.shape == flax_out.shape
        if window == (2, 2) and jax.default_backend() == "cpu":
            np.testing.assert_array_equal(got.view(np.uint32), flax_out.view(np.uint32))


def test_tiled_pool_only_for_non_overlapping_windows():
    """Overlapping windows, padding and other functions keep the model's own pooling."""
    avg = nnx.avg_pool
    assert _tiled_pool(functools.partial(avg, window_shape=(2, 2))) is None  # strides 1
    assert _tiled_pool(functools.partial(avg, window_shape=(3, 3), strides=(2, 2))) is None
    assert _tiled_pool(functools.partial(avg, window_shape=(2, 2), padding="SAME")) is None
    kw = {"window_shape": (2, 2), "strides": (2, 2), "count_include_pad": False}
    assert _tiled_pool(functools.partial(avg, **kw)) is None
    assert _tiled_pool(nnx.relu) is None


def test_vit_shapes_patches_and_attention_fan_in():
    import optax_neuron as on
    from optax_neuron.mnist.models import PatchEmbedding

    shape, n, _ = _abstract("vit")
    d, mlp = 32, 64
    block = 4 * (d * d + d) + 2 * (d * mlp) + mlp + d + 4 * d  # q, k, v, out; MLP; 2 LayerNorms
    assert shape == (3, 10) and n == (49 * d + d + 16 * d) + 2 * block + 2 * d + (d * 10 + 10)
    # Patches: row-major 7x7 tiles, tile (r, c) = image[7r:7r+7, 7c:7c+7], flattened row by row.
    embed = PatchEmbedding(7, 5, nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((2, 28, 28, 1)).astype(np.float32)
    tiles = np.stack(
        [
            x[:, 7 * r : 7 * r + 7, 7 * c : 7 * c + 7, 0].reshape(2, 49)
            for r in range(4)
            for c in range(4)
        ],
        axis=1,
    )
    want = tiles @ np.asarray(embed.proj.kernel[...]) + np.asarray(embed.proj.bias[...])
    want = want + np.asarray(embed.embedding[...])
    np.testing.assert_allclose(embed(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
    # The attention kernels get the attention rules: q/k/v (in, heads, head_dim) -> (0,).
    model = make_model("vit", nnx.Rngs(0))
    axes = on.fan_in_axes(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    attention = axes["layers"][1]["attention"]
    assert attention["query"]["kernel"] == attention["key"]["kernel"] == (0,)
    assert attention["out"]["kernel"] == (0, 1) and axes["layers"][0]["embedding"] == ()
    with pytest.raises(ValueError, match="multiple of heads"):
        make_model("vit", nnx.Rngs(0), hidden=30)
