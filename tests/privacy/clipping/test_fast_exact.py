"""Fast clipping is exact: ghost and book-keeping give per_example's norms and clipped sums.

On every model (CNN; tiny encoder with LoRA, FFA and fully fine-tuned; tiny Gemma 3 with LoRA and
fully fine-tuned, padding tokens and the tied embedding), with masked rows and several physical
batches per logical batch. Non-finite examples and NaN-holding padded rows contribute zero.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from omegaconf import OmegaConf

from dpbench.config import ConfigError
from dpbench.data import text
from dpbench.models.base import LABELS, ModelBundle
from dpbench.models.cnn import CNN, TemperedCNN
from dpbench.models.encoder import build_encoder
from dpbench.models.gemma3 import Gemma3ModelConfig, build_gemma3
from dpbench.models.layers import Embed, LayerNorm, LoRADense, RMSNorm
from dpbench.privacy import clipping
from dpbench.train.loop import physical_batches, split_params
from dpbench.train.summarization import SummarizationTask
from dpbench.train.tasks import ClassificationTask
from tests.helpers import compose_config

FAST = ("ghost", "bookkeeping")
RTOL = 1e-5  # float32


def perturb_lora_b(params, seed=1):
    """LoRA B starts at zero; make it non-zero so that every factor gets a gradient."""
    flat = flatten_dict(params)
    rng = np.random.default_rng(seed)
    for path in flat:
        if path[-1] == "lora_b":
            flat[path] = jnp.asarray(rng.normal(size=flat[path].shape) * 0.1, jnp.float32)
    return unflatten_dict(flat)


def flat(tree: dict) -> dict:
    return tree if all(isinstance(k, tuple) for k in tree) else flatten_dict(tree)


def assert_tree_close(actual, expected, rtol=RTOL):
    """Every leaf within ``rtol`` of the largest entry of the reference leaf (plus a floor far below
    every real gradient, for leaves whose true gradient is 0, such as attention key biases)."""
    actual, expected = flat(actual), flat(expected)
    assert actual.keys() == expected.keys()
    overall = max(float(jnp.max(jnp.abs(ref))) for ref in expected.values())
    assert overall > 0, "the reference gradient is zero; the comparison would be vacuous"
    for path, ref in expected.items():
        scale = max(float(jnp.max(jnp.abs(ref))), 1e-4 * overall)
        err = float(jnp.max(jnp.abs(actual[path] - ref)))
        assert err <= rtol * scale, f"{'/'.join(path)}: max error {err:.3g} vs scale {scale:.3g}"


def check_exact(losses_fn, trainable, data: dict, indices, physical: int, *args, expect_clipping=True):
    """Norms of the first physical batch, and the clipped sum over a logical batch cut into padded
    physical batches, agree across implementations. The clip norm is the median norm, so some
    examples are clipped and some are not."""
    first = {k: jnp.asarray(v[:physical]) for k, v in data.items()}
    norms = {
        c: jax.jit(functools.partial(clipping.per_example_norms, losses_fn, clipping=c))(
            trainable, first, *args
        )
        for c in clipping.CLIPPING_IMPLEMENTATIONS
    }
    for c in FAST:
        np.testing.assert_allclose(norms[c], norms["per_example"], rtol=RTOL, err_msg=c)
    clip = float(np.median(norms["per_example"]))
    if expect_clipping:
        assert float(norms["per_example"].min()) < clip < float(norms["per_example"].max())

    def logical_sum(c):
        fn = jax.jit(functools.partial(clipping.clipped_grad_sum, losses_fn, clipping=c), static_argnums=3)
        total, count = None, 0.0
        for idx, mask in physical_batches(np.asarray(indices), physical):
            batch = {k: jnp.asarray(v[idx]) for k, v in data.items()}
            grads, stats = fn(trainable, batch, jnp.asarray(mask), clip, *args)
            count += float(stats["count"])
            total = grads if total is None else jax.tree_util.tree_map(jnp.add, total, grads)
        assert count == len(indices)
        return total

    reference = logical_sum("per_example")
    for c in FAST:
        assert_tree_close(logical_sum(c), reference)


# ---------------------------------------------------------------------------------------------
# CNN (Conv through patches, Dense, biases)


def image_problem(module: nn.Module, count: int, size: int, seed: int):
    """(losses_fn, params, data) of an image classifier on ``count`` random ``size``² images."""
    rng = np.random.default_rng(seed)
    data = {
        "image": rng.uniform(size=(count, size, size, 1)).astype(np.float32),
        "label": rng.integers(0, 10, size=count).astype(np.int32),
    }
    params = module.init(jax.random.PRNGKey(0), data["image"][:1])["params"]

    def losses_fn(trainable, batch):
        logits = module.apply({"params": trainable}, batch["image"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return losses, {"correct": jnp.argmax(logits, -1) == batch["label"]}

    return losses_fn, params, data


@pytest.fixture(scope="module")
def cnn():
    return image_problem(CNN(num_classes=10), count=11, size=10, seed=0)


def test_cnn_fast_clipping_is_exact(cnn):
    losses_fn, params, data = cnn
    # 11 examples in physical batches of 4: 4 + 4 + 3 and a padded row.
    check_exact(losses_fn, params, data, np.arange(11), 4)


def test_tempered_cnn_strided_valid_convolutions_are_exact():
    problem = image_problem(TemperedCNN(num_classes=10, activation="tanh"), count=7, size=28, seed=1)
    check_exact(*problem, np.arange(7), 4)


def test_bookkeeping_sums_the_per_example_gradients_its_norms_formed():
    """On a layer whose norm takes the materialised route (the tutorial CNN's second convolution:
    196 positions x (288 + 64) >= 288 x 64) the clipped sum is Σᵢ wᵢ Gᵢ over the formed gradients, not
    a second B·T·d₁·d₂ contraction of the factors: XLA counts about the non-private step's flops
    (1.37x with the second contraction)."""
    losses_fn, params, data = image_problem(CNN(num_classes=10), count=16, size=28, seed=0)
    batch, mask = {k: jnp.asarray(v) for k, v in data.items()}, jnp.ones(16, bool)
    routes = clipping.norm_routes(losses_fn, params, batch)
    assert routes["Conv_1/kernel"]["route"] == clipping.ROUTE_MATERIALISED

    def flops(fn):
        cost = jax.jit(fn).lower(params, batch, mask).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    plain = flops(lambda p, b, m: clipping.masked_grad_sum(losses_fn, p, b, m)[0])
    private = flops(
        lambda p, b, m: clipping.clipped_grad_sum(losses_fn, p, b, m, 1.0, clipping="bookkeeping")[0]
    )
    assert private < 1.15 * plain, private / plain


@pytest.mark.parametrize("implementation", clipping.CLIPPING_IMPLEMENTATIONS)
def test_a_nan_example_and_a_nan_padded_row_contribute_zero(cnn, implementation):
    losses_fn, params, data = cnn
    fn = jax.jit(
        functools.partial(clipping.clipped_grad_sum, losses_fn, clipping=implementation), static_argnums=3
    )
    clean = {k: v[:6] for k, v in data.items()}
    poisoned = {k: v.copy() for k, v in clean.items()}
    poisoned["image"][2, 3, 3, 0] = np.nan  # a real example with a NaN input
    poisoned["image"][5] = np.inf  # a padded row that holds inf
    mask = np.array([1, 1, 1, 1, 1, 0], bool)
    without = np.array([1, 1, 0, 1, 1, 0], bool)
    grads, stats = fn(params, poisoned, jnp.asarray(mask), 0.5)
    expected, expected_stats = fn(params, clean, jnp.asarray(without), 0.5)
    for leaf in jax.tree_util.tree_leaves(grads):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert_tree_close(grads, expected)
    assert float(stats["nonfinite_sum"]) == 1.0 and float(expected_stats["nonfinite_sum"]) == 0.0
    assert float(stats["count"]) == 5.0
    assert np.isfinite(float(stats["loss_sum"]))
    assert float(stats["loss_sum"]) == pytest.approx(float(expected_stats["loss_sum"]), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Tiny encoder: LoRA (vanilla, FFA), full fine-tuning (embeddings, LayerNorms, biases)

SENTENCES = [f"film {i} is {'good' if i % 2 else 'bad'}" + " !" * (i % 4) for i in range(9)]


def encoder_problem(finetune: str, freeze_a: bool):
    cfg = compose_config(["model=tiny_encoder", f"model.finetune={finetune}"]).model
    bundle = build_encoder(cfg, jax.random.PRNGKey(0)).with_frozen(("lora_a",) if freeze_a else ())
    trainable, frozen = split_params(perturb_lora_b(bundle.params), bundle.is_trainable)
    arrays, _ = text.tokenize_classification(SENTENCES, np.arange(9) % 2, bundle.tokenizer, 28)
    assert arrays["attention_mask"].min() == 0, "the test needs padding tokens"
    return ClassificationTask(bundle.apply_fn).losses_fn, trainable, frozen, arrays


@pytest.mark.parametrize(
    ("finetune", "freeze_a", "expected"),
    [
        ("lora", False, {"lora_a", "lora_b", "kernel", "bias"}),
        # FFA's trainable set is a subset of vanilla's; also covered by the sensitivity test.
        pytest.param("lora", True, {"lora_b", "kernel", "bias"}, marks=pytest.mark.slow),
        ("full", False, {"kernel", "bias", "embedding", "scale"}),
    ],
    ids=["lora-vanilla", "lora-ffa", "full"],
)
def test_encoder_fast_clipping_is_exact(finetune, freeze_a, expected):
    losses_fn, trainable, frozen, arrays = encoder_problem(finetune, freeze_a)
    assert {p[-1] for p in trainable} == expected
    check_exact(losses_fn, trainable, arrays, np.arange(9), 4, frozen)


# ---------------------------------------------------------------------------------------------
# Tiny Gemma 3: LoRA with padding tokens; full fine-tuning with the tied embedding

DIALOGUES = [
    "Anna: are we still on for lunch?\nBen: yes, 12:30 at the usual place.",
    "Tom: I lost my keys again.\nMia: check the kitchen drawer.\nTom: found them, thanks!",
    "Zoe: hi",
    "Sam: the train is late.\nKim: again? I will wait.",
    "Lea: movie tonight?\nMax: sure",
]
SUMMARIES = [
    "Anna and Ben meet for lunch.",
    "Mia helps Tom.",
    "Zoe greets.",
    "Sam's train is late.",
    "Movie.",
]


def gemma_problem(finetune: str, response_positions: bool):
    cfg = Gemma3ModelConfig(
        preset="tiny", random_init=True, tokenizer="bytes", lora_rank=2, lora_alpha=2, finetune=finetune
    )
    bundle = build_gemma3(cfg, jax.random.key(0))
    bundle.params = perturb_lora_b(bundle.params)
    arrays, _ = text.build_lm_examples(DIALOGUES, SUMMARIES, bundle.tokenizer, 80)
    assert arrays["attention_mask"].min() == 0, "the test needs padding tokens"
    data_cfg = OmegaConf.create({"max_prompt_length": 64, "max_new_tokens": 4, "max_length": 80})
    task = SummarizationTask(bundle, data_cfg, train_summaries=SUMMARIES if response_positions else None)
    assert (task.max_targets is not None) == response_positions
    trainable, frozen = split_params(bundle.params, bundle.is_trainable)
    return task.losses_fn, trainable, frozen, arrays


def test_gemma_lora_fast_clipping_is_exact():
    losses_fn, trainable, frozen, arrays = gemma_problem("lora", response_positions=True)
    assert {p[-1] for p in trainable} == {"lora_a", "lora_b"}
    check_exact(losses_fn, trainable, arrays, np.arange(5), 2, frozen)


@pytest.mark.parametrize(
    "response_positions",
    [True, pytest.param(False, marks=pytest.mark.slow)],  # the tied head on every position: slower
    ids=["response-logits", "full-logits"],
)
def test_gemma_full_finetune_with_tied_embedding_is_exact(response_positions):
    losses_fn, trainable, frozen, arrays = gemma_problem("full", response_positions)
    assert ("embed_tokens", "embedding") in trainable and not frozen
    assert not any(p[-1].startswith("lora") for p in trainable)
    check_exact(losses_fn, trainable, arrays, np.arange(5), 2, frozen)


# ---------------------------------------------------------------------------------------------
# A parameter no layer taps falls back to per-example gradients, and the log names it


class PartlyTapped(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(LoRADense(8, name="tapped")(x))
        offset = self.param("untapped_offset", nn.initializers.normal(1.0), (8,))
        return LoRADense(3, name="out")(x * offset)


def test_untapped_parameter_falls_back_exactly_and_is_named(caplog):
    module = PartlyTapped()
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(6, 5)).astype(np.float32), "label": rng.integers(0, 3, 6).astype(np.int32)}
    params = module.init(jax.random.PRNGKey(0), data["x"][:1])["params"]

    def losses_fn(trainable, batch):
        logits = module.apply({"params": trainable}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]), {}

    with caplog.at_level(logging.WARNING, logger="dpbench.privacy.clipping"):
        check_exact(losses_fn, params, data, np.arange(6), 3)
    assert "untapped_offset" in caplog.text


# ---------------------------------------------------------------------------------------------
# The start-up guard: a tapped parameter also used outside its tap is caught, not under-clipped


class Leaky(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        layer = LoRADense(3, dtype=self.dtype, name="dense")
        y = layer(x)
        kernel = layer.variables["params"]["kernel"].astype(self.dtype)
        return y + jnp.tanh(x.astype(self.dtype)) @ kernel  # a second, untapped use


def leaky_bundle(dtype) -> ModelBundle:
    """A model whose ``dense/kernel`` is also used outside its tap, computing in ``dtype``."""
    module = Leaky(dtype=dtype)
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))["params"]

    def bundle_of(module, params):
        def apply_fn(params, batch):
            return module.apply({"params": params}, batch["x"]).astype(jnp.float32)

        variant = None if dtype == jnp.float32 else (lambda: bundle_of(module.clone(dtype=jnp.float32), None))
        return ModelBundle(
            apply_fn,
            params,
            label_of=lambda path: "base",
            trainable_labels=frozenset(LABELS),
            weights_source="random init",
            float32_variant=variant,
        )

    return bundle_of(module, params)


def classification_losses(bundle: ModelBundle):
    def losses_fn(trainable, batch):
        logits = bundle.apply_fn(trainable, batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]), {}

    return losses_fn


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_tap_coverage_check_catches_a_parameter_used_outside_its_tap(dtype):
    """Also in bfloat16: the check runs on the model computing in float32 (``in_float32``), where a
    parameter used outside its tap still shows, and fails with one line naming dp.clipping."""
    bundle = leaky_bundle(dtype)
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(4, 5)).astype(np.float32), "label": rng.integers(0, 3, 4).astype(np.int32)}
    losses_fn = classification_losses(bundle)
    ghost = clipping.per_example_norms(losses_fn, bundle.params, batch, clipping="ghost")
    true = clipping.per_example_norms(losses_fn, bundle.params, batch, clipping="per_example")
    assert not np.allclose(ghost, true, rtol=1e-2)  # without the guard the norms would be wrong
    exact = bundle.in_float32()
    assert (exact is bundle) == (dtype == jnp.float32)
    with pytest.raises(ConfigError, match="dense/kernel") as caught:
        clipping.check_tap_coverage(classification_losses(exact), exact.params, batch, clipping="bookkeeping")
    message = str(caught.value)
    assert "\n" not in message and "dp.clipping=bookkeeping" in message
    assert "use dp.clipping=per_example (allowed: auto, per_example, ghost, bookkeeping)" in message


def test_tap_coverage_is_checked_in_float32_not_in_bfloat16_rounding():
    """The bug this guards against: tiny Gemma 3 in bfloat16 is fully covered by its taps, but compared
    in bfloat16 every LoRA B looks uncovered (rounding); its float32 variant passes the check."""
    cfg = Gemma3ModelConfig(preset="tiny", random_init=True, tokenizer="bytes", lora_rank=2, dtype="bfloat16")
    bundle = build_gemma3(cfg, jax.random.key(0))
    bundle.params = perturb_lora_b(bundle.params)
    arrays, _ = text.build_lm_examples(DIALOGUES, SUMMARIES, bundle.tokenizer, 80)
    data_cfg = OmegaConf.create({"max_prompt_length": 64, "max_new_tokens": 4, "max_length": 80})
    trainable, frozen = split_params(bundle.params, bundle.is_trainable)
    sample = {k: v[:2] for k, v in arrays.items()}
    in_bfloat16 = SummarizationTask(bundle, data_cfg, train_summaries=SUMMARIES).losses_fn
    with pytest.raises(ConfigError, match="lora_b"):
        clipping.check_tap_coverage(in_bfloat16, trainable, sample, frozen)
    in_float32 = SummarizationTask(bundle.in_float32(), data_cfg, train_summaries=SUMMARIES).losses_fn
    errors = clipping.check_tap_coverage(in_float32, trainable, sample, frozen)
    assert max(errors.values()) < 1e-4


def test_tap_coverage_check_passes_on_every_model(cnn):
    losses_fn, params, data = cnn
    errors = clipping.check_tap_coverage(losses_fn, params, {k: v[:4] for k, v in data.items()})
    assert errors and max(errors.values()) < 1e-4
    for finetune in ("lora", "full"):
        losses_fn, trainable, frozen, arrays = encoder_problem(finetune, False)
        clipping.check_tap_coverage(losses_fn, trainable, {k: v[:3] for k, v in arrays.items()}, frozen)
    losses_fn, trainable, frozen, arrays = gemma_problem("full", response_positions=True)
    clipping.check_tap_coverage(losses_fn, trainable, {k: v[:2] for k, v in arrays.items()}, frozen)


# ---------------------------------------------------------------------------------------------
# In float64 the agreement is far tighter than float32 rounding: exact, not an approximation


class TinyTiedLM(nn.Module):
    """Embed - LayerNorm - LoRA Dense - tanh - RMSNorm - tied output head, all in float64."""

    @nn.compact
    def __call__(self, ids):
        embed = Embed(13, 6, dtype=jnp.float64, name="embed")
        x = LayerNorm(dtype=jnp.float64, name="norm")(embed(ids))
        x = jnp.tanh(LoRADense(6, lora_rank=2, lora_alpha=2, dtype=jnp.float64, name="dense")(x))
        x = RMSNorm(name="final_norm")(x)
        return embed.attend(x)


def test_float64_agreement_is_exact_to_1e_10():
    with jax.enable_x64(True):
        module = TinyTiedLM()
        rng = np.random.default_rng(0)
        data = {"ids": rng.integers(0, 13, size=(5, 7)).astype(np.int32)}
        params = module.init(jax.random.PRNGKey(0), data["ids"][:1])["params"]
        params = perturb_lora_b(jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params))
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)

        def losses_fn(trainable, batch):
            logits = module.apply({"params": trainable}, batch["ids"])
            nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["ids"][:, 1:])
            return jnp.mean(nll, axis=1), {}

        norms = {
            c: clipping.per_example_norms(losses_fn, params, data, clipping=c)
            for c in clipping.CLIPPING_IMPLEMENTATIONS
        }
        assert norms["per_example"].dtype == jnp.float64
        for c in FAST:
            np.testing.assert_allclose(norms[c], norms["per_example"], rtol=1e-10)
        clip = float(np.median(norms["per_example"]))
        mask = jnp.asarray([1, 1, 1, 1, 0], bool)
        sums = {
            c: clipping.clipped_grad_sum(losses_fn, params, data, mask, clip, clipping=c)[0]
            for c in clipping.CLIPPING_IMPLEMENTATIONS
        }
        for c in FAST:
            assert_tree_close(sums[c], sums["per_example"], rtol=1e-10)
