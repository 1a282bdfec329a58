"""The flat draws of ``optax_neuron._random``: the values of JAX's shaped draws, exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from optax_neuron import _random
from optax_neuron.mnist.models import _conv


@pytest.mark.parametrize(
    ("shape", "dtype", "partitionable"),
    [
        ((), jnp.float32, True),
        ((2, 6, 7, 5), jnp.float32, True),
        ((2, 6, 7, 5), jnp.bfloat16, False),
    ],
)
def test_flat_draws_equal_the_shaped_draws(shape, dtype, partitionable):
    key = jax.random.key(11)
    with jax.threefry_partitionable(partitionable):
        np.testing.assert_array_equal(
            _random.normal(key, shape, dtype), jax.random.normal(key, shape, dtype)
        )
        np.testing.assert_array_equal(
            _random.uniform(key, shape, dtype, -1.0, 2.0),
            jax.random.uniform(key, shape, dtype, -1.0, 2.0),
        )


def test_lecun_normal_is_flax_default():
    shape = (3, 3, 2, 4)
    key = jax.random.key(2)
    np.testing.assert_array_equal(
        _random.lecun_normal(key, shape), nnx.initializers.lecun_normal()(key, shape)
    )


def test_application_conv_kernels_are_flax_defaults():
    ours = _conv(2, 4, rngs=nnx.Rngs(5), use_bias=False)
    flax_default = nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(5), use_bias=False)
    np.testing.assert_array_equal(ours.kernel[...], flax_default.kernel[...])
