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
* a named constant: :data:`ALL_BUT_LAST`, :data:`ALL_BUT_FIRST`, :data:`NO_AXES`;
* a callable ``shape -> tuple of ints``.

Presets: :data:`FLAX` (the default; Flax NNX and Linen, and Haiku's ``w``/``b``,
then the ``x @ W`` guess for plain pytrees), :data:`FLAX_STRICT` (the same
named rules, no guess) and :data:`TORCH` (out-first layouts: Equinox modules,
PyTorch state dicts; strict).

Path and rank cannot tell everything apart. A standalone ``nnx.LinearGeneral``
with several output axes, e.g. ``in_features=8, out_features=(2, 4)``, has a
kernel ``(8, 2, 4)`` named ``kernel``, like a 1-D convolution ``(width, in,
out)``; the default rule gives it ``ALL_BUT_LAST = (0, 1)``, but its fan-in is
axis 0 only. Give such a layer its own rule before the preset, e.g.
``fan_in=[("*proj/kernel", (0,)), *FLAX]`` for a layer stored as ``proj``.
(Attention ``query``/``key``/``value`` kernels have such a rule in :data:`FLAX`.)

Plain pytrees (``{"W1": ..., "b1": ...}``, a list of arrays) match no named
rule; the default preset then guesses by the ``x @ W`` convention: a leaf of
rank >= 2 reduces over every axis but the last, a leaf of rank <= 1 has no
fan-in axes. That guess is wrong for

* weights stored out-first, ``(out, in, ...)`` (PyTorch, Equinox, ``x @ W.T``):
  it would average over the *outgoing* connections. The default preset refuses
  a rank >= 2 leaf whose path ends in ``weight`` (the PyTorch/Equinox name, nested
  or dotted as in a state dict: ``fc.weight``) and asks for :data:`TORCH` or a
  rule; under any other name the layout cannot be told, so give such trees
  rules, e.g. ``fan_in=[("*", ALL_BUT_FIRST)]``;
* several output axes, ``(in, out1, out2)`` (``LinearGeneral``, attention
  kernels under names the preset does not know): the fan-in is axis 0 only;
* kernels whose input axis is not next-to-last, e.g. ``(in, h, w, out)``.

:data:`FLAX_STRICT` has the named rules without the guess: a leaf no rule
matches raises a ``ValueError`` naming its path.

The model's computation knows what path and rank cannot tell:
:func:`from_computation` reads every parameter's fan-in axes from the jaxpr of
the model's apply function (where a kernel meets the activations in a
``dot_general`` or a convolution), so ``LinearGeneral``, attention and
out-first layouts need no rule.

Every transformation of the library takes ``fan_in=`` (a :data:`FanIn`) and
hands it to :func:`fan_in_axes`, which accepts ``None`` (the default preset), a
rules list, a tree of axes, or a callable ``params -> tree of axes``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

from optax_neuron._fan_in_trace import from_computation
from optax_neuron._tree import is_none, path_str
from optax_neuron._validate import is_rule_list

__all__ = [
    "ALL_BUT_FIRST",
    "ALL_BUT_LAST",
    "FLAX",
    "FLAX_STRICT",
    "NO_AXES",
    "TORCH",
    "Axes",
    "AxesTree",
    "FanIn",
    "NamedAxes",
    "Rule",
    "fan_in_axes",
    "fan_in_size",
    "first_match",
    "from_computation",
    "neuron_shape",
    "path_str",
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

NO_AXES = NamedAxes("NO_AXES", lambda ndim: ())
"""No fan-in axes: every element is its own neuron (biases, norms, embeddings)."""

Axes = int | Sequence[int] | NamedAxes | Callable[[tuple[int, ...]], Sequence[int]]
"""The fan-in axes of one leaf: ints, a named constant or a callable of the shape."""

Rule = tuple[str, Axes]
"""``(glob pattern, axes)``: the axes for every leaf whose path matches the glob."""

AxesTree = Any
"""A pytree shaped like the parameters whose leaves are :data:`Axes` (or ``None``)."""

FanIn = Sequence[Rule] | Callable[[Any], Any] | AxesTree | None
"""What ``fan_in=`` accepts: ``None`` (the default preset), rules, a tree of axes, or a
callable ``params -> rules or tree of axes`` (see :func:`fan_in_axes`)."""


def _by_rank(
    rank_axes: dict[int, tuple[int, ...]], default: Axes
) -> Callable[..., tuple[int, ...]]:
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

# The default preset refuses a rank >= 2 leaf named `...weight`: that is the PyTorch /
# Equinox name of an out-first (out, in, ...) weight, for which the `x @ W` guess
# would average the outgoing connections. Rank <= 1 (norm scales) gets no axes.
_OUT_FIRST_GUARD = NamedAxes("REFUSE_OUT_FIRST", lambda ndim: ())


def _named(name: str, axes: Axes) -> tuple[Rule, Rule]:
    """Two rules matching a whole last path part ``name`` (at top level or nested)."""
    return ((name, axes), (f"*/{name}", axes))


FLAX_STRICT: tuple[Rule, ...] = (
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
    *_named("b", NO_AXES),
    # One neuron per element: biases, norm scales and offsets, embedding
    # tables, batch statistics.
    *_named("bias", NO_AXES),
    *_named("scale", NO_AXES),
    *_named("offset", NO_AXES),
    *_named("embedding", NO_AXES),
    *_named("embeddings", NO_AXES),
    *_named("mean", NO_AXES),
    *_named("var", NO_AXES),
)
"""The named Flax NNX / Linen (and Haiku ``w``/``b``) rules; unknown paths are an error."""

FLAX: tuple[Rule, ...] = (
    *FLAX_STRICT,
    # `weight` nested (Equinox, `{"fc": {"weight": ...}}`) or dotted as in a PyTorch
    # state dict (`fc.weight`, `layer1.0.conv1.weight`): any last path part ending in it.
    ("*weight", _OUT_FIRST_GUARD),
    # Plain pytrees, by the `x @ W` convention: rank >= 2 every axis but the
    # last, rank <= 1 none (ALL_BUT_LAST gives () for those).
    ("*", ALL_BUT_LAST),
)
"""Default rules: :data:`FLAX_STRICT`, then the ``x @ W`` guess for any other path.

A rank >= 2 leaf whose last path part ends in ``weight`` (``fc/weight``, or a state
dict's dotted ``fc.weight``) is refused: out-first layouts need :data:`TORCH`.
"""

TORCH: tuple[Rule, ...] = (
    # Embedding tables (num, dim): every element its own neuron.
    ("*embed*weight", NO_AXES),
    # Linear (out, in), ConvNd (out, in, *k): everything but the first axis.
    # PyTorch state-dict keys are dotted ("features.0.weight"): match the tail.
    # Rank-1 weights (norm scales) get () from the same rule.
    ("*weight", ALL_BUT_FIRST),
    ("*bias", NO_AXES),
    ("*running_mean", NO_AXES),
    ("*running_var", NO_AXES),
    ("*num_batches_tracked", NO_AXES),
)
"""Rules for out-first layouts: Equinox modules and PyTorch state dicts (strict)."""


def first_match(path: str, rules: Sequence[tuple[str, Any]]) -> tuple[bool, Any]:
    """The value of the first rule whose glob matches ``path``.

    Globs use :func:`fnmatch.fnmatchcase`; ``*`` also matches ``/``.
    Returns ``(True, value)`` or ``(False, None)`` when no rule matches.

    Example:
      >>> first_match("enc/kernel", [("*bias", 0), ("*kernel", 1)])
      (True, 1)
    """
    for pattern, value in rules:
        if fnmatch.fnmatchcase(path, pattern):
            return True, value
    return False, None


def _axes_of(spec: Axes, shape: Sequence[int]) -> tuple[int, ...]:
    if callable(spec):
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
        raise ValueError(
            f"fan-in axes {axes} for parameter {path!r} repeat an axis (shape {tuple(shape)})"
        )
    return tuple(sorted(out))


def _shape(leaf: Any, path: str) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)
    if shape is None:
        raise ValueError(f"parameter {path!r} ({leaf!r}) has no shape: expected an array")
    return tuple(shape)


def _describe(rules: Sequence[Rule]) -> str:
    if len(rules) <= 6:
        return "rules tried: [" + ", ".join(repr(r[0]) for r in rules) + "]"
    return f"none of the {len(rules)} rules given matches"


def _axes_by_rules(path: str, leaf: Any, rules: Sequence[Rule]) -> tuple[int, ...]:
    shape = _shape(leaf, path)
    found, spec = first_match(path, rules)
    if not found:
        raise ValueError(
            f"parameter {path!r} (shape {shape}) matches no fan-in rule ({_describe(rules)}); "
            f"add one, e.g. fan_in=[({path!r}, (0,)), *rules], or use the default preset "
            "(fan_in=None), which guesses by the x @ W convention"
        )
    if spec is _OUT_FIRST_GUARD and len(shape) >= 2:
        raise ValueError(
            f"parameter {path!r} (shape {shape}) is named like an out-first (PyTorch/Equinox) "
            "weight, for which the default x @ W guess would be wrong; pass "
            "fan_in=optax_neuron.fan_in.TORCH for (out, in, ...) weights, or a rule such as "
            f"[({path!r}, ALL_BUT_LAST), *FLAX] for an (in, out) one"
        )
    return _normalise(_axes_of(spec, shape), shape, path)


def _check_reachable(rules: Sequence[Rule]) -> None:
    """Refuse rules after a catch-all ``"*"``: they could never match (e.g. ``[*FLAX, rule]``)."""
    patterns = [pattern for pattern, _ in rules]
    if "*" in patterns[:-1]:
        shadowed = patterns[patterns.index("*") + 1 :]
        raise ValueError(
            f"fan-in rules {shadowed} come after the catch-all rule '*' and can never match "
            "(the first match wins); put them first, e.g. fan_in=[(glob, axes), *FLAX]"
        )


def _by_rules(tree: Any, rules: Sequence[Rule]) -> Any:
    rules = tuple(rules)
    _check_reachable(rules)

    def one(key_path: Any, leaf: Any) -> tuple[int, ...] | None:
        return None if leaf is None else _axes_by_rules(path_str(key_path), leaf, rules)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_none)


def fan_in_axes(params: Any, fan_in: FanIn = None) -> Any:
    """The fan-in axes of every leaf of a parameter tree.

    This is the one place where every transformation of the library turns its
    ``fan_in`` argument into axes. For a rules list, each leaf at normalised
    path ``p`` (see :func:`path_str`) takes the axes of the first rule
    ``(glob, axes)`` with ``fnmatch(p, glob)``, resolved against the leaf's
    shape; the result is a sorted tuple of non-negative ints.

    Args:
      params: a pytree of arrays (or anything with ``.shape``): parameters or
        updates. ``None`` leaves (masked parameters) stay ``None``.
      fan_in: ``None`` (the :data:`FLAX` preset: named rules, then the
        ``x @ W`` guess for other paths); a rules list ``[(glob, axes), ...]``
        (e.g. :data:`TORCH`, :data:`FLAX_STRICT`); a tree with the structure of
        ``params`` whose leaves are axes (tuple, int, named constant or callable
        of the shape; ``None`` where ``params`` has ``None``; matched by key path
        where it differs from ``params`` only in NNX ``Variable`` wrappers), such
        as :func:`from_computation` returns; or a callable
        ``params -> rules or tree of axes``.

    Returns:
      A tree structured like ``params`` whose leaves are tuples of axes.

    Raises:
      ValueError: a leaf matches no rule (its path is named), axes out of range
        (path and shape are named), or a ``fan_in`` tree whose structure
        differs from ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> fan_in_axes({"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)},
      ...              "conv": {"kernel": jnp.zeros((3, 3, 2, 8))}})
      {'conv': {'kernel': (0, 1, 2)}, 'dense': {'bias': (), 'kernel': (0,)}}
      >>> fan_in_axes({"W1": jnp.zeros((5, 2)), "b1": jnp.zeros(2)})  # x @ W guess
      {'W1': (0,), 'b1': ()}
      >>> fan_in_axes({"w": jnp.zeros((5, 2))}, {"w": (-1,)})  # a tree of axes
      {'w': (1,)}
    """
    if fan_in is None:
        return _by_rules(params, FLAX)
    if is_rule_list(fan_in):
        return _by_rules(params, fan_in)
    # A function, not a callable pytree node (an Equinox module is a container).
    if callable(fan_in) and _is_axes_leaf(fan_in):
        fan_in = fan_in(params)
        if is_rule_list(fan_in):
            return _by_rules(params, fan_in)
    return _axes_from_tree(fan_in, params)


def _is_axes_leaf(x: Any) -> bool:
    """A leaf of a fan_in tree: None, an int, a tuple of ints, a named constant or a function."""
    if x is None or isinstance(x, (int, NamedAxes)):
        return True
    if isinstance(x, tuple):
        return all(isinstance(a, int) for a in x)
    # Callable pytree nodes (Equinox modules, NNX Variables) are containers, not specs.
    return callable(x) and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x))


def _axes_from_tree(spec_tree: Any, tree: Any) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)
    reason = ""
    try:
        # Flatten the specs *up to* the parameters' structure, so that tuple
        # containers (Equinox MLP layers, tuple params) and callable pytree
        # nodes (Equinox modules) are walked into rather than taken as specs.
        specs = treedef.flatten_up_to(spec_tree)  # type: ignore[attr-defined]  # not in the stub
    except (ValueError, TypeError) as err:
        specs = _specs_by_path(spec_tree, [p for p, _ in leaves])
        reason = str(err)
    else:
        if not all(_is_spec(s) for s in specs):  # wrapped axes (NNX Variables): by path
            specs = _specs_by_path(spec_tree, [p for p, _ in leaves]) or specs
    if specs is None:
        tree_paths = [path_str(p) for p, _ in leaves]
        spec_leaves = jax.tree_util.tree_flatten_with_path(spec_tree, is_leaf=_is_axes_leaf)[0]
        spec_paths = [path_str(p) for p, _ in spec_leaves]
        missing = sorted(set(tree_paths) - set(spec_paths))
        extra = sorted(set(spec_paths) - set(tree_paths))
        raise ValueError(
            "the fan_in tree does not match the structure of the parameters: "
            f"parameters without axes: {missing[:5]}, axes without parameters: {extra[:5]} "
            f"({reason})"
        ) from None
    out: list[tuple[int, ...] | None] = []
    for (key_path, leaf), spec in zip(leaves, specs, strict=True):
        p = path_str(key_path)
        if leaf is None or spec is None:
            if (leaf is None) != (spec is None):
                raise ValueError(
                    f"the fan_in tree has {spec!r} for parameter {p!r}, which is {leaf!r}"
                )
            out.append(None)
            continue
        if not _is_spec(spec):
            raise ValueError(
                f"the fan_in tree does not match the structure of the parameters: it has "
                f"{spec!r} for parameter {p!r}, expected axes (int, tuple of ints, named "
                "constant or callable)"
            )
        shape = _shape(leaf, p)
        out.append(_normalise(_axes_of(spec, shape), shape, p))
    return jax.tree_util.tree_unflatten(treedef, out)


def _is_spec(spec: Any) -> bool:
    """An axes leaf, or a list of ints."""
    return _is_axes_leaf(spec) or (isinstance(spec, list) and all(isinstance(a, int) for a in spec))


def _specs_by_path(spec_tree: Any, key_paths: list[Any]) -> list[Any] | None:
    """The specs of ``spec_tree`` for ``key_paths``, matched by key path, or ``None``.

    A tree of axes and the parameters may differ in a ``Variable`` wrapper around
    each leaf: ``nnx.Optimizer`` hands ``init`` the parameters inside ``Variable``
    wrappers and ``update`` plain arrays, while :func:`from_computation` returns a
    tree shaped like the parameters it was given. Key paths are compared with a
    trailing ``value`` attribute dropped; every path must be found, once.
    """

    def key(path: Any) -> tuple[Any, ...]:
        keys = tuple(path)
        last = keys[-1] if keys else None
        unwrapped = isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value"
        return keys[:-1] if unwrapped else keys

    flat = jax.tree_util.tree_flatten_with_path(spec_tree, is_leaf=_is_axes_leaf)[0]
    by_key = {key(p): spec for p, spec in flat}
    wanted = [key(p) for p in key_paths]
    if len(by_key) != len(flat) or set(by_key) != set(wanted) or len(wanted) != len(flat):
        return None
    return [by_key[k] for k in wanted]


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
