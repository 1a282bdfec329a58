"""The search loop: one ``update`` call, over named carries.

:func:`run` is a ``while_loop`` over *segments*: a segment is the part of one
searched leaf inside the call's budget (from the cursor to the end of the leaf, or
fewer weights when the call's ``weights_per_step`` ends first). The segment of leaf
``t`` is chosen with ``lax.switch`` over the visited leaves, so its evaluator (see
:mod:`optax_neuron.rso.evaluators`) is built statically: ``start`` once, then an
inner ``while_loop`` whose body visits one weight:

1. the element, its committed value ``w = p + u``, the weight decay (``u_d``) and the
   step ``dw`` (:mod:`optax_neuron.rso.rule`; the normal draws of the call's weights are
   made once, vectorised, before the loop over segments, so the program holds one copy
   of the random-number generator instead of one per leaf);
2. ``scores`` of the candidates ``p + (u_d + s * dw)``: ``s`` in ``+1, -1``, and ``0``
   first when ``F(w)`` is not known (a fresh batch per weight, or a weight decay);
   otherwise ``F(w)`` is the loss carried from the weight before, and for the call's
   first weight ``value_fn`` of the call's parameters (one full evaluation before the
   loop over segments, not one per leaf in the program);
3. the choice rule, and ``commit`` of the kept candidate to the evaluator's cache.

A segment is one leaf also where consecutive leaves share an owner layer (BatchNorm
shift, then scale): the owner's activations are then computed once per leaf instead of
once per pair. That costs one forward pass per such leaf: on the application's paper
net at batch 256, 6 leaves, 0.8 s of a 397 s cycle (0.2%; both measured on a loaded
2-core CPU, where one pass took 134 ms); ``benchmarks/bench_rso.py`` prints it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_neuron.rso import rule
from optax_neuron.rso.evaluators import Change, Target, make_evaluator, set_element
from optax_neuron.rso.plan import Plan


class Carry(NamedTuple):
    """State of the loop over segments."""

    cursor: jax.Array  # position in the cycle
    cycle: jax.Array
    done: jax.Array  # weights searched in this call
    work: list  # current value of every visited leaf (raveled)
    upd: list  # update accumulated in this call, per visited leaf (raveled)
    accepted: jax.Array  # (n_visited,) accepted proposals in this call
    loss: jax.Array  # the loss of the current parameters (NaN where every weight rescores it)


class LeafCarry(NamedTuple):
    """State of the loop over the weights of one segment (leaf ``t``)."""

    cursor: jax.Array
    done: jax.Array
    work: jax.Array  # leaf t, raveled
    upd: jax.Array  # its update in this call, raveled
    accepted: jax.Array  # accepted proposals in this segment
    loss: jax.Array  # the loss after the last visited weight
    cache: Any  # the evaluator's cache


@dataclasses.dataclass(frozen=True)
class Search:
    """Everything static about one ``update`` call's search."""

    plan: Plan
    leaves: list  # every leaf of the params (tree order)
    p0: list  # raveled visited leaves at the start of the call
    sigma: jax.Array  # (n_visited,) float32
    base: jax.Array  # jax.random.key(seed)
    anneal: Callable | None
    weights_per_step: int
    weight_decay: Any  # float, or a traced scalar under optax.inject_hyperparams
    decay: bool  # whether the visit decays the weight (static)
    per_weight_batch: bool
    value_fn: Any
    fast_path: str
    owner: tuple[int, ...] | None  # owning layer of each visited leaf (layer stack), else None

    @property
    def rescore(self) -> bool:
        """Whether ``F(w)`` is scored again for every weight (it changes with the weight)."""
        return self.per_weight_batch or self.decay

    def tree_of(self, work: list) -> Any:
        out = list(self.leaves)
        for t, i in enumerate(self.plan.visit):
            out[i] = work[t].reshape(self.plan.shapes[t])
        return jax.tree_util.tree_unflatten(self.plan.treedef, out)

    def step(self, cycle: jax.Array, t: int) -> jax.Array:
        if self.anneal is None:
            return self.sigma[t]
        return self.sigma[t] * jnp.asarray(self.anneal(cycle), jnp.float32)

    def evaluator(self, t: int):
        plan = self.plan
        i = plan.visit[t]
        target = Target(plan.treedef, i, plan.paths[i], plan.shapes[t], plan.run(t))
        k = None if self.owner is None else self.owner[t]
        return make_evaluator(self.value_fn, self.per_weight_batch, self.fast_path, k, target)


def _segment(s: Search, t: int, d: rule.Draws, c: Carry) -> Carry:
    """Search leaf ``t`` from the cursor to its end (or the end of the call's budget)."""
    start, end = int(s.plan.starts[t]), int(s.plan.starts[t] + s.plan.sizes[t])
    p0, ev = s.p0[t], s.evaluator(t)
    signs = jnp.asarray([0.0, 1.0, -1.0][int(not s.rescore) :], jnp.float32)

    def params(work):
        return s.tree_of([*c.work[:t], work, *c.work[t + 1 :]])

    def body(lc: LeafCarry) -> LeafCarry:
        idx = s.plan.flat_index(t, lc.cursor - start)
        u = lc.upd[idx]
        u_d = rule.decayed(u, p0[idx] + u, s.weight_decay) if s.decay else u
        dw = s.step(c.cycle, t) * d.z[lc.done]
        values = p0[idx] + (u_d + (signs * dw).astype(u_d.dtype))
        deltas = (values - (p0[idx] + u)).astype(jnp.float32)
        change = Change(idx, values, deltas, d.k_batch[lc.done])
        losses, aux = ev.scores(params(lc.work), lc.cache, change)
        losses = losses.astype(lc.loss.dtype)
        ch = rule.choose(losses[0] if s.rescore else lc.loss, losses[-2], losses[-1])
        kept = jnp.where(ch.sign > 0, 1, jnp.where(ch.sign < 0, 2, 0)) - (not s.rescore)
        u_new = u_d + (ch.sign * dw).astype(u_d.dtype)
        return LeafCarry(
            cursor=lc.cursor + 1,
            done=lc.done + 1,
            work=set_element(lc.work, idx, p0[idx] + u_new),
            upd=set_element(lc.upd, idx, u_new),
            accepted=lc.accepted + ch.accepted.astype(jnp.int32),
            loss=ch.best,
            cache=ev.commit(
                params(lc.work), lc.cache, aux, jnp.maximum(kept, 0), ch.accepted | s.decay
            ),
        )

    cache = ev.start(s.tree_of(c.work))
    out = jax.lax.while_loop(
        lambda lc: (lc.done < s.weights_per_step) & (lc.cursor < end),
        body,
        LeafCarry(c.cursor, c.done, c.work[t], c.upd[t], jnp.int32(0), c.loss, cache),
    )
    wrap = out.cursor >= s.plan.total
    return Carry(
        cursor=jnp.where(wrap, 0, out.cursor),
        cycle=jnp.where(wrap, c.cycle + 1, c.cycle),
        done=out.done,
        work=[*c.work[:t], out.work, *c.work[t + 1 :]],
        upd=[*c.upd[:t], out.upd, *c.upd[t + 1 :]],
        # a one-hot add, not set_element: on an Explicit mesh the count carries the batch's
        # sharding, which a dynamic-update-slice into the replicated counts refuses
        accepted=c.accepted + jnp.where(jnp.arange(c.accepted.shape[0]) == t, out.accepted, 0),
        loss=out.loss,
    )


def current_loss(s: Search, loss_dtype: Any) -> jax.Array:
    """``F`` of the parameters the call starts from: ``value_fn(params)``, once per call."""
    return jnp.asarray(s.value_fn(s.tree_of(s.p0)), loss_dtype)


def run(s: Search, cursor: jax.Array, cycle: jax.Array, loss_dtype: Any) -> Carry:
    """Search the next ``weights_per_step`` weights; the final carry."""
    nv = len(s.plan.visit)
    ends = jnp.asarray(s.plan.starts + s.plan.sizes, jnp.int32)
    carry = Carry(
        cursor=cursor,
        cycle=cycle,
        done=jnp.int32(0),
        work=list(s.p0),
        upd=[jnp.zeros_like(x) for x in s.p0],
        accepted=jnp.zeros([nv], jnp.int32),
        loss=jnp.full([], jnp.nan, loss_dtype) if s.rescore else current_loss(s, loss_dtype),
    )
    draws = rule.draws(s.base, cycle, cursor, s.weights_per_step, s.plan.total)
    segments = [functools.partial(_segment, s, t, draws) for t in range(nv)]

    def one_segment(c: Carry) -> Carry:
        return jax.lax.switch(jnp.sum(c.cursor >= ends), segments, c)

    return jax.lax.while_loop(lambda c: c.done < s.weights_per_step, one_segment, carry)
