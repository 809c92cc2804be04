"""SST-2 (binary sentiment) from GLUE's TSV files or from TFDS ``glue/sst2``.

Keys: "text" (object array of str) and "label" (int32, 1 = positive). GLUE's test split has no
labels, so evaluation uses the dev split ("validation").
"""

from __future__ import annotations

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

# dataset.source values ("auto" first, then the file source); dataset.name=sst2 loads this module.
INPUT = "text"  # what a model reads from it (dpbench.models.<arch>.INPUT must match)
SOURCES = ("auto", "tsv", "tfds")

NUM_CLASSES = 2
EXPECTED_FILES = "GLUE SST-2 files train.tsv and dev.tsv (header 'sentence<TAB>label')"
TFDS_HOST = "dl.fbaipublicfiles.com"  # TFDS downloads glue/sst2 as GLUE's SST-2.zip from there


def read_sst2_tsv(path: str) -> dict[str, np.ndarray]:
    """Read a GLUE SST-2 TSV: header ``sentence<TAB>label``, then one sentence and 0/1 per line.

    GLUE writes these files without quoting, so a line is split on its last tab only.
    """
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    if not lines or lines[0].split("\t") != ["sentence", "label"]:
        header = lines[0] if lines else "<empty file>"
        raise ValueError(f"{path}: expected the header 'sentence<TAB>label', found {header!r}")
    texts, labels = [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        sentence, tab, label = line.rpartition("\t")
        if not tab or label not in ("0", "1"):
            raise ValueError(f"{path}:{number}: expected 'sentence<TAB>0|1', found {line[:80]!r}")
        texts.append(sentence)
        labels.append(int(label))
    return {"text": string_array(texts), "label": np.asarray(labels, dtype=np.int32)}


def load_tsv(data_dir: str) -> tuple[dict, dict, str]:
    train = read_sst2_tsv(require_file(data_dir, ("train.tsv",), EXPECTED_FILES))
    dev = read_sst2_tsv(require_file(data_dir, ("dev.tsv",), EXPECTED_FILES))
    return train, dev, f"tsv:{data_dir}"


def _from_tfds(split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    texts = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in split["sentence"]]
    return {"text": string_array(texts), "label": np.asarray(split["label"], dtype=np.int32)}


def load_tfds(download: bool) -> tuple[dict, dict, str]:
    train, dev = load_tfds_numpy(
        "glue/sst2", ["train", "validation"], download=download, download_host=TFDS_HOST
    )
    return _from_tfds(train), _from_tfds(dev), "tfds:glue/sst2"


def load_sst2(cfg: Any) -> Dataset:
    """SST-2 as a ``Dataset`` (train / validation).

    ``source=auto`` reads the TSV files from ``data_dir`` (if set, it must exist) or from
    ``<paths.data_root>/<dataset.folder>``, else TFDS (downloading if ``dataset.download``); if
    neither works the error lists both reasons.
    """
    validate_config(cfg, SOURCES)
    if cfg.name != "sst2":
        raise ValueError(f"load_sst2 got dataset.name={cfg.name!r}")
    train, dev, source, skipped = choose_source(
        cfg,
        sources=SOURCES,
        expected=EXPECTED_FILES,
        load_files=load_tsv,
        load_tfds=load_tfds,
    )
    info = {
        "num_classes": NUM_CLASSES,
        "auto_skipped": skipped,
        "train_class_counts": np.bincount(train["label"], minlength=NUM_CLASSES).tolist(),
    }
    dataset = Dataset(
        name=cfg.display_name, source=source, train=train, eval=dev, eval_split="validation", info=info
    )
    return apply_limits(dataset, cfg)


load = load_sst2  # the loader dpbench.data.registry calls for dataset.name=sst2
