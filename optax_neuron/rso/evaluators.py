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
layers after it run in full. :class:`Sampled` (a :class:`LayerStack` with ``batch=``
and a fresh minibatch per weight) scores every weight on its own rows of the owner's
input over the whole data set.
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


def _materialised(fn, x):
    """``fn()``, computed into buffers of its own: both branches of a ``lax.cond`` on a
    predicate XLA cannot fold (``x == x``; both branches are ``fn``, so the result never
    depends on it). XLA then cannot duplicate ``fn``'s computation into later fusions
    (``optimization_barrier`` does not stop that on CPU), so every read of its operands
    ends before they are updated in place."""
    return jax.lax.cond(x == x, fn, fn)


def _cm_channel(x_cm, channel):
    """Channel ``channel`` of a channel-major array, as ``(N, ..., 1)``."""
    return jax.lax.dynamic_index_in_dim(x_cm, channel, axis=0, keepdims=False)[..., None]


def _cm_set(x_cm, channel, value):
    """``x_cm`` with channel ``channel`` replaced by ``value`` ``(N, ..., 1)``."""
    return jax.lax.dynamic_update_index_in_dim(x_cm, value[..., 0].astype(x_cm.dtype), channel, 0)


class Incremental:
    """Layer ``k`` is a :class:`LinearLayer` whose kernel (shape ``kshape``) is searched.

    The candidate changes output channel ``o`` of layer ``k`` by ``delta * column``.
    Layers ``k+1 .. m-1`` are channel-wise: only channel ``o`` is carried through
    them. Layer ``m`` (the first that is not channel-wise): a :class:`LinearLayer` gets
    ``A(W_m[..., o:o+1, :], change of channel o)`` added to its cached output and the
    layers after it re-run; any other layer re-runs from its cached input with channel
    ``o`` replaced. The result differs from the black-box loss by float rounding only.

    When layer ``m`` is linear (the fast case) the cache holds four activations, the
    inputs of layers ``k, k+1, m`` stored channel-major (one channel is one
    contiguous block) and the output of layer ``m`` as the stack has it;
    :meth:`scores` evaluates all candidates of a weight in one call and returns
    what :meth:`commit_scored` needs to keep one of them without recomputing it.
    """

    def __init__(self, stack: LayerStack, k: int, kshape: tuple[int, ...]):
        self.stack, self.k, self.kshape = stack, k, kshape
        m = k + 1
        while m < len(stack.layers) and isinstance(stack.layers[m], ChannelwiseLayer):
            m += 1
        self.m = m
        self.linear_m = m < len(stack.layers) and isinstance(stack.layers[m], LinearLayer)
        self.batched = self.linear_m
        # the layers whose input the cache holds (the last: the output of layer m)
        if not self.linear_m:
            self.cached: tuple[int, ...] = tuple(range(k, m + 2))
        else:
            self.cached = (k, k + 1, m, m + 1) if m > k + 1 else (k, k + 1, m + 1)

    def start(self, params):
        """The cached activations (only what the segment reads: a small loop carry)."""
        acts = self.stack.activations(params)[0]
        if not self.linear_m:
            return tuple(acts[self.k : self.m + 2])
        return (*(jnp.moveaxis(acts[i], -1, 0) for i in self.cached[:-1]), acts[self.m + 1])

    def view(self, cache) -> dict[int, jax.Array]:
        """``{layer i: its cached input}`` in the stack's layout (for tests and debugging)."""
        if not self.linear_m:
            return dict(zip(self.cached, cache, strict=True))
        out = {i: jnp.moveaxis(x, 0, -1) for i, x in zip(self.cached[:-1], cache, strict=False)}
        return {**out, self.m + 1: cache[-1]}

    # -- the general case: layer m is not linear (or the change ends at the loss) ---------

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

    # -- the fast case: layer m is linear ---------------------------------------------------

    def _path(self, params, cache, index, delta):
        """(o, new channel o of layer k's output, of layer m's input, its change ``d``)."""
        layers: Any = self.stack.layers
        o, col = layers[self.k].column_cm(cache[0], self.kshape, index)
        new_k = _cm_channel(cache[1], o) + delta.astype(cache[1].dtype) * col
        h = new_k
        for layer in layers[self.k + 1 : self.m]:
            h = layer.one_channel(params, h, o)
        return o, new_k, h, h - _cm_channel(cache[-2], o)

    def scores(self, params, cache, index, deltas, key):
        """The losses of the candidates ``W.flat[index] += deltas[c]``, in one call.

        Returns ``(losses, aux)``; ``aux`` (per candidate) is what
        :meth:`commit_scored` writes. Only in the fast case (``self.batched``).
        """
        layers: Any = self.stack.layers
        o = index % self.kshape[-1]  # the output channel (last kernel axis) of the element
        # the one-channel paths first, materialised (small): otherwise XLA recomputes them
        # inside every consumer fusion, and reads of the cache after its in-place update
        # force it to copy the cached activations on every weight
        aux = _materialised(
            lambda: jax.vmap(lambda delta: self._path(params, cache, index, delta)[1:])(deltas),
            deltas[0],
        )

        def one(d):
            out = layers[self.m].add_input_channel(params, cache[-1], d, o)
            return self.stack.from_layer(self.m + 1, params, out)

        # the full layers once per candidate (a static unroll: on CPU a vmap over the
        # candidates was measured slower, 17.2 against 14.9 ms for three on the paper net)
        return jnp.stack([one(aux[2][c]) for c in range(deltas.shape[0])]), aux

    def commit_scored(self, params, cache, index, aux, apply):
        """The cache after the candidate whose ``aux`` (from :meth:`scores`) is kept."""
        layers: Any = self.stack.layers
        new_k, new_m, d = aux
        o = index % self.kshape[-1]  # the output channel (last kernel axis) of the element
        cache = list(cache)
        cache[1] = _cm_set(cache[1], o, jnp.where(apply, new_k, _cm_channel(cache[1], o)))
        if self.m > self.k + 1:
            cache[-2] = _cm_set(cache[-2], o, jnp.where(apply, new_m, _cm_channel(cache[-2], o)))
        # the channel's change only where applied (else exact zeros)
        cache[-1] = layers[self.m].add_input_channel(params, cache[-1], jnp.where(apply, d, 0.0), o)
        return tuple(cache)

    # -- the evaluator interface --------------------------------------------------------------

    def loss(self, params, cache, change):
        k, m = self.k, self.m
        if self.linear_m:
            deltas = change.delta[None]
            return self.scores(params, cache, change.flat_index, deltas, change.key)[0][0]
        if m == k + 1:  # nothing channel-wise after: one added column
            out = self.stack.layers[k].add_column(
                cache[1], cache[0], self.kshape, change.flat_index, change.delta
            )
            return self.stack.from_layer(k + 1, params, out)
        o, chans = self._channels(params, cache, change)
        return self.stack.from_layer(m, params, _set_channel(cache[m - k], o, chans[-1]))

    def commit(self, params, cache, change, apply):
        """Write the moved channel where ``apply``; slice-sized selects, no full-width copy."""
        if self.linear_m:
            _, new_k, new_m, d = self._path(params, cache, change.flat_index, change.delta)
            return self.commit_scored(params, cache, change.flat_index, (new_k, new_m, d), apply)
        o, chans = self._channels(params, cache, change)
        cache = list(cache)
        for j, h in enumerate(chans):
            x = cache[1 + j]
            cache[1 + j] = _set_channel(x, o, jnp.where(apply, h, _channel(x, o)))
        return tuple(cache)


class Sampled:
    """A fresh minibatch per weight from the cached input of layer ``k`` (``stack.batch`` rows).

    ``start`` computes the input of layer ``k`` over the whole data set (the stack's
    ``inputs``), once per segment: the layers before ``k`` do not change while a leaf
    of layer ``k`` is searched. Every weight draws its rows from its batch key
    (:meth:`LayerStack.rows`) and scores its candidates on them from layer ``k`` on.
    With ``incremental`` and a :class:`LinearLayer` owner whose next non-channel-wise
    layer is linear, the rows run once through layers ``k .. m`` and the candidates
    share that (:class:`Incremental` on the rows); otherwise every candidate runs
    the layers from ``k``. Nothing is carried from weight to weight but the input.
    """

    def __init__(self, stack: LayerStack, k: int, kshape: tuple[int, ...] | None, incremental):
        self.stack, self.k, self.kshape = stack, k, kshape
        self.batched = False
        if incremental and kshape is not None and isinstance(stack.layers[k], LinearLayer):
            tail = LayerStack(stack.layers[k:], stack.loss, None)
            self.batched = Incremental(tail, 0, kshape).linear_m

    def start(self, params):
        return (self.stack.input_of(self.k, params),)

    def _tail(self, cache, key):
        return self.stack.tail(self.k, cache[0], self.stack.rows(key))

    def loss(self, params, cache, change):
        return self._tail(cache, change.key)(params)

    def commit(self, params, cache, change, apply):
        return cache

    def scores(self, params, cache, index, deltas, key):
        """The losses of the candidates ``W.flat[index] += deltas[c]`` on the weight's rows."""
        assert self.kshape is not None
        inc = Incremental(self._tail(cache, key), 0, self.kshape)
        return inc.scores(params, inc.start(params), index, deltas, key)

    def commit_scored(self, params, cache, index, aux, apply):
        return cache


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
    if per_weight_batch:  # a LayerStack with batch= (checked by rso)
        return Sampled(value_fn, k, kshape, fast_path == "incremental")
    if fast_path == "incremental" and isinstance(layer, LinearLayer) and kshape is not None:
        return Incremental(value_fn, k, kshape)
    return CachedStack(value_fn, k)
