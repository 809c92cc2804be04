"""What ``model.checkpoint`` may name, and the safetensors reader, shared by every model loader.

``pkg:<module>``: weights shipped inside an installed Python package (offline); a hub id: fetched
with ``huggingface_hub`` only where the hub is reachable; a local folder (or file of the loader's
format). :func:`resolve_checkpoint` turns any of them into a local path, each loader saying what its
packages provide and which files it needs. :func:`read_safetensors` reads the tensors of a Hugging
Face folder (one file or shards), lazily: a device reads only its slice of each.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import ml_dtypes  # noqa: F401 (registers bfloat16 with NumPy, which safetensors' numpy reader needs)
import numpy as np

PKG_PREFIX = "pkg:"


def weights_package(checkpoint: str, install_hint: str) -> ModuleType | None:
    """The module that ``pkg:<module>`` names (None for any other checkpoint), or a clear error."""
    if not checkpoint.startswith(PKG_PREFIX):
        return None
    module_name = checkpoint[len(PKG_PREFIX) :]
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"model.checkpoint={checkpoint!r}: package module {module_name!r} is not installed "
            f"({install_hint})"
        ) from e


def hub_snapshot(
    checkpoint: str, patterns: list[str], local_alternatives: str, local_kind: str = "path"
) -> Path:
    """Download ``patterns`` of a hub repo; any failure (offline, gated, unknown repo) says what
    local path to give instead."""
    from huggingface_hub import snapshot_download  # only for hub ids

    try:
        return Path(snapshot_download(checkpoint, allow_patterns=patterns))
    except Exception as e:
        raise ValueError(
            f"model.checkpoint={checkpoint!r} is not a local {local_kind} and the Hugging Face hub could not "
            f"provide it ({type(e).__name__}); set it to {local_alternatives}"
        ) from e


def resolve_checkpoint(
    checkpoint: str,
    *,
    install_hint: str,
    package_path: Callable[[ModuleType], str | Path],
    hub_files: list[str],
    local_alternatives: str,
    file_suffix: str | None = None,
) -> Path:
    """The local folder (or ``file_suffix`` file) that ``model.checkpoint`` names.

    ``pkg:<module>``: ``package_path(module)``; an existing folder (or file ending in ``file_suffix``)
    as it is; a missing path (absolute, starting with ``.`` or ending in ``file_suffix``) is an error;
    anything else is tried as a hub id, fetching ``hub_files`` (the error then names
    ``local_alternatives``).
    """
    module = weights_package(checkpoint, install_hint)
    if module is not None:
        return Path(package_path(module))
    path = Path(checkpoint).expanduser()
    if path.is_dir() or (file_suffix is not None and path.is_file() and path.suffix == file_suffix):
        return path
    what = "a folder" if file_suffix is None else f"a folder or a {file_suffix} file"
    if path.exists():
        raise ValueError(f"model.checkpoint={checkpoint!r} is not {what}")
    if path.is_absolute() or checkpoint.startswith(".") or (file_suffix and checkpoint.endswith(file_suffix)):
        raise FileNotFoundError(f"model.checkpoint={checkpoint!r} is not {what}: it does not exist")
    return hub_snapshot(checkpoint, hub_files, local_alternatives, "path" if file_suffix else "folder")


# ---------------------------------------------------------------------------------------------
# Safetensors folders


def safetensors_files(checkpoint_dir: str | Path) -> list[Path]:
    """``model.safetensors``, or the shards that ``model.safetensors.index.json`` lists."""
    checkpoint_dir = Path(checkpoint_dir)
    single = checkpoint_dir / "model.safetensors"
    index = checkpoint_dir / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (checkpoint_dir / s).exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
        return [checkpoint_dir / s for s in shards]
    raise FileNotFoundError(
        f"{checkpoint_dir} has neither model.safetensors nor model.safetensors.index.json "
        "(only safetensors checkpoints are read; convert .bin files with transformers first)"
    )


class LazyTensor:
    """One tensor of a safetensors file, read only where it is indexed: ``x[index]`` reads that slice
    (``safe_open``'s ``get_slice``: each device reads just its shard, see ``dpbench.train.sharding``),
    ``np.asarray(x)`` all of it. ``x.T`` is a transposed view; nothing is read to make it.

    >>> import tempfile; from safetensors.numpy import save_file
    >>> file = Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(file))
    >>> w = read_safetensors(file.parent)["w"]
    >>> w.shape, w.dtype, w.T.shape, w.T[1:, 1].tolist(), np.asarray(w.T, np.int32).tolist()
    ((2, 3), dtype('float32'), (3, 2), [4.0, 5.0], [[0, 3], [1, 4], [2, 5]])
    """

    def __init__(self, part, shape: tuple[int, ...], dtype: np.dtype, transposed: bool = False):
        self._part, self._transposed = part, transposed
        self.shape, self.dtype = shape, dtype

    @classmethod
    def open(cls, part) -> LazyTensor:
        """From a ``get_slice`` result; its dtype is read off an empty slice."""
        shape = tuple(part.get_shape())
        empty = part[(slice(0, 0),) * len(shape)] if shape else part[...]
        return cls(part, shape, np.asarray(empty).dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def T(self) -> LazyTensor:
        return LazyTensor(self._part, self.shape[::-1], self.dtype, not self._transposed)

    def __getitem__(self, index) -> np.ndarray:
        index = _full_index(index, self.ndim)
        if not self._transposed:
            return np.asarray(self._part[index])
        return np.asarray(self._part[index[::-1]]).T  # x.T[i, j] is x[j, i]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[...]
        return whole if dtype is None else whole.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


def _full_index(index, ndim: int) -> tuple:
    """``index`` (integers, slices, at most one ``...``) as one entry per axis."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is None or isinstance(i, (list, np.ndarray)) for i in index):
        raise IndexError("a LazyTensor takes integers, slices and ... only")
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1 :]
    return index + (slice(None),) * (ndim - len(index))


def read_safetensors(checkpoint_dir: str | Path) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors checkpoint folder (:func:`safetensors_files`), as a
    :class:`LazyTensor`: nothing is read until indexed, and bfloat16 stays bfloat16 (ml_dtypes')."""
    from safetensors import safe_open

    tensors = {}
    for file in safetensors_files(checkpoint_dir):
        with safe_open(str(file), framework="numpy") as f:  # the slices keep the file mapped
            for name in f.keys():
                tensors[name] = LazyTensor.open(f.get_slice(name))
    return tensors
