"""The notebooks: jupytext pairs in sync, executed at tiny sizes, their plot helpers.

Every ``notebooks/NN_name.py`` (jupytext ``py:percent``, the reviewed source) has a
generated ``NN_name.ipynb`` with the same cells; the test executes the ``.py`` source
in-process with nbclient on the project's ``python3`` kernel (NOTEBOOK_FULL unset: tiny
sizes). A cell that raises fails the test; so does any error output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
from execute import error_outputs, execute, read, sources  # noqa: E402

SOURCES = [p.name for p in sources()]


def _cells(nb):
    return [(c.cell_type, c.source) for c in nb.cells]


def test_every_notebook_is_a_jupytext_pair():
    assert {
        "01_neuron_mean_momentum.py",
        "02_gradient_statistics.py",
        "03_rso.py",
        "04_neuron_adam.py",
    } <= set(SOURCES)
    ipynbs = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert ipynbs == sorted(Path(s).stem for s in SOURCES), "a .py or an .ipynb has no partner"
    assert not (NOTEBOOKS / "build.py").exists()
    for name in SOURCES:
        text = (NOTEBOOKS / name).read_text()
        assert "format_name: percent" in text and "\n# %%" in text, f"{name}: not py:percent"


def test_the_docs_list_every_notebook():
    # The notebooks page of the site holds the table; the README points to it.
    page = (NOTEBOOKS.parent / "docs" / "notebooks.md").read_text()
    for name in SOURCES:
        stem = Path(name).stem
        assert f"[`{stem}`](notebooks/{stem}.ipynb)" in page, f"docs/notebooks.md's table: {stem}"
    assert "docs/notebooks.md" in (NOTEBOOKS.parent / "README.md").read_text()


@pytest.mark.parametrize("name", SOURCES)
def test_pair_has_the_same_cells(name):
    source = read(NOTEBOOKS / name)
    generated = nbformat.read(NOTEBOOKS / name.replace(".py", ".ipynb"), as_version=4)
    assert _cells(generated) == _cells(source), (
        f"{name} and its .ipynb differ: run `make notebooks` (or notebooks/execute.py {name})"
    )
    code = [c for c in generated.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "the committed .ipynb is not executed"


def test_sync_check_sees_an_edit(tmp_path):
    name = SOURCES[0]
    edited = (NOTEBOOKS / name).read_text().replace("import time", "import time  # edited", 1)
    (tmp_path / name).write_text(edited)
    generated = nbformat.read(NOTEBOOKS / name.replace(".py", ".ipynb"), as_version=4)
    assert _cells(read(tmp_path / name)) != _cells(generated)


def test_shared_helpers_live_in_a_module_not_in_cells():
    for name in SOURCES:
        text = (NOTEBOOKS / name).read_text()
        assert "def train_curve" not in text and 'os.environ.get("NOTEBOOK_FULL")' not in text
        assert "from _helpers import" in text


@pytest.mark.slow
@pytest.mark.parametrize("name", SOURCES)
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
    nb.cells[0].outputs = [
        nbformat.v4.new_output(
            "error", ename="ZeroDivisionError", evalue="division by zero", traceback=[]
        )
    ]
    assert error_outputs(nb) == ["cell 0: ZeroDivisionError: division by zero"]


def test_a_raising_cell_fails_the_run(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise ValueError('boom')")])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = tmp_path / "bad.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(Exception, match="boom"):
        execute(path, timeout=60)


# ----------------------------------------------------------------- plot helpers


def test_cell_grid_shows_every_element_of_a_conv_window():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from _helpers import cell_grid

    with plt.rc_context({"axes.grid": True, "grid.alpha": 0.3}):  # the notebooks' style
        fig, ax = plt.subplots()
        ax.imshow(np.zeros((3, 3)))  # one 3x3 filter: a single colour
        cell_grid(ax)
    assert list(ax.get_xticks(minor=True)) == [-0.5, 0.5, 1.5, 2.5]
    assert list(ax.get_yticks(minor=True)) == [-0.5, 0.5, 1.5, 2.5]
    fig.canvas.draw()
    visible = [t for t in ax.xaxis.get_minor_ticks() if t.gridline.get_visible()]
    assert len(visible) == 4  # the lines between (and around) the 3 columns
    assert all(t.gridline.get_alpha() in (None, 1.0) for t in visible)  # not faded out
    assert all(t.gridline.get_color() == "white" for t in visible)
    assert not any(t.gridline.get_visible() for t in ax.xaxis.get_major_ticks())
    plt.close(fig)


def test_log_axis_ticks_label_less_than_a_decade():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from _helpers import log_axis_ticks

    fig, ax = plt.subplots()
    ax.plot([2.3, 40.0], [0.3, 0.9])
    ax.set_xscale("log")
    log_axis_ticks(ax.xaxis)
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    labels = [t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
    # was: one labelled tick, "10^1"
    assert len(labels) >= 3 and all(x.replace(".", "").isdigit() for x in labels), labels
    plt.close(fig)
