"""Checkpoints of the MNIST application's runs: Orbax state plus a completion record.

A checkpoint of epoch ``N`` (RSO: cycle ``N``) in ``DIR`` is two things:

* ``DIR/N/``: the Orbax checkpoint of the state tree (``(model, optimizer)``
  state, or RSO's params and search state), which Orbax writes to a temporary
  directory and renames when complete;
* ``DIR/epoch-N.json``: the run's settings and its epoch history, written
  (atomically: temporary file, ``fsync``, rename) only after the state is on disk.

Only a checkpoint with both is *complete*. A run killed at any moment (during
an epoch, inside a save) leaves at worst an incomplete one, which is ignored and
removed; ``--resume`` continues from the last complete checkpoint, so it ends
bit-identical to a run that was never interrupted. The last two complete
checkpoints are kept: when the newest is damaged (a truncated record, unreadable
state) it is reported by its file name, set aside as ``*.damaged`` and the run
continues from the one before it.

Test hook (tests only): ``OPTAX_NEURON_TEST_SLEEP="save N SECONDS"`` sleeps
inside the save of epoch ``N``, after the state is written and before the
record that completes it; ``"epoch N SECONDS"`` sleeps in epoch ``N`` after
training, before its evaluation and save. The kill tests use it to land a
``SIGKILL`` deterministically inside a save or an epoch.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import jax

__all__ = [
    "Checkpoints",
    "DamagedCheckpoint",
    "NothingToResume",
    "SettingsMismatch",
    "check_fresh",
    "check_resumable",
    "latest_complete",
    "newest_intact",
    "sleep_hook",
]

_RECORD = re.compile(r"epoch-(\d+)\.json")
KEEP = 2
"""Complete checkpoints kept (older ones are deleted after each save)."""


class NothingToResume(ValueError):
    """``--resume`` on a directory without a complete checkpoint."""


class SettingsMismatch(ValueError):
    """``--resume`` with settings other than the checkpoint's; the message lists every one."""


def _flag(key: str) -> str:
    if key == "data":
        return "the training data"
    if key == "grad_stats":
        return "--grad-stats (also switched on by --tensorboard)"
    return "--" + key.replace("_", "-")


def sleep_hook(where: str, epoch: int) -> None:
    """The test hook: sleep if ``OPTAX_NEURON_TEST_SLEEP`` is ``"<where> <epoch> <seconds>"``."""
    spec = os.environ.get("OPTAX_NEURON_TEST_SLEEP", "").split()
    if len(spec) == 3 and spec[0] == where and int(spec[1]) == epoch:
        time.sleep(float(spec[2]))


def _records(directory: Path) -> dict[int, Path]:
    if not directory.is_dir():
        return {}
    found = (_RECORD.fullmatch(p.name) for p in directory.iterdir())
    return {int(m.group(1)): directory / m.group(0) for m in found if m}


def _complete(directory: Path) -> list[int]:
    return [n for n in _records(directory) if (directory / str(n)).is_dir()]


def latest_complete(directory: str | Path) -> int | None:
    """The last epoch with a complete checkpoint (state and record) in ``directory``, or None."""
    return max(_complete(Path(directory)), default=None)


def _shown(settings: dict, key: str) -> str:
    if key not in settings:
        return "not recorded"
    return "the default" if settings[key] is None else str(settings[key])


class DamagedCheckpoint(ValueError):
    """A checkpoint's record or state cannot be read; the message names the file."""


def _read_record(directory: Path, epoch: int) -> dict:
    path = directory / f"epoch-{epoch}.json"
    try:
        record = json.loads(path.read_text())
        if not (isinstance(record, dict) and {"settings", "history"} <= set(record)):
            raise ValueError("not a checkpoint record: no settings or history")
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise DamagedCheckpoint(f"the checkpoint record {path} is damaged ({e})") from None
    return record


def newest_intact(directory: str | Path) -> tuple[int | None, list[str]]:
    """The newest complete checkpoint whose record can be read, and a line per damaged one.

    Example: with ``epoch-4.json`` truncated and ``epoch-3.json`` intact, ``(3,
    ["the checkpoint record DIR/epoch-4.json is damaged (...)"])``.
    """
    directory = Path(directory)
    damaged = []
    for epoch in sorted(_complete(directory), reverse=True):
        try:
            _read_record(directory, epoch)
        except DamagedCheckpoint as e:
            damaged.append(str(e))
            continue
        return epoch, damaged
    return None, damaged


def _normalised(settings: dict) -> dict:
    return json.loads(json.dumps(settings))


def check_resumable(
    directory: str | Path, settings: dict, *, unit: str = "epoch"
) -> tuple[int, list[str]]:
    """The epoch ``--resume`` would continue after, and a line per damaged newer checkpoint.

    The newest complete checkpoint whose record can be read is the one resumed
    (:func:`newest_intact`); a damaged one after it is reported, not a reason to stop.

    Raises:
      NothingToResume: no intact complete checkpoint in ``directory``.
      SettingsMismatch: the checkpoint was written with other settings; the one-line
        message names every difference (``--epochs 3 (now 4), ...``).
    """
    directory = Path(directory)
    epoch, damaged = newest_intact(directory)
    if epoch is None:
        why = f" ({'; '.join(damaged)})" if damaged else ""
        raise NothingToResume(
            f"--resume: no complete checkpoint in {directory} to resume from{why}"
        )
    if damaged:
        damaged = [*damaged[:-1], f"{damaged[-1]}; resuming from {unit} {epoch} instead"]
    saved = _read_record(directory, epoch)["settings"]
    now = _normalised(settings)
    diffs = [
        f"{_flag(k)} was {_shown(saved, k)}, now {_shown(now, k)}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    if diffs:
        raise SettingsMismatch(
            f"--resume: the checkpoint in {directory} ({unit} {epoch}) was written with other "
            f"settings: {'; '.join(diffs)}; repeat the original flags or use a new --checkpoint"
        )
    return epoch, damaged


def check_fresh(directory: str | Path, *, unit: str = "epoch") -> None:
    """Raise ``ValueError`` if ``directory`` holds a complete checkpoint (a new run would
    overwrite it)."""
    epoch = latest_complete(directory)
    if epoch is not None:
        raise ValueError(
            f"--checkpoint {directory} already holds a checkpoint ({unit} {epoch}): "
            "pass --resume to continue it, or choose another directory"
        )


class Checkpoints:
    """The checkpoints of one run in ``directory`` (see the module docstring).

    The state tree is restored onto the structure of a freshly built one, so
    dtypes, shapes and the optimizer state's layout are checked on restore.
    """

    def __init__(self, directory: str | Path):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"checkpoint directory {self.directory} is a file")
        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(create=True)
        )
        self._drop_incomplete()

    def _drop_incomplete(self) -> None:
        """Delete Orbax steps without a completion record (a save that was killed)."""
        records = _records(self.directory)
        for step in self._manager.all_steps():
            if step not in records:
                self._manager.delete(step)

    def require_empty(self) -> None:
        """Refuse to start a new run over a complete checkpoint (see :func:`check_fresh`)."""
        check_fresh(self.directory)

    def save(self, epoch: int, state: Any, settings: dict, history: list[dict]) -> None:
        """Write the state of ``epoch``, then the record that makes it complete."""
        ocp = self._ocp
        self._manager.save(epoch, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()
        sleep_hook("save", epoch)
        record = {"epoch": epoch, "settings": _normalised(settings), "history": history}
        path = self.directory / f"epoch-{epoch}.json"
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for old in sorted(_records(self.directory))[:-KEEP]:
            (self.directory / f"epoch-{old}.json").unlink()  # record first: then it is incomplete
            if old in self._manager.all_steps():
                self._manager.delete(old)

    def restore(
        self, like: Any, settings: dict, *, unit: str = "epoch", log: Any = None
    ) -> tuple[int, Any, list[dict]]:
        """``(epoch, state, history)`` of the newest intact checkpoint, after checking settings.

        A damaged newer checkpoint (its record or its state cannot be read) is reported
        through ``log``, renamed ``*.damaged`` (kept for inspection, no longer a
        checkpoint) and the one before it is restored.
        Raises :class:`NothingToResume` or :class:`SettingsMismatch` (see :func:`check_resumable`).
        """
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like)
        while True:
            epoch, damaged = check_resumable(self.directory, settings, unit=unit)
            for line in damaged:
                if log is not None:
                    log(line)
            self._set_aside(e for e in _complete(self.directory) if e > epoch)
            try:
                state = self._manager.restore(epoch, args=self._ocp.args.StandardRestore(abstract))
            except Exception as e:  # Orbax and TensorStore raise many kinds
                if log is not None:
                    log(f"the checkpoint state {self.directory / str(epoch)} is damaged ({e})")
                self._set_aside([epoch])
                continue
            return epoch, state, list(_read_record(self.directory, epoch)["history"])

    def _set_aside(self, epochs: Any) -> None:
        """Rename damaged checkpoints' records ``*.damaged`` and drop their Orbax steps."""
        for epoch in list(epochs):
            record = self.directory / f"epoch-{epoch}.json"
            if record.exists():
                os.replace(record, record.with_name(record.name + ".damaged"))
            self._manager.reload()
            if epoch in self._manager.all_steps():
                self._manager.delete(epoch)

    def close(self) -> None:
        self._manager.close()
