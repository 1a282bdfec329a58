"""The gradient training loop of the MNIST application, and its optimizer choices.

Read top to bottom like the Flax NNX MNIST tutorial: the optimizers (a table),
the loss, one training epoch, the run. One epoch (shuffle, minibatches,
``nnx.Optimizer`` steps) is a single jitted ``jax.lax.scan`` over the split
``(model, optimizer)`` state. Resume, timing, records and checkpoints are the
shared epoch skeleton of :mod:`optax_neuron.mnist.loop`; RSO's loop is
:mod:`optax_neuron.mnist.rso`. The shuffle key of epoch ``e`` is
``fold_in(PRNGKey(seed), e)``, so a resumed run sees the same batches as an
uninterrupted one and ends bit-identical on CPU.

Example:
  >>> from optax_neuron.mnist.data import load_mnist
  >>> from optax_neuron.mnist.train import TrainConfig, run
  >>> config = TrainConfig(optimizer="adam", model="mlp", epochs=1, limit_train=2000)
  >>> result = run(config, load_mnist())  # doctest: +SKIP
  >>> result["test_accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_neuron as on
from optax_neuron.mnist.data import Dataset
from optax_neuron.mnist.loop import evaluate, evaluate_splits, run_epochs, run_settings, summary
from optax_neuron.mnist.models import make_model
from optax_neuron.mnist.settings import FLAGS, TrainConfig, check_config

__all__ = ["DEFAULTS", "OPTIMIZERS", "OptimizerChoice", "TrainConfig", "check_config"]
__all__ += ["evaluate", "loss_fn", "make_optimizer", "make_train_epoch", "model_fan_in", "run"]


class OptimizerChoice(NamedTuple):
    """One ``--optimizer`` choice: ``factory(learning_rate, momentum)``, defaults, family.

    ``family`` (``"momentum"``, ``"gradient"`` or ``"rso"``) says which flags apply to
    it (:data:`optax_neuron.mnist.settings.FLAGS`): ``--momentum`` to the first only.
    """

    # factory(learning_rate, momentum), and fan_in= for the neuron-wise choices
    factory: Callable[..., optax.GradientTransformation] | None
    learning_rate: float | None = None
    momentum: float | None = None  # the default; None: no momentum (where "momentum" applies)
    family: str = "gradient"


OPTIMIZERS: dict[str, OptimizerChoice] = {
    "neuron-mean-sgd": OptimizerChoice(
        lambda lr, mu, fan_in=None: on.neuron_mean_sgd(lr, momentum=mu or 0.0, fan_in=fan_in),
        0.1,
        0.9,
        "momentum",
    ),
    "sgd": OptimizerChoice(lambda lr, mu: optax.sgd(lr, momentum=mu), 0.1, None, "momentum"),
    "momentum": OptimizerChoice(lambda lr, mu: optax.sgd(lr, mu), 0.02, 0.9, "momentum"),
    "nesterov": OptimizerChoice(
        lambda lr, mu: optax.sgd(lr, mu, nesterov=True), 0.02, 0.9, "momentum"
    ),
    "adam": OptimizerChoice(lambda lr, _: optax.adam(lr), 1e-3),
    "rmsprop": OptimizerChoice(
        lambda lr, mu: optax.rmsprop(lr, momentum=mu), 1e-3, None, "momentum"
    ),
    "adagrad": OptimizerChoice(lambda lr, _: optax.adagrad(lr), 0.05),
    "adadelta": OptimizerChoice(lambda lr, _: optax.adadelta(lr), 1.0),
    "rso": OptimizerChoice(None, family="rso"),  # no gradients: rso.py
    "neuron-adam": OptimizerChoice(
        lambda lr, _, fan_in=None: on.neuron_adam(lr, fan_in=fan_in), 1e-3
    ),
    "neuron-adam-neuron": OptimizerChoice(
        lambda lr, _, fan_in=None: on.neuron_adam(lr, first_moment="neuron", fan_in=fan_in), 1e-3
    ),
    "adamw": OptimizerChoice(lambda lr, _: optax.adamw(lr), 1e-3),
    "adafactor": OptimizerChoice(lambda lr, _: optax.adafactor(lr), 1e-2),
    "lion": OptimizerChoice(lambda lr, _: optax.lion(lr), 1e-4),
}
"""``--optimizer`` name -> :class:`OptimizerChoice`; a new optimizer is one more entry."""

DEFAULTS = {
    k: {"learning_rate": c.learning_rate, "momentum": c.momentum} for k, c in OPTIMIZERS.items()
}
"""Per-optimizer defaults of ``--learning-rate`` / ``--momentum``."""


def check_hyperparameters(name: str, learning_rate: Any, momentum: float | None) -> None:
    """Raise ``ValueError`` naming the flag if ``name``, learning rate or momentum is bad."""
    if name not in OPTIMIZERS or OPTIMIZERS[name].factory is None:
        choices = ", ".join(k for k, c in OPTIMIZERS.items() if c.factory is not None)
        raise ValueError(
            f"optimizer must be one of {choices} (rso trains without gradients), got {name!r}"
        )
    for flag, value in (("learning_rate", learning_rate), ("momentum", momentum)):
        if value is None or callable(value):  # the optimizer's default; a schedule
            continue
        problem = FLAGS[flag].check.problem(value)
        if problem:
            raise ValueError(f"{FLAGS[flag].option} {problem}")


def make_optimizer(
    name: str,
    learning_rate: float | None = None,
    momentum: float | None = None,
    *,
    schedule: str = "constant",
    total_steps: int | None = None,
    grad_stats: bool = False,
    fan_in: Any = None,
) -> optax.GradientTransformation:
    """The Optax transformation behind an ``--optimizer`` name (not ``rso``).

    Args:
      name: a key of :data:`OPTIMIZERS` with a factory.
      learning_rate, momentum: ``None`` takes the choice's default; momentum in ``[0, 1)``.
      schedule: ``"constant"`` or ``"cosine"`` (``optax.cosine_decay_schedule`` to zero
        over ``total_steps``).
      total_steps: number of updates of the run (needed for ``"cosine"``).
      grad_stats: put :func:`optax_neuron.gradient_norms` and
        :func:`optax_neuron.running_gradient_mean` (EMA, decay 0.99) in front,
        so :func:`optax_neuron.collect_metrics` can read per-layer norms.
      fan_in: fan-in axes for the choices whose factory takes ``fan_in`` (the
        neuron-wise optimizers); ``None``: the library's default preset.

    Example:
      >>> tx = make_optimizer("neuron-mean-sgd")
    """
    check_hyperparameters(name, learning_rate, momentum)
    choice = OPTIMIZERS[name]
    lr = choice.learning_rate if learning_rate is None else learning_rate
    mu = choice.momentum if momentum is None else momentum
    if schedule == "cosine":
        if not total_steps or total_steps < 1:
            raise ValueError(f"schedule='cosine' needs total_steps >= 1, got {total_steps!r}")
        lr = optax.cosine_decay_schedule(lr, total_steps)
    elif schedule != "constant":
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if choice.factory is None:  # not reached: check_hyperparameters refuses it
        raise ValueError(f"{name} has no gradient transformation")
    takes_fan_in = "fan_in" in inspect.signature(choice.factory).parameters
    tx = choice.factory(lr, mu, fan_in=fan_in) if takes_fan_in else choice.factory(lr, mu)
    if grad_stats:
        monitors = (on.gradient_norms(per_neuron=False), on.running_gradient_mean(decay=0.99))
        tx = optax.chain(*monitors, tx)
    return tx


def build_model(config: TrainConfig) -> nnx.Module:
    """The config's model, initialised from ``config.seed`` (``hidden``: rso-paper's channels)."""
    key = "channels" if config.model == "rso-paper" else "hidden"
    kwargs = {} if config.hidden is None else {key: config.hidden}
    return make_model(config.model, nnx.Rngs(config.seed), **kwargs)


def model_fan_in(config: TrainConfig, model: nnx.Module) -> Any:
    """The fan-in axes the optimizer gets: read from the computation for ``vit``.

    ``vit``'s attention kernels get theirs from the model's jaxpr
    (:func:`optax_neuron.fan_in.from_computation`: query/key/value ``(0,)``,
    output ``(0, 1)``), traced once on an abstract image (under 0.15 s); the other
    models keep the default path rules (``None``).
    """
    if config.model != "vit":
        return None
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    image = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
    return on.fan_in.from_computation(lambda p, x: nnx.merge(graphdef, p, *rest)(x), params, image)


def loss_fn(model: nnx.Module, images: jax.Array, labels: jax.Array):
    """Mean cross-entropy of ``model`` on a batch, and its accuracy (auxiliary)."""
    logits = model(images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def make_train_epoch(graphdef: Any, batch_size: int, batch_sharding: Any = None) -> Callable:
    """``train_epoch(state, images, labels, key) -> (state, mean loss, mean accuracy)``.

    ``state`` is ``nnx.split((model, optimizer))[1]``; the images are shuffled
    with ``key`` and cut into ``len // batch_size`` full batches (the rest is
    dropped for this epoch); the steps run in one ``lax.scan``. Data parallel:
    ``batch_sharding`` (e.g. ``NamedSharding(mesh, P(None, "data"))``) lays the
    stacked batches out over the devices, each batch split along its examples;
    with the state replicated, ``jit`` all-reduces the gradients.
    """

    def train_step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
        (loss, accuracy), grads = grad_fn(model, *batch)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), (loss, accuracy)

    @jax.jit
    def train_epoch(state, images, labels, key):
        steps = images.shape[0] // batch_size
        perm = jax.random.permutation(key, images.shape[0])[: steps * batch_size]
        perm = perm.reshape(steps, batch_size)
        batches = (images[perm], labels[perm])
        if batch_sharding is not None:
            batches = jax.lax.with_sharding_constraint(batches, batch_sharding)
        state, (loss, accuracy) = jax.lax.scan(train_step, state, batches)
        return state, jnp.mean(loss), jnp.mean(accuracy)

    return train_epoch


def run(config: TrainConfig, data: Dataset, *, writer=None, progress=True, log=None) -> dict:
    """Train one model as ``config`` says and return its metrics.

    Args:
      config: the run's settings (checked by :func:`check_config`).
      data: a :class:`~optax_neuron.mnist.data.Dataset`.
      writer: an optional TensorBoard writer (``optax_neuron.summary_writer``);
        receives the records' scalars and the gradient statistics (``writer`` switches
        ``grad_stats`` on).
      progress: show tqdm bars. log: called with one line per epoch (e.g. ``tqdm.write``).

    Returns:
      ``{"config", "train_size", "epochs": [{"epoch", "train_loss", "train_accuracy",
      "test_loss", "test_accuracy", "val_loss", "val_accuracy", "epoch_time",
      "wall_time", ["grad_stats"]}], "test_accuracy", "test_loss", "params"}``.
    """
    check_config(config)
    n = min(config.limit_train or len(data.train_labels), len(data.train_labels))
    x_train, y_train = jnp.asarray(data.train_images[:n]), jnp.asarray(data.train_labels[:n])
    model = build_model(config)
    model.train()
    if config.optimizer == "rso":
        from optax_neuron.mnist.rso import run_rso

        return run_rso(
            config, data, model, x_train, y_train, writer=writer, progress=progress, log=log
        )
    batch_size = min(config.batch_size, n)
    if batch_size < 1:
        raise ValueError("the training set is empty")
    grad_stats = config.grad_stats or writer is not None
    total_steps = max(1, config.epochs * (n // batch_size))
    tx = make_optimizer(
        config.optimizer, config.learning_rate, config.momentum, schedule=config.schedule,
        total_steps=total_steps, grad_stats=grad_stats, fan_in=model_fan_in(config, model),
    )  # fmt: skip
    graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
    batch_sharding = None
    if config.devices > 1:  # data parallel: state and data replicated, each batch split
        devices = jax.local_devices()[: config.devices]
        mesh = jax.make_mesh((config.devices,), ("data",), (AxisType.Auto,), devices=devices)
        batch_sharding = NamedSharding(mesh, P(None, "data"))
        state, x_train, y_train = jax.device_put(
            (state, x_train, y_train), NamedSharding(mesh, P())
        )
    train_epoch = make_train_epoch(graphdef, batch_size, batch_sharding)

    def train(state, epoch):
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), epoch)
        state, loss, accuracy = train_epoch(state, x_train, y_train, key)
        return state, {"train_loss": float(loss), "train_accuracy": float(accuracy)}

    def measure(state):
        model, optimizer = nnx.merge(graphdef, state)
        record = evaluate_splits(model, data, config.eval_batch_size)
        if grad_stats:
            metrics = on.collect_metrics(optimizer.opt_state)
            record["grad_stats"] = {k: float(v) for k, v in metrics.items() if jnp.ndim(v) == 0}
        return record

    settings = run_settings(config, data, tensorboard=writer is not None)
    state, history = run_epochs(
        state, epochs=config.epochs, settings=settings, train=train, measure=measure,
        checkpoint=config.checkpoint, resume=config.resume, stop_after=config.stop_after,
        writer=writer, progress=progress, log=log, name=config.optimizer,
    )  # fmt: skip
    model, _ = nnx.merge(graphdef, state)
    return summary(config, n, history, model, data)
