"""Adaptive quantile clipping (dp.adaptive_clip, Andrew et al. 2021): C follows the target quantile,
the accounting is the paper's Theorem 1, every clipping implementation stays within the step's C,
C's path is published and checkpointed, and bad settings are one-line errors."""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpbench import config as config_lib
from dpbench import experiment
from dpbench.privacy.adaptive_clip import AdaptiveClip, gradient_noise_multiplier
from dpbench.privacy.randomness import SECRET_FILE
from dpbench.train import sharding
from dpbench.train.loop import gather_chunks
from dpbench.train.preemption import Preempted
from tests.helpers import TINY, compose_config

ADAPTIVE = ["dp.adaptive_clip.target_quantile=0.5", "dp.adaptive_clip.count_noise_multiplier=4"]


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_clip_norm_converges_to_the_target_quantile_of_the_norms(target):
    """Synthetic log-normal norms: after a few hundred steps the fraction of norms <= C is the target."""
    batch = 1000
    adaptive = AdaptiveClip(target, 0.2, batch / 20, initial_clip_norm=0.01, expected_batch_size=batch)
    update = jax.jit(adaptive.update)
    state = adaptive.init(jnp.array([0, 7], jnp.uint32))
    rng = np.random.default_rng(0)
    for _ in range(400):
        norms = rng.lognormal(mean=0.0, sigma=1.0, size=batch)
        unclipped = float(np.sum(norms <= float(state["clip_norm"])))
        state = update(state, jnp.float32(unclipped), jnp.float32(batch))
    fresh = rng.lognormal(mean=0.0, sigma=1.0, size=200_000)
    fraction = float(np.mean(fresh <= float(state["clip_norm"])))
    assert abs(fraction - target) < 0.03, (float(state["clip_norm"]), fraction)


def test_gradient_and_count_noise_compose_to_the_accounted_sigma():
    """Theorem 1: N(0, z_Δ²) on the sum (sensitivity 1) and N(0, σ_b²) on the centred count
    (sensitivity ½) are one Gaussian of multiplier z; checked with dp_accounting's PLD."""
    z, sigma_b, delta = 1.3, 4.0, 1e-5
    z_delta = gradient_noise_multiplier(z, sigma_b)
    assert z_delta == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5) and z_delta > z

    def epsilon(*events):
        accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
        for event in events:
            accountant.compose(event)
        return accountant.get_epsilon(delta)

    both = epsilon(dp_accounting.GaussianDpEvent(z_delta), dp_accounting.GaussianDpEvent(2 * sigma_b))
    assert both == pytest.approx(epsilon(dp_accounting.GaussianDpEvent(z)), rel=2e-3)


def test_the_mechanism_accounts_sigma_and_noises_the_gradient_at_z_delta(tmp_path):
    cfg = compose_config([*TINY, *ADAPTIVE, "dp.epsilon=null", "dp.noise_multiplier=1.5"], tmp_path)
    exp = experiment.build(cfg)
    mechanism = exp.mechanism
    assert mechanism.noise_multiplier == 1.5  # what the accountant composes
    assert mechanism.gradient_noise_multiplier == pytest.approx(gradient_noise_multiplier(1.5, 4.0))
    assert mechanism.describe()["adaptive_clip"]["count_noise_multiplier"] == 4.0
    # Per unit of C, the trainer's noise has std z_Δ: one step on a zero sum, C = 1.
    noise = mechanism.noise_transform(exp.randomness.noise_key())
    zeros = jax.tree_util.tree_map(jnp.zeros_like, exp.state.trainable)
    noised, _ = noise.update(zeros, noise.init(zeros))
    flat = np.concatenate([np.asarray(v).ravel() for v in noised.values()])
    assert np.std(flat) == pytest.approx(mechanism.gradient_noise_multiplier, rel=0.02)


@pytest.mark.parametrize("clipping", ["per_example", "ghost", "bookkeeping"])
def test_each_example_moves_the_sum_by_at_most_this_steps_clip_norm(clipping, tmp_path):
    cfg = compose_config([*TINY, *ADAPTIVE, f"dp.clipping={clipping}"], tmp_path)
    exp = experiment.build(cfg)
    ((batch, mask),) = gather_chunks(exp.train_arrays, np.arange(8), 8)
    clip_norm = jnp.float32(0.003)  # a C other than dp.clip_norm: the traced one must be used

    def clipped_sum(mask):
        device_batch, device_mask = sharding.put_batch(batch, exp.mesh), sharding.put_rows(mask, exp.mesh)
        zeros = exp.trainer.zero_accumulator(exp.state.trainable, exp.frozen, device_batch, device_mask)
        grad_sum, _ = exp.trainer.accumulate(
            zeros, exp.state.trainable, exp.frozen, device_batch, device_mask, clip_norm
        )
        return np.concatenate([np.asarray(v, np.float64).ravel() for _, v in sorted(grad_sum.items())])

    total = clipped_sum(mask)
    for j in range(3):
        without = mask.copy()
        without[j] = False
        moved = np.linalg.norm(total - clipped_sum(without))
        assert 0.5 * float(clip_norm) < moved <= float(clip_norm) * (1 + 1e-5)


JOB = [*TINY, *ADAPTIVE, "runner.steps=6", "runner.eval_every=2", "runner.checkpoint_every=0"]


def test_the_clip_norm_is_published_checkpointed_and_resumed_bit_identical(tmp_path):
    reference_dir = tmp_path / "reference"
    reference = experiment.run(compose_config(JOB, reference_dir))
    adaptive = reference["privacy"]["adaptive_clip"]
    assert adaptive["final_clip_norm"] != adaptive["initial_clip_norm"]  # C moved
    from dpbench import records

    path = [
        r["privacy/clip_norm"]
        for r in records.read_history(reference_dir / records.HISTORY_FILE)
        if r.get("kind") == "train"
    ]
    assert len(path) >= 2 and len(set(path)) > 1
    cfg = compose_config([*JOB, f"dp.secret_file={reference_dir / SECRET_FILE}"], tmp_path / "resumed")
    with pytest.raises(Preempted):
        experiment.run(cfg, stop_after=3)
    resumed = experiment.run(cfg)
    assert resumed["resumed_at"] == [3]
    assert resumed["final_params_sha256"] == reference["final_params_sha256"]
    assert resumed["privacy"]["adaptive_clip"]["final_clip_norm"] == adaptive["final_clip_norm"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dp.adaptive_clip.target_quantile=1.5"], r"dp.adaptive_clip.target_quantile=1.5 is not allowed"),
        ([*ADAPTIVE, "dp=bandmf", "dp.bands=2"], "cannot be accounted with it: choose dp=vanilla"),
        ([*ADAPTIVE, "dp.clip_fn=automatic"], "dp.adaptive_clip needs dp.clip_fn=fixed"),
        ([*ADAPTIVE, "optimizer=adam_bc"], "dp.adaptive_clip changes C every step"),
        (["dp.adaptive_clip.target_quantile=0.5", "dp.adaptive_clip.learning_rate=0"], "learning_rate=0.0"),
    ],
)
def test_bad_adaptive_settings_are_one_line_errors(overrides, message):
    cfg = compose_config([*TINY, *overrides])
    with pytest.raises(config_lib.ConfigError, match=message) as error:
        config_lib.validate_static(cfg)
    assert "\n" not in str(error.value)


def test_a_count_noise_below_half_sigma_is_refused(tmp_path):
    cfg = compose_config(
        [
            *TINY,
            "dp.adaptive_clip.target_quantile=0.5",
            "dp.adaptive_clip.count_noise_multiplier=0.5",
            "dp.epsilon=null",
            "dp.noise_multiplier=2.0",
        ],
        tmp_path,
    )
    with pytest.raises(config_lib.ConfigError, match="must exceed σ/2 = 1"):
        experiment.build(cfg)
