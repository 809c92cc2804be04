"""Privacy randomness: where batch selection and noise get their randomness, and who may know it.

Two kinds of randomness in a run:

- **Model randomness** (initialisation, held-out split, FFA's random A, evaluation order) follows
  ``runner.seed``, which every record publishes.
- **Privacy randomness** (which examples each logical step draws, and the Gaussian noise) must be
  unpredictable from anything published: Poisson amplification assumes the adversary does not know
  which steps held the target, and the noise only hides the clipped sum if it cannot be regenerated.

``dp.randomness`` chooses where the privacy randomness comes from:

- ``secret`` (default for DP runs): process 0 draws a 256-bit secret from the operating system,
  broadcasts it to every process (which compare a hash of it), and stores it in
  ``<run dir>/privacy_secret`` readable only by its owner, beside the checkpoints and never in
  anything published. A resume reads it back (bit-identical); ``dp.secret_file=PATH`` reuses a
  stored secret, so its owner can reproduce a run bit for bit. Every job of a sweep draws its own.
- ``seeded``: the secret is a hash of ``runner.seed`` *and* the whole mechanism (σ, q, steps, C,
  δ, ...), so jobs that differ only in ε never share noise; reproducible from the record, for tests
  and debugging. The (ε, δ) claim then does not hold against anyone who knows ``runner.seed``.

From the secret, batch selection gets a 256-bit NumPy ``SeedSequence`` entropy and the noise a
threefry key, each through SHA-256 with its own label, so neither stream reveals the other.

Formal guarantee: with ``secret``, the published artifacts (results.json, history.jsonl, W&B, the
logs, the report) contain no function of the secret; the checkpoint metadata holds a fingerprint
(a salted SHA-256) only so that a resume can refuse a different secret.

>>> a = PrivacyRandomness.seeded(0, {"noise_multiplier": 1.0})
>>> b = PrivacyRandomness.seeded(0, {"noise_multiplier": 2.0})
>>> a.batch_entropy() != b.batch_entropy()  # jobs that differ only in σ share no randomness
True
>>> a.fingerprint() == PrivacyRandomness.seeded(0, {"noise_multiplier": 1.0}).fingerprint()
True
>>> len(PrivacyRandomness.draw().secret)
32
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

MODES = ("secret", "seeded")
SECRET_BYTES = 32
SECRET_FILE = "privacy_secret"


class SecretError(ValueError):
    """The stored secret is missing, unreadable or not the one a checkpoint was trained with."""


def _derive(secret: bytes, label: bytes) -> bytes:
    return hashlib.sha256(b"dpbench/" + label + b"/" + secret).digest()


@dataclasses.dataclass(frozen=True)
class PrivacyRandomness:
    """The per-run secret that batch selection and noise are derived from (never published)."""

    mode: str
    secret: bytes = dataclasses.field(repr=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"dp.randomness={self.mode!r} is not allowed; choose one of {', '.join(MODES)}")
        if len(self.secret) != SECRET_BYTES:
            raise ValueError(f"a privacy secret has {SECRET_BYTES} bytes, got {len(self.secret)}")

    @classmethod
    def draw(cls) -> PrivacyRandomness:
        """A fresh secret from the operating system's entropy."""
        return cls("secret", os.urandom(SECRET_BYTES))

    @classmethod
    def seeded(cls, seed: int, mechanism: dict) -> PrivacyRandomness:
        """A secret that is a function of ``runner.seed`` and the whole mechanism description."""
        text = json.dumps({"runner.seed": int(seed), "mechanism": mechanism}, sort_keys=True, default=str)
        return cls("seeded", hashlib.sha256(text.encode()).digest())

    def batch_entropy(self) -> int:
        """256-bit entropy for the samplers' ``SeedSequence([entropy, stream, step])``."""
        return int.from_bytes(_derive(self.secret, b"batches"), "big")

    def tuning_entropy(self) -> int:
        """256-bit entropy for ``python -m dpbench.tune``: the number of trials K, each trial's
        candidate and the noise on its score (``SeedSequence([entropy, stream, ...])``)."""
        return int.from_bytes(_derive(self.secret, b"tuning"), "big")

    def noise_key_data(self) -> np.ndarray:
        """Raw threefry key data (two uint32) for the noise; ``fold_in(key, step)`` per logical step."""
        return np.frombuffer(_derive(self.secret, b"noise")[:8], dtype=np.uint32).copy()

    def count_noise_key_data(self) -> np.ndarray:
        """Raw threefry key data for the noise on adaptive clipping's count (its own stream)."""
        return np.frombuffer(_derive(self.secret, b"clip_count")[:8], dtype=np.uint32).copy()

    def noise_key(self):
        import jax.numpy as jnp

        return jnp.asarray(self.noise_key_data())

    def fingerprint(self) -> str:
        """A salted hash that identifies the secret (checkpoint metadata only, to refuse a wrong one)."""
        return _derive(self.secret, b"fingerprint").hex()[:32]

    def describe(self) -> dict:
        """What a record may say about the privacy randomness (nothing derived from the secret)."""
        if self.mode == "secret":
            return {
                "privacy_randomness": "secret",
                "batches": "SeedSequence([SHA-256(secret, 'batches'), stream, step]) (numpy)",
                "noise": "fold_in(SHA-256(secret, 'noise') as a threefry key, step)",
                "secret": f"256 bits from process 0's OS entropy, in <run dir>/{SECRET_FILE} (owner-only); "
                "never published",
                "bit_reproducible": "with the secret file (dp.secret_file)",
            }
        return {
            "privacy_randomness": "seeded",
            "batches": "SeedSequence([SHA-256(SHA-256(runner.seed, mechanism), 'batches'), stream, step])",
            "noise": "fold_in(SHA-256(SHA-256(runner.seed, mechanism), 'noise') as a threefry key, step)",
            "bit_reproducible": True,
            "warning": SEEDED_WARNING,
        }


SEEDED_WARNING = (
    "dp.randomness=seeded: batch selection and noise are a function of runner.seed, which the record "
    "publishes; the (ε, δ) claim does not hold against anyone who knows runner.seed"
)


def write_secret(path: str | Path, randomness: PrivacyRandomness) -> Path:
    """Store the secret (hex) in a file only its owner can read or write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(randomness.secret.hex() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)
    return path


def read_secret(path: str | Path, setting: str) -> PrivacyRandomness:
    """The secret stored in ``path``; ``setting`` names what pointed there (for the one-line error)."""
    path = Path(path)
    if not path.is_file():
        raise SecretError(f"{setting}: the privacy secret file {path} does not exist")
    text = path.read_text().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != SECRET_BYTES:
        raise SecretError(
            f"{setting}: {path} does not hold a privacy secret ({2 * SECRET_BYTES} hex digits, as dpbench "
            "writes it)"
        )
    return PrivacyRandomness("secret", secret)


def share_across_processes(randomness: PrivacyRandomness) -> PrivacyRandomness:
    """Process 0's secret on every process, checked by comparing a hash on all of them.

    Several hosts must draw one noise and one batch per logical step; a secret drawn on each process
    would give each its own noise (diverging parameters). One process: returned as is.
    """
    import jax

    if jax.process_count() == 1:
        return randomness
    from jax.experimental import multihost_utils

    mode_code = np.array([MODES.index(randomness.mode)], np.int32)
    payload = np.frombuffer(randomness.secret, dtype=np.uint8)
    shared = multihost_utils.broadcast_one_to_all((payload, mode_code))
    mode = MODES[int(np.asarray(shared[1])[0])]
    received = PrivacyRandomness(mode, np.asarray(shared[0], np.uint8).tobytes())
    digest = np.frombuffer(bytes.fromhex(received.fingerprint()), dtype=np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(digest))
    if not np.all(everyone == everyone[0]):
        raise RuntimeError("the processes hold different privacy secrets after the broadcast")
    return received
