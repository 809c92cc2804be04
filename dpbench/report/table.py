"""Runs -> rows: a Markdown table (chosen columns), a CSV (every column) and the method x rank grid.

A column is a name, a header and a function of a :class:`Run`; ``--columns`` picks them by name.
Metric columns are named by the metric (``eval/accuracy``); ``baseline:<metric>`` is the
evaluation before training, ``history:<metric>`` the metric at every evaluation and ``test:<metric>``
a tuning's released trial on the test split.

With ``seeds``, runs that differ only in ``runner.seed`` share a row: each metric is their mean ± the
sample standard deviation, with the per-seed values in seed order, so a committed multi-seed table is
regenerated from its records like any other.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Callable

from dpbench.report.runs import INCIDENTAL, Run, settings

METRICS = ("eval/accuracy", "eval/rouge1", "eval/rouge2", "eval/rougeL")


def fmt_metric(name: str, value) -> str:
    if value is None:
        return "-"
    if name.endswith("accuracy"):
        return f"{100 * value:.2f}%"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def fmt_number(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def fmt_minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.1f} min"
    return f"{int(minutes // 60)} h {round(minutes % 60):02d} min"


def _audit_guesses(run: Run) -> str:
    audit = run.audit
    if not audit:
        return "-"
    return f"{audit['num_correct']} / {audit['num_guesses']} ({audit['k_plus']}, {audit['k_minus']})"


def _audit_losses(run: Run) -> str:
    audit = run.audit
    if not audit or audit.get("mean_loss_included") is None:
        return "-"
    return f"{audit['mean_loss_included']:.3f} / {audit['mean_loss_excluded']:.3f}"


def _audit_canaries(run: Run) -> str:
    audit = run.audit
    if not audit:
        return "-"
    return f"{audit['m']} ({audit['num_included']} in)"


def _audit_exposure(run: Run) -> str:
    """Secret canaries' mean exposure, extrapolated (Carlini et al. 2019), included / excluded."""
    exposure = (run.audit or {}).get("exposure")
    if not exposure or not exposure.get("included") or not exposure.get("excluded"):
        return "-"
    return (
        f"{exposure['included']['mean_extrapolated']:.1f} / {exposure['excluded']['mean_extrapolated']:.1f}"
        f" of {exposure['log2_secret_space']:.1f}"
    )


def _wall(run: Run) -> tuple[str, float | None]:
    """The whole job's wall time. Records written before it was carried across resumes hold only the
    last session's (less than the training time of every session, which they do carry): then the
    training time is shown as a lower bound, "≥"."""
    wall, train = run.wall_seconds, run.train_seconds
    if run.resumed_at and wall is not None and train and wall < train:
        return "≥ " + fmt_minutes(train), train
    return fmt_minutes(wall), wall


def _noise(run: Run, which: str) -> float | None:
    """One of ``Run.noise_std``'s numbers (RMS over steps), or None where a record cannot give it."""
    return run.noise_std and run.noise_std[which]


# name -> (header, Markdown cell, raw value for the CSV)
Column = tuple[str, Callable[[Run], str], Callable[[Run], object]]
COLUMNS: dict[str, Column] = {
    "dataset": ("dataset", lambda r: r.dataset, lambda r: r.dataset),
    "model": ("model", lambda r: r.model, lambda r: r.model),
    "method": ("method", lambda r: r.method, lambda r: r.method),
    "clipping": ("clipping", lambda r: r.clipping or "-", lambda r: r.clipping),
    "clip_rule": ("clip norm C", lambda r: r.clip_rule or "-", lambda r: r.clip_rule),
    "finetune": ("fine-tuned", lambda r: r.finetune or "-", lambda r: r.finetune),
    "rank": ("LoRA rank", lambda r: fmt_number(r.lora_rank), lambda r: r.lora_rank),
    "target_epsilon": ("target ε", lambda r: fmt_number(r.target_epsilon), lambda r: r.target_epsilon),
    "epsilon": ("ε spent", lambda r: fmt_number(r.epsilon), lambda r: r.epsilon),
    # A trial released by python -m dpbench.tune: its own ε, and the total with the tuning.
    "epsilon_training": ("ε (training)", lambda r: fmt_number(r.epsilon), lambda r: r.epsilon),
    "epsilon_with_tuning": (
        "ε (with tuning)",
        lambda r: fmt_number(r.epsilon_with_tuning),
        lambda r: r.epsilon_with_tuning,
    ),
    # seeded: batches and noise follow the published runner.seed; the claim assumes it was secret.
    "randomness": ("privacy randomness", lambda r: r.randomness or "-", lambda r: r.randomness),
    "delta": ("δ", lambda r: fmt_number(r.delta, 3), lambda r: r.delta),
    "sigma": ("σ", lambda r: fmt_number(r.noise_multiplier), lambda r: r.noise_multiplier),
    "steps": ("steps", lambda r: str(r.steps), lambda r: r.steps),
    # Noise std per coordinate of the mean gradient: what mechanisms of different σ compare on.
    "noise_step": (
        "noise per step",
        lambda r: fmt_number(_noise(r, "per_step")),
        lambda r: _noise(r, "per_step"),
    ),
    "noise_sum": (
        "noise in the running sum",
        lambda r: fmt_number(_noise(r, "running_sum")),
        lambda r: _noise(r, "running_sum"),
    ),
    "n": ("train examples", lambda r: str(r.train_examples), lambda r: r.train_examples),
    "wall": ("wall time", lambda r: _wall(r)[0], lambda r: _wall(r)[1]),
    "audit_epsilon": (
        "audited ε lower bound (95%)",
        lambda r: fmt_number(r.audit and r.audit["epsilon_lower_bound"]),
        lambda r: r.audit and r.audit["epsilon_lower_bound"],
    ),
    "audit_guesses": ("correct / guesses (k+, k-)", _audit_guesses, _audit_guesses),
    "audit_losses": ("mean canary loss in / out", _audit_losses, _audit_losses),
    "audit_canaries": ("canaries m (included)", _audit_canaries, lambda r: r.audit and r.audit["m"]),
    "audit_exposure": ("secret exposure in / out (bits)", _audit_exposure, _audit_exposure),
    "source": ("data source", lambda r: r.data_source, lambda r: r.data_source),
    "run": ("run", lambda r: r.path, lambda r: r.path),
}
DEFAULT_COLUMNS = [
    "dataset",
    "model",
    "method",
    "rank",
    "target_epsilon",
    "epsilon",
    "delta",
    "sigma",
    "steps",
    "randomness",
]


def _metric_column(name: str) -> Column:
    kind, _, metric = name.rpartition(":")
    short = metric.removeprefix("eval/")
    if kind == "baseline":
        return (
            f"{short} before training",
            lambda r: fmt_metric(metric, (r.baseline_metrics or {}).get(metric)),
            lambda r: (r.baseline_metrics or {}).get(metric),
        )
    if kind == "history":

        def cells(run: Run) -> str:
            values = [fmt_metric(metric, h.get(metric)) for h in run.history if metric in h]
            steps = [str(h["step"]) for h in run.history if metric in h]
            return f"{' / '.join(values)} (steps {', '.join(steps)})" if values else "-"

        return (f"{short} during training", cells, cells)
    if kind == "test":  # a tuning's released trial, on the test split
        return (
            f"{short} (test, released)",
            lambda r: fmt_metric(metric, r.test_metrics.get(metric)),
            lambda r: r.test_metrics.get(metric),
        )
    return (short, lambda r: fmt_metric(metric, r.metrics.get(metric)), lambda r: r.metrics.get(metric))


def column(name: str) -> Column:
    if name in COLUMNS:
        return COLUMNS[name]
    if name.rpartition(":")[2].startswith("eval/"):
        return _metric_column(name)
    if name.startswith("config:"):
        return _config_column(name.removeprefix("config:"))
    allowed = ", ".join(
        [
            *COLUMNS,
            "eval/<metric>",
            "baseline:eval/<metric>",
            "history:eval/<metric>",
            "test:eval/<metric>",
            "config:<dotted.setting>",
        ]
    )
    raise ValueError(f"unknown report column {name!r}; choose from {allowed}")


def _config_column(setting: str) -> Column:
    """A setting of the run's composed config, e.g. ``config:optimizer.learning_rate``."""

    def value(run: Run):
        node = run.config
        for part in setting.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    return (setting, lambda r: fmt_number(value(r)), value)


def default_columns(runs: list[Run]) -> list[str]:
    metrics = [m for m in METRICS if any(m in r.metrics for r in runs)]
    baseline = [f"baseline:{m}" for m in metrics if any(m in (r.baseline_metrics or {}) for r in runs)]
    first = DEFAULT_COLUMNS
    if any(r.epsilon_with_tuning is not None for r in runs):
        at = first.index("epsilon")
        first = [*first[:at], "epsilon_training", "epsilon_with_tuning", *first[at + 1 :]]
    return [*first, *baseline, *metrics, "wall", "run"]


def markdown(runs: list[Run], names: list[str] | None = None, seeds: bool = False) -> str:
    """One row per run; with ``seeds``, one row per setting, metrics as mean ± sd over its seeds."""
    names = names or default_columns(runs)
    columns = [column(name) for name in names]
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    if not seeds:
        for run in runs:
            lines.append("| " + " | ".join(cell(run) for _, cell, _ in columns) + " |")
        return "\n".join(lines)
    lines[0] = (
        "| " + " | ".join(_seed_header(name, header) for name, (header, _, _) in zip(names, columns)) + " |"
    )
    for group in seed_groups(runs, names):
        lines.append("| " + " | ".join(_seed_cell(name, group) for name in names) + " |")
    return "\n".join(lines)


SEED = "config:runner.seed"


def _averaged(name: str) -> bool:
    """Columns that summarise a group of seeds rather than name the setting it shares."""
    return name in ("wall", "run", SEED) or name.rpartition(":")[2].startswith("eval/")


def seed_groups(runs: list[Run], names: list[str]) -> list[list[Run]]:
    """Runs grouped by everything but their seed: the whole config (over the keys every run has, less
    INCIDENTAL settings) and the shown cells, in the order the runs come; each group in seed order."""
    for name in names:
        if name.startswith("history:"):
            raise ValueError(f"report column {name!r} cannot be averaged over seeds; drop it or --seeds")
    fixed = settings(runs, ("runner.seed", *INCIDENTAL))
    shown = [column(name)[1] for name in names if not _averaged(name)]
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        key = (fixed[id(run)], *(cell(run) for cell in shown))
        groups.setdefault(key, []).append(run)
    return [sorted(group, key=lambda r: r.config["runner"].get("seed") or 0) for group in groups.values()]


def _seed_header(name: str, header: str) -> str:
    if name == "wall":
        return "wall time (mean)"
    if name == "run":
        return "runs"
    return "seeds" if name == SEED else header


def _seed_cell(name: str, group: list[Run]) -> str:
    """A column's cell for a group of runs: a metric's mean ± sd (per-seed values), the seeds, the mean
    wall time, the runs; any other column is the same for the whole group (it is part of the key)."""
    _, cell, value = column(name)
    if name == SEED:
        return ", ".join(cell(run) for run in group)
    if name == "run":
        return ", ".join(run.path for run in group)
    if name == "wall":
        walls = [_wall(run)[1] for run in group]
        return "-" if None in walls else fmt_minutes(statistics.mean(walls))
    if not _averaged(name) or len(group) == 1:
        return cell(group[0])
    values = [value(run) for run in group]
    if None in values:
        return " / ".join(cell(run) for run in group)
    return mean_sd(name.rpartition(":")[2], values)


def mean_sd(metric: str, values: list[float]) -> str:
    """Mean ± sample standard deviation, then each value; accuracy in points.

    >>> mean_sd("eval/accuracy", [0.7752, 0.7890, 0.7661])
    '77.68% ± 1.15 (77.52 / 78.90 / 76.61)'
    >>> mean_sd("eval/rougeL", [0.41, 0.43])
    '0.420 ± 0.014 (0.410 / 0.430)'
    """
    scale, unit = (100, "%") if metric.endswith("accuracy") else (1, "")
    digits = 2 if unit else 3
    scaled = [scale * v for v in values]
    each = " / ".join(f"{v:.{digits}f}" for v in scaled)
    mean, sd = statistics.mean(scaled), statistics.stdev(scaled)
    return f"{mean:.{digits}f}{unit} ± {sd:.{digits}f} ({each})"


def table(runs: list[Run]) -> str:
    """The default Markdown table (kept for callers of the earlier ``dpbench.report.table``)."""
    return markdown(runs)


def csv_text(runs: list[Run]) -> str:
    """Every named column plus every metric, raw values."""
    metrics = sorted({m for r in runs for m in r.metrics})
    names = [*COLUMNS, *metrics, *(f"baseline:{m}" for m in metrics)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(names)
    for run in runs:
        writer.writerow(["" if (v := column(name)[2](run)) is None else v for name in names])
    return out.getvalue()


def rank_grid(runs: list[Run]) -> str | None:
    """Method x LoRA rank table of the primary metric, one block per target ε; None if < 2 ranks.

    Full (or head-only) fine-tuning has no rank: it gets its own column after the ranks."""
    lora = [r for r in runs if r.lora_rank]
    ranks = sorted({r.lora_rank for r in lora})
    if len(ranks) < 2:
        return None
    other = [r for r in runs if r.finetune in ("full", "head")]
    columns = [(f"r{k}", lambda r, k=k: r.lora_rank == k) for k in ranks]
    columns += [(mode, lambda r, m=mode: r.finetune == m) for mode in sorted({r.finetune for r in other})]
    blocks = []
    for target in sorted({r.target_epsilon for r in lora + other}, key=lambda e: (e is None, e or 0)):
        cell_runs = [r for r in lora + other if r.target_epsilon == target]
        methods = sorted({r.method for r in cell_runs})
        metric = lora[0].primary_metric
        title = "non-private" if target is None else f"target ε={target:g}"
        lines = [f"{title}, {metric}", "", "| method | " + " | ".join(name for name, _ in columns) + " |"]
        lines.append("|" + "---|" * (len(columns) + 1))
        for method in methods:
            cells = []
            for _, in_column in columns:
                values = [r.metrics.get(metric) for r in cell_runs if r.method == method and in_column(r)]
                values = [v for v in values if v is not None]
                if not values:
                    cells.append("-")
                elif len(values) == 1:
                    cells.append(fmt_metric(metric, values[0]))
                else:  # several seeds
                    cells.append(f"{fmt_metric(metric, sum(values) / len(values))} (mean of {len(values)})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
