"""The final model of a run (``<run dir>/model/``), and its Hugging Face layout for export.

A saved model is a folder that rebuilds the model without the run's config composition or its data:

- ``model.safetensors``: the parameters the run trained or drew (trainable, and frozen ones initialised
  at random: FFA's LoRA A, a frozen head), under their ``/``-joined dpbench paths
  (``encoder/layer_0/attention/lora_b``), in the dtype the run held them in; with a randomly initialised
  model, every parameter;
- the frozen pretrained base is not copied (a 27B base would be 54 GB in every run folder): the folder
  names it (``base_params``: the weights source and a checksum per array) and loading reads it again from
  the same file, the way the run read it, and checks it against the checksums;
- ``model_config.json``: the run's resolved ``model`` section, the architecture (what the model module's
  ``saved_architecture`` says it needs beyond ``model.*``, e.g. the encoder's ``config.json`` values),
  the task, the labels the DP method froze, and the dataset's prompt settings;
- the tokenizer's files (none for byte tokenizers) and a model card (``README.md``, written by the job).

A model module that can be saved has ``saved_architecture(bundle) -> dict`` and
``from_saved(cfg, architecture, params, directory) -> ModelBundle``; one that can leave for Hugging Face
also has ``hf_layout(bundle) -> HFLayout``: the ``config.json`` and the tensor name of every parameter.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401 (bfloat16 for NumPy, which safetensors' numpy writer needs)
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from dpbench.errors import ConfigError
from dpbench.models.base import ModelBundle

MODEL_DIR = "model"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
CARD_FILE = "README.md"
FORMAT = "dpbench-model"
FORMAT_VERSION = 1


@dataclasses.dataclass
class HFLayout:
    """A model in Hugging Face terms: its ``config.json``, and for every dpbench parameter path (a
    tuple) the Hugging Face tensor name and whether the array is transposed (Dense ``[in, out]`` vs
    torch Linear ``[out, in]``). ``peft_task`` is PEFT's ``task_type``."""

    config: dict[str, Any]
    names: dict[tuple[str, ...], tuple[str, bool]]
    peft_task: str


@dataclasses.dataclass
class SavedModel:
    bundle: ModelBundle  # with the saved parameters and the DP method's frozen labels
    config: dict[str, Any]  # model_config.json
    directory: Path

    @property
    def task(self) -> str:
        return self.config["task"]


def model_module(arch: str):
    from dpbench.models.registry import model_modules

    modules = model_modules()
    if arch not in modules:
        raise ConfigError(f"model.arch={arch!r} is not known; choose one of {', '.join(sorted(modules))}")
    return modules[arch]


def host_arrays(flat: dict) -> dict[str, np.ndarray]:
    """``{path tuple: array}`` -> ``{"a/b/c": numpy array}`` (what ``model.safetensors`` holds)."""
    return {"/".join(path): np.ascontiguousarray(np.asarray(value)) for path, value in sorted(flat.items())}


# Labels whose parameters are random at initialisation, never read from a base file: always stored.
DRAWN_LABELS = ("lora_a", "lora_b", "head")
BASE_SOURCES = ("hf:", "gguf:")  # weights sources that are files a rebuild reads again


def base_file_paths(bundle: ModelBundle, paths) -> list[tuple[str, ...]]:
    """Those of ``paths`` that are frozen and came from the base weights file (re-read on load, not
    copied): none for a randomly initialised model."""
    if not bundle.weights_source.startswith(BASE_SOURCES):
        return []
    trains = bundle.is_trainable
    return sorted(p for p in paths if not trains(p) and bundle.label_of(p) not in DRAWN_LABELS)


def checksums(flat: dict) -> dict[str, list[float]]:
    """``{"a/b": [Σ|x|, Σx²]}`` in float32, computed where the arrays live (no gather). Sums of
    non-negative terms: no cancellation, so another device or reduction order changes them by
    rounding only (about 1e-6 relative), while another base changes them by far more."""
    import jax.numpy as jnp

    out = {}
    for path, value in sorted(flat.items()):
        x = jnp.asarray(value).astype(jnp.float32)
        out["/".join(path)] = [float(jnp.sum(jnp.abs(x))), float(jnp.sum(jnp.square(x)))]
    return out


def rebuild_base(config: dict, directory: Path) -> dict[tuple[str, ...], Any]:
    """The frozen base parameters that ``base_params`` names, read again from the base weights the way
    the run read them, and checked against the stored checksums."""
    import jax

    from dpbench.models.registry import build_model

    base = config["base_params"]
    try:
        bundle = build_model(model_cfg(config), jax.random.PRNGKey(0))
    except (ValueError, OSError) as error:
        raise ConfigError(
            f"{directory} reads its frozen base from {base['source']}, which could not be read ({error}); "
            "restore that file, or export the run with --format merged where it is"
        ) from None
    flat = {p: v for p, v in flatten_dict(bundle.params).items() if "/".join(p) in base["checksums"]}
    if len(flat) != len(base["checksums"]):
        raise ConfigError(f"{directory}: the base {base['source']} lacks parameters its model/ names")
    for name, (total, squares) in checksums(flat).items():
        want_total, want_squares = base["checksums"][name]
        if not (np.isclose(total, want_total, rtol=1e-4) and np.isclose(squares, want_squares, rtol=1e-4)):
            raise ConfigError(
                f"{directory}: the base weights now at {base['source']} differ from the run's "
                f"({name}: checksum {total:.6g} instead of {want_total:.6g})"
            )
    return flat


def save_model(
    directory: Path,
    bundle: ModelBundle,
    params: Any,
    model_cfg: dict,
    run: dict,
    card: str,
    base_checksums: dict | None = None,
) -> Path:
    """Write the model folder (into ``<directory>.tmp``, then renamed over ``directory``).

    ``params``: every parameter, or (a multi-host run, which checksums its sharded base where it lies)
    all but the base's, with ``base_checksums`` for those. Base parameters are named, not written."""
    from safetensors.numpy import save_file

    flat = flatten_dict(params)
    if base_checksums is None:
        base = base_file_paths(bundle, flat)
        base_checksums = checksums({p: flat[p] for p in base}) if base else None
        flat = {p: v for p, v in flat.items() if p not in set(base)}

    module = model_module(model_cfg["arch"])
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(host_arrays(flat), str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
    architecture = module.saved_architecture(bundle) if hasattr(module, "saved_architecture") else {}
    if bundle.tokenizer is not None and hasattr(bundle.tokenizer, "save"):
        bundle.tokenizer.save(tmp)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model_cfg}
    config.update(architecture=architecture, **run)
    if base_checksums:
        config["base_params"] = {"source": bundle.weights_source, "checksums": base_checksums}
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=str) + "\n")
    (tmp / CARD_FILE).write_text(card)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def read_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"{directory} holds no saved model (no {CONFIG_FILE}): a run writes model/ when it completes; "
            "for an unfinished run choose a checkpoint with --step"
        )
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT or config.get("format_version", 0) > FORMAT_VERSION:
        raise ConfigError(
            f"{path} is not a dpbench model folder this version reads ({FORMAT} v{FORMAT_VERSION})"
        )
    return config


def model_cfg(config: dict):
    """The run's ``model`` section as the builders take it (attribute access, no interpolation)."""
    from omegaconf import OmegaConf

    return OmegaConf.create(config["model"])


def load_model(directory: Path) -> SavedModel:
    """The model of a saved folder, parameters included; nothing else is read."""
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    directory = Path(directory)
    config = read_config(directory)
    module = model_module(config["model"]["arch"])
    flat = {tuple(k.split("/")): jnp.asarray(v) for k, v in load_file(str(directory / WEIGHTS_FILE)).items()}
    if config.get("base_params"):
        flat.update(rebuild_base(config, directory))
    params = unflatten_dict(flat)
    bundle = module.from_saved(model_cfg(config), config["architecture"], params, directory)
    return SavedModel(bundle.with_frozen(config.get("frozen_labels", ())), config, directory)


def hf_layout(saved: SavedModel) -> HFLayout:
    """The model's Hugging Face layout, or a one-line error for an architecture that has none."""
    arch = saved.config["model"]["arch"]
    module = model_module(arch)
    if not hasattr(module, "hf_layout"):
        raise ConfigError(
            f"model.arch={arch!r} has no Hugging Face layout, so it cannot be exported; "
            f"--format peft and merged export {', '.join(_exportable())}"
        )
    return module.hf_layout(saved.bundle)


def float_params(bundle: ModelBundle) -> Any:
    """The bundle's parameters with every quantized frozen weight (``model.frozen_quantization``)
    dequantised to float32 and its scale dropped: the weights the run computed with, in the float
    layout an export writes. Other models' parameters as they are."""
    dequantize = bundle.extras.get("dequantize")
    return bundle.params if dequantize is None else dequantize(bundle.params)


def _exportable() -> list[str]:
    from dpbench.models.registry import model_modules

    return sorted(name for name, module in model_modules().items() if hasattr(module, "hf_layout"))
