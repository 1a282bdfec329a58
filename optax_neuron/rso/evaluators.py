"""Evaluators: the losses of one weight's candidates, behind one protocol.

An evaluator serves one searched leaf (a *segment* of the search) and has three methods:

* ``start(params) -> cache``: once per segment, the activations it reuses (a NamedTuple);
* ``scores(params, cache, change) -> (losses, aux)``: the loss of every candidate of
  one weight, ``change`` (a :class:`Change`) naming the element and its candidate
  values; ``params`` hold the element at its committed value. ``aux`` holds what the
  cache needs to keep any one candidate (a NamedTuple);
* ``commit(params, cache, aux, kept, apply) -> cache``: the cache after candidate
  ``kept`` (an index into the candidates) is kept, where ``apply`` (else the cache as
  the weight's scores leave it: the candidates' values are not written).

:class:`BlackBox` calls ``value_fn``. :class:`CachedStack` re-runs a
:class:`LayerStack` from the layer owning the leaf on its cached input.
:class:`Incremental` (the owner is a :class:`LinearLayer`, or a :class:`ChannelwiseLayer`
reading the leaf per channel, e.g. a BatchNorm scale) recomputes the one output channel
the weight moves, carries it through the :func:`channelwise` layers after the owner and
then either adds one input-channel slice of the next :class:`LinearLayer`'s kernel to
that layer's cached output (only the layers after it run in full) or, when the next
layer is not linear, re-runs from there with the channel replaced. :class:`Sampled`
(a :class:`LayerStack` with ``batch=``) scores every weight on its own rows of the
owner's input over the whole data set.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_neuron.rso.layers import ChannelwiseLayer, LayerStack, LinearLayer, materialised


class Change(NamedTuple):
    """The candidates of one weight: element ``flat_index`` (row-major) of the searched leaf
    set to ``values[c]``, which moves it by ``deltas[c]`` from its committed value."""

    flat_index: jax.Array  # int32 scalar
    values: jax.Array  # (C,), the leaf's dtype
    deltas: jax.Array  # (C,), float32
    key: jax.Array  # the weight's k_batch


def set_element(x: jax.Array, i: jax.Array, value: jax.Array) -> jax.Array:
    """``x`` (1-D) with element ``i`` (``0 <= i < x.size``) set to ``value``.

    A dynamic-update-slice, updated in place; ``x.at[i].set(value)`` is the same array
    but lowers to a scatter, which XLA:CPU expands into a loop of its own (the search
    program then compiled 4-8% slower, on the nets of the tests).
    """
    return jax.lax.dynamic_update_slice(x, jnp.reshape(value, (1,)).astype(x.dtype), (i,))


@dataclasses.dataclass(frozen=True)
class Target:
    """The searched leaf: its ``path``, flat leaf ``index`` of ``treedef``, ``shape``, and
    ``run``: how many weights in a row the visiting order takes with one index of the last
    axis (the owner's output channel): ``size // shape[-1]`` in the neuron order, else 1."""

    treedef: Any
    index: int
    path: str
    shape: tuple[int, ...]
    run: int = 1  # consecutive visited weights that share the index of the leaf's last axis

    def moved(self, params: Any, flat_index: jax.Array, value: jax.Array) -> Any:
        """``params`` with element ``flat_index`` of the searched leaf set to ``value``."""
        leaves = self.treedef.flatten_up_to(params)
        leaf = leaves[self.index]
        leaves[self.index] = set_element(leaf.ravel(), flat_index, value).reshape(self.shape)
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


class NoCache(NamedTuple):
    """The cache of an evaluator that keeps nothing between weights."""


class NoAux(NamedTuple):
    """The auxiliary output of an evaluator whose cache never changes."""


def _each_candidate(loss_of, target: Target, params: Any, change: Change) -> jax.Array:
    """``loss_of(params with candidate c)`` for every candidate: a static unroll (no inner
    loop capturing a large cache, which XLA would copy)."""
    n = change.values.shape[0]
    return jnp.stack(
        [loss_of(target.moved(params, change.flat_index, change.values[c])) for c in range(n)]
    )


class BlackBox:
    """``value_fn(params)`` (or ``value_fn(params, k_batch)`` with a fresh batch per weight)."""

    def __init__(self, value_fn: Any, per_weight_batch: bool, target: Target):
        self.value_fn, self.per_weight_batch, self.target = value_fn, per_weight_batch, target

    def start(self, params: Any) -> NoCache:
        return NoCache()

    def scores(self, params: Any, cache: NoCache, change: Change) -> tuple[jax.Array, NoAux]:
        def loss(p):
            return self.value_fn(p, change.key) if self.per_weight_batch else self.value_fn(p)

        return _each_candidate(loss, self.target, params, change), NoAux()

    def commit(self, params: Any, cache: NoCache, aux: NoAux, kept, apply) -> NoCache:
        return cache


class StackInput(NamedTuple):
    """The input of the owner layer."""

    owner_in: Any


class CachedStack:
    """Re-run ``stack`` from layer ``k`` (the owner) on its cached input: the black-box loss."""

    def __init__(self, stack: LayerStack, k: int, target: Target):
        self.stack, self.k, self.target = stack, k, target

    def start(self, params: Any) -> StackInput:
        return StackInput(self.stack.input_of(self.k, params))

    def scores(self, params: Any, cache: StackInput, change: Change) -> tuple[jax.Array, NoAux]:
        def loss(p):
            return self.stack.from_layer(self.k, p, cache.owner_in)

        return _each_candidate(loss, self.target, params, change), NoAux()

    def commit(self, params: Any, cache: StackInput, aux: NoAux, kept, apply) -> StackInput:
        return cache


def _cm_channel(x_cm: jax.Array, channel: jax.Array) -> jax.Array:
    """Channel ``channel`` of a channel-major array, as ``(N, ..., 1)``."""
    return jax.lax.dynamic_index_in_dim(x_cm, channel, axis=0, keepdims=False)[..., None]


def _cm_set(x_cm: jax.Array, channel: jax.Array, value: jax.Array) -> jax.Array:
    """``x_cm`` with channel ``channel`` replaced by ``value`` ``(N, ..., 1)``."""
    return jax.lax.dynamic_update_index_in_dim(x_cm, value[..., 0].astype(x_cm.dtype), channel, 0)


class ChannelCache(NamedTuple):
    """The activations :class:`Incremental` reads, channel-major (one channel is one
    contiguous block) but ``next_out``.

    ``next_in`` is ``None`` when the next layer follows the owner directly (it is then
    ``owner_out``); ``next_out`` is ``None`` when the next layer is not linear. In the run
    form (see :class:`Incremental`) ``next_out`` is layer m's output less what its input
    channel ``without`` contributes; otherwise ``without`` is ``None``.
    """

    owner_in: jax.Array  # input of the owner layer k
    owner_out: jax.Array  # output of layer k
    next_in: jax.Array | None  # input of layer m (the first layer after k not channel-wise)
    next_out: jax.Array | None  # output of layer m, as the stack has it (m linear)
    without: jax.Array | None  # int32 scalar: the input channel left out of next_out


class ChannelAux(NamedTuple):
    """One candidate's moved ``channel``: of the owner's output, of layer m's input, and
    ``next_change``: what layer m receives of it: the change of its input channel (m
    linear), the channel's new value (m linear, run form) or the new value (m not linear)."""

    channel: jax.Array
    owner_out: jax.Array
    next_in: jax.Array
    next_change: jax.Array


class ChannelReads(NamedTuple):
    """The cache's slices one weight's candidates read: the owner's input (its column, for a
    linear owner) and output at channel ``o``, and layer m's input at channel ``o`` where
    layer m receives the channel's change."""

    owner_in: jax.Array
    owner_out: jax.Array
    next_in: jax.Array | None


class IncrementalAux(NamedTuple):
    """The candidates' channels (leading axis: the candidates) and, in the run form, layer
    m's output without the weight's channel, which the candidates were added to."""

    candidates: ChannelAux
    next_out: jax.Array | None


class Incremental:
    """The owner layer ``k`` moves one output channel ``o``; only that channel is recomputed.

    The owner is a :class:`LinearLayer` whose kernel is searched (the candidate adds
    ``delta * column`` to output channel ``o``), or a :class:`ChannelwiseLayer` that reads
    the searched leaf per channel (its channel ``o`` is re-run with the candidate value).
    Layers ``k+1 .. m-1`` are channel-wise: only channel ``o`` is carried through them.
    Layer ``m`` (the first that is not channel-wise): a :class:`LinearLayer` gets
    ``A(W_m[..., o:o+1, :], change of channel o)`` added to its cached output and the
    layers after it re-run; any other layer (or the loss) re-runs from its cached input
    with channel ``o`` replaced. The losses differ from the black box by float rounding.

    **The run form**, where layer m is linear and the visiting order takes more than two
    weights in a row with one output channel (``target.run``: the neuron order): the cache
    keeps layer m's output less the contribution of input channel ``o``,
    ``R = out_m - A(W_m[..., o:o+1, :], h_o)``, so a candidate's output is
    ``R + A(W_m[..., o:o+1, :], h_o')`` and keeping it writes only the channel ``h_o'``,
    nothing of layer m's size. When the channel changes from ``r`` to ``o``, ``R`` gets
    ``A(W_m[.., r], h_r) - A(W_m[.., o], h_o)``: two updates per run instead of one per
    weight.
    """

    def __init__(self, stack: LayerStack, k: int, target: Target):
        self.stack, self.k, self.target = stack, k, target
        m = k + 1
        while m < len(stack.layers) and isinstance(stack.layers[m], ChannelwiseLayer):
            m += 1
        self.m = m
        self.linear_m = m < len(stack.layers) and isinstance(stack.layers[m], LinearLayer)
        self.runs = self.linear_m and target.run > 2

    @staticmethod
    def applies(stack: LayerStack, k: int, target: Target) -> bool:
        """Whether a change of the ``target`` leaf moves one output channel of layer ``k``."""
        layer = stack.layers[k]
        if isinstance(layer, LinearLayer):
            return layer.kernel == target.path
        per_channel = isinstance(layer, ChannelwiseLayer) and target.path in layer.per_channel
        return per_channel and len(target.shape) > 0

    def start(self, params: Any) -> ChannelCache:
        acts = self.stack.activations(params)[0]
        k, m = self.k, self.m
        cm = lambda x: jnp.moveaxis(x, -1, 0)
        cache = ChannelCache(
            owner_in=cm(acts[k]),
            owner_out=cm(acts[k + 1]),
            next_in=cm(acts[m]) if m > k + 1 else None,
            next_out=acts[m + 1] if self.linear_m else None,
            without=None,
        )
        if not self.runs:
            return cache
        zero = jnp.int32(0)  # the run form starts without input channel 0
        next_in = _cm_channel(self._next_in(cache), zero)
        rest = self._next_out(params, cache.next_out, -next_in, zero, fused=False)
        return cache._replace(next_out=rest, without=zero)

    def _next_in(self, cache: ChannelCache) -> jax.Array:
        return cache.owner_out if cache.next_in is None else cache.next_in

    def _channel_of(self, change: Change) -> jax.Array:
        """The output channel ``o`` the weight moves: its index on the leaf's last axis."""
        return change.flat_index % self.target.shape[-1]

    def _reads(self, cache: ChannelCache, change: Change) -> ChannelReads:
        """What every candidate of the weight reads of the cache: slices, one channel each."""
        owner = self.stack.layers[self.k]
        o = self._channel_of(change)
        if isinstance(owner, LinearLayer):
            _, owner_in = owner.column(cache.owner_in, self.target.shape, change.flat_index)
        else:
            owner_in = _cm_channel(cache.owner_in, o)
        # the old value of layer m's input channel, where layer m receives the channel's change
        subtracts = self.linear_m and not self.runs
        next_in = _cm_channel(self._next_in(cache), o) if subtracts else None
        return ChannelReads(owner_in, _cm_channel(cache.owner_out, o), next_in)

    def _channel(self, params, reads: ChannelReads, change: Change, c: int) -> ChannelAux:
        """Candidate ``c``'s channel ``o`` after layers ``k .. m-1`` (and layer m's change)."""
        layers: Any = self.stack.layers
        owner = layers[self.k]
        o = self._channel_of(change)
        if isinstance(owner, LinearLayer):
            delta = change.deltas[c].astype(reads.owner_out.dtype)
            new_k = reads.owner_out + delta * reads.owner_in
        else:
            moved = self.target.moved(params, change.flat_index, change.values[c])
            new_k = owner.one_channel(moved, reads.owner_in, o)
        h = new_k
        for layer in layers[self.k + 1 : self.m]:
            h = layer.one_channel(params, h, o)
        return ChannelAux(o, new_k, h, h if reads.next_in is None else h - reads.next_in)

    def _fused(self, params, next_out: jax.Array) -> bool:
        """Whether layer m's change is left for XLA to fuse into the layer after m: that layer
        is channel-wise and gives fewer elements than it reads (pooling), so the changed
        output of layer m need never be written in full (see
        :meth:`LinearLayer.add_input_channel`)."""
        after = self.stack.layers[self.m + 1 : self.m + 2]
        if not after or not isinstance(after[0], ChannelwiseLayer):
            return False
        out = jax.eval_shape(lambda h: after[0](params, h), next_out)
        return math.prod(out.shape) < next_out.size

    def _next_out(self, params, next_out, change: jax.Array, o, fused=None) -> jax.Array:
        """Layer m's output after its input channel ``o`` changes by ``change``."""
        assert next_out is not None  # cached whenever layer m is linear
        fused = self._fused(params, next_out) if fused is None else fused
        return self.stack.layers[self.m].add_input_channel(params, next_out, change, o, fused)

    def _without(self, params, cache: ChannelCache, o) -> jax.Array:
        """Run form: layer m's output less what input channel ``o`` contributes."""
        next_in, r = self._next_in(cache), cache.without
        assert cache.next_out is not None and r is not None  # both kept in the run form

        def move(state):  # channel r back in, channel o out: a new run
            out, _ = state
            out = self._next_out(params, out, _cm_channel(next_in, r), r, fused=False)
            return self._next_out(params, out, -_cm_channel(next_in, o), o, fused=False), False

        # a loop taken once or never, not a lax.cond: a loop updates its carry in place, where
        # XLA copied the whole output into and out of the cond's result on every weight
        out, _ = jax.lax.while_loop(lambda s: s[1], move, (cache.next_out, o != r))
        return out

    def _loss(self, params, cache: ChannelCache, next_out, aux: ChannelAux) -> jax.Array:
        o = aux.channel
        if self.linear_m:
            out = self._next_out(params, next_out, aux.next_change, o)
            return self.stack.from_layer(self.m + 1, params, out)
        h = jnp.moveaxis(_cm_set(self._next_in(cache), o, aux.next_change), 0, -1)
        return self.stack.from_layer(self.m, params, h)

    def scores(self, params, cache: ChannelCache, change: Change):
        n = change.values.shape[0]
        # the one-channel paths first, materialised (small): otherwise XLA recomputes them
        # inside every consumer fusion, and reads of the cache after its in-place update
        # force it to copy the cached activations on every weight. The slices they read are
        # materialised apart: inside the candidates' loops, each element of a dynamic slice
        # cost as much as a whole candidate's arithmetic
        reads = materialised(lambda: self._reads(cache, change), change.flat_index)
        aux = materialised(
            lambda: jax.tree.map(
                lambda *xs: jnp.stack(xs),
                *[self._channel(params, reads, change, c) for c in range(n)],
            ),
            change.flat_index,
        )
        next_out = cache.next_out
        if self.runs:
            next_out = self._without(params, cache, self._channel_of(change))
        # the full layers once per candidate (a static unroll: on CPU a vmap over the
        # candidates was measured slower, 17.2 against 14.9 ms for three on the paper net)
        one = lambda c: jax.tree.map(lambda x: x[c], aux)
        losses = jnp.stack([self._loss(params, cache, next_out, one(c)) for c in range(n)])
        return losses, IncrementalAux(aux, next_out if self.runs else None)

    def commit(self, params, cache: ChannelCache, aux: IncrementalAux, kept, apply):
        """Write the kept candidate's channel where ``apply``; slice-sized selects, no
        full-width copy (and, in the run form, nothing of layer m's size)."""
        one = jax.tree.map(lambda x: x[kept], aux.candidates)
        o = one.channel

        def keep(x, new):
            return _cm_set(x, o, jnp.where(apply, new, _cm_channel(x, o)))

        next_out, without = cache.next_out, cache.without
        if self.runs:  # the candidates' base: without channel o, whichever is kept
            next_out, without = aux.next_out, o.astype(jnp.int32)
        elif self.linear_m:  # the channel's change only where applied (else exact zeros)
            change = jnp.where(apply, one.next_change, 0.0)
            next_out = self._next_out(params, next_out, change, o)
        return ChannelCache(
            owner_in=cache.owner_in,
            owner_out=keep(cache.owner_out, one.owner_out),
            next_in=None if cache.next_in is None else keep(cache.next_in, one.next_in),
            next_out=next_out,
            without=without,
        )


class Sampled:
    """A fresh minibatch per weight from the cached input of layer ``k`` (``stack.batch`` rows).

    ``start`` computes the input of layer ``k`` over the whole data set (the stack's
    ``inputs``), once per segment: the layers before ``k`` do not change while a leaf
    of layer ``k`` is searched. Every weight draws its rows from its batch key
    (:meth:`LayerStack.rows`) and scores its candidates on them from layer ``k`` on:
    with ``incremental`` and an owner whose next non-channel-wise layer is linear, the
    rows run once through layers ``k .. m`` and the candidates share that
    (:class:`Incremental` on the rows); otherwise every candidate runs the layers from
    ``k``. Nothing is carried from weight to weight but the input.
    """

    def __init__(self, stack: LayerStack, k: int, target: Target, incremental: bool):
        self.stack, self.k, self.target = stack, k, target
        tail = LayerStack(stack.layers[k:], stack.loss, None)
        self.incremental = (
            incremental
            and Incremental.applies(tail, 0, target)
            and Incremental(tail, 0, target).linear_m
        )

    def start(self, params: Any) -> StackInput:
        return StackInput(self.stack.input_of(self.k, params))

    def scores(self, params: Any, cache: StackInput, change: Change) -> tuple[jax.Array, NoAux]:
        tail = self.stack.tail(self.k, cache.owner_in, self.stack.rows(change.key))
        if self.incremental:  # a fresh cache per weight: no run form
            inc = Incremental(tail, 0, dataclasses.replace(self.target, run=1))
            return inc.scores(params, inc.start(params), change)[0], NoAux()
        return _each_candidate(tail, self.target, params, change), NoAux()

    def commit(self, params: Any, cache: StackInput, aux: NoAux, kept, apply) -> StackInput:
        return cache


def make_evaluator(
    value_fn: Any, per_weight_batch: bool, fast_path: str, k: int | None, target: Target
) -> BlackBox | CachedStack | Incremental | Sampled:
    """The evaluator of the ``target`` leaf, owned by layer ``k`` (``None``: black box)."""
    if k is None:
        return BlackBox(value_fn, per_weight_batch, target)
    if per_weight_batch:  # a LayerStack with batch= (checked by rso)
        return Sampled(value_fn, k, target, fast_path == "incremental")
    if fast_path == "incremental" and Incremental.applies(value_fn, k, target):
        return Incremental(value_fn, k, target)
    return CachedStack(value_fn, k, target)
