# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # RSO: training MNIST without gradients
#
# RSO (Tripathi & Singh, 2020, [arXiv:2005.05955](https://arxiv.org/abs/2005.05955)) visits
# the weights one at a time, last layer first. For weight `w` of layer `d` it draws
# `dw ~ N(0, sigma_d)` and keeps whichever of `w - dw`, `w`, `w + dw` gives the lowest loss on a
# minibatch; `sigma_d` is the standard deviation of the layer's weights at initialisation
# (`W ~ N(0, sqrt(2 / fan_in))`). One **cycle** visits every weight once. The official code
# anneals sigma linearly to 0.1x over the cycles and reports 99.1% MNIST test accuracy (98%
# after 5 cycles) for a 6-layer conv net with about 12k weights.
#
# `on.rso` is an Optax transformation: `update(updates, state, params, value_fn=loss)` searches
# the next `weights_per_step` weights in one compiled loop and returns `new_params - params`.
# This notebook trains a small MLP with it on the CPU, looks at accuracy against cycles and
# against accepted weight updates, the acceptance rate of each layer, and compares with SGD.

# %%
# %matplotlib inline
# %config InlineBackend.figure_formats = ["png"]
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from _helpers import FULL, log_axis_ticks, setup  # shared helpers: notebooks/_helpers.py
from flax import nnx

import optax_neuron as on

setup()

# %% [markdown]
# ## A CPU-sized problem
#
# The app's MLP (`make_model("mlp", hidden=32)`: 784 -> 32 ReLU -> 10) has 784 x 32 + 32 x 10 =
# 25,408 searched weights (biases are not searched, as in the official code; they stay 0).
# `optax_neuron.mnist.rso.rso_layers` turns the model into `on.LayerStack` layers
# (`on.dense_layer` for the kernels): the search then caches the input of the layer being
# searched and applies a candidate change of one weight to a single output column instead of
# re-running the layer.

# %%
import itertools

from optax_neuron.mnist.data import load_mnist
from optax_neuron.mnist.models import make_model
from optax_neuron.mnist.rso import rso_layers

ds = load_mnist()
x_train, y_train = ds.train_images, ds.train_labels
n_test = 10_000 if FULL else 1_000
x_test, y_test = jnp.asarray(ds.test_images[:n_test]), jnp.asarray(ds.test_labels[:n_test])

HIDDEN = 32 if FULL else 8  # a multiple of 8: 16 equal calls per cycle
CYCLES = 6 if FULL else 1
BATCH = 1000 if FULL else 200  # minibatch of each update call

model = make_model("mlp", nnx.Rngs(0), hidden=HIDDEN)
LAYERS = rso_layers(model)  # f(params, h) functions over the pure parameter dict
params0 = on.rso_init(jax.random.key(0), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
cross_entropy = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@jax.jit
def test_accuracy(params):
    h = x_test
    for layer in LAYERS:
        h = layer(params, h)
    return jnp.mean(jnp.argmax(h, -1) == y_test)


kernels = {f"layers/{i}/kernel": v["kernel"] for i, v in params0["layers"].items()}
n_weights = sum(k.size for k in kernels.values())
WEIGHTS_PER_STEP = n_weights // 16
assert n_weights % WEIGHTS_PER_STEP == 0
print(
    f"{n_weights:,} searched weights, {WEIGHTS_PER_STEP:,} per call; sigma_d (std at init):",
    {k: round(float(v.std()), 4) for k, v in kernels.items()},
)

# %% [markdown]
# ## The search
#
# One jitted call searches `WEIGHTS_PER_STEP` weights (1/16 of a cycle) on one minibatch of
# `BATCH` training images; sigma is annealed
# linearly from 1x to 0.1x over the cycles as in the official code. The state counts the
# accepted proposals per layer (`rso_accepted`), the finished cycles and the position in
# the current one.

# %%
tx = on.rso(weights_per_step=WEIGHTS_PER_STEP, anneal=optax.linear_schedule(1.0, 0.1, CYCLES))


@jax.jit
def search(params, state, xb, yb):
    updates, state = tx.update(
        params, state, params, value_fn=on.LayerStack(LAYERS, cross_entropy, xb, yb)
    )
    return optax.apply_updates(params, updates), state


rng = np.random.default_rng(0)
params, state = params0, tx.init(params0)
rows = [(0.0, 0, float(test_accuracy(params)), 0.0)]  # (cycles, accepted, test acc, seconds)
per_cycle = [dict.fromkeys(state.rso_accepted, 0)]
t0 = time.perf_counter()
while int(state.rso_cycle) < CYCLES:
    idx = rng.choice(len(y_train), BATCH, replace=False)
    params, state = search(params, state, x_train[idx], y_train[idx])
    cycles = int(state.rso_cycle) + int(state.rso_cursor) / n_weights
    accepted = {k: int(v) for k, v in state.rso_accepted.items()}
    rows.append(
        (cycles, sum(accepted.values()), float(test_accuracy(params)), time.perf_counter() - t0)
    )
    if int(state.rso_cursor) == 0:  # a cycle just ended
        per_cycle.append(accepted)
rso_rows = np.array(rows)
print(
    f"{CYCLES} cycles, {len(rows) - 1} calls in {rso_rows[-1, 3]:.0f} s: "
    f"test accuracy {rso_rows[-1, 2]:.4f}, "
    f"{int(rso_rows[-1, 1]):,} accepted proposals out of {CYCLES * n_weights:,}"
)

# %%
fig, axs = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
axs[0].plot(rso_rows[:, 0], rso_rows[:, 2], ".-")
axs[0].set(
    xlabel="cycles (weights searched / weights)",
    ylabel="test accuracy",
    title="accuracy against cycles",
)
axs[1].plot(rso_rows[:, 1], rso_rows[:, 2], ".-")
axs[1].set(
    xlabel="accepted weight updates",
    ylabel="test accuracy",
    title="accuracy against weight updates",
)

sizes = {k: kernels[k].size for k in per_cycle[0]}
width = 0.8 / len(sizes)
for i, name in enumerate(sorted(sizes)):
    rate = [(b[name] - a[name]) / sizes[name] for a, b in itertools.pairwise(per_cycle)]
    axs[2].bar(
        np.arange(1, len(rate) + 1) + (i - (len(sizes) - 1) / 2) * width,
        rate,
        width,
        label=f"{name} ({sizes[name]:,} weights)",
    )
axs[2].set(
    xlabel="cycle",
    ylabel="accepted / searched",
    title="acceptance rate per layer",
    xticks=np.arange(1, len(per_cycle)),
)
axs[2].legend(fontsize=8)
plt.show()

# %% [markdown]
# The acceptance rate is high and barely falls although sigma shrinks every cycle: on a fixed
# minibatch the loss is smooth in each weight, so to first order one of `w + dw` and `w - dw`
# always lowers it; `w` is kept only when the step overshoots the minimum along that weight.
# The rate says more about sigma against the curvature of the loss than about progress; the
# accuracy curves say that the gains shrink cycle after cycle.
#
# ## Against SGD
#
# The same network from the same initialisation, trained with `optax.sgd` (lr 0.05,
# momentum 0.9, minibatches of 128), for as many seconds as the search took. Wall-clock time
# on this shared CPU is only a rough yardstick, but the gap is not subtle.

# %%
sgd = optax.sgd(0.05, momentum=0.9)


@jax.jit
def sgd_steps(params, opt_state, xb, yb):  # 20 steps per call: xb is (20, 128, 28, 28, 1)
    def one(carry, batch):
        params, opt_state = carry
        grads = jax.grad(on.LayerStack(LAYERS, cross_entropy, *batch))(params)  # the same loss
        updates, opt_state = sgd.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    return jax.lax.scan(one, (params, opt_state), (xb, yb))[0]


params, opt_state = params0, sgd.init(params0)
sgd_rows = [(0, float(test_accuracy(params)), 0.0)]
t0 = time.perf_counter()
while time.perf_counter() - t0 < rso_rows[-1, 3]:
    idx = rng.choice(len(y_train), 20 * 128, replace=False).reshape(20, 128)
    params, opt_state = sgd_steps(params, opt_state, x_train[idx], y_train[idx])
    sgd_rows.append((sgd_rows[-1][0] + 20, float(test_accuracy(params)), time.perf_counter() - t0))
sgd_rows = np.array(sgd_rows)
print(
    f"SGD: {int(sgd_rows[-1, 0])} steps in {sgd_rows[-1, 2]:.0f} s, "
    f"test accuracy {sgd_rows[-1, 1]:.4f} "
    f"(RSO: {rso_rows[-1, 2]:.4f})"
)

reached = np.flatnonzero(sgd_rows[:, 1] >= rso_rows[-1, 2])
if reached.size:
    i = reached[0]
    print(
        f"SGD reached RSO's final accuracy after {int(sgd_rows[i, 0])} steps "
        f"({int(sgd_rows[i, 0]) * 128 / len(y_train):.2f} epochs, {sgd_rows[i, 2]:.1f} s)"
    )

fig, ax = plt.subplots(figsize=(7.5, 3.8))
ax.plot(rso_rows[1:, 3], rso_rows[1:, 2], ".-", label=f"RSO, {CYCLES} cycles")
ax.plot(sgd_rows[1:, 2], sgd_rows[1:, 1], label="SGD momentum")
ax.set(
    xscale="log",
    xlabel="wall-clock seconds (both include their first compilation)",
    ylabel="test accuracy",
    title="RSO against SGD, same network and initialisation",
)
log_axis_ticks(ax.xaxis)  # labels at 1, 2, 5, 10, 20, ... seconds
ax.legend()
plt.show()

# %% [markdown]
# ## The paper's network (GPU only)
#
# The app's `rso-paper` model is the official MNIST net: six 3x3 convolutions of 16 filters
# with BatchNorm, average pooling after convolutions 2 and 4, global average pooling and a
# dense 16 -> 10 layer, about 12k searched weights (kernels and BatchNorm scale and shift).
# With the paper's minibatch of 5,000 images its cycles are too slow for a CPU, so it runs
# here only when a GPU is present, through the app's `run` (the same as
# `python -m optax_neuron.mnist --optimizer rso --model rso-paper --epochs 5`; one "epoch"
# is one cycle).

# %%
from optax_neuron.mnist.train import TrainConfig, run

if jax.default_backend() == "gpu":
    result = run(
        TrainConfig(optimizer="rso", model="rso-paper", epochs=5, rso_batch_size=5000),
        ds,
        progress=False,
        log=print,
    )
    cycles = [r["epoch"] for r in result["epochs"]]
    plt.figure(figsize=(6, 3.5))
    plt.plot(cycles, [r["test_accuracy"] for r in result["epochs"]], "o-")
    plt.gca().set(xlabel="cycle", ylabel="test accuracy", title="RSO, the paper's net")
    plt.show()
    print(f"test accuracy after 5 cycles: {result['test_accuracy']:.4f} (paper: about 0.98)")
else:
    print(f"no GPU (backend: {jax.default_backend()}): the paper's net was skipped")
