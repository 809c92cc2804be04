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
