"""Every setting of the MNIST application, written once: the table :data:`FLAGS`.

Each :class:`Flag` holds a setting's default, its check, its help text and the
optimizer families it applies to. From the table are built:

* the command line (:func:`add_arguments`: argparse, help, defaults);
* the run configuration :class:`TrainConfig` (a dataclass with one field per
  setting) and :func:`check_config` (every value, one ``ValueError`` naming the flag);
* the run record (:func:`applied`): the settings that apply to the run's
  optimizer, as ``metrics.json`` and each checkpoint record them.

An optimizer's family (``"momentum"``, ``"gradient"`` or ``"rso"``) is written in
its entry of :data:`optax_neuron.mnist.train.OPTIMIZERS`; a flag names the families
it applies to, so "does ``--momentum`` apply to adam?" has one answer, here.

Example:
  >>> config = TrainConfig(optimizer="rso", epochs=2)
  >>> check_config(config)
  >>> [k for k in applied(config) if k.startswith("rso_")]
  ['rso_batch_size', 'rso_fresh_batch', 'rso_weight_decay', 'rso_loss', 'rso_chunk']
  >>> "batch_size" in applied(config), "rso_weight_decay" in applied(config)
  (False, True)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["FAMILIES", "FLAGS", "Check", "Flag", "TrainConfig", "add_arguments", "applied"]
__all__ += ["applies", "check_config", "family_of"]

FAMILIES = ("momentum", "gradient", "rso")
"""Optimizer families: gradient optimizers with a momentum, other gradient optimizers, RSO."""

GRADIENT = frozenset({"momentum", "gradient"})
EVERY = frozenset(FAMILIES)


# ------------------------------------------------------------------ value checks


class Check(NamedTuple):
    """How a setting is read from the command line and checked in a config.

    ``convert(text)`` turns the command-line text into the value (``ValueError``
    if it cannot); ``problem(value)`` says what is wrong with a value, or ``None``.
    """

    convert: Callable[[str], Any]
    problem: Callable[[Any], str | None]


def _int_at_least(least: int) -> Check:
    def problem(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {v!r}"
        return None if v >= least else f"must be >= {least}, got {v}"

    return Check(int, problem)


def _number(low: float, high: float | None = None, *, low_open: bool, what: str) -> Check:
    def problem(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number, got {v!r}"
        inside = math.isfinite(v) and (v > low if low_open else v >= low)
        if high is not None:
            inside = inside and v < high
        return None if inside else f"must be {what}, got {v}"

    return Check(float, problem)


def _choice(*choices: str) -> Check:
    def problem(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"

    return Check(str, problem)


def _anything(v: Any) -> str | None:
    return None


def _names_of(table: str) -> tuple[str, ...]:
    """The ``--optimizer`` or ``--model`` names (their tables live with their code)."""
    if table == "optimizer":
        from optax_neuron.mnist.train import OPTIMIZERS

        return tuple(OPTIMIZERS)
    from optax_neuron.mnist.models import MODELS

    return tuple(sorted(MODELS))


def _named(table: str) -> Check:
    def problem(v: Any) -> str | None:
        names = _names_of(table)
        return None if v in names else f"must be one of {', '.join(names)}, got {v!r}"

    return Check(str, problem)


POSITIVE = _int_at_least(1)
COUNT = _int_at_least(0)
RATE = _number(0.0, low_open=True, what="a finite number > 0")
DECAY = _number(0.0, low_open=False, what="a finite number >= 0")
UNIT = _number(0.0, 1.0, low_open=False, what="in [0, 1)")
TEXT = Check(str, _anything)
INTEGER = Check(int, lambda v: None if isinstance(v, int) else f"must be an integer, got {v!r}")
SWITCH = Check(bool, _anything)
_METAVARS = {POSITIVE: "N", COUNT: "N", INTEGER: "N", RATE: "X", DECAY: "X", UNIT: "X"}


# ------------------------------------------------------------------ the table


@dataclasses.dataclass(frozen=True)
class Flag:
    """One setting: ``--name`` on the command line, ``name`` in :class:`TrainConfig`.

    Its fields:

    - ``name``: the config field (the flag is ``--`` + name with ``-`` for ``_``).
    - ``default``: the value when not given (``None``: the optimizer's or the model's own).
    - ``help``: the help text (argparse adds nothing to it).
    - ``families``: the optimizer families it applies to; given for another one it is an error.
    - ``check``: how the value is read and checked (:class:`Check`); ``choices`` when it is one.
    - ``choices``: the allowed values (argparse lists them).
    - ``metavar``: argparse's placeholder; ``cli``: ``False`` for settings with no flag (internal).
    - ``computes``: ``False`` for settings that do not change what a run computes
      (where to save, whether to resume, when to stop); they are not compared on resume.
    """

    name: str
    default: Any
    help: str
    families: frozenset[str] = EVERY
    check: Check = TEXT
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    cli: bool = True
    computes: bool = True

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


def _flag(
    name: str,
    default: Any,
    help: str,
    families: frozenset[str] = EVERY,
    check: Check | None = None,
    **kwargs: Any,
) -> Flag:
    if check is None:
        check = _choice(*kwargs["choices"]) if "choices" in kwargs else TEXT
    return Flag(name, default, help, families, check, **kwargs)


FLAGS: dict[str, Flag] = {
    f.name: f
    for f in (
        _flag("optimizer", "neuron-mean-sgd", "the optimizer", check=_named("optimizer")),
        _flag("model", "cnn", "the model", check=_named("model")),
        _flag(
            "hidden",
            None,
            "hidden units of mlp/cnn (channels of rso-paper); default: the model's",
            check=POSITIVE,
        ),
        _flag("epochs", 4, "epochs (RSO: cycles)", check=COUNT),
        _flag("batch_size", 64, "minibatch of a gradient step", GRADIENT, POSITIVE),
        _flag(
            "learning_rate",
            None,
            "peak learning rate; default: the optimizer's",
            GRADIENT,
            RATE,
        ),
        _flag(
            "momentum",
            None,
            "momentum in [0, 1); default: the optimizer's",
            frozenset({"momentum"}),
            UNIT,
        ),
        _flag(
            "schedule",
            "cosine",
            "learning-rate schedule over the run (cosine: decay to 0)",
            GRADIENT,
            choices=("cosine", "constant"),
        ),
        _flag("seed", 0, "random seed (initialisation, shuffles, RSO draws)", check=INTEGER),
        _flag("dataset", "mnist", "the dataset", choices=("mnist", "fashion-mnist")),
        _flag(
            "data_dir",
            None,
            "directory of IDX files (plain or .gz) instead of the default data",
            metavar="DIR",
        ),
        _flag(
            "limit_train",
            None,
            "train on the first N training images",
            check=POSITIVE,
            metavar="N",
        ),
        _flag(
            "grad_stats",
            False,
            "record per-layer gradient norms and running-mean norms each epoch "
            "(on with --tensorboard)",
            GRADIENT,
            SWITCH,
        ),
        _flag(
            "devices",
            1,
            "train data-parallel over N local devices (on the CPU: N host devices made "
            "before JAX starts); the batch size must be divisible by N",
            GRADIENT,
            POSITIVE,
            metavar="N",
        ),
        _flag(
            "rso_batch_size",
            5000,
            "RSO minibatch (one per chunk of searched weights), as the RSO paper's official code",
            frozenset({"rso"}),
            POSITIVE,
        ),
        _flag(
            "rso_fresh_batch",
            "chunk",
            "RSO: a fresh minibatch per chunk of weights, or per weight as the official "
            "code (every weight scored on --rso-batch-size rows of its layer's input over "
            "the whole training set, held in memory: about 2.5 GB for a 28x28x16 layer of "
            "50,000 images)",
            frozenset({"rso"}),
            choices=("chunk", "weight"),
        ),
        _flag(
            "rso_weight_decay",
            1e-4,
            "RSO: weights multiplied by (1 - this) at every visit, as the official code",
            frozenset({"rso"}),
            DECAY,
        ),
        _flag(
            "rso_loss",
            "mean",
            "RSO: the loss that orders the candidates: the float32 mean cross-entropy "
            "(mean) or, as the RSO paper's official code, the cross-entropy summed over "
            "the minibatch in float64 (sum64)",
            frozenset({"rso"}),
            choices=("mean", "sum64"),
        ),
        _flag(
            "checkpoint",
            None,
            "save a checkpoint after every epoch (RSO: cycle) here",
            metavar="DIR",
            computes=False,
        ),
        _flag(
            "resume",
            False,
            "continue from the newest intact checkpoint in --checkpoint (same flags as the "
            "original run)",
            check=SWITCH,
            computes=False,
        ),
        _flag(
            "stop_after",
            None,
            "end after N epochs (RSO: cycles) as if interrupted; the learning-rate schedule "
            "and RSO's step anneal still span --epochs, and --resume continues the run",
            check=POSITIVE,
            metavar="N",
            computes=False,
        ),
        _flag(
            "rso_chunk",
            1000,
            "weights searched per jitted call",
            frozenset({"rso"}),
            POSITIVE,
            cli=False,
        ),
        _flag("eval_batch_size", 1000, "evaluation batch", check=POSITIVE, cli=False),
    )
}
"""Every setting of a run; see :class:`Flag`."""


def _make_config_class() -> type:
    fields = [(f.name, Any, dataclasses.field(default=f.default)) for f in FLAGS.values()]
    cls = dataclasses.make_dataclass("TrainConfig", fields)
    cls.__module__ = __name__
    cls.__doc__ = (
        "One run of the application: one field per entry of :data:`FLAGS`, with its default."
    )
    return cls


TrainConfig: Any = _make_config_class()


def family_of(optimizer: str) -> str:
    """The family of an ``--optimizer`` name (``ValueError`` for an unknown name)."""
    from optax_neuron.mnist.train import OPTIMIZERS

    problem = FLAGS["optimizer"].check.problem(optimizer)
    if problem:
        raise ValueError(f"--optimizer {problem}")
    return str(OPTIMIZERS[optimizer].family)


def applies(flag: str, optimizer: str) -> bool:
    """Whether setting ``flag`` applies to ``optimizer``."""
    return family_of(optimizer) in FLAGS[flag].families


def takers(flag: str) -> list[str]:
    """The optimizers ``flag`` applies to, in the table's order."""
    from optax_neuron.mnist.train import OPTIMIZERS

    return [n for n, c in OPTIMIZERS.items() if c.family in FLAGS[flag].families]


def check_config(config: Any) -> None:
    """Raise ``ValueError`` naming the flag of the first bad setting of ``config``.

    Every value is checked by its table entry; then what involves two settings: the
    gradient optimizers' batch must be divisible by ``devices`` (the batch actually
    used: at most ``limit_train`` images).
    """
    family = family_of(config.optimizer)
    for f in FLAGS.values():
        value = getattr(config, f.name)
        if value is None or (f.default is False and value is False):
            continue
        problem = f.check.problem(value)
        if problem:
            raise ValueError(f"{f.option} {problem}")
    if family in GRADIENT:
        batch = min(config.batch_size, config.limit_train or config.batch_size)
        if batch % config.devices:
            shown = f"--batch-size {config.batch_size}"
            if batch != config.batch_size:
                shown = f"the batch size {batch} (--limit-train {config.limit_train})"
            raise ValueError(f"{shown} must be divisible by --devices {config.devices}")


def applied(config: Any) -> dict[str, Any]:
    """The settings of ``config`` that apply to its optimizer (what a run record keeps)."""
    family = family_of(config.optimizer)
    return {f.name: getattr(config, f.name) for f in FLAGS.values() if family in f.families}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every command-line setting of :data:`FLAGS` to ``parser``.

    Settings that apply to some optimizers only, and the learning rate and momentum
    (whose defaults are the optimizer's), are parsed with default ``None``, so that a
    flag given for an optimizer it does not apply to can be told from its default.
    """
    for f in FLAGS.values():
        if not f.cli:
            continue
        kwargs: dict[str, Any] = {"dest": f.name}
        help_text = f.help
        if f.families != EVERY:
            help_text += f" [{_takers_shown(f.name)}]"
        if f.check is SWITCH:
            parser.add_argument(f.option, action="store_true", help=help_text, **kwargs)
            continue
        if f.default is not None:
            help_text += f"; default: {f.default}"
        metavar = f.metavar or _METAVARS.get(f.check)
        if f.name in ("optimizer", "model"):
            kwargs["choices"] = _names_of(f.name)
        elif f.choices:
            kwargs["choices"] = f.choices
        else:
            kwargs["type"] = _argument_type(f)
        parser.add_argument(f.option, default=None, metavar=metavar, help=help_text, **kwargs)


def _takers_shown(flag: str) -> str:
    """The optimizers a flag applies to, short: ``not rso`` rather than thirteen names."""
    from optax_neuron.mnist.train import OPTIMIZERS

    names = takers(flag)
    others = [n for n in OPTIMIZERS if n not in names]
    return f"not {', '.join(others)}" if len(others) < len(names) else ", ".join(names)


def _argument_type(f: Flag) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = f.check.convert(text)
        except ValueError:
            kind = "an integer" if f.check.convert is int else "a number"
            raise argparse.ArgumentTypeError(f"{f.option} must be {kind}, got {text!r}") from None
        problem = f.check.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{f.option} {problem}")
        return value

    return parse
