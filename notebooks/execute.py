"""Generate and execute the notebooks from their jupytext sources.

Each notebook is a pair: ``NN_name.py`` (jupytext ``py:percent``: the file people edit and
review) and ``NN_name.ipynb`` (generated from it and executed: the committed outputs).
``make notebooks`` runs ``NOTEBOOK_FULL=1 .venv/bin/python notebooks/execute.py``, which
reads every ``notebooks/[0-9][0-9]_*.py``, runs its cells with nbclient on the ``python3``
kernel (working directory: this folder, so ``_helpers`` imports) and writes the ``.ipynb``
beside it (a few minutes per notebook on CPU). Without ``NOTEBOOK_FULL=1`` the notebooks
use tiny sizes (what the tests run).

Usage: ``python notebooks/execute.py [NN_name.py ...]`` (default: all of them).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def sources() -> list[Path]:
    """Every notebook source, ``notebooks/[0-9][0-9]_*.py``, in order."""
    return sorted(HERE.glob("[0-9][0-9]_*.py"))


def read(path: Path) -> nbformat.NotebookNode:
    """A notebook from its ``.py`` source (jupytext) or an ``.ipynb`` file."""
    if path.suffix == ".py":
        return jupytext.read(path, fmt="py:percent")
    return nbformat.read(path, as_version=4)


def error_outputs(nb: nbformat.NotebookNode) -> list[str]:
    """The error outputs of an executed notebook, as short strings."""
    return [
        f"cell {i}: {out.get('ename')}: {out.get('evalue')}"
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]


def execute(path: Path, timeout: int = 1200) -> nbformat.NotebookNode:
    """Run every cell of ``path`` (working directory: this folder); raise on the first error."""
    nb = read(Path(path))
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    )
    client.execute()
    errors = error_outputs(nb)
    if errors:
        raise RuntimeError(f"{Path(path).name}: error outputs: {errors}")
    return nb


def main(argv: list[str]) -> int:
    paths = [HERE / name for name in argv] or sources()
    for path in paths:
        t0 = time.perf_counter()
        nb = execute(path)
        for cell in nb.cells:  # execution timestamps only add noise to the diff
            cell.get("metadata", {}).pop("execution", None)
        out = path.with_suffix(".ipynb")
        nbformat.write(nb, out)
        seconds, kb = time.perf_counter() - t0, out.stat().st_size / 1e3
        print(f"{out.name}: executed in {seconds:.0f} s, {kb:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
