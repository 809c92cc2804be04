"""Which training examples each logical step uses, and the DpEvent that describes it (host-side NumPy).

A sampler is the single description of the sampling mechanism: the training loop asks it for
indices, and the accountant asks it for ``dp_event``, so the two can never disagree.

- ``poisson``: Poisson subsampling (DP-SGD's standard analysis).
- ``shuffle``: fixed-size batches from a fresh permutation each epoch (no amplification claimed).
- ``cyclic_poisson``: the examples are split into ``cycle_length`` groups; step ``s`` Poisson-samples
  group ``s mod cycle_length`` (amplified banded matrix factorization, Choquette-Choo et al. 2023).
- ``balls_in_bins``: every example falls in one of ``cycle_length`` bins and takes part in every
  step of its bin (multi-epoch matrix factorization with minimum separation ``cycle_length``).

The last two use jax_privacy's own batch selection (``jax_privacy.batch_selection``); dpbench only
adds random access by step (a resumed run asks for step ``s`` first).
"""

from __future__ import annotations

import math
from typing import Protocol

import dp_accounting
import numpy as np

SAMPLER_NAMES = ("poisson", "shuffle", "cyclic_poisson", "balls_in_bins")

# Distinct stream tags, so a Poisson and a shuffle sampler with the same seed never share random numbers.
_POISSON_STREAM = 0
_SHUFFLE_STREAM = 1
_CYCLIC_POISSON_STREAM = 2
_BALLS_IN_BINS_STREAM = 3


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


class _ReplayedStrategy:
    """Random access by step to a jax_privacy ``BatchSelectionStrategy``, which is a sequential iterator.

    One generator seeded with (seed, stream) drives the whole run, exactly as jax_privacy draws it;
    asking for an earlier step (a resume) replays from the start, which costs one binomial and one
    choice per step (host-side, milliseconds per thousand steps).
    """

    def __init__(self, strategy, num_examples: int, stream: int):
        self.strategy = strategy
        self.num_examples = num_examples
        self.stream = stream
        self._iterator = None
        self._next_step = 0
        self._seed = None

    def batch(self, step: int, seed: int) -> np.ndarray:
        if self._iterator is None or step < self._next_step or seed != self._seed:
            rng = np.random.default_rng(np.random.SeedSequence([seed, self.stream]))
            self._iterator = self.strategy.batch_iterator(self.num_examples, rng)
            self._next_step, self._seed = 0, seed
        while True:
            indices = next(self._iterator)
            self._next_step += 1
            if self._next_step - 1 == step:
                return np.sort(np.asarray(indices, dtype=np.int64))


class CyclicPoissonSampler:
    """Cyclic Poisson sampling (Choquette-Choo et al. 2023, "Amplified Banded Matrix Factorization",
    Algorithm 2): the examples fall into ``cycle_length`` groups (each independently and uniformly
    at random, which add/remove-one neighbours need), and step ``s`` includes every example of group
    ``s mod cycle_length`` independently with probability ``q = batch / (n // cycle_length)``.

    An example can take part only every ``cycle_length`` steps, at most ``ceil(steps / cycle_length)``
    times. With noise correlated by a column-normalised strategy of at most ``cycle_length`` bands
    (BandMF), or independent noise, the run is therefore accounted as that many Poisson-subsampled
    Gaussian mechanisms at rate q (Theorem 4 there; jax_privacy's ``DpsgdTrainingAccountant`` with
    ``cycle_length``). ``cycle_length=1`` is Poisson sampling.

    >>> sampler = CyclicPoissonSampler(num_examples=1000, expected_batch_size=50, cycle_length=4, seed=0)
    >>> sampler.sampling_rate  # 50 / (1000 // 4)
    0.2
    >>> sampler.dp_event(1.0, steps=10)  # doctest: +NORMALIZE_WHITESPACE
    SelfComposedDpEvent(event=PoissonSampledDpEvent(sampling_probability=0.2,
        event=GaussianDpEvent(noise_multiplier=1.0)), count=3)
    >>> groups = [set(sampler.batch_indices(s).tolist()) for s in range(8)]
    >>> bool(groups[0] & groups[1]), bool(groups[0] & groups[4])  # other group; same group again
    (False, True)
    >>> bool(np.array_equal(sampler.batch_indices(2), sampler.batch_indices(2)))  # random access
    True
    """

    name = "cyclic_poisson"
    neighbouring = "add_remove"

    def __init__(self, num_examples: int, expected_batch_size: int, cycle_length: int, seed: int | None):
        from jax_privacy import batch_selection as jp_batch_selection

        _check_sizes(num_examples, expected_batch_size, "expected_batch_size")
        if not 1 <= cycle_length <= num_examples // expected_batch_size:
            raise ValueError(
                f"cycle_length must be in [1, num_examples // batch = {num_examples // expected_batch_size}] "
                f"(each group must hold at least one expected batch), got {cycle_length}"
            )
        self.num_examples = num_examples
        self.expected_batch_size = expected_batch_size
        self.cycle_length = cycle_length
        self.seed = seed
        self.sampling_rate = expected_batch_size / (num_examples // cycle_length)
        strategy = jp_batch_selection.CyclicPoissonSampling(
            sampling_prob=self.sampling_rate,
            iterations=2**62,  # the run's length is the loop's business; the iterator is lazy
            cycle_length=cycle_length,
            partition_type=jp_batch_selection.PartitionType.INDEPENDENT,
        )
        self._replay = _ReplayedStrategy(strategy, num_examples, _CYCLIC_POISSON_STREAM)

    def batch_indices(self, step: int) -> np.ndarray:
        _check_step(step, self.seed)
        return self._replay.batch(step, self.seed)

    def participations(self, steps: int) -> int:
        """The most steps one example can take part in."""
        return math.ceil(steps / self.cycle_length)

    def steps_for_epochs(self, epochs: float) -> int:
        return round(epochs * self.num_examples / self.expected_batch_size)

    def dp_event(self, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                self.sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
            ),
            self.participations(steps),
        )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "num_examples": self.num_examples,
            "sampling_rate": self.sampling_rate,
            "expected_batch_size": self.expected_batch_size,
            "cycle_length": self.cycle_length,
            "neighbouring": self.neighbouring,
            "accounting": "ceil(steps / cycle_length) Poisson-subsampled Gaussians at rate q "
            "(Choquette-Choo et al. 2023, Theorem 4)",
        }


class BallsInBinsSampler:
    """Balls-in-bins participation (jax_privacy's ``BallsInBinsSampling``): every example falls
    uniformly at random into one of ``cycle_length = n // batch`` bins, and step ``s`` is bin
    ``s mod cycle_length`` whole. An example therefore takes part at most ``k = ceil(steps /
    cycle_length)`` times, each time exactly ``cycle_length`` steps after the last: the (k, b)
    minimum-separation participation of multi-epoch matrix factorization (Choquette-Choo et al.
    2022; BLT: Dvijotham et al. 2024, McKenna 2024).

    No amplification is claimed: the run is one Gaussian mechanism whose sensitivity is the
    strategy's worst (k, b)-min-sep column sum, ``sensitivity_squared(steps)`` (given by the noise
    strategy; independent noise: ``k``). Batches have a random size with mean ``n / cycle_length``.

    >>> sampler = BallsInBinsSampler(num_examples=100, expected_batch_size=25, seed=0)
    >>> sampler.cycle_length, sampler.expected_batch_size
    (4, 25.0)
    >>> bins = [sampler.batch_indices(s) for s in range(4)]
    >>> sum(len(b) for b in bins), len(set(np.concatenate(bins).tolist()))  # a partition of all 100
    (100, 100)
    >>> bool(np.array_equal(sampler.batch_indices(5), bins[1]))
    True
    >>> sampler.dp_event(2.0, steps=16)  # independent noise: 4 participations, one Gaussian of σ/2
    GaussianDpEvent(noise_multiplier=1.0)
    """

    name = "balls_in_bins"
    neighbouring = "add_remove"

    def __init__(
        self, num_examples: int, expected_batch_size: int, seed: int | None, sensitivity_squared=None
    ):
        from jax_privacy import batch_selection as jp_batch_selection

        _check_sizes(num_examples, expected_batch_size, "batch_size")
        self.num_examples = num_examples
        self.cycle_length = num_examples // expected_batch_size
        # The mean bin size; the noise is divided by it (a data-independent constant).
        self.expected_batch_size = num_examples / self.cycle_length
        self.seed = seed
        self.sampling_rate = 1 / self.cycle_length
        # steps -> squared sensitivity of the noise strategy under this participation (None: independent).
        self.sensitivity_squared = sensitivity_squared
        strategy = jp_batch_selection.BallsInBinsSampling(iterations=2**62, cycle_length=self.cycle_length)
        self._replay = _ReplayedStrategy(strategy, num_examples, _BALLS_IN_BINS_STREAM)

    def batch_indices(self, step: int) -> np.ndarray:
        _check_step(step, self.seed)
        # Bins repeat every cycle_length steps: replay only the first cycle.
        return self._replay.batch(step % self.cycle_length, self.seed)

    def participations(self, steps: int) -> int:
        return math.ceil(steps / self.cycle_length)

    def steps_for_epochs(self, epochs: float) -> int:
        return round(epochs * self.cycle_length)

    def dp_event(self, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
        """One Gaussian with multiplier σ / sensitivity (single-release accounting, no amplification)."""
        if self.sensitivity_squared is None:
            squared = float(self.participations(steps))
        else:
            squared = float(self.sensitivity_squared(steps))
        return dp_accounting.GaussianDpEvent(noise_multiplier / math.sqrt(max(squared, 1e-300)))

    def describe(self) -> dict:
        return {
            "name": self.name,
            "num_examples": self.num_examples,
            "sampling_rate": self.sampling_rate,
            "expected_batch_size": self.expected_batch_size,
            "cycle_length": self.cycle_length,
            "neighbouring": self.neighbouring,
            "accounting": "one Gaussian with the strategy's (k, cycle_length)-min-sep sensitivity, "
            "no amplification",
        }


def sampler_of_record(config: dict, num_examples: int, steps: int, noise_description: dict | None = None):
    """The sampler a run's record describes (its config's ``dp`` and ``runner``, and for balls-in-bins
    the noise strategy of ``privacy.noise``), to recompute its ε; the seed is irrelevant there."""
    from dpbench.privacy import noise

    dp, runner = config["dp"], config["runner"]
    sampler = make_sampler(
        dp["sampler"], num_examples, runner["batch_size"], seed=None, cycle_length=dp.get("bands", 1)
    )
    if sampler.name == "balls_in_bins":
        strategy = noise.Strategy.from_description(noise_description, steps)
        if strategy.kind != "iid":
            sampler.sensitivity_squared = lambda t: strategy.minsep_sensitivity_squared(
                t, sampler.cycle_length
            )
    return sampler


def make_sampler(name: str, num_examples: int, batch_size: int, seed: int | None, cycle_length: int = 1):
    """Build a sampler by name; ``batch_size`` is the expected batch size for Poisson.

    >>> make_sampler("poisson", 100, 10, seed=1).name
    'poisson'
    >>> make_sampler("uniform", 100, 10, seed=1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: sampler must be one of (...), got 'uniform'
    """
    if name == "poisson":
        return PoissonSampler(num_examples, batch_size, seed)
    if name == "shuffle":
        return ShuffleSampler(num_examples, batch_size, seed)
    if name == "cyclic_poisson":
        return CyclicPoissonSampler(num_examples, batch_size, cycle_length, seed)
    if name == "balls_in_bins":
        return BallsInBinsSampler(num_examples, batch_size, seed)
    raise ValueError(f"sampler must be one of {SAMPLER_NAMES}, got {name!r}")
