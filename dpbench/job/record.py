"""The end of a run: the privacy claim, the audit, the final model (``model/``, with a model card) and
the complete record, written atomically and summarised (results.json, the W&B summary, the console
block). Only what the release policy (``dpbench.privacy.release``) allows leaves the run: the model
card is made from the record, after the policy filtered it."""

from __future__ import annotations

import json
import logging

import jax
import numpy as np

from dpbench import records
from dpbench.models import saved
from dpbench.models.base import LABELS
from dpbench.privacy import release
from dpbench.summary import summary_block
from dpbench.train import distributed
from dpbench.train.loop import merge_params

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
    clock,  # a dpbench.job.hooks.TrainClock: training and wall seconds over every session
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
        train_seconds=clock.seconds(),
        devices=exp.mesh.size,
        data_preparation=preparation,
        dataset_info=dataset_info,
        samples=getattr(exp.task, "samples", None) or None,
        audit=audit,
        **claim,
    )
    model_dir = save_final_model(exp, record)  # before results.json: a complete record has its model
    record.wall_seconds = clock.wall_seconds()
    path = records.write_record(distributed.side_path(exp.output_dir / records.RESULTS_FILE).parent, record)
    # W&B gets the same privacy claim (and audit) as results.json, for reviewers of a dashboard.
    values = record.to_dict()
    exp.logger.summary({k: values[k] for k in SUMMARY_KEYS if values.get(k) is not None})
    exp.logger.finish()
    log.info("results: %s", path)
    if model_dir is not None:
        log.info("model: %s (python -m dpbench.sample %s)", model_dir, exp.output_dir)
    print(summary_block(record, exp.output_dir), flush=True)
    return record


def _on_host(value) -> np.ndarray:
    """A parameter as one host array; sharded over several processes, every process takes part."""
    if getattr(value, "is_fully_addressable", True):
        return np.asarray(jax.device_get(value))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def save_final_model(exp, record: records.RunRecord):
    """``<run dir>/model/``: the trained (and randomly drawn) parameters, the base weights' name and
    checksums instead of a copy of them, the model config and the card. Only the main process writes;
    None on the others."""
    from_base = set(saved.base_file_paths(exp.model, exp.frozen))
    flat = {**{p: v for p, v in exp.frozen.items() if p not in from_base}, **exp.state.trainable}
    host = {path: _on_host(value) for path, value in flat.items()}  # the base stays where it lies
    base_checksums = saved.checksums({p: exp.frozen[p] for p in from_base}) if from_base else None
    if not distributed.is_main():
        return None
    cfg = exp.config_dict
    dataset = cfg["dataset"]
    run = {
        "task": cfg["dataset"]["task"],
        # Every label that did not train (model.finetune's and the DP method's), so a rebuilt bundle
        # trains what this run trained (--step reads checkpoints of the trainable parameters alone).
        "frozen_labels": sorted(set(LABELS) - exp.model.trainable_labels),
        "dataset": {
            k: dataset.get(k)
            for k in ("name", "display_name", "max_length", "max_prompt_length", "max_new_tokens")
        },
        "base_weights": exp.model.weights_source,
        "method": exp.method.name,
        "epsilon": record.epsilon,
        "delta": record.delta,
    }
    return saved.save_model(
        exp.output_dir / saved.MODEL_DIR,
        exp.model,
        merge_params(host, {}),
        cfg["model"],
        run,
        model_card(record, cfg),
        base_checksums,
    )


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def model_card(record: records.RunRecord, cfg: dict) -> str:
    """The model card (``model/README.md``): what the model is and its privacy claim, made only from
    the record's released fields (the release policy has filtered them; no secret is in a record)."""
    model, dataset, privacy = cfg["model"], cfg["dataset"], record.privacy
    finetune = model.get("finetune", "all parameters (trained from scratch)")
    if model.get("finetune") == "lora":
        finetune = (
            f"lora (rank {model['lora_rank']}, alpha {model['lora_alpha']}, targets {model['lora_targets']})"
        )
    lines = [
        f"# {model['arch']} trained by dpbench on {dataset.get('display_name') or record.dataset}",
        "",
        f"- base weights: {record.weights_source}",
        f"- fine-tuning: {finetune}",
        f"- task: {record.task}; data: {record.dataset} ({record.train_examples} training examples, "
        f"from {record.data_source})",
        f"- DP method: {record.method}",
        "",
        "## Privacy",
        "",
    ]
    if record.epsilon is None:
        lines += [
            "Not differentially private (dp.method=none): these weights carry no privacy guarantee.",
            "",
        ]
    else:
        mechanism = privacy.get("mechanism", {})
        units = {"add_remove": "added or removed", "replace_one": "replaced"}
        neighbouring = privacy.get("neighbouring")
        how = units.get(neighbouring, neighbouring)
        unit = f"one training example ({how})"
        dp = cfg.get("dp") or {}
        if dp.get("unit", "example") == "user":  # dp.unit=user: a user's examples are one unit
            unit = f"one user (all their examples, at most {dp.get('max_examples_per_user')} used; {how})"
        lines += [
            f"(ε, δ)-differential privacy with **ε = {_fmt(record.epsilon)}, δ = {_fmt(record.delta)}** "
            f"for the whole training run, at the level of {unit}.",
            "",
            f"- mechanism: {record.method}, clip norm C = {_fmt(mechanism.get('clip_norm'))}, noise "
            f"multiplier σ = {_fmt(record.noise_multiplier)}, {record.steps} steps, sampling rate "
            f"{_fmt(record.sampling_rate)} ({mechanism.get('sampler')})",
            f"- noise: {privacy.get('noise')}",
            f"- accountant: {json.dumps(privacy.get('accountant'), default=str)}",
            f"- privacy randomness: {privacy.get('randomness')}",
        ]
        if privacy.get("warning"):
            lines.append(f"- **warning**: {privacy['warning']}")
        released = privacy.get("released_nonprivate_statistics") or []
        lines += [
            "- released under the claim: these final weights, the evaluation-split metrics and ε over "
            "training (results.json)",
            "- training-data statistics released without noise: "
            + (", ".join(released) if released else "none"),
            "",
        ]
    lines += ["## Evaluation", ""]
    lines += [f"- {name}: {_fmt(value)}" for name, value in record.metrics.items()]
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        "python -m dpbench.sample RUN_DIR --prompt '...'        # generate, or classify",
        "python -m dpbench.export RUN_DIR --format merged      # Hugging Face checkpoint (or peft)",
        "```",
        "",
        "Files: model.safetensors (the parameters the run trained or drew at random, dpbench names; a "
        "pretrained frozen base is not copied: it is read again from the base weights above, checked "
        "against model_config.json's checksums), model_config.json (the model settings and "
        "architecture), tokenizer files.",
        "",
    ]
    return "\n".join(lines)
