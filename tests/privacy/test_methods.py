"""Every DP method on a LoRA encoder: sensitivity <= C, FFA keeps A bit-identical, the budget holds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from omegaconf import OmegaConf

from dpbench.data import text
from dpbench.models.encoder import build_encoder
from dpbench.privacy import clipping as clipping_lib
from dpbench.privacy.batch_selection import PoissonSampler
from dpbench.privacy.methods import FASTEST_EXACT, METHODS, GradientMethod, make_method
from dpbench.privacy.noise import iid_gaussian
from dpbench.train import sharding
from dpbench.train.loop import LoopCallbacks, Trainer, gather_chunks, split_params, train_loop
from dpbench.train.tasks import ClassificationTask
from tests.helpers import compose_config

CLIP = 0.05
SENTENCES = [f"sentence number {i} is {'good' if i % 2 else 'bad'}" for i in range(11)]


def encoder_problem(frozen_labels: tuple[str, ...]):
    cfg = compose_config(["model=tiny_encoder"]).model
    bundle = build_encoder(cfg, jax.random.PRNGKey(0)).with_frozen(frozen_labels)
    # LoRA B starts at zero; perturb it so every trainable factor gets a non-zero gradient.
    flat = flatten_dict(bundle.params)
    key = jax.random.PRNGKey(1)
    params = {
        path: (value + 0.1 * jax.random.normal(jax.random.fold_in(key, i), value.shape))
        if path[-1] == "lora_b"
        else value
        for i, (path, value) in enumerate(sorted(flat.items()))
    }
    trainable, frozen = split_params(unflatten_dict(params), bundle.is_trainable)
    arrays, _ = text.tokenize_classification(SENTENCES, np.arange(11) % 2, bundle.tokenizer, 24)
    task = ClassificationTask(bundle.apply_fn)
    return task, trainable, frozen, arrays


def summed(method, task, trainable, frozen, arrays, indices, physical):
    total = None
    grad_sum = jax.jit(functools.partial(method.grad_sum, task.losses_fn))
    for batch, mask in gather_chunks(arrays, np.asarray(indices), physical):
        g, _ = grad_sum(trainable, batch, jnp.asarray(mask), frozen)
        total = g if total is None else jax.tree_util.tree_map(jnp.add, total, g)
    return total


def norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(tree))))


@pytest.mark.parametrize(
    ("method_name", "clipping"),
    # Every private method in METHODS (a new one is covered without editing this list), and vanilla
    # with each clipping implementation.
    [("vanilla", "per_example"), ("vanilla", "bookkeeping")]
    + [(name, "auto") for name, spec in METHODS.items() if spec.private],
)
@pytest.mark.parametrize("removed", [3, 10])  # 10 sits in the last, padded physical batch
def test_sensitivity_at_most_c_for_every_method(method_name, clipping, removed):
    method = make_method(OmegaConf.create({"method": method_name, "clip_norm": CLIP, "clipping": clipping}))
    assert method.clipping == {"auto": "ghost" if method_name == "ghost" else FASTEST_EXACT}.get(
        clipping, clipping
    )
    task, trainable, frozen, arrays = encoder_problem(method.frozen_labels)
    full = list(range(11))
    with_all = summed(method, task, trainable, frozen, arrays, full, 4)
    without = summed(method, task, trainable, frozen, arrays, [i for i in full if i != removed], 4)
    diff = norm(jax.tree_util.tree_map(jnp.subtract, with_all, without))
    assert 0.5 * CLIP < diff <= CLIP * (1 + 1e-5)


@pytest.mark.parametrize("clipping", ["per_example", "ghost", "bookkeeping"])
def test_automatic_clipping_scales_each_gradient_by_c_over_norm_plus_gamma(clipping):
    """AUTO-S (dp.clip_fn=automatic): sum of gᵢ·C/(‖gᵢ‖+γ), the same under every implementation, and
    removing one example moves it by C‖g‖/(‖g‖+γ) < C."""
    gamma = 0.01
    dp = {
        "method": "vanilla",
        "clip_norm": CLIP,
        "clipping": clipping,
        "clip_fn": "automatic",
        "clip_gamma": gamma,
    }
    method = make_method(OmegaConf.create(dp))
    assert (method.clip_fn, method.clip_gamma) == ("automatic", gamma)
    task, trainable, frozen, arrays = encoder_problem(())
    batch = {k: jnp.asarray(v[:8]) for k, v in arrays.items()}
    grads, _, _ = clipping_lib.per_example_grads(task.losses_fn, trainable, batch, frozen)
    norms = clipping_lib.global_norms(grads)
    weights = CLIP / (norms + gamma)
    expected = jax.tree_util.tree_map(lambda g: jnp.tensordot(weights, g, axes=1), grads)
    total = summed(method, task, trainable, frozen, arrays, range(8), 4)
    error = norm(jax.tree_util.tree_map(jnp.subtract, total, expected)) / norm(expected)
    assert error < 1e-4, error  # float32 sums in another order (the conformance matrix: 1e-4)
    without = summed(method, task, trainable, frozen, arrays, [i for i in range(8) if i != 3], 4)
    moved = norm(jax.tree_util.tree_map(jnp.subtract, total, without))
    assert moved == pytest.approx(float(CLIP * norms[3] / (norms[3] + gamma)), rel=1e-4)
    assert moved <= CLIP


@pytest.mark.parametrize("method_name", ["vanilla", "ffa"])
def test_trainable_sets_and_ffa_keeps_a_bit_identical(method_name):
    method = make_method(OmegaConf.create({"method": method_name, "clip_norm": CLIP}))
    task, trainable, frozen, arrays = encoder_problem(method.frozen_labels)
    names = {path[-1] for path in trainable}
    if method_name == "ffa":
        assert "lora_a" not in names and "lora_b" in names
        assert any(path[-1] == "lora_a" for path in frozen)
    else:
        assert {"lora_a", "lora_b"} <= names
    assert all(p[-1] in ("lora_a", "lora_b") or "classifier" in p for p in trainable)
    frozen_before = jax.tree_util.tree_map(np.asarray, frozen)
    mesh = sharding.make_mesh(1)
    trainer = Trainer(task.losses_fn, method, optax.sgd(0.5), mesh, noise=None, expected_batch_size=8)
    state = trainer.init(trainable)
    before = jax.tree_util.tree_map(np.asarray, state.trainable)
    for _ in range(2):
        trainer.logical_step(state, frozen, gather_chunks(arrays, np.arange(8), 4))
    for path, value in frozen.items():  # frozen (incl. FFA's A) is never touched
        np.testing.assert_array_equal(np.asarray(value), frozen_before[path])
    moved = {p[-1] for p, v in state.trainable.items() if not np.array_equal(np.asarray(v), before[p])}
    assert "lora_b" in moved and ("lora_a" in moved) == (method_name == "vanilla")


def test_training_past_the_budget_raises():
    from dpbench.privacy.accounting import AccountantConfig, EpsilonTracker

    task, trainable, frozen, arrays = encoder_problem(())
    sampler = PoissonSampler(11, 4, seed=0)
    tracker = EpsilonTracker(sampler, 1.0, 1e-5, AccountantConfig(name="rdp"), budgeted_steps=2)
    method = GradientMethod("vanilla", clip_norm=CLIP)
    noise = iid_gaussian(CLIP, jax.random.PRNGKey(0))
    trainer = Trainer(task.losses_fn, method, optax.sgd(0.1), sharding.make_mesh(1), noise, 4)
    state = trainer.init(trainable)
    callbacks = LoopCallbacks(
        evaluate=lambda step: {},
        epsilon_at=tracker.epsilon_at,
        log=lambda r, s: None,
        check_budget=tracker.check_step,
    )
    with pytest.raises(RuntimeError, match="2"):
        train_loop(trainer, state, frozen, arrays, sampler, 3, 4, 0, callbacks, False)
    assert state.step == 2  # the two budgeted steps ran, the third was refused before any noise draw
