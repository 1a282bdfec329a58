"""The public names: renamed API, deprecated aliases, shared helpers, ``help()``.

Each old name must still work for one release, give the same result as the new
one and say (``DeprecationWarning``) what to use instead. The shared helpers of
``_tree`` and ``_validate`` are checked against hand-written expectations.
"""

from __future__ import annotations

import importlib
import pydoc
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_neuron as on
from optax_neuron import _tree, _validate, fan_in

PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}


def _state():
    tx = optax.chain(on.gradient_norms(), on.running_gradient_mean())
    _, state = tx.update(PARAMS, tx.init(PARAMS), PARAMS)
    return state


# ------------------------------------------------------------------ deprecated aliases


def test_resolve_fan_in_is_fan_in_axes_with_the_old_argument_order():
    rules = [("*kernel", (0,)), ("*bias", ())]
    for old in (lambda: on.resolve_fan_in, lambda: fan_in.resolve_fan_in):
        with pytest.warns(DeprecationWarning, match=r"fan_in_axes\(tree, fan_in\)"):
            resolve = old()
            got = resolve(rules, PARAMS)
        assert got == on.fan_in_axes(PARAMS, rules) == {"dense": {"kernel": (0,), "bias": ()}}


def test_none_constant_is_no_axes():
    with pytest.warns(DeprecationWarning, match=r"fan_in\.NONE is deprecated; use .*NO_AXES"):
        old = fan_in.NONE
    assert old is fan_in.NO_AXES
    assert old((3, 4)) == ()
    with pytest.warns(DeprecationWarning):
        from optax_neuron.fan_in import NONE  # noqa: F401  (the import form works too)


def test_metrics_is_collect_metrics():
    state = _state()
    expected = on.collect_metrics(state)
    assert set(expected) == {
        "gradient_norm/dense/kernel",
        "gradient_norm/dense/bias",
        "gradient_norm/global",
        "gradient_mean_norm/dense/kernel",
        "gradient_mean_norm/dense/bias",
    }
    np.testing.assert_allclose(expected["gradient_norm/dense/kernel"], np.sqrt(6.0))
    with pytest.warns(DeprecationWarning, match="use optax_neuron.collect_metrics"):
        top = on.metrics(state, per_neuron=True)
    with pytest.warns(DeprecationWarning, match="use optax_neuron.collect_metrics"):
        module = on.grad_stats.metrics(state)
    with pytest.warns(DeprecationWarning):
        from optax_neuron import metrics  # the import form goes through the same alias
    assert module.keys() == expected.keys()
    assert set(top) == set(on.collect_metrics(state, per_neuron=True))
    assert metrics is on.collect_metrics


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("NeuronMeanTraceState", "neuron_mean"),
        ("RunningGradientMeanState", "grad_stats"),
        ("GradientNormsState", "grad_stats"),
    ],
)
def test_state_classes_moved_to_their_modules(name, module):
    home = getattr(importlib.import_module(f"optax_neuron.{module}"), name)
    with pytest.warns(DeprecationWarning, match=rf"optax_neuron\.{module}\.{name}"):
        old = getattr(on, name)
    assert old is home
    assert name not in on.__all__


def test_new_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on.fan_in_axes(PARAMS)
        on.fan_in_axes(PARAMS, fan_in.FLAX_STRICT)
        on.collect_metrics(_state())
        on.neuron_mean_sgd(0.1).init(PARAMS)
        assert fan_in.NO_AXES((2,)) == ()


def test_unknown_attribute_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        _ = on.not_a_name
    with pytest.raises(AttributeError, match="no attribute 'NONE_'"):
        _ = fan_in.NONE_


def test_public_names_exist():
    for name in on.__all__:
        assert hasattr(on, name), name
    for name in fan_in.__all__:
        assert hasattr(fan_in, name), name


# ------------------------------------------------------------------ help(optax_neuron)


def test_help_shows_an_overview_not_namedtuple_boilerplate():
    text = pydoc.render_doc(on, renderer=pydoc.plaintext)
    head = text[:3000]
    for word in ("fan_in_axes", "neuron_mean_sgd", "collect_metrics", "gradient_norms", "rso"):
        assert word in head, word
    # The state classes (NamedTuples: _asdict, _make, _replace, count, index, ...) are
    # documented in their modules, not on the package page.
    for name in ("NeuronMeanTraceState", "RunningGradientMeanState", "GradientNormsState"):
        assert f"class {name}" not in text


# ------------------------------------------------------------------ shared helpers


def test_path_str_and_leaves_with_paths():
    tree = {"enc": [{"kernel": 1}, None], "b": (2,)}
    pairs, treedef = _tree.leaves_with_paths(tree)
    assert pairs == [("b/0", 2), ("enc/0/kernel", 1), ("enc/1", None)]
    assert treedef.num_leaves == 3
    assert _tree.leaves_with_paths(tree, keep_none=False)[0] == [("b/0", 2), ("enc/0/kernel", 1)]
    keys = (jax.tree_util.DictKey("a"), jax.tree_util.SequenceKey(0))
    value = jax.tree_util.GetAttrKey("value")
    assert _tree.path_str((*keys, value)) == "a/0"  # nnx Variable wrapper dropped
    assert _tree.path_str((jax.tree_util.DictKey("value"),)) == "value"  # a module named value
    assert _tree.path_str(()) == ""
    assert fan_in.path_str is _tree.path_str  # one home, re-exported


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        ((jnp.bfloat16,), jnp.float32),
        ((jnp.float16,), jnp.float32),
        ((jnp.int32,), jnp.float32),
        ((jnp.bool_,), jnp.float32),
        ((jnp.float32,), jnp.float32),
        ((jnp.bfloat16, jnp.float16), jnp.float32),
        ((jnp.complex64,), jnp.complex64),
    ],
)
def test_at_least_float32(dtypes, expected):
    assert _tree.at_least_float32(*dtypes) == jnp.dtype(expected)


def test_check_unit_interval():
    check = _validate.check_unit_interval
    for ok in (0.0, 0.5, np.float32(0.99), jnp.asarray(0.9), 0):
        check(ok, "momentum", "f")
    check(None, "decay", "f", allow_none=True)
    with pytest.raises(
        ValueError, match=r"^f: decay must be a number in \(0, 1\) or None, got 0.0$"
    ):
        check(0.0, "decay", "f", open_low=True, allow_none=True)
    with pytest.raises(ValueError, match=r"^f: momentum must be a number in \[0, 1\), got nan$"):
        check(float("nan"), "momentum", "f")
    with pytest.raises(TypeError, match=r"^f: momentum must be .* got None of type NoneType$"):
        check(None, "momentum", "f")
    with pytest.raises(ValueError, match=r"must be a scalar .* got shape \(2,\)"):
        check(np.array([0.1, 0.2]), "momentum", "f")

    @jax.jit
    def traced(mu):  # inject_hyperparams passes traced values: not checked, not an error
        check(mu, "momentum", "f")
        return mu

    assert float(traced(0.5)) == 0.5


def test_check_learning_rate():
    check = _validate.check_learning_rate
    for ok in (0.1, 1, np.float64(1e-3), jnp.asarray(0.1), optax.linear_schedule(0.1, 0.0, 10)):
        check(ok, "g")
    with pytest.raises(TypeError, match=r"^g: learning_rate must be a number or an optax schedule"):
        check("abc", "g")
    with pytest.raises(ValueError, match=r"^g: learning_rate must be finite, got inf$"):
        check(float("inf"), "g")


def test_rule_list_checks():
    assert _validate.is_rule_list([("*", 0)])
    assert _validate.is_rule_list(fan_in.TORCH)
    for not_rules in ([], {"a": (0,)}, [("*", 0, 1)], [(0, "*")], "abc", None):
        assert not _validate.is_rule_list(not_rules)
    assert _validate.check_rule_list([("*", True)], "search", "rso") == (("*", True),)
    with pytest.raises(
        TypeError, match=r"^rso: search= must be a non-empty list of \(glob, value\)"
    ):
        _validate.check_rule_list({"kernel": True}, "search", "rso")


def test_require_numeric_and_floating_name_the_leaf():
    tree = {"a": jnp.zeros(2), "b": {"c": jnp.zeros(2, jnp.int32)}, "m": None}
    _validate.require_numeric(tree, "f", "updates")
    with pytest.raises(TypeError, match=r"^f needs floating-point updates; update 'b/c' has dtype"):
        _validate.require_floating(tree, "f", "updates")
    zero = {"g": np.zeros(2, jax.dtypes.float0)}
    with pytest.raises(TypeError, match=r"^f needs numeric parameters; parameter 'g' has dtype"):
        _validate.require_numeric(zero, "f", "parameters")
