"""Timing helpers shared by the benchmark scripts.

Every figure the benchmarks report is a ratio against a baseline measured in
the same process: the candidates are warmed up (compiled and run), then run
interleaved (A B C A B C ...) so that a slow phase of a shared machine hits
all of them alike, and each is summarised by the median of its repeats.

A candidate is a :class:`Runner`: a jitted step ``state -> state`` and its
current state. Steps may donate their state (``donate_argnums``); the runner
keeps the returned state for the next call, so donation is safe.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Runner",
    "add_common_args",
    "batch_norm",
    "cpu_model",
    "format_table",
    "machine_line",
    "time_interleaved",
    "tree_bytes",
]


def batch_norm(p: dict, h: jax.Array, stats_rows: int | None = None) -> jax.Array:
    """BatchNorm with batch statistics: ``(h - mean) / sqrt(var + 1e-5) * scale + bias``.

    ``mean`` and ``var`` are taken over every axis but the channel (last), from the
    first ``stats_rows`` rows of ``h`` (all rows when ``None``); ``p`` holds ``scale``
    and ``bias``.
    """
    rows = h if stats_rows is None else h[:stats_rows]
    axes = tuple(range(h.ndim - 1))
    mean, var = jnp.mean(rows, axis=axes), jnp.var(rows, axis=axes)
    return (h - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """One line describing where the figures come from: CPU, cores, JAX, device."""
    dev = jax.devices()[0]
    return (
        f"CPU {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"jax {jax.__version__}; device {dev.platform}: {dev.device_kind} (x{jax.device_count()})"
    )


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of ``tree``."""
    return int(
        sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    )


@dataclass
class Runner:
    """A candidate to time: ``state = step(state)`` per call.

    Attributes:
      name: label in the table.
      step: a (jitted) function ``state -> state``. It may donate its argument.
      state: the current state; replaced by each call's result.
      times: seconds of each timed call (filled by :func:`time_interleaved`).
    """

    name: str
    step: Callable[[Any], Any]
    state: Any
    times: list[float] = field(default_factory=list)

    def call(self) -> float:
        """Run one step to completion and return its wall time in seconds."""
        t0 = time.perf_counter()
        self.state = jax.block_until_ready(self.step(self.state))
        return time.perf_counter() - t0

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def time_interleaved(runners: Sequence[Runner], repeats: int = 15, warmup: int = 2) -> list[Runner]:
    """Warm up every runner, then time them interleaved; return them with ``times`` filled.

    Each runner gets ``warmup`` untimed calls (the first compiles), then
    ``repeats`` rounds in which every runner is called once, in turn.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for r in runners:
        r.state = jax.block_until_ready(r.state)
        for _ in range(warmup):
            r.call()
        r.times = []
    for _ in range(repeats):
        for r in runners:
            r.times.append(r.call())
    return list(runners)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pipes), columns padded for reading in a terminal too."""
    cells = [[str(h) for h in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def add_common_args(parser: argparse.ArgumentParser, repeats: int = 15) -> argparse.ArgumentParser:
    """``--quick`` (a few repeats on small inputs: proves the script runs) and ``--repeats``."""
    parser.add_argument(
        "--quick", action="store_true", help="tiny run that only proves the script works"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help=f"timed repeats per candidate (default {repeats})"
    )
    return parser
