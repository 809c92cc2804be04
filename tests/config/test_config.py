"""Every experiment composes in struct mode; bad settings fail early and clearly.

Every preset trains two tiny steps in tests/config/test_presets.py.
"""

import logging

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from dpbench import config as config_lib
from dpbench.experiment import run
from tests.helpers import EXPERIMENTS, FIXTURE_DATA, TINY, compose_config

MNIST = [f"dataset.data_dir={FIXTURE_DATA}/mnist"]


def test_there_are_experiments():
    assert {"mnist_cnn", "mnist_cnn_nonprivate", "sst2_roberta", "sst2_minilm_cpu"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_in_struct_mode(experiment):
    cfg = compose_config([f"+experiment={experiment}"])
    assert OmegaConf.is_struct(cfg)
    config_lib.validate_static(cfg)
    with pytest.raises(Exception, match="not_a_setting"):
        cfg.dp.not_a_setting = 1


def test_mnist_cnn_is_the_tutorial_setting():
    cfg = compose_config(["+experiment=mnist_cnn"])
    assert (cfg.runner.steps, cfg.runner.batch_size, cfg.dp.epsilon, cfg.dp.delta, cfg.dp.clip_norm) == (
        5000,
        256,
        1.0,
        1e-5,
        0.1,
    )
    assert (cfg.optimizer.name, cfg.optimizer.learning_rate, cfg.optimizer.momentum) == ("sgd", 0.1, 0.9)
    assert cfg.accountant.name == "pld" and cfg.dp.sampler == "poisson"


def test_sst2_roberta_is_the_dp_lora_setting():
    cfg = compose_config(["+experiment=sst2_roberta"])
    assert (cfg.model.checkpoint, cfg.model.lora_rank, cfg.runner.epochs, cfg.runner.batch_size) == (
        "roberta-base",
        8,
        3,
        256,
    )
    assert (cfg.optimizer.name, cfg.optimizer.learning_rate, cfg.dp.clip_norm, cfg.dp.epsilon) == (
        "adamw",
        5e-4,
        1.0,
        8.0,
    )
    assert cfg.dp.delta is None and cfg.dp.delta_exponent == 1.1


@pytest.mark.parametrize(
    "override, message",
    [
        ("dp.epsilon=0", "dp.epsilon=0.0 must be > 0"),
        ("dp.epsilon=-1", "dp.epsilon=-1.0 must be > 0"),
        ("dp.delta=1.5", r"dp.delta=1.5 must lie in \(0, 1\)"),
        ("dp.delta=0", r"dp.delta=0.0 must lie in \(0, 1\)"),
        ("dp.clip_norm=0", "dp.clip_norm=0.0 must be > 0"),
        ("dp.sampler=uniform", "dp.sampler='uniform' is not allowed; choose one of poisson, shuffle"),
        ("dp.method=dpsgd", "dp.method='dpsgd' is not allowed; choose one of none, vanilla, ffa"),
        ("dp.noise_multiplier=1.0", "both set"),
        ("dp=ffa", "needs a model with model.lora_rank > 0"),
        ("runner.steps=null", "set runner.steps .* or runner.epochs"),
        ("dp.clip_fn=auto_v", "dp.clip_fn='auto_v' is not allowed; choose one of fixed, automatic"),
        ("dp.clip_fn=automatic dp.clip_gamma=0", "dp.clip_gamma=0.0 is not allowed; choose a number > 0"),
    ],
)
def test_bad_settings_fail_before_loading_anything(override, message):
    cfg = compose_config([*override.split(), "dataset.data_dir=/nonexistent"])
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate_static(cfg)


def test_unknown_group_option_lists_the_allowed_ones():
    with pytest.raises(ConfigCompositionException, match="dp/dpsgd") as error:
        compose_config(["dp=dpsgd"])
    assert "vanilla" in str(error.value) and "ffa" in str(error.value)


def test_batch_larger_than_data_is_refused(tmp_path):
    cfg = compose_config([*TINY, *MNIST, "runner.batch_size=100"], tmp_path)
    with pytest.raises(config_lib.ConfigError, match="runner.batch_size=100 is larger than the training set"):
        run(cfg)


def test_missing_data_dir_is_refused(tmp_path):
    cfg = compose_config([*TINY, f"dataset.data_dir={tmp_path}/no_such_dir"], tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset.data_dir=.*no_such_dir' is not a folder"):
        run(cfg)


def test_delta_at_least_one_over_n_warns(tmp_path, caplog):
    cfg = compose_config([*TINY, *MNIST, "dp.delta=0.05"], tmp_path)
    with caplog.at_level(logging.WARNING):
        assert config_lib.resolve_delta(cfg, 64) == 0.05
    assert "the usual choice is below 1/n" in caplog.text


def test_runner_steps_win_over_a_presets_epochs_with_a_warning(caplog):
    cfg = compose_config(["+experiment=mnist_cnn_best", "runner.steps=3"])
    with caplog.at_level(logging.WARNING):
        config_lib.validate_static(cfg)
    assert "runner.steps=3 overrides runner.epochs=30" in caplog.text
    from dpbench.privacy.mechanism import plan_mechanism

    assert plan_mechanism(cfg, 60_000).steps == 3
