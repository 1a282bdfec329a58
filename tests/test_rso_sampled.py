"""A fresh minibatch per weight from cached layer inputs, against a plain replay.

``LayerStack(..., batch=B)`` searched with ``rso(per_weight_batch=True)``: the weight at
position ``n`` of cycle ``c`` is scored on the rows ``randint(k_batch, (B,), 0, N)`` of
the input of the layer that owns its leaf, that input computed over all ``N`` rows.

The replay below recomputes that input from scratch for every candidate (no cache):
the stages of the net are written out by hand, the stages before the owner run on all
rows, the rest on the weight's rows. Visiting order, He step, anneal and weight decay
are enumerated as in ``test_rso_recipe.py``.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _rso_nets import ce, small_cnn_layers, small_cnn_params, small_cnn_stages

from optax_neuron import LayerStack, _random, rso

N, B, CH = 40, 12, 3


STAGES = small_cnn_stages()  # conv0 -> BN0 -> relu -> conv1 -> BN1 -> global pool -> head
OWNER = {"conv0": 0, "bn0": 1, "conv1": 3, "bn1": 4, "head": 6}
_package_layers = small_cnn_layers
_ce = ce


def _setup():
    params = small_cnn_params(jax.random.key(3), ch=CH, classes=4)
    kx, ky = jax.random.split(jax.random.key(4))
    return params, _random.normal(kx, (N, 6, 6, 1)), jax.random.randint(ky, (N,), 0, 4)


def _order_conv(shape):
    kh, kw, cin, cout = shape
    return [
        np.ravel_multi_index((a, b, i, o), shape)
        for o in range(cout)
        for i in range(cin)
        for a in range(kh)
        for b in range(kw)
    ]


VISIT = [
    ("head/kernel", [np.ravel_multi_index((i, o), (CH, 4)) for o in range(4) for i in range(CH)]),
    ("conv1/kernel", _order_conv((3, 3, CH, CH))),
    ("bn1/bias", list(range(CH))),
    ("bn1/scale", list(range(CH))),
    ("conv0/kernel", _order_conv((3, 3, 1, CH))),
    ("bn0/bias", list(range(CH))),
    ("bn0/scale", list(range(CH))),
]
SIGMA = {
    "head/kernel": math.sqrt(2 / CH),
    "conv1/kernel": math.sqrt(2 / (9 * CH)),
    "conv0/kernel": math.sqrt(2 / 9),
    **{f"bn{i}/{n}": 0.167 for i in (0, 1) for n in ("scale", "bias")},
}
T, WD = 3, 1e-2


def _anneal(c):
    return jnp.float32(0.1) + jnp.float32(0.9) * (jnp.float32(T) - c) / jnp.float32(T)


def reference(params, x, y, *, seed, weights_per_step, calls):
    """(params, cursor, cycle, accepted) after every call, every loss computed from scratch."""

    @functools.partial(jax.jit, static_argnums=2)
    def loss(p, rows, owner):
        h = x
        for k, f in enumerate(STAGES):
            if k == owner:  # the owner and the layers after it see the weight's rows
                h = h[rows]
            h = f(p, h)
        return _ce(h, y[rows])

    get = lambda tree, path: tree[path.split("/")[0]][path.split("/")[1]]
    cur = jax.tree.map(lambda v: np.array(v, np.float32), params)
    positions = [(path, flat) for path, order in VISIT for flat in order]
    cursor, cycle = 0, 0
    accepted = {path: 0 for path, _ in VISIT}
    base = jax.random.key(seed)
    wd = np.float32(WD)
    out = []
    for _ in range(calls):
        start = jax.tree.map(np.copy, cur)
        upd = jax.tree.map(np.zeros_like, cur)
        for _ in range(weights_per_step):
            path, flat = positions[cursor]
            idx = np.unravel_index(flat, get(cur, path).shape)
            k = jax.random.fold_in(jax.random.fold_in(base, cycle), cursor)
            k_step, k_batch = jax.random.split(k)
            rows = jax.random.randint(k_batch, (B,), 0, N)
            z = np.float32(jax.random.normal(k_step, (), jnp.float32))
            # the user's anneal as the package evaluates it, compiled: XLA may round a
            # float32 formula differently from its eager evaluation (here 0.7 +- 1 ulp)
            factor = np.float32(jax.jit(_anneal)(jnp.int32(cycle)))
            dw = np.float32(np.float32(SIGMA[path]) * factor) * z
            w = np.float32(get(start, path)[idx] + get(upd, path)[idx])
            u_d = np.float32(get(upd, path)[idx] - np.float32(w * wd))
            cands = []
            for sign in (0, 1, -1):
                u = np.float32(u_d + np.float32(sign) * dw)
                trial = jax.tree.map(np.copy, cur)
                get(trial, path)[idx] = np.float32(get(start, path)[idx] + u)
                value = np.float32(loss(trial, rows, OWNER[path.split("/")[0]]))
                cands.append((value, u, trial))
            best, choice = cands[0][0], cands[0]
            for cand in cands[1:]:
                if cand[0] < best:  # strict: ties and NaN keep w
                    best, choice = cand[0], cand
            accepted[path] += choice is not cands[0]
            get(upd, path)[idx] = choice[1]
            cur = choice[2]
            cursor += 1
            if cursor == len(positions):
                cursor, cycle = 0, cycle + 1
        out.append((jax.tree.map(np.copy, cur), cursor, cycle, dict(accepted)))
    return out


def _tx(fast_path, weights_per_step):
    return rso(
        seed=7,
        weights_per_step=weights_per_step,
        sigma=[("*scale", 0.167), ("*bias", 0.167), ("*", "he")],
        within="neuron",
        order=[path for path, _ in VISIT],
        anneal=_anneal,
        weight_decay=WD,
        per_weight_batch=True,
        fast_path=fast_path,
    )


def _run(tx, params, stack, calls):
    state = tx.init(params)

    @jax.jit
    def step(p, s, stack):  # the data set as an argument: one compilation
        u, s = tx.update(p, s, p, value_fn=stack)
        return optax.apply_updates(p, u), s

    hist = []
    for _ in range(calls):
        params, state = step(params, state, stack)
        hist.append((params, state))
    return hist


CALLS, WPS = 3, 50  # 150 > 132 weights: crosses a cycle; calls start inside leaves


@pytest.fixture(scope="module")
def replay():
    """The plain replay, computed once for both fast paths."""
    params, x, y = _setup()
    return reference(params, x, y, seed=7, weights_per_step=WPS, calls=CALLS)


@pytest.mark.parametrize("fast_path", ["incremental", "cache"])
def test_fresh_rows_per_weight_match_the_replay(fast_path, replay):
    params, x, y = _setup()
    stack = LayerStack(_package_layers(), _ce, x, y, batch=B)
    # the input is recomputed when a call starts inside a leaf (same values)
    got = _run(_tx(fast_path, WPS), params, stack, CALLS)
    ref = replay
    for (p, s), (rp, cursor, cycle, acc) in zip(got, ref, strict=True):
        for a in rp:
            for b in rp[a]:
                np.testing.assert_array_equal(np.asarray(p[a][b]), rp[a][b], err_msg=f"{a}/{b}")
        assert (int(s.rso_cursor), int(s.rso_cycle)) == (cursor, cycle)
        assert {k: int(v) for k, v in s.rso_accepted.items()} == acc
    total = sum(len(order) for _, order in VISIT)
    assert ref[-1][2] == CALLS * WPS // total == 1 and sum(ref[-1][3].values()) > 20
    # the loss in the state is F of the kept value on the last weight's rows
    assert np.isfinite(float(got[-1][1].rso_loss))


def test_rows_are_the_documented_draw_and_the_loss_is_the_whole_set():
    params, x, y = _setup()
    stack = LayerStack(_package_layers(), _ce, x, y, batch=B)
    key = jax.random.key(11)
    np.testing.assert_array_equal(stack.rows(key), jax.random.randint(key, (B,), 0, N))
    h = x
    for f in STAGES:
        h = f(params, h)
    np.testing.assert_allclose(float(stack(params)), float(_ce(h, y)), rtol=1e-6)
    # the tail of the owner of conv1 on some rows: the replay's loss
    rows = stack.rows(key)
    h3 = stack.input_of(3, params)
    h = h3[rows]
    for f in STAGES[3:]:
        h = f(params, h)
    np.testing.assert_allclose(
        float(stack.tail(3, h3, rows)(params)), float(_ce(h, y[rows])), rtol=1e-6
    )


def test_sampled_bad_input():
    params, x, y = _setup()
    state = _tx("incremental", 5).init(params)
    with pytest.raises(ValueError, match="batch"):
        LayerStack(_package_layers(), _ce, x, y, batch=0)
    with pytest.raises(ValueError, match="per_weight_batch=True"):  # batch= without the flag
        rso(weights_per_step=5).update(
            params, state, params, value_fn=LayerStack(_package_layers(), _ce, x, y, batch=B)
        )
    with pytest.raises(ValueError, match="needs batch="):  # the flag without batch=
        _tx("incremental", 5).update(
            params, state, params, value_fn=LayerStack(_package_layers(), _ce, x, y)
        )
    with pytest.raises(ValueError, match="fast_path"):
        _tx("off", 5).update(
            params, state, params, value_fn=LayerStack(_package_layers(), _ce, x, y, batch=B)
        )
    with pytest.raises(ValueError, match="no batch="):
        LayerStack(_package_layers(), _ce, x, y).rows(jax.random.key(0))
