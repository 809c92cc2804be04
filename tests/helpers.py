"""Compose dpbench configs in tests with Hydra's compose API (no CLI, no network), and data locations.

Fast tests read the tiny real-data root in ``tests/fixtures/data`` (same layout as ``../shared/data``),
so they pass on a fresh clone. Tests that need the full shared data use ``needs_shared_data``: they
are ``slow`` and skip, naming the folder, when it is absent.
"""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dpbench.config import register_configs
from dpbench.data.roots import DATA_ROOT_ENV, SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"
# The full data (real MNIST, the text stand-ins): $DPBENCH_DATA, else ../shared/data beside the checkout.
FULL_DATA = Path(os.environ.get(DATA_ROOT_ENV) or SHARED_DATA)
EXPERIMENTS = sorted(p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml"))


def needs_shared_data(folder: str = ""):
    """Mark a test ``slow``; skip it, naming the folder, unless ``FULL_DATA/folder`` (or FULL_DATA) exists."""
    path = FULL_DATA / folder

    def mark(test):
        reason = f"needs {path} (set ${DATA_ROOT_ENV}, or put ../shared/data beside the clone)"
        skip = pytest.mark.skipif(not path.is_dir(), reason=reason)
        return pytest.mark.slow(skip(test))

    return mark


def compose_config(
    overrides: list[str],
    output_dir: Path | str = "unused",
    data_root: Path | str = FIXTURE_DATA,
    return_hydra_config: bool = False,
) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            "config",
            overrides=[f"paths.data_root={data_root}", f"paths.output_dir={output_dir}", *overrides],
            return_hydra_config=return_hydra_config,
        )


# Overrides that make any job tiny: a few steps, small subsets, quiet.
TINY = [
    "logger=none",
    "runner.progress_bar=false",
    "runner.steps=2",
    "runner.epochs=null",
    "runner.eval_every=0",
    "dataset.max_train_examples=64",
    "dataset.max_eval_examples=16",
    "runner.batch_size=16",
    "compute.physical_batch_size=8",
    "compute.eval_batch_size=16",
]
