"""rso with kernels sharded over Explicit and Auto meshes of 4 simulated CPU devices.

Runs ``tests/_rso_explicit_check.py`` in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (this process already has its
single device). Before the fix, the Explicit mesh failed with ``ShardingTypeError``
from the ``ravel`` of a sharded kernel; the search now gathers the visited leaves for
the call and reshards the update to the kernel's spec.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def report():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_rso_explicit_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["explicit", "auto"])
def test_sharded_kernels_search_like_unsharded(report, mesh):
    r = report[mesh]
    assert "error" not in r, r
    # the same decisions and bit-identical weights as the single-device run
    assert r["max_param_diff"] == 0.0 and r["accepted"] == report["accepted"], r
    assert sum(report["accepted"].values()) > 10
    # the update and the new params keep the kernels' sharding
    assert r["update_specs"] == ["(None, 'x')"] and r["param_specs"] == ["(None, 'x')"], r
