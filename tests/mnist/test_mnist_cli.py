"""The command line: bad arguments exit 2 with one line, every optimizer runs, outputs."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from optax_neuron.mnist import data
from optax_neuron.mnist.__main__ import main
from optax_neuron.mnist.train import OPTIMIZERS

TINY = ["--model", "mlp", "--hidden", "4", "--limit-train", "32", "--batch-size", "32",
        "--rso-batch-size", "32", "--epochs", "1", "--no-progress"]


def _fails(argv, capsys, match):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("optax-neuron-mnist: error: "), err
    assert match in err[0], err[0]
    assert "Traceback" not in err[0]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--optimizer", "lamb"], "invalid choice: 'lamb'"),
        (["--epochs", "-1"], "--epochs must be >= 0, got -1"),
        (["--epochs", "two"], "--epochs must be an integer"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--learning-rate", "-0.1"], "--learning-rate must be > 0"),
        (["--data-dir", "/nonexistent/mnist"], "--data-dir /nonexistent/mnist: no such directory"),
        (["--resume"], "--resume needs --checkpoint"),
        (["--compare", "sgd,lamb"], "unknown optimizer(s) ['lamb']"),
        (["--compare", "sgd,sgd"], "twice"),
        (["--model", "vgg"], "invalid choice: 'vgg'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, match, capsys):
    _fails(argv, capsys, match)


def test_missing_data_exit_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "idx").mkdir()
    _fails(["--data-dir", str(tmp_path / "idx")], capsys, "no train-images-idx3-ubyte")
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    _fails([], capsys, "make setup")


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizer_runs_one_step(optimizer, capsys):
    assert main(["--optimizer", optimizer, *TINY]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("test accuracy: ")
    assert 0.0 <= float(lines[-1].split()[-1]) <= 1.0


def test_compare_writes_metrics_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--compare", "sgd,neuron-mean-sgd", "--grad-stats", "--out", str(out), *TINY]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["compare"] == ["sgd", "neuron-mean-sgd"]
    for name in doc["compare"]:
        run = doc["runs"][name]
        assert run["config"]["optimizer"] == name and len(run["epochs"]) == 1
        assert doc["test_accuracy"][name] == run["test_accuracy"] == run["epochs"][-1]["test_accuracy"]
        assert (out / f"grad_norms_{name}.png").stat().st_size > 1000
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert lines[-1] == ("test accuracy: " + ", ".join(
        f"{n} {doc['test_accuracy'][n]:.4f}" for n in doc["compare"]))
    assert any(str(out / "metrics.json") in line for line in lines)


def test_console_script_entry_point():
    exe = Path(sys.executable).parent / "optax-neuron-mnist"
    cmd = [str(exe)] if exe.exists() else [shutil.which("optax-neuron-mnist") or "optax-neuron-mnist"]
    proc = subprocess.run([*cmd, "--optimizer", "lamb"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("optax-neuron-mnist: error: argument --optimizer: invalid choice")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
