"""Execute every notebook with tiny sizes (NOTEBOOK_FULL unset) and check for errors.

The notebooks are run in-process with nbclient on the project's ``python3``
kernel, from copies: the committed notebooks (with full-run outputs) are not
touched. A cell that raises fails the test; so does any error output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
from execute import error_outputs, execute  # noqa: E402

NAMES = sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_all_three_notebooks_are_there():
    assert NAMES == ["01_neuron_mean_momentum.ipynb", "02_gradient_statistics.ipynb", "03_rso.ipynb",
                     "04_neuron_adam.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_without_errors(name, monkeypatch):
    monkeypatch.delenv("NOTEBOOK_FULL", raising=False)  # the kernel inherits this environment
    nb = execute(NOTEBOOKS / name, timeout=600)
    assert error_outputs(nb) == []
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "a code cell did not run"
    images = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    assert images >= 2, f"{name}: expected plots, found {images}"
    assert "small run" in "".join(o.get("text", "") for o in code[0].get("outputs", []))


def test_error_outputs_are_detected():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 / 0")])
    nb.cells[0].outputs = [nbformat.v4.new_output("error", ename="ZeroDivisionError", evalue="division by zero", traceback=[])]
    assert error_outputs(nb) == ["cell 0: ZeroDivisionError: division by zero"]


def test_a_raising_cell_fails_the_run(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise ValueError('boom')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "bad.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(Exception, match="boom"):
        execute(path, timeout=60)
