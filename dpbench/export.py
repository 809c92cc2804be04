"""``python -m dpbench.export RUN_DIR --format peft|merged``: a run's model for Hugging Face.

    python -m dpbench.export RUN_DIR --format merged          # RUN_DIR/export/merged/
    python -m dpbench.export RUN_DIR --format peft --out DIR  # a PEFT LoRA adapter

- ``merged``: a checkpoint in the Hugging Face layout (``config.json``, ``model.safetensors`` and the
  tokenizer's files) with LoRA folded into the kernels (``W + alpha/r · A B``), for
  ``AutoModelForSequenceClassification`` (the encoder) or ``AutoModelForCausalLM`` (Gemma 3).
- ``peft``: ``adapter_config.json`` and ``adapter_model.safetensors`` under Hugging Face module names
  (rank, alpha, target modules, and the trained head as ``modules_to_save``), naming the base model.
  The frozen A of FFA is exported like any A. A base that is no Hugging Face folder (a GGUF file, or
  random weights) is written beside the adapter, in ``base/``, and named. Only LoRA runs
  (``model.finetune=lora``) have an adapter; ``full`` and ``head`` runs export ``merged``.

The model comes from ``RUN_DIR/model`` (or ``--step N``: checkpoint N), as for ``dpbench.sample``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from flax.traverse_util import flatten_dict

from dpbench.config import exit_on_setting_error
from dpbench.errors import ConfigError
from dpbench.models import saved as saved_lib
from dpbench.models.lora import effective_rank, is_lora_param, merge_lora
from dpbench.sample import load

FORMATS = ("peft", "merged")
ADAPTER_PREFIX = "base_model.model."


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpbench.export", description="A run's model for Hugging Face."
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (or its model/ folder)")
    p.add_argument("--format", required=True, help="peft (a LoRA adapter) or merged (a full checkpoint)")
    p.add_argument("--out", type=Path, help="the export folder (default: RUN_DIR/export/FORMAT)")
    p.add_argument("--step", type=int, help="export checkpoint N instead of the final model/")
    return p


def _lora_rank(model_cfg: dict) -> int:
    return effective_rank(model_cfg.get("finetune", "full"), model_cfg.get("lora_rank", 0))


def write_hf_checkpoint(out: Path, layout: saved_lib.HFLayout, flat: dict, tokenizer) -> Path:
    """``config.json``, ``model.safetensors`` (Hugging Face names, torch layouts) and the tokenizer."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, value in flat.items():
        name, transpose = layout.names[path]
        value = np.asarray(value)
        tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    dtypes = {str(v.dtype) for v in tensors.values()}
    config = {**layout.config, "dtype": "bfloat16" if dtypes == {"bfloat16"} else "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def export_merged(saved: saved_lib.SavedModel, out: Path) -> Path:
    layout = saved_lib.hf_layout(saved)
    model_cfg = saved.config["model"]
    params = saved_lib.float_params(saved.bundle)  # a quantized base dequantised, as the run used it
    rank = _lora_rank(model_cfg)
    if rank:
        params = merge_lora(params, model_cfg["lora_alpha"] / rank)
    return write_hf_checkpoint(out, layout, flatten_dict(params), saved.bundle.tokenizer)


def base_reference(saved: saved_lib.SavedModel) -> str | None:
    """The Hugging Face folder (or hub id) of the run's base weights; None if they are not one."""
    model_cfg, source = saved.config["model"], str(saved.config.get("base_weights", ""))
    if model_cfg.get("random_init") or not source.startswith("hf:"):
        return None
    checkpoint = model_cfg.get("checkpoint") or ""
    local = checkpoint.startswith(("pkg:", "/", ".", "~")) or Path(checkpoint).expanduser().exists()
    return source[len("hf:") :].split(" (")[0] if local else checkpoint


def export_peft(saved: saved_lib.SavedModel, out: Path) -> Path:
    from safetensors.numpy import save_file

    model_cfg = saved.config["model"]
    rank = _lora_rank(model_cfg)
    if not rank:
        raise ConfigError(
            f"--format peft needs a LoRA run (model.finetune=lora, model.lora_rank > 0); this run has "
            f"model.finetune={model_cfg.get('finetune')!r}, model.lora_rank={model_cfg.get('lora_rank')}: "
            "use --format merged"
        )
    layout = saved_lib.hf_layout(saved)
    bundle = saved.bundle
    flat = flatten_dict(saved_lib.float_params(bundle))
    tensors, targets, to_save = {}, set(), set()
    for path, value in flat.items():
        value = np.asarray(value)
        if is_lora_param(path):
            module = layout.names[path[:-1] + ("kernel",)][0].removesuffix(".weight")
            factor = "lora_A" if path[-1] == "lora_a" else "lora_B"
            tensors[f"{ADAPTER_PREFIX}{module}.{factor}.weight"] = np.ascontiguousarray(value.T)
            targets.add(module)
        elif bundle.is_trainable(path):  # the trained head: saved whole (PEFT's modules_to_save)
            name, transpose = layout.names[path]
            tensors[f"{ADAPTER_PREFIX}{name}"] = np.ascontiguousarray(value.T if transpose else value)
            to_save.add(name.rsplit(".", 1)[0])
    overlap = targets & to_save
    if overlap:
        raise ConfigError(
            f"--format peft: LoRA on trained head layers {sorted(overlap)}; use --format merged"
        )
    out.mkdir(parents=True, exist_ok=True)
    base = base_reference(saved)
    if base is None:  # no Hugging Face folder holds the base: write it beside the adapter
        base_flat = {p: v for p, v in flat.items() if not is_lora_param(p)}
        base = str(write_hf_checkpoint(out / "base", layout, base_flat, bundle.tokenizer).resolve())
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": layout.peft_task,
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": model_cfg["lora_alpha"],
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "modules_to_save": sorted(to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
    if bundle.tokenizer is not None:
        bundle.tokenizer.save(out)
    return out


def run(argv: list[str] | None = None) -> Path:
    args = parser().parse_args(argv)
    if args.format not in FORMATS:
        raise ConfigError(f"--format={args.format!r} is not allowed; choose one of {', '.join(FORMATS)}")
    saved = load(args.run_dir, args.step)
    saved_lib.hf_layout(saved)  # an architecture without a Hugging Face layout fails here, in one line
    run_dir = args.run_dir.parent if args.run_dir.name == saved_lib.MODEL_DIR else args.run_dir
    out = args.out or run_dir / "export" / args.format
    path = export_peft(saved, out) if args.format == "peft" else export_merged(saved, out)
    print(f"{args.format}: {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    with exit_on_setting_error():
        run(argv)


if __name__ == "__main__":
    main()
