"""``python -m dpbench.bench.sequence_bucket``: what ``compute.sequence_bucket`` saves on real text.

One logical step of ``+experiment=sst2_minilm_cpu`` (real MiniLM-L6, DP-LoRA, 64-token padding) with
every physical batch padded to ``dataset.max_length`` against the same logical batches bucketed to
multiples of ``--bucket`` tokens. Both run in one process, in interleaved rounds (alternating
which goes first), after a warm-up that compiles every shape; the medians and their ratio are
printed. The mechanism is identical (tests/train/test_sequence_bucket.py checks the sums).

    python -m dpbench.bench.sequence_bucket --rounds 12 --bucket 16 [hydra overrides...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
from hydra import compose, initialize_config_dir

from dpbench import experiment
from dpbench.config import register_configs
from dpbench.train.loop import gather_chunks

CONF = Path(__file__).resolve().parents[2] / "conf"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpbench.bench.sequence_bucket", description=__doc__)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--bucket", type=int, default=16)
    parser.add_argument("overrides", nargs="*", help="hydra overrides (default experiment: sst2_minilm_cpu)")
    args = parser.parse_args(argv)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = [
            "+experiment=sst2_minilm_cpu",
            "logger=none",
            "paths.output_dir=/tmp/dpbench_bucket_bench",
        ]
        cfg = compose("config", overrides=[*overrides, *args.overrides])
    exp = experiment.build(cfg)
    sampler, physical = exp.mechanism.sampler, cfg.compute.physical_batch_size
    state = exp.state

    def step(index: int, bucket: int) -> tuple[float, float]:
        chunks = gather_chunks(exp.train_arrays, sampler.batch_indices(index), physical, bucket)
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(exp.trainer.logical_step(state, exp.frozen, chunks))
        return time.perf_counter() - wall, time.process_time() - cpu

    modes = (0, args.bucket)
    for index in range(4):  # warm-up: every bucket width appears in a few batches
        for bucket in modes:
            step(index, bucket)
    times = {bucket: [] for bucket in modes}
    for round_ in range(args.rounds):
        for bucket in modes if round_ % 2 == 0 else modes[::-1]:
            times[bucket].append(step(4 + round_, bucket))
    medians = {b: [statistics.median(t[i] for t in times[b]) for i in (0, 1)] for b in modes}
    for bucket in modes:
        name = f"padded to {cfg.dataset.max_length}" if bucket == 0 else f"bucketed to {bucket}"
        print(
            f"{name:>16}: median wall {medians[bucket][0]:.2f} s, "
            f"CPU {medians[bucket][1]:.2f} s per logical step"
        )
    padded, bucketed = medians[0], medians[args.bucket]
    print(
        f"padded / bucketed ({args.rounds} interleaved rounds): wall {padded[0] / bucketed[0]:.2f}x, "
        f"CPU {padded[1] / bucketed[1]:.2f}x"
    )


if __name__ == "__main__":
    main()
