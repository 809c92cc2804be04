"""``python -m dpbench.plan [overrides]``: will this run fit, and under which mechanism? No training.

Composes the same config as ``python -m dpbench``, then, on ``compute.mesh.data x compute.mesh.fsdp``
fake CPU devices (``compute.num_devices`` when an axis is -1), builds the training step on *abstract*
inputs: parameter shapes from the model's own builder (``build_model(..., abstract=True)``; any
``model.arch``) with their sharding rules, a physical batch of ``compute.physical_batch_size`` rows of
the dataset's sequence length (images: the model's ``image_shape``). No weights are read. It lowers
and compiles one physical-batch accumulation and the per-logical-step update (noise + optimizer) and
prints, per device: bytes of frozen and trainable parameters, optimizer state, the gradient
accumulator, XLA's temporaries (``compiled.memory_analysis()``), their total against
``compute.device_memory_gb``, and the mechanism as ``python -m dpbench.privacy`` prints it (n with any
audit canaries, q, σ, steps, ε).

The compile is XLA:CPU's: buffer assignment and fusion differ on GPU/TPU, so the numbers are an
estimate of the accelerator's (the output says so). The plan keeps XLA's optimization barriers, as
GPU/TPU compilers do, so that ``model.remat`` saves in the CPU compile what it saves there
(``KEEP_REMAT``). Generation (evaluation) is not planned.

    python -m dpbench.plan +experiment=samsum_gemma model.preset=12b compute.mesh.fsdp=8 \\
        compute.mesh.data=1 compute.device_memory_gb=80 +plan.num_examples=14732

Without the dataset on this machine, ``+plan.num_examples=N`` gives n (SAMSum's train split: 14,732).
``+plan.measure_steps=S`` then builds the real run on this machine and measures S logical steps (peak
resident memory above the state before them), to check the estimate. For summarisation,
``+plan.max_targets=K`` sets how many response positions per example get logits
(the runner uses the longest tokenised training summary + eos; default ``dataset.max_new_tokens + 1``).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time

import hydra
from omegaconf import DictConfig

from dpbench import config as config_lib
from dpbench.models.remat import CPU_KEEP_REMAT

config_lib.register_configs()

GB = 1024**3


def plan_devices(compute_cfg) -> int:
    """How many fake devices the plan needs: data x fsdp (an axis at -1 takes compute.num_devices;
    without it, data=-1 means one data group: fsdp devices)."""
    mesh = compute_cfg.mesh
    if mesh.data != -1 and mesh.fsdp != -1:
        return int(mesh.data) * int(mesh.fsdp)
    if compute_cfg.num_devices is None and mesh.data == -1:
        return int(mesh.fsdp)  # data=-1 with no device count: one data group
    if compute_cfg.num_devices is None:
        raise config_lib.ConfigError(
            f"compute.mesh.data={mesh.data}, compute.mesh.fsdp={mesh.fsdp}: the plan needs a device count; "
            "set both axes (e.g. compute.mesh.data=1 compute.mesh.fsdp=8) or compute.num_devices"
        )
    return int(compute_cfg.num_devices)


@dataclasses.dataclass
class MemoryPlan:
    devices: int
    mesh: dict
    frozen: int
    trainable: int
    optimizer: int
    accumulator: int
    noise_state: int  # the noise transform's state: correlated-noise buffers (bands or buffers x trainable)
    batch: int
    accumulate_temp: int
    update_temp: int
    compile_seconds: float
    platform: str

    @property
    def total(self) -> int:
        resident = self.frozen + self.trainable + self.optimizer + self.accumulator + self.noise_state
        return resident + self.batch + max(self.accumulate_temp, self.update_temp)


def _noise_for_memory(cfg):
    """The method's noise transform with its real number of buffers (their memory is the plan's
    business; the coefficients are not: closed-form ones, fitted to no run)."""
    import jax

    from dpbench.privacy import noise as noise_lib
    from dpbench.privacy.methods import METHODS

    kind = METHODS[cfg.dp.method].noise
    if kind == "bandmf":
        strategy = noise_lib.bandmf(int(cfg.dp.bands), int(cfg.dp.bands), optimize=False)
    elif kind == "blt":
        strategy = noise_lib.blt(2, 1, int(cfg.dp.buffers), optimize=False)
    else:
        strategy = noise_lib.Strategy("iid")
    return strategy.transform(1.0, jax.random.PRNGKey(0))


def _abstract(tree, shardings):
    import jax

    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _model_parts(cfg, method, plan_cfg):
    """The model's parameters as shapes (``build_model(..., abstract=True)``: nothing read or
    initialised), its task's per-example losses and an abstract physical batch."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    from dpbench.models.registry import build_model
    from dpbench.train.tasks import task_class

    try:
        bundle = build_model(cfg.model, jax.random.PRNGKey(0), abstract=True)
    except ValueError as error:
        raise config_lib.ConfigError(f"the plan cannot build model.arch={cfg.model.arch}: {error}") from error
    bundle = bundle.with_frozen(method.frozen_labels)  # as experiment.build
    rows = int(cfg.compute.physical_batch_size)
    length = int(cfg.dataset.max_length)
    notes = []
    if cfg.dataset.task == "summarization":
        task = task_class(cfg.dataset.task)(bundle, cfg.dataset, progress_bar=False)
        task.max_targets = min(int(plan_cfg.get("max_targets") or cfg.dataset.max_new_tokens + 1), length - 1)
        keys = ("input_ids", "attention_mask", "loss_mask")
        batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32) for k in keys}
        notes.append(f"summarisation loss on {task.max_targets} response positions per example")
    else:  # classification: of token sequences with a tokenizer, else of images
        task = task_class(cfg.dataset.task).build(bundle, None, cfg)
        if bundle.tokenizer is not None:
            batch = {
                k: jax.ShapeDtypeStruct((rows, length), jnp.int32) for k in ("input_ids", "attention_mask")
            }
        else:
            batch = {"image": jax.ShapeDtypeStruct((rows, *cfg.model.image_shape), jnp.float32)}
        batch["label"] = jax.ShapeDtypeStruct((rows,), jnp.int32)
    return flatten_dict(bundle.params), bundle, task.losses_fn, batch, notes


def memory_plan(cfg: DictConfig, method, plan_cfg) -> tuple[MemoryPlan, list[str]]:
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import unflatten_dict

    from dpbench.train import sharding
    from dpbench.train.loop import Trainer, split_params
    from dpbench.train.optimizers import make_optimizer

    try:
        mesh = sharding.mesh_from_config(cfg.compute)
        rules = sharding.model_rules(cfg.model)
    except ValueError as error:
        raise config_lib.ConfigError(str(error)) from error
    config_lib.validate_with_data(cfg, int(plan_cfg.get("num_examples") or 10**9), mesh.size)
    params, bundle, losses_fn, batch, notes = _model_parts(cfg, method, plan_cfg)
    trainable, frozen = split_params(unflatten_dict(params), bundle.is_trainable)
    frozen_sh = sharding.shardings_for(frozen, mesh, rules)
    noise = _noise_for_memory(cfg) if method.private else None
    trainer = Trainer(
        losses_fn,
        method,
        make_optimizer(cfg.optimizer),
        mesh,
        noise,
        cfg.runner.batch_size,
        param_rules=rules,
        gathered_at_use=bundle.gathered_at_use,
    )
    trainer.param_shardings = sharding.shardings_for(trainable, mesh, rules)
    opt_shapes = jax.eval_shape(trainer.optimizer.init, trainable)
    trainer.opt_shardings = sharding.like_params(opt_shapes, trainer.param_shardings, mesh)
    a_trainable = _abstract(trainable, trainer.param_shardings)
    a_frozen = _abstract(frozen, frozen_sh)
    a_opt = _abstract(opt_shapes, trainer.opt_shardings)
    batch_sh = sharding.batch_sharding(mesh)
    a_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in batch.items()}
    rows = next(iter(batch.values())).shape[0]
    a_mask = jax.ShapeDtypeStruct((rows,), jnp.bool_, sharding=batch_sh)
    acc_shapes = jax.eval_shape(trainer._global_grad_sum, a_trainable, a_frozen, a_batch, a_mask)
    acc_sh = sharding.like_params(acc_shapes, trainer.param_shardings, mesh)
    a_acc = _abstract(acc_shapes, acc_sh)
    start = time.perf_counter()
    accumulate = trainer.accumulate.lower(a_acc, a_trainable, a_frozen, a_batch, a_mask).compile()
    a_noise = None
    if noise is not None:
        noise_shapes = jax.eval_shape(noise.init, trainable)
        trainer.noise_shardings = sharding.like_params(noise_shapes, trainer.param_shardings, mesh)
        a_noise = _abstract(noise_shapes, trainer.noise_shardings)
    update = trainer.update.lower(a_trainable, a_opt, a_noise, a_acc).compile()
    seconds = time.perf_counter() - start
    stats_acc, stats_upd = accumulate.memory_analysis(), update.memory_analysis()
    plan = MemoryPlan(
        devices=mesh.size,
        mesh=dict(mesh.shape),
        frozen=sharding.bytes_per_device(a_frozen),
        trainable=sharding.bytes_per_device(a_trainable),
        optimizer=sharding.bytes_per_device(a_opt),
        accumulator=sharding.bytes_per_device(a_acc),
        noise_state=sharding.bytes_per_device(a_noise) if a_noise is not None else 0,
        batch=sharding.bytes_per_device(a_batch) + sharding.bytes_per_device(a_mask),
        accumulate_temp=int(stats_acc.temp_size_in_bytes),
        update_temp=int(stats_upd.temp_size_in_bytes),
        compile_seconds=seconds,
        platform=jax.devices()[0].platform,
    )
    return plan, notes


def mechanism_rows(cfg: DictConfig, plan_cfg) -> list[tuple[str, str]]:
    """``python -m dpbench.privacy``'s rows (n, sampler, σ, ε, ...), with n from ``+plan.num_examples``
    when given, else from the training set."""
    from dpbench.data.registry import load_dataset
    from dpbench.privacy.__main__ import plan_rows

    num_examples = plan_cfg.get("num_examples")
    if num_examples is not None:
        return plan_rows(cfg, num_examples=int(num_examples))
    try:
        dataset = load_dataset(cfg.dataset)
    except (FileNotFoundError, ValueError) as error:
        raise config_lib.ConfigError(
            f"the plan needs n, the number of training examples: cannot load {cfg.dataset.name} "
            f"({error}); give +plan.num_examples=N (SAMSum's train split: 14732)"
        ) from None
    return plan_rows(cfg, dataset=dataset)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(cfg: DictConfig, exp, steps: int) -> list[tuple[str, str]]:
    """Build the real run (weights, data) on this machine's devices, take one logical step to compile,
    then ``steps`` more while a thread samples the resident set: the step's transient memory is the peak
    above the resident set before it (freed blocks returned with malloc_trim). CPU only (Linux)."""
    import threading

    import jax

    from dpbench.train import heap
    from dpbench.train.loop import gather_chunks

    def step(index: int) -> None:
        indices = exp.mechanism.sampler.batch_indices(index)
        chunks = gather_chunks(exp.train_arrays, indices, cfg.compute.physical_batch_size)
        stats = exp.trainer.logical_step(exp.state, exp.frozen, chunks)
        jax.block_until_ready((exp.state.trainable, stats))

    start = time.perf_counter()
    step(0)
    first = time.perf_counter() - start
    heap.release_freed()
    before = _rss()
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    for index in range(1, steps + 1):
        step(index)
    seconds = (time.perf_counter() - start) / steps
    done.set()
    sampler.join()
    import resource

    return [
        ("measured: resident set before the steps", _gib(before)),
        ("measured: step transient (peak - before)", _gib(peak[0] - before)),
        (
            "measured: process peak (ru_maxrss)",
            _gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        ),
        ("measured: seconds per logical step", f"{seconds:.1f} (first, with compilation: {first:.0f})"),
    ]


def _gib(value: int) -> str:
    """Bytes in GiB, or MiB below 1 GiB.

    >>> _gib(3 * GB // 2), _gib(5 * 1024**2)
    ('   1.500 GiB', '   5.000 MiB')
    """
    if value >= GB:
        return f"{value / GB:8.3f} GiB"
    return f"{value / 1024**2:8.3f} MiB"


def _model_row(model_cfg) -> str:
    """The model's architecture and the settings that size it (those its schema has).

    >>> from omegaconf import OmegaConf
    >>> _model_row(OmegaConf.create({"arch": "gemma3", "preset": "1b", "dtype": "bfloat16", "remat": "full"}))
    'gemma3 1b (bfloat16, remat=full)'
    >>> _model_row(OmegaConf.create({"arch": "cnn", "variant": "tutorial", "activation": "relu"}))
    'cnn (variant=tutorial, activation=relu)'
    """
    name = " ".join(str(part) for part in (model_cfg.arch, model_cfg.get("preset")) if part is not None)
    settings = [str(model_cfg.dtype)] if "dtype" in model_cfg else []
    keys = ("finetune", "lora_rank", "remat", "variant", "activation")
    settings += [f"{key}={model_cfg[key]}" for key in keys if key in model_cfg]
    return f"{name} ({', '.join(settings)})" if settings else name


def _batch_row(cfg: DictConfig) -> str:
    rows = cfg.compute.physical_batch_size
    if "image_shape" in cfg.model:  # an image model
        return f"{rows} x {' x '.join(str(d) for d in cfg.model.image_shape)} images"
    return f"{rows} x {cfg.dataset.max_length} tokens"


def plan_report(cfg: DictConfig) -> str:
    from omegaconf import OmegaConf

    from dpbench.privacy.__main__ import format_table
    from dpbench.privacy.methods import make_method

    config_lib.validate_static(cfg)
    plan_cfg = OmegaConf.to_container(cfg.plan) if "plan" in cfg else {}
    method = make_method(cfg.dp)
    rows = [
        ("model", _model_row(cfg.model)),
        ("dp", f"{cfg.dp.method}, clipping={method.clipping if method.private else '-'}"),
        ("physical batch", _batch_row(cfg)),
    ]
    rows += mechanism_rows(cfg, plan_cfg)
    measured = []
    if plan_cfg.get("measure_steps"):  # the real run, built first: its response length sizes the plan
        from dpbench.experiment import build

        experiment = build(cfg)
        if getattr(experiment.task, "max_targets", None):
            plan_cfg["max_targets"] = experiment.task.max_targets
        measured = measure(cfg, experiment, int(plan_cfg["measure_steps"]))
        del experiment  # its weights and buffers, before the plan compiles
        gc.collect()
    plan, notes = memory_plan(cfg, method, plan_cfg)
    rows += [
        ("mesh", f"{plan.devices} device(s): data={plan.mesh['data']} x fsdp={plan.mesh['fsdp']}"),
        ("per device: frozen params", _gib(plan.frozen)),
        ("per device: trainable params", _gib(plan.trainable)),
        ("per device: optimizer state", _gib(plan.optimizer)),
        ("per device: gradient accumulator", _gib(plan.accumulator)),
        ("per device: noise state (correlated-noise buffers)", _gib(plan.noise_state)),
        ("per device: physical batch", _gib(plan.batch)),
        ("per device: temporaries (accumulate)", _gib(plan.accumulate_temp)),
        ("per device: temporaries (update)", _gib(plan.update_temp)),
        ("per device: total", _gib(plan.total)),
    ]
    budget = cfg.compute.device_memory_gb
    if budget is not None:
        verdict = "fits" if plan.total <= budget * 1e9 else "does NOT fit"
        rows.append(
            (
                "fits compute.device_memory_gb",
                f"{verdict} in {budget:g} GB ({plan.total / 1e9:.2f} GB needed)",
            )
        )
    rows += [("note", n) for n in notes]
    if plan_cfg.get("measure_steps"):
        rows += measured
    rows.append(
        (
            "estimate",
            f"compiled by XLA:{plan.platform.upper()} on {plan.devices} fake devices in "
            f"{plan.compile_seconds:.0f} s; GPU/TPU buffer assignment differs, so treat the numbers as "
            "an estimate (leave ~10-20% headroom)",
        )
    )
    return format_table(rows)


# XLA:CPU removes optimization barriers early in its pipeline (the pass is named cse_barrier_expander),
# and CSE then merges jax.checkpoint's recomputed forward with the original one: model.remat would
# save nothing in a CPU compile. GPU and TPU keep the barriers through scheduling, so the plan does too.
KEEP_REMAT = CPU_KEEP_REMAT  # one flag for plans and runs (a CPU run warns without it)


def _set_devices(cfg: DictConfig) -> None:
    import jax

    count = plan_devices(cfg.compute)
    flags = os.environ.get("XLA_FLAGS", "")
    if KEEP_REMAT not in flags:  # read when the backend starts, which is after this
        os.environ["XLA_FLAGS"] = f"{flags} {KEEP_REMAT}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    with config_lib.exit_on_setting_error():
        _set_devices(cfg)
        print(plan_report(cfg), flush=True)


if __name__ == "__main__":
    main()
