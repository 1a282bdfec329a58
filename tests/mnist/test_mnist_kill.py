"""Real interruptions of the command line: SIGKILL during an epoch and inside a save, Ctrl-C,
SIGTERM, and a damaged checkpoint.

Each case starts ``python -m optax_neuron.mnist`` as a subprocess on a tiny
slice (``--limit-train 256``, 2 epochs) and interrupts it at a known point. After
SIGKILL and after a damaged record it resumes with ``--resume`` and compares with one
uninterrupted run: the histories (without timings) and every array of the final
checkpoints must be equal, bit for bit. After Ctrl-C and SIGTERM the checkpoint left
behind must be epoch 1's, equal to the uninterrupted run's. The test-only hook
``OPTAX_NEURON_TEST_SLEEP`` (see :mod:`optax_neuron.mnist.checkpoints`) holds the process
inside epoch 2 or inside the save of epoch 2 long enough for the signal to land there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ARGS = ["--model", "mlp", "--hidden", "4", "--limit-train", "256", "--batch-size", "64",
        "--epochs", "2", "--seed", "1", "--no-progress"]  # fmt: skip
TIMEOUT = 300


def _start(checkpoint: Path, out: Path, *extra: str, sleep: str = "") -> subprocess.Popen:
    env = dict(os.environ, OPTAX_NEURON_TEST_SLEEP=sleep, JAX_PLATFORMS="cpu")
    argv = [*ARGS, "--checkpoint", str(checkpoint), "--out", str(out), *extra]
    # ``python -m optax_neuron.mnist ARGV``, with Python's Ctrl-C handler installed even if
    # this process was started with SIGINT ignored (as a shell does for background jobs)
    code = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        f"sys.argv = ['optax_neuron.mnist', *{argv!r}]; "
        "runpy.run_module('optax_neuron.mnist', run_name='__main__', alter_sys=True)"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    return out, err


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _state(checkpoint: Path, epoch: int) -> list[np.ndarray]:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore((checkpoint / str(epoch) / "default").absolute())
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _timeless(epochs: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in ("epoch_time", "wall_time")} for e in epochs]


def _history(out: Path) -> list[dict]:
    return _timeless(json.loads((out / "metrics.json").read_text())["epochs"])


@pytest.fixture(scope="module")
def straight(run_once):
    """One uninterrupted run (one per pytest run): its history and final checkpoint."""
    root = run_once("kill_straight", lambda d: _finish(_start(d / "ckpt", d / "out")))
    return _history(root / "out"), _state(root / "ckpt", 2), root / "ckpt"


def _assert_equal_states(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def _assert_same_as_straight(straight, checkpoint: Path, out: Path) -> None:
    history, state, _ = straight
    assert _history(out) == history
    _assert_equal_states(_state(checkpoint, 2), state)


@pytest.mark.parametrize("where", ["epoch", "save"])
def test_sigkill_then_resume_is_bit_identical(where, tmp_path, straight):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    proc = _start(ckpt, out, sleep=f"{where} 2 120")
    if where == "epoch":
        _wait_for(ckpt / "epoch-1.json", proc)  # epoch 1 saved: now inside epoch 2
    else:
        _wait_for(ckpt / "2", proc)  # the state of epoch 2 is written, its record is not
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    assert (ckpt / "epoch-1.json").exists() and not (ckpt / "epoch-2.json").exists()
    assert (ckpt / "2").exists() == (where == "save")  # killed inside the save: incomplete

    resumed, _ = _finish(_start(ckpt, out, "--resume"))
    assert f"resumed from {ckpt} after epoch 1" in resumed
    _assert_same_as_straight(straight, ckpt, out)
    assert sorted(p.name for p in ckpt.iterdir()) == ["1", "2", "epoch-1.json", "epoch-2.json"]


@pytest.mark.parametrize(
    ("sig", "code", "how"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
)
def test_ctrl_c_and_sigterm_say_where_to_resume(sig, code, how, tmp_path, straight):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    proc = _start(ckpt, out, sleep="epoch 2 120")
    _wait_for(ckpt / "epoch-1.json", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)  # nothing hangs
    assert proc.returncode == code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == (
        f"optax-neuron-mnist: {how}; last complete checkpoint: epoch 1 of neuron-mean-sgd "
        f"in {ckpt}; run the same command with --resume to continue"
    )
    # Nothing that was checkpointed is lost, nothing half-written is left: epoch 1's state
    # and record as the uninterrupted run wrote them (that --resume continues from such a
    # checkpoint to the same bits is the SIGKILL test's).
    assert sorted(p.name for p in ckpt.iterdir()) == ["1", "epoch-1.json"]
    record = json.loads((ckpt / "epoch-1.json").read_text())
    assert record["epoch"] == 1 and _timeless(record["history"]) == straight[0][:1]
    _assert_equal_states(_state(ckpt, 1), _state(straight[2], 1))


def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_resumed(tmp_path, straight):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    shutil.copytree(straight[2], ckpt)  # the finished run's checkpoints (epochs 1 and 2)
    record = ckpt / "epoch-2.json"
    text = record.read_text()
    record.write_text(text[: len(text) // 2])  # truncated, as by a full disk
    resumed, _ = _finish(_start(ckpt, out, "--resume"))
    assert f"the checkpoint record {record} is damaged (" in resumed
    assert "resuming from epoch 1 instead" in resumed
    assert f"resumed from {ckpt} after epoch 1" in resumed
    _assert_same_as_straight(straight, ckpt, out)
    assert (ckpt / "epoch-2.json.damaged").read_text() == text[: len(text) // 2]  # kept
