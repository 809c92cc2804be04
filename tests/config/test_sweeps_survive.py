"""Sweeps check every job before the first starts, and a job that fails at run time does not stop
the others (dpbench/sweeps.py)."""

from tests.helpers import FIXTURE_DATA, TINY, run_cli

TINY_JOB = [*TINY, f"paths.data_root={FIXTURE_DATA}"]


def sweep(tmp_path, *overrides):
    return run_cli("-m", "dpbench", "-m", *TINY_JOB, f"hydra.sweep.dir={tmp_path}", *overrides, check=False)


def test_a_bad_job_refuses_the_grid_before_any_job_runs(tmp_path):
    done = sweep(tmp_path, "dp.epsilon=1,-1")
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: the sweep's job dp.epsilon=-1: dp.epsilon=-1.0 must be > 0"]
    assert not list(tmp_path.glob("*/results.json"))  # no job ran, not even the good one


def test_a_job_failing_at_run_time_is_recorded_and_the_others_run(tmp_path):
    done = sweep(tmp_path, f"dataset.data_dir={tmp_path}/missing,{FIXTURE_DATA}/mnist")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "sweep: 1 done, 0 skipped (complete already), 1 failed" in done.stderr
    assert "failed:" in done.stderr and "missing" in done.stderr
    assert f"report: python -m dpbench.report {tmp_path}" in done.stderr
    assert len(list(tmp_path.glob("*/results.json"))) == 1
    again = sweep(tmp_path, f"dataset.data_dir={tmp_path}/missing,{FIXTURE_DATA}/mnist")
    assert "0 done, 1 skipped (complete already), 1 failed" in again.stderr
