"""python -m dpbench.plan: the memory plan and mechanism of a run, compiled on fake CPU devices."""

import re
import subprocess

import pytest

from tests.helpers import FIXTURE_DATA, run_cli

UNITS = {"MiB": 1024**2, "GiB": 1024**3}


def _plan(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    return run_cli(
        "-m",
        "dpbench.plan",
        f"paths.data_root={FIXTURE_DATA}",
        f"hydra.run.dir={tmp_path}",
        "hydra.output_subdir=null",
        "logger=none",
        *overrides,
        timeout=900,
        check=False,
    )


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


TINY = [
    "+experiment=samsum_gemma",
    "model=tiny_gemma3",
    "dataset.max_length=64",
    "compute.physical_batch_size=8",
    "+plan.num_examples=14732",
    "compute.device_memory_gb=0.000001",
]


@pytest.mark.slow  # compiles the tiny Gemma 3 step three times on fake devices
def test_tiny_gemma_plan_shards_frozen_weights_remat_saves_and_reports_the_mechanism(tmp_path):
    one = _plan(tmp_path / "one", *TINY, "compute.mesh.data=1", "compute.mesh.fsdp=1")
    eight = _plan(tmp_path / "eight", *TINY, "compute.mesh.data=2", "compute.mesh.fsdp=4")
    remat = _plan(tmp_path / "remat", *TINY, "compute.mesh.data=2", "compute.mesh.fsdp=4", "model.remat=full")
    for done in (one, eight, remat):
        assert done.returncode == 0, done.stderr[-2000:]
    one, eight, remat = _rows(one.stdout), _rows(eight.stdout), _rows(remat.stdout)
    assert eight["mesh"].startswith("8 device(s): data=2 x fsdp=4")
    # The tiny model's 2-D weights split 4 ways; its norms (1-D) stay whole.
    assert _bytes(eight["per device: frozen params"]) < 0.3 * _bytes(one["per device: frozen params"])
    assert eight["per device: trainable params"] == one["per device: trainable params"]  # LoRA replicated
    assert _bytes(eight["per device: temporaries (accumulate)"]) > 0
    assert eight["fits compute.device_memory_gb"].startswith("does NOT fit")
    assert eight["logical steps"] == "43" and eight["ε"].startswith("3.99")
    assert "estimate" in eight and "XLA:CPU" in eight["estimate"]
    # Remat under book-keeping clipping shows in the CPU compile (the plan keeps XLA's barriers;
    # without them XLA:CPU merges the recomputation away and the two would be equal).
    assert remat["dp"].endswith("clipping=bookkeeping") and "remat=full" in remat["model"]
    temporaries = _bytes(remat["per device: temporaries (accumulate)"])
    assert temporaries < 0.7 * _bytes(eight["per device: temporaries (accumulate)"])


@pytest.mark.slow
def test_tiny_gemma_plan_on_data1_fsdp4(tmp_path):
    done = _plan(tmp_path, *TINY, "compute.mesh.data=1", "compute.mesh.fsdp=4")
    assert done.returncode == 0, done.stderr[-2000:]
