"""Orbax checkpoints of the MNIST application's runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

__all__ = ["Checkpoints"]


class Checkpoints:
    """Orbax checkpoints of ``(model, optimizer)`` state plus the epoch history.

    One checkpoint per finished epoch (RSO: per cycle), the last two kept.
    The state tree is restored onto the structure of a freshly built one, so
    dtypes, shapes and the optimizer state's layout are checked on restore.
    """

    def __init__(self, directory: str | Path):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
        )

    def latest(self) -> int | None:
        """The last saved epoch count, or ``None``."""
        return self._manager.latest_step()

    def save(self, epoch: int, state: Any, meta: dict) -> None:
        ocp = self._ocp
        self._manager.save(
            epoch,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        )
        self._manager.wait_until_finished()

    def restore(self, like: Any) -> tuple[int, Any, dict]:
        ocp = self._ocp
        epoch = self.latest()
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like)
        got = self._manager.restore(
            epoch,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return epoch, got["state"], got["meta"]

    def close(self) -> None:
        self._manager.close()
