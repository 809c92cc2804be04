"""hydra/launcher=local (submitit's local executor, the stand-in for hydra/launcher=slurm) runs a sweep."""

import json

import pytest

from tests.helpers import TINY


@pytest.mark.slow  # two tiny training jobs through submitit subprocesses: about a minute or more here
def test_submitit_local_launcher_runs_a_tiny_sweep(tmp_path, run_cli, fixture_data):
    run_cli(
        "-m",
        "dpbench",
        "-m",
        "hydra/launcher=local",
        "dataset=sst2_rt",
        "model=tiny_encoder",
        "dp.epsilon=8",
        f"paths.data_root={fixture_data}",
        f"hydra.sweep.dir={tmp_path}",
        "runner.seed=0,1",
        *TINY,
        timeout=1200,
    )
    records = [json.loads((tmp_path / str(job) / "results.json").read_text()) for job in (0, 1)]
    assert [r["config"]["runner"]["seed"] for r in records] == [0, 1]
    assert all(0 < r["epsilon"] <= 8 for r in records)
    assert records[0]["final_params_sha256"] != records[1]["final_params_sha256"]
    assert list(tmp_path.glob(".submitit/*/*_result.pkl"))  # really ran through submitit
