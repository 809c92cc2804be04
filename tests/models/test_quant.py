"""model.frozen_quantization: int8 / nf4 codes against a brute-force reference, the dequantising
product's gradient against autodiff of the float product, the quantized Gemma 3 against the float
model holding the dequantised weights, fast clipping exact on it (the start-up check), and refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from omegaconf import OmegaConf

from dpbench.config import ConfigError
from dpbench.data import text
from dpbench.models import quant
from dpbench.models.cnn import CNNModelConfig, build_cnn
from dpbench.models.gemma3 import Gemma3ModelConfig, build_gemma3, greedy_generate
from dpbench.privacy import clipping
from dpbench.train.loop import split_params
from dpbench.train.summarization import SummarizationTask
from tests.helpers import TINY, run_cli

DIALOGUES = ["Anna: lunch at 12:30?\nBen: yes, the usual place.", "Tom: lost my keys.\nMia: kitchen drawer."]
SUMMARIES = ["Anna and Ben meet for lunch.", "Mia helps Tom."]


def test_int8_codes_are_the_rounded_weights_over_a_per_channel_scale():
    w = np.random.default_rng(0).normal(size=(96, 5)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero channel: scale 1, codes 0, no division by zero
    codes, scale = quant.quantize(w, "int8", 0)
    assert codes.dtype == np.int8 and scale.shape == (5,)
    np.testing.assert_allclose(scale[[0, 1, 2, 4]], np.abs(w).max(0)[[0, 1, 2, 4]] / 127, rtol=1e-6)
    np.testing.assert_array_equal(codes, np.rint(w / scale).astype(np.int8))
    back = np.asarray(quant.dequantize(jnp.asarray(codes), jnp.asarray(scale), "int8", 0))
    assert np.all(np.abs(back - w) <= scale / 2 + 1e-7)


@pytest.mark.parametrize("axis", [0, -1])
def test_nf4_codes_are_the_nearest_level_per_block_packed_two_per_byte(axis):
    w = np.random.default_rng(1).normal(size=(128, 6)).astype(np.float32)
    w = w if axis == 0 else w.T.copy()  # [128, 6] along 0, [6, 128] along -1: 2 blocks of 64
    codes, scale = quant.quantize(w, "nf4", axis)
    # Brute force: each block's absmax, then the nearest of the 16 levels.
    rows = w if axis == 0 else w.T
    blocks = rows.reshape(2, 64, 6)
    absmax = np.abs(blocks).max(axis=1)  # [2, 6]
    nearest = np.argmin(np.abs(blocks[..., None] / absmax[:, None, :, None] - quant.NF4), axis=-1)
    nearest = nearest.reshape(128, 6)
    unpacked = np.stack([codes & 15, codes >> 4], axis=(1 if axis == 0 else 2))
    unpacked = unpacked.reshape(w.shape) if axis == -1 else unpacked.reshape(128, 6)
    assert codes.dtype == np.uint8 and codes.shape == ((64, 6) if axis == 0 else (6, 64))
    np.testing.assert_array_equal(unpacked if axis == 0 else unpacked.T, nearest)
    np.testing.assert_allclose(scale if axis == 0 else scale.T, absmax, rtol=1e-6)
    back = np.asarray(quant.dequantize(jnp.asarray(codes), jnp.asarray(scale), "nf4", axis))
    expected = (quant.NF4[nearest].reshape(2, 64, 6) * absmax[:, None, :]).reshape(128, 6)
    np.testing.assert_allclose(back if axis == 0 else back.T, expected, rtol=1e-6)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
@pytest.mark.parametrize("transposed", [False, True], ids=["kernel", "tied_embedding"])
def test_dequantising_product_has_the_float_products_input_gradient(scheme, transposed):
    """``quant.dot``'s custom backward pass (it keeps the codes, not the float weight) gives what
    autodiff of ``x @ dequantize(codes)`` gives, also per example (vmap)."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(64, 8) if not transposed else (8, 64)).astype(np.float32)
    codes, scale = (jnp.asarray(a) for a in quant.quantize(w, scheme, -1 if transposed else 0))
    dense = quant.dequantize(codes, scale, scheme, -1 if transposed else 0)
    x = jnp.asarray(rng.normal(size=(3, 5, 64)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32)

    def loss(x, product):
        return jnp.sum(jnp.tanh(product(x)) * target)

    ours = lambda x: quant.dot(x, codes, scale, scheme, jnp.float32, transposed)  # noqa: E731
    reference = lambda x: x @ (dense.T if transposed else dense)  # noqa: E731
    # Both sides are float32 sums in different orders (the scale applied after the dot or before): on
    # some CPUs they differ by ~1e-6 of the gradient's size (up to 4 here), both as close to the float64
    # product as each other. A wrong backward (scale, transpose, codes) is off by O(0.1).
    np.testing.assert_allclose(ours(x), reference(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.grad(loss)(x, ours), jax.grad(loss)(x, reference), rtol=1e-5, atol=1e-5)
    per_example = jax.vmap(jax.grad(loss), in_axes=(0, None))
    np.testing.assert_allclose(per_example(x, ours), per_example(x, reference), rtol=1e-5, atol=1e-5)


def _tiny(scheme: str, dtype: str = "float32", finetune: str = "lora"):
    cfg = Gemma3ModelConfig(
        preset="tiny",
        random_init=True,
        tokenizer="bytes",
        lora_rank=2,
        lora_alpha=2,
        dtype=dtype,
        finetune=finetune,
        frozen_quantization=scheme,
    )
    return build_gemma3(cfg, jax.random.key(0))


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_quantized_gemma_is_the_float_model_with_dequantised_weights(scheme):
    """Stored: codes for every frozen kernel and the frozen tied embedding, float32 for LoRA and norms.
    Computed: the float model's logits when it holds the dequantised weights."""
    quantized, plain = _tiny(scheme), _tiny("none")
    flat = flatten_dict(quantized.params)
    code_dtype = np.int8 if scheme == "int8" else np.uint8
    for path, value in flat.items():
        if path[-1] in ("kernel", "embedding"):
            assert value.dtype == code_dtype, path
        else:  # scales, LoRA factors, norms
            assert value.dtype == jnp.float32, path
    dequantised = quantized.extras["dequantize"](quantized.params)
    assert set(flatten_dict(dequantised)) == set(flatten_dict(plain.params))
    ids = jnp.array([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids > 0).astype(jnp.int32)}
    np.testing.assert_allclose(
        quantized.apply_fn(quantized.params, batch), plain.apply_fn(dequantised, batch), rtol=2e-5, atol=2e-6
    )
    # And the weights are close to the float ones they came from (nf4 is coarser).
    kernel = ("layer_0", "mlp", "up_proj", "kernel")
    error = np.abs(flatten_dict(dequantised)[kernel] - flatten_dict(plain.params)[kernel]).max()
    assert error < (0.02 * 4 * 0.01 if scheme == "int8" else 0.02 * 4 * 0.2)


def test_head_finetuning_keeps_the_trainable_embedding_float32():
    bundle = _tiny("int8", finetune="head")
    flat = flatten_dict(bundle.params)
    assert flat[("embed_tokens", "embedding")].dtype == jnp.float32
    assert ("embed_tokens", "embedding_scale") not in flat
    assert flat[("layer_0", "attn", "q_proj", "kernel")].dtype == jnp.int8


@pytest.mark.slow  # ~30-60 s each; make test runs the gemma_nf4 conformance cell instead
@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_fast_clipping_is_exact_on_the_quantized_model(scheme):
    """The start-up check (``check_fast_clipping`` runs ``check_tap_coverage`` on ``in_float32()``)
    covers the quantized base: ``in_float32`` keeps the codes and the quantized layers, so the check
    compares the taps' gradient with autodiff of the very model that trains, dequantised weights and
    all; and ghost / book-keeping norms equal per-example norms on it."""
    bundle = _tiny(scheme, dtype="bfloat16")
    exact = bundle.in_float32()
    assert exact.module.quantization == scheme and exact.module.dtype == jnp.float32
    flat = flatten_dict(bundle.params)
    flat = {p: (jnp.asarray(np.random.default_rng(3).normal(size=v.shape) * 0.1, jnp.float32)
                if p[-1] == "lora_b" else v) for p, v in flat.items()}  # fmt: skip
    bundle.params = unflatten_dict(flat)
    arrays, _ = text.build_lm_examples(DIALOGUES, SUMMARIES, bundle.tokenizer, 64)
    data_cfg = OmegaConf.create({"max_prompt_length": 48, "max_new_tokens": 4, "max_length": 64})
    trainable, frozen = split_params(bundle.params, bundle.is_trainable)
    assert all(p[-1] in ("lora_a", "lora_b") for p in trainable)
    sample = {k: v[:2] for k, v in arrays.items()}
    losses_fn = SummarizationTask(bundle.in_float32(), data_cfg, train_summaries=SUMMARIES).losses_fn
    clipping.check_fast_clipping("ghost", "float32", "vanilla", losses_fn, trainable, frozen, sample)
    norms = {
        c: np.asarray(clipping.per_example_norms(losses_fn, trainable, sample, frozen, clipping=c))
        for c in ("per_example", "bookkeeping")
    }
    np.testing.assert_allclose(norms["bookkeeping"], norms["per_example"], rtol=1e-4)


def test_shapes_only_plan_stores_codes_and_scales():
    """``python -m dpbench.plan``'s bundle: 270M frozen weights in nf4 are codes (half a byte each)
    plus a float32 scale per 64 weights."""
    cfg = dict(preset="270m", random_init=True, tokenizer="bytes", lora_rank=8)
    nf4 = build_gemma3(Gemma3ModelConfig(**cfg, frozen_quantization="nf4"), jax.random.key(0), abstract=True)
    plain = build_gemma3(Gemma3ModelConfig(**cfg), jax.random.key(0), abstract=True)
    frozen_bytes = {}
    for name, bundle in (("nf4", nf4), ("none", plain)):
        _, frozen = split_params(bundle.params, bundle.is_trainable)
        frozen_bytes[name] = sum(v.size * v.dtype.itemsize for v in frozen.values())
    flat = flatten_dict(plain.params)
    quantized = sum(
        v.size for p, v in flat.items() if p[-1] in ("kernel", "embedding") and "lora" not in p[-1]
    )
    norms = sum(v.size for p, v in flat.items() if p[-1] == "scale")
    assert frozen_bytes["none"] == 4 * (quantized + norms)
    assert frozen_bytes["nf4"] == quantized // 2 + 4 * (quantized // 64) + 4 * norms


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"model.frozen_quantization='int4' is not allowed; choose one of"):
        _tiny("int4")
    with pytest.raises(ConfigError, match=r"model.finetune=full freezes none") as caught:
        _tiny("nf4", finetune="full")
    assert "\n" not in str(caught.value)


def test_models_without_a_quantized_path_refuse_it():
    cnn = OmegaConf.structured(CNNModelConfig(frozen_quantization="int8"))
    with pytest.raises(ConfigError, match=r"model.arch=cnn: it has no quantized path") as caught:
        build_cnn(cnn, jax.random.key(0))
    assert "\n" not in str(caught.value) and "choose model.frozen_quantization=none" in str(caught.value)


@pytest.mark.slow  # a subprocess: ~40 s
def test_a_model_without_a_quantized_path_is_refused_at_the_cli(tmp_path):
    done = run_cli(
        "-m", "dpbench", *TINY, f"hydra.run.dir={tmp_path}", "model=tiny_encoder", "dataset=sst2_rt",
        "model.frozen_quantization=nf4", timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.frozen_quantization=nf4" in lines[0] and "no quantized path" in lines[0]


def test_kv_cache_generation_on_the_quantized_model_is_the_float_models():
    """Greedy decoding with the KV cache (``head_logits`` on the quantized embedding) gives the tokens
    the float model with the dequantised weights gives."""
    quantized = _tiny("nf4")
    plain = _tiny("none")
    dequantised = quantized.extras["dequantize"](quantized.params)
    ids = np.array([[0, 0, 72, 101, 108], [72, 105, 32, 116, 104]], np.int32)  # the first row left-padded
    mask = (np.arange(5)[None] >= np.array([[2], [0]])).astype(np.int32)
    ours = greedy_generate(quantized.module, quantized.params, ids, mask, max_new_tokens=6)
    reference = greedy_generate(plain.module, dequantised, ids, mask, max_new_tokens=6)
    np.testing.assert_array_equal(ours, reference)


def test_exports_see_dequantised_float_weights_under_hugging_face_names():
    """``dpbench.export`` writes ``float_params``: the quantized base dequantised (the weights the run
    used), with exactly the float model's paths, each named in the Hugging Face layout."""
    from dpbench.models.gemma3 import hf_layout
    from dpbench.models.saved import float_params

    quantized, plain = _tiny("int8"), _tiny("none")
    exported = flatten_dict(float_params(quantized))
    assert {p: v.shape for p, v in exported.items()} == {
        p: v.shape for p, v in flatten_dict(plain.params).items()
    }
    assert all(v.dtype == np.float32 for v in exported.values())
    names = hf_layout(quantized).names
    assert set(names) == {p for p in exported if p[-1] not in ("lora_a", "lora_b")}
    assert len({name for name, _ in names.values()}) == len(names)  # no scale shares a weight's name
