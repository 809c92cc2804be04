"""Per-example clipping and Gaussian noise (JAX). Nothing here knows which model it clips.

A *losses function* ``losses_fn(trainable, batch, *args) -> (losses [B], aux)`` gives one loss per
example (``aux`` maps names to per-example arrays, e.g. ``correct``). The gradient methods below
turn it into a sum of (clipped) per-example gradients over the real rows of a physical batch;
padded rows (``mask == False``) contribute exactly zero to every sum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
LossesFn = Callable[..., tuple[jax.Array, dict]]


def _masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    # where, not multiply: a padded row's inf/NaN must not leak into the sum as 0 * inf.
    return jnp.sum(jnp.where(mask, values, 0))


def per_example_grads(
    losses_fn: LossesFn, trainable: PyTree, batch: dict, *args
) -> tuple[PyTree, jax.Array, dict]:
    """Gradients of each example's loss, stacked on a leading batch axis (vmap of grad)."""

    def one_example(params, example):
        example = jax.tree_util.tree_map(lambda x: x[None], example)
        losses, aux = losses_fn(params, example, *args)
        return losses[0], jax.tree_util.tree_map(lambda a: a[0], aux)

    def with_loss(params, example):
        (loss, aux), grads = jax.value_and_grad(one_example, has_aux=True)(params, example)
        return grads, loss, aux

    return jax.vmap(with_loss, in_axes=(None, 0))(trainable, batch)


def global_norms(stacked_grads: PyTree) -> jax.Array:
    """L2 norm over all parameters of each example's gradient: shape [B]."""
    squares = [
        jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1)
        for g in jax.tree_util.tree_leaves(stacked_grads)
    ]
    return jnp.sqrt(sum(squares))


def clipped_grad_sum(
    losses_fn: LossesFn, trainable: PyTree, batch: dict, mask: jax.Array, clip_norm: float, *args
) -> tuple[PyTree, dict]:
    """Sum over real rows of per-example gradients, each scaled to L2 norm <= ``clip_norm``.

    Adding or removing one example moves this sum by at most ``clip_norm``: that is the
    sensitivity the Gaussian noise is calibrated to.
    """
    grads, losses, aux = per_example_grads(losses_fn, trainable, batch, *args)
    norms = global_norms(grads)
    # min(1, C / ||g||), written so that a zero gradient gives factor 1, not NaN.
    factors = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))
    factors = jnp.where(mask, factors, 0.0)

    # Padded rows are copies of real examples (finite), so a zero factor removes them exactly.
    grad_sum = jax.tree_util.tree_map(lambda g: jnp.tensordot(factors.astype(g.dtype), g, axes=1), grads)
    stats = _stats(losses, aux, mask)
    stats["clipped_fraction_sum"] = _masked_sum((norms > clip_norm).astype(jnp.float32), mask)
    stats["grad_norm_sum"] = _masked_sum(norms, mask)
    return grad_sum, stats


def masked_grad_sum(
    losses_fn: LossesFn, trainable: PyTree, batch: dict, mask: jax.Array, *args
) -> tuple[PyTree, dict]:
    """Non-private: gradient of the summed loss over real rows (no per-example work)."""

    def summed_loss(params):
        losses, aux = losses_fn(params, batch, *args)
        return _masked_sum(losses, mask), (losses, aux)

    grad_sum, (losses, aux) = jax.grad(summed_loss, has_aux=True)(trainable)
    return grad_sum, _stats(losses, aux, mask)


def _stats(losses: jax.Array, aux: dict, mask: jax.Array) -> dict:
    stats = {"loss_sum": _masked_sum(losses, mask), "count": jnp.sum(mask.astype(jnp.float32))}
    for name, values in aux.items():
        stats[f"{name}_sum"] = _masked_sum(values.astype(jnp.float32), mask)
    return stats


def add_gaussian_noise(tree: PyTree, key: jax.Array, stddev: float | jax.Array) -> PyTree:
    """``tree + N(0, stddev^2)`` independently on every coordinate (one key per leaf)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noisy = [x + stddev * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, noisy)
