"""Two JAX processes on one machine, one 4-device mesh across them.

Each test starts two Python processes, each with two CPU devices
(``--xla_force_host_platform_device_count=2``), joined by ``jax.distributed.initialize``
with a coordinator on ``127.0.0.1`` at a free port (CPU collectives: gloo, the default of
the installed JAX). Every process gets a timeout, and when one fails the other is killed at
once, so nothing waits for a peer that is gone.

* The scale-out guide's multi-host recipe (``tests/_multiprocess_worker.py`` runs it unchanged):
  data-parallel training with ``gradient_norms``, ``running_gradient_mean`` and
  ``neuron_mean_sgd``, each process putting its own slice of the batch with
  ``jax.make_array_from_process_local_data``, then ``rso`` on a batch sharded across the
  processes. Compared with the same recipe in ONE process with four devices: every
  parameter, optimizer-state and RSO-state value agrees to ``RECIPE_TOL`` times
  ``max(1, largest |value| of the leaf)``. Both runs compile the same program for the same
  four-way mesh; the gradient all-reduce goes through gloo between the processes and inside
  XLA in one process, which adds in another order: we measured differences of at most
  1.2e-7 (one float32 rounding at 1; the SGD and RSO losses, RSO's sigmas and acceptance
  counts were bit-identical). ``RECIPE_TOL`` = 1e-6 leaves a margin of 8; integer state
  (counters, RSO's acceptance counts) must be identical.
* The sharding sweep of ``tests/_sharded_check.py`` (every case of the conformance
  registry, data-parallel and model-sharded) on the Explicit mesh spread over the two
  processes, with the assertions of ``tests/test_sharding.py``: equal to the one-device run
  in each process, and the state sharded like the params. (The Auto mesh is swept in one
  process by test_sharding: every axis type once.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from test_sharding import (
    AXES,
    CHECK,
    ONE_PROCESS_AXES,
    assert_equal_to_one_device,
    assert_sharded_like_params,
    check_env,
    failures,
    keys_of,
)

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_multiprocess_worker.py")
RECIPE_TOL = 1e-6
TIMEOUT_S = 540
TWO_PROCESS_AXES = tuple(a for a in AXES if a not in ONE_PROCESS_AXES)
assert TWO_PROCESS_AXES == ("explicit",)  # with test_sharding: every axis type swept once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(argv: list[str], envs: list[dict], timeout: float = TIMEOUT_S) -> list[tuple]:
    """Start one process per environment; wait for all; kill the rest if one fails or hangs.

    Returns ``(returncode, stdout, stderr)`` per process.
    """
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for env in envs
    ]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = any(p.returncode not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=30)
        results.append((p.returncode, out, err))
    return results


def two_process_envs(prefix: str, **extra) -> list[dict]:
    """Environments of processes 0 and 1: two CPU devices each, one coordinator."""
    address = f"127.0.0.1:{free_port()}"
    return [
        check_env(
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            **{f"{prefix}COORDINATOR": address, f"{prefix}NUM_PROCESSES": "2"},
            **{f"{prefix}PROCESS_ID": str(i)},
            **extra,
        )
        for i in range(2)
    ]


def assert_all_ok(results: list[tuple]) -> None:
    for i, (rc, _, err) in enumerate(results):
        assert rc == 0, f"process {i} exited with {rc}:\n{err[-4000:]}"


# ------------------------------------------------------------------ the guide's recipe
def recipe_env(**extra) -> dict:
    """The environment without the recipe's variables from outside, then ``extra``."""
    env = check_env()
    for name in ("NUM_PROCESSES", "PROCESS_ID", "COORDINATOR_ADDRESS"):
        env.pop(name, None)
    return {**env, **extra}


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe")
    address = f"127.0.0.1:{free_port()}"
    envs = [
        recipe_env(
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            NUM_PROCESSES="2",
            PROCESS_ID=str(i),
            COORDINATOR_ADDRESS=address,
        )
        for i in range(2)
    ]
    two = run_processes([sys.executable, WORKER, str(tmp / "two.npz")], envs)
    assert_all_ok(two)
    one = run_processes(
        [sys.executable, WORKER, str(tmp / "one.npz")],
        [recipe_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")],
    )
    assert_all_ok(one)
    return dict(np.load(tmp / "two.npz")), dict(np.load(tmp / "one.npz")), two


# One test per fixture: under pytest-xdist every worker would start the processes again.
def test_recipe_two_processes_equal_one_process_four_devices(recipe_runs):
    two, one, procs = recipe_runs
    assert (int(two["process_count"]), int(two["device_count"])) == (2, 4)
    assert (int(one["process_count"]), int(one["device_count"])) == (1, 4)
    assert two.keys() == one.keys()
    names = [k for k in one if k not in ("process_count", "device_count")]
    assert any("neuron_momentum" in k for k in names) and any("gradient_mean" in k for k in names)
    assert any("gradient_norm" in k for k in names) and any("rso_accepted" in k for k in names)
    for k in names:
        a, b = one[k], two[k]
        assert a.shape == b.shape and a.dtype == b.dtype, k
        if a.dtype.kind in "iub":
            np.testing.assert_array_equal(b, a, err_msg=k)
        else:
            scale = max(float(np.max(np.abs(a))), 1.0) if a.size else 1.0
            np.testing.assert_allclose(b, a, rtol=0, atol=RECIPE_TOL * scale, err_msg=k)
    # it trained, and both processes printed the same losses
    lines = [out.strip().splitlines()[-1] for _, out, _ in procs]
    assert lines[0].startswith("process 0/2:") and lines[1].startswith("process 1/2:"), lines
    assert lines[0].split(":", 1)[1] == lines[1].split(":", 1)[1], lines
    assert float(two["['final_loss']"]) < 0.5 * float(two["['initial_loss']"])
    accepted = [k for k in two if "rso_accepted" in k]
    assert sum(int(two[k]) for k in accepted) > 0


# ------------------------------------------------------------------ the sharding sweep
@pytest.fixture(scope="module")
def sweep():
    argv = [sys.executable, CHECK, "--axes", ",".join(TWO_PROCESS_AXES)]
    results = run_processes(argv, two_process_envs("SHARDED_CHECK_"))
    assert_all_ok(results)
    out = json.loads(results[0][1].strip().splitlines()[-1])
    assert out["process_count"] == 2
    return out["runs"]


def test_two_processes_every_piece_on_explicit_meshes(sweep):
    assert sorted(sweep) == sorted(keys_of(TWO_PROCESS_AXES))
    bad = failures(sweep, assert_equal_to_one_device)
    bad += failures(sweep, assert_sharded_like_params)
    assert not bad, "\n".join(bad)
