"""RSO: gradient-free random search over single weights, as an Optax transformation.

RSO (Tripathi & Singh, 2020, "RSO: A Gradient Free Sampling Based Approach For Training
Deep Neural Networks", https://arxiv.org/abs/2005.05955; official code
rohun-tripathi/RSO-gradient-free) visits the weights one at a time and for weight ``w``
of leaf ``d`` draws ``dw ~ N(0, sigma_d)`` and keeps

.. math::

    w \\leftarrow \\operatorname{argmin}_{v \\in \\{w,\\, w + dw,\\, w - dw\\}} F(v)

where ``F`` is the loss on a minibatch. One *cycle* visits every searched weight once.

API note (for the application)::

    tx = rso(seed=0, weights_per_step=chunk,
             sigma=[("*scale", 0.167), ("*bias", 0.167), ("*", "he")],   # official steps
             anneal=optax.linear_schedule(1.0, 0.1, T),   # = 0.1 + 0.9 (T - c) / T
             order=[...globs: dense first, convs last to first, kernel, BN bias, BN scale],
             within="neuron",          # output channel, input channel, kernel position
             weight_decay=1e-4)        # per visit; "keep" keeps w (1 - wd)
    updates, state = tx.update(params, state, params, value_fn=LayerStack(layers, loss, x, y))

Fast path: give ``value_fn`` as a ``LayerStack`` whose layers are ``conv_layer`` /
``dense_layer`` (linear in one kernel) and ``channelwise(fn, per_channel=[paths])`` for
ReLU, pooling, BatchNorm with batch statistics and biases (declared channel-wise: channel
``c`` of the output depends on channel ``c`` of the input only). A candidate of a kernel
then costs one column, one channel through the channel-wise layers, one input-channel
slice of the next linear layer, and the layers after that in full; a BatchNorm scale or
shift named in ``per_channel`` re-runs its one channel through the norm and takes the same
path. A plain function layer ends that path (it re-runs from its cached input with one
channel replaced).

The official code's data: ``LayerStack(layers, loss, x_train, y_train, batch=B)`` with
``rso(per_weight_batch=True)`` scores every weight on ``B`` fresh rows of its layer's
input over the whole data set, computed once per leaf.

Modules:

* :mod:`~optax_neuron.rso.plan`: what is searched, leaf order, order inside a leaf,
  steps (``sigma``), the owner layer of each leaf;
* :mod:`~optax_neuron.rso.rule`: the random draw and the choice rule (written once; the
  PRNG scheme is documented there);
* :mod:`~optax_neuron.rso.evaluators`: black box, cached layer stack, incremental,
  fresh rows per weight (sampled), behind one protocol (``start``, ``scores``, ``commit``);
* :mod:`~optax_neuron.rso.search`: the search loop (one body, named carries);
* :mod:`~optax_neuron.rso.layers`: ``LayerStack``, ``LinearLayer``, ``dense_layer``,
  ``conv_layer``, ``conv_padding``, ``channelwise``;
* :mod:`~optax_neuron.rso.transform`: ``rso``, ``RSOState``, ``rso_init``.

Sharding: leaves sharded over Explicit mesh axes (the default of ``jax.make_mesh``) are
gathered for the call (``jax.sharding.reshard`` to replicated) and the update is
resharded to the leaf's spec; Auto meshes are left to the compiler.
"""

from optax_neuron.rso.layers import (
    ChannelwiseLayer,
    LayerStack,
    LinearLayer,
    channelwise,
    conv_layer,
    conv_padding,
    dense_layer,
)
from optax_neuron.rso.transform import RSOState, rso, rso_init

__all__ = [
    "ChannelwiseLayer",
    "LayerStack",
    "LinearLayer",
    "RSOState",
    "channelwise",
    "conv_layer",
    "conv_padding",
    "dense_layer",
    "rso",
    "rso_init",
]
