"""The convolution RSO's suffix passes run, written three ways.

Every weight visit re-runs the layers after the next convolution for its three candidates, so
the floor of an exact search is set by a 3x3, 16 -> 16 channel, SAME convolution on the three
candidates' batch (3 x 256 = 768 images) at 28x28, 14x14 and 7x7. Timed here, interleaved,
median of ``--repeats`` (jitted, after warm-up), each against XLA's own ``lax.conv``:

* ``lax.conv``: ``jax.lax.conv_general_dilated`` (NHWC, HWIO), what the search uses;
* im2col: the nine shifted copies concatenated, ``(N*H*W, 144) @ (144, 16)``;
* per-tap: nine ``(N, H, W, 16) @ (16, 16)`` products summed.

Each step maps the batch to a batch of the same shape (weights of std ``1/sqrt(144)``, so
values keep their scale). Before timing, the other two forms are checked against
``lax.conv`` on the same input.

Run: ``python benchmarks/bench_rso_conv.py [--quick] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Runner, add_common_args, format_table, machine_line, time_interleaved

from optax_neuron import _random


def lax_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _taps(x: jax.Array, k: int) -> list[jax.Array]:
    """The ``k * k`` shifted copies of ``x`` that a SAME ``k x k`` convolution reads."""
    h, w, p = x.shape[1], x.shape[2], k // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    return [xp[:, i : i + h, j : j + w, :] for i in range(k) for j in range(k)]


def im2col_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    k, _, cin, cout = w.shape
    cols = jnp.concatenate(_taps(x, k), axis=-1)
    return (cols.reshape(-1, k * k * cin) @ w.reshape(k * k * cin, cout)).reshape(
        *x.shape[:3], cout
    )


def per_tap_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    k = w.shape[0]
    return sum(t @ w.reshape(k * k, *w.shape[2:])[n] for n, t in enumerate(_taps(x, k)))


FORMS = {"lax.conv": lax_conv, "im2col": im2col_conv, "per-tap": per_tap_conv}


def main(argv=None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), 20)
    parser.add_argument("--batch", type=int, default=768, help="images (3 candidates x 256)")
    args = parser.parse_args(argv)
    batch, sizes = (24, (14, 7)) if args.quick else (args.batch, (28, 14, 7))
    repeats = args.repeats or (2 if args.quick else 20)
    print(f"## RSO suffix convolution, three ways ({machine_line()})")
    results, rows = {}, []
    for hw in sizes:
        x = _random.normal(jax.random.key(0), (batch, hw, hw, 16), jnp.float32)
        w = _random.normal(jax.random.key(1), (3, 3, 16, 16), jnp.float32) / 12.0
        steps = {name: jax.jit(lambda s, f=f, w=w: f(s, w)) for name, f in FORMS.items()}
        ref = np.asarray(steps["lax.conv"](x))
        for name in ("im2col", "per-tap"):
            np.testing.assert_allclose(np.asarray(steps[name](x)), ref, rtol=1e-4, atol=1e-4)
        runners = time_interleaved([Runner(n, s, x) for n, s in steps.items()], repeats)
        ms = {r.name: r.median * 1e3 for r in runners}
        results[hw] = ms
        base = ms["lax.conv"]
        rows.append(
            [f"{hw}x{hw}", batch]
            + [f"{ms[n]:.2f}" for n in FORMS]
            + [f"{ms[n] / base:.1f}x" for n in ("im2col", "per-tap")]
        )
    header = ["size", "batch", *(f"{n} ms" for n in FORMS)]
    print(format_table([*header, "im2col / lax.conv", "per-tap / lax.conv"], rows))
    return results


if __name__ == "__main__":
    main()
