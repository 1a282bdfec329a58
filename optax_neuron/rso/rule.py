"""The random draw and the choice rule, each written once.

**The draw.** With ``base = jax.random.key(seed)``, the weight at position ``n``
(0-based, in the visiting order of the cycle) of cycle ``c`` uses::

    k = jax.random.fold_in(jax.random.fold_in(base, c), n)
    k_step, k_batch = jax.random.split(k)
    dw = (sigma_d * anneal(c)) * jax.random.normal(k_step, (), jnp.float32)

(:func:`draws` draws them for the whole call at once.) ``k_batch`` is handed to
``value_fn(params, k_batch)`` with ``per_weight_batch=True``.

**The candidates.** ``u`` is the update accumulated in the call (the searched weight
is ``w = p + u``, ``p`` the parameters the call started from). With weight decay
``wd`` the visit first decays the weight, ``u_d = u - w * wd`` (``w * (1 - wd)`` up to
rounding; ``u_d = u`` exactly when ``wd = 0``), and the three candidates are
``p + (u_d + s * dw)`` for ``s`` in ``0, +1, -1``: exactly what ``optax.apply_updates``
produces. "Keep" keeps the decayed value.

**The choice.** ``w + dw`` if ``F(w + dw) < F(w)``, then ``w - dw`` if ``F(w - dw)`` is
strictly below the best so far: ties and NaN keep ``w``, and a NaN is never accepted.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def weight_key(base: jax.Array, cycle: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(k_step, k_batch)`` of the weight at position ``n`` of cycle ``cycle``."""
    k_step, k_batch = jax.random.split(jax.random.fold_in(jax.random.fold_in(base, cycle), n))
    return k_step, k_batch


class Draws(NamedTuple):
    """The draws of the next weights of a call, in visiting order (see :func:`draws`)."""

    z: jax.Array  # (count,) float32: dw = sigma_d * anneal(c) * z
    k_batch: jax.Array  # (count,) keys (XLA drops them where no evaluator reads them)


def draws(base: jax.Array, cycle: jax.Array, cursor: jax.Array, count: int, total: int) -> Draws:
    """``z`` and ``k_batch`` of the ``count`` weights from position ``cursor`` of cycle
    ``cycle`` on, wrapping into the next cycles after position ``total - 1``.

    One vectorised draw per call: the search reads element ``i`` for its ``i``-th weight.
    Drawing inside the loop instead put a copy of the random-number generator into every
    searched leaf's branch of the compiled program (about 45% of its compile time); the
    numbers are the same bits (``jax.random.normal`` is elementwise).
    """
    i = cursor + jnp.arange(count, dtype=jnp.int32)
    cycles, n = cycle + i // total, i % total
    k_step, k_batch = jax.vmap(lambda c, m: weight_key(base, c, m))(cycles, n)
    z = jax.vmap(lambda k: jax.random.normal(k, (), jnp.float32))(k_step)
    return Draws(z, k_batch)


class Choice(NamedTuple):
    """Result of :func:`choose`: the sign taken (0 keeps ``w``) and the loss of the result."""

    sign: jax.Array  # float32: 0, +1 or -1
    accepted: jax.Array  # bool: sign != 0
    best: jax.Array  # the loss of the chosen candidate


def choose(keep: jax.Array, plus: jax.Array, minus: jax.Array) -> Choice:
    """The argmin of ``F(w), F(w + dw), F(w - dw)`` with strict ``<`` (ties, NaN keep ``w``)."""
    take_plus = plus < keep
    best = jnp.where(take_plus, plus, keep)
    take_minus = minus < best
    best = jnp.where(take_minus, minus, best)
    sign = jnp.where(take_minus, -1.0, jnp.where(take_plus, 1.0, 0.0)).astype(jnp.float32)
    return Choice(sign, take_plus | take_minus, best)


def decayed(u: jax.Array, w: jax.Array, weight_decay: float) -> jax.Array:
    """The update after the visit's weight decay: ``u - w * wd`` (``u`` itself when ``wd = 0``).

    The product is rounded on its own before the subtraction, as NumPy computes it.
    Written plainly, XLA's CPU backend contracts the two into one fused multiply-add
    (rounded once), which differs from the formula in the last bit for about one
    value in four; the identity select between them (``p`` where ``p == p``, else NaN:
    ``p`` itself) stops that, and ``optimization_barrier`` does not.
    """
    p = w * jnp.asarray(weight_decay, w.dtype)
    return u - jnp.where(p == p, p, jnp.nan)
