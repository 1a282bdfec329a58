"""The plan of a search: which leaves are searched, in which order, with which step,
which layer of a :class:`LayerStack` owns each leaf (all static, resolved at trace time).

**Leaf order** (``order=``): ``None``/``"reverse"`` -- the searched leaves in reverse
tree order (last layer first); ``"forward"``; or a list of globs -- leaves in the order
of the first glob they match, tree order within one glob. The official code's order
(dense first, then the convs last to first, each kernel before its BatchNorm's shift
and scale) is a list of globs, e.g. ``["head/kernel", "conv5/kernel", "bn5/bias",
"bn5/scale", "conv4/kernel", ...]``.

**Order inside a leaf** (``within=``): ``"row-major"`` -- position ``i`` of the leaf is
its flat (``ravel``) index; ``"neuron"`` -- the paper's Algorithm 1, "for each output
neuron, for each of its weights": the output axes (those not in the leaf's fan-in
axes) outermost in row-major order, then the *channel* fan-in axis (the last fan-in
axis: the input channel of a Flax ``(kh, kw, in, out)`` conv kernel or the ``in`` axis
of an ``(in, out)`` dense kernel), then the other fan-in axes (kernel positions) in
row-major order. For an HWIO kernel: output channel, input channel, kernel row,
kernel column. Leaves without fan-in axes (norm scale/shift) are row-major either way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_neuron._tree import is_none, path_str
from optax_neuron._validate import check_rule_list
from optax_neuron.fan_in import fan_in_axes, fan_in_size, first_match

SigmaSpec = None | float | str | Sequence[tuple[str, float | str | None]]

_NORM = ("scale", "offset")
_BIAS = ("bias", "b")


def default_search(paths: Sequence[str], axes: Sequence[Any]) -> list[bool]:
    """The leaves with fan-in axes (kernels, ``x @ W`` matrices) and norm parameters.

    A leaf is searched when its fan-in axes (``axes``, one per path) are non-empty, when
    it is a norm ``scale``/``offset``, or when it is a ``bias`` beside a ``scale`` (a
    norm's shift); dense and conv biases are not searched, as in the official code.
    """
    present = set(paths)
    out = []
    for p, ax in zip(paths, axes, strict=True):
        parent, _, name = p.rpartition("/")
        beside_scale = (f"{parent}/scale" if parent else "scale") in present
        out.append(bool(ax) or name in _NORM or (name in _BIAS and beside_scale))
    return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of the search over one parameter tree.

    ``visit[t]`` is the flat leaf index (tree order) of the ``t``-th visited leaf;
    ``starts[t]`` its first position in the cycle; ``digits[t]``/``strides[t]`` turn a
    position inside the leaf into its flat row-major index (:meth:`flat_index`).
    """

    treedef: Any
    paths: tuple[str, ...]  # every leaf, tree order
    visit: tuple[int, ...]  # flat leaf indices of the searched leaves, visiting order
    shapes: tuple[tuple[int, ...], ...]  # shape of each visited leaf
    sizes: np.ndarray  # elements per visited leaf
    starts: np.ndarray  # first position of each visited leaf
    digits: tuple[tuple[int, ...], ...]  # visiting-order axis sizes, outermost first
    strides: tuple[tuple[int, ...], ...]  # row-major stride of each of those axes

    @property
    def total(self) -> int:
        return int(self.sizes.sum())

    def flat_index(self, t: int, i: jax.Array) -> jax.Array:
        """Row-major flat index of the element at position ``i`` inside visited leaf ``t``."""
        flat = jnp.zeros_like(i)
        rest = i
        for size, stride in zip(reversed(self.digits[t]), reversed(self.strides[t]), strict=True):
            flat = flat + (rest % size) * stride
            rest = rest // size
        return flat

    def run(self, t: int) -> int:
        """How many positions in a row of visited leaf ``t`` share the index of its last axis:
        all of one index when that axis is visited outermost (the neuron order), else 1."""
        shape = self.shapes[t]
        if not shape or self.strides[t][0] != 1:
            return 1
        return int(self.sizes[t]) // shape[-1]


def _axis_order(shape: tuple[int, ...], axes: tuple[int, ...], within: str) -> list[int]:
    nd = len(shape)
    if within == "row-major" or not axes:
        return list(range(nd))
    fan = sorted(a % nd for a in axes)
    outs = [a for a in range(nd) if a not in fan]
    return [*outs, fan[-1], *fan[:-1]]


def make_plan(
    params: Any, search: Any, order: Any, within: str = "row-major", fan_in: Any = None
) -> tuple[Plan, list]:
    """The :class:`Plan` of a search over ``params`` and the flat leaves (``None`` kept).

    ``search`` (rules or ``None``: :func:`default_search` on the fan-in axes of
    ``fan_in``), ``order`` and ``within`` as in :func:`optax_neuron.rso`. Raises a
    one-line error naming the path of a searched leaf that is not floating point, of
    one no ``order`` glob places, or when nothing is searched.
    """
    leaves_p, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_none)
    paths = tuple(path_str(p) for p, _ in leaves_p)
    leaves = [x for _, x in leaves_p]
    axes_leaves: list[Any] = [()] * len(leaves)
    if search is None or within == "neuron":
        # flatten_up_to is missing from jax's type stub
        axes_leaves = treedef.flatten_up_to(fan_in_axes(params, fan_in))  # type: ignore[attr-defined]
    if search is None:
        flags = default_search(paths, axes_leaves)
    else:
        rules = check_rule_list(search, "search", "rso")
        flags = [bool(first_match(p, rules)[1]) for p in paths]
    searched = [
        i
        for i, (f, x) in enumerate(zip(flags, leaves, strict=True))
        if f and x is not None and math.prod(jnp.shape(x)) > 0
    ]  # zero-size: skipped
    for i in searched:
        dtype = jnp.result_type(leaves[i])
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"rso searches parameter {paths[i]!r} but its dtype is {dtype}; "
                "only floating leaves can be searched (exclude it with search=)"
            )
    if not searched:
        raise ValueError(
            f"rso: no parameter is searched (paths: {list(paths)[:8]}); "
            "pass search=[(glob, True), ...]"
        )
    if order is None or order == "reverse":
        visit = searched[::-1]
    elif order == "forward":
        visit = list(searched)
    else:
        if isinstance(order, str) or not all(isinstance(g, str) for g in order):
            raise TypeError(
                f"rso: order= must be None, 'reverse', 'forward' or a list of globs, got {order!r}"
            )
        visit = []
        for g in order:
            visit += [
                i for i in searched if i not in visit and first_match(paths[i], [(g, True)])[0]
            ]
        missing = [paths[i] for i in searched if i not in visit]
        if missing:
            raise ValueError(
                f"rso: order= globs {list(order)} match no entry for searched "
                f"parameter(s) {missing}; add a glob for them or exclude them "
                "with search="
            )
    shapes = tuple(tuple(int(d) for d in jnp.shape(leaves[i])) for i in visit)
    digits, strides = [], []
    for i, shape in zip(visit, shapes, strict=True):
        row = [int(np.prod(shape[a + 1 :])) for a in range(len(shape))]
        perm = _axis_order(shape, tuple(axes_leaves[i] or ()), within)
        digits.append(tuple(shape[a] for a in perm))
        strides.append(tuple(row[a] for a in perm))
    sizes = np.array([int(np.prod(s)) for s in shapes], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return Plan(
        treedef, paths, tuple(visit), shapes, sizes, starts, tuple(digits), tuple(strides)
    ), leaves


def sigma_of(spec: SigmaSpec, path: str, leaf: Any, axes: Any) -> Any:
    """The step ``sigma_d`` of one searched leaf (see ``rso(sigma=)``)."""
    value = None
    if spec is not None and not isinstance(spec, (list, tuple)):
        value = spec
    elif spec is not None:
        value = first_match(path, check_rule_list(spec, "sigma", "rso"))[1]
    if value is None:
        s = jnp.std(jnp.asarray(leaf, jnp.float32))
        if not isinstance(s, jax.core.Tracer) and not float(s) > 0:
            raise ValueError(
                f"rso: parameter {path!r} has standard deviation {float(s)} at init, so its "
                "default sigma (the std at init) would never move it. Initialise it with "
                f"rso_init, give it an explicit step with sigma=[({path!r}, 0.1), ('*', None)], "
                "or exclude it with search=."
            )
        return s
    if value == "he":
        if not axes:
            raise ValueError(
                f"rso: sigma 'he' for parameter {path!r} needs fan-in axes, and it has none "
                f"(a bias or norm parameter); give it a step, e.g. sigma=[({path!r}, 0.167), "
                "('*', 'he')]"
            )
        return jnp.float32(math.sqrt(2.0 / fan_in_size(jnp.shape(leaf), axes)))
    if (
        isinstance(value, str)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"rso: sigma for parameter {path!r} must be a positive finite float, "
            f"'he' or None, got {value!r}"
        )
    return jnp.float32(value)


def owners(stack: Any, params: Any, leaves: list, treedef: Any) -> list[int]:
    """For every parameter leaf, the first layer of ``stack`` reading it (len(layers) if none)."""
    n_layers = len(stack.layers)
    owner = [n_layers] * len(leaves)
    h = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), stack.inputs)
    avals = [
        None if x is None else jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
        for x in leaves
    ]
    for k, f in enumerate(stack.layers):

        def g(flat, x, f=f):
            return f(jax.tree_util.tree_unflatten(treedef, flat), x)

        jaxpr = jax.make_jaxpr(g)(avals, h).jaxpr
        used: set[int] = set()
        for eqn in jaxpr.eqns:
            used.update(id(v) for v in eqn.invars)
        used.update(id(v) for v in jaxpr.outvars)
        it = iter(jaxpr.invars[: len([x for x in leaves if x is not None])])
        for i, x in enumerate(leaves):
            if x is None:
                continue
            v = next(it)
            if owner[i] == n_layers and id(v) in used:
                owner[i] = k
        h = jax.eval_shape(g, avals, h)
    return owner
