"""Scale-out on one host: every piece on Auto and Explicit 4-device meshes.

The sweep, ``tests/_sharded_check.py``: one case of the conformance registry
(``tests/test_conformance.CASES``) per kind of optimizer state and code path (its
``SWEPT``) trains a small two-layer model for three jitted steps on a mesh
``jax.make_mesh((4,), ("x",))`` with two layouts: data-parallel (params replicated, batch
sharded) and model-sharded (kernels ``P(None, "x")`` over their out axis, the bias
``P("x")``, batch replicated). The reference is the same run on one device. Each axis type
is swept once: ``Auto`` here, in ONE subprocess with four simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``; this process already has its
single CPU device); ``Explicit`` (what ``jax.make_mesh`` makes by default in the installed
JAX, 0.10) in ``tests/test_multiprocess.py``, on the same mesh spread over two processes,
with the assertions below.

What we assert, and why:

* values: updates, state and parameters equal the one-device run to ``REL_TOL`` of the
  largest reference value. The sharded gradient is a sum over devices (data-parallel) or a
  matmul split by columns (model-sharded) whose addition order XLA chooses; so is the
  neuron mean over a fan-in axis and RSO's sigma (a std). We measured at most 9.9e-7
  relative over all runs, float32 (``REL_TOL`` = 1e-5 leaves a margin of 10), except for
  the Adam *directions* (``scale_by_neuron_adam``, no learning rate): their elements are
  about +-1 and the test applies them as they are, so every parameter moves by about 1 per
  step and the summation-order noise of the first step reaches the later gradients
  amplified. Those runs differ by up to 1.1e-5 (updates), 4.1e-6 (parameters) on an Intel
  Xeon with AVX-512 (under 1e-5 on the AMD EPYC with AVX2 where ``REL_TOL`` was set); they
  get ``ADAM_DIRECTION_TOL`` = 1e-4. The Adam *optimizers* (with a learning rate) stay
  under 4e-7 and under ``REL_TOL``. A sharding bug moves values by far more than either
  tolerance.
  Integer state (counters, RSO's acceptance counts) is bit-identical; RSO's updates and
  parameters are bit-identical (the same weights accepted).
* shardings, as ``jit`` propagates them (no ``out_shardings``): updates are laid out like
  the params; a state leaf of rank 2 (a neuron-mean state ``(1, out)``, a running mean,
  per-neuron norms) is sharded ``(None, 'x')`` like its kernel when the kernels are, so
  each device keeps the state of its own neurons; rank 1 ``('x',)`` like the bias; scalars
  (counters, per-leaf and global norms, RSO's sigmas, cursor and loss) are replicated; with
  data parallelism everything is replicated. The specs after the first and the last step
  are the same, and the step is traced at most twice: ``init`` makes its zeros without the
  parameters' sharding, so the first step sees other input types; from then on the state
  keeps its sharding and nothing retraces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _sharded_check import CASES

HERE = os.path.dirname(os.path.abspath(__file__))
CHECK = os.path.join(HERE, "_sharded_check.py")
AXES = ("auto", "explicit")
LAYOUTS = ("data", "model")
REL_TOL = 1e-5
ADAM_DIRECTION_TOL = 1e-4
KEYS = [f"{a}/{layout}/{c.name}" for a in AXES for layout in LAYOUTS for c in CASES]
ONE_PROCESS_AXES = ("auto",)
"""Swept here; the others in test_multiprocess (every axis type once)."""
KINDS = {c.name: c.kind for c in CASES}
TOL = {
    c.name: ADAM_DIRECTION_TOL
    if c.kind == "direction" and "neuron_adam_nu" in c.param_fields
    else REL_TOL
    for c in CASES
}


def check_env(**extra) -> dict:
    """This environment on the CPU, without multi-process variables from outside, + ``extra``."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for name in ("SHARDED_CHECK_COORDINATOR", "SHARDED_CHECK_NUM_PROCESSES", "XLA_FLAGS"):
        env.pop(name, None)
    return {**env, **extra}


def assert_equal_to_one_device(r: dict, key: str) -> None:
    assert "error" not in r, r["error"]
    case = key.rsplit("/", 1)[1]
    tol = TOL[case]
    assert r["u_rel"] <= tol and r["s_rel"] <= tol and r["p_rel"] <= tol, r
    assert r["s_int_exact"], r
    if KINDS[case] == "rso":
        assert r["u_exact"] and r["p_exact"], r


def assert_sharded_like_params(r: dict, key: str) -> None:
    assert "error" not in r, r["error"]
    layout = key.split("/")[1]
    if layout == "data":
        want = {0: "replicated", 1: "replicated", 2: "replicated"}
    else:
        want = {0: "replicated", 1: "('x',)", 2: "(None, 'x')"}
    assert r["update_specs"] == {
        "['dense']['bias']": want[1],
        "['dense']['kernel']": want[2],
        "['out']['kernel']": want[2],
    }
    for path, spec in r["state_specs_last"].items():
        assert spec == want[len(r["state_shapes"][path])], (path, spec, r["state_shapes"][path])
    assert r["state_specs_first"] == r["state_specs_last"]
    assert r["traces"] <= 2


@pytest.fixture(scope="module")
def report():
    env = check_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run(
        [sys.executable, CHECK, "--axes", ",".join(ONE_PROCESS_AXES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["process_count"] == 1
    return out["runs"]


def keys_of(axes) -> list[str]:
    """The runs of the sweep over the axis types ``axes``."""
    return [k for k in KEYS if k.split("/")[0] in axes]


def failures(runs: dict, check) -> list[str]:
    """Every run that fails ``check``, with its message (all runs are checked, none skipped)."""
    out = []
    for key in sorted(runs):
        try:
            check(runs[key], key)
        except (AssertionError, KeyError) as e:
            out.append(f"{key}: {type(e).__name__}: {str(e)[:600]}")
    return out


# One test per subprocess run, not one per case: under pytest-xdist, tests of one module
# spread over the workers, and every worker would start the (minute-long) run again.
def test_every_piece_on_auto_meshes_in_one_process(report):
    assert sorted(report) == sorted(keys_of(ONE_PROCESS_AXES))
    bad = failures(report, assert_equal_to_one_device)
    bad += failures(report, assert_sharded_like_params)
    assert not bad, "\n".join(bad)
