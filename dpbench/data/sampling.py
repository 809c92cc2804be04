"""Which training examples each logical DP-SGD step uses, and the DpEvent that describes it.

A sampler is the single description of the sampling mechanism: the training loop asks it for
indices, and the accountant asks it for ``dp_event``, so the two can never disagree.

Logical steps (one noisy optimizer update) are cut into fixed-size physical batches with
:func:`physical_batches`, so that jit sees one shape whatever the logical batch size.
"""

from __future__ import annotations

import math
from typing import Protocol

import dp_accounting
import numpy as np

SAMPLER_NAMES = ("poisson", "shuffle")

# Distinct stream tags, so a Poisson and a shuffle sampler with the same seed never share random numbers.
_POISSON_STREAM = 0
_SHUFFLE_STREAM = 1


class Sampler(Protocol):
    """What the runner and the accountant need from a sampler."""

    name: str
    neighbouring: str  # "add_remove" or "replace_one"
    num_examples: int
    sampling_rate: float

    def batch_indices(self, step: int) -> np.ndarray: ...

    def steps_for_epochs(self, epochs: float) -> int: ...

    def dp_event(self, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent: ...

    def describe(self) -> dict: ...


def _check_sizes(num_examples: int, batch_size: int, batch_setting: str) -> None:
    if num_examples <= 0:
        raise ValueError(f"num_examples must be positive, got {num_examples}")
    if not 0 < batch_size <= num_examples:
        raise ValueError(f"{batch_setting} must be in [1, num_examples={num_examples}], got {batch_size}")


def _check_step(step: int, seed: int | None) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if seed is None:
        raise ValueError("the sampler has no seed yet: bind the run's privacy randomness first")


class PoissonSampler:
    """Poisson subsampling: each example joins each logical step independently with probability q.

    The batch size is random (mean ``expected_batch_size``, possibly 0). This is the sampling the
    standard DP-SGD analysis assumes (``PoissonSampledDpEvent``, add/remove-one neighbours).

    Any step's batch is reproducible without replaying earlier steps: the generator is seeded
    with the pair (seed, step). In a run, ``seed`` is 256 bits derived from the run's privacy
    secret (``dpbench.privacy.randomness``), never ``runner.seed`` itself.

    >>> sampler = PoissonSampler(num_examples=1000, expected_batch_size=100, seed=0)
    >>> sampler.sampling_rate
    0.1
    >>> batch = sampler.batch_indices(3)
    >>> bool(np.array_equal(batch, sampler.batch_indices(3))), batch.dtype.name
    (True, 'int64')
    >>> bool(np.all(np.diff(batch) > 0))  # sorted, no repeats
    True
    >>> sampler.steps_for_epochs(2)
    20
    """

    name = "poisson"
    neighbouring = "add_remove"

    def __init__(self, num_examples: int, expected_batch_size: int, seed: int | None):
        _check_sizes(num_examples, expected_batch_size, "expected_batch_size")
        self.num_examples = num_examples
        self.expected_batch_size = expected_batch_size
        self.seed = seed
        self.sampling_rate = expected_batch_size / num_examples

    def batch_indices(self, step: int) -> np.ndarray:
        _check_step(step, self.seed)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _POISSON_STREAM, step]))
        return np.flatnonzero(rng.random(self.num_examples) < self.sampling_rate).astype(np.int64)

    def steps_for_epochs(self, epochs: float) -> int:
        """Logical steps that touch ``epochs * num_examples`` examples in expectation."""
        return round(epochs / self.sampling_rate)

    def dp_event(self, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
        """``steps`` Poisson-subsampled Gaussian mechanisms (noise std ``noise_multiplier * C``)."""
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                self.sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
            ),
            steps,
        )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "num_examples": self.num_examples,
            "sampling_rate": self.sampling_rate,
            "expected_batch_size": self.expected_batch_size,
            "neighbouring": self.neighbouring,
        }


class ShuffleSampler:
    """Fixed-size batches from a fresh random permutation each epoch ("shuffle and partition").

    ``steps_per_epoch = num_examples // batch_size``. The last ``num_examples % batch_size``
    entries of each epoch's permutation are not used in that epoch; since every epoch draws a new
    permutation, it is a different (random) set of examples each epoch.

    Privacy accounting (``dp_event``). Fixed-size batches make add/remove-one neighbours
    ill-defined (removing an example changes the batch sizes), so the relation is replace-one.
    Shuffling is *not* Poisson subsampling: accounting for it as if it were underestimates ε
    (Chua et al. 2024, "How private are DP-SGD implementations?"), and dp_accounting has no
    event for shuffling. ``SampledWithoutReplacementDpEvent`` describes an independent uniform
    subset at each step, not a partition, so it does not apply either. We therefore claim no
    amplification from the random order and use this bound, which holds for any permutation:

    * The permutation does not depend on the data, so condition on it. Within one epoch an
      example is in exactly one batch (or in none, if it falls in the unused remainder).
    * Replacing one example changes that batch's clipped-gradient sum by at most 2C (C = clip
      norm) and no other batch's sum, given the same earlier outputs. The epoch is thus an
      adaptive composition in which only one Gaussian mechanism has nonzero sensitivity: its
      privacy loss is that of one Gaussian with noise std σC and sensitivity 2C (effective
      multiplier σ / 2). Averaging over data-independent permutations cannot make it worse
      (joint convexity of the hockey-stick divergence).
    * Epochs compose: ``SelfComposedDpEvent(GaussianDpEvent(σ), epochs)`` under REPLACE_ONE, with
      a partial last epoch counted as a full one (an example may still be in one of its batches).

    ``GaussianDpEvent(σ)`` is in dp_accounting's documented units (noise std / per-example norm
    bound C), so the 2C replace-one shift is the accountant's job. ``PLDAccountant`` does it (its
    REPLACE adjacency shifts both ways by C: ε equals the analytic Gaussian ε at σ / 2).
    ``RdpAccountant`` does not: under REPLACE_ONE it reads the multiplier as relative to the
    replace-one sensitivity and would under-report ε (google/differential-privacy issue #378),
    although its ``supports()`` says yes. ``dpbench.privacy.accounting.check_supported``
    therefore refuses RDP for replace-one samplers: use the PLD accountant with this sampler.

    >>> sampler = ShuffleSampler(num_examples=10, batch_size=3, seed=0)
    >>> sampler.steps_per_epoch
    3
    >>> epoch0 = np.concatenate([sampler.batch_indices(s) for s in range(3)])
    >>> len(epoch0), len(set(epoch0.tolist()))  # 9 distinct examples, one left out this epoch
    (9, 9)
    >>> sampler.dp_event(1.0, steps=4)  # 4 steps = 2 epochs (the second one partial)
    SelfComposedDpEvent(event=GaussianDpEvent(noise_multiplier=1.0), count=2)
    """

    name = "shuffle"
    neighbouring = "replace_one"

    def __init__(self, num_examples: int, batch_size: int, seed: int | None):
        _check_sizes(num_examples, batch_size, "batch_size")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = num_examples // batch_size
        # Descriptive only (fraction of the data per step); the accounting does not use it.
        self.sampling_rate = batch_size / num_examples
        self._cached_epoch: tuple | None = None
        self._cached_permutation: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        # The loop asks for consecutive steps, so one cached permutation avoids redrawing it per step.
        if (self.seed, epoch) != self._cached_epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, _SHUFFLE_STREAM, epoch]))
            self._cached_permutation = rng.permutation(self.num_examples).astype(np.int64)
            self._cached_epoch = (self.seed, epoch)
        return self._cached_permutation

    def batch_indices(self, step: int) -> np.ndarray:
        _check_step(step, self.seed)
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.batch_size
        return self._permutation(epoch)[start : start + self.batch_size].copy()

    def epochs_for_steps(self, steps: int) -> int:
        """Epochs touched by ``steps`` logical steps (a partial epoch counts as one)."""
        return math.ceil(steps / self.steps_per_epoch)

    def steps_for_epochs(self, epochs: float) -> int:
        return round(epochs * self.steps_per_epoch)

    def dp_event(self, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
        """One Gaussian per epoch, to be accounted under REPLACE_ONE; see the class docstring."""
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(noise_multiplier), self.epochs_for_steps(steps)
        )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "num_examples": self.num_examples,
            "sampling_rate": self.sampling_rate,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "unused_per_epoch": self.num_examples - self.steps_per_epoch * self.batch_size,
            "neighbouring": self.neighbouring,
            "accounting": "no amplification: one Gaussian (sensitivity 2C) per epoch, composed over epochs",
        }


def make_sampler(
    name: str, num_examples: int, batch_size: int, seed: int | None
) -> PoissonSampler | ShuffleSampler:
    """Build a sampler by name; ``batch_size`` is the expected batch size for Poisson.

    >>> make_sampler("poisson", 100, 10, seed=1).name
    'poisson'
    >>> make_sampler("uniform", 100, 10, seed=1)
    Traceback (most recent call last):
    ...
    ValueError: sampler must be one of ('poisson', 'shuffle'), got 'uniform'
    """
    if name == "poisson":
        return PoissonSampler(num_examples, batch_size, seed)
    if name == "shuffle":
        return ShuffleSampler(num_examples, batch_size, seed)
    raise ValueError(f"sampler must be one of {SAMPLER_NAMES}, got {name!r}")


def physical_batches(indices: np.ndarray, physical_batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut a logical batch into chunks of exactly ``physical_batch_size`` rows plus a mask of real rows.

    The last chunk is padded with index 0 (mask False), so every chunk has one shape for jit.
    An empty logical batch (Poisson can draw none) gives one all-padding chunk, so the step
    still runs and still adds noise. No row is ever dropped.

    >>> chunks = physical_batches(np.array([5, 7, 9, 11, 13]), 2)
    >>> [(c.tolist(), m.tolist()) for c, m in chunks]
    [([5, 7], [True, True]), ([9, 11], [True, True]), ([13, 0], [True, False])]
    >>> [(c.tolist(), m.tolist()) for c, m in physical_batches(np.array([], dtype=np.int64), 3)]
    [([0, 0, 0], [False, False, False])]
    """
    if physical_batch_size <= 0:
        raise ValueError(f"physical_batch_size must be positive, got {physical_batch_size}")
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
    num_chunks = max(1, math.ceil(len(indices) / physical_batch_size))
    padded = np.zeros(num_chunks * physical_batch_size, dtype=np.int64)
    padded[: len(indices)] = indices
    mask = np.zeros(num_chunks * physical_batch_size, dtype=bool)
    mask[: len(indices)] = True
    return list(
        zip(
            np.split(padded, num_chunks),
            np.split(mask, num_chunks),
            strict=True,
        )
    )
