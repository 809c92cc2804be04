"""The command line: a tiny end-to-end job, W&B offline files, and a 4-job multirun."""

import json

import pytest

from tests.helpers import FIXTURE_DATA, REPO, run_cli

TINY_CLI = [
    f"dataset.data_dir={FIXTURE_DATA}/mnist",
    "dataset.max_train_examples=256",
    "dataset.max_eval_examples=64",
    "runner.steps=3",
    "runner.eval_every=2",
    "runner.batch_size=32",
    "compute.physical_batch_size=16",
    "compute.eval_batch_size=64",
    "runner.progress_bar=false",
]


def dpbench(*args):
    return run_cli("-m", "dpbench", *args)


def test_cli_run_writes_results_and_an_offline_wandb_run(tmp_path):
    done = dpbench(*TINY_CLI, "logger=wandb", f"hydra.run.dir={tmp_path}")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 3 and results["method"] == "vanilla"
    assert 0 < results["epsilon"] <= 1.0 and results["noise_multiplier"] > 0
    assert results["data_source"].startswith("idx:") and "subset" in results["data_source"]
    assert [h["step"] for h in results["history"]] == [2, 3]
    assert results["privacy"]["mechanism"]["logical_steps"] == 3
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].glob("*.wandb"))
    # A DP run sends W&B no statistic of the training data (metric names are stored as plain text).
    logged = b"".join(path.read_bytes() for path in offline_runs[0].glob("*.wandb"))
    assert b"privacy/epsilon" in logged and b"eval/accuracy" in logged
    for withheld in ("train/loss", "train/accuracy", "logical_batch_size", "clipped_fraction", "grad_norm"):
        assert withheld.encode() not in logged
    assert "privacy: (ε=" in done.stderr + done.stdout


@pytest.mark.slow
def test_multirun_gives_one_results_file_per_job(tmp_path):
    dpbench(
        "-m", *TINY_CLI, "logger=none", "dp.epsilon=1,8", "runner.seed=0,1", f"hydra.sweep.dir={tmp_path}"
    )
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/results.json"))]
    assert len(results) == 4
    settings = {(r["config"]["dp"]["epsilon"], r["config"]["runner"]["seed"]) for r in results}
    assert settings == {(1.0, 0), (1.0, 1), (8.0, 0), (8.0, 1)}
    for r in results:
        assert r["epsilon"] <= r["config"]["dp"]["epsilon"]


def test_help_lists_every_group_and_option_with_what_it_is_and_no_schemas():
    done = run_cli("-m", "dpbench", "--help", timeout=120)
    conf = REPO / "conf"
    for group in (p for p in conf.iterdir() if p.is_dir() and p.name != "hydra"):
        assert f"  {group.name}" in done.stdout
        for option in group.glob("*.yaml"):
            assert option.stem in done.stdout, (group.name, option.stem)
    assert "_schema" not in done.stdout and "AuditConfig(" not in done.stdout
    assert "The privacy mechanism." in done.stdout and "docs/configuration.md" in done.stdout
    version = run_cli("-m", "dpbench", "--version", timeout=120)
    assert version.stdout.startswith("dpbench ")
