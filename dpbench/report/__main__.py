"""``python -m dpbench.report DIR... [--plot]``: tables and plots of runs; ``--update FILE.md...``.

    python -m dpbench.report multirun/mnist_epsilon --plot      # report.md, runs.csv, *.png in that folder
    python -m dpbench.report results/runs/sst2 --columns method,epsilon,eval/accuracy
    python -m dpbench.report results/runs/mechanisms_sst2 --seeds   # mean ± sd over seeds per setting
    python -m dpbench.report --update results/*.md              # regenerate every committed table

DIR is a run or sweep folder (every results.json below it, with history.jsonl when present) or a
folder of committed record files (results/runs/<table>/*.json). The Markdown table goes to stdout;
``--out`` (default: the one run or sweep folder given, else ./report) gets report.md (the table, the
method x rank grid and links to the plots) and runs.csv (every column, raw values); ``--plot`` adds
PNG plots.

``--update`` rewrites, in each Markdown file, every block between ``<!-- report: ARGS -->`` and
``<!-- /report -->`` with the output of ``python -m dpbench.report ARGS`` (paths relative to the
current folder: run it from the repository root). The opening line is the block's command, so a
committed table always states how it was made and cannot drift from its records.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from dpbench.report import plots
from dpbench.report.anchors import load_anchors
from dpbench.report.runs import load_runs
from dpbench.report.table import COLUMNS, csv_text, markdown, rank_grid

# A block: its opening line (the whole line), the generated body, the closing line.
BLOCK = re.compile(
    r"^(<!-- report: (?P<args>[^\n]*) -->\n)(?P<body>.*?)^(<!-- /report -->)$", re.DOTALL | re.MULTILINE
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpbench.report",
        description="Tables (Markdown, CSV) and PNG plots of runs; --update regenerates committed tables.",
    )
    p.add_argument("roots", nargs="*", help="run or sweep folders, or folders of committed record files")
    p.add_argument("--plot", action="store_true", help="also write PNG plots into --out")
    p.add_argument(
        "--out",
        help="where report.md, runs.csv and plots go (default: the one run or sweep folder, else ./report)",
    )
    p.add_argument(
        "--columns",
        help=f"comma-separated table columns: {', '.join(COLUMNS)}, eval/<metric>, baseline:eval/<metric>, "
        "history:eval/<metric> (default: a standard set)",
    )
    p.add_argument(
        "--seeds",
        action="store_true",
        help="one row per setting: runs that differ only in runner.seed, metrics as mean ± sd over seeds",
    )
    p.add_argument("--grid", action="store_true", help="print the method x rank grid instead of the table")
    p.add_argument("--published", metavar="TASK", help="print the published points for TASK (anchors.yaml)")
    p.add_argument(
        "--update", nargs="+", metavar="FILE.md", help="regenerate the report blocks in these files"
    )
    return p


def published_table(task: str) -> str:
    anchors = [a for a in load_anchors() if a.task == task]
    if not anchors:
        raise SystemExit(f"no published points for task {task!r} in results/anchors.yaml")
    metrics = sorted({m for a in anchors for m in a.metrics})
    header = ["published", "model", "method", "LoRA rank", "ε", *(m.removeprefix("eval/") for m in metrics)]
    header.append("source")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for a in anchors:
        values = [f"{'~' if a.approx else ''}{a.metrics[m]:g}" if m in a.metrics else "-" for m in metrics]
        epsilon = "-" if a.epsilon is None else f"{a.epsilon:g}"
        rank = str(a.lora_rank) if a.lora_rank else "-"
        lines.append("| " + " | ".join([a.label, a.model, a.method, rank, epsilon, *values, a.source]) + " |")
    return "\n".join(lines)


def default_out(roots: list[str]) -> str:
    """The one run or sweep folder given (never a folder of committed records), else ./report."""
    if len(roots) == 1 and Path(roots[0]).is_dir() and any(Path(roots[0]).rglob("results.json")):
        return roots[0]
    return "report"


def run_report(args: argparse.Namespace, write_files: bool) -> str:
    """The Markdown the arguments ask for; with ``write_files``, also report.md, runs.csv and plots."""
    if args.published:
        return published_table(args.published)
    if not args.roots:
        raise SystemExit("give at least one run folder (or --update FILE.md, or --published TASK)")
    runs = load_runs(args.roots)
    if not runs:
        raise SystemExit(f"no runs under {', '.join(args.roots)}")
    columns = args.columns.split(",") if args.columns else None
    if args.grid:
        grid = rank_grid(runs)
        if grid is None:
            raise SystemExit("--grid needs runs with at least two LoRA ranks")
        text = grid
    else:
        text = markdown(runs, columns, seeds=args.seeds)
    if not (write_files or args.plot):
        return text
    out = Path(args.out or default_out(args.roots))
    out.mkdir(parents=True, exist_ok=True)
    written = plots.all_plots(runs, load_anchors(), out) if args.plot else []
    if write_files:
        sections = [f"# Report of {', '.join(args.roots)}", "", markdown(runs, columns, seeds=args.seeds)]
        grid = rank_grid(runs)
        if grid:
            sections += ["", "## Method x LoRA rank", "", grid]
        sections += ["", *(f"![{path.stem}]({path.name})" for path in written)]
        (out / "report.md").write_text("\n".join(sections) + "\n")
        (out / "runs.csv").write_text(csv_text(runs))
        print(
            f"wrote {out / 'report.md'}, {out / 'runs.csv'}" + "".join(f", {p}" for p in written),
            file=sys.stderr,
        )
    return text


def update(files: list[str], plots: bool = True) -> None:
    """Regenerate every report block of ``files`` (and, if ``plots``, the plots the blocks ask for)."""
    for name in files:
        path = Path(name)
        text = path.read_text()

        def regenerate(match: re.Match) -> str:
            args = parser().parse_args(shlex.split(match["args"]))
            args.plot = args.plot and plots
            return f"{match.group(1)}{run_report(args, write_files=False)}\n{match.group(4)}"

        new_text, count = BLOCK.subn(regenerate, text)
        if count == 0:
            print(f"{path}: no <!-- report: ... --> blocks", file=sys.stderr)
            continue
        path.write_text(new_text)
        print(f"{path}: {count} block(s) regenerated", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.update:
        update(args.update)
        return
    print(run_report(args, write_files=not (args.grid or args.published)))


if __name__ == "__main__":
    main()
