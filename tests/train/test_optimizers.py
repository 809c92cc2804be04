"""DP-AdamBC (optimizer=adam_bc / adamw_bc): Adam at σ = 0, Tang et al.'s update otherwise, wired to the
mechanism's noise variance, and refused where there is no i.i.d. noise to correct."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpbench import config as config_lib
from dpbench import experiment
from dpbench.train.optimizers import OptimizerConfig, make_optimizer
from tests.helpers import TINY, compose_config

GRADS = [
    {"w": jnp.array([0.3, -0.02, 0.0, 1.5]), "b": jnp.array([0.01])},
    {"w": jnp.array([0.1, 0.05, -0.2, 1.0]), "b": jnp.array([-0.03])},
    {"w": jnp.array([-0.4, 0.01, 0.3, 0.9]), "b": jnp.array([0.02])},
]


def run(optimizer, params):
    state = optimizer.init(params)
    for grads in GRADS:
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("name", ["adam_bc", "adamw_bc"])
def test_without_noise_it_is_adam_bit_for_bit(name):
    cfg = OptimizerConfig(name=name, learning_rate=0.01, weight_decay=0.1 if name == "adamw_bc" else 0.0)
    plain = optax.adamw(0.01, weight_decay=0.1) if name == "adamw_bc" else optax.adam(0.01)
    params = {"w": jnp.ones(4), "b": jnp.zeros(1)}
    got, want = run(make_optimizer(cfg, noise_variance=0.0), params), run(plain, params)
    for key in params:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


def test_with_noise_it_subtracts_the_noise_variance_from_the_second_moment():
    """Tang et al. 2024: θ -= lr · m̂ / (ε + √max(v̂ − Φ, γ')), checked against NumPy."""
    phi, lr, b1, b2, eps, floor = 0.005, 0.01, 0.9, 0.999, 1e-8, 5e-8
    cfg = OptimizerConfig(name="adam_bc", learning_rate=lr, variance_floor=floor)
    params = {"w": jnp.ones(4), "b": jnp.zeros(1)}
    got = run(make_optimizer(cfg, noise_variance=phi), params)
    for key in params:
        theta = np.asarray(params[key], np.float64)
        m = v = np.zeros_like(theta)
        for t, grads in enumerate(GRADS, start=1):
            g = np.asarray(grads[key], np.float64)
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
            m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
            theta = theta - lr * m_hat / (eps + np.sqrt(np.maximum(v_hat - phi, floor)))
        np.testing.assert_allclose(np.asarray(got[key]), theta, rtol=2e-5)
    # The correction matters: plain Adam lands elsewhere.
    adam = run(optax.adam(lr), params)
    assert not np.allclose(np.asarray(adam["w"]), np.asarray(got["w"]), rtol=1e-3)


def test_the_run_gives_it_the_mechanisms_noise_variance(tmp_path):
    cfg = compose_config([*TINY, "optimizer=adam_bc", "dp.epsilon=null", "dp.noise_multiplier=2.0"], tmp_path)
    exp = experiment.build(cfg)
    sigma, clip, batch = 2.0, cfg.dp.clip_norm, exp.mechanism.expected_batch_size
    assert exp.mechanism.gradient_noise_variance == pytest.approx((sigma * clip / batch) ** 2)
    # The trainer's optimizer is DP-AdamBC with that Φ: one update equals the reference's.
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.01), exp.state.trainable)
    want = make_optimizer(cfg.optimizer, exp.mechanism.gradient_noise_variance)
    got_updates, _ = exp.trainer.optimizer.update(grads, exp.trainer.optimizer.init(grads), grads)
    want_updates, _ = want.update(grads, want.init(grads), grads)
    for path in grads:
        np.testing.assert_array_equal(np.asarray(got_updates[path]), np.asarray(want_updates[path]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["optimizer=adam_bc", "dp=none"],
            "optimizer.name=adam_bc subtracts the DP noise variance, and dp=none",
        ),
        (
            ["optimizer=adamw_bc", "dp=bandmf", "dp.bands=2"],
            "correlated noise .* choose dp=vanilla, or optimizer=adamw",
        ),
        (["optimizer=adam_bc", "optimizer.variance_floor=0"], "optimizer.variance_floor=0.0 is not allowed"),
        (
            ["optimizer.learning_rate=-0.1"],
            "optimizer.learning_rate=-0.1 is not allowed; choose a number > 0",
        ),
    ],
)
def test_bad_optimizer_settings_are_one_line_errors(overrides, message):
    cfg = compose_config([*TINY, *overrides])
    with pytest.raises(config_lib.ConfigError, match=message) as error:
        config_lib.validate_static(cfg)
    assert "\n" not in str(error.value)
