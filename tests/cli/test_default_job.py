"""The default job (python -m dpbench): the tutorial's mechanism, sized to finish in minutes."""

import json

from dpbench import config as config_lib
from tests.helpers import FULL_DATA, compose_config, needs_shared_data


def test_default_job_keeps_the_tutorial_mechanism():
    cfg = compose_config([])
    config_lib.validate_static(cfg)
    assert (cfg.dp.method, cfg.dp.epsilon, cfg.dp.delta, cfg.dp.clip_norm, cfg.dp.sampler) == (
        "vanilla",
        1.0,
        1e-5,
        0.1,
        "poisson",
    )
    assert (cfg.accountant.name, cfg.runner.batch_size, cfg.optimizer.name, cfg.optimizer.momentum) == (
        "pld",
        256,
        "sgd",
        0.9,
    )
    assert (cfg.dataset.name, cfg.model.arch, cfg.dataset.source) == ("mnist", "cnn", "auto")
    # Sized for minutes: 200 steps; lr 0.5 so that lr * clip moves the weights within them.
    assert (cfg.runner.steps, cfg.optimizer.learning_rate, cfg.runner.eval_every) == (200, 0.5, 50)


def test_experiments_keep_their_own_settings_over_the_demo_defaults():
    cfg = compose_config(["+experiment=mnist_cnn"])
    assert (cfg.runner.steps, cfg.optimizer.learning_rate, cfg.runner.eval_every) == (5000, 0.1, 1000)


@needs_shared_data("mnist")
def test_default_job_learns_on_full_mnist(tmp_path, run_cli):
    # ~3 min on 2 busy cores: the command a new user runs first, on the full data.
    done = run_cli(
        "-m",
        "dpbench",
        "runner.progress_bar=false",
        f"hydra.run.dir={tmp_path}",
        env={"DPBENCH_DATA": str(FULL_DATA)},
        timeout=1200,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metrics"]["eval/accuracy"] > 0.8 and 0.99 < results["epsilon"] <= 1.0
    assert "dpbench summary" in done.stdout and "accuracy" in done.stdout
