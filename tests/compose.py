"""Compose dpbench configs in tests with Hydra's compose API (no CLI, no network)."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dpbench.config import register_configs

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
SHARED = Path(__file__).resolve().parents[2] / "shared"
EXPERIMENTS = sorted(p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml"))


def compose_config(overrides: list[str], output_dir: Path | str = "unused") -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            "config",
            overrides=[f"paths.shared={SHARED}", f"paths.output_dir={output_dir}", *overrides],
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
