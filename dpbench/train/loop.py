"""The training step and loop: one logical batch = several physical batches + one noise draw.

Shapes stay fixed for jit: every physical batch has ``physical_batch_size`` rows (the last one
padded, with a mask), so a large Poisson draw simply takes more physical batches; nothing is
truncated. The clipped sums of all physical batches are accumulated, then the noise transform
adds the noise once and the optimizer takes one logical step. The accountant counts these logical steps.

The batch of logical step ``s`` is ``sampler.batch_indices(s)`` (a function of the privacy secret
and ``s``), and the noise comes from the mechanism's noise transform, whose state (key, step,
correlated-noise buffers) is part of :class:`TrainState` and of every checkpoint: a run restored
from a checkpoint at step ``s`` continues exactly as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import PartitionSpec

from dpbench.errors import ConfigError, check_choice
from dpbench.models.base import gathering_at_use
from dpbench.schema import schema
from dpbench.train import heap, sharding

if TYPE_CHECKING:  # train never imports privacy at run time: privacy hands the method and noise in
    from dpbench.privacy.methods import GradientMethod
    from dpbench.privacy.noise import NoiseTransform

PyTree = Any
log = logging.getLogger(__name__)


RESUME_MODES = ("auto", "never", "must")


@schema("runner")
@dataclasses.dataclass
class RunnerConfig:
    """How long to train (logical steps: one noise draw each) and how often to evaluate."""

    steps: int | None = None
    epochs: float | None = None  # converted to logical steps from the sampler
    batch_size: int = 256  # expected logical batch size; sets the sampling rate
    eval_every: int = 500  # logical steps; 0 = only at the end
    eval_before_training: bool = False
    seed: int = 0
    progress_bar: bool = True  # false: about 20 log lines "train: step S/N, ε spent E" instead (batch jobs)
    # Checkpoints (<run dir>/checkpoints): every N logical steps; null = about every 10 minutes and at
    # least every 10% of the run; 0 = only before evaluations, at the end and on SIGTERM/SIGINT.
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto: continue from the run dir's last checkpoint | never | must
    # A DP run's records hold no statistic of the training data computed without noise (training loss,
    # accuracy, clipped fraction, gradient norm, realised batch size, class counts, truncation) unless
    # this is true; the privacy section lists what was released. Non-private runs release everything.
    release_nonprivate_stats: bool = False


def check_settings(runner) -> None:
    """The ``runner.*`` settings, before anything loads."""
    if runner.steps is None and runner.epochs is None:
        raise ConfigError("set runner.steps (logical steps) or runner.epochs (passes over the data)")
    if runner.steps is not None and runner.epochs is not None:
        # A preset gives epochs and a user asks for a few steps: the steps win, said once.
        log.warning(
            "runner.steps=%s overrides runner.epochs=%s (set runner.steps=null to train by epochs)",
            runner.steps,
            runner.epochs,
        )
    if runner.steps is not None and runner.steps <= 0:
        raise ConfigError(f"runner.steps={runner.steps} must be > 0")
    if runner.epochs is not None and not runner.epochs > 0:
        raise ConfigError(f"runner.epochs={runner.epochs} must be > 0")
    if runner.batch_size <= 0:
        raise ConfigError(f"runner.batch_size={runner.batch_size} must be > 0")
    if runner.eval_every < 0:
        raise ConfigError(f"runner.eval_every={runner.eval_every} must be >= 0")
    check_choice("runner.resume", runner.resume, RESUME_MODES)
    if runner.checkpoint_every is not None and runner.checkpoint_every < 0:
        raise ConfigError(
            f"runner.checkpoint_every={runner.checkpoint_every} must be >= 0 (0 = only where required) "
            "or null (about every 10 minutes)"
        )
    if runner.keep_checkpoints < 1:
        raise ConfigError(f"runner.keep_checkpoints={runner.keep_checkpoints} must be >= 1")


def split_params(params: PyTree, is_trainable: Callable[[tuple[str, ...]], bool]) -> tuple[dict, dict]:
    """Flat ``{path: array}`` dicts of trainable and frozen parameters."""
    flat = flatten_dict(params)
    trainable = {p: v for p, v in flat.items() if is_trainable(p)}
    frozen = {p: v for p, v in flat.items() if not is_trainable(p)}
    if not trainable:
        raise ValueError("the model has no trainable parameters for this method")
    return trainable, frozen


def merge_params(trainable: dict, frozen: dict) -> PyTree:
    return unflatten_dict({**frozen, **trainable})


@dataclasses.dataclass
class TrainState:
    step: int
    trainable: dict
    opt_state: Any
    noise_state: Any = None  # the noise transform's state (None: non-private)
    clip_state: Any = None  # adaptive clipping's state: next C, count-noise key and step (None: fixed C)

    @property
    def saved_state(self) -> tuple:
        """What a checkpoint stores besides the trainable parameters: optimizer, noise and (adaptive
        clipping) clip state."""
        if self.clip_state is None:
            return (self.opt_state, self.noise_state)
        return (self.opt_state, self.noise_state, self.clip_state)

    def restore_saved(self, saved: tuple) -> None:
        """Put back what :attr:`saved_state` returned (from a checkpoint)."""
        self.opt_state, self.noise_state, *clip = saved
        self.clip_state = clip[0] if clip else None


class Trainer:
    """Jit-compiled accumulation over physical batches and the per-logical-step update."""

    def __init__(
        self,
        losses_fn: Callable,
        method: GradientMethod,
        optimizer: optax.GradientTransformation,
        mesh: jax.sharding.Mesh,
        noise: NoiseTransform | None,
        expected_batch_size: float,
        param_rules=None,
        gathered_at_use: Callable[[tuple], bool] | None = None,
        adaptive_clip=None,
        clip_key=None,
    ):
        # param_rules: sharding rules (dpbench.train.sharding) of the trainable parameters, their
        # optimizer state and gradient sums; None replicates them (LoRA). Frozen ones come placed.
        # gathered_at_use (ModelBundle.gathered_at_use): frozen parameters the model gathers itself,
        # block by block (dpbench.models.base.gather_at_use); the step passes those in sharded.
        self.param_rules = param_rules
        self.gathered_at_use = gathered_at_use
        self.param_shardings = None
        self.opt_shardings = None
        self.losses_fn = losses_fn
        self.method = method
        self.optimizer = optimizer
        self.mesh = mesh
        # noise: the mechanism's noise transform (dpbench.privacy.noise), None for a non-private run.
        self.noise = noise
        self.expected_batch_size = float(expected_batch_size)
        # adaptive_clip (dpbench.privacy.adaptive_clip.AdaptiveClip): C changes every step, from a
        # noisy count keyed by clip_key; the noise transform is then per unit of C.
        self.adaptive_clip = adaptive_clip
        self.clip_key = clip_key
        self.accumulate = jax.jit(self._accumulate, donate_argnums=(0,))
        self.update = jax.jit(self._update, donate_argnums=(0, 1, 2))
        self.noise_shardings = None
        self._acc_shapes = None
        self._compiled = False  # whether a logical step has run (compiled both step functions)

    def init(self, trainable: dict) -> TrainState:
        # A fresh copy: the update donates its buffers, and the caller may still hold ``trainable``.
        rules = self.param_rules if self.param_rules is not None else [(".*", sharding.REPLICATED)]
        self.param_shardings = sharding.shardings_for(trainable, self.mesh, rules)
        copy = jax.jit(lambda t: jax.tree_util.tree_map(jnp.copy, t), out_shardings=self.param_shardings)
        trainable = copy(trainable)
        # Fixed output shardings from the start (optimizer state like its parameter, counts
        # replicated), so the step functions compile once (not again at step 2).
        shapes = jax.eval_shape(self.optimizer.init, trainable)
        self.opt_shardings = sharding.like_params(shapes, self.param_shardings, self.mesh)
        opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(trainable)
        noise_state = None
        if self.noise is not None:
            # Correlated-noise buffers are sharded like their parameter (leading buffer axis whole).
            shapes = jax.eval_shape(self.noise.init, trainable)
            self.noise_shardings = sharding.like_params(shapes, self.param_shardings, self.mesh)
            noise_state = jax.jit(self.noise.init, out_shardings=self.noise_shardings)(trainable)
        clip_state = None
        if self.adaptive_clip is not None:
            clip_state = sharding.put_replicated(self.adaptive_clip.init(self.clip_key), self.mesh)
        return TrainState(
            step=0, trainable=trainable, opt_state=opt_state, noise_state=noise_state, clip_state=clip_state
        )

    def zero_accumulator(self, trainable: dict, frozen: dict, batch: dict, mask: jax.Array) -> tuple:
        """Zeros shaped like one physical batch's (gradient sum, statistics)."""
        if self._acc_shapes is None:
            self._acc_shapes = jax.eval_shape(self._global_grad_sum, trainable, frozen, batch, mask)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), self._acc_shapes)
        if self.param_shardings is None:
            return sharding.put_replicated(zeros, self.mesh)
        return jax.device_put(zeros, sharding.like_params(zeros, self.param_shardings, self.mesh))

    def _trainable_specs(self, trainable: dict) -> dict:
        """PartitionSpecs of the trainable parameters (and of their gradient sums)."""
        shardings = self.param_shardings
        if shardings is None:  # before init: what init will choose
            rules = self.param_rules if self.param_rules is not None else [(".*", sharding.REPLICATED)]
            shardings = sharding.shardings_for(trainable, self.mesh, rules)
        return {path: shardings[path].spec for path in trainable}

    def _frozen_specs(self, frozen: dict) -> dict:
        """PartitionSpecs the frozen parameters are placed with (``sharding.put_sharded`` with the
        same rules; ``param_rules=None`` places frozen weights by :data:`sharding.DEFAULT_RULES`). A
        frozen array placed otherwise is still correct: jit reshards it to this spec on entry."""
        shardings = sharding.shardings_for(frozen, self.mesh, self.param_rules)
        return {path: shardings[path].spec for path in frozen}

    def _global_grad_sum(self, trainable, frozen, batch, mask, clip_norm=None):
        """Each device sums its own rows of the physical batch; collectives make the global sum.

        Manual (``shard_map``) over every mesh axis that splits the batch, ``data`` and ``fsdp``:
        XLA's SPMD partitioner never partitions a per-example computation. It mis-computed
        per-example convolution-kernel gradients of a batch-sharded ``vmap`` (jax 0.10.2, CPU: the
        MNIST CNN's clipped sums 60% off on fsdp=2 and a remove-one sensitivity of 1.2 C;
        tests/train/test_fsdp.py). Inside, each device

        1. all-gathers every fsdp-sharded trainable parameter to its full shape, and every frozen
           one except those the model gathers itself inside each block (``gathered_at_use``:
           Gemma 3's decoder blocks, inside their remat, so a block's weights are gathered again
           for its backward pass instead of all being held at once),
        2. casts the trainable ones to device-varying: inside shard_map the gradient with respect to
           a device-*invariant* input is implicitly summed over the mesh, so each "per-example"
           gradient would really be a sum over devices (tests/train/test_data_parallel.py). Varying, every
           gradient stays local and the collectives below are the only cross-device sums,
        3. computes the clipped sum (``method.grad_sum``: any clipping implementation, or the
           non-private sum) of its rows alone, in full: the per-example work is one-device work,
        4. reduces: a gradient sum of an fsdp-sharded parameter is ``psum_scatter``-ed over fsdp
           (so it comes out with its parameter's sharding) and psummed over data; replicated ones
           and the statistics are psummed over both axes.

        Memory: a weight gathered at entry lives until its last use, for a weight the backward pass
        needs that layer's backward, so a model that does not gather at use holds every gathered
        weight at the turn from forward to backward. A block that gathers at use under
        ``model.remat`` holds one block's weights at a time (``python -m dpbench.plan``). FSDP
        divides what is stored between steps (frozen and trainable weights, Adam moments, the
        accumulated gradient sum) by the fsdp size; each device also holds the full local sum of
        its rows until the ``psum_scatter``.
        """
        axes = tuple(a for a in sharding.BATCH_AXES if a in self.mesh.axis_names)
        trainable_specs = self._trainable_specs(trainable)
        frozen_specs = self._frozen_specs(frozen)
        rows = PartitionSpec(axes)
        # Frozen weights the model gathers itself, inside each (rematerialised) block: gathered
        # here, a device would hold every gathered weight at the turn to the backward pass.
        at_use = {
            p
            for p, spec in frozen_specs.items()
            if self.gathered_at_use is not None and self.gathered_at_use(p) and spec != PartitionSpec()
        }

        clip_args = () if clip_norm is None else (clip_norm,)  # adaptive clipping: this step's C

        def local(trainable, frozen, batch, mask, *clip_norm):
            # Trainable weights are gathered first, always: a per-example gradient is taken with
            # respect to the whole weight, on this device (gathering later would sum its transpose
            # over devices, mixing examples).
            trainable = {p: sharding.gather_full(v, trainable_specs[p]) for p, v in trainable.items()}
            frozen = {
                p: v if p in at_use else sharding.gather_full(v, frozen_specs[p]) for p, v in frozen.items()
            }
            trainable = {p: sharding.vary(v, axes) for p, v in trainable.items()}
            gathered = set()

            def gather_block(block, params):
                flat = flatten_dict(params)
                for rel, value in flat.items():
                    path = (block, *rel)
                    if path in at_use:
                        flat[rel] = sharding.gather_full(value, frozen_specs[path])
                        gathered.add(path)
                return unflatten_dict(flat)

            with gathering_at_use(gather_block):
                grad_sum, stats = self.method.grad_sum(
                    self.losses_fn,
                    trainable,
                    batch,
                    mask,
                    frozen,
                    clip_norm=clip_norm[0] if clip_norm else None,
                )
            if at_use - gathered:  # a sharded weight the model never gathered: a bug, loudly
                raise RuntimeError(f"the model did not gather {sorted(at_use - gathered)[:3]} at use")
            grad_sum = {p: sharding.reduce_to_spec(g, trainable_specs[p], axes) for p, g in grad_sum.items()}
            stats = jax.tree_util.tree_map(lambda x: sharding.reduce_to_spec(x, PartitionSpec(), axes), stats)
            return grad_sum, stats

        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(trainable_specs, frozen_specs, rows, rows, *[PartitionSpec() for _ in clip_args]),
            out_specs=(trainable_specs, PartitionSpec()),
            axis_names=set(axes),
        )(trainable, frozen, batch, mask, *clip_args)

    def _accumulate(self, acc, trainable, frozen, batch, mask, clip_norm=None):
        return jax.tree_util.tree_map(
            jnp.add, acc, self._global_grad_sum(trainable, frozen, batch, mask, clip_norm)
        )

    def finalize(self, grad_sum, count, noise_state):
        """The gradient the optimizer sees, from the summed gradient of a whole logical batch.

        Private: the noise transform adds its noise once to the sum, which is then divided by the
        *expected* batch size (dividing by the realised size would leak it). Non-private: the mean
        over the examples actually drawn.
        """
        if self.noise is None:
            return jax.tree_util.tree_map(lambda g: g / jnp.maximum(count, 1.0), grad_sum), noise_state
        noised, noise_state = self.noise.update(grad_sum, noise_state)
        return jax.tree_util.tree_map(lambda g: g / self.expected_batch_size, noised), noise_state

    def _update(self, trainable, opt_state, noise_state, acc, clip_state=None):
        grad_sum, stats = acc
        if clip_state is None:
            grads, noise_state = self.finalize(grad_sum, stats["count"], noise_state)
        else:
            # Adaptive clipping: noise per unit of this step's C (z_Δ·Z), so the sum gets z_Δ·C·Z; then
            # C moves by the noisy count of unclipped examples (dpbench.privacy.adaptive_clip).
            clip_norm = clip_state["clip_norm"]
            unit_sum = jax.tree_util.tree_map(lambda g: g / clip_norm, grad_sum)
            grads, noise_state = self.finalize(unit_sum, stats["count"], noise_state)
            grads = jax.tree_util.tree_map(lambda g: g * clip_norm, grads)
            unclipped = stats["count"] - stats["nonfinite_sum"] - stats["clipped_fraction_sum"]
            clip_state = self.adaptive_clip.update(clip_state, unclipped, stats["count"])
        updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        trainable = sharding.constrain(trainable, self.param_shardings)
        opt_state = sharding.constrain(opt_state, self.opt_shardings)
        if self.noise_shardings is not None:
            noise_state = sharding.constrain(noise_state, self.noise_shardings)
        return trainable, opt_state, noise_state, stats, clip_state

    def logical_step(self, state: TrainState, frozen: dict, chunks: list[tuple[dict, np.ndarray]]) -> dict:
        """Run one logical batch given as (host batch, mask) chunks; returns summed statistics."""
        acc = None
        clip_norm = None if state.clip_state is None else state.clip_state["clip_norm"]
        first = not self._compiled  # this step compiles: hand the compilers' memory back after each
        for batch, mask in chunks:
            batch = sharding.put_batch(batch, self.mesh)
            mask = sharding.put_rows(mask, self.mesh)
            if acc is None:
                acc = self.zero_accumulator(state.trainable, frozen, batch, mask)
            acc = self.accumulate(acc, state.trainable, frozen, batch, mask, clip_norm)
            if first:
                heap.release_freed()
        if first:
            jax.block_until_ready(acc)  # the accumulation's buffers are freed before update compiles
            heap.release_freed()
        state.trainable, state.opt_state, state.noise_state, stats, state.clip_state = self.update(
            state.trainable, state.opt_state, state.noise_state, acc, state.clip_state
        )
        if first:
            heap.release_freed()
            self._compiled = True
        state.step += 1
        return stats


def physical_batches(
    indices: np.ndarray, physical_batch_size: int, mask: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut a logical batch into chunks of exactly ``physical_batch_size`` rows plus a mask of real rows.

    The last chunk is padded with index 0 (mask False), so every chunk has one shape for jit.
    An empty logical batch (Poisson can draw none) gives one all-padding chunk, so the step
    still runs and still adds noise. No row is ever dropped. ``mask`` marks rows of ``indices``
    that are already padding (the unused slots of a privacy unit of several rows).

    >>> chunks = physical_batches(np.array([5, 7, 9, 11, 13]), 2)
    >>> [(c.tolist(), m.tolist()) for c, m in chunks]
    [([5, 7], [True, True]), ([9, 11], [True, True]), ([13, 0], [True, False])]
    >>> [(c.tolist(), m.tolist()) for c, m in physical_batches(np.array([], dtype=np.int64), 3)]
    [([0, 0, 0], [False, False, False])]
    """
    if physical_batch_size <= 0:
        raise ValueError(f"physical_batch_size must be positive, got {physical_batch_size}")
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
    num_chunks = max(1, math.ceil(len(indices) / physical_batch_size))
    padded = np.zeros(num_chunks * physical_batch_size, dtype=np.int64)
    padded[: len(indices)] = indices
    real = np.zeros(num_chunks * physical_batch_size, dtype=bool)
    real[: len(indices)] = True if mask is None else mask
    return list(zip(np.split(padded, num_chunks), np.split(real, num_chunks), strict=True))


def gather_chunks(
    arrays: dict[str, np.ndarray],
    indices: np.ndarray,
    physical_batch_size: int,
    sequence_bucket: int = 0,
    mask: np.ndarray | None = None,
):
    """Host-side: the physical batches (arrays, mask) of one logical batch of example indices.

    ``sequence_bucket > 0`` (text with a right-padded ``attention_mask``) orders the logical batch by
    length and cuts each physical batch's padding down to the next multiple of ``sequence_bucket``
    tokens that holds its longest real row. The logical batch, its sum and the mechanism are
    unchanged (a sum does not depend on grouping; removed columns are padding that every model
    masks), only the float rounding order differs; short batches cost proportionally less. Every
    array shaped like ``attention_mask`` is cut the same way; jit compiles one shape per bucket.

    >>> arrays = {"attention_mask": np.array([[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]),
    ...           "label": np.array([0, 1, 2])}
    >>> for batch, mask in gather_chunks(arrays, np.array([0, 1, 2]), 2, sequence_bucket=2):
    ...     print(batch["label"].tolist(), batch["attention_mask"].shape, mask.tolist())
    [1, 2] (2, 4) [True, True]
    [0, 0] (2, 6) [True, False]
    """
    indices = np.asarray(indices, dtype=np.int64)
    token_mask = arrays.get("attention_mask") if sequence_bucket else None
    if token_mask is None:
        return [
            ({k: v[idx] for k, v in arrays.items()}, real)
            for idx, real in physical_batches(indices, physical_batch_size, mask)
        ]
    lengths = token_mask.sum(axis=1)
    if mask is None:  # rows grouped in units (a mask given) keep their order: a unit stays together
        indices = indices[np.argsort(lengths[indices], kind="stable")]
    width = token_mask.shape[1]
    chunks = []
    for idx, real in physical_batches(indices, physical_batch_size, mask):
        longest = int(lengths[idx[real]].max(initial=1))
        cut = min(width, -(-longest // sequence_bucket) * sequence_bucket)
        batch = {k: v[idx][:, :cut] if v.shape[:2] == token_mask.shape else v[idx] for k, v in arrays.items()}
        chunks.append((batch, real))
    return chunks


def train_statistics(stats: dict) -> dict:
    """Every statistic of one logical batch, as logged for a non-private run (or an opted-in DP run).

    ``<name>_sum`` becomes the per-example mean ``train/<name>`` (``correct`` -> ``accuracy``);
    ``nonfinite_sum`` stays a count (examples whose non-finite gradient was zeroed since the last
    log); ``count`` is the realised batch size. Unknown keys are logged the same way. With privacy
    units of several examples (``units``: users), the clipping statistics are means over units.

    >>> train_statistics({"count": 4.0, "loss_sum": 2.0, "correct_sum": 3.0, "nonfinite_sum": 1.0})
    ... # doctest: +NORMALIZE_WHITESPACE
    {'train/logical_batch_size': 4.0, 'train/loss': 0.5, 'train/accuracy': 0.75,
     'train/nonfinite_examples': 1.0}
    """
    count = float(stats.get("count", 0.0))
    units = float(stats.get("units", count))
    record = {"train/logical_batch_size": count}
    for key, value in stats.items():
        value = float(np.sum(value))
        if key == "count":
            continue
        if key == "nonfinite_sum":
            record["train/nonfinite_examples"] = value
        elif key.endswith("_sum"):
            name = {"correct": "accuracy"}.get(key[: -len("_sum")], key[: -len("_sum")])
            per_unit = key in ("clipped_fraction_sum", "grad_norm_sum")
            record[f"train/{name}"] = value / max(units if per_unit else count, 1.0)
        else:
            record[f"train/{key}"] = value
    return record


class StopTraining(Exception):  # noqa: N818 (a request, not an error)
    """Raised by :func:`train_loop` after step ``step`` when ``callbacks.stop_requested()`` said so."""

    def __init__(self, step: int):
        super().__init__(f"training stopped after logical step {step}")
        self.step = step


@dataclasses.dataclass
class LoopCallbacks:
    """What the loop reports to: evaluation, ε so far, metrics sink, a budget check.

    ``release`` turns a logged step's statistics into the metrics that may leave the process
    (default: all of them); ``save(step, required)`` runs after every step, before its evaluation
    (``required``: an evaluation, the last step or a stop follows, so the state must be saved);
    ``stop_requested()`` is polled after every step (preemption).
    """

    evaluate: Callable[[int], dict]
    epsilon_at: Callable[[int], float | None]
    log: Callable[[dict, int], None]
    check_budget: Callable[[int], None]
    release: Callable[[dict], dict] = train_statistics
    save: Callable[[int, bool], None] = lambda step, required: None
    stop_requested: Callable[[], bool] = lambda: False


def train_loop(
    trainer: Trainer,
    state: TrainState,
    frozen: dict,
    train_arrays: dict[str, np.ndarray],
    sampler,
    num_steps: int,
    physical_batch_size: int,
    eval_every: int,
    callbacks: LoopCallbacks,
    progress_bar: bool = True,
    sequence_bucket: int = 0,
    unit_rows: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
) -> list[dict]:
    """Train from ``state.step`` up to ``num_steps`` logical steps; returns this call's evaluations.

    ``unit_rows`` (privacy units of several rows, e.g. users): the sampler draws units, and this maps
    them to their rows and a mask of real ones, unit after unit.

    Throughput is reported with the expected batch size (the realised one is a statistic of the
    training data). Raises :class:`StopTraining` after a step at which a stop was requested.
    """
    from tqdm.auto import tqdm

    history = []
    epsilon = callbacks.epsilon_at(state.step)
    bar = tqdm(
        total=num_steps, initial=state.step, disable=not progress_bar, desc="train", dynamic_ncols=True
    )
    window_steps, window_start = 0, time.perf_counter()
    nonfinite = None  # zeroed examples since the last log, summed on the device (no sync per step)
    epsilon_every = 10 * max(1, num_steps // 500)  # a multiple of the 10-step logging cadence
    # Without a bar (logs of batch jobs), a progress line about 20 times a run.
    progress_every = None if progress_bar else 10 * max(1, num_steps // 200)
    while state.step < num_steps:
        step = state.step + 1
        callbacks.check_budget(step)
        indices, mask = sampler.batch_indices(state.step), None
        if unit_rows is not None:
            indices, mask = unit_rows(indices)
        chunks = gather_chunks(train_arrays, indices, physical_batch_size, sequence_bucket, mask)
        stats = trainer.logical_step(state, frozen, chunks)
        if "nonfinite_sum" in stats:
            nonfinite = stats["nonfinite_sum"] if nonfinite is None else nonfinite + stats["nonfinite_sum"]
        window_steps += 1
        is_eval = bool(eval_every) and step % eval_every == 0
        if is_eval or step == num_steps or step % 10 == 0 or step == 1:
            stats = jax.device_get(stats)
            if nonfinite is not None:
                stats = {**stats, "nonfinite_sum": jax.device_get(nonfinite)}
                nonfinite = None
            elapsed = time.perf_counter() - window_start
            released = callbacks.release(stats)  # empty for a DP run that withholds training statistics
            record = {
                "train/examples_per_s": window_steps * trainer.expected_batch_size / max(elapsed, 1e-9),
                **released,
            }
            # ε spent so far, at every evaluation and about 50 times a run (PLD takes up to ~1 s).
            progress = progress_every is not None and (step % progress_every == 0 or step == num_steps)
            if is_eval or step == num_steps or step % epsilon_every == 0 or progress:
                epsilon = callbacks.epsilon_at(step)
                if epsilon is not None:
                    record["privacy/epsilon"] = epsilon
            callbacks.log(record, step)
            # The bar's counter is the step. Loss and throughput only where released (the bar is
            # published like the records: a DP run's withheld statistics stay off it too).
            postfix = {"eps": "-" if epsilon is None else f"{epsilon:.3f}"}
            if "train/loss" in released:
                postfix["loss"] = f"{released['train/loss']:.3f}"
            if released:
                postfix["ex_s"] = f"{record['train/examples_per_s']:.0f}"
            bar.set_postfix(postfix)
            if progress:
                loss = f", loss {postfix['loss']}" if "loss" in postfix else ""
                log.info("train: step %d/%d, ε spent %s%s", step, num_steps, postfix["eps"], loss)
            window_steps, window_start = 0, time.perf_counter()
        stop = callbacks.stop_requested()
        callbacks.save(step, is_eval or step == num_steps or stop)
        if is_eval and step != num_steps:
            history.append({"step": step, **callbacks.evaluate(step)})
        bar.update(1)
        if stop:
            bar.close()
            raise StopTraining(step)
    bar.close()
    history.append({"step": state.step, **callbacks.evaluate(state.step)})
    return history
