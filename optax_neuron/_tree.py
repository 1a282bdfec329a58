"""Pytree helpers shared by the library modules (private; one home for each).

* :func:`is_none` -- the ``is_leaf`` that keeps ``None`` (masked) leaves visible;
* :func:`path_str` -- a key path as the ``/``-joined string every module names
  parameters by (``encoder/layers/0/kernel``);
* :func:`leaves_with_paths` -- flatten a tree into ``(path string, leaf)`` pairs;
* :func:`at_least_float32` -- the dtype sums and norms are taken in;
* :func:`fan_in_mean` -- the mean of an array over its fan-in axes, one value per neuron.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import GetAttrKey, keystr

__all__ = ["at_least_float32", "fan_in_mean", "is_none", "leaves_with_paths", "path_str"]


def is_none(x: Any) -> bool:
    """``is_leaf`` for tree walks that must see ``None`` leaves (masked parameters)."""
    return x is None


def path_str(path: Sequence[Any]) -> str:
    """Normalise a JAX key path to a ``/``-joined string.

    ``DictKey``, ``GetAttrKey``, ``SequenceKey`` and ``FlattenedIndexKey`` each
    become one part (:func:`jax.tree_util.keystr` with ``simple=True``). A
    trailing ``value`` *attribute* (the ``Variable`` wrapper that
    ``nnx.Optimizer`` hands to ``init``) is dropped, so that ``init`` and
    ``update`` see the same path; a module *named* ``value`` (a dict key) is kept.

    Example:
      >>> import jax
      >>> flat, _ = jax.tree_util.tree_flatten_with_path({"enc": [{"kernel": 1}]})
      >>> [path_str(p) for p, _ in flat]
      ['enc/0/kernel']
    """
    keys = tuple(path)
    if keys and isinstance(keys[-1], GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return keystr(keys, simple=True, separator="/")


def leaves_with_paths(tree: Any, *, keep_none: bool = True) -> tuple[list[tuple[str, Any]], Any]:
    """Flatten ``tree`` into ``[(path_str, leaf), ...]`` (tree order) and its treedef.

    With ``keep_none`` (the default) ``None`` leaves are kept as leaves, so the
    list lines up with the parameters even where some are masked out.

    Example:
      >>> leaves_with_paths({"a": [1, None]})[0]
      [('a/0', 1), ('a/1', None)]
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=is_none if keep_none else None
    )
    return [(path_str(p), leaf) for p, leaf in flat], treedef


def at_least_float32(*dtypes: Any) -> Any:
    """The promoted dtype of ``dtypes``, and at least float32.

    float16/bfloat16 (and integers, booleans) give float32; float32, float64
    and complex types are kept. Sums, means and norms over many elements are
    taken in this dtype so that a half-precision sum cannot overflow.

    Example:
      >>> import jax.numpy as jnp
      >>> at_least_float32(jnp.bfloat16), at_least_float32(jnp.int32), at_least_float32(jnp.float32)
      (dtype('float32'), dtype('float32'), dtype('float32'))
    """
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def fan_in_mean(x: jax.Array, axes: tuple[int, ...], dtype: Any) -> jax.Array:
    """Mean of ``x`` over its fan-in ``axes`` (kept as size-1 dims), accumulated in ``dtype``.

    No axes: ``x`` itself (every element its own neuron). A fan-in of size 0
    (neurons with no inputs): zeros. When the fan-in axes lead (Flax layouts) or
    trail (out-first layouts), the sum is a matrix-vector product with a vector of
    ones: XLA lowers it to a GEMV that reads ``x`` once at memory speed, where
    XLA:CPU's reduction was measured about twice as slow (``benchmarks/README.md``).
    Any other axes use :func:`jax.numpy.mean`. Both are float sums of the same
    numbers; only the order of the additions differs.

    Example:
      >>> import jax.numpy as jnp
      >>> fan_in_mean(jnp.array([[1.0, 2.0], [3.0, 6.0]]), (0,), jnp.float32)
      Array([[2., 4.]], dtype=float32)
    """
    if not axes:
        return x.astype(dtype)
    shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    n = math.prod(x.shape[a] for a in axes)
    if n == 0:
        return jnp.zeros(shape, dtype)
    if axes == tuple(range(len(axes))):
        matrix, contract = x.reshape(n, -1), 0
    elif axes == tuple(range(x.ndim - len(axes), x.ndim)):
        matrix, contract = x.reshape(-1, n), 1
    else:
        return jnp.mean(x, axis=axes, keepdims=True, dtype=dtype)
    total = jax.lax.dot_general(
        matrix,
        jnp.ones((n,), x.dtype),
        (((contract,), (0,)), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=dtype,
    )
    return (total / n).astype(dtype).reshape(shape)
