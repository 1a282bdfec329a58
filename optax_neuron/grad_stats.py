"""Running gradient statistics for monitoring: means, norms, and a flat read-out.

Three pieces, all plain Optax transformations that keep their numbers in the
optimizer state, and one function that reads them back:

* :func:`running_gradient_mean` keeps the running mean of the incoming
  updates, either the *cumulative* mean over every step so far or an
  exponential moving average (EMA). By default it passes the updates through
  untouched (pure monitoring); ``emit="mean"`` outputs the mean instead (an
  averaged-gradient optimizer piece).
* :func:`gradient_norms` keeps per-leaf L2 norms, the global L2 norm and
  per-neuron L2 norms (over each leaf's fan-in axes, see
  :mod:`optax_neuron.fan_in`) of the incoming updates, and passes the updates
  through untouched.
* :func:`collect_metrics` collects all of these from anywhere inside an optimizer state
  (``optax.chain``, ``inject_hyperparams``, ``MultiSteps``, ``masked``, the
  ``opt_state`` of ``flax.nnx.Optimizer``) into a flat ``{name: array}`` dict
  keyed by parameter path, e.g. ``gradient_norm/conv1/kernel``, ready for a
  logger (:func:`optax_neuron.tensorboard.write_metrics` writes it to
  TensorBoard).

All numbers are computed on the updates *as they arrive at the piece*: put the
pieces first in a chain to watch raw gradients, or after a clipping / scaling
step to watch what that step produced.

Relation to ``optax.snapshot``, ``optax.monitor`` and ``optax.measure_with_ema``
(Optax 0.2.6+/0.2.7+): these store arbitrary measurements of the updates under
a user-chosen name. The norms here could be written as measures for them, and
:func:`leaf_norms` and :func:`neuron_norms` are exported as such measures
(``optax.snapshot("gradient_norm", leaf_norms)``). We still ship
:func:`gradient_norms` as a transformation of its own because

1. ``optax.monitor`` starts from an *empty* measurements dict and fills it on
   the first update, so its state changes structure after ``init``: ``jax.jit``
   traces the step twice and ``optax.MultiSteps`` (whose ``lax.cond`` needs
   both branches to return the same structure) rejects it;
   our states have a fixed structure from ``init`` on;
2. per-neuron norms need the fan-in axes of every leaf, resolved from
   parameter paths by :func:`optax_neuron.fan_in.fan_in_axes`;
3. fixed, project-unique field names (``gradient_norm``,
   ``gradient_global_norm``, ``gradient_neuron_norm``) let ``optax.tree.get``
   and :func:`collect_metrics` find them without a naming convention.

:func:`running_gradient_mean` with a ``decay`` is the update-tree analogue of
``measure_with_ema`` (which averages a *measurement*, not the updates), with the
cumulative mean as the ``decay=None`` case. :func:`collect_metrics` also reads the
*scalar* measurements of ``optax.snapshot`` and ``optax.monitor`` states, under
``<measure name>`` or ``<measure name>/<parameter path>``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_neuron._tree import at_least_float32, leaves_with_paths, path_str
from optax_neuron._validate import check_float_dtype, check_unit_interval, require_numeric
from optax_neuron.fan_in import FanIn, fan_in_axes

__all__ = [
    "GradientNormsState",
    "RunningGradientMeanState",
    "collect_metrics",
    "gradient_norms",
    "leaf_norms",
    "neuron_norms",
    "running_gradient_mean",
]

_EMIT = ("updates", "mean")


class RunningGradientMeanState(NamedTuple):
    """State of :func:`running_gradient_mean`.

    Attributes:
      gradient_mean_count: number of updates averaged so far (int32).
      gradient_mean: the running mean (debiased when ``debias=True``), one
        leaf per parameter, in the accumulator dtype.
    """

    gradient_mean_count: jax.Array
    gradient_mean: optax.Updates


class GradientNormsState(NamedTuple):
    """State of :func:`gradient_norms` (all float32, zero before the first update).

    Attributes:
      gradient_norm: per-leaf L2 norms, a tree of scalars shaped like the params.
      gradient_global_norm: the L2 norm of all leaves together.
      gradient_neuron_norm: per-neuron L2 norms, a tree of arrays of shape
        ``neuron_shape(leaf.shape, fan_in_axes)`` (fan-in axes kept as size 1);
        ``None`` when ``per_neuron=False``.
    """

    gradient_norm: Any
    gradient_global_norm: jax.Array
    gradient_neuron_norm: Any


def _acc_dtype(dtype: Any, accumulator_dtype: Any) -> Any:
    if accumulator_dtype is not None:
        return jnp.dtype(accumulator_dtype)
    # float16/bfloat16 and integers accumulate in float32; float32/64 stay.
    return at_least_float32(dtype)


def _require_float_to_emit(updates: optax.Updates) -> None:
    for path, g in leaves_with_paths(updates, keep_none=False)[0]:
        if not jnp.issubdtype(g.dtype, jnp.inexact):
            raise TypeError(
                f"running_gradient_mean(emit='mean'): update {path!r} has dtype {g.dtype}, and "
                "its running mean would be rounded to it; use emit='updates' (monitoring) or "
                "mask the leaf out"
            )


def running_gradient_mean(
    decay: float | None = None,
    debias: bool | jax.Array = True,
    emit: str = "updates",
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Running mean of the incoming updates (cumulative or exponential).

    With :math:`g_t` the updates at step :math:`t = 1, 2, \dots` the state
    keeps :math:`\bar g_t = \bar g_{t-1} + w_t\,(g_t - \bar g_{t-1})`,
    :math:`\bar g_0 = 0`, with

    * ``decay=None``: :math:`w_t = 1/t`, so :math:`\bar g_t = \frac1t\sum_{s\le t} g_s`,
      the cumulative mean (Welford's update). It equals the recursion
      ``avg = avg * (1 - 1/t) + g / t`` but adds a small correction to the
      mean instead of rescaling it, which rounds less.
    * ``decay`` in (0, 1), ``debias=False``: :math:`w_t = 1 - \beta`, the EMA
      :math:`\bar g_t = \beta\,\bar g_{t-1} + (1-\beta)\,g_t`.
    * ``decay`` in (0, 1), ``debias=True``: :math:`w_t = (1-\beta)/(1-\beta^t)`,
      which keeps the bias-corrected EMA :math:`m_t / (1-\beta^t)` (as in Adam)
      directly; as :math:`\beta \to 1` it becomes the cumulative mean.

    The mean lives in the state field ``gradient_mean`` (find it in any chain
    with ``optax.tree.get(state, "gradient_mean")``) and the step count in
    ``gradient_mean_count`` (int32; it saturates at :math:`2^{31}-1` through
    ``optax.safe_increment``, after which the cumulative mean uses the weight
    :math:`1/(2^{31}-1)`; in float32 the mean stops moving long before that,
    once :math:`1/t` is below the rounding of its entries).

    Args:
      decay: ``None`` for the cumulative mean, or the EMA decay :math:`\beta`
        in (0, 1) (may be injected by ``optax.inject_hyperparams``).
      debias: correct the EMA's bias towards its zero start (ignored when
        ``decay=None``).
      emit: ``"updates"`` returns the incoming updates object unchanged (pure
        monitoring); ``"mean"`` returns the running mean, cast to the dtype of
        each update leaf.
      accumulator_dtype: dtype of the mean; default float32 for float16 and
        bfloat16 updates, the update dtype otherwise.

    Integer and boolean leaves are averaged in float32 (or ``accumulator_dtype``).

    Raises:
      TypeError: ``decay`` not a number; a parameter or update that is not a
        number (``float0``, an object); with ``emit="mean"``, an integer or
        boolean update, which the mean cannot be cast back to (paths are named).
      ValueError: ``decay`` outside (0, 1); an unknown ``emit``; a
        non-floating-point ``accumulator_dtype``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``None`` leaves (masked
      parameters) pass through.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(running_gradient_mean(), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> for g in (1.0, 2.0, 6.0):
      ...     _, state = tx.update({"w": jnp.full(2, g)}, state, params)
      >>> optax.tree.get(state, "gradient_mean")["w"]
      Array([3., 3.], dtype=float32)
    """
    if emit not in _EMIT:
        raise ValueError(f"running_gradient_mean: emit must be one of {_EMIT}, got {emit!r}")
    check_unit_interval(decay, "decay", "running_gradient_mean", open_low=True, allow_none=True)
    accumulator_dtype = check_float_dtype(
        accumulator_dtype, "accumulator_dtype", "running_gradient_mean"
    )

    def init_fn(params: optax.Params) -> RunningGradientMeanState:
        require_numeric(params, "running_gradient_mean", "parameters")

        def zeros(p: jax.Array) -> jax.Array:
            return jnp.zeros(jnp.shape(p), _acc_dtype(p.dtype, accumulator_dtype))

        return RunningGradientMeanState(
            gradient_mean_count=jnp.zeros([], jnp.int32), gradient_mean=jax.tree.map(zeros, params)
        )

    def update_fn(
        updates: optax.Updates,
        state: RunningGradientMeanState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, RunningGradientMeanState]:
        del params, extra_args
        require_numeric(updates, "running_gradient_mean", "updates")
        if emit == "mean":
            _require_float_to_emit(updates)
        count: jax.Array = optax.safe_increment(state.gradient_mean_count)

        def weight(dtype: Any) -> jax.Array:  # w_t, computed in the accumulator dtype
            t: jax.Array = count.astype(dtype)
            if decay is None:
                return 1.0 / t
            beta = jnp.asarray(decay).astype(dtype)
            if isinstance(debias, bool) and not debias:
                return 1.0 - beta
            debiased = (1.0 - beta) / (1.0 - beta**t)
            if isinstance(debias, bool):
                return debiased
            return jnp.where(debias, debiased, 1.0 - beta)  # a traced bool

        def step(m: jax.Array, g: jax.Array) -> jax.Array:
            return m + weight(m.dtype) * (g.astype(m.dtype) - m)

        mean = jax.tree.map(step, state.gradient_mean, updates)
        new_state = RunningGradientMeanState(gradient_mean_count=count, gradient_mean=mean)
        if emit == "updates":
            return updates, new_state
        return jax.tree.map(lambda m, g: m.astype(g.dtype), mean, updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _norm32(x: jax.Array, axis: Any = None, keepdims: bool = False) -> jax.Array:
    """L2 norm taken in at least float32 (integers and booleans included)."""
    x = jnp.asarray(x)
    x = x.astype(at_least_float32(x.dtype))
    squares = jnp.square(jnp.abs(x)) if jnp.iscomplexobj(x) else jnp.square(x)
    return jnp.sqrt(jnp.sum(squares, axis=axis, keepdims=keepdims))


def leaf_norms(tree: Any) -> Any:
    r"""The L2 norm :math:`\lVert x \rVert_2` of every leaf (float32 at least): a tree of scalars.

    Usable as a measure for ``optax.snapshot`` / ``optax.monitor``.

    Example:
      >>> import jax.numpy as jnp
      >>> leaf_norms({"a": jnp.array([3.0, 4.0])})
      {'a': Array(5., dtype=float32)}
    """
    return jax.tree.map(_norm32, tree)


def neuron_norms(tree: Any, fan_in: FanIn = None) -> Any:
    r"""Per-neuron L2 norms :math:`\sqrt{\sum_{i \in A} g_i^2}` over each leaf's fan-in axes.

    Each result has shape ``neuron_shape(leaf.shape, axes)``: the fan-in axes
    are kept with size 1, so it broadcasts against the leaf. A leaf with no
    fan-in axes (a bias) gives ``|g|`` elementwise.

    Args:
      tree: updates or parameters.
      fan_in: any form accepted by :func:`optax_neuron.fan_in.fan_in_axes`
        (``None`` = the default preset).

    Example:
      >>> import jax.numpy as jnp
      >>> neuron_norms({"dense": {"kernel": jnp.ones((4, 3))}})["dense"]["kernel"]
      Array([[2., 2., 2.]], dtype=float32)
    """
    axes = fan_in_axes(tree, fan_in)
    return jax.tree.map(lambda g, a: _norm32(g, axis=a, keepdims=True), tree, axes)


def gradient_norms(
    fan_in: FanIn = None, per_neuron: bool = True
) -> optax.GradientTransformationExtraArgs:
    r"""Record L2 norms of the incoming updates in the state; pass the updates through.

    For updates :math:`g` the state keeps

    * ``gradient_norm``: :math:`\lVert g^{(\ell)} \rVert_2` for every leaf :math:`\ell`;
    * ``gradient_global_norm``: :math:`\sqrt{\sum_\ell \lVert g^{(\ell)} \rVert_2^2}`
      (what ``optax.clip_by_global_norm`` compares with its threshold);
    * ``gradient_neuron_norm``: for every neuron :math:`j` of every leaf,
      :math:`\sqrt{\sum_{i \in \mathrm{fan\_in}(j)} g_{ij}^2}`, an array of shape
      ``neuron_shape(leaf.shape, axes)`` (see :func:`neuron_norms`).

    Norms are float32 (float64 for float64 updates) and zero before the first
    update; integer and boolean leaves are measured in float32. Read them with
    :func:`collect_metrics` or ``optax.tree.get``.

    Args:
      fan_in: fan-in axes for the per-neuron norms, any form accepted by
        :func:`optax_neuron.fan_in.fan_in_axes` (default: the default preset).
      per_neuron: keep per-neuron norms (``False`` stores ``None`` and needs
        no fan-in rules).

    Raises:
      TypeError: a parameter or update that is not a number (``float0``, an
        object); its path is named.
      ValueError: a ``fan_in`` that does not fit the parameters (path named).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(gradient_norms(), optax.sgd(0.1))
      >>> params = {"dense": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}}
      >>> state = tx.init(params)
      >>> grads = {"dense": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.array([3.0, 0.0])}}
      >>> _, state = tx.update(grads, state, params)
      >>> optax.tree.get(state, "gradient_global_norm")
      Array(5., dtype=float32)
      >>> optax.tree.get(state, "gradient_neuron_norm")["dense"]["kernel"]
      Array([[2.828427, 2.828427]], dtype=float32)
    """
    per_neuron = bool(per_neuron)

    def measure(tree: Any) -> tuple[Any, jax.Array, Any]:
        norms = leaf_norms(tree)
        squares = [jnp.square(n.astype(jnp.float32)) for n in jax.tree.leaves(norms)]
        global_norm = jnp.sqrt(sum(squares)) if squares else jnp.zeros([], jnp.float32)
        neurons = neuron_norms(tree, fan_in) if per_neuron else None
        return norms, global_norm, neurons

    def init_fn(params: optax.Params) -> GradientNormsState:
        require_numeric(params, "gradient_norms", "parameters")
        norms, global_norm, neurons = jax.eval_shape(measure, params)

        def zeros(s: jax.ShapeDtypeStruct) -> jax.Array:
            return jnp.zeros(s.shape, s.dtype)

        return GradientNormsState(
            gradient_norm=jax.tree.map(zeros, norms),
            gradient_global_norm=zeros(global_norm),
            gradient_neuron_norm=jax.tree.map(zeros, neurons),
        )

    def update_fn(
        updates: optax.Updates,
        state: GradientNormsState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, GradientNormsState]:
        del state, params, extra_args
        require_numeric(updates, "gradient_norms", "updates")
        norms, global_norm, neurons = measure(updates)
        return updates, GradientNormsState(norms, global_norm, neurons)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------- read-out


def _is_variable(x: Any) -> bool:
    # flax.nnx Variables (nnx.Optimizer's OptArray / OptVariable) without importing flax.
    return hasattr(x, "get_value") and hasattr(x, "get_metadata")


def _unwrap(tree: Any) -> Any:
    def value(v: Any) -> Any:
        return v.get_value() if _is_variable(v) else v

    return jax.tree.map(value, tree, is_leaf=_is_variable)


_STATES = (RunningGradientMeanState, GradientNormsState, optax.SnapshotState, optax.MonitorState)


def _is_state(x: Any) -> bool:
    return isinstance(x, _STATES)


def _with_paths(tree: Any) -> list[tuple[str, Any]]:
    return leaves_with_paths(tree, keep_none=False)[0]


def _key(kind: str, path: str) -> str:
    return f"{kind}/{path}" if path else kind


def _entries(state: Any, per_neuron: bool) -> list[tuple[str, jax.Array]]:
    out: list[tuple[str, jax.Array]] = []
    if isinstance(state, RunningGradientMeanState):
        for p, m in _with_paths(state.gradient_mean):
            out.append((_key("gradient_mean_norm", p), _norm32(m)))
    elif isinstance(state, GradientNormsState):
        out += [(_key("gradient_norm", p), n) for p, n in _with_paths(state.gradient_norm)]
        out.append(("gradient_norm/global", state.gradient_global_norm))
        if per_neuron and state.gradient_neuron_norm is not None:
            neurons = _with_paths(state.gradient_neuron_norm)
            out += [(_key("gradient_neuron_norm", p), n) for p, n in neurons]
    else:  # optax.snapshot / optax.monitor: scalar measurements only
        snapshot = isinstance(state, optax.SnapshotState)
        measured = state.measurement if snapshot else state.measurements
        for name, value in measured.items():
            out += [(_key(str(name), p), v) for p, v in _with_paths(value) if jnp.ndim(v) == 0]
    return out


def collect_metrics(opt_state: Any, *, per_neuron: bool = False) -> dict[str, jax.Array]:
    """Collect the monitoring values of an optimizer state into a flat dict.

    Searches the whole state, so the pieces may sit anywhere: inside
    ``optax.chain`` tuples, ``inject_hyperparams``, ``MultiSteps``,
    ``masked``/``partition``, or ``nnx.Optimizer(...).opt_state`` (whose
    ``Variable`` wrappers are unwrapped). Keys are ``<kind>/<parameter path>``
    with paths from :func:`optax_neuron.fan_in.path_str`:

    * ``gradient_norm/<path>`` and ``gradient_norm/global`` (scalars), from
      :func:`gradient_norms`;
    * ``gradient_neuron_norm/<path>`` (arrays of the neuron shape), only with
      ``per_neuron=True``;
    * ``gradient_mean_norm/<path>``: the L2 norm of each leaf's running mean,
      from :func:`running_gradient_mean`;
    * ``<name>`` or ``<name>/<path>``: scalar measurements of
      ``optax.snapshot`` / ``optax.monitor`` states.

    For a single-array parameter (no tree) the path is empty and the key is just
    ``<kind>``. When the same key would come from two states (e.g. two
    ``gradient_norms`` in one chain, before and after clipping), every key of
    those states is prefixed with the state's location in ``opt_state``, e.g.
    ``0/gradient_norm/global`` and ``2/gradient_norm/global``, so nothing is
    silently overwritten.

    Args:
      opt_state: any optimizer state (or a tree holding several).
      per_neuron: include the per-neuron norm arrays (default: scalars only).

    Returns:
      ``{key: jax.Array}`` sorted by key; empty when no monitoring state is found.
      Works inside and outside ``jax.jit``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(gradient_norms(), running_gradient_mean(), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
      >>> {k: float(v) for k, v in collect_metrics(state).items()}
      {'gradient_mean_norm/w': 5.0, 'gradient_norm/global': 5.0, 'gradient_norm/w': 5.0}
    """
    opt_state = _unwrap(opt_state)
    found, _ = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_state)
    groups = [(path_str(p), _entries(s, per_neuron)) for p, s in found if _is_state(s)]
    counts: dict[str, int] = {}
    for _, entries in groups:
        for k in {k for k, _ in entries}:
            counts[k] = counts.get(k, 0) + 1
    out: dict[str, jax.Array] = {}
    for where, entries in groups:
        clash = any(counts[k] > 1 for k, _ in entries)
        for k, v in entries:
            key = _key(where, k) if clash and where else k
            if key in out:
                raise ValueError(
                    f"collect_metrics: two monitoring values share the key {key!r}; give the "
                    "parameter or the measurement another name"
                )
            out[key] = v
    return dict(sorted(out.items()))
