"""Fan-in axes keyed on parameter paths.

The *fan-in* of an output neuron is the set of connections that feed it. For a
parameter leaf we describe it by the tuple of axes over which those connections
run: a Flax ``Dense`` kernel ``W[in, out]`` has fan-in axes ``(0,)`` (the
incoming connections of output neuron ``j`` are ``W[:, j]``), a 2-D ``Conv``
kernel ``W[h, w, in, out]`` has ``(0, 1, 2)``, and a bias, a norm scale or an
embedding table has ``()``: every element is its own neuron.

Axes are chosen from the *parameter path*, not from the rank alone, because
rank does not tell the layer apart: an attention query kernel
``(in, heads, head_dim)`` has rank 3 like a 1-D convolution kernel
``(width, in, out)``, yet its fan-in is axis 0 only.

Paths are normalised to ``/``-joined strings such as ``encoder/layers/0/kernel``
(see :func:`path_str`) and matched against an ordered list of rules
``(glob_pattern, axes)``; the first match wins. ``axes`` is one of

* a tuple of ints (negative allowed, e.g. ``(-2,)``), or a single int;
* a named constant: :data:`ALL_BUT_LAST`, :data:`ALL_BUT_FIRST`, :data:`NONE`;
* a callable ``shape -> tuple of ints``.

Presets: :data:`FLAX` (the default; Flax NNX and Linen, and Haiku's ``w``/``b``)
and :data:`TORCH` (out-first layouts: Equinox modules, PyTorch state dicts).

Path and rank cannot tell everything apart. A standalone ``nnx.LinearGeneral``
with several output axes, e.g. ``in_features=8, out_features=(2, 4)``, has a
kernel ``(8, 2, 4)`` named ``kernel``, like a 1-D convolution ``(width, in,
out)``; the default rule gives it ``ALL_BUT_LAST = (0, 1)``, but its fan-in is
axis 0 only. Give such a layer its own rule before the preset, e.g.
``fan_in=[("*proj/kernel", (0,)), *FLAX]`` for a layer stored as ``proj``.
(Attention ``query``/``key``/``value`` kernels have such a rule in :data:`FLAX`.)

Every transformation of the library takes ``fan_in=`` and hands it to
:func:`resolve_fan_in`, which accepts ``None`` (the default preset), a rules
list, a tree of axes, or a callable ``params -> tree of axes``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import jax

__all__ = [
    "ALL_BUT_FIRST",
    "ALL_BUT_LAST",
    "FLAX",
    "NONE",
    "TORCH",
    "Axes",
    "NamedAxes",
    "Rule",
    "fan_in_axes",
    "fan_in_size",
    "first_match",
    "neuron_shape",
    "path_str",
    "resolve_fan_in",
]


class NamedAxes(NamedTuple):
    """A named rule for the fan-in axes of a leaf of any rank.

    Calling it with a shape returns the tuple of axes.
    """

    name: str
    fn: Callable[[int], tuple[int, ...]]

    def __call__(self, shape: Sequence[int]) -> tuple[int, ...]:
        return self.fn(len(shape))

    def __repr__(self) -> str:
        return self.name


ALL_BUT_LAST = NamedAxes("ALL_BUT_LAST", lambda ndim: tuple(range(ndim - 1)))
"""Every axis but the last: in-first layouts (Flax, Haiku, Keras kernels)."""

ALL_BUT_FIRST = NamedAxes("ALL_BUT_FIRST", lambda ndim: tuple(range(1, ndim)))
"""Every axis but the first: out-first layouts (PyTorch, Equinox weights)."""

NONE = NamedAxes("NONE", lambda ndim: ())
"""No fan-in axes: every element is its own neuron (biases, norms, embeddings)."""

Axes = Union[int, Sequence[int], NamedAxes, Callable[[tuple[int, ...]], Sequence[int]]]
Rule = tuple[str, Axes]


def _by_rank(rank_axes: dict[int, tuple[int, ...]], default: Axes) -> Callable:
    """Axes chosen by the rank of the leaf, falling back to ``default``."""

    def axes(shape: Sequence[int]) -> tuple[int, ...]:
        if len(shape) in rank_axes:
            return rank_axes[len(shape)]
        return _axes_of(default, shape)

    return axes


# q/k/v projections: (in, heads, head_dim) -> reduce over `in` only. The
# output projection (heads, head_dim, out) reduces over heads and head_dim,
# which is ALL_BUT_LAST already.
_ATTN_IN = _by_rank({3: (0,)}, ALL_BUT_LAST)


def _named(name: str, axes: Axes) -> tuple[Rule, Rule]:
    """Two rules matching a whole last path part ``name`` (at top level or nested)."""
    return ((name, axes), (f"*/{name}", axes))


FLAX: tuple[Rule, ...] = (
    # Attention projections (NNX MultiHeadAttention, Linen
    # MultiHeadDotProductAttention). A rank-2 kernel under these names (an
    # ordinary Dense called "query") keeps the Dense rule.
    *_named("query/kernel", _ATTN_IN),
    *_named("key/kernel", _ATTN_IN),
    *_named("value/kernel", _ATTN_IN),
    # Dense / Linear / Conv / ConvTranspose / attention out: (..., in, out).
    *_named("kernel", ALL_BUT_LAST),
    # LoRA factors (NNX LoRA): lora_a (in, rank), lora_b (rank, out).
    *_named("lora_a", ALL_BUT_LAST),
    *_named("lora_b", ALL_BUT_LAST),
    # Haiku: Linear / Conv `w` (..., in, out) and `b`.
    *_named("w", ALL_BUT_LAST),
    *_named("b", NONE),
    # One neuron per element: biases, norm scales and offsets, embedding
    # tables, batch statistics.
    *_named("bias", NONE),
    *_named("scale", NONE),
    *_named("offset", NONE),
    *_named("embedding", NONE),
    *_named("embeddings", NONE),
    *_named("mean", NONE),
    *_named("var", NONE),
)
"""Default rules: Flax NNX / Linen (and Haiku ``w``/``b``) in-first layouts."""

TORCH: tuple[Rule, ...] = (
    # Embedding tables (num, dim): every element its own neuron.
    ("*embed*weight", NONE),
    # Linear (out, in), ConvNd (out, in, *k): everything but the first axis.
    # PyTorch state-dict keys are dotted ("features.0.weight"): match the tail.
    # Rank-1 weights (norm scales) get () from the same rule.
    ("*weight", ALL_BUT_FIRST),
    ("*bias", NONE),
    ("*running_mean", NONE),
    ("*running_var", NONE),
    ("*num_batches_tracked", NONE),
)
"""Rules for out-first layouts: Equinox modules and PyTorch state dicts."""


def _part(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey/FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """Normalise a JAX key path to a ``/``-joined string.

    ``DictKey``, ``GetAttrKey``, ``SequenceKey`` and ``FlattenedIndexKey`` each
    become one part. A trailing ``value`` *attribute* (the ``Variable`` wrapper
    that ``nnx.Optimizer`` hands to ``init``) is dropped, so that ``init`` and
    ``update`` see the same path; a module *named* ``value`` (a dict key) is kept.

    Example:
      >>> import jax
      >>> paths = [path_str(p) for p, _ in
      ...          jax.tree_util.tree_flatten_with_path({"enc": [{"kernel": 1}]})[0]]
      >>> paths
      ['enc/0/kernel']
    """
    parts = list(path)
    if parts and isinstance(parts[-1], jax.tree_util.GetAttrKey) and parts[-1].name == "value":
        parts = parts[:-1]
    return "/".join(_part(k) for k in parts)


def first_match(path: str, rules: Sequence[tuple[str, Any]]) -> tuple[bool, Any]:
    """The value of the first rule whose glob matches ``path``.

    Globs use :func:`fnmatch.fnmatchcase`; ``*`` also matches ``/``.
    Returns ``(True, value)`` or ``(False, None)`` when no rule matches.
    """
    for pattern, value in rules:
        if fnmatch.fnmatchcase(path, pattern):
            return True, value
    return False, None


def _axes_of(spec: Axes, shape: Sequence[int]) -> tuple[int, ...]:
    if isinstance(spec, NamedAxes) or callable(spec):
        spec = spec(tuple(shape))
    if isinstance(spec, int):
        spec = (spec,)
    return tuple(int(a) for a in spec)


def _normalise(axes: tuple[int, ...], shape: Sequence[int], path: str) -> tuple[int, ...]:
    ndim = len(shape)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"fan-in axes {axes} are out of range for parameter {path!r} "
                f"with shape {tuple(shape)} (rank {ndim})"
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"fan-in axes {axes} for parameter {path!r} repeat an axis (shape {tuple(shape)})")
    return tuple(sorted(out))


def _is_rules(obj: Any) -> bool:
    return (
        isinstance(obj, (list, tuple))
        and len(obj) > 0
        and all(isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str) for r in obj)
    )


def _is_none(x: Any) -> bool:
    return x is None


def _leaves_with_paths(tree: Any) -> tuple[list, Any]:
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)


def _shape(leaf: Any) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)
    if shape is None:
        raise ValueError(f"parameter leaf {leaf!r} has no shape")
    return tuple(shape)


def fan_in_axes(tree: Any, rules: Sequence[Rule] | None = None) -> Any:
    """Fan-in axes of every leaf of a parameter tree, chosen by path rules.

    For each leaf at normalised path ``p`` (see :func:`path_str`) the first rule
    ``(glob, axes)`` with ``fnmatch(p, glob)`` gives the axes, resolved against
    the leaf's shape and returned as a sorted tuple of non-negative ints.

    Args:
      tree: a pytree of arrays (or anything with ``.shape``). ``None`` leaves
        (masked parameters) stay ``None``.
      rules: ordered ``(glob, axes)`` rules; defaults to :data:`FLAX`.

    Returns:
      A tree of the same structure whose leaves are tuples of axes.

    Raises:
      ValueError: a leaf matches no rule (the path and the rules tried are
        named), or its axes are out of range for its shape.

    Example:
      >>> import jax.numpy as jnp
      >>> fan_in_axes({"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)},
      ...              "conv": {"kernel": jnp.zeros((3, 3, 2, 8))}})
      {'conv': {'kernel': (0, 1, 2)}, 'dense': {'bias': (), 'kernel': (0,)}}
    """
    rules = FLAX if rules is None else tuple(rules)

    def one(path, leaf):
        if leaf is None:
            return None
        p = path_str(path)
        shape = _shape(leaf)
        found, spec = first_match(p, rules)
        if not found:
            tried = ", ".join(repr(r[0]) for r in rules)
            raise ValueError(
                f"parameter {p!r} (shape {shape}) matches no fan-in rule; rules tried: [{tried}]. "
                "Pass fan_in=[(glob, axes), ...] with a rule for it."
            )
        return _normalise(_axes_of(spec, shape), shape, p)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_none)


def resolve_fan_in(fan_in: Any, tree: Any) -> Any:
    """Resolve any accepted form of ``fan_in=`` against a parameter tree.

    This is the one place where every transformation of the library turns its
    ``fan_in`` argument into axes.

    Args:
      fan_in: ``None`` (the :data:`FLAX` preset); a rules list ``[(glob, axes),
        ...]`` (e.g. :data:`TORCH`); a tree with the structure of ``tree``
        whose leaves are axes specs (tuple, int, named constant or callable of
        the shape; ``None`` where ``tree`` has ``None``); or a callable
        ``tree -> tree of axes specs``.
      tree: the parameters (or updates) the axes are for.

    Returns:
      A tree of sorted non-negative axes tuples, structured like ``tree``.

    Raises:
      ValueError: no rule for a leaf, axes out of range (path and shape are
        named), or a ``fan_in`` tree whose structure differs from ``tree``.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"w": jnp.zeros((5, 2))}
      >>> resolve_fan_in({"w": (-2,)}, params)
      {'w': (0,)}
    """
    if fan_in is None or _is_rules(fan_in):
        return fan_in_axes(tree, fan_in)
    if callable(fan_in) and _is_axes_leaf(fan_in):  # a function, not a callable pytree (Equinox module)
        fan_in = fan_in(tree)
        if _is_rules(fan_in):
            return fan_in_axes(tree, fan_in)
    return _axes_from_tree(fan_in, tree)


def _is_axes_leaf(x: Any) -> bool:
    """A leaf of a fan_in tree: None, an int, a tuple of ints, a named constant or a plain callable."""
    if x is None or isinstance(x, (int, NamedAxes)):
        return True
    if isinstance(x, tuple):
        return all(isinstance(a, int) for a in x)
    # Callable pytree nodes (Equinox modules, NNX Variables) are containers, not specs.
    return callable(x) and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x))


def _axes_from_tree(spec_tree: Any, tree: Any) -> Any:
    leaves, treedef = _leaves_with_paths(tree)
    try:
        # Flatten the specs *up to* the parameters' structure, so that tuple
        # containers (Equinox MLP layers, tuple params) and callable pytree
        # nodes (Equinox modules) are walked into rather than taken as specs.
        specs = treedef.flatten_up_to(spec_tree)
    except (ValueError, TypeError) as err:
        tree_paths = [path_str(p) for p, _ in leaves]
        spec_paths = [
            path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(spec_tree, is_leaf=_is_axes_leaf)[0]
        ]
        missing = sorted(set(tree_paths) - set(spec_paths))
        extra = sorted(set(spec_paths) - set(tree_paths))
        raise ValueError(
            "the fan_in tree does not match the structure of the parameters: "
            f"parameters without axes: {missing[:5]}, axes without parameters: {extra[:5]} ({err})"
        ) from None
    out = []
    for (path, leaf), spec in zip(leaves, specs):
        p = path_str(path)
        if leaf is None or spec is None:
            if (leaf is None) != (spec is None):
                raise ValueError(f"the fan_in tree has {spec!r} for parameter {p!r}, which is {leaf!r}")
            out.append(None)
            continue
        if not (_is_axes_leaf(spec) or (isinstance(spec, list) and all(isinstance(a, int) for a in spec))):
            raise ValueError(
                f"the fan_in tree does not match the structure of the parameters: it has {spec!r} "
                f"for parameter {p!r}, expected axes (int, tuple of ints, named constant or callable)"
            )
        shape = _shape(leaf)
        out.append(_normalise(_axes_of(spec, shape), shape, p))
    return jax.tree_util.tree_unflatten(treedef, out)


def neuron_shape(shape: Sequence[int], axes: Sequence[int]) -> tuple[int, ...]:
    """``shape`` with every fan-in axis set to 1: one entry per neuron.

    Example:
      >>> neuron_shape((3, 3, 2, 8), (0, 1, 2))
      (1, 1, 1, 8)
    """
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


def fan_in_size(shape: Sequence[int], axes: Sequence[int]) -> int:
    """Number of incoming connections per neuron: the product of the fan-in dims.

    Example:
      >>> fan_in_size((3, 3, 2, 8), (0, 1, 2))
      18
    """
    return math.prod(shape[a] for a in axes)
