"""Shared test set-up: JAX on the CPU, float32 by default (tests that need
float64 use ``with jax.enable_x64(True):``), and one persistent compilation cache per test
session.

The cache (JAX's ``jax_compilation_cache_dir``) is a fresh directory for each ``pytest`` run,
shared by the pytest-xdist workers and by every subprocess the tests start (the command
line, notebook kernels, documentation blocks, multi-process runs inherit the environment):
a program that one of them compiled is loaded, not compiled again, by the others. It
starts empty, so a run from a fresh clone pays every first compilation; it is removed when
the run ends. Results do not depend on it: a cached executable is the one XLA compiled.
The decoded MNIST copy of :func:`optax_neuron.mnist.data.load_mnist` is kept in the same
folder, so the run neither reads nor writes the user's cache.
"""

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The process that starts the run (pytest's controller, or pytest alone without xdist) makes
# the directory name; the xdist workers and the subprocesses inherit it with the environment.
_OWNER = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWNER:
    _CACHE = Path(tempfile.gettempdir()) / f"optax_neuron_test_jax_cache_{os.getpid()}"
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_CACHE)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # cache even small programs
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    # The MNIST loader's decoded copy: in this run's folder too, not in the user's cache.
    os.environ["OPTAX_NEURON_CACHE"] = str(_CACHE / "data")


def pytest_unconfigure(config):
    if _OWNER:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def run_once(tmp_path_factory):
    """``run_once(name, make)``: the directory ``name`` of this pytest run, filled by
    ``make(directory)`` once, whichever xdist worker asks first; the others wait for it.

    For expensive set-ups that several workers need (one uninterrupted training run, say).
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's directory, shared by its workers

    def get(name: str, make) -> Path:
        root = base / f"once_{name}"
        with open(base / f"once_{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not (root / ".done").exists():
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir()
                make(root)
                (root / ".done").touch()
        return root

    return get
