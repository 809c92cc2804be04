"""User-level clipping (``dp.unit=user``): each user's gradient, the mean of their examples', is
clipped to C, by every implementation, exactly as a per-user reference computes it by hand.

Rows come user-major with k slots per user (unused slots masked). The fast implementations form a
user's gradient layer by layer from the taps (CNN patches, the encoder's embedding ids, Gemma's tied
embedding), so they are checked against per-example gradients averaged per user, then clipped.
Removing one user moves the sum by at most C, also when the user's examples nearly cancel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpbench.privacy import clipping
from tests.privacy.clipping.test_fast_exact import (
    assert_tree_close,
    encoder_problem,
    flat,
    gemma_problem,
    image_problem,
)

K = 3  # slots per user


def user_means(losses_fn, trainable, batch, mask, *args) -> list[dict]:
    """Each user's mean per-example gradient over their real rows (users without one left out)."""
    grads = flat(clipping.per_example_grads(losses_fn, trainable, batch, *args)[0])
    means = []
    for u in range(len(mask) // K):
        rows = [i for i in range(u * K, (u + 1) * K) if mask[i]]
        if rows:
            means.append({p: sum(g[i] for i in rows) / len(rows) for p, g in grads.items()})
    return means


def by_hand(means: list[dict], clip: float) -> dict:
    """Σ_u c_u ḡ_u with c_u = min(1, C/‖ḡ_u‖)."""
    total = {p: 0.0 for p in means[0]}
    for mean in means:
        factor = min(1.0, clip / norm(mean))
        total = {p: total[p] + factor * mean[p] for p in total}
    return total


def norm(tree: dict) -> float:
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in tree.values())))


def user_sum(losses_fn, trainable, batch, mask, clip, implementation, *args):
    fn = jax.jit(
        functools.partial(clipping.clipped_grad_sum, losses_fn, clipping=implementation, unit_size=K),
        static_argnums=3,
    )
    return fn(trainable, batch, jnp.asarray(mask), clip, *args)


def check_users(losses_fn, trainable, data, mask, *args):
    """Every implementation equals the per-user reference, with a clip norm (the median user norm)
    that clips some users and not others."""
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    means = user_means(losses_fn, trainable, batch, mask, *args)
    norms = [norm(m) for m in means]
    clip = float(np.median(norms))
    assert min(norms) < clip < max(norms), "the test needs clipped and unclipped users"
    reference = by_hand(means, clip)
    for implementation in clipping.CLIPPING_IMPLEMENTATIONS:
        grads_sum, stats = user_sum(losses_fn, trainable, batch, mask, clip, implementation, *args)
        assert_tree_close(grads_sum, reference)
        assert float(stats["units"]) == len(norms)
        assert float(stats["count"]) == float(np.sum(mask))
        assert float(stats["clipped_fraction_sum"]) == sum(n > clip for n in norms)


# Four users of 3 slots: 3 examples, 2 (one unused slot), 1, 3; rows padded from index 0.
MASK = np.array([1, 1, 1, 1, 1, 0, 1, 0, 0, 1, 1, 1], bool)


@pytest.fixture(scope="module")
def cnn():
    return image_problem(__import__("dpbench.models.cnn", fromlist=["CNN"]).CNN(num_classes=10), 12, 10, 3)


def test_cnn_user_clipping_equals_the_per_user_reference(cnn):
    check_users(*cnn, MASK)


def test_encoder_full_finetune_user_clipping_is_exact():
    losses_fn, trainable, frozen, arrays = encoder_problem("full", freeze_a=False)
    data = {k: v[np.array([0, 1, 2, 3, 4, 0, 5, 0, 0, 6, 7, 8])] for k, v in arrays.items()}
    check_users(losses_fn, trainable, data, MASK, frozen)


@pytest.mark.slow  # the CNN and the encoder's embedding ids cover the fast suite
def test_gemma_tied_embedding_user_clipping_is_exact():
    losses_fn, trainable, frozen, arrays = gemma_problem("full", response_positions=True)
    mask = np.array([1, 1, 0, 1, 1, 1], bool)  # two users: 2 examples and 3
    data = {k: v[np.array([0, 1, 0, 2, 3, 4])] for k, v in arrays.items()}
    check_users(losses_fn, trainable, data, mask, frozen)


@pytest.mark.parametrize("implementation", clipping.CLIPPING_IMPLEMENTATIONS)
def test_removing_one_user_moves_the_sum_by_at_most_c(cnn, implementation):
    losses_fn, params, data = cnn
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    clip = 0.05  # below every user's norm: every contribution is at the bound
    full, _ = user_sum(losses_fn, params, batch, MASK, clip, implementation)
    moves = []
    for user in range(len(MASK) // K):
        without = MASK.copy()
        without[user * K : (user + 1) * K] = False
        rest, _ = user_sum(losses_fn, params, batch, without, clip, implementation)
        diff = [a - b for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(rest))]
        moves.append(float(jnp.sqrt(sum(jnp.sum(jnp.square(d)) for d in diff))))
    assert max(moves) <= clip * (1 + 1e-5)
    assert min(moves) >= clip * (1 - 1e-4), "each user is clipped to exactly C here"


@pytest.mark.parametrize("implementation", clipping.CLIPPING_IMPLEMENTATIONS)
def test_a_user_with_a_nan_example_contributes_zero(cnn, implementation):
    losses_fn, params, data = cnn
    poisoned = {k: v.copy() for k, v in data.items()}
    poisoned["image"][4, 2, 2, 0] = np.nan  # the second user's second example
    poisoned["image"][5] = np.inf  # the second user's unused slot (masked)
    without = MASK.copy()
    without[3:6] = False
    got, stats = user_sum(
        losses_fn, params, {k: jnp.asarray(v) for k, v in poisoned.items()}, MASK, 0.5, implementation
    )
    expected, _ = user_sum(
        losses_fn, params, {k: jnp.asarray(v) for k, v in data.items()}, without, 0.5, implementation
    )
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(got))
    assert_tree_close(got, expected)
    assert float(stats["nonfinite_sum"]) == 2.0  # both real examples of the dropped user


@pytest.mark.parametrize("implementation", clipping.CLIPPING_IMPLEMENTATIONS)
def test_a_user_whose_examples_cancel_moves_the_sum_by_at_most_c(implementation):
    """Each user holds one sentence twice, with opposite labels, and a small head makes p near 0.5:
    the two gradients cancel to about 1e-3 of their size. A user's norm taken from the cross terms
    between its examples rounded to 1.002 C here; the formed gradient's norm stays at float32
    rounding, as per-example clipping's does."""
    losses_fn, trainable, frozen, arrays = encoder_problem("full", freeze_a=False)
    small_head = {p: v * 0.3 if p[0] == "classifier" else v for p, v in trainable.items()}
    data = {k: v[np.repeat(np.arange(4), 2)] for k, v in arrays.items()}
    data["label"] = np.tile([0, 1], 4)
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    mask, clip, k = np.ones(8, bool), 1e-5, 2
    fn = jax.jit(
        functools.partial(clipping.clipped_grad_sum, losses_fn, clipping=implementation, unit_size=k),
        static_argnums=3,
    )
    full, stats = fn(small_head, batch, jnp.asarray(mask), clip, frozen)
    assert float(stats["clipped_fraction_sum"]) == 4, "every user is clipped, to exactly C"
    for user in range(4):
        without = mask.copy()
        without[user * k : (user + 1) * k] = False
        rest, _ = fn(small_head, batch, jnp.asarray(without), clip, frozen)
        diff = [a - b for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(rest))]
        move = float(jnp.sqrt(sum(jnp.sum(jnp.square(d)) for d in diff)))
        assert move <= clip * (1 + 1e-4), (user, move / clip)
