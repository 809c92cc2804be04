"""Sharded loading: a tiny Gemma 3 safetensors checkpoint placed on a (data=2, fsdp=4) mesh of fake CPU
devices, each device reading only its slice of the memory-mapped file, equals the unsharded load."""

import json
import struct
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from dpbench.models import checkpoints
from dpbench.models.gemma3 import PRESETS, loading

LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "self_attn.q_norm",
    "self_attn.k_norm",
)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The format by hand (header JSON + raw bytes), so bfloat16 needs no torch."""
    header, offset, chunks = {}, 0, []
    for name, value in tensors.items():
        kind = "BF16" if value.dtype == ml_dtypes.bfloat16 else {"float32": "F32"}[value.dtype.name]
        raw = np.ascontiguousarray(value).tobytes()
        header[name] = {
            "dtype": kind,
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        offset += len(raw)
        chunks.append(raw)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


def make_checkpoint(folder: Path) -> None:
    c = PRESETS["tiny"]
    rng = np.random.default_rng(0)
    shapes = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.norm.weight": (c.hidden_size,),
    }
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    for i in range(c.num_layers):
        out_in = {
            "self_attn.q_proj": (q, c.hidden_size),
            "self_attn.k_proj": (kv, c.hidden_size),
            "self_attn.v_proj": (kv, c.hidden_size),
            "self_attn.o_proj": (c.hidden_size, q),
            "mlp.gate_proj": (c.intermediate_size, c.hidden_size),
            "mlp.up_proj": (c.intermediate_size, c.hidden_size),
            "mlp.down_proj": (c.hidden_size, c.intermediate_size),
        }
        for name, shape in out_in.items():
            shapes[f"model.layers.{i}.{name}.weight"] = shape
        for name in NORMS:
            shapes[f"model.layers.{i}.{name}.weight"] = (
                c.head_dim if "_norm" in name[-7:] else c.hidden_size,
            )
    tensors = {n: (0.1 * rng.standard_normal(s)).astype(ml_dtypes.bfloat16) for n, s in shapes.items()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float32)  # a mixed-dtype file
    first = dict(list(tensors.items())[: len(tensors) // 2])
    second = dict(list(tensors.items())[len(tensors) // 2 :])
    write_safetensors(folder / "model-00001-of-00002.safetensors", first)
    write_safetensors(folder / "model-00002-of-00002.safetensors", second)
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map |= {n: "model-00002-of-00002.safetensors" for n in second}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {
        "model_type": "gemma3_text",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "sliding_window": c.sliding_window,
        "query_pre_attn_scalar": c.query_pre_attn_scalar,
    }
    (folder / "config.json").write_text(json.dumps(config))


def test_memory_mapped_reader_reads_what_was_written(tmp_path):
    make_checkpoint(tmp_path)
    tensors = checkpoints.read_safetensors(tmp_path)
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == ml_dtypes.bfloat16
    assert tensors["model.norm.weight"].dtype == np.float32
    assert isinstance(tensors["model.embed_tokens.weight"], checkpoints.LazyTensor)  # nothing read yet
    flat = loading.map_hf_tensors(tensors)
    up = flat[("layer_0", "mlp", "up_proj", "kernel")]
    assert up.shape == (PRESETS["tiny"].hidden_size, PRESETS["tiny"].intermediate_size)  # [in, out]


SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from flax.traverse_util import flatten_dict
    from dpbench.models.checkpoints import read_safetensors
    from dpbench.models.gemma3 import loading
    from dpbench.models.gemma3.builder import _on_default_device
    from dpbench.train import sharding

    folder = sys.argv[1]
    flat = loading.map_hf_tensors(read_safetensors(folder))
    mesh = sharding.make_mesh(8, 2, 4)
    rules = [["embed_tokens", [None, "fsdp"]], ["kernel$", "fsdp"], [".*", "replicated"]]
    reads = []

    class Recording:  # a source that logs which slices devices ask for
        def __init__(self, array):
            self.array, self.shape, self.dtype = array, array.shape, array.dtype
        def __getitem__(self, index):
            reads.append(int(np.prod(self.array[index].shape)))
            return self.array[index]

    placed = sharding.place({p: Recording(v) for p, v in flat.items()}, mesh, rules, dtype="bfloat16")
    whole = _on_default_device(flat, dtype="bfloat16")
    out = {"equal": all(np.array_equal(np.asarray(placed[p]), np.asarray(whole[p])) for p in flat)}
    up = placed[("layer_0", "mlp", "up_proj", "kernel")]
    out["up_spec"] = str(up.sharding.spec)
    out["up_shard_shapes"] = sorted({tuple(s.data.shape) for s in up.addressable_shards})
    out["up_shape"] = list(up.shape)
    out["max_read"] = max(reads)
    out["largest"] = max(int(np.prod(v.shape)) for v in flat.values())
    out["dtypes"] = sorted({str(v.dtype) for v in placed.values()})
    json.dump(out, sys.stdout)
    """
)


def test_sharded_placement_equals_unsharded_load(tmp_path, run_cli):
    make_checkpoint(tmp_path)
    out = json.loads(run_cli("-c", SCRIPT, tmp_path).stdout)
    assert out["equal"]
    assert out["dtypes"] == ["bfloat16"]
    assert "fsdp" in out["up_spec"]
    rows, cols = out["up_shape"]
    assert out["up_shard_shapes"] == [[rows, cols // 4]] or out["up_shard_shapes"] == [[rows // 4, cols]]
    # No device ever read a whole weight matrix; the largest read is one fsdp shard of the largest tensor.
    assert out["max_read"] == pytest.approx(out["largest"] / 4)
