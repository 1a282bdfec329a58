"""Write :func:`optax_neuron.grad_stats.collect_metrics` to TensorBoard event files.

tensorboardX is an optional dependency (``pip install optax_neuron[mnist]``);
it is imported only when :func:`summary_writer` is called, so the library
itself depends on JAX and Optax alone.

Example:
  >>> import optax, jax.numpy as jnp, tempfile
  >>> from optax_neuron import collect_metrics, gradient_norms
  >>> tx = optax.chain(gradient_norms(), optax.sgd(0.1))
  >>> params = {"w": jnp.zeros(2)}
  >>> _, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
  >>> with summary_writer(tempfile.mkdtemp()) as writer:
  ...     write_metrics(writer, collect_metrics(state), step=1)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["summary_writer", "write_metrics"]

_INSTALL_HINT = (
    "writing TensorBoard events needs the optional dependency tensorboardX: "
    "pip install 'optax_neuron[mnist]' (or pip install tensorboardX)"
)


def summary_writer(logdir: str, **kwargs: Any) -> Any:
    """A ``tensorboardX.SummaryWriter`` for ``logdir`` (created if missing).

    Args:
      logdir: the directory for the event files (``tensorboard --logdir`` it).
      **kwargs: passed to ``tensorboardX.SummaryWriter`` (e.g. ``flush_secs``).

    Raises:
      ImportError: tensorboardX is not installed; the message says how to install it.
    """
    try:
        from tensorboardX import SummaryWriter
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from err
    return SummaryWriter(logdir=str(logdir), **kwargs)


def write_metrics(writer: Any, values: Mapping[str, Any], step: int, *, prefix: str = "") -> None:
    """Write a flat ``{name: value}`` dict (e.g. ``collect_metrics(opt_state)``) at ``step``.

    Scalars (0-d arrays, Python numbers) become TensorBoard scalars; larger
    arrays (``collect_metrics(..., per_neuron=True)``) become histograms. Values are
    fetched from the device here, so call it every few steps, not inside
    ``jax.jit``.

    Args:
      writer: a ``tensorboardX.SummaryWriter`` (see :func:`summary_writer`) or
        anything with ``add_scalar(tag, value, step)`` and
        ``add_histogram(tag, values, step)``.
      values: name -> number or array; names are used as tags (``a/b`` groups
        the tag ``b`` under ``a`` in TensorBoard).
      step: the global step for these values.
      prefix: prepended to every tag, e.g. ``"train/"``.

    Raises:
      TypeError: ``writer`` lacks ``add_scalar``/``add_histogram`` (a path was
        given instead of a writer, say), or a value is not numeric.
    """
    if not (hasattr(writer, "add_scalar") and hasattr(writer, "add_histogram")):
        raise TypeError(
            "write_metrics: writer must have add_scalar/add_histogram (a "
            "tensorboardX.SummaryWriter, e.g. summary_writer(logdir)), got "
            f"{type(writer).__name__}"
        )
    step = int(step)
    for name, value in values.items():
        array = np.asarray(value)
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise TypeError(
                f"write_metrics: value for {name!r} is not numeric (dtype {array.dtype})"
            )
        tag = f"{prefix}{name}"
        if array.ndim == 0:
            writer.add_scalar(tag, float(array), step)
        else:
            writer.add_histogram(tag, array.astype(np.float64).ravel(), step)
