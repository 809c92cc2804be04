#!/usr/bin/env bash
# CPU variant of the SAMSum comparison (Gemma 3 270M on the ACLSum stand-in): non-private vs DP LoRA at ε=4.
set -euo pipefail
python -m dpbench -m +experiment=samsum_gemma270m_cpu dp=none,vanilla hydra.sweep.dir=multirun/samsum_cpu_method "$@"
python -m dpbench.report multirun/samsum_cpu_method
