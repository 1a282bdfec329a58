"""Training and evaluation loops for the MNIST application.

Gradient optimizers run through :class:`flax.nnx.Optimizer`; one whole epoch
(shuffle, minibatches, steps) is a single jitted ``jax.lax.scan`` over the
split ``(model, optimizer)`` state, so there is no Python work per step. RSO
runs one jitted call per cycle (:func:`train_rso`).

The epoch's shuffle key is ``fold_in(PRNGKey(seed), epoch)``: a run resumed
from a checkpoint sees the same batches as an uninterrupted one, so it ends
bit-identical on CPU.

Example:
  >>> from optax_neuron.mnist.train import TrainConfig, run
  >>> result = run(TrainConfig(optimizer="adam", model="mlp", epochs=1, limit_train=2000))  # doctest: +SKIP
  >>> result["test_accuracy"]                                                              # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_neuron as on
from optax_neuron.mnist.checkpoints import Checkpoints
from optax_neuron.mnist.data import Dataset
from optax_neuron.mnist.models import make_model

__all__ = [
    "DEFAULTS",
    "OPTIMIZERS",
    "TrainConfig",
    "evaluate",
    "make_optimizer",
    "make_train_epoch",
    "run",
]

OPTIMIZERS = (
    "neuron-mean-sgd",
    "sgd",
    "momentum",
    "nesterov",
    "adam",
    "rmsprop",
    "adagrad",
    "adadelta",
    "rso",
)
"""The ``--optimizer`` choices."""

DEFAULTS: dict[str, dict[str, float]] = {
    "neuron-mean-sgd": {"learning_rate": 0.1, "momentum": 0.9},
    "sgd": {"learning_rate": 0.1},
    "momentum": {"learning_rate": 0.02, "momentum": 0.9},
    "nesterov": {"learning_rate": 0.02, "momentum": 0.9},
    "adam": {"learning_rate": 1e-3},
    "rmsprop": {"learning_rate": 1e-3},
    "adagrad": {"learning_rate": 0.05},
    "adadelta": {"learning_rate": 1.0},
    "rso": {},
}
"""Per-optimizer defaults for ``--learning-rate`` / ``--momentum``."""


def make_optimizer(
    name: str,
    learning_rate: float | None = None,
    momentum: float | None = None,
    *,
    schedule: str = "constant",
    total_steps: int | None = None,
    grad_stats: bool = False,
) -> optax.GradientTransformation:
    """The Optax transformation behind a CLI optimizer name.

    Args:
      name: one of :data:`OPTIMIZERS` except ``rso`` (built by :func:`train_rso`).
      learning_rate: ``None`` takes the default of :data:`DEFAULTS`.
      momentum: for ``neuron-mean-sgd``, ``momentum``, ``nesterov`` (and
        ``rmsprop``, where ``None`` means none); ``None`` takes the default.
      schedule: ``"constant"`` or ``"cosine"`` (decay to zero over
        ``total_steps``, ``optax.cosine_decay_schedule``).
      total_steps: number of updates of the run (needed for ``"cosine"``).
      grad_stats: put :func:`optax_neuron.gradient_norms` and
        :func:`optax_neuron.running_gradient_mean` (EMA, decay 0.99) in front,
        so :func:`optax_neuron.metrics` can read per-layer norms.

    Example:
      >>> tx = make_optimizer("neuron-mean-sgd")
    """
    if name not in OPTIMIZERS or name == "rso":
        choices = ", ".join(o for o in OPTIMIZERS if o != "rso")
        raise ValueError(f"optimizer must be one of {choices} (rso trains without gradients), got {name!r}")
    d = DEFAULTS[name]
    lr = d["learning_rate"] if learning_rate is None else learning_rate
    mu = d.get("momentum") if momentum is None else momentum
    if schedule == "cosine":
        if not total_steps or total_steps < 1:
            raise ValueError(f"schedule='cosine' needs total_steps >= 1, got {total_steps!r}")
        lr = optax.cosine_decay_schedule(lr, total_steps)
    elif schedule != "constant":
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if name == "neuron-mean-sgd":
        tx = on.neuron_mean_sgd(lr, momentum=mu)
    elif name == "sgd":
        tx = optax.sgd(lr, momentum=momentum)
    elif name in ("momentum", "nesterov"):
        tx = optax.sgd(lr, momentum=mu, nesterov=name == "nesterov")
    elif name == "adam":
        tx = optax.adam(lr)
    elif name == "rmsprop":
        tx = optax.rmsprop(lr, momentum=momentum)
    elif name == "adagrad":
        tx = optax.adagrad(lr)
    else:
        tx = optax.adadelta(lr)
    if grad_stats:
        tx = optax.chain(on.gradient_norms(per_neuron=False), on.running_gradient_mean(decay=0.99), tx)
    return tx


@dataclasses.dataclass
class TrainConfig:
    """One training run (the CLI's arguments)."""

    optimizer: str = "neuron-mean-sgd"
    model: str = "cnn"
    epochs: int = 4
    batch_size: int = 64
    learning_rate: float | None = None
    momentum: float | None = None
    schedule: str = "cosine"
    seed: int = 0
    limit_train: int | None = None
    grad_stats: bool = False
    checkpoint: str | None = None
    resume: bool = False
    hidden: int | None = None
    rso_batch_size: int = 5000
    stop_after: int | None = None  # end after this many epochs as if interrupted (tests)
    rso_chunk: int = 1000
    rso_fresh_batch: str = "chunk"  # RSO: a fresh minibatch per chunk of weights, or per "weight"
    eval_batch_size: int = 1000


# --------------------------------------------------------------------------- pieces


def _loss_and_correct(model, x, y):
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return loss, jnp.argmax(logits, -1) == y


def _epoch_key(seed: int, epoch: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), epoch)


def make_train_epoch(graphdef: Any, batch_size: int) -> Callable:
    """``train_epoch(state, images, labels, key) -> (state, mean loss, accuracy)``.

    ``state`` is ``nnx.split((model, optimizer))[1]``; the images are shuffled
    with ``key`` and cut into ``len // batch_size`` full batches (the rest is
    dropped for this epoch); the steps run in one ``lax.scan``.
    """

    def step(state, batch):
        model, opt = nnx.merge(graphdef, state)
        x, y = batch

        def loss_fn(model):
            loss, correct = _loss_and_correct(model, x, y)
            return jnp.mean(loss), jnp.mean(correct)

        (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return nnx.state((model, opt)), (loss, acc)

    @jax.jit
    def train_epoch(state, images, labels, key):
        steps = images.shape[0] // batch_size
        perm = jax.random.permutation(key, images.shape[0])[: steps * batch_size]
        perm = perm.reshape(steps, batch_size)
        state, (loss, acc) = jax.lax.scan(step, state, (images[perm], labels[perm]))
        return state, jnp.mean(loss), jnp.mean(acc)

    return train_epoch


def _pad(x: np.ndarray, multiple: int) -> np.ndarray:
    extra = (-len(x)) % multiple
    return np.concatenate([x, np.zeros((extra,) + x.shape[1:], x.dtype)]) if extra else x


@jax.jit(static_argnums=0)
def _eval_sums(graphdef, state, x, y, mask):
    model = nnx.merge(graphdef, state)

    def body(carry, batch):
        xb, yb, mb = batch
        loss, correct = _loss_and_correct(model, xb, yb)
        return (carry[0] + jnp.sum(loss * mb), carry[1] + jnp.sum(correct * mb)), None

    zero = jnp.zeros([], jnp.float32)
    (loss_sum, correct), _ = jax.lax.scan(body, (zero, zero), (x, y, mask))
    return loss_sum, correct


def evaluate(model: nnx.Module, images: Any, labels: Any, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode (BatchNorm uses running averages).

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


# --------------------------------------------------------------------------- runs


def _progress(iterable, desc: str, enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, **kwargs)


def _scalars(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if np.ndim(v) == 0}


def run(
    config: TrainConfig,
    data: Dataset,
    *,
    writer: Any = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train one model as ``config`` says and return its metrics.

    Args:
      config: the run's settings.
      data: a :class:`~optax_neuron.mnist.data.Dataset`.
      writer: an optional TensorBoard writer (``optax_neuron.summary_writer``);
        receives ``train/*``, ``test/*`` scalars and gradient statistics.
      progress: show tqdm bars.
      log: called with one line per epoch (e.g. ``tqdm.write``).

    Returns:
      ``{"config", "epochs": [{"epoch", "train_loss", "train_accuracy",
      "test_loss", "test_accuracy", "val_accuracy", "epoch_time", "wall_time",
      ["grad_stats"]}], "test_accuracy", "test_loss", "params": the final
      parameter State}``.
    """
    if config.epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {config.epochs}")
    n = len(data.train_labels) if config.limit_train is None else min(config.limit_train, len(data.train_labels))
    x_train = jnp.asarray(data.train_images[:n])
    y_train = jnp.asarray(data.train_labels[:n])
    model_kwargs = {} if config.hidden is None else {"hidden": config.hidden}
    if config.hidden is not None and config.model == "rso-paper":
        model_kwargs = {"channels": config.hidden}
    model = make_model(config.model, nnx.Rngs(config.seed), **model_kwargs)
    model.train()
    if config.optimizer == "rso":
        from optax_neuron.mnist.rso import run_rso

        return run_rso(config, data, model, x_train, y_train, writer=writer, progress=progress, log=log)
    batch_size = min(config.batch_size, n)
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1 and the training set non-empty (batch {config.batch_size}, {n} images)")
    grad_stats = config.grad_stats or writer is not None
    tx = make_optimizer(
        config.optimizer,
        config.learning_rate,
        config.momentum,
        schedule=config.schedule,
        total_steps=max(1, config.epochs * (n // batch_size)),
        grad_stats=grad_stats,
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    history: list[dict] = []
    start = 0
    ckpt = Checkpoints(config.checkpoint) if config.checkpoint else None
    if ckpt is not None and config.resume and ckpt.latest() is not None:
        start, state, meta = ckpt.restore(state)
        history = list(meta["history"])
        if log:
            log(f"resumed from {ckpt.directory} after epoch {start}")
    train_epoch = make_train_epoch(graphdef, batch_size)
    t_start = time.perf_counter() - (history[-1]["wall_time"] if history else 0.0)
    last = config.epochs if config.stop_after is None else min(config.epochs, config.stop_after)
    bar = _progress(range(start, last), f"{config.optimizer}", progress, initial=start, total=config.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        state, loss, acc = train_epoch(state, x_train, y_train, _epoch_key(config.seed, epoch))
        loss, acc = float(loss), float(acc)
        t1 = time.perf_counter()
        model, opt = nnx.merge(graphdef, state)
        test_loss, test_acc = evaluate(model, data.test_images, data.test_labels, config.eval_batch_size)
        record = {
            "epoch": epoch + 1,
            "train_loss": loss,
            "train_accuracy": acc,
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "epoch_time": t1 - t0,
            "wall_time": time.perf_counter() - t_start,
        }
        if len(data.val_labels):
            record["val_loss"], record["val_accuracy"] = evaluate(
                model, data.val_images, data.val_labels, config.eval_batch_size
            )
        if grad_stats:
            record["grad_stats"] = _scalars(on.metrics(opt.opt_state))
        history.append(record)
        _report(record, writer, bar, log, config.optimizer)
        if ckpt is not None:
            ckpt.save(epoch + 1, state, {"history": history})
    if ckpt is not None:
        ckpt.close()
    model, _ = nnx.merge(graphdef, state)
    return _result(config, n, history, model, data, config.epochs)


def _result(config: TrainConfig, n: int, history: list, model: Any, data: Any, last: int) -> dict:
    """The run's summary; the final test figures are the last record's when it is epoch ``last``."""
    if history and history[-1]["epoch"] == last:
        final_loss, final_acc = history[-1]["test_loss"], history[-1]["test_accuracy"]
    else:
        final_loss, final_acc = evaluate(model, data.test_images, data.test_labels, config.eval_batch_size)
    return {
        "config": dataclasses.asdict(config),
        "train_size": n,
        "epochs": history,
        "test_loss": final_loss,
        "test_accuracy": final_acc,
        "params": nnx.state(model, nnx.Param),
    }

def _report(record: dict, writer: Any, bar: Any, log: Callable | None, name: str, unit: str = "epoch") -> None:
    step = record["epoch"]
    if writer is not None:
        on.write_metrics(
            writer,
            {k: v for k, v in record.items() if k not in ("epoch", "grad_stats") and np.ndim(v) == 0},
            step,
            prefix="",
        )
        if "grad_stats" in record:
            on.write_metrics(writer, record["grad_stats"], step)
        writer.flush()
    if hasattr(bar, "set_postfix"):
        bar.set_postfix(loss=f"{record['train_loss']:.4f}", test_acc=f"{record['test_accuracy']:.4f}")
    if log is not None:
        log(
            f"{name} {unit} {step}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}, "
            f"test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}, "
            f"{record['wall_time']:.1f}s"
        )
