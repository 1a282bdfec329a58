"""RSO with kernels sharded over an Explicit mesh (run by test_rso_sharding.py).

Runs with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``; prints one JSON
object on the last line. Three jitted ``rso`` steps on an MLP whose kernels are
sharded over their out axis (``P(None, "x")``) on a mesh with ``AxisType.Explicit``
(and, for comparison, ``AxisType.Auto``), against the same steps unsharded.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_neuron as on


def loss_fn(p, x, y):
    h = jnp.tanh(x @ p["dense"]["kernel"])
    return jnp.mean((h @ p["out"]["kernel"] - y) ** 2)


def run(params, x, y, weights=40, steps=3):
    tx = on.rso(seed=1, weights_per_step=weights, sigma="he", within="neuron", weight_decay=1e-3)

    @jax.jit
    def step(p, s):
        u, s = tx.update(p, s, p, value_fn=lambda q: loss_fn(q, x, y))
        return optax.apply_updates(p, u), s, u

    s = tx.init(params)
    for _ in range(steps):
        params, s, u = step(params, s)
    return params, s, u


def main() -> None:
    assert jax.device_count() == 4
    rng = np.random.default_rng(0)
    params = on.rso_init(
        jax.random.key(0),
        {"dense": {"kernel": jnp.zeros((6, 8))}, "out": {"kernel": jnp.zeros((8, 4))}},
    )
    x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
    p0, s0, _ = run(params, x, y)
    out = {"accepted": {k: int(v) for k, v in s0.rso_accepted.items()}}
    for name, kind in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto)):
        mesh = jax.make_mesh((4,), ("x",), axis_types=(kind,))
        kernel = NamedSharding(mesh, P(None, "x"))
        ps = jax.tree.map(lambda a, kernel=kernel: jax.device_put(a, kernel), params)
        rep = NamedSharding(mesh, P())
        xs, ys = jax.device_put(x, rep), jax.device_put(y, rep)
        try:
            with jax.set_mesh(mesh) if kind == AxisType.Explicit else _null():
                p1, s1, u1 = run(ps, xs, ys)
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        diff = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), strict=True)
        )
        out[name] = {
            "max_param_diff": diff,
            "accepted": {k: int(v) for k, v in s1.rso_accepted.items()},
            "update_specs": sorted({str(tuple(a.sharding.spec)) for a in jax.tree.leaves(u1)}),
            "param_specs": sorted({str(tuple(a.sharding.spec)) for a in jax.tree.leaves(p1)}),
        }
    print(json.dumps(out))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    main()
