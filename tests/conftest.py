"""Shared test set-up: JAX on the CPU, float32 by default (tests that need
float64 use ``with jax.enable_x64(True):``)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
