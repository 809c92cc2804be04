"""The device mesh ``(data, fsdp)``, per-parameter sharding rules, and placing arrays on the mesh.

- **Mesh.** ``compute.mesh.data`` x ``compute.mesh.fsdp`` devices (-1: the devices the other axis
  leaves; default data=-1, fsdp=1, i.e. pure data parallelism). Batches are split over both axes
  (every device holds ``physical_batch_size / devices`` rows); parameters are split over ``fsdp``
  only, by rule (FSDP / ZeRO-3): stored split, gathered whole for a training step (below) and by
  XLA where a layer uses them elsewhere (evaluation, generation).
- **Rules.** ``model.sharding_rules`` is a list of ``[regex, spec]`` pairs matched in order against
  a parameter's path (``layer_3/attn/q_proj/kernel``), big_vision style. ``spec`` is ``replicated``,
  ``fsdp`` (the largest dimension the fsdp size divides; 1-D parameters stay replicated), or one
  entry per dimension (``[null, fsdp]``). A named dimension the fsdp size does not divide falls back
  to ``fsdp``, and the log says so. Without a matching rule a parameter follows :data:`DEFAULT_RULES`.
- **Placement.** :func:`place` builds each array straight into its sharding with
  ``jax.make_array_from_callback``: every device reads only its own slice of the source (a NumPy
  array or a memory-mapped checkpoint tensor), so no device ever holds a whole frozen weight.
- **Batches.** :func:`put_batch` gives each process only its rows of a physical batch
  (``jax.make_array_from_process_local_data``); with one process that is the whole batch.

- **Per-example work.** The training step (``dpbench.train.loop.Trainer``) is manual over *every*
  axis that splits the batch (``data`` and ``fsdp``, one ``shard_map``): each device all-gathers the
  fsdp-sharded parameters it needs (:func:`gather_full`; frozen weights of a model that gathers at
  use, block by block, inside its remat: ``dpbench.models.base.gather_at_use``), computes the
  clipped sum of its own rows alone, and :func:`reduce_to_spec` sums over devices
  (``psum_scatter`` over fsdp for a sharded gradient sum, ``psum`` otherwise). XLA's SPMD
  partitioner never sees a batch-sharded per-example gradient: it mis-computed convolution-kernel
  gradients of a batch-sharded ``vmap`` (jax 0.10.2, CPU; tests/train/test_fsdp.py), so every example's
  clip is computed on one device, from its own data.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpbench.errors import ConfigError
from dpbench.schema import schema

log = logging.getLogger(__name__)

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch dimension is split over every device
REPLICATED = "replicated"
AUTO_FSDP = "fsdp"
# LoRA factors are small: replicated; everything else sharded over fsdp on its largest dimension.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = ((r"lora_[ab]$", REPLICATED), (r".*", AUTO_FSDP))


@dataclasses.dataclass
class MeshConfig:
    """``compute.mesh``: devices along each axis; -1 = whatever the other axis leaves."""

    data: int = -1
    fsdp: int = 1


@schema("compute")
@dataclasses.dataclass
class ComputeConfig:
    """Performance only: never changes the mechanism or ε."""

    physical_batch_size: int = 64  # examples per device-parallel chunk of a logical batch
    eval_batch_size: int = 256
    # Text: > 0 orders each logical batch by length and pads each physical batch only to the next
    # multiple of this many tokens (0: every batch padded to dataset.max_length).
    sequence_bucket: int = 0
    num_devices: int | None = None  # None = all of jax.devices()
    # Devices along (data, fsdp): -1 = the rest. fsdp > 1 shards parameters by model.sharding_rules.
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    device_memory_gb: float | None = None  # python -m dpbench.plan: does one device's share fit?
    # Multi-process (jax.distributed): set all three, or leave null for SLURM's variables / one process.
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def check_settings(compute) -> None:
    """The ``compute.*`` settings, before anything loads (the mesh is checked against the devices)."""
    if compute.physical_batch_size <= 0:
        raise ConfigError(f"compute.physical_batch_size={compute.physical_batch_size} must be > 0")
    if compute.sequence_bucket < 0:
        raise ConfigError(
            f"compute.sequence_bucket={compute.sequence_bucket} must be >= 0 (0 = pad to dataset.max_length)"
        )


def mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1) -> tuple[int, int]:
    """``(data, fsdp)`` for ``num_devices`` devices; one -1 takes the rest.

    >>> mesh_shape(8, -1, 4), mesh_shape(8, 2, -1), mesh_shape(8, -1, 1)
    ((2, 4), (2, 4), (8, 1))
    """
    if data == -1 and fsdp == -1:
        raise ValueError("compute.mesh.data and compute.mesh.fsdp are both -1; set at least one of them")
    for name, value in (("data", data), ("fsdp", fsdp)):
        if value != -1 and value < 1:
            raise ValueError(f"compute.mesh.{name}={value} must be >= 1 or -1 (the remaining devices)")
    if data == -1:
        data = num_devices // fsdp if num_devices % fsdp == 0 else -1
    elif fsdp == -1:
        fsdp = num_devices // data if num_devices % data == 0 else -1
    if data < 1 or fsdp < 1 or data * fsdp != num_devices:
        raise ValueError(
            f"compute.mesh.data x compute.mesh.fsdp must equal the {num_devices} device(s) used; "
            f"got data={data}, fsdp={fsdp} (use -1 for one of them)"
        )
    return data, fsdp


def make_mesh(num_devices: int | None = None, data: int = -1, fsdp: int = 1) -> Mesh:
    """A ``(data, fsdp)`` mesh over the first ``num_devices`` devices (all of them by default).

    With several processes, devices are ordered process by process, so each process's devices
    hold consecutive rows of a batch (``put_batch``) and ``fsdp`` groups stay inside a host when
    the fsdp size divides the devices per host (fast links for the parameter all-gathers).
    """
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(
                f"compute.num_devices={num_devices} but {len(devices)} device(s) are visible; "
                f"choose 1..{len(devices)}"
            )
        devices = devices[:num_devices]
    shape = mesh_shape(len(devices), data, fsdp)
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices).reshape(shape), (DATA_AXIS, FSDP_AXIS))


def mesh_from_config(compute_cfg) -> Mesh:
    mesh_cfg = compute_cfg.get("mesh") or {}
    return make_mesh(compute_cfg.get("num_devices"), mesh_cfg.get("data", -1), mesh_cfg.get("fsdp", 1))


def fsdp_size(mesh: Mesh) -> int:
    return mesh.shape.get(FSDP_AXIS, 1)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ---------------------------------------------------------------------------------------------
# Rules


def path_name(path: tuple[str, ...] | str) -> str:
    return path if isinstance(path, str) else "/".join(str(p) for p in path)


def parse_rules(rules: Sequence | None) -> list[tuple[re.Pattern, Any]]:
    """``[[regex, spec], ...]`` (from YAML) checked and compiled; ``None``: :data:`DEFAULT_RULES`."""
    compiled = []
    for index, rule in enumerate(list(rules) if rules is not None else DEFAULT_RULES):
        rule = list(rule)
        if len(rule) != 2:
            raise ValueError(f"model.sharding_rules[{index}]={rule} must be a pair [regex, spec]")
        pattern, spec = rule
        if not isinstance(spec, str):
            spec = tuple(spec)
            bad = [s for s in spec if s not in (None, FSDP_AXIS)]
            if bad:
                raise ValueError(
                    f"model.sharding_rules[{index}]: dimension entries {bad} are not allowed; "
                    f"use {FSDP_AXIS} or null per dimension"
                )
        elif spec not in (REPLICATED, AUTO_FSDP):
            raise ValueError(
                f"model.sharding_rules[{index}]: spec {spec!r} is not allowed; choose {REPLICATED}, "
                f"{AUTO_FSDP} or a list with {FSDP_AXIS}/null per dimension"
            )
        try:
            compiled.append((re.compile(pattern), spec))
        except re.error as error:
            raise ValueError(f"model.sharding_rules[{index}]: bad regex {pattern!r}: {error}") from None
    return compiled


def _auto_spec(shape: Sequence[int], size: int) -> PartitionSpec:
    if size == 1 or len(shape) < 2:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % size == 0:
            return PartitionSpec(*[FSDP_AXIS if d == dim else None for d in range(len(shape))])
    return PartitionSpec()


def partition_spec(
    path, shape: Sequence[int], rules: list[tuple[re.Pattern, Any]], size: int
) -> PartitionSpec:
    """The spec of one parameter: the first rule whose regex matches ``path`` (searched, not anchored).

    >>> rules = parse_rules([["lora", "replicated"], ["kernel$", [None, "fsdp"]], [".*", "fsdp"]])
    >>> partition_spec("l0/q_proj/kernel", (16, 8), rules, 4)
    P(None, 'fsdp')
    >>> partition_spec("l0/q_proj/lora_a", (16, 2), rules, 4)
    P()
    >>> partition_spec("l0/q_proj/kernel", (16, 6), rules, 4)  # 6 % 4: the largest divisible dim
    P('fsdp', None)
    """
    name = path_name(path)
    if size == 1:
        return PartitionSpec()
    for pattern, spec in rules:
        if not pattern.search(name):
            continue
        if spec == REPLICATED:
            return PartitionSpec()
        if spec == AUTO_FSDP:
            return _auto_spec(shape, size)
        if len(spec) != len(shape):
            raise ValueError(
                f"model.sharding_rules: {pattern.pattern!r} gives {list(spec)} for {name} of shape "
                f"{tuple(shape)} ({len(shape)} dimensions)"
            )
        if all(s is None or shape[d] % size == 0 for d, s in enumerate(spec)):
            return PartitionSpec(*spec)
        fallback = _auto_spec(shape, size)
        log.info(
            "sharding: %s %s is not divisible as %s by fsdp=%d; using %s", name, shape, spec, size, fallback
        )
        return fallback
    return PartitionSpec()


def shardings_for(shapes: Mapping, mesh: Mesh, rules: Sequence | None = None) -> dict:
    """``{path: NamedSharding}`` for a flat ``{path: array or ShapeDtypeStruct}`` dict."""
    compiled = parse_rules(rules)
    size = fsdp_size(mesh)
    return {
        path: NamedSharding(mesh, partition_spec(path, value.shape, compiled, size))
        for path, value in shapes.items()
    }


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes one dimension's entry of a PartitionSpec splits it over (``None``: none)."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def varying_axes(x) -> frozenset:
    """The mesh axes ``x`` is device-varying over (inside ``shard_map``; empty outside)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; older releases call it vma
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()) or ())


def vary(x, axes: Sequence[str]):
    """``x`` cast to device-varying over ``axes`` (only those it is not varying over already)."""
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def gather_full(x, spec: PartitionSpec):
    """Inside ``shard_map``: this device's shard of an array with ``spec`` all-gathered to its full
    shape (a replicated array comes back as is)."""
    for dim, entry in enumerate(spec):
        axes = spec_axes(entry)
        if axes:
            x = jax.lax.all_gather(x, axes if len(axes) > 1 else axes[0], axis=dim, tiled=True)
    return x


def reduce_to_spec(x, spec: PartitionSpec, axes: Sequence[str]):
    """Inside ``shard_map``: the sum over every device of ``axes`` of a full-shape local value, left
    with ``spec``'s sharding: ``psum_scatter`` (tiled) along each sharded dimension, then ``psum`` over
    the rest of ``axes``. Each device keeps only its shard of a sharded sum."""
    x = vary(x, axes)  # a value every device holds alike still counts once per device
    scattered = set()
    for dim, entry in enumerate(spec):
        names = spec_axes(entry)
        if names:
            x = jax.lax.psum_scatter(
                x, names if len(names) > 1 else names[0], scatter_dimension=dim, tiled=True
            )
            scattered.update(names)
    rest = tuple(a for a in axes if a not in scattered)
    return jax.lax.psum(x, rest) if rest else x


def bytes_per_device(tree, shardings=None) -> int:
    """Bytes one device holds of ``tree`` (arrays or ShapeDtypeStructs with shardings)."""
    total = 0
    leaves = jax.tree_util.tree_leaves(tree)
    targets = jax.tree_util.tree_leaves(shardings) if shardings is not None else [None] * len(leaves)
    for leaf, sharding in zip(leaves, targets, strict=True):
        sharding = sharding or getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


# ---------------------------------------------------------------------------------------------
# Placement


def place(flat: Mapping, mesh: Mesh, rules: Sequence | None = None, dtype: Any = None) -> dict:
    """Each array of ``flat`` (NumPy, memory-mapped, or anything sliceable with ``.shape``) built
    straight into its sharding: every device reads only its slice (cast to ``dtype`` if given)."""
    targets = shardings_for(flat, mesh, rules)
    return {path: place_array(value, targets[path], dtype) for path, value in flat.items()}


def place_array(source: Any, target: NamedSharding, dtype: Any = None) -> jax.Array:
    if isinstance(source, jax.Array):
        return jax.device_put(source if dtype is None else source.astype(dtype), target)
    dtype = np.dtype(dtype if dtype is not None else source.dtype)

    def read(index):
        return np.ascontiguousarray(np.asarray(source[index]), dtype=dtype)

    return jax.make_array_from_callback(tuple(source.shape), target, read)


def put_replicated(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))


def put_sharded(flat: dict, mesh: Mesh, rules: Sequence | None = None) -> dict:
    """Device arrays moved (or NumPy arrays placed) into their rule shardings."""
    return place(flat, mesh, rules)


def process_rows(num_rows: int, mesh: Mesh) -> slice:
    """The rows of a batch of ``num_rows`` that this process's devices hold (all of them, alone)."""
    count = jax.process_count()
    if count == 1:
        return slice(0, num_rows)
    if num_rows % count:
        raise ValueError(f"a batch of {num_rows} rows cannot be split over {count} processes")
    per = num_rows // count
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """A host batch (the same on every process) as global arrays sharded over every device; each
    process transfers only its own rows."""
    return {k: put_rows(v, mesh) for k, v in batch.items()}


def put_rows(value, mesh: Mesh) -> jax.Array:
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    value = np.asarray(value)
    local = value[process_rows(len(value), mesh)]
    return jax.make_array_from_process_local_data(sharding, local, value.shape)


def constrain(tree, shardings):
    """``with_sharding_constraint`` where a sharding is known (inside ``jit``); ``None`` leaves as is."""
    if shardings is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, shardings)


def like_params(tree, param_shardings: Mapping, mesh: Mesh) -> Any:
    """Shardings for a tree whose leaves may mirror the parameters (optimizer state, gradient sums):
    a leaf under a dict key that is a parameter path, with that parameter's shape, takes its
    sharding; one with an extra leading axis (correlated-noise buffers: one per band or buffer) takes
    it with that axis whole; every other leaf (counts, statistics) is replicated."""
    rep = replicated(mesh)

    def choose(key_path, leaf):
        for entry in reversed(key_path):
            key = getattr(entry, "key", None)
            if key in param_shardings:
                target = param_shardings[key]
                ndim = getattr(leaf, "ndim", 0)
                if ndim == len(target.spec) or not target.spec:
                    return target
                if ndim == len(target.spec) + 1:
                    return NamedSharding(mesh, PartitionSpec(None, *target.spec))
                break
        return rep

    return jax.tree_util.tree_map_with_path(choose, tree)


Placement = Callable[[dict], dict]


def model_rules(model_cfg) -> list | None:
    """``model.sharding_rules`` as plain lists (checked), or None for :data:`DEFAULT_RULES`."""
    rules = model_cfg.get("sharding_rules") if hasattr(model_cfg, "get") else None
    if rules is None:
        return None
    from omegaconf import OmegaConf

    rules = OmegaConf.to_container(rules) if not isinstance(rules, list) else rules
    parse_rules(rules)
    return rules


def placement(mesh: Mesh, rules: Sequence | None) -> Placement:
    """What a model builder calls on its flat weights: ``place(flat, dtype=...)`` on this mesh."""

    def place_flat(flat: dict, dtype: Any = None) -> dict:
        return place(flat, mesh, rules, dtype)

    return place_flat
