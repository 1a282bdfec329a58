"""Checkpoints: every optimizer state saved and restored with Orbax mid-run.

For every case of the conformance registry: run 2 jitted steps, save params
and optimizer state with ``orbax.checkpoint.StandardCheckpointer``, restore
them into the abstract structure of a fresh ``init`` (``jax.eval_shape``),
continue 3 steps, and compare with an uninterrupted run of 5 steps: params,
updates and state must be bit-identical (restoring must give back the same
bits, same dtypes, same NamedTuple structure).
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from test_conformance import (
    CASES,
    as_optimizer,
    assert_trees_equal,
    quadratic_loss,
    random_tree,
    update,
)

BEFORE, AFTER = 2, 3


def _stepper(case, tx, loss):
    @jax.jit
    def step(p, s):
        u, s = update(case, tx, jax.grad(loss)(p), s, p, loss)
        return optax.apply_updates(p, u), s, u

    return step


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_restored_state_continues_identically(case, tmp_path):
    params0 = random_tree(0)
    loss = quadratic_loss(random_tree(2))
    tx = as_optimizer(case, 0.1)
    step = _stepper(case, tx, loss)

    params, state = params0, tx.init(params0)
    straight = []
    for _ in range(BEFORE + AFTER):
        params, state, u = step(params, state)
        straight.append((params, state, u))

    params, state = params0, tx.init(params0)
    for _ in range(BEFORE):
        params, state, _ = step(params, state)
    ckpt = ocp.StandardCheckpointer()
    path = tmp_path / "ckpt"
    ckpt.save(path, {"params": params, "opt_state": state})
    ckpt.wait_until_finished()
    del params, state
    abstract = jax.eval_shape(lambda: {"params": params0, "opt_state": tx.init(params0)})
    restored = ckpt.restore(path, abstract)
    ckpt.close()
    params, state = restored["params"], restored["opt_state"]
    assert type(state) is type(straight[0][1])
    assert_trees_equal(state, straight[BEFORE - 1][1])

    for t in range(BEFORE, BEFORE + AFTER):
        params, state, u = step(params, state)
        want_p, want_s, want_u = straight[t]
        assert_trees_equal(u, want_u)
        assert_trees_equal(params, want_p)
        assert_trees_equal(state, want_s)
    assert np.isfinite(float(loss(params)))
