"""The four workloads of the head-to-head benchmark, and their synthetic batches.

Every framework gets the same architecture, batch shapes, optimizer and clip norm; only the
weights may differ (they do not change the cost of a step). A *logical* batch is processed as
``batch_size / physical_batch_size`` physical batches whose gradients are accumulated, then one
optimizer step: the same structure as a dpbench logical step.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Tokens the decoder loss is computed on (the response of a prompt + response sequence); the
# rest of each sequence is prompt. The SAMSum CPU experiment has prompts of 240 tokens.
DECODER_PROMPT_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Workload:
    key: str  # a, b, c, d
    title: str
    kind: str  # cnn | encoder | decoder
    finetune: str  # full | lora
    batch_size: int  # logical batch
    physical_batch_size: int
    seq_len: int = 0  # text workloads
    dpbench_model: str = "cnn"  # conf/model/<name>.yaml
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ()
    optimizer: str = "sgd"  # sgd (momentum 0.9) | adamw
    learning_rate: float = 0.1
    clip_norm: float = 1.0
    timed_steps: int = 3  # per subprocess, after one warm-up (compiling) step
    vocab_size: int = 0  # token ids of the synthetic batch are drawn below this
    # Architecture for the torch side where no checkpoint gives it (decoders, tiny encoders); the
    # decoder dims are dpbench's Gemma 3 presets (tests/cli/test_bench_cli.py checks they agree).
    torch_dims: dict = dataclasses.field(default_factory=dict)
    # conf/model overrides on top of dpbench_model (random weights and the dims of a shape, dtype)
    model_overrides: tuple[str, ...] = ()
    # Draw the random weights on the device from the model's abstract shapes: a 4B model drawn on the
    # host (the builder's random_init) costs ~17 GB of host memory and half a minute per process.
    random_weights_on_device: bool = False
    torch_dtype: str = "float32"  # the torch side's parameter dtype (bfloat16: LoRA factors too)

    @property
    def num_physical(self) -> int:
        return self.batch_size // self.physical_batch_size

    def describe(self) -> str:
        shape = f"batch {self.batch_size}"
        if self.seq_len:
            shape += f" x {self.seq_len} tokens"
        return f"{shape}, physical batches of {self.physical_batch_size}"


_MINILM = dict(
    dpbench_model="minilm",
    kind="encoder",
    seq_len=64,
    optimizer="adamw",
    learning_rate=5e-4,
    vocab_size=30522,
)
# conf/model/tiny_encoder.yaml
_TINY_ENCODER_DIMS = dict(
    vocab_size=259, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=258
)
# dpbench.models.gemma3.PRESETS["270m"] (the GGUF's architecture) and PRESETS["tiny"]
GEMMA3_270M_DIMS = dict(
    vocab_size=262144,
    hidden_size=640,
    intermediate_size=2048,
    num_layers=18,
    num_heads=4,
    num_kv_heads=1,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=512,
)
GEMMA3_TINY_DIMS = dict(
    vocab_size=261,
    hidden_size=32,
    intermediate_size=64,
    num_layers=6,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=16,
)

FULL: dict[str, Workload] = {
    "a": Workload(
        "a",
        "MNIST CNN (jax_privacy tutorial), full training",
        kind="cnn",
        finetune="full",
        batch_size=256,
        physical_batch_size=128,
        clip_norm=0.1,
        timed_steps=5,
    ),
    "b": Workload(
        "b",
        "MiniLM-L6 + LoRA r8 (query, value) + head",
        finetune="lora",
        batch_size=64,
        physical_batch_size=64,
        lora_rank=8,
        lora_alpha=16.0,
        lora_targets=("query", "value"),
        timed_steps=3,
        **_MINILM,
    ),
    "c": Workload(
        "c",
        "Gemma 3 270M + LoRA r32 (q, v), response-only loss",
        kind="decoder",
        finetune="lora",
        batch_size=4,
        physical_batch_size=4,
        seq_len=320,
        dpbench_model="gemma3_270m_gguf",
        lora_rank=32,
        lora_alpha=32.0,
        lora_targets=("q_proj", "v_proj"),
        optimizer="adamw",
        learning_rate=3e-3,
        timed_steps=2,
        vocab_size=GEMMA3_270M_DIMS["vocab_size"],
        torch_dims=GEMMA3_270M_DIMS,
    ),
    "d": Workload(
        "d",
        "MiniLM-L6 full fine-tuning (every parameter)",
        finetune="full",
        batch_size=64,
        physical_batch_size=16,
        timed_steps=2,
        **_MINILM,
    ),
}

# ``--quick``: the same four structures on tiny models, for smoke runs and the unit test.
QUICK: dict[str, Workload] = {
    "a": dataclasses.replace(FULL["a"], batch_size=16, physical_batch_size=8, timed_steps=2),
    "b": dataclasses.replace(
        FULL["b"],
        dpbench_model="tiny_encoder",
        batch_size=8,
        physical_batch_size=4,
        seq_len=16,
        lora_rank=4,
        lora_alpha=8.0,
        timed_steps=2,
        vocab_size=_TINY_ENCODER_DIMS["vocab_size"],
        torch_dims=_TINY_ENCODER_DIMS,
    ),
    "c": dataclasses.replace(
        FULL["c"],
        dpbench_model="tiny_gemma3",
        batch_size=2,
        physical_batch_size=1,
        seq_len=32,
        lora_rank=4,
        lora_alpha=8.0,
        timed_steps=2,
        vocab_size=GEMMA3_TINY_DIMS["vocab_size"],
        torch_dims=GEMMA3_TINY_DIMS,
    ),
    "d": dataclasses.replace(
        FULL["d"],
        dpbench_model="tiny_encoder",
        batch_size=8,
        physical_batch_size=4,
        seq_len=16,
        timed_steps=2,
        vocab_size=_TINY_ENCODER_DIMS["vocab_size"],
        torch_dims=_TINY_ENCODER_DIMS,
    ),
}


# The accelerator bench (``python -m dpbench.bench --device gpu``): Gemma 3 1B- and 4B-shaped
# decoders with random weights + LoRA r32 in bfloat16 at sequence 512 (the samsum_gemma setting), and
# a RoBERTa-base-shaped encoder fully fine-tuned at sequence 512. Physical batches sized for one 80 GB
# device under every dp.clipping (python -m dpbench.plan compute=gpu checks the same shapes).
_RANDOM_GEMMA = ("checkpoint=null", "random_init=true", "tokenizer=bytes", "dtype=bfloat16")
_GEMMA_LORA = dict(
    kind="decoder",
    finetune="lora",
    seq_len=512,
    lora_rank=32,
    lora_alpha=32.0,
    lora_targets=("q_proj", "v_proj"),
    optimizer="adamw",
    learning_rate=3e-3,
    timed_steps=3,
    random_weights_on_device=True,
    torch_dtype="bfloat16",
)
# RoBERTa-base's architecture (roberta-base's config.json) as a random encoder_schema model.
ROBERTA_BASE_DIMS = dict(
    vocab_size=50265, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, max_positions=514
)


def _random_encoder(dims: dict) -> tuple[str, ...]:
    """conf/model/tiny_encoder.yaml's random_init with these dims (a random encoder of that shape)."""
    keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
    return (
        "random_init.family=roberta",
        *(f"random_init.{k}={dims[k]}" for k in keys),
        f"random_init.max_position_embeddings={dims['max_positions']}",
    )


def _gemma_dims(preset: str) -> dict:
    from dpbench.models.gemma3 import PRESETS

    config = PRESETS[preset]
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")
    keys += ("head_dim", "query_pre_attn_scalar", "sliding_window")
    return {k: getattr(config, k) for k in keys}


def accelerator_workloads(quick: bool) -> dict[str, Workload]:
    """The accelerator bench's workloads; ``quick``: the same structures on tiny models (CPU tests)."""
    if quick:
        tiny_gemma = dict(
            _GEMMA_LORA,
            dpbench_model="tiny_gemma3",
            model_overrides=("dtype=bfloat16",),
            batch_size=4,
            physical_batch_size=2,
            seq_len=32,
            lora_rank=4,
            lora_alpha=4.0,
            timed_steps=2,
            vocab_size=GEMMA3_TINY_DIMS["vocab_size"],
            torch_dims=GEMMA3_TINY_DIMS,
        )
        return {
            "gemma3_1b": Workload("gemma3_1b", "Gemma 3 1B shape (quick: tiny) + LoRA", **tiny_gemma),
            "gemma3_4b": Workload("gemma3_4b", "Gemma 3 4B shape (quick: tiny) + LoRA", **tiny_gemma),
            "roberta_base": Workload(
                "roberta_base",
                "RoBERTa-base shape (quick: tiny), full fine-tuning",
                kind="encoder",
                finetune="full",
                batch_size=4,
                physical_batch_size=2,
                seq_len=16,
                dpbench_model="tiny_encoder",
                optimizer="adamw",
                learning_rate=5e-4,
                timed_steps=2,
                vocab_size=_TINY_ENCODER_DIMS["vocab_size"],
                torch_dims=_TINY_ENCODER_DIMS,
            ),
        }
    gemma = {}
    for preset, physical in (("1b", 16), ("4b", 8)):
        dims = _gemma_dims(preset)
        gemma[f"gemma3_{preset}"] = Workload(
            f"gemma3_{preset}",
            f"Gemma 3 {preset.upper()} shape, random weights, + LoRA r32 (q, v), bfloat16",
            dpbench_model=f"gemma3_{preset}",
            model_overrides=_RANDOM_GEMMA,
            batch_size=32,
            physical_batch_size=physical,
            vocab_size=dims["vocab_size"],
            torch_dims=dims,
            **_GEMMA_LORA,
        )
    roberta = Workload(
        "roberta_base",
        "RoBERTa-base shape, random weights, full fine-tuning",
        kind="encoder",
        finetune="full",
        batch_size=64,
        physical_batch_size=32,
        seq_len=512,
        dpbench_model="tiny_encoder",
        model_overrides=_random_encoder(ROBERTA_BASE_DIMS),
        optimizer="adamw",
        learning_rate=5e-5,
        timed_steps=3,
        vocab_size=ROBERTA_BASE_DIMS["vocab_size"],
        torch_dims=ROBERTA_BASE_DIMS,
    )
    return {**gemma, "roberta_base": roberta}


def get(key: str, quick: bool) -> Workload:
    table = QUICK if quick else FULL
    if key not in table:
        raise ValueError(f"workload {key!r} is not known; choose from {', '.join(table)}")
    return table[key]


def find(key: str, quick: bool) -> Workload:
    """A workload of either bench (the worker's lookup): a-d, or an accelerator bench key."""
    table = {**(QUICK if quick else FULL), **accelerator_workloads(quick)}
    if key not in table:
        raise ValueError(f"workload {key!r} is not known; choose from {', '.join(table)}")
    return table[key]


def decoder_split(seq_len: int) -> tuple[int, int]:
    """(prompt tokens, response tokens) of one decoder example."""
    prompt = int(seq_len * DECODER_PROMPT_FRACTION)
    return prompt, seq_len - prompt


def make_batch(workload: Workload, seed: int = 0) -> dict[str, np.ndarray]:
    """One logical batch of random data in dpbench's layout (NHWC images; int32 token ids).

    Every framework draws the same numbers; the torch side transposes images to NCHW.
    """
    rng = np.random.default_rng(seed)
    n = workload.batch_size
    if workload.kind == "cnn":
        return {
            "image": rng.uniform(size=(n, 28, 28, 1)).astype(np.float32),
            "label": rng.integers(0, 10, n).astype(np.int32),
        }
    # Ids above the special tokens of every tokenizer used here (byte tokenizers reserve < 8).
    ids = rng.integers(8, workload.vocab_size, (n, workload.seq_len)).astype(np.int32)
    mask = np.ones((n, workload.seq_len), np.int32)
    if workload.kind == "encoder":
        return {"input_ids": ids, "attention_mask": mask, "label": rng.integers(0, 2, n).astype(np.int32)}
    prompt, _ = decoder_split(workload.seq_len)
    loss_mask = np.zeros((n, workload.seq_len), np.int32)
    loss_mask[:, prompt:] = 1
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}
