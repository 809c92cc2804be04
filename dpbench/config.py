"""Start-up validation, and the registration of every config schema with Hydra.

Each config group's schema is a dataclass declared beside the code it configures, with
``@dpbench.schema.schema(group)``; each option (``conf/<group>/<option>.yaml``) starts with
``defaults: [<group>_schema, _self_]`` so Hydra checks its keys and types against it, and struct mode
stays on, so a typo in an override is an error, not a new key. Each module also checks the values of
its own settings (``check_settings``); :func:`validate_static` runs them all before anything loads.

Settings that change the privacy guarantee (``dp.*``, ``accountant.*``, ``runner.batch_size``,
``runner.steps``/``runner.epochs``) are kept apart from performance knobs (``compute.*``), which
change speed and memory only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dpbench import loggers, schema
from dpbench.data import schema as data_schema  # noqa: F401 (declares the dataset schema)
from dpbench.data.roots import register_resolvers
from dpbench.errors import ConfigError, check_choice
from dpbench.models import registry
from dpbench.privacy import (
    accounting,
    audit,
    mechanism,
    tuning,  # noqa: F401 (declares the tune schema)
)
from dpbench.privacy.mechanism import resolve_delta, validate_batch_size  # noqa: F401 (re-exported)
from dpbench.privacy.methods import METHODS
from dpbench.train import loop, optimizers, sharding
from dpbench.train.tasks import TASKS, canary_type

log = logging.getLogger(__name__)

# What a non-finite value of these settings should be instead (any other float: "a finite number").
FINITE_HINTS = {
    "dp.epsilon": "a finite number > 0 (dp=none trains without privacy)",
    "dp.noise_multiplier": "a finite number > 0",
    "dp.clip_norm": "a finite number > 0",
    "dp.delta": "a number in (0, 1)",
    "dp.delta_exponent": "a finite number > 0",
    "runner.epochs": "a finite number > 0, or null with runner.steps set",
    "accountant.eps_error": "a finite number > 0 (e.g. 0.01)",
    "accountant.delta_error": "null (δ/1000) or a number in (0, dp.delta)",
}


def register_configs() -> None:
    """Put every declared schema into Hydra's ConfigStore (idempotent)."""
    register_resolvers()
    registry.model_modules()  # imports every model module, which declares its schema
    schema.store_all()


# Errors that mean "a setting is wrong", reported as one line: ConfigError, and a path setting
# (dataset.data_dir, model.checkpoint) naming a file or folder that does not exist.
SETTING_ERRORS = (ConfigError, FileNotFoundError)


@contextlib.contextmanager
def exit_on_setting_error():
    """Turn a setting error into one line on stderr and exit status 2 (HYDRA_FULL_ERROR=1: traceback)."""
    try:
        yield
    except SETTING_ERRORS as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def _check_finite(node: Any, path: str) -> None:
    """Every float setting (in lists too) must be finite: inf/nan would train a NaN model or fail deep."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_finite(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _check_finite(value, f"{path}[{index}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{path}={node} is not allowed; choose {FINITE_HINTS.get(path, 'a finite number')}")


def _check_model_fits_dataset(cfg: DictConfig) -> None:
    """The model reads what the dataset gives and serves its task (model.arch's INPUT and TASKS against
    the dataset module's INPUT and dataset.task), before anything loads."""
    from dpbench.data.registry import dataset_modules

    models, datasets = registry.model_modules(), dataset_modules()
    if cfg.model.arch not in models or cfg.dataset.name not in datasets:
        return  # unknown names are refused, naming the allowed ones, where they are loaded
    model, given = models[cfg.model.arch], datasets[cfg.dataset.name].INPUT
    fitting = sorted(a for a, m in models.items() if m.INPUT == given and cfg.dataset.task in m.TASKS)
    if model.INPUT != given or cfg.dataset.task not in model.TASKS:
        raise ConfigError(
            f"model.arch={cfg.model.arch} reads {model.INPUT} for {'/'.join(model.TASKS)}, and "
            f"dataset.name={cfg.dataset.name} gives {given} for {cfg.dataset.task}; choose a model with "
            f"model.arch={' or '.join(fitting) or '(none yet)'}"
        )


def validate_static(cfg: DictConfig) -> None:
    """Checks that need no data: run before anything is loaded so bad input fails early."""
    _check_finite(OmegaConf.to_container(cfg, resolve=True), "")
    mechanism.check_settings(cfg)
    accounting.check_settings(cfg.accountant, cfg.dp)
    method = METHODS[cfg.dp.method]
    optimizers.check_settings(cfg.optimizer, method.private, method.noise)
    if cfg.dp.method == "none" and (cfg.dp.epsilon is not None or cfg.dp.noise_multiplier is not None):
        # Not refused: sweeps pass one dp.epsilon to a grid of dp=none and DP rows, so that the
        # non-private row's folder matches; said once, so nobody reads an ε into it.
        given = "dp.epsilon" if cfg.dp.epsilon is not None else "dp.noise_multiplier"
        log.warning(
            "dp=none trains without privacy: %s=%s is ignored (the record has no ε)",
            given,
            cfg.dp.get(given.split(".")[1]),
        )
    if cfg.optimizer.name in optimizers.BIAS_CORRECTED and cfg.dp.adaptive_clip.target_quantile is not None:
        raise ConfigError(
            f"optimizer.name={cfg.optimizer.name} corrects a fixed noise variance (σC/B)², and "
            "dp.adaptive_clip changes C every step: choose optimizer=adam(w), or "
            "dp.adaptive_clip.target_quantile=null"
        )
    loggers.check_settings(cfg.logger)
    check_choice("dataset.task", cfg.dataset.task, tuple(TASKS))
    _check_model_fits_dataset(cfg)
    finetune, rank = cfg.model.get("finetune"), cfg.model.get("lora_rank")
    if rank is not None and rank < 0:
        raise ConfigError(f"model.lora_rank={rank} is not allowed; choose an integer >= 1 (LoRA's rank)")
    if finetune == "lora" and rank == 0:
        raise ConfigError(
            "model.lora_rank=0 with model.finetune=lora adds no LoRA factors (only the head would train); "
            "choose model.lora_rank >= 1, or model.finetune=head (or full)"
        )
    loop.check_settings(cfg.runner)
    sharding.check_settings(cfg.compute)
    audit.check_settings(cfg.audit)
    if cfg.audit.name == "canary":  # the task must declare canaries for what the dataset gives
        from dpbench.data.registry import dataset_modules

        if cfg.dataset.name in dataset_modules():
            canary_type(cfg.dataset.task, dataset_modules()[cfg.dataset.name].INPUT)


def validate_with_data(
    cfg: DictConfig, num_examples: int, num_devices: int, train_arrays: dict | None = None
) -> None:
    """Checks that need the training set size, the device count and (when given) the training arrays."""
    if cfg.compute.sequence_bucket and train_arrays is not None and "attention_mask" not in train_arrays:
        raise ConfigError(
            f"compute.sequence_bucket={cfg.compute.sequence_bucket} needs token sequences with an "
            f"attention_mask; dataset {cfg.dataset.name} has none (set compute.sequence_bucket=0)"
        )
    validate_batch_size(cfg, num_examples)
    physical = cfg.compute.physical_batch_size
    if physical % num_devices:
        suggestion = num_devices * math.ceil(physical / num_devices)
        raise ConfigError(
            f"compute.physical_batch_size={physical} must be a multiple of the number of devices "
            f"({num_devices}); e.g. {suggestion}"
        )
