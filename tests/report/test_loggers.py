"""W&B logging: a DP run's console is not captured (what the log says is not covered by the claim)."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dpbench.loggers import WandbLogger


@pytest.mark.parametrize("private", [True, False])
def test_only_a_dp_run_leaves_the_console_out_of_wandb(private, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = OmegaConf.create({"project": "t", "entity": None, "tags": [], "mode": "offline"})
    logger = WandbLogger(cfg, {"dp": {"method": "vanilla"}}, str(tmp_path), "run", private=private)
    try:
        captured = logger.run.settings.console
    finally:
        logger.finish()
    assert (captured == "off") == private, captured


@pytest.mark.parametrize("dp", ["vanilla", "none"])
def test_the_progress_bar_shows_loss_and_throughput_only_where_released(dp, tmp_path):
    from tests.helpers import FIXTURE_DATA, TINY, run_cli

    overrides = [o for o in TINY if not o.startswith("runner.progress_bar")]
    done = run_cli(
        "-m",
        "dpbench",
        *overrides,
        "runner.progress_bar=true",
        f"dp={dp}",
        f"paths.data_root={FIXTURE_DATA}",
        f"hydra.run.dir={tmp_path}",
        timeout=300,
    )
    bar = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.startswith("train")]
    assert bar and all("step=" not in line for line in bar)  # the counter is the step
    shown = any("loss=" in line and "ex_s=" in line for line in bar)
    assert shown == (dp == "none"), bar[-3:]
    assert any("eps=" in line for line in bar)


@pytest.mark.parametrize("dp", ["vanilla", "none"])
def test_without_a_bar_the_log_shows_step_epsilon_and_only_released_loss(dp, tmp_path):
    from tests.helpers import FIXTURE_DATA, TINY, run_cli

    overrides = [*TINY, f"dp={dp}", f"paths.data_root={FIXTURE_DATA}", f"hydra.run.dir={tmp_path}"]
    done = run_cli("-m", "dpbench", *overrides, timeout=300)
    lines = [line.split("train: step ")[1] for line in done.stdout.splitlines() if "train: step " in line]
    assert lines and lines[-1].startswith("2/2, ε spent "), lines
    spent = lines[-1].split("ε spent ")[1].split(",")[0]
    assert (spent == "-") == (dp == "none"), lines  # a DP run shows the ε it has spent
    assert dp == "none" or float(spent) > 0, lines
    assert ("loss " in lines[-1]) == (dp == "none"), lines  # only where the loss is released


def test_an_offline_run_folder_carries_config_summary_group_and_tags(tmp_path, monkeypatch):
    import json

    import yaml

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = OmegaConf.create({"project": "t", "entity": None, "tags": ["mine"], "mode": "offline"})
    config = {"dp": {"method": "vanilla", "epsilon": 1.0}, "runner": {"steps": 20}}
    logger = WandbLogger(
        cfg,
        config,
        str(tmp_path),
        "run",
        private=True,
        group="mnist_epsilon_cpu",
        tags=("dp:vanilla", "mine"),
    )
    try:
        logger.summary({"metrics": {"accuracy": 0.5}, "epsilon": 1.0})
        logger.summary({"metrics": {"accuracy": 0.875}, "steps": 20})
        files = Path(logger.run.dir)
        held_config, held_summary = dict(logger.run.config), dict(logger.run.summary)
        group, tags = logger.run.group, logger.run.tags
    finally:
        logger.finish()
    assert group == "mnist_epsilon_cpu" and list(tags) == ["mine", "dp:vanilla"]
    # The files hold what W&B holds, in its online layout ({key: {value}} and flat "a/b" keys).
    written = yaml.safe_load((files / "config.yaml").read_text())
    assert written == {key: {"value": value} for key, value in held_config.items()} != {}
    assert written["dp"]["value"] == {"method": "vanilla", "epsilon": 1.0}
    summary = json.loads((files / "wandb-summary.json").read_text())
    assert summary == {"metrics/accuracy": 0.875, "epsilon": 1.0, "steps": 20}
    assert summary == {key: held_summary[key] for key in summary}


def test_a_sweep_job_is_grouped_and_tagged_by_its_sweep_folder(tmp_path):
    import copy

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from dpbench.loggers import auto_tags, sweep_group
    from tests.helpers import compose_config

    assert sweep_group() is None  # outside Hydra
    cfg = compose_config(["+sweep=mnist_epsilon_cpu"], return_hydra_config=True)

    def job(mode, folder=None):
        job_cfg = copy.deepcopy(cfg)
        OmegaConf.set_readonly(job_cfg.hydra, False)
        job_cfg.hydra.mode = mode
        if folder is not None:
            job_cfg.hydra.sweep.dir = folder
        HydraConfig.instance().set_config(job_cfg)
        return sweep_group()

    try:
        assert job(RunMode.RUN) is None  # one job: no group
        assert job(RunMode.MULTIRUN) == "mnist_epsilon_cpu"  # conf/sweep/mnist_epsilon_cpu.yaml's folder
        assert job(RunMode.MULTIRUN, str(tmp_path / "elsewhere")) == "elsewhere"
    finally:
        HydraConfig.instance().cfg = None
    tags = auto_tags(cfg, "mnist_epsilon_cpu")
    assert tags == ("dataset:mnist", "model:cnn", "dp:vanilla", "sweep:mnist_epsilon_cpu")
