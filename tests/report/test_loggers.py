"""W&B logging: a DP run's console is not captured (what the log says is not covered by the claim)."""

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
