"""dpbench: differentially private training and fine-tuning in JAX, compared on one runner."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("dpbench")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
