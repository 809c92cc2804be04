"""``make bench`` = ``python -m dpbench.bench``: the head-to-head table, written to results/bench.md.

python -m dpbench.bench                          # all four workloads, 3 rounds (long: hours)
python -m dpbench.bench --workloads a,d --rounds 5
python -m dpbench.bench --quick                  # tiny models, 1 round, prints the table only
python -m dpbench.bench --variants dpbench-none,dpbench-per_example,torch-nonprivate,opacus-ghost
python -m dpbench.bench --device gpu             # the accelerator bench, one table (make bench-gpu)
python -m dpbench.bench --device cpu --quick     # the same on tiny shapes, on the CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpbench.bench import accelerator, harness, workloads
from dpbench.bench.variants import BY_ID, select

DEFAULT_OUTPUT = Path(__file__).resolve().parents[2] / "results" / "bench.md"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dpbench.bench",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--workloads", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    parser.add_argument("--variants", default="", help="comma-separated subset of: " + ", ".join(BY_ID))
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick: 1)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per subprocess (default: per workload)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny models and batches: a smoke run")
    parser.add_argument(
        "--output", type=Path, default=None, help=f"Markdown file (default {DEFAULT_OUTPUT}; --quick: none)"
    )
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="per-run logs and raw.json (default: a temp dir)"
    )
    parser.add_argument(
        "--rerender", type=Path, default=None, help="a --log-dir of an earlier run: its tables again, no runs"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before a subprocess is killed")
    parser.add_argument(
        "--device",
        choices=("gpu", "cpu"),
        default=None,
        help="the accelerator bench instead (dpbench/bench/accelerator.py; its own options:\n"
        "python -m dpbench.bench --device gpu --help)",
    )
    return parser.parse_args(argv)


def asks_for_device(argv: list[str]) -> bool:
    return any(a == "--device" or a.startswith("--device=") for a in argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if asks_for_device(argv):  # the accelerator bench has options of its own
        return accelerator.main(argv, harness.command_line(argv), echo=lambda line: print(line, flush=True))
    args = parse_args(argv)
    if args.rerender is not None:
        harness.rerender(args.rerender, args.output, echo=lambda line: print(line, flush=True))
        return 0
    keys = [k.strip() for k in args.workloads.split(",") if k.strip()]
    try:
        for key in keys:
            workloads.get(key, args.quick)
        variants = select([v.strip() for v in args.variants.split(",") if v.strip()])
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rounds = args.rounds or (1 if args.quick else 3)
    output = args.output if args.output is not None else (None if args.quick else DEFAULT_OUTPUT)
    harness.run(
        keys,
        variants,
        rounds,
        args.quick,
        args.steps,
        output,
        args.log_dir,
        args.timeout,
        harness.command_line(argv),
        echo=lambda line: print(line, flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
