"""Every preset starts: each ``conf/experiment/*.yaml`` trains 2 logical steps with tiny stand-ins,
writes its record, and the report reads it.

The model and the data are swapped for offline tiny ones (tiny Gemma 3 / tiny encoder / the CNN on
the fixture data in tests/fixtures, no network, no ../shared), but what decides whether a preset can
start is kept: the model's dtype, fine-tuning mode and remat, the DP method and dp.clipping (so the
start-up tap-coverage check runs as in the real preset), the sampler and the accountant. The
headline preset, samsum_gemma, is Gemma 3 in bfloat16 with book-keeping clipping (dp.clipping=auto).
"""

import json

import pytest
from omegaconf import OmegaConf

from dpbench import experiment, report
from dpbench.privacy.methods import resolve_clipping
from tests.helpers import EXPERIMENTS, compose_config

# Offline stand-ins, by model.arch: the model, and the fixture data of its task.
STAND_INS = {
    "gemma3": [
        "model=tiny_gemma3",
        "dataset=samsum_aclsum",
        "dataset.max_length=64",
        "dataset.max_prompt_length=48",
        "dataset.max_new_tokens=2",
    ],
    "encoder": ["model=tiny_encoder", "dataset=sst2_rt", "dataset.max_length=32"],
    "cnn": [],  # the CNNs are small already; MNIST from the fixture IDX files (paths.data_root)
}
KEPT_MODEL_SETTINGS = ("dtype", "finetune", "remat")
SMALL = [
    "logger=none",
    "runner.progress_bar=false",
    "runner.steps=2",
    "runner.epochs=null",
    "runner.eval_every=0",
    "runner.batch_size=8",
    "compute.physical_batch_size=4",
    "compute.eval_batch_size=8",
    "dataset.max_train_examples=32",
    "dataset.max_eval_examples=4",
]


def preset_overrides(name: str) -> tuple[list[str], dict]:
    """The overrides that run preset ``name`` tiny, and what of the preset they must keep."""
    preset = compose_config([f"+experiment={name}"])
    overrides = [f"+experiment={name}", *STAND_INS[preset.model.arch], *SMALL]
    kept = {key: preset.model[key] for key in KEPT_MODEL_SETTINGS if key in preset.model}
    overrides += [f"model.{key}={value}" for key, value in kept.items()]
    if preset.audit.name == "canary":
        overrides.append("audit.num_canaries=8")
    private = preset.dp.method != "none"
    expected = {
        "model": kept,
        "method": preset.dp.method,
        "clipping": resolve_clipping(preset.dp.method, preset.dp.clipping) if private else None,
        "sampler": preset.dp.sampler,
        "accountant": preset.accountant.name,
    }
    return overrides, expected


def test_every_preset_is_covered():
    assert "samsum_gemma" in EXPERIMENTS and len(EXPERIMENTS) >= 9
    for name in EXPERIMENTS:
        assert compose_config([f"+experiment={name}"]).model.arch in STAND_INS, name


def test_the_headline_preset_is_bfloat16_bookkeeping():
    _, expected = preset_overrides("samsum_gemma")
    assert expected["model"]["dtype"] == "bfloat16" and expected["clipping"] == "bookkeeping"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_preset_starts_and_trains_two_steps(name, tmp_path):
    overrides, expected = preset_overrides(name)
    cfg = compose_config(overrides, tmp_path)
    for key, value in expected["model"].items():  # the stand-in keeps what the preset sets
        assert cfg.model[key] == value, key
    assert (cfg.dp.method, cfg.dp.sampler, cfg.accountant.name) == (
        expected["method"],
        expected["sampler"],
        expected["accountant"],
    )
    exp = experiment.build(cfg)
    assert exp.method.clipping == expected["clipping"] or not exp.private
    experiment.train_and_evaluate(exp)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["steps"] == 2 and saved["method"] == expected["method"]
    assert saved["data_source"] and saved["weights_source"]
    row = report.table(report.load_runs([str(tmp_path)])).splitlines()[-1]  # the report reads it
    assert saved["dataset"] in row and saved["method"] in row
    assert OmegaConf.create(saved["config"]).model.get("dtype") == expected["model"].get("dtype")
    if expected["method"] == "none":
        assert saved["epsilon"] is None
    else:
        assert 0 < saved["epsilon"] <= cfg.dp.epsilon * (1 + 1e-9)
        assert saved["privacy"]["clipping_implementation"] == expected["clipping"]
