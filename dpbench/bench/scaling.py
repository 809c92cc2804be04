"""``python -m dpbench.bench.scaling`` (``make bench-scaling``): how DP's cost grows with the work.

For each ``dp.clipping`` (per_example, ghost, bookkeeping) and dpbench's own non-private step
(``dp=none``), one logical step of MiniLM-L6 (the head-to-head bench's workloads (b), LoRA r8 on
query and value, and (d), full fine-tuning) is timed against the sequence length T at a fixed batch,
and against the batch size at a fixed T. Each logical batch is one physical batch, so memory grows
with the work. It prints Markdown tables of time and peak RSS, each DP row over the non-private row
of the same shape, and which way the clipping code's mixed rule takes for each layer at each T
(``dpbench.privacy.clipping.norm_routes``: the ghost norm, or the materialised per-example
gradient); it writes the raw numbers (``bench_scaling.json``) and a plot of the ratios.

Every cell (shape x variant) runs in its own worker process (``dpbench.bench.worker``, through
``accelerator.run_group``): one compiling warm-up step, then timed steps and their median; the peak
RSS is that process's own. Rounds are interleaved (every cell once per round); round r starts at the
r-th shape and measures each shape's variants from the r-th, so no variant is always first after a
change of shape (``round_order``); a cell's number is the median over rounds, as ``make bench``. The 1-minute
load average before and after each process is kept, and a cell measured while other jobs held the
cores is flagged (``harness.machine_busy``).

``--quick``: tiny_encoder, T in {16, 32}, batch in {4, 8}, one round, the variants of one shape in
one process, XLA without its optimisations: a check that the bench works, whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dpbench.bench import accelerator, harness, workloads
from dpbench.bench.variants import BY_ID, CLIPPINGS, package_versions

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PLOT = REPO / "results" / "plots" / "bench_scaling.png"
FINETUNE_WORKLOADS = {"lora": "b", "full": "d"}  # the head-to-head bench's MiniLM workloads
VARIANT_IDS = ("dpbench-none", *(f"dpbench-{c}" for c in CLIPPINGS))


@dataclasses.dataclass(frozen=True)
class Grid:
    """The shapes measured: T at a fixed batch, and the batch at a fixed T."""

    seq_lens: tuple[int, ...]
    seq_batch: int  # the batch of the sequence-length curve
    batch_sizes: tuple[int, ...]
    batch_seq_len: int  # the sequence length of the batch-size curve


FULL_GRID = Grid(
    seq_lens=(32, 64, 128, 256, 512), seq_batch=16, batch_sizes=(8, 16, 32, 64), batch_seq_len=128
)
QUICK_GRID = Grid(seq_lens=(16, 32), seq_batch=8, batch_sizes=(4, 8), batch_seq_len=16)


@dataclasses.dataclass(frozen=True)
class Shape:
    finetune: str  # lora | full
    seq_len: int
    batch_size: int

    @property
    def name(self) -> str:
        return f"{self.finetune}_T{self.seq_len}_B{self.batch_size}"


def shapes(finetunes: list[str], grid: Grid) -> list[Shape]:
    """Every shape either curve needs, once (the curves share the shape where they cross)."""
    found = []
    for finetune in finetunes:
        found += [Shape(finetune, t, grid.seq_batch) for t in grid.seq_lens]
        found += [Shape(finetune, grid.batch_seq_len, b) for b in grid.batch_sizes]
    return list(dict.fromkeys(found))


def workload_at(shape: Shape, quick: bool) -> workloads.Workload:
    """MiniLM's workload (tiny_encoder with ``quick``) at this shape, the logical batch one physical batch."""
    base = workloads.get(FINETUNE_WORKLOADS[shape.finetune], quick)
    return dataclasses.replace(
        base, seq_len=shape.seq_len, batch_size=shape.batch_size, physical_batch_size=shape.batch_size
    )


def child_env(quick: bool) -> dict:
    env = {**harness._child_env(), "JAX_PLATFORMS": "cpu"}
    if quick:  # a check that the bench works: XLA:CPU's optimisations cost most of its time
        env.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    return env


def round_order(chosen: list, variants: list, r: int) -> list[tuple]:
    """The (shape, variant) cells of round ``r``: the shapes from the r-th on, and within each shape
    the variants from the r-th on, so over ``len(variants)`` rounds each variant is measured once in
    each position after a change of shape (the first process of a shape may run in a colder machine).

    >>> [f"{s}{v}" for s, v in round_order(["A", "B"], ["n", "p", "g"], 1)]
    ['Bp', 'Bg', 'Bn', 'Ap', 'Ag', 'An']
    """
    shape_start, variant_start = r % len(chosen), r % len(variants)
    rotated_shapes = chosen[shape_start:] + chosen[:shape_start]
    rotated_variants = variants[variant_start:] + variants[:variant_start]
    return [(s, v) for s in rotated_shapes for v in rotated_variants]


def run_cells(
    chosen: list[Shape], rounds: int, quick: bool, steps, log_dir: Path, timeout: float, echo
) -> dict[Shape, list[harness.Measurement]]:
    """Every shape x variant in every round, each process bracketed by the load average."""
    env = child_env(quick)
    if quick:  # later processes load the optimizer update's compilation (the same in every DP cell);
        # not in a real run, where it would take compilation out of later rounds' peak RSS only
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(log_dir / "jax_cache"))
    variants = [BY_ID[i] for i in VARIANT_IDS]
    measured: dict[Shape, list[harness.Measurement]] = {s: [] for s in chosen}
    for r in range(rounds):
        round_dir = log_dir / f"round{r}"
        ordered = round_order(chosen, variants, r)
        # A process per cell (so its peak RSS is that cell's); with --quick, a process per shape.
        per_process = len(variants) if quick else 1  # round_order keeps a shape's cells together
        groups = [ordered[i : i + per_process] for i in range(0, len(ordered), per_process)]
        for group in groups:
            shape = group[0][0]
            cells = [accelerator.Cell(workload_at(shape, quick), v) for _, v in group]
            process_dir = round_dir / shape.name  # the worker's log and JSON, named by its variants
            process_dir.mkdir(parents=True, exist_ok=True)
            accelerator.run_group(cells, "cpu", quick, steps, process_dir, env, timeout)
            for cell in cells:
                m = cell.measurement
                m.round = r
                measured[shape].append(m)
                shown = f"{statistics.median(m.step_seconds):.3f} s/step" if m.step_seconds else m.error
                echo(
                    f"round {r + 1}/{rounds} {shape.name} {cell.variant.id}: {shown}, peak RSS "
                    f"{m.peak_rss_mb:.0f} MB, 1-min load {m.load_before:.2f} -> {m.load_after:.2f}"
                    + (" (busy)" if m.busy else "")
                )
    return measured


def summarise(measured: dict[Shape, list[harness.Measurement]]) -> dict[Shape, list[harness.Row]]:
    """Per shape, ``harness.summarise``'s rows: medians over rounds, ratios to ``dp=none`` of that shape."""
    variants = [BY_ID[i] for i in VARIANT_IDS]
    versions = package_versions()
    return {shape: harness.summarise(variants, ms, versions, {}) for shape, ms in measured.items()}


def clipping_name(row: harness.Row) -> str:
    return row.variant.clipping or "none (dp=none)"


def render_rows(
    title: str, axis: str, chosen: list[Shape], summary: dict[Shape, list[harness.Row]]
) -> list[str]:
    """One table: a row per shape x variant."""
    lines = [
        title,
        "",
        f"| fine-tuning | {axis} | dp.clipping | s / step | vs non-private | CPU s / step | vs non-private | "
        "peak RSS | vs non-private | peak RSS in timed steps | vs non-private | 1-min load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in chosen:
        rows = summary[shape]
        value = shape.seq_len if axis == "T" else shape.batch_size
        for row in rows:
            head = f"| {shape.finetune} | {value} | {clipping_name(row)} |"
            if row.seconds is None:
                lines.append(f"{head} {row.note} | | | | | | | | |")
                continue
            cells = [
                f"{row.seconds:.3f}",
                harness._fmt(row.time_ratio, "{:.2f}x"),
                harness._fmt(row.cpu_seconds, "{:.3f}"),
                harness._fmt(row.cpu_ratio, "{:.2f}x"),
                f"{row.peak_rss_mb:.0f} MB",
                harness._fmt(row.memory_ratio, "{:.2f}x"),
                harness._fmt(row.steps_peak_mb, "{:.0f} MB"),
                harness._fmt(row.steps_memory_ratio, "{:.2f}x"),
                harness.format_load(row.load_range, row.busy_rounds > 0),
            ]
            lines.append(f"{head} " + " | ".join(cells) + " |")
    return lines


def _collapse(path: str) -> str:
    """``encoder/layer_3/attention/query/kernel`` -> ``encoder/layer_*/attention/query/kernel``."""
    return re.sub(r"layer_\d+", "layer_*", path)


def route_rows(routes: dict[int, dict[str, dict]]) -> tuple[list[tuple[str, str, str, list[str]]], dict]:
    """(parameter, d1 x d2, positions, route at each T) for every parameter whose norm the mixed rule
    or the ghost norm gives, parameters differing only in their layer number merged where they agree;
    and how many parameters take each route that does not depend on T (scales and biases, untapped)."""
    seq_lens = sorted(routes)
    by_param: dict[str, list[dict]] = {}
    for seq_len in seq_lens:
        for path, entry in routes[seq_len].items():
            by_param.setdefault(path, []).append(entry)
    merged: dict[tuple, list[str]] = {}
    fixed: dict[str, int] = {}
    for path, entries in by_param.items():
        kinds = {e["route"] for e in entries}
        if kinds <= {"diag", "untapped"}:
            fixed[entries[0]["route"]] = fixed.get(entries[0]["route"], 0) + 1
            continue
        signature = tuple((e["route"], e.get("tokens"), tuple(e.get("dims") or ())) for e in entries)
        first = entries[0]
        if first.get("dims"):
            shape = "{} x {}".format(*first["dims"])
        else:  # the ghost norm regardless of T: an embedding's ids, or a parameter used by several layers
            shape = "embedding ids" if first.get("ids") else f"{first['taps']} uses (tied)"
        merged.setdefault((_collapse(path), shape, signature), []).append(path)
    rows = []
    for (pattern, shape, signature), paths in merged.items():
        tokens = [t for _, t, _ in signature]
        if tokens == seq_lens:
            positions = "T"
        elif all(t is None for t in tokens):
            positions = "-"
        else:
            positions = ", ".join(sorted({str(t) for t in tokens}))
        name = f"`{pattern}`" + (f" ({len(paths)} layers)" if len(paths) > 1 else "")
        rows.append((name, shape, positions, [route for route, _, _ in signature]))
    return rows, fixed


def render_routes(routes_by_finetune: dict[str, dict], auto_choice: str | None) -> list[str]:
    lines = ["### Where the mixed rule takes the ghost norm or the materialised per-example gradient", ""]
    lines.append(
        "`dp.clipping` = ghost and bookkeeping compute each parameter's per-example norm either as the ghost "
        "norm (cost ∝ T²(d₁+d₂)) or from its materialised per-example gradient (∝ T·d₁·d₂), whichever "
        "the rule in `dpbench.privacy.clipping.materialises` finds cheaper; this is the code's own "
        "decision (`clipping.norm_routes`, traced on this model), not a re-derivation."
        + (
            f" `dp.clipping=auto` runs `{auto_choice}` at every shape "
            "(`dpbench.privacy.methods.resolve_clipping`): a fixed choice, not a rule on the shapes."
            if auto_choice
            else ""
        )
    )
    for finetune, routes in routes_by_finetune.items():
        lines.append("")
        if "error" in routes:
            lines.append(f"{finetune}: not traced: {routes['error']}")
            continue
        seq_lens = sorted(int(t) for t in routes)
        rows, fixed = route_rows({int(t): r for t, r in routes.items()})
        lines.append(
            f"| {finetune}: parameter | d₁ x d₂ | positions | "
            + " | ".join(f"T={t}" for t in seq_lens)
            + " |"
        )
        lines.append("|---|---|---|" + "---|" * len(seq_lens))
        for name, shape, positions, per_t in rows:
            lines.append(f"| {name} | {shape} | {positions} | " + " | ".join(per_t) + " |")
        described = {
            "diag": "scales and biases (diag: per-example gradient always formed)",
            "untapped": "untapped (vmap of grad)",
        }
        if fixed:
            lines.append("")
            lines.append(
                "Besides: " + "; ".join(f"{n} {described.get(k, k)}" for k, n in sorted(fixed.items())) + "."
            )
    return lines


def layer_routes(finetunes: list[str], grid: Grid, quick: bool) -> tuple[dict[str, dict], str | None]:
    """The clipping code's per-layer routes at each T (traced abstractly in this process, after the
    measurements, so nothing runs beside a cell), and what ``dp.clipping=auto`` resolves to."""
    from dpbench.bench import jax_side
    from dpbench.privacy.methods import resolve_clipping

    routes = {}
    for finetune in finetunes:
        workload = workload_at(Shape(finetune, grid.seq_lens[0], grid.seq_batch), quick)
        try:
            routes[finetune] = jax_side.norm_routes(workload, list(grid.seq_lens))
        except Exception as error:  # noqa: BLE001 - reported in the output; the measurements stand
            routes[finetune] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    return routes, resolve_clipping("vanilla", "auto")


def plot(
    summary: dict[Shape, list[harness.Row]], finetunes: list[str], grid: Grid, path: Path, quick: bool
) -> Path:
    """Time and in-step memory over the non-private step against T, time against the batch:
    a column per fine-tuning mode, a line per clipping."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    panels = (
        ("time_ratio", "seq_len", "DP / non-private time"),
        ("steps_memory_ratio", "seq_len", "DP / non-private peak RSS\n(timed steps)"),
        ("time_ratio", "batch_size", "DP / non-private time"),
    )
    figure, axes = plt.subplots(len(panels), len(finetunes), figsize=(5 * len(finetunes), 9), squeeze=False)
    for column, finetune in enumerate(finetunes):
        for row_index, (field, axis, ylabel) in enumerate(panels):
            ax = axes[row_index][column]
            if axis == "seq_len":
                chosen = [Shape(finetune, t, grid.seq_batch) for t in grid.seq_lens]
                ax.set_xlabel(f"sequence length T (batch {grid.seq_batch})")
            else:
                chosen = [Shape(finetune, grid.batch_seq_len, b) for b in grid.batch_sizes]
                ax.set_xlabel(f"batch size (T = {grid.batch_seq_len})")
            for clipping in CLIPPINGS:
                points = []
                for shape in chosen:
                    row = next(r for r in summary[shape] if r.variant.clipping == clipping)
                    value = getattr(row, field)
                    if value is not None:
                        points.append((getattr(shape, axis), value))
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=clipping)
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xscale("log", base=2)
            ax.set_xticks([getattr(s, axis) for s in chosen], [str(getattr(s, axis)) for s in chosen])
            ax.set_ylabel(ylabel)
            if row_index == 0:
                model = "tiny_encoder (--quick)" if quick else "MiniLM-L6"
                ax.set_title(f"{model} + LoRA" if finetune == "lora" else f"{model}, full fine-tuning")
            if ax.get_legend_handles_labels()[0]:  # no line where every cell of a clipping failed
                ax.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def render(summary, finetunes, grid, routes, auto_choice, header) -> str:
    by_seq = [Shape(f, t, grid.seq_batch) for f in finetunes for t in grid.seq_lens]
    by_batch = [Shape(f, grid.batch_seq_len, b) for f in finetunes for b in grid.batch_sizes]
    versions = ", ".join(
        f"{k} {v or 'not installed'}" for k, v in header["versions"].items() if k in ("jax", "flax")
    )
    lines = [
        f"Command: `{header['command']}`; started {header['started']}, "
        f"{header['wall_seconds'] / 60:.1f} min; checkout {header['commit']}.  ",
        f"Machine: {header['machine']}. Versions: {versions}.  ",
        f"{header['rounds']} interleaved round(s); {header['isolation']}; a compiling warm-up step, then "
        f"{header['steps']} timed steps per process; medians. The logical batch is one physical batch.",
        "",
        *render_rows(f"### Against sequence length T (batch {grid.seq_batch})", "T", by_seq, summary),
        "",
        *render_rows(f"### Against batch size (T = {grid.batch_seq_len})", "batch", by_batch, summary),
        "",
        "vs non-private: over `dp=none` at the same shape and fine-tuning (time: median s per logical "
        "step; peak RSS: the process's, compilation included; in timed steps: the peak restarted after "
        "the warm-up).",
    ]
    if any(r.busy_rounds for rs in summary.values() for r in rs):
        lines += ["", harness.busy_footnote()]
    lines += ["", *render_routes(routes, auto_choice)]
    return "\n".join(lines)


def raw_record(measured, summary, routes, auto_choice, header) -> dict:
    def row_dict(row: harness.Row) -> dict:
        fields = dataclasses.asdict(row)
        fields.pop("variant")
        return {"variant": row.variant.id, "clipping": row.variant.clipping, **fields}

    return {
        "header": header,
        "auto_resolves_to": auto_choice,
        "shapes": [
            {
                **dataclasses.asdict(shape),
                "rows": [row_dict(r) for r in summary[shape]],
                "measurements": [dataclasses.asdict(m) for m in measured[shape]],
            }
            for shape in measured
        ],
        "routes": routes,
    }


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated positive integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated positive integers")
    return tuple(sorted(set(values)))


def _finetunes(text: str) -> list[str]:
    chosen = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in FINETUNE_WORKLOADS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(FINETUNE_WORKLOADS)}")
    return list(dict.fromkeys(chosen))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _OneLineErrors(prog="python -m dpbench.bench.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny_encoder, T 16/32, batch 4/8, 1 round")
    parser.add_argument(
        "--finetunes", type=_finetunes, default=list(FINETUNE_WORKLOADS), help="lora,full (default both)"
    )
    parser.add_argument("--seq-lens", type=_positive_ints, default=None, help="T values (default 32,...,512)")
    parser.add_argument(
        "--batch-sizes", type=_positive_ints, default=None, help="batch values (default 8,16,32,64)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick: 1)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per process (default: per workload)"
    )
    parser.add_argument("--log-dir", type=Path, default=None, help="worker logs, bench_scaling.md and .json")
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help=f"PNG (default {DEFAULT_PLOT.relative_to(REPO)}; --quick: in --log-dir)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before one process is killed")
    args = parser.parse_args(argv)
    for name in ("rounds", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: give at least 1")
    return args


def main(argv: list[str] | None = None, echo=print) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except SystemExit as done:  # --help, or a bad option (one line, status 2)
        return int(done.code or 0)
    base = QUICK_GRID if args.quick else FULL_GRID
    grid = dataclasses.replace(
        base, seq_lens=args.seq_lens or base.seq_lens, batch_sizes=args.batch_sizes or base.batch_sizes
    )
    rounds = args.rounds or (1 if args.quick else 3)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="dpbench-bench-scaling-")).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    start = time.perf_counter()

    chosen = shapes(args.finetunes, grid)
    measured = run_cells(chosen, rounds, args.quick, args.steps, log_dir, args.timeout, echo)
    summary = summarise(measured)
    routes, auto_choice = layer_routes(args.finetunes, grid, args.quick)
    steps = {str(workload_at(s, args.quick).timed_steps) for s in chosen}
    header = {
        "command": "python -m dpbench.bench.scaling " + shlex.join(argv),
        "started": started,
        "wall_seconds": time.perf_counter() - start,
        "commit": harness.git_commit(),
        "machine": harness.machine_description(),
        "versions": package_versions(),
        "rounds": rounds,
        "steps": args.steps or "/".join(sorted(steps)),
        "isolation": "one process per shape (--quick)" if args.quick else "one process per cell",
        "grid": dataclasses.asdict(grid),
        "finetunes": args.finetunes,
        "quick": args.quick,
    }
    text = render(summary, args.finetunes, grid, routes, auto_choice, header)
    (log_dir / "bench_scaling.md").write_text(text + "\n")
    raw = raw_record(measured, summary, routes, auto_choice, header)
    (log_dir / "bench_scaling.json").write_text(json.dumps(raw, indent=1))
    plot_path = plot(
        summary,
        args.finetunes,
        grid,
        args.plot or (log_dir / "bench_scaling.png" if args.quick else DEFAULT_PLOT),
        args.quick,
    )
    echo(text)
    echo(f"plot: {plot_path}")
    echo(f"logs, bench_scaling.md and bench_scaling.json (raw numbers): {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(echo=lambda line: print(line, flush=True)))
