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
# # Gradient statistics: running means and per-neuron norms
#
# A TensorFlow U-Net trainer kept, for every variable `i`,
#
# ```python
# avg_gradients[i] = avg_gradients[i] * (1 - 1 / (step + 1)) + gradients[i] / (step + 1)
# ```
#
# and logged the L2 norm of each `avg_gradients[i]`. This notebook explains what that number
# measures, shows numerically why it shrinks like `1/sqrt(t)` when the gradients are noise,
# and then watches per-layer and per-neuron statistics while a CNN trains on MNIST, with the
# library's `on.running_gradient_mean`, `on.gradient_norms` and `on.collect_metrics`.

# %%
# %matplotlib inline
# %config InlineBackend.figure_formats = ["png"]
import time

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optax
from _helpers import FULL, setup  # shared helpers: notebooks/_helpers.py
from flax import nnx

import optax_neuron as on

setup()

# %% [markdown]
# ## What it measures
#
# With `t = step + 1` the recursion is `avg_t = avg_{t-1} + (g_t - avg_{t-1}) / t`, so
# `avg_t = (g_1 + ... + g_t) / t`: the **mean of the gradient over every step so far**
# (`on.running_gradient_mean()` with its default `decay=None`).
#
# Write each gradient as a steady part plus noise, `g_s = mu + e_s`, with independent noise
# of mean zero and spread `sigma` in each of `d` entries. Then
# `E ||avg_t||^2 = ||mu||^2 + sigma^2 d / t`, while a single gradient has
# `E ||g_t||^2 = ||mu||^2 + sigma^2 d`. If the gradients are pure noise (`mu = 0`) the norm of
# the mean falls like `sigma sqrt(d / t)`, i.e. `1/sqrt(t)` times the norm of one gradient;
# a steady push keeps it at `||mu||`. The ratio `||avg_t|| / ||g_t||` is thus a rough
# signal-to-noise ratio of a variable's gradient.
#
# Below: `d = 10,000`, `sigma = 1`, pure noise and noise plus a steady drift with
# `||mu|| = 10`, through the library's transformation (inside one `lax.scan`).

# %%
d, T = 10_000, (2_000 if FULL else 200)
t = np.arange(1, T + 1)


def norms(tx, drift):
    """||g_t|| and ||running mean_t|| for g_t = drift + N(0, 1) noise, t = 1..T."""

    def step(state, key):
        g = drift + jax.random.normal(key, (d,))
        _, state = tx.update(g, state)
        return state, (jnp.linalg.norm(g), jnp.linalg.norm(state.gradient_mean))

    _, out = jax.jit(lambda keys: jax.lax.scan(step, tx.init(jnp.zeros(d)), keys))(
        jax.random.split(jax.random.key(0), T)
    )
    return [np.asarray(x) for x in out]


drift = jnp.full(d, 0.1)  # ||mu|| = 0.1 * sqrt(10,000) = 10
g_noise, mean_noise = norms(on.running_gradient_mean(), 0.0)
_, mean_drift = norms(on.running_gradient_mean(), drift)
_, ema_noise = norms(on.running_gradient_mean(decay=0.99), 0.0)

for s in (1, 10, 100, T):
    print(
        f"t = {s:5d}: ||g_t|| = {g_noise[s - 1]:6.1f}   ||mean_t|| = {mean_noise[s - 1]:6.2f}   "
        f"sqrt(d/t) = {np.sqrt(d / s):6.2f}   ratio = {mean_noise[s - 1] / g_noise[s - 1]:.4f}"
        f"   1/sqrt(t) = {1 / np.sqrt(s):.4f}"
    )

# %%
ema_level = np.sqrt(d * (1 - 0.99) / (1 + 0.99))  # stationary EMA of unit noise
fig, ax = plt.subplots(figsize=(7.5, 4))
ax.loglog(t, g_noise, color="0.6", label="||g_t||, one gradient")
ax.loglog(t, mean_noise, label="||cumulative mean||, pure noise")
ax.loglog(t, np.sqrt(d / t), "k--", lw=1, label="sigma sqrt(d / t)")
ax.loglog(t, mean_drift, label="||cumulative mean||, drift ||mu|| = 10")
ax.loglog(t, np.sqrt(100 + d / t), "k:", lw=1, label="sqrt(||mu||^2 + d / t)")
ax.loglog(t, ema_noise, label="||EMA (decay 0.99)||, pure noise")
ax.axhline(ema_level, color="tab:green", ls=":", lw=1)
ax.set(xlabel="step t", ylabel="L2 norm", title="the running mean of noise shrinks like 1/sqrt(t)")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The EMA (`decay=0.99`, debiased) follows the cumulative mean for the first ~100 steps and
# then stays near `sigma sqrt(d (1 - decay) / (1 + decay))` (dotted green): it forgets, so it
# keeps tracking a moving target but no longer averages the noise away.
#
# ## Watching a CNN train on MNIST
#
# The monitoring pieces go first in the chain, so they see the raw gradients, and pass the
# updates through untouched. `on.collect_metrics(opt.opt_state)` reads them back by parameter path
# (the NNX `Variable` wrappers are unwrapped). The model is the app's CNN, made small for the
# CPU (8 and 16 filters, 64 hidden units), trained with SGD momentum.

# %%
from _helpers import BATCH, CHUNK, N_TEST, POINTS, mnist, train_curve

ds = mnist()
print(f"{POINTS} points of {CHUNK} steps of {BATCH} images; test accuracy on {N_TEST:,} images")

# %%
tx = optax.chain(
    on.gradient_norms(),  # per-leaf, global and per-neuron norms of the raw gradient
    on.running_gradient_mean(),  # the U-Net trainer's cumulative mean
    optax.sgd(0.02, momentum=0.9),
)
log = []
final = {}


def record(step, opt, model):
    values = on.collect_metrics(opt.opt_state, per_neuron=True)
    mean_tree = nnx.to_pure_dict(optax.tree.get(opt.opt_state, "gradient_mean"))
    values["mean_neuron_norm"] = on.neuron_norms(mean_tree)  # per-neuron norms of the mean
    log.append((step, jax.device_get(values)))
    final["model"] = model  # the model after the last point


t0 = time.perf_counter()
curve = train_curve(tx, "cnn", on_point=record, channels=(8, 16), hidden=64)
print(
    f"{curve[-1, 0]:.0f} steps in {time.perf_counter() - t0:.0f} s: "
    f"train loss {curve[-1, 1]:.3f}, test accuracy {curve[-1, 2]:.4f}"
)
print("keys:", ", ".join(k for k in log[-1][1] if "/layers/0/" in k or k.endswith("global")))

# %%
kernels = {
    "conv 1": "layers/0/kernel",
    "conv 2": "layers/3/kernel",
    "dense": "layers/7/kernel",
    "logits": "layers/9/kernel",
}
steps = np.array([s for s, _ in log])
series = lambda key: np.array([v[key] for _, v in log])

fig, axs = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
for name, path in kernels.items():
    (line,) = axs[0].plot(steps, series(f"gradient_norm/{path}"), label=name)
    axs[1].plot(steps, series(f"gradient_mean_norm/{path}"), color=line.get_color(), label=name)
    axs[2].plot(
        steps,
        series(f"gradient_mean_norm/{path}") / series(f"gradient_norm/{path}"),
        color=line.get_color(),
        label=name,
    )
axs[2].plot(steps, 1 / np.sqrt(steps), "k--", lw=1, label="1/sqrt(t): pure noise")
axs[0].set(
    title="||gradient|| (last step of each point)", xscale="log", yscale="log", xlabel="step"
)
axs[1].set(title="||cumulative mean of the gradient||", xscale="log", yscale="log", xlabel="step")
axs[2].set(title="ratio mean / gradient", xscale="log", yscale="log", xlabel="step")
for ax in axs:
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
axs[0].legend(fontsize=8)
axs[2].legend(fontsize=8)
plt.show()

# %% [markdown]
# Per layer, the norm of the running mean falls faster than the gradient's own norm: once
# the loss is low, most of what remains of the minibatch gradients is noise that averages
# out. A ratio near the dashed `1/sqrt(t)` line means "mostly noise"; above it, the layer
# still gets a consistent push.
#
# ## Per-neuron norms
#
# `on.gradient_norms()` also keeps one norm per neuron (over each kernel's fan-in axes, the
# same axes as in the neuron-mean notebook): a `(1, 1, 1, 16)` array for the second conv,
# `(1, 64)` for the dense layer. `on.neuron_norms` computes the same for any tree, here the
# running mean. A neuron whose gradient is zero (a ReLU unit that fired for no image of the
# minibatch) shows as a black cell.

# %%
dense_path = kernels["dense"]
per_neuron = np.stack([v[f"gradient_neuron_norm/{dense_path}"].ravel() for _, v in log], axis=1)

fig, (ax1, ax2) = plt.subplots(
    1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [1.4, 1]}, layout="constrained"
)
cmap = plt.get_cmap("viridis").with_extremes(bad="black")  # zero norm: black
im = ax1.imshow(
    np.ma.masked_equal(per_neuron, 0.0),
    aspect="auto",
    cmap=cmap,
    origin="lower",
    norm=matplotlib.colors.LogNorm(),
    extent=[steps[0] - CHUNK / 2, steps[-1] + CHUNK / 2, -0.5, per_neuron.shape[0] - 0.5],
)
fig.colorbar(im, ax=ax1, label="norm over the fan-in (black: 0)")
ax1.set(title="dense layer (784 -> 64): per-neuron gradient norm", xlabel="step", ylabel="neuron")
ax1.grid(False)

last = log[-1][1]
for name, path in kernels.items():
    layer = path.split("/")[1]
    g = last[f"gradient_neuron_norm/{path}"].ravel()
    m = last["mean_neuron_norm"]["layers"][int(layer)]["kernel"].ravel()
    ax2.scatter(g, m, s=14, label=f"{name} ({g.size} neurons)")
ax2.set(
    xlabel="per-neuron ||gradient||, last step",
    ylabel="per-neuron ||cumulative mean||",
    title=f"every neuron at step {steps[-1]}",
)
ax2.legend(fontsize=8)
plt.show()
zero_at_every_point = int((per_neuron.max(axis=1) == 0).sum())
mostly_black = int(((per_neuron == 0).mean(axis=1) > 0.5).sum())
print(
    f"dense neurons with a zero gradient at every recorded step: {zero_at_every_point} of 64; "
    f"at more than half of the recorded steps: {mostly_black} of 64"
)

# %% [markdown]
# **The black rows.** "Zero at every recorded step" counts none of them: a black row has a few
# coloured cells. They are **nearly dead ReLU units**: units whose pre-activation is positive
# for only a tiny share of the images. A unit that fires on a share `p` of the images gets no
# gradient from a minibatch of 128 in which none of them appears, which happens with probability
# about `(1 - p)^128`: 0.77 for `p = 0.2%`. The check below runs the trained model on 5,000
# training images, measures `p` for every dense unit, and compares the zero share of its row with
# `(1 - p)^128` (`p` is measured at the end of training, the row spans all of it, so the two agree
# only roughly).

# %%
model = final["model"]
h = jnp.asarray(ds.train_images[:5000])
for layer in model.layers[:7]:  # conv, relu, pool, conv, relu, pool, flatten
    h = layer(h)
fires = np.asarray(model.layers[7](h) > 0).mean(axis=0)  # the dense layer, before its ReLU
zero_share = (per_neuron == 0).mean(axis=1)
print(
    f"dense units firing on fewer than 1% of 5,000 training images: {int((fires < 0.01).sum())} "
    f"of 64 (none at all: {int((fires == 0).sum())})"
)
print("unit   fires on   zero share of its row   (1 - p)^128")
for unit in np.argsort(-zero_share)[:10]:
    print(
        f"{unit:4d}   {fires[unit]:8.2%}   {zero_share[unit]:21.2f}   "
        f"{(1 - fires[unit]) ** BATCH:11.2f}"
    )

# %% [markdown]
# For logging,
# `on.write_metrics(on.summary_writer(logdir), on.collect_metrics(opt.opt_state), step)`
# sends the same keys to TensorBoard (per-neuron arrays as histograms with
# `per_neuron=True`); the app's `optax_neuron.mnist.train.run(config, data, writer=...)` does
# it once per epoch.
