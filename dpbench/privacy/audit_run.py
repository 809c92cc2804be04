"""``audit=canary``: the one-run audit (:mod:`dpbench.privacy.audit`) wired into a training run.

Before training, :func:`build_canary_audit` makes m canaries of the type the run's task declares
(``CANARIES`` on the task class: images for MNIST, sentences for SST-2, dialogues with secret
summaries for SAMSum; :mod:`dpbench.privacy.canaries`), lets the task turn them into training arrays
(``prepare_canaries``: the model's tokenizer, the dataset's lengths), flips a fair coin per canary
(:func:`dpbench.privacy.audit.draw_canary_inclusion`) and appends the included ones to the training
arrays. The runner then samples and accounts on those enlarged arrays, so ε covers the canaries like
any other example. After training, :meth:`CanaryAudit.evaluate` scores all m canaries (score = minus
the per-example loss, through the run's own task, so the audit never knows the model), turns the
scores into an empirical ε lower bound with a stated confidence and, for secrets, measures their
exposure (Carlini et al. 2019).
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np

from dpbench.errors import ConfigError
from dpbench.privacy import canaries as canaries_lib
from dpbench.privacy.audit import draw_canary_inclusion, epsilon_lower_bound
from dpbench.train import sharding
from dpbench.train.tasks import canary_type, padded_chunks

log = logging.getLogger("dpbench")

# δ used for the bound when the run claims no (ε, δ) at all (dp.method=none).
NONPRIVATE_AUDIT_DELTA = 1e-5
# Exposure is measured on the first this-many canaries (included or not), each against
# audit.exposure_candidates other secrets: a forward pass per candidate.
EXPOSURE_CANARIES = 100


def check_canary_count(num_canaries: int, num_real: int) -> None:
    """Canaries may not outnumber the real training examples: the audited run must stay a run on
    this dataset (with m = n, about a third of the training set is canaries)."""
    if num_canaries > num_real:
        raise ConfigError(
            f"audit.num_canaries={num_canaries} is more than the training data can hold: it has "
            f"{num_real} examples; choose audit.num_canaries <= {num_real}"
        )


def dataset_input(dataset_name: str) -> str:
    """What dataset ``dataset_name`` gives ("image" or "text")."""
    from dpbench.data.registry import dataset_modules

    return dataset_modules()[dataset_name].INPUT


class CanaryAudit:
    """Canaries for one run: the enlarged training arrays before training, the ε lower bound after.

    ``canary_arrays`` are the m canaries as the task's training arrays (same keys as
    ``train_arrays``); ``secrets`` and ``candidate_arrays`` (each measured canary's dialogue with
    ``candidates`` other secrets, canary-major) give the exposure of secret canaries.
    """

    def __init__(
        self,
        audit_cfg,
        train_arrays: dict[str, np.ndarray],
        canary_arrays: dict[str, np.ndarray],
        kind: str = "image",
        secrets: np.ndarray | None = None,
        candidate_arrays: dict[str, np.ndarray] | None = None,
        secret_space: int | None = None,
    ):
        if set(canary_arrays) != set(train_arrays):
            raise ValueError(
                f"audit=canary: the {kind} canaries have keys {sorted(canary_arrays)}, the training "
                f"arrays {sorted(train_arrays)}"
            )
        if not 0 < audit_cfg.confidence < 1:
            raise ValueError(f"audit.confidence={audit_cfg.confidence} must lie in (0, 1)")
        self.kind = kind
        self.num_canaries = int(audit_cfg.num_canaries)
        self.confidence = float(audit_cfg.confidence)
        self.seed = int(audit_cfg.seed)
        self.num_real = len(next(iter(train_arrays.values())))
        check_canary_count(self.num_canaries, self.num_real)
        self.canaries = {
            key: np.asarray(value).astype(train_arrays[key].dtype) for key, value in canary_arrays.items()
        }
        if len(next(iter(self.canaries.values()))) != self.num_canaries:
            raise ValueError(f"expected {self.num_canaries} canaries")
        self.secrets = secrets
        self.candidate_arrays = candidate_arrays
        self.secret_space = secret_space
        self.included = draw_canary_inclusion(self.num_canaries, self.seed)
        # Included canaries go after the real examples; the sampler sees one training set of size n.
        self.train_arrays = {
            key: np.concatenate([train_arrays[key], self.canaries[key][self.included]])
            for key in train_arrays
        }

    def describe(self) -> str:
        n = len(next(iter(self.train_arrays.values())))
        return (
            f"{self.num_canaries} {self.kind} canaries ({int(self.included.sum())} included, seed "
            f"{self.seed}); training set {self.num_real} -> {n} examples"
        )

    def _losses(self, task, trainable, frozen, mesh, eval_batch_size: int, arrays) -> np.ndarray:
        losses_fn = jax.jit(lambda trainable, frozen, batch: task.losses_fn(trainable, batch, frozen)[0])
        chunks = []
        for batch, mask in padded_chunks(arrays, eval_batch_size):
            losses = jax.device_get(losses_fn(trainable, frozen, sharding.put_batch(batch, mesh)))
            chunks.append(np.asarray(losses, dtype=np.float64)[mask])
        return np.concatenate(chunks)

    def scores(self, task, trainable, frozen, mesh, eval_batch_size: int) -> np.ndarray:
        """Membership score of every canary (included or not): minus its loss under the trained model."""
        return -self._losses(task, trainable, frozen, mesh, eval_batch_size, self.canaries)

    def exposures(self, task, trainable, frozen, mesh, eval_batch_size: int, scores: np.ndarray) -> dict:
        """Exposure (:func:`dpbench.privacy.canaries.exposure`) of the first measured canaries'
        secrets, summarised for included and excluded canaries."""
        losses = self._losses(task, trainable, frozen, mesh, eval_batch_size, self.candidate_arrays)
        measured = min(self.num_canaries, EXPOSURE_CANARIES)
        candidate_losses = losses.reshape(measured, -1)
        values = [
            canaries_lib.exposure(-scores[i], candidate_losses[i], self.secret_space) for i in range(measured)
        ]

        def summary(mask: np.ndarray) -> dict | None:
            chosen = [v for v, keep in zip(values, mask, strict=True) if keep]
            if not chosen:
                return None
            sampled = np.array([v["sampled"] for v in chosen])
            extrapolated = np.array([v["extrapolated"] for v in chosen])
            return {
                "count": len(chosen),
                "mean_sampled": float(sampled.mean()),
                "mean_extrapolated": float(extrapolated.mean()),
                "max_extrapolated": float(extrapolated.max()),
            }

        included = self.included[:measured]
        return {
            "secret_space": self.secret_space,
            "log2_secret_space": math.log2(self.secret_space),
            "candidates": candidate_losses.shape[1],
            "max_sampled": math.log2(candidate_losses.shape[1] + 1),
            "included": summary(included),
            "excluded": summary(~included),
            "method": (
                "Carlini et al. 2019 (The Secret Sharer): log2|R| - log2 rank, the rank estimated "
                "from random other secrets in the same dialogue (sampled) and by a skew-normal fit "
                "to their losses (extrapolated)"
            ),
        }

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
            canary_type=self.kind,
            canary_design=canaries_lib.CANARY_TYPES[self.kind] + "; each included with probability 1/2",
            # Mean losses show the size of the membership signal, whatever the bound says.
            mean_loss_included=float(included_losses.mean()) if included_losses.size else None,
            mean_loss_excluded=float(excluded_losses.mean()) if excluded_losses.size else None,
            # Every canary's score and coin: the bound can be recomputed (another statistic, another δ).
            scores=[float(f"{s:.6g}") for s in scores],
            included=[int(i) for i in self.included],
        )
        if self.candidate_arrays is not None:
            result["exposure"] = self.exposures(task, trainable, frozen, mesh, eval_batch_size, scores)
            log.info(
                "audit: secret exposure (extrapolated, mean) %.2f included / %.2f excluded of %.1f bits",
                result["exposure"]["included"]["mean_extrapolated"]
                if result["exposure"]["included"]
                else math.nan,
                result["exposure"]["excluded"]["mean_extrapolated"]
                if result["exposure"]["excluded"]
                else math.nan,
                result["exposure"]["log2_secret_space"],
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


def build_canary_audit(cfg, task_type, dataset, bundle, train_arrays: dict[str, np.ndarray]) -> CanaryAudit:
    """The audit of a run: canaries of the type its task declares, prepared by the task."""
    audit_cfg = cfg.audit
    kind = canary_type(cfg.dataset.task, dataset_input(cfg.dataset.name))
    num_real = len(next(iter(train_arrays.values())))
    check_canary_count(audit_cfg.num_canaries, num_real)
    num_classes = dataset.info.get("num_classes")
    if num_classes is None and "label" in train_arrays:
        num_classes = int(train_arrays["label"].max()) + 1
    image_shape = train_arrays["image"].shape[1:] if "image" in train_arrays else None
    raw = canaries_lib.make_canaries(
        kind,
        audit_cfg.num_canaries,
        audit_cfg.seed,
        num_classes=num_classes or 2,
        image_shape=image_shape or (28, 28, 1),
        secret_digits=audit_cfg.secret_digits,
    )
    canary_arrays = task_type.prepare_canaries(raw, dataset, bundle, cfg)
    candidate_arrays = secret_space = None
    if "secret" in raw and audit_cfg.exposure_candidates:
        measured = min(audit_cfg.num_canaries, EXPOSURE_CANARIES)
        others = canaries_lib.exposure_candidates(
            raw["secret"][:measured], audit_cfg.exposure_candidates, audit_cfg.secret_digits, audit_cfg.seed
        )
        candidates = {
            "dialogue": np.repeat(raw["dialogue"][:measured], others.shape[1]),
            "summary": np.array(
                [
                    canaries_lib.SECRET_TEMPLATE.format(name=name, secret=secret)
                    for name, row in zip(raw["name"][:measured], others, strict=True)
                    for secret in row
                ]
            ),
        }
        candidate_arrays = task_type.prepare_canaries(candidates, dataset, bundle, cfg)
        secret_space = 10**audit_cfg.secret_digits
    return CanaryAudit(
        audit_cfg,
        train_arrays,
        canary_arrays,
        kind=kind,
        secrets=raw.get("secret"),
        candidate_arrays=candidate_arrays,
        secret_space=secret_space,
    )
