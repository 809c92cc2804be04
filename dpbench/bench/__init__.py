"""``python -m dpbench.bench``: the head-to-head DP-step benchmark (see ``__main__`` and ``harness``)."""
