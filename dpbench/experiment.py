"""One job: ``build(cfg) -> Experiment``, then ``train_and_evaluate(experiment) -> RunRecord``.

``build`` wires the parts the config names (data, model, task, DP method, mechanism, trainer,
logger) and checks everything that can be checked before training; ``train_and_evaluate`` runs
the loop with its periodic hooks (log, evaluate, ε) and writes the record. ``run(cfg)`` is both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import time
from pathlib import Path
from typing import Any

import jax
from omegaconf import DictConfig, OmegaConf

from dpbench import config as config_lib
from dpbench import loggers, records
from dpbench.data.base import Dataset
from dpbench.data.registry import load_dataset
from dpbench.models import remat as remat_lib
from dpbench.models.base import ModelBundle
from dpbench.models.registry import build_model
from dpbench.privacy import accounting, clipping
from dpbench.privacy import mechanism as mechanism_lib
from dpbench.privacy import randomness as randomness_lib
from dpbench.privacy.mechanism import Mechanism, plan_mechanism
from dpbench.privacy.methods import GradientMethod, make_method
from dpbench.privacy.randomness import PrivacyRandomness
from dpbench.summary import summary_block
from dpbench.train import distributed, sharding
from dpbench.train.checkpoint import Cadence, Checkpoints, structure_matches
from dpbench.train.loop import (
    LoopCallbacks,
    StopTraining,
    Trainer,
    TrainState,
    split_params,
    train_loop,
    train_statistics,
)
from dpbench.train.optimizers import make_optimizer
from dpbench.train.preemption import Preempted, StopSignals
from dpbench.train.tasks import task_class

log = logging.getLogger("dpbench")

# results.json keys also written to the W&B run summary.
SUMMARY_KEYS = ("metrics", "epsilon", "delta", "noise_multiplier", "steps", "privacy", "audit", "data_source")


@dataclasses.dataclass
class Experiment:
    """Everything one job needs, built and checked before the first training step."""

    cfg: DictConfig
    dataset: Dataset
    model: ModelBundle
    task: Any  # a class of dpbench.train.tasks.TASKS
    method: GradientMethod
    mechanism: Mechanism
    trainer: Trainer
    logger: Any
    mesh: jax.sharding.Mesh
    state: TrainState  # trainable parameters and optimizer state at step 0
    frozen: dict
    train_arrays: dict
    eval_arrays: dict
    preparation: dict  # what preparing the arrays did to each split (e.g. truncation counts)
    randomness: PrivacyRandomness  # batch selection and noise (a per-run secret by default)
    tracker: accounting.EpsilonTracker | None
    audit: Any  # dpbench.privacy.audit_run.CanaryAudit or None
    config_dict: dict
    output_dir: Path
    start_time: float

    @property
    def private(self) -> bool:
        return self.method.private


def _run_name(cfg: DictConfig, dataset_name: str) -> str:
    if cfg.logger.run_name:
        return cfg.logger.run_name
    eps = (
        "nonprivate"
        if cfg.dp.method == "none"
        else (f"eps{cfg.dp.epsilon:g}" if cfg.dp.epsilon is not None else f"sigma{cfg.dp.noise_multiplier:g}")
    )
    return f"{dataset_name} | {cfg.model.arch} | {cfg.dp.method} | {eps} | seed{cfg.runner.seed}"


def _load_dataset(cfg: DictConfig) -> Dataset:
    try:
        return load_dataset(cfg.dataset)
    except ValueError as error:  # the loaders' setting checks name the dataset.* setting
        if isinstance(error, config_lib.ConfigError):
            raise
        raise config_lib.ConfigError(str(error)) from error


def resolve_randomness(cfg: DictConfig, mechanism: Mechanism, output_dir: Path) -> PrivacyRandomness:
    """The privacy randomness of this run (``dp.randomness``), the same on every process.

    ``secret``: process 0 reads ``dp.secret_file``, or, when resuming a checkpoint, the run's own
    secret file (missing: one line naming it); otherwise it draws a fresh secret and stores it in the
    run folder. Then every process receives process 0's secret. ``seeded`` (and non-private runs,
    which have no privacy to protect): a hash of ``runner.seed`` and the whole mechanism.
    """
    if not mechanism.private or cfg.dp.randomness == "seeded":
        randomness = PrivacyRandomness.seeded(cfg.runner.seed, mechanism.describe())
        if mechanism.private:
            log.warning("%s", randomness_lib.SEEDED_WARNING)
        return randomness
    placeholder = PrivacyRandomness("secret", bytes(randomness_lib.SECRET_BYTES))
    randomness = placeholder
    if distributed.is_main():
        own_file = output_dir / randomness_lib.SECRET_FILE
        resuming = cfg.runner.resume != "never" and Checkpoints(output_dir, 1).latest_step() is not None
        try:
            if cfg.dp.secret_file:
                randomness = randomness_lib.read_secret(cfg.dp.secret_file, "dp.secret_file")
                source = f"dp.secret_file={cfg.dp.secret_file}"
            elif resuming:
                randomness = randomness_lib.read_secret(own_file, "runner.resume")
                source = str(own_file)
            else:
                randomness = PrivacyRandomness.draw()
                randomness_lib.write_secret(own_file, randomness)
                source = f"a fresh 256-bit secret from the OS, stored (owner-only) in {own_file}"
        except randomness_lib.SecretError as error:
            hint = (
                "; restore it, or start afresh with runner.resume=never"
                if resuming and not cfg.dp.secret_file
                else ""
            )
            raise config_lib.ConfigError(f"{error}{hint}") from None
        log.info("privacy randomness (batches, noise): %s; never published", source)
    return randomness_lib.share_across_processes(randomness)


def build(cfg: DictConfig) -> Experiment:
    """Load, build and check every part ``cfg`` names; nothing trains yet."""
    start = time.perf_counter()
    config_lib.validate_static(cfg)
    try:  # before anything touches a device
        distributed.initialize(cfg.compute)
    except ValueError as error:
        raise config_lib.ConfigError(str(error)) from error
    method = make_method(cfg.dp)
    dataset = _load_dataset(cfg)
    log.info(
        "data: %s from %s (%d train / %d %s)",
        dataset.name,
        dataset.source,
        dataset.num_train,
        dataset.num_eval,
        dataset.eval_split,
    )
    # Model randomness only (initialisation); batches and noise come from the privacy randomness.
    init_key, _ = jax.random.split(jax.random.PRNGKey(cfg.runner.seed))
    try:
        mesh = sharding.mesh_from_config(cfg.compute)
        rules = sharding.model_rules(cfg.model)
    except ValueError as error:
        raise config_lib.ConfigError(str(error)) from error
    # Frozen weights go straight from the checkpoint into their shardings (never whole on a device).
    placement = sharding.placement(mesh, rules)
    # What trains: the labels model.finetune trains, minus those the DP method freezes (FFA: lora_a).
    bundle = build_model(cfg.model, init_key, placement=placement).with_frozen(method.frozen_labels)
    log.info("model: %s, weights: %s", cfg.model.arch, bundle.weights_source)
    remat_lib.warn_if_ineffective(cfg.model.get("remat", "none"))
    task_type = task_class(cfg.dataset.task)
    train_arrays, eval_arrays, preparation = task_type.prepare(dataset, bundle, cfg)

    audit = None
    if cfg.audit.name == "canary":
        from dpbench.privacy.audit_run import CanaryAudit

        audit = CanaryAudit(cfg.audit, train_arrays, num_classes=dataset.info.get("num_classes"))
        train_arrays = audit.train_arrays
        log.info("audit: %s", audit.describe())

    if cfg.compute.sequence_bucket and "attention_mask" not in train_arrays:
        raise config_lib.ConfigError(
            f"compute.sequence_bucket={cfg.compute.sequence_bucket} needs token sequences with an "
            f"attention_mask; dataset {cfg.dataset.name} has none (set compute.sequence_bucket=0)"
        )
    num_examples = len(next(iter(train_arrays.values())))
    config_lib.validate_with_data(cfg, num_examples, mesh.size)
    mechanism = plan_mechanism(cfg, num_examples)
    output_dir = Path(cfg.paths.output_dir)
    randomness = resolve_randomness(cfg, mechanism, output_dir)
    mechanism.bind(randomness)
    log.info(
        "devices: %d x %s; logical steps: %d; sampler: %s",
        mesh.size,
        jax.devices()[0].platform,
        mechanism.steps,
        mechanism.sampler.describe(),
    )
    tracker = None
    if method.private:
        log.info(
            "noise multiplier σ=%.4f (noise std on the clipped sum σC=%.4g), δ=%.3g",
            mechanism.noise_multiplier,
            mechanism.noise_multiplier * method.clip_norm,
            mechanism.delta,
        )
        tracker = accounting.EpsilonTracker(
            mechanism.sampler,
            mechanism.noise_multiplier,
            mechanism.delta,
            cfg.accountant,
            budgeted_steps=mechanism.steps,
        )

    task = task_type.build(bundle, dataset, cfg)
    trainable, frozen = split_params(bundle.params, bundle.is_trainable)
    log.info(
        "parameters: %d trainable, %d frozen",
        sum(x.size for x in trainable.values()),
        sum(x.size for x in frozen.values()),
    )
    if method.private and method.clipping != "per_example":
        clipping.require_exact_in(method.clipping, cfg.model.get("dtype"), method=method.name)  # ghost: f32
        # Fast clipping is exact only if the layer taps see every use of every trainable parameter:
        # checked on the model computing in float32, where a miss is structure, not bfloat16 rounding.
        exact = bundle.in_float32()
        check_task = task if exact is bundle else task_type.build(exact, dataset, cfg)
        rows = min(4, num_examples)
        sample = {k: v[:rows] for k, v in train_arrays.items()}
        errors = clipping.check_tap_coverage(
            check_task.losses_fn, trainable, sample, frozen, clipping=method.clipping
        )
        log.info(
            "dp.clipping=%s: layer taps cover every trainable parameter (max rel. error %.1e)",
            method.clipping,
            max(errors.values()),
        )
    frozen = sharding.put_sharded(frozen, mesh, rules)
    trainer = Trainer(
        task.losses_fn,
        method,
        make_optimizer(cfg.optimizer),
        mesh,
        noise=mechanism.noise_transform(randomness.noise_key()),
        expected_batch_size=mechanism.expected_batch_size,
        param_rules=rules,
        gathered_at_use=bundle.gathered_at_use,
    )
    state = trainer.init(trainable)
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    if cfg.runner.resume == "never":
        (output_dir / loggers.WANDB_RUN_ID_FILE).unlink(missing_ok=True)  # a fresh start: a new W&B run
    logger_cfg = cfg.logger if distributed.is_main() else OmegaConf.merge(cfg.logger, {"name": "none"})
    logger = loggers.make_logger(
        logger_cfg, config_dict, str(output_dir), _run_name(cfg, dataset.name), private=method.private
    )
    return Experiment(
        cfg=cfg,
        dataset=dataset,
        model=bundle,
        task=task,
        method=method,
        mechanism=mechanism,
        trainer=trainer,
        logger=logger,
        mesh=mesh,
        state=state,
        frozen=frozen,
        train_arrays=train_arrays,
        eval_arrays=eval_arrays,
        preparation=preparation,
        randomness=randomness,
        tracker=tracker,
        audit=audit,
        config_dict=config_dict,
        output_dir=output_dir,
        start_time=start,
    )


def _privacy_claim(exp: Experiment) -> dict:
    """The final (ε, δ) claim with everything needed to recompute it; refuses a claim above target."""
    cfg, mechanism, tracker = exp.cfg, exp.mechanism, exp.tracker
    if tracker is None:
        return {
            "epsilon": None,
            "delta": None,
            "noise_multiplier": None,
            "privacy": {"mechanism": "none (non-private)"},
        }
    epsilon = tracker.epsilon_at(mechanism.steps)
    if cfg.dp.epsilon is not None and epsilon > cfg.dp.epsilon * (1 + 1e-9):
        raise RuntimeError(f"ε spent {epsilon} exceeds the target dp.epsilon={cfg.dp.epsilon}")
    privacy = accounting.privacy_summary(
        mechanism.sampler,
        mechanism.noise_multiplier,
        mechanism.steps,
        mechanism.delta,
        exp.method.clip_norm,
        cfg.accountant,
        epsilon,
    )
    # The noise strategy (i.i.d., BandMF's coefficients, BLT's buffers) and the batch selection
    # it is accounted under are part of the mechanism description above (sampler) and here.
    privacy["noise"] = mechanism.strategy.describe()
    # Which exact implementation computed the clipped sums (dp.clipping=auto resolved): speed only.
    privacy["clipping_implementation"] = exp.method.clipping
    log.info(
        "privacy: (ε=%.4f, δ=%.3g) with σ=%.4f over %d logical steps",
        epsilon,
        mechanism.delta,
        mechanism.noise_multiplier,
        mechanism.steps,
    )
    log.info("privacy claim (recomputable by hand): %s", json.dumps(privacy, default=str))
    return {
        "epsilon": epsilon,
        "delta": mechanism.delta,
        "noise_multiplier": mechanism.noise_multiplier,
        "privacy": privacy,
    }


# Settings that may differ between a checkpoint and the run resuming it: performance, logging,
# paths and the checkpoint/resume knobs themselves. Every other setting must match.
RESUMABLE_CHANGES = (
    "compute.",
    "logger.",
    "paths.",
    "runner.progress_bar",
    "runner.checkpoint_every",
    "runner.keep_checkpoints",
    "runner.resume",
    "dp.secret_file",  # where the secret is read from; the checkpoint's fingerprint checks it is the same
)
# dataset_info keys that describe the dataset, not its training examples (released in DP runs).
PUBLIC_DATASET_INFO = (
    "num_classes",
    "image_shape",
    "auto_skipped",
    "num_train_full",
    "num_eval_full",
    "subset",
)


def _flatten(values: Any, prefix: str = "") -> dict:
    if isinstance(values, dict):
        flat = {}
        for key, value in values.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: values}


def config_differences(saved: dict, current: dict) -> list[str]:
    """Settings (dotted names) whose values differ, except those a resumed run may change.

    A setting only one side has (added to or removed from dpbench since the checkpoint) is logged,
    not refused: the mechanism and the parameter shapes are compared separately.

    >>> config_differences({"dp": {"epsilon": 1.0}, "compute": {"eval_batch_size": 8}},
    ...                    {"dp": {"epsilon": 8.0}, "compute": {"eval_batch_size": 16}, "new": 1})
    ['dp.epsilon=8.0 (the checkpoint has dp.epsilon=1.0)']
    """
    old, new = _flatten(saved), _flatten(current)
    one_sided = sorted(
        (set(old) ^ set(new)) - {k for k in set(old) | set(new) if k.startswith(RESUMABLE_CHANGES)}
    )
    if one_sided:
        log.warning(
            "settings present on one side only (dpbench changed since the checkpoint was written): %s",
            ", ".join(f"{k}={new[k]!r} (new)" if k in new else f"{k} (gone)" for k in one_sided),
        )
    return [
        f"{key}={new[key]!r} (the checkpoint has {key}={old[key]!r})"
        for key in sorted(set(old) & set(new))
        if old[key] != new[key] and not key.startswith(RESUMABLE_CHANGES)
    ]


def _different_run(what: str, run_dir: Path, differences: list[str]) -> config_lib.ConfigError:
    return config_lib.ConfigError(
        f"runner.resume: {what} in {run_dir} differs from this run: {'; '.join(differences)}. Run the same "
        "settings to resume, or start afresh with runner.resume=never (allowed: auto, never, must) or "
        "another hydra.run.dir"
    )


def completed_record(cfg: DictConfig) -> records.RunRecord | None:
    """The complete record already in this run's folder (same settings), unless ``runner.resume=never``."""
    path = Path(cfg.paths.output_dir) / records.RESULTS_FILE
    if cfg.runner.resume == "never" or not path.is_file():
        return None
    record = records.load_record(path)
    if not record.complete:
        return None
    differences = config_differences(record.config, OmegaConf.to_container(cfg, resolve=True))
    if differences:
        raise _different_run("the complete run", path.parent, differences)
    log.info("%s is complete with the same settings: skipping this job (runner.resume=never reruns it)", path)
    return record


THROUGHPUT = "train/examples_per_s"


class ReleasePolicy:
    """What a run may publish (results.json, history.jsonl, W&B, progress bar).

    A DP run publishes only what is covered by its (ε, δ) claim or does not depend on the training
    data: evaluation-split metrics, ε, σ, total wall time. Statistics of the training data computed
    without noise (per-batch loss, accuracy, clipped fraction, gradient norm, realised batch size,
    throughput, non-finite counts, class counts, truncation counts) are withheld
    unless ``runner.release_nonprivate_stats=true``; ``released`` lists what was published.
    """

    def __init__(self, private: bool, opted_in: bool):
        self.private = private
        self.withhold = private and not opted_in
        self.released: set[str] = set()
        self._warned_nonfinite = False

    def train_record(self, stats: dict) -> dict:
        if not self.withhold:
            record = train_statistics(stats)
            if self.private:
                self.released.update(record)
            return record
        if float(stats.get("nonfinite_sum", 0.0)) > 0 and not self._warned_nonfinite:
            # One bit, once, to the operator's log: their model produces non-finite gradients.
            log.warning(
                "some training examples had non-finite gradients and were zeroed (the count is a training-"
                "data statistic and is withheld; runner.release_nonprivate_stats=true logs it)"
            )
            self._warned_nonfinite = True
        return {}

    def throughput(self, record: dict) -> dict:
        """Examples per second grows with the realised batch size (and, bucketed, with the sampled
        text lengths): a statistic of the training data, withheld with the others."""
        if not self.private or THROUGHPUT not in record:
            return record
        if self.withhold:
            return {k: v for k, v in record.items() if k != THROUGHPUT}
        self.released.add(THROUGHPUT)
        return record

    def dataset_info(self, info: dict) -> dict:
        if not self.private:
            return info
        released = {k: v for k, v in info.items() if k in PUBLIC_DATASET_INFO or not self.withhold}
        self.released.update(f"dataset_info.{k}" for k in released if k not in PUBLIC_DATASET_INFO)
        return released

    def preparation(self, preparation: dict) -> dict:
        """Drop what preparing the *training* split measured (e.g. its truncation counts)."""
        if not self.private:
            return preparation
        kept = {}
        for name, per_split in preparation.items():
            splits = {s: v for s, v in per_split.items() if s != "train" or not self.withhold}
            if "train" in splits:
                self.released.add(f"data_preparation.{name}.train")
            if splits:
                kept[name] = splits
        return kept


def _reproducibility(exp: Experiment) -> dict:
    """How batches and noise were drawn (public: nothing derived from the secret), and the command."""
    described = {"sampler": exp.mechanism.sampler.name, **exp.randomness.describe(), "command": _command()}
    if exp.private and exp.mechanism.strategy.kind != "iid":
        # Correlated noise: jax_privacy's privatizer starts from the run's noise key (the same
        # SHA-256 derivation as above) and splits it once per step instead of folding in the step.
        kind = exp.mechanism.strategy.kind
        described["noise"] = (
            f"{kind}: C^-1 Z, Z from jax_privacy's matrix_factorization_privatizer, its key the run's "
            "noise key (as for i.i.d. noise), split once per step"
        )
    return described


def _command() -> str:
    """``python -m dpbench`` with this job's Hydra overrides (what reruns it, sweep or not)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():  # built from a composed config (tests, notebooks)
        return "python -m dpbench (config composed in Python, no command line)"
    overrides = HydraConfig.get().overrides.task
    return " ".join(["python -m dpbench", *(shlex.quote(o) for o in overrides)])


def _resume(exp: Experiment, checkpoints: Checkpoints) -> tuple[int | None, dict]:
    """Restore ``exp.state`` from the last checkpoint per ``runner.resume``; (its step or None, its meta)."""
    mode = exp.cfg.runner.resume
    if mode == "never":
        if checkpoints.directory.exists() or (exp.output_dir / records.RESULTS_FILE).exists():
            log.warning("runner.resume=never: removing the checkpoints and record in %s", exp.output_dir)
        checkpoints.clear()
        (exp.output_dir / records.RESULTS_FILE).unlink(missing_ok=True)
        return None, {}
    latest = checkpoints.latest_step()
    if latest is None:
        if mode == "must":
            raise config_lib.ConfigError(
                f"runner.resume=must but {checkpoints.directory} holds no checkpoint; choose "
                "runner.resume=auto (resume if there is one) or never, or point hydra.run.dir at the "
                "interrupted run"
            )
        return None, {}
    meta = checkpoints.read_meta(latest)
    differences = config_differences(meta.get("config", {}), exp.config_dict)
    if differences:
        raise _different_run(f"the checkpoint at step {latest}", exp.output_dir, differences)
    mechanism_differences = mechanism_lib.differences(meta.get("mechanism", {}), exp.mechanism.describe())
    if mechanism_differences:
        raise _different_run(
            f"the mechanism of the checkpoint at step {latest}", exp.output_dir, mechanism_differences
        )
    saved_randomness = meta.get("randomness", {})
    if saved_randomness.get("fingerprint") != exp.randomness.fingerprint():
        saved_mode = saved_randomness.get("mode", "from runner.seed, before dp.randomness existed")
        raise config_lib.ConfigError(
            f"runner.resume: the checkpoint at step {latest} in {checkpoints.directory} was trained with "
            f"other privacy randomness ({saved_mode}) than this run ({exp.randomness.mode}); resume with "
            "the run's own secret file or dp.secret_file, or start afresh with runner.resume=never"
        )
    if not structure_matches(meta, exp.state.trainable, exp.state.saved_state):
        raise _different_run(
            f"the checkpoint at step {latest}",
            exp.output_dir,
            ["the trainable parameters, optimizer state or noise state"],
        )
    exp.state.trainable, (exp.state.opt_state, exp.state.noise_state) = checkpoints.restore(
        latest, exp.state.trainable, exp.state.saved_state
    )
    exp.state.step = latest
    log.info(
        "resuming from the checkpoint at logical step %d of %d in %s",
        latest,
        exp.mechanism.steps,
        checkpoints.directory,
    )
    return latest, meta


def train_and_evaluate(exp: Experiment, stop_after: int | None = None) -> records.RunRecord:
    """Train ``exp`` to its last logical step (resuming per ``runner.resume``), evaluate, write records.

    Raises :class:`Preempted` after checkpointing when SIGTERM/SIGINT arrives, or after logical step
    ``stop_after`` (as if preempted there; for callers that train in sessions, and for tests).
    """
    cfg, mechanism, state = exp.cfg, exp.mechanism, exp.state
    # A private run's checkpoints hold its noise state (key, correlated-noise buffers): owner-only.
    checkpoints = Checkpoints(exp.output_dir, cfg.runner.keep_checkpoints, private=exp.private)
    start, meta = _resume(exp, checkpoints)
    history = records.History(distributed.side_path(exp.output_dir / records.HISTORY_FILE), resume_step=start)
    policy = ReleasePolicy(exp.private, cfg.runner.release_nonprivate_stats)
    cadence = Cadence(cfg.runner.checkpoint_every, mechanism.steps)
    resumed_at = [*meta.get("resumed_at", []), *([start] if start else [])]
    seconds_before = float(meta.get("train_seconds", 0.0))
    last_saved = {"step": start}

    def evaluate(step: int) -> dict:
        metrics = exp.task.evaluate(
            state.trainable, exp.frozen, exp.eval_arrays, cfg.compute.eval_batch_size, exp.mesh
        )
        if history.append("eval", step, metrics):
            exp.logger.log(metrics, step)
        log.info(
            "step %d: %s", step, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
        )
        return metrics

    def log_train(record: dict, step: int) -> None:
        record = policy.throughput(record)
        if mechanism.noise_multiplier is not None:
            record = {**record, "privacy/sigma": mechanism.noise_multiplier}
        if history.append("train", step, record):
            exp.logger.log(record, step)

    def save(step: int, required: bool) -> None:
        # Before every evaluation (required): whatever a run publishes comes from a saved state, so a
        # resumed run never redraws noise for a step whose outputs were already published.
        if (required or cadence.due(step)) and last_saved["step"] != step:
            checkpoints.save(
                step,
                state.trainable,
                state.saved_state,
                {
                    "mechanism": mechanism.describe(),
                    "config": exp.config_dict,
                    "randomness": {
                        "mode": exp.randomness.mode,
                        "fingerprint": exp.randomness.fingerprint(),
                    },
                    "resumed_at": resumed_at,
                    "train_seconds": seconds_before + time.perf_counter() - train_start,
                },
            )
            cadence.saved()
            last_saved["step"] = step

    train_start = time.perf_counter()
    if not start and cfg.runner.eval_before_training:
        evaluate(0)
    eval_every = cfg.runner.eval_every
    if start and start < mechanism.steps and eval_every and start % eval_every == 0:
        evaluate(start)  # the checkpoint precedes its step's evaluation, which may not have happened
    with StopSignals() as signals:
        callbacks = LoopCallbacks(
            evaluate=evaluate,
            epsilon_at=exp.tracker.epsilon_at if exp.tracker else (lambda step: None),
            log=log_train,
            check_budget=exp.tracker.check_step if exp.tracker else (lambda step: None),
            release=policy.train_record,
            save=save,
            stop_requested=lambda: (
                signals.requested is not None or (stop_after is not None and state.step >= stop_after)
            ),
        )
        try:
            train_loop(
                exp.trainer,
                state,
                exp.frozen,
                exp.train_arrays,
                mechanism.sampler,
                mechanism.steps,
                cfg.compute.physical_batch_size,
                eval_every,
                callbacks,
                progress_bar=cfg.runner.progress_bar,
                sequence_bucket=cfg.compute.sequence_bucket,
            )
        except StopTraining as stop:
            checkpoints.close()
            exp.logger.finish()
            raise Preempted(signals.requested, stop.step, mechanism.steps, str(exp.output_dir)) from None
    checkpoints.close()
    train_seconds = seconds_before + time.perf_counter() - train_start
    return _finish(exp, history, policy, train_seconds, resumed_at)


def _finish(
    exp: Experiment,
    history: records.History,
    policy: ReleasePolicy,
    train_seconds: float,
    resumed_at: list[int],
) -> records.RunRecord:
    """The privacy claim, the audit, and the complete record (written atomically)."""
    cfg, state = exp.cfg, exp.state
    evaluations = history.of_kind("eval")
    baseline = next((line for line in evaluations if line["step"] == 0), None)
    during = [line for line in evaluations if line["step"] > 0]
    claim = _privacy_claim(exp)
    audit = None
    if exp.audit is not None:
        audit = exp.audit.evaluate(
            exp.task,
            state.trainable,
            exp.frozen,
            exp.mesh,
            cfg.compute.eval_batch_size,
            claimed_epsilon=claim["epsilon"],
            delta=exp.mechanism.delta,
        )
        log.info(
            "audit: empirical ε lower bound %.3f (claimed ε %s)",
            audit["epsilon_lower_bound"],
            claim["epsilon"],
        )
    dataset_info = policy.dataset_info(exp.dataset.info)
    preparation = policy.preparation(exp.preparation)
    if exp.private:
        claim["privacy"]["released_nonprivate_statistics"] = sorted(policy.released)
        claim["privacy"]["randomness"] = exp.randomness.mode
        if exp.randomness.mode == "seeded":
            claim["privacy"]["warning"] = randomness_lib.SEEDED_WARNING
    final = {k: v for k, v in during[-1].items() if k != "step"}
    final_sha256 = records.params_sha256(jax.device_get(state.trainable))
    distributed.check_same_on_every_process("final trainable parameters", final_sha256)
    record = records.RunRecord(
        dataset=exp.dataset.name,
        data_source=exp.dataset.source,
        weights_source=exp.model.weights_source,
        task=cfg.dataset.task,
        method=exp.method.name,
        metrics=final,
        history=during,
        steps=exp.mechanism.steps,
        sampling_rate=exp.mechanism.sampler.sampling_rate,
        train_examples=exp.mechanism.sampler.num_examples,
        reproducibility=_reproducibility(exp),
        config=exp.config_dict,
        baseline_metrics={k: v for k, v in baseline.items() if k != "step"} if baseline else None,
        resumed_at=resumed_at,
        final_params_sha256=final_sha256,
        train_seconds=train_seconds,
        devices=exp.mesh.size,
        data_preparation=preparation,
        dataset_info=dataset_info,
        samples=getattr(exp.task, "samples", None) or None,
        audit=audit,
        **claim,
    )
    record.wall_seconds = time.perf_counter() - exp.start_time
    path = records.write_record(distributed.side_path(exp.output_dir / records.RESULTS_FILE).parent, record)
    # W&B gets the same privacy claim (and audit) as results.json, for reviewers of a dashboard.
    values = record.to_dict()
    exp.logger.summary({k: values[k] for k in SUMMARY_KEYS if values.get(k) is not None})
    exp.logger.finish()
    log.info("results: %s", path)
    print(summary_block(record, exp.output_dir), flush=True)
    return record


def run(cfg: DictConfig, stop_after: int | None = None) -> dict:
    """Build, train and evaluate one configuration; returns results.json's content as a dict.

    A complete record with the same settings in the run folder is returned as is (the job is
    skipped); an interrupted run in the folder is resumed (``runner.resume``).
    """
    config_lib.validate_static(cfg)
    done = completed_record(cfg)
    if done is not None:
        return done.to_dict()
    return train_and_evaluate(build(cfg), stop_after=stop_after).to_dict()
