"""PNG plots of runs: the ε-utility curve (with published points), the method x rank grid, training curves.

One figure per dataset family (mnist, sst2, samsum), named ``<plot>_<family>.png``. Each function
returns the path it wrote, or None when the runs cannot show that plot (e.g. fewer than two ranks).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from dpbench.report.anchors import Anchor  # noqa: E402
from dpbench.report.runs import Run  # noqa: E402

METRIC_LABELS = {
    "eval/accuracy": "accuracy on the eval split (%)",
    "eval/rougeL": "ROUGE-L F1",
    "eval/loss": "eval loss",
}


def _scale(metric: str) -> float:
    return 100.0 if metric.endswith("accuracy") else 1.0


# Settings that do not define a series: the swept privacy level, seeds, and where or how fast it ran.
NOT_A_SETTING = (
    "dp.epsilon",
    "dp.noise_multiplier",
    "runner.seed",
    "runner.progress_bar",
    "paths.",
    "logger.",
)
NOT_A_SETTING += (
    "compute.",
    "runner.eval_every",
    "dp.clipping",
    "runner.checkpoint",
    "runner.keep_checkpoints",
    "dataset.data_root",  # where the same data lives
    "dataset.data_dir",
    "dataset.download",
)


def _flat(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def settings_of(runs: list[Run]) -> dict[int, tuple]:
    """What each run's curve holds fixed (by ``id(run)``): its config except NOT_A_SETTING (dp.* stays:
    method, clip, δ), over the keys every run has (records from older code lack newer settings)."""
    flats = {id(run): _flat(run.config) for run in runs}
    common = set.intersection(*(set(flat) for flat in flats.values())) if flats else set()
    keys = sorted(k for k in common if not k.startswith(NOT_A_SETTING))
    return {ident: tuple((k, flat[k]) for k in keys) for ident, flat in flats.items()}


def series_labels(runs: list[Run]) -> dict[tuple, str]:
    """A legend label per setting: dataset, model, method, rank, then the settings that tell series apart."""
    of = settings_of(runs)
    settings = {of[id(run)]: run for run in runs}
    flats = {key: dict(key) for key in settings}
    differing = sorted(
        {k for f in flats.values() for k, v in f.items() if any(g.get(k) != v for g in flats.values())}
    )
    # The method and rank are named anyway; privacy settings differ between private and non-private runs.
    shown = [
        k
        for k in differing
        if not k.startswith(("dp.", "accountant.", "model.lora_rank", "dataset.", "model."))
    ]
    labels = {}
    for key, run in settings.items():
        extra = ", ".join(f"{k.split('.')[-1]}={flats[key].get(k, '-')}" for k in shown[:3])
        method = "non-private" if run.method == "none" else run.method
        base = f"{run.dataset}, {run.model.removeprefix('pkg:')}, {method}"
        labels[key] = (
            base + (f" r{run.lora_rank}" if run.lora_rank else "") + (f" ({extra})" if extra else "")
        )
    return labels


def _log_epsilon_axis(ax) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def dataset_labels(runs: list[Run]) -> str:
    """The datasets as the records label them ("SST-2 (RT stand-in)"): plots of stand-ins say so."""
    return ", ".join(sorted({run.record.dataset for run in runs}))


def epsilon_utility(runs: list[Run], anchors: list[Anchor], out: Path, family: str) -> Path | None:
    """Metric against ε spent (log axis): one line per (dataset, model, method, rank), non-private runs
    as dashed lines, published points as open markers labelled with their source."""
    private = [r for r in runs if r.private]
    if not private:
        return None
    metric = private[0].primary_metric
    scale = _scale(metric)
    fig, ax = plt.subplots(figsize=(11, 4.8))
    labels, of = series_labels(runs), settings_of(runs)
    series: dict[tuple, list[Run]] = defaultdict(list)
    for run in private:
        series[of[id(run)]].append(run)
    for key, members in sorted(series.items(), key=lambda item: labels[item[0]]):
        members = sorted((r for r in members if metric in r.metrics), key=lambda r: r.epsilon)
        ax.plot(
            [r.epsilon for r in members],
            [scale * r.metrics[metric] for r in members],
            "o-",
            label=labels[key],
        )
    for run in runs:
        if run.method == "none" and metric in run.metrics:
            ax.axhline(scale * run.metrics[metric], ls="--", lw=1, color="gray")
            ax.annotate(
                labels[of[id(run)]],
                (1, scale * run.metrics[metric]),
                xycoords=("axes fraction", "data"),
                ha="right",
                va="bottom",
                fontsize=8,
                color="gray",
            )
    published = [a for a in anchors if a.task == family and metric in a.metrics]
    markers = iter("sD^vP*Xh<>")
    by_label: dict[str, list[Anchor]] = defaultdict(list)
    for anchor in published:
        by_label[anchor.label].append(anchor)
    for label, points in by_label.items():
        marker = next(markers, "s")
        dp_points = [a for a in points if a.epsilon is not None]
        if dp_points:
            ax.scatter(
                [a.epsilon for a in dp_points],
                [scale * a.metrics[metric] for a in dp_points],
                marker=marker,
                facecolors="none",
                edgecolors="black",
                label=f"published: {label}",
            )
        for anchor in points:
            if anchor.epsilon is None and anchor.method == "none":
                ax.axhline(scale * anchor.metrics[metric], ls=":", lw=1, color="black", alpha=0.5)
    _log_epsilon_axis(ax)
    ax.set_xlabel("ε spent (log scale)")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(f"{dataset_labels(runs)}: utility against privacy (dotted: published non-private)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a point
    path = out / f"epsilon_utility_{family}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def rank_grid(runs: list[Run], anchors: list[Anchor], out: Path, family: str) -> Path | None:
    """Metric against LoRA rank, one line per (method, target ε); published points as open markers."""
    lora = [r for r in runs if r.lora_rank]
    if len({r.lora_rank for r in lora}) < 2:
        return None
    metric = lora[0].primary_metric
    scale = _scale(metric)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    series: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in lora:
        if metric in run.metrics:
            series[(run.method, run.target_epsilon)][run.lora_rank].append(scale * run.metrics[metric])
    # Colour and marker name the method, line style the ε: series that coincide (ghost is vanilla
    # computed another way) stay visible as a second marker on the same line.
    methods = sorted({method for method, _ in series})
    others = [r for r in runs if r.finetune in ("full", "head") and metric in r.metrics]
    targets = sorted({r.target_epsilon for r in lora + others if r.target_epsilon}, reverse=True)
    line_styles = dict(zip(targets, ["-", "--", "-.", (0, (5, 1, 1, 1))] * len(targets)))
    for (method, target), by_rank in sorted(series.items(), key=lambda item: str(item[0])):
        ranks = sorted(by_rank)
        means = [sum(by_rank[k]) / len(by_rank[k]) for k in ranks]
        label = f"{method}, " + ("non-private" if target is None else f"ε={target:g}")
        index = methods.index(method)
        ax.plot(
            ranks,
            means,
            color=f"C{index % 10}",
            marker="os^DvP"[index % 6],
            markerfacecolor="none" if index % 2 else None,
            linestyle=":" if target is None else line_styles[target],
            label=label,
        )
    # Full (or head-only) fine-tuning has no rank: a horizontal line across the ranks, per ε.
    for run in sorted(others, key=lambda r: (r.finetune, -(r.target_epsilon or 1e9))):
        target = run.target_epsilon
        ax.axhline(
            scale * run.metrics[metric],
            color="grey",
            linestyle=":" if target is None else line_styles.get(target, "-"),
            linewidth=1,
            label=f"{run.finetune} fine-tuning, " + ("non-private" if target is None else f"ε={target:g}"),
        )
    published = [a for a in anchors if a.task == family and a.lora_rank and metric in a.metrics]
    for anchor in published:
        ax.scatter(
            anchor.lora_rank,
            scale * anchor.metrics[metric],
            marker="s",
            facecolors="none",
            edgecolors="black",
        )
        ax.annotate(
            f"{anchor.label} ε={anchor.epsilon:g}" if anchor.epsilon else anchor.label,
            (anchor.lora_rank, scale * anchor.metrics[metric]),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(f"{dataset_labels(runs)}: method x LoRA rank (open squares: published)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: the grid is busy
    path = out / f"rank_grid_{family}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def epsilon_curve(run: Run) -> list[tuple[int, float]]:
    """(step, ε spent) pairs: logged ones from history.jsonl, else recomputed by the run's accountant at
    each evaluation step from its recorded mechanism (sampler, σ, δ)."""
    logged = [
        (h["step"], h["privacy/epsilon"]) for h in run.train_history if h.get("privacy/epsilon") is not None
    ]
    if logged or not run.private:
        return logged
    from dpbench.privacy.accounting import AccountantConfig, compute_epsilon
    from dpbench.privacy.batch_selection import make_sampler

    dp, runner = run.config["dp"], run.config["runner"]
    if dp["sampler"] == "balls_in_bins":  # its event needs the noise strategy's sensitivity: ε is logged
        return logged
    sampler = make_sampler(
        dp["sampler"],
        run.train_examples,
        runner["batch_size"],
        runner["seed"],
        cycle_length=dp.get("bands", 1),
    )
    accountant = AccountantConfig(**run.config["accountant"])
    steps = sorted({h["step"] for h in run.history if h["step"] > 0} | {run.steps})
    return [(k, compute_epsilon(sampler, run.noise_multiplier, k, run.delta, accountant)) for k in steps]


def training_curves(runs: list[Run], out: Path, family: str) -> Path | None:
    """Loss, metric and ε against step for each run (train loss from history.jsonl when present)."""
    with_history = [r for r in runs if r.history or r.train_history]
    if not with_history:
        return None
    metric = with_history[0].primary_metric
    scale = _scale(metric)
    fig, (ax_loss, ax_metric, ax_eps) = plt.subplots(1, 3, figsize=(13, 3.8))
    for index, run in enumerate(with_history):
        style = {"color": f"C{index % 10}", "marker": "o", "ms": 3}
        label = f"{run.label} [{'/'.join(Path(run.path).with_suffix('').parts[-2:])}]"
        if any("train/loss" in h for h in run.train_history):
            points = [(h["step"], h["train/loss"]) for h in run.train_history if "train/loss" in h]
            style_loss = {**style, "marker": None}
        else:
            points = [(h["step"], h["eval/loss"]) for h in run.history if "eval/loss" in h]
            style_loss = style
        if points:
            ax_loss.plot(*zip(*points), label=label, **style_loss)
        metric_points = [(h["step"], scale * h[metric]) for h in run.history if metric in h]
        if metric_points:
            ax_metric.plot(*zip(*metric_points), label=label, **style)
        eps_points = epsilon_curve(run)
        if eps_points:
            ax_eps.plot(*zip(*eps_points), label=label, **style)
    ax_loss.set_ylabel("loss (train if logged, else eval)")
    ax_metric.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax_eps.set_ylabel("ε spent")
    for ax in (ax_loss, ax_metric, ax_eps):
        ax.set_xlabel("logical step")
        ax.grid(alpha=0.3)
        if not ax.has_data():
            ax.text(0.5, 0.5, "not in these records", ha="center", va="center", transform=ax.transAxes)
    if ax_metric.has_data():
        ax_metric.legend(fontsize=7)
    fig.suptitle(f"{dataset_labels(with_history)}: training curves")
    path = out / f"training_curves_{family}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def all_plots(runs: list[Run], anchors: list[Anchor], out: Path) -> list[Path]:
    """Every plot the runs support, per dataset family."""
    out.mkdir(parents=True, exist_ok=True)
    families: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        families[run.dataset_key].append(run)
    written = []
    for family, members in sorted(families.items()):
        for plot in (epsilon_utility, rank_grid):
            path = plot(members, anchors, out, family)
            if path:
                written.append(path)
        path = training_curves(members, out, family)
        if path:
            written.append(path)
    return written
