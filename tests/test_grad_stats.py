"""Tests for optax_neuron.grad_stats and optax_neuron.tensorboard.

References are plain NumPy (float64) loops and formulas written here.
"""

import glob
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_neuron import fan_in
from optax_neuron.grad_stats import (
    RunningGradientMeanState,
    collect_metrics,
    gradient_norms,
    leaf_norms,
    neuron_norms,
    running_gradient_mean,
)
from optax_neuron.tensorboard import summary_writer, write_metrics

# ----------------------------------------------------------------------------- helpers


def _params():
    return {
        "conv1": {"kernel": jnp.zeros((3, 3, 2, 4)), "bias": jnp.zeros((4,))},
        "dense": {"kernel": jnp.zeros((5, 3)), "bias": jnp.zeros((3,))},
    }


def _grad_history(n, params, seed=0, offset=3.0):
    """n gradient trees (float32) with a non-zero mean, as NumPy arrays."""
    rng = np.random.default_rng(seed)
    return [
        jax.tree.map(lambda p: (offset + rng.standard_normal(p.shape)).astype(np.float32), params)
        for _ in range(n)
    ]


def _run(tx, history, params):
    state = tx.init(params)
    step = jax.jit(tx.update)
    outs = []
    for g in history:
        out, state = step(jax.tree.map(jnp.asarray, g), state, params)
        outs.append(out)
    return outs, state


def _np_ema(values, decay, debias):
    m = np.zeros_like(values[0], dtype=np.float64)
    out = []
    for t, g in enumerate(values, start=1):
        m = decay * m + (1 - decay) * g.astype(np.float64)
        out.append(m / (1 - decay**t) if debias else m.copy())
    return out


def _np_norm(x):
    return float(np.sqrt(np.sum(np.asarray(x, np.float64) ** 2)))


def _tf_records(path):
    """Yield the payloads of a TFRecord file (length, crc, data, crc framing)."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        pos += 12
        yield data[pos : pos + length]
        pos += length + 4


# ----------------------------------------------------------------------------- running mean


def test_cumulative_mean_matches_numpy_mean_and_unet_formula():
    params = _params()
    history = _grad_history(120, params)
    outs, state = _run(running_gradient_mean(), history, params)
    mean = state.gradient_mean
    assert int(state.gradient_mean_count) == 120
    for path in (("conv1", "kernel"), ("conv1", "bias"), ("dense", "kernel"), ("dense", "bias")):
        gs = np.stack([h[path[0]][path[1]] for h in history]).astype(np.float64)
        got = np.asarray(mean[path[0]][path[1]])
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, gs.mean(axis=0), rtol=1e-6)
        # The U-Net trainer's recursion avg = avg * (1 - 1/(step+1)) + g/(step+1), step = 0, 1, ...
        avg = np.zeros(gs.shape[1:])
        for step, g in enumerate(gs):
            avg = avg * (1 - 1 / (step + 1)) + g / (step + 1)
        np.testing.assert_allclose(got, avg, rtol=1e-6)
    # emit="updates": what came out is what went in.
    for out, g in zip(outs, history, strict=True):
        jax.tree.map(lambda o, i: np.testing.assert_array_equal(np.asarray(o), i), out, g)


def test_cumulative_mean_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        gs = rng.standard_normal((100, 7))
        tx = running_gradient_mean()
        state = tx.init(jnp.zeros(7))
        for g in gs:
            _, state = tx.update(jnp.asarray(g), state)
        assert state.gradient_mean.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(state.gradient_mean), gs.mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize("debias", [True, False])
def test_ema_matches_numpy(debias):
    params = {"w": jnp.zeros((4, 3))}
    history = _grad_history(100, params, seed=2)
    tx = running_gradient_mean(decay=0.95, debias=debias, emit="mean")
    outs, state = _run(tx, history, params)
    ref = _np_ema([h["w"] for h in history], 0.95, debias)
    for t in (0, 1, 9, 99):
        np.testing.assert_allclose(np.asarray(outs[t]["w"]), ref[t], rtol=2e-6)
    np.testing.assert_allclose(np.asarray(state.gradient_mean["w"]), ref[-1], rtol=2e-6)


def test_emit_updates_returns_the_same_object_and_mean_keeps_dtype():
    params = {"a": jnp.zeros((3,), jnp.bfloat16), "b": jnp.zeros((2,), jnp.float16)}
    updates = {
        "a": jnp.array([1.5, -2.0, 3.25], jnp.bfloat16),
        "b": jnp.array([0.1, 0.2], jnp.float16),
    }
    tx = running_gradient_mean()
    state = tx.init(params)
    assert state.gradient_mean["a"].dtype == jnp.float32  # low precision accumulates in float32
    assert state.gradient_mean["b"].dtype == jnp.float32
    out, state = tx.update(updates, state)
    assert out is updates
    out_jit, _ = jax.jit(tx.update)(updates, tx.init(params))
    for k in updates:
        assert out_jit[k].dtype == updates[k].dtype
        np.testing.assert_array_equal(
            np.asarray(out_jit[k]).view(np.uint16), np.asarray(updates[k]).view(np.uint16)
        )
    tx_mean = running_gradient_mean(emit="mean", accumulator_dtype=jnp.float16)
    s = tx_mean.init(params)
    assert s.gradient_mean["a"].dtype == jnp.float16
    out, s = tx_mean.update(updates, s)
    _, s = tx_mean.update(jax.tree.map(jnp.zeros_like, updates), s)
    out, s = tx_mean.update(jax.tree.map(jnp.zeros_like, updates), s)
    assert out["a"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.float16
    np.testing.assert_allclose(
        np.asarray(out["a"], np.float32), [0.5, -2.0 / 3, 3.25 / 3], rtol=1e-2
    )


def test_none_leaves_pass_through():
    params = {"w": jnp.zeros((2, 3)), "frozen": None}
    updates = {"w": jnp.ones((2, 3)), "frozen": None}
    tx = optax.chain(running_gradient_mean(emit="mean"), gradient_norms())
    out, state = tx.update(updates, tx.init(params), params)
    assert out["frozen"] is None
    assert optax.tree.get(state, "gradient_mean")["frozen"] is None
    assert set(collect_metrics(state)) == {
        "gradient_mean_norm/w",
        "gradient_norm/w",
        "gradient_norm/global",
    }


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="emit must be one of"):
        running_gradient_mean(emit="average")
    for bad in (0.0, 1.0, 1.5, -0.1, float("nan"), np.array([0.5, 0.5])):
        with pytest.raises(ValueError, match=r"^running_gradient_mean: decay must be .*\(0, 1\)"):
            running_gradient_mean(decay=bad)
    for bad in ("0.9", True, [0.9]):
        with pytest.raises(TypeError, match=r"^running_gradient_mean: decay must be .* or None"):
            running_gradient_mean(decay=bad)
    with pytest.raises(ValueError, match="accumulator_dtype"):
        running_gradient_mean(accumulator_dtype=jnp.int32)
    strict = fan_in.FLAX_STRICT
    with pytest.raises(ValueError, match="'blocks/0/weird'"):
        gradient_norms(fan_in=strict).init({"blocks": [{"weird": jnp.zeros((2, 2))}]})


# ----------------------------------------------------------------------------- norms


def test_norms_match_numpy():
    params = _params()
    (g,) = _grad_history(1, params, seed=3, offset=0.5)
    tx = gradient_norms()
    state = tx.init(params)
    assert float(state.gradient_global_norm) == 0.0
    _out, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, g), state, params)
    for layer in ("conv1", "dense"):
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(
                float(state.gradient_norm[layer][name]), _np_norm(g[layer][name]), rtol=1e-6
            )
    total = np.sqrt(sum(_np_norm(x) ** 2 for x in jax.tree.leaves(g)))
    np.testing.assert_allclose(float(state.gradient_global_norm), total, rtol=1e-6)
    np.testing.assert_allclose(
        float(state.gradient_global_norm), float(optax.tree.norm(g)), rtol=1e-6
    )
    # Per-neuron: conv kernel (3, 3, 2, 4) has fan-in axes (0, 1, 2); one norm per output channel.
    conv = state.gradient_neuron_norm["conv1"]["kernel"]
    assert conv.shape == fan_in.neuron_shape((3, 3, 2, 4), (0, 1, 2)) == (1, 1, 1, 4)
    for j in range(4):
        np.testing.assert_allclose(
            float(conv[0, 0, 0, j]), _np_norm(g["conv1"]["kernel"][..., j]), rtol=1e-6
        )
    dense = state.gradient_neuron_norm["dense"]["kernel"]
    assert dense.shape == (1, 3)
    for j in range(3):
        np.testing.assert_allclose(
            float(dense[0, j]), _np_norm(g["dense"]["kernel"][:, j]), rtol=1e-6
        )
    bias = np.asarray(state.gradient_neuron_norm["dense"]["bias"])
    np.testing.assert_allclose(bias, np.abs(g["dense"]["bias"]), rtol=1e-6)


def test_neuron_norms_follow_fan_in_rules():
    # Out-first layout (PyTorch/Equinox): weight (out=3, in=5) -> fan-in axis 1.
    g = {
        "fc": {
            "weight": np.arange(15, dtype=np.float32).reshape(3, 5),
            "bias": np.ones(3, np.float32),
        }
    }
    tx = gradient_norms(fan_in=fan_in.TORCH)
    _, state = tx.update(g, tx.init(g))
    got = np.asarray(state.gradient_neuron_norm["fc"]["weight"])
    assert got.shape == (3, 1)
    np.testing.assert_allclose(got[:, 0], [_np_norm(row) for row in g["fc"]["weight"]], rtol=1e-6)
    # An explicit tree of axes works as well.
    n = neuron_norms(g, {"fc": {"weight": (0,), "bias": ()}})["fc"]["weight"]
    np.testing.assert_allclose(
        np.asarray(n)[0], [_np_norm(col) for col in g["fc"]["weight"].T], rtol=1e-6
    )
    np.testing.assert_allclose(float(leaf_norms(g)["fc"]["bias"]), np.sqrt(3), rtol=1e-6)


def test_norms_pass_updates_through_and_low_precision():
    params = {"w": jnp.zeros((3, 2), jnp.bfloat16)}
    updates = {"w": jnp.array([[100.0, -3.0], [7.5, 0.25], [1.0, 2.0]], jnp.bfloat16)}
    tx = gradient_norms(per_neuron=False)
    out, state = tx.update(updates, tx.init(params))
    assert out is updates
    assert state.gradient_neuron_norm is None
    assert state.gradient_norm["w"].dtype == jnp.float32
    expected = _np_norm(np.asarray(updates["w"], np.float32))
    np.testing.assert_allclose(float(state.gradient_norm["w"]), expected, rtol=1e-6)


# ----------------------------------------------------------------------------- composition


def test_jit_does_not_recompile():
    params = _params()
    history = _grad_history(4, params)
    tx = optax.MultiSteps(
        optax.chain(gradient_norms(), running_gradient_mean(decay=0.9), optax.adam(1e-3)), 2
    )
    traces = []

    @jax.jit
    def step(g, state):
        traces.append(1)
        return tx.update(g, state, params)

    state = tx.init(params)
    for g in history:
        _, state = step(jax.tree.map(jnp.asarray, g), state)
    assert len(traces) == 1


def test_inside_multisteps_sees_the_averaged_gradients():
    params = {"w": jnp.zeros(3)}
    history = _grad_history(6, params, seed=4)
    tx = optax.MultiSteps(optax.chain(running_gradient_mean(), gradient_norms(), optax.sgd(0.1)), 3)
    _, state = _run(tx, history, params)
    micro = np.stack([h["w"] for h in history]).astype(np.float64)
    big_steps = micro.reshape(2, 3, 3).mean(axis=1)  # MultiSteps averages 3 micro-steps
    assert int(optax.tree.get(state, "gradient_mean_count")) == 2
    np.testing.assert_allclose(
        np.asarray(optax.tree.get(state, "gradient_mean")["w"]), big_steps.mean(0), rtol=1e-6
    )
    m = collect_metrics(state)
    np.testing.assert_allclose(float(m["gradient_norm/w"]), _np_norm(big_steps[-1]), rtol=1e-6)
    np.testing.assert_allclose(
        float(m["gradient_mean_norm/w"]), _np_norm(big_steps.mean(0)), rtol=1e-6
    )


def test_inject_hyperparams_decay():
    params = {"w": jnp.zeros((2, 2))}
    history = _grad_history(10, params, seed=5)
    tx = optax.inject_hyperparams(running_gradient_mean, static_args=("emit",))(
        decay=0.8, emit="mean"
    )
    outs, state = _run(tx, history, params)
    ref = _np_ema([h["w"] for h in history], 0.8, True)
    np.testing.assert_allclose(np.asarray(outs[-1]["w"]), ref[-1], rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(optax.tree.get(state, "gradient_mean")["w"]), ref[-1], rtol=1e-6
    )
    assert set(collect_metrics(state)) == {"gradient_mean_norm/w"}


def test_metrics_nested_chains_masked_and_paths():
    params = _params()
    (g,) = _grad_history(1, params, seed=6)
    mask = {"conv1": {"kernel": True, "bias": False}, "dense": {"kernel": True, "bias": False}}
    tx = optax.chain(
        optax.chain(optax.masked(running_gradient_mean(), mask), optax.chain(gradient_norms())),
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
    )
    _, state = tx.update(jax.tree.map(jnp.asarray, g), tx.init(params), params)
    m = collect_metrics(state)
    paths = ["conv1/bias", "conv1/kernel", "dense/bias", "dense/kernel"]
    expected = {f"gradient_norm/{p}" for p in paths} | {"gradient_norm/global"}
    expected |= {
        "gradient_mean_norm/conv1/kernel",
        "gradient_mean_norm/dense/kernel",
    }  # masked: kernels only
    assert set(m) == expected
    for p in paths:
        a, b = p.split("/")
        np.testing.assert_allclose(float(m[f"gradient_norm/{p}"]), _np_norm(g[a][b]), rtol=1e-6)
    np.testing.assert_allclose(
        float(m["gradient_mean_norm/dense/kernel"]), _np_norm(g["dense"]["kernel"]), rtol=1e-6
    )
    with_arrays = collect_metrics(state, per_neuron=True)
    assert with_arrays["gradient_neuron_norm/conv1/kernel"].shape == (1, 1, 1, 4)
    assert set(with_arrays) - set(m) == {f"gradient_neuron_norm/{p}" for p in paths}
    assert all(jnp.ndim(v) == 0 for v in m.values())
    # collect_metrics() is traceable: it works inside jit too.
    jm = jax.jit(collect_metrics)(state)
    assert set(jm) == set(m)


def test_metrics_two_states_of_a_kind_get_location_prefixes():
    params = {"w": jnp.zeros(2)}
    tx = optax.chain(
        gradient_norms(), optax.clip_by_global_norm(1.0), gradient_norms(), optax.sgd(0.1)
    )
    _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
    m = collect_metrics(state)
    assert set(m) == {
        "0/gradient_norm/w",
        "0/gradient_norm/global",
        "2/gradient_norm/w",
        "2/gradient_norm/global",
    }
    np.testing.assert_allclose(float(m["0/gradient_norm/global"]), 5.0, rtol=1e-6)
    np.testing.assert_allclose(float(m["2/gradient_norm/global"]), 1.0, rtol=1e-6)


def test_metrics_single_array_and_optax_snapshot_monitor():
    tx = optax.chain(
        running_gradient_mean(),
        optax.snapshot("update_norm", optax.tree.norm),
        optax.monitor({"ema_norm": optax.measure_with_ema(optax.tree.norm, decay=0.5)}),
    )
    params = jnp.zeros(2)
    _, state = tx.update(jnp.array([6.0, 8.0]), tx.init(params), params)
    m = collect_metrics(state)
    assert set(m) == {"gradient_mean_norm", "update_norm", "ema_norm"}
    for k in m:
        np.testing.assert_allclose(float(m[k]), 10.0, rtol=1e-6)
    assert collect_metrics(optax.sgd(0.1).init(params)) == {}


def test_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
            self.dense = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.dense(self.conv1(x).mean((1, 2)))

    model = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(
        model, optax.chain(gradient_norms(), running_gradient_mean(), optax.sgd(0.0)), wrt=nnx.Param
    )
    x = jnp.linspace(-1, 1, 2 * 5 * 5).reshape(2, 5, 5, 1)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)

    @nnx.jit
    def step(model, opt, grads):
        opt.update(model, grads)

    step(model, opt, grads)
    step(model, opt, grads)
    m = collect_metrics(opt.opt_state, per_neuron=True)
    paths = ["conv1/bias", "conv1/kernel", "dense/bias", "dense/kernel"]
    assert set(m) == (
        {
            f"{kind}/{p}"
            for kind in ("gradient_norm", "gradient_mean_norm", "gradient_neuron_norm")
            for p in paths
        }
        | {"gradient_norm/global"}
    )
    ref = {
        "conv1/kernel": grads["conv1"]["kernel"][...],
        "dense/kernel": grads["dense"]["kernel"][...],
    }
    for p, g in ref.items():
        np.testing.assert_allclose(float(m[f"gradient_norm/{p}"]), _np_norm(g), rtol=1e-6)
        np.testing.assert_allclose(float(m[f"gradient_mean_norm/{p}"]), _np_norm(g), rtol=1e-6)
    assert m["gradient_neuron_norm/dense/kernel"].shape == (1, 3)
    assert isinstance(m["gradient_norm/global"], jax.Array)


# ----------------------------------------------------------------------------- TensorBoard


def test_write_metrics_events_read_back(tmp_path):
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    values = {
        "gradient_norm/global": jnp.float32(2.5),
        "gradient_neuron_norm/w": jnp.array([[1.0, 3.0]]),
    }
    with summary_writer(str(tmp_path)) as writer:
        write_metrics(writer, values, step=7, prefix="train/")
        write_metrics(writer, {"gradient_norm/global": 1.25}, step=8, prefix="train/")
    (path,) = glob.glob(os.path.join(str(tmp_path), "events.out.tfevents.*"))
    scalars, histos = {}, {}
    for record in _tf_records(path):
        event = event_pb2.Event.FromString(record)
        for v in event.summary.value:
            if v.HasField("histo"):
                histos[(v.tag, event.step)] = v.histo
            else:
                scalars[(v.tag, event.step)] = v.simple_value
    assert scalars == {
        ("train/gradient_norm/global", 7): 2.5,
        ("train/gradient_norm/global", 8): 1.25,
    }
    h = histos[("train/gradient_neuron_norm/w", 7)]
    assert (h.min, h.max, h.num, h.sum) == (1.0, 3.0, 2, 4.0)


def test_write_metrics_bad_input(tmp_path):
    with pytest.raises(TypeError, match="add_scalar"):
        write_metrics(str(tmp_path), {"a": 1.0}, step=0)

    class Recorder:
        def add_scalar(self, *a):
            pass

        def add_histogram(self, *a):
            pass

    with pytest.raises(TypeError, match="'name' is not numeric"):
        write_metrics(Recorder(), {"name": "text"}, step=0)


def test_traced_debias_flag_and_saturating_count():
    history = [
        np.array([1.0, -2.0], np.float32),
        np.array([3.0, 0.5], np.float32),
        np.array([-1.0, 4.0], np.float32),
    ]
    for flag in (False, True):
        tx = running_gradient_mean(decay=0.7, debias=jnp.array(flag), emit="mean")
        s = tx.init(jnp.zeros(2))
        for g in history:
            out, s = jax.jit(tx.update)(jnp.asarray(g), s)
        np.testing.assert_allclose(np.asarray(out), _np_ema(history, 0.7, flag)[-1], rtol=1e-6)
    # The int32 count saturates at 2**31 - 1; the cumulative mean then moves by
    # (g - m) / (2**31 - 1).
    tx = running_gradient_mean()
    top = np.iinfo(np.int32).max
    s = RunningGradientMeanState(jnp.asarray(top, jnp.int32), jnp.zeros(2))
    _, s = tx.update(jnp.array([float(top), -2.0 * top]), s)
    assert int(s.gradient_mean_count) == top
    np.testing.assert_allclose(np.asarray(s.gradient_mean), [1.0, -2.0], rtol=1e-6)


def test_metrics_partition_and_key_clash_error():
    params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
    tx = optax.partition(
        {"x": running_gradient_mean(), "y": optax.chain(gradient_norms(), optax.sgd(0.1))},
        {"a": "x", "b": "y"},
    )
    _, state = tx.update(
        {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0, 2.0, 2.0])}, tx.init(params), params
    )
    m = collect_metrics(state)
    assert set(m) == {"gradient_mean_norm/a", "gradient_norm/b", "gradient_norm/global"}
    np.testing.assert_allclose(
        [float(m["gradient_mean_norm/a"]), float(m["gradient_norm/global"])], [5.0, 3.0]
    )
    # A parameter literally called "global" would shadow the global norm: refused, not overwritten.
    tx = gradient_norms(per_neuron=False)
    p = {"global": jnp.zeros(2)}
    with pytest.raises(ValueError, match="share the key 'gradient_norm/global'"):
        collect_metrics(tx.init(p))


# ----------------------------------------------------------------- plain pytrees, integer leaves


def test_gradient_norms_on_plain_pytrees():
    # Plain pytrees ({"W1": ..., "b1": ...}, a list) are measured too. Reference: NumPy norms,
    # per neuron over axis 0 of W (x @ W convention).
    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    for params in ({"W1": jnp.asarray(w), "b1": jnp.asarray(b)}, [jnp.asarray(w), jnp.asarray(b)]):
        tx = gradient_norms()
        _, state = tx.update(params, tx.init(params), params)
        neurons = jax.tree.leaves(state.gradient_neuron_norm)
        np.testing.assert_allclose(neurons[0], np.sqrt((w**2).sum(0, keepdims=True)), rtol=1e-6)
        np.testing.assert_allclose(neurons[1], np.abs(b), rtol=1e-6)
        total = np.sqrt((w**2).sum() + (b**2).sum())
        np.testing.assert_allclose(state.gradient_global_norm, total, rtol=1e-6)


def test_integer_leaves_are_measured_in_float32():
    # The README's promise: grad_stats measures integer leaves in float32.
    ints = np.array([[1, 2], [3, 4], [5, 6]], np.int32)
    params = {"dense": {"kernel": jnp.ones((3, 2))}, "step": jnp.zeros((), jnp.int32)}
    grads = {"dense": {"kernel": jnp.asarray(ints)}, "step": jnp.asarray(7, jnp.int32)}
    tx = gradient_norms()
    state = tx.init(params)  # integer *params* are fine too
    assert state.gradient_norm["step"].dtype == jnp.float32
    out, state = tx.update(grads, state, params)
    assert out is grads  # passed through untouched, integer dtype kept
    np.testing.assert_allclose(state.gradient_norm["dense"]["kernel"], np.sqrt((ints**2).sum()))
    np.testing.assert_allclose(
        state.gradient_neuron_norm["dense"]["kernel"],
        np.sqrt((ints.astype(np.float64) ** 2).sum(0, keepdims=True)),
        rtol=1e-6,
    )
    np.testing.assert_allclose(state.gradient_norm["step"], 7.0)

    mean_tx = running_gradient_mean()
    mstate = mean_tx.init(grads)
    assert mstate.gradient_mean["dense"]["kernel"].dtype == jnp.float32
    for scaled in (grads, jax.tree.map(lambda g: 2 * g, grads)):
        out, mstate = mean_tx.update(scaled, mstate)
    np.testing.assert_allclose(mstate.gradient_mean["dense"]["kernel"], ints * 1.5)  # (1 + 2) / 2
    assert out["dense"]["kernel"].dtype == jnp.int32


def test_integer_leaf_errors_name_the_right_tree():
    ints = {"dense": {"kernel": jnp.ones((3, 2), jnp.int32)}}
    floats = {"dense": {"kernel": jnp.ones((3, 2))}}
    # emit="mean" would round the mean back to integers: refused, naming the update.
    tx = running_gradient_mean(emit="mean")
    with pytest.raises(TypeError, match=r"emit='mean'.*update 'dense/kernel' has dtype int32"):
        tx.update(ints, tx.init(floats))
    # float0 (the gradient of an integer input) is not a number: the *parameters* are
    # blamed at init, the *updates* at update.
    zero = {"dense": {"kernel": np.zeros((3, 2), jax.dtypes.float0)}}
    for name, tx in (
        ("gradient_norms", gradient_norms()),
        ("running_gradient_mean", running_gradient_mean()),
    ):
        with pytest.raises(
            TypeError, match=rf"^{name} needs numeric parameters; parameter 'dense/kernel'"
        ):
            tx.init(zero)
        with pytest.raises(
            TypeError, match=rf"^{name} needs numeric updates; update 'dense/kernel'"
        ):
            tx.update(zero, tx.init(floats), floats)
