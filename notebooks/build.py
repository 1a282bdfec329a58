"""Write the three notebooks from the cells below (then run ``execute.py``).

The notebooks are generated so that their source stays reviewable as plain
Python; edit the cells here, run ``.venv/bin/python notebooks/build.py`` and
``make notebooks`` (a full run, NOTEBOOK_FULL=1) to regenerate the outputs.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return new_code_cell(textwrap.dedent(text).strip())


SETUP = """
import os
FULL = os.environ.get("NOTEBOOK_FULL") == "1"  # committed outputs: full run; tests: tiny sizes

import time
import numpy as np
import jax, jax.numpy as jnp
import optax
import matplotlib
import matplotlib.pyplot as plt
from flax import nnx
import optax_neuron as on

%matplotlib inline
%config InlineBackend.figure_formats = ["png"]
plt.rcParams.update({"figure.dpi": 70, "axes.grid": True, "grid.alpha": 0.3})
print("full run" if FULL else "small run (NOTEBOOK_FULL=1 for the full one)", "on", jax.default_backend())
"""

TRAIN_HELPER = """
from optax_neuron.mnist.data import load_mnist
from optax_neuron.mnist.models import make_model
from optax_neuron.mnist.train import evaluate, make_train_epoch

ds = load_mnist()
BATCH = 128 if FULL else 32
CHUNK = 30 if FULL else 3         # optimizer steps between two points of a curve
POINTS = 36 if FULL else 3        # full: 1,080 steps of 128 images, about 2.8 epochs
N_TEST = 10_000 if FULL else 500  # test images evaluated at every point


def train_curve(tx, model_name="mlp", seed=0, on_point=None, **model_kwargs):
    \"\"\"Train with the app's jitted scan, CHUNK steps at a time; return rows (step, loss, test acc).\"\"\"
    model = make_model(model_name, nnx.Rngs(seed), **model_kwargs)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    train_chunk = make_train_epoch(graphdef, BATCH)  # shuffles its images, then lax.scan over minibatches
    per_chunk = CHUNK * BATCH
    usable = len(ds.train_labels) // per_chunk * per_chunk
    order = np.random.default_rng(seed).permutation(len(ds.train_labels))
    rows = []
    for c in range(POINTS):
        idx = np.sort(order[(c * per_chunk) % usable:][:per_chunk])
        state, loss, _ = train_chunk(state, ds.train_images[idx], ds.train_labels[idx], jax.random.key(c))
        model, opt = nnx.merge(graphdef, state)
        _, test_acc = evaluate(model, ds.test_images[:N_TEST], ds.test_labels[:N_TEST])
        rows.append(((c + 1) * CHUNK, float(loss), test_acc))
        if on_point is not None:
            on_point((c + 1) * CHUNK, opt)
    return np.array(rows)
"""


def nb01() -> list:
    return [
        md("""
        # Neuron-mean momentum

        This notebook answers one question from start to end. In SGD with momentum, replace the
        momentum of a connection by the **mean momentum of all incoming connections of the same
        neuron**. In a 1-2-2-1 network, for the connection (2,5):

        ```
        acc_mean  = (acc(2,5) + acc(3,5)) / 2
        acc(2,5) <- grad(2,5) + mu * acc_mean
        var      -= lr * acc
        ```

        We show (1) which array axis "incoming connections" is for Dense, Conv and attention
        kernels, (2) that one number per neuron is all the state this needs, (3) the wrong-axis
        pitfall, and (4) MNIST training curves against ordinary momentum.
        """),
        code(SETUP),
        md("""
        ## The 1-2-2-1 network

        Neurons are numbered layer by layer: 1 (input), 2 and 3, 4 and 5, 6 (output). The
        incoming connections of neuron 5 are (2,5) and (3,5) (red). The outgoing connections
        of neuron 2 are (2,4) and (2,5) (blue, dashed): averaging those is the pitfall below.
        """),
        code("""
        layers = [[1], [2, 3], [4, 5], [6]]
        pos = {n: (x, (len(l) - 1) / 2 - i) for x, l in enumerate(layers) for i, n in enumerate(l)}
        fig, ax = plt.subplots(figsize=(6, 2.8))
        for a, b in zip(layers, layers[1:]):
            for i in a:
                for j in b:
                    incoming = j == 5
                    outgoing = i == 2 and j in (4, 5) and not incoming
                    style = dict(color="tab:red", lw=3) if incoming else dict(color="0.7", lw=1)
                    if outgoing:
                        style = dict(color="tab:blue", lw=2, ls="--")
                    ax.plot(*zip(pos[i], pos[j]), zorder=1, **style)
        ax.plot(*zip(pos[2], pos[5]), color="tab:red", lw=3, zorder=2)
        for n, (x, y) in pos.items():
            ax.scatter(x, y, s=700, color="white", edgecolor="k", zorder=3)
            ax.text(x, y, str(n), ha="center", va="center", zorder=4)
        ax.text(1.5, 0.12, "(2,5)", color="tab:red")
        ax.set_xlim(-0.3, 3.3); ax.set_ylim(-0.85, 0.85)
        ax.set_axis_off(); ax.set_title("incoming connections of neuron 5 (red), outgoing of neuron 2 (blue)")
        plt.show()
        """),
        md("""
        In Flax the layer from {2, 3} to {4, 5} is `nnx.Linear(2, 2)`, whose kernel is
        `W[in, out]`: row = the neuron the connection comes from, column = the neuron it goes to.
        So (2,5) is `W[0, 1]` and the incoming connections of neuron 5 are the column `W[:, 1]`:
        the mean runs over **axis 0**, the fan-in axis. `on.fan_in_axes` reads this from the
        parameter path (`.../kernel` in a Flax layout):
        """),
        code("""
        net = nnx.Sequential(nnx.Linear(1, 2, rngs=nnx.Rngs(0)), nnx.tanh,
                             nnx.Linear(2, 2, rngs=nnx.Rngs(1)), nnx.tanh,
                             nnx.Linear(2, 1, rngs=nnx.Rngs(2)))
        params = nnx.to_pure_dict(nnx.state(net, nnx.Param))
        axes = on.fan_in_axes(params)
        for path, p in jax.tree_util.tree_leaves_with_path(params):
            name = on.fan_in.path_str(path)
            ax_ = axes["layers"][int(name.split("/")[1])][name.split("/")[2]]
            print(f"{name:18s} shape {str(p.shape):8s} fan-in axes {ax_}")
        """),
        md("""
        Two steps by hand for the middle kernel, then the same two steps with
        `on.neuron_mean_trace` (the momentum part of `on.neuron_mean_sgd`). The accumulator
        starts at zero, so after step 1 `acc = grad_1`; at step 2
        `acc(2,5) = grad_2(2,5) + mu * (acc(2,5) + acc(3,5)) / 2`.
        """),
        code("""
        mu = 0.9
        g1 = np.array([[0.2, -0.4], [0.6, 0.8]], np.float32)   # rows: neurons 2, 3; columns: 4, 5
        g2 = np.array([[0.1, 0.3], [-0.5, 0.7]], np.float32)

        acc1 = g1                                                # the seed's accumulator after step 1
        by_hand = g2[0, 1] + mu * (acc1[0, 1] + acc1[1, 1]) / 2  # acc(2,5) after step 2

        tx = on.neuron_mean_trace(mu)
        state = tx.init({"kernel": jnp.zeros((2, 2))})
        _, state = tx.update({"kernel": jnp.asarray(g1)}, state)
        upd2, state = tx.update({"kernel": jnp.asarray(g2)}, state)
        print(f"acc(2,5) by hand: {by_hand:.4f}   library: {float(upd2['kernel'][0, 1]):.4f}")
        print("state after step 2 (one number per neuron 4, 5):", np.asarray(state.neuron_momentum["kernel"]))
        assert np.isclose(by_hand, upd2["kernel"][0, 1])
        """),
        md("""
        ## Fan-in axes of Dense, Conv and attention kernels

        Each colour below is one output neuron; the cells of one colour are its incoming
        connections, the elements averaged together. A Dense kernel `(in, out)` reduces over
        axis 0, a Conv kernel `(h, w, in, out)` over axes 0, 1, 2 (a whole 3x3xC filter is one
        neuron), and an attention query kernel `(in, heads, head_dim)` over axis 0 only, although
        it has rank 3 like a 1-D convolution: that is why the axes are keyed on the parameter path
        and not guessed from the rank.
        """),
        code("""
        def neuron_ids(shape, ax):
            \"\"\"Every element of a kernel labelled with the index of the neuron it feeds.\"\"\"
            nshape = on.fan_in.neuron_shape(shape, ax)
            return np.broadcast_to(np.arange(np.prod(nshape)).reshape(nshape), shape)

        dense = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
        conv = nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(0))
        attn = nnx.MultiHeadAttention(num_heads=2, in_features=5, qkv_features=6, decode=False, rngs=nnx.Rngs(0))
        kernels = {
            "Dense": nnx.to_pure_dict(nnx.state(dense, nnx.Param)),
            "Conv": nnx.to_pure_dict(nnx.state(conv, nnx.Param)),
            "Attention": nnx.to_pure_dict(nnx.state(attn, nnx.Param)),
        }
        dense_ax = on.fan_in_axes(kernels["Dense"])["kernel"]
        conv_ax = on.fan_in_axes(kernels["Conv"])["kernel"]
        query_ax = on.fan_in_axes(kernels["Attention"])["query"]["kernel"]
        out_ax = on.fan_in_axes(kernels["Attention"])["out"]["kernel"]
        q_shape, o_shape = kernels["Attention"]["query"]["kernel"].shape, kernels["Attention"]["out"]["kernel"].shape
        print("Dense kernel", dense.kernel.shape, "axes", dense_ax, "| Conv kernel", conv.kernel.shape, "axes", conv_ax)
        print("query kernel", q_shape, "axes", query_ax, "| out kernel", o_shape, "axes", out_ax)

        fig = plt.figure(figsize=(13, 3.4))
        grid = fig.add_gridspec(2, 10, width_ratios=[1.4, 0.4, 1, 1, 1, 1, 0.6, 1.6, 0.6, 1.6], wspace=0.15)
        ax = fig.add_subplot(grid[:, 0])
        ax.imshow(neuron_ids(dense.kernel.shape, dense_ax), cmap="tab10", vmin=0, vmax=9)
        ax.set_title("Dense (in=6, out=4)", fontsize=10)
        ax.set(xlabel="out (neuron)", ylabel="in"); ax.grid(False)
        ids = neuron_ids(conv.kernel.shape, conv_ax)
        for c_in in range(2):
            for c_out in range(4):
                ax = fig.add_subplot(grid[c_in, 2 + c_out])
                ax.imshow(ids[:, :, c_in, c_out], cmap="tab10", vmin=0, vmax=9)
                ax.set_xticks([]); ax.set_yticks([]); ax.grid(False)
                if c_in == 0: ax.set_title(f"out {c_out}")
                if c_out == 0: ax.set_ylabel(f"in {c_in}")
        fig.text(0.42, 0.97, "Conv 3x3 (in=2, out=4): one 3x3x2 filter per neuron", ha="center", fontsize=11)
        ax = fig.add_subplot(grid[:, 7])
        q_ids = neuron_ids(q_shape, query_ax).reshape(q_shape[0], -1)
        ax.imshow(q_ids, cmap="tab20", vmin=0, vmax=19)
        ax.set_title("attention query\\n(in, heads x head_dim)", fontsize=10)
        ax.set(xlabel="heads x head_dim", ylabel="in"); ax.grid(False)
        ax = fig.add_subplot(grid[:, 9])
        o_ids = neuron_ids(o_shape, out_ax).reshape(-1, o_shape[-1])
        ax.imshow(o_ids, cmap="tab10", vmin=0, vmax=9)
        ax.set_title("attention out\\n(heads x head_dim, out)", fontsize=10)
        ax.set(xlabel="out", ylabel="heads x head_dim"); ax.grid(False)
        plt.show()
        """),
        md("""
        ## One number per neuron is enough

        The seed keeps a full accumulator, one value per connection:
        `a_t = g_t + mu * mean_fanin(a_{t-1})`. Taking the fan-in mean of both sides,
        `mean(a_t) = mean(g_t) + mu * mean(a_{t-1})`: the per-neuron mean `m_t` obeys its own
        recursion, and the update is `g_t + mu * m_{t-1}`. `on.neuron_mean_trace` keeps only `m`.
        Below, the seed's full accumulator in plain NumPy and the library on the MNIST MLP
        (784-128-10), 20 steps of random gradients.
        """),
        code("""
        from optax_neuron.mnist.models import make_model

        mlp_params = nnx.to_pure_dict(nnx.state(make_model("mlp", nnx.Rngs(0)), nnx.Param))
        names = [on.fan_in.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(mlp_params)]

        def seed_reference(grads_seq, mu):
            \"\"\"The seed's optimizer in NumPy: a full accumulator per connection, kernels average axis 0.\"\"\"
            acc = [np.zeros_like(g) for g in grads_seq[0]]
            out = []
            for grads in grads_seq:
                acc = [g + mu * (a.mean(axis=0, keepdims=True) if name.endswith("kernel") else a)
                       for g, a, name in zip(grads, acc, names)]
                out.append(acc)
            return out

        rng = np.random.default_rng(0)
        leaves, treedef = jax.tree.flatten(mlp_params)
        grads_seq = [[rng.normal(size=x.shape).astype(np.float32) for x in leaves] for _ in range(20)]
        reference = seed_reference(grads_seq, mu=0.9)

        tx = on.neuron_mean_trace(0.9)
        state = tx.init(mlp_params)
        worst = 0.0
        for grads, ref in zip(grads_seq, reference):
            upd, state = tx.update(jax.tree.unflatten(treedef, [jnp.asarray(g) for g in grads]), state)
            worst = max(worst, max(float(np.max(np.abs(np.asarray(u) - r))) for u, r in zip(jax.tree.leaves(upd), ref)))
        print(f"largest difference from the seed's full accumulator over 20 steps: {worst:.2e}")
        full = sum(x.size for x in leaves)
        kept = sum(x.size for x in jax.tree.leaves(state.neuron_momentum))
        print(f"state: {kept:,} numbers instead of {full:,} ({full / kept:.0f}x less)")
        for name, m in zip(names, jax.tree.leaves(state.neuron_momentum)):
            print(f"  {name:18s} momentum state shape {m.shape}")
        assert worst < 1e-4
        """),
        md("""
        ## The wrong-axis pitfall

        A widely copied answer to the seed question averages axis 1 of the kernel. For
        `W[in, out]` that is the **outgoing** connections of the *source* neuron: for (2,5) it
        mixes (2,4) and (2,5) instead of (2,5) and (3,5). The same code with the axes flipped
        (`fan_in=` rules saying "all but the first axis", the PyTorch `(out, in)` layout) shows
        the difference on the two steps above:
        """),
        code("""
        wrong_rules = [("*kernel", on.fan_in.ALL_BUT_FIRST), ("*bias", on.fan_in.NONE)]
        wrong = on.neuron_mean_trace(mu, fan_in=wrong_rules)
        state = wrong.init({"kernel": jnp.zeros((2, 2))})
        _, state = wrong.update({"kernel": jnp.asarray(g1)}, state)
        upd_wrong, _ = wrong.update({"kernel": jnp.asarray(g2)}, state)
        outgoing = g2[0, 1] + mu * (g1[0, 0] + g1[0, 1]) / 2
        print(f"incoming (2,5),(3,5): {by_hand:.4f}   outgoing (2,4),(2,5): {outgoing:.4f}   "
              f"axis-1 code: {float(upd_wrong['kernel'][0, 1]):.4f}")
        """),
        md("""
        For a Conv kernel `(h, w, in, out)` "all but the first axis" is worse still: it averages
        over a kernel row, the input channels and the *output* channels together. Using the fan-in
        rules of the parameter's layout (the Flax preset here, `on.fan_in.TORCH` for PyTorch or
        Equinox weights) avoids both.

        ## MNIST: neuron-mean momentum against SGD momentum

        The MNIST MLP (784-128-10) of the app, trained with the app's jitted training scan and
        each optimizer's default from `optax_neuron.mnist.train.DEFAULTS`: plain SGD (lr 0.1),
        SGD momentum (`optax.sgd`, lr 0.02, mu 0.9), neuron-mean momentum (lr 0.1, mu 0.9), and
        neuron-mean momentum over the wrong axis; plus neuron-mean momentum with exactly the
        settings of SGD momentum (lr 0.02, mu 0.9). Same initialisation and batches for all.
        """),
        code(TRAIN_HELPER),
        code("""
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
            print(f"{label:42s} step {step:4.0f}: train loss {loss:.3f}, test acc {acc:.4f} ({time.perf_counter() - t0:.0f} s)")
        """),
        code("""
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
        for label, c in curves.items():
            style = dict(ls="--") if "0.02" in label and "neuron" in label else {}
            ax1.plot(c[:, 0], c[:, 1], label=label, **style)
            ax2.plot(c[:, 0], c[:, 2], label=label, **style)
        ax1.set(xlabel="step", ylabel=f"train loss (mean of {CHUNK} steps)", yscale="log", title="training loss")
        ax2.set(xlabel="step", ylabel="test accuracy", title=f"test accuracy ({N_TEST} images)")
        ax2.set_ylim(max(0.0, min(c[:, 2].min() for c in curves.values()) - 0.02), 1.0)
        ax1.legend(fontsize=8)
        plt.show()
        """),
        md("""
        How much of a gradient survives the fan-in mean? The momentum carries only
        `mean_fanin(g)`, so the share `||mean_fanin(g)|| / ||g||` (the mean broadcast back over the
        connections) measures how much of each step's direction it can remember. At the start of
        training, on 1,000 images:
        """),
        code("""
        model = make_model("mlp", nnx.Rngs(0))
        x, y = ds.train_images[:1000], ds.train_labels[:1000]
        grads = nnx.to_pure_dict(nnx.grad(
            lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model))
        for layer, what in ((1, "784 pixels -> 128"), (3, "128 hidden -> 10")):
            g = np.asarray(grads["layers"][layer]["kernel"])
            kept = np.linalg.norm(np.broadcast_to(g.mean(axis=0, keepdims=True), g.shape)) / np.linalg.norm(g)
            print(f"layers/{layer}/kernel ({what}): ||mean_fanin(g)|| / ||g|| = {kept:.3f}")
        print(f"pixels that are exactly 0 in these images: {np.mean(x == 0):.0%}")
        """),
        md("""
        **Reading the curves.** The fan-in mean keeps about a third of the gradient's norm in
        both layers; the rest, the part in which the incoming connections of a neuron disagree,
        gets no momentum at all. So neuron-mean momentum behaves much like plain SGD at the same
        learning rate, and with ordinary momentum's settings (lr 0.02, dashed) it is slower than
        both. Averaging over the wrong axis gives similar curves on this MLP: the difference is in
        what the method computes (the seed's rule holds only with the fan-in axes), not, here, in
        the score. The library makes the idea cheap (one number per
        neuron) and correct for every layer type; whether it helps is for experiments like this
        one to say, and here per-connection momentum wins.
        """),
    ]


def nb02() -> list:
    return [
        md("""
        # Gradient statistics: running means and per-neuron norms

        A TensorFlow U-Net trainer kept, for every variable `i`,

        ```python
        avg_gradients[i] = avg_gradients[i] * (1 - 1 / (step + 1)) + gradients[i] / (step + 1)
        ```

        and logged the L2 norm of each `avg_gradients[i]`. This notebook explains what that number
        measures, shows numerically why it shrinks like `1/sqrt(t)` when the gradients are noise,
        and then watches per-layer and per-neuron statistics while a CNN trains on MNIST, with the
        library's `on.running_gradient_mean`, `on.gradient_norms` and `on.metrics`.
        """),
        code(SETUP),
        md("""
        ## What it measures

        With `t = step + 1` the recursion is `avg_t = avg_{t-1} + (g_t - avg_{t-1}) / t`, so
        `avg_t = (g_1 + ... + g_t) / t`: the **mean of the gradient over every step so far**
        (`on.running_gradient_mean()` with its default `decay=None`).

        Write each gradient as a steady part plus noise, `g_s = mu + e_s`, with independent noise
        of mean zero and spread `sigma` in each of `d` entries. Then
        `E ||avg_t||^2 = ||mu||^2 + sigma^2 d / t`, while a single gradient has
        `E ||g_t||^2 = ||mu||^2 + sigma^2 d`. If the gradients are pure noise (`mu = 0`) the norm of
        the mean falls like `sigma sqrt(d / t)`, i.e. `1/sqrt(t)` times the norm of one gradient;
        a steady push keeps it at `||mu||`. The ratio `||avg_t|| / ||g_t||` is thus a rough
        signal-to-noise ratio of a variable's gradient.

        Below: `d = 10,000`, `sigma = 1`, pure noise and noise plus a steady drift with
        `||mu|| = 10`, through the library's transformation (inside one `lax.scan`).
        """),
        code("""
        d, T = 10_000, (2_000 if FULL else 200)
        t = np.arange(1, T + 1)

        def norms(tx, drift):
            \"\"\"||g_t|| and ||running mean_t|| for g_t = drift + N(0, 1) noise, t = 1..T.\"\"\"
            def step(state, key):
                g = drift + jax.random.normal(key, (d,))
                _, state = tx.update(g, state)
                return state, (jnp.linalg.norm(g), jnp.linalg.norm(state.gradient_mean))
            _, out = jax.jit(lambda keys: jax.lax.scan(step, tx.init(jnp.zeros(d)), keys))(
                jax.random.split(jax.random.key(0), T))
            return [np.asarray(x) for x in out]

        drift = jnp.full(d, 0.1)  # ||mu|| = 0.1 * sqrt(10,000) = 10
        g_noise, mean_noise = norms(on.running_gradient_mean(), 0.0)
        _, mean_drift = norms(on.running_gradient_mean(), drift)
        _, ema_noise = norms(on.running_gradient_mean(decay=0.99), 0.0)

        for s in (1, 10, 100, T):
            print(f"t = {s:5d}: ||g_t|| = {g_noise[s - 1]:6.1f}   ||mean_t|| = {mean_noise[s - 1]:6.2f}   "
                  f"sqrt(d/t) = {np.sqrt(d / s):6.2f}   ratio = {mean_noise[s - 1] / g_noise[s - 1]:.4f}"
                  f"   1/sqrt(t) = {1 / np.sqrt(s):.4f}")
        """),
        code("""
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
        """),
        md("""
        The EMA (`decay=0.99`, debiased) follows the cumulative mean for the first ~100 steps and
        then stays near `sigma sqrt(d (1 - decay) / (1 + decay))` (dotted green): it forgets, so it
        keeps tracking a moving target but no longer averages the noise away.

        ## Watching a CNN train on MNIST

        The monitoring pieces go first in the chain, so they see the raw gradients, and pass the
        updates through untouched. `on.metrics(opt.opt_state)` reads them back by parameter path
        (the NNX `Variable` wrappers are unwrapped). The model is the app's CNN, made small for the
        CPU (8 and 16 filters, 64 hidden units), trained with SGD momentum.
        """),
        code(TRAIN_HELPER),
        code("""
        tx = optax.chain(
            on.gradient_norms(),           # per-leaf, global and per-neuron norms of the raw gradient
            on.running_gradient_mean(),    # the U-Net trainer's cumulative mean
            optax.sgd(0.02, momentum=0.9),
        )
        log = []

        def record(step, opt):
            values = on.metrics(opt.opt_state, per_neuron=True)
            mean_tree = nnx.to_pure_dict(optax.tree.get(opt.opt_state, "gradient_mean"))
            values["mean_neuron_norm"] = on.neuron_norms(mean_tree)  # per-neuron norms of the mean
            log.append((step, jax.device_get(values)))

        t0 = time.perf_counter()
        curve = train_curve(tx, "cnn", on_point=record, channels=(8, 16), hidden=64)
        print(f"{curve[-1, 0]:.0f} steps in {time.perf_counter() - t0:.0f} s: "
              f"train loss {curve[-1, 1]:.3f}, test accuracy {curve[-1, 2]:.4f}")
        print("keys:", ", ".join(k for k in log[-1][1] if "/layers/0/" in k or k.endswith("global")))
        """),
        code("""
        kernels = {"conv 1": "layers/0/kernel", "conv 2": "layers/3/kernel",
                   "dense": "layers/7/kernel", "logits": "layers/9/kernel"}
        steps = np.array([s for s, _ in log])
        series = lambda key: np.array([v[key] for _, v in log])

        fig, axs = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
        for name, path in kernels.items():
            line, = axs[0].plot(steps, series(f"gradient_norm/{path}"), label=name)
            axs[1].plot(steps, series(f"gradient_mean_norm/{path}"), color=line.get_color(), label=name)
            axs[2].plot(steps, series(f"gradient_mean_norm/{path}") / series(f"gradient_norm/{path}"),
                        color=line.get_color(), label=name)
        axs[2].plot(steps, 1 / np.sqrt(steps), "k--", lw=1, label="1/sqrt(t): pure noise")
        axs[0].set(title="||gradient|| (last step of each point)", xscale="log", yscale="log", xlabel="step")
        axs[1].set(title="||cumulative mean of the gradient||", xscale="log", yscale="log", xlabel="step")
        axs[2].set(title="ratio mean / gradient", xscale="log", yscale="log", xlabel="step")
        for ax in axs:
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axs[0].legend(fontsize=8); axs[2].legend(fontsize=8)
        plt.show()
        """),
        md("""
        Per layer, the norm of the running mean falls faster than the gradient's own norm: once
        the loss is low, most of what remains of the minibatch gradients is noise that averages
        out. A ratio near the dashed `1/sqrt(t)` line means "mostly noise"; above it, the layer
        still gets a consistent push.

        ## Per-neuron norms

        `on.gradient_norms()` also keeps one norm per neuron (over each kernel's fan-in axes, the
        same axes as in the neuron-mean notebook): a `(1, 1, 1, 16)` array for the second conv,
        `(1, 64)` for the dense layer. `on.neuron_norms` computes the same for any tree, here the
        running mean. A neuron whose gradient is zero (a ReLU unit that fired for no image of the
        minibatch) shows as a black cell; a unit that never fires again is a black row.
        """),
        code("""
        dense_path = kernels["dense"]
        per_neuron = np.stack([v[f"gradient_neuron_norm/{dense_path}"].ravel() for _, v in log], axis=1)

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [1.4, 1]}, layout="constrained")
        cmap = plt.get_cmap("viridis").with_extremes(bad="black")  # zero norm: black
        im = ax1.imshow(np.ma.masked_equal(per_neuron, 0.0), aspect="auto", cmap=cmap, origin="lower",
                        norm=matplotlib.colors.LogNorm(),
                        extent=[steps[0] - CHUNK / 2, steps[-1] + CHUNK / 2, -0.5, per_neuron.shape[0] - 0.5])
        fig.colorbar(im, ax=ax1, label="norm over the fan-in (black: 0)")
        ax1.set(title="dense layer (784 -> 64): per-neuron gradient norm", xlabel="step", ylabel="neuron"); ax1.grid(False)

        last = log[-1][1]
        for name, path in kernels.items():
            layer = path.split("/")[1]
            g = last[f"gradient_neuron_norm/{path}"].ravel()
            m = last["mean_neuron_norm"]["layers"][int(layer)]["kernel"].ravel()
            ax2.scatter(g, m, s=14, label=f"{name} ({g.size} neurons)")
        ax2.set(xlabel="per-neuron ||gradient||, last step", ylabel="per-neuron ||cumulative mean||",
                title=f"every neuron at step {steps[-1]}")
        ax2.legend(fontsize=8)
        plt.show()
        dead = int((per_neuron.max(axis=1) == 0).sum())
        print(f"dense neurons with a zero gradient at every recorded step: {dead} of {per_neuron.shape[0]}")
        """),
        md("""
        For logging, `on.write_metrics(on.summary_writer(logdir), on.metrics(opt.opt_state), step)`
        sends the same keys to TensorBoard (per-neuron arrays as histograms with
        `per_neuron=True`); the app's `optax_neuron.mnist.train.run(config, data, writer=...)` does
        it once per epoch.
        """),
    ]


def nb03() -> list:
    return [
        md("""
        # RSO: training MNIST without gradients

        RSO (Tripathi & Singh, 2020, [arXiv:2005.05955](https://arxiv.org/abs/2005.05955)) visits
        the weights one at a time, last layer first. For weight `w` of layer `d` it draws
        `dw ~ N(0, sigma_d)` and keeps whichever of `w - dw`, `w`, `w + dw` gives the lowest loss on a
        minibatch; `sigma_d` is the standard deviation of the layer's weights at initialisation
        (`W ~ N(0, sqrt(2 / fan_in))`). One **cycle** visits every weight once. The official code
        anneals sigma linearly to 0.1x over the cycles and reports 99.1% MNIST test accuracy (98%
        after 5 cycles) for a 6-layer conv net with about 12k weights.

        `on.rso` is an Optax transformation: `update(updates, state, params, value_fn=loss)` searches
        the next `weights_per_step` weights in one compiled loop and returns `new_params - params`.
        This notebook trains a small MLP with it on the CPU, looks at accuracy against cycles and
        against accepted weight updates, the acceptance rate of each layer, and compares with SGD.
        """),
        code(SETUP),
        md("""
        ## A CPU-sized problem

        The app's MLP (`make_model("mlp", hidden=32)`: 784 -> 32 ReLU -> 10) has 784 x 32 + 32 x 10 =
        25,408 searched weights (biases are not searched, as in the official code; they stay 0).
        `optax_neuron.mnist.rso.rso_layers` turns the model into `on.LayerStack` layers
        (`on.dense_layer` for the kernels): the search then caches the input of the layer being
        searched and applies a candidate change of one weight to a single output column instead of
        re-running the layer.
        """),
        code("""
        from optax_neuron.mnist.data import load_mnist
        from optax_neuron.mnist.models import make_model
        from optax_neuron.mnist.rso import rso_layers

        ds = load_mnist()
        x_train, y_train = ds.train_images, ds.train_labels
        n_test = 10_000 if FULL else 1_000
        x_test, y_test = jnp.asarray(ds.test_images[:n_test]), jnp.asarray(ds.test_labels[:n_test])

        HIDDEN = 32 if FULL else 8         # a multiple of 8: 16 equal calls per cycle
        CYCLES = 6 if FULL else 1
        BATCH = 1000 if FULL else 200      # minibatch of each update call

        model = make_model("mlp", nnx.Rngs(0), hidden=HIDDEN)
        LAYERS = rso_layers(model)         # f(params, h) functions over the pure parameter dict
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
        print(f"{n_weights:,} searched weights, {WEIGHTS_PER_STEP:,} per call; sigma_d (std at init):",
              {k: round(float(v.std()), 4) for k, v in kernels.items()})
        """),
        md("""
        ## The search

        One jitted call searches `WEIGHTS_PER_STEP` weights (1/16 of a cycle) on one minibatch of
        `BATCH` training images; sigma is annealed
        linearly from 1x to 0.1x over the cycles as in the official code. The state counts the
        accepted proposals per layer (`rso_accepted`), the finished cycles and the position in
        the current one.
        """),
        code("""
        tx = on.rso(weights_per_step=WEIGHTS_PER_STEP, anneal=optax.linear_schedule(1.0, 0.1, CYCLES))

        @jax.jit
        def search(params, state, xb, yb):
            updates, state = tx.update(params, state, params, value_fn=on.LayerStack(LAYERS, cross_entropy, xb, yb))
            return optax.apply_updates(params, updates), state

        rng = np.random.default_rng(0)
        params, state = params0, tx.init(params0)
        rows = [(0.0, 0, float(test_accuracy(params)), 0.0)]   # (cycles, accepted, test acc, seconds)
        per_cycle = [dict.fromkeys(state.rso_accepted, 0)]
        t0 = time.perf_counter()
        while int(state.rso_cycle) < CYCLES:
            idx = rng.choice(len(y_train), BATCH, replace=False)
            params, state = search(params, state, x_train[idx], y_train[idx])
            cycles = int(state.rso_cycle) + int(state.rso_cursor) / n_weights
            accepted = {k: int(v) for k, v in state.rso_accepted.items()}
            rows.append((cycles, sum(accepted.values()), float(test_accuracy(params)), time.perf_counter() - t0))
            if int(state.rso_cursor) == 0:  # a cycle just ended
                per_cycle.append(accepted)
        rso_rows = np.array(rows)
        print(f"{CYCLES} cycles, {len(rows) - 1} calls in {rso_rows[-1, 3]:.0f} s: test accuracy {rso_rows[-1, 2]:.4f}, "
              f"{int(rso_rows[-1, 1]):,} accepted proposals out of {CYCLES * n_weights:,}")
        """),
        code("""
        fig, axs = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
        axs[0].plot(rso_rows[:, 0], rso_rows[:, 2], ".-")
        axs[0].set(xlabel="cycles (weights searched / weights)", ylabel="test accuracy", title="accuracy against cycles")
        axs[1].plot(rso_rows[:, 1], rso_rows[:, 2], ".-")
        axs[1].set(xlabel="accepted weight updates", ylabel="test accuracy", title="accuracy against weight updates")

        sizes = {k: kernels[k].size for k in per_cycle[0]}
        width = 0.8 / len(sizes)
        for i, name in enumerate(sorted(sizes)):
            rate = [(b[name] - a[name]) / sizes[name] for a, b in zip(per_cycle, per_cycle[1:])]
            axs[2].bar(np.arange(1, len(rate) + 1) + (i - (len(sizes) - 1) / 2) * width, rate, width,
                       label=f"{name} ({sizes[name]:,} weights)")
        axs[2].set(xlabel="cycle", ylabel="accepted / searched", title="acceptance rate per layer",
                   xticks=np.arange(1, len(per_cycle)))
        axs[2].legend(fontsize=8)
        plt.show()
        """),
        md("""
        The acceptance rate is high and barely falls although sigma shrinks every cycle: on a fixed
        minibatch the loss is smooth in each weight, so to first order one of `w + dw` and `w - dw`
        always lowers it; `w` is kept only when the step overshoots the minimum along that weight.
        The rate says more about sigma against the curvature of the loss than about progress; the
        accuracy curves say that the gains shrink cycle after cycle.

        ## Against SGD

        The same network from the same initialisation, trained with `optax.sgd` (lr 0.05,
        momentum 0.9, minibatches of 128), for as many seconds as the search took. Wall-clock time
        on this shared CPU is only a rough yardstick, but the gap is not subtle.
        """),
        code("""
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
        print(f"SGD: {int(sgd_rows[-1, 0])} steps in {sgd_rows[-1, 2]:.0f} s, test accuracy {sgd_rows[-1, 1]:.4f} "
              f"(RSO: {rso_rows[-1, 2]:.4f})")

        reached = np.flatnonzero(sgd_rows[:, 1] >= rso_rows[-1, 2])
        if reached.size:
            i = reached[0]
            print(f"SGD reached RSO's final accuracy after {int(sgd_rows[i, 0])} steps "
                  f"({int(sgd_rows[i, 0]) * 128 / len(y_train):.2f} epochs, {sgd_rows[i, 2]:.1f} s)")

        fig, ax = plt.subplots(figsize=(7.5, 3.8))
        ax.plot(rso_rows[1:, 3], rso_rows[1:, 2], ".-", label=f"RSO, {CYCLES} cycles")
        ax.plot(sgd_rows[1:, 2], sgd_rows[1:, 1], label="SGD momentum")
        ax.set(xscale="log", xlabel="wall-clock seconds (both include their first compilation)", ylabel="test accuracy",
               title="RSO against SGD, same network and initialisation")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend()
        plt.show()
        """),
        md("""
        ## The paper's network (GPU only)

        The app's `rso-paper` model is the official MNIST net: six 3x3 convolutions of 16 filters
        with BatchNorm, average pooling after convolutions 2 and 4, global average pooling and a
        dense 16 -> 10 layer, about 12k searched weights (kernels and BatchNorm scale and shift).
        With the paper's minibatch of 5,000 images its cycles are too slow for a CPU, so it runs
        here only when a GPU is present, through the app's `run` (the same as
        `python -m optax_neuron.mnist --optimizer rso --model rso-paper --epochs 5`; one "epoch"
        is one cycle).
        """),
        code("""
        from optax_neuron.mnist.train import TrainConfig, run

        if jax.default_backend() == "gpu":
            result = run(TrainConfig(optimizer="rso", model="rso-paper", epochs=5, rso_batch_size=5000), ds,
                         progress=False, log=print)
            cycles = [r["epoch"] for r in result["epochs"]]
            plt.figure(figsize=(6, 3.5))
            plt.plot(cycles, [r["test_accuracy"] for r in result["epochs"]], "o-")
            plt.gca().set(xlabel="cycle", ylabel="test accuracy", title="RSO, the paper's net")
            plt.show()
            print(f"test accuracy after 5 cycles: {result['test_accuracy']:.4f} (paper: about 0.98)")
        else:
            print(f"no GPU (backend: {jax.default_backend()}): the paper's net was skipped")
        """),
    ]


def notebooks() -> dict:
    return {
        "01_neuron_mean_momentum.ipynb": nb01(),
        "02_gradient_statistics.ipynb": nb02(),
        "03_rso.ipynb": nb03(),
    }


def build(name: str, cells: list) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def main() -> None:
    for name, cells in notebooks().items():
        nbformat.write(build(name, cells), HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
