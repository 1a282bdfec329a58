"""What the RSO paper's 98% needs: minibatch size and loss precision, 5 cycles each.

The RSO paper (Tripathi & Singh 2020) reports 98% MNIST test accuracy after 5 cycles of its
50-cycle anneal, at minibatch 5,000, with the cross-entropy summed in float64 as its
official code computes it. This study runs the application on the paper's net
(``--model rso-paper``, official recipe, a fresh minibatch per chunk of weights) for the
first 5 cycles of the 50-cycle anneal at several minibatch sizes, each with the float32
mean (``--rso-loss mean``) and the float64 sum (``--rso-loss sum64``), one run after
another, and reports per cycle: test accuracy, search time, proposals accepted.

Every run is checkpointed after every cycle (``--checkpoint``): call the script again and
it continues where it stopped (a finished run is read, not repeated). ``2000:best`` runs
batch 2,000 with whichever loss did better at batch 1,000 (both must be finished).

    python benchmarks/rso_batch_study.py                      # every run, in order
    python benchmarks/rso_batch_study.py --runs 256:mean,256:sum64
    python benchmarks/rso_batch_study.py --report-only        # table and plot of what ran

Writes ``DIR/study.json`` (every cycle of every run), ``DIR/study.md`` (the table) and
``DIR/study.png`` (test accuracy after the last cycle against the minibatch, log scale,
beside the paper's 98% at 5,000). The prediction for 5,000 is a power law fitted to the test
error of the runs of one loss (a line in log-log): a rough guide, not a result.
Run it on an otherwise idle machine: the search times are the figures it reports.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from common import cpu_model, format_table

ROOT = Path(__file__).resolve().parents[1]
RUNS = "256:mean,256:sum64,1000:mean,1000:sum64,2000:best"
LOSSES = ("mean", "sum64")
PAPER = {"batch": 5000, "cycles": 5, "test_accuracy": 0.98}


def parse_runs(text: str) -> list[tuple[int, str]]:
    """``"256:mean,2000:best"`` as ``[(256, "mean"), (2000, "best")]``; one line if bad."""
    out = []
    for item in text.split(","):
        batch, _, loss = item.strip().partition(":")
        if not batch.isdigit() or int(batch) < 1 or loss not in (*LOSSES, "best"):
            raise SystemExit(
                f"--runs: {item!r} is not BATCH:LOSS with LOSS one of {', '.join(LOSSES)}, best"
            )
        out.append((int(batch), loss))
    return out


def run_dir(root: Path, batch: int, loss: str) -> Path:
    return root / f"batch{batch}_{loss}"


def cycles_done(path: Path) -> list[dict]:
    """The per-cycle records of a run's ``metrics.json`` (empty if it has none yet)."""
    metrics = path / "out" / "metrics.json"
    return json.loads(metrics.read_text())["epochs"] if metrics.exists() else []


def best_loss(root: Path, batch: int, cycles: int) -> str:
    """The loss with the higher test accuracy after ``cycles`` at ``batch``."""
    final = {}
    for loss in LOSSES:
        done = cycles_done(run_dir(root, batch, loss))
        if len(done) < cycles:
            raise SystemExit(f"best: run batch {batch} with --rso-loss {loss} first")
        final[loss] = done[cycles - 1]["test_accuracy"]
    return max(LOSSES, key=lambda loss: final[loss])


def run(root: Path, batch: int, loss: str, cycles: int, anneal: int, seed: int) -> None:
    """One application run, resumed from its checkpoint if it has one."""
    path = run_dir(root, batch, loss)
    if len(cycles_done(path)) >= cycles:
        print(f"batch {batch}, {loss}: {cycles} cycles done already")
        return
    argv = [
        sys.executable, "-m", "optax_neuron.mnist", "--optimizer", "rso", "--model", "rso-paper",
        "--rso-batch-size", str(batch), "--rso-loss", loss, "--rso-fresh-batch", "chunk",
        "--epochs", str(anneal), "--stop-after", str(cycles), "--seed", str(seed),
        "--checkpoint", str(path / "ckpt"), "--out", str(path / "out"), "--no-progress",
    ]  # fmt: skip
    if (path / "ckpt").exists():
        argv.append("--resume")
    print(f"batch {batch}, {loss}: {' '.join(argv[1:])}", flush=True)
    subprocess.run(argv, check=True, cwd=ROOT)


def rows_of(root: Path, runs: list[tuple[int, str]]) -> list[dict]:
    """One row per finished cycle of every run."""
    rows = []
    for batch, loss in runs:
        accepted_before = 0
        for record in cycles_done(run_dir(root, batch, loss)):
            accepted = sum(record.get("rso_accepted", {}).values())
            weights = record.get("rso_weights", 0)
            rows.append(
                {
                    "batch": batch,
                    "loss": loss,
                    "cycle": record["epoch"],
                    "test_accuracy": record["test_accuracy"],
                    "val_accuracy": record.get("val_accuracy"),
                    "search_s": record["epoch_time"],
                    "accepted": accepted - accepted_before,
                    "weights": weights,
                }
            )
            accepted_before = accepted
    return rows


def predict(rows: list[dict], loss: str, cycles: int, batch: int) -> float | None:
    """Test accuracy at ``batch`` from a power law in the batch, ``error = a * batch**b``: a
    least-squares line through ``log(test error)`` against ``log(batch)`` of the runs with
    ``loss`` after ``cycles`` (None with fewer than two batches). Unlike a line through the
    error itself, it never predicts an error below zero."""
    points = [
        (math.log(r["batch"]), math.log(1.0 - r["test_accuracy"]))
        for r in rows
        if r["loss"] == loss and r["cycle"] == cycles
    ]
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return 1.0 - math.exp(my + slope * (math.log(batch) - mx))


def report(root: Path, runs: list[tuple[int, str]], cycles: int) -> str:
    """Write study.json, study.md and study.png under ``root``; return the Markdown."""
    rows = rows_of(root, runs)
    table = format_table(
        ["batch", "loss", "cycle", "test accuracy", "validation", "search time", "accepted"],
        [
            [
                f"{r['batch']:,}", r["loss"], r["cycle"], f"{100 * r['test_accuracy']:.2f}%",
                f"{100 * r['val_accuracy']:.2f}%" if r["val_accuracy"] is not None else "",
                f"{r['search_s']:.0f} s", f"{r['accepted']:,} of {r['weights']:,}",
            ]
            for r in rows
        ],
    )  # fmt: skip
    lines = [table, ""]
    for loss in LOSSES:
        guess = predict(rows, loss, cycles, PAPER["batch"])
        if guess is not None:
            lines.append(
                f"Power law of the test error in the batch, {loss}: "
                f"{100 * guess:.1f}% after {cycles} cycles at batch {PAPER['batch']:,} "
                f"(the paper: {100 * PAPER['test_accuracy']:.0f}%)."
            )
    text = "\n".join(lines) + "\n"
    machine = f"CPU {cpu_model()}, {os.cpu_count()} cores"
    (root / "study.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    (root / "study.md").write_text(f"{machine}\n\n{text}")
    plot(root / "study.png", rows, cycles)
    return text


def plot(path: Path, rows: list[dict], cycles: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for loss, style in zip(LOSSES, ("o-", "s--"), strict=True):
        points = sorted(
            (r["batch"], 100 * r["test_accuracy"])
            for r in rows
            if r["loss"] == loss and r["cycle"] == cycles
        )
        if points:
            ax.plot(*zip(*points, strict=True), style, label=f"{loss} (this CPU)")
        guess = predict(rows, loss, cycles, PAPER["batch"])
        if guess is not None and points:
            ax.plot([points[-1][0], PAPER["batch"]], [points[-1][1], 100 * guess], ":", color="0.5")
    ax.plot(PAPER["batch"], 100 * PAPER["test_accuracy"], "k*", ms=12, label="RSO paper")
    ax.set(
        xscale="log", xlabel="minibatch", ylabel=f"test accuracy after {cycles} cycles (%)",
        title="RSO on the paper's net, 5 cycles of the 50-cycle anneal",
    )  # fmt: skip
    ticks = sorted({r["batch"] for r in rows} | {PAPER["batch"]})
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=RUNS, help=f"BATCH:LOSS,... (default {RUNS})")
    parser.add_argument("--cycles", type=int, default=5, help="cycles per run (default 5)")
    parser.add_argument("--anneal", type=int, default=50, help="cycles of the anneal (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=ROOT / "outputs" / "rso_batch_study")
    parser.add_argument("--report-only", action="store_true", help="no runs: report what ran")
    args = parser.parse_args(argv)
    runs = parse_runs(args.runs)
    args.dir.mkdir(parents=True, exist_ok=True)
    done = []
    for batch, loss in runs:
        if loss == "best":
            try:
                loss = best_loss(args.dir, 1000, args.cycles)
            except SystemExit:
                if args.report_only:
                    continue
                raise
        if not args.report_only:
            run(args.dir, batch, loss, args.cycles, args.anneal, args.seed)
        done.append((batch, loss))
        print(report(args.dir, done, args.cycles), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
