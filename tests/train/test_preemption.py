"""Faults through the real command line: kill -9 mid-run, SIGTERM, and a re-run sweep."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dpbench import experiment, records
from dpbench.privacy.randomness import SECRET_FILE
from dpbench.train.checkpoint import Checkpoints
from tests.helpers import FIXTURE_DATA, REPO, TINY, compose_config, run_cli

# 40 DP steps of the tiny job with a checkpoint every 4: long enough to be stopped mid-run.
JOB = [*TINY, "runner.steps=40", "runner.eval_every=20", "runner.checkpoint_every=4", "accountant=rdp"]


def _start(run_dir, *extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "dpbench", f"paths.data_root={FIXTURE_DATA}", *JOB, *extra]
    return subprocess.Popen(
        [*command, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_checkpoint(process, run_dir, at_least: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()]
        if steps and max(steps) >= at_least:
            return
        if process.poll() is not None:
            pytest.fail(
                f"the run ended before a checkpoint at step {at_least}: {process.stderr.read()[-2000:]}"
            )
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no checkpoint at step >= {at_least} within {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    # Its privacy secret, reused by the interrupted runs (dp.secret_file): the same batches and noise.
    return experiment.run(compose_config(JOB, out)), f"dp.secret_file={out / SECRET_FILE}"


def test_kill_9_loses_at_most_checkpoint_every_steps_and_resumes_identically(uninterrupted, tmp_path):
    uninterrupted, same_secret = uninterrupted
    process = _start(tmp_path, same_secret)
    _wait_for_checkpoint(process, tmp_path, at_least=8)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "results.json").exists()
    killed_at = max(int(p.name) for p in (tmp_path / "checkpoints").glob("*") if p.name.isdigit())
    assert killed_at < 40
    resumed = _start(tmp_path, same_secret)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    record = records.load_record(tmp_path)
    assert record.resumed_at and record.resumed_at[0] >= 8 and record.resumed_at[0] % 4 == 0
    assert record.final_params_sha256 == uninterrupted["final_params_sha256"]
    assert record.metrics == uninterrupted["metrics"] and record.history == uninterrupted["history"]
    steps = [(line["kind"], line["step"]) for line in records.read_history(tmp_path)]
    assert len(steps) == len(set(steps)), "no history line is repeated"


def test_sigterm_checkpoints_exits_nonzero_and_prints_the_resume_command(uninterrupted, tmp_path):
    uninterrupted, same_secret = uninterrupted
    process = _start(tmp_path, same_secret)
    _wait_for_checkpoint(process, tmp_path, at_least=4)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM after logical step" in stderr
    command = next(line for line in stderr.splitlines() if line.startswith("resume with: "))
    stopped_at = int(stderr.split("after logical step ")[1].split()[0])
    assert max(Checkpoints(tmp_path, keep=2).all_steps()) == stopped_at  # the step it finished
    assert f"hydra.run.dir={tmp_path}" in command
    args = command.removeprefix("resume with: python -m dpbench ").split()
    run_cli("-m", "dpbench", *args, timeout=300)
    record = records.load_record(tmp_path)
    assert record.resumed_at == [stopped_at]
    assert record.final_params_sha256 == uninterrupted["final_params_sha256"]


@pytest.mark.slow  # two sweeps of two jobs through the CLI: ~1 min on 2 busy cores
def test_a_rerun_sweep_skips_complete_jobs_and_resumes_interrupted_ones(tmp_path):
    command = [
        "-m",
        "dpbench",
        "-m",
        f"paths.data_root={FIXTURE_DATA}",
        *TINY,
        "runner.steps=8",
        "runner.checkpoint_every=2",
        "accountant=rdp",
        "runner.seed=0,1",
        f"hydra.sweep.dir={tmp_path}",
    ]
    run_cli(*command)
    complete, interrupted = tmp_path / "0", tmp_path / "1"
    finished = records.load_record(interrupted)
    # Make job 1 look killed after step 6: no record, no checkpoint at 8.
    (interrupted / "results.json").unlink()
    shutil.rmtree(interrupted / "checkpoints" / "8")
    before = (complete / "results.json").read_text()
    second = run_cli(*command)
    assert (complete / "results.json").read_text() == before
    assert "skipping this job" in second.stderr + second.stdout
    resumed = records.load_record(interrupted)
    assert resumed.resumed_at == [6]
    assert resumed.final_params_sha256 == finished.final_params_sha256
