"""Every public transformation and the application's steps lower for GPU and TPU from this CPU.

Each case is a jitted step exported with ``jax.export`` for the platforms
``("cpu", "cuda", "tpu")`` in one module (JAX lowers the computation once per platform,
with that platform's lowering rules, and joins them behind a platform switch). A case
passes when the export names all three platforms; for one case that compiles quickly
the exported module also runs on this CPU and gives what the jitted step gives (up to
the last bit: the two are compiled apart). Nothing here compiles for a GPU or a TPU: a
lowering rule missing for ``cuda`` or ``tpu`` fails here, a compile error on the device
(a kernel that does not fit, float64 on a TPU) can only show there
(``benchmarks/device_suite.py``).

The inputs are small (a few rows, few channels; the application's models are traced as
shapes only) so that the file runs in seconds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _rso_nets import ce, paper_search_as_shapes, small_cnn_layers
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_neuron as on

PLATFORMS = ("cpu", "cuda", "tpu")


def _export(fn, *args, **kwargs):
    """``fn`` (jitted) exported for :data:`PLATFORMS`."""
    exported = jax.export.export(jax.jit(fn, **kwargs), platforms=PLATFORMS)(*args)
    assert exported.platforms == PLATFORMS
    assert len(exported.in_avals) == len(jax.tree.leaves(args))
    return exported


def _same_on_cpu(exported, fn, *args):
    """The exported module, run on this CPU, gives the jitted step's result."""
    got = exported.call(*args)
    want = jax.jit(fn)(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def _mlp():
    rng = np.random.default_rng(0)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
                  "bias": jnp.zeros(5)},
        "out": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
                "bias": jnp.zeros(3)},
    }  # fmt: skip


def _torch_tree():
    rng = np.random.default_rng(1)
    return {
        "features.0.weight": jnp.asarray(rng.normal(size=(4, 2, 3, 3)), jnp.float32),
        "features.0.bias": jnp.zeros(4),
        "fc.weight": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
    }


def _attention_tree():
    rng = np.random.default_rng(2)
    shapes = {"query": (6, 2, 4), "key": (6, 2, 4), "value": (6, 2, 4), "out": (2, 4, 6)}
    return {
        name: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32)} for name, s in shapes.items()
    }


GRADIENT_CASES = {
    "neuron_mean_sgd": (lambda: on.neuron_mean_sgd(0.1, momentum=0.9), _mlp),
    "neuron_mean_sgd nesterov": (
        lambda: on.neuron_mean_sgd(0.1, momentum=0.9, nesterov=True), _mlp),
    "neuron_mean_sgd schedule": (
        lambda: on.neuron_mean_sgd(optax.cosine_decay_schedule(0.1, 10)), _mlp),
    "neuron_mean_trace TORCH": (
        lambda: on.neuron_mean_trace(0.9, fan_in=on.fan_in.TORCH), _torch_tree),
    "neuron_mean_trace attention": (lambda: on.neuron_mean_trace(0.9), _attention_tree),
    "neuron_mean_trace FLAX_STRICT bf16 state": (
        lambda: on.neuron_mean_trace(0.9, fan_in=on.fan_in.FLAX_STRICT,
                                     accumulator_dtype=jnp.bfloat16), _mlp),
    "neuron_mean_trace axes tree": (
        lambda: on.neuron_mean_trace(0.9, fan_in=lambda t: jax.tree.map(lambda x: (), t)),
        _mlp),
    "neuron_adam full": (lambda: on.neuron_adam(1e-3), _mlp),
    "neuron_adam neuron": (lambda: on.neuron_adam(1e-3, first_moment="neuron"), _mlp),
    "neuron_adam TORCH": (
        lambda: on.neuron_adam(1e-3, fan_in=on.fan_in.TORCH), _torch_tree),
    "neuron_adamw neuron": (
        lambda: on.neuron_adamw(1e-3, first_moment="neuron", weight_decay=1e-2), _mlp),
    "scale_by_neuron_adam attention": (lambda: on.scale_by_neuron_adam(), _attention_tree),
    "running_gradient_mean": (lambda: on.running_gradient_mean(), _mlp),
    "running_gradient_mean ema mean": (
        lambda: on.running_gradient_mean(decay=0.9, emit="mean"), _mlp),
    "running_gradient_mean ema no debias": (
        lambda: on.running_gradient_mean(decay=0.9, debias=False), _mlp),
    "gradient_norms": (lambda: on.gradient_norms(), _mlp),
    "gradient_norms TORCH": (lambda: on.gradient_norms(fan_in=on.fan_in.TORCH), _torch_tree),
    "gradient_norms no per-neuron": (lambda: on.gradient_norms(per_neuron=False), _mlp),
    "monitored chain": (
        lambda: optax.chain(on.gradient_norms(), on.running_gradient_mean(decay=0.99),
                            on.neuron_mean_sgd(0.1)), _mlp),
}  # fmt: skip


RUN_ON_CPU = ("neuron_mean_sgd nesterov",)
"""The case also run on this CPU from the exported module (a compile costs ~0.5 s)."""


def _gradient_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, on.collect_metrics(state)

    return step


@pytest.mark.parametrize("name", sorted(GRADIENT_CASES))
def test_gradient_transformation_exports(name):
    make_tx, make_params = GRADIENT_CASES[name]
    tx, params = make_tx(), make_params()
    grads = jax.tree.map(lambda x: jnp.cos(x) + 0.5, params)
    state = tx.init(params)
    step = _gradient_step(tx)
    exported = _export(step, params, state, grads)
    if name in RUN_ON_CPU:
        _same_on_cpu(exported, step, params, state, grads)


def _explicit_mesh():
    """An abstract 4-device mesh with Explicit axes: no devices needed to export for it."""
    return jax.sharding.AbstractMesh((4,), ("x",), axis_types=(AxisType.Explicit,))


def _sharded_spec(mesh, x):
    spec = P(*([None] * (x.ndim - 1)), "x") if x.ndim and x.shape[-1] % 4 == 0 else P()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))


def _sharded_params():
    rng = np.random.default_rng(3)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)},
        "out": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)},
    }


def _assert_sharded(exported, args_count, params_count):
    """The module runs on the mesh's 4 devices, its kernels split over ``x`` in and out."""
    assert exported.nr_devices == 4
    text = exported.mlir_module()
    assert text.count('sdy.sharding = #sdy.sharding<@mesh, [{}, {"x"}]>') >= args_count
    new_params = exported.out_avals[:params_count]  # the new params come first
    assert all("@x]" in str(a) for a in new_params), new_params


@pytest.mark.parametrize("name", ["neuron_mean_sgd", "neuron_adam neuron"])
def test_gradient_step_exports_on_an_explicit_mesh(name):
    tx = {"neuron_mean_sgd": on.neuron_mean_sgd(0.1),
          "neuron_adam neuron": on.neuron_adam(1e-3, first_moment="neuron")}[name]  # fmt: skip
    mesh = _explicit_mesh()
    params = jax.tree.map(functools.partial(_sharded_spec, mesh), _sharded_params())
    with jax.sharding.use_abstract_mesh(mesh):
        state = jax.eval_shape(tx.init, params)
        exported = _export(_gradient_step(tx), params, state, params)
    _assert_sharded(exported, args_count=2 * 2, params_count=2)  # params and grads


# RSO: the small conv net of the RSO tests (BatchNorm with batch statistics), one copy.


@functools.cache
def _rso_net():
    rng = np.random.default_rng(4)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    params = {  # drawn in NumPy: rso_init's eager draws would compile for seconds
        "conv0": {"kernel": normal(3, 3, 1, 3)},
        "bn0": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
        "conv1": {"kernel": normal(3, 3, 3, 3)},
        "bn1": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
        "head": {"kernel": normal(3, 4)},
    }
    x = jnp.asarray(rng.normal(size=(16, 6, 6, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, 16), jnp.int32)
    return small_cnn_layers(), ce, params, x, y


RECIPE = {"sigma": [("*scale", 0.167), ("*bias", 0.167), ("*", "he")], "within": "neuron",
          "weight_decay": 1e-4, "anneal": optax.linear_schedule(1.0, 0.1, 5)}  # fmt: skip


@pytest.mark.parametrize("fast_path", ["incremental", "cache"])
@pytest.mark.parametrize("per_weight_batch", [False, True])
def test_rso_layer_stack_exports(fast_path, per_weight_batch):
    layers, _ce, params, x, y = _rso_net()
    tx = on.rso(weights_per_step=20, fast_path=fast_path, per_weight_batch=per_weight_batch,
                **RECIPE)  # fmt: skip
    batch = 8 if per_weight_batch else None

    def step(params, state, x, y):
        stack = on.LayerStack(layers, _ce, x, y, batch=batch)
        updates, state = tx.update(params, state, params, value_fn=stack)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    _export(step, params, state, x, y)  # (compiling it for this CPU takes ~20 s: not here)


def test_rso_black_box_fresh_batch_per_weight_exports():
    layers, _ce, params, x, y = _rso_net()
    tx = on.rso(weights_per_step=20, per_weight_batch=True, **RECIPE)

    def step(params, state):
        def value_fn(p, key):
            rows = jax.random.randint(key, (8,), 0, x.shape[0])
            return on.LayerStack(layers, _ce, x[rows], y[rows])(p)

        updates, state = tx.update(params, state, params, value_fn=value_fn)
        return optax.apply_updates(params, updates), state

    _export(step, params, tx.init(params))


def test_rso_exports_on_an_explicit_mesh():
    mesh = _explicit_mesh()
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    tx = on.rso(weights_per_step=12, sigma="he", within="neuron", weight_decay=1e-3)

    def step(params, state):
        loss = lambda p: jnp.mean(
            (jnp.tanh(x @ p["dense"]["kernel"]) @ p["out"]["kernel"] - y) ** 2
        )
        updates, state = tx.update(params, state, params, value_fn=loss)
        return optax.apply_updates(params, updates), state

    params = _sharded_params()
    state = tx.init(params)
    specs = jax.tree.map(functools.partial(_sharded_spec, mesh), params)
    with jax.sharding.use_abstract_mesh(mesh):
        exported = _export(step, specs, state)
    _assert_sharded(exported, args_count=2, params_count=2)


# The application: the gradient train step (one epoch: a scan of steps) of every model,
# and RSO's search step on rso-paper.

mnist = pytest.importorskip("flax")


@pytest.mark.parametrize("model", ["mlp", "cnn", "rso-paper", "vit"])
def test_application_train_epoch_exports(model):
    from flax import nnx

    from optax_neuron.mnist.train import TrainConfig, build_model, make_optimizer, make_train_epoch

    tx = make_optimizer("neuron-adam-neuron" if model == "vit" else "neuron-mean-sgd",
                        schedule="cosine", total_steps=4, grad_stats=model == "cnn")  # fmt: skip

    def make():  # the model at its full size, as shapes only (nothing is initialised)
        net = build_model(TrainConfig(model=model))
        net.train()
        return net, nnx.Optimizer(net, tx, wrt=nnx.Param)

    graphdef, state = nnx.split(nnx.eval_shape(make))
    epoch = make_train_epoch(graphdef, batch_size=4)
    images = jax.ShapeDtypeStruct((8, 28, 28, 1), jnp.float32)
    labels = jax.ShapeDtypeStruct((8,), jnp.int32)
    _export(epoch, state, images, labels, jax.random.PRNGKey(0))


@pytest.mark.parametrize(("fresh_batch", "loss"), [("chunk", "mean"), ("weight", "sum64")])
def test_application_rso_step_exports(fresh_batch, loss, monkeypatch):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.random((32, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 32), jnp.int32)
    search = paper_search_as_shapes(monkeypatch, x, y, batch=8, cycles=5, chunk=40,
                                    fresh_batch=fresh_batch, loss=loss)  # fmt: skip
    args = (search.params, search.state, x, y, jnp.arange(32), 0)
    if loss == "sum64":  # float64 in the module: lowers for the TPU too, untried there
        with jax.enable_x64(True):
            _export(search._step.jitted, *args)
    else:
        _export(search._step, *args)
