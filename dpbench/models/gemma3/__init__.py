"""Gemma 3 (text decoder) in Flax, in the layout of google-deepmind/gemma's ``gm/nn``.

- ``config``: the architecture ``Gemma3Config``, the published sizes ``PRESETS``, and the Hydra schema
  ``Gemma3ModelConfig`` (``model=gemma3_*``) with its checks;
- ``layers``: attention, MLP and the decoder block;
- ``model``: the ``Gemma3`` module (``Gemma3ForCausalLM``), its KV cache and tied output layer;
- ``builder``: ``build_gemma3`` (``dpbench.models.registry``'s ``gemma3``) and parameter labels;
- ``loading``: checkpoint names and files (Hugging Face safetensors folders, GGUF);
- ``tokenizer``: the checkpoint's tokenizer, and a byte tokenizer for tiny models;
- ``generate``: batched greedy decoding with the KV cache.

The names below are importable from ``dpbench.models.gemma3`` itself.
"""

from dpbench.models.gemma3.builder import (
    build_gemma3,
    from_saved,
    hf_layout,
    label_of,
    saved_architecture,
    stored_in_float32,
)
from dpbench.models.gemma3.config import (
    ACTIVATIONS,
    DTYPES,
    GLOBAL,
    PRESETS,
    SLIDING,
    TOKENIZERS,
    Gemma3Config,
    Gemma3ModelConfig,
)
from dpbench.models.gemma3.generate import Sampling, generate, greedy_generate
from dpbench.models.gemma3.layers import MLP, Attention, DecoderLayer, attention_masks, rope
from dpbench.models.gemma3.model import (
    EMBEDDING_PATH,
    REMAT_POLICIES,
    Gemma3,
    gathers_at_use,
    head_logits,
    init_cache,
    remat_layer,
    tied_logits,
)
from dpbench.models.gemma3.tokenizer import Gemma3ByteTokenizer, Gemma3Tokenizer

INPUT = "text"  # what it reads (a dataset module's INPUT)
TASKS = ("summarization",)  # the dataset.task values it serves
build = build_gemma3  # model.arch=gemma3 (dpbench.models.registry)

__all__ = [
    "ACTIVATIONS",
    "DTYPES",
    "EMBEDDING_PATH",
    "GLOBAL",
    "MLP",
    "PRESETS",
    "REMAT_POLICIES",
    "SLIDING",
    "Sampling",
    "TOKENIZERS",
    "Attention",
    "DecoderLayer",
    "Gemma3",
    "Gemma3ByteTokenizer",
    "Gemma3Config",
    "Gemma3ModelConfig",
    "Gemma3Tokenizer",
    "attention_masks",
    "build",
    "build_gemma3",
    "from_saved",
    "gathers_at_use",
    "generate",
    "greedy_generate",
    "head_logits",
    "hf_layout",
    "init_cache",
    "label_of",
    "remat_layer",
    "rope",
    "saved_architecture",
    "stored_in_float32",
    "tied_logits",
]
