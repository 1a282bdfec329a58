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
# # Neuron-mean momentum
#
# This notebook answers one question from start to end. In SGD with momentum, replace the
# momentum of a connection by the **mean momentum of all incoming connections of the same
# neuron**. In a 1-2-2-1 network, for the connection (2,5):
#
# ```
# acc_mean  = (acc(2,5) + acc(3,5)) / 2
# acc(2,5) <- grad(2,5) + mu * acc_mean
# var      -= lr * acc
# ```
#
# We show (1) which array axis "incoming connections" is for Dense, Conv and attention
# kernels, (2) that one number per neuron is all the state this needs, (3) the wrong-axis
# pitfall, and (4) MNIST training curves against ordinary momentum.

# %%
# %matplotlib inline
# %config InlineBackend.figure_formats = ["png"]
import itertools
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from _helpers import cell_grid, setup  # shared helpers: notebooks/_helpers.py
from flax import nnx

import optax_neuron as on

setup()

# %% [markdown]
# ## The 1-2-2-1 network
#
# Neurons are numbered layer by layer: 1 (input), 2 and 3, 4 and 5, 6 (output). The
# incoming connections of neuron 5 are (2,5) and (3,5) (red). The outgoing connections
# of neuron 2 are (2,4) and (2,5) (blue, dashed): averaging those is the pitfall below.

# %%
layers = [[1], [2, 3], [4, 5], [6]]
pos = {n: (x, (len(ns) - 1) / 2 - i) for x, ns in enumerate(layers) for i, n in enumerate(ns)}
fig, ax = plt.subplots(figsize=(6, 2.8))
for a, b in itertools.pairwise(layers):
    for i in a:
        for j in b:
            incoming = j == 5
            outgoing = i == 2 and j in (4, 5) and not incoming
            style = {"color": "tab:red", "lw": 3} if incoming else {"color": "0.7", "lw": 1}
            if outgoing:
                style = {"color": "tab:blue", "lw": 2, "ls": "--"}
            ax.plot(*zip(pos[i], pos[j], strict=True), zorder=1, **style)
ax.plot(*zip(pos[2], pos[5], strict=True), color="tab:red", lw=3, zorder=2)
for n, (x, y) in pos.items():
    ax.scatter(x, y, s=700, color="white", edgecolor="k", zorder=3)
    ax.text(x, y, str(n), ha="center", va="center", zorder=4)
ax.text(1.5, 0.12, "(2,5)", color="tab:red")
ax.set_xlim(-0.3, 3.3)
ax.set_ylim(-0.85, 0.85)
ax.set_axis_off()
ax.set_title("incoming connections of neuron 5 (red), outgoing of neuron 2 (blue)")
plt.show()

# %% [markdown]
# In Flax the layer from {2, 3} to {4, 5} is `nnx.Linear(2, 2)`, whose kernel is
# `W[in, out]`: row = the neuron the connection comes from, column = the neuron it goes to.
# So (2,5) is `W[0, 1]` and the incoming connections of neuron 5 are the column `W[:, 1]`:
# the mean runs over **axis 0**, the fan-in axis. `on.fan_in_axes` reads this from the
# parameter path (`.../kernel` in a Flax layout):

# %%
net = nnx.Sequential(
    nnx.Linear(1, 2, rngs=nnx.Rngs(0)),
    nnx.tanh,
    nnx.Linear(2, 2, rngs=nnx.Rngs(1)),
    nnx.tanh,
    nnx.Linear(2, 1, rngs=nnx.Rngs(2)),
)
params = nnx.to_pure_dict(nnx.state(net, nnx.Param))
axes = on.fan_in_axes(params)
for path, p in jax.tree_util.tree_leaves_with_path(params):
    name = on.fan_in.path_str(path)
    ax_ = axes["layers"][int(name.split("/")[1])][name.split("/")[2]]
    print(f"{name:18s} shape {p.shape!s:8s} fan-in axes {ax_}")

# %% [markdown]
# Two steps by hand for the middle kernel, then the same two steps with
# `on.neuron_mean_trace` (the momentum part of `on.neuron_mean_sgd`). The accumulator
# starts at zero, so after step 1 `acc = grad_1`; at step 2
# `acc(2,5) = grad_2(2,5) + mu * (acc(2,5) + acc(3,5)) / 2`.

# %%
mu = 0.9
g1 = np.array([[0.2, -0.4], [0.6, 0.8]], np.float32)  # rows: neurons 2, 3; columns: 4, 5
g2 = np.array([[0.1, 0.3], [-0.5, 0.7]], np.float32)

acc1 = g1  # the question's accumulator after step 1
by_hand = g2[0, 1] + mu * (acc1[0, 1] + acc1[1, 1]) / 2  # acc(2,5) after step 2

tx = on.neuron_mean_trace(mu)
state = tx.init({"kernel": jnp.zeros((2, 2))})
_, state = tx.update({"kernel": jnp.asarray(g1)}, state)
upd2, state = tx.update({"kernel": jnp.asarray(g2)}, state)
print(f"acc(2,5) by hand: {by_hand:.4f}   library: {float(upd2['kernel'][0, 1]):.4f}")
print(
    "state after step 2 (one number per neuron 4, 5):", np.asarray(state.neuron_momentum["kernel"])
)
assert np.isclose(by_hand, upd2["kernel"][0, 1])


# %% [markdown]
# ## Fan-in axes of Dense, Conv and attention kernels
#
# Each colour below is one output neuron; the cells of one colour are its incoming
# connections, the elements averaged together. A Dense kernel `(in, out)` reduces over
# axis 0, a Conv kernel `(h, w, in, out)` over axes 0, 1, 2 (a whole 3x3xC filter is one
# neuron), and an attention query kernel `(in, heads, head_dim)` over axis 0 only, although
# it has rank 3 like a 1-D convolution: that is why the axes are keyed on the parameter path
# and not guessed from the rank.


# %%
def neuron_ids(shape, ax):
    """Every element of a kernel labelled with the index of the neuron it feeds."""
    nshape = on.fan_in.neuron_shape(shape, ax)
    return np.broadcast_to(np.arange(np.prod(nshape)).reshape(nshape), shape)


dense = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
conv = nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(0))
attn = nnx.MultiHeadAttention(
    num_heads=2, in_features=5, qkv_features=6, decode=False, rngs=nnx.Rngs(0)
)
kernels = {
    "Dense": nnx.to_pure_dict(nnx.state(dense, nnx.Param)),
    "Conv": nnx.to_pure_dict(nnx.state(conv, nnx.Param)),
    "Attention": nnx.to_pure_dict(nnx.state(attn, nnx.Param)),
}
dense_ax = on.fan_in_axes(kernels["Dense"])["kernel"]
conv_ax = on.fan_in_axes(kernels["Conv"])["kernel"]
query_ax = on.fan_in_axes(kernels["Attention"])["query"]["kernel"]
out_ax = on.fan_in_axes(kernels["Attention"])["out"]["kernel"]
q_shape, o_shape = (
    kernels["Attention"]["query"]["kernel"].shape,
    kernels["Attention"]["out"]["kernel"].shape,
)
print(
    "Dense kernel",
    dense.kernel.shape,
    "axes",
    dense_ax,
    "| Conv kernel",
    conv.kernel.shape,
    "axes",
    conv_ax,
)
print("query kernel", q_shape, "axes", query_ax, "| out kernel", o_shape, "axes", out_ax)

fig = plt.figure(figsize=(13, 3.4))
grid = fig.add_gridspec(2, 10, width_ratios=[1.4, 0.4, 1, 1, 1, 1, 0.6, 1.6, 0.6, 1.6], wspace=0.15)
ax = fig.add_subplot(grid[:, 0])
ax.imshow(neuron_ids(dense.kernel.shape, dense_ax), cmap="tab10", vmin=0, vmax=9)
ax.set_title("Dense (in=6, out=4)", fontsize=10)
ax.set(xlabel="out (neuron)", ylabel="in")
cell_grid(ax)
ids = neuron_ids(conv.kernel.shape, conv_ax)
for c_in in range(2):
    for c_out in range(4):
        ax = fig.add_subplot(grid[c_in, 2 + c_out])
        ax.imshow(ids[:, :, c_in, c_out], cmap="tab10", vmin=0, vmax=9)
        ax.set_xticks([])
        ax.set_yticks([])
        cell_grid(ax)
        if c_in == 0:
            ax.set_title(f"out {c_out}")
        if c_out == 0:
            ax.set_ylabel(f"in {c_in}")
fig.text(
    0.42, 0.97, "Conv 3x3 (in=2, out=4): one 3x3x2 filter per neuron", ha="center", fontsize=11
)
ax = fig.add_subplot(grid[:, 7])
q_ids = neuron_ids(q_shape, query_ax).reshape(q_shape[0], -1)
ax.imshow(q_ids, cmap="tab20", vmin=0, vmax=19)
ax.set_title("attention query\n(in, heads x head_dim)", fontsize=10)
ax.set(xlabel="heads x head_dim", ylabel="in")
cell_grid(ax)
ax = fig.add_subplot(grid[:, 9])
o_ids = neuron_ids(o_shape, out_ax).reshape(-1, o_shape[-1])
ax.imshow(o_ids, cmap="tab10", vmin=0, vmax=9)
ax.set_title("attention out\n(heads x head_dim, out)", fontsize=10)
ax.set(xlabel="out", ylabel="heads x head_dim")
cell_grid(ax)
plt.show()

# %% [markdown]
# ### Read from the computation instead of the path
#
# Path and rank cannot tell a standalone `nnx.LinearGeneral(6, (2, 4))` kernel `(6, 2, 4)`
# from a 1-D convolution `(width, in, out)`: the path rules give it `(0, 1)`, while its fan-in
# is axis 0. `on.fan_in.from_computation` traces the model once on shapes only and reads each
# parameter's axes where it meets the activations (the contracting dimensions of a
# `dot_general`, the input and window dimensions of a convolution kernel; `()` for gathers and
# elementwise uses). Below, both side by side for a block with a `LinearGeneral` projection
# and attention.


# %%
class Block(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.LinearGeneral(6, (2, 4), rngs=rngs)  # kernel (6, 2, 4)
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs
        )

    def __call__(self, x):
        return self.attn(self.proj(x).reshape(*x.shape[:-1], 8))


block_graphdef, block_state = nnx.split(Block(nnx.Rngs(0)), nnx.Param)
block_params = nnx.to_pure_dict(block_state)
tokens = jax.ShapeDtypeStruct((1, 5, 6), jnp.float32)  # shapes only: nothing is computed
t0 = time.perf_counter()
traced = on.fan_in.from_computation(
    lambda p, x: nnx.merge(block_graphdef, p)(x), block_params, tokens
)
print(f"traced in {1e3 * (time.perf_counter() - t0):.0f} ms")
preset = on.fan_in_axes(block_params)
block_rows = zip(
    jax.tree_util.tree_flatten_with_path(block_params)[0],
    jax.tree.leaves(preset, is_leaf=lambda x: isinstance(x, tuple)),
    jax.tree.leaves(traced, is_leaf=lambda x: isinstance(x, tuple)),
    strict=True,
)
print(f"{'parameter':24} {'shape':12} {'path rules':11} computation")
for (path, leaf), by_rule, by_trace in block_rows:
    if leaf.ndim > 1:
        name = on.fan_in.path_str(path)
        mark = "  <- differ" if by_rule != by_trace else ""
        print(f"{name:24} {leaf.shape!s:12} {by_rule!s:11} {by_trace}{mark}")

# %% [markdown]
# Each colour is one neuron. With the path rules' `(0, 1)` the columns of the two heads share
# a colour: 4 neurons of 12 inputs. Read from the computation, each of the 8 output units is a
# neuron of 6 inputs. The traced tree goes to any transformation as `fan_in=`, e.g.
# `on.neuron_mean_sgd(0.1, fan_in=traced)`, which then keeps 8 momentum values for this kernel.

# %%
proj_shape = block_params["proj"]["kernel"].shape
fig, panels = plt.subplots(1, 2, figsize=(7, 2.6))
for ax, (title, axes_) in zip(
    panels, [("path rules (0, 1)", preset), ("computation (0,)", traced)], strict=True
):
    proj_ids = neuron_ids(proj_shape, axes_["proj"]["kernel"]).reshape(proj_shape[0], -1)
    ax.imshow(proj_ids, cmap="tab10", vmin=0, vmax=9)
    ax.set_title(f"LinearGeneral kernel: {title}", fontsize=10)
    ax.set(xlabel="out (2 x 4)", ylabel="in")
    cell_grid(ax)
plt.show()

# %% [markdown]
# ## One number per neuron is enough
#
# The TensorFlow optimizer from the question keeps a full accumulator, one value per connection:
# `a_t = g_t + mu * mean_fanin(a_{t-1})`. Taking the fan-in mean of both sides,
# `mean(a_t) = mean(g_t) + mu * mean(a_{t-1})`: the per-neuron mean `m_t` obeys its own
# recursion, and the update is `g_t + mu * m_{t-1}`. `on.neuron_mean_trace` keeps only `m`.
# Below, that full accumulator in plain NumPy and the library on the MNIST MLP
# (784-128-10), 20 steps of random gradients.

# %%
from optax_neuron.mnist.models import make_model

mlp_params = nnx.to_pure_dict(nnx.state(make_model("mlp", nnx.Rngs(0)), nnx.Param))
names = [on.fan_in.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(mlp_params)]


def question_reference(grads_seq, mu):
    """The question's optimizer in NumPy: a full accumulator per connection; kernels: axis 0."""
    acc = [np.zeros_like(g) for g in grads_seq[0]]
    out = []
    for grads in grads_seq:
        acc = [
            g + mu * (a.mean(axis=0, keepdims=True) if name.endswith("kernel") else a)
            for g, a, name in zip(grads, acc, names, strict=True)
        ]
        out.append(acc)
    return out


rng = np.random.default_rng(0)
leaves, treedef = jax.tree.flatten(mlp_params)
grads_seq = [[rng.normal(size=x.shape).astype(np.float32) for x in leaves] for _ in range(20)]
reference = question_reference(grads_seq, mu=0.9)

tx = on.neuron_mean_trace(0.9)
state = tx.init(mlp_params)
worst = 0.0
for grads, ref in zip(grads_seq, reference, strict=True):
    upd, state = tx.update(jax.tree.unflatten(treedef, [jnp.asarray(g) for g in grads]), state)
    for u, r in zip(jax.tree.leaves(upd), ref, strict=True):
        worst = max(worst, float(np.max(np.abs(np.asarray(u) - r))))
print(f"largest difference from the full per-connection accumulator over 20 steps: {worst:.2e}")
full = sum(x.size for x in leaves)
kept = sum(x.size for x in jax.tree.leaves(state.neuron_momentum))
print(f"state: {kept:,} numbers instead of {full:,} ({full / kept:.0f}x less)")
for name, m in zip(names, jax.tree.leaves(state.neuron_momentum), strict=True):
    print(f"  {name:18s} momentum state shape {m.shape}")
assert worst < 1e-4

# %% [markdown]
# ## The wrong-axis pitfall
#
# A widely copied answer to the original question averages axis 1 of the kernel. For
# `W[in, out]` that is the **outgoing** connections of the *source* neuron: for (2,5) it
# mixes (2,4) and (2,5) instead of (2,5) and (3,5). The same code with the axes flipped
# (`fan_in=` rules saying "all but the first axis", the PyTorch `(out, in)` layout) shows
# the difference on the two steps above:

# %%
wrong_rules = [("*kernel", on.fan_in.ALL_BUT_FIRST), ("*bias", on.fan_in.NO_AXES)]
wrong = on.neuron_mean_trace(mu, fan_in=wrong_rules)
state = wrong.init({"kernel": jnp.zeros((2, 2))})
_, state = wrong.update({"kernel": jnp.asarray(g1)}, state)
upd_wrong, _ = wrong.update({"kernel": jnp.asarray(g2)}, state)
outgoing = g2[0, 1] + mu * (g1[0, 0] + g1[0, 1]) / 2
print(
    f"incoming (2,5),(3,5): {by_hand:.4f}   outgoing (2,4),(2,5): {outgoing:.4f}   "
    f"axis-1 code: {float(upd_wrong['kernel'][0, 1]):.4f}"
)

# %% [markdown]
# For a Conv kernel `(h, w, in, out)` "all but the first axis" is worse still: it averages
# over a kernel row, the input channels and the *output* channels together. Using the fan-in
# rules of the parameter's layout (the Flax preset here, `on.fan_in.TORCH` for PyTorch or
# Equinox weights) avoids both.
#
# ## MNIST: neuron-mean momentum against SGD momentum
#
# The MNIST MLP (784-128-10) of the app, trained with the app's jitted training scan and
# each optimizer's default from `optax_neuron.mnist.train.DEFAULTS`: plain SGD (lr 0.1),
# SGD momentum (`optax.sgd`, lr 0.02, mu 0.9), neuron-mean momentum (lr 0.1, mu 0.9), and
# neuron-mean momentum over the wrong axis; plus neuron-mean momentum with exactly the
# settings of SGD momentum (lr 0.02, mu 0.9). Same initialisation and batches for all.

# %%
from _helpers import BATCH, CHUNK, N_TEST, POINTS, mnist, train_curve

ds = mnist()
print(f"{POINTS} points of {CHUNK} steps of {BATCH} images; test accuracy on {N_TEST:,} images")

# %%
from optax_neuron.mnist.train import make_optimizer

runs = {
    "SGD (lr 0.1)": make_optimizer("sgd"),
    "SGD momentum (lr 0.02, mu 0.9)": make_optimizer("momentum"),
    "neuron-mean momentum (lr 0.1, mu 0.9)": make_optimizer("neuron-mean-sgd"),
    "neuron-mean, wrong axis (lr 0.1, mu 0.9)": on.neuron_mean_sgd(0.1, 0.9, fan_in=wrong_rules),
    "neuron-mean momentum (lr 0.02, mu 0.9)": on.neuron_mean_sgd(0.02, 0.9),
}
curves = {}
for label, tx in runs.items():
    t0 = time.perf_counter()
    curves[label] = train_curve(tx)
    step, loss, acc = curves[label][-1]
    print(
        f"{label:42s} step {step:4.0f}: train loss {loss:.3f}, test acc {acc:.4f} "
        f"({time.perf_counter() - t0:.0f} s)"
    )

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
for label, c in curves.items():
    style = {"ls": "--"} if "0.02" in label and "neuron" in label else {}
    ax1.plot(c[:, 0], c[:, 1], label=label, **style)
    ax2.plot(c[:, 0], c[:, 2], label=label, **style)
ax1.set(
    xlabel="step", ylabel=f"train loss (mean of {CHUNK} steps)", yscale="log", title="training loss"
)
ax2.set(xlabel="step", ylabel="test accuracy", title=f"test accuracy ({N_TEST} images)")
ax2.set_ylim(max(0.0, min(c[:, 2].min() for c in curves.values()) - 0.02), 1.0)
ax1.legend(fontsize=8)
plt.show()

# %% [markdown]
# How much of a gradient survives the fan-in mean? The momentum carries only
# `mean_fanin(g)`, so the share `||mean_fanin(g)|| / ||g||` (the mean broadcast back over the
# connections) measures how much of each step's direction it can remember. At the start of
# training, on 1,000 images:

# %%
model = make_model("mlp", nnx.Rngs(0))
x, y = ds.train_images[:1000], ds.train_labels[:1000]
grads = nnx.to_pure_dict(
    nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
)
for layer, what in ((1, "784 pixels -> 128"), (3, "128 hidden -> 10")):
    g = np.asarray(grads["layers"][layer]["kernel"])
    kept = np.linalg.norm(np.broadcast_to(g.mean(axis=0, keepdims=True), g.shape)) / np.linalg.norm(
        g
    )
    print(f"layers/{layer}/kernel ({what}): ||mean_fanin(g)|| / ||g|| = {kept:.3f}")
print(f"pixels that are exactly 0 in these images: {np.mean(x == 0):.0%}")

# %% [markdown]
# **Reading the curves.** The fan-in mean keeps about a third of the gradient's norm in
# both layers; the rest, the part in which the incoming connections of a neuron disagree,
# gets no momentum at all. So neuron-mean momentum behaves much like plain SGD at the same
# learning rate, and with ordinary momentum's settings (lr 0.02, dashed) it is slower than
# both. Averaging over the wrong axis gives similar curves on this MLP: the difference is in
# what the method computes (the question's rule holds only with the fan-in axes), not, here, in
# the score. The library makes the idea cheap (one number per
# neuron) and correct for every layer type; whether it helps is for experiments like this
# one to say, and here per-connection momentum wins.
