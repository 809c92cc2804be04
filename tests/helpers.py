"""Test helpers: compose dpbench configs with Hydra's compose API (no CLI, no network), data locations,
and ``run_cli``, which runs ``python -m dpbench...`` (or a script) in a subprocess.

Fast tests read the tiny real-data root in ``tests/fixtures/data`` (same layout as ``../shared/data``),
so they pass on a fresh clone. Tests that need the full shared data use ``needs_shared_data``: they
are ``slow`` and skip, naming the folder, when it is absent. tests/conftest.py offers ``run_cli`` and
``FIXTURE_DATA`` as fixtures too (``run_cli``, ``fixture_data``); import them from here where a fixture
does not fit (module-level helpers, module-scoped fixtures).
"""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dpbench.config import register_configs
from dpbench.data.roots import DATA_ROOT_ENV, SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"
# The full data (real MNIST, the text stand-ins): $DPBENCH_DATA, else ../shared/data beside the checkout.
FULL_DATA = Path(os.environ.get(DATA_ROOT_ENV) or SHARED_DATA)
EXPERIMENTS = sorted(p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml"))


def needs_shared_data(folder: str = ""):
    """Mark a test ``slow``; skip it, naming the folder, unless ``FULL_DATA/folder`` (or FULL_DATA) exists."""
    path = FULL_DATA / folder

    def mark(test):
        reason = f"needs {path} (set ${DATA_ROOT_ENV}, or put ../shared/data beside the clone)"
        skip = pytest.mark.skipif(not path.is_dir(), reason=reason)
        return pytest.mark.slow(skip(test))

    return mark


def compose_config(
    overrides: list[str],
    output_dir: Path | str = "unused",
    data_root: Path | str = FIXTURE_DATA,
    return_hydra_config: bool = False,
) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            "config",
            overrides=[f"paths.data_root={data_root}", f"paths.output_dir={output_dir}", *overrides],
            return_hydra_config=return_hydra_config,
        )


# Overrides that make any job tiny: a few steps, small subsets, quiet.
TINY = [
    "logger=none",
    "runner.progress_bar=false",
    "runner.steps=2",
    "runner.epochs=null",
    "runner.eval_every=0",
    "dataset.max_train_examples=64",
    "dataset.max_eval_examples=16",
    "runner.batch_size=16",
    "compute.physical_batch_size=8",
    "compute.eval_batch_size=16",
]


# Set over os.environ in every subprocess, whatever the caller's shell says: the CPU, W&B offline and quiet.
CLI_ENV = {"JAX_PLATFORMS": "cpu", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
STDERR_TAIL = 4000  # characters of stderr a failed run shows


def fake_devices(count: int) -> str:
    """``XLA_FLAGS`` for a subprocess with ``count`` fake CPU devices, keeping the test flags
    (tests/conftest.py)."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()


def run_cli(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` in a subprocess from the repository root; return the finished process.

    ``args`` follow the interpreter: ``"-m", "dpbench", *overrides``, a script and its arguments, or
    ``"-c", code``. The environment is os.environ, then ``CLI_ENV``, then ``env``; stdout and stderr are
    captured as text. With ``check`` (the default) a non-zero exit fails the test, showing the tail of
    stderr; pass ``check=False`` to assert on a failing run's status and output.
    """
    done = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=REPO,
        env={**os.environ, **CLI_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert done.returncode == 0, f"exit status {done.returncode}:\n{done.stderr[-STDERR_TAIL:]}"
    return done


def once_per_session(tmp_path_factory, name: str, compute: Callable[[], object]):
    """``compute()`` (JSON) once for the whole test session, however many xdist workers ask for it.

    A module-scoped fixture is computed again by each worker that runs one of its tests, and again
    whenever a worker runs another module's test between two of them: the fast conformance subset
    (8 minutes) ran twice in one ``make test``. The first worker to ask computes and stores the
    result in the session's shared temporary folder; the others wait for it and read it.
    """
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this session's, not older ones
    path = shared / f"once-{name}.json"
    with FileLock(f"{path}.lock"):
        if path.is_file():
            return json.loads(path.read_text())
        value = compute()
        path.write_text(json.dumps(value))
        return value
