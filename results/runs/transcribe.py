"""One-off: the per-run records of the runs behind results/*.md, whose run folders were not kept.

    python results/runs/transcribe.py      # rewrites results/runs/<table>/<run>.json

Each record has the results.json schema (dpbench.records.RunRecord, schema_version 1). Metrics, history,
σ and wall times are transcribed from the Markdown tables (commit bbab135); the config is composed from
the run's command; ε and the privacy section are recomputed from σ by the accountant and checked
against the transcribed ε. ``reproducibility["record"]`` says all this in each file.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from dpbench.data.sampling import make_sampler
from dpbench.privacy import accounting

RUNS = Path(__file__).resolve().parent
SOURCE_COMMIT = "bbab135"
MNIST_SOURCE = "idx:…/shared/data/mnist"

# (table, run, command overrides, fields transcribed from results/<table>.md)
TRANSCRIBED = [
    (
        "mnist_cnn",
        "nonprivate",
        ["+experiment=mnist_cnn_nonprivate", "compute.physical_batch_size=256"],
        {
            "md": "mnist_cnn.md",
            "n": 60000,
            "wall": 35.9 * 60,
            "source": MNIST_SOURCE,
            "metrics": {"eval/accuracy": 0.9924, "eval/loss": 0.035},
            "history": {1000: 0.9856, 2000: 0.9907, 3000: 0.9917, 4000: 0.9929, 5000: 0.9924},
        },
    ),
    (
        "mnist_cnn",
        "dp_eps1",
        ["+experiment=mnist_cnn", "compute.physical_batch_size=128"],
        {
            "md": "mnist_cnn.md",
            "n": 60000,
            "wall": 111 * 60,
            "source": MNIST_SOURCE,
            "sigma": 1.336876,
            "epsilon": 0.9999,
            "metrics": {"eval/accuracy": 0.9169, "eval/loss": 0.61},
            "history": {1000: 0.8818, 2000: 0.8946, 3000: 0.9029, 4000: 0.9128, 5000: 0.9169},
        },
    ),
    (
        "sst2",
        "none",
        ["+experiment=sst2_minilm_cpu", "dp=none", "dp.epsilon=8"],
        {
            "md": "sst2.md",
            "n": 9200,
            "wall": 22.6 * 60,
            "source": "tsv:…/shared/data/sst2-rt",
            "metrics": {"eval/accuracy": 0.820},
        },
    ),
    (
        "sst2",
        "vanilla",
        ["+experiment=sst2_minilm_cpu", "dp=vanilla", "dp.epsilon=8"],
        {
            "md": "sst2.md",
            "n": 9200,
            "wall": 15.7 * 60,
            "source": "tsv:…/shared/data/sst2-rt",
            "sigma": 0.5336,
            "epsilon": 8.000,
            "metrics": {"eval/accuracy": 0.676},
        },
    ),
    (
        "sst2",
        "ffa",
        ["+experiment=sst2_minilm_cpu", "dp=ffa", "dp.epsilon=8"],
        {
            "md": "sst2.md",
            "n": 9200,
            "wall": 20.1 * 60,
            "source": "tsv:…/shared/data/sst2-rt",
            "sigma": 0.5336,
            "epsilon": 8.000,
            "metrics": {"eval/accuracy": 0.720},
        },
    ),
    (
        "samsum",
        "nonprivate",
        ["+experiment=samsum_gemma270m_cpu", "logger=none", "dp=none"],
        {
            "md": "samsum.md",
            "n": 100,
            "wall": 18.9 * 60,
            "source": "json:…/shared/data/samsum-aclsum [subset: train 100/100, test 48/100, seed 0]",
            "metrics": {"eval/rouge1": 0.455, "eval/rouge2": 0.181, "eval/rougeL": 0.308},
            "baseline": {"eval/rouge1": 0.392, "eval/rouge2": 0.133, "eval/rougeL": 0.259},
        },
    ),
    (
        "samsum",
        "dp_eps4",
        ["+experiment=samsum_gemma270m_cpu", "logger=none", "runner.eval_before_training=false"],
        {
            "md": "samsum.md",
            "n": 100,
            "wall": 13.3 * 60,
            "source": "json:…/shared/data/samsum-aclsum [subset: train 100/100, test 48/100, seed 0]",
            "sigma": 0.9481,
            "epsilon": 4.000,
            "metrics": {"eval/rouge1": 0.397, "eval/rouge2": 0.144, "eval/rougeL": 0.247},
        },
    ),
    (
        "audit",
        "nonprivate",
        ["+experiment=mnist_audit", "dp=none", "runner.progress_bar=false"],
        {
            "md": "audit.md",
            "n": 5492,
            "wall": 2.3 * 60,
            "source": "idx:…/shared/data/mnist [subset: train 5000/60000, test 10000/10000, seed 0]",
            "metrics": {"eval/accuracy": 0.9749},
            "audit": {
                "epsilon_lower_bound": 2.614,
                "num_correct": 195,
                "num_guesses": 200,
                "k_plus": 100,
                "k_minus": 100,
                "mean_loss_included": 1.422,
                "mean_loss_excluded": 2.749,
                "m": 1000,
                "num_included": 492,
                "confidence": 0.95,
                "claimed_epsilon": None,
            },
        },
    ),
    (
        "audit",
        "dp_eps1",
        ["+experiment=mnist_audit", "dp.epsilon=1", "runner.progress_bar=false"],
        {
            "md": "audit.md",
            "n": 5492,
            "wall": 16.7 * 60,
            "source": "idx:…/shared/data/mnist [subset: train 5000/60000, test 10000/10000, seed 0]",
            "sigma": 3.1829,
            "epsilon": 1.000,
            "metrics": {"eval/accuracy": 0.7382},
            "audit": {
                "epsilon_lower_bound": 0.0,
                "num_correct": 4,
                "num_guesses": 10,
                "k_plus": 5,
                "k_minus": 5,
                "mean_loss_included": 3.392,
                "mean_loss_excluded": 3.636,
                "m": 1000,
                "num_included": 492,
                "confidence": 0.95,
                "claimed_epsilon": 1.000,
            },
        },
    ),
    (
        "audit",
        "dp_eps8",
        ["+experiment=mnist_audit", "dp.epsilon=8", "runner.progress_bar=false"],
        {
            "md": "audit.md",
            "n": 5492,
            "wall": 18.9 * 60,
            "source": "idx:…/shared/data/mnist [subset: train 5000/60000, test 10000/10000, seed 0]",
            "sigma": 0.8289,
            "epsilon": 7.998,
            "metrics": {"eval/accuracy": 0.7430},
            "audit": {
                "epsilon_lower_bound": 0.0,
                "num_correct": 4,
                "num_guesses": 10,
                "k_plus": 5,
                "k_minus": 5,
                "mean_loss_included": 3.480,
                "mean_loss_excluded": 3.732,
                "m": 1000,
                "num_included": 492,
                "confidence": 0.95,
                "claimed_epsilon": 7.998,
            },
        },
    ),
]


def transcribe(table: str, run: str, overrides: list[str], facts: dict) -> dict:
    from tests.compose import compose_config

    output_dir = f"outputs/{table}/{run}"
    # These runs predate dp.clipping: their clipped sums were computed per example (vmap).
    cfg = compose_config(
        [*overrides, "dp.clipping=per_example"], output_dir=output_dir, data_root="../shared/data"
    )
    n = facts["n"]
    sampler = make_sampler(cfg.dp.sampler, n, cfg.runner.batch_size, cfg.runner.seed)
    steps = cfg.runner.steps if cfg.runner.steps is not None else sampler.steps_for_epochs(cfg.runner.epochs)
    private = cfg.dp.method != "none"
    delta = epsilon = sigma = None
    privacy: dict = {"mechanism": "none (non-private)"}
    if private:
        delta = cfg.dp.delta if cfg.dp.delta is not None else n ** (-cfg.dp.delta_exponent)
        sigma = facts["sigma"]
        epsilon = accounting.compute_epsilon(sampler, sigma, steps, delta, cfg.accountant)
        assert abs(epsilon - facts["epsilon"]) < 2e-3, (table, run, epsilon, facts["epsilon"])
        assert epsilon <= cfg.dp.epsilon * (1 + 1e-3), (table, run, epsilon)
        privacy = accounting.privacy_summary(
            sampler, sigma, steps, delta, cfg.dp.clip_norm, cfg.accountant, epsilon
        )
    history = [{"step": step, "eval/accuracy": value} for step, value in facts.get("history", {}).items()]
    if not history:
        history = [{"step": steps, **facts["metrics"]}]
    command = "python -m dpbench " + " ".join(overrides) + f" hydra.run.dir={output_dir}"
    record = {
        "schema_version": 1,
        "complete": True,
        "dataset": cfg.dataset.display_name,
        "data_source": facts["source"],
        "weights_source": "random init" if cfg.model.arch == "cnn" else cfg.model.checkpoint,
        "task": "summarization" if cfg.dataset.name == "samsum" else "classification",
        "method": cfg.dp.method,
        "metrics": facts["metrics"],
        "history": history,
        "steps": steps,
        "sampling_rate": sampler.sampling_rate,
        "train_examples": n,
        "epsilon": epsilon,
        "delta": delta,
        "noise_multiplier": sigma,
        "privacy": privacy,
        "reproducibility": {
            "command": command,
            "record": (
                f"transcribed from results/{facts['md']} (commit {SOURCE_COMMIT}); the run folder was not "
                "kept. Metrics, history, σ and wall time from its table; config composed from the command; "
                "ε recomputed from σ by the accountant."
            ),
        },
        "config": OmegaConf.to_container(cfg, resolve=True),
        "baseline_metrics": facts.get("baseline"),
        "wall_seconds": facts["wall"],
        "devices": 1,
        "audit": facts.get("audit"),
    }
    return record


def main() -> None:
    for table, run, overrides, facts in TRANSCRIBED:
        path = RUNS / table / f"{run}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(transcribe(table, run, overrides, facts), indent=1, ensure_ascii=False) + "\n"
        )
        print(path)


if __name__ == "__main__":
    main()
