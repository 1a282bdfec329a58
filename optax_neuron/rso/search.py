"""The search loops: sequential and speculative, over named carries.

One ``update`` runs :func:`run`: an outer ``while_loop`` over *segments* (the part
of one searched leaf inside the call's budget; in the sequential loop of a layer
stack, of a run of consecutive leaves owned by the same layer), each an inner
``while_loop`` over the weights of that segment. The evaluator of a segment is
chosen statically per owner layer (``lax.switch``), see
:mod:`optax_neuron.rso.evaluators`.

The sequential loop visits one weight per iteration: it scores ``w`` (only when the
current loss is not known: the first weight of a call, a fresh batch per weight, or a
weight decay), ``w + dw`` and ``w - dw`` in a small ``fori_loop`` (one copy of the loss
code), applies the choice rule and commits the result to the evaluator's cache once.
The speculative loop scores the candidates of the next ``m`` weights against the
same base in one ``vmap`` and accepts the first improving one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_neuron.rso import rule
from optax_neuron.rso.evaluators import Change, make_evaluator
from optax_neuron.rso.plan import Plan


class Carry(NamedTuple):
    """State of the outer loop (and of a segment's loop, with ``cache`` and ``losses``)."""

    cursor: jax.Array  # position in the cycle
    cycle: jax.Array
    done: jax.Array  # weights searched in this call
    work: list  # current value of every visited leaf (raveled)
    upd: list  # update accumulated in this call (raveled)
    accepted: jax.Array  # accepted proposals per visited leaf in this call
    losses: jax.Array  # (3,): F(w), F(w + dw), F(w - dw) of the current weight
    phase: jax.Array  # the first candidate to score for the next weight (0: w itself)
    cache: tuple = ()


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
    speculate: int
    value_fn: Any
    fast_path: str
    owner: tuple[int, ...] | None  # owning layer of each visited leaf (layered), else None

    @property
    def first_phase(self) -> int:
        return 0 if (self.per_weight_batch or self.decay) else 1

    def tree_of(self, flat_vis: list) -> Any:
        out = list(self.leaves)
        for t, i in enumerate(self.plan.visit):
            out[i] = flat_vis[t].reshape(self.plan.shapes[t])
        return jax.tree_util.tree_unflatten(self.plan.treedef, out)

    def step(self, cycle: jax.Array, j: jax.Array) -> jax.Array:
        factor = (
            jnp.float32(1.0)
            if self.anneal is None
            else jnp.asarray(self.anneal(cycle), jnp.float32)
        )
        return self.sigma[j] * factor


def _set(xs: list, mine: list[int], j, idx: dict, values: dict, where) -> list:
    """Element ``idx[t]`` of leaf ``t`` set to ``values[t]`` where ``where & (j == t)``."""
    xs = list(xs)
    for t in mine:
        xs[t] = xs[t].at[idx[t]].set(jnp.where(where & (j == t), values[t], xs[t][idx[t]]))
    return xs


class _Weight(NamedTuple):
    """The visited element in every leaf this segment may own (only leaf ``j`` is real)."""

    idx: dict  # flat index per leaf t
    committed: dict  # its value before the visit
    decayed: dict  # its update after the visit's weight decay


def _weight(s: Search, mine, j, i, work, upd) -> _Weight:
    idx = {
        t: jnp.clip(
            s.plan.flat_index(t, jnp.clip(i, 0, int(s.plan.sizes[t]) - 1)),
            0,
            int(s.plan.sizes[t]) - 1,
        )
        for t in mine
    }
    committed = {t: s.p0[t][idx[t]] + upd[t][idx[t]] for t in mine}
    dec = {
        t: rule.decayed(upd[t][idx[t]], committed[t], s.weight_decay) if s.decay else upd[t][idx[t]]
        for t in mine
    }
    return _Weight(idx, committed, dec)


def _candidate(s: Search, mine, wt: _Weight, sign_dw):
    """(value, update) at the element for ``u_d + sign * dw``, per leaf."""
    us = {t: wt.decayed[t] + sign_dw.astype(wt.decayed[t].dtype) for t in mine}
    return {t: s.p0[t][wt.idx[t]] + us[t] for t in mine}, us


def _delta(mine, j, new, old):
    return sum(jnp.where(j == t, (new[t] - old[t]).astype(jnp.float32), 0.0) for t in mine)


def _segment(s: Search, k: int | None, carry: Carry) -> Carry:
    """Search from the cursor to the end of its leaf (or the call's budget)."""
    plan = s.plan
    ends = jnp.asarray(plan.starts + plan.sizes, jnp.int32)
    starts = jnp.asarray(plan.starts, jnp.int32)
    j = jnp.sum(carry.cursor >= ends).astype(jnp.int32)
    nv = len(plan.visit)
    owner: Any = s.owner  # set whenever k is (a layer-stack search)
    mine = list(range(nv)) if k is None else [t for t in range(nv) if owner[t] == k]
    # the sequential loop runs on through the next leaves of the same owner (BatchNorm
    # shift then scale): its cache stays valid, and is not recomputed for each leaf
    run_end = _run_ends(plan, owner) if (k is not None and s.speculate == 1) else ends
    seg_end = run_end[j]
    kshapes = {plan.shapes[t] for t in mine}
    kshape: Any = next(iter(kshapes)) if len(kshapes) == 1 else None
    ev = make_evaluator(s.value_fn, s.per_weight_batch, s.fast_path, k, kshape)
    signs = jnp.asarray([0.0, 1.0, -1.0], jnp.float32)
    cache = ev.start(s.tree_of(carry.work)) if k is not None else ()

    def body(c: Carry) -> Carry:
        """One weight: score the candidates from ``c.phase`` on, choose, commit."""
        j = jnp.sum(c.cursor >= ends).astype(jnp.int32)  # the leaf (a segment may span several)
        i = c.cursor - starts[j]
        wt = _weight(s, mine, j, i, c.work, c.upd)
        k_batch = rule.weight_key(s.base, c.cycle, c.cursor)[1]
        dw = rule.draw(s.base, c.cycle, c.cursor, s.step(c.cycle, j))
        index = jnp.asarray(sum(jnp.where(j == t, wt.idx[t], 0) for t in mine))

        def score(phase):
            trial, _ = _candidate(s, mine, wt, signs[phase] * dw)
            work = _set(c.work, mine, j, wt.idx, trial, True)
            change = Change(index, _delta(mine, j, trial, wt.committed), k_batch)
            return ev.loss(s.tree_of(work), c.cache, change).astype(c.losses.dtype)

        phases = range(s.first_phase, 3)
        batched = getattr(ev, "batched", False)
        if batched:  # every candidate in one call, the kept one committed without recomputing
            params = s.tree_of(c.work)  # the evaluator reads the change, not the searched leaf
            deltas = jnp.stack(
                [
                    _delta(mine, j, _candidate(s, mine, wt, signs[p] * dw)[0], wt.committed)
                    for p in phases
                ]
            )
            vals, aux = ev.scores(params, c.cache, index, deltas, k_batch)
            vals = vals.astype(c.losses.dtype)
            losses = jnp.concatenate([c.losses[:1], vals]) if s.first_phase else vals
        else:  # a static unroll: no inner loop capturing the (large) cache, which XLA would copy
            losses = jnp.stack([c.losses[0] if p < s.first_phase else score(p) for p in range(3)])
        ch = rule.choose(losses[0], losses[1], losses[2])
        final, u_new = _candidate(s, mine, wt, ch.sign * dw)
        work = _set(c.work, mine, j, wt.idx, final, True)
        moved = ch.accepted | s.decay
        if batched:
            sel = jnp.where(ch.sign > 0, 1, jnp.where(ch.sign < 0, 2, 0)) - s.first_phase
            sel = jnp.clip(sel, 0, len(phases) - 1)
            chosen = jax.tree_util.tree_map(lambda a: a[sel], aux)
            cache = ev.commit_scored(params, c.cache, index, chosen, moved)
        else:
            cache = ev.commit(
                s.tree_of(work),
                c.cache,
                Change(index, _delta(mine, j, final, wt.committed), k_batch),
                moved,
            )
        return c._replace(
            cursor=c.cursor + 1,
            done=c.done + 1,
            work=work,
            upd=_set(c.upd, mine, j, wt.idx, u_new, True),
            accepted=c.accepted.at[j].add(ch.accepted.astype(jnp.int32)),
            losses=jnp.full_like(losses, ch.best),
            phase=jnp.int32(s.first_phase),
            cache=cache,
        )

    def round_body(c: Carry) -> Carry:
        m = s.speculate
        r = jnp.arange(m, dtype=jnp.int32)
        n = c.cursor + r
        valid = (n < seg_end) & (c.done + r < s.weights_per_step)
        n = jnp.minimum(n, seg_end - 1)
        i = n - starts[j]
        # scalar draws, as in the sequential loop (a vmapped normal rounds differently on CPU)
        dw = jax.lax.map(lambda q: rule.draw(s.base, c.cycle, q, s.step(c.cycle, j)), n)
        k_batch = jax.lax.map(lambda q: rule.weight_key(s.base, c.cycle, q)[1], n)

        def candidate(ir, sign_dw, key):
            wt = _weight(s, mine, j, ir, c.work, c.upd)
            trial, _ = _candidate(s, mine, wt, sign_dw)
            change = Change(
                jnp.asarray(sum(jnp.where(j == t, wt.idx[t], 0) for t in mine)),
                _delta(mine, j, trial, wt.committed),
                key,
            )
            return ev.loss(s.tree_of(_set(c.work, mine, j, wt.idx, trial, True)), c.cache, change)

        cand = signs[s.first_phase :]
        ns = cand.shape[0]
        flat = jax.vmap(candidate)(
            jnp.repeat(i, ns), (cand[None, :] * dw[:, None]).ravel(), k_batch[jnp.repeat(r, ns)]
        )
        vals = flat.reshape(m, ns).astype(c.losses.dtype)
        keep = jnp.broadcast_to(c.losses[0], (m,)) if s.first_phase else vals[:, 0]
        ch = jax.vmap(rule.choose)(keep, vals[:, -2], vals[:, -1])
        improved = ch.accepted & valid
        hit = jnp.any(improved)
        first = jnp.argmax(improved).astype(jnp.int32)
        consumed = jnp.where(hit, first + 1, jnp.sum(valid).astype(jnp.int32))
        wt = _weight(s, mine, j, i[first], c.work, c.upd)
        final, u_new = _candidate(s, mine, wt, ch.sign[first] * dw[first])
        work = _set(c.work, mine, j, wt.idx, final, hit)
        change = Change(
            jnp.asarray(sum(jnp.where(j == t, wt.idx[t], 0) for t in mine)),
            _delta(mine, j, final, wt.committed),
            k_batch[first],
        )
        return c._replace(
            cursor=c.cursor + consumed,
            done=c.done + consumed,
            work=work,
            upd=_set(c.upd, mine, j, wt.idx, u_new, hit),
            accepted=c.accepted.at[j].add(hit.astype(jnp.int32)),
            losses=c.losses.at[0].set(ch.best[consumed - 1]),
            cache=ev.commit(s.tree_of(work), c.cache, change, hit),
        )

    def cond(c: Carry) -> jax.Array:
        return (c.done < s.weights_per_step) & (c.cursor < seg_end)

    losses, phase = carry.losses, carry.phase
    if s.first_phase == 1:  # the current loss, if not known yet, once before the loop
        k0 = rule.weight_key(s.base, carry.cycle, carry.cursor)[1]
        change0 = Change(jnp.int32(0), jnp.float32(0.0), k0)
        cur = jax.lax.cond(
            phase == 0,
            lambda: ev.loss(s.tree_of(carry.work), cache, change0).astype(losses.dtype),
            lambda: losses[0],
        )
        losses, phase = jnp.stack([cur, cur, cur]), jnp.int32(s.first_phase)
    inner = carry._replace(losses=jnp.stack([losses[0]] * 3), phase=phase, cache=cache)
    out = jax.lax.while_loop(cond, round_body if s.speculate > 1 else body, inner)
    wrap = out.cursor >= plan.total
    return out._replace(
        cursor=jnp.where(wrap, 0, out.cursor),
        cycle=jnp.where(wrap, out.cycle + 1, out.cycle),
        cache=(),
    )


def _run_ends(plan: Plan, owner) -> jax.Array:
    """Per visited leaf: the end of the run of consecutive leaves owned by the same layer."""
    ends = [int(e) for e in plan.starts + plan.sizes]
    out = list(ends)
    for t in range(len(ends) - 2, -1, -1):
        if owner[t + 1] == owner[t]:
            out[t] = out[t + 1]
    return jnp.asarray(out, jnp.int32)


def run(s: Search, cursor, cycle, loss_dtype) -> Carry:
    """Search the next ``weights_per_step`` weights; the final outer carry."""
    nv = len(s.plan.visit)
    ends = jnp.asarray(s.plan.starts + s.plan.sizes, jnp.int32)
    carry = Carry(
        cursor,
        cycle,
        jnp.int32(0),
        list(s.p0),
        [jnp.zeros_like(x) for x in s.p0],
        jnp.zeros([nv], jnp.int32),
        jnp.full([3], jnp.nan, loss_dtype),
        jnp.int32(0),
    )

    def outer(c: Carry) -> Carry:
        if s.owner is None:
            return _segment(s, None, c)
        j = jnp.sum(c.cursor >= ends)
        owner = jnp.asarray(s.owner, jnp.int32)
        layers = sorted(set(s.owner))
        index = jnp.searchsorted(jnp.asarray(layers, jnp.int32), owner[j])
        return jax.lax.switch(index, [functools.partial(_segment, s, k) for k in layers], c)

    return jax.lax.while_loop(lambda c: c.done < s.weights_per_step, outer, carry)
