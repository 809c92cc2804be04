"""Correlated noise (dp=bandmf, dp=blt) against jax_privacy's own functions, resume, and bad input.

jax_privacy provides the strategies, the streaming noise and the accounting; dpbench adds the
description, the batch selection by step, sharding and checkpointed noise state. These tests check
dpbench's side against jax_privacy's: the same noise stream for the same key (through dpbench's
trainer, on several devices, across a checkpoint), the same ε for the same setting, and the noise's
covariance (C times the stream is i.i.d. N(0, σ²C²)).
"""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_privacy import noise_addition
from jax_privacy.accounting import accountants, analysis
from jax_privacy.matrix_factorization import banded, buffered_toeplitz, streaming_matrix

from dpbench import config as config_lib
from dpbench import experiment
from dpbench.privacy import accounting, noise
from dpbench.privacy.batch_selection import BallsInBinsSampler, CyclicPoissonSampler
from dpbench.privacy.mechanism import Mechanism
from dpbench.privacy.methods import GradientMethod
from dpbench.privacy.randomness import SECRET_FILE
from dpbench.train import sharding
from dpbench.train.checkpoint import Checkpoints
from dpbench.train.loop import Trainer
from dpbench.train.preemption import Preempted
from tests.helpers import TINY, compose_config, fake_devices

STEPS = 12
PARAMS = {("dense", "kernel"): jnp.zeros((8, 3)), ("dense", "bias"): jnp.zeros((3,))}
STRATEGIES = {
    "bandmf": lambda: noise.bandmf(STEPS, 3, optimize=True),
    "blt": lambda: noise.blt(STEPS, 4, 3, optimize=False),
}


def _stream(transform, steps, params=PARAMS):
    state = transform.init(params)
    update = jax.jit(transform.update)
    out = []
    for _ in range(steps):
        noised, state = update(params, state)
        out.append(np.concatenate([np.ravel(noised[p]) for p in sorted(noised)]))
    return np.stack(out), state


@pytest.mark.parametrize("kind", sorted(STRATEGIES))
def test_the_noise_stream_is_jax_privacys_for_the_same_key(kind):
    strategy = STRATEGIES[kind]()
    key = jax.random.PRNGKey(7)
    ours, _ = _stream(strategy.transform(0.5, key), STEPS)
    theirs_transform = noise_addition.matrix_factorization_privatizer(
        strategy.noising_matrix(), stddev=0.5, prng_key=key
    )
    theirs, _ = _stream(theirs_transform, STEPS)  # jitted alike: the same float operations
    np.testing.assert_array_equal(ours, theirs)


def _materialised(strategy) -> np.ndarray:
    """The strategy C as a dense matrix, materialised by jax_privacy."""
    if strategy.kind == "bandmf":
        coefs = jnp.asarray(np.asarray(strategy.coefficients, np.float32))
        return np.asarray(banded.ColumnNormalizedBanded.from_banded_toeplitz(STEPS, coefs).materialize())
    buf_decay, output_scale = strategy.coefficients
    with jax.enable_x64():
        blt = buffered_toeplitz.BufferedToeplitz.build(buf_decay, output_scale)
        return np.asarray(blt.materialize(STEPS))


@pytest.mark.parametrize("kind", sorted(STRATEGIES))
def test_the_strategy_times_the_stream_is_iid_gaussian_with_std_sigma_c(kind):
    """Noise = C⁻¹Z: multiplying the stream by C (materialised by jax_privacy) gives Z, i.i.d. σC."""
    strategy = STRATEGIES[kind]()
    params = {("w",): jnp.zeros((4000,))}
    stream, _ = _stream(strategy.transform(0.3, jax.random.PRNGKey(1)), STEPS, params)
    z = _materialised(strategy) @ stream.astype(np.float64)
    assert np.std(z) == pytest.approx(0.3, rel=0.02)
    correlation = np.corrcoef(z)
    assert np.max(np.abs(correlation - np.eye(STEPS))) < 0.06  # independent steps
    # ... while the stream itself is correlated across steps (that is the mechanism).
    assert np.max(np.abs(np.corrcoef(stream) - np.eye(STEPS))) > 0.1


@pytest.mark.parametrize("kind", sorted(STRATEGIES))
def test_noise_variances_are_the_row_norms_of_the_inverse_strategy_and_its_running_sum(kind):
    strategy = STRATEGIES[kind]()
    inverse = np.linalg.inv(_materialised(strategy).astype(np.float64))
    per_step, running_sum = strategy.noise_variances(STEPS)
    np.testing.assert_allclose(per_step, (inverse**2).sum(axis=1), rtol=1e-4)
    np.testing.assert_allclose(running_sum, (np.cumsum(inverse, axis=0) ** 2).sum(axis=1), rtol=1e-4)
    # ... and jax_privacy's row norms of the streamed C⁻¹ the training adds (float32), for i.i.d. too.
    for each in (strategy, noise.Strategy("iid", STEPS)):
        streamed = each.noising_matrix()
        running = streaming_matrix.prefix_sum() @ streamed
        ours = each.noise_variances(STEPS)
        np.testing.assert_allclose(ours[0], streamed.row_norms_squared(STEPS), rtol=1e-4)
        np.testing.assert_allclose(ours[1], running.row_norms_squared(STEPS), rtol=1e-4)
    if kind == "bandmf":  # optimised for the running sum at DP-SGD's sensitivity: less noise there
        assert running_sum.mean() < np.arange(1, STEPS + 1).mean()
        assert per_step.mean() > 1


def test_mechanism_noise_std_is_sigma_c_over_b_times_the_strategys_row_norms():
    sampler = CyclicPoissonSampler(1200, expected_batch_size=100, cycle_length=3, seed=0)
    strategy = STRATEGIES["bandmf"]()
    mechanism = Mechanism(sampler, STEPS, noise_multiplier=2.0, delta=1e-5, clip_norm=0.5, strategy=strategy)
    per_step, running_sum = strategy.noise_variances(STEPS)
    std = mechanism.noise_std()
    assert std["per_step"] == pytest.approx(0.01 * np.sqrt(per_step.mean()))
    assert std["running_sum"] == pytest.approx(0.01 * np.sqrt(running_sum.mean()))
    assert std["running_sum_last"] == pytest.approx(0.01 * np.sqrt(running_sum[-1]))


def _trainer_noise(strategy, mesh, sigma_c, steps, checkpoint_dir=None, stop=None):
    """Noise the trainer adds at each step, on a zero gradient sum (times the expected batch)."""
    method = GradientMethod("vanilla", clip_norm=1.0)
    transform = strategy.transform(sigma_c, jax.random.PRNGKey(3))
    # DEFAULT_RULES: the kernel (and so its noise buffers) sharded over fsdp on a mesh with fsdp > 1.
    trainer = Trainer(None, method, optax.sgd(1.0), mesh, transform, 1.0, param_rules=sharding.DEFAULT_RULES)
    params = {p: jnp.zeros(v.shape) for p, v in PARAMS.items()}
    state = trainer.init(params)
    _trainer_noise.last = trainer
    finalize = jax.jit(trainer.finalize)
    out = []
    for step in range(steps):
        if checkpoint_dir is not None and step == stop:
            checkpoints = Checkpoints(checkpoint_dir, keep=1, private=True)
            checkpoints.save(step, state.trainable, state.saved_state, {})
            fresh = trainer.init(params)
            _, (_, state.noise_state) = checkpoints.restore(step, fresh.trainable, fresh.saved_state)
            checkpoints.close()
        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
        noised, state.noise_state = finalize(zeros, 1.0, state.noise_state)
        out.append(np.concatenate([np.ravel(np.asarray(noised[p])) for p in sorted(noised)]))
    return np.stack(out)


@pytest.mark.parametrize("kind", sorted(STRATEGIES))
def test_trainer_noise_across_a_checkpoint_equals_the_uninterrupted_stream(kind, tmp_path):
    strategy = STRATEGIES[kind]()
    mesh = sharding.make_mesh(1)
    straight = _trainer_noise(strategy, mesh, 0.5, STEPS)
    resumed = _trainer_noise(strategy, mesh, 0.5, STEPS, checkpoint_dir=tmp_path, stop=5)
    np.testing.assert_array_equal(resumed, straight)
    expected, _ = _stream(strategy.transform(0.5, jax.random.PRNGKey(3)), STEPS)
    np.testing.assert_array_equal(straight, expected)
    assert (tmp_path / "checkpoints").stat().st_mode & 0o077 == 0  # owner-only: it holds past noise


def test_noise_on_two_fsdp_devices_equals_one_device(run_cli):
    """A subprocess with 2 fake CPU devices: the FSDP-sharded noise state gives the same stream."""
    code = (
        "import os\n"
        f"os.environ['XLA_FLAGS'] = {fake_devices(2)!r}\n"
        "import jax, numpy as np\n"
        "from dpbench.train import sharding\n"
        "from tests.privacy.test_correlated_noise import STRATEGIES, _trainer_noise\n"
        "for kind, make in sorted(STRATEGIES.items()):\n"
        "    s = make()\n"
        "    one = _trainer_noise(s, sharding.make_mesh(1), 0.5, 8)\n"
        "    two = _trainer_noise(s, sharding.make_mesh(2, 1, 2), 0.5, 8)\n"
        "    np.testing.assert_allclose(two, one, rtol=1e-6, atol=1e-7)\n"
        "    t = _trainer_noise.last\n"
        "    specs = [str(x.spec) for x in jax.tree_util.tree_leaves(t.noise_shardings)]\n"
        "    assert \"P(None, 'fsdp', None)\" in specs, specs  # buffers sharded like the kernel\n"
        "print('ok')\n"
    )
    result = run_cli("-c", code)
    assert result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Accounting: the same ε as jax_privacy's accountants for the same setting


def test_bandmf_epsilon_equals_jax_privacys_cyclic_poisson_accountant():
    n, batch, bands, steps, sigma, delta = 60_000, 1024, 4, 1758, 1.1, 1e-5
    sampler = CyclicPoissonSampler(n, batch, bands, seed=0)
    ours = accounting.compute_epsilon(sampler, sigma, steps, delta, accounting.AccountantConfig(name="pld"))
    theirs = analysis.DpsgdTrainingAccountant(
        accountants.PldAccountantConfig(value_discretization_interval=1e-4)
    ).compute_epsilon(
        steps,
        analysis.DpParams(
            noise_multipliers=sigma, num_samples=n, delta=delta, batch_size=batch, cycle_length=bands
        ),
    )
    assert ours == pytest.approx(theirs, rel=1e-9)
    # The column-normalised banded strategy has sensitivity 1 per participation (ceil(T / b) of them).
    strategy = noise.bandmf(steps, bands, optimize=False)
    assert strategy.minsep_sensitivity_squared(steps, bands) == pytest.approx(-(-steps // bands))


def test_blt_epsilon_is_one_gaussian_at_sigma_over_the_min_sep_sensitivity():
    n, batch, steps, sigma, delta = 1000, 100, 40, 6.0, 1e-5
    sampler = BallsInBinsSampler(n, batch, seed=0)
    strategy = noise.blt(steps, sampler.cycle_length, 3, optimize=False)
    sampler.sensitivity_squared = lambda t: strategy.minsep_sensitivity_squared(t, sampler.cycle_length)
    ours = accounting.compute_epsilon(sampler, sigma, steps, delta, accounting.AccountantConfig(name="pld"))
    sensitivity = np.sqrt(strategy.minsep_sensitivity_squared(steps, 10))
    # jax_privacy's un-amplified DP-FTRL accountant with the effective noise multiplier.
    theirs = analysis.SingleReleaseTrainingAccountant(
        accountants.PldAccountantConfig(value_discretization_interval=1e-4)
    ).compute_epsilon(
        steps,
        analysis.DpParams(
            noise_multipliers=sigma / sensitivity, num_samples=n, delta=delta, batch_size=batch
        ),
    )
    assert ours == pytest.approx(theirs, rel=1e-9)
    # The sensitivity is jax_privacy's (k, b)-min-sep one: 4 participations, 10 apart.
    from jax_privacy.matrix_factorization import toeplitz

    with jax.enable_x64():
        coefs = strategy.toeplitz_coefficients(steps)
        expected = toeplitz.minsep_sensitivity_squared(jnp.asarray(coefs), min_sep=10, max_participations=4)
    assert sensitivity**2 == pytest.approx(float(expected))
    assert 4 < sensitivity**2 < 16  # between independent (k) and fully correlated (k²) noise


def test_one_band_is_dp_sgd():
    poisson = accounting.compute_epsilon(
        CyclicPoissonSampler(5000, 100, 1, seed=0), 1.0, 200, 1e-5, accounting.AccountantConfig(name="rdp")
    )
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.0)), 200
    )
    assert poisson == pytest.approx(dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-5))
    assert noise.bandmf(200, 1, optimize=True).coefficients == (1.0,)


# ---------------------------------------------------------------------------------------------
# End to end: training, resume, bad input

MECHANISMS = {
    "bandmf": ["dp=bandmf", "dp.bands=2", "dp.optimize_strategy=false"],
    "blt": ["dp=blt", "dp.buffers=2", "dp.optimize_strategy=false"],
}
JOB = [*TINY, "runner.steps=6", "runner.eval_every=2", "runner.checkpoint_every=0", "accountant=rdp"]


@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_a_resumed_correlated_noise_run_is_bit_identical(name, tmp_path):
    reference_dir = tmp_path / "reference"
    reference = experiment.run(compose_config([*JOB, *MECHANISMS[name]], reference_dir))
    assert reference["epsilon"] <= 1.0 + 1e-9 and reference["method"] == name
    assert reference["privacy"]["noise"]["kind"] == name
    cfg = compose_config(
        [*JOB, *MECHANISMS[name], f"dp.secret_file={reference_dir / SECRET_FILE}"], tmp_path / "resumed"
    )
    with pytest.raises(Preempted):
        experiment.run(cfg, stop_after=3)  # the stream's buffers are mid-cycle here
    resumed = experiment.run(cfg)
    assert resumed["resumed_at"] == [3]
    assert resumed["final_params_sha256"] == reference["final_params_sha256"]
    assert resumed["history"] == reference["history"]


def test_a_resume_with_another_strategy_is_refused_naming_it(tmp_path):
    cfg = compose_config([*JOB, *MECHANISMS["bandmf"]], tmp_path)
    with pytest.raises(Preempted):
        experiment.run(cfg, stop_after=2)
    other = compose_config([*JOB, *MECHANISMS["bandmf"], "dp.bands=3"], tmp_path)
    with pytest.raises(config_lib.ConfigError, match="dp.bands=3"):
        experiment.run(other)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["dp=bandmf", "runner.steps=3", "dp.bands=4"], "dp.bands=4 is more than the run's runner.steps=3"),
        (["dp=bandmf", "dp.sampler=poisson"], "dp.sampler=poisson cannot be accounted with dp.method=bandmf"),
        (["dp=blt", "dp.sampler=cyclic_poisson"], "choose dp.sampler=balls_in_bins"),
        (["dp=blt", "dp.buffers=0"], "dp.buffers=0 is not allowed"),
        (["dp=bandmf", "dp.bands=0"], "dp.bands=0 is not allowed"),
    ],
)
def test_bad_mechanism_settings_are_refused_before_loading(overrides, named):
    with pytest.raises(config_lib.ConfigError, match=named):
        config_lib.validate_static(compose_config([*TINY, *overrides]))


def test_more_groups_than_the_data_holds_is_one_line_naming_dp_bands(tmp_path):
    cfg = compose_config([*JOB, "dp=bandmf", "dp.bands=5", "dp.optimize_strategy=false"], tmp_path)
    with pytest.raises(config_lib.ConfigError, match=r"dp.bands=5 .* choose dp.bands in \[1, 4\]"):
        experiment.build(cfg)


def test_the_cli_refuses_a_bad_mechanism_in_one_line_with_exit_2(tmp_path, run_cli):
    args = ("-m", "dpbench", "dp=bandmf", "dp.sampler=shuffle", f"hydra.run.dir={tmp_path}")
    result = run_cli(*args, timeout=300, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "dp.sampler=shuffle" in lines[0] and "Traceback" not in result.stderr
