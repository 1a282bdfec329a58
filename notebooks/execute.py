"""Execute the notebooks in place with nbclient (the project's ``python3`` kernel).

``make notebooks`` runs ``NOTEBOOK_FULL=1 .venv/bin/python notebooks/execute.py``
to regenerate the committed outputs (a few minutes per notebook on CPU).
Without ``NOTEBOOK_FULL=1`` the notebooks use tiny sizes (what the tests run).

Usage: ``python notebooks/execute.py [NAME.ipynb ...]`` (default: all of them).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


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
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}})
    client.execute()
    errors = error_outputs(nb)
    if errors:
        raise RuntimeError(f"{path.name}: error outputs: {errors}")
    return nb


def main(argv: list[str]) -> int:
    names = argv or sorted(p.name for p in HERE.glob("[0-9][0-9]_*.ipynb"))
    for name in names:
        path = HERE / name
        t0 = time.perf_counter()
        nb = execute(path)
        for cell in nb.cells:  # execution timestamps only add noise to the diff
            cell.get("metadata", {}).pop("execution", None)
        nbformat.write(nb, path)
        print(f"{name}: executed in {time.perf_counter() - t0:.0f} s, {path.stat().st_size / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
