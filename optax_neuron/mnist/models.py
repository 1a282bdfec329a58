"""Flax NNX models for 28x28x1 images: ``mlp``, ``cnn``, ``rso-paper`` and ``vit``.

Every model maps images ``(n, 28, 28, 1)`` to logits ``(n, 10)`` and is a
flat :class:`flax.nnx.Sequential` stack, so a layer-by-layer method such as
RSO sees its layers in order (``layers/0``, ``layers/1``, ...). BatchNorm
(``rso-paper`` only) follows ``model.train()`` / ``model.eval()``.

Example:
  >>> from flax import nnx
  >>> model = make_model("cnn", nnx.Rngs(0))
  >>> model(jnp.zeros((2, 28, 28, 1))).shape
  (2, 10)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

import optax_neuron as on
from optax_neuron import _random

__all__ = [
    "MODELS",
    "InputMean",
    "SubtractMean",
    "cnn",
    "make_model",
    "mlp",
    "patch_conv",
    "rso_paper",
    "vit",
]


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def _global_avg_pool(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2))


def patch_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
    **kwargs,
) -> jax.Array:
    """Drop-in for ``jax.lax.conv_general_dilated`` as one matrix product (im2col).

    For a stride-1, undilated, ungrouped 2-D convolution of NHWC images
    ``x`` with an HWIO kernel ``w``, pads ``x``, stacks the ``kh*kw`` shifted
    views along channels, ``P[n, y, x, (i, j, c)] = x_pad[n, y+i, x+j, c]``,
    and returns ``P @ w.reshape(kh*kw*cin, cout)``. On CPU the XLA
    convolution (and especially its gradient) is several times slower than
    this for MNIST-sized layers; the gradient of slicing and padding is cheap.
    Other cases fall back to ``jax.lax.conv_general_dilated``. Pass it to
    ``nnx.Conv(..., conv_general_dilated=patch_conv)``.
    """

    def ones(v):
        return v is None or all(int(d) == 1 for d in v)

    if isinstance(dimension_numbers, (tuple, list)) and all(
        isinstance(d, str) for d in dimension_numbers
    ):
        dimension_numbers = jax.lax.conv_dimension_numbers(
            lhs.shape, rhs.shape, tuple(dimension_numbers)
        )
    nhwc = dimension_numbers is None or (
        tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
        and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1)
        and tuple(dimension_numbers.out_spec) == (0, 3, 1, 2)
    )
    simple = (
        lhs.ndim == 4
        and nhwc
        and ones(window_strides)
        and ones(lhs_dilation)
        and ones(rhs_dilation)
        and feature_group_count == 1
        and (padding in ("SAME", "VALID") or not isinstance(padding, str))
    )
    if not simple:
        return jax.lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            precision=precision,
            **kwargs,
        )
    kh, kw, cin, cout = rhs.shape
    pads = on.conv_padding((kh, kw), padding)
    x = jnp.pad(lhs, ((0, 0), pads[0], pads[1], (0, 0)))
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    cols = jnp.concatenate(
        [x[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)], axis=-1
    )
    out = jnp.dot(
        cols.reshape(-1, kh * kw * cin), rhs.reshape(kh * kw * cin, cout), precision=precision
    )
    return out.reshape(lhs.shape[0], h, w, cout)


_max_pool2 = functools.partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2))
_avg_pool2 = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))


def _conv(c_in: int, c_out: int, **kwargs) -> nnx.Conv:
    """A 3x3 ``nnx.Conv`` through :func:`patch_conv`, its kernel drawn as Flax's default
    draws it (the same values) but flat, which XLA's CPU backend compiles several times
    faster than a 4-D draw (:mod:`optax_neuron._random`)."""
    return nnx.Conv(
        c_in,
        c_out,
        (3, 3),
        conv_general_dilated=patch_conv,
        kernel_init=_random.lecun_normal,
        **kwargs,
    )


def mlp(rngs: nnx.Rngs, hidden: int = 128) -> nnx.Sequential:
    """784 -> ``hidden`` (ReLU) -> 10."""
    return nnx.Sequential(
        _flatten,
        nnx.Linear(28 * 28, hidden, rngs=rngs),
        nnx.relu,
        nnx.Linear(hidden, 10, rngs=rngs),
    )


def cnn(rngs: nnx.Rngs, channels: tuple[int, int] = (32, 64), hidden: int = 128) -> nnx.Sequential:
    """Two 3x3 conv + ReLU + 2x2 max-pool blocks, a ReLU dense layer, logits.

    With the defaults (about 420k parameters) one or two epochs of momentum
    SGD reach 99% test accuracy.
    """
    c1, c2 = channels
    return nnx.Sequential(
        _conv(1, c1, rngs=rngs),
        nnx.relu,
        _max_pool2,
        _conv(c1, c2, rngs=rngs),
        nnx.relu,
        _max_pool2,
        _flatten,
        nnx.Linear(7 * 7 * c2, hidden, rngs=rngs),
        nnx.relu,
        nnx.Linear(hidden, 10, rngs=rngs),
    )


class InputMean(nnx.Variable):
    """A constant of the data (not searched, not trained): the training-set pixel mean."""


class SubtractMean(nnx.Module):
    """``x - mean``, ``mean`` a scalar :class:`InputMean` (0 until set from the training data)."""

    def __init__(self, mean: float = 0.0):
        self.mean = InputMean(jnp.asarray(mean, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x - self.mean[...]


def rso_paper(rngs: nnx.Rngs, channels: int = 16, blocks: int = 6) -> nnx.Sequential:
    """The MNIST net of the RSO paper (Tripathi & Singh, 2020), in the layout of its official code.

    Layer order (rohun-tripathi/RSO-gradient-free, ``train.py``)::

        x - mean
        conv0 -> BN0
        ReLU -> conv1 -> avgpool 2x2 -> BN1
        ReLU -> conv2 -> BN2
        ReLU -> conv3 -> avgpool 2x2 -> BN3
        ReLU -> conv4 -> BN4
        ReLU -> conv5 -> BN5
        global average pool -> dense channels -> 10

    Every conv is 3x3, ``channels`` filters, padding 1 (``SAME``), no bias; the
    pooling sits before its BatchNorm; ReLU opens the next conv block, so the
    last BatchNorm feeds the global average pool without a ReLU. No biases
    anywhere (BatchNorm's shift plays that role): 12,016 searched values with
    16 channels (11,664 conv weights, 160 dense weights, 192 BatchNorm scales
    and shifts). The first layer subtracts the training-set pixel mean (a
    :class:`InputMean` variable, 0 until the application sets it).

    ``blocks`` < 6 keeps the first ``blocks`` conv blocks (with their pooling) before the
    global average pool: the same kinds of layers in fewer searched leaves, for quick
    experiments and smoke runs (an RSO search compiles one branch per leaf).

    Example:
      >>> model = rso_paper(nnx.Rngs(0), channels=4)
      >>> model(jnp.zeros((2, 28, 28, 1))).shape
      (2, 10)
    """
    if not 1 <= blocks <= 6:
        raise ValueError(f"rso_paper: blocks must be 1 to 6, got {blocks}")
    layers: list = [SubtractMean()]
    c_in = 1
    for i in range(blocks):
        if i > 0:
            layers.append(nnx.relu)
        layers.append(_conv(c_in, channels, rngs=rngs, padding="SAME", use_bias=False))
        if i in (1, 3):
            layers.append(_avg_pool2)
        layers.append(nnx.BatchNorm(channels, rngs=rngs))
        c_in = channels
    layers += [_global_avg_pool, nnx.Linear(channels, 10, use_bias=False, rngs=rngs)]
    return nnx.Sequential(*layers)


class PatchEmbedding(nnx.Module):
    """Cut ``(n, 28, 28, 1)`` images into ``patch x patch`` tiles, project, add positions.

    The learned position table is stored as ``embedding`` (one row per patch),
    so the fan-in presets treat it like any embedding table: no fan-in axes.
    """

    def __init__(self, patch: int, dim: int, rngs: nnx.Rngs):
        if 28 % patch:
            raise ValueError(f"patch must divide 28, got {patch}")
        self.patch = patch
        self.proj = nnx.Linear(patch * patch, dim, rngs=rngs)
        positions = (28 // patch) ** 2
        self.embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (positions, dim)))

    def __call__(self, x: jax.Array) -> jax.Array:
        n, p = x.shape[0], self.patch
        tiles = x.reshape(n, 28 // p, p, 28 // p, p).transpose(0, 1, 3, 2, 4)
        return self.proj(tiles.reshape(n, -1, p * p)) + self.embedding[...]


class EncoderBlock(nnx.Module):
    """Pre-norm transformer block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=heads, in_features=dim, qkv_features=dim, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, mlp_dim, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))


def vit(
    rngs: nnx.Rngs, hidden: int = 32, depth: int = 2, heads: int = 4, patch: int = 7
) -> nnx.Sequential:
    """A small vision transformer: 16 patches of 7x7, ``depth`` blocks, mean-pooled head.

    Patch embedding (``49 -> hidden`` plus a learned position table), ``depth``
    pre-norm blocks of ``nnx.MultiHeadAttention`` (``heads`` heads; query, key
    and value kernels ``(hidden, heads, hidden / heads)``, output kernel
    ``(heads, hidden / heads, hidden)``) and a ``2 * hidden`` GELU MLP, a final
    LayerNorm, the mean over the patches and a dense layer to the logits. The
    defaults have about 20k parameters and train on a CPU in seconds per
    thousand images; ``hidden`` must be a multiple of ``heads``.
    """
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    return nnx.Sequential(
        PatchEmbedding(patch, hidden, rngs),
        *[EncoderBlock(hidden, heads, 2 * hidden, rngs) for _ in range(depth)],
        nnx.LayerNorm(hidden, rngs=rngs),
        functools.partial(jnp.mean, axis=1),
        nnx.Linear(hidden, 10, rngs=rngs),
    )


MODELS: dict[str, Callable[..., nnx.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "rso-paper": rso_paper,
    "vit": vit,
}
"""CLI name -> constructor ``f(rngs) -> nnx.Module``."""


def make_model(name: str, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """Build the model called ``name`` (one of :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](rngs, **kwargs)
