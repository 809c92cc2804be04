"""Kept for callers of ``dpbench.run.run``: the job now lives in :mod:`dpbench.experiment`."""

from dpbench.experiment import build, run, train_and_evaluate
from dpbench.privacy.mechanism import Mechanism, plan_mechanism

__all__ = ["Mechanism", "build", "plan_mechanism", "run", "train_and_evaluate"]
