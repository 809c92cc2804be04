"""conf/sweep/*.yaml: every job of every sweep composes and passes start-up validation."""

import math
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from dpbench import config as config_lib
from tests.helpers import CONF_DIR, FIXTURE_DATA, TINY, compose_config

SWEEPS = sorted(p.stem for p in Path(CONF_DIR, "sweep").glob("*.yaml"))


def sweep_jobs(sweep: str) -> tuple[dict, list[list[str]]]:
    """The sweeper params of ``+sweep=<sweep>`` and the override list of each job, as Hydra expands them."""
    cfg = compose_config([f"+sweep={sweep}"], return_hydra_config=True)
    params = {str(key): str(value) for key, value in cfg.hydra.sweeper.params.items()}
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return params, [job for batch in batches for job in batch]


def test_there_are_sweeps_for_every_task():
    assert {"mnist_epsilon", "mnist_epsilon_cpu", "sst2_rank_method", "samsum_method"} <= set(SWEEPS)
    assert {"sst2_cpu_method", "samsum_cpu_method"} <= set(SWEEPS)


def setting(cfg, key: str):
    """The composed value an override ``key=...`` set; for the ``dp`` and ``optimizer`` groups, the
    option's own name (each conf/dp option sets ``method``, each conf/optimizer option ``name``)."""
    if key == "dp":
        return cfg.dp.method
    if key == "optimizer":
        return cfg.optimizer.name
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def same(actual, value: str) -> bool:
    return str(actual) == value or (isinstance(actual, float) and actual == float(value))


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_job_of_the_sweep_composes_and_validates(sweep):
    params, jobs = sweep_jobs(sweep)
    assert len(jobs) == math.prod(len(value.split(",")) for value in params.values()) >= 2
    assert len({tuple(job) for job in jobs}) == len(jobs)  # no job twice
    for job in jobs:
        cfg = compose_config([f"+sweep={sweep}", *job])
        config_lib.validate_static(cfg)
        for override in job:
            key, value = override.split("=", 1)
            assert same(setting(cfg, key), value), (override, setting(cfg, key))


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_header_gives_its_command(sweep):
    text = Path(CONF_DIR, "sweep", f"{sweep}.yaml").read_text()
    assert f"python -m dpbench -m +sweep={sweep}" in text
    # the folder its jobs go to (several sweeps may share one), which the report command reads
    hydra_sweep = compose_config([f"+sweep={sweep}"], return_hydra_config=True).hydra.sweep
    folder = OmegaConf.to_container(hydra_sweep, resolve=False)["dir"].split("/${now:")[0]
    assert folder.startswith("multirun/") and f"python -m dpbench.report {folder}" in text


def test_dp_lora_grid_is_method_by_rank_by_epsilon_on_the_dp_lora_setting():
    params, jobs = sweep_jobs("sst2_rank_method")
    assert params == {"dp": "vanilla,ffa,ghost", "model.lora_rank": "2,4,8,16", "dp.epsilon": "1,8"}
    cfg = compose_config(["+sweep=sst2_rank_method", *jobs[0]])
    assert (cfg.runner.epochs, cfg.runner.batch_size, cfg.optimizer.name, cfg.dp.delta_exponent) == (
        3,
        256,
        "adamw",
        1.1,
    )


@pytest.mark.slow
def test_a_sweep_runs_as_a_hydra_multirun(tmp_path, run_cli):
    # Two tiny jobs of the CPU ε sweep, on the fixture digits: one results.json each.
    tiny = [o for o in TINY if not o.startswith("dataset.max_train")]
    command = ["-m", "dpbench", "-m", "+sweep=mnist_epsilon_cpu", "dp.epsilon=1,8", *tiny]
    run_cli(*command, f"paths.data_root={FIXTURE_DATA}", f"hydra.sweep.dir={tmp_path}")
    results = sorted(tmp_path.glob("*/results.json"))
    assert len(results) == 2


@pytest.mark.parametrize("sweep", SWEEPS)
def test_a_sweeps_folder_is_stable_so_its_command_resumes(sweep):
    # A timestamp in the folder would start the grid afresh each time the command runs.
    cfg = compose_config([f"+sweep={sweep}"], return_hydra_config=True)
    folder = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["dir"]
    assert folder.startswith("multirun/") and "${now:" not in folder, folder
