"""Input checks shared by the transformations (private)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_neuron.fan_in import path_str


def require_floating(tree: Any, who: str, what: str) -> None:
    """Raise ``TypeError`` naming the first leaf of ``tree`` that is not floating point.

    ``None`` leaves (masked parameters) are skipped. ``what`` is a plural noun
    (``"parameters"``, ``"updates"``) used in the message.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{who} needs floating-point {what}; {what[:-1]} {path_str(path)!r} has dtype {dtype} "
                "(mask it out with optax.masked or pass it as None)"
            )
