"""``audit=canary``: the one-run audit (:mod:`dpbench.privacy.audit`) wired into a training run.

Before training, :class:`CanaryAudit` makes m out-of-distribution image canaries
(:func:`dpbench.data.canaries.make_image_canaries`), flips a fair coin per canary
(:func:`dpbench.privacy.audit.draw_canary_inclusion`) and appends the included ones to the training
arrays. The runner then samples and accounts on those enlarged arrays, so ε covers the canaries like
any other example. After training, :meth:`CanaryAudit.evaluate` scores all m canaries (score = minus
the per-example loss, through the run's own task, so the audit never knows the model) and turns the
scores into an empirical ε lower bound with a stated confidence.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from dpbench.data.canaries import make_image_canaries
from dpbench.privacy.audit import draw_canary_inclusion, epsilon_lower_bound
from dpbench.train import sharding
from dpbench.train.tasks import padded_chunks

log = logging.getLogger("dpbench")

# δ used for the bound when the run claims no (ε, δ) at all (dp.method=none).
NONPRIVATE_AUDIT_DELTA = 1e-5
CANARY_DESIGN = (
    "image canaries: i.i.d. fair-coin binary pixels with uniformly random labels, each included "
    "with probability 1/2; score = -loss"
)
_CANARY_KEYS = ("image", "label")


class CanaryAudit:
    """Canaries for one run: the enlarged training arrays before training, the ε lower bound after.

    ``num_classes`` defaults to ``max(label) + 1`` over the training labels.
    """

    def __init__(self, audit_cfg, train_arrays: dict[str, np.ndarray], num_classes: int | None = None):
        if "image" not in train_arrays:
            raise ValueError(
                f"audit=canary supports image datasets only, for now; the training arrays have keys "
                f"{sorted(train_arrays)} (no 'image'). Use audit=none for this dataset"
            )
        if set(train_arrays) != set(_CANARY_KEYS):
            raise ValueError(
                f"audit=canary needs training arrays with exactly the keys {_CANARY_KEYS}, "
                f"got {sorted(train_arrays)}"
            )
        if audit_cfg.num_canaries <= 0:
            raise ValueError(f"audit.num_canaries={audit_cfg.num_canaries} must be > 0")
        if not 0 < audit_cfg.confidence < 1:
            raise ValueError(f"audit.confidence={audit_cfg.confidence} must lie in (0, 1)")
        labels = train_arrays["label"]
        self.num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
        self.num_canaries = int(audit_cfg.num_canaries)
        self.confidence = float(audit_cfg.confidence)
        self.seed = int(audit_cfg.seed)
        self.num_real = len(labels)

        canaries = make_image_canaries(
            self.num_canaries, train_arrays["image"].shape[1:], self.num_classes, self.seed
        )
        self.canaries = {
            "image": canaries["image"].astype(train_arrays["image"].dtype),
            "label": canaries["label"].astype(labels.dtype),
        }
        self.included = draw_canary_inclusion(self.num_canaries, self.seed)
        # Included canaries go after the real examples; the sampler sees one training set of size n.
        self.train_arrays = {
            key: np.concatenate([train_arrays[key], self.canaries[key][self.included]])
            for key in _CANARY_KEYS
        }

    def describe(self) -> str:
        return (
            f"{self.num_canaries} canaries ({int(self.included.sum())} included, seed {self.seed}, "
            f"{self.num_classes} classes); training set {self.num_real} -> "
            f"{len(self.train_arrays['label'])} examples"
        )

    def scores(self, task, trainable, frozen, mesh, eval_batch_size: int) -> np.ndarray:
        """Membership score of every canary (included or not): minus its loss under the trained model."""
        losses_fn = jax.jit(lambda trainable, frozen, batch: task.losses_fn(trainable, batch, frozen)[0])
        chunks = []
        for batch, mask in padded_chunks(self.canaries, eval_batch_size):
            losses = jax.device_get(losses_fn(trainable, frozen, sharding.put_batch(batch, mesh)))
            chunks.append(np.asarray(losses, dtype=np.float64)[mask])
        return -np.concatenate(chunks)

    def evaluate(
        self,
        task,
        trainable,
        frozen,
        mesh,
        eval_batch_size: int,
        claimed_epsilon: float | None,
        delta: float | None,
    ) -> dict:
        """The empirical ε lower bound (see :func:`epsilon_lower_bound`) plus what was claimed and how.

        ``delta=None`` (a non-private run) uses δ = 1e-5 for the bound; the result says so.
        """
        scores = self.scores(task, trainable, frozen, mesh, eval_batch_size)
        audit_delta = NONPRIVATE_AUDIT_DELTA if delta is None else float(delta)
        result = epsilon_lower_bound(scores, self.included, delta=audit_delta, confidence=self.confidence)
        included_losses, excluded_losses = -scores[self.included], -scores[~self.included]
        result.update(
            claimed_epsilon=claimed_epsilon,
            num_canaries=self.num_canaries,
            canary_design=CANARY_DESIGN,
            # Mean losses show the size of the membership signal, whatever the bound says.
            mean_loss_included=float(included_losses.mean()) if included_losses.size else None,
            mean_loss_excluded=float(excluded_losses.mean()) if excluded_losses.size else None,
        )
        if delta is None:
            result["delta_note"] = (
                f"non-private run claims no (ε, δ); the bound uses δ={NONPRIVATE_AUDIT_DELTA:g}"
            )
        log.info(
            "audit: empirical ε lower bound %.3f (claimed ε %s)",
            result["epsilon_lower_bound"],
            claimed_epsilon,
        )
        return result
