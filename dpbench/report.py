"""``python -m dpbench.report DIR [DIR ...]``: results.json files under DIR -> one Markdown table.

One row per run: dataset (as labelled, stand-ins included), model and weights, method, LoRA rank,
target and spent ε, δ, σ, logical steps, the task metric(s) and wall time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = ("eval/accuracy", "eval/rouge1", "eval/rouge2", "eval/rougeL")


def load_runs(roots: list[str]) -> list[dict]:
    runs = []
    for root in roots:
        for path in sorted(Path(root).rglob("results.json")):
            result = json.loads(path.read_text())
            result["_path"] = str(path.parent)
            runs.append(result)
    return runs


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table(runs: list[dict]) -> str:
    metrics = [m for m in METRICS if any(m in r["metrics"] for r in runs)]
    header = [
        "dataset",
        "model",
        "method",
        "rank",
        "target ε",
        "ε spent",
        "δ",
        "σ",
        "steps",
        *metrics,
        "wall (s)",
        "run",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        cfg = r["config"]
        row = [
            r["dataset"],
            cfg["model"].get("checkpoint") or cfg["model"]["arch"],
            r["method"],
            _fmt(cfg["model"].get("lora_rank")),
            _fmt(cfg["dp"]["epsilon"] if r["method"] != "none" else None),
            _fmt(r["epsilon"]),
            _fmt(r["delta"], 3),
            _fmt(r["noise_multiplier"]),
            _fmt(r["steps"]),
            *[_fmt(r["metrics"].get(m)) for m in metrics],
            f"{r['wall_seconds']:.0f}",
            r["_path"],
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", help="run or sweep directories holding results.json files")
    args = parser.parse_args()
    runs = load_runs(args.roots)
    if not runs:
        raise SystemExit(f"no results.json under {', '.join(args.roots)}")
    print(table(runs))


if __name__ == "__main__":
    main()
