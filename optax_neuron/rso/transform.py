"""The Optax transformation :func:`rso`, its state and :func:`rso_init`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_neuron import _random
from optax_neuron._tree import is_none
from optax_neuron._validate import check_rule_list, check_unit_interval
from optax_neuron.fan_in import fan_in_axes, fan_in_size
from optax_neuron.rso.layers import LayerStack
from optax_neuron.rso.plan import Plan, SigmaSpec, make_plan, owners, sigma_of
from optax_neuron.rso.search import Search, run

_STATIC = (
    "static_args=('seed', 'weights_per_step', 'sigma', 'anneal', 'order', 'search', "
    "'within', 'fan_in', 'per_weight_batch', 'fast_path')"
)
_FAST_PATHS = ("incremental", "cache", "off")
_WITHIN = ("row-major", "neuron")


class RSOState(NamedTuple):
    """State of :func:`rso`.

    Attributes:
      rso_cursor: position ``n`` of the next weight in the visiting order (int32).
      rso_cycle: number of completed cycles (int32).
      rso_sigma: ``{path: sigma_d}`` (float32) for every searched leaf, fixed at ``init``.
      rso_accepted: ``{path: count}`` (int32): accepted proposals per searched leaf.
      rso_loss: the loss of the parameters returned by the last ``update`` (float32;
        with a fresh batch per weight on the last weight's minibatch; NaN before).
    """

    rso_cursor: jax.Array
    rso_cycle: jax.Array
    rso_sigma: dict[str, jax.Array]
    rso_accepted: dict[str, jax.Array]
    rso_loss: jax.Array


def _explicit_spec(x: Any):
    """The sharding of ``x`` if it is sharded over Explicit mesh axes, else None."""
    try:
        sharding = jax.typeof(x).sharding
    except (TypeError, AttributeError):
        return None
    mesh = getattr(sharding, "mesh", None)
    spec = getattr(sharding, "spec", None)
    if mesh is None or spec is None or not any(a is not None for a in spec):
        return None
    explicit = getattr(mesh, "explicit_axes", None)
    if explicit is None:
        types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ()), strict=True))
        explicit = tuple(n for n, t in types.items() if t == jax.sharding.AxisType.Explicit)
    # A NamedSharding on the array's own (abstract) mesh: no mesh context needed.
    return jax.sharding.NamedSharding(mesh, spec) if explicit else None


def _gathered(x: Any) -> tuple[Any, Any]:
    """``x`` replicated (when sharded over Explicit axes) and the sharding to return it to.

    The search reads and writes single elements at traced positions; on an Explicit
    mesh that is a type error for a sharded leaf (a ``ravel`` of a sharded axis), so the
    visited leaves are gathered for the call and the update is resharded at the end.
    """
    spec = _explicit_spec(x)
    if spec is None:
        return x, None
    replicated = jax.sharding.NamedSharding(spec.mesh, jax.sharding.PartitionSpec())
    return jax.sharding.reshard(x, replicated), spec


def _python_int(name: str, value: Any, low: int | None) -> int:
    if isinstance(value, jax.Array):
        raise TypeError(
            f"rso: {name} shapes the search and must be a Python int, got a JAX array; under "
            f"optax.inject_hyperparams list it in static_args, e.g. {_STATIC}"
        )
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"rso: {name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"rso: {name} must be an int >= {low}, got {value!r}")
    return int(value)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"rso: {name} must be one of {allowed}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class _Config:
    """The arguments of :func:`rso`, validated once (see its docstring)."""

    seed: int
    weights_per_step: int
    sigma: SigmaSpec
    anneal: Callable[[jax.Array], Any] | None
    order: Any
    within: str
    search: tuple[tuple[str, Any], ...] | None
    weight_decay: Any  # float, or a scalar traced by optax.inject_hyperparams
    fan_in: Any
    per_weight_batch: bool
    fast_path: str

    @property
    def decay(self) -> bool:
        """Whether a visit decays the weight (always when the decay is traced)."""
        return isinstance(self.weight_decay, jax.core.Tracer) or self.weight_decay != 0.0

    @property
    def needs_axes(self) -> bool:
        rules = self.sigma if isinstance(self.sigma, tuple) else ()
        return self.sigma == "he" or any(v == "he" for _, v in rules)


def _config(
    seed, weights_per_step, sigma, anneal, order, within, search, weight_decay, fan_in,
    per_weight_batch, fast_path,
) -> _Config:  # fmt: skip
    if isinstance(sigma, (list, tuple)):
        sigma = check_rule_list(sigma, "sigma", "rso")
    elif isinstance(sigma, str) and sigma != "he":
        raise ValueError(f"rso: sigma must be None, a float, 'he' or rules, got {sigma!r}")
    if anneal is not None and not callable(anneal):
        raise TypeError(f"rso: anneal must be a callable cycle -> factor, got {anneal!r}")
    check_unit_interval(weight_decay, "weight_decay", "rso")
    if not isinstance(weight_decay, jax.core.Tracer):
        weight_decay = float(weight_decay)
    if not isinstance(per_weight_batch, bool):
        raise TypeError(f"rso: per_weight_batch must be a bool, got {per_weight_batch!r}")
    return _Config(
        seed=_python_int("seed", seed, None),
        weights_per_step=_python_int("weights_per_step", weights_per_step, 1),
        sigma=sigma,
        anneal=anneal,
        order=order,
        within=_choice("within", within, _WITHIN),
        search=None if search is None else check_rule_list(search, "search", "rso"),
        weight_decay=weight_decay,
        fan_in=fan_in,
        per_weight_batch=per_weight_batch,
        fast_path=_choice("fast_path", fast_path, _FAST_PATHS),
    )


def _check_call(cfg: _Config, state: RSOState, params: Any, value_fn: Any) -> Any:
    """The checks of one ``update`` call; the dtype of the loss."""
    if params is None:
        raise ValueError(
            "rso needs the current parameters: call update(updates, state, params, value_fn=...)"
        )
    if value_fn is None or not callable(value_fn):
        key_hint = " (or value_fn(params, key) with per_weight_batch=True)"
        raise ValueError(
            "rso needs value_fn=, the loss of the parameters on the current minibatch: "
            "update(updates, state, params, value_fn=lambda p: loss(p, batch))"
            + (key_hint if cfg.per_weight_batch else "")
        )
    sampled = isinstance(value_fn, LayerStack) and value_fn.batch is not None
    if isinstance(value_fn, LayerStack) and cfg.per_weight_batch != sampled:
        raise ValueError(
            "rso: a LayerStack with batch= (rows per weight from cached layer inputs) "
            "needs per_weight_batch=True, and per_weight_batch=True with a LayerStack "
            f"needs batch=; got batch={value_fn.batch!r}, per_weight_batch={cfg.per_weight_batch}"
        )
    if sampled and cfg.fast_path == "off":
        raise ValueError(
            "rso: a LayerStack with batch= is scored from cached layer inputs; "
            "fast_path must be 'incremental' or 'cache', got 'off'"
        )
    key_args = (jax.random.key(0),) if cfg.per_weight_batch and not sampled else ()
    try:
        out = jax.eval_shape(value_fn, params, *key_args)
    except TypeError as e:
        args = "params, key" if cfg.per_weight_batch else "params"
        raise TypeError(f"rso: calling value_fn({args}) failed: {e}") from e
    if not hasattr(out, "shape") or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"rso: value_fn must return a scalar floating loss, got {out}")
    return out.dtype


def _owners(cfg: _Config, value_fn: Any, plan: Plan, leaves: list) -> tuple[int, ...] | None:
    """The layer of the stack owning each visited leaf; ``None`` for the black box."""
    if not isinstance(value_fn, LayerStack) or cfg.fast_path == "off":
        return None
    tree = jax.tree_util.tree_unflatten(plan.treedef, leaves)
    all_owners = owners(value_fn, tree, leaves, plan.treedef)
    return tuple(min(all_owners[i], len(value_fn.layers) - 1) for i in plan.visit)


def rso(
    *,
    seed: int = 0,
    weights_per_step: int = 1,
    sigma: SigmaSpec = None,
    anneal: Callable[[jax.Array], Any] | None = None,
    order: Any = None,
    within: str = "row-major",
    search: Sequence[tuple[str, bool]] | None = None,
    weight_decay: float | jax.Array = 0.0,
    fan_in: Any = None,
    per_weight_batch: bool = False,
    fast_path: str = "incremental",
) -> optax.GradientTransformationExtraArgs:
    """RSO random search as an Optax transformation (see :mod:`optax_neuron.rso`).

    Each ``update`` searches the next ``weights_per_step`` weights of the cycle: for
    weight ``w`` of leaf ``d`` at position ``n`` of cycle ``c`` it draws
    ``dw = sigma_d * anneal(c) * z``, ``z ~ N(0, 1)`` from the key of ``(c, n)``,
    decays ``w <- w (1 - weight_decay)``, and keeps the argmin of
    ``F(w), F(w + dw), F(w - dw)`` (strict comparisons: ties and NaN keep ``w``).

    Args:
      seed: seed of the PRNG scheme; same seed, same search.
      weights_per_step: weights searched per ``update`` call (inside one loop).
      sigma: ``None`` (the std of each searched leaf at ``init``, the paper's
        ``sigma_d``), a float for every leaf, ``"he"`` (``sqrt(2 / fan_in)`` from the
        leaf's fan-in axes, the official code's step), or rules
        ``[(glob, float | "he" | None)]`` (``None`` or no match: std at init), e.g.
        ``[("*scale", 0.167), ("*bias", 0.167), ("*", "he")]`` for the official
        recipe with BatchNorm.
      anneal: ``cycle -> factor`` multiplying sigma. The official
        ``0.1 + 0.9 (T - c) / T`` is ``optax.linear_schedule(1.0, 0.1, T)``.
      order: leaf order: ``None``/``"reverse"`` (last leaf of the tree first),
        ``"forward"``, or a list of globs (see :mod:`optax_neuron.rso.plan`).
      within: order inside a leaf: ``"row-major"`` or ``"neuron"`` (output neuron,
        then input channel, then kernel position: the paper's Algorithm 1).
      search: rules ``[(glob, bool)]`` choosing the searched leaves (no match: not
        searched). Default: every leaf with fan-in axes under ``fan_in`` (kernels, and
        the ``x @ W`` matrices of a plain pytree: ``{"W1": ..., "b1": ...}`` searches
        ``W1``), norm ``scale``/``offset``, and a ``bias`` only beside a ``scale``
        (dense/conv biases and embeddings are not searched, as in the official code).
      weight_decay: per visit, the visited weight becomes ``w - w * weight_decay``
        before its candidates are scored ("keep" keeps the decayed value; the official
        code uses ``1e-4``). With a decay, ``F(w)`` is scored again for every weight
        (three evaluations per weight).
      fan_in: fan-in axes for the default ``search``, ``sigma="he"`` and
        ``within="neuron"`` (any ``fan_in=`` form; default: the FLAX preset).
      per_weight_batch: ``False``: ``value_fn(params)`` is the loss on the call's
        minibatch, reused for all its weights. ``True``: ``value_fn(params, key)``
        draws a fresh minibatch from ``key`` (the weight's ``k_batch``); three
        evaluations per weight, as in the paper. Or ``value_fn`` is a
        :class:`LayerStack` over the whole data set with ``batch=B``: every weight
        is scored on ``B`` rows of the owner layer's input, computed over the whole
        set once per leaf (the official code's scheme; see :class:`LayerStack`).
      fast_path: used when ``value_fn`` is a :class:`LayerStack`.
        ``"cache"``: re-run only from the layer that
        owns the searched leaf: exactly the black-box losses. ``"incremental"``
        (default): in addition, a :func:`dense_layer`/:func:`conv_layer` kernel's
        candidate is added to the cached output as one column (a per-channel leaf of a
        :func:`channelwise` layer, e.g. a BatchNorm scale, re-runs that one channel)
        and carried through :func:`channelwise` layers to the next linear layer (one
        input-channel slice of its kernel); the losses then differ from the black box
        by float rounding only (a decision can flip only on a near-tie). ``"off"``: the
        black box.

    Returns:
      A ``GradientTransformationExtraArgs``; ``update(updates, state, params, *,
      value_fn, **extra)`` ignores ``updates`` and returns ``new_params - params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 2))
      >>> params = rso_init(jax.random.key(0), {"dense": {"kernel": jnp.zeros((3, 2))}})
      >>> loss = lambda p: jnp.mean((x @ p["dense"]["kernel"] - y) ** 2)
      >>> tx = rso(weights_per_step=6, sigma="he", within="neuron", weight_decay=1e-4)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params, value_fn=loss)
      >>> bool(loss(optax.apply_updates(params, updates)) <= loss(params))
      True
    """
    cfg = _config(
        seed, weights_per_step, sigma, anneal, order, within, search, weight_decay, fan_in,
        per_weight_batch, fast_path,
    )  # fmt: skip

    def init_fn(params):
        plan, leaves = make_plan(params, cfg.search, cfg.order, cfg.within, cfg.fan_in)
        axes = [()] * len(leaves)
        if cfg.needs_axes:
            axes = plan.treedef.flatten_up_to(fan_in_axes(params, cfg.fan_in))
        sigma_d = {
            plan.paths[i]: sigma_of(cfg.sigma, plan.paths[i], leaves[i], axes[i])
            for i in plan.visit
        }
        return RSOState(
            rso_cursor=jnp.zeros([], jnp.int32),
            rso_cycle=jnp.zeros([], jnp.int32),
            rso_sigma=sigma_d,
            rso_accepted={path: jnp.zeros([], jnp.int32) for path in sigma_d},
            rso_loss=jnp.full([], jnp.nan, jnp.float32),
        )

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        del updates, extra_args
        loss_dtype = _check_call(cfg, state, params, value_fn)
        plan, leaves = make_plan(params, cfg.search, cfg.order, cfg.within, cfg.fan_in)
        paths = [plan.paths[i] for i in plan.visit]
        if missing := [p for p in paths if p not in state.rso_sigma]:
            raise ValueError(f"rso: parameters {missing} are searched but not in the state; "
                             "was init called with these params?")  # fmt: skip
        gathered = [_gathered(leaves[i]) for i in plan.visit]  # (replicated leaf, its sharding)
        for (x, _), i in zip(gathered, plan.visit, strict=True):
            leaves[i] = x
        search = Search(
            plan=plan, leaves=leaves, p0=[jnp.ravel(x) for x, _ in gathered],
            sigma=jnp.stack([state.rso_sigma[p] for p in paths]).astype(jnp.float32),
            base=jax.random.key(cfg.seed), anneal=cfg.anneal,
            weights_per_step=cfg.weights_per_step, weight_decay=cfg.weight_decay,
            decay=cfg.decay, per_weight_batch=cfg.per_weight_batch, value_fn=value_fn,
            fast_path=cfg.fast_path, owner=_owners(cfg, value_fn, plan, leaves),
        )  # fmt: skip
        end = run(search, state.rso_cursor, state.rso_cycle, loss_dtype)
        new = [None if x is None else jnp.zeros_like(x) for x in plan.treedef.flatten_up_to(params)]
        for t, (i, (_, spec)) in enumerate(zip(plan.visit, gathered, strict=True)):
            u = end.upd[t].reshape(plan.shapes[t])
            new[i] = u if spec is None else jax.sharding.reshard(u, spec)
        accepted = {p: state.rso_accepted[p] + end.accepted[t] for t, p in enumerate(paths)}
        return jax.tree_util.tree_unflatten(plan.treedef, new), RSOState(
            rso_cursor=end.cursor,
            rso_cycle=end.cycle,
            rso_sigma=state.rso_sigma,
            rso_accepted=accepted,
            rso_loss=jnp.asarray(end.loss, jnp.float32),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rso_init(key: jax.Array, params: Any, fan_in: Any = None) -> Any:
    """The RSO paper's initialisation: ``W ~ N(0, sqrt(2 / fan_in))`` per kernel.

    Every leaf whose fan-in axes (resolved by
    :func:`optax_neuron.fan_in.fan_in_axes`) are non-empty -- Dense and Conv
    kernels -- is redrawn with standard deviation ``sqrt(2 / fan_in)``, where
    ``fan_in`` is the product of its fan-in dimensions. Leaves with no fan-in
    axes (biases, norm scales and offsets) and ``None`` leaves are returned
    unchanged (the official code keeps norm scale 1 and offset 0).

    Key scheme: ``keys = jax.random.split(key, L)`` over the ``L`` leaves in tree
    order (``None`` leaves included); leaf ``i`` gets
    ``jax.random.normal(keys[i], shape, dtype) * sqrt(2 / fan_in)``.

    Args:
      key: a PRNG key.
      params: the parameter tree.
      fan_in: any accepted ``fan_in=`` form (default: the FLAX preset).

    Returns:
      A tree like ``params``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> tree = {"d": {"kernel": jnp.zeros((800, 4)), "bias": jnp.zeros(4)}}
      >>> p = rso_init(jax.random.key(0), tree)
      >>> round(float(p["d"]["kernel"].std()), 2), float(p["d"]["bias"].sum())
      (0.05, 0.0)
    """
    axes = fan_in_axes(params, fan_in)
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_none)
    # flatten_up_to is missing from jax's type stub
    axes_leaves = treedef.flatten_up_to(axes)  # type: ignore[attr-defined]
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for i, (x, ax) in enumerate(zip(leaves, axes_leaves, strict=True)):
        if x is None or not ax:
            out.append(x)
            continue
        shape, dtype = jnp.shape(x), jnp.result_type(x)
        std = math.sqrt(2.0 / fan_in_size(shape, ax))
        z = _random.normal(keys[i], shape, dtype)  # the shaped draw's values, drawn flat
        out.append((z * std).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
