"""Scale-out on JAX's own engine: sharded parameters and data-parallel RSO (issue 9).

The checks run in ONE subprocess with four simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``; this process already
has its single CPU device), see ``tests/_sharded_check.py``. Every case of the
conformance registry (``tests/test_conformance.CASES``) is run three jitted
steps unsharded and with kernels sharded over their out axis
(``NamedSharding(mesh, P(None, "x"))``, biases ``P("x")``) on an ``Auto`` mesh.

What we assert, and why:

* results: sharded == unsharded to 1e-6 absolute (values are O(1)); bit-exact
  for the pass-through monitors' updates and the running means (no reduction
  crosses devices). The neuron mean over a kernel's fan-in axis and RSO's
  sigma (a std over a sharded leaf) are reductions whose order XLA may change
  with the layout: we measured differences up to 6e-8 and 2.4e-7.
* sharding of the state, as propagated by ``jit`` (no ``out_shardings``): a
  state leaf of rank 2 (a neuron-mean state ``(1, out)``, a running mean,
  per-neuron norms) is sharded ``(None, 'x')`` like its kernel, i.e. over the
  out axis, so each device keeps the momentum of its own neurons; rank 1 is
  ``('x',)`` like the bias; scalars (counters, per-leaf and global norms, RSO's
  sigmas, cursor and loss) are replicated. The shardings after the first and
  the last step are the same, and the step is traced at most twice (``init``
  makes its zeros without the parameters' sharding; from the first update on the
  state is sharded and the step no longer retraces).
* RSO data-parallel: params replicated, the batch sharded over its first axis:
  the same accepted weights (bit-identical updates and acceptance counts) as
  the single-device run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_conformance import CASES

HERE = os.path.dirname(os.path.abspath(__file__))
EXACT = {"running_mean_cumulative", "running_mean_cumulative_emit_mean", "running_mean_ema",
         "running_mean_ema_emit_mean"}


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env.pop("SHARDED_CHECK_EXPLICIT", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_sharded_check.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_sharded_equals_unsharded(report, case):
    r = report["cases"][case.name]
    assert r["update_diff"] <= 1e-6 and r["state_diff"] <= 1e-6, r
    if case.kind == "monitor" or case.name in EXACT:
        assert r["update_exact"], r
    if case.name in EXACT:
        assert r["state_exact"], r


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_state_sharding_follows_the_params(report, case):
    r = report["cases"][case.name]
    want_by_rank = {0: "replicated", 1: "('x',)", 2: "(None, 'x')"}
    assert r["update_specs"] == {
        "['dense']['bias']": "('x',)", "['dense']['kernel']": "(None, 'x')", "['out']['kernel']": "(None, 'x')"
    }
    for path, spec in r["state_specs_last"].items():
        assert spec == want_by_rank[len(r["state_shapes"][path])], (path, spec, r["state_shapes"][path])
    assert r["state_specs_first"] == r["state_specs_last"]
    assert r["traces"] <= 2


def test_rso_data_parallel_batch_equals_single_device(report):
    r = report["rso_data_parallel"]
    assert r["batch_spec"] == "('x',)"
    assert set(r["update_specs"].values()) == {"replicated"}
    assert r["update_exact"] and r["accepted_single"] == r["accepted_sharded"], r
    assert r["loss_sharded"] == r["loss_single"] < r["loss_start"]
    assert sum(r["accepted_single"].values()) > 0
