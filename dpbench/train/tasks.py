"""Tasks supply the per-example loss and the evaluation; they know neither privacy nor data loading.

``losses_fn(trainable, batch, frozen) -> (losses [B], aux)`` is what the gradient methods clip.
The dataset config declares its task (``dataset.task``); :data:`TASKS` maps that name to a class
with ``prepare(dataset, bundle, cfg)`` (the arrays the model consumes, and what preparation did to
each split) and ``build(bundle, dataset, cfg)``; for ``audit=canary`` it declares ``CANARIES`` (the
dataset's input -> its canary type, ``dpbench.privacy.canaries``) and turns them into training arrays
(``prepare_canaries``). A new task is one class plus one entry here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpbench.errors import ConfigError
from dpbench.train import sharding
from dpbench.train.loop import merge_params


class Task(Protocol):
    """What the runner needs of a task (a class of :data:`TASKS`, built by its ``build``)."""

    losses_fn: Callable  # (trainable, batch, frozen) -> (per-example losses [B], aux)

    def evaluate(self, trainable: dict, frozen: dict, arrays: dict, batch_size: int, mesh) -> dict: ...


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
    # audit=canary: the canaries (dpbench.privacy.canaries) that fit each input of this task.
    CANARIES = {"image": "image", "text": "sentence"}

    def __init__(self, apply_fn: Callable, label_key: str = "label"):
        self.apply_fn = apply_fn
        self.label_key = label_key
        self._eval_sums = jax.jit(self._sums)

    @classmethod
    def build(cls, bundle, dataset, cfg) -> ClassificationTask:
        del dataset, cfg
        return cls(bundle.apply_fn)

    @staticmethod
    def prepare(dataset, bundle, cfg) -> tuple[dict, dict, dict]:
        """Train/eval arrays (text is tokenised with the model's tokenizer) and truncation per split."""
        if "text" not in dataset.train:
            return dataset.train, dataset.eval, {}
        from dpbench.data import text

        splits, stats = {}, {}
        for split_name, split in (("train", dataset.train), ("eval", dataset.eval)):
            splits[split_name], stats[split_name] = text.tokenize_classification(
                split["text"], split["label"], bundle.tokenizer, cfg.dataset.max_length
            )
        return splits["train"], splits["eval"], {"truncated": stats}

    @staticmethod
    def prepare_canaries(canaries: dict, dataset, bundle, cfg) -> dict:
        """The canaries as training arrays (sentences tokenised like the training split, whole)."""
        del dataset
        if "text" not in canaries:
            return canaries
        from dpbench.data import text

        arrays, stats = text.tokenize_classification(
            canaries["text"], canaries["label"], bundle.tokenizer, cfg.dataset.max_length
        )
        if stats["num_truncated"]:
            raise ConfigError(
                f"audit=canary: the canary sentences need {stats['longest']} tokens and "
                f"dataset.max_length={cfg.dataset.max_length} cuts {stats['num_truncated']} of them; "
                f"choose dataset.max_length >= {stats['longest']}"
            )
        return arrays

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


# dataset.task -> (module, class); modules are imported only when chosen.
TASKS: dict[str, tuple[str, str]] = {
    "classification": ("dpbench.train.tasks", "ClassificationTask"),
    "summarization": ("dpbench.train.summarization", "SummarizationTask"),
}


def task_class(name: str) -> Any:
    if name not in TASKS:
        raise ConfigError(f"dataset.task={name!r} is not allowed; choose one of {', '.join(TASKS)}")
    module_name, class_name = TASKS[name]
    return getattr(importlib.import_module(module_name), class_name)


def canary_type(task_name: str, dataset_input: str) -> str:
    """The canary type that task ``task_name`` declares for ``dataset_input``; a one-line error if none.

    >>> canary_type("classification", "text")
    'sentence'
    """
    declared = getattr(task_class(task_name), "CANARIES", {})
    if dataset_input not in declared:
        has = sorted(
            f"{name} ({', '.join(task_class(name).CANARIES)})"
            for name in TASKS
            if getattr(task_class(name), "CANARIES", None)
        )
        raise ConfigError(
            f"audit=canary is not allowed for dataset.task={task_name} on {dataset_input} input: it "
            f"declares no canary type; choose audit=none, or a task that has one: {', '.join(has)}"
        )
    return declared[dataset_input]
