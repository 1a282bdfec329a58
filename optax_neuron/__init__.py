"""optax_neuron: Optax gradient transformations that know which weights feed which neuron.

Every piece is an ordinary ``optax.GradientTransformation``: chain it, mask it,
wrap it in ``optax.inject_hyperparams`` or ``optax.MultiSteps``, hand it to
``flax.nnx.Optimizer``. The *fan-in* of a neuron (the axes of a parameter over
which its incoming connections run, e.g. axis 0 of a Dense kernel ``W[in, out]``)
is read from each parameter's path.

Fan-in axes (module :mod:`optax_neuron.fan_in`)
  ``fan_in_axes(params, fan_in=None)`` -- the axes of every leaf. ``fan_in=`` on
  every transformation takes ``None`` (the default preset: Flax/Haiku names,
  then the ``x @ W`` guess for plain pytrees), a rules list such as
  ``fan_in.TORCH`` (out-first layouts) or ``fan_in.FLAX_STRICT``, a tree of
  axes, or a callable.
  ``fan_in.from_computation(apply, params, example_x)`` reads the axes from
  the model's computation (its jaxpr) instead of its parameter paths.

Neuron-mean momentum (module :mod:`optax_neuron.neuron_mean`)
  ``neuron_mean_trace(decay)`` and ``neuron_mean_sgd(learning_rate, momentum)``:
  the momentum of a connection replaced by the mean momentum of the incoming
  connections of its neuron, ``a <- g + mu * mean_fanin(a)``, kept as one value
  per neuron (``fan_in`` times less state than ``optax.sgd``'s momentum).

Neuron-wise Adam (module :mod:`optax_neuron.neuron_adam`)
  ``scale_by_neuron_adam``, ``neuron_adam(learning_rate)``, ``neuron_adamw``:
  Adam with one second moment per neuron, ``v <- b2 v + (1 - b2) mean_fanin(g^2)``
  (Adam-mini's rule), and a full (``first_moment="full"``) or per-neuron
  (``"neuron"``) first moment.

Gradient statistics (module :mod:`optax_neuron.grad_stats`)
  ``running_gradient_mean(decay=None)`` (cumulative or EMA mean of the updates),
  ``gradient_norms()`` (per-leaf, global and per-neuron L2 norms),
  ``collect_metrics(opt_state)`` (all of them as a flat ``{name: value}`` dict),
  ``leaf_norms`` / ``neuron_norms`` (measures for ``optax.snapshot``), and
  ``summary_writer`` / ``write_metrics`` (TensorBoard, needs tensorboardX).

RSO, random search without gradients (Tripathi and Singh, 2020)
  ``rso(...)``, ``rso_init(key, params)`` and the layer stacks of the fast path
  (``LayerStack``, ``dense_layer``, ``conv_layer``).

The state classes (``NeuronMeanTraceState``, ``ScaleByNeuronAdamState``,
``RunningGradientMeanState``, ``GradientNormsState``) live in their modules;
find their fields in any state with ``optax.tree.get(state, "neuron_momentum")``.

Example:
  >>> import jax.numpy as jnp, optax
  >>> import optax_neuron as on
  >>> tx = optax.chain(on.gradient_norms(), on.neuron_mean_sgd(0.1, momentum=0.9))
  >>> params = {"W1": jnp.ones((3, 2)), "b1": jnp.zeros(2)}  # plain pytrees work
  >>> state = tx.init(params)
  >>> updates, state = tx.update(params, state, params)
  >>> float(on.collect_metrics(state)["gradient_norm/W1"])
  2.4494898319244385

The MNIST application (``python -m optax_neuron.mnist``) is the subpackage
:mod:`optax_neuron.mnist` (extra ``[mnist]``).
"""

# Fan-in axes.
from optax_neuron import fan_in
from optax_neuron.fan_in import fan_in_axes

# Neuron-mean momentum.
from optax_neuron.neuron_mean import neuron_mean_sgd, neuron_mean_trace

# Neuron-wise Adam.
from optax_neuron.neuron_adam import neuron_adam, neuron_adamw, scale_by_neuron_adam

# Running gradient statistics and their read-out.
from optax_neuron import grad_stats
from optax_neuron.grad_stats import (
    collect_metrics,
    gradient_norms,
    leaf_norms,
    neuron_norms,
    running_gradient_mean,
)
from optax_neuron.tensorboard import summary_writer, write_metrics

# RSO random search.
from optax_neuron.rso import (
    ChannelwiseLayer,
    LayerStack,
    LinearLayer,
    RSOState,
    channelwise,
    conv_layer,
    conv_padding,
    dense_layer,
    rso,
    rso_init,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # fan-in axes
    "fan_in",
    "fan_in_axes",
    # neuron-mean momentum
    "neuron_mean_sgd",
    "neuron_mean_trace",
    # neuron-wise Adam
    "neuron_adam",
    "neuron_adamw",
    "scale_by_neuron_adam",
    # gradient statistics
    "collect_metrics",
    "grad_stats",
    "gradient_norms",
    "leaf_norms",
    "neuron_norms",
    "running_gradient_mean",
    "summary_writer",
    "write_metrics",
    # RSO
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
