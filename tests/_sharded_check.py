"""The registered transformations on a 4-device mesh (for test_sharding, test_multiprocess).

Runs in its own process(es), with the devices made by the caller before JAX starts:

* one process with four CPU devices (``--xla_force_host_platform_device_count=4``), or
* two processes with two CPU devices each, joined by ``jax.distributed.initialize``
  (``SHARDED_CHECK_COORDINATOR=127.0.0.1:<port>``, ``SHARDED_CHECK_NUM_PROCESSES=2``,
  ``SHARDED_CHECK_PROCESS_ID=<i>``).

Either way the mesh is ``jax.make_mesh((4,), ("x",))`` over all four devices. For every
axis type (``Auto``, ``Explicit``; ``--axes`` picks some), every layout and every case of
``SWEPT`` (one per kind of state and code path of ``tests/test_conformance.CASES``) it
trains a small model (``tanh(x @ k1 + b1) @ k2``, a
squared error on a batch of 16) for three jitted steps; gradient pieces get
``jax.grad`` of the loss, RSO the loss itself as ``value_fn``. Layouts:

* ``data``: parameters replicated (``P()``), the batch sharded over its first axis;
* ``model``: kernels sharded over their out axis (``P(None, "x")``), the bias over its
  only axis (``P("x")``), the batch replicated.

The reference is the same run on one device (no mesh) in the same process. Reported per
(axis type, layout, case), as one JSON object on the last line of stdout of process 0:
the largest absolute difference of updates, state and final parameters from the
reference divided by the largest absolute value of the reference (and whether they are
bit-identical; integer state such as counters and RSO's acceptance counts separately), the
sharding spec of every state leaf after the first and the last step, the specs of the last
updates, how many times the step was traced and its CPU seconds. A run that raises is
reported with its error message instead. Values of multi-process arrays are gathered to
every host with ``multihost_utils.process_allgather``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

if os.environ.get("SHARDED_CHECK_NUM_PROCESSES"):
    jax.distributed.initialize(
        coordinator_address=os.environ["SHARDED_CHECK_COORDINATOR"],
        num_processes=int(os.environ["SHARDED_CHECK_NUM_PROCESSES"]),
        process_id=int(os.environ["SHARDED_CHECK_PROCESS_ID"]),
        initialization_timeout=60,
    )

import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_conformance import CASES as ALL_CASES

# The cases swept on meshes: one per kind of optimizer state and code path. The others of
# the conformance registry differ from one of these only in arithmetic that sharding does
# not touch: neuron_mean_trace and neuron_mean_sgd are neuron_mean_trace_nesterov without
# the look-ahead (and with a learning rate); scale_by_neuron_adam_neuron_mu and neuron_adam
# share the state and the code of neuron_adamw and scale_by_neuron_adam; the other two
# running means are running_mean_cumulative and running_mean_ema_emit_mean emitting the
# other tree.
SWEPT = (
    "neuron_mean_trace_nesterov",
    "scale_by_neuron_adam",
    "neuron_adamw",
    "running_mean_cumulative",
    "running_mean_ema_emit_mean",
    "gradient_norms",
    "rso",
)
CASES = [c for c in ALL_CASES if c.name in SWEPT]
assert len(CASES) == len(SWEPT)

SHAPES = {"dense": {"kernel": (6, 8), "bias": (8,)}, "out": {"kernel": (8, 4)}}
BATCH = 16
STEPS = 3
AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
LAYOUTS = ("data", "model")


def model_loss(p, x, y):
    h = jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"])
    return jnp.mean((h @ p["out"]["kernel"] - y) ** 2)


def problem():
    """Parameters and a batch as NumPy arrays (the same in every process)."""
    rng = np.random.default_rng(0)
    params = {
        "dense": {"kernel": rng.normal(size=(6, 8)), "bias": 0.1 * rng.normal(size=8)},
        "out": {"kernel": rng.normal(size=(8, 4)) / np.sqrt(8)},
    }
    params = jax.tree.map(lambda a: a.astype(np.float32), params)
    x = rng.normal(size=(BATCH, 6)).astype(np.float32)
    y = rng.normal(size=(BATCH, 4)).astype(np.float32)
    return params, x, y


def to_host(x) -> np.ndarray:
    """The whole value of a (possibly multi-process) array, on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def spec_of(x) -> str:
    s = x.sharding
    if s.is_fully_replicated:
        return "replicated"
    return str(tuple(s.spec)) if isinstance(s, NamedSharding) else str(s)


def paths(tree) -> dict:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): leaf for p, leaf in leaves}


def max_diff(ref: dict, b: dict) -> tuple[float, bool]:
    """Largest ``|ref - b|`` over all leaves relative to the largest ``|ref|``; bit-equality."""
    assert ref.keys() == b.keys(), (ref.keys(), b.keys())
    diff, scale, exact = 0.0, 0.0, True
    for k in ref:
        x, y = ref[k].astype(np.float64), b[k].astype(np.float64)
        if x.size:
            diff = max(diff, float(np.max(np.abs(x - y))))
            scale = max(scale, float(np.max(np.abs(x))))
        exact &= bool(np.array_equal(x, y))
    return diff / scale if scale else diff, exact


def run(case, params, x, y) -> dict:
    """``STEPS`` jitted training steps: host copies of the last updates, state and params,
    the specs of the state after every step and of the last updates, the trace count."""
    tx = case.make()
    traces = []

    @jax.jit
    def step(p, s, xb, yb):
        traces.append(1)
        if case.kind == "rso":
            u, s = tx.update(p, s, p, value_fn=lambda q: model_loss(q, xb, yb))
        else:
            u, s = tx.update(jax.grad(model_loss)(p, xb, yb), s, p)
        return optax.apply_updates(p, u), s, u

    state = jax.jit(tx.init)(params)
    specs = []
    for _ in range(STEPS):
        params, state, u = step(params, state, x, y)
        specs.append({k: spec_of(v) for k, v in paths(state).items()})
    return {
        "u": {k: to_host(v) for k, v in paths(u).items()},
        "s": {k: to_host(v) for k, v in paths(state).items()},
        "p": {k: to_host(v) for k, v in paths(params).items()},
        "state_specs": specs,
        "update_specs": {k: spec_of(v) for k, v in paths(u).items()},
        "traces": len(traces),
    }


def compare(ref: dict, got: dict) -> dict:
    """What the tests assert on: differences from the reference run, specs, traces."""
    r = {
        "traces": got["traces"],
        "update_specs": got["update_specs"],
        "state_specs_first": got["state_specs"][0],
        "state_specs_last": got["state_specs"][-1],
        "state_shapes": {k: list(v.shape) for k, v in got["s"].items()},
    }
    for part in ("u", "s", "p"):
        r[f"{part}_rel"], r[f"{part}_exact"] = max_diff(ref[part], got[part])
    ints = [k for k, v in ref["s"].items() if v.dtype.kind in "iub"]
    r["s_int_exact"] = all(np.array_equal(ref["s"][k], got["s"][k]) for k in ints)
    return r


def place(mesh, layout, params, x, y):
    """Global arrays on ``mesh``; each process supplies the blocks of its own devices."""

    def put(a, spec):
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    if layout == "data":
        p = jax.tree.map(lambda a: put(a, P()), params)
        return p, put(x, P("x")), put(y, P("x"))
    p = jax.tree.map(lambda a: put(a, P(None, "x") if a.ndim == 2 else P("x")), params)
    return p, put(x, P()), put(y, P())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument(
        "--axes", default=",".join(AXIS_TYPES), help="comma-separated axis types (default: all)"
    )
    args = parser.parse_args()
    axes = args.axes.split(",")
    unknown = sorted(set(axes) - set(AXIS_TYPES))
    assert not unknown, f"--axes: unknown axis types {unknown}; choose from {list(AXIS_TYPES)}"
    assert jax.device_count() == 4, jax.devices()
    cases = [c for c in CASES if args.cases is None or c.name in args.cases.split(",")]
    params, x, y = problem()
    one = jax.local_devices()[0]
    # The one-device reference needs no peer: only process 0, which reports, computes it.
    first = jax.process_index() == 0
    ref = {c.name: run(c, *jax.device_put((params, x, y), one)) for c in cases if first}

    out = {"process_count": jax.process_count(), "runs": {}}
    for axis_name, axis_type in AXIS_TYPES.items():
        if axis_name not in axes:
            continue
        mesh = jax.make_mesh((4,), ("x",), axis_types=(axis_type,))
        for layout in LAYOUTS:
            for case in cases:
                t0 = time.process_time()
                try:
                    got = run(case, *place(mesh, layout, params, x, y))  # every process
                    r = compare(ref[case.name], got) if first else {}
                except Exception as e:  # reported; the test fails on it, with the message
                    r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
                r["cpu_s"] = time.process_time() - t0
                out["runs"][f"{axis_name}/{layout}/{case.name}"] = r
    if jax.process_index() == 0:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
