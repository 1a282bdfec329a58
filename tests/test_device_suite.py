"""``benchmarks/device_suite.py --quick``: every step of the accelerator suite runs on the CPU.

One quick run (toy sizes; the update-step benchmark on a one-layer tree and
``bench_rso_peer.main`` replaced by a stand-in: both scripts run in
``test_benchmarks_smoke.py``, here their wiring is checked) must write the JSON and
the Markdown with every step ``ok``, run the RSO step as two CLI calls of which the second
resumes the first's checkpoint, and put the device in the report. A missing requirement
ends the suite before anything runs, with one line naming it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_quick_run_writes_every_step(tmp_path, monkeypatch):
    import bench_update_step
    import device_suite
    import jax.numpy as jnp

    tiny = lambda: {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}  # one layer
    monkeypatch.setattr(bench_update_step, "trees", lambda quick: {"tiny": tiny})
    import bench_rso_peer

    peer_argv = []

    def peer(argv):  # bench_rso_peer --quick itself runs in test_benchmarks_smoke.py
        peer_argv.extend(argv)
        print("| PGPE gen 3 | 2 | 768 | 0.2000 |")
        start = {"generation": 0, "images": 0, "test_accuracy": 0.1, "wall_time": 0.0}
        return [start, {"generation": 3, "images": 768, "test_accuracy": 0.2, "wall_time": 2.0}]

    monkeypatch.setattr(bench_rso_peer, "main", peer)
    report = device_suite.main(["--quick", "--out", str(tmp_path), "--tests-timeout", "300"])
    steps = report["steps"]
    assert list(steps) == ["tests", "update_step", "demo", "rso", "pgpe"]
    assert {k: s["status"] for k, s in steps.items()} == dict.fromkeys(steps, "ok"), steps
    assert steps["tests"]["counts"] == {"passed": 1}
    adam = steps["update_step"]["neuron_adam_s"]["tiny"]
    assert set(adam) == {"optax adam", "neuron_adam full", "neuron_adam neuron"}
    assert 0.0 <= steps["demo"]["test_accuracy"] <= 1.0
    rso = steps["rso"]
    assert (rso["cycles_before"], rso["cycles_after"]) == (0, 2)
    assert [c["stop_after"] for c in rso["calls"]] == [1, 2]  # the second call resumed
    assert [c["cycle"] for c in rso["cycles"]] == [1, 2]
    # PGPE gets the RSO run's metrics for its plot, and writes the plot beside the report
    rso_metrics = str(tmp_path / "work" / "rso" / "metrics.json")
    assert peer_argv == ["--quick", "--out", str(tmp_path / "rso_peer.png"), "--rso", rso_metrics]
    assert steps["pgpe"]["generations"] == 3 and "| PGPE gen 3 |" in steps["pgpe"]["markdown"]
    assert [e["epoch"] for e in json.loads(Path(rso_metrics).read_text())["epochs"]] == [1, 2]
    saved = json.loads((tmp_path / "device_suite.json").read_text())
    assert saved["device"]["platform"] == "cpu" and saved["steps"].keys() == steps.keys()
    md = (tmp_path / "device_suite.md").read_text()
    assert md.startswith("### Device suite on cpu") and "| rso | ok |" in md
    assert "| RSO cycle | test accuracy | cycle s |" in md and "optax adam" in md


def test_missing_requirement_is_one_line(tmp_path, monkeypatch, capsys):
    import device_suite

    monkeypatch.setitem(device_suite.PACKAGES, "no_such_module_here", "no-such-wheel")
    with pytest.raises(SystemExit) as e:
        device_suite.main(["--quick", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["device_suite: missing: package no-such-wheel"]
    assert not (tmp_path / "device_suite.json").exists()
