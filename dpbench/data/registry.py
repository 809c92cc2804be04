"""``load_dataset(cfg)``: the one entry point from a dataset config to a ``Dataset``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dpbench.data.base import Dataset
from dpbench.data.mnist import load_mnist
from dpbench.data.samsum import load_samsum
from dpbench.data.schema import ALLOWED_SOURCES, hold_out_validation, validate_config
from dpbench.data.sst2 import load_sst2

LOADERS: dict[str, Callable[[Any], Dataset]] = {
    "mnist": load_mnist,
    "sst2": load_sst2,
    "samsum": load_samsum,
}
assert set(LOADERS) == set(ALLOWED_SOURCES), "every dataset needs a loader and its allowed sources"


def load_dataset(cfg: Any) -> Dataset:
    """Load the dataset that ``cfg`` (a ``DatasetConfig`` or the matching Hydra node) names.

    Raises ``ValueError`` listing the allowed names and, per dataset, the allowed sources.
    """
    try:
        validate_config(cfg)
    except ValueError as error:
        allowed = "; ".join(f"{name}: {'|'.join(sources)}" for name, sources in ALLOWED_SOURCES.items())
        raise ValueError(f"{error} (allowed dataset.name: dataset.source -> {allowed})") from error
    return hold_out_validation(LOADERS[cfg.name](cfg), cfg)
