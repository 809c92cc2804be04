#!/usr/bin/env bash
# The dp-lora grid: vanilla vs FFA, LoRA rank, ε. Pass dataset.data_dir=... model.checkpoint=... as arguments.
set -euo pipefail
python -m dpbench -m +experiment=sst2_roberta dp=vanilla,ffa model.lora_rank=2,4,8,16 dp.epsilon=1,8 \
  hydra.sweep.dir=multirun/sst2_rank_method "$@"
python -m dpbench.report multirun/sst2_rank_method
