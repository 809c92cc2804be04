"""dp.unit=user through the runner: users are sampled and counted, the record and summary name the
unit, a user's rows stay together, and a resumed run continues bit-identically."""

import numpy as np
import pytest

from dpbench import experiment
from dpbench.privacy import units as units_lib
from dpbench.privacy.randomness import SECRET_FILE
from dpbench.train.loop import gather_chunks
from dpbench.train.preemption import Preempted
from tests.helpers import TINY, compose_config

# 64 MNIST examples dealt to 16 synthetic users of 4; 4 users expected per logical batch.
USERS = [
    *TINY,
    "runner.steps=3",
    "runner.batch_size=4",
    "dp.unit=user",
    "dataset.user_key=synthetic",
    "dataset.synthetic_users=16",
    "dp.max_examples_per_user=4",
    "accountant=rdp",
]


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("users")
    return experiment.run(compose_config(USERS, out)), out


def test_the_mechanism_counts_users_and_the_record_names_the_unit(user_run, capsys):
    record, _ = user_run
    unit = record["privacy"]["unit"]
    assert unit["unit"] == "user" and unit["users"] == 16 and unit["max_examples_per_user"] == 4
    assert unit["examples_used"] == 64 and unit["examples_dropped"] == 0
    assert "synthetic" in unit["users_from"]  # labelled as a seeded grouping, not real users
    # n and q of the accounting are users: 4 expected of 16.
    assert record["train_examples"] == 16 and record["sampling_rate"] == pytest.approx(0.25)
    assert record["privacy"]["mechanism"]["sampler"]["num_examples"] == 16


def test_an_example_level_run_says_so(tmp_path):
    record = experiment.run(compose_config([*TINY, "runner.steps=1"], tmp_path))
    assert record["privacy"]["unit"] == {"unit": "example"}


def test_a_resumed_user_level_run_is_bit_identical(user_run, tmp_path):
    reference, reference_dir = user_run
    cfg = compose_config([*USERS, f"dp.secret_file={reference_dir / SECRET_FILE}"], tmp_path)
    with pytest.raises(Preempted):
        experiment.run(cfg, stop_after=1)
    resumed = experiment.run(cfg)
    assert resumed["resumed_at"] == [1]
    assert resumed["final_params_sha256"] == reference["final_params_sha256"]


def test_a_changed_user_cap_refuses_to_resume(user_run, tmp_path):
    _, reference_dir = user_run
    cfg = compose_config([*USERS, f"dp.secret_file={reference_dir / SECRET_FILE}"], tmp_path)
    with pytest.raises(Preempted):
        experiment.run(cfg, stop_after=1)
    changed = compose_config(
        [*USERS, "dp.max_examples_per_user=2", f"dp.secret_file={reference_dir / SECRET_FILE}"], tmp_path
    )
    with pytest.raises(Exception, match="dp.max_examples_per_user"):
        experiment.run(changed)


def test_users_are_capped_and_their_rows_stay_together_in_order():
    units = units_lib.group_by_user(np.array([0, 1, 0, 0, 2, 1, 0]), max_examples_per_user=2, source="t")
    assert units.dropped == 2 and units.num_users == 3
    rows, mask = units.rows(np.array([2, 0, 1]))
    assert rows.tolist() == [4, 0, 0, 2, 1, 5] and mask.tolist() == [True, False, True, True, True, True]
    # With sequence bucketing, rows of a user are not reordered by length (a unit stays whole).
    arrays = {"attention_mask": np.tril(np.ones((7, 6), int))[::-1].copy(), "label": np.arange(7)}
    chunks = gather_chunks(arrays, rows, 4, sequence_bucket=2, mask=mask)
    assert [c[0]["label"].tolist() for c in chunks] == [[4, 0, 0, 2], [1, 5, 0, 0]]
    assert [c[1].tolist() for c in chunks] == [[True, False, True, True], [True, True, False, False]]
