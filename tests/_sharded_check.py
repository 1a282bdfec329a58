"""Sharded vs unsharded runs of every registered transformation (run by test_sharding.py).

Runs in its own process with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
(set by the caller before JAX starts) and prints one JSON object on the last
line of stdout; ``tests/test_sharding.py`` makes the assertions.

For every case of ``tests/test_conformance.CASES``:

* ``unsharded``: params, grads and state on one device, three jitted steps;
* ``sharded``: kernels sharded over the out axis of a 4-device mesh
  (``P(None, "x")``), biases over their only axis (``P("x")``), the same steps
  under the same jitted function (sharding comes from the inputs; no
  ``out_shardings`` are given, so what we report is what JAX propagates).

Reported per case: the largest absolute difference of updates and state
between the two runs, whether they are bit-identical, the sharding spec of
every state leaf after the first and after the last step, and the number of
traces of the sharded step.

RSO data-parallel: params replicated, a batch of 64 examples sharded over its
first axis on the mesh; the search must accept the same weights as the
single-device run.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_conformance import CASES, quadratic_loss, random_tree  # noqa: E402

SHAPES = {"dense": {"kernel": (6, 8), "bias": (8,)}, "out": {"kernel": (8, 4)}}
STEPS = 3
AXIS_TYPE = jax.sharding.AxisType.Explicit if os.environ.get("SHARDED_CHECK_EXPLICIT") else jax.sharding.AxisType.Auto


def spec_of(x) -> str:
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding):
        return "replicated" if s.is_fully_replicated else str(tuple(s.spec))
    if s is not None and s.is_fully_replicated:
        return "replicated"
    return str(s)


def paths(tree) -> dict:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): leaf for p, leaf in leaves}


def max_diff(a, b) -> tuple[float, bool]:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    diff, exact = 0.0, True
    for x, y in zip(la, lb):
        x, y = np.asarray(x).astype(np.float64), np.asarray(y).astype(np.float64)
        if x.size:
            d = np.abs(x - y)
            diff = max(diff, float(np.nanmax(d)) if not np.all(np.isnan(d)) else 0.0)
        exact &= bool(np.array_equal(x, y, equal_nan=True))
    return diff, exact


def run(case, params, grads_seq, loss):
    tx = case.make()
    traces = []

    @jax.jit
    def step(p, s, g):
        traces.append(1)
        extra = {"value_fn": loss} if case.kind == "rso" else {}
        u, s = tx.update(g, s, p, **extra)
        return optax.apply_updates(p, u), s, u

    state = jax.jit(tx.init)(params)
    ups, specs = [], []
    for g in grads_seq:
        params, state, u = step(params, state, g)
        ups.append(u)
        specs.append({k: spec_of(v) for k, v in paths(state).items()})
    return ups, state, specs, len(traces)


def main() -> None:
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("x",), axis_types=(AXIS_TYPE,))
    kernel, vector = NamedSharding(mesh, P(None, "x")), NamedSharding(mesh, P("x"))
    shard = lambda t: jax.tree.map(  # noqa: E731
        lambda x: jax.device_put(x, kernel if x.ndim == 2 else vector), t)

    params = random_tree(0, shapes=SHAPES)
    grads_seq = [random_tree(10 + t, shapes=SHAPES) for t in range(STEPS)]
    loss = quadratic_loss(random_tree(2, shapes=SHAPES))
    out = {"cases": {}}
    for case in CASES:
        u0, s0, _, _ = run(case, params, grads_seq, loss)
        u1, s1, specs, n_traces = run(case, shard(params), [shard(g) for g in grads_seq], loss)
        du, eu = max_diff(u0, u1)
        ds, es = max_diff(s0, s1)
        out["cases"][case.name] = {
            "update_diff": du, "update_exact": eu, "state_diff": ds, "state_exact": es,
            "update_specs": {k: spec_of(v) for k, v in paths(u1[-1]).items()},
            "state_specs_first": specs[0], "state_specs_last": specs[-1],
            "state_shapes": {k: list(np.shape(v)) for k, v in paths(s1).items()},
            "traces": n_traces,
        }

    # RSO, data parallel: replicated params, batch sharded over the mesh.
    rso_case = next(c for c in CASES if c.kind == "rso")
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(64, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)

    def model_loss(p, xb, yb):
        h = jnp.tanh(xb @ p["dense"]["kernel"] + p["dense"]["bias"])
        return jnp.mean((h @ p["out"]["kernel"] - yb) ** 2)

    tx = rso_case.make(weights_per_step=40)

    @jax.jit
    def rso_step(p, s, xb, yb):
        u, s = tx.update(p, s, p, value_fn=lambda q: model_loss(q, xb, yb))
        return optax.apply_updates(p, u), s, u

    def rso_run(p, xb, yb):
        s = tx.init(p)
        ups = []
        for _ in range(3):
            p, s, u = rso_step(p, s, xb, yb)
            ups.append(u)
        return ups, s

    p_single = params
    ups0, st0 = rso_run(p_single, x, y)
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("x"))
    p_rep = jax.device_put(params, replicated)
    xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
    ups1, st1 = rso_run(p_rep, xs, ys)
    du, eu = max_diff(ups0, ups1)
    out["rso_data_parallel"] = {
        "update_diff": du, "update_exact": eu,
        "accepted_single": {k: int(v) for k, v in st0.rso_accepted.items()},
        "accepted_sharded": {k: int(v) for k, v in st1.rso_accepted.items()},
        "loss_single": float(st0.rso_loss), "loss_sharded": float(st1.rso_loss),
        "loss_start": float(model_loss(params, x, y)),
        "batch_spec": spec_of(xs), "update_specs": {k: spec_of(v) for k, v in paths(ups1[-1]).items()},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
