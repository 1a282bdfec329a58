"""Layer stacks: a loss written as a sequence of layers, so the search can reuse activations.

``LayerStack(layers, loss, inputs, targets)`` is an ordinary loss
(``stack(params)``) that :func:`optax_neuron.rso` can also take apart:

* any layer ``f(params, h) -> h`` (a plain function): the search caches the input
  of the layer that owns the searched leaf and re-runs from there;
* :func:`dense_layer` / :func:`conv_layer` (a :class:`LinearLayer`): a candidate
  change of one kernel element is added to the cached output as one column;
* :func:`channelwise` (a :class:`ChannelwiseLayer`): a layer acting on every channel
  (last axis) independently -- ReLU, pooling, BatchNorm with batch statistics, a
  bias. A change confined to one channel stays in that channel through such layers,
  so the search carries one channel through them and updates the output of the next
  :class:`LinearLayer` with one input-channel slice of its kernel; only the layers
  after that one run in full. A layer that is not declared channel-wise ends this path.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_neuron._tree import leaves_with_paths

__all__ = [
    "ChannelwiseLayer",
    "LayerStack",
    "LinearLayer",
    "channelwise",
    "conv_layer",
    "conv_padding",
    "dense_layer",
]


def leaf_at(params: Any, path: str) -> Any:
    """The leaf of ``params`` at ``path`` (``a/b/c``); a clear error naming the path."""
    flat = leaves_with_paths(params)[0]
    for p, x in flat:
        if p == path:
            return x
    paths = [p for p, _ in flat]
    raise ValueError(f"layer parameter {path!r} is not a parameter path; paths: {paths[:10]}")


def _replace_at(params: Any, values: dict[str, Any]) -> Any:
    """``params`` with the leaves at the given paths replaced."""
    flat, treedef = leaves_with_paths(params)
    return jax.tree_util.tree_unflatten(treedef, [values.get(p, x) for p, x in flat])


def materialised(fn: Callable[[], Any], index: jax.Array) -> Any:
    """``fn()``, computed into buffers of its own: the true branch of a ``lax.cond`` on a
    predicate that always holds but XLA cannot fold (``index >= 0``, a traced element
    index; the other branch gives zeros and is never taken). XLA then cannot duplicate
    ``fn``'s computation into later fusions (``optimization_barrier`` does not stop that on
    CPU), so every read of its operands ends before they are updated in place, and no
    full-size loop recomputes it per element."""
    out = jax.eval_shape(fn)
    zeros = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), out)
    return jax.lax.cond(index >= 0, fn, zeros)


def conv_padding(kernel_hw: Sequence[int], padding: Any) -> tuple[tuple[int, int], ...]:
    """The ``(low, high)`` zero padding of each spatial axis of a stride-1 convolution.

    ``"SAME"`` keeps the size: a kernel of ``k`` taps pads ``(k - 1) // 2`` before and
    ``k // 2`` after (XLA's rule); ``"VALID"`` pads nothing; explicit pairs are returned
    as ints.

    Example:
      >>> conv_padding((3, 2), "SAME")
      ((1, 1), (0, 1))
    """
    if padding == "SAME":
        return tuple(((k - 1) // 2, k // 2) for k in kernel_hw)
    if padding == "VALID":
        return tuple((0, 0) for _ in kernel_hw)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


class LayerStack:
    """A loss built from a stack of layers: RSO's fast path.

    ``LayerStack(layers, loss, inputs, targets)(params)`` computes
    ``loss(f_{L-1}(params, ... f_0(params, inputs)), targets)``. Passed to
    :func:`optax_neuron.rso` as ``value_fn`` it is an ordinary loss (the black-box
    path gives the same result), but the search then caches the activation entering
    the layer that owns the searched leaf (the first layer whose computation reads
    it, found by tracing each layer once) and re-runs only from there; with
    :func:`conv_layer` / :func:`dense_layer` / :func:`channelwise` layers it re-runs
    even less (module docstring). The activations are recomputed exactly at the start
    of every searched leaf.

    It is a pytree: ``inputs`` and ``targets`` are its leaves, the functions are
    static, so a jitted step taking the batch as an argument compiles once.

    **A fresh minibatch per weight from cached layer inputs** (the official code's
    data scheme): give the whole data set as ``inputs``/``targets`` and ``batch=B``,
    and search with ``rso(per_weight_batch=True)``. For every searched leaf, owned by
    layer ``k``, the search computes the input of layer ``k`` over the whole data set
    once (``h_k = f_{k-1}(... f_0(params, inputs))``, every row at once, so a layer
    with batch statistics before ``k`` uses those of the whole set); weight ``n`` of
    cycle ``c`` is scored on the rows ``r = randint(k_batch, (B,), 0, N)`` of it
    (drawn with replacement; ``k_batch`` is the weight's batch key, see
    :func:`optax_neuron.rso`): ``F = loss(f_{L-1}(... f_k(params, h_k[r])), targets[r])``,
    the layers from ``k`` on with the statistics of those ``B`` rows. Called
    directly, ``stack(params)`` is the loss over all ``N`` rows.

    Args:
      layers: sequence of functions ``f_i(params, h) -> h`` (each reads its own
        part of the full parameter tree).
      loss: ``loss(out, targets) -> scalar``.
      inputs: the minibatch inputs entering ``layers[0]`` (with ``batch``: the
        whole data set, rows on the first axis).
      targets: anything the loss needs (labels), a pytree of arrays (with
        ``batch``: one row per input row).
      batch: ``None``, or the rows per weight with ``rso(per_weight_batch=True)``.

    Example:
      >>> import jax.numpy as jnp
      >>> layers = [lambda p, h: jnp.maximum(h @ p["l0"]["kernel"], 0),
      ...           lambda p, h: h @ p["l1"]["kernel"]]
      >>> mse = lambda out, y: jnp.mean((out - y) ** 2)
      >>> params = {"l0": {"kernel": jnp.ones((3, 4))}, "l1": {"kernel": jnp.ones((4, 1))}}
      >>> float(LayerStack(layers, mse, jnp.ones((2, 3)), jnp.zeros((2, 1)))(params))
      144.0
    """

    def __init__(
        self,
        layers: Sequence[Callable],
        loss: Callable,
        inputs: Any,
        targets: Any = None,
        batch: int | None = None,
    ):
        # plain functions, or LinearLayer / ChannelwiseLayer objects with more methods
        self.layers: tuple[Any, ...] = tuple(layers)
        self.loss = loss
        self.inputs = inputs
        self.targets = targets
        if batch is not None and (
            not isinstance(batch, int) or isinstance(batch, bool) or batch < 1
        ):
            raise ValueError(f"LayerStack: batch must be None or a positive int, got {batch!r}")
        self.batch = batch

    def input_of(self, k: int, params: Any) -> Any:
        """The input of ``layers[k]`` (``inputs`` through layers ``0 .. k-1``)."""
        h = self.inputs
        for f in self.layers[:k]:
            h = f(params, h)
        return h

    def rows(self, key: jax.Array) -> jax.Array:
        """The ``batch`` row indices of one weight: ``randint(key, (batch,), 0, N)``."""
        if self.batch is None:
            raise ValueError("LayerStack.rows: this stack has no batch= (rows per weight)")
        n = jax.tree.leaves(self.inputs)[0].shape[0]
        return jax.random.randint(key, (self.batch,), 0, n, dtype=jnp.int32)  # same with x64

    def tail(self, k: int, h_k: Any, rows: jax.Array) -> LayerStack:
        """The stack of ``layers[k:]`` on the rows ``rows`` of ``h_k``, the input of layer ``k``."""
        take = lambda x: jnp.take(x, rows, axis=0)
        return LayerStack(
            self.layers[k:], self.loss, jax.tree.map(take, h_k), jax.tree.map(take, self.targets)
        )

    def activations(self, params: Any) -> tuple[list, jax.Array]:
        """The input of every layer followed by the output, and the loss."""
        h, acts = self.inputs, []
        for f in self.layers:
            acts.append(h)
            h = f(params, h)
        acts.append(h)
        return acts, self.loss(h, self.targets)

    def from_layer(self, k: int, params: Any, h: Any) -> jax.Array:
        """The loss, starting from ``h`` entering ``layers[k]``."""
        for f in self.layers[k:]:
            h = f(params, h)
        return self.loss(h, self.targets)

    def __call__(self, params: Any) -> jax.Array:
        return self.activations(params)[1]

    def tree_flatten(self):
        return (self.inputs, self.targets), (self.layers, self.loss, self.batch)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux[0], aux[1], children[0], children[1], batch=aux[2])


jax.tree_util.register_pytree_node_class(LayerStack)


class LinearLayer:
    """A layer ``h -> A(W, h)`` linear in one kernel ``W`` (dense_layer, conv_layer).

    In a :class:`LayerStack` searched with ``fast_path="incremental"``, a candidate
    change ``delta`` of one kernel element ``W[.., i, o]`` is applied to the cached
    output as ``out[..., o] += delta * column``, where ``column`` is the slice of the
    layer input that the element multiplies (:meth:`column`), and a change ``d``
    of input channel ``i`` alone adds ``A(W[..., i:i+1, :], d)`` to the output
    (:meth:`add_input_channel`), instead of re-running the layer.
    """

    def __init__(self, kernel: str, kind: str, padding: Any = "SAME"):
        self.kernel, self.kind, self.padding = kernel, kind, padding

    def apply(self, w: jax.Array, h: jax.Array) -> jax.Array:
        """The layer with kernel ``w`` (any number of input channels) on ``h``."""
        if self.kind == "dense":
            return jnp.matmul(h, w)
        return jax.lax.conv_general_dilated(
            h, w, (1, 1), self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def __call__(self, params: Any, h: jax.Array) -> jax.Array:
        return self.apply(leaf_at(params, self.kernel), h)

    def _pads(self, kshape):
        return conv_padding(kshape[:2], self.padding)

    def column(self, h_cm, kshape, flat_index):
        """``(o, column)``: the output channel ``o`` of ``W.flat[flat_index]`` and the slice
        of the layer input that this element multiplies, ``(N, ..., 1)``, from the input
        stored channel-major (channel axis first): one input channel is then one contiguous
        block, and reading it touches ``1/C`` of the activation instead of every cache line
        of a channels-last array."""
        if self.kind == "dense":
            i, o = flat_index // kshape[1], flat_index % kshape[1]
            return o, jax.lax.dynamic_index_in_dim(h_cm, i, axis=0, keepdims=False)[..., None]
        kh, kw, cin, cout = kshape
        a = flat_index // (kw * cin * cout)
        b = (flat_index // (cin * cout)) % kw
        i = (flat_index // cout) % cin
        o = flat_index % cout
        x = jax.lax.dynamic_index_in_dim(h_cm, i, axis=0, keepdims=False)  # (N, H, W)
        xp = jnp.pad(x, ((0, 0), *self._pads(kshape)))
        ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
        zero = jnp.zeros_like(a)  # the index type of a, b (a Python 0 is int64 with x64)
        return o, jax.lax.dynamic_slice(xp, (zero, a, b), (x.shape[0], ho, wo))[..., None]

    def add_input_channel(self, params, out, d, channel, fused=False):
        """``out + A(W[..., c:c+1, :], d)``: input channel ``c = channel`` changed by ``d``.

        ``d`` has one channel (last axis of size 1). For a convolution the product is
        ``sum_{a,b} d_pad[:, y+a, x+b] * W[a, b, c, :]`` over the ``kh * kw`` taps:

        * ``fused=False``: one matrix product of the taps stacked as ``(N, H, W, kh * kw)``
          with ``W[:, :, c, :]`` as ``(kh * kw, C_out)``, added to ``out``. Where the
          result is read whole (a BatchNorm's statistics), this is the faster form on
          this CPU: batch 256, 16 output channels, 0.80 against 0.91 ms at 14x14 and 2.7
          against 3.5 ms at 28x28 for the nine products below, and 5x faster than a
          one-input-channel ``lax.conv``;
        * ``fused=True``: ``out`` plus the ``kh * kw`` broadcast products, one elementwise
          expression that XLA can fuse into the layer reading it. In front of a 2x2
          pooling the full-size result is then never written: the search's candidates
          cost 7.5 against 10.0 ms per weight of ``conv2`` of the paper net.

        Both equal the convolution up to the order of the float additions.
        """
        w = leaf_at(params, self.kernel)
        # the kernel's slice for channel c computed apart: left to XLA, the dynamic slice
        # (with the index arithmetic of a kept candidate's channel) sat inside the full-size
        # loops that read it, and a paper-net cycle took 1.09x as long
        w_c = materialised(
            lambda: jax.lax.dynamic_index_in_dim(w, channel, axis=w.ndim - 2, keepdims=False),
            channel,
        )
        d = d.astype(w.dtype)
        if self.kind == "dense":
            return out + (d * w_c).astype(out.dtype)
        kh, kw = w.shape[:2]
        dp = jnp.pad(d, ((0, 0), *self._pads(w.shape), (0, 0)))
        ho, wo = dp.shape[1] - kh + 1, dp.shape[2] - kw + 1
        taps = [dp[:, a : a + ho, b : b + wo] for a in range(kh) for b in range(kw)]
        if fused:
            for (a, b), tap in zip(itertools.product(range(kh), range(kw)), taps, strict=True):
                out = out + (tap * w_c[a, b]).astype(out.dtype)
            return out
        prod = jnp.concatenate(taps, -1) @ w_c.reshape(kh * kw, -1)  # row a * kw + b: tap (a, b)
        return out + prod.astype(out.dtype)


def dense_layer(kernel: str) -> LinearLayer:
    """A :class:`LayerStack` layer ``h @ W`` (contracting the last axis), ``W`` at path ``kernel``.

    Example:
      >>> import jax.numpy as jnp
      >>> dense_layer("out/kernel")({"out": {"kernel": jnp.eye(2)}}, jnp.ones((1, 2))).tolist()
      [[1.0, 1.0]]
    """
    return LinearLayer(kernel, "dense")


def conv_layer(kernel: str, padding: Any = "SAME") -> LinearLayer:
    """A :class:`LayerStack` layer: stride-1 2-D convolution, NHWC input, HWIO kernel at ``kernel``.

    The layer runs XLA's convolution (``jax.lax.conv_general_dilated``); ``padding`` is
    ``"SAME"``, ``"VALID"`` or ``((top, bottom), (left, right))`` (see :func:`conv_padding`).

    Example:
      >>> import jax.numpy as jnp
      >>> layer = conv_layer("c/kernel")
      >>> layer({"c": {"kernel": jnp.ones((3, 3, 1, 2))}}, jnp.ones((1, 4, 4, 1))).shape
      (1, 4, 4, 2)
    """
    return LinearLayer(kernel, "conv", padding)


class ChannelwiseLayer:
    """A layer acting on every channel (last axis) independently (see :func:`channelwise`)."""

    def __init__(self, fn: Callable, per_channel: Sequence[str] = ()):
        self.fn = fn
        self.per_channel = tuple(per_channel)

    def __call__(self, params: Any, h: Any) -> Any:
        return self.fn(params, h)

    def one_channel(self, params: Any, h_c: jax.Array, channel: jax.Array) -> jax.Array:
        """The layer on channel ``channel`` alone: ``h_c`` has one channel (last axis of size 1)."""
        sliced = {}
        for path in self.per_channel:
            x = leaf_at(params, path)
            sliced[path] = jax.lax.dynamic_index_in_dim(x, channel, axis=x.ndim - 1, keepdims=True)
        return self.fn(_replace_at(params, sliced) if sliced else params, h_c)


def channelwise(fn: Callable, per_channel: Sequence[str] = ()) -> ChannelwiseLayer:
    """Declare a :class:`LayerStack` layer channel-wise: channel ``c`` of its output depends on
    channel ``c`` of its input only (the last axis; spatial axes may shrink: pooling).

    ``fn(params, h)`` must also run on a one-channel ``h`` when the leaves named in
    ``per_channel`` (per-channel parameters, last axis = channel: BatchNorm scale and
    shift, a bias) are replaced by their one-element slice. Examples: ReLU, average
    pooling, global average pooling, BatchNorm with the batch's statistics (the
    statistics of a channel are its own), adding a bias. A declaration that is not true
    makes the incremental path wrong: the tests of this module check each layer of the
    application against its full evaluation.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> relu = channelwise(lambda p, h: jax.nn.relu(h))
      >>> bias = channelwise(lambda p, h: h + p["b"], per_channel=["b"])
      >>> h = jnp.array([[1.0, -2.0, 3.0]])
      >>> bias.one_channel({"b": jnp.array([10.0, 20.0, 30.0])}, h[:, 1:2], 1).tolist()
      [[18.0]]
    """
    if not callable(fn):
        raise TypeError(f"channelwise: fn must be a callable f(params, h), got {fn!r}")
    if isinstance(per_channel, str) or not all(isinstance(p, str) for p in per_channel):
        raise TypeError(
            f"channelwise: per_channel must be a list of parameter paths, got {per_channel!r}"
        )
    return ChannelwiseLayer(fn, per_channel)
