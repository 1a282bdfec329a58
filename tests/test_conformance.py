"""Conformance suite: every public transformation in every Optax setting.

``CASES`` below is THE registry: one line per public transformation (and per
mode that changes behaviour). A new transformation joins every test here, the
sharding check (``tests/_sharded_check.py``) and the checkpoint test by adding
one ``Case`` line.

Kinds, and what each test makes of them:

* ``"direction"``: the output is a descent direction with the sign of the
  gradient (``neuron_mean_trace``, ``running_gradient_mean(emit="mean")``); the
  convergence tests chain it with ``optax.scale(-lr)``.
* ``"optimizer"``: a complete optimizer with a ``learning_rate`` argument
  (``neuron_mean_sgd``); the convergence tests set ``learning_rate``.
* ``"monitor"``: passes the updates through unchanged and only records
  statistics (``gradient_norms``, ``running_gradient_mean(emit="updates")``);
  the convergence tests chain it with ``optax.sgd(lr, momentum=0.9)``, and a
  separate test checks that the updates come out bit-identical.
* ``"rso"``: gradient-free random search; ``update`` gets the loss as
  ``value_fn=`` and ignores the incoming updates. Adaptations: convergence =
  the loss falls by the measured factor within N weight visits; ``MultiSteps``
  accumulates gradients RSO ignores, so it must equal one plain RSO update on
  the k-th mini-step; ``optax.masked`` hands the inner transformation a tree with
  ``MaskedNode`` leaves, which a loss of the full model cannot evaluate, so RSO
  is left out of the masked test (``search=`` is RSO's way to leave leaves alone);
  RSO's state holds no parameter-shaped tree (per-path sigmas and counters), so
  ``optax.tree.map_params`` has nothing to map and ``init`` with Optax's
  parameter placeholder (an empty pytree) raises ``ValueError`` ("no parameter
  is searched"), which the test asserts.

Convergence criteria were measured first (float32, CPU) and set with margin:
quadratic (condition number 4, 21 parameters, lr 0.1): every gradient-based
case reached a factor >= 6e4 in 300 steps (criterion 1e3), except the
cumulative mean emitted as a direction (an averaged gradient, not an
optimizer: factor 32, criterion 5); Rosenbrock from the standard start
(-1.2, 1) stored as a 2x1 Dense kernel, so the neuron mean runs over x and y,
lr 2e-3, 1000 steps: factors 435 to 2e5 (criterion 50), cumulative mean 14
(criterion 3); RSO: 100 weight visits, Rosenbrock factor 641 (criterion 50).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_neuron as on


@dataclasses.dataclass(frozen=True)
class Case:
    """One public transformation in one mode.

    Attributes:
      name: test id.
      factory: the public function.
      numeric: numeric hyperparameters (injected by ``optax.inject_hyperparams``).
      static: everything else (``static_args`` of ``inject_hyperparams``).
      kind: ``"direction"``, ``"optimizer"``, ``"monitor"`` or ``"rso"``.
      param_fields: state fields that hold parameter-shaped trees (mapped by
        ``optax.tree.map_params``).
      converge: ``{problem: (steps, factor)}`` overriding the kind's criterion.
    """

    name: str
    factory: Callable[..., optax.GradientTransformation]
    numeric: dict
    static: dict
    kind: str
    param_fields: tuple[str, ...] = ()
    converge: dict = dataclasses.field(default_factory=dict)

    def make(self, **overrides) -> optax.GradientTransformation:
        return self.factory(**{**self.numeric, **self.static, **overrides})

    def make_injected(self, **overrides) -> optax.GradientTransformation:
        inject = optax.inject_hyperparams(self.factory, static_args=tuple(self.static))
        return inject(**{**self.numeric, **self.static, **overrides})

    def __repr__(self) -> str:
        return self.name


# ------------------------------------------------------------------ the registry
CASES = [
    Case(
        "neuron_mean_trace",
        on.neuron_mean_trace,
        {"decay": 0.9},
        {},
        "direction",
        ("neuron_momentum",),
    ),
    Case(
        "neuron_mean_trace_nesterov",
        on.neuron_mean_trace,
        {"decay": 0.9},
        {"nesterov": True},
        "direction",
        ("neuron_momentum",),
    ),
    Case(
        "neuron_mean_sgd",
        on.neuron_mean_sgd,
        {"learning_rate": 0.05, "momentum": 0.9},
        {},
        "optimizer",
        ("neuron_momentum",),
    ),
    # Adam-type steps are ~lr long: Rosenbrock at lr 2e-3 falls by 5.7-6.1x in 1000 steps
    # (optax.adam: 6.06x).
    Case(
        "scale_by_neuron_adam",
        on.scale_by_neuron_adam,
        {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
        {},
        "direction",
        ("neuron_adam_mu", "neuron_adam_nu"),
        converge={"rosenbrock": (1000, 3.0)},
    ),
    Case(
        "scale_by_neuron_adam_neuron_mu",
        on.scale_by_neuron_adam,
        {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
        {"first_moment": "neuron"},
        "direction",
        ("neuron_adam_mu", "neuron_adam_nu"),
        converge={"rosenbrock": (1000, 3.0)},
    ),
    Case(
        "neuron_adam",
        on.neuron_adam,
        {"learning_rate": 0.05, "b1": 0.9, "b2": 0.999, "eps": 1e-8},
        {},
        "optimizer",
        ("neuron_adam_mu", "neuron_adam_nu"),
        converge={"rosenbrock": (1000, 3.0)},
    ),
    Case(
        "neuron_adamw",
        on.neuron_adamw,
        {"learning_rate": 0.05, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 1e-4},
        {"first_moment": "neuron"},
        "optimizer",
        ("neuron_adam_mu", "neuron_adam_nu"),
        converge={"rosenbrock": (1000, 3.0)},
    ),
    Case(
        "running_mean_cumulative",
        on.running_gradient_mean,
        {},
        {"decay": None, "emit": "updates"},
        "monitor",
        ("gradient_mean",),
    ),
    Case(
        "running_mean_cumulative_emit_mean",
        on.running_gradient_mean,
        {},
        {"decay": None, "emit": "mean"},
        "direction",
        ("gradient_mean",),
        converge={"quadratic": (300, 5.0), "rosenbrock": (1000, 3.0)},
    ),
    Case(
        "running_mean_ema",
        on.running_gradient_mean,
        {"decay": 0.9},
        {"emit": "updates"},
        "monitor",
        ("gradient_mean",),
    ),
    Case(
        "running_mean_ema_emit_mean",
        on.running_gradient_mean,
        {"decay": 0.9},
        {"emit": "mean"},
        "direction",
        ("gradient_mean",),
    ),
    Case(
        "gradient_norms",
        on.gradient_norms,
        {},
        {},
        "monitor",
        ("gradient_norm", "gradient_neuron_norm"),
    ),
    Case(
        "rso",
        on.rso,
        {"weight_decay": 1e-3},
        {"seed": 0, "weights_per_step": 3, "search": [("*", True)]},
        "rso",
    ),
]
IDS = [c.name for c in CASES]
GRADIENT_CASES = [c for c in CASES if c.kind != "rso"]

DEFAULT_CONVERGENCE = {"quadratic": (300, 1e3), "rosenbrock": (1000, 50.0)}
RSO_CONVERGENCE = {"quadratic": (100, 3.0), "rosenbrock": (100, 50.0)}
LEARNING_RATE = {"quadratic": 0.1, "rosenbrock": 2e-3}


# ------------------------------------------------------------------ shared helpers
SHAPES = {"dense": {"kernel": (5, 3), "bias": (3,)}, "out": {"kernel": (3, 2)}}


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def random_tree(seed: int, dtype: Any = jnp.float32, shapes: Any = None, scale: float = 1.0) -> Any:
    """A tree like ``shapes`` of N(0, scale) values drawn with NumPy."""
    rng = np.random.default_rng(seed)
    shapes = SHAPES if shapes is None else shapes
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.normal(size=s), dtype), shapes, is_leaf=_is_shape
    )


def quadratic_loss(target: Any) -> Callable[[Any], jax.Array]:
    """``0.5 * sum(h * (p - target)^2)`` with fixed curvatures h in [0.5, 2]."""
    rng = np.random.default_rng(1)
    h = jax.tree.map(lambda t: rng.uniform(0.5, 2.0, np.shape(t)), target)

    def loss(p):
        terms = jax.tree.map(
            lambda x, c, hh: jnp.sum(0.5 * jnp.asarray(hh, x.dtype) * (x - c) ** 2), p, target, h
        )
        return sum(jax.tree.leaves(terms))

    return loss


def rosenbrock(p):
    x, y = p["dense"]["kernel"][0, 0], p["dense"]["kernel"][1, 0]
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def as_optimizer(case: Case, lr: float) -> optax.GradientTransformation:
    """The case turned into a complete optimizer for the convergence tests."""
    if case.kind == "direction":
        return optax.chain(case.make(), optax.scale(-lr))
    if case.kind == "optimizer":
        return case.make(learning_rate=lr)
    if case.kind == "monitor":
        return optax.chain(case.make(), optax.sgd(lr, momentum=0.9))
    return case.make()


def update(case: Case, tx, grads, state, params, loss, **extra):
    """``tx.update`` with the loss handed to RSO as ``value_fn``."""
    if case.kind != "rso":
        return tx.update(grads, state, params, **extra)
    # RSO traces a loop per call: jit it once per (transformation, loss) so
    # that eager test steps do not recompile it every time.
    key = (
        tx,
        loss,
        tuple(sorted(extra.items(), key=lambda kv: kv[0]))
        if not any(isinstance(v, jax.Array) for v in extra.values())
        else tuple(extra),
    )
    if key not in _RSO_STEPS:
        static = {k: v for k, v in extra.items() if not isinstance(v, jax.Array)}
        _RSO_STEPS[key] = jax.jit(
            lambda g, s, p, **dyn: tx.update(g, s, p, value_fn=loss, **static, **dyn)
        )
    dynamic = {k: v for k, v in extra.items() if isinstance(v, jax.Array)}
    return _RSO_STEPS[key](grads, state, params, **dynamic)


_RSO_STEPS: dict = {}


def run_steps(case: Case, tx, params, loss, steps: int, seed: int = 3):
    """``steps`` jitted updates with the gradient of ``loss`` (or the loss, for RSO)."""
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = update(case, tx, g, s, p, loss)
        return optax.apply_updates(p, u), s, u

    out = []
    for _ in range(steps):
        params, state, u = step(params, state)
        out.append(u)
    return params, state, out


def _as_numpy(x):
    x = np.asarray(x)
    return x.astype(np.float64) if jnp.issubdtype(x.dtype, jnp.inexact) else x


def assert_trees_equal(a, b, exact: bool = True, rtol: float = 1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b), (
        jax.tree.structure(a),
        jax.tree.structure(b),
    )
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert jnp.shape(x) == jnp.shape(y) and jnp.result_type(x) == jnp.result_type(y)
        x, y = _as_numpy(x), _as_numpy(y)
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=0)


# ------------------------------------------------------------------ convergence
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("problem", ["quadratic", "rosenbrock"])
def test_convergence(case, problem):
    if problem == "quadratic":
        x0, loss = random_tree(0), quadratic_loss(random_tree(2))
    else:
        x0, loss = {"dense": {"kernel": jnp.array([[-1.2], [1.0]], jnp.float32)}}, rosenbrock
    steps, factor = (
        case.converge.get(problem)
        or (RSO_CONVERGENCE if case.kind == "rso" else DEFAULT_CONVERGENCE)[problem]
    )
    tx = as_optimizer(case, LEARNING_RATE[problem])
    state = tx.init(x0)

    def body(carry, _):
        p, s = carry
        u, s = update(case, tx, jax.grad(loss)(p), s, p, loss)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))((x0, state))
    l0, l1 = float(loss(x0)), float(loss(params))
    assert np.isfinite(l1) and l1 * factor <= l0, (
        f"{case.name} on {problem}: {l0} -> {l1} in {steps} steps"
    )


def test_monitors_pass_updates_through_unchanged():
    params, grads = random_tree(0), random_tree(1)
    for case in (c for c in CASES if c.kind == "monitor"):
        tx = case.make()
        out, _ = tx.update(grads, tx.init(params), params)
        assert_trees_equal(out, grads)


# ------------------------------------------------------------------ dtypes
DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_dtype_preserved(case, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        params = random_tree(0, dtype)
        loss = quadratic_loss(random_tree(2, dtype))
        tx = case.make()
        state0 = tx.init(params)
        params_, state, ups = run_steps(case, tx, params, loss, 2)
        for u in ups:
            assert jax.tree.structure(u) == jax.tree.structure(params)
            for leaf, p in zip(jax.tree.leaves(u), jax.tree.leaves(params), strict=True):
                assert leaf.dtype == jnp.dtype(dtype) and leaf.shape == p.shape
        assert jax.tree.map(lambda x: (x.dtype, x.shape), state) == jax.tree.map(
            lambda x: (x.dtype, x.shape), state0
        )
        assert all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(params_))
        assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in jax.tree.leaves(ups))


# ------------------------------------------------------------------ lax.cond and jit
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_stable_through_cond_and_jit_compiles_once(case):
    params, grads = random_tree(0), random_tree(1)
    loss = quadratic_loss(random_tree(2))
    tx = case.make()
    state0 = tx.init(params)
    traces = []

    @jax.jit
    def step(s, pred):
        traces.append(1)
        # lax.cond needs both branches to return the same structure, shapes and dtypes.
        return jax.lax.cond(
            pred, lambda s: update(case, tx, grads, s, params, loss)[1], lambda s: s, s
        )

    s_skip = step(state0, False)
    assert_trees_equal(s_skip, state0)
    s1 = step(state0, True)
    s2 = step(s1, True)
    assert len(traces) == 1, (
        "the step was traced again: the state changed structure, shape or dtype"
    )
    _, ref1 = update(case, tx, grads, state0, params, loss)
    assert_trees_equal(s1, ref1, exact=False)
    assert jax.tree.structure(s2) == jax.tree.structure(state0)


# ------------------------------------------------------------------ inject_hyperparams
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inject_hyperparams_identical(case):
    params = random_tree(0)
    loss = quadratic_loss(random_tree(2))
    plain, injected = case.make(), case.make_injected()
    s_plain, s_inj = plain.init(params), injected.init(params)
    assert set(s_inj.hyperparams) == set(case.numeric)
    for t in range(3):
        g = random_tree(10 + t)
        u_plain, s_plain = update(case, plain, g, s_plain, params, loss)
        u_inj, s_inj = update(case, injected, g, s_inj, params, loss)
        assert_trees_equal(u_inj, u_plain)
        assert_trees_equal(s_inj.inner_state, s_plain)
    # A hyperparameter changed in the state takes effect like a rebuilt transformation.
    for name, value in case.numeric.items():
        changed = case.make(**{name: value / 2})
        s_changed = changed.init(params)
        s_inj2 = injected.init(params)
        s_inj2.hyperparams[name] = jnp.asarray(value / 2, jnp.float32)
        for t in range(2):
            g = random_tree(20 + t)
            u_changed, s_changed = update(case, changed, g, s_changed, params, loss)
            u_inj2, s_inj2 = update(case, injected, g, s_inj2, params, loss)
            assert_trees_equal(u_inj2, u_changed)


# ------------------------------------------------------------------ MultiSteps
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_multi_steps(case):
    k = 3
    params = random_tree(0)
    loss = quadratic_loss(random_tree(2))
    tx = case.make()
    multi = optax.MultiSteps(tx, every_k_schedule=k)
    state = multi.init(params)
    grads = [random_tree(30 + t) for t in range(k)]
    for t, g in enumerate(grads):
        u, state = update(case, multi, g, state, params, loss)
        if t < k - 1:
            assert all(not bool(jnp.any(x)) for x in jax.tree.leaves(u)), (
                "MultiSteps emitted before the k-th step"
            )
    mean_g = jax.tree.map(lambda *xs: sum(xs) / k, *grads)
    ref_u, ref_state = update(case, tx, mean_g, tx.init(params), params, loss)
    assert_trees_equal(u, ref_u, exact=False, rtol=1e-5)
    assert_trees_equal(state.inner_opt_state, ref_state, exact=False, rtol=1e-5)


# ------------------------------------------------------------------ extra arguments
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unknown_extra_args_accepted(case):
    params, grads = random_tree(0), random_tree(1)
    loss = quadratic_loss(random_tree(2))
    tx = case.make()
    state = tx.init(params)
    ref = update(case, tx, grads, state, params, loss)
    got = update(
        case, tx, grads, state, params, loss, unknown_array=jnp.ones(3), unknown_flag="ignored"
    )
    assert_trees_equal(got, ref)


# ------------------------------------------------------------------ None and masked leaves
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_none_leaves_pass_through(case):
    full_p, full_g = random_tree(0), random_tree(1)
    target = random_tree(2)
    without = lambda t: {"dense": {"kernel": t["dense"]["kernel"]}, "out": t["out"]}
    with_none = lambda t: {"dense": {"kernel": t["dense"]["kernel"], "bias": None}, "out": t["out"]}
    ref_loss = quadratic_loss(without(target))
    loss = lambda p: ref_loss(without(p))
    tx = case.make()
    s_none, s_ref = tx.init(with_none(full_p)), tx.init(without(full_p))
    for _ in range(2):
        u_none, s_none = update(case, tx, with_none(full_g), s_none, with_none(full_p), loss)
        u_ref, s_ref = update(case, tx, without(full_g), s_ref, without(full_p), loss)
        assert u_none["dense"]["bias"] is None
        assert_trees_equal(without(u_none), u_ref)
    assert jax.tree.leaves(s_none) and len(jax.tree.leaves(s_none)) == len(jax.tree.leaves(s_ref))


@pytest.mark.parametrize("case", GRADIENT_CASES, ids=[c.name for c in GRADIENT_CASES])
def test_optax_masked(case):
    params, grads = random_tree(0), random_tree(1)
    mask = {"dense": {"kernel": True, "bias": False}, "out": {"kernel": True}}
    tx, masked = case.make(), optax.masked(case.make(), mask)
    kept = {"dense": {"kernel": params["dense"]["kernel"], "bias": None}, "out": params["out"]}
    u_ref, _ = tx.update(
        {"dense": {"kernel": grads["dense"]["kernel"], "bias": None}, "out": grads["out"]},
        tx.init(kept),
        kept,
    )  # params: weight decay (neuron_adamw) needs them
    u, _ = masked.update(grads, masked.init(params), params)
    np.testing.assert_array_equal(
        u["dense"]["bias"], grads["dense"]["bias"]
    )  # masked out: untouched
    assert_trees_equal(
        {"k": u["dense"]["kernel"], "o": u["out"]},
        {"k": u_ref["dense"]["kernel"], "o": u_ref["out"]},
    )


# ------------------------------------------------------------------ map_params / placeholder
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tree_map_params(case):
    params, grads = random_tree(0), random_tree(1)
    loss = quadratic_loss(random_tree(2))
    tx = case.make()
    _, state = update(case, tx, grads, tx.init(params), params, loss)
    if case.kind == "rso":
        # No parameter-shaped tree in RSO's state; init(placeholder) has nothing to search.
        with pytest.raises(ValueError, match="no parameter is searched"):
            optax.tree.map_params(tx, lambda x: x, state)
        return
    assert case.param_fields
    mapped = optax.tree.map_params(tx, lambda x: 2 * x, state)
    for field in case.param_fields:
        got, want = (
            optax.tree.get(mapped, field),
            jax.tree.map(lambda x: 2 * x, optax.tree.get(state, field)),
        )
        assert_trees_equal(got, want)
    # Everything else (counters, global norms, empty states) is left alone.
    restored = optax.tree.set(mapped, **{f: optax.tree.get(state, f) for f in case.param_fields})
    assert_trees_equal(restored, state)
    # The placeholder path also works for the sharding use-case: a spec per parameter.
    specs = optax.tree.map_params(
        tx,
        lambda _, spec: spec,
        state,
        jax.tree.map(lambda _: "spec", params),
        transform_non_params=lambda _: None,
    )
    for field in case.param_fields:
        assert set(jax.tree.leaves(optax.tree.get(specs, field))) == {"spec"}
