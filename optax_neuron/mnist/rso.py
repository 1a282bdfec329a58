"""The MNIST application's RSO loop and its adapters (model layers -> ``LayerStack``)."""

from __future__ import annotations

import functools
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
from optax_neuron.mnist.models import SubtractMean, _global_avg_pool
from optax_neuron.mnist.settings import FLAGS

__all__ = [
    "FRESH_BATCH",
    "RSO_LOSSES",
    "RSO_NORM_SIGMA",
    "RSO_WEIGHT_DECAY",
    "RSOSearch",
    "calibrate_batch_norm",
    "cross_entropy_sum64",
    "he_sigma",
    "official_anneal",
    "official_order",
    "rso_layers",
    "run_rso",
]


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


def _tiled_pool(fn: Callable) -> Callable | None:
    """``nnx.avg_pool`` / ``nnx.max_pool`` over non-overlapping windows (strides equal to the
    window, no padding) as strided slices combined pairwise, or ``None`` for any other pooling.

    The same numbers (on XLA:CPU, bit for bit: its reduce-window adds a 2x2 window pairwise)
    at a fraction of the time: slices fuse with the layers around them, where XLA:CPU runs
    a reduce-window as a call of its own, which is slow on one channel (the search's
    channel path: 0.63 against 0.06 ms for a 256x28x28x1 input, 0.77 against 0.31 ms with
    16 channels).
    """
    if not isinstance(fn, functools.partial):
        return None
    op = {nnx.avg_pool: jnp.add, nnx.max_pool: jnp.maximum}.get(fn.func)
    kw = dict(fn.keywords)
    window = tuple(kw.pop("window_shape", ()))
    strides = kw.pop("strides", None)
    if op is None or fn.args or len(window) != 2 or kw.pop("padding", "VALID") != "VALID":
        return None
    if kw.pop("count_include_pad", True) is not True or kw or tuple(strides or ()) != window:
        return None
    kh, kw_ = window

    def pool(h):
        h = h[:, : h.shape[1] - h.shape[1] % kh, : h.shape[2] - h.shape[2] % kw_]
        taps = [h[:, a::kh, b::kw_] for a in range(kh) for b in range(kw_)]
        while len(taps) > 1:
            taps = [op(*taps[i : i + 2]) if i + 1 < len(taps) else taps[i]
                    for i in range(0, len(taps), 2)]  # fmt: skip
        return taps[0] / (kh * kw_) if op is jnp.add else taps[0]

    return pool


def _is_channelwise(fn: Callable) -> bool:
    """ReLU and pooling act on every channel (last axis) alone; flattening does not."""
    pool = getattr(fn, "func", None) in (nnx.avg_pool, nnx.max_pool)
    return fn is nnx.relu or pool or fn is _global_avg_pool


def rso_layers(model: nnx.Sequential) -> list[Callable]:
    """The layers of a Sequential model as ``f(params, h)`` for :class:`optax_neuron.LayerStack`.

    ``params`` is ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``. Conv and
    Linear kernels become :func:`optax_neuron.conv_layer` /
    :func:`optax_neuron.dense_layer` (RSO's incremental fast path), followed by
    a bias layer where there is a bias; BatchNorm normalises with the batch's
    statistics; activations and pooling pass through. BatchNorm, biases, ReLU and
    pooling are declared :func:`optax_neuron.channelwise`, so a candidate of a
    kernel is carried as one channel to the next linear layer (RSO's incremental
    fast path).
    """
    layers: list[Callable] = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, nnx.Conv):
            strides = (
                layer.strides if isinstance(layer.strides, (tuple, list)) else (layer.strides or 1,)
            )
            if any(int(s) != 1 for s in strides) or layer.feature_group_count != 1:
                raise ValueError(f"rso_layers: layers/{i} is not a stride-1 ungrouped convolution")
            # XLA's own convolution: RSO only runs forward passes, where it is 7-14x faster
            # on CPU than the model's im2col ``patch_conv`` at batch 256 (14x14 and 28x28)
            layers.append(on.conv_layer(f"layers/{i}/kernel", padding=layer.padding))
        elif isinstance(layer, nnx.Linear):
            layers.append(on.dense_layer(f"layers/{i}/kernel"))
        elif isinstance(layer, nnx.BatchNorm):
            per_channel = [f"layers/{i}/scale", f"layers/{i}/bias"]
            layers.append(on.channelwise(_batch_norm(layer, i), per_channel=per_channel))
            continue
        elif isinstance(layer, SubtractMean):
            mean = layer.mean[...]  # a data constant, not searched
            layers.append(lambda p, h, mean=mean: h - mean)
            continue
        elif isinstance(layer, nnx.Module):
            raise ValueError(f"rso_layers: no RSO layer for {type(layer).__name__} at layers/{i}")
        elif _is_channelwise(layer):
            layers.append(on.channelwise(_stateless(_tiled_pool(layer) or layer)))
            continue
        else:
            layers.append(_stateless(layer))
            continue
        if getattr(layer, "bias", None) is not None:
            layers.append(on.channelwise(_add_bias(i), per_channel=[f"layers/{i}/bias"]))
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


def cross_entropy_sum64(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r"""The RSO official code's loss: the cross-entropy summed over the batch in float64.

    .. math::

        F = -\sum_{i=1}^{B} \log \operatorname{softmax}(z_i)_{y_i}

    with the logits ``z`` cast to float64 before the log-softmax, and the sum and the
    result in float64 (the official code casts the network's output to float64, takes
    ``log_softmax`` and sums). Where the float32 mean rounds the loss of a batch of
    5000 to about ``6e-8`` of its value, this resolves about ``1e-16``: candidates that
    differ by less than a float32 step are still ordered. It needs float64, so it must
    be traced with ``jax.enable_x64(True)`` (``RSOSearch(loss="sum64")`` traces its step
    so); without it, it raises instead of silently computing in float32.

    Example:
      >>> with jax.enable_x64(True):
      ...     loss = cross_entropy_sum64(jnp.zeros((4, 10)), jnp.arange(4))
      >>> loss.dtype, round(float(loss), 6)
      (dtype('float64'), 9.21034)
    """
    if not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "cross_entropy_sum64 needs float64: trace it inside jax.enable_x64(True) "
            "(RSOSearch(loss='sum64') does)"
        )
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float64), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.asarray(labels, jnp.int32)[:, None], axis=-1)
    return -jnp.sum(picked)


RSO_LOSSES = {"mean": _cross_entropy, "sum64": cross_entropy_sum64}
"""``--rso-loss`` choices: the float32 mean cross-entropy (default), or the official
code's float64 sum (:func:`cross_entropy_sum64`)."""


def _chunk_size(total: int, target: int) -> int:
    """The largest divisor of ``total`` not above ``target`` (whole calls per cycle)."""
    target = max(1, min(target, total))
    best = max(d for d in range(1, target + 1) if total % d == 0)
    return best if best * 4 >= target else total


RSO_NORM_SIGMA = 0.167
"""RSO step for BatchNorm scale and shift (the official code's 0.167; their std at init is 0)."""

RSO_WEIGHT_DECAY = FLAGS["rso_weight_decay"].default
"""Weight decay per visit of the official code: ``w <- w * (1 - 1e-4)`` before the candidates
(the default of ``--rso-weight-decay``)."""

FRESH_BATCH: tuple[str, ...] = FLAGS["rso_fresh_batch"].choices or ()
"""``--rso-fresh-batch`` choices: a fresh minibatch per chunk of weights, or per weight."""


def official_order(model: nnx.Sequential) -> list[str]:
    """The official visiting order of the leaves, as ``order=`` globs for :func:`optax_neuron.rso`.

    The last linear (dense) layer first, then every conv layer from last to
    first, each conv's kernel before the shift (``bias``) and then the scale of
    the BatchNorm that follows it; a layer that is neither is visited in reverse
    model order. For ``rso-paper``: ``layers/21/kernel, layers/18/kernel,
    layers/19/bias, layers/19/scale, layers/15/kernel, ...``.
    """
    groups: list[list[str]] = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, (nnx.Conv, nnx.Linear)):
            groups.append([f"layers/{i}/kernel", f"layers/{i}/bias"])
        elif isinstance(layer, nnx.BatchNorm) and groups:
            groups[-1] += [f"layers/{i}/bias", f"layers/{i}/scale"]
        elif isinstance(layer, nnx.BatchNorm):
            groups.append([f"layers/{i}/bias", f"layers/{i}/scale"])
    return [g for group in reversed(groups) for g in group] + ["*"]


def he_sigma(model: nnx.Sequential) -> list[tuple[str, float | str]]:
    """``sigma=`` rules: :data:`RSO_NORM_SIGMA` for BatchNorm scale and shift, else the He std.

    ``"he"`` is :func:`optax_neuron.rso`'s ``sqrt(2 / fan_in)`` from the leaf's fan-in axes.
    """
    rules: list[tuple[str, float | str]] = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, nnx.BatchNorm):
            rules += [(f"layers/{i}/scale", RSO_NORM_SIGMA), (f"layers/{i}/bias", RSO_NORM_SIGMA)]
    return [*rules, ("*", "he")]


def official_anneal(cycles: int) -> Callable:
    """The official step schedule ``0.1 + 0.9 (T - c) / T`` for cycle ``c = 0..T-1``.

    Computed in float32 also where float64 is enabled (``loss="sum64"``), so both losses
    draw the same steps.
    """
    t = max(int(cycles), 1)
    return lambda c: 0.1 + 0.9 * (t - jnp.asarray(c, jnp.float32)) / t


class RSOSearch:
    """The application's RSO search over one model: the recipe, one jitted chunk step, whole cycles.

    The recipe (the official code's, see DESIGN.md): He initialisation
    (:func:`optax_neuron.rso_init`), He step per kernel and 0.167 for BatchNorm
    scale and shift (:func:`he_sigma`), annealed by :func:`official_anneal` over
    ``cycles``, the official leaf order (:func:`official_order`), neuron by
    neuron inside a leaf (``within="neuron"``), weight decay ``weight_decay`` per
    visit (default :data:`RSO_WEIGHT_DECAY`, the official 1e-4). Data:
    ``fresh_batch="chunk"`` scores the ``chunk`` weights of one call on the next
    minibatch of a per-cycle shuffle of the training set (the loss is a
    :class:`optax_neuron.LayerStack`, RSO's incremental fast path);
    ``"weight"`` gives every weight its own ``batch`` rows (drawn with replacement
    from its key) of its layer's input over the whole training set, computed once
    per leaf (``LayerStack(..., batch=)`` with ``per_weight_batch``: the official
    code's scheme; the layers before the searched one use the statistics of the
    whole training set where the official code uses those of 2,000 images).
    Loss: ``loss="mean"``, the float32 mean cross-entropy of the minibatch, or
    ``"sum64"``, the official code's float64 sum (:func:`cross_entropy_sum64`): the
    step is then traced and run with ``jax.enable_x64(True)``, so the search compares
    and carries the losses in float64; the network, the parameters and the state stay
    float32 (every other operation keeps its dtype: the parameters the two losses
    reach differ only where the losses order the candidates differently).

    Example:
      >>> import numpy as np
      >>> from flax import nnx
      >>> from optax_neuron.mnist.models import make_model
      >>> model = make_model("rso-paper", nnx.Rngs(0), channels=2)  # the paper net, 2 channels
      >>> x_train, y_train = np.zeros((64, 28, 28, 1), np.float32), np.zeros(64, np.int32)
      >>> search = RSOSearch(model, x_train, y_train, batch=32, cycles=5)
      >>> search.total  # the weights a cycle visits, each once
      242
      >>> params, state = search.cycle(search.params, search.state, 0)  # doctest: +SKIP
    """

    def __init__(
        self,
        model,
        x_train,
        y_train,
        *,
        batch: int,
        cycles: int,
        chunk: int = 1000,
        fresh_batch: str = "chunk",
        seed: int = 0,
        fast_path: str = "incremental",
        loss: str = "mean",
        weight_decay: float = RSO_WEIGHT_DECAY,
    ):
        if fresh_batch not in FRESH_BATCH:
            raise ValueError(f"rso fresh batch must be one of {FRESH_BATCH}, got {fresh_batch!r}")
        if loss not in RSO_LOSSES:
            raise ValueError(f"rso loss must be one of {tuple(RSO_LOSSES)}, got {loss!r}")
        self.loss = loss
        self.n = int(x_train.shape[0])
        self.batch = min(batch, self.n)
        self.seed = seed
        self.fresh_batch = fresh_batch
        if isinstance(model.layers[0], SubtractMean):
            model.layers[0].mean[...] = jnp.mean(x_train)
        self.layers = rso_layers(model)
        split: Any = nnx.split(model, nnx.Param, ...)
        self.graphdef, self.param_state, self.rest = split
        self.params = on.rso_init(jax.random.PRNGKey(seed), nnx.to_pure_dict(self.param_state))
        kwargs: dict[str, Any] = {
            "seed": seed,
            "sigma": he_sigma(model),
            "anneal": official_anneal(cycles),
            "order": official_order(model),
            "within": "neuron",
            "weight_decay": weight_decay,
            "fast_path": fast_path,
        }
        # the state does not depend on weights_per_step: init once, then size the chunks
        self.state = on.rso(**kwargs).init(self.params)
        self.total = _searched_count(self.state, self.params)
        self.chunk = _chunk_size(self.total, chunk)
        self.calls = self.total // self.chunk
        self.tx = on.rso(
            weights_per_step=self.chunk, per_weight_batch=fresh_batch == "weight", **kwargs
        )
        jitted = jax.jit(self._chunk_step)
        self._step = _with_x64(jitted) if loss == "sum64" else jitted

    def _chunk_step(self, params, opt_state, x_train, y_train, perm, call):
        if self.fresh_batch == "chunk":  # the next minibatch of the cycle's shuffle
            idx = perm[(call * self.batch + jnp.arange(self.batch)) % self.n]
            value_fn = on.LayerStack(self.layers, RSO_LOSSES[self.loss], x_train[idx], y_train[idx])
        else:  # every weight: its own rows of its layer's input over the training set
            value_fn = on.LayerStack(
                self.layers, RSO_LOSSES[self.loss], x_train, y_train, batch=self.batch
            )
        updates, opt_state = self.tx.update(params, opt_state, params, value_fn=value_fn)
        return optax.apply_updates(params, updates), opt_state

    def cycle(self, params, opt_state, cycle: int, x_train, y_train, bar=None):
        """Search every weight once (cycle number ``cycle``); returns ``(params, opt_state)``."""
        perm = jax.random.permutation(
            jax.random.fold_in(jax.random.PRNGKey(self.seed + 1), cycle), self.n
        )
        for c in range(self.calls):
            params, opt_state = self._step(params, opt_state, x_train, y_train, perm, c)
            if bar is not None:
                bar.update(1)
                mean = float(opt_state.rso_loss) / (self.batch if self.loss == "sum64" else 1)
                bar.set_postfix(loss=f"{mean:.4f}")
        return params, opt_state

    def to_model(self, params, x_train):
        """The model with ``params``, its BatchNorm statistics set from 2000 training images."""
        nnx.replace_by_pure_dict(self.param_state, params)
        m = nnx.merge(self.graphdef, self.param_state, self.rest)
        if any(isinstance(layer, nnx.BatchNorm) for layer in m.layers):
            calibrate_batch_norm(m, x_train[: min(self.n, 2000)])
        return m


def _with_x64(jitted: Callable) -> Callable:
    """``jitted`` traced and called with ``jax.enable_x64(True)``; ``.lower``/export: the same."""

    def step(*args):
        with jax.enable_x64(True):
            return jitted(*args)

    step.jitted = jitted  # type: ignore[attr-defined]
    return step


def _searched_count(state: Any, params: Any) -> int:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    sizes = {on.fan_in.path_str(p): int(np.size(x)) for p, x in leaves}
    return sum(sizes[k] for k in state.rso_sigma)


def run_rso(config, data, model, x_train, y_train, *, writer, progress, log):
    """RSO: ``config.epochs`` cycles over every searched weight (:class:`RSOSearch`)."""
    n = x_train.shape[0]
    cycles = config.epochs
    search = RSOSearch(
        model,
        x_train,
        y_train,
        batch=config.rso_batch_size,
        cycles=cycles,
        chunk=config.rso_chunk,
        fresh_batch=config.rso_fresh_batch,
        seed=config.seed,
        loss=config.rso_loss,
        weight_decay=config.rso_weight_decay,
    )
    params, opt_state = search.params, search.state
    batch, total, chunk = search.batch, search.total, search.chunk

    def train(state, cycle):
        bar = progress_bar(
            range(search.calls),
            f"rso cycle {cycle + 1}/{cycles}",
            progress,
            unit="w",
            unit_scale=chunk,
        )
        params, opt_state = search.cycle(
            state["params"], state["rso"], cycle, x_train, y_train, bar
        )
        bar.close()
        loss = float(opt_state.rso_loss) / (batch if search.loss == "sum64" else 1)
        return {"params": params, "rso": opt_state}, {"train_loss": loss}  # a mean either way

    def measure(state):
        model = search.to_model(state["params"], x_train)
        _, train_accuracy = evaluate(
            model, x_train[:batch], y_train[:batch], config.eval_batch_size
        )
        record = {
            "train_accuracy": train_accuracy,
            **evaluate_splits(model, data, config.eval_batch_size),
        }
        record["rso_accepted"] = {k: int(v) for k, v in state["rso"].rso_accepted.items()}
        record["rso_weights"] = total
        return record

    settings = run_settings(config, data, tensorboard=writer is not None)
    state, history = run_epochs(
        {"params": params, "rso": opt_state},
        epochs=cycles,
        settings=settings,
        train=train,
        measure=measure,
        checkpoint=config.checkpoint,
        resume=config.resume,
        stop_after=config.stop_after,
        writer=writer,
        progress=progress,
        log=log,
        name="rso",
        unit="cycle",
    )
    return summary(config, n, history, search.to_model(state["params"], x_train), data)
