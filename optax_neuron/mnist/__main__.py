"""Command line: ``python -m optax_neuron.mnist`` / ``optax-neuron-mnist``.

With no arguments it runs the demo: neuron-mean momentum (learning rate 0.1,
momentum 0.9, cosine decay, batch 64) on the ``cnn`` model, 4 epochs on real
MNIST. ``--help`` lists every option. The last line printed is the final test
accuracy. Every argument, path and checkpoint is checked before training
starts: bad input gives one ``error:`` line on stderr and exit code 2 (a flag
that does not apply to the chosen optimizer included). Ctrl-C ends with one
line saying where to resume from (exit code 130).

Examples::

  python -m optax_neuron.mnist --out outputs/demo
  python -m optax_neuron.mnist --compare sgd,momentum,neuron-mean-sgd,adam --out outputs/cmp
  python -m optax_neuron.mnist --devices 2 --out outputs/dp2   # data parallel, 2 devices
  python -m optax_neuron.mnist --optimizer rso --model mlp --hidden 32 --epochs 5 --out outputs/rso
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

PROG = "optax-neuron-mnist"


class UsageError(Exception):
    """A bad command line; reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise UsageError(message)


def _positive(name: str, minimum: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(name: str, allow_zero: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(
                f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {text}"
            )
        return value

    return parse


def _momentum(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--momentum must be a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"--momentum must be in [0, 1), got {text}")
    return value


FLAG_DEFAULTS = {
    "optimizer": "neuron-mean-sgd",
    "batch_size": 64,
    "schedule": "cosine",
    "rso_batch_size": 5000,
    "rso_fresh_batch": "chunk",
    "rso_loss": "mean",
    "devices": 1,
}
"""Flags parsed with default ``None`` (so "given" differs from "default"), and their defaults."""


def build_parser() -> argparse.ArgumentParser:
    from optax_neuron.mnist.models import MODELS
    from optax_neuron.mnist.train import OPTIMIZERS

    def takes(flag: str) -> str:
        return ", ".join(n for n, c in OPTIMIZERS.items() if flag in c.flags)

    p = _Parser(
        prog=PROG,
        description="Train a Flax NNX model on MNIST (offline) with an optax_neuron optimizer.",
    )
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS, help="default: neuron-mean-sgd")
    p.add_argument("--model", default="cnn", choices=sorted(MODELS), help="default: cnn")
    p.add_argument(
        "--hidden",
        type=_positive("--hidden"),
        default=None,
        help="hidden units of mlp/cnn (channels of rso-paper); default: the model's",
    )
    p.add_argument(
        "--epochs", type=_positive("--epochs", 0), default=4, help="epochs (RSO: cycles); default 4"
    )
    p.add_argument(
        "--batch-size",
        type=_positive("--batch-size"),
        default=None,
        help="default 64 (gradient optimizers; RSO: --rso-batch-size)",
    )
    p.add_argument(
        "--learning-rate",
        type=_positive_float("--learning-rate"),
        default=None,
        help="peak learning rate; default per optimizer (not rso)",
    )
    p.add_argument(
        "--momentum",
        type=_momentum,
        default=None,
        help=f"momentum in [0, 1) ({takes('momentum')}); default per optimizer",
    )
    p.add_argument(
        "--schedule",
        default=None,
        choices=("cosine", "constant"),
        help="learning-rate schedule over the run (not rso); default cosine decay to 0",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="mnist", choices=("mnist", "fashion-mnist"))
    p.add_argument(
        "--data-dir",
        default=None,
        help="directory of IDX files (plain or .gz) instead of the default data",
    )
    p.add_argument(
        "--limit-train",
        type=_positive("--limit-train"),
        default=None,
        metavar="N",
        help="train on the first N training images",
    )
    p.add_argument(
        "--grad-stats",
        action="store_true",
        help="record per-layer gradient norms and running-mean norms each epoch "
        "(on with --tensorboard; not rso)",
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="write metrics.json and curves.png here"
    )
    p.add_argument(
        "--tensorboard", default=None, metavar="DIR", help="write TensorBoard scalars here"
    )
    p.add_argument(
        "--checkpoint", default=None, metavar="DIR", help="save a checkpoint after every epoch"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last complete checkpoint in --checkpoint "
        "(same flags as the original run)",
    )
    p.add_argument(
        "--stop-after",
        type=_positive("--stop-after"),
        default=None,
        metavar="N",
        help="end after N epochs (RSO: cycles) as if interrupted; the learning-rate schedule "
        "and RSO's step anneal still span --epochs, and --resume continues the run",
    )
    p.add_argument(
        "--compare",
        default=None,
        metavar="OPT1,OPT2,...",
        help="train each optimizer on the same seed and data; one curve each "
        "(instead of --optimizer)",
    )
    p.add_argument(
        "--rso-batch-size",
        type=_positive("--rso-batch-size"),
        default=None,
        help="RSO minibatch (one per chunk of searched weights); "
        "default 5000 as in the RSO paper's official code",
    )
    p.add_argument(
        "--devices",
        type=_positive("--devices"),
        default=None,
        metavar="N",
        help="train data-parallel over N local devices (on the CPU: N host devices made "
        "before JAX starts); the batch size must be divisible by N; default 1 (not rso)",
    )
    p.add_argument(
        "--rso-fresh-batch",
        default=None,
        choices=("chunk", "weight"),
        help="RSO: a fresh minibatch per chunk of weights (default: chunk) or per weight, "
        "as the RSO paper's official code: every weight is scored on --rso-batch-size rows "
        "of its layer's input over the whole training set (held in memory: about 2.5 GB "
        "for a 28x28x16 layer of 50,000 images)",
    )
    p.add_argument(
        "--rso-loss",
        default=None,
        choices=("mean", "sum64"),
        help="RSO: the loss that orders the candidates: the float32 mean cross-entropy "
        "(default: mean) or, as the RSO paper's official code, the cross-entropy summed "
        "over the minibatch in float64 (sum64)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


OPTIMIZER_FLAGS = (
    "learning_rate",
    "momentum",
    "schedule",
    "batch_size",
    "rso_batch_size",
    "rso_fresh_batch",
    "rso_loss",
    "devices",
)
"""Flags that only some optimizers take (``OptimizerChoice.flags``), with ``grad_stats``."""


def _check_flags_apply(args: argparse.Namespace, names: list[str]) -> None:
    """A flag that does not apply to the chosen optimizer is an error naming it.

    With ``--compare`` a flag applies to the listed optimizers that take it (``--momentum``
    with ``--compare sgd,adam``: sgd's momentum) and is an error if none of them does.
    """
    from optax_neuron.mnist.train import OPTIMIZERS

    for key in (*OPTIMIZER_FLAGS, "grad_stats"):
        if getattr(args, key) in (None, False):
            continue
        if not any(key in OPTIMIZERS[n].flags for n in names):
            takers = ", ".join(n for n, c in OPTIMIZERS.items() if key in c.flags)
            raise UsageError(
                f"--{key.replace('_', '-')} does not apply to {', '.join(names)} "
                f"(it applies to: {takers})"
            )


def _check_directory(flag: str, path: str) -> None:
    """``path`` must be (or become) a writable directory: created here, before any training."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: not a writable directory ({e.strerror or e})") from None


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the command line (all that needs no data); raise :class:`UsageError`."""
    from optax_neuron.mnist.train import OPTIMIZERS

    args = build_parser().parse_args(argv)
    if args.compare is not None:
        if args.optimizer is not None:
            raise UsageError(
                "--compare and --optimizer exclude each other: list the optimizers in --compare"
            )
        names = [s.strip() for s in args.compare.split(",") if s.strip()]
        bad = [s for s in names if s not in OPTIMIZERS]
        if not names or bad:
            choices = ", ".join(OPTIMIZERS)
            raise UsageError(
                f"--compare: unknown optimizer(s) {bad or names!r}; choose from {choices}"
            )
        if len(set(names)) != len(names):
            raise UsageError(f"--compare lists an optimizer twice: {args.compare}")
        args.compare = names
    _check_flags_apply(args, args.compare or [args.optimizer or FLAG_DEFAULTS["optimizer"]])
    for key, default in FLAG_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.batch_size % args.devices:
        raise UsageError(
            f"--batch-size {args.batch_size} must be divisible by --devices {args.devices}"
        )
    if args.resume and not args.checkpoint:
        raise UsageError("--resume needs --checkpoint DIR")
    if args.stop_after is not None and args.stop_after > args.epochs:
        raise UsageError(f"--stop-after {args.stop_after} must be <= --epochs {args.epochs}")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir}: no such directory")
    return args


def _use_devices(n: int) -> None:
    """Make ``n`` local devices available to JAX, or raise :class:`UsageError`.

    On the CPU the devices come from XLA's host-device-count flag, which is read once,
    when JAX starts its backends (the first computation, not ``import jax``): it is set
    here, before anything has run, and the device count is checked afterwards. The
    environment is restored then (the flag has been read), so that processes started
    later do not inherit it.
    """
    if n == 1:
        return
    flag = "--xla_force_host_platform_device_count"
    old = os.environ.get("XLA_FLAGS")
    kept = [f for f in (old or "").split() if not f.startswith(flag)]
    os.environ["XLA_FLAGS"] = " ".join([*kept, f"{flag}={n}"])
    try:
        import jax

        have = jax.local_device_count()
    finally:
        if old is None:
            del os.environ["XLA_FLAGS"]
        else:
            os.environ["XLA_FLAGS"] = old
    if have < n:
        raise UsageError(
            f"--devices {n}: only {have} {jax.default_backend()} device(s) can be had here "
            "(on the CPU, N devices are made only if JAX has not started before the CLI)"
        )


def _config(args, optimizer: str, checkpoint: str | None):
    """The run of ``optimizer``; flags it does not take keep ``TrainConfig``'s defaults."""
    from optax_neuron.mnist.train import OPTIMIZERS, TrainConfig

    config = TrainConfig(
        optimizer=optimizer,
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        momentum=args.momentum,
        schedule=args.schedule,
        seed=args.seed,
        limit_train=args.limit_train,
        grad_stats=args.grad_stats,
        checkpoint=checkpoint,
        resume=args.resume,
        hidden=args.hidden,
        rso_batch_size=args.rso_batch_size,
        devices=args.devices,
        rso_fresh_batch=args.rso_fresh_batch,
        rso_loss=args.rso_loss,
        stop_after=args.stop_after,
    )
    default = TrainConfig()
    for key in (*OPTIMIZER_FLAGS, "grad_stats"):
        if key not in OPTIMIZERS[optimizer].flags:
            setattr(config, key, getattr(default, key))
    return config


def _plan(args, data) -> dict:
    """``{name: TrainConfig}`` of the runs, after checking every path and checkpoint."""
    from optax_neuron.mnist import checkpoints
    from optax_neuron.mnist.loop import run_settings
    from optax_neuron.mnist.train import check_config

    for flag in ("out", "tensorboard", "checkpoint"):
        if getattr(args, flag):
            _check_directory(f"--{flag}", getattr(args, flag))
    names = args.compare or [args.optimizer]
    sub = (lambda d, name: str(Path(d) / name)) if args.compare else (lambda d, name: d)
    configs = {
        n: _config(args, n, sub(args.checkpoint, n) if args.checkpoint else None) for n in names
    }
    found = 0
    for config in configs.values():
        try:
            check_config(config)
            if not config.checkpoint:
                continue
            if not config.resume:
                checkpoints.check_fresh(config.checkpoint)
            elif checkpoints.latest_complete(config.checkpoint) is None and args.compare:
                config.resume = False  # --compare: this run had not saved anything yet
            else:
                settings = run_settings(config, data, tensorboard=args.tensorboard is not None)
                checkpoints.check_resumable(config.checkpoint, settings)
                found += 1
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.resume and not found:
        raise UsageError(f"--resume: no complete checkpoint in {args.checkpoint} to resume from")
    return configs


def _interrupted(configs: dict, name: str) -> str:
    """The one line printed on Ctrl-C: where to resume from."""
    from optax_neuron.mnist.checkpoints import latest_complete

    directory = configs[name].checkpoint
    if not directory:
        return (
            f"{PROG}: interrupted during {name}; nothing was saved "
            "(pass --checkpoint DIR to be able to resume)"
        )
    epoch = latest_complete(directory)
    if epoch is None:
        return f"{PROG}: interrupted during {name} before its first checkpoint; nothing to resume"
    return (
        f"{PROG}: interrupted; last complete checkpoint: epoch {epoch} of {name} in {directory}; "
        "run the same command with --resume to continue"
    )


def _json_ready(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "params"}


def main(argv=None) -> int:
    """Run the CLI; returns 0 (130 after Ctrl-C), or raises ``SystemExit(2)`` on bad input.

    Every argument, path and checkpoint is checked before training starts.
    """
    try:
        args = parse_args(argv)
        _use_devices(args.devices)
        from optax_neuron.mnist.data import DataError, load_dataset

        try:
            data = load_dataset(args.dataset, args.data_dir)
        except DataError as e:
            raise UsageError(str(e)) from None
        configs = _plan(args, data)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    from tqdm.auto import tqdm

    import optax_neuron as on
    from optax_neuron.mnist import plots
    from optax_neuron.mnist.train import build_model, run

    several = args.compare is not None
    results = {}
    for name, config in configs.items():
        tb = (
            (str(Path(args.tensorboard) / name) if several else args.tensorboard)
            if args.tensorboard
            else None
        )
        writer = on.summary_writer(tb) if tb else None
        try:
            results[name] = run(
                config, data, writer=writer, progress=not args.no_progress, log=tqdm.write
            )
        except KeyboardInterrupt:
            print(_interrupted(configs, name), file=sys.stderr)
            return 130
        finally:
            if writer is not None:
                writer.close()
    names = list(configs)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if several:
            doc = {
                "compare": names,
                "dataset": args.dataset,
                "runs": {n: _json_ready(r) for n, r in results.items()},
                "test_accuracy": {n: r["test_accuracy"] for n, r in results.items()},
            }
        else:
            doc = _json_ready(results[names[0]])
        (out / "metrics.json").write_text(json.dumps(doc, indent=2, allow_nan=True))
        title = f"{args.dataset} / {args.model}"
        plots.plot_curves({n: r["epochs"] for n, r in results.items()}, out / "curves.png", title)
        print(f"metrics: {out / 'metrics.json'}")
        print(f"curves:  {out / 'curves.png'}")
        for n, r in results.items():
            if any("grad_stats" in e for e in r["epochs"]):
                path = out / (f"grad_norms_{n}.png" if several else "grad_norms.png")
                labels = plots.layer_names(build_model(configs[n]))
                plots.plot_grad_norms(r["epochs"], path, f"{title} / {n}", labels)
                print(f"gradient norms: {path}")
    if args.tensorboard:
        print(f"tensorboard: {args.tensorboard}")
    if several:
        print(
            "test accuracy: "
            + ", ".join(f"{n} {r['test_accuracy']:.4f}" for n, r in results.items())
        )
    else:
        print(f"test accuracy: {results[names[0]]['test_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
