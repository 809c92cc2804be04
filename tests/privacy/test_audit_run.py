"""audit=canary: canaries join the training set, are scored through the task, and yield a sound ε bound."""

import jax.numpy as jnp
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from dpbench import config
from dpbench.errors import ConfigError
from dpbench.privacy.audit import AuditConfig, epsilon_lower_bound
from dpbench.privacy.audit_run import NONPRIVATE_AUDIT_DELTA, CanaryAudit
from dpbench.privacy.canaries import make_canaries
from dpbench.train import sharding
from tests.helpers import CONF_DIR, FULL_DATA

MNIST_DIR = FULL_DATA / "mnist"


def _fake_images(n: int, num_classes: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.random((n, 8, 8, 1), dtype=np.float32) * 0.2,  # dim "digits", unlike binary canaries
        "label": (np.arange(n) % num_classes).astype(np.int32),
    }


def _image_audit(train: dict, m: int, seed: int, num_classes: int = 10) -> CanaryAudit:
    cfg = AuditConfig(name="canary", num_canaries=m, seed=seed)
    canaries = make_canaries("image", m, seed, num_classes=num_classes, image_shape=train["image"].shape[1:])
    return CanaryAudit(cfg, train, canaries)


class MemorisingTask:
    """A stand-in "model" that memorised the examples in ``trainable['memory']`` exactly.

    Loss = squared distance to the nearest memorised image: 0 for a trained-on canary, about half
    the pixel count for any other (two random binary images differ in about half their pixels).
    """

    def losses_fn(self, trainable, batch, frozen):
        memory = trainable["memory"]  # [k, ...]
        diffs = batch["image"][:, None] - memory[None]
        distances = jnp.sum(diffs.reshape(diffs.shape[0], diffs.shape[1], -1) ** 2, axis=-1)
        return jnp.min(distances, axis=1), {}


def test_included_canaries_are_appended_to_the_training_set():
    train = _fake_images(50, num_classes=5, seed=0)
    audit = _image_audit(train, m=40, seed=3, num_classes=5)

    included = audit.included
    assert 0 < included.sum() < 40
    assert len(audit.train_arrays["label"]) == 50 + included.sum()
    for key in ("image", "label"):
        assert audit.train_arrays[key].dtype == train[key].dtype
        np.testing.assert_array_equal(audit.train_arrays[key][:50], train[key])
        np.testing.assert_array_equal(audit.train_arrays[key][50:], audit.canaries[key][included])
    assert audit.canaries["image"].shape == (40, 8, 8, 1)
    assert set(np.unique(audit.canaries["label"])) <= set(range(5))
    assert f"40 image canaries ({included.sum()} included" in audit.describe()
    assert f"50 -> {50 + included.sum()} examples" in audit.describe()
    # The same seed gives the same canaries and coins, so a run can be re-audited.
    again = _image_audit(train, m=40, seed=3, num_classes=5)
    np.testing.assert_array_equal(again.train_arrays["image"], audit.train_arrays["image"])


def test_more_canaries_than_the_data_can_hold_are_refused():
    train = _fake_images(30, num_classes=5, seed=0)
    with pytest.raises(
        ConfigError, match=r"audit.num_canaries=40 is more than .* choose audit.num_canaries <= 30"
    ):
        _image_audit(train, m=40, seed=3)


def test_canaries_must_have_the_training_arrays_keys():
    tokens = {"input_ids": np.zeros((40, 3), np.int32), "label": np.zeros(40, np.int32)}
    canaries = make_canaries("image", 10, 0, image_shape=(2, 2, 1))
    with pytest.raises(ValueError, match="keys"):
        CanaryAudit(AuditConfig(name="canary", num_canaries=10), tokens, canaries)


def test_a_memorising_model_is_caught_and_scores_follow_the_task():
    train = _fake_images(250, num_classes=10, seed=1)
    audit = _image_audit(train, m=200, seed=5)
    trainable = {"memory": jnp.asarray(audit.canaries["image"][audit.included])}
    mesh = sharding.make_mesh()
    # 200 canaries in chunks of 48: the padded tail must not leak into the scores.
    scores = audit.scores(MemorisingTask(), trainable, {}, mesh, eval_batch_size=48 * mesh.size)
    assert scores.shape == (200,)
    assert np.all(scores[audit.included] == 0)
    assert np.all(scores[~audit.included] < -5)

    result = audit.evaluate(
        MemorisingTask(), trainable, {}, mesh, 48 * mesh.size, claimed_epsilon=None, delta=None
    )
    expected = epsilon_lower_bound(scores, audit.included, delta=NONPRIVATE_AUDIT_DELTA, confidence=0.95)
    assert result["epsilon_lower_bound"] == pytest.approx(expected["epsilon_lower_bound"])
    assert result["accuracy"] == 1.0 and result["epsilon_lower_bound"] > 2
    assert result["claimed_epsilon"] is None and result["num_canaries"] == 200
    assert result["delta"] == NONPRIVATE_AUDIT_DELTA and "delta_note" in result
    assert result["mean_loss_included"] == 0 < result["mean_loss_excluded"]
    assert result["canary_type"] == "image" and "exposure" not in result
    # every score and coin is recorded, so the bound can be recomputed from the record alone
    again = epsilon_lower_bound(
        np.array(result["scores"]), np.array(result["included"], bool), NONPRIVATE_AUDIT_DELTA
    )
    assert again["epsilon_lower_bound"] == pytest.approx(result["epsilon_lower_bound"], abs=1e-6)

    private = audit.evaluate(
        MemorisingTask(), trainable, {}, mesh, 48 * mesh.size, claimed_epsilon=0.5, delta=1e-6
    )
    assert private["delta"] == 1e-6 and "delta_note" not in private and private["claimed_epsilon"] == 0.5


# A small MNIST job: 1000 real examples plus the included half of 400 canaries, batch 64, Adam.
SMALL_AUDIT_JOB = [
    "logger=none",
    "runner.progress_bar=false",
    "audit=canary",
    "audit.num_canaries=400",
    "dataset.max_train_examples=1000",
    "dataset.max_eval_examples=500",
    "runner.batch_size=64",
    "runner.eval_every=0",
    "optimizer=adam",
    "optimizer.learning_rate=1e-3",
]


def _run_audit_job(tmp_path, overrides: list[str]) -> dict:
    if not MNIST_DIR.is_dir():
        pytest.skip(f"needs the MNIST IDX files in {MNIST_DIR}")
    from dpbench.experiment import run

    config.register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"paths.output_dir={tmp_path}",
                f"dataset.data_dir={MNIST_DIR}",
                *SMALL_AUDIT_JOB,
                *overrides,
            ],
        )
    results = run(cfg)
    assert (tmp_path / "results.json").is_file()
    return results


@pytest.mark.slow
def test_audit_detects_memorisation_without_dp(tmp_path):
    # ~35 s: 300 non-private steps (~15 epochs) memorise most included canaries' random labels.
    audit = _run_audit_job(tmp_path, ["dp=none", "runner.steps=300"])["audit"]
    assert audit["mean_loss_included"] < audit["mean_loss_excluded"] / 2
    # Any ε below this is refuted with 95% confidence: far above what a DP run at small ε may show.
    assert audit["epsilon_lower_bound"] > 1.0
    assert audit["claimed_epsilon"] is None and audit["m"] == 400


@pytest.mark.slow
def test_audit_of_a_dp_run_stays_below_its_claimed_epsilon(tmp_path):
    # ~60-100 s on 2 busy cores (per-example gradients): 50 DP-SGD steps at ε=1.
    results = _run_audit_job(tmp_path, ["dp=vanilla", "dp.epsilon=1", "runner.steps=50"])
    audit = results["audit"]
    assert audit["claimed_epsilon"] == results["epsilon"] == pytest.approx(1.0, abs=1e-3)
    assert results["train_examples"] == 1000 + audit["num_included"]  # the accountant counted the canaries
    assert audit["epsilon_lower_bound"] <= audit["claimed_epsilon"]
