"""Moved to ``dpbench.models.gemma3.generate``; this name stays while ``dpbench.train.summarization``
imports ``greedy_generate`` from here."""

from dpbench.models.gemma3.generate import greedy_generate

__all__ = ["greedy_generate"]
