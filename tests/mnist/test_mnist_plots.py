"""Plots: readable one-epoch curves with the validation curve; gradient
norms with one colour per parameter across panels, y labels, a legend outside, path names."""

from __future__ import annotations

import matplotlib
import pytest
from flax import nnx

from optax_neuron.mnist import plots
from optax_neuron.mnist.models import make_model

matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt


def _epoch(e, scale=1.0, val=True):
    rec = {"epoch": e, "train_loss": 2.0 / e * scale, "test_loss": 1.5 / e * scale,
           "train_accuracy": 0.5 + e / 10, "test_accuracy": 0.55 + e / 10}  # fmt: skip
    if val:
        rec |= {"val_loss": 1.6 / e * scale, "val_accuracy": 0.54 + e / 10}
    return rec


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_one_epoch_curves_are_readable():
    fig = plots.curves_figure({"sgd": [_epoch(1)]})
    ax_loss, ax_acc = fig.axes
    for ax in (ax_loss, ax_acc):
        assert ax.get_xlim() == (0.5, 1.5)  # not 0.96 .. 1.04
        assert list(ax.get_xticks()) == [1]
        lines = ax.get_lines()
        assert len(lines) == 3  # train, validation, test
        assert all(line.get_marker() not in (None, "None", "") for line in lines)  # points visible
    acc = {line.get_label(): list(line.get_ydata()) for line in ax_acc.get_lines()}
    assert acc == {"sgd train": [0.6], "sgd val": [0.64], "sgd test": [0.65]}


def test_curves_draw_validation_only_when_recorded_and_one_colour_per_run():
    runs = {"sgd": [_epoch(e) for e in (1, 2, 3)], "rso": [_epoch(e, val=False) for e in (1, 2, 3)]}
    fig = plots.curves_figure(runs)
    ax_loss, ax_acc = fig.axes
    labels = [line.get_label() for line in ax_acc.get_lines()]
    assert labels == ["sgd train", "sgd val", "sgd test", "rso train", "rso test"]
    colours = {line.get_label().split()[0]: set() for line in ax_acc.get_lines()}
    for line in ax_acc.get_lines():
        colours[line.get_label().split()[0]].add(line.get_color())
    assert all(len(c) == 1 for c in colours.values()) and colours["sgd"] != colours["rso"]
    assert list(ax_acc.get_xticks()) == [1, 2, 3]
    assert ax_loss.get_yscale() == "linear"  # losses within a factor 5: plain labels
    fig = plots.curves_figure({"sgd": [_epoch(e, scale=10.0**-e) for e in (1, 2, 3)]})
    assert fig.axes[0].get_yscale() == "log"


def _grad_epochs(paths):
    return [
        {"epoch": e, "grad_stats": {
            **{f"gradient_norm/{p}": 1.0 / (e + i) for i, p in enumerate(paths)},
            **{f"gradient_mean_norm/{p}": 0.5 / (e + i) for i, p in enumerate(paths)},
            "gradient_norm/global": 2.0 / e}}
        for e in (1, 2)
    ]  # fmt: skip


def test_grad_norms_one_colour_per_parameter_labels_and_legend_outside():
    model = make_model("mlp", nnx.Rngs(0), hidden=16)
    names = plots.layer_names(model)
    assert names == {
        "layers/1/kernel": "layers/1/kernel: Linear (784, 16)",
        "layers/1/bias": "layers/1/bias: Linear (16,)",
        "layers/3/kernel": "layers/3/kernel: Linear (16, 10)",
        "layers/3/bias": "layers/3/bias: Linear (10,)",
    }
    paths = sorted(names)
    fig = plots.grad_norms_figure(_grad_epochs(paths), "t", names)
    ax_g, ax_m = fig.axes
    colour = [
        {line.get_label(): line.get_color() for line in ax.get_lines()} for ax in (ax_g, ax_m)
    ]
    for p in paths:
        assert colour[0][names[p]] == colour[1][names[p]]  # the same colour in both panels
    assert len({colour[0][names[p]] for p in paths}) == len(paths)  # and a different one each
    assert colour[0]["global"] not in {colour[0][names[p]] for p in paths}
    assert "global" not in colour[1]  # not recorded for the running mean: not drawn
    assert ax_g.get_ylabel() and ax_m.get_ylabel()
    assert list(ax_g.get_xticks()) == [1, 2]

    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [names[p] for p in paths] + ["global"]
    fig.canvas.draw()
    box = legend.get_window_extent()
    for ax in (ax_g, ax_m):
        assert not box.overlaps(ax.get_window_extent()), "the legend covers a panel"


def test_plot_files_are_written(tmp_path):
    path = plots.plot_curves({"sgd": [_epoch(1)]}, tmp_path / "a" / "curves.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = plots.plot_grad_norms(_grad_epochs(["w"]), tmp_path / "g.png")
    assert path.stat().st_size > 1000
