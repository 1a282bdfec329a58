"""Training: accuracy on a real slice, optimizer first steps, resume equality, TensorBoard."""

import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_neuron.mnist.data import Dataset, load_mnist
from optax_neuron.mnist.train import OPTIMIZERS, TrainConfig, make_optimizer, run


def _slice(n_train=2000, n_val=200, n_test=1000):
    ds = load_mnist()
    return Dataset(
        ds.train_images[:n_train],
        ds.train_labels[:n_train],
        ds.val_images[:n_val],
        ds.val_labels[:n_val],
        ds.test_images[:n_test],
        ds.test_labels[:n_test],
    )


def test_one_epoch_on_2000_images_reaches_sane_accuracy():
    cfg = TrainConfig(optimizer="neuron-mean-sgd", model="cnn", epochs=1, batch_size=32, hidden=32)
    result = run(cfg, _slice(), progress=False)
    (epoch,) = result["epochs"]
    # 62 steps (cosine decay to 0) of neuron-mean momentum on 2,000 real digits:
    # measured 0.781 on 1,000 test digits (chance: 0.1).
    assert result["test_accuracy"] > 0.7, result["test_accuracy"]
    assert epoch["train_loss"] < np.log(10) and np.isfinite(
        epoch["test_loss"]
    )  # below chance level
    assert result["test_accuracy"] == epoch["test_accuracy"]
    assert {"train_accuracy", "val_accuracy", "wall_time", "epoch_time"} <= set(epoch)


# First update from zero state for gradient g, learning rate lr (independent formulas).
_FIRST_STEP = {
    "neuron-mean-sgd": lambda g, lr: -lr * g,  # no momentum yet: m_0 = 0
    "sgd": lambda g, lr: -lr * g,
    "momentum": lambda g, lr: -lr * g,
    "nesterov": lambda g, lr: -lr * (1 + 0.9) * g,  # g + mu * (mu*0 + g)
    "adam": lambda g, lr: -lr * g / (np.abs(g) + 1e-8),  # bias-corrected m/sqrt(v) = sign(g)
    # One second moment per neuron: the kernel (ones, 2x2) divides by the RMS of its column
    # (the fan-in); the bias (zeros) has no fan-in axes: Adam. Both first moments agree at step 1.
    "neuron-adam": lambda g, lr: (
        -lr * g / (np.sqrt(np.mean(g**2, axis=0)) if g.ndim == 2 else np.abs(g))
    ),
    "neuron-adam-neuron": lambda g, lr: (
        -lr * g / (np.sqrt(np.mean(g**2, axis=0)) if g.ndim == 2 else np.abs(g))
    ),
    "adamw": lambda g, lr: (
        -lr * (np.sign(g) + 1e-4 * (g.ndim == 2))
    ),  # decay 1e-4 * w, w = 1 (kernel)
    # Adafactor: v_1 = g^2 (decay 1 - 1^-0.8 = 0), unfactored (dims < 128): sign(g), RMS 1 (no
    # clipping), times the parameter scale max(RMS(w), 1e-3): 1 for the kernel, 1e-3 for the bias.
    "adafactor": lambda g, lr: -lr * np.sign(g) * (1.0 if g.ndim == 2 else 1e-3),
    "lion": lambda g, lr: -lr * (np.sign(g) + 1e-3 * (g.ndim == 2)),  # sign(0.1 g), decay 1e-3 * w
    "rmsprop": lambda g, lr: -lr * g / np.sqrt(0.1 * g**2 + 1e-8),  # nu = (1 - 0.9) g^2, eps inside
    "adagrad": lambda g, lr: -lr * g / np.sqrt(0.1 + g**2 + 1e-7),
    # adadelta: accu = 0.1 g^2, delta = g * sqrt(0 + eps) / sqrt(accu + eps)
    "adadelta": lambda g, lr: -lr * g * np.sqrt(1e-6) / np.sqrt(0.1 * g**2 + 1e-6),
}


@pytest.mark.parametrize("name", [o for o in OPTIMIZERS if o != "rso"])
def test_each_optimizer_first_step(name):
    g = np.array([[0.5, -2.0], [1e-3, 3.0]], np.float32)
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
    grads = {"dense": {"kernel": jnp.asarray(g), "bias": jnp.asarray(g[0])}}
    lr = 0.05
    tx = make_optimizer(name, learning_rate=lr, schedule="cosine", total_steps=10, grad_stats=True)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(
        updates["dense"]["kernel"], _FIRST_STEP[name](g, lr), rtol=2e-3, atol=1e-7
    )
    np.testing.assert_allclose(
        updates["dense"]["bias"], _FIRST_STEP[name](g[0], lr), rtol=2e-3, atol=1e-7
    )


def test_make_optimizer_errors():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("lamb")
    with pytest.raises(ValueError, match="rso trains without gradients"):
        make_optimizer("rso")
    with pytest.raises(ValueError, match="total_steps"):
        make_optimizer("sgd", schedule="cosine")
    with pytest.raises(ValueError, match="schedule must be"):
        make_optimizer("sgd", schedule="step")


def _assert_same_params(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _strip_times(epochs):
    return [{k: v for k, v in e.items() if k not in ("wall_time", "epoch_time")} for e in epochs]


# Gradient optimizers: resumed bit for bit after a real SIGKILL in test_mnist_kill.py.
@pytest.mark.parametrize("optimizer", ["rso"])
def test_resume_is_bit_identical(tmp_path, optimizer):
    data = _slice(n_train=256, n_val=64, n_test=128)
    base = {
        "optimizer": optimizer,
        "model": "mlp",
        "hidden": 4,
        "batch_size": 64,
        "rso_batch_size": 64,
        "grad_stats": True,
        "seed": 3,
    }
    straight = run(TrainConfig(epochs=2, **base), data, progress=False)
    ckpt = str(tmp_path / "ckpt")
    # interrupted after epoch 1 of 2 (the cosine schedule spans both epochs)
    first = run(TrainConfig(epochs=2, stop_after=1, checkpoint=ckpt, **base), data, progress=False)
    assert sorted(p.name for p in Path(ckpt).iterdir() if p.name.isdigit()) == ["1"]
    resumed = run(TrainConfig(epochs=2, checkpoint=ckpt, resume=True, **base), data, progress=False)
    _assert_same_params(straight["params"], resumed["params"])
    assert _strip_times(resumed["epochs"]) == _strip_times(straight["epochs"])
    assert _strip_times(resumed["epochs"][:1]) == _strip_times(first["epochs"])
    # and the run really moved: the parameters after 1 and 2 epochs differ
    assert any(
        not np.array_equal(x, y)
        for x, y in zip(
            jax.tree.leaves(first["params"]), jax.tree.leaves(straight["params"]), strict=True
        )
    )


def _read_events(logdir):
    """Scalars from TFRecord event files: {tag: [(step, value)]} (tensorboardX's protobufs)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        raw = path.read_bytes()
        pos = 0
        while pos < len(raw):
            (length,) = struct.unpack("<Q", raw[pos : pos + 8])
            record = raw[pos + 12 : pos + 12 + length]  # skip length and its crc
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_events_read_back(tmp_path):
    import optax_neuron as on

    data = _slice(n_train=256, n_val=64, n_test=128)
    writer = on.summary_writer(str(tmp_path / "tb"))
    result = run(
        TrainConfig(optimizer="momentum", model="mlp", hidden=4, batch_size=64, epochs=2),
        data,
        writer=writer,
        progress=False,
    )
    writer.close()
    events = _read_events(tmp_path / "tb")
    for tag in ("train_loss", "test_accuracy", "val_accuracy"):
        assert [s for s, _ in events[tag]] == [1, 2]
        np.testing.assert_allclose(
            [v for _, v in events[tag]], [e[tag] for e in result["epochs"]], rtol=1e-6
        )
    for layer in ("layers/1/kernel", "layers/3/kernel", "layers/3/bias"):
        assert len(events[f"gradient_norm/{layer}"]) == 2
        assert all(v > 0 for _, v in events[f"gradient_mean_norm/{layer}"])
    np.testing.assert_allclose(
        [v for _, v in events["gradient_norm/global"]],
        [e["grad_stats"]["gradient_norm/global"] for e in result["epochs"]],
        rtol=1e-6,
    )
