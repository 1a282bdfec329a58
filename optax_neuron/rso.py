"""RSO: gradient-free random search over single weights, as an Optax transformation.

RSO (Tripathi & Singh, 2020, "RSO: A Gradient Free Sampling Based Approach For
Training Deep Neural Networks", https://arxiv.org/abs/2005.05955) trains a network
without gradients. It visits the weights one at a time, from the last layer to
the first, and for weight ``w`` of leaf ``d`` draws ``dw ~ N(0, sigma_d)`` and keeps

.. math::

    w \\leftarrow \\operatorname{argmin}_{v \\in \\{w,\\, w + dw,\\, w - dw\\}} F(v)

where ``F`` is the loss on a minibatch and ``sigma_d`` is the standard deviation of
leaf ``d`` at initialisation (the weights start from ``N(0, sqrt(2 / fan_in))``,
see :func:`rso_init`). One *cycle* visits every searched weight once.

:func:`rso` is an ``optax.GradientTransformationExtraArgs``: its ``update`` ignores
the incoming updates, runs the search for ``weights_per_step`` weights inside one
traced loop (jit your step: one compiled call per ``update``) and returns
``new_params - params``, so ``optax.apply_updates`` and ``nnx.Optimizer.update``
apply it. The loss comes in as the extra argument ``value_fn``.

**PRNG scheme** (exact, so that the search can be replayed by hand). With
``base = jax.random.key(seed)``, the weight at position ``n`` (0-based, in the
visiting order) of cycle ``c`` uses::

    k = jax.random.fold_in(jax.random.fold_in(base, c), n)
    k_step, k_batch = jax.random.split(k)
    z = jax.random.normal(k_step, (), jnp.float32)
    dw = (sigma_d * anneal(c)) * z          # float32, then cast to the leaf dtype

``k_batch`` is handed to ``value_fn(params, k_batch)`` when ``per_weight_batch=True``.

**Visiting order.** The searched leaves (see ``search=``) are taken in reverse tree
order (last layer first) unless ``order=`` says otherwise; inside a leaf, the
elements in row-major (``ravel``) order. The position ``n`` runs over the
concatenation, ``0 <= n < N`` (``N`` = number of searched weights).

**Candidates and choice.** The transformation accumulates the update ``u`` of the
call (zero at the start of the call) and evaluates ``params + (u +/- dw)`` at the
searched element, the value ``optax.apply_updates`` will produce. The choice is
``w + dw`` if ``F(w + dw) < F(w)``, then ``w - dw`` if ``F(w - dw)`` is strictly
below the best so far: ties and NaN keep ``w``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_neuron.fan_in import fan_in_size, first_match, path_str, resolve_fan_in

__all__ = ["LayerStack", "LinearLayer", "RSOState", "conv_layer", "dense_layer", "rso", "rso_init"]

SigmaSpec = Union[None, float, Sequence[tuple[str, Union[float, None]]]]


class RSOState(NamedTuple):
    """State of :func:`rso`.

    Attributes:
      rso_cursor: position ``n`` of the next weight in the visiting order (int32).
      rso_cycle: number of completed cycles (int32).
      rso_sigma: ``{path: sigma_d}`` (float32) for every searched leaf, fixed at ``init``.
      rso_accepted: ``{path: count}`` (int32): accepted proposals per searched leaf.
      rso_loss: the loss of the parameters returned by the last ``update`` (float32;
        with ``per_weight_batch=True`` on the last weight's minibatch; NaN before).
    """

    rso_cursor: jax.Array
    rso_cycle: jax.Array
    rso_sigma: dict[str, jax.Array]
    rso_accepted: dict[str, jax.Array]
    rso_loss: jax.Array


def _is_none(x: Any) -> bool:
    return x is None


_ALWAYS = ("kernel", "w", "scale", "offset")
_BIAS = ("bias", "b")


def _default_search(paths: Sequence[str]) -> list[bool]:
    """Kernels and norm parameters; a bias only when it sits beside a ``scale``."""
    present = set(paths)
    out = []
    for p in paths:
        parent, _, name = p.rpartition("/")
        if name in _ALWAYS:
            out.append(True)
        elif name in _BIAS:
            out.append((f"{parent}/scale" if parent else "scale") in present)
        else:
            out.append(False)
    return out


def _check_rules(name: str, rules: Any) -> tuple:
    ok = isinstance(rules, (list, tuple)) and all(
        isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str) for r in rules
    )
    if not ok:
        raise TypeError(f"{name}= must be a list of (glob, value) rules, got {rules!r}")
    return tuple(rules)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static (trace-time) description of the search over one parameter tree."""

    treedef: Any
    paths: tuple[str, ...]  # every leaf, tree order
    visit: tuple[int, ...]  # flat leaf indices of the searched leaves, visiting order
    sizes: np.ndarray  # elements per visited leaf
    starts: np.ndarray  # first position of each visited leaf

    @property
    def total(self) -> int:
        return int(self.sizes.sum())


def _make_plan(params: Any, search: Any, order: Any) -> tuple[_Plan, list]:
    leaves_p, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_none)
    paths = tuple(path_str(p) for p, _ in leaves_p)
    leaves = [x for _, x in leaves_p]
    if search is None:
        flags = _default_search(paths)
    else:
        rules = _check_rules("search", search)
        flags = [bool(first_match(p, rules)[1]) for p in paths]
    # Zero-size leaves have no weight to visit (fix: they raised IndexError / a NaN-sigma error).
    searched = [i for i, (f, x) in enumerate(zip(flags, leaves)) if f and x is not None and math.prod(jnp.shape(x)) > 0]
    for i in searched:
        dtype = jnp.asarray(leaves[i]).dtype if not hasattr(leaves[i], "dtype") else leaves[i].dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"rso searches parameter {paths[i]!r} but its dtype is {dtype}; "
                            "only floating leaves can be searched (exclude it with search=)")
    if not searched:
        raise ValueError(f"rso: no parameter is searched (paths: {list(paths)[:8]}); pass search=[(glob, True), ...]")
    if order is None or order == "reverse":
        visit = searched[::-1]
    elif order == "forward":
        visit = list(searched)
    else:
        globs = order
        if isinstance(globs, str) or not all(isinstance(g, str) for g in globs):
            raise TypeError(f"order= must be None, 'reverse', 'forward' or a list of globs, got {order!r}")
        visit = []
        for g in globs:
            visit += [i for i in searched if i not in visit and first_match(paths[i], [(g, True)])[0]]
        missing = [paths[i] for i in searched if i not in visit]
        if missing:
            raise ValueError(f"order= globs {list(globs)} match no entry for searched parameter(s) {missing}; "
                             "add a glob for them or exclude them with search=")
    sizes = np.array([int(np.prod(np.shape(leaves[i]))) for i in visit], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return _Plan(treedef, paths, tuple(visit), sizes, starts), leaves


def _sigma_of(spec: SigmaSpec, path: str, leaf: Any) -> Any:
    value = None
    if spec is not None and not isinstance(spec, (list, tuple)):
        value = spec
    elif spec is not None:
        value = first_match(path, _check_rules("sigma", spec))[1]
    if value is None:
        s = jnp.std(jnp.asarray(leaf, jnp.float32))
        if not isinstance(s, jax.core.Tracer) and not float(s) > 0:
            raise ValueError(
                f"rso: parameter {path!r} has standard deviation {float(s)} at init, so its default "
                "sigma (the std at init) would never move it. Initialise it with rso_init, give it an "
                f"explicit step with sigma=[({path!r}, 0.1), ('*', None)], or exclude it with search=."
            )
        return s
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"rso: sigma for parameter {path!r} must be a positive finite float, got {value!r}")
    return jnp.float32(value)


class LayerStack:
    """A loss built from a stack of layers: RSO's fast path.

    ``LayerStack(layers, loss, inputs, targets)(params)`` computes
    ``loss(f_{L-1}(params, ... f_0(params, inputs)), targets)``. Passed to
    :func:`rso` as ``value_fn`` it is an ordinary loss (the black-box path gives
    the same result), but the search then caches the activation entering the
    layer that owns the searched weight and re-runs only that layer and the
    ones after it for each candidate. The owner of a leaf is the first layer
    whose computation reads it (found by tracing each layer once). The inputs
    of all layers are computed once per searched leaf (per *segment*). Layers
    built with :func:`conv_layer` / :func:`dense_layer` are not even re-run:
    with ``rso(fast_path="incremental")`` the candidate's change is added to
    their cached output as one column (see :class:`LinearLayer`).

    It is a pytree: ``inputs`` and ``targets`` are its leaves, the functions are
    static, so a jitted step taking the batch as an argument compiles once.

    Args:
      layers: sequence of functions ``f_i(params, h) -> h`` (each reads its own
        part of the full parameter tree).
      loss: ``loss(out, targets) -> scalar``.
      inputs: the minibatch inputs entering ``layers[0]``.
      targets: anything the loss needs (labels), a pytree of arrays.

    Example:
      >>> import jax.numpy as jnp
      >>> layers = [lambda p, h: jnp.maximum(h @ p["l0"]["kernel"], 0),
      ...           lambda p, h: h @ p["l1"]["kernel"]]
      >>> mse = lambda out, y: jnp.mean((out - y) ** 2)
      >>> params = {"l0": {"kernel": jnp.ones((3, 4))}, "l1": {"kernel": jnp.ones((4, 1))}}
      >>> float(LayerStack(layers, mse, jnp.ones((2, 3)), jnp.zeros((2, 1)))(params))
      144.0
    """

    def __init__(self, layers: Sequence[Callable], loss: Callable, inputs: Any, targets: Any = None):
        self.layers = tuple(layers)
        self.loss = loss
        self.inputs = inputs
        self.targets = targets

    def activations(self, params: Any) -> tuple[list, jax.Array]:
        """The input of every layer followed by the output, and the loss."""
        h, acts = self.inputs, []
        for f in self.layers:
            acts.append(h)
            h = f(params, h)
        acts.append(h)
        return acts, self.loss(h, self.targets)

    def from_layer(self, k: int, params: Any, h: Any) -> jax.Array:
        """The loss, starting from ``h`` entering ``layers[k]``."""
        for f in self.layers[k:]:
            h = f(params, h)
        return self.loss(h, self.targets)

    def __call__(self, params: Any) -> jax.Array:
        return self.activations(params)[1]

    def tree_flatten(self):
        return (self.inputs, self.targets), (self.layers, self.loss)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux[0], aux[1], *children)


jax.tree_util.register_pytree_node_class(LayerStack)


def _leaf_at(params: Any, path: str) -> Any:
    for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_none)[0]:
        if path_str(p) == path:
            return x
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_none)[0]]
    raise ValueError(f"layer kernel {path!r} is not a parameter path; paths: {paths[:10]}")


class LinearLayer:
    """A layer ``h -> A(W, h)`` linear in one kernel ``W`` (see :func:`dense_layer`, :func:`conv_layer`).

    In a :class:`LayerStack` searched with ``fast_path="incremental"``, a
    candidate change ``delta`` of one kernel element ``W[.., i, o]`` is applied to
    the cached output as ``out[..., o] += delta * column``, where ``column`` is
    the slice of the layer input that the element multiplies, instead of
    re-running the layer; an accepted change is added to the cached output the
    same way. All activations are recomputed exactly at the start of each
    searched leaf, so rounding does not accumulate beyond one leaf.
    """

    def __init__(self, kernel: str, kind: str, padding: Any = "SAME", conv_fn: Callable | None = None):
        self.kernel, self.kind, self.padding, self.conv_fn = kernel, kind, padding, conv_fn

    def __call__(self, params: Any, h: jax.Array) -> jax.Array:
        w = _leaf_at(params, self.kernel)
        if self.kind == "dense":
            return jnp.matmul(h, w)
        conv = self.conv_fn or jax.lax.conv_general_dilated
        return conv(h, w, (1, 1), self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def _pads(self, kshape):
        if self.padding == "SAME":
            return tuple(((k - 1) // 2, k // 2) for k in kshape[:2])
        if self.padding == "VALID":
            return ((0, 0), (0, 0))
        return tuple(tuple(int(q) for q in p) for p in self.padding)

    def add_column(self, out, h, kshape, flat_index, delta, apply=True):
        """``out`` plus the effect of ``W.flat[flat_index] += delta`` (where ``apply``)."""
        if self.kind == "dense":
            i, o = flat_index // kshape[1], flat_index % kshape[1]
            col = jax.lax.dynamic_index_in_dim(h, i, axis=h.ndim - 1, keepdims=True)
            cur = jax.lax.dynamic_index_in_dim(out, o, axis=out.ndim - 1, keepdims=True)
            new = jnp.where(apply, cur + delta.astype(out.dtype) * col, cur)
            return jax.lax.dynamic_update_index_in_dim(out, new, o, axis=out.ndim - 1)
        kh, kw, cin, cout = kshape
        a = flat_index // (kw * cin * cout)
        b = (flat_index // (cin * cout)) % kw
        i = (flat_index // cout) % cin
        o = flat_index % cout
        hp = jnp.pad(h, ((0, 0), *self._pads(kshape), (0, 0)))
        n, ho, wo, _ = out.shape
        col = jax.lax.dynamic_slice(hp, (0, a, b, i), (n, ho, wo, 1))
        cur = jax.lax.dynamic_slice(out, (0, 0, 0, o), (n, ho, wo, 1))
        new = jnp.where(apply, cur + delta.astype(out.dtype) * col, cur)
        return jax.lax.dynamic_update_slice(out, new, (0, 0, 0, o))


def dense_layer(kernel: str) -> LinearLayer:
    """A :class:`LayerStack` layer ``h @ W`` (contracting the last axis), ``W`` at path ``kernel``.

    Example:
      >>> import jax.numpy as jnp
      >>> dense_layer("out/kernel")({"out": {"kernel": jnp.eye(2)}}, jnp.ones((1, 2))).tolist()
      [[1.0, 1.0]]
    """
    return LinearLayer(kernel, "dense")


def conv_layer(kernel: str, padding: Any = "SAME", conv_fn: Callable | None = None) -> LinearLayer:
    """A :class:`LayerStack` layer: stride-1 2-D convolution, NHWC input, HWIO kernel at path ``kernel``.

    ``conv_fn`` replaces ``jax.lax.conv_general_dilated`` (same signature), e.g. an
    im2col implementation that is faster on CPU.
    """
    return LinearLayer(kernel, "conv", padding, conv_fn)


def _owners(stack: LayerStack, params: Any, leaves: list, treedef: Any) -> list[int]:
    """For every parameter leaf, the first layer reading it (len(layers) if none)."""
    n = len(leaves)
    owner = [len(stack.layers)] * n
    h = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), stack.inputs)
    for k, f in enumerate(stack.layers):
        def g(flat, x, f=f):
            return f(jax.tree_util.tree_unflatten(treedef, flat), x)
        closed = jax.make_jaxpr(g)(leaves, h)
        jaxpr = closed.jaxpr
        used = set()
        for eqn in jaxpr.eqns:
            used.update(id(v) for v in eqn.invars)
        used.update(id(v) for v in jaxpr.outvars)
        flat_in = jaxpr.invars[: len([x for x in leaves if x is not None])]
        it = iter(flat_in)
        for i, x in enumerate(leaves):
            if x is None:
                continue
            v = next(it)
            if owner[i] == len(stack.layers) and id(v) in used:
                owner[i] = k
        h = jax.eval_shape(g, leaves, h)
    return owner


def rso(
    *,
    seed: int = 0,
    weights_per_step: int = 1,
    sigma: SigmaSpec = None,
    anneal: Callable[[jax.Array], Any] | None = None,
    order: Any = None,
    search: Sequence[tuple[str, bool]] | None = None,
    per_weight_batch: bool = False,
    fast_path: str = "incremental",
    speculate: int = 1,
) -> optax.GradientTransformationExtraArgs:
    """RSO random search as an Optax transformation (see the module docstring).

    Each ``update`` searches the next ``weights_per_step`` weights of the cycle:
    for weight ``w`` of leaf ``d`` it draws ``dw = sigma_d * anneal(c) * z``,
    ``z ~ N(0, 1)``, and keeps the argmin of ``F(w), F(w + dw), F(w - dw)``
    (strict comparisons: ties and NaN keep ``w``).

    Args:
      seed: seed of the PRNG scheme (module docstring); same seed, same search.
      weights_per_step: weights searched per ``update`` call (inside one loop).
      sigma: ``None`` (the std of each searched leaf at ``init``, the paper's
        ``sigma_d``), a float for every leaf, or rules ``[(glob, float | None)]``
        (``None`` or no match: std at init).
      anneal: ``cycle -> factor`` multiplying sigma, e.g.
        ``optax.linear_schedule(1.0, 0.1, num_cycles)`` as in the official code.
      order: ``None``/``"reverse"`` (last leaf of the tree first, the paper's
        last-layer-first), ``"forward"``, or a list of globs: leaves are visited
        in the order of the first glob they match, tree order within one glob.
      search: rules ``[(glob, bool)]`` choosing the searched leaves (no match: not
        searched). Default: ``kernel``/``w`` leaves, norm ``scale``/``offset``, and a
        ``bias`` only beside a ``scale`` (norm layers; dense/conv biases are not
        searched, as in the official code).
      per_weight_batch: ``False``: ``value_fn(params)`` is the loss on the call's
        minibatch, reused for all its weights (two evaluations per weight, the
        current loss is carried). ``True``: ``value_fn(params, key)`` draws a fresh
        minibatch from ``key`` (the weight's ``k_batch``), e.g. indexing
        device-resident data; three evaluations per weight, as in the paper.
      fast_path: used when ``value_fn`` is a :class:`LayerStack` (with
        ``per_weight_batch=False``). ``"cache"``: keep the activation entering
        the layer that owns the searched weight and re-run only the layers from
        it on: exactly the black-box result. ``"incremental"`` (default): the
        same, and for a :func:`dense_layer`/:func:`conv_layer` kernel apply the
        candidate to the cached layer output as one added column
        (``out[..., o] += delta * column``) instead of re-running the layer; the
        losses then differ from the black-box path by float32 rounding only
        (a decision can flip only on a near-tie). ``"off"``: the black-box path.
      speculate: ``m > 1`` turns on exact speculative batching (every path above):
        the candidates of the next ``m`` weights of the current leaf (their ``dw``
        drawn from the same keys as above) are applied, each alone, to the same
        base parameters and evaluated in one ``jax.vmap``-ed call; the first weight
        whose best candidate strictly beats the current loss is accepted, the ones
        before it are rejected, and the next round starts right after it from the
        new base (the weights after it are re-drawn identically and re-evaluated).
        This is the sequential decision sequence, with fewer (but ``m`` times wider)
        passes when most proposals are rejected. The batched evaluation may round
        differently from the unbatched one, so a decision can flip only on a
        last-ulp near-tie (as with ``fast_path="incremental"``). ``1``: off.

    Returns:
      A ``GradientTransformationExtraArgs``; ``update(updates, state, params, *,
      value_fn, **extra)`` ignores ``updates`` and returns ``new_params - params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 2))
      >>> params = rso_init(jax.random.key(0), {"dense": {"kernel": jnp.zeros((3, 2))}})
      >>> loss = lambda p: jnp.mean((x @ p["dense"]["kernel"] - y) ** 2)
      >>> tx = rso(weights_per_step=6)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params, value_fn=loss)
      >>> bool(loss(optax.apply_updates(params, updates)) <= loss(params))
      True
    """
    for name, value in (("seed", seed), ("weights_per_step", weights_per_step), ("speculate", speculate)):
        if isinstance(value, jax.Array):
            raise TypeError(
                f"rso: {name} shapes the search and must be a Python int, got a JAX array; under "
                f"optax.inject_hyperparams list it in static_args, e.g. "
                f"static_args=('seed', 'weights_per_step', 'speculate', 'sigma', 'anneal', 'order', 'search')"
            )
    if not isinstance(weights_per_step, (int, np.integer)) or isinstance(weights_per_step, bool) or weights_per_step < 1:
        raise ValueError(f"rso: weights_per_step must be a positive int, got {weights_per_step!r}")
    if sigma is not None and isinstance(sigma, (list, tuple)):
        _check_rules("sigma", sigma)
    if search is not None:
        _check_rules("search", search)
    if fast_path not in ("incremental", "cache", "off"):
        raise ValueError(f"rso: fast_path must be 'incremental', 'cache' or 'off', got {fast_path!r}")
    if not isinstance(speculate, (int, np.integer)) or isinstance(speculate, bool) or speculate < 1:
        raise ValueError(f"rso: speculate must be a positive int (1 = off, m > 1 = m weights per batched "
                         f"evaluation), got {speculate!r}")
    speculate = int(speculate)
    if anneal is not None and not callable(anneal):
        raise TypeError(f"rso: anneal must be a callable cycle -> factor, got {anneal!r}")
    weights_per_step = int(weights_per_step)

    def init_fn(params):
        plan, leaves = _make_plan(params, search, order)
        sig = {plan.paths[i]: _sigma_of(sigma, plan.paths[i], leaves[i]) for i in plan.visit}
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
            raise ValueError("rso needs the current parameters: call update(updates, state, params, value_fn=...)")
        if value_fn is None or not callable(value_fn):
            raise ValueError(
                "rso needs value_fn=, the loss of the parameters on the current minibatch: "
                "update(updates, state, params, value_fn=lambda p: loss(p, batch))"
                + (" (or value_fn(params, key) with per_weight_batch=True)" if per_weight_batch else "")
            )
        plan, leaves = _make_plan(params, search, order)
        missing = [plan.paths[i] for i in plan.visit if plan.paths[i] not in state.rso_sigma]
        if missing:
            raise ValueError(f"rso: parameters {missing} are searched but not in the state; was init called with these params?")
        key_args = (jax.random.key(0),) if per_weight_batch else ()
        try:
            out = jax.eval_shape(value_fn, params, *key_args)
        except TypeError as e:
            raise TypeError(
                f"rso: calling value_fn({'params, key' if per_weight_batch else 'params'}) failed: {e}"
            ) from e
        if not hasattr(out, "shape") or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
            raise ValueError(f"rso: value_fn must return a scalar floating loss, got {out}")
        layered = isinstance(value_fn, LayerStack) and fast_path != "off" and not per_weight_batch
        return _search(plan, leaves, state, value_fn, layered)

    def _search(plan: _Plan, leaves: list, state: RSOState, value_fn, layered: bool):
        vis = plan.visit
        nv = len(vis)
        total = plan.total
        p0 = [jnp.ravel(leaves[i]) for i in vis]
        dtypes = [x.dtype for x in p0]
        sig = jnp.stack([state.rso_sigma[plan.paths[i]] for i in vis]).astype(jnp.float32)
        ends = jnp.asarray(plan.starts + plan.sizes, jnp.int32)
        starts = jnp.asarray(plan.starts, jnp.int32)
        base = jax.random.key(seed)

        def tree_of(flat_vis):
            out = list(leaves)
            for t, i in enumerate(vis):
                out[i] = flat_vis[t].reshape(jnp.shape(leaves[i]))
            return jax.tree_util.tree_unflatten(plan.treedef, out)

        if layered:
            stack = value_fn
            owner_all = _owners(stack, tree_of(p0), list(leaves), plan.treedef)
            owner_static = [min(owner_all[i], len(stack.layers) - 1) for i in vis]
            owner = jnp.asarray(owner_static, jnp.int32)
            n_layers = len(stack.layers)
            # layers whose candidates are applied as one added column
            incremental = {}
            if fast_path == "incremental":
                for kk, f in enumerate(stack.layers):
                    if isinstance(f, LinearLayer):
                        incremental[kk] = tuple(jnp.shape(_leaf_at(tree_of(p0), f.kernel)))

        signs = jnp.asarray([0.0, 1.0, -1.0], jnp.float32)
        first_phase = 0 if per_weight_batch else 1  # phase 0 evaluates w itself

        def set_at(xs, mine, j, idx, values, where):
            """Element idx[t] of leaf t in ``mine`` set to values[t] where ``where & (j == t)`` (in place)."""
            xs = list(xs)
            for t in mine:
                xs[t] = xs[t].at[idx[t]].set(jnp.where(where & (j == t), values[t], xs[t][idx[t]]))
            return xs

        def segment(k, carry, acts=()):
            """Search the weights from the cursor to the end of its leaf (or the call's budget).

            ``k``: the static index of the layer owning the leaf (layered path), else None.
            One loop iteration = one loss evaluation: phase 0 (w, only when the current
            loss is unknown), 1 (w + dw), 2 (w - dw, then the choice).
            """
            cursor, cycle, done, work, u, acc, loss, phase = carry
            j = jnp.sum(cursor >= ends).astype(jnp.int32)
            seg_end = ends[j]
            if k is not None:
                inc = k in incremental
                f = stack.layers[k]
                mine = [t for t in range(nv) if owner_static[t] == k]  # the leaves this layer owns
            else:
                inc = False
                mine = list(range(nv))

            def evaluate(work, acts, key, i, delta):
                params = tree_of(work)
                if k is None:
                    return value_fn(params, key) if per_weight_batch else value_fn(params)
                if inc:
                    return stack.from_layer(k + 1, params, f.add_column(acts[k + 1], acts[k], incremental[k], i, delta))
                return stack.from_layer(k, params, acts[k])

            def body(c):
                cursor, done, work, u, acc, losses, phase, acts = c
                i = cursor - starts[j]
                idx = {t: jnp.clip(i, 0, int(plan.sizes[t]) - 1) for t in mine}
                key = jax.random.fold_in(jax.random.fold_in(base, cycle), cursor)
                k_step, k_batch = jax.random.split(key)
                z = jax.random.normal(k_step, (), jnp.float32)
                factor = jnp.float32(1.0) if anneal is None else jnp.asarray(anneal(cycle), jnp.float32)
                dw = (sig[j] * factor) * z

                def value(sign):  # params + (u + sign * dw) at the element, and u + sign * dw
                    us = {t: u[t][idx[t]] + (sign * dw).astype(dtypes[t]) for t in mine}
                    return {t: p0[t][idx[t]] + us[t] for t in mine}, us

                committed = {t: p0[t][idx[t]] + u[t][idx[t]] for t in mine}
                trial, _ = value(signs[phase])
                delta = sum(jnp.where(j == t, (trial[t] - committed[t]).astype(jnp.float32), 0.0) for t in mine)
                work = set_at(work, mine, j, idx, trial, True)
                losses = losses.at[phase].set(evaluate(work, acts, k_batch, i, delta))

                # the choice, effective on the last phase: strict <, ties and NaN keep w
                last = phase == 2
                take_plus = losses[1] < losses[0]
                best = jnp.where(take_plus, losses[1], losses[0])
                take_minus = losses[2] < best
                best = jnp.where(take_minus, losses[2], best)
                accepted = last & (take_plus | take_minus)
                chosen = jnp.where(take_minus, -1.0, 1.0).astype(jnp.float32)
                final, u_new = value(chosen)
                work = set_at(work, mine, j, idx, {t: jnp.where(accepted, final[t], committed[t]) for t in mine}, last)
                u = set_at(u, mine, j, idx, u_new, accepted)
                if inc:
                    d = sum(jnp.where(j == t, (final[t] - committed[t]).astype(jnp.float32), 0.0) for t in mine)
                    out = f.add_column(acts[k + 1], acts[k], incremental[k], i, d, accepted)
                    acts = acts[: k + 1] + (out,) + acts[k + 2:]
                acc = acc + accepted.astype(jnp.int32)
                losses = jnp.where(last, losses.at[0].set(best), losses)
                phase = jnp.where(last, first_phase, phase + 1)
                return cursor + last, done + last, work, u, acc, losses, phase, acts

            def round_body(c):
                """One speculative round: the next ``speculate`` weights of the leaf, all
                candidates evaluated against the same base in one vmapped call; the weights
                up to and including the first improving one are consumed."""
                cursor, done, work, u, acc, losses, phase, acts = c
                loss = losses[0]
                r = jnp.arange(speculate, dtype=jnp.int32)
                n = cursor + r
                valid = (n < seg_end) & (done + r < weights_per_step)
                n = jnp.minimum(n, seg_end - 1)
                i = n - starts[j]
                factor = jnp.float32(1.0) if anneal is None else jnp.asarray(anneal(cycle), jnp.float32)

                def draw(q):  # one weight's dw and k_batch, scalar code as in the sequential loop:
                    # a vmapped jax.random.normal rounds differently on XLA:CPU (measured)
                    k_step, k_batch = jax.random.split(jax.random.fold_in(jax.random.fold_in(base, cycle), q))
                    return (sig[j] * factor) * jax.random.normal(k_step, (), jnp.float32), k_batch

                dw, k_batch = jax.lax.map(draw, n)

                def value(ir, sign_dw):  # params + (u + sign * dw) at element ir, and u + sign * dw
                    idx = {t: jnp.clip(ir, 0, int(plan.sizes[t]) - 1) for t in mine}
                    us = {t: u[t][idx[t]] + sign_dw.astype(dtypes[t]) for t in mine}
                    return idx, {t: p0[t][idx[t]] + us[t] for t in mine}, us

                def candidate(ir, sign_dw, key):
                    idx, trial, _ = value(ir, sign_dw)
                    committed = {t: p0[t][idx[t]] + u[t][idx[t]] for t in mine}
                    delta = sum(jnp.where(j == t, (trial[t] - committed[t]).astype(jnp.float32), 0.0) for t in mine)
                    return evaluate(set_at(work, mine, j, idx, trial, True), acts, key, ir, delta)

                cand_signs = signs[first_phase:]  # (+1, -1), or (0, +1, -1) with a fresh batch per weight
                ns = cand_signs.shape[0]
                flat = jax.vmap(candidate)(jnp.repeat(i, ns), (cand_signs[None, :] * dw[:, None]).ravel(),
                                           k_batch[jnp.repeat(r, ns)])
                vals = flat.reshape(speculate, ns).astype(losses.dtype)
                cur = jnp.broadcast_to(loss, (speculate,)) if first_phase else vals[:, 0]
                plus, minus = vals[:, -2], vals[:, -1]
                take_plus = plus < cur  # the sequential rule: strict <, ties and NaN keep w
                best = jnp.where(take_plus, plus, cur)
                take_minus = minus < best
                best = jnp.where(take_minus, minus, best)
                improved = (take_plus | take_minus) & valid
                hit = jnp.any(improved)
                first = jnp.argmax(improved).astype(jnp.int32)
                consumed = jnp.where(hit, first + 1, jnp.sum(valid).astype(jnp.int32))
                # accept the first improving weight (if any); the ones before it were rejected
                chosen = jnp.where(take_minus[first], -1.0, 1.0).astype(jnp.float32)
                idx, final, u_new = value(i[first], chosen * dw[first])
                committed = {t: p0[t][idx[t]] + u[t][idx[t]] for t in mine}
                work = set_at(work, mine, j, idx, final, hit)
                u = set_at(u, mine, j, idx, u_new, hit)
                if inc:
                    d = sum(jnp.where(j == t, (final[t] - committed[t]).astype(jnp.float32), 0.0) for t in mine)
                    out = f.add_column(acts[k + 1], acts[k], incremental[k], i[first], d, hit)
                    acts = acts[: k + 1] + (out,) + acts[k + 2:]
                losses = losses.at[0].set(best[consumed - 1])
                return cursor + consumed, done + consumed, work, u, acc + hit.astype(jnp.int32), losses, phase, acts

            def cond(c):
                cursor, done = c[0], c[1]
                return (done < weights_per_step) & (cursor < seg_end)

            if speculate > 1 and not per_weight_batch:  # the current loss, if not yet known, unbatched
                i0 = cursor - starts[j]
                k0 = jax.random.split(jax.random.fold_in(jax.random.fold_in(base, cycle), cursor))[1]
                loss = jax.lax.cond(phase == 0, lambda: evaluate(work, acts, k0, i0, jnp.float32(0.0)).astype(loss.dtype),
                                    lambda: loss)
                phase = jnp.int32(first_phase)
            losses = jnp.stack([loss, loss, loss])
            c = (cursor, done, work, u, jnp.int32(0), losses, phase, acts)
            cursor, done, work, u, n_acc, losses, phase, _ = jax.lax.while_loop(
                cond, round_body if speculate > 1 else body, c)
            acc = acc.at[j].add(n_acc)
            wrap = cursor >= total
            return (jnp.where(wrap, 0, cursor), jnp.where(wrap, cycle + 1, cycle), done, work, u, acc,
                    losses[0], phase)

        def outer(carry):
            if not layered:
                return segment(None, carry)
            j = jnp.sum(carry[0] >= ends)
            acts = tuple(stack.activations(tree_of(carry[3]))[0])  # the inputs of every layer, once per segment
            branches = [functools.partial(segment, kk) for kk in range(n_layers)]
            return jax.lax.switch(owner[j], branches, carry, acts)

        loss_dtype = jax.eval_shape(value_fn, tree_of(p0), *((base,) if per_weight_batch else ())).dtype
        carry = (state.rso_cursor, state.rso_cycle, jnp.int32(0), p0, [jnp.zeros_like(x) for x in p0],
                 jnp.zeros([nv], jnp.int32), jnp.asarray(jnp.nan, loss_dtype), jnp.int32(0))
        cursor, cycle, _, _, u, acc, loss, _ = jax.lax.while_loop(lambda c: c[2] < weights_per_step, outer, carry)

        out = [None if x is None else jnp.zeros_like(x) for x in leaves]
        for t, i in enumerate(vis):
            out[i] = u[t].reshape(jnp.shape(leaves[i]))
        new_updates = jax.tree_util.tree_unflatten(plan.treedef, out)
        accepted = {plan.paths[i]: state.rso_accepted[plan.paths[i]] + acc[t] for t, i in enumerate(vis)}
        new_state = RSOState(
            rso_cursor=cursor,
            rso_cycle=cycle,
            rso_sigma=state.rso_sigma,
            rso_accepted=accepted,
            rso_loss=jnp.asarray(loss, jnp.float32),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rso_init(key: jax.Array, params: Any, fan_in: Any = None) -> Any:
    """The RSO paper's initialisation: ``W ~ N(0, sqrt(2 / fan_in))`` per kernel.

    Every leaf whose fan-in axes (resolved by
    :func:`optax_neuron.fan_in.resolve_fan_in`) are non-empty -- Dense and Conv
    kernels -- is redrawn with standard deviation ``sqrt(2 / fan_in)``, where
    ``fan_in`` is the product of its fan-in dimensions. Leaves with no fan-in
    axes (biases, norm scales and offsets) and ``None`` leaves are returned
    unchanged (the official code keeps norm scale 1 and offset 0).

    Key scheme: ``keys = jax.random.split(key, L)`` over the ``L`` leaves in tree
    order (``None`` leaves included); leaf ``l`` gets
    ``jax.random.normal(keys[l], shape, dtype) * sqrt(2 / fan_in)``.

    Args:
      key: a PRNG key.
      params: the parameter tree.
      fan_in: any accepted ``fan_in=`` form (default: the FLAX preset).

    Returns:
      A tree like ``params``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = rso_init(jax.random.key(0), {"d": {"kernel": jnp.zeros((800, 4)), "bias": jnp.zeros(4)}})
      >>> round(float(p["d"]["kernel"].std()), 2), float(p["d"]["bias"].sum())
      (0.05, 0.0)
    """
    axes = resolve_fan_in(fan_in, params)
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_none)
    axes_leaves = treedef.flatten_up_to(axes)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for l, (x, ax) in enumerate(zip(leaves, axes_leaves)):
        if x is None or not ax:
            out.append(x)
            continue
        shape, dtype = jnp.shape(x), jnp.result_type(x)
        std = math.sqrt(2.0 / fan_in_size(shape, ax))
        out.append((jax.random.normal(keys[l], shape, dtype) * std).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
