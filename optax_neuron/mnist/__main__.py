"""Command line: ``python -m optax_neuron.mnist`` / ``optax-neuron-mnist``.

With no arguments it runs the demo: neuron-mean momentum (learning rate 0.1,
momentum 0.9, cosine decay, batch 64) on the ``cnn`` model, 4 epochs on real MNIST. ``--help`` lists every option. The last line printed
is the final test accuracy. Bad arguments give one ``error:`` line on stderr
and exit code 2.

Examples::

  python -m optax_neuron.mnist --out outputs/demo
  python -m optax_neuron.mnist --compare sgd,momentum,neuron-mean-sgd,adam --out outputs/cmp
  python -m optax_neuron.mnist --optimizer rso --model mlp --hidden 32 --epochs 5 --out outputs/rso
"""

from __future__ import annotations

import argparse
import json
import math
import sys
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
            raise argparse.ArgumentTypeError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from optax_neuron.mnist.models import MODELS
    from optax_neuron.mnist.train import OPTIMIZERS

    p = _Parser(prog=PROG, description="Train a Flax NNX model on MNIST (offline) with an optax_neuron optimizer.")
    p.add_argument("--optimizer", default="neuron-mean-sgd", choices=OPTIMIZERS, help="default: neuron-mean-sgd")
    p.add_argument("--model", default="cnn", choices=sorted(MODELS), help="default: cnn")
    p.add_argument("--hidden", type=_positive("--hidden"), default=None,
                   help="hidden units of mlp/cnn (channels of rso-paper); default: the model's")
    p.add_argument("--epochs", type=_positive("--epochs", 0), default=4, help="epochs (RSO: cycles); default 4")
    p.add_argument("--batch-size", type=_positive("--batch-size"), default=64, help="default 64 (RSO: --rso-batch-size)")
    p.add_argument("--learning-rate", type=_positive_float("--learning-rate"), default=None,
                   help="peak learning rate; default per optimizer")
    p.add_argument("--momentum", type=_positive_float("--momentum", allow_zero=True), default=None,
                   help="momentum (neuron-mean-sgd, momentum, nesterov, sgd, rmsprop); default per optimizer")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "constant"),
                   help="learning-rate schedule over the run; default cosine decay to 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="mnist", choices=("mnist", "fashion-mnist"))
    p.add_argument("--data-dir", default=None, help="directory of IDX files (plain or .gz) instead of the default data")
    p.add_argument("--limit-train", type=_positive("--limit-train"), default=None, metavar="N",
                   help="train on the first N training images")
    p.add_argument("--grad-stats", action="store_true",
                   help="record per-layer gradient norms and running-mean norms each epoch (on with --tensorboard)")
    p.add_argument("--out", default=None, metavar="DIR", help="write metrics.json and curves.png here")
    p.add_argument("--tensorboard", default=None, metavar="DIR", help="write TensorBoard scalars here")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="save an orbax checkpoint after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint")
    p.add_argument("--compare", default=None, metavar="OPT1,OPT2,...",
                   help="train each optimizer on the same seed and data; one curve each")
    p.add_argument("--rso-batch-size", type=_positive("--rso-batch-size"), default=5000,
                   help="RSO minibatch (one per chunk of searched weights); default 5000 as in the paper's code")
    p.add_argument("--rso-fresh-batch", default="chunk", choices=("chunk", "weight"),
                   help="RSO: a fresh minibatch per chunk of weights (default) or per weight, as the official code")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    from optax_neuron.mnist.train import OPTIMIZERS

    args = build_parser().parse_args(argv)
    if args.compare is not None:
        names = [s.strip() for s in args.compare.split(",") if s.strip()]
        bad = [s for s in names if s not in OPTIMIZERS]
        if not names or bad:
            raise UsageError(f"--compare: unknown optimizer(s) {bad or names!r}; choose from {', '.join(OPTIMIZERS)}")
        if len(set(names)) != len(names):
            raise UsageError(f"--compare lists an optimizer twice: {args.compare}")
        args.compare = names
    if args.resume and not args.checkpoint:
        raise UsageError("--resume needs --checkpoint DIR")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir}: no such directory")
    return args


def _config(args, optimizer: str, checkpoint: str | None):
    from optax_neuron.mnist.train import TrainConfig

    return TrainConfig(
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
        rso_fresh_batch=args.rso_fresh_batch,
    )


def _json_ready(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "params"}


def main(argv=None) -> int:
    """Run the CLI; returns 0, or raises ``SystemExit(2)`` on a bad command line or missing data."""
    try:
        args = parse_args(argv)
        from optax_neuron.mnist.data import DataError, load_dataset

        try:
            data = load_dataset(args.dataset, args.data_dir)
        except DataError as e:
            raise UsageError(str(e)) from None
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    import optax_neuron as on
    from optax_neuron.mnist import plots
    from optax_neuron.mnist.train import run
    from tqdm.auto import tqdm

    names = args.compare or [args.optimizer]
    several = len(names) > 1 or args.compare is not None
    results = {}
    for name in names:
        sub = (lambda d: str(Path(d) / name)) if several else (lambda d: d)
        writer = on.summary_writer(sub(args.tensorboard)) if args.tensorboard else None
        config = _config(args, name, sub(args.checkpoint) if args.checkpoint else None)
        try:
            results[name] = run(config, data, writer=writer, progress=not args.no_progress, log=tqdm.write)
        finally:
            if writer is not None:
                writer.close()

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
                plots.plot_grad_norms(r["epochs"], path, f"{title} / {n}")
                print(f"gradient norms: {path}")
    if args.tensorboard:
        print(f"tensorboard: {args.tensorboard}")
    if several:
        print("test accuracy: " + ", ".join(f"{n} {r['test_accuracy']:.4f}" for n, r in results.items()))
    else:
        print(f"test accuracy: {results[names[0]]['test_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
