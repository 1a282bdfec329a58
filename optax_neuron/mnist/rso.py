"""The MNIST application's RSO loop and its adapters (model layers -> ``LayerStack``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_neuron as on
from optax_neuron.mnist.loop import (
    evaluate,
    evaluate_splits,
    progress_bar,
    run_epochs,
    run_settings,
    summary,
)
from optax_neuron.mnist.models import patch_conv

__all__ = ["RSO_NORM_SIGMA", "calibrate_batch_norm", "rso_layers", "run_rso"]


def _batch_norm(layer: nnx.BatchNorm, i: int) -> Callable:
    """BatchNorm with the statistics of the batch (RSO's loss), params at ``layers/i``."""

    def f(p, h):
        q = p["layers"][i]
        mean = jnp.mean(h, axis=(0, 1, 2))
        var = jnp.var(h, axis=(0, 1, 2))
        return (h - mean) * jax.lax.rsqrt(var + layer.epsilon) * q["scale"] + q["bias"]

    return f


def _add_bias(i: int) -> Callable:
    return lambda p, h: h + p["layers"][i]["bias"]


def _stateless(fn: Callable) -> Callable:
    return lambda p, h: fn(h)


def rso_layers(model: nnx.Sequential) -> list[Callable]:
    """The layers of a Sequential model as ``f(params, h)`` functions for :class:`optax_neuron.LayerStack`.

    ``params`` is ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``. Conv and
    Linear kernels become :func:`optax_neuron.conv_layer` /
    :func:`optax_neuron.dense_layer` (RSO's incremental fast path), followed by
    a bias layer where there is a bias; BatchNorm normalises with the batch's
    statistics; activations and pooling pass through.
    """
    layers: list[Callable] = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, nnx.Conv):
            strides = layer.strides if isinstance(layer.strides, (tuple, list)) else (layer.strides or 1,)
            if any(int(s) != 1 for s in strides) or layer.feature_group_count != 1:
                raise ValueError(f"rso_layers: layers/{i} is not a stride-1 ungrouped convolution")
            layers.append(on.conv_layer(f"layers/{i}/kernel", padding=layer.padding, conv_fn=patch_conv))
        elif isinstance(layer, nnx.Linear):
            layers.append(on.dense_layer(f"layers/{i}/kernel"))
        elif isinstance(layer, nnx.BatchNorm):
            layers.append(_batch_norm(layer, i))
            continue
        elif isinstance(layer, nnx.Module):
            raise ValueError(f"rso_layers: no RSO layer for {type(layer).__name__} at layers/{i}")
        else:
            layers.append(_stateless(layer))
            continue
        if getattr(layer, "bias", None) is not None:
            layers.append(_add_bias(i))
    return layers


def calibrate_batch_norm(model: nnx.Sequential, images: jax.Array) -> None:
    """Set every BatchNorm's running mean/variance to the statistics of ``images``.

    RSO trains with batch statistics and never updates the running averages;
    this makes eval mode use statistics of a large training batch instead.
    """
    h = images
    for layer in model.layers:
        if isinstance(layer, nnx.BatchNorm):
            layer.mean[...] = jnp.mean(h, axis=(0, 1, 2))
            layer.var[...] = jnp.var(h, axis=(0, 1, 2))
            h = layer(h, use_running_average=True)
        else:
            h = layer(h)


def _cross_entropy(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _searched_count(state: Any, params: Any) -> int:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    sizes = {on.fan_in.path_str(p): int(np.size(x)) for p, x in leaves}
    return sum(sizes[k] for k in state.rso_sigma)


def _chunk_size(total: int, target: int) -> int:
    """The largest divisor of ``total`` not above ``target`` (whole calls per cycle)."""
    target = max(1, min(target, total))
    best = max(d for d in range(1, target + 1) if total % d == 0)
    return best if best * 4 >= target else total


RSO_NORM_SIGMA = 0.1
"""RSO step for BatchNorm scale and shift (their std at init is 0)."""


def run_rso(config, data, model, x_train, y_train, *, writer, progress, log):
    """RSO: ``config.epochs`` cycles over every searched weight, minibatch per call."""
    n = x_train.shape[0]
    batch = min(config.rso_batch_size, n)
    layers = rso_layers(model)
    graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
    params = on.rso_init(jax.random.PRNGKey(config.seed), nnx.to_pure_dict(param_state))
    cycles = config.epochs
    anneal = optax.linear_schedule(1.0, 0.1, max(cycles, 1))
    # BatchNorm scale and shift start constant (std 0): give them a fixed step.
    sigma = [("*scale", RSO_NORM_SIGMA), ("*bias", RSO_NORM_SIGMA), ("*", None)]
    probe = on.rso(seed=config.seed, sigma=sigma).init(params)
    total = _searched_count(probe, params)
    chunk = _chunk_size(total, config.rso_chunk)
    calls = total // chunk
    tx = on.rso(seed=config.seed, weights_per_step=chunk, anneal=anneal, sigma=sigma)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, call):
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), call)
        idx = jax.random.choice(key, n, (batch,), replace=False)
        value_fn = on.LayerStack(layers, _cross_entropy, x_train[idx], y_train[idx])
        updates, opt_state = tx.update(params, opt_state, params, value_fn=value_fn)
        return optax.apply_updates(params, updates), opt_state

    def to_model(params):
        nnx.replace_by_pure_dict(param_state, params)
        m = nnx.merge(graphdef, param_state, rest)
        if any(isinstance(l, nnx.BatchNorm) for l in m.layers):
            calib = jax.random.choice(jax.random.PRNGKey(config.seed + 2), n, (batch,), replace=False)
            calibrate_batch_norm(m, x_train[calib])
        return m

    def train(state, cycle):
        params, opt_state = state["params"], state["rso"]
        bar = progress_bar(range(calls), f"rso cycle {cycle + 1}/{cycles}", progress, unit="w", unit_scale=chunk)
        for c in bar:
            params, opt_state = step(params, opt_state, cycle * calls + c)
            bar.set_postfix(loss=f"{float(opt_state.rso_loss):.4f}")
        return {"params": params, "rso": opt_state}, {"train_loss": float(opt_state.rso_loss)}

    def measure(state):
        model = to_model(state["params"])
        _, train_accuracy = evaluate(model, x_train[:batch], y_train[:batch], config.eval_batch_size)
        record = {"train_accuracy": train_accuracy, **evaluate_splits(model, data, config.eval_batch_size)}
        record["rso_accepted"] = {k: int(v) for k, v in state["rso"].rso_accepted.items()}
        record["rso_weights"] = total
        return record

    settings = run_settings(config, data, tensorboard=writer is not None)
    state, history = run_epochs(
        {"params": params, "rso": opt_state}, epochs=cycles, settings=settings, train=train,
        measure=measure, checkpoint=config.checkpoint, resume=config.resume,
        stop_after=config.stop_after, writer=writer, progress=progress, log=log, name="rso",
        unit="cycle",
    )  # fmt: skip
    return summary(config, n, history, to_model(state["params"]), data)
