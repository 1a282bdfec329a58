"""The Optax transformation :func:`rso`, its state and :func:`rso_init`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_neuron.fan_in import fan_in_axes, fan_in_size
from optax_neuron.rso.layers import LayerStack
from optax_neuron.rso.plan import (
    SigmaSpec,
    check_rules,
    is_none,
    make_plan,
    owners,
    sigma_of,
)
from optax_neuron.rso.search import Search, run

_STATIC = (
    "static_args=('seed', 'weights_per_step', 'speculate', 'sigma', 'anneal', 'order', "
    "'search', 'within', 'fan_in')"
)


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


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, jax.Array):
        raise TypeError(
            f"rso: {name} shapes the search and must be a Python int, got a JAX array; under "
            f"optax.inject_hyperparams list it in static_args, e.g. {_STATIC}"
        )
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"rso: {name} must be a positive int, got {value!r}")
    return int(value)


def rso(
    *,
    seed: int | jax.Array = 0,
    weights_per_step: int | jax.Array = 1,
    sigma: SigmaSpec = None,
    anneal: Callable[[jax.Array], Any] | None = None,
    order: Any = None,
    within: str = "row-major",
    search: Sequence[tuple[str, bool]] | None = None,
    weight_decay: float | jax.Array = 0.0,
    fan_in: Any = None,
    per_weight_batch: bool = False,
    fast_path: str = "incremental",
    speculate: int | jax.Array = 1,
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
        searched). Default: ``kernel``/``w`` leaves, norm ``scale``/``offset``, and a
        ``bias`` only beside a ``scale`` (dense/conv biases are not searched, as in
        the official code).
      weight_decay: per visit, the visited weight becomes ``w - w * weight_decay``
        before its candidates are scored ("keep" keeps the decayed value; the official
        code uses ``1e-4``). With a decay, ``F(w)`` is scored again for every weight
        (three evaluations per weight).
      fan_in: fan-in axes for ``sigma="he"`` and ``within="neuron"`` (any ``fan_in=``
        form; default: the FLAX preset).
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
        candidate is added to the cached output as one column and carried through
        :func:`channelwise` layers to the next linear layer (one input-channel slice
        of its kernel); the losses then differ from the black box by float rounding
        only (a decision can flip only on a near-tie). ``"off"``: the black box.
      speculate: ``m > 1``: the candidates of the next ``m`` weights of the leaf are
        scored against the same base in one ``vmap`` and the first improving one is
        accepted (the sequential decisions; a batched loss may differ in the last
        bit). ``1``: off. Not with ``weight_decay``.

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
    seed = int(seed) if not isinstance(seed, jax.Array) else _positive_int("seed", seed)
    weights_per_step = _positive_int("weights_per_step", weights_per_step)
    if isinstance(speculate, jax.Array):
        _positive_int("speculate", speculate)
    if not isinstance(speculate, (int, np.integer)) or isinstance(speculate, bool) or speculate < 1:
        raise ValueError(
            f"rso: speculate must be a positive int (1 = off, m > 1 = m weights "
            f"per batched evaluation), got {speculate!r}"
        )
    speculate = int(speculate)
    if sigma is not None and isinstance(sigma, (list, tuple)):
        check_rules("sigma", sigma)
    elif isinstance(sigma, str) and sigma != "he":
        raise ValueError(f"rso: sigma must be None, a float, 'he' or rules, got {sigma!r}")
    if search is not None:
        check_rules("search", search)
    if fast_path not in ("incremental", "cache", "off"):
        raise ValueError(
            f"rso: fast_path must be 'incremental', 'cache' or 'off', got {fast_path!r}"
        )
    if within not in ("row-major", "neuron"):
        raise ValueError(f"rso: within must be 'row-major' or 'neuron', got {within!r}")
    if anneal is not None and not callable(anneal):
        raise TypeError(f"rso: anneal must be a callable cycle -> factor, got {anneal!r}")
    if isinstance(weight_decay, jax.core.Tracer):  # injected by optax.inject_hyperparams
        decay = True
    else:
        if isinstance(weight_decay, jax.Array) and weight_decay.shape == ():
            weight_decay = float(weight_decay)
        if (
            not isinstance(weight_decay, (int, float))
            or isinstance(weight_decay, bool)
            or not 0 <= weight_decay < 1
        ):
            raise ValueError(f"rso: weight_decay must be a float in [0, 1), got {weight_decay!r}")
        weight_decay = float(weight_decay)
        decay = weight_decay != 0.0
    if decay and speculate > 1:
        raise ValueError(
            "rso: speculate > 1 assumes a rejected weight leaves the parameters "
            "unchanged, which a weight_decay breaks; use speculate=1"
        )

    def init_fn(params):
        plan, leaves = make_plan(params, search, order, within, fan_in)
        needs_axes = sigma == "he" or (
            isinstance(sigma, (list, tuple)) and any(v == "he" for _, v in sigma)
        )
        axes = (
            plan.treedef.flatten_up_to(fan_in_axes(params, fan_in))
            if needs_axes
            else [()] * len(leaves)
        )
        sig = {
            plan.paths[i]: sigma_of(sigma, plan.paths[i], leaves[i], axes[i]) for i in plan.visit
        }
        return RSOState(
            rso_cursor=jnp.zeros([], jnp.int32),
            rso_cycle=jnp.zeros([], jnp.int32),
            rso_sigma=sig,
            rso_accepted={plan.paths[i]: jnp.zeros([], jnp.int32) for i in plan.visit},
            rso_loss=jnp.full([], jnp.nan, jnp.float32),
        )

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        del updates, extra_args
        if params is None:
            raise ValueError(
                "rso needs the current parameters: call update(updates, state, "
                "params, value_fn=...)"
            )
        if value_fn is None or not callable(value_fn):
            raise ValueError(
                "rso needs value_fn=, the loss of the parameters on the current minibatch: "
                "update(updates, state, params, value_fn=lambda p: loss(p, batch))"
                + (
                    " (or value_fn(params, key) with per_weight_batch=True)"
                    if per_weight_batch
                    else ""
                )
            )
        plan, leaves = make_plan(params, search, order, within, fan_in)
        missing = [plan.paths[i] for i in plan.visit if plan.paths[i] not in state.rso_sigma]
        if missing:
            raise ValueError(
                f"rso: parameters {missing} are searched but not in the state; was "
                "init called with these params?"
            )
        sampled = isinstance(value_fn, LayerStack) and value_fn.batch is not None
        if isinstance(value_fn, LayerStack) and per_weight_batch != sampled:
            raise ValueError(
                "rso: a LayerStack with batch= (rows per weight from cached layer inputs) "
                "needs per_weight_batch=True, and per_weight_batch=True with a LayerStack "
                f"needs batch=; got batch={value_fn.batch!r}, per_weight_batch={per_weight_batch}"
            )
        if sampled and fast_path == "off":
            raise ValueError(
                "rso: a LayerStack with batch= is scored from cached layer inputs; "
                "fast_path must be 'incremental' or 'cache', got 'off'"
            )
        key_args = (jax.random.key(0),) if per_weight_batch and not sampled else ()
        try:
            out = jax.eval_shape(value_fn, params, *key_args)
        except TypeError as e:
            args = "params, key" if per_weight_batch else "params"
            raise TypeError(f"rso: calling value_fn({args}) failed: {e}") from e
        if (
            not hasattr(out, "shape")
            or out.shape != ()
            or not jnp.issubdtype(out.dtype, jnp.floating)
        ):
            raise ValueError(f"rso: value_fn must return a scalar floating loss, got {out}")
        layered = isinstance(value_fn, LayerStack) and fast_path != "off"
        gathered = [_gathered(leaves[i]) for i in plan.visit]
        for (x, _), i in zip(gathered, plan.visit, strict=True):
            leaves[i] = x
        p0 = [jnp.ravel(x) for x, _ in gathered]
        owner = None
        if layered:
            tree = jax.tree_util.tree_unflatten(plan.treedef, leaves)
            all_owners = owners(value_fn, tree, leaves, plan.treedef)
            owner = tuple(min(all_owners[i], len(value_fn.layers) - 1) for i in plan.visit)
        s = Search(
            plan=plan,
            leaves=leaves,
            p0=p0,
            sigma=jnp.stack([state.rso_sigma[plan.paths[i]] for i in plan.visit]).astype(
                jnp.float32
            ),
            base=jax.random.key(seed),
            anneal=anneal,
            weights_per_step=weights_per_step,
            weight_decay=weight_decay,
            decay=decay,
            per_weight_batch=per_weight_batch,
            speculate=speculate,
            value_fn=value_fn,
            fast_path=fast_path,
            owner=owner,
        )
        end = run(s, state.rso_cursor, state.rso_cycle, out.dtype)

        new = [
            None if x is None else jnp.zeros_like(x)
            for x in jax.tree_util.tree_flatten(params, is_leaf=is_none)[0]
        ]
        for t, i in enumerate(plan.visit):
            u = end.upd[t].reshape(plan.shapes[t])
            spec = gathered[t][1]
            new[i] = u if spec is None else jax.sharding.reshard(u, spec)
        accepted = {
            plan.paths[i]: state.rso_accepted[plan.paths[i]] + end.accepted[t]
            for t, i in enumerate(plan.visit)
        }
        return jax.tree_util.tree_unflatten(plan.treedef, new), RSOState(
            rso_cursor=end.cursor,
            rso_cycle=end.cycle,
            rso_sigma=state.rso_sigma,
            rso_accepted=accepted,
            rso_loss=jnp.asarray(end.losses[0], jnp.float32),
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
        out.append((jax.random.normal(keys[i], shape, dtype) * std).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
