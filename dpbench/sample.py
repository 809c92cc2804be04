"""``python -m dpbench.sample RUN_DIR``: generate text with (or classify text by) a run's trained model.

    python -m dpbench.sample outputs/2026-01-01/12-00-00 --prompt "A: hi\\nB: hello"
    python -m dpbench.sample RUN_DIR --file dialogues.jsonl --temperature 0.7 --top-p 0.9 --seed 1
    python -m dpbench.sample RUN_DIR --step 200 --prompt "a gripping film"   # a checkpoint's model

The model comes from ``RUN_DIR/model`` (written when a run completes), or with ``--step N`` from the
run's checkpoint N (its trainable parameters; the frozen ones are rebuilt from the run's config, as
a resumed run rebuilds them). Neither reads the training data nor the run's Hydra files.

Prompts come from ``--prompt`` (repeatable) or ``--file`` (JSONL: a string or an object with a
``prompt``, ``dialogue``, ``text`` or ``sentence`` field per line; any other file: one prompt per
line). A summarisation model gets each prompt inside its training template (``--raw``: as it is);
a classifier prints the predicted label and the probabilities. One JSON line per prompt goes to
stdout (or ``--output``). Decoding is greedy unless ``--temperature`` > 0, which samples (with
``--top-k``, ``--top-p``) from ``--seed``: a prompt's text does not depend on ``--batch-size``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from dpbench.config import exit_on_setting_error
from dpbench.errors import ConfigError
from dpbench.models import saved as saved_lib

PROMPT_FIELDS = ("prompt", "dialogue", "text", "sentence")
DEFAULT_MAX_NEW_TOKENS = 64
LENGTH_BUCKET = 32  # prompt batches are padded to a multiple of this (fewer compilations)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpbench.sample", description=__doc__.split("\n\n")[0].split(": ", 1)[1]
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (or its model/ folder)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more)")
    p.add_argument("--file", type=Path, help="prompts: JSONL, or text with one prompt per line")
    p.add_argument("--step", type=int, help="the model of checkpoint N instead of the final model/")
    p.add_argument(
        "--max-new-tokens", type=int, help="tokens to generate (default: the run's dataset setting)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="sample from the top-p probability mass, in (0, 1]"
    )
    p.add_argument("--seed", type=int, default=0, help="the sampling seed")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    p.add_argument("--raw", action="store_true", help="generate from the prompt as is, without the template")
    p.add_argument("--output", type=Path, help="write the JSON lines here instead of stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def read_prompts(prompts: list[str], file: Path | None) -> list[str]:
    """``--prompt`` values, then the prompts of ``--file``.

    >>> import tempfile; path = Path(tempfile.mkdtemp()) / "p.jsonl"
    >>> _ = path.write_text('{"dialogue": "A: hi"}\\n"plain"\\n\\n{"text": "x"}\\n')
    >>> read_prompts(["first"], path)
    ['first', 'A: hi', 'plain', 'x']
    """
    out = list(prompts)
    if file is not None:
        if not file.is_file():
            raise ConfigError(f"--file={file} does not exist")
        lines = [line for line in file.read_text().splitlines() if line.strip()]
        if file.suffix != ".jsonl":
            return out + lines
        for number, line in enumerate(lines, 1):
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"--file={file} line {number} is not JSON ({error.msg})") from None
            if isinstance(value, dict):
                field = next((f for f in PROMPT_FIELDS if f in value), None)
                if field is None:
                    raise ConfigError(
                        f"--file={file} line {number} has none of the fields {', '.join(PROMPT_FIELDS)}"
                    )
                value = value[field]
            out.append(str(value))
    if not out:
        raise ConfigError("no prompts: give --prompt TEXT (repeatable) or --file PATH")
    return out


def check_args(args) -> None:
    """One-line errors for values no decoding can use."""
    if args.temperature < 0:
        raise ConfigError(f"--temperature={args.temperature} is not allowed; it must be >= 0 (0: greedy)")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p={args.top_p} is not allowed; it must lie in (0, 1]")
    if args.top_k < 0:
        raise ConfigError(f"--top-k={args.top_k} is not allowed; it must be >= 0 (0: all tokens)")
    if args.temperature == 0 and (args.top_k or args.top_p < 1):
        raise ConfigError("--top-k and --top-p apply when sampling: set --temperature > 0 as well")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} is not allowed; it must be >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} is not allowed; it must be >= 1")


def load(run_dir: Path, step: int | None = None) -> saved_lib.SavedModel:
    """The final model of ``run_dir`` (its ``model/``; ``run_dir`` may be that folder), or with
    ``step`` the model of that checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"RUN_DIR={run_dir} is not a folder")
    if step is not None:
        return load_checkpoint(run_dir, step)
    if (run_dir / saved_lib.CONFIG_FILE).is_file():
        return saved_lib.load_model(run_dir)
    if not (run_dir / saved_lib.MODEL_DIR / saved_lib.CONFIG_FILE).is_file():
        steps = _checkpoint_steps(run_dir)
        hint = f"; choose a checkpoint with --step (saved steps: {steps})" if steps else ""
        raise ConfigError(f"RUN_DIR={run_dir} has no model/ (a run writes it when it completes){hint}")
    return saved_lib.load_model(run_dir / saved_lib.MODEL_DIR)


def _checkpoint_steps(run_dir: Path) -> list[int]:
    from dpbench.train.checkpoint import CHECKPOINT_DIR

    folder = run_dir / CHECKPOINT_DIR
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def load_checkpoint(run_dir: Path, step: int) -> saved_lib.SavedModel:
    """Checkpoint ``step``'s trainable parameters in the model its config builds (frozen parameters
    rebuilt exactly as the run built them: the checkpoint's config and ``runner.seed``)."""
    import jax
    from omegaconf import OmegaConf

    from dpbench.models.base import LABELS
    from dpbench.models.registry import build_model
    from dpbench.privacy.methods import METHODS
    from dpbench.train.checkpoint import Checkpoints
    from dpbench.train.loop import merge_params, split_params

    steps = _checkpoint_steps(run_dir)
    if step not in steps:
        raise ConfigError(f"--step={step} is not a checkpoint of {run_dir}; choose one of {steps or 'none'}")
    checkpoints = Checkpoints(run_dir, keep=len(steps))
    try:
        meta = checkpoints.read_meta(step)
        config = meta["config"]
        init_key, _ = jax.random.split(jax.random.PRNGKey(config["runner"]["seed"]))
        bundle = build_model(OmegaConf.create(config["model"]), init_key)
        spec = METHODS.get(config["dp"]["method"])
        bundle = bundle.with_frozen(spec.frozen_labels if spec is not None else ())
        trainable, frozen = split_params(bundle.params, bundle.is_trainable)
        leaves, treedef = jax.tree_util.tree_flatten(trainable)
        saved_leaves = meta["structure"]["leaves"][: len(leaves)]
        if saved_leaves != [[list(x.shape), str(x.dtype)] for x in leaves]:
            raise ConfigError(
                f"--step={step}: the checkpoint's parameters do not fit the model its config builds"
            )
        values = checkpoints.restore_leading(step, len(leaves))
    finally:
        checkpoints.close()
    restored = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(v) for v in values])
    bundle.params = merge_params(restored, frozen)
    dataset = config["dataset"]
    model_config = {
        "model": config["model"],
        "task": dataset["task"],
        "frozen_labels": sorted(set(LABELS) - bundle.trainable_labels),
        "dataset": {k: dataset.get(k) for k in ("name", "display_name", "max_new_tokens")},
        "base_weights": bundle.weights_source,
    }
    return saved_lib.SavedModel(bundle, model_config, run_dir)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, list(range(start, min(start + size, n)))


def _bucket(length: int, limit: int) -> int:
    return min(-(-length // LENGTH_BUCKET) * LENGTH_BUCKET, limit)


def context_length(saved: saved_lib.SavedModel) -> int:
    """The longest sequence the model's positions cover."""
    module = saved.bundle.module
    if hasattr(module, "config"):  # Gemma 3
        return module.config.max_position_embeddings
    return module.arch.max_seq_len()


def _too_long(index: int, count: int, length: int, context: int, what: str) -> ConfigError:
    return ConfigError(
        f"prompt {index + 1} is {length} tokens{what}, more than the model's context of {context} tokens; "
        "shorten that --prompt / --file line" + (" or lower --max-new-tokens" if what else "")
    )


def generate(saved: saved_lib.SavedModel, prompts: list[str], args, progress: bool):
    """One ``{"prompt", "completion"}`` per prompt."""
    from tqdm.auto import tqdm

    from dpbench.data import text
    from dpbench.models.gemma3.generate import Sampling
    from dpbench.models.gemma3.generate import generate as decode

    bundle, tok = saved.bundle, saved.bundle.tokenizer
    if tok is None:
        raise ConfigError(
            "the saved model has no tokenizer (model.tokenizer=checkpoint without a checkpoint)"
        )
    max_new = (
        args.max_new_tokens or saved.config.get("dataset", {}).get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
    )
    template = saved.task == "summarization" and not args.raw
    encoded = [text.prompt_ids(p, tok) if template else tok.encode(p) for p in prompts]
    context = context_length(saved)
    for i, ids in enumerate(encoded):
        if len(ids) + max_new > context:
            raise _too_long(i, len(prompts), len(ids), context, f" + --max-new-tokens={max_new}")
    sampling = None
    if args.temperature > 0:
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    stops = tuple(i for i in (tok.eos_id, getattr(tok, "end_of_turn_id", None)) if i is not None)
    batches = list(_batches(len(prompts), args.batch_size))
    for _, rows in tqdm(batches, desc="sample", disable=not progress or len(batches) < 2, file=sys.stderr):
        length = _bucket(max(len(encoded[r]) for r in rows), context - max_new)
        padded = rows + [rows[-1]] * (args.batch_size - len(rows))  # the same shape every batch
        ids = np.full((len(padded), length), tok.pad_id, np.int32)
        mask = np.zeros_like(ids)
        for j, r in enumerate(padded):
            ids[j, length - len(encoded[r]) :] = encoded[r]
            mask[j, length - len(encoded[r]) :] = 1
        out = decode(bundle.module, bundle.params, ids, mask, max_new, stops, tok.pad_id, sampling, padded)
        for j, r in enumerate(rows):
            kept = [int(t) for t in out[j] if int(t) not in stops and int(t) != tok.pad_id]
            yield {"prompt": prompts[r], "completion": tok.decode(kept).strip()}


def classify(saved: saved_lib.SavedModel, texts: list[str], args, progress: bool):
    """One ``{"text", "label", "probabilities"}`` per text."""
    import jax
    from tqdm.auto import tqdm

    bundle, tok = saved.bundle, saved.bundle.tokenizer
    if tok is None:
        raise ConfigError(
            f"python -m dpbench.sample reads text; model.arch={saved.config['model']['arch']!r} does not"
        )
    encoded = [tok.encode(t) for t in texts]
    context = context_length(saved)
    for i, ids in enumerate(encoded):
        if len(ids) > context:
            raise _too_long(i, len(texts), len(ids), context, "")
    apply = jax.jit(bundle.apply_fn)
    batches = list(_batches(len(texts), args.batch_size))
    for _, rows in tqdm(batches, desc="classify", disable=not progress or len(batches) < 2, file=sys.stderr):
        length = _bucket(max(len(encoded[r]) for r in rows), context)
        padded = rows + [rows[-1]] * (args.batch_size - len(rows))
        ids = np.full((len(padded), length), tok.pad_id, np.int32)
        mask = np.zeros_like(ids)
        for j, r in enumerate(padded):
            ids[j, : len(encoded[r])] = encoded[r]
            mask[j, : len(encoded[r])] = 1
        probs = np.asarray(jax.nn.softmax(apply(bundle.params, {"input_ids": ids, "attention_mask": mask})))
        for j, r in enumerate(rows):
            p = probs[j].astype(float)
            yield {"text": texts[r], "label": int(p.argmax()), "probabilities": [round(x, 6) for x in p]}


def run(argv: list[str] | None = None) -> list[dict]:
    """Parse, load, and return the JSON records (also written to stdout or ``--output``)."""
    args = parser().parse_args(argv)
    check_args(args)
    prompts = read_prompts(args.prompt, args.file)
    saved = load(args.run_dir, args.step)
    if (
        saved.config["model"]["arch"] == "cnn"
        or saved.bundle.tokenizer is None
        and saved.task != "summarization"
    ):
        raise ConfigError(
            f"python -m dpbench.sample reads text; model.arch={saved.config['model']['arch']!r} reads images"
        )
    progress = not args.no_progress
    produce = generate if saved.task == "summarization" else classify
    out = open(args.output, "w") if args.output else sys.stdout  # noqa: SIM115
    records = []
    try:
        for record in produce(saved, prompts, args, progress):
            records.append(record)
            print(json.dumps(record, ensure_ascii=False), file=out, flush=True)
    finally:
        if args.output:
            out.close()
    return records


def main(argv: list[str] | None = None) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    with exit_on_setting_error():
        run(argv)


if __name__ == "__main__":
    main()
