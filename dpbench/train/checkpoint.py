"""Checkpoints of a run (orbax-checkpoint): trainable parameters, optimizer state, step, metadata.

A checkpoint is ``<run dir>/checkpoints/<step>/`` with two items: ``state`` (every array leaf of
(trainable, (optimizer state, noise state)), in ``jax.tree_util`` order) and ``meta`` (JSON: the step, the
mechanism, the config, how batches and noise keys derive from the seed, and the leaf structure).
Frozen parameters are not stored: they are rebuilt from the config and the seed exactly.

orbax writes each checkpoint to a temporary folder and renames it when complete, so ``kill -9``
during a save leaves the previous checkpoint as the latest; saves are synchronous (the step after
a save starts only once it is on disk).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import jax

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
AUTO_WALL_SECONDS = 600.0  # runner.checkpoint_every=null: about every 10 minutes of training...
AUTO_FRACTION = 0.1  # ...and at least every 10% of the run


def _structure(tree) -> dict:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return {"treedef": str(treedef), "leaves": [[list(x.shape), str(x.dtype)] for x in leaves]}


class Checkpoints:
    """The checkpoints of one run folder; keeps the newest ``keep``."""

    def __init__(self, run_dir: str | Path, keep: int, private: bool = False):
        self.directory = (Path(run_dir) / CHECKPOINT_DIR).resolve()
        self.keep = keep
        # private: the folder is owner-only (0700), like the privacy secret beside it: the saved
        # noise state (key, correlated-noise buffers) would let a reader subtract the noise.
        self.private = private
        self._manager = None

    def _open(self):
        if self._manager is None:
            if self.private:
                self.directory.mkdir(parents=True, exist_ok=True)
                self.directory.chmod(0o700)
            import orbax.checkpoint as ocp

            # orbax logs every save and close at INFO through absl; the run logs its own checkpoints.
            logging.getLogger("absl").setLevel(logging.WARNING)

            self._ocp = ocp
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.keep, create=True, enable_async_checkpointing=False
            )
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "meta")
            )
        return self._manager

    def latest_step(self) -> int | None:
        if not self.directory.is_dir():
            return None
        return self._open().latest_step()

    def all_steps(self) -> list[int]:
        return list(self._open().all_steps()) if self.directory.is_dir() else []

    def save(self, step: int, trainable: dict, saved_state, meta: dict) -> None:
        manager = self._open()
        leaves = jax.tree_util.tree_leaves((trainable, saved_state))
        items = {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}
        meta = {**meta, "step": step, "structure": _structure((trainable, saved_state))}
        ocp = self._ocp
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        manager = self._open()
        ocp = self._ocp
        return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def restore(self, step: int, trainable: dict, saved_state) -> tuple[dict, object]:
        """(trainable, saved_state) of checkpoint ``step``, shaped and sharded like the given ones."""
        manager = self._open()
        ocp = self._ocp
        leaves, treedef = jax.tree_util.tree_flatten((trainable, saved_state))
        abstract = {
            f"{i:05d}": jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
            for i, leaf in enumerate(leaves)
        }
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        values = [restored.state[f"{i:05d}"] for i in range(len(leaves))]
        return jax.tree_util.tree_unflatten(treedef, values)

    def restore_leading(self, step: int, count: int) -> list:
        """The first ``count`` saved leaves of checkpoint ``step`` as host arrays: the trainable
        parameters (saved first, in ``jax.tree_util`` order), without knowing the optimizer state."""
        manager = self._open()
        ocp = self._ocp
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        return [jax.device_get(restored.state[f"{i:05d}"]) for i in range(count)]

    def clear(self) -> None:
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None


def structure_matches(meta: dict, trainable: dict, saved_state) -> bool:
    """Does checkpoint metadata describe the same leaves (tree, shapes, dtypes) as these?"""
    return meta.get("structure") == _structure((trainable, saved_state))


class Cadence:
    """When to checkpoint: every ``every`` logical steps; ``None`` = about every 10 minutes of
    training and at least every 10% of the run; ``0`` = only where required (before an
    evaluation, at the last step, on a stop)."""

    def __init__(self, every: int | None, total_steps: int):
        self.every = every
        self.fraction_steps = max(1, math.ceil(AUTO_FRACTION * total_steps))
        self.last_save = time.monotonic()

    def due(self, step: int) -> bool:
        if self.every is None:
            return step % self.fraction_steps == 0 or time.monotonic() - self.last_save >= AUTO_WALL_SECONDS
        return self.every > 0 and step % self.every == 0

    def saved(self) -> None:
        self.last_save = time.monotonic()
