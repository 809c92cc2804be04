"""python -m dpbench.plan: the memory plan and mechanism of a run, compiled on fake CPU devices."""

import os
import re
import subprocess
import sys

import pytest

from tests.compose import FIXTURE_DATA, REPO

UNITS = {"MiB": 1024**2, "GiB": 1024**3}


def _plan(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "dpbench.plan",
        f"paths.data_root={FIXTURE_DATA}",
        f"hydra.run.dir={tmp_path}",
        "hydra.output_subdir=null",
        "logger=none",
        *overrides,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _rows(stdout: str) -> dict[str, str]:
    rows = [re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in stdout.strip().splitlines()]
    return {row[0]: row[1] for row in rows if len(row) == 2 and not row[0].startswith("[")}


def _bytes(value: str) -> float:
    number, unit = value.split()[:2]
    return float(number) * UNITS[unit]


def test_without_the_dataset_the_plan_asks_for_n(tmp_path):
    done = _plan(tmp_path, "+experiment=samsum_gemma", "dataset.data_dir=/nonexistent/samsum")
    assert done.returncode == 2
    assert "+plan.num_examples" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # compiles the tiny Gemma 3 step twice on fake devices
def test_tiny_gemma_plan_shards_frozen_weights_and_reports_the_mechanism(tmp_path):
    common = [
        "+experiment=samsum_gemma",
        "model=tiny_gemma3",
        "dataset.max_length=64",
        "compute.physical_batch_size=8",
        "+plan.num_examples=14732",
        "compute.device_memory_gb=0.000001",
    ]
    one = _plan(tmp_path / "one", *common, "compute.mesh.data=1", "compute.mesh.fsdp=1")
    four = _plan(tmp_path / "four", *common, "compute.mesh.data=1", "compute.mesh.fsdp=4")
    assert one.returncode == 0 and four.returncode == 0, one.stderr[-2000:] + four.stderr[-2000:]
    one, four = _rows(one.stdout), _rows(four.stdout)
    assert four["mesh"].startswith("4 device(s): data=1 x fsdp=4")
    # The tiny model's 2-D weights split 4 ways; its norms (1-D) stay whole.
    assert _bytes(four["per device: frozen params"]) < 0.3 * _bytes(one["per device: frozen params"])
    assert four["per device: trainable params"] == one["per device: trainable params"]  # LoRA replicated
    assert _bytes(four["per device: temporaries (accumulate)"]) > 0
    assert four["fits compute.device_memory_gb"].startswith("does NOT fit")
    assert four["logical steps"] == "43" and four["ε"].startswith("3.99")
    assert "estimate" in four and "XLA:CPU" in four["estimate"]
