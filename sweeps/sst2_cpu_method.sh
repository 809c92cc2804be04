#!/usr/bin/env bash
# CPU variant of the SST-2 comparison (MiniLM on the RT stand-in): non-private, vanilla, FFA at ε=8.
set -euo pipefail
python -m dpbench -m +experiment=sst2_minilm_cpu dp=none,vanilla,ffa dp.epsilon=8 hydra.sweep.dir=multirun/sst2_cpu_method "$@"
python -m dpbench.report multirun/sst2_cpu_method
