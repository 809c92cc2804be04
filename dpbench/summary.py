"""The short block a run prints when it ends: what it reached, at what privacy cost, and where things are."""

from __future__ import annotations

from pathlib import Path

from dpbench.records import HISTORY_FILE, RESULTS_FILE, RunRecord


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _metrics(record: RunRecord) -> str:
    if record.task == "summarization":
        names = [m for m in ("eval/rouge1", "eval/rouge2", "eval/rougeL") if m in record.metrics]
        text = " / ".join(f"{record.metrics[m]:.3f}" for m in names)
        return f"ROUGE-1/2/L F1 {text}" if names else "-"
    accuracy = record.metrics.get("eval/accuracy")
    return "-" if accuracy is None else f"accuracy {100 * accuracy:.2f}%"


def _wandb_run(output_dir: Path) -> Path | None:
    runs = sorted((output_dir / "wandb").glob("*run-*"), key=lambda path: path.stat().st_mtime)
    return runs[-1] if runs else None


def privacy_randomness(record: RunRecord) -> str | None:
    """``secret`` or ``seeded`` for a DP record (records from before ``dp.randomness`` are seeded)."""
    if record.epsilon is None:
        return None
    return record.privacy.get("randomness", "seeded")


def summary_block(record: RunRecord, output_dir: str | Path) -> str:
    """Metric, ε, δ, σ, steps, wall time, and where the results, plots and W&B run are."""
    output_dir = Path(output_dir)
    model = record.config.get("model", {})
    dp = record.config.get("dp", {})
    lines = [
        "=" * 30 + " dpbench summary " + "=" * 30,
        f"  {record.dataset}, {model.get('checkpoint') or model.get('arch', '?')}, method {record.method}",
        f"  data       {record.data_source}",
        f"  result     {_metrics(record)} on {record.dataset} (evaluation split), "
        f"after {record.steps} logical steps",
    ]
    if record.epsilon is None:
        lines.append("  privacy    none (non-private run: no ε claimed)")
    else:
        accountant = record.config.get("accountant", {}).get("name", "?")
        lines.append(
            f"  privacy    (ε = {record.epsilon:.4g}, δ = {record.delta:.3g}) by {accountant.upper()}, "
            f"σ = {record.noise_multiplier:.4g}, clip {dp.get('clip_norm')}, sampling rate q = "
            f"{record.sampling_rate:.4g} ({dp.get('sampler')})"
        )
        unit = (record.privacy or {}).get("unit", {})
        if unit.get("unit") == "user":
            lines.append(
                f"  unit       user: {unit['users']} users ({unit['users_from']}), at most "
                f"{unit['max_examples_per_user']} examples each; ε protects all of one user's examples"
            )
        else:
            lines.append("  unit       example: ε protects one training example")
        randomness = privacy_randomness(record)
        if randomness == "secret":
            lines.append("  randomness secret (batches and noise from a per-run secret, never published)")
        else:
            lines.append(
                "  randomness SEEDED: batches and noise follow runner.seed, which this record publishes; "
                "the claim does not hold against anyone who knows it"
            )
    if record.audit:
        lines.append(f"  audit      empirical ε lower bound {record.audit['epsilon_lower_bound']:.3f} (95%)")
    lines.append(
        f"  wall time  {_duration(record.wall_seconds)} (training {_duration(record.train_seconds)})"
    )
    history = " + " + HISTORY_FILE if (output_dir / HISTORY_FILE).is_file() else ""
    lines.append(f"  results    {output_dir / RESULTS_FILE}{history}")
    lines.append(f"  plots      python -m dpbench.report {output_dir} --plot")
    wandb_run = _wandb_run(output_dir)
    if wandb_run is not None:
        mode = record.config.get("logger", {}).get("mode")
        hint = f" (offline: wandb sync {wandb_run})" if mode == "offline" else ""
        lines.append(f"  W&B        {wandb_run}{hint}")
    lines.append("=" * 77)
    return "\n".join(lines)
