"""benchmarks/rso_batch_study.py: resuming, choosing the better loss, the table and the
prediction for batch 5,000 (on hand-made metrics: no training here)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import rso_batch_study as study


def _fake_run(root: Path, batch: int, loss: str, accuracies: list[float]) -> None:
    out = study.run_dir(root, batch, loss) / "out"
    out.mkdir(parents=True)
    epochs, accepted = [], 0
    for cycle, acc in enumerate(accuracies, 1):
        accepted += 100 * cycle
        epochs.append(
            {"epoch": cycle, "test_accuracy": acc, "val_accuracy": acc + 0.001,
             "epoch_time": 10.0 * cycle, "rso_accepted": {"a": accepted}, "rso_weights": 1000}
        )  # fmt: skip
    (out / "metrics.json").write_text(json.dumps({"epochs": epochs}))


def test_runs_are_parsed_and_bad_ones_refused():
    assert study.parse_runs("256:mean, 2000:best") == [(256, "mean"), (2000, "best")]
    for bad in ("256", "x:mean", "256:float", "0:mean"):
        with pytest.raises(SystemExit, match=r"--runs: .* is not BATCH:LOSS"):
            study.parse_runs(bad)


def test_a_finished_run_is_not_repeated(tmp_path, monkeypatch, capsys):
    _fake_run(tmp_path, 256, "mean", [0.5, 0.6])
    monkeypatch.setattr(study.subprocess, "run", lambda *a, **k: pytest.fail("ran again"))
    study.run(tmp_path, 256, "mean", cycles=2, anneal=50, seed=0)
    assert "2 cycles done already" in capsys.readouterr().out


def test_an_unfinished_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    _fake_run(tmp_path, 256, "sum64", [0.5])
    (study.run_dir(tmp_path, 256, "sum64") / "ckpt").mkdir()
    calls = []
    monkeypatch.setattr(study.subprocess, "run", lambda argv, **k: calls.append(argv))
    study.run(tmp_path, 256, "sum64", cycles=2, anneal=50, seed=0)
    (argv,) = calls
    assert argv[-1] == "--resume"
    assert argv[argv.index("--rso-loss") + 1] == "sum64"
    assert argv[argv.index("--stop-after") + 1] == "2" and argv[argv.index("--epochs") + 1] == "50"


def test_best_loss_needs_both_runs_and_takes_the_higher_accuracy(tmp_path):
    _fake_run(tmp_path, 1000, "mean", [0.90, 0.95])
    with pytest.raises(SystemExit, match="run batch 1000 with --rso-loss sum64 first"):
        study.best_loss(tmp_path, 1000, 2)
    _fake_run(tmp_path, 1000, "sum64", [0.91, 0.96])
    assert study.best_loss(tmp_path, 1000, 2) == "sum64"


def test_report_table_counts_and_prediction(tmp_path):
    _fake_run(tmp_path, 256, "mean", [0.80, 0.90])
    _fake_run(tmp_path, 1000, "mean", [0.85, 0.94])
    text = study.report(tmp_path, [(256, "mean"), (1000, "mean")], cycles=2)
    # accepted in a cycle: the difference of the running counts (100, then 200 more)
    assert "| 1,000 | mean | 2     | 94.00%" in text and "200 of 1,000" in text
    # the power law through errors 0.10 at 256 and 0.06 at 1000: 0.06 * 5**b at 5000
    b = math.log(0.06 / 0.10) / math.log(1000 / 256)
    expected = 1 - 0.06 * 5**b
    assert f"mean: {100 * expected:.1f}% after 2 cycles at batch 5,000" in text
    # it never passes 100%: an error halved from 256 to 1000 keeps falling, above zero
    _fake_run(tmp_path, 256, "sum64", [0.80, 0.92])
    _fake_run(tmp_path, 1000, "sum64", [0.85, 0.96])
    guess = study.predict(
        study.rows_of(tmp_path, [(256, "sum64"), (1000, "sum64")]), "sum64", 2, 5000
    )
    assert guess is not None and 0.96 < guess < 1.0
    assert study.predict(study.rows_of(tmp_path, [(256, "mean")]), "mean", 2, 5000) is None
    rows = json.loads((tmp_path / "study.json").read_text())["rows"]
    assert [(r["batch"], r["cycle"]) for r in rows] == [(256, 1), (256, 2), (1000, 1), (1000, 2)]
    assert (tmp_path / "study.png").stat().st_size > 0 and (tmp_path / "study.md").exists()
