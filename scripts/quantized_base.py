"""Gemma 3 270M with a quantized frozen base, side by side with bfloat16 (and float32), in one run.

    .venv/bin/python scripts/quantized_base.py [--batches 4] [--batch-size 4] [--rouge N] [--rows D:S,...]

For each ``model.dtype`` x ``model.frozen_quantization`` row it builds the ``samsum_gemma270m_cpu``
model (the real 270M weights from the GGUF package), and reports the bytes of its frozen and trainable
parameters as stored, and the mean response loss of the base model (LoRA B = 0 at init, so this is the
pretrained model) on the same first training batches of the SAMSum stand-in (dataset=samsum_aclsum);
with ``--rouge N``, also the ROUGE of its greedy summaries of the first N evaluation examples (the
preset's prompts, decoding and scoring: ``SummarizationTask.evaluate``).
The numbers are in results/scale.md ("A quantized frozen base").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpbench.config import register_configs  # noqa: E402
from dpbench.data.registry import load_dataset  # noqa: E402
from dpbench.data.roots import SHARED_DATA  # noqa: E402
from dpbench.models.registry import model_modules  # noqa: E402
from dpbench.train import sharding  # noqa: E402
from dpbench.train.loop import split_params  # noqa: E402
from dpbench.train.tasks import task_class  # noqa: E402

ROWS = [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8"), ("bfloat16", "nf4")]


def config(dtype: str, scheme: str, data_root: Path):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "+experiment=samsum_gemma270m_cpu",
                f"paths.data_root={data_root}",
                "logger=none",
                f"model.dtype={dtype}",
                f"model.frozen_quantization={scheme}",
            ],
        )


def nbytes(tree: dict) -> int:
    return sum(int(v.size) * v.dtype.itemsize for v in tree.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--data-root", type=Path, default=Path(SHARED_DATA))
    parser.add_argument("--rouge", type=int, default=0, help="ROUGE on the first N evaluation examples")
    parser.add_argument("--rows", default="", help="dtype:scheme,... (default: all four)")
    args = parser.parse_args(argv)
    rows = [tuple(r.split(":")) for r in args.rows.split(",")] if args.rows else ROWS
    if ("bfloat16", "none") not in rows:
        parser.error("--rows must include bfloat16:none, the reference")
    results = []
    for dtype, scheme in rows:
        cfg = config(dtype, scheme, args.data_root)
        start = time.perf_counter()
        dataset = load_dataset(cfg.dataset)
        bundle = model_modules()[cfg.model.arch].build(cfg.model, jax.random.key(cfg.runner.seed))
        built = time.perf_counter() - start
        task_type = task_class(cfg.dataset.task)
        train, evaluation, _ = task_type.prepare(dataset, bundle, cfg)
        task = task_type.build(bundle, dataset, cfg)
        trainable, frozen = split_params(bundle.params, bundle.is_trainable)
        losses_fn = jax.jit(lambda t, b, f, fn=task.losses_fn: fn(t, b, f)[0])
        losses = []
        for i in range(args.batches):
            rows = slice(i * args.batch_size, (i + 1) * args.batch_size)
            batch = {k: jnp.asarray(v[rows]) for k, v in train.items()}
            losses.append(np.asarray(losses_fn(trainable, batch, frozen), np.float64))
        losses = np.concatenate(losses)
        rouge = {}
        if args.rouge:
            first = {k: v[: args.rouge] for k, v in evaluation.items()}
            mesh = sharding.mesh_from_config(cfg.compute)
            rouge = task.evaluate(trainable, frozen, first, cfg.compute.eval_batch_size, mesh)
        results.append((dtype, scheme, nbytes(frozen), nbytes(trainable), losses, built, rouge))
        print(f"done {dtype} {scheme} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        del bundle, trainable, frozen, task
    reference = next(r for r in results if r[:2] == ("bfloat16", "none"))
    print(
        f"{args.batches} batches x {args.batch_size} SAMSum stand-in training examples; "
        f"host: {jax.devices()[0]}"
    )
    rouge_head = f" ROUGE-1 / 2 / L ({args.rouge} evaluation examples) |" if args.rouge else ""
    print("| model.dtype | model.frozen_quantization | frozen params (MiB) | vs bf16 | trainable (MiB) "
          f"| mean loss | loss - bf16 loss (mean ± sd over examples) | build (s) |{rouge_head}")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|" + ("---|" if args.rouge else ""))
    for dtype, scheme, frozen_b, trainable_b, losses, built, rouge in results:
        diff = losses - reference[4]
        scores = ""
        if rouge:
            scores = " " + " / ".join(f"{rouge[f'eval/rouge{k}']:.3f}" for k in ("1", "2", "L")) + " |"
        print(
            f"| {dtype} | {scheme} | {frozen_b / 2**20:.1f} | {frozen_b / reference[2]:.3f}x "
            f"| {trainable_b / 2**20:.2f} | {losses.mean():.4f} | {diff.mean():+.4f} ± {diff.std():.4f} "
            f"| {built:.0f} |{scores}"
        )


if __name__ == "__main__":
    main()
