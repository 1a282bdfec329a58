"""fan_in.from_computation: fan-in axes read from the jaxpr of a model's apply function.

Every expected axis tuple below is written out by hand from the layer's documented
kernel layout (Flax ``(..., in, out)``, Equinox ``(out, in, ...)``, attention
``(in, heads, head_dim)`` / ``(heads, head_dim, out)``), never computed by the code
under test.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import optax_neuron as on
from optax_neuron.fan_in import FLAX, NO_AXES, fan_in_axes, from_computation, neuron_shape

S = jax.ShapeDtypeStruct
F32 = jnp.float32


def by_path(tree) -> dict:
    """``{path: axes}`` of a tree of axes (tuples are leaves here)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]
    return {on.fan_in.path_str(p): axes for p, axes in flat}


# --------------------------------------------------------------------------
# Flax NNX: nnx.split / nnx.merge
# --------------------------------------------------------------------------


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 2, (3,), rngs=rngs)  # (3, 1, 2)
        self.conv2 = nnx.Conv(1, 2, (3, 3), rngs=rngs)  # (3, 3, 1, 2)
        self.conv3 = nnx.Conv(1, 2, (2, 2, 2), rngs=rngs)  # (2, 2, 2, 1, 2)
        self.up = nnx.ConvTranspose(2, 3, (2, 2), strides=(2, 2), rngs=rngs)  # (2, 2, 2, 3)
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=3, qkv_features=8, out_features=6, decode=False, rngs=rngs
        )
        self.general = nnx.LinearGeneral(6, (2, 4), rngs=rngs)  # (6, 2, 4)
        self.embed = nnx.Embed(10, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, seq, img, vol, ids):
        a = self.conv1(seq).sum((1, 2))  # (n,)
        b = self.conv2(img)  # (n, 4, 4, 2)
        c = self.conv3(vol).sum((1, 2, 3, 4))
        h = self.up(b)  # (n, 8, 8, 3)
        h = self.attn(h.reshape(h.shape[0], -1, 3))  # (n, 64, 6)
        h = self.general(h).reshape(h.shape[0], h.shape[1], 8)
        h = self.norm(h + self.embed(ids))
        h = self.bn(h)
        return self.head(h).mean(1) + (a + c)[:, None]


NNX_EXPECTED = {
    "conv1/kernel": (0, 1),
    "conv1/bias": (),
    "conv2/kernel": (0, 1, 2),
    "conv2/bias": (),
    "conv3/kernel": (0, 1, 2, 3),
    "conv3/bias": (),
    "up/kernel": (0, 1, 2),
    "up/bias": (),
    "attn/query/kernel": (0,),
    "attn/key/kernel": (0,),
    "attn/value/kernel": (0,),
    "attn/out/kernel": (0, 1),
    "attn/query/bias": (),
    "attn/key/bias": (),
    "attn/value/bias": (),
    "attn/out/bias": (),
    "general/kernel": (0,),  # the FLAX preset gives (0, 1): path and rank cannot tell
    "general/bias": (),
    "embed/embedding": (),
    "norm/scale": (),
    "norm/bias": (),
    "bn/scale": (),
    "bn/bias": (),
    "head/kernel": (0,),
    "head/bias": (),
}

NNX_INPUTS = (S((2, 5, 1), F32), S((2, 4, 4, 1), F32), S((2, 3, 3, 3, 1), F32), S((2, 64), "int32"))


def test_nnx_model_every_leaf():
    # Shapes are all it needs: the model is built abstractly, parameters and batch
    # statistics together.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: _NNXNet(nnx.Rngs(0))))

    def apply(s, *inputs):
        return nnx.merge(graphdef, s)(*inputs)

    got = by_path(from_computation(apply, state, *NNX_INPUTS))
    assert got == {**NNX_EXPECTED, "bn/mean": (), "bn/var": ()}  # running statistics
    # Where path rules and the computation disagree.
    assert by_path(fan_in_axes(state))["general/kernel"] == (0, 1)


# --------------------------------------------------------------------------
# Flax Linen: model.apply
# --------------------------------------------------------------------------


class _LinenNet(linen.Module):
    @linen.compact
    def __call__(self, img, ids):
        h = linen.Conv(4, (3, 3), name="conv")(img)  # (3, 3, 1, 4)
        h = h.reshape(h.shape[0], -1, 4)
        h = linen.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(h)
        h = linen.DenseGeneral((2, 4), name="general")(h)  # (4, 2, 4)
        h = h.reshape(h.shape[0], h.shape[1], 8) + linen.Embed(10, 8, name="embed")(ids)
        h = linen.LayerNorm(name="norm")(h)
        return linen.Dense(3, name="head")(h)


def test_linen_model_every_leaf():
    model = _LinenNet()
    img, ids = S((2, 4, 4, 1), F32), S((2, 16), "int32")
    variables = jax.eval_shape(model.init, jax.random.key(0), img, ids)
    got = by_path(from_computation(model.apply, variables, img, ids))
    assert got == {
        "params/conv/kernel": (0, 1, 2),
        "params/conv/bias": (),
        "params/attn/query/kernel": (0,),
        "params/attn/key/kernel": (0,),
        "params/attn/value/kernel": (0,),
        "params/attn/out/kernel": (0, 1),
        "params/attn/query/bias": (),
        "params/attn/key/bias": (),
        "params/attn/value/bias": (),
        "params/attn/out/bias": (),
        "params/general/kernel": (0,),
        "params/general/bias": (),
        "params/embed/embedding": (),
        "params/norm/scale": (),
        "params/norm/bias": (),
        "params/head/kernel": (0,),
        "params/head/bias": (),
    }


# --------------------------------------------------------------------------
# Equinox: out-first weights, per-example modules vmapped over the batch
# --------------------------------------------------------------------------


class _EqxNet(eqx.Module):
    conv: eqx.nn.Conv2d
    up: eqx.nn.ConvTranspose1d
    attn: eqx.nn.MultiheadAttention
    embed: eqx.nn.Embedding
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 6)
        self.conv = eqx.nn.Conv2d(1, 4, 3, key=k[0])  # weight (4, 1, 3, 3)
        self.up = eqx.nn.ConvTranspose1d(4, 2, 2, stride=2, key=k[1])  # weight (2, 4, 2)
        self.attn = eqx.nn.MultiheadAttention(2, 2, key=k[2])  # projections (out, in)
        self.embed = eqx.nn.Embedding(10, 2, key=k[3])
        self.norm = eqx.nn.LayerNorm(2)
        self.head = eqx.nn.Linear(2, 3, key=k[4])  # (3, 2)

    def __call__(self, img, ids):  # one example: img (1, 4, 4), ids (4,)
        h = self.conv(img).reshape(4, -1)  # (4 channels, 4 positions)
        h = self.up(h).T  # (8, 2)
        h = self.attn(h, h, h) + jax.vmap(self.embed)(jnp.tile(ids, 2))
        h = jax.vmap(self.norm)(h)
        return jax.vmap(self.head)(h).mean(0)


def test_equinox_model_every_leaf():
    model = eqx.filter_eval_shape(_EqxNet, jax.random.key(0))
    params, static = eqx.partition(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))

    def apply(p, img, ids):
        return jax.vmap(eqx.combine(p, static))(img, ids)

    got = by_path(from_computation(apply, params, S((2, 1, 4, 4), F32), S((2, 4), "int32")))
    linear = {"weight": (1,), "bias": ()}
    assert got == {
        "conv/weight": (1, 2, 3),
        "conv/bias": (),
        "up/weight": (1, 2),
        "up/bias": (),
        **{f"attn/{p}_proj/weight": (1,) for p in ("query", "key", "value", "output")},
        "embed/weight": (),
        "norm/weight": (),
        "norm/bias": (),
        **{f"head/{k}": v for k, v in linear.items()},
    }


# --------------------------------------------------------------------------
# Haiku-style {"w", "b"} dicts, applied by plain JAX written like Haiku's modules
# --------------------------------------------------------------------------


def _haiku_like_apply(params, img, ids):
    conv = params["conv2_d"]  # hk.Conv2D: NHWC images, HWIO kernel
    h = jax.lax.conv_general_dilated(
        img, conv["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = (h + conv["b"]).reshape(img.shape[0], -1)  # (n, 32)
    emb = jnp.take(params["embed"]["embeddings"], ids, axis=0).sum(1)  # hk.Embed
    ln = params["layer_norm"]
    h = jnp.concatenate([h, emb], axis=-1)
    mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(var + 1e-5) * ln["scale"] + ln["offset"]
    lin = params["linear"]  # hk.Linear: x @ w + b
    return jnp.dot(h, lin["w"]) + lin["b"]


def test_haiku_style_dicts():
    params = {
        "conv2_d": {"w": S((3, 3, 1, 2), F32), "b": S((2,), F32)},
        "embed": {"embeddings": S((10, 4), F32)},
        "layer_norm": {"scale": S((36,), F32), "offset": S((36,), F32)},
        "linear": {"w": S((36, 5), F32), "b": S((5,), F32)},
    }
    got = by_path(
        from_computation(_haiku_like_apply, params, S((2, 4, 4, 1), F32), S((2, 3), "int32"))
    )
    assert got == {
        "conv2_d/w": (0, 1, 2),
        "conv2_d/b": (),
        "embed/embeddings": (),
        "layer_norm/scale": (),
        "layer_norm/offset": (),
        "linear/w": (0,),
        "linear/b": (),
    }


# --------------------------------------------------------------------------
# Plain JAX: an MLP, a scanned stack, a vmapped ensemble, what stands in between
# --------------------------------------------------------------------------


def test_plain_jax_mlp():
    params = [(jnp.zeros((5, 4)), jnp.zeros(4)), (jnp.zeros((4, 3)), jnp.zeros(3))]

    def mlp(params, x):
        for w, b in params:
            x = jax.nn.relu(x @ w + b)
        return x

    got = from_computation(mlp, params, S((7, 5), F32))
    assert got == [((0,), ()), ((0,), ())]


def test_scanned_stack_of_layers():
    # Stacked layers (depth, d, d): the layer axis 0 is not fan-in.
    params = {"w": S((3, 4, 4), F32), "b": S((3, 4), F32), "head": S((4, 2), F32)}

    def apply(p, x):
        def layer(h, wb):
            w, b = wb
            return jnp.tanh(h @ w + b), None

        h, _ = jax.lax.scan(layer, x, (p["w"], p["b"]))
        return h @ p["head"]

    def unrolled(p, x):  # the same stack, indexed by a fori_loop counter
        def body(i, h):
            return jnp.tanh(h @ p["w"][i] + p["b"][i])

        return jax.lax.fori_loop(0, 3, body, x) @ p["head"]

    expected = {"w": (1,), "b": (), "head": (0,)}
    assert from_computation(apply, params, S((2, 4), F32)) == expected
    assert from_computation(unrolled, params, S((2, 4), F32)) == expected


def test_nnx_scan_over_layers():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(self.linear(x))

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stack(rngs):
        return Block(rngs)

    graphdef, params = nnx.split(nnx.eval_shape(lambda: stack(nnx.Rngs(0))))

    def apply(p, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def forward(h, block):
            return block(h)

        return forward(x, nnx.merge(graphdef, p))

    got = by_path(from_computation(apply, params, S((2, 4), F32)))
    assert got == {"linear/kernel": (1,), "linear/bias": ()}  # kernels (3, 4, 4)


def test_vmapped_ensemble():
    params = {"w": S((5, 3, 2), F32), "b": S((5, 2), F32)}  # 5 members

    def ensemble(p, x):
        return jax.vmap(lambda w, b: x @ w + b)(p["w"], p["b"])

    assert from_computation(ensemble, params, S((4, 3), F32)) == {"w": (1,), "b": ()}


@jax.custom_jvp
def _scaled(w):
    return 2.0 * w


_scaled.defjvp(lambda primals, tangents: (_scaled(primals[0]), 2.0 * tangents[0]))


@jax.custom_vjp
def _through(w):
    return w


_through.defvjp(lambda w: (w, None), lambda _, g: (g,))


def test_what_stands_between_a_parameter_and_its_contraction():
    params = {
        "transposed": S((3, 6), F32),  # used as x @ W.T: out-first
        "merged": S((2, 3, 5), F32),  # reshaped to (6, 5): both leading axes are fan-in
        "split": S((6, 2, 3), F32),  # reshaped to (6, 6): axis 0
        "v": S((5, 4), F32),  # weight normalisation g * v / |v|
        "g": S((4,), F32),
        "fused": S((4, 12), F32),  # fused q/k/v, split into three (4, 4)
        "half": S((4, 3), jnp.bfloat16),  # cast, scaled, custom_jvp/vjp, remat
    }

    def apply(p, x):  # x (n, 6)
        h = x @ p["transposed"].T  # (n, 3)
        h2 = x @ p["merged"].reshape(6, 5)  # (n, 5)
        h3 = x @ p["split"].reshape(6, 6)  # (n, 6)
        v = p["v"]
        w = p["g"] * v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))
        h4 = h2 @ w  # (n, 4)
        q, k, val = jnp.split(p["fused"], 3, axis=1)
        h5 = jax.nn.softmax((h4 @ q) @ (h4 @ k).T) @ (h4 @ val)
        half = jax.checkpoint(lambda a: _through(_scaled(a)))(p["half"].astype(F32) * 0.5)
        h6 = jax.jit(jnp.matmul)(h5, half)
        return h.sum() + h3.sum() + h6.sum()

    got = from_computation(apply, params, S((2, 6), F32))
    assert got == {
        "transposed": (1,),
        "merged": (0, 1),
        "split": (0,),
        "v": (0,),
        "g": (),
        "fused": (0,),
        "half": (0,),
    }


def test_a_product_summed_at_once_is_a_contraction():
    # sum(x * w) written out is x @ w; a product read by anything else is elementwise.
    params = {"w": S((5, 3), F32), "head": S((3,), F32), "gate": S((3,), F32)}

    def apply(p, x):  # x (n, 5)
        h = jnp.sum(x[:, :, None] * p["w"], axis=1)  # (n, 3): over w's axis 0
        h = jnp.tanh(h * p["gate"])  # elementwise: a gate per unit
        return jnp.sum(h * p["head"], axis=-1)  # one output unit fed by 3

    assert from_computation(apply, params, S((2, 5), F32)) == {
        "w": (0,),
        "gate": (),
        "head": (0,),
    }


def test_cond_and_while():
    params = {"w": S((3, 4), F32), "u": S((4, 4), F32)}

    def apply(p, x):
        h = jax.lax.cond(x.sum() > 0, lambda w: w * 2.0, lambda w: -w, p["w"])
        h = x @ h

        def body(carry):
            i, h = carry
            return i + 1, jnp.tanh(h @ p["u"])

        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, h))[1]

    assert from_computation(apply, params, S((2, 3), F32)) == {"w": (0,), "u": (0,)}


def test_static_arguments_and_none_leaves():
    params = {"w": S((3, 4), F32), "masked": None}

    def apply(p, x, *, train):
        assert isinstance(train, bool)  # passed as it is, not traced
        return x @ p["w"] * (2.0 if train else 1.0)

    assert from_computation(apply, params, S((2, 3), F32), train=True) == {
        "w": (0,),
        "masked": None,
    }


# --------------------------------------------------------------------------
# Refusals: one line naming the path, what was found, and the way out
# --------------------------------------------------------------------------


def _tied(p, ids):
    h = p["embedding"][ids]  # read by a gather ...
    return h @ p["embedding"].T  # ... and contracted over its axis 1


def test_a_tied_embedding_is_ambiguous():
    params = {"embedding": S((10, 4), F32)}
    with pytest.raises(ValueError) as err:
        from_computation(_tied, params, S((2, 3), "int32"))
    message = str(err.value)
    assert "\n" not in message
    assert "'embedding'" in message and "2 different ways" in message
    assert "gather" in message and "contracted over axes (1,)" in message
    assert "rules=[('embedding', axes)]" in message
    # The way out: a rule for that path, taken before the traced axes.
    got = from_computation(_tied, params, S((2, 3), "int32"), rules=[("embedding", NO_AXES)])
    assert got == {"embedding": ()}


def test_an_unknown_op_before_the_contraction_is_refused():
    params = {"w": S((5, 3), F32), "b": S((3,), F32)}

    def apply(p, x):
        return x @ jnp.cumsum(p["w"], axis=0) + p["b"]

    with pytest.raises(ValueError, match=r"'w'.*`cumsum`.*does not follow.*rules=") as err:
        from_computation(apply, params, S((2, 5), F32))
    assert "\n" not in str(err.value)
    got = from_computation(apply, params, S((2, 5), F32), rules=[("w", (0,))])
    assert got == {"w": (0,), "b": ()}


def test_part_of_an_axis_contracted_is_refused():
    params = {"w": S((6, 4), F32)}

    def apply(p, x):  # axis 0 split into (2, 3) and only the 3 contracted
        return jnp.einsum("nj,ijk->nik", x, p["w"].reshape(2, 3, 4))

    with pytest.raises(ValueError, match=r"'w'.*contracts part of its axes \(0,\)"):
        from_computation(apply, params, S((2, 3), F32))


def test_an_unused_parameter_is_refused():
    params = {"w": S((3, 4), F32), "unused": S((4, 4), F32)}
    with pytest.raises(ValueError, match=r"'unused'.*does not use it"):
        from_computation(lambda p, x: x @ p["w"], params, S((2, 3), F32))


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"parameter 'w' is str"):
        from_computation(lambda p, x: x, {"w": "kernel"}, S((2, 3), F32))
    with pytest.raises(TypeError, match="rules= must be a non-empty list"):
        from_computation(lambda p, x: x @ p["w"], {"w": S((3, 4), F32)}, S((2, 3), F32), rules=[1])


# --------------------------------------------------------------------------
# Every transformation takes the traced tree as fan_in=
# --------------------------------------------------------------------------


class _Proj(nnx.Module):
    def __init__(self, rngs):
        self.general = nnx.LinearGeneral(6, (2, 4), rngs=rngs)  # traced (0,), preset (0, 1)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        h = self.general(x)
        return self.head(h.reshape(*h.shape[:-2], 8))


def _proj_setup():
    """A ``_Proj`` with parameters of ones (no random initialisers) and its traced axes."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: _Proj(nnx.Rngs(0))), nnx.Param)
    axes = from_computation(lambda p, x: nnx.merge(graphdef, p)(x), params, S((2, 6), F32))
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)
    return nnx.merge(graphdef, params), params, axes


def _proj_loss(p, x, y):
    """The loss of ``_Proj`` written in plain JAX on its pure-dict parameters."""
    g, head = p["general"], p["head"]
    h = jnp.einsum("ni,ijk->njk", x, g["kernel"]) + g["bias"]
    return jnp.mean((h.reshape(-1, 8) @ head["kernel"] + head["bias"] - y) ** 2)


def test_every_transformation_takes_the_traced_tree():
    _, params, axes = _proj_setup()
    params = nnx.to_pure_dict(params)
    kernel_neurons = neuron_shape((6, 2, 4), (0,))
    assert kernel_neurons == (1, 2, 4)
    x, y = jnp.ones((2, 6)), jnp.zeros((2, 3))
    grads = jax.tree.map(jnp.ones_like, params)
    for tx, field in [
        (on.neuron_mean_sgd(0.1, fan_in=axes), "neuron_momentum"),
        (on.neuron_mean_trace(0.9, fan_in=axes), "neuron_momentum"),
        (on.neuron_adam(1e-3, fan_in=axes), "neuron_adam_nu"),
        (on.gradient_norms(fan_in=axes), "gradient_neuron_norm"),
    ]:
        updates, state = jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p))(grads, params)
        assert optax.tree.get(state, field)["general"]["kernel"].shape == kernel_neurons
        assert jnp.all(jnp.isfinite(updates["general"]["kernel"]))
    # RSO: the neuron-by-neuron order and the He step use the fan-in axes.
    tx = on.rso(sigma="he", within="neuron", fan_in=axes)

    @jax.jit
    def rso_step(p):
        value_fn = lambda q: _proj_loss(q, x, y)
        return tx.update(p, tx.init(p), p, value_fn=value_fn)[0]

    updates = rso_step(params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_nnx_optimizer_takes_the_traced_tree():
    # init sees the parameters in Variable wrappers, update plain arrays: matched by path.
    model, _, axes = _proj_setup()
    optimizer = nnx.Optimizer(model, on.neuron_mean_sgd(0.1, fan_in=axes), wrt=nnx.Param)
    momentum = optax.tree.get(optimizer.opt_state, "neuron_momentum")
    assert momentum["general"]["kernel"].shape == (1, 2, 4)
    optimizer.update(model, nnx.state(model, nnx.Param))  # any tree of the params' structure
    assert optax.tree.get(optimizer.opt_state, "neuron_momentum")["head"]["kernel"].shape == (1, 3)


def test_a_tree_of_axes_with_other_paths_is_still_refused():
    with pytest.raises(ValueError, match=r"parameters without axes: \['b'\]"):
        fan_in_axes({"b": jnp.zeros((3, 4))}, {"a": {"w": (0,)}})


@pytest.mark.parametrize("name", ["mlp", "cnn", "rso-paper", "vit"])
def test_the_preset_and_the_computation_agree_on_the_application_models(name):
    # cnn and rso-paper convolve by im2col (a reshaped kernel in a dot_general); their
    # first kernel (3, 3, 1, c) loses its size-1 input axis in the reshape.
    from optax_neuron.mnist.models import make_model

    model = nnx.eval_shape(lambda: make_model(name, nnx.Rngs(0)))
    model.eval()  # BatchNorm reads its running statistics
    graphdef, state = nnx.split(model)
    traced = from_computation(lambda s, x: nnx.merge(graphdef, s)(x), state, S((1, 28, 28, 1), F32))
    assert by_path(traced) == by_path(fan_in_axes(state, FLAX))


def test_the_application_traces_vit_only():
    from optax_neuron.mnist.models import make_model
    from optax_neuron.mnist.train import TrainConfig, model_fan_in

    model = nnx.eval_shape(lambda: make_model("vit", nnx.Rngs(0)))
    axes = by_path(model_fan_in(TrainConfig(model="vit"), model))
    assert axes["layers/1/attention/query/kernel"] == (0,)
    assert axes["layers/1/attention/out/kernel"] == (0, 1)
    assert axes["layers/0/embedding"] == ()
    assert model_fan_in(TrainConfig(model="cnn"), model) is None
