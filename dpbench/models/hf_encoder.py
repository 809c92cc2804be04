"""Hugging Face BERT / RoBERTa checkpoints (``config.json`` + safetensors) for the Flax encoder.

Reads tensors with ``dpbench.models.checkpoints.read_safetensors`` (no torch at run time) and maps
every Hugging Face name explicitly onto the parameter paths of ``dpbench.models.encoder``. Loading is
strict: a missing backbone tensor, a tensor of the wrong shape, or a tensor that is neither used nor
on the ``IGNORED`` allowlist is an error, so a checkpoint can never be half-loaded silently.

Both prefixed names (``roberta.encoder...`` from ``*ForSequenceClassification`` / ``*ForMaskedLM``)
and unprefixed ones (``encoder...`` from ``BertModel`` / sentence-transformers, e.g. all-MiniLM-L6-v2)
are accepted.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from dpbench.models.checkpoints import read_safetensors

FAMILIES = ("bert", "roberta")

# Tensors a checkpoint may carry that the classifier does not use (as HF's own
# *ForSequenceClassification ignores them): position/token-type id buffers, pre-training heads
# (BERT MLM/NSP ``cls.*``, RoBERTa ``lm_head.*``), and RoBERTa's pooler, which HF's RoBERTa
# classification head does not use either.
IGNORED = {
    "bert": (r"embeddings\.position_ids", r"embeddings\.token_type_ids", r"cls\..*"),
    "roberta": (r"embeddings\.position_ids", r"embeddings\.token_type_ids", r"lm_head\..*", r"pooler\..*"),
}


@dataclasses.dataclass(frozen=True)
class EncoderArch:
    """Shape of a BERT-style encoder, with the fields of Hugging Face's ``config.json``."""

    family: str  # "bert" (positions 0..T-1) or "roberta" (positions from pad_token_id + 1)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"encoder family={self.family!r} is not supported; choose one of {FAMILIES}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")

    def max_seq_len(self) -> int:
        """Longest input the position table covers (RoBERTa spends pad_token_id + 1 rows on offsets).

        >>> EncoderArch("roberta", 50265, 768, 12, 12, 3072, 514, 1, 1, 1e-5).max_seq_len()
        512
        >>> EncoderArch("bert", 30522, 384, 6, 12, 1536).max_seq_len()
        512
        """
        if self.family == "roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings


def arch_from_hf_config(config: dict) -> EncoderArch:
    """The architecture that a Hugging Face ``config.json`` (as a dict) describes."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"config.json model_type={family!r} is not supported; choose one of {FAMILIES}")
    # The Flax blocks implement exactly these; anything else would load but compute something else.
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(
            f"config.json hidden_act={config['hidden_act']!r} is not supported; only 'gelu' (erf)"
        )
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"config.json position_embedding_type={config['position_embedding_type']!r} is not supported; "
            "only 'absolute'"
        )
    return EncoderArch(
        family=family,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        max_position_embeddings=config["max_position_embeddings"],
        type_vocab_size=config["type_vocab_size"],
        pad_token_id=config.get("pad_token_id") if config.get("pad_token_id") is not None else 0,
        layer_norm_eps=config["layer_norm_eps"],
    )


def _linear(hf_name: str, ours: str, n_in: int, n_out: int) -> list[tuple[str, str, tuple[int, ...], bool]]:
    """A torch Linear (weight [out, in]) -> a Flax Dense (kernel [in, out], so transposed)."""
    return [
        (f"{hf_name}.weight", f"{ours}/kernel", (n_in, n_out), True),
        (f"{hf_name}.bias", f"{ours}/bias", (n_out,), False),
    ]


def _layer_norm(hf_name: str, ours: str, n: int) -> list[tuple[str, str, tuple[int, ...], bool]]:
    return [
        (f"{hf_name}.weight", f"{ours}/scale", (n,), False),
        (f"{hf_name}.bias", f"{ours}/bias", (n,), False),
    ]


def backbone_name_map(arch: EncoderArch) -> list[tuple[str, str, tuple[int, ...], bool]]:
    """(HF name without family prefix, our '/'-joined param path, our shape, transpose?) for every
    backbone tensor; the Flax model keeps the backbone under ``encoder/``."""
    h, f = arch.hidden_size, arch.intermediate_size
    emb = "encoder/embeddings"
    table = [
        (
            "embeddings.word_embeddings.weight",
            f"{emb}/word_embeddings/embedding",
            (arch.vocab_size, h),
            False,
        ),
        (
            "embeddings.position_embeddings.weight",
            f"{emb}/position_embeddings/embedding",
            (arch.max_position_embeddings, h),
            False,
        ),
        (
            "embeddings.token_type_embeddings.weight",
            f"{emb}/token_type_embeddings/embedding",
            (arch.type_vocab_size, h),
            False,
        ),
        *_layer_norm("embeddings.LayerNorm", f"{emb}/norm", h),
    ]
    for i in range(arch.num_layers):
        hf, ours = f"encoder.layer.{i}", f"encoder/layer_{i}"
        for proj in ("query", "key", "value"):
            table += _linear(f"{hf}.attention.self.{proj}", f"{ours}/attention/{proj}", h, h)
        table += _linear(f"{hf}.attention.output.dense", f"{ours}/attention_output", h, h)
        table += _layer_norm(f"{hf}.attention.output.LayerNorm", f"{ours}/attention_norm", h)
        table += _linear(f"{hf}.intermediate.dense", f"{ours}/intermediate", h, f)
        table += _linear(f"{hf}.output.dense", f"{ours}/output", f, h)
        table += _layer_norm(f"{hf}.output.LayerNorm", f"{ours}/output_norm", h)
    return table


def head_name_map(
    arch: EncoderArch, num_labels: int
) -> dict[str, list[tuple[str, str, tuple[int, ...], bool]]]:
    """Optional head tensors by our head layer: RoBERTa's ``classifier.dense/out_proj``; for BERT the
    pooler (dense-tanh on [CLS]) is the head's first dense and ``classifier`` its out layer, which is
    exactly BertForSequenceClassification."""
    h = arch.hidden_size
    if arch.family == "roberta":
        dense, out = "classifier.dense", "classifier.out_proj"
    else:
        dense, out = "pooler.dense", "classifier"
    return {
        "classifier/dense": _linear(dense, "classifier/dense", h, h),
        "classifier/out_proj": _linear(out, "classifier/out_proj", h, num_labels),
    }


@dataclasses.dataclass
class LoadedEncoder:
    arch: EncoderArch
    params: dict[str, np.ndarray]  # our '/'-joined param path -> float32 array in Flax layout
    head_loaded: list[str]  # head layers found in the checkpoint, e.g. ["classifier/dense"]


def map_hf_tensors(tensors: dict[str, np.ndarray], arch: EncoderArch, num_labels: int) -> LoadedEncoder:
    """Map HF tensor names to our parameter paths, strictly (see the module docstring)."""
    prefix = f"{arch.family}."
    # Backbone names lose the family prefix; head names (classifier.*) never carry it.
    stripped = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in tensors.items()}
    if len(stripped) != len(tensors):
        raise ValueError(f"checkpoint holds the same tensor with and without the {prefix!r} prefix")

    def take(entries, out: dict[str, np.ndarray]) -> None:
        for hf_name, ours, shape, transpose in entries:
            value = stripped[hf_name]
            value = value.T if transpose else value
            if value.shape != shape:
                raise ValueError(
                    f"checkpoint tensor {hf_name!r} has shape {tuple(stripped[hf_name].shape)}, "
                    f"expected {shape[::-1] if transpose else shape} for {arch}"
                )
            out[ours] = np.asarray(value, dtype=np.float32)

    backbone = backbone_name_map(arch)
    missing = [name for name, *_ in backbone if name not in stripped]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} {arch.family} tensors, e.g. {missing[:5]}")
    params: dict[str, np.ndarray] = {}
    take(backbone, params)
    used = {name for name, *_ in backbone}

    head_loaded = []
    for layer, entries in head_name_map(arch, num_labels).items():
        present = [name for name, *_ in entries if name in stripped]
        if not present:
            continue
        if len(present) != len(entries):
            raise ValueError(f"checkpoint has only part of the head layer {layer}: {present}")
        if layer == "classifier/out_proj" and stripped[present[0]].shape[0] != num_labels:
            raise ValueError(
                f"checkpoint head {present[0]!r} has {stripped[present[0]].shape[0]} labels "
                f"but model.num_labels={num_labels}; use a checkpoint without this head or match num_labels"
            )
        take(entries, params)
        used.update(present)
        head_loaded.append(layer)

    unexpected = [
        name
        for name in stripped
        if name not in used and not any(re.fullmatch(p, name) for p in IGNORED[arch.family])
    ]
    if unexpected:
        raise ValueError(
            f"checkpoint has {len(unexpected)} tensors the {arch.family} encoder does not know, "
            f"e.g. {sorted(unexpected)[:5]}; known extras that are ignored: {IGNORED[arch.family]}"
        )
    return LoadedEncoder(arch=arch, params=params, head_loaded=head_loaded)


def hf_names(arch: EncoderArch, num_labels: int) -> dict[str, tuple[str, bool]]:
    """Our '/'-joined parameter path -> (tensor name of ``{Bert,Roberta}ForSequenceClassification``,
    transposed?): the loader's tables reversed, the family prefix put back on the backbone."""
    entries = backbone_name_map(arch) + [
        e for layer in head_name_map(arch, num_labels).values() for e in layer
    ]
    return {
        ours: (hf if hf.startswith("classifier") else f"{arch.family}.{hf}", transpose)
        for hf, ours, _, transpose in entries
    }


def hf_config(arch: EncoderArch, num_labels: int) -> dict:
    """The ``config.json`` of ``{Bert,Roberta}ForSequenceClassification`` with this architecture
    (:func:`arch_from_hf_config` reads it back to ``arch``)."""
    family = {"bert": "Bert", "roberta": "Roberta"}[arch.family]
    return {
        "model_type": arch.family,
        "architectures": [f"{family}ForSequenceClassification"],
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "intermediate_size": arch.intermediate_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "type_vocab_size": arch.type_vocab_size,
        "pad_token_id": arch.pad_token_id,
        "layer_norm_eps": arch.layer_norm_eps,
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(num_labels)},
    }


def read_arch(checkpoint_dir: str | Path) -> EncoderArch:
    """The architecture in a BERT/RoBERTa checkpoint folder's ``config.json`` (no tensor is read)."""
    config_path = Path(checkpoint_dir) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(
            f"{checkpoint_dir} has no config.json; is it a Hugging Face checkpoint folder?"
        )
    return arch_from_hf_config(json.loads(config_path.read_text()))


def load_hf_encoder(checkpoint_dir: str | Path, num_labels: int) -> LoadedEncoder:
    """Read ``config.json`` and the safetensors weights of a BERT/RoBERTa checkpoint folder."""
    arch = read_arch(checkpoint_dir)
    return map_hf_tensors(read_safetensors(checkpoint_dir), arch, num_labels)
