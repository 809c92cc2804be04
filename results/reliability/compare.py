"""Compare the uninterrupted and the interrupted twin: records, parameters, history."""
import json, sys
sys.path.insert(0, ".")
from dpbench import records
base = sys.argv[1] if len(sys.argv) > 1 else "results/reliability"
a, b = records.load_record(f"{base}/uninterrupted"), records.load_record(f"{base}/interrupted")
def strip(lines):
    return [{k: v for k, v in l.items() if k != "train/examples_per_s"} for l in lines]
ha, hb = records.read_history(f"{base}/uninterrupted"), records.read_history(f"{base}/interrupted")
print("| | uninterrupted | interrupted and resumed |\n|---|---|---|")
rows = [
    ("final test accuracy", a.metrics["eval/accuracy"], b.metrics["eval/accuracy"]),
    ("final test loss", a.metrics["eval/loss"], b.metrics["eval/loss"]),
    ("evaluations (step: accuracy)", ", ".join(f"{h['step']}: {h['eval/accuracy']:.4f}" for h in a.history),
     ", ".join(f"{h['step']}: {h['eval/accuracy']:.4f}" for h in b.history)),
    ("ε spent (δ=1e-5)", a.epsilon, b.epsilon),
    ("σ", a.noise_multiplier, b.noise_multiplier),
    ("logical steps", a.steps, b.steps),
    ("resumed at steps", a.resumed_at or "-", b.resumed_at),
    ("final_params_sha256", a.final_params_sha256[:16] + "…", b.final_params_sha256[:16] + "…"),
    ("history.jsonl lines", len(ha), len(hb)),
    ("training time (s, all sessions)", round(a.train_seconds), round(b.train_seconds)),
]
for name, x, y in rows:
    print(f"| {name} | {x} | {y} |")
print()
print("parameters bit-identical:", a.final_params_sha256 == b.final_params_sha256)
print("metrics and evaluation history identical:", a.metrics == b.metrics and a.history == b.history)
print("history.jsonl identical apart from throughput:", strip(ha) == strip(hb))
print("no (kind, step) repeated:", len({(l['kind'], l['step']) for l in hb}) == len(hb))
print("released_nonprivate_statistics:", a.privacy.get("released_nonprivate_statistics"), b.privacy.get("released_nonprivate_statistics"))
