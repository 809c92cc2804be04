"""Clipping, padding and noise: the properties the DP guarantee rests on."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from dpbench.data.sampling import physical_batches
from dpbench.models.cnn import CNN
from dpbench.privacy import clipping
from dpbench.privacy.methods import GradientMethod

CLIP = 0.5


@pytest.fixture(scope="module")
def cnn_problem():
    module = CNN(num_classes=10)
    rng = np.random.default_rng(0)
    # Small images keep compile and run time low; the CNN is size-agnostic.
    images = rng.uniform(size=(12, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 10, size=12).astype(np.int32)
    params = module.init(jax.random.PRNGKey(0), images[:1])["params"]

    def losses_fn(params, batch):
        logits = module.apply({"params": params}, batch["image"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return losses, {"correct": jnp.argmax(logits, -1) == batch["label"]}

    return losses_fn, params, {"image": images, "label": labels}


def tree_norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(tree))))


def tree_diff(a, b):
    return jax.tree_util.tree_map(lambda x, y: x - y, a, b)


def clipped_sum(problem, indices, physical_size, clip=CLIP):
    """Sum of clipped gradients of the examples ``indices`` cut into padded physical batches."""
    losses_fn, params, data = problem
    total = None
    clipped = jax.jit(functools.partial(clipping.clipped_grad_sum, losses_fn), static_argnums=3)
    for idx, mask in physical_batches(np.asarray(indices), physical_size):
        batch = {k: v[idx] for k, v in data.items()}
        s, _ = clipped(params, batch, jnp.asarray(mask), clip)
        total = s if total is None else jax.tree_util.tree_map(jnp.add, total, s)
    return total


def test_each_clipped_gradient_has_norm_at_most_c(cnn_problem):
    losses_fn, params, data = cnn_problem
    grads, _, _ = jax.jit(functools.partial(clipping.per_example_grads, losses_fn))(params, data)
    raw = clipping.global_norms(grads)
    assert float(raw.min()) > CLIP, "test needs gradients larger than C so that clipping acts"
    for i in range(4):
        g = clipped_sum(cnn_problem, [i], 1)
        assert tree_norm(g) == pytest.approx(CLIP, rel=1e-5)


@pytest.mark.parametrize("removed", [0, 5, 10])
@pytest.mark.parametrize("physical_size", [4, 12])
def test_add_remove_sensitivity_is_at_most_c(cnn_problem, removed, physical_size):
    # removed=10 sits in the last, padded physical batch when physical_size=4 (11 rows: 4+4+3+pad).
    full = list(range(11))
    neighbour = [i for i in full if i != removed]
    diff = tree_diff(
        clipped_sum(cnn_problem, full, physical_size), clipped_sum(cnn_problem, neighbour, physical_size)
    )
    assert tree_norm(diff) <= CLIP * (1 + 1e-5)
    assert tree_norm(diff) > 0.5 * CLIP  # the example did contribute


@pytest.mark.parametrize("physical_size", [10, 5, 2])
def test_accumulation_over_physical_batches_gives_the_same_sum(cnn_problem, physical_size):
    one_batch = clipped_sum(cnn_problem, range(10), 10)
    split = clipped_sum(cnn_problem, range(10), physical_size)
    np.testing.assert_allclose(tree_norm(tree_diff(one_batch, split)), 0.0, atol=1e-5)


def test_padded_rows_contribute_exactly_zero(cnn_problem):
    losses_fn, params, data = cnn_problem
    batch = {k: v[:8].copy() for k, v in data.items()}
    mask = jnp.asarray([True] * 5 + [False] * 3)
    clipped = jax.jit(functools.partial(clipping.clipped_grad_sum, losses_fn), static_argnums=3)
    unclipped = jax.jit(functools.partial(clipping.masked_grad_sum, losses_fn))
    reference, ref_stats = clipped(params, {k: v[:5] for k, v in batch.items()}, jnp.ones(5, bool), CLIP)
    batch["image"][5:] = 1e3  # whatever sits in padded rows must not leak
    padded, stats = clipped(params, batch, mask, CLIP)
    for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(padded)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(stats["count"]) == 5
    np.testing.assert_allclose(stats["loss_sum"], ref_stats["loss_sum"], rtol=1e-6)
    # The non-private method obeys the same rule.
    np_ref, _ = unclipped(params, {k: v[:5] for k, v in batch.items()}, jnp.ones(5, bool))
    np_sum, np_stats = unclipped(params, batch, mask)
    for a, b in zip(jax.tree_util.tree_leaves(np_ref), jax.tree_util.tree_leaves(np_sum)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(np_stats["count"]) == 5


def test_noise_has_std_sigma_c_on_the_sum_and_divides_by_expected_batch():
    sigma, expected_batch = 1.3, 64.0
    method = GradientMethod("vanilla", clip_norm=CLIP)
    zero_sum = {"w": jnp.zeros((200, 100)), "b": jnp.zeros((50,))}
    # Realised count 17 must not matter: the divisor is the expected batch size.
    grads = method.finalize(zero_sum, jnp.float32(17), jax.random.PRNGKey(3), sigma, expected_batch)
    noise = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(grads)]) * expected_batch
    ks = stats.kstest(noise / (sigma * CLIP), "norm")
    assert ks.pvalue > 1e-3, ks
    assert np.std(noise) == pytest.approx(sigma * CLIP, rel=0.02)


def test_zero_noise_multiplier_divides_sum_by_expected_batch_size():
    method = GradientMethod("vanilla", clip_norm=CLIP)
    grad_sum = {"w": jnp.full((3,), 6.0)}
    grads = method.finalize(grad_sum, jnp.float32(2), jax.random.PRNGKey(0), 0.0, 4.0)
    np.testing.assert_allclose(grads["w"], 1.5)
    nonprivate = GradientMethod("none", clip_norm=None).finalize(grad_sum, jnp.float32(2), None, 0.0, 4.0)
    np.testing.assert_allclose(nonprivate["w"], 3.0)  # the realised mean, for the baseline only
