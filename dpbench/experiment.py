"""One job: ``build(cfg) -> Experiment``, then ``train_and_evaluate(experiment) -> RunRecord``.

``build`` wires the parts the config names (data, model, task, DP method, mechanism, trainer,
logger) and checks everything that can be checked before training; ``train_and_evaluate`` runs
the loop with its periodic hooks (log, evaluate, ε) and writes the record. ``run(cfg)`` is both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
from omegaconf import DictConfig, OmegaConf

from dpbench import config as config_lib
from dpbench import loggers, records
from dpbench.data.base import Dataset
from dpbench.data.registry import load_dataset
from dpbench.models.base import ModelBundle
from dpbench.models.registry import build_model
from dpbench.privacy import accounting
from dpbench.privacy.mechanism import Mechanism, plan_mechanism
from dpbench.privacy.methods import GradientMethod, make_method
from dpbench.summary import summary_block
from dpbench.train import sharding
from dpbench.train.loop import LoopCallbacks, Trainer, TrainState, split_params, train_loop
from dpbench.train.optimizers import make_optimizer
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
    noise_key: jax.Array
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


def build(cfg: DictConfig) -> Experiment:
    """Load, build and check every part ``cfg`` names; nothing trains yet."""
    start = time.perf_counter()
    config_lib.validate_static(cfg)
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
    init_key, noise_key = jax.random.split(jax.random.PRNGKey(cfg.runner.seed))
    bundle = build_model(cfg.model, init_key, freeze_lora_a=method.freezes_lora_a)
    log.info("model: %s, weights: %s", cfg.model.arch, bundle.weights_source)
    task_type = task_class(cfg.dataset.task)
    train_arrays, eval_arrays, preparation = task_type.prepare(dataset, bundle, cfg)

    audit = None
    if cfg.audit.name == "canary":
        from dpbench.privacy.audit_run import CanaryAudit

        audit = CanaryAudit(cfg.audit, train_arrays, num_classes=dataset.info.get("num_classes"))
        train_arrays = audit.train_arrays
        log.info("audit: %s", audit.describe())

    num_examples = len(next(iter(train_arrays.values())))
    try:
        mesh = sharding.make_mesh(cfg.compute.num_devices)
    except ValueError as error:
        raise config_lib.ConfigError(str(error)) from error
    config_lib.validate_with_data(cfg, num_examples, mesh.size)
    mechanism = plan_mechanism(cfg, num_examples)
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
    frozen = sharding.put_replicated(frozen, mesh)
    trainer = Trainer(
        task.losses_fn,
        method,
        make_optimizer(cfg.optimizer),
        mesh,
        noise_multiplier=mechanism.noise_multiplier or 0.0,
        expected_batch_size=cfg.runner.batch_size,
    )
    state = trainer.init(trainable)
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    output_dir = Path(cfg.paths.output_dir)
    logger = loggers.make_logger(cfg.logger, config_dict, str(output_dir), _run_name(cfg, dataset.name))
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
        noise_key=noise_key,
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


def train_and_evaluate(exp: Experiment) -> records.RunRecord:
    """Train ``exp`` to its last logical step, evaluate, and write results.json and history.jsonl."""
    cfg, mechanism, state = exp.cfg, exp.mechanism, exp.state
    history = records.History(exp.output_dir / records.HISTORY_FILE)

    def evaluate(step: int) -> dict:
        metrics = exp.task.evaluate(
            state.trainable, exp.frozen, exp.eval_arrays, cfg.compute.eval_batch_size, exp.mesh
        )
        history.append("eval", step, metrics)
        exp.logger.log(metrics, step)
        log.info(
            "step %d: %s", step, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
        )
        return metrics

    def log_train(record: dict, step: int) -> None:
        if mechanism.noise_multiplier is not None:
            record = {**record, "privacy/sigma": mechanism.noise_multiplier}
        history.append("train", step, record)
        exp.logger.log(record, step)

    if cfg.runner.eval_before_training:
        evaluate(0)
    train_start = time.perf_counter()
    train_loop(
        exp.trainer,
        state,
        exp.frozen,
        exp.train_arrays,
        mechanism.sampler,
        mechanism.steps,
        cfg.compute.physical_batch_size,
        exp.noise_key,
        cfg.runner.eval_every,
        LoopCallbacks(
            evaluate=evaluate,
            epsilon_at=exp.tracker.epsilon_at if exp.tracker else (lambda step: None),
            log=log_train,
            check_budget=exp.tracker.check_step if exp.tracker else (lambda step: None),
        ),
        progress_bar=cfg.runner.progress_bar,
    )
    train_seconds = time.perf_counter() - train_start
    return _finish(exp, history, train_seconds)


def _finish(exp: Experiment, history: records.History, train_seconds: float) -> records.RunRecord:
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
    final = {k: v for k, v in during[-1].items() if k != "step"}
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
        reproducibility={
            "batches": "PoissonSampler/ShuffleSampler.batch_indices(step): numpy SeedSequence([runner.seed, "
            "stream, step])",
            "noise": "fold_in(split(PRNGKey(runner.seed))[1], step)",
            "bit_reproducible": True,
        },
        config=exp.config_dict,
        baseline_metrics={k: v for k, v in baseline.items() if k != "step"} if baseline else None,
        final_params_sha256=records.params_sha256(jax.device_get(state.trainable)),
        train_seconds=train_seconds,
        devices=exp.mesh.size,
        data_preparation=exp.preparation,
        dataset_info=exp.dataset.info,
        samples=getattr(exp.task, "samples", None) or None,
        audit=audit,
        **claim,
    )
    record.wall_seconds = time.perf_counter() - exp.start_time
    path = records.write_record(exp.output_dir, record)
    # W&B gets the same privacy claim (and audit) as results.json, for reviewers of a dashboard.
    values = record.to_dict()
    exp.logger.summary({k: values[k] for k in SUMMARY_KEYS if values.get(k) is not None})
    exp.logger.finish()
    log.info("results: %s", path)
    print(summary_block(record, exp.output_dir), flush=True)
    return record


def run(cfg: DictConfig) -> dict:
    """Build, train and evaluate one configuration; returns results.json's content as a dict."""
    return train_and_evaluate(build(cfg)).to_dict()
