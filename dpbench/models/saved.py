"""The final model of a run (``<run dir>/model/``), and its Hugging Face layout for export.

A saved model is a folder that rebuilds the model without the run's config composition, its data or
its base checkpoint:

- ``model.safetensors``: every parameter the model uses (trainable and frozen, LoRA factors apart from
  the kernels they adapt), under its ``/``-joined dpbench path (``encoder/layer_0/attention/query/kernel``),
  in the dtype the run held it in;
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


def save_model(
    directory: Path, bundle: ModelBundle, params: Any, model_cfg: dict, run: dict, card: str
) -> Path:
    """Write the model folder (into ``<directory>.tmp``, then renamed over ``directory``)."""
    from safetensors.numpy import save_file

    module = model_module(model_cfg["arch"])
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(host_arrays(flatten_dict(params)), str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
    architecture = module.saved_architecture(bundle) if hasattr(module, "saved_architecture") else {}
    if bundle.tokenizer is not None and hasattr(bundle.tokenizer, "save"):
        bundle.tokenizer.save(tmp)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model_cfg}
    config.update(architecture=architecture, **run)
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
    flat = load_file(str(directory / WEIGHTS_FILE))
    params = unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
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
