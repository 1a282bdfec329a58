"""Neuron-mean momentum: momentum shared by all incoming connections of a neuron.

The original question (a TensorFlow optimizer): in SGD with momentum, replace the
momentum of a connection by the mean momentum of all *incoming* connections of
the same neuron. For the connection ``(2, 5)`` from neuron 2 to neuron 5, whose
incoming connections are ``(2, 5)`` and ``(3, 5)``::

    acc_mean  = (acc(2,5) + acc(3,5)) / 2
    acc(2,5) <- grad(2,5) + mu * acc_mean
    var      -= lr * acc

In a Flax ``Dense`` kernel ``W[in, out]`` the incoming connections of output
neuron ``j`` are ``W[:, j]``, so the mean runs over axis 0, the *fan-in* axis;
for a convolution ``W[h, w, in, out]`` over axes 0, 1, 2. Which axes they are is
decided per parameter path by :mod:`optax_neuron.fan_in`.

Writing ``mean`` for the mean over the fan-in axes (kept as size-1 dims), the
TensorFlow optimizer from the question keeps a full per-connection accumulator
``a_t = g_t + mu * mean(a_{t-1})``.
Since ``mean`` is linear and ``mean(mean(x)) = mean(x)``,
``mean(a_t) = mean(g_t) + mu * mean(a_{t-1})``: the per-neuron value
``m_t = mean(a_t)`` obeys its own recursion and is all that needs to be kept.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_neuron._tree import at_least_float32, fan_in_mean, path_str
from optax_neuron._validate import (
    check_float_dtype,
    check_learning_rate,
    check_unit_interval,
    require_floating,
)
from optax_neuron.fan_in import FanIn, fan_in_axes, neuron_shape

__all__ = ["NeuronMeanTraceState", "neuron_mean_sgd", "neuron_mean_trace"]


class NeuronMeanTraceState(NamedTuple):
    """State of :func:`neuron_mean_trace`.

    Attributes:
      neuron_momentum: one momentum value per neuron: a tree shaped like the
        parameters in which every fan-in axis has size 1 (leaves without
        fan-in axes keep their full shape; ``None`` leaves stay ``None``).
    """

    neuron_momentum: optax.Params


def neuron_mean_trace(
    decay: jax.typing.ArrayLike,
    nesterov: bool = False,
    fan_in: FanIn = None,
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Momentum whose state is the mean over the incoming connections of each neuron.

    The neuron-mean counterpart of :func:`optax.trace`. With :math:`\mu` the
    ``decay``, :math:`g_t` the incoming updates of a leaf and
    :math:`\bar x` the mean of :math:`x` over the leaf's fan-in axes (kept as
    size-1 dims, so it broadcasts back over the connections of each neuron):

    .. math::

      m_t &= \bar g_t + \mu\, m_{t-1}, \qquad m_0 = 0, \\
      u_t &= g_t + \mu\, m_{t-1} \quad\text{(or } g_t + \mu\, m_t
      \text{ with Nesterov).}

    This is exactly the TensorFlow optimizer from the original question, which
    keeps a full per-connection accumulator :math:`a_t = g_t + \mu\, \bar a_{t-1}` and returns
    :math:`u_t = a_t` (Nesterov: :math:`g_t + \mu\, \bar a_t`). Proof: the mean
    is linear and :math:`\bar{\bar x} = \bar x`, so
    :math:`\bar a_t = \bar g_t + \mu\, \bar a_{t-1}`, the recursion of
    :math:`m_t` with the same start :math:`\bar a_0 = m_0 = 0`; hence
    :math:`m_t = \bar a_t` for every :math:`t` and the updates coincide. The
    state keeps one value per neuron: ``fan_in`` times less memory than the
    accumulator. Leaves with no fan-in axes (biases, norm scales, embedding
    tables) get plain momentum, :math:`\bar x = x`.

    Numerics: the fan-in mean is taken in the promoted dtype of the update and
    the state, and at least in float32 (a float16/bfloat16 sum over a large
    fan-in cannot overflow). The state keeps the dtype it was created with (the
    parameters' dtype, or ``accumulator_dtype``); the output keeps the dtype of
    the incoming updates.

    Args:
      decay: the momentum :math:`\mu`, in ``[0, 1)`` (checked when it is a
        concrete number; it may be a traced array under
        :func:`optax.inject_hyperparams`).
      nesterov: use Nesterov momentum.
      fan_in: the fan-in axes of every leaf: ``None`` (the
        :data:`optax_neuron.fan_in.FLAX` preset), a rules list, a tree of axes
        or a callable; see :func:`optax_neuron.fan_in.fan_in_axes`. Static.
      accumulator_dtype: dtype of the per-neuron state; ``None`` uses the dtype
        of the parameters.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`NeuronMeanTraceState`.

    Raises:
      ValueError: ``decay`` outside ``[0, 1)``; a ``fan_in`` that does not fit
        the parameters (the path is named).
      TypeError: ``decay`` not a number; a non-floating-point parameter or
        update (the path is named).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from optax_neuron import neuron_mean_trace
      >>> params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
      >>> tx = neuron_mean_trace(0.9)
      >>> state = tx.init(params)
      >>> state.neuron_momentum["dense"]["kernel"].shape  # one value per neuron
      (1, 2)
      >>> grads = {"dense": {"kernel": jnp.array([[1., 2.], [3., 4.], [5., 6.]]),
      ...                    "bias": jnp.ones(2)}}
      >>> updates, state = tx.update(grads, state)
      >>> state.neuron_momentum["dense"]["kernel"]  # mean over the 3 inputs
      Array([[3., 4.]], dtype=float32)
    """
    check_unit_interval(decay, "decay", "neuron_mean_trace")
    return _trace(decay, nesterov, fan_in, accumulator_dtype)


def _trace(
    decay: jax.typing.ArrayLike, nesterov: bool, fan_in: FanIn, accumulator_dtype: Any | None
) -> optax.GradientTransformationExtraArgs:
    """:func:`neuron_mean_trace` without the argument check (its callers check ``decay``)."""
    accumulator_dtype = check_float_dtype(accumulator_dtype, "accumulator_dtype")

    def init_fn(params: optax.Params) -> NeuronMeanTraceState:
        require_floating(params, "neuron-mean momentum", "parameters")
        axes = fan_in_axes(params, fan_in)

        def zeros(p: jax.Array, ax: tuple[int, ...]) -> jax.Array:
            dtype = p.dtype if accumulator_dtype is None else accumulator_dtype
            return jnp.zeros(neuron_shape(p.shape, ax), dtype)

        return NeuronMeanTraceState(neuron_momentum=jax.tree.map(zeros, params, axes))

    def update_fn(
        updates: optax.Updates,
        state: NeuronMeanTraceState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, NeuronMeanTraceState]:
        del params, extra_args
        require_floating(updates, "neuron-mean momentum", "updates")
        axes = fan_in_axes(updates, fan_in)

        def one(
            key_path: Any, g: jax.Array, m: jax.Array, ax: tuple[int, ...]
        ) -> tuple[jax.Array, jax.Array]:
            expected = neuron_shape(g.shape, ax)
            if m.shape != expected:
                raise ValueError(
                    f"the state of parameter {path_str(key_path)!r} has shape {m.shape}, "
                    f"expected {expected} for updates of shape {g.shape} with fan-in axes "
                    f"{ax}: was the state made with another fan_in or other parameters?"
                )
            dtype = at_least_float32(g.dtype, m.dtype)
            g_mean = fan_in_mean(g, ax, dtype)
            decayed = decay * m
            new_m = g_mean + decayed
            out = g + (decay * new_m if nesterov else decayed)
            return out.astype(g.dtype), new_m.astype(m.dtype)

        pairs = jax.tree_util.tree_map_with_path(one, updates, state.neuron_momentum, axes)
        new_updates = jax.tree.map(lambda _, pair: pair[0], updates, pairs)
        new_m = jax.tree.map(lambda _, pair: pair[1], updates, pairs)
        return new_updates, NeuronMeanTraceState(neuron_momentum=new_m)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def neuron_mean_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: jax.typing.ArrayLike = 0.9,
    nesterov: bool = False,
    fan_in: FanIn = None,
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD with neuron-mean momentum: the optimizer of the original question, any layer type.

    The neuron-mean counterpart of :func:`optax.sgd`: a chain of
    :func:`neuron_mean_trace` and :func:`optax.scale_by_learning_rate`. With
    :math:`\eta` the learning rate and :math:`\bar x` the mean over the fan-in
    axes of each leaf,

    .. math::

      m_t = \bar g_t + \mu\, m_{t-1}, \qquad
      u_t = -\eta_t\,(g_t + \mu\, m_{t-1})
      \quad(\text{Nesterov: } -\eta_t\,(g_t + \mu\, m_t)),

    which equals the question's ``acc <- grad + mu * mean_fanin(acc)``,
    ``var -= lr * acc`` step for step (see :func:`neuron_mean_trace` for the
    proof) while keeping one state value per neuron.

    Args:
      learning_rate: a scalar or an :class:`optax.Schedule`.
      momentum: :math:`\mu` in ``[0, 1)``.
      nesterov: use Nesterov momentum.
      fan_in: fan-in axes (see :func:`optax_neuron.fan_in.fan_in_axes`);
        ``None`` is the Flax preset.
      accumulator_dtype: dtype of the per-neuron state (default: the params').

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      TypeError: ``learning_rate`` neither a number nor a schedule; ``momentum``
        not a number.
      ValueError: ``momentum`` outside ``[0, 1)``; a NaN or infinite learning rate.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from optax_neuron import neuron_mean_sgd
      >>> params = {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}
      >>> loss = lambda p: jnp.sum((jnp.ones(4) @ p["kernel"] + p["bias"] - 1.0) ** 2)
      >>> tx = neuron_mean_sgd(learning_rate=0.01, momentum=0.9)
      >>> state = tx.init(params)
      >>> for _ in range(100):
      ...     updates, state = tx.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(loss(params) < 1e-3)
      True
    """
    check_learning_rate(learning_rate, "neuron_mean_sgd")
    check_unit_interval(momentum, "momentum", "neuron_mean_sgd")
    return optax.chain(
        _trace(momentum, nesterov, fan_in, accumulator_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )
