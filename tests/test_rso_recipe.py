"""The official recipe's options of ``rso`` against a plain Python/NumPy replay.

The replay (``reference_recipe``) is written from the documented scheme, not from the
package: the He step ``sqrt(2 / fan_in)`` and the neuron-by-neuron visiting order are
enumerated by hand (nested loops over output channel, input channel, kernel row,
kernel column), the weight decay is applied per visit before the three candidates
are scored, and the anneal is the official ``0.1 + 0.9 (T - c) / T``.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _rso_nets import small_cnn_loss, small_cnn_params

from optax_neuron import _random, rso, rso_init


def _neuron_order_conv(shape):
    kh, kw, cin, cout = shape
    return [
        np.ravel_multi_index((a, b, i, o), shape)
        for o in range(cout)
        for i in range(cin)
        for a in range(kh)
        for b in range(kw)
    ]


def _neuron_order_dense(shape):
    n_in, n_out = shape
    return [np.ravel_multi_index((i, o), shape) for o in range(n_out) for i in range(n_in)]


def reference_recipe(
    params, loss, *, seed, weights_per_step, calls, sigma, anneal, visit, weight_decay
):
    """visit: [(path, [flat indices in visiting order])]. sigma: {path: float}.

    Returns (params, cursor, cycle, accepted) after every call.
    """
    get = lambda tree, path: tree[path.split("/")[0]][path.split("/")[1]]
    cur = jax.tree.map(lambda v: np.array(v, np.float32), params)
    positions = [(path, flat) for path, order in visit for flat in order]
    total = len(positions)
    cursor, cycle = 0, 0
    accepted = {path: 0 for path, _ in visit}
    base = jax.random.key(seed)
    wd = np.float32(weight_decay)
    out = []
    for _ in range(calls):
        start = jax.tree.map(np.copy, cur)
        upd = jax.tree.map(np.zeros_like, cur)
        current = np.float32(loss(cur))
        for _ in range(weights_per_step):
            path, flat = positions[cursor]
            idx = np.unravel_index(flat, get(cur, path).shape)
            k = jax.random.fold_in(jax.random.fold_in(base, cycle), cursor)
            k_step = jax.random.split(k)[0]
            z = np.float32(jax.random.normal(k_step, (), jnp.float32))
            dw = np.float32(np.float32(sigma[path]) * np.float32(anneal(cycle))) * z
            w = np.float32(get(start, path)[idx] + get(upd, path)[idx])
            u_d = (
                np.float32(get(upd, path)[idx] - np.float32(w * wd))
                if weight_decay
                else get(upd, path)[idx]
            )
            cands = []
            for sign in (0, 1, -1):
                u = np.float32(u_d + np.float32(sign) * dw)
                trial = jax.tree.map(np.copy, cur)
                get(trial, path)[idx] = np.float32(get(start, path)[idx] + u)
                cands.append((np.float32(loss(trial)), u, trial))
            if weight_decay:
                current = cands[0][0]
            best, choice = current, cands[0]
            for val, u, trial in cands[1:]:
                if val < best:  # strict: ties and NaN keep w
                    best, choice = val, (val, u, trial)
            if choice is not cands[0]:
                accepted[path] += 1
            if choice is not cands[0] or weight_decay:
                get(upd, path)[idx] = choice[1]
                cur = choice[2]
            current = best
            cursor += 1
            if cursor == total:
                cursor, cycle = 0, cycle + 1
        out.append((jax.tree.map(np.copy, cur), cursor, cycle, dict(accepted)))
    return out


def _run(tx, params, value_fn, calls):
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        u, s = tx.update(p, s, p, value_fn=value_fn)
        return optax.apply_updates(p, u), s

    hist = []
    for _ in range(calls):
        params, state = step(params, state)
        hist.append((params, state))
    return hist


def _compare(got, ref):
    for (p, s), (rp, cursor, cycle, acc) in zip(got, ref, strict=True):
        for a in rp:
            for b in rp[a]:
                np.testing.assert_array_equal(np.asarray(p[a][b]), rp[a][b], err_msg=f"{a}/{b}")
        assert (int(s.rso_cursor), int(s.rso_cycle)) == (cursor, cycle)
        assert {k: int(v) for k, v in s.rso_accepted.items()} == acc


T = 4


def official_anneal(c):  # the official code's factor, in float32 like the package
    return jnp.float32(0.1) + jnp.float32(0.9) * (jnp.float32(T) - c) / jnp.float32(T)


def _anneal_py(c):
    return np.float32(official_anneal(jnp.int32(c)))


def test_official_anneal_is_optax_linear_schedule():
    sched = optax.linear_schedule(1.0, 0.1, T)
    for c in range(T):
        assert abs(float(sched(c)) - (0.1 + 0.9 * (T - c) / T)) < 1e-6


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_mlp_recipe_matches_reference(weight_decay):
    params = rso_init(
        jax.random.key(0),
        {"l0": {"kernel": jnp.zeros((5, 4))}, "l1": {"kernel": jnp.zeros((4, 3))}},
    )
    kx, ky = jax.random.split(jax.random.key(1))
    x, y = jax.random.normal(kx, (24, 5)), jax.random.randint(ky, (24,), 0, 3)

    def loss(p):
        h = jnp.tanh(x @ jnp.asarray(p["l0"]["kernel"]))
        return optax.softmax_cross_entropy_with_integer_labels(
            h @ jnp.asarray(p["l1"]["kernel"]), y
        ).mean()

    jloss = jax.jit(loss)
    tx = rso(
        seed=2,
        weights_per_step=9,
        sigma="he",
        within="neuron",
        anneal=official_anneal,
        order=["l1/*", "l0/*"],
        weight_decay=weight_decay,
    )
    got = _run(tx, params, loss, 5)  # 45 > 32 weights: crosses a cycle
    sigma = {"l0/kernel": math.sqrt(2 / 5), "l1/kernel": math.sqrt(2 / 4)}
    visit = [("l1/kernel", _neuron_order_dense((4, 3))), ("l0/kernel", _neuron_order_dense((5, 4)))]
    ref = reference_recipe(
        params,
        lambda p: jloss(jax.tree.map(jnp.asarray, p)),
        seed=2,
        weights_per_step=9,
        calls=5,
        sigma=sigma,
        anneal=_anneal_py,
        visit=visit,
        weight_decay=weight_decay,
    )
    _compare(got, ref)
    assert ref[-1][2] == 1 and sum(ref[-1][3].values()) > 5
    state = got[0][1]
    for path, s in sigma.items():
        np.testing.assert_allclose(float(state.rso_sigma[path]), s, rtol=1e-7)
    if weight_decay:  # every visited weight moved, even the rejected ones (the decay)
        first_call = np.asarray(got[0][0]["l1"]["kernel"]) != np.asarray(params["l1"]["kernel"])
        assert first_call.ravel()[_neuron_order_dense((4, 3))[:9]].all()


def test_conv_net_official_order_matches_reference():
    # The official layout in small: conv -> BN -> relu -> conv -> BN -> global pool -> dense;
    # leaf order: dense first, then convs last to first, each kernel before its BN shift/scale.
    ch = 3
    params = small_cnn_params(jax.random.key(3), ch=ch, classes=4)
    kx, ky = jax.random.split(jax.random.key(4))
    x, y = _random.normal(kx, (8, 6, 6, 1)), jax.random.randint(ky, (8,), 0, 4)
    loss = small_cnn_loss(x, y, reduce="sum")
    jloss = jax.jit(loss)
    order = [
        "head/kernel",
        "conv1/kernel",
        "bn1/bias",
        "bn1/scale",
        "conv0/kernel",
        "bn0/bias",
        "bn0/scale",
    ]
    sigma_rules = [("*scale", 0.167), ("*bias", 0.167), ("*", "he")]
    tx = rso(
        seed=7,
        weights_per_step=40,
        sigma=sigma_rules,
        within="neuron",
        order=order,
        anneal=official_anneal,
        weight_decay=1e-2,
    )
    got = _run(tx, params, loss, 4)  # 160 > 12 + 81 + 6 + 27 + 6 = 132 weights
    sigma = {
        "head/kernel": math.sqrt(2 / 3),
        "conv1/kernel": math.sqrt(2 / 27),
        "conv0/kernel": math.sqrt(2 / 9),
        **{f"bn{i}/{n}": 0.167 for i in (0, 1) for n in ("scale", "bias")},
    }
    visit = [
        ("head/kernel", _neuron_order_dense((ch, 4))),
        ("conv1/kernel", _neuron_order_conv((3, 3, ch, ch))),
        ("bn1/bias", list(range(ch))),
        ("bn1/scale", list(range(ch))),
        ("conv0/kernel", _neuron_order_conv((3, 3, 1, ch))),
        ("bn0/bias", list(range(ch))),
        ("bn0/scale", list(range(ch))),
    ]
    conv1 = list(itertools.chain(*[v for _, v in visit[1:2]]))
    assert conv1[:3] == [0, 9, 18] and conv1[9] == 3  # o = 0: in-channel 0 at 9 positions, then 1
    ref = reference_recipe(
        params,
        lambda p: jloss(p),
        seed=7,
        weights_per_step=40,
        calls=4,
        sigma=sigma,
        anneal=_anneal_py,
        visit=visit,
        weight_decay=1e-2,
    )
    _compare(got, ref)
    assert ref[-1][2] == 1 and sum(ref[-1][3].values()) > 10


def test_recipe_bad_input():
    params = {"d": {"kernel": jnp.ones((3, 2))}, "n": {"scale": jnp.ones(2)}}
    with pytest.raises(ValueError, match=r"n/scale.*fan-in"):
        rso(sigma="he", search=[("*", True)]).init(params)
    with pytest.raises(ValueError, match="within"):
        rso(within="column")
    with pytest.raises(ValueError, match="weight_decay"):
        rso(weight_decay=-0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        rso(weight_decay=float("nan"))
    with pytest.raises(ValueError, match="sigma"):
        rso(sigma="xavier")
    with pytest.raises(ValueError, match=r"d/kernel.*'he'"):
        rso(sigma=[("*", "lecun")], search=[("d/*", True)]).init(params)


def test_decay_rounds_the_product_on_its_own():
    # XLA's CPU backend would contract u - w * wd into one fused multiply-add (rounded
    # once), which differs from the formula for about a quarter of these values.
    from optax_neuron.rso.rule import decayed

    rng = np.random.default_rng(0)
    u = (rng.standard_normal(20_000) * 0.01).astype(np.float32)
    w = rng.standard_normal(20_000).astype(np.float32)
    wd = np.float32(1e-2)
    got = np.asarray(jax.jit(lambda u, w: decayed(u, w, 1e-2))(u, w))
    np.testing.assert_array_equal(got, u - w * wd)
