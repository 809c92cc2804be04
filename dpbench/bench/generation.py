"""Tokens per second of batched greedy KV-cache decoding on Gemma 3 270M: dpbench against transformers.

    python -m dpbench.bench.generation [--batch 4] [--prompt 64] [--new 32] [--rounds 5]

Both load the same GGUF weights (the pip package of ``model=gemma3_270m_gguf``) in float32 on the
CPU and continue the same random prompts (every row a full prompt of ``--prompt`` tokens, no stop
token, so both produce exactly ``batch x new`` tokens): dpbench through
``dpbench.models.gemma3.greedy_generate`` (one jit-compiled prefill + ``while_loop``; compiled
before timing), transformers through ``generate(do_sample=False)`` with its default attention and
KV cache, in ``torch.inference_mode``. Each side runs in its own process (in one process XLA's and
torch's thread pools would compete for the cores), loads and warms up untimed,
then the rounds interleave the two; each time is the wall time of one whole call (prefill included),
the medians are compared, and the machine's load average is printed with them. Results:
results/bench.md ("Generation").
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import numpy as np

CONF = Path(__file__).resolve().parents[2] / "conf" / "model" / "gemma3_270m_gguf.yaml"


def load_dpbench():
    import jax
    import yaml
    from omegaconf import OmegaConf

    from dpbench.models.gemma3 import Gemma3ModelConfig, build_gemma3
    from dpbench.models.gemma3.loading import resolve_checkpoint

    raw = yaml.safe_load(CONF.read_text())
    raw.pop("defaults")
    cfg = OmegaConf.merge(OmegaConf.structured(Gemma3ModelConfig), raw)
    cfg.lora_rank = 0  # the base model, as transformers runs it
    bundle = build_gemma3(cfg, jax.random.key(0))
    return bundle, resolve_checkpoint(cfg.checkpoint, cfg.cache_dir)


def load_transformers(gguf_path: Path):
    import torch
    import transformers

    model = transformers.Gemma3ForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


def _prompts(args) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 100_000, size=(args.batch, args.prompt)).astype(np.int32)
    return ids, np.ones_like(ids)


def _worker(side: str, args, conn) -> None:
    """One side in its own process (XLA's and torch's thread pools never share one): load, warm up,
    then time one whole call per request."""
    ids, mask = _prompts(args)
    if side == "dpbench":
        from dpbench.models.gemma3 import greedy_generate

        bundle, _ = load_dpbench()
        pad = bundle.tokenizer.pad_id

        def call():
            return greedy_generate(bundle.module, bundle.params, ids, mask, args.new, stop_ids=(), pad_id=pad)
    else:
        import torch

        model = load_transformers(Path(args.gguf))
        info = f"torch threads {torch.get_num_threads()}, attention {model.config._attn_implementation}"

        def call():
            with torch.inference_mode():
                out = model.generate(
                    input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    max_new_tokens=args.new,
                    min_new_tokens=args.new,
                    do_sample=False,
                    pad_token_id=0,
                )
            return out[:, args.prompt :].numpy()

    tokens = np.asarray(call())  # compile / warm up
    conn.send(("ready", tokens, info if side != "dpbench" else f"jax {__import__('jax').__version__}"))
    while conn.recv() == "run":
        start = time.perf_counter()
        call()
        conn.send(time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    import yaml

    from dpbench.models.gemma3.loading import resolve_checkpoint

    args.gguf = str(resolve_checkpoint(yaml.safe_load(CONF.read_text())["checkpoint"]))
    context = multiprocessing.get_context("spawn")
    sides, procs, infos, outputs = {}, [], {}, {}
    for side in ("dpbench", "transformers"):  # one at a time: loading and compiling are not timed
        mine, theirs = context.Pipe()
        proc = context.Process(target=_worker, args=(side, args, theirs), daemon=True)
        proc.start()
        _, outputs[side], infos[side] = mine.recv()
        sides[side] = mine
        procs.append(proc)
    agree = float(np.mean(outputs["dpbench"] == outputs["transformers"]))
    times: dict[str, list[float]] = {side: [] for side in sides}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for side, conn in sides.items():
            conn.send("run")
            times[side].append(conn.recv())
        loads.append(os.getloadavg()[0])
    for conn in sides.values():
        conn.send("stop")
    for proc in procs:
        proc.join(timeout=60)
    tokens = args.batch * args.new
    median = {side: statistics.median(t) for side, t in times.items()}
    print(
        f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, {args.rounds} interleaved rounds, "
        f"each side in its own process ({infos['dpbench']}; {infos['transformers']}); {os.cpu_count()} CPUs, "
        f"1-min load average {min(loads):.1f}-{max(loads):.1f}; greedy tokens equal in {agree:.0%} "
        "of positions"
    )
    print("| implementation | median s per call | tokens/s | all rounds (s) |")
    print("|---|---|---|---|")
    for side, t in times.items():
        rounds = ", ".join(f"{x:.2f}" for x in t)
        print(f"| {side} | {median[side]:.2f} | {tokens / median[side]:.1f} | {rounds} |")
    print(f"dpbench / transformers time ratio: {median['dpbench'] / median['transformers']:.2f}x")


if __name__ == "__main__":
    main()
