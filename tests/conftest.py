import os

# Tests run on the CPU, never touch the network, and keep W&B local (set before anything imports jax).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DPBENCH_OFFLINE", "1")  # dpbench.data.schema: TFDS never downloads
# Tiny models: compiling dominates the suite, and LLVM's -O0 compiles about 40% faster. XLA's HLO passes
# (what the exactness and sharding tests check) are unchanged; subprocesses inherit it (helpers.fake_devices).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import sys  # noqa: E402

import pytest  # noqa: E402

from tests import helpers  # noqa: E402

# The *_check.py scripts run only as subprocesses (python tests/train/fsdp_check.py CASE...). Imported by
# --doctest-modules they would set XLA_FLAGS (fake devices) in the pytest process and every subprocess.
collect_ignore_glob = ["*_check.py"]


@pytest.fixture
def run_cli():
    """``tests.helpers.run_cli``: ``run_cli("-m", "dpbench", *overrides)`` -> subprocess.CompletedProcess."""
    return helpers.run_cli


@pytest.fixture
def fixture_data():
    """The tiny real-data root (``tests/fixtures/data``: mnist, sst2-rt, samsum-aclsum)."""
    return helpers.FIXTURE_DATA


@pytest.fixture
def no_tfds(monkeypatch):
    """Make ``import tensorflow_datasets`` fail, as on any machine without TFDS data or network."""
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
