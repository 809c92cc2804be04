"""What a run publishes beside its (ε, δ) claim, and the claim itself.

A DP run publishes only what its claim covers or what does not depend on the training data. The
:class:`ReleasePolicy` filters every record (results.json, history.jsonl, W&B, progress bar);
:func:`privacy_claim` states the claim with everything needed to recompute it;
:func:`describe_randomness` says how batches and noise were drawn without revealing anything
derived from the run's secret.
"""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from dpbench.privacy import accounting
from dpbench.privacy.mechanism import Mechanism
from dpbench.privacy.randomness import SEEDED_WARNING, PrivacyRandomness

log = logging.getLogger("dpbench")

THROUGHPUT = "train/examples_per_s"
# dataset_info keys that describe the dataset, not its training examples (released in DP runs).
PUBLIC_DATASET_INFO = (
    "num_classes",
    "image_shape",
    "auto_skipped",
    "num_train_full",
    "num_eval_full",
    "subset",
)


class ReleasePolicy:
    """What a run may publish (results.json, history.jsonl, W&B, progress bar).

    A DP run publishes only what is covered by its (ε, δ) claim or does not depend on the training
    data: evaluation-split metrics, ε, σ, total wall time. Statistics of the training data computed
    without noise (per-batch loss, accuracy, clipped fraction, gradient norm, realised batch size,
    throughput, non-finite counts, class counts, truncation counts) are withheld
    unless ``runner.release_nonprivate_stats=true``; ``released`` lists what was published.

    >>> policy = ReleasePolicy(private=True, opted_in=False)
    >>> policy.throughput({"train/examples_per_s": 9.0, "privacy/epsilon": 0.5})
    {'privacy/epsilon': 0.5}
    >>> policy.dataset_info({"num_classes": 10, "train_class_counts": [5, 5]})
    {'num_classes': 10}
    """

    def __init__(self, private: bool, opted_in: bool):
        self.private = private
        self.withhold = private and not opted_in
        self.released: set[str] = set()
        self._warned_nonfinite = False

    def train_record(self, stats: dict) -> dict:
        """The training statistics of one logged step that may be published."""
        from dpbench.train.loop import train_statistics

        if not self.withhold:
            record = train_statistics(stats)
            if self.private:
                self.released.update(record)
            return record
        if float(stats.get("nonfinite_sum", 0.0)) > 0 and not self._warned_nonfinite:
            # One bit, once, to the operator's log: their model produces non-finite gradients.
            log.warning(
                "some training examples had non-finite gradients and were zeroed (the count is a training-"
                "data statistic and is withheld; runner.release_nonprivate_stats=true logs it)"
            )
            self._warned_nonfinite = True
        return {}

    def throughput(self, record: dict) -> dict:
        """Examples per second grows with the realised batch size (and, bucketed, with the sampled
        text lengths): a statistic of the training data, withheld with the others."""
        if not self.private or THROUGHPUT not in record:
            return record
        if self.withhold:
            return {k: v for k, v in record.items() if k != THROUGHPUT}
        self.released.add(THROUGHPUT)
        return record

    def dataset_info(self, info: dict) -> dict:
        if not self.private:
            return info
        released = {k: v for k, v in info.items() if k in PUBLIC_DATASET_INFO or not self.withhold}
        self.released.update(f"dataset_info.{k}" for k in released if k not in PUBLIC_DATASET_INFO)
        return released

    def preparation(self, preparation: dict) -> dict:
        """Drop what preparing the *training* split measured (e.g. its truncation counts)."""
        if not self.private:
            return preparation
        kept = {}
        for name, per_split in preparation.items():
            splits = {s: v for s, v in per_split.items() if s != "train" or not self.withhold}
            if "train" in splits:
                self.released.add(f"data_preparation.{name}.train")
            if splits:
                kept[name] = splits
        return kept

    def annotate(self, privacy: dict, randomness: PrivacyRandomness) -> None:
        """Add to a DP record's privacy section what was released beside the claim, and how."""
        privacy["released_nonprivate_statistics"] = sorted(self.released)
        privacy["randomness"] = randomness.mode
        if randomness.mode == "seeded":
            privacy["warning"] = SEEDED_WARNING


def privacy_claim(
    mechanism: Mechanism,
    tracker: accounting.EpsilonTracker | None,
    accountant: DictConfig,
    target_epsilon: float | None,
    clipping_implementation: str | None = None,
    clip_fn: str | None = None,
) -> dict:
    """The final (ε, δ) claim with everything needed to recompute it; refuses a claim above target."""
    if tracker is None:
        return {
            "epsilon": None,
            "delta": None,
            "noise_multiplier": None,
            "privacy": {"mechanism": "none (non-private)"},
        }
    epsilon = tracker.epsilon_at(mechanism.steps)
    if target_epsilon is not None and epsilon > target_epsilon * (1 + 1e-9):
        raise RuntimeError(f"ε spent {epsilon} exceeds the target dp.epsilon={target_epsilon}")
    privacy = accounting.privacy_summary(
        mechanism.sampler,
        mechanism.noise_multiplier,
        mechanism.steps,
        mechanism.delta,
        mechanism.clip_norm,
        accountant,
        epsilon,
    )
    # The noise strategy (i.i.d., BandMF's coefficients, BLT's buffers) and the batch selection
    # it is accounted under are part of the mechanism description above (sampler) and here.
    privacy["noise"] = mechanism.strategy.describe()
    if mechanism.adaptive is not None:
        privacy["adaptive_clip"] = mechanism.adaptive.describe(mechanism.noise_multiplier)
    if clipping_implementation is not None:  # dp.clipping=auto resolved: speed only
        privacy["clipping_implementation"] = clipping_implementation
    if clip_fn is not None:  # how gradients were scaled to norm <= C (the same sensitivity either way)
        privacy["clip_fn"] = clip_fn
    # What one neighbouring dataset differs by: one example, or all of one user's (n and q count users).
    privacy["unit"] = mechanism.units.describe() if mechanism.units is not None else {"unit": "example"}
    log.info(
        "privacy: (ε=%.4f, δ=%.3g) with σ=%.4f over %d logical steps",
        epsilon,
        mechanism.delta,
        mechanism.noise_multiplier,
        mechanism.steps,
    )
    log.info("privacy claim (recomputable by hand): %s", json.dumps(privacy, default=str))
    return {
        "epsilon": epsilon,
        "delta": mechanism.delta,
        "noise_multiplier": mechanism.noise_multiplier,
        "privacy": privacy,
    }


def describe_randomness(mechanism: Mechanism, randomness: PrivacyRandomness) -> dict:
    """How batches and noise were drawn (public: nothing derived from the secret)."""
    described = {"sampler": mechanism.sampler.name, **randomness.describe()}
    if mechanism.private and mechanism.strategy.kind != "iid":
        # Correlated noise: jax_privacy's privatizer starts from the run's noise key (the same
        # SHA-256 derivation as above) and splits it once per step instead of folding in the step.
        described["noise"] = (
            f"{mechanism.strategy.kind}: C^-1 Z, Z from jax_privacy's matrix_factorization_privatizer, "
            "its key the run's noise key (as for i.i.d. noise), split once per step"
        )
    return described
