"""The training loop's hooks, one small object per job (in the spirit of clu's periodic actions).

:func:`dpbench.train.loop.train_loop` calls them through :class:`~dpbench.train.loop.LoopCallbacks`:
:class:`Evaluation` at every ``runner.eval_every`` and at the end, :class:`TrainLog` at every logged
step (through the release policy), :class:`Checkpointing` after every step (it decides whether one is
due), :class:`StopRequest` after every step (preemption, or a caller's ``stop_after``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from dpbench import records
from dpbench.privacy.release import ReleasePolicy
from dpbench.train.checkpoint import Cadence, Checkpoints
from dpbench.train.loop import TrainState
from dpbench.train.preemption import StopSignals

log = logging.getLogger("dpbench")


class TrainClock:
    """Training and wall seconds, counting those of the sessions before a resume (up to their last
    checkpoint: work lost after it is not counted). Wall time runs from ``wall_start``, the job's
    start, so it includes building, evaluating and writing the record."""

    def __init__(
        self, seconds_before: float = 0.0, wall_before: float = 0.0, wall_start: float | None = None
    ):
        self.seconds_before, self.wall_before = seconds_before, wall_before
        self.start = time.perf_counter()
        self.wall_start = self.start if wall_start is None else wall_start

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.start

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.wall_start


class Evaluation:
    """Evaluate the current parameters on the evaluation split; record and publish the metrics, with
    the privacy spent so far (``privacy_at(step)``: ε and δ, empty for a non-private run)."""

    def __init__(self, exp, history: records.History, privacy_at=lambda step: {}):
        # exp: a dpbench.experiment.Experiment (its task, state, frozen weights, eval split, mesh, logger)
        self.task, self.state, self.frozen, self.arrays = exp.task, exp.state, exp.frozen, exp.eval_arrays
        self.batch_size, self.mesh, self.logger = exp.cfg.compute.eval_batch_size, exp.mesh, exp.logger
        self.history, self.privacy_at = history, privacy_at

    def __call__(self, step: int) -> dict:
        metrics = self.task.evaluate(
            self.state.trainable, self.frozen, self.arrays, self.batch_size, self.mesh
        )
        metrics = {**metrics, **self.privacy_at(step)}
        if self.history.append("eval", step, metrics):
            self.logger.log(metrics, step)
        log.info(
            "step %d: %s", step, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
        )
        return metrics


def privacy_spent(tracker, delta: float | None):
    """``step -> {privacy/epsilon, privacy/delta}`` spent to reach ``step`` (empty when non-private)."""
    if tracker is None:
        return lambda step: {}
    return lambda step: {"privacy/epsilon": tracker.epsilon_at(step), "privacy/delta": delta}


class TrainLog:
    """Publish a logged training step: what the release policy lets out, σ (public) and, with adaptive
    clipping, the clip norm of the next step (a function of the noisy counts: covered by the claim)."""

    def __init__(
        self,
        policy: ReleasePolicy,
        history: records.History,
        logger,
        noise_multiplier: float | None,
        state: TrainState | None = None,
    ):
        self.policy, self.history, self.logger = policy, history, logger
        self.noise_multiplier = noise_multiplier
        self.state = state

    def __call__(self, record: dict, step: int) -> None:
        record = self.policy.throughput(record)
        if self.noise_multiplier is not None:
            record = {**record, "privacy/sigma": self.noise_multiplier}
        if self.state is not None and self.state.clip_state is not None:
            record = {**record, "privacy/clip_norm": float(self.state.clip_state["clip_norm"])}
        if self.history.append("train", step, record):
            self.logger.log(record, step)


class Checkpointing:
    """Save the state when the cadence says so, and always where ``required``.

    Required before every evaluation: whatever a run publishes comes from a saved state, so a
    resumed run never redraws noise for a step whose outputs were already published.
    """

    def __init__(
        self,
        checkpoints: Checkpoints,
        cadence: Cadence,
        state: TrainState,
        meta: dict[str, Any],
        clock: TrainClock,
        last_step: int | None = None,
    ):
        self.checkpoints, self.cadence, self.state = checkpoints, cadence, state
        self.meta, self.clock = meta, clock
        self.last_step = last_step  # the step of the newest checkpoint (None: none yet)

    def __call__(self, step: int, required: bool) -> None:
        if (required or self.cadence.due(step)) and self.last_step != step:
            meta = {
                **self.meta,
                "train_seconds": self.clock.seconds(),
                "wall_seconds": self.clock.wall_seconds(),
            }
            self.checkpoints.save(step, self.state.trainable, self.state.saved_state, meta)
            self.cadence.saved()
            self.last_step = step


class StopRequest:
    """A stop is requested by SIGTERM/SIGINT, or after logical step ``stop_after``."""

    def __init__(self, signals: StopSignals, state: TrainState, stop_after: int | None = None):
        self.signals, self.state, self.stop_after = signals, state, stop_after

    def __call__(self) -> bool:
        if self.signals.requested is not None:
            return True
        return self.stop_after is not None and self.state.step >= self.stop_after
