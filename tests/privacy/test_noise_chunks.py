"""I.i.d. noise of unsharded leaves drawn as one chunked stream (dpbench.privacy.noise): the normals of
``jax.random.normal``, with one compiled hash instead of one per leaf."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpbench.privacy import noise
from dpbench.privacy.methods import GradientMethod
from dpbench.train import sharding
from dpbench.train.loop import Trainer, gather_chunks
from tests.privacy.test_methods import encoder_problem

KEY = jax.random.PRNGKey(7)


def _bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint32)


@pytest.mark.parametrize("start,size", [(0, 1), (0, 10), (3, 17), (1000, 24), (4095, 1)])
def test_normal_at_counters_is_the_matching_slice_of_jax_random_normal(start, size):
    whole = jax.jit(lambda k: jax.random.normal(k, (4096,), jnp.float32))(KEY)
    counters = jnp.arange(start, start + size, dtype=jnp.uint32)
    part = jax.jit(noise._normal_f32)(KEY[0], KEY[1], counters)
    np.testing.assert_array_equal(_bits(part), _bits(whole[start : start + size]))


@pytest.mark.parametrize("chunk", [1, 4, 100, 1000])
def test_the_stream_holds_each_leafs_jax_random_normal(chunk):
    sizes = [5, 1024, 333 * 7, 1, 64 * 65]
    keys = list(jax.random.split(KEY, len(sizes)))
    normals, starts = jax.jit(lambda k: noise._normals_as_one_stream(sizes, k, chunk))(keys)
    normal = jax.jit(jax.random.normal, static_argnums=1)
    for size, key, start in zip(sizes, keys, starts):
        np.testing.assert_array_equal(_bits(normals[start : start + size]), _bits(normal(key, (size,))))


@pytest.mark.parametrize("shape", [(5,), (1024,), (333, 7), (3, 4, 50)])
@pytest.mark.parametrize("chunk", [4, 1000])
def test_streamed_noise_is_the_whole_draws_noise(shape, chunk):
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape) / 7
    tree = {"w": x, "b": jnp.ones((3,), jnp.float32), "h": jnp.ones((2, 2), jnp.bfloat16)}
    whole = jax.jit(lambda t: noise.add_iid_gaussian(t, KEY, 0.3))(tree)
    streamed = jax.jit(lambda t: noise.add_iid_gaussian(t, KEY, 0.3, chunk))(tree)
    for name in ("w", "b"):  # XLA may fold 0.3 into the whole draw's √2: the last bit may differ
        np.testing.assert_array_max_ulp(np.asarray(streamed[name]), np.asarray(whole[name]), maxulp=2)
    np.testing.assert_array_equal(np.asarray(streamed["h"]), np.asarray(whole["h"]))  # not float32: as before
    again = jax.jit(lambda t: noise.add_iid_gaussian(t, KEY, 0.3, chunk))(tree)
    np.testing.assert_array_equal(_bits(again["w"]), _bits(streamed["w"]))


def test_only_raw_keys_and_float32_leaves_are_streamed():
    key = jnp.asarray(KEY)
    assert noise._streamable(jnp.zeros(3, jnp.float32), key)
    assert not noise._streamable(jnp.zeros(3, jnp.bfloat16), key)  # other bit layout
    assert not noise._streamable(jnp.zeros(3, jnp.float32), jax.random.key(0))  # typed key


def test_the_stream_is_used_only_while_its_int32_offsets_cannot_overflow():
    assert noise._stream_fits([2**31 - 2**14], 2**14)
    assert not noise._stream_fits([2**31], 2**14)
    # padding counts: 2**17 one-element draws take a whole 2**14 chunk each
    assert not noise._stream_fits([1] * 2**17, 2**14)


def test_the_stream_cuts_temporaries_and_compiled_code():
    """XLA:CPU's rolled threefry holds ~4 uint32 arrays of a draw's size, and is compiled per draw."""
    tree = [jax.ShapeDtypeStruct((4096, 1024), jnp.float32)] + [jax.ShapeDtypeStruct((64,), jnp.float32)] * 40

    def compiled(chunk):
        step = jax.jit(lambda t: noise.add_iid_gaussian(t, KEY, 0.3, chunk))
        return step.lower(tree).compile()

    whole, streamed = compiled(None), compiled(1 << 14)
    temporaries = [c.memory_analysis().temp_size_in_bytes for c in (whole, streamed)]
    assert temporaries[0] > 3 * 16 * 2**20
    assert temporaries[1] < temporaries[0] / 2, temporaries
    loops = [c.as_text().count("while(") for c in (whole, streamed)]
    assert loops[0] >= 41 and loops[1] < 5, loops  # one rolled hash per leaf against one stream


def test_streams_only_on_cpus_where_no_fsdp_axis_splits_the_leaves():
    assert noise.chunk_elements_for(sharding.make_mesh(1)) == noise.NOISE_CHUNK_ELEMENTS

    def mesh(platform, fsdp):
        devices = np.array([types.SimpleNamespace(platform=platform)] * fsdp).reshape(1, fsdp)
        return types.SimpleNamespace(devices=devices, shape={"data": 1, "fsdp": fsdp})

    assert noise.chunk_elements_for(mesh("cpu", 1)) == noise.NOISE_CHUNK_ELEMENTS
    assert noise.chunk_elements_for(mesh("cpu", 2)) is None
    assert noise.chunk_elements_for(mesh("gpu", 1)) is None


def test_a_private_step_with_streamed_noise_trains_as_with_whole_draws():
    task, trainable, frozen, arrays = encoder_problem(())
    method = GradientMethod("vanilla", clip_norm=0.1)

    def two_steps(chunk):
        transform = noise.iid_gaussian(0.5, KEY, chunk)
        trainer = Trainer(task.losses_fn, method, optax.sgd(0.1), sharding.make_mesh(1), transform, 8)
        state = trainer.init(trainable)
        chunks = gather_chunks(arrays, np.arange(8), 4)
        for _ in range(2):
            trainer.logical_step(state, frozen, chunks)
        return state.trainable

    whole, streamed = two_steps(None), two_steps(64)
    for name in whole:
        assert not np.array_equal(np.asarray(whole[name]), np.asarray(trainable[name]))
        np.testing.assert_allclose(np.asarray(streamed[name]), np.asarray(whole[name]), rtol=1e-5, atol=1e-6)
