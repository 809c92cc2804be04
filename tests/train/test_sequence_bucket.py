"""compute.sequence_bucket: shorter padding per physical batch, same logical batch and same sums."""

import jax
import numpy as np
import pytest

from dpbench import config as config_lib
from dpbench import experiment
from dpbench.train import sharding
from dpbench.train.loop import gather_chunks
from tests.helpers import TINY, compose_config


def random_text_arrays(rng, num_examples=50, width=24):
    lengths = rng.integers(1, width + 1, size=num_examples)
    attention_mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
    input_ids = rng.integers(5, 100, size=(num_examples, width)) * attention_mask
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "label": rng.integers(0, 2, num_examples),
    }


@pytest.mark.parametrize("bucket", [1, 4, 7, 24, 64])
def test_buckets_keep_every_example_once_and_cut_only_padding(bucket):
    rng = np.random.default_rng(bucket)
    arrays = random_text_arrays(rng)
    arrays["row"] = np.arange(50)
    lengths = arrays["attention_mask"].sum(1)
    indices = rng.choice(50, size=37, replace=False)
    chunks = gather_chunks(arrays, indices, 8, sequence_bucket=bucket)
    assert len(chunks) == len(gather_chunks(arrays, indices, 8))  # as many physical batches as unbucketed

    seen = []
    for batch, mask in chunks:
        rows = batch["row"][mask]
        width = batch["attention_mask"].shape[1]
        assert batch["input_ids"].shape == batch["attention_mask"].shape and len(mask) == 8
        assert width == 24 or width % bucket == 0
        assert width >= lengths[rows].max() > width - bucket or width == 24  # the smallest bucket that fits
        # only padding is cut: every real row keeps all its tokens
        np.testing.assert_array_equal(batch["input_ids"][mask], arrays["input_ids"][rows, :width])
        np.testing.assert_array_equal(batch["attention_mask"][mask].sum(1), lengths[rows])
        seen.extend(rows.tolist())
    assert sorted(seen) == sorted(indices.tolist())


def test_without_an_attention_mask_nothing_changes():
    arrays = {"image": np.arange(40, dtype=np.float32).reshape(10, 2, 2), "label": np.arange(10)}
    for (a, m), (b, n) in zip(
        gather_chunks(arrays, np.arange(7), 4, sequence_bucket=2),
        gather_chunks(arrays, np.arange(7), 4),
        strict=True,
    ):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(m, n)


@pytest.mark.parametrize("clipping", ["per_example", "bookkeeping"])
def test_bucketed_clipped_sum_equals_padded_sum(tmp_path, clipping):
    """The tiny encoder's clipped sum over a logical batch, bucketed vs padded to max_length."""
    cfg = compose_config(
        [*TINY, "model=tiny_encoder", "dataset=sst2_rt", "dataset.max_length=128", f"dp.clipping={clipping}"],
        tmp_path,
    )
    exp = experiment.build(cfg)
    indices = np.random.default_rng(0).permutation(len(exp.train_arrays["label"]))

    def clipped_sum(bucket):
        # as Trainer.logical_step accumulates them (jitted, one compile per bucket width)
        acc = None
        for batch, mask in gather_chunks(exp.train_arrays, indices, 8, sequence_bucket=bucket):
            batch, mask = sharding.put_batch(batch, exp.mesh), sharding.put_rows(mask, exp.mesh)
            if acc is None:
                acc = exp.trainer.zero_accumulator(exp.state.trainable, exp.frozen, batch, mask)
            acc = exp.trainer.accumulate(acc, exp.state.trainable, exp.frozen, batch, mask)
        return jax.device_get(acc)

    widths = {b["attention_mask"].shape[1] for b, _ in gather_chunks(exp.train_arrays, indices, 8, 64)}
    assert min(widths) < 128  # the fixture really has batches shorter than max_length
    (padded, padded_stats), (bucketed, bucketed_stats) = clipped_sum(0), clipped_sum(64)
    assert padded_stats["count"] == bucketed_stats["count"] == len(indices)
    for path in padded:
        np.testing.assert_allclose(bucketed[path], padded[path], rtol=2e-5, atol=1e-6, err_msg=str(path))


def test_negative_bucket_and_non_text_data_are_refused(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="compute.sequence_bucket=-1"):
        config_lib.validate_static(compose_config([*TINY, "compute.sequence_bucket=-1"], tmp_path))
    with pytest.raises(config_lib.ConfigError, match="compute.sequence_bucket=16 needs token sequences"):
        experiment.build(compose_config([*TINY, "compute.sequence_bucket=16"], tmp_path))
