"""optax_neuron: composable Optax gradient transformations that know about neurons.

The public API. ``optax_neuron.fan_in`` holds the fan-in rules and presets.
"""

from optax_neuron import fan_in
from optax_neuron.fan_in import fan_in_axes, resolve_fan_in

# Neuron-mean momentum.
from optax_neuron.neuron_mean import NeuronMeanTraceState, neuron_mean_sgd, neuron_mean_trace

# Running gradient statistics and their read-out.
from optax_neuron import grad_stats
from optax_neuron.grad_stats import (
    GradientNormsState,
    RunningGradientMeanState,
    gradient_norms,
    leaf_norms,
    metrics,
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
    dense_layer,
    rso,
    rso_init,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "fan_in",
    "fan_in_axes",
    "resolve_fan_in",
    "NeuronMeanTraceState",
    "neuron_mean_sgd",
    "neuron_mean_trace",
    "GradientNormsState",
    "RunningGradientMeanState",
    "grad_stats",
    "gradient_norms",
    "leaf_norms",
    "metrics",
    "neuron_norms",
    "running_gradient_mean",
    "summary_writer",
    "write_metrics",
    "ChannelwiseLayer",
    "LayerStack",
    "LinearLayer",
    "RSOState",
    "channelwise",
    "conv_layer",
    "dense_layer",
    "rso",
    "rso_init",
]
