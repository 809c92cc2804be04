"""SAMSum (dialogue summarisation) from the corpus JSON files or from TFDS ``samsum``.

Keys: "id", "dialogue", "summary" (object arrays of str). Training uses ``train.json`` and
evaluation ``test.json`` (eval split "test"); ``val.json`` is not needed by the harness.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from dpbench.data.base import Dataset
from dpbench.data.schema import (
    apply_limits,
    choose_source,
    load_tfds_numpy,
    require_file,
    string_array,
    validate_config,
)

# dataset.source values ("auto" first, then the file source); dataset.name=samsum loads this module.
INPUT = "text"  # what a model reads from it (dpbench.models.<arch>.INPUT must match)
SOURCES = ("auto", "json", "tfds")

FIELDS = ("id", "dialogue", "summary")
EXPECTED_FILES = (
    "the SAMSum corpus files train.json and test.json (from corpus.7z; each a JSON list of "
    "{'id', 'dialogue', 'summary'})"
)
TFDS_MANUAL_HINT = (
    "TFDS 'samsum' cannot download the corpus itself: download corpus.7z from the SAMSum page "
    "(https://arxiv.org/src/1911.12237v2/anc/corpus.7z), decompress it and place train.json, val.json "
    "and test.json in TFDS's manual_dir ~/tensorflow_datasets/downloads/manual/; or simply point "
    "dataset.data_dir at the folder holding those files (source=json needs no TFDS)"
)


def read_samsum_json(path: str) -> dict[str, np.ndarray]:
    """Read one SAMSum corpus file: a JSON list of objects with string ``id``, ``dialogue``, ``summary``."""
    with open(path, encoding="utf-8") as handle:
        records = json.load(handle)
    if not isinstance(records, list):
        raise ValueError(
            f"{path}: expected a JSON list of {{'id', 'dialogue', 'summary'}}, got {type(records)}"
        )
    columns: dict[str, list[str]] = {field: [] for field in FIELDS}
    for position, record in enumerate(records):
        if not isinstance(record, dict) or any(not isinstance(record.get(f), str) for f in FIELDS):
            raise ValueError(
                f"{path}: record {position} lacks one of the string fields {FIELDS}: {record!r:.120}"
            )
        for field in FIELDS:
            columns[field].append(record[field])
    return {field: string_array(values) for field, values in columns.items()}


def load_json(data_dir: str) -> tuple[dict, dict, str]:
    train = read_samsum_json(require_file(data_dir, ("train.json",), EXPECTED_FILES))
    test = read_samsum_json(require_file(data_dir, ("test.json",), EXPECTED_FILES))
    return train, test, f"json:{data_dir}"


def _from_tfds(split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    def text(value: Any) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    return {field: string_array([text(v) for v in split[field]]) for field in FIELDS}


def load_tfds(download: bool) -> tuple[dict, dict, str]:
    try:
        train, test = load_tfds_numpy("samsum", ["train", "test"], download=download)
    except RuntimeError as error:
        raise RuntimeError(f"{error}. {TFDS_MANUAL_HINT}") from error
    return _from_tfds(train), _from_tfds(test), "tfds:samsum"


def load_samsum(cfg: Any) -> Dataset:
    """SAMSum as a ``Dataset`` (train / test).

    ``source=auto`` reads the JSON files from ``data_dir`` (if set, it must exist) or from
    ``<paths.data_root>/<dataset.folder>``, else TFDS (TFDS cannot download SAMSum itself); if
    neither works the error lists both reasons and how to get the corpus.
    """
    validate_config(cfg, SOURCES)
    if cfg.name != "samsum":
        raise ValueError(f"load_samsum got dataset.name={cfg.name!r}")
    train, test, source, skipped = choose_source(
        cfg,
        sources=SOURCES,
        expected=EXPECTED_FILES,
        load_files=load_json,
        load_tfds=load_tfds,
    )
    info = {"auto_skipped": skipped}
    dataset = Dataset(
        name=cfg.display_name, source=source, train=train, eval=test, eval_split="test", info=info
    )
    return apply_limits(dataset, cfg)


load = load_samsum  # the loader dpbench.data.registry calls for dataset.name=samsum
