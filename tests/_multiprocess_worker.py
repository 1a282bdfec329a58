"""Runs the scale-out guide's multi-host recipe as written, saves what it trained.

``python tests/_multiprocess_worker.py OUT.npz``: the recipe is the ```python block that
follows the marker ``<!-- multi-host recipe -->`` in ``docs/guides/scale_out.md``; it is
executed unchanged (it reads ``NUM_PROCESSES``, ``PROCESS_ID`` and ``COORDINATOR_ADDRESS``
itself). Afterwards every process gathers the final parameters, optimizer state, RSO state
and last SGD loss to the host (``multihost_utils.process_allgather``, a collective every
process joins) and process 0 writes them to ``OUT.npz``, with the device and process counts
and the loss of the whole synthetic data set before (``initial_loss``) and after
(``final_loss``) training.
"""

from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "docs", "guides", "scale_out.md")
MARKER = "<!-- multi-host recipe -->"


def recipe() -> str:
    text = open(README, encoding="utf-8").read()
    if MARKER not in text:
        raise SystemExit(f"{README}: no {MARKER!r} marker")
    match = re.search(r"```python\n(.*?)```", text[text.index(MARKER) :], re.S)
    if match is None:
        raise SystemExit(f"{README}: no ```python block after {MARKER!r}")
    return match.group(1)


def main() -> None:
    out = sys.argv[1]
    ns: dict = {"__name__": "__recipe__"}
    exec(compile(recipe(), f"{README} (multi-host recipe)", "exec"), ns)

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    loss_fn, x_all, y_all = ns["loss_fn"], ns["x_all"], ns["y_all"]
    result = {
        "params": ns["params"],
        "opt_state": ns["opt_state"],
        "rso_state": ns["rso_state"],
        "loss": ns["loss"],
    }
    leaves, _ = jax.tree_util.tree_flatten_with_path(result)
    arrays = {
        jax.tree_util.keystr(path): np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        for path, leaf in leaves
    }
    params = jax.tree.map(
        lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), ns["params"]
    )
    arrays["['initial_loss']"] = np.asarray(loss_fn(ns["init"], x_all, y_all))
    arrays["['final_loss']"] = np.asarray(loss_fn(params, x_all, y_all))
    if jax.process_index() == 0:
        np.savez(out, device_count=jax.device_count(), process_count=jax.process_count(), **arrays)


if __name__ == "__main__":
    main()
