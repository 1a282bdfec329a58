"""Smoke tests: every benchmark script runs (``--quick``) and prints sane tables.

No timing is asserted (speed belongs in the benchmarks themselves); the checks
are that each script finishes, prints its table, and reports finite positive
ratios, and that the memory table of the update-step benchmark matches the
1/fan_in prediction computed here from the shapes.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def test_common_helpers():
    import jax.numpy as jnp
    from common import Runner, format_table, machine_line, time_interleaved, tree_bytes

    assert (
        tree_bytes({"a": jnp.zeros((3, 4)), "b": [jnp.zeros(5, jnp.float16)]}) == 3 * 4 * 4 + 5 * 2
    )
    assert "jax" in machine_line() and "device" in machine_line()
    order = []
    runners = [Runner(n, lambda s, n=n: order.append(n) or s + 1, 0) for n in "ab"]
    time_interleaved(runners, repeats=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3  # warm-up each, then interleaved rounds
    assert [r.state for r in runners] == [4, 4] and all(len(r.times) == 3 for r in runners)
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved(runners, repeats=0)
    table = format_table(["x", "y"], [[1, "long cell"]])
    assert table.splitlines()[2] == "| 1 | long cell |"


def test_update_step_quick(capsys):
    import bench_update_step

    results = bench_update_step.main(["--quick"])
    out = capsys.readouterr().out
    assert set(results) == {"MNIST CNN (app)", "transformer (tiny)"}
    for medians in results.values():
        assert len(medians) == 6 and all(math.isfinite(t) and t > 0 for t in medians.values())
    # 8.2: kernel state / momentum trace = sum(size / fan_in) / sum(size), from the CNN's shapes.
    shapes = [((3, 3, 1, 32), 9), ((3, 3, 32, 64), 9 * 32), ((3136, 128), 3136), ((128, 10), 128)]
    size = [math.prod(s) for s, _ in shapes]
    predicted = sum(n / f for n, (_, f) in zip(size, shapes, strict=True)) / sum(size)
    (row,) = _table_rows(out, "MNIST CNN (app)")[-1:]
    assert float(row[5]) == pytest.approx(predicted, abs=1e-5)
    assert float(row[4]) < 0.01  # all state (biases included) vs the momentum trace


def test_monitoring_quick(capsys):
    import bench_monitoring

    results = bench_monitoring.main(["--quick"])
    assert len(results) == 3 and all(math.isfinite(r) and r > 0 for r in results.values())
    assert "/ unmonitored" in capsys.readouterr().out


def test_mnist_training_quick(capsys):
    import bench_mnist_training

    results = bench_mnist_training.main(["--quick"])
    assert set(results) == {"neuron-mean-sgd", "momentum", "adam"}
    assert results["momentum"]["ratio"] == 1.0
    for r in results.values():
        assert r["images_per_s"] > 0 and 0.0 <= r["accuracy"][1] <= 1.0
    assert "test acc epoch 1" in capsys.readouterr().out


def test_rso_quick(capsys):
    import bench_rso

    results = bench_rso.main(["--quick", "--by-call"])
    out = capsys.readouterr().out
    assert set(results) == {"plain", "chunk@32"}
    assert all(math.isfinite(t) and t > 0 for t in results.values())
    (row,) = _table_rows(out, "application, fresh batch per chunk")
    assert row[1] == "32" and float(row[3].rstrip("x")) == pytest.approx(
        results["plain"] / results["chunk@32"], abs=0.051
    )
    # the calls of one cycle: every searched weight in exactly one call, times measured
    calls = [
        [c.strip() for c in line.split("|")[1:-1]]
        for line in out.splitlines()
        if re.match(r"\| \d+ \| ", line)
    ]
    counts = [int(p.rsplit(" ", 1)[1]) for c in calls for p in c[1].split(", ")]
    assert len(calls) >= 1 and sum(counts) == 21  # 1 block of 1 channel: 9 + 1 + 1 + 10
    assert all(float(c[2]) > 0 and float(c[3]) > 0 for c in calls)


def test_rso_conv_quick(capsys):
    import bench_rso_conv

    results = bench_rso_conv.main(["--quick"])
    assert set(results) == {14, 7}
    assert all(set(ms) == set(bench_rso_conv.FORMS) for ms in results.values())
    assert all(math.isfinite(t) and t > 0 for ms in results.values() for t in ms.values())
    assert len(_table_rows(capsys.readouterr().out, "14x14")) == 1


def test_rso_peer_quick(capsys):
    import bench_rso_peer

    records = bench_rso_peer.main(["--quick"])
    assert records[0]["images"] == 0 and records[-1]["images"] == records[-1]["generation"] * 8 * 32
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in records)
    assert "evosax PGPE on the paper net" in capsys.readouterr().out


def test_run_all_lists_every_script():
    out = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == sorted(p.name for p in BENCH.glob("bench_*.py"))
    assert {"bench_update_step.py", "bench_monitoring.py", "bench_mnist_training.py"} <= set(out)
    bad = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--only", "nothing_like_this"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "matches no benchmark" in bad.stderr


def test_neuron_adam_quick(capsys):
    import bench_neuron_adam

    results = bench_neuron_adam.main(["--quick"])
    assert "test acc ep 1" in capsys.readouterr().out
    (runs,) = results.values()
    assert set(runs) == {"adam", "neuron-adam", "neuron-adam-neuron"}
    # State bytes predicted by hand from the vit's shapes (hidden 32, 2 blocks, 4 heads):
    # neurons = position table 16*32 (per element) + patch projection 32 + bias 32
    #   + per block: q, k, v kernels 3*32 and biases 3*32, out 32 + 32, MLP 64 + 64 + 32 + 32,
    #     two LayerNorms 4*32 (= 576) + final LayerNorm 2*32 + head 10 + 10.
    neurons = 16 * 32 + 64 + 2 * 576 + 64 + 20
    params = runs["adam"]["param_bytes"]
    counters = 2 * 4  # Adam's step counter and the cosine schedule's
    assert runs["adam"]["state_bytes"] == 2 * params + counters
    assert runs["neuron-adam"]["state_bytes"] == params + 4 * neurons + counters
    assert runs["neuron-adam-neuron"]["state_bytes"] == 2 * 4 * neurons + counters
    for r in runs.values():
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"]) and r["speed"] > 0
        assert len(r["losses"]) == 4 and all(math.isfinite(x) for x in r["losses"])
