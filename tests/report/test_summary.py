"""The summary block a run prints at its end."""

from dpbench import records
from dpbench.summary import summary_block


def record(**changes) -> records.RunRecord:
    values = dict(
        dataset="MNIST",
        data_source="idx:/data/mnist",
        weights_source="random init",
        task="classification",
        method="vanilla",
        metrics={"eval/accuracy": 0.9341, "eval/loss": 0.2},
        history=[],
        steps=300,
        sampling_rate=256 / 60000,
        train_examples=60000,
        epsilon=1.99997,
        delta=1e-5,
        noise_multiplier=0.75803,
        privacy={},
        reproducibility={},
        config={
            "model": {"arch": "cnn"},
            "dp": {"clip_norm": 0.1, "sampler": "poisson"},
            "accountant": {"name": "pld"},
            "logger": {"mode": "offline"},
        },
        wall_seconds=251.4,
        train_seconds=203.0,
    )
    return records.RunRecord(**{**values, **changes})


def test_block_names_metric_privacy_steps_time_and_where_things_are(tmp_path):
    (tmp_path / "history.jsonl").write_text("")
    offline = tmp_path / "wandb" / "offline-run-20261125_180000-abc"
    offline.mkdir(parents=True)
    text = summary_block(record(), tmp_path)
    assert "accuracy 93.41% on MNIST (evaluation split), after 300 logical steps" in text
    assert "(ε = 2, δ = 1e-05) by PLD, σ = 0.758, clip 0.1, sampling rate q = 0.004267 (poisson)" in text
    assert "wall time  4 min 11 s (training 3 min 23 s)" in text
    assert f"results    {tmp_path}/results.json + history.jsonl" in text
    assert f"plots      python -m dpbench.report {tmp_path} --plot" in text
    assert f"W&B        {offline} (offline: wandb sync {offline})" in text


def test_non_private_summarisation_block(tmp_path):
    text = summary_block(
        record(
            task="summarization",
            method="none",
            epsilon=None,
            delta=None,
            noise_multiplier=None,
            metrics={"eval/rouge1": 0.455, "eval/rouge2": 0.181, "eval/rougeL": 0.308},
        ),
        tmp_path,
    )
    assert "ROUGE-1/2/L F1 0.455 / 0.181 / 0.308" in text
    assert "privacy    none (non-private run: no ε claimed)" in text
    assert "W&B" not in text and "history.jsonl" not in text
