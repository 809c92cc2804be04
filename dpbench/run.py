"""``run(cfg) -> metrics``: the whole job, for every dataset x model x DP method x accountant."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import jax
import optax
from omegaconf import DictConfig, OmegaConf

from dpbench import config as config_lib
from dpbench import loggers
from dpbench.data import sampling
from dpbench.data.base import Dataset
from dpbench.data.registry import load_dataset
from dpbench.models.registry import build_model
from dpbench.privacy import accounting
from dpbench.privacy.methods import make_method
from dpbench.train import sharding
from dpbench.train.loop import LoopCallbacks, Trainer, split_params, train_loop

log = logging.getLogger("dpbench")


@dataclasses.dataclass
class Mechanism:
    """Everything that fixes the privacy guarantee, decided before training starts."""

    sampler: Any
    steps: int
    noise_multiplier: float | None  # None for dp.method=none
    delta: float | None


def make_optimizer(cfg) -> optax.GradientTransformation:
    if cfg.name == "sgd":
        return optax.sgd(cfg.learning_rate, momentum=cfg.momentum)
    if cfg.name == "adam":
        return optax.adam(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.name == "adamw":
        return optax.adamw(
            cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    raise config_lib.ConfigError(f"optimizer.name={cfg.name!r} is not known; choose one of sgd, adam, adamw")


def plan_mechanism(cfg: DictConfig, num_examples: int) -> Mechanism:
    """Sampler, logical steps and σ (calibrated from ε, or given) for this training set."""
    sampler = sampling.make_sampler(cfg.dp.sampler, num_examples, cfg.runner.batch_size, cfg.runner.seed)
    steps = cfg.runner.steps if cfg.runner.steps is not None else sampler.steps_for_epochs(cfg.runner.epochs)
    if cfg.dp.method == "none":
        return Mechanism(sampler, steps, None, None)
    accounting.check_supported(sampler, cfg.accountant)
    delta = config_lib.resolve_delta(cfg, num_examples)
    if cfg.dp.noise_multiplier is not None:
        sigma = float(cfg.dp.noise_multiplier)
    else:
        sigma = accounting.calibrate_noise_multiplier(sampler, steps, cfg.dp.epsilon, delta, cfg.accountant)
    return Mechanism(sampler, steps, sigma, delta)


def _task_for(dataset: Dataset, bundle, cfg: DictConfig):
    """Summarisation for dialogue/summary data, classification otherwise."""
    if "dialogue" in dataset.train:
        from dpbench.train.summarization import SummarizationTask

        return SummarizationTask(
            bundle,
            cfg.dataset,
            progress_bar=cfg.runner.progress_bar,
            train_summaries=dataset.train["summary"],
        )
    from dpbench.train.tasks import ClassificationTask

    return ClassificationTask(bundle.apply_fn)


def _model_inputs(dataset: Dataset, bundle, cfg: DictConfig) -> tuple[dict, dict, dict]:
    """Train/eval arrays the model consumes (text is tokenised with the model's tokenizer)."""
    if "text" in dataset.train:
        from dpbench.data import text

        splits, stats = {}, {}
        for split_name, split in (("train", dataset.train), ("eval", dataset.eval)):
            splits[split_name], stats[split_name] = text.tokenize_classification(
                split["text"], split["label"], bundle.tokenizer, cfg.dataset.max_length
            )
        return splits["train"], splits["eval"], {"truncated": stats}
    if "dialogue" in dataset.train:
        from dpbench.data import text

        train, train_stats = text.build_lm_examples(
            dataset.train["dialogue"], dataset.train["summary"], bundle.tokenizer, cfg.dataset.max_length
        )
        return train, dataset.eval, {"truncated": train_stats}
    return dataset.train, dataset.eval, {}


def _run_name(cfg: DictConfig, dataset_name: str) -> str:
    if cfg.logger.run_name:
        return cfg.logger.run_name
    eps = (
        "nonprivate"
        if cfg.dp.method == "none"
        else (f"eps{cfg.dp.epsilon:g}" if cfg.dp.epsilon is not None else f"sigma{cfg.dp.noise_multiplier:g}")
    )
    return f"{dataset_name} | {cfg.model.arch} | {cfg.dp.method} | {eps} | seed{cfg.runner.seed}"


def _epsilon_tracker(cfg: DictConfig, mechanism: Mechanism, clip_norm: float) -> accounting.EpsilonTracker:
    log.info(
        "noise multiplier σ=%.4f (noise std on the clipped sum σC=%.4g), δ=%.3g",
        mechanism.noise_multiplier,
        mechanism.noise_multiplier * clip_norm,
        mechanism.delta,
    )
    return accounting.EpsilonTracker(
        mechanism.sampler,
        mechanism.noise_multiplier,
        mechanism.delta,
        cfg.accountant,
        budgeted_steps=mechanism.steps,
    )


def _privacy_results(
    cfg: DictConfig, mechanism: Mechanism, clip_norm: float, tracker: accounting.EpsilonTracker | None
) -> dict:
    """The final (ε, δ) claim with everything needed to recompute it; refuses a claim above target."""
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
        clip_norm,
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


# results.json keys also written to the W&B run summary.
SUMMARY_KEYS = ("metrics", "epsilon", "delta", "noise_multiplier", "steps", "privacy", "audit", "data_source")


def run(cfg: DictConfig) -> dict:
    """Train and evaluate one configuration; write results.json; return its metrics."""
    start = time.perf_counter()
    config_lib.validate_static(cfg)
    method = make_method(cfg.dp)

    dataset = load_dataset(cfg.dataset)
    log.info(
        "data: %s from %s (%d train / %d %s)",
        dataset.name,
        dataset.source,
        dataset.num_train,
        dataset.num_eval,
        dataset.eval_split,
    )
    rng = jax.random.PRNGKey(cfg.runner.seed)
    init_rng, noise_rng = jax.random.split(rng)
    bundle = build_model(cfg.model, init_rng, freeze_lora_a=method.freezes_lora_a)
    log.info("model: %s, weights: %s", cfg.model.arch, bundle.weights_source)
    train_arrays, eval_arrays, prep_info = _model_inputs(dataset, bundle, cfg)

    audit = None
    if cfg.audit.name == "canary":
        from dpbench.privacy.audit_run import CanaryAudit

        audit = CanaryAudit(cfg.audit, train_arrays, num_classes=dataset.info.get("num_classes"))
        train_arrays = audit.train_arrays
        log.info("audit: %s", audit.describe())

    num_examples = len(next(iter(train_arrays.values())))
    mesh = sharding.make_mesh(cfg.compute.num_devices)
    config_lib.validate_with_data(cfg, num_examples, mesh.size)
    mechanism = plan_mechanism(cfg, num_examples)
    log.info(
        "devices: %d x %s; logical steps: %d; sampler: %s",
        mesh.size,
        jax.devices()[0].platform,
        mechanism.steps,
        mechanism.sampler.describe(),
    )
    tracker = _epsilon_tracker(cfg, mechanism, method.clip_norm) if method.private else None
    epsilon_at = tracker.epsilon_at if tracker else (lambda step: None)
    check_budget = tracker.check_step if tracker else (lambda step: None)

    task = _task_for(dataset, bundle, cfg)
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
    logger = loggers.make_logger(cfg.logger, config_dict, cfg.paths.output_dir, _run_name(cfg, dataset.name))

    def evaluate(step: int) -> dict:
        metrics = task.evaluate(state.trainable, frozen, eval_arrays, cfg.compute.eval_batch_size, mesh)
        logger.log(metrics, step)
        log.info(
            "step %d: %s", step, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
        )
        return metrics

    def log_train(record: dict, step: int) -> None:
        if mechanism.noise_multiplier is not None:
            record = {**record, "privacy/sigma": mechanism.noise_multiplier}
        logger.log(record, step)

    baseline = evaluate(0) if cfg.runner.eval_before_training else None
    train_start = time.perf_counter()
    history = train_loop(
        trainer,
        state,
        frozen,
        train_arrays,
        mechanism.sampler,
        mechanism.steps,
        cfg.compute.physical_batch_size,
        noise_rng,
        cfg.runner.eval_every,
        LoopCallbacks(evaluate=evaluate, epsilon_at=epsilon_at, log=log_train, check_budget=check_budget),
        progress_bar=cfg.runner.progress_bar,
    )
    train_seconds = time.perf_counter() - train_start

    final = dict(history[-1])
    final.pop("step")
    results: dict[str, Any] = {
        "dataset": dataset.name,
        "data_source": dataset.source,
        "weights_source": bundle.weights_source,
        "method": method.name,
        "metrics": final,
        "history": history,
        "steps": mechanism.steps,
        "sampling_rate": mechanism.sampler.sampling_rate,
        "train_examples": num_examples,
        "train_seconds": train_seconds,
        "devices": mesh.size,
        "data_preparation": prep_info,
        "dataset_info": dataset.info,
    }
    if baseline is not None:
        results["baseline_metrics"] = baseline
    if getattr(task, "samples", None):
        results["samples"] = task.samples
    results.update(_privacy_results(cfg, mechanism, method.clip_norm, tracker))
    if audit is not None:
        results["audit"] = audit.evaluate(
            task,
            state.trainable,
            frozen,
            mesh,
            cfg.compute.eval_batch_size,
            claimed_epsilon=results["epsilon"],
            delta=mechanism.delta,
        )
        log.info(
            "audit: empirical ε lower bound %.3f (claimed ε %s)",
            results["audit"]["epsilon_lower_bound"],
            results["epsilon"],
        )
    results["wall_seconds"] = time.perf_counter() - start
    results["config"] = config_dict
    path = loggers.write_results(cfg.paths.output_dir, results)
    # W&B gets the same privacy claim (and audit) as results.json, for reviewers of a dashboard.
    logger.summary({k: results[k] for k in SUMMARY_KEYS if results.get(k) is not None})
    logger.finish()
    log.info("results: %s", path)
    return results
