"""Privacy randomness: nothing a run publishes replays its batches or noise; sweep jobs share no noise.

The attacks are the ones an adversarial review ran: from one released model (one SGD step, lr 1)
the noisy sum is -B·Δθ = S + σC·z; whoever can regenerate z recovers the clipped sum S. Each attack
is also run against ``dp.randomness=seeded`` and must succeed there, so the tests can fail.
"""

import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpbench import config as config_lib
from dpbench import experiment, records
from dpbench.privacy import noise
from dpbench.privacy.randomness import SECRET_FILE, PrivacyRandomness
from dpbench.summary import summary_block
from dpbench.train.preemption import Preempted
from tests.helpers import TINY, compose_config

BATCH = 16  # TINY's runner.batch_size: the expected batch size the noisy sum is divided by
ONE_STEP = [*TINY, "runner.steps=1", "optimizer=sgd", "optimizer.learning_rate=1.0", "dp.clip_norm=1.0"]


def _one_step(out, *overrides):
    """A finished one-step DP run: (its experiment, the noisy sum it released through Δθ)."""
    exp = experiment.build(compose_config([*ONE_STEP, *overrides], out))
    before = jax.device_get(exp.state.trainable)
    experiment.train_and_evaluate(exp)
    after = jax.device_get(exp.state.trainable)
    noisy_sum = {p: -(after[p] - before[p]) * BATCH for p in before}  # -B·Δθ = S + σC·z (lr 1)
    return exp, noisy_sum


def _flat(tree: dict) -> np.ndarray:
    return np.concatenate([np.ravel(tree[p]) for p in sorted(tree)]).astype(np.float64)


def _noise(key, like: dict, std: float) -> dict:
    zeros = {p: jnp.zeros(v.shape, jnp.float32) for p, v in like.items()}
    return jax.device_get(noise.add_iid_gaussian(zeros, jax.random.fold_in(key, 0), std))


def _published_integers(out) -> set[int]:
    """Every integer in results.json and history.jsonl (the seed, counts, steps, ...), and 0-16."""
    found = set(range(17))

    def walk(value):
        if isinstance(value, bool):
            return
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, float) and value.is_integer() and abs(value) < 2**62:
            found.add(int(value))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(json.loads((out / records.RESULTS_FILE).read_text()))
    for line in records.read_history(out):
        walk(line)
    return found


def _best_replay(exp, noisy_sum: dict, out) -> float:
    """The smallest ‖noisy sum - regenerated noise‖ / ‖noise‖ over every published integer, trying both
    the pre-dp.randomness key (split(PRNGKey(k))[1]) and the seeded derivation of k and the mechanism."""
    std = exp.mechanism.noise_multiplier * exp.method.clip_norm
    target = _flat(noisy_sum)
    best = np.inf
    for k in sorted(_published_integers(out)):
        keys = [PrivacyRandomness.seeded(k, exp.mechanism.describe()).noise_key()]
        if 0 <= k < 2**32:
            keys.append(jax.random.split(jax.random.PRNGKey(k))[1])
        for key in keys:
            noise = _flat(_noise(key, noisy_sum, std))
            best = min(best, np.linalg.norm(target - noise) / np.linalg.norm(noise))
    return best


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("secret")
    exp, noisy_sum = _one_step(out, "dp.epsilon=null", "dp.noise_multiplier=1.0")
    return exp, noisy_sum, out


def test_no_published_integer_regenerates_the_noise_of_a_secret_run(secret_run):
    exp, noisy_sum, out = secret_run
    assert exp.randomness.mode == "secret"
    # Independent noise: ‖S + σCz - σCz'‖ ≈ √2 ‖σCz‖; a replayed z would leave ‖S‖ <= B·C ≪ ‖σCz‖.
    assert _best_replay(exp, noisy_sum, out) > 1.2


def test_the_same_attack_recovers_the_clipped_sum_of_a_seeded_run(tmp_path):
    exp, noisy_sum = _one_step(tmp_path, "dp.epsilon=null", "dp.noise_multiplier=1.0", "dp.randomness=seeded")
    std = exp.mechanism.noise_multiplier * exp.method.clip_norm
    seed = exp.cfg.runner.seed
    assert seed in _published_integers(tmp_path)
    key = PrivacyRandomness.seeded(seed, exp.mechanism.describe()).noise_key()
    recovered = _flat(noisy_sum) - _flat(_noise(key, noisy_sum, std))
    # The clipped sum of at most a few dozen examples, each of norm <= C: far below the noise.
    assert np.linalg.norm(recovered) <= 64 * exp.method.clip_norm
    assert _best_replay(exp, noisy_sum, tmp_path) < 0.2


def _correlation(a: dict, b: dict) -> float:
    x, y = _flat(a), _flat(b)
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def test_two_jobs_of_a_sweep_draw_uncorrelated_noise(secret_run, tmp_path):
    _, first, _ = secret_run  # σ = 1
    _, second = _one_step(tmp_path, "dp.epsilon=null", "dp.noise_multiplier=2.0")  # the same seed, σ = 2
    dimension = _flat(first).size
    # σ₂N₁ - σ₁N₂ cancels shared noise exactly (the review's attack); independent noise does not.
    combined = {p: 2.0 * first[p] - second[p] for p in first}
    assert np.linalg.norm(_flat(combined)) > 0.5 * np.linalg.norm(_flat(second))
    assert abs(_correlation(first, second)) < 6 / np.sqrt(dimension)


def test_seeded_jobs_differing_in_sigma_share_no_noise_but_equal_mechanisms_do(tmp_path):
    seeded = ["dp.epsilon=null", "dp.randomness=seeded"]
    _, one = _one_step(tmp_path / "a", *seeded, "dp.noise_multiplier=1.0")
    _, two = _one_step(tmp_path / "b", *seeded, "dp.noise_multiplier=2.0")
    _, again = _one_step(tmp_path / "c", *seeded, "dp.noise_multiplier=1.0", "runner.eval_every=1")
    assert abs(_correlation(one, two)) < 6 / np.sqrt(_flat(one).size)
    assert _correlation(one, again) > 0.999  # the control: the same mechanism and seed replay


def test_the_secret_is_owner_only_in_the_run_folder_and_in_nothing_published(secret_run):
    exp, _, out = secret_run
    path = out / SECRET_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    hex_secret = path.read_text().strip()
    assert bytes.fromhex(hex_secret) == exp.randomness.secret
    derived = [
        hex_secret,
        str(exp.randomness.batch_entropy()),
        exp.randomness.fingerprint(),
        *(str(int(x)) for x in exp.randomness.noise_key_data()),
    ]
    published = [out / records.RESULTS_FILE, out / records.HISTORY_FILE]
    text = "".join(p.read_text() for p in published)
    for value in derived:
        assert value not in text
    record = records.load_record(out)
    assert record.privacy["randomness"] == "secret"
    assert record.reproducibility["privacy_randomness"] == "secret"
    assert "SEEDED" not in summary_block(record, out)


def test_a_seeded_record_and_summary_say_the_claim_assumes_a_secret_seed(tmp_path):
    exp, _ = _one_step(tmp_path, "dp.randomness=seeded")
    record = records.load_record(tmp_path)
    assert "does not hold against anyone who knows runner.seed" in record.privacy["warning"]
    assert record.reproducibility["privacy_randomness"] == "seeded"
    assert "SEEDED" in summary_block(record, tmp_path)
    assert not (tmp_path / SECRET_FILE).exists()


RESUME = [*TINY, "runner.steps=4", "runner.eval_every=2", "runner.checkpoint_every=0"]


def test_a_resume_reads_the_secret_and_is_bit_identical_to_dp_secret_file(tmp_path):
    first = tmp_path / "first"
    with pytest.raises(Preempted):
        experiment.run(compose_config(RESUME, first), stop_after=2)
    stored = (first / SECRET_FILE).read_text()
    resumed = experiment.run(compose_config(RESUME, first))
    assert resumed["resumed_at"] == [2] and (first / SECRET_FILE).read_text() == stored
    # The owner reproduces the run bit for bit from its secret alone, uninterrupted, elsewhere.
    again = experiment.run(compose_config([*RESUME, f"dp.secret_file={first / SECRET_FILE}"], tmp_path / "b"))
    assert again["final_params_sha256"] == resumed["final_params_sha256"]
    assert not (tmp_path / "b" / SECRET_FILE).exists()
    # Without it, a fresh run draws its own secret: other batches and noise, the same ε.
    other = experiment.run(compose_config(RESUME, tmp_path / "c"))
    assert other["final_params_sha256"] != resumed["final_params_sha256"]
    assert other["epsilon"] == resumed["epsilon"]


def test_a_resume_without_its_secret_stops_with_one_line_naming_the_file(tmp_path):
    with pytest.raises(Preempted):
        experiment.run(compose_config(RESUME, tmp_path), stop_after=2)
    (tmp_path / SECRET_FILE).unlink()
    with pytest.raises(config_lib.ConfigError) as error:
        experiment.run(compose_config(RESUME, tmp_path))
    message = str(error.value)
    assert str(tmp_path / SECRET_FILE) in message and "runner.resume=never" in message
    assert "\n" not in message


def test_a_resume_with_another_secret_is_refused(tmp_path):
    with pytest.raises(Preempted):
        experiment.run(compose_config(RESUME, tmp_path / "a"), stop_after=2)
    experiment.run(compose_config([*RESUME, "runner.steps=1"], tmp_path / "b"))
    wrong = tmp_path / "b" / SECRET_FILE
    with pytest.raises(config_lib.ConfigError, match="other privacy randomness"):
        experiment.run(compose_config([*RESUME, f"dp.secret_file={wrong}"], tmp_path / "a"))


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["dp.randomness=os"], "dp.randomness='os' is not allowed; choose one of secret, seeded"),
        (["dp.randomness=seeded", "dp.secret_file=/x"], "dp.secret_file=/x needs dp.randomness=secret"),
    ],
)
def test_bad_randomness_settings_are_refused_in_one_line(overrides, named):
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate_static(compose_config([*TINY, *overrides]))
    assert named in str(error.value)


def test_a_bad_secret_file_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "secret"
    bad.write_text("not hex\n")
    for path, named in ((bad, "does not hold a privacy secret"), (tmp_path / "none", "does not exist")):
        with pytest.raises(config_lib.ConfigError, match=named):
            experiment.build(compose_config([*TINY, f"dp.secret_file={path}"], tmp_path / "run"))
