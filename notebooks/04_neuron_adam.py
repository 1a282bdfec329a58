# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Neuron-wise Adam: one second moment per neuron
#
# Adam keeps two numbers per connection: a first moment `m` and a second moment `v`.
# Adam-mini (Zhang et al. 2024, arXiv 2406.16793) keeps `m` in full but only **one `v` per
# neuron** (per head for attention queries and keys) and reports AdamW's quality with about
# half the optimizer memory. `optax_neuron.neuron_adam` stores that `v` at its real per-neuron
# size, using the fan-in axes that say which connections feed each neuron, and offers a second
# mode, `first_moment="neuron"`, in which the first moment is per neuron too, so the *whole*
# state is per neuron.
#
# This notebook asks two questions and answers them with measurements:
# 1. where does one second moment per neuron match Adam, and where does it differ?
# 2. what does a per-neuron first moment cost?

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from _helpers import FULL, setup  # shared helpers: notebooks/_helpers.py
from flax import nnx

import optax_neuron as on
from optax_neuron.mnist.data import load_mnist
from optax_neuron.mnist.models import make_model
from optax_neuron.mnist.train import evaluate

# %matplotlib inline
# %config InlineBackend.figure_formats = ["png"]
setup()

# %% [markdown]
# ## The rule, on one Dense kernel
#
# With `mean` over the fan-in axes (axis 0 of a Flax `Dense` kernel `W[in, out]`):
#
# - `v_t = b2 v + (1 - b2) mean(g_t^2)`: one value per output neuron;
# - `"full"`: `m_t = b1 m + (1 - b1) g_t` per connection (Adam-mini's rule);
# - `"neuron"`: the per-connection accumulator `a_t = (1 - b1) g_t + b1 mean(a_{t-1})`, of which
#   only `mean(a_t)` is stored: since `mean` is linear and `mean(mean(x)) = mean(x)`,
#   `mean(a_t) = (1 - b1) mean(g_t) + b1 mean(a_{t-1})` is a recursion of its own;
# - update `-lr * (m_t or a_t) / (1 - b1^t) / (sqrt(v_t / (1 - b2^t)) + eps)`.
#
# The state shapes, and a check of the "neuron" mode against a NumPy loop that keeps the full
# per-connection accumulator `a`:

# %%
params = {"dense": {"kernel": jnp.zeros((5, 3)), "bias": jnp.zeros(3)}}
for mode in ("full", "neuron"):
    state = on.scale_by_neuron_adam(first_moment=mode).init(params)
    print(
        f"{mode:6s} mu {state.neuron_adam_mu['dense']['kernel'].shape}, "
        f"nu {state.neuron_adam_nu['dense']['kernel'].shape}, "
        f"bias nu {state.neuron_adam_nu['dense']['bias'].shape}"
    )

b1, b2, eps = 0.9, 0.999, 1e-8
tx = on.scale_by_neuron_adam(b1, b2, eps, first_moment="neuron")
state, update = tx.init(params), jax.jit(tx.update)
rng = np.random.default_rng(0)
a = np.zeros((5, 3))
v = np.zeros((1, 3))  # the reference keeps the full accumulator
worst = 0.0
for t in range(1, 201):
    g = rng.standard_normal((5, 3)) * rng.uniform(0.1, 10, size=(1, 3))
    a = (1 - b1) * g + b1 * a.mean(axis=0, keepdims=True)
    v = b2 * v + (1 - b2) * (g**2).mean(axis=0, keepdims=True)
    ref = a / (1 - b1**t) / (np.sqrt(v / (1 - b2**t)) + eps)
    u, state = update(
        {"dense": {"kernel": jnp.asarray(g, jnp.float32), "bias": jnp.zeros(3)}}, state
    )
    worst = max(
        worst, float(np.max(np.abs(np.asarray(u["dense"]["kernel"]) - ref) / np.abs(ref).max()))
    )
print(
    "200 steps, largest difference to the full-accumulator reference: "
    f"{worst:.1e} of the largest update"
)

# %% [markdown]
# ## Memory
#
# Optimizer-state bytes for the application's MNIST CNN (420k parameters, mostly one
# 3136 x 128 Dense kernel) and its small vision transformer (`--model vit`, 20k parameters,
# two `nnx.MultiHeadAttention` blocks). Adafactor factors only axes of at least 128 (Optax's
# default), so on the transformer it keeps a full second moment.


# %%
def nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def state_bytes(tx, params):
    return nbytes(jax.eval_shape(tx.init, params))  # shapes only: nothing is allocated


candidates = {
    "adam": optax.adam(1e-3),
    "adafactor": optax.adafactor(1e-2),
    "lion": optax.lion(1e-4),
    "sgd momentum": optax.sgd(0.02, momentum=0.9),
    "neuron_adam (full)": on.neuron_adam(1e-3),
    "neuron_adam (neuron)": on.neuron_adam(1e-3, first_moment="neuron"),
    "neuron_mean_sgd": on.neuron_mean_sgd(0.1),
}
memory = {}
for model_name in ("cnn", "vit"):
    model = nnx.eval_shape(lambda name=model_name: make_model(name, nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    memory[model_name] = {k: state_bytes(tx, params) for k, tx in candidates.items()}
    pbytes = nbytes(params)
    print(f"{model_name}: parameters {pbytes:,} bytes")
    for k, b in memory[model_name].items():
        print(f"  {k:22s} {b:>10,} bytes  {b / memory[model_name]['adam']:.4f} x adam")

fig, ax = plt.subplots(figsize=(8, 3.2))
names = list(candidates)
for i, model_name in enumerate(("cnn", "vit")):
    ax.barh(
        np.arange(len(names)) + 0.4 * i,
        [memory[model_name][k] for k in names],
        height=0.4,
        label=model_name,
    )
ax.set_yticks(np.arange(len(names)) + 0.2, names)
ax.set_xscale("log")
ax.set_xlabel("optimizer state bytes")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Training side by side
#
# Same initial weights, same batches (batch 64), cosine decay from the application's default
# learning rate 1e-3 for all three. The small run trains the MLP on a few hundred images; the
# full run (the committed outputs) trains the CNN and the transformer on 5,000 training images
# for 2 epochs, and is measured on the 10,000 test images. The benchmark
# (`benchmarks/bench_neuron_adam.py`, table in `benchmarks/README.md`) compares eight
# optimizers on more data.

# %%
data = load_mnist()
n_train, epochs, batch = (5000, 2, 64) if FULL else (320, 1, 64)
test_x, test_y = (
    (data.test_images, data.test_labels)
    if FULL
    else (data.test_images[:500], data.test_labels[:500])
)
x_train, y_train = data.train_images[:n_train], data.train_labels[:n_train]
steps = epochs * (n_train // batch)
schedule = optax.cosine_decay_schedule(1e-3, steps)
optimizers = {
    "adam": lambda: optax.adam(schedule),
    "neuron_adam full": lambda: on.neuron_adam(schedule),
    "neuron_adam neuron": lambda: on.neuron_adam(schedule, first_moment="neuron"),
}


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    opt.update(model, grads)
    return loss


def train(model_name, make_tx):
    model = make_model(model_name, nnx.Rngs(0))
    opt = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
    losses = []
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(n_train)
        for i in range(n_train // batch):
            idx = order[i * batch : (i + 1) * batch]
            losses.append(
                float(train_step(model, opt, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])))
            )
    return model, opt, np.array(losses)


models = ("cnn", "vit") if FULL else ("mlp",)  # the small run: the smallest model
runs = {}
for model_name in models:
    for name, make_tx in optimizers.items():
        t0 = time.perf_counter()
        model, opt, losses = train(model_name, make_tx)
        acc = evaluate(model, test_x, test_y)[1]
        runs[model_name, name] = {"model": model, "opt": opt, "losses": losses, "acc": acc}
        print(
            f"{model_name} {name:20s} last-50-step loss {losses[-50:].mean():.4f}, "
            f"test accuracy {100 * acc:.2f}%  ({time.perf_counter() - t0:.0f} s)"
        )

# %%
fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.4), squeeze=False)
k = 20 if FULL else 2
for ax, model_name in zip(axes[0], models, strict=True):
    for name, style in zip(optimizers, ("k-", "r-", "r--"), strict=True):
        loss = runs[model_name, name]["losses"]
        ax.plot(
            np.arange(k, len(loss) + 1),
            np.convolve(loss, np.ones(k) / k, "valid"),
            style,
            label=f"{name} ({100 * runs[model_name, name]['acc']:.1f}%)",
        )
    ax.set_yscale("log")
    ax.set_title(f"MNIST {model_name}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of {k})")
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Where does one `v` per neuron match Adam?
#
# Adam's own `v` (after the run above) says how different the connections of one neuron
# really are. For every connection we take `r = sqrt(v / mean_neuron(v))`, the factor by which
# Adam's step size for that connection differs from the one a per-neuron `v` would give it
# (everything else equal). Where `r` stays near 1, one `v` per neuron *is* Adam; where it
# spreads, neuron-wise Adam gives the large-gradient connections of a neuron (`r > 1`) larger
# steps and the small-gradient ones (`r < 1`) smaller steps than Adam.


# %%
def adam_nu(opt):
    """Adam's second moment from an nnx.Optimizer, as a dict of NumPy arrays."""
    nu = optax.tree.get(opt.opt_state, "nu")
    return jax.tree.map(
        lambda x: np.asarray(x[...], np.float64), nu, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def flat(tree, is_leaf=None):
    return {
        on.fan_in.path_str(p): x
        for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    }


spread = {}
for model_name in models:
    nu = adam_nu(runs[model_name, "adam"]["opt"])
    fan_in = flat(on.fan_in_axes(nu), is_leaf=lambda t: isinstance(t, tuple))
    for name, v in flat(nu).items():
        if fan_in[name]:  # biases, norms, embeddings have no fan-in axes: per element in both
            r = np.sqrt(v / np.maximum(v.mean(axis=fan_in[name], keepdims=True), 1e-30))
            spread[f"{model_name}: {name}"] = r.ravel()

print(f"{'kernel (Adam run)':44s} {'r 10%':>6s} {'median':>6s} {'r 90%':>6s} {'r < 1/4':>8s}")
for name, r in spread.items():
    q10, q50, q90 = np.quantile(r, [0.1, 0.5, 0.9])
    print(f"{name:44s} {q10:6.2f} {q50:6.2f} {q90:6.2f} {np.mean(r < 0.25):8.1%}")

fig, ax = plt.subplots(figsize=(8, 0.25 * len(spread) + 1.2))
for i, r in enumerate(spread.values()):
    q10, q50, q90 = np.quantile(r, [0.1, 0.5, 0.9])
    ax.plot([q10, q90], [i, i], "-", color="tab:blue", lw=3)
    ax.plot(q50, i, "o", color="k", ms=4)
ax.axvline(1.0, color="tab:red", lw=1)
ax.set_yticks(range(len(spread)), list(spread), fontsize=7)
ax.set_xscale("log")
ax.invert_yaxis()
ax.set_xlabel(
    "r = sqrt(v / neuron mean of v): 10%-90% range (bar) and median (dot); 1 = per-neuron v"
)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What a per-neuron first moment costs
#
# With `first_moment="neuron"` the step of a connection is `(1 - b1) g_t + b1 mean(a_{t-1})`:
# only the fresh `(1 - b1) g_t = 0.1 g_t` tells the connections of one neuron apart, the
# momentum part is shared by all of them. On a least-squares problem whose solution needs
# every weight of a neuron to move differently, the per-connection first moment gets there far
# sooner (64 samples, 8 inputs, 3 outputs, lr 0.05, no schedule):

# %%
rng = np.random.default_rng(0)
X = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
Y = X @ jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
lsq = lambda p: jnp.mean((X @ p["kernel"] + p["bias"] - Y) ** 2)
# The Hessian of one output column (its kernel column and its bias): 2/192 [X 1]^T [X 1].
X1 = np.concatenate([np.asarray(X, np.float64), np.ones((64, 1))], axis=1)
H = 2.0 / (64 * 3) * X1.T @ X1
lr, lsq_steps = 0.05, 1500 if FULL else 300
b1, b2, eps = 0.9, 0.999, 1e-8


def stiffness(nu, t, lr_t):
    """lr * largest eigenvalue of D^1/2 H D^1/2, D = 1 / (sqrt(v_hat) + eps): the step of the
    stiffest direction; the momentum iteration is unstable above 2 (1 + b1) / (1 - b1) = 38."""
    vk = np.broadcast_to(np.asarray(nu["kernel"], np.float64), (8, 3))
    vb = np.asarray(nu["bias"], np.float64)
    worst = 0.0
    for j in range(3):
        v_hat = np.concatenate([vk[:, j], vb[j : j + 1]]) / (1 - b2**t)
        d = np.sqrt(lr_t / (np.sqrt(v_hat) + eps))
        worst = max(worst, float(np.linalg.eigvalsh(d[:, None] * H * d[None, :]).max()))
    return worst


cosine = optax.cosine_decay_schedule(lr, lsq_steps)
constant = lambda t: lr
runs = {
    "adam": (optax.adam(lr), "nu", constant),
    "neuron_adam full": (on.neuron_adam(lr), "neuron_adam_nu", constant),
    "neuron_adam neuron": (on.neuron_adam(lr, first_moment="neuron"), "neuron_adam_nu", constant),
    "adam, cosine decay": (optax.adam(cosine), "nu", cosine),
    "neuron_adam full, cosine decay": (on.neuron_adam(cosine), "neuron_adam_nu", cosine),
}
limit = 2 * (1 + b1) / (1 - b1)
curves, stiff = {}, {}
for name, (tx, nu_name, lr_of) in runs.items():
    p = {"kernel": jnp.zeros((8, 3)), "bias": jnp.zeros(3)}
    s = tx.init(p)

    @jax.jit
    def step(p, s, tx=tx):
        u, s = tx.update(jax.grad(lsq)(p), s, p)
        return optax.apply_updates(p, u), s, lsq(p)

    out, edge = [], []
    for t in range(1, lsq_steps + 1):
        p, s, loss = step(p, s)
        out.append(float(loss))
        edge.append(stiffness(optax.tree.get(s, nu_name), t, float(lr_of(t - 1))))
    curves[name], stiff[name] = np.array(out), np.array(edge)
    crossings = [t + 1 for t in range(1, len(edge)) if edge[t - 1] <= limit < edge[t]]
    line = f"{name:31s} loss after 100 / 300 / last step: {out[99]:.1e} / {out[299]:.1e} / "
    line += f"{out[-1]:.1e}; "
    if crossings:
        c = crossings[0]  # the step whose update was the first above the limit
        line += (
            f"above the limit at steps {crossings}: loss {out[c - 2]:.1e} before the first, "
            f"up to {max(out[c - 1 : c + 100]):.1e} in the 100 steps after it"
        )
    else:
        line += f"never above the limit (at most {max(edge):.1f})"
    print(line)

styles = ("k-", "r-", "r--", "k:", "r:")
fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.4))
for (name, c), style in zip(curves.items(), styles, strict=True):
    ax.plot(np.arange(1, len(c) + 1), c, style, label=name, lw=1)
    bx.plot(np.arange(1, len(c) + 1), stiff[name], style, label=name, lw=1)
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("loss")
ax.legend(fontsize=7)
bx.axhline(limit, color="gray", lw=0.8)
bx.text(5, limit * 1.03, "stability limit 2(1+b1)/(1-b1) = 38", fontsize=7)
bx.set_xlabel("step")
bx.set_ylabel("lr * largest eigenvalue of the preconditioned Hessian")
bx.legend(fontsize=7, loc="center right")
plt.tight_layout()
plt.show()

# %% [markdown]
# **The late rise is Adam's, not a defect of the per-neuron moment.** With a constant learning
# rate both Adam and neuron-wise Adam reach the float32 floor of this problem (a loss of about
# 1e-13: residuals at float32's relative precision of `Y`) by step 300 and stay there for
# several hundred steps; then the loss jumps by seven to eight orders of magnitude (to 1.9e-5 for
# Adam after step 1023, 2.7e-5 for the full first moment after step 921), falls back, and jumps
# again 230 to 300 steps later. The right panel says why. Once the gradients have vanished, `v`
# only decays (`v <- 0.999 v`, a factor `e` per 1,000 steps, which the bias correction
# `1 - 0.999^t` does not undo), so the step `lr / sqrt(v_hat)` of every direction keeps growing.
# Adam's update is a momentum iteration (`m` averages the gradients with weight `1 - b1`), stable
# while `lr * lambda / sqrt(v_hat)` stays below `2 (1 + b1) / (1 - b1) = 38` for the stiffest
# direction `lambda` of the Hessian (with `D = 1 / (sqrt(v_hat) + eps)`: the largest eigenvalue
# of `D^1/2 H D^1/2`, plotted). Each jump starts at the step where that curve crosses the line:
# the error grows geometrically from the rounding floor until the gradients are large enough to
# raise `v` again, which brings the curve back under the line. The per-neuron `v` (a mean of
# `g^2` over the fan-in) is a little smaller than Adam's own in the stiff directions, so it
# crosses about 100 steps earlier; the per-neuron first moment crosses first (step 875), while
# it is still descending, and jumps from 2.5e-7 to 1.5e-5. It is neither float32 rounding nor
# `eps`: the same happens in float64 and with `eps = 0`. A decaying learning rate (the dotted
# curves, cosine to 0 over the run, the application's default) keeps the curve below 19 and the
# loss at the floor.

# %% [markdown]
# ## Summary
#
# Figures from the committed full run (CPU shared with other jobs, one seed, learning rate 1e-3
# for all three; `benchmarks/README.md` has eight optimizers on 10,000 images):
#
# - **Memory.** One second moment per neuron halves Adam's state (0.50x on the CNN, 0.55x on the
#   vit, whose biases, LayerNorms and position table keep per-element moments); with the first
#   moment per neuron too, the state is 0.001x (CNN) and 0.09x (vit) of Adam's.
# - **Where one `v` per neuron matches Adam.** On the vit, Adam's own `v` is nearly uniform inside
#   each neuron (in every kernel 80% of the connections have `r` between 0.29 and 1.6, in most
#   between 0.5 and 1.5), and neuron-wise Adam with the full first moment follows Adam's loss curve
#   (62.1% vs 63.4% test accuracy after 156 steps; 75.2% vs 75.7% in the benchmark). On the CNN
#   second conv and the dense layers are not uniform (a tenth of the connections have `r` below
#   0.13 in the conv, 0.03 in the hidden dense layer, 0.01 in the output layer: inputs that are
#   rarely active, whose `v` is hundreds of times below their neuron's), and the per-neuron `v`
#   gives those connections much smaller steps than Adam would; the accuracy gap stays small
#   (94.2% vs 95.0% here, 96.8% vs 97.1% in the benchmark).
# - **What a per-neuron first moment costs.** With `first_moment="neuron"` only `(1 - b1) g_t`
#   distinguishes the connections of a neuron. It is exact and tiny in memory, but it trains
#   clearly worse at the same learning rate: 87.0% (CNN) and 47.8% (vit) here; on the
#   least-squares problem it is at 4.6e-2 after 300 steps where the per-connection first moment
#   is at the float32 floor (about 1e-13). It is the right choice only when optimizer memory
#   matters more than the number of steps.
# - **A constant learning rate ends in spikes**, for Adam and neuron-wise Adam alike, once the
#   gradients vanish and `v` decays; decay the learning rate.
#
# One seed and untuned learning rates: differences below about half a percent are noise.
