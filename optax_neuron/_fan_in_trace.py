"""Fan-in axes read from the model's computation (the jaxpr of ``fn(params, x)``).

The public entry point is :func:`optax_neuron.fan_in.from_computation`; this
private module holds the tracer behind it.

Every value of the jaxpr gets a :class:`_Val`: whether it depends on the
example inputs (an *activation*), and, for each parameter it is a view of, how
its dimensions map onto the parameter's axes (:class:`_View`) or why that map
was lost (:class:`_Lost`). A parameter's fan-in is decided where it first meets
the activations:

* ``dot_general``: the parameter axes carried by its contracting dimensions;
* ``conv_general_dilated`` (as the kernel): the input-feature and spatial
  dimensions of the kernel spec;
* a product with the activations read only by a ``reduce_sum`` (``sum(x * w)``
  written out): the axes carried by the summed dimensions;
* a ``gather`` or a data-dependent slice (an embedding lookup), or any other
  elementwise op (a bias, a norm scale): no fan-in, ``()``.

Between the parameter and that meeting the views are followed through casts
and other elementwise ops with parameters or constants (scaling, weight
normalisation), ``transpose``, ``reshape`` (split and merged dimensions),
``broadcast_in_dim``, ``squeeze``, slices, ``split``, ``concatenate``, ``pad``,
``rev``, nested calls (``jit``, ``remat``, ``custom_jvp_call``,
``custom_vjp_call``), ``scan`` (the stacked axis of ``xs`` is sliced away: a
layer axis is not fan-in), ``while`` and ``cond``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

try:  # jax.extend.core names ClosedJaxpr and Literal in newer JAX; jax.core before
    from jax.extend import core as jcore

    jcore.ClosedJaxpr, jcore.Literal  # noqa: B018
except (ImportError, AttributeError):  # pragma: no cover
    from jax import core as jcore  # type: ignore[no-redef]

from optax_neuron._tree import is_none, path_str
from optax_neuron._validate import check_rule_list

__all__ = ["from_computation"]


class _View(NamedTuple):
    """The parameter axes carried by each dimension of a value (a frozenset per dimension)."""

    dims: tuple[frozenset[int], ...]


class _Lost(NamedTuple):
    """A value derived from a parameter through an op the tracer does not follow."""

    why: str


Info = _View | _Lost


class _Val(NamedTuple):
    act: bool  # depends on the example inputs
    info: dict[int, Info]  # parameter index -> how this value derives from it


_CONST = _Val(False, {})
_ACT = _Val(True, {})

# Ops applied element by element: a parameter view keeps its dimension map.
_ELEMENTWISE = frozenset(
    """abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp complex conj copy
    copy_p convert_element_type cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor
    ge gt imag integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg
    nextafter not or pow real reduce_precision rem round rsqrt select_n sign sin sinh sqrt
    square sub tan tanh xor optimization_barrier sharding_constraint device_put""".split()
)
# Ops that keep every dimension in place (the sizes may change).
_SAME_DIMS = frozenset({"slice", "rev", "pad", "concatenate", "dynamic_update_slice"})
# Calls whose inner jaxpr takes the same arguments.
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}


def _param_view(ndim: int) -> _View:
    return _View(tuple(frozenset({a}) for a in range(ndim)))


def _map_views(val: _Val, fn: Callable[[_View], Info]) -> _Val:
    """Apply ``fn`` to every view of ``val`` (lost entries stay lost)."""
    return _Val(val.act, {p: fn(i) if isinstance(i, _View) else i for p, i in val.info.items()})


def _lose(vals: Sequence[_Val], why: str) -> dict[int, Info]:
    """Every parameter behind ``vals``, marked lost through ``why`` (the first reason kept)."""
    out: dict[int, Info] = {}
    for v in vals:
        for p, i in v.info.items():
            if not isinstance(out.get(p), _Lost):
                out[p] = i if isinstance(i, _Lost) else _Lost(why)
    return out


def _reshape_groups(
    old: Sequence[int], new: Sequence[int]
) -> list[tuple[list[int], list[int]]] | None:
    """Pair the dimensions of a reshape: groups of old and new dims with equal products.

    A dimension of size 1 forms a group of its own (paired with a size-1 dimension on the
    other side when both come next). ``None`` for shapes with a zero-sized dimension.
    """
    if 0 in old or 0 in new:
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(old) or j < len(new):
        one_old, one_new = i < len(old) and old[i] == 1, j < len(new) and new[j] == 1
        if one_old or one_new:
            groups.append(([i] if one_old else [], [j] if one_new else []))
            i, j = i + one_old, j + one_new
            continue
        gi, gj, pi, pj = [i], [j], old[i], new[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                gi.append(i)
                pi *= old[i]
                i += 1
            else:
                gj.append(j)
                pj *= new[j]
                j += 1
        groups.append((gi, gj))
    return groups


class _Tracer:
    """Walks a jaxpr, following the parameters' views and recording where they meet data."""

    def __init__(self, shapes: Sequence[tuple[int, ...]]) -> None:
        self.shapes = shapes  # of the parameters, by index
        self.readers: dict[Any, list[Any]] = {}  # jaxpr variable -> the equations reading it
        self.findings: dict[int, dict[tuple[int, ...], str]] = {}  # axes -> where found
        self.errors: dict[int, str] = {}  # a contraction the axes cannot be read from
        self.lost_uses: dict[int, str] = {}  # met the activations through an unknown op

    # ------------------------------------------------------------------ records

    def _found(self, p: int, axes: frozenset[int], where: str) -> None:
        self.findings.setdefault(p, {}).setdefault(tuple(sorted(axes)), where)

    def _meets_elementwise(self, vals: Sequence[_Val], op: str) -> _Val:
        """Parameters meet the activations element by element: no fan-in axes."""
        for v in vals:
            if v.act:
                continue
            for p, i in v.info.items():
                if isinstance(i, _View):
                    self._found(
                        p, frozenset(), f"used elementwise with the inputs in {op} (no fan-in axes)"
                    )
                else:
                    self.lost_uses.setdefault(p, i.why)
        return _ACT

    def _contracted(self, p: int, view: Info, contracted: Sequence[int], op: str) -> None:
        if isinstance(view, _Lost):
            self.errors.setdefault(
                p, f"it reaches a {op} through {view.why}, which the tracer does not follow"
            )
            return
        inner = frozenset().union(*(view.dims[d] for d in contracted))
        kept = frozenset().union(*(s for d, s in enumerate(view.dims) if d not in set(contracted)))
        # An axis of size 1 that no dimension carries any more (squeezed, or merged away
        # by a reshape, as im2col does with a single input channel) changes no mean; it
        # is counted as fan-in so that (3, 3, 1, c) kernels get (0, 1, 2) either way.
        dropped = {a for a, n in enumerate(self.shapes[p]) if n == 1} - inner - kept
        inner |= dropped
        if inner & kept:
            self.errors.setdefault(
                p,
                f"a {op} contracts part of its axes {tuple(sorted(inner & kept))} and keeps "
                "the rest (an axis split across contracted and kept dimensions)",
            )
            return
        self._found(p, inner, f"contracted over axes {tuple(sorted(inner))} in a {op}")

    # ------------------------------------------------------------------ walking

    def run(self, jaxpr: Any, ins: Sequence[_Val]) -> list[_Val]:
        """The values of ``jaxpr``'s outputs given the values of its inputs."""
        if isinstance(jaxpr, jcore.ClosedJaxpr):
            jaxpr = jaxpr.jaxpr
        env: dict[Any, _Val] = dict.fromkeys(jaxpr.constvars, _CONST)
        env.update(zip(jaxpr.invars, ins, strict=True))

        def read(v: Any) -> _Val:
            return _CONST if isinstance(v, jcore.Literal) else env[v]

        # Who reads each value: a product with the inputs summed right away is a contraction.
        for eqn in jaxpr.eqns:
            for v in eqn.invars:
                if not isinstance(v, jcore.Literal):
                    self.readers.setdefault(v, []).append(eqn)
        for v in jaxpr.outvars:
            if not isinstance(v, jcore.Literal):
                self.readers.setdefault(v, []).append(None)
        for eqn in jaxpr.eqns:
            outs = self.eqn(eqn, [read(v) for v in eqn.invars])
            env.update(zip(eqn.outvars, outs, strict=True))
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        if not any(v.act or v.info for v in ins):
            return [_CONST] * n_out
        if name in _CALLS and _CALLS[name] in eqn.params:
            return self.run(eqn.params[_CALLS[name]], ins)
        if name == "scan":
            return self._scan(eqn, ins)
        if name == "while":
            return self._while(eqn, ins)
        if name == "cond":
            return self._cond(eqn, ins)
        if name == "dot_general":
            return [self._dot_general(eqn, ins)]
        if name == "conv_general_dilated":
            return [self._conv(eqn, ins)]
        if name in ("gather", "dynamic_slice"):
            return [self._lookup(eqn, ins)]
        if name == "split":
            return [ins[0]] * n_out
        shape = tuple(eqn.outvars[0].aval.shape) if n_out else ()
        if name in _ELEMENTWISE or name in _SAME_DIMS:
            if name in ("optimization_barrier", "device_put") and n_out == len(ins):
                return list(ins)
            if name == "mul" and any(v.act for v in ins) and self._summed_product(eqn, ins):
                return [_ACT]
            return [self._elementwise(ins, len(shape), name)] * n_out
        if name in ("transpose", "broadcast_in_dim", "squeeze", "reshape", "expand_dims"):
            return [self._structural(eqn, ins[0], name)]
        # An op the tracer does not know: activations stay activations; parameters are lost.
        if any(v.act for v in ins):
            return [self._meets_elementwise_unknown(ins, name)] * n_out
        return [_Val(False, _lose(ins, f"`{name}`"))] * n_out

    def _meets_elementwise_unknown(self, ins: Sequence[_Val], name: str) -> _Val:
        for v in ins:
            if not v.act:
                for p, i in v.info.items():
                    self.lost_uses.setdefault(p, i.why if isinstance(i, _Lost) else f"`{name}`")
        return _ACT

    def _summed_product(self, eqn: Any, ins: list[_Val]) -> bool:
        """``sum(x * w, axes)``: a parameter times the inputs, summed at once, is contracted.

        Records the axes carried by the summed dimensions when the product's only reader
        is a ``reduce_sum``; ``False`` (nothing recorded) otherwise.
        """
        readers = self.readers.get(eqn.outvars[0], [])
        if len(readers) != 1 or readers[0] is None or readers[0].primitive.name != "reduce_sum":
            return False
        ndim = len(eqn.outvars[0].aval.shape)
        summed = readers[0].params["axes"]
        weights = [v for v in ins if not v.act and v.info]
        if not weights or any(
            isinstance(i, _View) and len(i.dims) != ndim for v in weights for i in v.info.values()
        ):
            return False
        for v in weights:
            for p, view in v.info.items():
                self._contracted(p, view, summed, "product with the inputs summed by `reduce_sum`")
        return True

    def _elementwise(self, ins: Sequence[_Val], ndim: int, name: str) -> _Val:
        if any(v.act for v in ins):
            return self._meets_elementwise(ins, f"`{name}`")
        info: dict[int, Info] = {}
        for v in ins:
            for p, i in v.info.items():
                if isinstance(i, _View) and len(i.dims) != ndim:
                    # A rank-0 operand broadcast against a larger one: a scalar parameter has
                    # no axes to carry; a scalar reduced from a parameter is lost.
                    i = _View((frozenset(),) * ndim) if not any(i.dims) else _Lost(f"`{name}`")
                old = info.get(p)
                if old is None or (isinstance(old, _Lost) and isinstance(i, _View)):
                    info[p] = i  # a view wins over a statistic of itself (w / norm(w))
                elif isinstance(old, _View) and isinstance(i, _View) and old != i:
                    info[p] = _Lost(f"`{name}` of two differently laid out copies")
        return _Val(False, info)

    def _structural(self, eqn: Any, x: _Val, name: str) -> _Val:
        params = eqn.params
        if name == "transpose":
            perm = params["permutation"]
            return _map_views(x, lambda v: _View(tuple(v.dims[d] for d in perm)))
        if name == "squeeze":
            drop = {d % len(eqn.invars[0].aval.shape) for d in params["dimensions"]}
            return _map_views(
                x, lambda v: _View(tuple(s for d, s in enumerate(v.dims) if d not in drop))
            )
        if name == "broadcast_in_dim":
            ndim = len(params["shape"])

            def broadcast(v: _View) -> _View:
                dims: list[frozenset[int]] = [frozenset()] * ndim
                for d, out in enumerate(params["broadcast_dimensions"]):
                    dims[out] = v.dims[d]
                return _View(tuple(dims))

            return _map_views(x, broadcast)
        if name == "expand_dims":
            ndim = len(eqn.outvars[0].aval.shape)
            where = {d % ndim for d in params["dimensions"]}

            def expand(v: _View) -> _View:
                it = iter(v.dims)
                return _View(tuple(frozenset() if d in where else next(it) for d in range(ndim)))

            return _map_views(x, expand)
        # reshape
        old_shape, new_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
        groups = _reshape_groups(old_shape, new_shape)
        if groups is None or params.get("dimensions") is not None:
            return _Val(x.act, _lose([x], "`reshape`"))

        def reshape(v: _View) -> _View:
            dims: list[frozenset[int]] = [frozenset()] * len(new_shape)
            for gi, gj in groups:
                carried = frozenset().union(*(v.dims[d] for d in gi))
                for d in gj:
                    dims[d] = carried
            return _View(tuple(dims))

        return _map_views(x, reshape)

    def _lookup(self, eqn: Any, ins: list[_Val]) -> _Val:
        """``gather`` / ``dynamic_slice``: an embedding lookup when the indices are data."""
        table, indices = ins[0], ins[1:]
        name = eqn.primitive.name
        if table.act:
            return _ACT
        if any(v.act for v in indices):
            for p, i in table.info.items():
                if isinstance(i, _View):
                    self._found(
                        p,
                        frozenset(),
                        f"read by a `{name}` at data-dependent indices (no fan-in axes)",
                    )
                else:
                    self.lost_uses.setdefault(p, i.why)
            return _ACT
        if name == "dynamic_slice":  # a fixed or loop-counter slice keeps every dimension
            return _Val(False, table.info)
        return _Val(False, _lose(ins, "a `gather` at fixed indices"))

    def _dot_general(self, eqn: Any, ins: list[_Val]) -> _Val:
        lhs, rhs = ins
        (lc, rc), _ = eqn.params["dimension_numbers"]
        if lhs.act and rhs.act:
            return _ACT
        if not (lhs.act or rhs.act):
            return _Val(False, _lose(ins, "a `dot_general` between parameters or constants"))
        weights, contracted = (rhs, rc) if lhs.act else (lhs, lc)
        for p, view in weights.info.items():
            self._contracted(p, view, contracted, "`dot_general`")
        return _ACT

    def _conv(self, eqn: Any, ins: list[_Val]) -> _Val:
        lhs, rhs = ins[:2]
        if lhs.act and rhs.act:
            return _ACT
        if not (lhs.act or rhs.act):
            return _Val(False, _lose(ins, "a convolution between parameters or constants"))
        if rhs.act:  # a parameter as the convolved image, the data as the kernel
            for p in lhs.info:
                self.errors.setdefault(p, "it is the input (lhs) of a convolution, not the kernel")
            return _ACT
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
        for p, view in rhs.info.items():
            self._contracted(p, view, rhs_spec[1:], "`conv_general_dilated`")
        return _ACT

    # ------------------------------------------------------------------ control flow

    def _merge(self, a: _Val, b: _Val, where: str) -> _Val:
        if a.act or b.act:
            return self._meets_elementwise([a, b], where) if (a.info or b.info) else _ACT
        info = dict(a.info)
        for p, i in b.info.items():
            if p in info and info[p] != i:
                info[p] = _Lost(where)
            else:
                info.setdefault(p, i)
        return _Val(False, info)

    def _loop(
        self, body: Any, consts: list[_Val], carry: list[_Val], xs: list[_Val], what: str
    ) -> tuple[list[_Val], list[_Val]]:
        """Run ``body(consts, carry, xs)`` until the carry's values stop changing."""
        outs: list[_Val] = []
        for _ in range(8):
            outs = self.run(body, consts + carry + xs)
            merged = [self._merge(c, o, what) for c, o in zip(carry, outs, strict=False)]
            if merged == carry:
                break
            carry = merged
        return carry, outs[len(carry) :]

    def _scan(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        nc, ncarry = eqn.params["num_consts"], eqn.params["num_carry"]
        consts, carry, xs = ins[:nc], ins[nc : nc + ncarry], ins[nc + ncarry :]
        # The body sees one slice of each xs: the stacked (layer) axis is not fan-in.
        xs = [_map_views(x, lambda v: _View(v.dims[1:])) for x in xs]
        carry, ys = self._loop(eqn.params["jaxpr"], consts, carry, xs, "a `scan` carry")
        ys = [_map_views(y, lambda v: _View((frozenset(), *v.dims))) for y in ys]
        return carry + ys

    def _while(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
        cond_consts, body_consts, carry = ins[:cn], ins[cn : cn + bn], ins[cn + bn :]
        carry, _ = self._loop(eqn.params["body_jaxpr"], body_consts, carry, [], "a `while` carry")
        self.run(eqn.params["cond_jaxpr"], cond_consts + carry)
        return carry

    def _cond(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        outs: list[_Val] | None = None
        for branch in eqn.params["branches"]:
            res = self.run(branch, ins[1:])
            outs = (
                res
                if outs is None
                else [self._merge(a, b, "a `cond`") for a, b in zip(outs, res, strict=True)]
            )
        return outs or []


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _abstract(x: Any) -> Any:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)  # type: ignore[no-untyped-call]


_WAY_OUT = (
    "give it a rule, which is used before the traced axes: "
    "fan_in.from_computation(fn, params, *example_args, rules=[({path!r}, axes)])"
)


def _verdict(tracer: _Tracer, p: int, path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The fan-in axes of parameter ``p``, or a one-line ``ValueError`` naming its path."""
    head = f"fan-in axes of parameter {path!r} (shape {shape}) cannot be read from the computation"
    way_out = _WAY_OUT.format(path=path)
    if p in tracer.errors:
        raise ValueError(f"{head}: {tracer.errors[p]}; {way_out}")
    found = tracer.findings.get(p, {})
    if len(found) > 1:
        ways = "; ".join(found.values())
        raise ValueError(f"{head}: it is used in {len(found)} different ways ({ways}); {way_out}")
    if found:
        return next(iter(found))
    if p in tracer.lost_uses:
        why = tracer.lost_uses[p]
        raise ValueError(
            f"{head}: it meets the inputs only through {why}, which the tracer does not follow; "
            f"{way_out}"
        )
    if not shape:
        return ()
    raise ValueError(f"{head}: the example call does not use it with the inputs; {way_out}")


def from_computation(
    fn: Callable[..., Any],
    params: Any,
    *example_args: Any,
    rules: Sequence[tuple[str, Any]] | None = None,
    **example_kwargs: Any,
) -> Any:
    """The fan-in axes of every parameter, read from the jaxpr of ``fn(params, *example_args)``.

    ``fn`` is traced once with :func:`jax.make_jaxpr` on abstract values (shapes and
    dtypes only: no data is needed and nothing is computed). Each parameter is
    followed to where it first meets the inputs:

    * in a ``dot_general`` (``x @ W``, ``einsum``, attention projections) its fan-in
      axes are the axes carried by the contracting dimensions: a Dense kernel
      ``(in, out)`` gets ``(0,)``, an Equinox/PyTorch ``(out, in)`` weight ``(1,)``, a
      ``LinearGeneral`` kernel ``(in, 2, 4)`` and attention q/k/v kernels
      ``(in, heads, head_dim)`` get ``(0,)``, the attention output kernel
      ``(heads, head_dim, out)`` gets ``(0, 1)``;
    * as the kernel of a ``conv_general_dilated``: its input-feature and spatial axes,
      whatever the layout (``HWIO``, ``OIHW``, transposed convolutions);
    * multiplied by the activations and summed at once (``jnp.sum(x * w, axis)``): the
      axes carried by the summed dimensions;
    * read by a ``gather`` at data-dependent indices (an embedding table), or
      combined element by element with the activations (a bias, a norm scale): ``()``.
      (A table applied as a one-hot matrix product is a Dense layer to the tracer:
      ``(0,)``, one neuron per embedding dimension fed by the whole vocabulary.)

    On the way there the parameter may pass through casts and other elementwise ops
    with parameters or constants (scaled kernels, weight normalisation ``g * v /
    |v|``), ``transpose``, ``reshape`` (split and merged axes are mapped), broadcasts,
    ``squeeze``, slices, ``split``, ``concatenate``, nested ``jit``, ``remat``,
    ``custom_jvp`` and ``custom_vjp`` calls, ``vmap`` (its batch axis is not
    contracted, hence not fan-in), ``cond``, ``while`` and ``scan`` (the stacked layer
    axis of a scanned stack is not fan-in).

    A model that writes its own state while it runs (Flax ``BatchNorm`` in training mode)
    is traced in evaluation mode (``model.eval()``), or with that state in ``params``.

    Leaves whose path matches one of ``rules`` take the rule's axes (rules first, the
    traced axes for the rest); this is the way out for a parameter the tracer refuses.

    Tracing costs one abstract evaluation of ``fn``: for the MNIST application's ViT
    (two attention blocks, 20k parameters) a median of 48 ms on a loaded 2-core CPU,
    the first call of a process up to 0.15 s. Do it once, outside ``jit``, and pass
    the result as ``fan_in=`` to any transformation of the library.

    Args:
      fn: the model's apply function, called as ``fn(params, *example_args,
        **example_kwargs)`` (e.g. ``lambda p, x: nnx.merge(graphdef, p)(x)`` for Flax
        NNX, ``model.apply`` for Linen).
      params: the parameter tree (arrays or :class:`jax.ShapeDtypeStruct`);
        ``None`` leaves (masked parameters) stay ``None``.
      *example_args: example inputs (arrays or :class:`jax.ShapeDtypeStruct`;
        other leaves, e.g. a ``train=False`` flag, are passed as they are).
      rules: optional ``[(glob, axes), ...]`` taken before the traced axes for the
        leaves they match (see :func:`optax_neuron.fan_in.fan_in_axes`).
      **example_kwargs: keyword inputs of ``fn``, like ``example_args``.

    Returns:
      A tree shaped like ``params`` whose leaves are sorted tuples of axes, usable as
      ``fan_in=`` by every transformation (also where the parameters arrive wrapped,
      as ``nnx.Optimizer`` hands them to ``init``: the tree is then matched by path).

    Raises:
      ValueError: one line naming the parameter's path when its axes cannot be read:
        used in two different ways (a tied embedding read by a gather and used as the
        output projection), contracted over part of an axis, reaching the inputs
        through an op the tracer does not follow, or not used with the inputs at all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"W": jnp.zeros((2, 3, 5)), "b": jnp.zeros(5)}  # a LinearGeneral-like kernel
      >>> def apply(p, x):
      ...     return jnp.einsum("nij,ijk->nk", x, p["W"]) + p["b"]
      >>> from_computation(apply, params, jax.ShapeDtypeStruct((4, 2, 3), jnp.float32))
      {'W': (0, 1), 'b': ()}
    """
    from optax_neuron import fan_in as _fan_in  # the rules machinery (imports this module)

    if rules is not None:
        rules = check_rule_list(rules, "rules", "from_computation")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_none)
    paths = [path_str(k) for k, _ in flat]
    for path, (_, leaf) in zip(paths, flat, strict=True):
        if leaf is not None and not _is_array(leaf):
            raise TypeError(
                f"from_computation: parameter {path!r} is {type(leaf).__name__}, expected an "
                "array or a jax.ShapeDtypeStruct"
            )
    live = [i for i, (_, leaf) in enumerate(flat) if leaf is not None]
    inputs, in_def = jax.tree_util.tree_flatten((example_args, example_kwargs))
    traced = [i for i, x in enumerate(inputs) if _is_array(x)]

    def call(param_leaves: list[Any], input_leaves: list[Any]) -> Any:
        leaves: list[Any] = [None] * len(flat)
        for i, leaf in zip(live, param_leaves, strict=True):
            leaves[i] = leaf
        filled = list(inputs)
        for i, x in zip(traced, input_leaves, strict=True):
            filled[i] = x
        args, kwargs = jax.tree_util.tree_unflatten(in_def, filled)
        return fn(jax.tree_util.tree_unflatten(treedef, leaves), *args, **kwargs)

    closed = jax.make_jaxpr(call)(
        [_abstract(flat[i][1]) for i in live], [_abstract(inputs[i]) for i in traced]
    )
    n = len(live)
    ins = [_Val(False, {k: _param_view(len(flat[i][1].shape))}) for k, i in enumerate(live)]
    ins += [_ACT] * (len(closed.jaxpr.invars) - n)
    tracer = _Tracer([tuple(flat[i][1].shape) for i in live])
    tracer.run(closed, ins)

    out: list[Any] = [None] * len(flat)
    for k, i in enumerate(live):
        leaf, path = flat[i][1], paths[i]
        if rules is not None and _fan_in.first_match(path, rules)[0]:
            out[i] = _fan_in._axes_by_rules(path, leaf, rules)
        else:
            out[i] = _verdict(tracer, k, path, tuple(leaf.shape))
    return jax.tree_util.tree_unflatten(treedef, out)
