"""Plots of training runs: loss/accuracy curves and per-layer gradient norms.

Both take the ``"epochs"`` lists that :func:`optax_neuron.mnist.train.run`
returns and write a PNG with matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_curves", "plot_grad_norms"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: Mapping[str, Sequence[dict]], path: str | Path, title: str = "") -> Path:
    """Loss and accuracy per epoch, one line per run (train dashed, test solid).

    Args:
      runs: ``{label: epochs}``, each epoch a dict with ``train_loss``,
        ``test_loss``, ``train_accuracy``, ``test_accuracy``.
      path: the PNG to write.
      title: figure title.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, epochs) in enumerate(runs.items()):
        color = f"C{i % 10}"
        x = [e["epoch"] for e in epochs]
        ax_loss.plot(x, [e["train_loss"] for e in epochs], "--", color=color, alpha=0.7)
        ax_loss.plot(x, [e["test_loss"] for e in epochs], "-o", color=color, label=label)
        ax_acc.plot(x, [e["train_accuracy"] for e in epochs], "--", color=color, alpha=0.7)
        ax_acc.plot(x, [e["test_accuracy"] for e in epochs], "-o", color=color, label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss (test solid, train dashed)")
    ax_loss.set_yscale("log")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy (test solid, train dashed)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(plt, fig, path, title)


def plot_grad_norms(epochs: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Per-layer gradient norms (last step of each epoch) and running-mean norms.

    Reads ``epoch["grad_stats"]`` (keys ``gradient_norm/<path>`` and
    ``gradient_mean_norm/<path>`` from :func:`optax_neuron.metrics`).
    """
    plt = _pyplot()
    fig, (ax_g, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    x = [e["epoch"] for e in epochs]
    keys = sorted({k for e in epochs for k in e.get("grad_stats", {})})
    for kind, ax in (("gradient_norm/", ax_g), ("gradient_mean_norm/", ax_m)):
        for k in keys:
            if k.startswith(kind):
                ax.plot(x, [e["grad_stats"].get(k, float("nan")) for e in epochs], "-o", label=k[len(kind):])
        ax.set(xlabel="epoch", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_g.set_title("gradient norm per layer (last step)")
    ax_m.set_title("running-mean gradient norm per layer (EMA 0.99)")
    return _save(plt, fig, path, title)


def _save(plt: Any, fig: Any, path: str | Path, title: str) -> Path:
    """Title, lay out, write ``path`` (parents created) at 100 dpi and close the figure."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
