"""Everything worth measuring on an accelerator, in one command of about ten minutes.

On whatever device JAX sees first (a GPU, a TPU, or the CPU), in this order:

1. **tests**: the fast part of the test suite (:data:`FAST_TESTS`, ``-m "not slow"``)
   on that device (``JAX_PLATFORMS`` set to it; float32 matrix products at full
   precision, ``JAX_DEFAULT_MATMUL_PRECISION=highest``, since the tests compare with
   NumPy at float32 tolerances): passed / failed counts and the failing tests.
2. **update step**: ``bench_update_step.py`` (neuron-mean step against plain SGD and
   against optax momentum, state bytes) and the same timing for neuron-Adam against
   ``optax.adam`` (both first moments), medians of interleaved repeats.
3. **demo**: ``python -m optax_neuron.mnist`` as ``make demo`` runs it (neuron-mean
   momentum, cnn, 4 epochs, real MNIST): test accuracy and seconds per epoch.
4. **rso**: the application's RSO on ``rso-paper`` with the official recipe (batch
   5000 drawn per weight from the cached layer inputs, ``--rso-fresh-batch weight``;
   the float64 summed loss, ``--rso-loss sum64``; the 50-cycle anneal), checkpointed
   under ``--work``: one cycle first (it measures the cycle and the compile; it may run
   past the budget up to :data:`FIRST_CYCLE_S`), then as many more as fit the remaining
   budget (a call that runs out is stopped with Ctrl-C and keeps its complete cycles).
   A second call of the suite continues the anneal where the last one stopped (same
   ``--work``).
5. **pgpe**: evosax PGPE on the same net (``bench_rso_peer.py``) for the search time
   RSO had in this call, its curve beside RSO's.

Before anything runs it checks what it needs (Python packages, the MNIST data, device
and host memory, disk) and names everything missing in one line (exit code 2).
It writes ``<out>/device_suite.json`` (every figure, the device named) and
``<out>/device_suite.md`` (rows for ``benchmarks/README.md``), plus the RSO metrics
and the PGPE plot. ``--quick`` runs every step at toy size on the CPU, the CLI's runs in
this process (part of ``make test``, ``tests/test_device_suite.py``).

    python benchmarks/device_suite.py --out outputs/device_suite          # ~10 min
    python benchmarks/device_suite.py --quick --out /tmp/suite            # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

FAST_TESTS = (
    "tests/test_fan_in.py",
    "tests/test_neuron_mean.py",
    "tests/test_neuron_adam.py",
    "tests/test_grad_stats.py",
    "tests/test_conformance.py",
    "tests/test_rso_channelwise.py",
    "tests/test_export.py",
    "tests/mnist/test_mnist_rso_sum64.py",
)
"""The test files run on the device (those missing from the tree are skipped)."""

QUICK_TEST = "tests/test_neuron_mean.py::test_question_example_1_2_2_1_network_by_hand"

PACKAGES = {
    "jax": "jax",
    "optax": "optax",
    "chex": "chex",
    "flax": "flax",
    "numpy": "numpy",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "orbax.checkpoint": "orbax-checkpoint",
    "evosax": "evosax",
    "pytest": "pytest",
    "optax_neuron": "optax_neuron (pip install -e . or PYTHONPATH=.)",
}
"""Module -> what to install (``pip install --no-index --no-deps`` wheels offline)."""

RSO_CYCLES = 50  # the official anneal
RSO_BATCH = 5000
FIRST_CYCLE_S = 300.0
"""The first RSO call of a suite run may take this long even past the budget (compile + one
cycle): a call stopped before its first cycle ends saves nothing."""


def _package_missing() -> list[str]:
    missing = []
    for module, name in PACKAGES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(f"package {name}")
    return missing


def _memory_missing(device, need_device: float, need_host: float) -> list[str]:
    missing = []
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    if limit is not None and limit < need_device:
        missing.append(f"device memory {limit / 2**30:.1f} GiB (need {need_device / 2**30:.0f})")
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        host = None
    if host is not None and host < need_host:
        missing.append(f"host memory {host / 2**30:.1f} GiB (need {need_host / 2**30:.0f})")
    return missing


def preflight(args) -> tuple[list[str], dict]:
    """Everything missing (one entry each) and what was found (device, data)."""
    missing = _package_missing()
    if any(m.startswith("package jax") or "optax_neuron" in m for m in missing):
        return missing, {}
    import jax

    device = jax.devices()[0]
    found = {"platform": device.platform, "device_kind": device.device_kind,
             "device_count": jax.device_count(), "jax": jax.__version__}  # fmt: skip
    try:
        from optax_neuron.mnist.data import load_mnist

        load_mnist()  # checks the file and its sha256
    except Exception as e:  # DataError, or the data package missing
        missing.append(f"MNIST data ({str(e).splitlines()[0][:160]})")
    # RSO, batch 5000 per weight: the input of a 28x28x16 layer over 50,000 images (2.4 GiB)
    # and its slices; the demo and PGPE need far less.
    gib = 2**30
    missing += _memory_missing(
        device, 0 if args.quick else 8 * gib, 2 * gib if args.quick else 8 * gib
    )
    free = shutil.disk_usage(args.work.parent if not args.work.exists() else args.work).free
    if free < 1 * gib:
        missing.append(f"disk {free / gib:.1f} GiB free under {args.work} (need 1)")
    return missing, found


# ----------------------------------------------------------------------------- the steps


def _captured(fn, *a, **kw):
    """``fn(*a, **kw)`` with its printed output captured (and echoed); returns (result, text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = fn(*a, **kw)
    sys.stdout.write(buf.getvalue())
    return result, buf.getvalue()


def _tables(text: str) -> str:
    """The Markdown table lines (and the ``##`` headings) of a benchmark's output."""
    keep = [ln for ln in text.splitlines() if ln.startswith(("|", "## "))]
    return "\n".join(keep)


def step_tests(args, platform: str) -> dict:
    files = [QUICK_TEST] if args.quick else [f for f in FAST_TESTS if (ROOT / f).exists()]
    env = dict(os.environ, JAX_PLATFORMS=platform, JAX_DEFAULT_MATMUL_PRECISION="highest")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
           "-rf", *files]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=args.tests_timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"status": "timed out", "files": files, "timeout_s": args.tests_timeout}
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1].strip("= ") if lines else ""
    counts = {}
    for part in summary.split(" in ")[0].split(","):
        words = part.split()
        if len(words) == 2 and words[0].isdigit():
            counts[words[1]] = int(words[0])
    failed = [ln[len("FAILED ") :] for ln in lines if ln.startswith("FAILED ")]
    status = "ok" if proc.returncode == 0 else "failed"
    return {"status": status, "files": files, "summary": summary, "counts": counts,
            "failed": failed[:50], "returncode": proc.returncode}  # fmt: skip


def _adam_rows(quick: bool) -> tuple[dict, list]:
    """neuron-Adam against optax.adam: one update step, interleaved medians (ms)."""
    import jax
    import optax
    from bench_update_step import make_runner, trees
    from common import time_interleaved

    import optax_neuron as on
    from optax_neuron import _random

    results, rows = {}, []
    for tree_name, build in trees(quick).items():
        params = build()
        grads = jax.tree.map(
            lambda p: _random.normal(jax.random.PRNGKey(1), p.shape, p.dtype), params
        )
        txs = {"optax adam": optax.adam(1e-3), "neuron_adam full": on.neuron_adam(1e-3),
               "neuron_adam neuron": on.neuron_adam(1e-3, first_moment="neuron")}  # fmt: skip
        runners = [make_runner(n, tx, params, grads) for n, tx in txs.items()]
        time_interleaved(runners, repeats=1 if quick else 21, warmup=1 if quick else 2)
        med = {r.name: r.median for r in runners}
        results[tree_name] = med
        for name, t in med.items():
            rows.append([tree_name, name, f"{t * 1e3:.3f}", f"{t / med['optax adam']:.2f}"])
        del runners, params, grads
    return results, rows


def step_update(args) -> dict:
    import bench_update_step
    from common import format_table

    quick = ["--quick", "--repeats", "1"]
    neuron_mean, text = _captured(bench_update_step.main, quick if args.quick else [])
    adam, rows = _adam_rows(args.quick)
    table = format_table(["tree", "optimizer", "ms", "/ optax adam"], rows)
    print(table)
    markdown = _tables(text) + "\n\n## neuron-Adam update step\n\n" + table
    return {"status": "ok", "neuron_mean_s": neuron_mean, "neuron_adam_s": adam,
            "markdown": markdown}  # fmt: skip


def _cli(argv: list[str], timeout: float) -> tuple[int, str, float]:
    """``python -m optax_neuron.mnist ARGV`` in a child process (Ctrl-C at ``timeout``)."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "optax_neuron.mnist", "--no-progress", *argv],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        proc.send_signal(2)  # SIGINT: the CLI stops, keeping its last complete checkpoint
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    sys.stdout.write(out)
    return proc.returncode, out, time.perf_counter() - t


def _cli_here(argv: list[str]) -> tuple[int, str, float]:
    """``--quick``: the CLI called in this process (no start-up; the data read once)."""
    from optax_neuron.mnist.__main__ import main as cli

    t = time.perf_counter()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = cli(["--no-progress", *argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    sys.stdout.write(buf.getvalue())
    return rc, buf.getvalue(), time.perf_counter() - t


def _run_cli(args, argv: list[str], timeout: float) -> tuple[int, str, float]:
    return _cli_here(argv) if args.quick else _cli(argv, timeout)


def step_demo(args) -> dict:
    out = args.work / "demo"
    shutil.rmtree(out, ignore_errors=True)
    extra = ["--model", "mlp", "--hidden", "16", "--epochs", "1", "--limit-train", "512"]
    rc, text, wall = _run_cli(
        args, ["--out", str(out), *(extra if args.quick else [])], args.budget
    )
    if rc != 0:
        return {"status": "failed", "returncode": rc, "tail": text[-2000:]}
    metrics = json.loads((out / "metrics.json").read_text())
    epochs = metrics["epochs"]
    return {"status": "ok", "test_accuracy": metrics["test_accuracy"], "wall_s": wall,
            "epoch_s": statistics.median(e["epoch_time"] for e in epochs),
            "epochs": len(epochs)}  # fmt: skip


def _rso_argv(args, ckpt: Path, out: Path) -> list[str]:
    """The CLI's official-recipe RSO run (the later of a repeated flag wins, as argparse does).

    ``--quick``: an MLP with 1 hidden unit (794 weights, quick to compile) on 128
    images: the same loop, checkpoints and resume; rso-paper's step is lowered in
    ``tests/test_export.py``.
    """
    size = ["--model", "mlp", "--hidden", "1", "--limit-train", "128", "--rso-batch-size", "16"]
    return ["--optimizer", "rso", "--model", "rso-paper", "--epochs", str(RSO_CYCLES),
            "--rso-batch-size", str(RSO_BATCH), "--rso-fresh-batch", "weight",
            "--rso-loss", "sum64", "--checkpoint", str(ckpt), "--out", str(out),
            *(size if args.quick else [])]  # fmt: skip


def step_rso(args, seconds: float) -> dict:
    """Cycles of the official anneal in ``seconds``: one, then as many more as fit."""
    from optax_neuron.mnist.checkpoints import latest_complete

    ckpt, out = args.work / "rso_checkpoint", args.work / "rso"
    done = lambda: (latest_complete(ckpt) if ckpt.exists() else None) or 0
    start = done()
    if start >= RSO_CYCLES:
        return {"status": "ok", "note": f"all {RSO_CYCLES} cycles done", "cycles_before": start,
                "cycles_after": start}  # fmt: skip
    t0, calls, text, target = time.perf_counter(), [], "", start + 1
    while True:
        before = done()
        argv = [*_rso_argv(args, ckpt, out), "--stop-after", str(target)]
        left = seconds - (time.perf_counter() - t0)
        if not calls:  # the first cycle must end, or no call ever gets further
            left = max(left, FIRST_CYCLE_S)
        rc, text, wall = _run_cli(args, argv + (["--resume"] if before else []), left)
        now = done()
        calls.append({"stop_after": target, "returncode": rc, "wall_s": wall, "cycles_after": now})
        if rc != 0 or now < target or now >= RSO_CYCLES:
            break
        epochs = json.loads((out / "metrics.json").read_text())["epochs"]
        searched = sum(e["epoch_time"] for e in epochs[before:now])
        overhead = wall - searched  # start-up, data, compile, evaluations
        cycle_s = searched / (now - before)
        more = int((seconds - (time.perf_counter() - t0) - overhead) // (cycle_s * 1.1))
        if args.quick:  # proves that a call resumes: two calls of one cycle each
            more = 1 if len(calls) < 2 else 0
        if more < 1:
            break
        target = min(RSO_CYCLES, now + more)
    after = done()
    result = {"status": "ok" if after > start else "failed", "cycles_before": start,
              "cycles_after": after, "calls": calls,
              "batch": 16 if args.quick else RSO_BATCH}  # fmt: skip
    if after > start:
        epochs = json.loads((out / "metrics.json").read_text())["epochs"]
        result["cycles"] = [{"cycle": e["epoch"], "test_accuracy": e["test_accuracy"],
                             "cycle_s": e["epoch_time"], "train_loss": e["train_loss"]}
                            for e in epochs]  # fmt: skip
        result["search_s_this_call"] = sum(e["epoch_time"] for e in epochs[start:after])
        result["metrics"] = str(out / "metrics.json")
    else:
        result["tail"] = text[-2000:]
    return result


def step_pgpe(args, seconds: float, rso_metrics: str | None) -> dict:
    import bench_rso_peer

    png = args.out / "rso_peer.png"
    argv = ["--quick"] if args.quick else ["--budget", f"{max(seconds, 10.0):.0f}"]
    argv += ["--out", str(png)] + (["--rso", rso_metrics] if rso_metrics else [])
    records, text = _captured(bench_rso_peer.main, argv)
    last = records[-1]
    budget = 2.0 if args.quick else seconds  # bench_rso_peer --quick searches for 2 s
    return {"status": "ok", "budget_s": budget, "generations": last["generation"],
            "test_accuracy": last["test_accuracy"], "images": last["images"],
            "plot": str(png), "markdown": _tables(text)}  # fmt: skip


# ------------------------------------------------------------------------------ report


def markdown(report: dict) -> str:
    dev = report["device"]
    name = f"{dev.get('device_kind', '?')} ({dev.get('platform', '?')}, jax {dev.get('jax', '?')})"
    steps = report["steps"]
    rows = []
    for key, s in steps.items():
        status, wall = s.get("status", "?"), f"{s.get('step_wall_s', 0):.0f}"
        if key == "tests":
            what = s.get("summary") or s.get("error", "")
        elif key == "update_step":
            what = "tables below"
        elif key == "demo":
            what = (f"test accuracy {s['test_accuracy']:.4f}, {s['epoch_s']:.1f} s/epoch"
                    if status == "ok" else s.get("error", ""))  # fmt: skip
        elif key == "rso":
            cycles = s.get("cycles") or []
            what = (f"cycles {s['cycles_before']} -> {s['cycles_after']} of {RSO_CYCLES}, "
                    f"test accuracy {cycles[-1]['test_accuracy']:.4f}, "
                    f"{statistics.median(c['cycle_s'] for c in cycles):.1f} s/cycle"
                    if cycles else s.get("note") or s.get("error", ""))  # fmt: skip
        else:
            what = (f"{s['generations']} generations in {s['budget_s']:.0f} s, "
                    f"test accuracy {s['test_accuracy']:.4f}" if status == "ok"
                    else s.get("error", ""))  # fmt: skip
        rows.append(f"| {key} | {status} | {wall} | {what} |")
    parts = [f"### Device suite on {name}, {report['started'][:10]}" +
             (" (--quick)" if report["quick"] else ""), "", report["machine"], "",
             "| step | status | wall s | result |", "|---|---|---:|---|", *rows]  # fmt: skip
    rso_rows = [f"| {c['cycle']} | {c['test_accuracy']:.4f} | {c['cycle_s']:.1f} |"
                for c in steps.get("rso", {}).get("cycles", [])]  # fmt: skip
    if rso_rows:
        parts += ["", "| RSO cycle | test accuracy | cycle s |", "|---:|---:|---:|", *rso_rows]
    for key in ("update_step", "pgpe"):
        if steps.get(key, {}).get("markdown"):
            parts += ["", steps[key]["markdown"]]
    return "\n".join(parts) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every step at toy size (CPU smoke run)")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "device_suite",
                    help="where the JSON, the Markdown and the plot go")  # fmt: skip
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="checkpoints and runs (default OUT/work); the next call continues RSO",
    )
    ap.add_argument("--budget", type=float, default=600.0, help="wall seconds in all (default 600)")
    ap.add_argument("--tests-timeout", type=float, default=150.0, help="seconds for the tests")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out")
    args = ap.parse_args(argv)
    args.work = args.work or args.out / "work"
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"tests", "update_step", "demo", "rso", "pgpe"}
    if unknown:
        ap.error(f"--skip: unknown step(s) {sorted(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    missing, device = preflight(args)
    if missing:
        print(f"device_suite: missing: {'; '.join(missing)}", file=sys.stderr)
        raise SystemExit(2)
    from common import machine_line

    t_start = time.perf_counter()
    report = {"device": device, "machine": machine_line(), "quick": args.quick,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "budget_s": args.budget, "steps": {}}  # fmt: skip

    def run(key, fn, *a):
        if key in skip:
            return None
        print(f"\n===== device_suite: {key}", flush=True)
        t = time.perf_counter()
        try:
            result = fn(*a)
        except Exception as e:  # a step that breaks is reported, the others still run
            result = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:500]}"}
        result["step_wall_s"] = time.perf_counter() - t
        report["steps"][key] = result
        (args.out / "device_suite.json").write_text(json.dumps(report, indent=1, default=str))
        return result

    run("tests", step_tests, args, device["platform"])
    run("update_step", step_update, args)
    run("demo", step_demo, args)
    left = args.budget - (time.perf_counter() - t_start)
    rso = run("rso", step_rso, args, 3600.0 if args.quick else left * 0.55) or {}
    pgpe_s = rso.get("search_s_this_call") or left * 0.35
    run("pgpe", step_pgpe, args, pgpe_s, rso.get("metrics"))
    report["wall_s"] = time.perf_counter() - t_start
    (args.out / "device_suite.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "device_suite.md").write_text(markdown(report))
    print("\n" + markdown(report))
    print(f"device_suite: {args.out / 'device_suite.json'}, {args.out / 'device_suite.md'}")
    return report


if __name__ == "__main__":
    main()
