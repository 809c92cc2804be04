"""Where metrics go besides ``history.jsonl``: Weights & Biases (offline unless asked), or nowhere.

:data:`LOGGERS` maps ``logger.name`` to a class; a new sink is one class here plus one
``conf/logger/<name>.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Protocol

from omegaconf import OmegaConf

from dpbench import records
from dpbench.errors import ConfigError, check_choice
from dpbench.schema import schema

log = logging.getLogger(__name__)
WANDB_RUN_ID_FILE = "wandb_run_id"  # in the run folder: a resumed run continues the same W&B run


WANDB_MODES = ("offline", "online", "disabled")


@schema("logger")
@dataclasses.dataclass
class LoggerConfig:
    """Where metrics go besides the run folder's records: Weights & Biases (offline by default)."""

    name: str = "wandb"  # wandb | none
    mode: str = "offline"  # offline | online | disabled
    project: str = "dpbench"
    entity: str | None = None
    run_name: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)


class Logger(Protocol):
    """Where metrics go besides history.jsonl and results.json (``logger.name``)."""

    def log(self, metrics: dict, step: int) -> None: ...

    def summary(self, values: dict) -> None: ...

    def finish(self) -> None: ...


class NullLogger:
    """``logger=none``: metrics go nowhere but the console log, history.jsonl and results.json."""

    def __init__(
        self,
        cfg=None,
        config: dict | None = None,
        output_dir: str = "",
        run_name: str = "",
        private=False,
        group: str | None = None,
        tags: tuple[str, ...] = (),
    ):
        pass

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    """Thin wrapper over ``wandb``; offline by default so a run never waits on the network.

    The W&B run id is kept in ``<output_dir>/wandb_run_id``, so a resumed dpbench run continues
    the same W&B run (``resume="allow"``). A DP run (``private``) does not capture the console: the
    log may name training-data statistics that the release policy withholds (e.g. the one-time
    warning that some examples had non-finite gradients), so W&B gets only what dpbench logs to it.

    ``group`` and ``tags`` (beside ``logger.tags``) come from :func:`for_run`: a sweep's runs share
    a group. Offline, W&B keeps the config and summary only inside its binary log; this logger also
    writes them where an online run has them, ``files/config.yaml`` and ``files/wandb-summary.json``
    (in W&B's own formats), so an offline run folder can be read without ``wandb sync``.
    """

    def __init__(
        self,
        cfg,
        config: dict,
        output_dir: str,
        run_name: str,
        private: bool = False,
        group: str | None = None,
        tags: tuple[str, ...] = (),
    ):
        import wandb

        self._wandb = wandb
        self._summary: dict = {}
        os.environ.setdefault("WANDB_SILENT", "true")
        id_file = Path(output_dir) / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            id=run_id,
            resume="allow",
            project=cfg.project,
            entity=cfg.entity,
            name=run_name,
            group=group,
            tags=list(dict.fromkeys([*cfg.tags, *tags])),
            config=config,
            mode=cfg.mode,
            dir=output_dir,
            reinit="finish_previous",
            settings=wandb.Settings(console="off" if private else "auto"),
        )
        self.run.define_metric("*", step_metric="train/step")
        self._files = Path(self.run.dir) if cfg.mode == "offline" else None
        if self._files is not None:
            import yaml

            wrapped = {key: {"value": value} for key, value in config.items()}
            (self._files / "config.yaml").write_text(yaml.safe_dump(wrapped, sort_keys=False))
        group_note = f", group {group}" if group else ""
        log.info("W&B run %s (mode=%s%s) in %s", run_name, cfg.mode, group_note, self.run.dir)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({"train/step": step, **metrics})

    def summary(self, values: dict) -> None:
        for key, value in records.flatten(values, sep="/").items():
            self.run.summary[key] = value
            self._summary[key] = value
        if self._files is not None:
            text = json.dumps(self._summary, indent=1, default=str)
            (self._files / "wandb-summary.json").write_text(text + "\n")

    def finish(self) -> None:
        self.run.finish()


LOGGERS = {"wandb": WandbLogger, "none": NullLogger}


def make_logger(
    cfg,
    config: dict,
    output_dir: str,
    run_name: str,
    private: bool = False,
    group: str | None = None,
    tags: tuple[str, ...] = (),
):
    if cfg.name not in LOGGERS:
        raise ConfigError(f"logger.name={cfg.name!r} is not allowed; choose one of {', '.join(LOGGERS)}")
    return LOGGERS[cfg.name](cfg, config, output_dir, run_name, private=private, group=group, tags=tags)


MAX_GROUP = 128  # W&B's limit on a group name
MAX_TAG = 64  # and on a tag


def sweep_group() -> str | None:
    """The sweep this job belongs to (its folder: ``multirun/<name>`` gives ``<name>``), or None
    outside a Hydra multirun. Stable, like the folder: re-running a sweep adds to the same group."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    folder = Path(str(hydra_cfg.sweep.dir))
    parts = folder.parts[1:] if folder.parts[:1] == ("multirun",) else (folder.name,)
    return "/".join(parts)[-MAX_GROUP:] or None


def auto_tags(cfg, group: str | None) -> tuple[str, ...]:
    """Tags every run gets beside ``logger.tags``: dataset, model, DP method, and the sweep if any.

    >>> from omegaconf import OmegaConf
    >>> cfg = OmegaConf.create({"dataset": {"name": "mnist"}, "model": {"arch": "cnn"},
    ...     "dp": {"method": "vanilla"}})
    >>> auto_tags(cfg, "mnist_epsilon_cpu")
    ('dataset:mnist', 'model:cnn', 'dp:vanilla', 'sweep:mnist_epsilon_cpu')
    """
    model = cfg.model.arch + (f"-{cfg.model.preset}" if cfg.model.get("preset") else "")
    tags = [f"dataset:{cfg.dataset.name}", f"model:{model}", f"dp:{cfg.dp.method}"]
    if group:
        tags.append(f"sweep:{group}")
    return tuple(tag[:MAX_TAG] for tag in tags)


def run_name(cfg, dataset_name: str) -> str:
    """``logger.run_name``, else what tells runs of a sweep apart: dataset, model (preset, fine-tuning,
    LoRA rank), method, ε (or σ), learning rate and seed.

    >>> from omegaconf import OmegaConf
    >>> cfg = OmegaConf.create({"logger": {"run_name": None}, "model": {"arch": "gemma3", "preset": "270m",
    ...     "finetune": "lora", "lora_rank": 32}, "dp": {"method": "vanilla", "epsilon": 8.0},
    ...     "optimizer": {"learning_rate": 0.003}, "runner": {"seed": 1}})
    >>> run_name(cfg, "SAMSum")
    'SAMSum | gemma3-270m lora r32 | vanilla | eps8 | lr0.003 | seed1'
    """
    if cfg.logger.run_name:
        return cfg.logger.run_name
    model = cfg.model.arch + (f"-{cfg.model.preset}" if cfg.model.get("preset") else "")
    finetune = cfg.model.get("finetune")
    if finetune:
        model += f" {finetune}" + (f" r{cfg.model.lora_rank}" if finetune == "lora" else "")
    if cfg.dp.method == "none":
        eps = "nonprivate"
    else:
        eps = f"eps{cfg.dp.epsilon:g}" if cfg.dp.epsilon is not None else f"sigma{cfg.dp.noise_multiplier:g}"
    parts = [
        dataset_name,
        model,
        cfg.dp.method,
        eps,
        f"lr{cfg.optimizer.learning_rate:g}",
        f"seed{cfg.runner.seed}",
    ]
    return " | ".join(parts)


def check_settings(cfg) -> None:
    """The ``logger.*`` settings, before anything loads."""
    check_choice("logger.name", cfg.name, tuple(LOGGERS))
    check_choice("logger.mode", cfg.mode, WANDB_MODES)


def for_run(cfg, config: dict, output_dir, dataset_name: str, main_process: bool, private: bool):
    """The logger of one run: ``logger.*`` on the main process, none on the others; a fresh start
    (``runner.resume=never``) opens a new W&B run instead of continuing the folder's."""
    if cfg.runner.resume == "never":
        (Path(output_dir) / WANDB_RUN_ID_FILE).unlink(missing_ok=True)
    logger_cfg = cfg.logger if main_process else OmegaConf.merge(cfg.logger, {"name": "none"})
    group = sweep_group()
    return make_logger(
        logger_cfg,
        config,
        str(output_dir),
        run_name(cfg, dataset_name),
        private=private,
        group=group,
        tags=auto_tags(cfg, group),
    )
