"""One job: ``build(cfg) -> Experiment``, then ``train_and_evaluate(experiment) -> RunRecord``.

``build`` wires the parts the config names (data, model, task, DP method, mechanism, trainer,
logger) and checks everything that can be checked before training; ``train_and_evaluate`` resumes
(``dpbench.job.resume``), runs the loop with its hooks (``dpbench.job.hooks``) and writes the
record (``dpbench.job.record``), publishing only what the release policy
(``dpbench.privacy.release``) allows. ``run(cfg)`` is both.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import jax
from omegaconf import DictConfig, OmegaConf

from dpbench import config as config_lib
from dpbench import loggers, records
from dpbench.data.base import Dataset
from dpbench.data.registry import load_dataset
from dpbench.errors import as_config_error
from dpbench.job import hooks, resume
from dpbench.job.record import finish
from dpbench.models import remat
from dpbench.models.base import ModelBundle
from dpbench.models.registry import build_model
from dpbench.privacy import accounting, clipping, release
from dpbench.privacy import noise as noise_lib
from dpbench.privacy import units as units_lib
from dpbench.privacy.mechanism import Mechanism, plan_mechanism
from dpbench.privacy.methods import GradientMethod, make_method
from dpbench.privacy.randomness import PrivacyRandomness
from dpbench.train import distributed, sharding
from dpbench.train.checkpoint import Cadence, Checkpoints
from dpbench.train.loop import LoopCallbacks, StopTraining, Trainer, TrainState, split_params, train_loop
from dpbench.train.optimizers import make_optimizer
from dpbench.train.preemption import Preempted, StopSignals
from dpbench.train.tasks import Task, task_class

if TYPE_CHECKING:
    from dpbench.privacy.audit_run import CanaryAudit

log = logging.getLogger("dpbench")


@dataclasses.dataclass
class Experiment:
    """Everything one job needs, built and checked before the first training step."""

    cfg: DictConfig
    dataset: Dataset
    model: ModelBundle  # its functions, labels and tokenizer; params None (the state and frozen hold them)
    task: Task
    method: GradientMethod
    mechanism: Mechanism
    trainer: Trainer
    logger: loggers.Logger
    mesh: jax.sharding.Mesh
    state: TrainState  # trainable parameters and optimizer state at step 0
    frozen: dict
    train_arrays: dict
    eval_arrays: dict
    preparation: dict  # what preparing the arrays did to each split (e.g. truncation counts)
    randomness: PrivacyRandomness  # batch selection and noise (a per-run secret by default)
    tracker: accounting.EpsilonTracker | None
    audit: CanaryAudit | None
    config_dict: dict
    output_dir: Path
    start_time: float

    @property
    def private(self) -> bool:
        return self.method.private


def build(cfg: DictConfig) -> Experiment:
    """Load, build and check every part ``cfg`` names; nothing trains yet."""
    start = time.perf_counter()
    config_lib.validate_static(cfg)
    as_config_error(distributed.initialize, cfg.compute)  # before anything touches a device
    method = make_method(cfg.dp)
    dataset = as_config_error(load_dataset, cfg.dataset)  # the loaders' checks name the dataset.* setting
    log.info(
        "data: %s from %s (%d train / %d %s)",
        *(dataset.name, dataset.source, dataset.num_train, dataset.num_eval, dataset.eval_split),
    )
    # Model randomness only (initialisation); batches and noise come from the privacy randomness.
    init_key, _ = jax.random.split(jax.random.PRNGKey(cfg.runner.seed))
    mesh = as_config_error(sharding.mesh_from_config, cfg.compute)
    rules = as_config_error(sharding.model_rules, cfg.model)
    # Frozen weights go straight from the checkpoint into their shardings (never whole on a device).
    # What trains: the labels model.finetune trains, minus those the DP method freezes (FFA: lora_a).
    # A builder's ValueError names the model.* setting (finetune, checkpoint, ...): one line.
    placement = sharding.placement(mesh, rules)
    bundle = as_config_error(build_model, cfg.model, init_key, placement=placement, naming="model.")
    bundle = bundle.with_frozen(method.frozen_labels)
    log.info("model: %s, weights: %s", cfg.model.arch, bundle.weights_source)
    remat.warn_if_ineffective(cfg.model.get("remat", "none"))
    units = units_lib.build_units(cfg, dataset.train, mesh.size)  # dp.unit=user: the users (else None)
    task_type = task_class(cfg.dataset.task)
    train_arrays, eval_arrays, preparation = task_type.prepare(dataset, bundle, cfg)

    audit = None
    if cfg.audit.name == "canary":
        from dpbench.privacy.audit_run import build_canary_audit

        audit = build_canary_audit(cfg, task_type, dataset, bundle, train_arrays)
        train_arrays = audit.train_arrays
        log.info("audit: %s", audit.describe())

    num_examples = len(next(iter(train_arrays.values())))
    config_lib.validate_with_data(cfg, num_examples, mesh.size, train_arrays)
    mechanism = plan_mechanism(cfg, num_examples, units)
    output_dir = Path(cfg.paths.output_dir)
    randomness = resume.privacy_randomness(cfg, mechanism, output_dir)
    mechanism.bind(randomness)
    log.info(
        "devices: %d x %s; logical steps: %d; sampler: %s",
        *(mesh.size, jax.devices()[0].platform, mechanism.steps, mechanism.sampler.describe()),
    )
    if method.private:
        log.info(
            "noise multiplier σ=%.4f (noise std on the clipped sum σC=%.4g), δ=%.3g",
            *(mechanism.noise_multiplier, mechanism.noise_multiplier * method.clip_norm, mechanism.delta),
        )
    tracker = mechanism.epsilon_tracker(cfg.accountant)

    task = task_type.build(bundle, dataset, cfg)
    trainable, frozen = split_params(bundle.params, bundle.is_trainable)
    log.info(
        "parameters: %d trainable, %d frozen",
        *(sum(x.size for x in trainable.values()), sum(x.size for x in frozen.values())),
    )
    if method.private and method.clipping != "per_example":
        exact = bundle.in_float32()
        check_task = task if exact is bundle else task_type.build(exact, dataset, cfg)
        sample = {k: v[:4] for k, v in train_arrays.items()}
        clipping.check_fast_clipping(
            method.clipping,
            cfg.model.get("dtype"),
            method.name,
            check_task.losses_fn,
            trainable,
            frozen,
            sample,
        )
    trainer = Trainer(
        task.losses_fn,
        method,
        make_optimizer(cfg.optimizer, mechanism.gradient_noise_variance),
        mesh,
        noise=mechanism.noise_transform(randomness.noise_key(), noise_lib.chunk_elements_for(mesh)),
        expected_batch_size=mechanism.expected_batch_size,
        param_rules=rules,
        gathered_at_use=bundle.gathered_at_use,
        adaptive_clip=mechanism.adaptive,
        clip_key=randomness.count_noise_key_data(),
    )
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    logger = loggers.for_run(
        cfg, config_dict, output_dir, dataset.name, distributed.is_main(), method.private
    )
    state = trainer.init(trainable)
    frozen = sharding.put_sharded(frozen, mesh, rules)
    # From here the trainer holds the trainable parameters (its own copy: its updates donate their
    # buffers) and the experiment the placed frozen ones. The bundle drops its tree, which would
    # otherwise keep a second copy of the weights for the whole run (86 MB for MiniLM fine-tuned whole).
    bundle.params = None
    del trainable
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


def train_and_evaluate(exp: Experiment, stop_after: int | None = None) -> records.RunRecord:
    """Train ``exp`` to its last logical step (resuming per ``runner.resume``), evaluate, write records.

    Raises :class:`Preempted` after checkpointing when SIGTERM/SIGINT arrives, or after logical step
    ``stop_after`` (as if preempted there; for callers that train in sessions, and for tests).
    """
    cfg, mechanism, state = exp.cfg, exp.mechanism, exp.state
    # A private run's checkpoints hold its noise state (key, correlated-noise buffers): owner-only.
    checkpoints = Checkpoints(exp.output_dir, cfg.runner.keep_checkpoints, private=exp.private)
    meta = resume.checkpoint_meta(exp.config_dict, mechanism, exp.randomness)
    start, saved_meta = resume.resume(checkpoints, cfg.runner.resume, state, meta, mechanism.steps)
    resumed_at = [*saved_meta.get("resumed_at", []), *([start] if start else [])]
    history = records.History(distributed.side_path(exp.output_dir / records.HISTORY_FILE), resume_step=start)
    policy = release.ReleasePolicy(exp.private, cfg.runner.release_nonprivate_stats)
    clock = hooks.TrainClock(
        float(saved_meta.get("train_seconds", 0.0)),
        float(saved_meta.get("wall_seconds", 0.0)),
        exp.start_time,
    )

    evaluate = hooks.Evaluation(exp, history, hooks.privacy_spent(exp.tracker, mechanism.delta))
    checkpointing = hooks.Checkpointing(
        checkpoints,
        Cadence(cfg.runner.checkpoint_every, mechanism.steps),
        state,
        {**meta, "resumed_at": resumed_at},
        clock,
        last_step=start,
    )
    if not start and cfg.runner.eval_before_training:
        evaluate(0)
    eval_every = cfg.runner.eval_every
    if start and start < mechanism.steps and eval_every and start % eval_every == 0:
        evaluate(start)  # the checkpoint precedes its step's evaluation, which may not have happened
    with StopSignals() as signals:
        callbacks = LoopCallbacks(
            evaluate=evaluate,
            epsilon_at=exp.tracker.epsilon_at if exp.tracker else (lambda step: None),
            log=hooks.TrainLog(policy, history, exp.logger, mechanism.noise_multiplier, state),
            check_budget=exp.tracker.check_step if exp.tracker else (lambda step: None),
            release=policy.train_record,
            save=checkpointing,
            stop_requested=hooks.StopRequest(signals, state, stop_after),
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
                unit_rows=mechanism.units.rows if mechanism.units is not None else None,
            )
        except StopTraining as stop:
            checkpoints.close()
            exp.logger.finish()
            raise Preempted(signals.requested, stop.step, mechanism.steps, str(exp.output_dir)) from None
    checkpoints.close()
    return finish(exp, history, policy, clock, resumed_at)


def run(cfg: DictConfig, stop_after: int | None = None) -> dict:
    """Build, train and evaluate one configuration; returns results.json's content as a dict.

    A complete record with the same settings in the run folder is returned as is (the job is
    skipped); an interrupted run in the folder is resumed (``runner.resume``).
    """
    config_lib.validate_static(cfg)
    done = resume.completed_record(cfg)
    if done is not None:
        return {**done.to_dict(), "skipped": True}
    return train_and_evaluate(build(cfg), stop_after=stop_after).to_dict()
