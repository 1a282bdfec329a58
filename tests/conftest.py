"""Shared test set-up: JAX on the CPU, float32 by default (tests that need
float64 use ``with jax.enable_x64(True):``), and one persistent compilation cache per test
session.

The cache (JAX's ``jax_compilation_cache_dir``) is a fresh directory for each ``pytest`` run,
shared by the pytest-xdist workers and by every subprocess the tests start (the command
line, notebook kernels, documentation blocks, multi-process runs inherit the environment):
a program that one of them compiled is loaded, not compiled again, by the others. It
starts empty, so a run from a fresh clone pays every first compilation; it is removed when
the run ends. Results do not depend on it: a cached executable is the one XLA compiled.
"""

import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The process that starts the run (pytest's controller, or pytest alone without xdist) makes
# the directory name; the xdist workers and the subprocesses inherit it with the environment.
_OWNER = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWNER:
    _CACHE = Path(tempfile.gettempdir()) / f"optax_neuron_test_jax_cache_{os.getpid()}"
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_CACHE)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # cache even small programs
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
    if _OWNER:
        shutil.rmtree(_CACHE, ignore_errors=True)
