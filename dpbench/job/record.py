"""The end of a run: the privacy claim, the audit, and the complete record, written atomically and
summarised (results.json, the W&B summary, the console block). Only what the release policy
(``dpbench.privacy.release``) allows leaves the run."""

from __future__ import annotations

import logging
import time

import jax

from dpbench import records
from dpbench.privacy import release
from dpbench.summary import summary_block
from dpbench.train import distributed

log = logging.getLogger("dpbench")

# results.json keys also written to the W&B run summary.
SUMMARY_KEYS = ("metrics", "epsilon", "delta", "noise_multiplier", "steps", "privacy", "audit", "data_source")


def _metrics(evaluation: dict) -> dict:
    """An evaluation line's metrics, without its step and the privacy spent beside it."""
    return {k: v for k, v in evaluation.items() if k != "step" and not k.startswith("privacy/")}


def finish(
    exp,  # a dpbench.experiment.Experiment (not imported: it imports this module)
    history: records.History,
    policy: release.ReleasePolicy,
    train_seconds: float,
    resumed_at: list[int],
) -> records.RunRecord:
    """The privacy claim, the audit, and the complete record (written atomically)."""
    cfg, state = exp.cfg, exp.state
    evaluations = history.of_kind("eval")
    baseline = next((line for line in evaluations if line["step"] == 0), None)
    during = [line for line in evaluations if line["step"] > 0]
    claim = release.privacy_claim(
        exp.mechanism, exp.tracker, cfg.accountant, cfg.dp.epsilon, exp.method.clipping, exp.method.clip_fn
    )
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
    dataset_info = policy.dataset_info(exp.dataset.info)
    preparation = policy.preparation(exp.preparation)
    if exp.private:
        policy.annotate(claim["privacy"], exp.randomness)
    if state.clip_state is not None:  # adaptive clipping: C's end point, a DP release like its path
        claim["privacy"]["adaptive_clip"]["final_clip_norm"] = float(state.clip_state["clip_norm"])
    final = _metrics(during[-1])
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
        reproducibility={
            **release.describe_randomness(exp.mechanism, exp.randomness),
            "command": records.command_line(),
        },
        config=exp.config_dict,
        baseline_metrics=_metrics(baseline) if baseline else None,
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
