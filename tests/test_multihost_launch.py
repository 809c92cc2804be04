"""hydra/launcher=local (submitit's local executor, the stand-in for hydra/launcher=slurm) runs a sweep."""

import json
import os
import subprocess
import sys

import pytest

from tests.compose import FIXTURE_DATA, REPO, TINY


@pytest.mark.slow  # two tiny training jobs through submitit subprocesses: about a minute or more here
def test_submitit_local_launcher_runs_a_tiny_sweep(tmp_path):
    command = [
        sys.executable,
        "-m",
        "dpbench",
        "-m",
        "hydra/launcher=local",
        "dataset=sst2_rt",
        "model=tiny_encoder",
        "dp.epsilon=8",
        f"paths.data_root={FIXTURE_DATA}",
        f"hydra.sweep.dir={tmp_path}",
        "runner.seed=0,1",
        *TINY,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads((tmp_path / str(job) / "results.json").read_text()) for job in (0, 1)]
    assert [r["config"]["runner"]["seed"] for r in records] == [0, 1]
    assert all(0 < r["epsilon"] <= 8 for r in records)
    assert records[0]["final_params_sha256"] != records[1]["final_params_sha256"]
    assert list(tmp_path.glob(".submitit/*/*_result.pkl"))  # really ran through submitit
