"""JAX variants: dpbench's own training step, a plain jitted JAX step, and jax-privacy's ``clipped_grad``.

All three train the same Flax model with the same per-example loss: dpbench's model bundle and
task (``build_model`` + ``ClassificationTask`` / ``SummarizationTask``), built from the repository's
own ``conf/model`` and ``conf/dp`` options. dpbench variants step through ``Trainer.logical_step``,
exactly as ``python -m dpbench`` trains.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpbench.bench.workloads import Workload, decoder_split, make_batch

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
NOISE_MULTIPLIER = 1.0  # any σ: the cost of a step does not depend on it


def compose_group(group: str, option: str, overrides: list[str]):
    """One config group (``conf/<group>/<option>.yaml`` + overrides), schema-checked like a run's.

    Composing only the groups the bench needs keeps it independent of the rest of the tree.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dpbench.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(f"{group}/{option}", overrides=[f"{group}.{o}" for o in overrides])[group]


def dp_config(workload: Workload, clipping: str | None):
    """``dp=none`` for ``clipping=None``, else ``dp=vanilla`` with that clipping implementation."""
    if clipping is None:
        return compose_group("dp", "none", [])
    overrides = [f"clip_norm={workload.clip_norm}", "epsilon=null", f"noise_multiplier={NOISE_MULTIPLIER}"]
    if clipping != "per_example" or "clipping" in compose_group("dp", "vanilla", []):
        overrides.append(f"clipping={clipping}")
    return compose_group("dp", "vanilla", overrides)


def available_clippings() -> tuple[str, ...]:
    """The ``dp.clipping`` values this checkout implements (``per_example`` before the seam existed)."""
    from dpbench.privacy import clipping as clipping_module

    declared = getattr(clipping_module, "CLIPPING_IMPLEMENTATIONS", None)
    candidates = tuple(declared) if declared else ("per_example", "ghost", "bookkeeping")
    if "clipping" not in compose_group("dp", "vanilla", []):
        return ("per_example",)
    from dpbench.privacy.methods import make_method

    found = []
    for name in candidates:
        try:
            make_method(compose_group("dp", "vanilla", [f"clipping={name}"]))
        except Exception:  # noqa: BLE001 - an unknown value is refused in whatever way the code chooses
            continue
        found.append(name)
    return tuple(found)


def model_config(workload: Workload):
    base = compose_group("model", workload.dpbench_model, list(workload.model_overrides))
    if workload.kind == "cnn":
        return base  # no LoRA: every parameter trains
    overrides = model_overrides(workload)
    if "finetune" not in base:  # before model.finetune existed: no LoRA means every parameter trains
        overrides.remove(f"finetune={workload.finetune}")
        overrides += ["lora_rank=0"] if workload.finetune == "full" else []
    return compose_group("model", workload.dpbench_model, overrides)


def make_optimizer(workload: Workload) -> optax.GradientTransformation:
    if workload.optimizer == "sgd":
        return optax.sgd(workload.learning_rate, momentum=0.9)
    return optax.adamw(workload.learning_rate, weight_decay=0.01)


class Model:
    """The bundle, the per-example losses function, trainable / frozen parameters, one logical batch."""

    def __init__(self, workload: Workload, frozen_labels: tuple[str, ...] = ()):
        from dpbench.models.base import LABELS
        from dpbench.models.registry import build_model
        from dpbench.train.loop import split_params

        self.workload = workload
        cfg = model_config(workload)
        if workload.random_weights_on_device:
            bundle = random_on_device(build_model(cfg, jax.random.PRNGKey(0), abstract=True))
        else:
            bundle = build_model(cfg, jax.random.PRNGKey(0))
        if workload.finetune == "full" and "finetune" not in cfg:
            bundle = dataclasses.replace(bundle, trainable_labels=frozenset(LABELS))
        self.bundle = bundle.with_frozen(frozen_labels)  # as experiment.build: the method's labels
        self.losses_fn = self._task().losses_fn
        self.trainable, self.frozen = split_params(self.bundle.params, self.bundle.is_trainable)
        self.batch = make_batch(workload)

    def _task(self):
        if self.workload.kind != "decoder":
            from dpbench.train.tasks import ClassificationTask

            return ClassificationTask(self.bundle.apply_fn)
        from dpbench.train.summarization import SummarizationTask

        _, response = decoder_split(self.workload.seq_len)
        dataset_cfg = types.SimpleNamespace(
            max_prompt_length=self.workload.seq_len - response, max_new_tokens=response
        )
        task = SummarizationTask(self.bundle, dataset_cfg, progress_bar=False)
        # As training with summaries of `response` tokens: logits of the response positions only.
        task.max_targets = response
        return task

    @property
    def num_trainable(self) -> int:
        return int(sum(np.size(x) for x in self.trainable.values()))


def random_on_device(abstract_bundle):
    """The abstract bundle (``build_model(..., abstract=True)``: shapes and stored dtypes, as the plan
    builds it) with weights drawn on the default device: N(0, 0.02), norm scales 0, as the builders'
    random init. The values do not change a step's cost."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    flat = flatten_dict(abstract_bundle.params)
    keys = jax.random.split(jax.random.PRNGKey(0), len(flat))
    params = {}
    for key, (path, leaf) in zip(keys, sorted(flat.items()), strict=True):
        if path[-1] == "scale" or not jnp.issubdtype(leaf.dtype, jnp.floating):
            params[path] = jnp.zeros(leaf.shape, leaf.dtype)
        else:
            params[path] = 0.02 * jax.random.normal(key, leaf.shape, leaf.dtype)
    return dataclasses.replace(abstract_bundle, params=unflatten_dict(params))


def run_config(workload: Workload, clipping: str | None, platform: str):
    """The whole run config (``conf/config.yaml``) of this step, for ``dpbench.plan.memory_plan``: the
    workload's model, batch shapes, optimizer and ``dp`` on one device of ``platform`` (cpu | gpu)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dpbench.config import register_configs

    dp = ["dp=none"]
    if clipping is not None:  # as dp_config
        dp = ["dp=vanilla", f"dp.clipping={clipping}", f"dp.clip_norm={workload.clip_norm}"]
        dp += ["dp.epsilon=null", f"dp.noise_multiplier={NOISE_MULTIPLIER}"]
    overrides = [
        f"model={workload.dpbench_model}",
        *(f"model.{o}" for o in model_overrides(workload)),
        "dataset=samsum" if workload.kind == "decoder" else "dataset=sst2",
        f"dataset.max_length={workload.seq_len}",
        *dp,
        f"optimizer={workload.optimizer}",
        f"runner.batch_size={workload.batch_size}",
        f"compute={platform}",
        f"compute.physical_batch_size={workload.physical_batch_size}",
        "compute.num_devices=1",
        "logger=none",
        "paths.output_dir=unused",
    ]
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def model_overrides(workload: Workload) -> list[str]:
    """``model.*`` settings of the workload beyond its conf/model option (as :func:`model_config`)."""
    overrides = list(workload.model_overrides)
    if workload.kind == "cnn":
        return overrides
    if workload.lora_rank:
        overrides += [f"lora_rank={workload.lora_rank}", f"lora_alpha={workload.lora_alpha}"]
        overrides.append("lora_targets=[" + ",".join(workload.lora_targets) + "]")
    return overrides + [f"finetune={workload.finetune}"]


def memory_plan(workload: Workload, clipping: str | None, platform: str) -> dict:
    """``python -m dpbench.plan``'s per-device estimate of this step (``dpbench.plan.memory_plan``),
    compiled by this process's backend: bytes by part and their total."""
    from dpbench.plan import memory_plan as plan_memory
    from dpbench.privacy.methods import make_method

    cfg = run_config(workload, clipping, platform)
    plan_cfg = {"max_targets": decoder_split(workload.seq_len)[1]} if workload.kind == "decoder" else {}
    plan, _ = plan_memory(cfg, make_method(cfg.dp), plan_cfg)
    parts = dataclasses.asdict(plan)
    return {**parts, "total": plan.total}


def norm_routes(workload: Workload, seq_lens: list[int]) -> dict[int, dict[str, dict]]:
    """At each sequence length, how ``dp.clipping`` = ghost or bookkeeping computes every trainable
    parameter's per-example norm on the workload's model (``dpbench.privacy.clipping.norm_routes``:
    the clipping code's own mixed rule, traced abstractly on one physical batch)."""
    from dpbench.privacy import clipping

    model = Model(workload)  # dp=vanilla freezes nothing beyond model.finetune: the same trainables
    routes = {}
    for seq_len in seq_lens:
        shaped = dataclasses.replace(workload, seq_len=seq_len, batch_size=workload.physical_batch_size)
        routes[seq_len] = clipping.norm_routes(
            model.losses_fn, model.trainable, make_batch(shaped), model.frozen
        )
    return routes


BANDMF_BANDS = 4
BANDMF_STEPS = 5000  # the strategy's length (as a 5,000-step run): its (steps, bands) coefficients are held


def dpbench_step(
    workload: Workload, clipping: str | None, noise_kind: str = "iid"
) -> tuple[Callable[[int], None], dict]:
    """dpbench's logical step (``Trainer``), for ``dp=none`` or ``dp=vanilla dp.clipping=<clipping>``;
    ``noise_kind=bandmf``: the same clipping with BandMF's streamed noise (``BANDMF_BANDS`` bands)."""
    from dpbench.privacy import noise as noise_lib
    from dpbench.privacy.methods import make_method
    from dpbench.train import sharding
    from dpbench.train.loop import Trainer, gather_chunks

    method = make_method(dp_config(workload, clipping))
    model = Model(workload, frozen_labels=method.frozen_labels)
    mesh = sharding.make_mesh()
    frozen = sharding.put_replicated(model.frozen, mesh)
    noise = None
    if method.private:
        strategy = (
            noise_lib.bandmf(BANDMF_STEPS, BANDMF_BANDS, optimize=False)
            if noise_kind == "bandmf"
            else noise_lib.Strategy("iid")
        )
        noise = strategy.transform(
            NOISE_MULTIPLIER * method.clip_norm, jax.random.PRNGKey(0), noise_lib.chunk_elements_for(mesh)
        )
    trainer = Trainer(model.losses_fn, method, make_optimizer(workload), mesh, noise, workload.batch_size)
    state = trainer.init(model.trainable)
    num_trainable = model.num_trainable
    model.bundle.params = model.trainable = None  # as experiment.build: the trainer's copy only
    noise_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state.noise_state))
    chunks = gather_chunks(model.batch, np.arange(workload.batch_size), workload.physical_batch_size)

    def step(i: int) -> None:
        trainer.logical_step(state, frozen, chunks)
        jax.block_until_ready(state.trainable)

    return step, {
        "trainable_params": num_trainable,
        "method": method.name,
        "noise_state_bytes": noise_bytes,
    }


def _microbatched(batch: dict, size: int) -> dict:
    return jax.tree_util.tree_map(lambda x: x.reshape(-1, size, *x.shape[1:]), batch)


def plain_jax_step(workload: Workload) -> tuple[Callable[[int], None], dict]:
    """Non-private reference in the style of a hand-written JAX loop: one jit, a scan over physical
    batches summing gradients, the mean gradient into optax."""
    model = Model(workload)
    optimizer = make_optimizer(workload)

    def summed_loss(trainable, batch, frozen):
        return jnp.sum(model.losses_fn(trainable, batch, frozen)[0])

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(trainable, opt_state, batch, frozen):
        def accumulate(acc, micro):
            grads = jax.grad(summed_loss)(trainable, micro, frozen)
            return jax.tree_util.tree_map(jnp.add, acc, grads), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
        grad_sum, _ = jax.lax.scan(
            accumulate, zeros, _microbatched(batch, workload.physical_batch_size), unroll=True
        )
        grads = jax.tree_util.tree_map(lambda g: g / workload.batch_size, grad_sum)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    state = {"trainable": model.trainable, "opt_state": optimizer.init(model.trainable)}
    batch = jax.device_put(model.batch)
    frozen = jax.device_put(model.frozen)

    def step(i: int) -> None:
        state["trainable"], state["opt_state"] = train_step(
            state["trainable"], state["opt_state"], batch, frozen
        )
        jax.block_until_ready(state["trainable"])

    return step, {"trainable_params": model.num_trainable}


def jax_privacy_step(workload: Workload) -> tuple[Callable[[int], None], dict]:
    """jax-privacy 2.x: ``clipped_grad`` (vmap per-example gradients, microbatched by the physical
    batch size) + ``gaussian_privatizer`` noise on the clipped sum + optax, in one jit."""
    import jax_privacy
    from jax_privacy import noise_addition

    model = Model(workload)
    optimizer = make_optimizer(workload)

    def summed_loss(trainable, batch, frozen):  # the batch holds one example (keep_batch_dim)
        return jnp.sum(model.losses_fn(trainable, batch, frozen)[0])

    clipped = jax_privacy.clipped_grad(
        summed_loss,
        argnums=0,
        l2_clip_norm=workload.clip_norm,
        batch_argnums=1,
        microbatch_size=workload.physical_batch_size,
    )
    privatizer = noise_addition.gaussian_privatizer(
        stddev=NOISE_MULTIPLIER * workload.clip_norm, prng_key=jax.random.key(0)
    )

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(trainable, opt_state, noise_state, batch, frozen):
        clipped_sum = clipped(trainable, batch, frozen)
        noisy_sum, noise_state = privatizer.update(clipped_sum, noise_state)
        grads = jax.tree_util.tree_map(lambda g: g / workload.batch_size, noisy_sum)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, noise_state

    state = {
        "trainable": model.trainable,
        "opt_state": optimizer.init(model.trainable),
        "noise_state": privatizer.init(model.trainable),
    }
    batch = jax.device_put(model.batch)
    frozen = jax.device_put(model.frozen)

    def step(i: int) -> None:
        state["trainable"], state["opt_state"], state["noise_state"] = train_step(
            state["trainable"], state["opt_state"], state["noise_state"], batch, frozen
        )
        jax.block_until_ready(state["trainable"])

    return step, {"trainable_params": model.num_trainable, "jax_privacy": jax_privacy.__version__}
