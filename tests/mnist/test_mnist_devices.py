"""``--devices N``: the CLI trains data-parallel over N local devices.

The runs start the CLI in fresh processes (``python -m optax_neuron.mnist``, no
``XLA_FLAGS`` in the environment), so the CLI itself must make the CPU devices before JAX
starts. A small spy (``SPY`` below) wraps ``train.run`` and reports JAX's device count and
how many devices hold the trained parameters (replicated over the mesh with
``--devices 2``). That the compiled epoch splits each batch and all-reduces the gradients
was checked once in the optimized HLO (``num_partitions=2``, one ``all-reduce`` of the
gradients per step, per-device batches of 16), not here.

Equality with one device: the same command with ``--devices 1`` and ``--devices 2`` (mlp,
16 hidden units, 1024 images, batch 32, 2 epochs = 64 steps) gives the same per-epoch
train/validation/test losses and accuracies up to float rounding. The gradient of a split
batch is the sum of two partial sums (an all-reduce) instead of one sum; we measured the
records bit-identical on this problem (XLA:CPU happened to add in the same order), so
``REL_TOL`` = 1e-5 (relative, float32) only allows another addition order, not a
different computation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_mnist_cli import _fails  # one CLI-error check (exit 2, one line, no traceback)

REL_TOL = 1e-5
RUN = ["--model", "mlp", "--hidden", "16", "--limit-train", "1024", "--batch-size", "32"]
RUN += ["--epochs", "2", "--no-progress"]
SPY = """
import json, sys
import jax
from optax_neuron.mnist import train
from optax_neuron.mnist.__main__ import main

run, seen = train.run, {}

def spy(config, data, **kwargs):
    result = run(config, data, **kwargs)
    leaves = jax.tree.leaves(result["params"])
    seen["param_devices"] = sorted({len(p.sharding.device_set) for p in leaves})
    return result

train.run = spy
main(sys.argv[1:])
print(json.dumps({"device_count": jax.device_count(), **seen}))
"""


def _cli(tmp_path, *args: str, timeout: float = 300) -> tuple[dict, dict]:
    out = tmp_path / "_".join(a.strip("-") for a in args)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SPY, *RUN, *args, "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    spy = json.loads(proc.stdout.strip().splitlines()[-1])
    return spy, json.loads((out / "metrics.json").read_text())


def test_devices_2_uses_two_devices_and_equals_one_device(tmp_path):
    (spy1, m1), (spy2, m2) = _cli(tmp_path, "--devices", "1"), _cli(tmp_path, "--devices", "2")
    assert spy1 == {"device_count": 1, "param_devices": [1]}
    assert spy2 == {"device_count": 2, "param_devices": [2]}
    assert m2["config"]["devices"] == 2
    assert len(m1["epochs"]) == len(m2["epochs"]) == 2
    for e1, e2 in zip(m1["epochs"], m2["epochs"], strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss"):
            assert e2[key] == pytest.approx(e1[key], rel=REL_TOL, abs=0), (e1["epoch"], key)
    assert m2["test_accuracy"] == pytest.approx(m1["test_accuracy"], rel=REL_TOL)
    assert m1["epochs"][-1]["train_loss"] < m1["epochs"][0]["train_loss"]  # it did train


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--devices", "0"], "--devices must be >= 1, got 0"),
        (["--devices", "two"], "--devices must be an integer, got 'two'"),
        (["--devices", "3"], "--batch-size 64 must be divisible by --devices 3"),
        (
            ["--devices", "2", "--batch-size", "9"],
            "--batch-size 9 must be divisible by --devices 2",
        ),
        (["--optimizer", "rso", "--devices", "2"], "--devices does not apply to rso"),
    ],
)
def test_bad_devices_exit_2_with_one_line(argv, match, capsys):
    _fails(argv, capsys, match)


def test_more_devices_than_can_be_had_exit_2(capsys):
    """In this process JAX has started already with one CPU device: 2 cannot be had."""
    import jax

    assert jax.local_device_count() == 1
    before = os.environ.get("XLA_FLAGS")
    _fails(["--devices", "2", *RUN], capsys, "--devices 2: only 1 cpu device(s) can be had")
    assert os.environ.get("XLA_FLAGS") == before  # the environment is restored
