"""The application's checkpoints: complete-only, settings recorded and compared, retention.

(Real kills of the command line are in test_mnist_kill.py; the optimizer states' Orbax
round trip is in tests/test_checkpoints.py.)
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from optax_neuron.mnist import checkpoints
from optax_neuron.mnist.checkpoints import Checkpoints, NothingToResume, SettingsMismatch
from optax_neuron.mnist.loop import run_epochs

SETTINGS = {"epochs": 3, "momentum": None, "grad_stats": False, "data": "abc"}


def _state(x):
    return {"w": jnp.full((2, 3), x, jnp.float32), "step": jnp.asarray(int(x), jnp.int32)}


def test_save_restore_round_trip_and_retention(tmp_path):
    ckpt = Checkpoints(tmp_path)
    for epoch in (1, 2, 3):
        ckpt.save(epoch, _state(epoch), SETTINGS, [{"epoch": e} for e in range(1, epoch + 1)])
    assert checkpoints.latest_complete(tmp_path) == 3
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["2", "3", "epoch-2.json", "epoch-3.json"]  # the last two kept
    epoch, state, history = ckpt.restore(_state(0), SETTINGS)
    ckpt.close()
    assert epoch == 3 and history == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]
    np.testing.assert_array_equal(state["w"], np.full((2, 3), 3.0, np.float32))
    assert state["step"].dtype == jnp.int32 and int(state["step"]) == 3


def test_a_state_without_its_record_is_incomplete_and_dropped(tmp_path):
    ckpt = Checkpoints(tmp_path)
    ckpt.save(1, _state(1), SETTINGS, [{"epoch": 1}])
    ckpt.save(2, _state(2), SETTINGS, [{"epoch": 1}, {"epoch": 2}])
    ckpt.close()
    (tmp_path / "epoch-2.json").unlink()  # as if killed between the state and the record
    assert checkpoints.latest_complete(tmp_path) == 1
    ckpt = Checkpoints(tmp_path)  # opening drops the incomplete epoch 2
    assert not (tmp_path / "2").exists()
    epoch, state, history = ckpt.restore(_state(0), SETTINGS)
    ckpt.save(2, _state(7), SETTINGS, [*history, {"epoch": 2}])  # and epoch 2 can be saved again
    ckpt.close()
    assert epoch == 1 and float(state["w"][0, 0]) == 1.0
    assert checkpoints.latest_complete(tmp_path) == 2


def test_resume_errors_name_every_difference(tmp_path):
    with pytest.raises(NothingToResume, match=r"no complete checkpoint in .* to resume from"):
        checkpoints.check_resumable(tmp_path, SETTINGS)
    ckpt = Checkpoints(tmp_path)
    ckpt.save(1, _state(1), SETTINGS, [{"epoch": 1}])
    ckpt.close()
    assert checkpoints.check_resumable(tmp_path, dict(SETTINGS)) == (1, [])  # nothing damaged
    changed = {**SETTINGS, "epochs": 4, "momentum": 0.5, "grad_stats": True, "data": "xyz"}
    with pytest.raises(SettingsMismatch) as err:
        checkpoints.check_resumable(tmp_path, changed)
    message = str(err.value)
    assert "\n" not in message
    for part in ("--epochs was 3, now 4", "--momentum was the default, now 0.5",
                 "--grad-stats (also switched on by --tensorboard) was False, now True",
                 "the training data was abc, now xyz"):  # fmt: skip
        assert part in message, message
    with pytest.raises(ValueError, match=r"already holds a checkpoint \(epoch 1\): pass --resume"):
        checkpoints.check_fresh(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        Checkpoints(afile)


def test_record_holds_settings_and_history_as_json(tmp_path):
    ckpt = Checkpoints(tmp_path)
    ckpt.save(1, _state(1), {**SETTINGS, "shape": (2, 3)}, [{"epoch": 1, "loss": float("nan")}])
    ckpt.close()
    record = json.loads((tmp_path / "epoch-1.json").read_text())
    assert record["epoch"] == 1 and record["settings"]["shape"] == [2, 3]
    assert np.isnan(record["history"][0]["loss"])


def test_run_epochs_resumes_where_it_stopped(tmp_path):
    """The skeleton with a toy loop: 2 of 4 epochs, then resumed, equals 4 straight epochs."""

    def train(state, epoch):
        new = {"w": state["w"] * 0.5 + epoch, "step": state["step"] + 1}
        return new, {"train_loss": float(new["w"][0, 0])}

    def measure(state):
        return {"train_accuracy": 0.0, "test_loss": 0.0, "test_accuracy": float(state["step"])}

    kw = {"epochs": 4, "settings": SETTINGS, "train": train, "measure": measure, "progress": False}
    straight, hist = run_epochs(_state(1), **kw)
    run_epochs(_state(1), checkpoint=str(tmp_path), stop_after=2, **kw)
    resumed, hist2 = run_epochs(_state(1), checkpoint=str(tmp_path), resume=True, **kw)
    np.testing.assert_array_equal(resumed["w"], straight["w"])
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("_time")} for r in h]
    assert strip(hist2) == strip(hist) and [r["epoch"] for r in hist] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        run_epochs(_state(1), checkpoint=str(tmp_path), **kw)
    with pytest.raises(SettingsMismatch, match="--epochs was 3, now 5"):
        run_epochs(_state(1), checkpoint=str(tmp_path), resume=True,
                   **{**kw, "settings": {**SETTINGS, "epochs": 5}})  # fmt: skip


def test_a_damaged_record_is_named_and_the_intact_one_before_is_restored(tmp_path):
    ckpt = Checkpoints(tmp_path)
    for epoch in (1, 2):
        ckpt.save(epoch, _state(epoch), SETTINGS, [{"epoch": e} for e in range(1, epoch + 1)])
    (tmp_path / "epoch-2.json").write_text('{"epoch": 2, "settings": {"epo')  # truncated
    epoch, damaged = checkpoints.check_resumable(tmp_path, dict(SETTINGS))
    assert epoch == 1 and len(damaged) == 1
    assert damaged[0].startswith(f"the checkpoint record {tmp_path / 'epoch-2.json'} is damaged (")
    assert damaged[0].endswith("; resuming from epoch 1 instead")
    lines = []
    epoch, state, history = ckpt.restore(_state(0), SETTINGS, log=lines.append)
    ckpt.close()
    assert (epoch, history, lines) == (1, [{"epoch": 1}], damaged)
    np.testing.assert_array_equal(state["w"], np.full((2, 3), 1.0, np.float32))
    assert (tmp_path / "epoch-2.json.damaged").exists() and not (tmp_path / "2").exists()
    # every record damaged: nothing to resume, and the message names the file
    (tmp_path / "epoch-1.json").write_text("")
    with pytest.raises(NothingToResume, match=r"epoch-1\.json is damaged"):
        checkpoints.check_resumable(tmp_path, dict(SETTINGS))
