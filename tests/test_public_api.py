"""The public API (``__all__``, ``help()``) and the private helpers every module shares.

The shared helpers of ``_tree`` and ``_validate`` are checked against hand-written
expectations and plain NumPy.
"""

from __future__ import annotations

import pydoc

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_neuron as on
from optax_neuron import _tree, _validate, fan_in

# ------------------------------------------------------------------ public names


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        _ = on.not_a_name
    # Names of an API that was never released are not kept as aliases.
    for name in ("metrics", "resolve_fan_in", "NeuronMeanTraceState"):
        assert not hasattr(on, name), name
    assert not hasattr(fan_in, "NONE") and not hasattr(fan_in, "resolve_fan_in")


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
    ("shape", "axes"),
    [
        ((3, 4), (0,)),
        ((2, 3, 5), (0, 1)),
        ((4, 3), (1,)),
        ((2, 3, 4), (1,)),
        ((3, 4), ()),
        ((0, 4), (0,)),
    ],
)
def test_fan_in_mean_matches_numpy(shape, axes):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) - 3.5
    got = np.asarray(_tree.fan_in_mean(jnp.asarray(x), axes, jnp.float32))
    if not axes:
        expected = x
    elif x.size == 0:
        expected = np.zeros([1 if i in axes else d for i, d in enumerate(shape)], np.float32)
    else:
        expected = x.mean(axis=axes, keepdims=True)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_check_float_dtype():
    assert _validate.check_float_dtype(None, "mu_dtype") is None
    assert _validate.check_float_dtype("bfloat16", "mu_dtype") == jnp.bfloat16
    with pytest.raises(ValueError, match=r"^f: accumulator_dtype must be a floating-point dtype"):
        _validate.check_float_dtype(jnp.int32, "accumulator_dtype", "f")
    with pytest.raises(ValueError, match=r"^mu_dtype must be a floating-point dtype, got 'x1'$"):
        _validate.check_float_dtype("x1", "mu_dtype")
    # Each transformation that keeps state in such a dtype goes through it.
    for build in (
        lambda: on.neuron_mean_trace(0.9, accumulator_dtype=jnp.int8),
        lambda: on.scale_by_neuron_adam(mu_dtype=jnp.int8),
        lambda: on.running_gradient_mean(accumulator_dtype=jnp.int8),
    ):
        with pytest.raises(ValueError, match="must be a floating-point dtype, got int8"):
            build()


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
