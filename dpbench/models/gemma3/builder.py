"""``build_gemma3``: the ``ModelBundle`` of a Gemma 3 checkpoint (or random weights), its parameter
labels, and the shapes-only bundle that ``python -m dpbench.plan`` compiles against."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from dpbench.models import quant
from dpbench.models.base import ModelBundle, finetune_labels, layer_label, trainable_by_labels
from dpbench.models.checkpoints import read_safetensors
from dpbench.models.gemma3.config import DTYPES, PRESETS, Gemma3Config, Gemma3ModelConfig, validate
from dpbench.models.gemma3.loading import (
    gguf_hf_config,
    hf_name,
    load_gguf_params,
    map_hf_tensors,
    read_gguf,
    read_hf_config,
    resolve_checkpoint,
)
from dpbench.models.gemma3.model import EMBEDDING_PATH, Gemma3, gathers_at_use, head_logits
from dpbench.models.gemma3.tokenizer import Gemma3ByteTokenizer, Gemma3Tokenizer
from dpbench.models.lora import LoraSpec, effective_rank, is_lora_param, lora_label


def _read_checkpoint(path: Path, load_weights: bool):
    """(architecture, tokenizer, flat weights or None, source) of a folder or GGUF file."""
    if path.suffix == ".gguf":
        gguf = read_gguf(path)
        tokenizer = Gemma3Tokenizer.from_gguf_metadata(gguf.metadata)
        if load_weights:
            weights, hf_config = load_gguf_params(gguf)
        else:
            weights, hf_config = None, gguf_hf_config(gguf)
        return Gemma3Config.from_hf(hf_config), tokenizer, weights, f"gguf:{path}"
    tokenizer = Gemma3Tokenizer.from_dir(path)
    hf_config = read_hf_config(path)
    weights = map_hf_tensors(read_safetensors(path)) if load_weights else None
    return Gemma3Config.from_hf(hf_config), tokenizer, weights, f"hf:{path}"


def _dummy_inputs() -> tuple[jax.Array, jax.Array]:
    """One token: what ``init`` needs to trace the model (parameter shapes do not depend on it)."""
    return jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32)


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


_A_KERNEL = ("layer_0", "attn", "q_proj", "kernel")


def quantized_parts(cfg) -> tuple[str, str]:
    """``(kernels, embedding)``: the ``model.frozen_quantization`` of the decoder kernels and of the tied
    embedding, ``none`` for whichever ``model.finetune`` trains (trainable weights stay float32)."""
    scheme = getattr(cfg, "frozen_quantization", "none")
    in_float32 = stored_in_float32(cfg.finetune)
    return (
        "none" if in_float32(_A_KERNEL) else scheme,
        "none" if in_float32(EMBEDDING_PATH) else scheme,
    )


def quantized_specs(module: Gemma3, paths) -> dict[tuple[str, ...], tuple[str, int]]:
    """``{path: (scheme, contraction axis)}`` of the weights ``module`` stores quantized, among ``paths``."""
    specs = {}
    for path in paths:
        if module.quantization != "none" and path[-1] == "kernel" and not is_lora_param(path):
            specs[path] = (module.quantization, 0)
        elif module.embed_quantization != "none" and tuple(path) == EMBEDDING_PATH:
            specs[path] = (module.embed_quantization, -1)
    return specs


def _module(cfg, config: Gemma3Config, lora: LoraSpec, dtype: Any) -> Gemma3:
    kernels, embedding = quantized_parts(cfg)
    return Gemma3(
        config,
        lora,
        dtype,
        remat=getattr(cfg, "remat", "none"),
        quantization=kernels,
        embed_quantization=embedding,
    )


def build_gemma3(
    cfg: Gemma3ModelConfig, rng: jax.Array, placement=None, abstract: bool = False
) -> ModelBundle:
    """Gemma 3 with pretrained (or, for ``random_init``, random) weights and LoRA on ``lora_targets``.

    Trainable: the labels ``model.finetune`` trains (lora: the LoRA factors). ``apply_fn(params, batch)``
    gives float32 logits ``[B, T, V]`` from ``batch["input_ids"]`` and ``batch["attention_mask"]``.
    ``placement(flat, dtype)`` puts the weights on devices (``dpbench.train.sharding.placement``: each
    device reads its own slice of the checkpoint); by default they go whole to the default device.
    Frozen weights are stored in ``model.dtype``; trainable ones in float32 (``stored_in_float32``).

    ``abstract``: shapes only (``python -m dpbench.plan``), see :func:`_shapes_only`.
    """
    validate(cfg)
    dtype = DTYPES[cfg.dtype]
    lora = LoraSpec(
        rank=effective_rank(cfg.finetune, cfg.lora_rank),
        alpha=cfg.lora_alpha,
        targets=tuple(cfg.lora_targets),
    )
    if abstract:
        return _shapes_only(cfg, rng, dtype, lora)
    tokenizer, weights, source = None, None, "random init"
    config = PRESETS[cfg.preset] if cfg.preset is not None else None
    if cfg.checkpoint is not None:
        path = resolve_checkpoint(cfg.checkpoint, cfg.cache_dir)
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

    module = _module(cfg, config, lora, dtype)
    dummy = _dummy_inputs()
    float_module = module.clone(quantization="none", embed_quantization="none")  # the checkpoint's shapes
    expected = flatten_dict(jax.eval_shape(float_module.init, rng, *dummy)["params"])
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
    specs = quantized_specs(module, weights)
    if specs:  # on the host, tensor by tensor; codes and scales keep their own dtypes
        codes = quant.quantize_flat({p: weights.pop(p) for p in specs}, specs)
        flat = placement(codes)
    else:
        flat = {}
    flat.update(placement({p: v for p, v in weights.items() if not in_float32(p)}, dtype=dtype))
    flat.update(placement({p: v for p, v in weights.items() if in_float32(p)}, dtype=jnp.float32))
    flat.update(placement(_lora_params(module, rng, dummy)))  # float32, as initialised
    params = unflatten_dict(flat)

    return _bundle(module, config, dtype, params, finetune_labels(cfg.finetune), source, tokenizer, lora)


def _shapes_only(cfg, rng: jax.Array, dtype: Any, lora: LoraSpec) -> ModelBundle:
    """The bundle ``build_gemma3`` would build, with ``jax.ShapeDtypeStruct`` parameters of
    ``model.preset``'s architecture in the dtypes they would be stored in. Nothing is read, not even
    the checkpoint's tokenizer (``Gemma3ByteTokenizer``, with Gemma's special ids, stands in), and
    nothing is initialised."""
    if cfg.preset is None:
        raise ValueError("shapes only: set model.preset (the architecture; the checkpoint is not read)")
    config = PRESETS[cfg.preset]
    module = _module(cfg, config, lora, dtype)
    shapes = flatten_dict(jax.eval_shape(module.init, rng, *_dummy_inputs())["params"])
    in_float32 = stored_in_float32(cfg.finetune)
    quantized = set(quantized_specs(module, shapes))
    quantized |= {p[:-1] + (quant.scale_name(p[-1]),) for p in quantized}

    def stored_dtype(p, s):
        if p in quantized:  # int8 / uint8 codes, float32 scales
            return s.dtype
        return jnp.float32 if in_float32(p) or is_lora_param(p) else dtype

    params = {p: jax.ShapeDtypeStruct(s.shape, stored_dtype(p, s)) for p, s in shapes.items()}
    trainable_labels = finetune_labels(cfg.finetune)
    source = f"none: shapes only ({cfg.preset})"
    return _bundle(
        module, config, dtype, unflatten_dict(params), trainable_labels, source, Gemma3ByteTokenizer(), lora
    )


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
        return head_logits(module, params, hidden)

    def dequantize(params):
        """``params`` with the quantized weights as float32 arrays (``dpbench.models.saved.float_params``)."""
        flat = flatten_dict(params)
        specs = quantized_specs(module, list(flat))
        return unflatten_dict(quant.dequantize_flat(flat, specs)) if specs else params

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
            "dequantize": dequantize,
        },
        float32_variant=float32_variant,
        gathered_at_use=gathers_at_use,
    )


def saved_architecture(bundle: ModelBundle) -> dict:
    """What :func:`from_saved` needs beside ``model.*`` (``dpbench.models.saved``): the architecture."""
    return dataclasses.asdict(bundle.extras["config"])


def from_saved(cfg, architecture: dict, params, directory: Path) -> ModelBundle:
    """The decoder of a saved model folder: its architecture, parameters and tokenizer files."""
    validate(cfg)
    config = Gemma3Config(**{**architecture, "layer_types": tuple(architecture["layer_types"])})
    dtype = DTYPES[cfg.dtype]
    lora = LoraSpec(
        rank=effective_rank(cfg.finetune, cfg.lora_rank),
        alpha=cfg.lora_alpha,
        targets=tuple(cfg.lora_targets),
    )
    tokenizer = None
    if cfg.tokenizer == "bytes":
        tokenizer = Gemma3ByteTokenizer()
    elif (Path(directory) / "tokenizer.json").exists() or (Path(directory) / "tokenizer.model").exists():
        tokenizer = Gemma3Tokenizer.from_dir(directory)
    module = _module(cfg, config, lora, dtype).clone(remat="none")
    trainable = finetune_labels(cfg.finetune)
    return _bundle(module, config, dtype, params, trainable, f"saved:{directory}", tokenizer, lora)


def hf_layout(bundle: ModelBundle):
    """``Gemma3ForCausalLM``: its config.json (with the tokenizer's special ids) and tensor names."""
    from dpbench.models.saved import HFLayout

    config = bundle.extras["config"].to_hf()
    tok = bundle.tokenizer
    if tok is not None:
        config.update(pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
    paths = flatten_dict(bundle.extras["dequantize"](bundle.params)).keys()  # no scales
    names = {path: hf_name(path) for path in paths if not is_lora_param(path)}
    return HFLayout(config, names, peft_task="CAUSAL_LM")
