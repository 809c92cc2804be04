"""Sweeps check every job before the first starts, and a job that fails at run time does not stop
the others (dpbench/sweeps.py)."""

import json
import os

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


def test_running_the_literal_command_again_skips_its_finished_jobs(tmp_path):
    # No hydra.sweep.dir: the default folder is named after the command, not the time, so the same
    # command (its overrides in another order, too) finds the jobs it finished.
    import subprocess
    import sys

    from dpbench.sweep_names import sweep_name
    from tests.helpers import CLI_ENV

    def run(*overrides):
        command = [sys.executable, "-m", "dpbench", "-m", *TINY_JOB, *overrides]
        env = {**os.environ, **CLI_ENV}
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    first = run("dp.epsilon=1,8")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sweep: 2 done, 0 skipped (complete already), 0 failed" in first.stderr
    (folder,) = (tmp_path / "multirun").iterdir()
    assert folder.name == sweep_name([*TINY_JOB, "dp.epsilon=1,8"])
    assert sorted(p.parent.name for p in folder.glob("*/results.json")) == ["0", "1"]
    assert f"report: python -m dpbench.report multirun/{folder.name} --plot" in first.stderr
    # The end of the sweep shows what privacy cost: ε spent against accuracy, by ε.
    records = [json.loads(p.read_text()) for p in folder.glob("*/results.json")]
    expected = sorted((r["epsilon"], f"{100 * r['metrics']['eval/accuracy']:.2f}%") for r in records)
    lines = first.stderr.splitlines()
    at = lines.index(next(line for line in lines if line.split() == ["ε", "spent", "accuracy", "run"]))
    shown = [line.split() for line in lines[at + 1 : at + 3]]
    assert [(float(e), a) for e, a, _ in shown] == [(float(f"{e:.4g}"), a) for e, a in expected]
    again = run("dp.epsilon=1,8")
    assert "sweep: 0 done, 2 skipped (complete already), 0 failed" in again.stderr, again.stderr[-3000:]
    assert [p.name for p in (tmp_path / "multirun").iterdir()] == [folder.name]
    # Another grid, another folder (the folder is sweep_name of the command, as checked above).
    assert sweep_name([*TINY_JOB, "dp.epsilon=1,2"]) != folder.name
