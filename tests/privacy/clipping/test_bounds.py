"""Clipping, padding and noise: the properties the DP guarantee rests on."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from omegaconf import OmegaConf
from scipy import stats

from dpbench.data import text
from dpbench.models.cnn import CNN
from dpbench.models.encoder import build_encoder
from dpbench.models.gemma3 import Gemma3ModelConfig, build_gemma3
from dpbench.models.layers import LoRADense
from dpbench.privacy import clipping
from dpbench.privacy.methods import GradientMethod
from dpbench.privacy.noise import iid_gaussian
from dpbench.train.loop import Trainer, physical_batches, split_params
from dpbench.train.summarization import SummarizationTask
from dpbench.train.tasks import ClassificationTask
from tests.helpers import compose_config
from tests.privacy.clipping.test_fast_exact import DIALOGUES, SENTENCES, SUMMARIES, perturb_lora_b

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


def _trainer(noise, expected_batch):
    return Trainer(
        None, GradientMethod("vanilla", clip_norm=CLIP), optax.sgd(0.1), None, noise, expected_batch
    )


def test_noise_has_std_sigma_c_on_the_sum_and_divides_by_expected_batch():
    sigma, expected_batch = 1.3, 64.0
    noise_transform = iid_gaussian(sigma * CLIP, jax.random.PRNGKey(3))
    zero_sum = {"w": jnp.zeros((200, 100)), "b": jnp.zeros((50,))}
    # Realised count 17 must not matter: the divisor is the expected batch size.
    grads, state = _trainer(noise_transform, expected_batch).finalize(
        zero_sum, jnp.float32(17), noise_transform.init(zero_sum)
    )
    assert int(state["step"]) == 1
    noise = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(grads)]) * expected_batch
    ks = stats.kstest(noise / (sigma * CLIP), "norm")
    assert ks.pvalue > 1e-3, ks
    assert np.std(noise) == pytest.approx(sigma * CLIP, rel=0.02)


def test_zero_noise_multiplier_divides_sum_by_expected_batch_size():
    grad_sum = {"w": jnp.full((3,), 6.0)}
    zero_noise = iid_gaussian(0.0, jax.random.PRNGKey(0))
    grads, _ = _trainer(zero_noise, 4.0).finalize(grad_sum, jnp.float32(2), zero_noise.init(grad_sum))
    np.testing.assert_allclose(grads["w"], 1.5)
    nonprivate, _ = _trainer(None, 4.0).finalize(grad_sum, jnp.float32(2), None)
    np.testing.assert_allclose(nonprivate["w"], 3.0)  # the realised mean, for the baseline only


# ---------------------------------------------------------------------------------------------
# bfloat16: norms, factors and sums in float32, so one example still moves the sum by at most C

TINY_C = 1e-4  # far below every gradient norm: every example is clipped


def tree_f32_norm(tree):
    return float(
        jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))
    )


def remove_one_sensitivity(losses_fn, trainable, batch, clip, implementation, *args):
    """max over examples i of ‖sum(batch) - sum(batch with i masked)‖, the full sum, and its norms."""
    fn = jax.jit(
        functools.partial(clipping.clipped_grad_sum, losses_fn, clipping=implementation), static_argnums=3
    )
    rows = len(next(iter(batch.values())))
    full, _ = fn(trainable, batch, jnp.ones(rows, bool), clip, *args)
    moves = []
    for i in range(rows):
        mask = np.ones(rows, bool)
        mask[i] = False
        part, _ = fn(trainable, batch, jnp.asarray(mask), clip, *args)
        moves.append(tree_f32_norm(jax.tree_util.tree_map(jnp.subtract, full, part)))
    return max(moves), min(moves), full


class Bf16Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(LoRADense(16, dtype=jnp.bfloat16, name="hidden")(x))
        return LoRADense(3, dtype=jnp.bfloat16, name="out")(x)


@pytest.mark.parametrize("implementation", ["per_example", "bookkeeping"])
def test_bfloat16_parameters_are_summed_in_float32_within_c(implementation):
    # bfloat16 parameter leaves (bfloat16 gradients): summed in bfloat16, as before, one example
    # moved the sum by 1.0019 C (per_example) and 1.0005 C (bookkeeping).
    module = Bf16Mlp()
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(8, 12)).astype(np.float32),
        "label": rng.integers(0, 3, 8).astype(np.int32),
    }
    params = module.init(jax.random.PRNGKey(0), batch["x"][:1])["params"]
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)

    def losses_fn(params, batch):
        logits = module.apply({"params": params}, batch["x"]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]), {}

    clip = 1e-3
    assert (
        float(jax.jit(functools.partial(clipping.per_example_norms, losses_fn))(params, batch).min()) > clip
    )
    most, least, full = remove_one_sensitivity(losses_fn, params, batch, clip, implementation)
    assert {x.dtype for x in jax.tree_util.tree_leaves(full)} == {jnp.dtype(jnp.float32)}
    assert most <= clip * (1 + 1e-5) and least > 0.99 * clip
    unclipped, _ = clipping.masked_grad_sum(losses_fn, params, batch, jnp.ones(8, bool))
    assert {x.dtype for x in jax.tree_util.tree_leaves(unclipped)} == {jnp.dtype(jnp.float32)}


def bfloat16_model(kind: str):
    """(bfloat16 losses_fn, the same model's float32 losses_fn, trainable, frozen, batch of 4)."""
    if kind.startswith("gemma"):
        cfg = Gemma3ModelConfig(
            preset="tiny",
            random_init=True,
            tokenizer="bytes",
            lora_rank=2,
            lora_alpha=2,
            finetune=kind.split("-")[1],
            dtype="bfloat16",
        )
        bundle = build_gemma3(cfg, jax.random.key(0))
        arrays, _ = text.build_lm_examples(DIALOGUES, SUMMARIES, bundle.tokenizer, 80)
        data_cfg = OmegaConf.create({"max_prompt_length": 64, "max_new_tokens": 4, "max_length": 80})

        def task(b):
            return SummarizationTask(b, data_cfg, train_summaries=SUMMARIES)
    else:
        cfg = compose_config(
            ["model=tiny_encoder", f"model.finetune={kind.split('-')[1]}", "model.dtype=bfloat16"]
        )
        bundle = build_encoder(cfg.model, jax.random.PRNGKey(0))
        arrays, _ = text.tokenize_classification(SENTENCES, np.arange(9) % 2, bundle.tokenizer, 28)

        def task(b):
            return ClassificationTask(b.apply_fn)

    bundle.params = perturb_lora_b(bundle.params)
    float32 = bundle.in_float32()
    assert float32 is not bundle and float32.params is bundle.params
    trainable, frozen = split_params(bundle.params, bundle.is_trainable)
    batch = {k: jnp.asarray(v[:4]) for k, v in arrays.items()}
    return task(bundle).losses_fn, task(float32).losses_fn, trainable, frozen, batch


def clipped_by_hand(losses_fn, trainable, batch, clip, *args):
    """Σᵢ min(1, C/‖gᵢ‖) gᵢ in float64 (numpy) of the per-example gradients ``vmap(grad)`` gives."""
    grads, _, _ = jax.jit(functools.partial(clipping.per_example_grads, losses_fn))(trainable, batch, *args)
    grads = {p: np.asarray(g, np.float64) for p, g in grads.items()}
    rows = len(next(iter(grads.values())))
    norms = np.sqrt(sum(np.sum(g.reshape(rows, -1) ** 2, axis=1) for g in grads.values()))
    assert norms.min() > 10 * clip, "every example must be clipped"
    factors = np.minimum(1.0, clip / norms)
    return {p: np.tensordot(factors, g, axes=1) for p, g in grads.items()}


def distance(tree, reference) -> float:
    return float(
        np.sqrt(sum(np.sum((np.asarray(tree[p], np.float64) - r) ** 2) for p, r in reference.items()))
    )


@pytest.fixture(scope="module", params=["gemma-lora", "gemma-full", "encoder-lora"])
def bf16_problem(request):
    losses_fn, float32_losses_fn, trainable, frozen, batch = bfloat16_model(request.param)
    own = clipped_by_hand(losses_fn, trainable, batch, TINY_C, frozen)
    float32 = clipped_by_hand(float32_losses_fn, trainable, batch, TINY_C, frozen)
    return losses_fn, trainable, frozen, batch, own, float32


# How far a clipped sum over 4 bfloat16 examples may be from the reference, in units of 4C. ``own``:
# the bfloat16 model's own per-example gradients clipped by hand in float64 (per_example: measured
# 4e-8; bookkeeping, whose contraction rounds differently from the bfloat16 backward pass: 2.1e-3).
# ``float32``: the same parameters through the model computing in float32 (measured 0.07 on tiny
# Gemma 3: its bfloat16 gradients themselves are 6-20% off at near-uniform random-init attention).
TOLERANCE = {"per_example": 1e-5, "bookkeeping": 1e-2, "float32": 0.2}


@pytest.mark.parametrize("implementation", ["per_example", "bookkeeping"])
def test_bfloat16_models_move_the_sum_by_at_most_c(bf16_problem, implementation):
    """Tiny Gemma 3 (LoRA, full fine-tuning) and the tiny encoder computing in bfloat16, every example
    clipped: removing any one moves the clipped sum by at most C (float32 rounding aside), and the sum
    agrees with the per-example sums clipped by hand (float64), in bfloat16 and in float32."""
    losses_fn, trainable, frozen, batch, own, float32 = bf16_problem
    most, least, full = remove_one_sensitivity(losses_fn, trainable, batch, TINY_C, implementation, frozen)
    assert {x.dtype for x in jax.tree_util.tree_leaves(full)} == {jnp.dtype(jnp.float32)}
    assert most <= TINY_C * (1 + 1e-5), most / TINY_C
    assert least > 0.99 * TINY_C
    assert distance(full, own) <= TOLERANCE[implementation] * 4 * TINY_C, distance(full, own) / (4 * TINY_C)
    assert distance(full, float32) <= TOLERANCE["float32"] * 4 * TINY_C, distance(full, float32) / (
        4 * TINY_C
    )
