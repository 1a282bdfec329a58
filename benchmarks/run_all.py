"""Run every ``benchmarks/bench_*.py`` in turn (``make bench``).

Each script runs in its own process (a fresh JAX, no state carried from one
benchmark to the next) and prints its own table; this runner streams their
output and prints a summary of exit codes and wall times at the end.

Usage::

    python benchmarks/run_all.py             # everything (the figures in README.md)
    python benchmarks/run_all.py --quick     # tiny versions: proves every script runs
    python benchmarks/run_all.py --only update_step,monitoring
    python benchmarks/run_all.py --list
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scripts(only: str | None = None) -> list[Path]:
    """The ``bench_*.py`` scripts, sorted.

    ``only`` keeps those whose name contains one of its comma-separated parts.
    """
    found = sorted(HERE.glob("bench_*.py"))
    if only:
        parts = [p.strip() for p in only.split(",") if p.strip()]
        found = [s for s in found if any(p in s.stem for p in parts)]
        if not found:
            raise SystemExit(
                f"--only {only!r} matches no benchmark; have "
                f"{[s.stem for s in sorted(HERE.glob('bench_*.py'))]}"
            )
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run every benchmarks/bench_*.py script.")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument(
        "--only", default=None, help="comma-separated name parts, e.g. update_step,rso"
    )
    parser.add_argument("--list", action="store_true", help="list the scripts and exit")
    args = parser.parse_args(argv)
    todo = scripts(args.only)
    if args.list:
        print("\n".join(s.name for s in todo))
        return 0
    summary = []
    for script in todo:
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        print(f"\n===== {script.name}{' --quick' if args.quick else ''}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        summary.append((script.name, rc, time.perf_counter() - t0))
    print("\n===== summary")
    for name, rc, seconds in summary:
        print(f"{name:32s} {'ok' if rc == 0 else f'FAILED (exit {rc})':16s} {seconds:7.1f} s")
    return max((rc != 0 for _, rc, _ in summary), default=0)


if __name__ == "__main__":
    sys.exit(main())
