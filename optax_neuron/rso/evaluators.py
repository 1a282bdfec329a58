"""Evaluators: the loss of one candidate, behind one interface.

An evaluator serves one searched leaf (a *segment*) and has three methods:

* ``start(params) -> cache``: once per segment (the activations it reuses);
* ``loss(params, cache, change) -> F``: the loss of ``params`` (the candidate applied),
  where ``change`` says which element moved and by how much;
* ``commit(params, cache, change, apply) -> cache``: the cache after the chosen value
  (``change`` from the value before the visit) is kept, where ``apply``.

:class:`BlackBox` calls ``value_fn``. :class:`CachedStack` re-runs a
:class:`LayerStack` from the layer owning the leaf. :class:`Incremental` (the owner is
a :class:`LinearLayer`) adds the change to the cached output as one column and, through
:func:`channelwise` layers, carries the one changed channel to the next
:class:`LinearLayer`, whose output gets one input-channel slice of its kernel; only the
layers after it run in full.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_neuron.rso.layers import ChannelwiseLayer, LayerStack, LinearLayer


class Change(NamedTuple):
    """One element of the searched leaf moved: flat (row-major) ``flat_index``, by ``delta``."""

    flat_index: jax.Array
    delta: jax.Array  # float32
    key: jax.Array  # the weight's k_batch


class BlackBox:
    """``value_fn(params)`` (or ``value_fn(params, k_batch)`` with a fresh batch per weight)."""

    def __init__(self, value_fn, per_weight_batch: bool):
        self.value_fn, self.per_weight_batch = value_fn, per_weight_batch

    def start(self, params):
        return ()

    def loss(self, params, cache, change):
        return self.value_fn(params, change.key) if self.per_weight_batch else self.value_fn(params)

    def commit(self, params, cache, change, apply):
        return cache


class CachedStack:
    """Re-run ``stack`` from layer ``k`` (the owner) on its cached input: the black-box loss."""

    def __init__(self, stack: LayerStack, k: int):
        self.stack, self.k = stack, k

    def start(self, params):  # only what the segment reads: the owner's input
        return (self.stack.activations(params)[0][self.k],)

    def loss(self, params, cache, change):
        return self.stack.from_layer(self.k, params, cache[0])

    def commit(self, params, cache, change, apply):
        return cache


def _set_channel(x, channel, value):
    return jax.lax.dynamic_update_index_in_dim(x, value.astype(x.dtype), channel, axis=x.ndim - 1)


def _channel(x, channel):
    return jax.lax.dynamic_index_in_dim(x, channel, axis=x.ndim - 1, keepdims=True)


class Incremental:
    """Layer ``k`` is a :class:`LinearLayer` whose kernel (shape ``kshape``) is searched.

    The candidate changes output channel ``o`` of layer ``k`` by ``delta * column``.
    Layers ``k+1 .. m-1`` are channel-wise: only channel ``o`` is carried through
    them. Layer ``m`` (the first that is not channel-wise): a :class:`LinearLayer` gets
    ``A(W_m[..., o:o+1, :], change of channel o)`` added to its cached output and the
    layers after it re-run; any other layer re-runs from its cached input with channel
    ``o`` replaced. The result differs from the black-box loss by float rounding only.
    """

    def __init__(self, stack: LayerStack, k: int, kshape: tuple[int, ...]):
        self.stack, self.k, self.kshape = stack, k, kshape
        m = k + 1
        while m < len(stack.layers) and isinstance(stack.layers[m], ChannelwiseLayer):
            m += 1
        self.m = m
        self.linear_m = m < len(stack.layers) and isinstance(stack.layers[m], LinearLayer)

    def start(self, params):
        """The activations entering layers ``k .. m+1`` (only what the segment reads: a
        smaller loop carry, and no copy of unrelated activations per weight)."""
        return tuple(self.stack.activations(params)[0][self.k : self.m + 2])

    def _channels(self, params, cache, change):
        """(channel o, its new values after each of layers k .. m-1)."""
        layers: Any = self.stack.layers
        k = self.k
        o, col = layers[k].column(cache[0], self.kshape, change.flat_index)
        h = _channel(cache[1], o) + change.delta.astype(cache[1].dtype) * col
        chans = [h]
        for layer in layers[k + 1 : self.m]:
            h = layer.one_channel(params, h, o)
            chans.append(h)
        return o, chans

    def loss(self, params, cache, change):
        k, m = self.k, self.m
        if m == k + 1 and not self.linear_m:  # nothing channel-wise after: one added column
            out = self.stack.layers[k].add_column(
                cache[1], cache[0], self.kshape, change.flat_index, change.delta
            )
            return self.stack.from_layer(k + 1, params, out)
        o, chans = self._channels(params, cache, change)
        if self.linear_m:
            d = chans[-1] - _channel(cache[m - k], o)
            out_m = self.stack.layers[m].add_input_channel(params, cache[m + 1 - k], d, o)
            return self.stack.from_layer(m + 1, params, out_m)
        return self.stack.from_layer(m, params, _set_channel(cache[m - k], o, chans[-1]))

    def commit(self, params, cache, change, apply):
        """Write the moved channel where ``apply``; slice-sized selects, no full-width copy."""
        k, m = self.k, self.m
        o, chans = self._channels(params, cache, change)
        cache = list(cache)
        if self.linear_m:  # add the channel's change only where applied (else exact zeros)
            d = jnp.where(apply, chans[-1] - _channel(cache[m - k], o), 0.0)
            out = cache[m + 1 - k]
            cache[m + 1 - k] = self.stack.layers[m].add_input_channel(params, out, d, o)
        for j, h in enumerate(chans):
            x = cache[1 + j]
            cache[1 + j] = _set_channel(x, o, jnp.where(apply, h, _channel(x, o)))
        return tuple(cache)


def make_evaluator(
    value_fn: Any,
    per_weight_batch: bool,
    fast_path: str,
    k: int | None,
    kshape: tuple[int, ...] | None,
):
    """The evaluator of a segment owned by layer ``k`` (``None``: black box)."""
    if k is None:
        return BlackBox(value_fn, per_weight_batch)
    layer = value_fn.layers[k]
    if fast_path == "incremental" and isinstance(layer, LinearLayer) and kshape is not None:
        return Incremental(value_fn, k, kshape)
    return CachedStack(value_fn, k)
