"""Tasks supply the per-example loss and the evaluation; they know neither privacy nor data loading.

``losses_fn(trainable, batch, frozen) -> (losses [B], aux)`` is what the gradient methods clip.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpbench.train import sharding
from dpbench.train.loop import merge_params


def padded_chunks(arrays: dict[str, np.ndarray], batch_size: int):
    """Fixed-size chunks over a whole split, the last padded; yields (batch, mask)."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        mask = idx < n
        idx = np.where(mask, idx, 0)
        yield {k: v[idx] for k, v in arrays.items()}, mask


class ClassificationTask:
    """Cross-entropy on integer ``label``; accuracy as the metric."""

    name = "classification"

    def __init__(self, apply_fn: Callable, label_key: str = "label"):
        self.apply_fn = apply_fn
        self.label_key = label_key
        self._eval_sums = jax.jit(self._sums)

    def losses_fn(self, trainable, batch, frozen):
        logits = self.apply_fn(merge_params(trainable, frozen), batch)
        labels = batch[self.label_key]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        return losses, {"correct": jnp.argmax(logits, -1) == labels}

    def _sums(self, trainable, frozen, batch, mask):
        losses, aux = self.losses_fn(trainable, batch, frozen)
        return jnp.sum(jnp.where(mask, losses, 0)), jnp.sum(jnp.where(mask, aux["correct"], 0))

    def evaluate(self, trainable, frozen, arrays: dict[str, np.ndarray], batch_size: int, mesh) -> dict:
        loss_sum, correct, n = 0.0, 0, 0
        for batch, mask in padded_chunks(arrays, batch_size):
            batch = sharding.put_batch(batch, mesh)
            mask_dev = jax.device_put(mask, sharding.batch_sharding(mesh))
            batch_loss, batch_correct = self._eval_sums(trainable, frozen, batch, mask_dev)
            loss_sum += float(batch_loss)
            correct += int(batch_correct)
            n += int(mask.sum())
        return {"eval/loss": loss_sum / n, "eval/accuracy": correct / n, "eval/examples": n}
