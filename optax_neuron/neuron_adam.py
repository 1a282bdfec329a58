r"""Neuron-wise Adam: one second moment per neuron, a full or a per-neuron first moment.

Adam keeps two numbers per connection. Adam-mini (Zhang et al. 2024, "Adam-mini:
Use Fewer Learning Rates To Gain More", arXiv 2406.16793) observes that one
second moment per block of the Hessian (one per output neuron for most layers,
one per head for attention queries and keys) trains as well as AdamW with
45-50% less optimizer memory. The blocks of a layer are the neurons, and the
fan-in axes of :mod:`optax_neuron.fan_in` say which connections feed each
neuron, so the second moment is kept here at its real per-neuron size.

Writing :math:`\bar x` for the mean of :math:`x` over a leaf's fan-in axes
(kept as size-1 dims, so it broadcasts back over the connections):

.. math::

  v_t &= \beta_2\, v_{t-1} + (1 - \beta_2)\, \overline{g_t^2}
  &&\text{(one value per neuron)} \\
  m_t &= \beta_1\, m_{t-1} + (1 - \beta_1)\, g_t
  &&\text{(``first_moment="full"``: Adam-mini's rule)} \\
  a_t &= (1 - \beta_1)\, g_t + \beta_1\, \bar a_{t-1}
  &&\text{(``first_moment="neuron"``, kept as } n_t = \bar a_t) \\
  u_t &= -\eta\, \frac{m_t \text{ or } a_t}{1 - \beta_1^t}
        \Big/ \Big(\sqrt{v_t / (1 - \beta_2^t)} + \epsilon\Big).

Leaves without fan-in axes (biases, norm scales, embedding tables) have
:math:`\bar x = x`: plain Adam. With ``first_moment="neuron"`` the whole state
is per neuron: the per-connection accumulator :math:`a_t` is never stored, only
its mean (the proof is in :func:`scale_by_neuron_adam`).
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_neuron._tree import at_least_float32, fan_in_mean, path_str
from optax_neuron._validate import check_float_dtype, check_unit_interval, require_floating
from optax_neuron.fan_in import FanIn, fan_in_axes, neuron_shape

__all__ = ["ScaleByNeuronAdamState", "neuron_adam", "neuron_adamw", "scale_by_neuron_adam"]

FIRST_MOMENTS = ("full", "neuron")
"""The ``first_moment`` choices."""


class ScaleByNeuronAdamState(NamedTuple):
    """State of :func:`scale_by_neuron_adam`.

    Attributes:
      neuron_adam_count: number of updates so far (int32 scalar), for the bias
        corrections.
      neuron_adam_mu: the first moment: shaped like the parameters
        (``first_moment="full"``) or one value per neuron, every fan-in axis of
        size 1 (``first_moment="neuron"``); dtype ``mu_dtype`` or the
        parameters'.
      neuron_adam_nu: the second moment, one value per neuron (every fan-in axis
        of size 1; leaves without fan-in axes keep their full shape), in the
        parameters' dtype but at least float32.
    """

    neuron_adam_count: jax.Array
    neuron_adam_mu: optax.Updates
    neuron_adam_nu: optax.Updates


def _check_eps(value: Any) -> None:
    """``eps`` must be a finite number >= 0 when concrete; traced values pass."""
    if isinstance(value, (numbers.Real, np.ndarray, np.generic)):
        arr = np.asarray(value)
        if arr.shape != () or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"eps must be a scalar number >= 0, got {value!r}")
        if not (np.isfinite(float(arr)) and float(arr) >= 0.0):
            raise ValueError(f"eps must be a finite number >= 0, got {value!r}")
    elif value is None:
        raise ValueError("eps must be a number >= 0, got None")


def _check_static(first_moment: Any, mu_dtype: Any) -> np.dtype | None:
    if not isinstance(first_moment, str) or first_moment not in FIRST_MOMENTS:
        raise ValueError(f"first_moment must be 'full' or 'neuron', got {first_moment!r}")
    return check_float_dtype(mu_dtype, "mu_dtype")


def scale_by_neuron_adam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    first_moment: str = "full",
    fan_in: FanIn = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates by Adam's rule with one second moment per neuron.

    The neuron-wise counterpart of :func:`optax.scale_by_adam`. With
    :math:`\bar x` the mean of :math:`x` over the leaf's fan-in axes (size-1
    dims kept) and :math:`t` the step (from 1):

    .. math::

      v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, \overline{g_t^2}, \\
      d_t &= \begin{cases}
        m_t = \beta_1 m_{t-1} + (1 - \beta_1)\, g_t & \text{first_moment="full"} \\
        a_t = (1 - \beta_1)\, g_t + \beta_1\, n_{t-1},\quad n_t = \bar a_t
          & \text{first_moment="neuron"}
      \end{cases} \\
      u_t &= \frac{d_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}.

    ``"full"`` is Adam-mini's rule (Zhang et al. 2024, arXiv 2406.16793):
    Adam's first moment, one second moment per neuron. ``"neuron"`` is the
    update of a per-connection accumulator :math:`a_t = (1-\beta_1) g_t +
    \beta_1 \bar a_{t-1}` (the first moment of each connection replaced by the
    mean of its neuron before the decay, as in neuron-mean momentum) of which
    only :math:`n_t = \bar a_t` is stored. Proof that this is exact: the mean
    is linear and :math:`\bar{\bar x} = \bar x`, so
    :math:`\bar a_t = (1-\beta_1)\bar g_t + \beta_1 \bar a_{t-1}`, which is the
    recursion :math:`n_t = (1-\beta_1)\bar g_t + \beta_1 n_{t-1}` with the same
    start :math:`\bar a_0 = n_0 = 0`; hence :math:`n_t = \bar a_t` at every step
    and :math:`a_t = (1-\beta_1) g_t + \beta_1 n_{t-1}` is recovered exactly from
    the gradient and the per-neuron state. The whole state is then per neuron:
    ``fan_in`` times smaller than Adam's for every kernel.

    Leaves without fan-in axes (biases, norm scales, embedding tables) get
    plain Adam (:math:`\bar x = x`). With no fan-in axes anywhere (e.g.
    ``fan_in=[("*", optax_neuron.fan_in.NO_AXES)]``) both modes are
    :func:`optax.scale_by_adam`.

    Adam-mini gives attention queries and keys one second moment per *head*;
    as fan-in rules for Flax ``(in, heads, head_dim)`` kernels that is the
    mean over axes ``(0, 2)``::

        fan_in = [("*query/kernel", (0, 2)), ("*key/kernel", (0, 2)),
                  *optax_neuron.fan_in.FLAX]

    Numerics: means and the update are computed in the promoted dtype, at
    least float32; the second moment is stored in at least float32 (it is per
    neuron, so this costs little, and :math:`g^2` underflows float16 for
    :math:`|g| < 2.5 \cdot 10^{-4}`); the first moment in ``mu_dtype`` or the
    parameters' dtype; updates keep their dtype. :math:`\beta_1, \beta_2,
    \epsilon` enter in that computation dtype before :math:`1 - \beta` is
    formed, so a plain float and the same value injected by
    :func:`optax.inject_hyperparams` give identical updates (Optax's
    ``scale_by_adam`` forms ``1 - 0.999`` in double precision instead: the two
    differ by about 1e-5 relative in :math:`v_t` when :math:`\beta_2` is not a
    float32 number).

    Args:
      b1: :math:`\beta_1` in ``[0, 1)`` (may be traced under
        :func:`optax.inject_hyperparams`).
      b2: :math:`\beta_2` in ``[0, 1)``.
      eps: :math:`\epsilon \ge 0`, added to the root of the second moment.
      first_moment: ``"full"`` (one first moment per connection, Adam-mini) or
        ``"neuron"`` (one per neuron; the whole state is per neuron). Static.
      fan_in: the fan-in axes (see :func:`optax_neuron.fan_in.fan_in_axes`);
        ``None`` is the :data:`optax_neuron.fan_in.FLAX` preset. Static.
      mu_dtype: dtype of the first moment; ``None`` uses the parameters'.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`ScaleByNeuronAdamState`.

    Raises:
      ValueError: ``b1``/``b2`` outside ``[0, 1)``, a negative ``eps``, an
        unknown ``first_moment``, a non-float ``mu_dtype``, or a ``fan_in`` that
        does not fit the parameters (the path is named).
      TypeError: a non-floating-point parameter or update (the path is named).

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_neuron import scale_by_neuron_adam
      >>> params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
      >>> tx = scale_by_neuron_adam(first_moment="neuron")
      >>> state = tx.init(params)
      >>> state.neuron_adam_nu["dense"]["kernel"].shape  # one value per neuron
      (1, 2)
      >>> grads = {"dense": {"kernel": jnp.array([[1., 2.], [3., 4.], [5., 6.]]),
      ...                    "bias": jnp.ones(2)}}
      >>> updates, state = tx.update(grads, state)
      >>> nu = state.neuron_adam_nu["dense"]["kernel"]  # (1 - b2) * mean of g**2 over 3 inputs
      >>> [round(float(x), 5) for x in nu[0]]  # [(1 + 9 + 25) / 3, (4 + 16 + 36) / 3] / 1000
      [0.01167, 0.01867]
    """
    for beta, name in ((b1, "b1"), (b2, "b2")):
        if beta is None:  # None for a beta is a ValueError here (check_unit_interval: TypeError)
            raise ValueError(f"{name} must be a number in [0, 1), got None")
        check_unit_interval(beta, name, "optax_neuron")
    _check_eps(eps)
    mu_dtype = _check_static(first_moment, mu_dtype)
    per_neuron_mu = first_moment == "neuron"

    def init_fn(params: optax.Params) -> ScaleByNeuronAdamState:
        require_floating(params, "neuron-wise Adam", "parameters")
        axes = fan_in_axes(params, fan_in)

        def mu_zeros(p: jax.Array, ax: tuple[int, ...]) -> jax.Array:
            shape = neuron_shape(p.shape, ax) if per_neuron_mu else p.shape
            return jnp.zeros(shape, p.dtype if mu_dtype is None else mu_dtype)

        def nu_zeros(p: jax.Array, ax: tuple[int, ...]) -> jax.Array:
            return jnp.zeros(neuron_shape(p.shape, ax), at_least_float32(p.dtype))

        return ScaleByNeuronAdamState(
            neuron_adam_count=jnp.zeros([], jnp.int32),
            neuron_adam_mu=jax.tree.map(mu_zeros, params, axes),
            neuron_adam_nu=jax.tree.map(nu_zeros, params, axes),
        )

    def update_fn(
        updates: optax.Updates,
        state: ScaleByNeuronAdamState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByNeuronAdamState]:
        del params, extra_args
        require_floating(updates, "neuron-wise Adam", "updates")
        axes = fan_in_axes(updates, fan_in)
        count = optax.safe_increment(state.neuron_adam_count)

        def one(
            path: Any, g: jax.Array, m: jax.Array, v: jax.Array, ax: tuple[int, ...]
        ) -> tuple[jax.Array, jax.Array, jax.Array]:
            shape = neuron_shape(g.shape, ax)
            want_m = shape if per_neuron_mu else g.shape
            if v.shape != shape or m.shape != want_m:
                raise ValueError(
                    f"the state of parameter {path_str(path)!r} has moments of shapes {m.shape} "
                    f"and {v.shape}, expected {want_m} and {shape} for updates of shape "
                    f"{g.shape} with fan-in axes {ax}: "
                    "was the state made with another fan_in or first_moment?"
                )
            dtype = at_least_float32(g.dtype, m.dtype, v.dtype)
            g32 = g.astype(dtype)
            beta1, beta2 = jnp.asarray(b1, dtype), jnp.asarray(b2, dtype)
            new_v = beta2 * v.astype(dtype) + (1 - beta2) * fan_in_mean(g32 * g32, ax, dtype)
            if per_neuron_mu:
                direction = (1 - beta1) * g32 + beta1 * m.astype(dtype)
                new_m = fan_in_mean(direction, ax, dtype)
            else:
                direction = new_m = beta1 * m.astype(dtype) + (1 - beta1) * g32
            t = count.astype(dtype)
            m_hat = direction / (1 - beta1**t)
            v_hat = new_v / (1 - beta2**t)
            out = m_hat / (jnp.sqrt(v_hat) + jnp.asarray(eps, dtype))
            return out.astype(g.dtype), new_m.astype(m.dtype), new_v.astype(v.dtype)

        triples = jax.tree_util.tree_map_with_path(
            one, updates, state.neuron_adam_mu, state.neuron_adam_nu, axes
        )

        def pick(i: int) -> Any:  # the i-th of the (update, mu, nu) triples, as a tree
            return jax.tree.map(lambda _, t: t[i], updates, triples)

        new_state = ScaleByNeuronAdamState(
            neuron_adam_count=count, neuron_adam_mu=pick(1), neuron_adam_nu=pick(2)
        )
        return pick(0), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def neuron_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    first_moment: str = "full",
    fan_in: FanIn = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam with one second moment per neuron (Adam-mini's rule, or all-per-neuron state).

    The neuron-wise counterpart of :func:`optax.adam`: a chain of
    :func:`scale_by_neuron_adam` and :func:`optax.scale_by_learning_rate`,

    .. math::

      u_t = -\eta_t\, \frac{d_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon},

    with :math:`v_t` the per-neuron second moment and :math:`d_t` the full
    first moment (``first_moment="full"``) or the neuron-mean accumulator
    (``"neuron"``); see :func:`scale_by_neuron_adam` for the math and proof.

    Args:
      learning_rate: a scalar or an :class:`optax.Schedule`.
      b1: :math:`\beta_1` in ``[0, 1)``.
      b2: :math:`\beta_2` in ``[0, 1)``.
      eps: :math:`\epsilon \ge 0`.
      first_moment: ``"full"`` or ``"neuron"``.
      fan_in: fan-in axes (``None``: the Flax preset).
      mu_dtype: dtype of the first moment (default: the params').

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from optax_neuron import neuron_adam
      >>> params = {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}
      >>> loss = lambda p: jnp.sum((jnp.ones(4) @ p["kernel"] + p["bias"] - 1.0) ** 2)
      >>> tx = neuron_adam(learning_rate=0.05)
      >>> state = tx.init(params)
      >>> for _ in range(200):
      ...     updates, state = tx.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(loss(params) < 1e-3)
      True
    """
    return optax.chain(
        scale_by_neuron_adam(
            b1=b1, b2=b2, eps=eps, first_moment=first_moment, fan_in=fan_in, mu_dtype=mu_dtype
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def neuron_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 1e-4,
    mask: Any = None,
    first_moment: str = "full",
    fan_in: FanIn = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Neuron-wise Adam with decoupled weight decay, like :func:`optax.adamw`.

    A chain of :func:`scale_by_neuron_adam`, :func:`optax.add_decayed_weights`
    and :func:`optax.scale_by_learning_rate` (Loshchilov & Hutter 2019):

    .. math::

      u_t = -\eta_t \Big(\frac{d_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)}
      + \epsilon} + \lambda\, w_{t-1}\Big).

    Args:
      learning_rate: a scalar or an :class:`optax.Schedule`.
      b1: :math:`\beta_1` in ``[0, 1)``.
      b2: :math:`\beta_2` in ``[0, 1)``.
      eps: :math:`\epsilon \ge 0`.
      weight_decay: :math:`\lambda` (Optax's default for ``adamw`` is 1e-4).
      mask: which leaves are decayed, as in :func:`optax.adamw` (a tree of
        booleans or a callable ``params -> tree``); ``None`` decays all.
      first_moment: ``"full"`` or ``"neuron"``.
      fan_in: fan-in axes (``None``: the Flax preset).
      mu_dtype: dtype of the first moment (default: the params').

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs
      ``params`` (for the weight decay).

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_neuron import neuron_adamw
      >>> params = {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}
      >>> no_bias = lambda p: {"kernel": True, "bias": False}
      >>> tx = neuron_adamw(1e-3, weight_decay=0.1, mask=no_bias)
      >>> zero = {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}
      >>> updates, _ = tx.update(zero, tx.init(params), params)
      >>> round(float(updates["kernel"][0, 0]), 8), abs(float(updates["bias"][0]))  # -lr*wd*w
      (-0.0001, 0.0)
    """
    return optax.chain(
        scale_by_neuron_adam(
            b1=b1, b2=b2, eps=eps, first_moment=first_moment, fan_in=fan_in, mu_dtype=mu_dtype
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
