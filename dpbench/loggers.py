"""Where metrics go: Weights & Biases (offline unless asked otherwise) and ``results.json``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class NullLogger:
    """``logger=none``: metrics go nowhere but the console log and results.json."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    """Thin wrapper over ``wandb``; offline by default so a run never waits on the network."""

    def __init__(self, cfg, config: dict, output_dir: str, run_name: str):
        import wandb

        self._wandb = wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=run_name,
            tags=list(cfg.tags),
            config=config,
            mode=cfg.mode,
            dir=output_dir,
            reinit="finish_previous",
        )
        self.run.define_metric("*", step_metric="train/step")
        log.info("W&B run %s (mode=%s) in %s", run_name, cfg.mode, self.run.dir)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({"train/step": step, **metrics})

    def summary(self, values: dict) -> None:
        for key, value in _flatten(values).items():
            self.run.summary[key] = value

    def finish(self) -> None:
        self.run.finish()


def make_logger(cfg, config: dict, output_dir: str, run_name: str):
    if cfg.name == "none":
        return NullLogger()
    if cfg.name == "wandb":
        return WandbLogger(cfg, config, output_dir, run_name)
    raise ValueError(f"logger.name={cfg.name!r} is not known; choose one of wandb, none")


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def write_results(output_dir: str | Path, results: dict[str, Any]) -> Path:
    path = Path(output_dir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value):
    # NumPy / JAX scalars and arrays from metrics.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to results.json")
