"""Hydra schemas for every config group, their ConfigStore registration, and start-up validation.

Each group option (``conf/<group>/<option>.yaml``) starts with ``defaults: [<group>_schema, _self_]``
so Hydra checks its keys and types against the dataclass below; struct mode stays on, so a typo
in an override is an error, not a new key.

Settings that change the privacy guarantee (``dp.*``, ``accountant.*``, ``runner.batch_size``,
``runner.steps``/``runner.epochs``) are kept apart from performance knobs (``compute.*``), which
change speed and memory only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dpbench.data.roots import register_resolvers
from dpbench.data.schema import DatasetConfig
from dpbench.errors import ConfigError
from dpbench.loggers import LOGGERS
from dpbench.models.cnn import CNNModelConfig
from dpbench.models.encoder import EncoderModelConfig
from dpbench.models.gemma3 import Gemma3ModelConfig
from dpbench.privacy.accounting import AccountantConfig
from dpbench.privacy.batch_selection import SAMPLER_NAMES
from dpbench.privacy.methods import CLIPPING_CHOICES, METHODS, check_clipping_dtype, resolve_clipping
from dpbench.privacy.randomness import MODES as RANDOMNESS_MODES
from dpbench.train.optimizers import OPTIMIZERS
from dpbench.train.sharding import MeshConfig
from dpbench.train.tasks import TASKS

log = logging.getLogger(__name__)

DP_METHODS = tuple(METHODS)
SAMPLERS = SAMPLER_NAMES
WANDB_MODES = ("offline", "online", "disabled")
RESUME_MODES = ("auto", "never", "must")
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
AUDITS = ("none", "canary")


@dataclasses.dataclass
class DPConfig:
    """The privacy mechanism. ``epsilon`` xor ``noise_multiplier``: the other is derived."""

    # none | vanilla | ffa (LoRA with A frozen) | ghost (vanilla, ghost clipping) | bandmf | blt
    # (DP-FTRL with correlated noise: banded matrix factorization, buffered linear Toeplitz)
    method: str = "vanilla"
    # How the clipped sum is computed: per_example | ghost | bookkeeping | auto (the fastest measured).
    # A performance knob: every choice is exact, so it never changes ε or the result.
    clipping: str = "auto"
    epsilon: float | None = 1.0
    noise_multiplier: float | None = None  # set it (and epsilon=null) to report the ε it gives
    delta: float | None = 1e-5
    delta_exponent: float | None = None  # δ = n^-exponent (dp-lora uses 1.1); needs delta=null
    clip_norm: float = 1.0
    sampler: str = "poisson"  # poisson | shuffle | cyclic_poisson (dp.bands groups) | balls_in_bins
    # Correlated noise (dpbench/privacy/noise.py). bands: BandMF's bands, and the groups of
    # sampler=cyclic_poisson; buffers: BLT's most buffers; optimize_strategy: fit the strategy to the
    # run's length with jax_privacy's optimisers (false: closed-form coefficients, instant).
    bands: int = 4
    buffers: int = 4
    optimize_strategy: bool = True
    # Where batch selection and noise get their randomness (dpbench/privacy/randomness.py): secret = a
    # per-run 256-bit secret from the OS, stored owner-only in the run folder and never published;
    # seeded = a hash of runner.seed and the mechanism (reproducible from the record: tests, debugging;
    # the claim then does not hold against anyone who knows runner.seed).
    randomness: str = "secret"
    secret_file: str | None = None  # reuse a stored secret (a run folder's privacy_secret): bit for bit


@dataclasses.dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam | adamw
    learning_rate: float = 0.1
    momentum: float | None = None  # sgd only
    weight_decay: float = 0.0  # adamw only
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


@dataclasses.dataclass
class RunnerConfig:
    """How long to train (logical steps: one noise draw each) and how often to evaluate."""

    steps: int | None = None
    epochs: float | None = None  # converted to logical steps from the sampler
    batch_size: int = 256  # expected logical batch size; sets the sampling rate
    eval_every: int = 500  # logical steps; 0 = only at the end
    eval_before_training: bool = False
    seed: int = 0
    progress_bar: bool = True
    # Checkpoints (<run dir>/checkpoints): every N logical steps; null = about every 10 minutes and at
    # least every 10% of the run; 0 = only before evaluations, at the end and on SIGTERM/SIGINT.
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto: continue from the run dir's last checkpoint | never | must
    # A DP run's records hold no statistic of the training data computed without noise (training loss,
    # accuracy, clipped fraction, gradient norm, realised batch size, class counts, truncation) unless
    # this is true; the privacy section lists what was released. Non-private runs release everything.
    release_nonprivate_stats: bool = False


@dataclasses.dataclass
class ComputeConfig:
    """Performance only: never changes the mechanism or ε."""

    physical_batch_size: int = 64  # examples per device-parallel chunk of a logical batch
    eval_batch_size: int = 256
    # Text: > 0 orders each logical batch by length and pads each physical batch only to the next
    # multiple of this many tokens (0: every batch padded to dataset.max_length).
    sequence_bucket: int = 0
    num_devices: int | None = None  # None = all of jax.devices()
    # Devices along (data, fsdp): -1 = the rest. fsdp > 1 shards parameters by model.sharding_rules.
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    device_memory_gb: float | None = None  # python -m dpbench.plan: does one device's share fit?
    # Multi-process (jax.distributed): set all three, or leave null for SLURM's variables / one process.
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    mode: str = "offline"  # offline | online | disabled
    project: str = "dpbench"
    entity: str | None = None
    run_name: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class AuditConfig:
    name: str = "none"  # none | canary
    num_canaries: int = 1000
    confidence: float = 0.95
    seed: int = 1234


@dataclasses.dataclass
class PathsConfig:
    data_root: str | None = None  # ${dpbench_data_root:}: $DPBENCH_DATA, else ../shared/data if present
    output_dir: str = "outputs/manual"


def register_configs() -> None:
    """Put every schema into Hydra's ConfigStore (idempotent)."""
    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(group="dataset", name="dataset_schema", node=DatasetConfig)
    cs.store(group="model", name="cnn_schema", node=CNNModelConfig)
    cs.store(group="model", name="encoder_schema", node=EncoderModelConfig)
    cs.store(group="model", name="gemma3_schema", node=Gemma3ModelConfig)
    cs.store(group="dp", name="dp_schema", node=DPConfig)
    cs.store(group="accountant", name="accountant_schema", node=AccountantConfig)
    cs.store(group="optimizer", name="optimizer_schema", node=OptimizerConfig)
    cs.store(group="runner", name="runner_schema", node=RunnerConfig)
    cs.store(group="compute", name="compute_schema", node=ComputeConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    cs.store(group="audit", name="audit_schema", node=AuditConfig)
    cs.store(group="paths", name="paths_schema", node=PathsConfig)


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


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


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


def _check_correlated_noise(cfg: DictConfig) -> None:
    """The sampler a method can be accounted under, and the strategy's sizes."""
    dp = cfg.dp
    spec = METHODS[dp.method]
    if dp.sampler not in spec.samplers:
        raise ConfigError(
            f"dp.sampler={dp.sampler} cannot be accounted with dp.method={dp.method}; "
            f"choose dp.sampler={' or '.join(spec.samplers)}"
        )
    if (spec.noise == "bandmf" or dp.sampler == "cyclic_poisson") and not dp.bands >= 1:
        raise ConfigError(f"dp.bands={dp.bands} is not allowed; choose an integer >= 1")
    if spec.noise == "blt" and not 1 <= dp.buffers <= 10:
        raise ConfigError(f"dp.buffers={dp.buffers} is not allowed; choose an integer in [1, 10]")
    if spec.noise == "bandmf" and cfg.runner.steps is not None and dp.bands > cfg.runner.steps:
        raise ConfigError(
            f"dp.bands={dp.bands} is more than the run's runner.steps={cfg.runner.steps}; "
            f"choose dp.bands in [1, {cfg.runner.steps}]"
        )


def validate_static(cfg: DictConfig) -> None:
    """Checks that need no data: run before anything is loaded so bad input fails early."""
    _check_finite(OmegaConf.to_container(cfg, resolve=True), "")
    dp = cfg.dp
    _choice("dp.method", dp.method, DP_METHODS)
    _choice("dp.sampler", dp.sampler, SAMPLERS)
    _choice("dp.clipping", dp.clipping, CLIPPING_CHOICES)
    _choice("dp.randomness", dp.randomness, RANDOMNESS_MODES)
    if dp.secret_file is not None and dp.randomness != "secret":
        raise ConfigError(
            f"dp.secret_file={dp.secret_file} needs dp.randomness=secret (got dp.randomness={dp.randomness})"
        )
    if dp.method != "none":
        try:
            resolve_clipping(dp.method, dp.clipping)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        # Ghost in bfloat16 is not exact: refused here, before any weights load.
        check_clipping_dtype(dp.method, dp.clipping, cfg.model.get("dtype"))
        _check_correlated_noise(cfg)
    _choice("optimizer.name", cfg.optimizer.name, tuple(OPTIMIZERS))
    _choice("logger.name", cfg.logger.name, tuple(LOGGERS))
    _choice("dataset.task", cfg.dataset.task, tuple(TASKS))
    _choice("logger.mode", cfg.logger.mode, WANDB_MODES)
    _choice("audit.name", cfg.audit.name, AUDITS)
    if dp.method != "none":
        if dp.epsilon is None and dp.noise_multiplier is None:
            raise ConfigError("set dp.epsilon (σ is calibrated) or dp.noise_multiplier (ε is computed)")
        if dp.epsilon is not None and dp.noise_multiplier is not None:
            raise ConfigError(
                f"dp.epsilon={dp.epsilon} and dp.noise_multiplier={dp.noise_multiplier} are both set; "
                "set one and null the other (e.g. dp.epsilon=null dp.noise_multiplier=1.1)"
            )
        if dp.epsilon is not None and not dp.epsilon > 0:
            raise ConfigError(f"dp.epsilon={dp.epsilon} must be > 0")
        if dp.noise_multiplier is not None and not dp.noise_multiplier > 0:
            raise ConfigError(f"dp.noise_multiplier={dp.noise_multiplier} must be > 0")
        if (dp.delta is None) == (dp.delta_exponent is None):
            raise ConfigError(
                "set exactly one of dp.delta (a number in (0, 1)) and dp.delta_exponent (δ = n^-e)"
            )
        if dp.delta is not None and not 0 < dp.delta < 1:
            raise ConfigError(f"dp.delta={dp.delta} must lie in (0, 1)")
        if dp.delta_exponent is not None and not dp.delta_exponent > 0:
            raise ConfigError(f"dp.delta_exponent={dp.delta_exponent} must be > 0")
        if not dp.clip_norm > 0:
            raise ConfigError(f"dp.clip_norm={dp.clip_norm} must be > 0")
    if dp.method == "ffa" and cfg.model.get("finetune", "lora") != "lora":
        raise ConfigError(
            f"dp.method=ffa freezes LoRA's A matrices: it needs model.finetune=lora "
            f"(got model.finetune={cfg.model.finetune})"
        )
    if dp.method == "ffa" and cfg.model.get("lora_rank", 0) <= 0:
        raise ConfigError(
            "dp.method=ffa freezes LoRA's A matrices: it needs a model with model.lora_rank > 0"
        )
    runner = cfg.runner
    if (runner.steps is None) == (runner.epochs is None):
        raise ConfigError(
            f"set exactly one of runner.steps and runner.epochs (got {runner.steps} and {runner.epochs})"
        )
    if runner.steps is not None and runner.steps <= 0:
        raise ConfigError(f"runner.steps={runner.steps} must be > 0")
    if runner.epochs is not None and not runner.epochs > 0:
        raise ConfigError(f"runner.epochs={runner.epochs} must be > 0")
    if runner.batch_size <= 0:
        raise ConfigError(f"runner.batch_size={runner.batch_size} must be > 0")
    if cfg.compute.physical_batch_size <= 0:
        raise ConfigError(f"compute.physical_batch_size={cfg.compute.physical_batch_size} must be > 0")
    if cfg.compute.sequence_bucket < 0:
        raise ConfigError(
            f"compute.sequence_bucket={cfg.compute.sequence_bucket} must be >= 0 "
            "(0 = pad to dataset.max_length)"
        )
    if runner.eval_every < 0:
        raise ConfigError(f"runner.eval_every={runner.eval_every} must be >= 0")
    _choice("runner.resume", runner.resume, RESUME_MODES)
    if runner.checkpoint_every is not None and runner.checkpoint_every < 0:
        raise ConfigError(
            f"runner.checkpoint_every={runner.checkpoint_every} must be >= 0 (0 = only where required) "
            "or null (about every 10 minutes)"
        )
    if runner.keep_checkpoints < 1:
        raise ConfigError(f"runner.keep_checkpoints={runner.keep_checkpoints} must be >= 1")
    if cfg.audit.name == "canary" and cfg.audit.num_canaries <= 0:
        raise ConfigError(f"audit.num_canaries={cfg.audit.num_canaries} must be > 0")
    if cfg.accountant.name == "prv":
        acc = cfg.accountant
        if not acc.eps_error > 0:
            raise ConfigError(
                f"accountant.eps_error={acc.eps_error} is not allowed; choose a number > 0 (e.g. 0.01)"
            )
        bound = dp.delta if dp.method != "none" and dp.delta is not None else 1
        if acc.delta_error is not None and not 0 < acc.delta_error < bound:
            raise ConfigError(
                f"accountant.delta_error={acc.delta_error} is not allowed; choose null (δ/1000) "
                f"or a number in (0, {'dp.delta=' if bound != 1 else ''}{bound:g})"
            )


def resolve_delta(cfg: DictConfig, num_examples: int) -> float | None:
    """δ for this run; warns when δ >= 1/n (a mechanism could then publish one record outright)."""
    dp = cfg.dp
    if dp.method == "none":
        return None
    delta = dp.delta if dp.delta is not None else num_examples ** (-dp.delta_exponent)
    if delta >= 1.0 / num_examples:
        log.warning(
            "dp.delta=%.3g >= 1/n = %.3g (n=%d training examples): the usual choice is below 1/n, "
            "e.g. dp.delta_exponent=1.1",
            delta,
            1.0 / num_examples,
            num_examples,
        )
    acc = cfg.get("accountant")
    if acc is not None and acc.name == "prv" and acc.delta_error is not None and not acc.delta_error < delta:
        raise ConfigError(
            f"accountant.delta_error={acc.delta_error} is not allowed; choose null (δ/1000) "
            f"or a number in (0, {delta:.3g}) (δ = n^-dp.delta_exponent with n={num_examples})"
        )
    return float(delta)


def validate_batch_size(cfg: DictConfig, num_examples: int) -> None:
    """The expected logical batch must fit in the training set (also for planning commands)."""
    if cfg.runner.batch_size > num_examples:
        raise ConfigError(
            f"runner.batch_size={cfg.runner.batch_size} is larger than the training set "
            f"({num_examples} examples of {cfg.dataset.display_name}); choose at most {num_examples}"
        )


def validate_with_data(cfg: DictConfig, num_examples: int, num_devices: int) -> None:
    """Checks that need the training set size and the device count."""
    validate_batch_size(cfg, num_examples)
    physical = cfg.compute.physical_batch_size
    if physical % num_devices:
        suggestion = num_devices * math.ceil(physical / num_devices)
        raise ConfigError(
            f"compute.physical_batch_size={physical} must be a multiple of the number of devices "
            f"({num_devices}); e.g. {suggestion}"
        )
