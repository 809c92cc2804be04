#!/usr/bin/env bash
# MNIST CNN: accuracy against ε (jax_privacy tutorial setting otherwise).
set -euo pipefail
python -m dpbench -m +experiment=mnist_cnn dp.epsilon=0.5,1,2,4,8 hydra.sweep.dir=multirun/mnist_epsilon "$@"
python -m dpbench +experiment=mnist_cnn_nonprivate hydra.run.dir=multirun/mnist_epsilon/nonprivate "$@"
python -m dpbench.report multirun/mnist_epsilon
