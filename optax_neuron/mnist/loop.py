"""The epoch skeleton shared by the gradient loop and the RSO loop.

Both loops train in whole epochs (RSO: cycles) and need the same around each
one: resume from a checkpoint (after checking that it was written with the
same settings), time the epoch, build the record, report it (log line,
progress bar, TensorBoard), save a checkpoint, stop early for tests. A loop
gives :func:`run_epochs` two functions, ``train(state, epoch)`` and
``measure(state)``; everything else lives here, once.

Example:
  >>> import jax.numpy as jnp
  >>> state, history = run_epochs(
  ...     jnp.zeros(()), epochs=2, settings={"lr": 1.0},
  ...     train=lambda s, epoch: (s + 1.0, {"train_loss": float(s)}),
  ...     measure=lambda s: {"test_loss": 0.0, "test_accuracy": 1.0, "train_accuracy": 1.0},
  ...     progress=False)
  >>> float(state), [r["epoch"] for r in history]
  (2.0, [1, 2])
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_neuron as on
from optax_neuron.mnist.checkpoints import Checkpoints, SettingsMismatch, sleep_hook
from optax_neuron.mnist.settings import FLAGS, applied

__all__ = ["SettingsMismatch", "data_fingerprint", "evaluate", "evaluate_splits", "progress_bar"]
__all__ += ["report", "run_epochs", "run_settings", "summary"]


def data_fingerprint(images: Any, labels: Any) -> str:
    """A short sha256 of the training images and labels actually used (resume checks it)."""
    h = hashlib.sha256()
    for a in (np.asarray(images), np.asarray(labels)):
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def run_settings(config: Any, data: Any, *, tensorboard: bool = False) -> dict:
    """What a checkpoint records about its run, and ``--resume`` compares.

    The settings that apply to the config's optimizer and change what it computes
    (not ``checkpoint``, ``resume``, ``stop_after``; see
    :data:`~optax_neuron.mnist.settings.FLAGS`), ``grad_stats`` as it takes effect (a
    TensorBoard writer switches it on) and ``data``: a fingerprint of the training
    images and labels used (the first ``limit_train``).
    """
    settings = {k: v for k, v in applied(config).items() if FLAGS[k].computes}
    if "grad_stats" in settings:
        settings["grad_stats"] = bool(config.grad_stats or tensorboard)
    n = config.limit_train
    settings["data"] = data_fingerprint(data.train_images[:n], data.train_labels[:n])
    return settings


def progress_bar(iterable, desc: str, enabled: bool, **kwargs):
    """A tqdm bar that disappears when done (``enabled=False``: no bar)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, **kwargs)


def run_epochs(
    state: Any,
    *,
    epochs: int,
    settings: dict,
    train: Callable[[Any, int], tuple[Any, dict]],
    measure: Callable[[Any], dict],
    checkpoint: str | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    writer: Any = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    name: str = "",
    unit: str = "epoch",
) -> tuple[Any, list[dict]]:
    """Run epochs ``start+1`` to ``epochs`` of a loop; return the final state and the history.

    Epoch ``e`` (0-based) calls ``state, part = train(state, e)`` (timed as
    ``epoch_time``), then ``measure(state)``; the record is
    ``{"epoch": e + 1, **part, **measure(state), "epoch_time", "wall_time"}``.
    With ``checkpoint`` the state and history are saved after every epoch; with
    ``resume`` the run continues after the last complete checkpoint, whose
    recorded ``settings`` must equal ``settings`` (else :class:`SettingsMismatch`
    names every difference). ``stop_after`` ends after that many epochs as if
    interrupted (tests).

    Args:
      state: the pytree a checkpoint holds (restored onto this structure).
      epochs: the run's total number of epochs.
      settings: JSON-able description of the run (see :func:`run_settings`).
      train: one epoch; returns the new state and ``{"train_loss": ...}`` (and more).
      measure: evaluation after an epoch; returns record fields.
      checkpoint, resume, stop_after: as in ``TrainConfig``.
      writer: a TensorBoard writer (``optax_neuron.summary_writer``) or ``None``.
      progress, log: a tqdm bar over the epochs; a function called with one line per epoch.
      name, unit: the run's name and ``"epoch"`` or ``"cycle"`` for the log lines.
    """
    history: list[dict] = []
    start = 0
    ckpt = Checkpoints(checkpoint) if checkpoint else None
    try:
        if ckpt is not None and resume:
            start, state, history = ckpt.restore(state, settings, unit=unit, log=log)
            if log:
                log(f"resumed from {ckpt.directory} after {unit} {start}")
        elif ckpt is not None:
            ckpt.require_empty()
        t_start = time.perf_counter() - (history[-1]["wall_time"] if history else 0.0)
        last = epochs if stop_after is None else min(epochs, stop_after)
        bar = progress_bar(range(start, last), name, progress, initial=start, total=epochs)
        for epoch in bar:
            t0 = time.perf_counter()
            state, part = train(state, epoch)
            sleep_hook("epoch", epoch + 1)
            t1 = time.perf_counter()
            record = {"epoch": epoch + 1, **part, **measure(state), "epoch_time": t1 - t0}
            record["wall_time"] = time.perf_counter() - t_start
            history.append(record)
            report(record, writer, bar, log, name, unit)
            if ckpt is not None:
                ckpt.save(epoch + 1, state, settings, history)
    finally:
        if ckpt is not None:
            ckpt.close()
    return state, history


def report(record: dict, writer: Any, bar: Any, log: Callable | None, name: str, unit: str) -> None:
    """Send one epoch's record to TensorBoard, the progress bar and the log."""
    step = record["epoch"]
    if writer is not None:
        scalars = {k: v for k, v in record.items() if k != "epoch" and isinstance(v, (int, float))}
        on.write_metrics(writer, scalars, step, prefix="")
        if "grad_stats" in record:
            on.write_metrics(writer, record["grad_stats"], step)
        writer.flush()
    if hasattr(bar, "set_postfix"):
        bar.set_postfix(
            loss=f"{record['train_loss']:.4f}", test_acc=f"{record['test_accuracy']:.4f}"
        )
    if log is not None:
        log(
            f"{name} {unit} {step}: train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.4f}, test loss {record['test_loss']:.4f} "
            f"acc {record['test_accuracy']:.4f}; this {unit} {record['epoch_time']:.1f}s, "
            f"run so far {record['wall_time']:.1f}s"
        )


def _pad(x: np.ndarray, multiple: int) -> np.ndarray:
    extra = (-len(x)) % multiple
    return np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)]) if extra else x


@jax.jit(static_argnums=0)
def _eval_sums(graphdef, state, x, y, mask):
    model = nnx.merge(graphdef, state)

    def body(carry, batch):
        xb, yb, mb = batch
        logits = model(xb)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        correct = jnp.argmax(logits, -1) == yb
        return (carry[0] + jnp.sum(loss * mb), carry[1] + jnp.sum(correct * mb)), None

    zero = jnp.zeros([], jnp.float32)
    (loss_sum, correct), _ = jax.lax.scan(body, (zero, zero), (x, y, mask))
    return loss_sum, correct


def evaluate(
    model: nnx.Module, images: Any, labels: Any, batch_size: int = 1000
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode (BatchNorm: running averages).

    The data are cut into batches of ``batch_size`` (the last one padded and
    masked), evaluated in one jitted scan.
    """
    n = len(labels)
    batch_size = max(1, min(batch_size, n))
    x = _pad(np.asarray(images), batch_size).reshape(-1, batch_size, *np.shape(images)[1:])
    y = _pad(np.asarray(labels), batch_size).reshape(-1, batch_size)
    mask = _pad(np.ones(n, np.float32), batch_size).reshape(-1, batch_size)
    model.eval()
    try:
        graphdef, state = nnx.split(model)
        loss_sum, correct = _eval_sums(graphdef, state, x, y, mask)
    finally:
        model.train()
    return float(loss_sum) / n, float(correct) / n


def evaluate_splits(model: nnx.Module, data: Any, batch_size: int = 1000) -> dict:
    """``test_loss``, ``test_accuracy`` and (if there is a validation split) ``val_*``."""
    test = evaluate(model, data.test_images, data.test_labels, batch_size)
    record = {"test_loss": test[0], "test_accuracy": test[1]}
    if len(data.val_labels):
        val = evaluate(model, data.val_images, data.val_labels, batch_size)
        record["val_loss"], record["val_accuracy"] = val
    return record


def summary(config: Any, n: int, history: list, model: nnx.Module, data: Any) -> dict:
    """A run's result; the final test figures are the last record's when it is the last epoch."""
    if history and history[-1]["epoch"] == config.epochs:
        final_loss, final_acc = history[-1]["test_loss"], history[-1]["test_accuracy"]
    else:
        final_loss, final_acc = evaluate(
            model, data.test_images, data.test_labels, config.eval_batch_size
        )
    return {
        "config": applied(config),
        "train_size": n,
        "epochs": history,
        "test_loss": final_loss,
        "test_accuracy": final_acc,
        "params": nnx.state(model, nnx.Param),
    }
