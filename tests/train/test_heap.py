"""Freed heap memory goes back to the OS after the step functions compile (dpbench.train.heap)."""

import ctypes
import sys

import jax
import numpy as np
import optax
import pytest

from dpbench.privacy.methods import GradientMethod
from dpbench.privacy.noise import iid_gaussian
from dpbench.train import heap, sharding
from dpbench.train.loop import Trainer, gather_chunks
from tests.privacy.test_methods import encoder_problem


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc")
def test_release_freed_hands_fragmented_free_blocks_back():
    """Every other 64 KiB block freed: glibc keeps the holes (they sit below live blocks) until trimmed."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(2048)]  # 128 MiB, under the mmap threshold
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    for block in blocks[::2]:
        libc.free(block)
    before = _rss_bytes()
    assert heap.release_freed()
    released = before - _rss_bytes()
    for block in blocks[1::2]:
        libc.free(block)
    assert released > 32 * 2**20, f"released only {released / 2**20:.1f} MiB of 64 MiB of holes"


def test_the_first_logical_step_releases_after_each_compilation(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "release_freed", lambda: calls.append(1) or True)
    task, trainable, frozen, arrays = encoder_problem(())
    noise = iid_gaussian(0.1, jax.random.PRNGKey(0))
    method = GradientMethod("vanilla", clip_norm=0.1)
    trainer = Trainer(task.losses_fn, method, optax.sgd(0.1), sharding.make_mesh(1), noise, 8)
    state = trainer.init(trainable)
    chunks = gather_chunks(arrays, np.arange(8), 4)  # two physical batches
    trainer.logical_step(state, frozen, chunks)
    assert len(calls) == 4  # after each accumulate call, after the accumulation, after the update
    trainer.logical_step(state, frozen, chunks)
    assert len(calls) == 4  # compiled: later steps pay nothing
