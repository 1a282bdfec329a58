"""The small nets the RSO tests search (one home): BatchNorm with batch statistics, a
stride-1 SAME convolution and the conv net of the official layout in small.

The net: ``conv0 -> BN0 -> ReLU -> conv1 -> BN1 -> global average pool -> head`` (3x3
convolutions, HWIO kernels, no conv bias), written twice: as plain stages
(:func:`small_cnn_stages`, for replays and black-box losses) and as the package's layer
stack (:func:`small_cnn_layers`: ``conv_layer``, ``channelwise`` and ``dense_layer``).

:func:`small_paper_model` is the application's ``rso-paper`` layout cut to two conv blocks
(an ``nnx.Sequential`` for :class:`optax_neuron.mnist.rso.RSOSearch`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optax_neuron import channelwise, conv_layer, dense_layer, rso_init


def batch_norm(h, scale, bias, eps=1e-5):
    """BatchNorm with the statistics of the batch ``h`` (over every axis but the channel)."""
    axes = tuple(range(h.ndim - 1))
    mean, var = h.mean(axis=axes), h.var(axis=axes)
    return (h - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def conv(h, kernel):
    """Stride-1 SAME convolution of NHWC ``h`` with an HWIO ``kernel``."""
    return jax.lax.conv_general_dilated(
        h, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def ce(logits, y):
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def bn_layer(name):
    """The BatchNorm of module ``name`` as a channel-wise layer of a ``LayerStack``."""
    return channelwise(
        lambda p, h: batch_norm(h, p[name]["scale"], p[name]["bias"]),
        per_channel=[f"{name}/scale", f"{name}/bias"],
    )


def small_cnn_params(key, ch=3, classes=4, head_bias=False):
    """He-initialised (``rso_init``) parameters of the small net; norms at scale 1, shift 0."""
    params = {
        "conv0": {"kernel": jnp.zeros((3, 3, 1, ch))},
        "bn0": {"scale": jnp.ones(ch), "bias": jnp.zeros(ch)},
        "conv1": {"kernel": jnp.zeros((3, 3, ch, ch))},
        "bn1": {"scale": jnp.ones(ch), "bias": jnp.zeros(ch)},
        "head": {"kernel": jnp.zeros((ch, classes))},
    }
    if head_bias:
        params["head"]["bias"] = jnp.zeros(classes)
    return rso_init(key, params)


def small_cnn_stages():
    """The net as plain functions ``f(params, h)``, one per stage (7 stages)."""
    return [
        lambda p, h: conv(h, p["conv0"]["kernel"]),
        lambda p, h: batch_norm(h, p["bn0"]["scale"], p["bn0"]["bias"]),
        lambda p, h: jax.nn.relu(h),
        lambda p, h: conv(h, p["conv1"]["kernel"]),
        lambda p, h: batch_norm(h, p["bn1"]["scale"], p["bn1"]["bias"]),
        lambda p, h: h.mean(axis=(1, 2)),
        lambda p, h: h @ p["head"]["kernel"],
    ]


def small_cnn_layers():
    """The same stages as the package's layers (the incremental fast path)."""
    return [
        conv_layer("conv0/kernel"),
        bn_layer("bn0"),
        channelwise(lambda p, h: jax.nn.relu(h)),
        conv_layer("conv1/kernel"),
        bn_layer("bn1"),
        channelwise(lambda p, h: h.mean(axis=(1, 2))),
        dense_layer("head/kernel"),
    ]


def small_cnn_loss(x, y, reduce="mean"):
    """The black-box loss of the net on ``(x, y)``: cross-entropy, ``"mean"`` or ``"sum"``."""

    def loss(params):
        h = x
        for f in small_cnn_stages():
            h = f(params, h)
        per_example = optax.softmax_cross_entropy_with_integer_labels(h, y)
        return per_example.sum() if reduce == "sum" else per_example.mean()

    return loss


def paper_search_as_shapes(monkeypatch, x, y, **kwargs):
    """The application's ``RSOSearch`` on ``rso-paper`` (2 channels) for lowering and tracing.

    Tracing sees shapes only: the model is built as shapes and filled with zeros, and
    ``rso_init`` (eager draws that compile for seconds) is made to keep them.
    """
    import numpy as np
    from flax import nnx

    import optax_neuron as on
    from optax_neuron.mnist.models import rso_paper
    from optax_neuron.mnist.rso import RSOSearch

    graphdef, state = nnx.split(nnx.eval_shape(lambda: rso_paper(nnx.Rngs(0), channels=2)))
    state = jax.tree.map(lambda a: jnp.asarray(np.zeros(a.shape, a.dtype)), state)
    monkeypatch.setattr(on, "rso_init", lambda key, params: params)
    return RSOSearch(nnx.merge(graphdef, state), x, y, **kwargs)


def small_paper_model(channels=2):
    """The ``rso-paper`` layout with two conv blocks instead of six, in training mode.

    ``x - mean -> conv0 -> BN0 -> ReLU -> conv1 -> avgpool 2x2 -> BN1 -> global average pool
    -> dense channels -> 10``, built from the application's own layers (3x3 SAME convs
    without bias, BatchNorm, its pooling functions), so :func:`optax_neuron.mnist.rso.rso_layers`
    sees every kind of layer of the paper net: 7 searched leaves instead of 19, which
    keeps the compiled search small. Any image side divisible by 2 works.
    """
    from flax import nnx

    from optax_neuron.mnist.models import SubtractMean, _avg_pool2, _conv, _global_avg_pool

    rngs = nnx.Rngs(0)
    conv_kw = {"rngs": rngs, "padding": "SAME", "use_bias": False}  # as rso_paper's convs
    model = nnx.Sequential(
        SubtractMean(),
        _conv(1, channels, **conv_kw),
        nnx.BatchNorm(channels, rngs=rngs),
        nnx.relu,
        _conv(channels, channels, **conv_kw),
        _avg_pool2,
        nnx.BatchNorm(channels, rngs=rngs),
        _global_avg_pool,
        nnx.Linear(channels, 10, use_bias=False, rngs=rngs),
    )
    model.train()
    return model
