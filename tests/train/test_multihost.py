"""Two local CPU processes (jax.distributed, gloo collectives), one device each, train the same run as one
process with two devices: one noise draw across processes (process 0's secret, broadcast), the same
parameters (bit for bit), the same ε, and only process 0 writes the record."""

import json
import os
import socket
import subprocess
import sys

import pytest

from dpbench.privacy.randomness import SECRET_FILE
from tests.helpers import FIXTURE_DATA, REPO, TINY, fake_devices

RUN = [
    "dataset=sst2_rt",
    "model=tiny_encoder",
    "dp.epsilon=8",
    "runner.checkpoint_every=0",
    f"paths.data_root={FIXTURE_DATA}",
    "hydra.output_subdir=null",
    *TINY,
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": fake_devices(devices),
        "HYDRA_FULL_ERROR": "1",
    }


def _command(run_dir, *overrides):
    return [sys.executable, "-m", "dpbench", *RUN, f"hydra.run.dir={run_dir}", *overrides]


def _two_processes(run_dir, *overrides):
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            _command(
                run_dir,
                *overrides,
                f"compute.coordinator_address={address}",
                "compute.num_processes=2",
                f"compute.process_id={i}",
            ),
            cwd=REPO,
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    return [out + err for out, err in outputs]


# Correlated noise: one stream (key and buffers) across processes too.
BANDMF = ("dp=bandmf", "dp.epsilon=8", "dp.bands=2", "dp.optimize_strategy=false")


@pytest.mark.slow  # two training runs of the tiny encoder per mode: minutes on 2 shared cores
@pytest.mark.parametrize(
    ("randomness", "mechanism"),
    [("secret", ()), ("seeded", ()), ("secret", BANDMF)],
    ids=["secret", "seeded", "bandmf"],
)
def test_two_processes_draw_one_noise_equal_to_one_process_with_two_devices(tmp_path, randomness, mechanism):
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    # Two processes first: process 0 draws the secret and broadcasts it. Both processes end with the
    # same parameters (every process compares a hash of them at the end, or the run fails).
    logs = _two_processes(two_dir, f"dp.randomness={randomness}", *mechanism)
    same = [f"dp.secret_file={two_dir / SECRET_FILE}"] if randomness == "secret" else []
    assert (two_dir / SECRET_FILE).is_file() == (randomness == "secret")
    single = subprocess.run(
        _command(one_dir, f"dp.randomness={randomness}", *mechanism, *same),
        cwd=REPO,
        env=_env(2),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((one_dir / "results.json").read_text())
    two = json.loads((two_dir / "results.json").read_text())
    assert one["devices"] == two["devices"] == 2
    assert two["final_params_sha256"] == one["final_params_sha256"]
    assert two["epsilon"] == pytest.approx(one["epsilon"], rel=1e-12) and one["epsilon"] <= 8
    assert two["metrics"] == pytest.approx(one["metrics"])
    assert two["privacy"]["randomness"] == randomness
    # Process 1 logs warnings only and wrote no record (and no secret) of its own into the run folder.
    assert "results:" in logs[0] and "results:" not in logs[1]
    assert len(list(two_dir.glob("**/results.json"))) == 1
    # The final model: gathered from both processes, written once, the same as one process's.
    weights = [d / "model" / "model.safetensors" for d in (one_dir, two_dir)]
    assert weights[0].read_bytes() == weights[1].read_bytes()
    assert len(list(two_dir.glob("**/model.safetensors"))) == 1
