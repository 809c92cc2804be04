"""Compare the uninterrupted and the interrupted twin: records, parameters, history.

    python scripts/reliability/compare.py [DIR]

DIR holds the twins' run folders ``uninterrupted/`` and ``interrupted/`` (``results.json`` and
``history.jsonl`` of each), as ``scripts/reliability/run.sh`` writes them; default: the committed
records in ``results/reliability/``. Needs dpbench installed (``make install``).
"""

import argparse
from pathlib import Path

from dpbench import records

RECORDED = Path(__file__).resolve().parents[2] / "results" / "reliability"


def without_throughput(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k != "train/examples_per_s"} for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "dir", nargs="?", type=Path, default=RECORDED, help=f"the twins' parent folder (default: {RECORDED})"
    )
    base = parser.parse_args().dir
    a, b = records.load_record(base / "uninterrupted"), records.load_record(base / "interrupted")
    ha, hb = records.read_history(base / "uninterrupted"), records.read_history(base / "interrupted")

    def steps(resumed_at):
        return ", ".join(map(str, resumed_at or [])) or "-"

    def evaluations(record):
        return ", ".join(f"{h['step']}: {h['eval/accuracy']:.4f}" for h in record.history)

    rows = [
        ("final test accuracy", a.metrics["eval/accuracy"], b.metrics["eval/accuracy"]),
        ("final test loss", a.metrics["eval/loss"], b.metrics["eval/loss"]),
        ("evaluations (step: accuracy)", evaluations(a), evaluations(b)),
        ("ε spent (δ=1e-5)", a.epsilon, b.epsilon),
        ("σ", a.noise_multiplier, b.noise_multiplier),
        ("logical steps", a.steps, b.steps),
        ("resumed at steps", steps(a.resumed_at), steps(b.resumed_at)),
        ("final_params_sha256", a.final_params_sha256[:16] + "…", b.final_params_sha256[:16] + "…"),
        ("history.jsonl lines", len(ha), len(hb)),
        ("training time (s, all sessions)", round(a.train_seconds), round(b.train_seconds)),
    ]
    print("| | uninterrupted | interrupted and resumed |\n|---|---|---|")
    for name, x, y in rows:
        print(f"| {name} | {x} | {y} |")
    print()
    print("parameters bit-identical:", a.final_params_sha256 == b.final_params_sha256)
    print("metrics and evaluation history identical:", a.metrics == b.metrics and a.history == b.history)
    print("history.jsonl identical apart from throughput:", without_throughput(ha) == without_throughput(hb))
    print("no (kind, step) repeated:", len({(line["kind"], line["step"]) for line in hb}) == len(hb))
    for name, record in (("uninterrupted", a), ("interrupted", b)):
        print(f"released_nonprivate_statistics ({name}):", record.privacy["released_nonprivate_statistics"])


if __name__ == "__main__":
    main()
