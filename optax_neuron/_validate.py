"""Argument and input checks shared by the transformations (private; one home for each).

Every check raises one line that names the function, the argument or parameter
path, what was expected and what came instead:

* :func:`require_floating` / :func:`require_numeric` -- the dtypes of a tree's leaves;
* :func:`check_float_dtype` -- an ``accumulator_dtype`` / ``mu_dtype`` argument;
* :func:`check_unit_interval` -- a momentum / decay in ``[0, 1)`` or ``(0, 1)``;
* :func:`check_learning_rate` -- a number or an ``optax`` schedule;
* :func:`is_rule_list` / :func:`check_rule_list` -- ``[(glob, value), ...]`` lists.

Values traced by ``jax.jit`` (e.g. hyperparameters injected by
``optax.inject_hyperparams``) cannot be inspected and pass the value checks.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np

from optax_neuron._tree import leaves_with_paths

__all__ = [
    "check_float_dtype",
    "check_learning_rate",
    "check_rule_list",
    "check_unit_interval",
    "is_rule_list",
    "require_floating",
    "require_numeric",
]


def _require_dtype(
    tree: Any, who: str, what: str, ok: Callable[[Any], bool], adjective: str, hint: str
) -> None:
    for path, leaf in leaves_with_paths(tree, keep_none=False)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not ok(dtype):
            raise TypeError(
                f"{who} needs {adjective} {what}; {what[:-1]} {path!r} has dtype {dtype} ({hint})"
            )


def _is_floating(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def _is_numeric(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_))


def require_floating(tree: Any, who: str, what: str) -> None:
    """Raise ``TypeError`` naming the first leaf of ``tree`` that is not floating point.

    ``None`` leaves (masked parameters) are skipped. ``what`` is a plural noun
    (``"parameters"``, ``"updates"``) used in the message.
    """
    hint = "mask it out with optax.masked or pass it as None"
    _require_dtype(tree, who, what, _is_floating, "floating-point", hint)


def require_numeric(tree: Any, who: str, what: str) -> None:
    """Raise ``TypeError`` naming the first leaf that is not a number (int, bool, float).

    For the monitors, which measure integer and boolean leaves in float32;
    ``float0`` (the gradient of an integer input) and non-array leaves are refused.
    """
    hint = "integer, boolean and floating-point leaves are measured; mask this one out"
    _require_dtype(tree, who, what, _is_numeric, "numeric", hint)


def check_float_dtype(dtype: Any, name: str, who: str | None = None) -> np.dtype | None:
    """``dtype`` as a NumPy dtype (``None`` stays ``None``); ``ValueError`` unless floating point.

    For the ``accumulator_dtype`` / ``mu_dtype`` arguments: the state kept in that
    dtype would otherwise be rounded to integers.

    Example:
      >>> check_float_dtype("bfloat16", "mu_dtype")
      dtype(bfloat16)
    """
    if dtype is None:
        return None
    prefix = f"{who}: " if who else ""
    try:
        resolved: np.dtype = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"{prefix}{name} must be a floating-point dtype, got {dtype!r}") from None
    if not jnp.issubdtype(resolved, jnp.inexact):
        raise ValueError(f"{prefix}{name} must be a floating-point dtype, got {resolved}")
    return resolved


def _is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _as_real_scalar(value: Any, name: str, who: str, expected: str) -> float | None:
    """``value`` as a float, ``None`` when it is traced; ``TypeError``/``ValueError`` otherwise."""
    if _is_traced(value):
        return None
    is_array = isinstance(value, (np.ndarray, np.generic, jax.Array))
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or is_array):
        raise TypeError(
            f"{who}: {name} must be {expected}, got {value!r} of type {type(value).__name__}"
        )
    array = np.asarray(value)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"{who}: {name} must be {expected}, got {value!r} of dtype {array.dtype}")
    if array.shape != ():
        raise ValueError(f"{who}: {name} must be a scalar ({expected}), got shape {array.shape}")
    if np.iscomplexobj(array):
        raise TypeError(f"{who}: {name} must be {expected}, got the complex number {value!r}")
    return float(array)


def check_unit_interval(
    value: Any, name: str, who: str, *, open_low: bool = False, allow_none: bool = False
) -> None:
    """Check a momentum or decay: a real scalar in ``[0, 1)`` (``(0, 1)`` with ``open_low``).

    ``None`` passes when ``allow_none`` (it then has a meaning of its own, said by
    the caller). NaN is out of range. Traced values pass unchecked.

    Raises:
      TypeError: not a real number (a string, a bool, ``None``, a list).
      ValueError: a non-scalar array, or a number outside the interval.
    """
    interval = "(0, 1)" if open_low else "[0, 1)"
    expected = f"a number in {interval}" + (" or None" if allow_none else "")
    if value is None and allow_none:
        return
    x = _as_real_scalar(value, name, who, expected)
    if x is None:
        return
    inside = (0.0 < x if open_low else 0.0 <= x) and x < 1.0  # False for NaN
    if not inside:
        raise ValueError(f"{who}: {name} must be {expected}, got {value!r}")


def check_learning_rate(value: Any, who: str) -> None:
    """Check a learning rate: a finite real number or a schedule (a callable of the step).

    Raises:
      TypeError: neither a number nor a callable (e.g. the string ``'abc'``).
      ValueError: NaN or infinite, or a non-scalar array.
    """
    if callable(value) and not isinstance(value, (jax.Array, np.ndarray)):
        return
    expected = "a number or an optax schedule (a callable of the step count)"
    x = _as_real_scalar(value, "learning_rate", who, expected)
    if x is not None and not math.isfinite(x):
        raise ValueError(f"{who}: learning_rate must be finite, got {value!r}")


def is_rule_list(obj: Any) -> TypeGuard[Sequence[tuple[str, Any]]]:
    """Whether ``obj`` is a non-empty list/tuple of ``(glob string, value)`` pairs."""
    return (
        isinstance(obj, (list, tuple))
        and len(obj) > 0
        and all(isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str) for r in obj)
    )


def check_rule_list(obj: Any, name: str, who: str) -> tuple[tuple[str, Any], ...]:
    """``obj`` as a tuple of ``(glob, value)`` rules, or a ``TypeError`` naming ``name``."""
    if not is_rule_list(obj):
        raise TypeError(
            f"{who}: {name}= must be a non-empty list of (glob, value) rules, got {obj!r}"
        )
    return tuple(obj)
