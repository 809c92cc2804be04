"""The privacy unit (``dp.unit``): what one neighbouring dataset adds or removes (host-side NumPy).

``example`` (the default) protects one training example. ``user`` protects everything one user
contributed: batch selection samples *users* (the sampler, σ, δ and the accountant all count users),
a sampled user brings up to ``dp.max_examples_per_user`` of their examples (the rest are dropped
before training, and the log says how many), and the clipping code clips each user's gradient, the
mean of their examples', to C (``dpbench.privacy.clipping``, ``unit_size``; every implementation
forms each user's gradient to take its norm). Removing a user then moves the clipped sum by at most C,
which is what the noise is calibrated to.

Rows reach the device user-major, ``k = dp.max_examples_per_user`` slots per user (unused slots
masked), so a user is never split across physical batches or devices.

Users come from a column of the training data (``dataset.user_key``), or, where the data has none
(every offline dataset here), from a seeded grouping (``dataset.user_key=synthetic``,
``dataset.synthetic_users`` users), which the record labels as such.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from dpbench.errors import ConfigError

log = logging.getLogger("dpbench")

UNITS = ("example", "user")
SYNTHETIC = "synthetic"


@dataclasses.dataclass(frozen=True)
class UserUnits:
    """Each user's example indices: ``slots[u]`` holds up to ``k`` of them, then -1."""

    slots: np.ndarray  # [users, k] int64
    source: str  # where the users came from, e.g. "column author" or "synthetic: seeded grouping"
    dropped: int  # examples beyond max_examples_per_user, never used

    @property
    def num_users(self) -> int:
        return len(self.slots)

    @property
    def max_examples_per_user(self) -> int:
        return self.slots.shape[1]

    @property
    def num_examples(self) -> int:
        return int(np.sum(self.slots >= 0))

    def rows(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Example rows (unused slots as row 0) and their mask, ``k`` per user, of a batch of users.

        >>> units = group_by_user(np.array([7, 3, 7, 7, 3]), max_examples_per_user=2, source="test")
        >>> rows, mask = units.rows(np.array([1, 0]))  # users in sorted-id order: 3 then 7
        >>> rows.tolist(), mask.tolist()
        ([0, 2, 1, 4], [True, True, True, True])
        >>> units.dropped
        1
        """
        slots = self.slots[np.asarray(users, dtype=np.int64)].reshape(-1)
        return np.where(slots >= 0, slots, 0), slots >= 0

    def describe(self) -> dict:
        """What the record and the checkpoints say about the unit."""
        return {
            "unit": "user",
            "users": self.num_users,
            "max_examples_per_user": self.max_examples_per_user,
            "examples_used": self.num_examples,
            "examples_dropped": self.dropped,
            "users_from": self.source,
        }


def group_by_user(user_ids: np.ndarray, max_examples_per_user: int, source: str) -> UserUnits:
    """Group example indices by user id, keeping each user's first ``max_examples_per_user``
    examples in data order (a choice that reads no private value beyond the ids themselves).

    >>> group_by_user(np.array(["b", "a", "b"]), 4, "test").slots.tolist()
    [[1, -1, -1, -1], [0, 2, -1, -1]]
    """
    if max_examples_per_user < 1:
        raise ValueError(f"max_examples_per_user must be >= 1, got {max_examples_per_user}")
    _, inverse = np.unique(np.asarray(user_ids), return_inverse=True)
    num_users = int(inverse.max()) + 1 if len(inverse) else 0
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=num_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if num_users else np.zeros(0, np.int64)
    slots = np.full((num_users, max_examples_per_user), -1, dtype=np.int64)
    position = np.arange(len(order)) - starts[inverse[order]]
    kept = position < max_examples_per_user
    slots[inverse[order][kept], position[kept]] = order[kept]
    return UserUnits(slots, source, dropped=int(np.sum(~kept)))


def synthetic_user_ids(num_examples: int, num_users: int, seed: int) -> np.ndarray:
    """A seeded grouping of ``num_examples`` examples into ``num_users`` users (for data that has no
    user column): a random permutation dealt round-robin, so users differ in size by at most one.

    >>> np.bincount(synthetic_user_ids(10, 3, seed=0)).tolist()
    [4, 3, 3]
    """
    order = np.random.default_rng(seed).permutation(num_examples)
    ids = np.empty(num_examples, dtype=np.int64)
    ids[order] = np.arange(num_examples) % num_users
    return ids


def check_settings(cfg) -> None:
    """``dp.unit``, ``dp.max_examples_per_user``, ``dataset.user_key`` and what user-level DP does not
    support yet, before anything loads."""
    unit = cfg.dp.get("unit", "example")
    if unit not in UNITS:
        raise ConfigError(f"dp.unit={unit!r} is not allowed; choose one of {', '.join(UNITS)}")
    if unit == "example":
        return
    key = cfg.dataset.get("user_key")
    if not key:
        raise ConfigError(
            "dp.unit=user needs dataset.user_key: a column of the training data holding user ids, or "
            "dataset.user_key=synthetic with dataset.synthetic_users=N (a seeded grouping, labelled so)"
        )
    if key == SYNTHETIC and not (cfg.dataset.get("synthetic_users") or 0) >= 1:
        raise ConfigError(
            f"dataset.user_key=synthetic needs dataset.synthetic_users >= 1 "
            f"(got {cfg.dataset.get('synthetic_users')})"
        )
    k = cfg.dp.get("max_examples_per_user", 0)
    if not k >= 1:
        raise ConfigError(f"dp.max_examples_per_user={k} is not allowed; choose an integer >= 1")
    if cfg.compute.physical_batch_size % k:
        raise ConfigError(
            f"compute.physical_batch_size={cfg.compute.physical_batch_size} must be a multiple of "
            f"dp.max_examples_per_user={k} (a user's examples never straddle two physical batches)"
        )
    if cfg.dp.adaptive_clip.get("target_quantile") is not None:
        raise ConfigError(
            "dp.adaptive_clip with dp.unit=user is not supported (the count would be of users); "
            "use dp.adaptive_clip.target_quantile=null"
        )
    if cfg.audit.name != "none":
        raise ConfigError(
            f"audit={cfg.audit.name} inserts example-level canaries; with dp.unit=user use audit=none"
        )


def build_units(cfg, train: dict[str, np.ndarray], num_devices: int = 1) -> UserUnits | None:
    """The users of the training split (``dp.unit=user``), and the user column removed from ``train``
    (it is not a model input); None for ``dp.unit=example``."""
    if cfg.dp.get("unit", "example") != "user":
        return None
    k, physical = int(cfg.dp.max_examples_per_user), cfg.compute.physical_batch_size
    if physical % num_devices == 0 and (physical // num_devices) % k:
        raise ConfigError(
            f"compute.physical_batch_size={physical} over {num_devices} devices gives "
            f"{physical // num_devices} rows per device, not a multiple of dp.max_examples_per_user={k}: "
            "a user's examples must stay "
            f"on one device; choose compute.physical_batch_size as a multiple of {num_devices * k}"
        )
    key = cfg.dataset.user_key
    num_examples = len(next(iter(train.values())))
    if key == SYNTHETIC:
        users = int(cfg.dataset.synthetic_users)
        if users > num_examples:
            raise ConfigError(
                f"dataset.synthetic_users={users} is more than the {num_examples} training examples; "
                f"choose dataset.synthetic_users in [1, {num_examples}]"
            )
        ids = synthetic_user_ids(num_examples, users, int(cfg.dataset.seed))
        source = f"synthetic: a seeded grouping (dataset.seed={cfg.dataset.seed}) into {users} users"
    elif key in train:
        ids, source = train.pop(key), f"column {key}"
    else:
        raise ConfigError(
            f"dataset.user_key={key}: the training data of {cfg.dataset.name} has no such column "
            f"(it has {', '.join(sorted(train))}); "
            "use dataset.user_key=synthetic with dataset.synthetic_users=N"
        )
    units = group_by_user(ids, int(cfg.dp.max_examples_per_user), source)
    log.info(
        "privacy unit: user (%d users from %s; at most %d examples each, %d examples dropped)",
        *(units.num_users, source, units.max_examples_per_user, units.dropped),
    )
    return units
