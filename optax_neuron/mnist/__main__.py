"""Command line: ``python -m optax_neuron.mnist`` / ``optax-neuron-mnist``.

With no arguments it runs the demo: neuron-mean momentum (learning rate 0.1,
momentum 0.9, cosine decay, batch 64) on the ``cnn`` model, 4 epochs on real
MNIST. ``--help`` lists every option; the settings of a run and the optimizers
each applies to are the table :data:`optax_neuron.mnist.settings.FLAGS`. The
last line printed is the final test accuracy, or, after ``--stop-after``, that
the run is unfinished and the command that continues it. Every argument, path
and checkpoint is checked before training starts: bad input gives one
``error:`` line on stderr and exit code 2 (a flag that does not apply to the
chosen optimizer included). Ctrl-C or SIGTERM ends with one line saying where
to resume from (exit code 130 or 143).

Examples::

  python -m optax_neuron.mnist --out outputs/demo
  python -m optax_neuron.mnist --compare sgd,momentum,neuron-mean-sgd,adam --out outputs/cmp
  python -m optax_neuron.mnist --devices 2 --out outputs/dp2   # data parallel, 2 devices
  python -m optax_neuron.mnist --optimizer rso --model mlp --hidden 32 --epochs 5 --out outputs/rso
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

PROG = "optax-neuron-mnist"
EXTRA_MODULES = ("flax", "orbax.checkpoint", "tqdm", "matplotlib", "tensorboardX")
"""What the application needs beyond the library: the ``[mnist]`` extra."""


class UsageError(Exception):
    """A bad command line; reported as one line, exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``docker stop``, ``kill``): handled like Ctrl-C."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise UsageError(message)


CLI_ONLY: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--out", {"metavar": "DIR", "help": "write metrics.json and curves.png here"}),
    ("--tensorboard", {"metavar": "DIR", "help": "write TensorBoard scalars here"}),
    (
        "--compare",
        {
            "metavar": "OPT1,OPT2,...",
            "help": "train each optimizer on the same seed and data; one curve each "
            "(instead of --optimizer)",
        },
    ),
    ("--no-progress", {"action": "store_true", "help": "no tqdm progress bars"}),
)
"""What to show and where to write it: flags of the command line, not of a run."""


def _require_extra() -> None:
    """One line naming the ``[mnist]`` extra when one of its packages is missing."""
    import importlib

    for name in EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UsageError(
                f"the MNIST application needs the [mnist] extra ({name} cannot be imported: "
                f"{e}); install it with: pip install 'optax_neuron[mnist]'"
            ) from None


def build_parser() -> argparse.ArgumentParser:
    """The command line: the settings of :data:`~optax_neuron.mnist.settings.FLAGS`, then
    :data:`CLI_ONLY`."""
    from optax_neuron.mnist.settings import add_arguments

    p = _Parser(
        prog=PROG,
        description="Train a Flax NNX model on MNIST (offline) with an optax_neuron optimizer. "
        "A flag ending in [optimizers] applies to those only.",
    )
    add_arguments(p)
    for option, kwargs in CLI_ONLY:
        p.add_argument(option, default=None, **kwargs)
    return p


def _check_flags_apply(args: argparse.Namespace, names: list[str]) -> None:
    """A flag that does not apply to the chosen optimizer is an error naming it.

    With ``--compare`` a flag applies to the listed optimizers that take it (``--momentum``
    with ``--compare sgd,adam``: sgd's momentum) and is an error if none of them does.
    """
    from optax_neuron.mnist.settings import EVERY, FLAGS, applies, takers

    for f in FLAGS.values():
        value = getattr(args, f.name, None)
        if not f.cli or f.families == EVERY or value is None or value is False:
            continue  # not given (0 and 0.0 are given values: `0 in (None, False)` is true)
        if not any(applies(f.name, n) for n in names):
            raise UsageError(
                f"{f.option} does not apply to {', '.join(names)} "
                f"(it applies to: {', '.join(takers(f.name))})"
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
    """Parse and check the command line (all that needs no data); raise :class:`UsageError`.

    Flags not given take their defaults from the table; ``args.configs`` is
    ``{optimizer: TrainConfig}`` of the runs, each checked by ``check_config``.
    """
    from optax_neuron.mnist.settings import FLAGS
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
    names = args.compare or [args.optimizer or FLAGS["optimizer"].default]
    _check_flags_apply(args, names)
    for f in FLAGS.values():
        if f.cli and getattr(args, f.name) is None:
            setattr(args, f.name, f.default)
    if args.resume and not args.checkpoint:
        raise UsageError("--resume needs --checkpoint DIR")
    if args.stop_after is not None and args.stop_after > args.epochs:
        raise UsageError(f"--stop-after {args.stop_after} must be <= --epochs {args.epochs}")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir}: no such directory")
    sub = (lambda d, name: str(Path(d) / name)) if args.compare else (lambda d, name: d)
    args.configs = {
        n: _config(args, n, sub(args.checkpoint, n) if args.checkpoint else None) for n in names
    }
    return args


def _config(args, optimizer: str, checkpoint: str | None):
    """The run of ``optimizer``: the table's settings as given, those that do not apply to
    it at their defaults; checked (``UsageError`` naming the flag)."""
    from optax_neuron.mnist.settings import FLAGS, TrainConfig, applies, check_config

    values = {
        f.name: getattr(args, f.name) if applies(f.name, optimizer) else f.default
        for f in FLAGS.values()
        if f.cli
    }
    config = TrainConfig(**{**values, "optimizer": optimizer, "checkpoint": checkpoint})
    try:
        check_config(config)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return config


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


def _plan(args, data) -> dict:
    """``{name: TrainConfig}`` of the runs, after checking every path and checkpoint; ``{}``
    (after one line per run saying so) when ``--resume`` finds every run finished."""
    from optax_neuron.mnist import checkpoints
    from optax_neuron.mnist.loop import run_settings

    for flag in ("out", "tensorboard", "checkpoint"):
        if getattr(args, flag):
            _check_directory(f"--{flag}", getattr(args, flag))
    configs = dict(args.configs)
    found, finished = 0, []
    for name, config in configs.items():
        try:
            if not config.checkpoint:
                continue
            if not config.resume:
                checkpoints.check_fresh(config.checkpoint, unit=_unit(config))
            elif checkpoints.latest_complete(config.checkpoint) is None and args.compare:
                config.resume = False  # --compare: this run had not saved anything yet
            else:
                settings = run_settings(config, data, tensorboard=args.tensorboard is not None)
                # a damaged newer checkpoint is reported when the run restores
                epoch, _ = checkpoints.check_resumable(
                    config.checkpoint, settings, unit=_unit(config)
                )
                found += 1
                if epoch == config.epochs:
                    finished.append(
                        f"{PROG}: {name} has finished already ({_unit(config)} {epoch} of "
                        f"{config.epochs} in {config.checkpoint}); nothing to resume"
                    )
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.resume and not found:
        raise UsageError(f"--resume: no complete checkpoint in {args.checkpoint} to resume from")
    if len(finished) == len(configs):  # (with --compare, finished runs give their results)
        print("\n".join(finished))
        return {}
    return configs


def _unit(config) -> str:
    return "cycle" if config.optimizer == "rso" else "epoch"


def _interrupted(configs: dict, name: str, how: str) -> str:
    """The one line printed on Ctrl-C or SIGTERM: where to resume from."""
    from optax_neuron.mnist.checkpoints import latest_complete

    config = configs[name]
    directory = config.checkpoint
    if not directory:
        return (
            f"{PROG}: {how} during {name}; nothing was saved "
            "(pass --checkpoint DIR to be able to resume)"
        )
    epoch = latest_complete(directory)
    if epoch is None:
        return f"{PROG}: {how} during {name} before its first checkpoint; nothing to resume"
    return (
        f"{PROG}: {how}; last complete checkpoint: {_unit(config)} {epoch} of {name} in "
        f"{directory}; run the same command with --resume to continue"
    )


def _continue_command(argv: list[str]) -> str:
    """The command line that continues a run stopped by ``--stop-after``."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--stop-after":
            skip = True
        elif not word.startswith("--stop-after=") and word != "--resume":
            kept.append(word)
    return shlex.join(["python", "-m", "optax_neuron.mnist", *kept, "--resume"])


def _unfinished(args, config, argv: list[str]) -> str:
    """The last line of a run ended by ``--stop-after``: it is unfinished, and how to go on."""
    done = f"stopped after {_unit(config)} {args.stop_after} of {args.epochs} (--stop-after)"
    if not args.checkpoint:
        return (
            f"{PROG}: {done}: the run is unfinished and was not saved "
            "(pass --checkpoint DIR to be able to continue it)"
        )
    return f"{PROG}: {done}: the run is unfinished; continue it with: {_continue_command(argv)}"


def _json_ready(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "params"}


def _raise_terminated(signum, frame):
    raise Terminated()


def _handle_sigterm(handler):
    """Install ``handler`` for SIGTERM; return the previous one (``None`` off the main thread,
    where Python cannot install signal handlers)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def main(argv=None) -> int:
    """Run the CLI; returns 0 (130 after Ctrl-C, 143 after SIGTERM), or raises
    ``SystemExit(2)`` on bad input.

    Every argument, path and checkpoint is checked before training starts.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _require_extra()
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
    if not configs:
        return 0

    from tqdm.auto import tqdm

    import optax_neuron as on
    from optax_neuron.mnist import plots
    from optax_neuron.mnist.train import build_model, run

    several = args.compare is not None
    results = {}
    previous = _handle_sigterm(_raise_terminated)
    try:
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
            except KeyboardInterrupt as e:
                terminated = isinstance(e, Terminated)
                how = "terminated (SIGTERM)" if terminated else "interrupted"
                print(_interrupted(configs, name, how), file=sys.stderr)
                return 143 if terminated else 130
            finally:
                if writer is not None:
                    writer.close()
    finally:
        _handle_sigterm(previous)
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
    if args.stop_after is not None and args.stop_after < args.epochs:
        print(_unfinished(args, configs[names[0]], argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
