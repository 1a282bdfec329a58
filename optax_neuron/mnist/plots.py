"""Plots of training runs: loss/accuracy curves and per-layer gradient norms.

Both take the ``"epochs"`` lists that :func:`optax_neuron.mnist.train.run`
returns. ``*_figure`` builds the matplotlib figure (tests inspect it);
``plot_*`` writes it as a PNG with the non-interactive Agg backend. Every
point carries a marker and the epoch axis has integer ticks with half an epoch
of margin, so a one-epoch run shows readable points rather than a collapsed axis.

Example:
  >>> epochs = [{"epoch": 1, "train_loss": 0.5, "test_loss": 0.4, "val_loss": 0.45,
  ...            "train_accuracy": 0.8, "test_accuracy": 0.85, "val_accuracy": 0.84}]
  >>> fig = curves_figure({"sgd": epochs})
  >>> [float(x) for x in fig.axes[0].get_xlim()], [int(t) for t in fig.axes[0].get_xticks()]
  ([0.5, 1.5], [1])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["curves_figure", "grad_norms_figure", "layer_names", "plot_curves", "plot_grad_norms"]

SPLITS = (("train", "--", "s"), ("val", ":", "^"), ("test", "-", "o"))
"""(split, line style, marker) of the curves."""

_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _epoch_axis(ax: Any, xs: Sequence[int]) -> None:
    """Integer ticks, half an epoch of margin on both sides."""
    from matplotlib.ticker import MaxNLocator

    if xs:
        ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    if 0 < len(set(xs)) <= 12:
        ax.set_xticks(sorted(set(xs)))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def _loss_scale(ax: Any) -> None:
    """Log scale when the losses span more than a factor 5, else linear (readable labels)."""
    ys = [v for line in ax.get_lines() for v in line.get_ydata() if v > 0 and math.isfinite(v)]
    if ys and max(ys) > 5 * min(ys):
        ax.set_yscale("log")


def _values(epochs: Sequence[dict], key: str) -> list[float]:
    return [float(e.get(key, math.nan)) for e in epochs]


def curves_figure(runs: Mapping[str, Sequence[dict]], title: str = "") -> Any:
    """Loss and accuracy per epoch: one colour per run; train, validation, test by line style.

    Args:
      runs: ``{label: epochs}``, each epoch a dict with ``epoch`` and ``{train,val,test}_loss``,
        ``{train,val,test}_accuracy`` (a split that is absent or all NaN is not drawn).
      title: figure title.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    xs: list[int] = []
    drawn: set[str] = set()
    for i, (label, epochs) in enumerate(runs.items()):
        x = [e["epoch"] for e in epochs]
        xs += x
        for split, ls, marker in SPLITS:
            for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
                y = _values(epochs, f"{split}_{metric}")
                if all(math.isnan(v) for v in y):
                    continue
                ax.plot(x, y, ls=ls, marker=marker, color=f"C{i % 10}", label=f"{label} {split}")
                drawn.add(split)
    ax_loss.set(ylabel="cross-entropy", title="loss")
    _loss_scale(ax_loss)
    ax_acc.set(ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        _epoch_axis(ax, xs)
        ax.grid(alpha=0.3)
    styles = [
        Line2D([], [], color="0.3", ls=ls, marker=m, label=_SPLIT_NAMES[s])
        for s, ls, m in SPLITS
        if s in drawn
    ]
    colours = [Line2D([], [], color=f"C{i % 10}", lw=3, label=k) for i, k in enumerate(runs)]
    fig.legend(handles=colours + styles, loc="outside right upper", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def layer_names(model: Any) -> dict[str, str]:
    """``{"layers/0/kernel": "layers/0/kernel: Conv (3, 3, 1, 32)", ...}`` for a Flax NNX model.

    The labels :func:`grad_norms_figure` uses: the parameter path, the layer's
    type and the parameter's shape.
    """
    from flax import nnx

    modules, names = {}, {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            modules[tuple(path)] = type(node).__name__
        elif isinstance(node, nnx.Param):
            key = "/".join(str(p) for p in path)
            names[key] = (tuple(path[:-1]), tuple(node.shape))
    return {k: f"{k}: {modules.get(m, '?')} {shape}" for k, (m, shape) in names.items()}


def grad_norms_figure(
    epochs: Sequence[dict], title: str = "", names: Mapping[str, str] | None = None
) -> Any:
    """Per-layer gradient norm (last step of each epoch) and running-mean norm per epoch.

    Reads ``epoch["grad_stats"]`` (keys ``gradient_norm/<path>`` and
    ``gradient_mean_norm/<path>`` from :func:`optax_neuron.collect_metrics`). A
    parameter keeps its colour in both panels; the legend, outside the panels,
    names it by path (``names`` maps a path to a longer label, see
    :func:`layer_names`); ``global`` (all parameters together) is black.
    """
    plt = _pyplot()
    names = dict(names or {})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), layout="constrained")
    x = [e["epoch"] for e in epochs]
    stats = [e.get("grad_stats", {}) for e in epochs]
    paths = sorted({k.split("/", 1)[1] for s in stats for k in s if "/" in k} - {"global"})
    colours = {p: f"C{i % 10}" for i, p in enumerate(paths)} | {"global": "k"}
    panels = (
        ("gradient_norm/", "||gradient|| (last step of the epoch)", "gradient norm per parameter"),
        ("gradient_mean_norm/", "||running mean of the gradient||", "running-mean norm (EMA 0.99)"),
    )
    handles: dict[str, Any] = {}
    for ax, (prefix, ylabel, panel_title) in zip(axes, panels, strict=True):
        for path in [*paths, "global"]:
            y = [float(s.get(prefix + path, math.nan)) for s in stats]
            if all(math.isnan(v) for v in y):
                continue
            (line,) = ax.plot(x, y, "-o", ms=4, color=colours[path], label=names.get(path, path))
            handles.setdefault(path, line)
        ax.set(ylabel=ylabel, title=panel_title, yscale="log")
        _epoch_axis(ax, x)
        ax.grid(alpha=0.3)
    order = [p for p in [*paths, "global"] if p in handles]
    fig.legend(handles=[handles[p] for p in order], loc="outside right upper", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_curves(runs: Mapping[str, Sequence[dict]], path: str | Path, title: str = "") -> Path:
    """Write :func:`curves_figure` to ``path`` (PNG)."""
    return _save(curves_figure(runs, title), path)


def plot_grad_norms(
    epochs: Sequence[dict],
    path: str | Path,
    title: str = "",
    names: Mapping[str, str] | None = None,
) -> Path:
    """Write :func:`grad_norms_figure` to ``path`` (PNG)."""
    return _save(grad_norms_figure(epochs, title, names), path)


def _save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (parents created) at 100 dpi and close it."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
