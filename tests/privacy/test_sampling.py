"""Samplers draw what they claim, and physical batching never drops or duplicates a row."""

import math

import dp_accounting
import numpy as np
import pytest

from dpbench.privacy.batch_selection import PoissonSampler, ShuffleSampler, make_sampler
from dpbench.train.loop import physical_batches


def test_poisson_inclusion_frequency_matches_q():
    # Over n * steps Bernoulli(q) draws the total count is Binomial(n * steps, q); the fixed seed
    # makes the test deterministic, and |z| < 4 would fail by chance with probability ~6e-5.
    n, batch, steps = 2000, 50, 400
    sampler = PoissonSampler(n, batch, seed=123)
    counts = np.zeros(n, dtype=np.int64)
    for step in range(steps):
        np.add.at(counts, sampler.batch_indices(step), 1)
    q = sampler.sampling_rate
    total_trials = n * steps
    z = (counts.sum() - total_trials * q) / math.sqrt(total_trials * q * (1 - q))
    assert abs(z) < 4
    # Every example is sampled at its own rate too: per-example counts are Binomial(steps, q) (mean 10),
    # so their spread must match the binomial variance (a sampler favouring some examples would not).
    assert counts.var() == pytest.approx(steps * q * (1 - q), rel=0.15)


def test_poisson_steps_are_reproducible_and_independent_of_order():
    sampler = PoissonSampler(1000, 100, seed=7)
    later_first = sampler.batch_indices(5)
    for step in range(5):
        sampler.batch_indices(step)
    assert np.array_equal(later_first, sampler.batch_indices(5))
    assert not np.array_equal(sampler.batch_indices(5), sampler.batch_indices(6))
    assert not np.array_equal(sampler.batch_indices(5), PoissonSampler(1000, 100, seed=8).batch_indices(5))


def test_poisson_can_draw_an_empty_batch():
    sampler = PoissonSampler(10, 1, seed=0)  # P(empty) = 0.9**10 ~ 0.35 per step
    sizes = [len(sampler.batch_indices(step)) for step in range(50)]
    assert 0 in sizes


def test_shuffle_uses_each_example_at_most_once_per_epoch():
    n, batch = 103, 10
    sampler = ShuffleSampler(n, batch, seed=3)
    assert sampler.steps_per_epoch == 10
    epochs = []
    for epoch in range(3):
        steps = range(epoch * sampler.steps_per_epoch, (epoch + 1) * sampler.steps_per_epoch)
        batches = [sampler.batch_indices(step) for step in steps]
        assert all(len(b) == batch for b in batches)
        used = np.concatenate(batches)
        assert len(np.unique(used)) == len(used) == 100
        epochs.append(set(used.tolist()))
    # A fresh permutation each epoch: the unused remainder (3 examples) differs between epochs.
    assert len({frozenset(set(range(n)) - used) for used in epochs}) > 1


def test_shuffle_event_counts_started_epochs():
    sampler = ShuffleSampler(100, 10, seed=0)
    assert sampler.dp_event(2.0, 10) == dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(2.0), 1
    )
    assert sampler.dp_event(2.0, 11).count == 2
    assert sampler.steps_for_epochs(3) == 30


@pytest.mark.parametrize("size, physical", [(12, 4), (13, 4), (3, 8), (1, 1)])
def test_physical_batches_cover_every_index_exactly_once(size, physical):
    indices = np.arange(100, 100 + size, dtype=np.int64)
    chunks = physical_batches(indices, physical)
    assert len(chunks) == math.ceil(size / physical)
    assert all(len(rows) == len(mask) == physical for rows, mask in chunks)
    real = np.concatenate([rows[mask] for rows, mask in chunks])
    assert np.array_equal(real, indices)
    assert sum(int((~mask).sum()) for _, mask in chunks) == len(chunks) * physical - size


def test_physical_batches_of_empty_batch_is_one_padding_chunk():
    chunks = physical_batches(np.array([], dtype=np.int64), 4)
    assert len(chunks) == 1
    rows, mask = chunks[0]
    assert rows.shape == (4,) and not mask.any()


def test_bad_settings_fail_early():
    with pytest.raises(ValueError, match="poisson"):
        make_sampler("fixed", 100, 10, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        ShuffleSampler(10, 11, seed=0)
    with pytest.raises(ValueError, match="physical_batch_size"):
        physical_batches(np.arange(3), 0)
