"""``python -m dpbench.tune +sweep=<grid> tune.epsilon=1``: hyperparameter tuning inside the privacy budget.

Draws a secret number of trials K (``tune.distribution``: poisson or truncated_negative_binomial),
runs each trial as an ordinary DP run (``dpbench.experiment.run``) with hyperparameters drawn from
the sweep's grid, scores each privately (``tune.score``), releases the best and writes
``<run dir>/tune.json`` with each trial's ε (``epsilon_training``) and the total ε with tuning
(``epsilon_with_tuning``; Papernot & Steinke 2022, ``dpbench.privacy.tuning``). Every trial trains
at one σ, calibrated so that the *total* meets ``tune.epsilon``.

    python -m dpbench.tune +sweep=mnist_best_tuning tune.epsilon=1 hydra.run.dir=multirun/mnist_best_tuned

What stays private, in the run folder only (like ``privacy_secret``, owner-only): the secret K and
the trials drawn come from (``privacy_secret``), ``tune_trials.json`` (K, every trial's folder and
score) and the trial folders themselves (exact validation metrics, their own secrets). Re-running
the command in the same folder resumes the same draw; it never draws K again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dpbench import config as config_lib
from dpbench import records
from dpbench.errors import ConfigError
from dpbench.privacy import accounting, tuning
from dpbench.privacy import randomness as randomness_lib
from dpbench.privacy.methods import METHODS
from dpbench.train.preemption import Preempted

config_lib.register_configs()
log = logging.getLogger("dpbench")

RECORD_FILE = "tune.json"  # the release: publishable
TRIALS_FILE = "tune_trials.json"  # K, every trial and its score: owner-only, never published
RELEASED_RECORD = "released/results.json"  # the released trial with its test metrics: publishable
SCORED_METRICS = ("eval/accuracy", "eval/rougeL")  # means of per-example values in [0, 1]


def _is_tune_override(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return key == "tune" or key.startswith("tune.")


def candidates_from_hydra(hydra_cfg) -> tuple[list[list[str]], list[str]]:
    """The grid's jobs (override lists, ``tune.*`` removed) and the keys the grid varies."""
    from dpbench import sweeps

    holder = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {"params": hydra_cfg.sweeper.get("params") or {}},
                "overrides": {"task": list(hydra_cfg.overrides.task)},
            }
        }
    )
    jobs = [[o for o in job if not _is_tune_override(o)] for job in sweeps.grid(holder)]
    return jobs, sorted(k for k in sweeps.swept_keys(holder) if not k.startswith("tune"))


def _trial_overrides(job: list[str], sigma: float, output_dir: Path) -> list[str]:
    return [*job, "dp.epsilon=null", f"dp.noise_multiplier={sigma!r}", f"paths.output_dir={output_dir}"]


def _swept(job: list[str], keys: list[str]) -> list[str]:
    return [o for o in job if o.split("=", 1)[0].lstrip("+~") in keys]


def tuning_randomness(cfg: DictConfig, output_dir: Path) -> randomness_lib.PrivacyRandomness:
    """K, the candidates and the score noise: a secret stored in the tuning folder (read back when
    resuming), or with ``dp.randomness=seeded`` a hash of ``runner.seed`` and the tune settings."""
    if cfg.dp.randomness == "seeded":
        log.warning("%s (the number of trials and the score noise too)", randomness_lib.SEEDED_WARNING)
        return randomness_lib.PrivacyRandomness.seeded(
            cfg.runner.seed, {"tune": OmegaConf.to_container(cfg.tune, resolve=True)}
        )
    path = output_dir / randomness_lib.SECRET_FILE
    if path.is_file():
        return randomness_lib.read_secret(path, "python -m dpbench.tune (resuming this folder)")
    secret = randomness_lib.PrivacyRandomness.draw()
    randomness_lib.write_secret(path, secret)
    return secret


def _streams(secret: randomness_lib.PrivacyRandomness) -> dict[str, np.random.Generator]:
    entropy = secret.tuning_entropy()
    names = ("trials", "candidates", "score_noise")
    return {name: np.random.default_rng(np.random.SeedSequence([entropy, i])) for i, name in enumerate(names)}


def trial_folder_name(secret: randomness_lib.PrivacyRandomness, index: int) -> str:
    """A folder name that does not reveal the trial's index (so neither does the released one's)."""
    return hashlib.sha256(f"{secret.tuning_entropy()}/{index}".encode()).hexdigest()[:12]


def draw_plan(secret, count: tuning.TrialCount, num_candidates: int) -> tuple[int, list[int], np.ndarray]:
    """K, the candidate of each trial (uniform over the grid, independently) and each trial's
    standard normal score noise: all from the secret, in that order."""
    streams = _streams(secret)
    k = count.sample(streams["trials"])
    chosen = [int(c) for c in streams["candidates"].integers(0, num_candidates, size=k)]
    return k, chosen, streams["score_noise"].standard_normal(k)


def _write_private(path: Path, value) -> None:
    records.write_json_atomic(path, value)
    os.chmod(path, 0o600)


def plan_events(cfg_of: Callable[[list[str], float], DictConfig], jobs: list[list[str]]):
    """Each candidate's mechanism at σ = 1 (for its sampler and steps) and δ; checks every candidate first."""
    from dpbench.data.registry import load_dataset
    from dpbench.errors import as_config_error
    from dpbench.privacy.mechanism import plan_mechanism

    sizes: dict[str, int] = {}
    mechanisms = []
    for job in jobs:
        cfg = cfg_of(job, 1.0)
        try:
            config_lib.validate_static(cfg)
        except config_lib.SETTING_ERRORS as error:
            raise ConfigError(
                f"the grid's candidate {' '.join(job) or '(the base config)'}: {error}"
            ) from None
        if not METHODS[cfg.dp.method].private:
            raise ConfigError(
                f"dp.method={cfg.dp.method} trains without privacy: there is no budget to tune inside; "
                "choose a DP method (e.g. dp=vanilla)"
            )
        if cfg.audit.name != "none":
            raise ConfigError(
                f"audit={cfg.audit.name} is not allowed with python -m dpbench.tune; choose audit=none"
            )
        key = json.dumps(OmegaConf.to_container(cfg.dataset, resolve=True), sort_keys=True)
        if key not in sizes:
            sizes[key] = as_config_error(load_dataset, cfg.dataset).num_train
        mechanism = plan_mechanism(cfg, sizes[key])
        try:
            accounting.check_supported(mechanism.sampler, accounting.AccountantConfig(name="rdp"))
        except ValueError as error:
            raise ConfigError(f"python -m dpbench.tune needs each trial's RDP: {error}") from None
        mechanisms.append(mechanism)
    return mechanisms


def score_of(metrics: dict, noise: float, score: str, score_noise: float) -> tuple[str, float, float]:
    """(metric, exact value, released score): the exact evaluation metric, or the metric's sum over
    the evaluation examples plus ``noise * score_noise``, divided back by their number."""
    metric = next((m for m in SCORED_METRICS if m in metrics), None)
    if metric is None:
        raise RuntimeError(f"a trial's record has none of {SCORED_METRICS} to score it by: {sorted(metrics)}")
    exact = float(metrics[metric])
    if score == "eval":
        return metric, exact, exact
    examples = int(metrics["eval/examples"])
    return metric, exact, (exact * examples + noise * score_noise) / examples


def run_tuning(
    cfg: DictConfig,
    jobs: list[list[str]],
    swept_keys: list[str],
    compose: Callable[[list[str]], DictConfig],
    output_dir: Path,
    command: str = "",
) -> dict:
    """Tune: draw K, run and score the trials, release the best; write and return tune.json's content.

    ``cfg`` holds ``tune`` and the base job; ``jobs`` the grid's override lists; ``compose(overrides)``
    composes one trial's config (conf/config.yaml, no ``tune``).
    """
    from dpbench import experiment

    tune = cfg.tune
    tuning.check_settings(tune, cfg.dataset)
    count = tuning.TrialCount.from_config(tune)
    score_noise = float(tune.score_noise) if tune.score == "noisy_validation" else None
    output_dir = Path(output_dir)
    trials_dir = output_dir / "trials"

    def cfg_of(job: list[str], sigma: float) -> DictConfig:
        return compose(_trial_overrides(job, sigma, trials_dir / "planning"))

    jobs = jobs or [[]]
    mechanisms = plan_events(cfg_of, jobs)
    delta = min(m.delta for m in mechanisms)

    def events_at(sigma: float):
        return [m.sampler.dp_event(sigma, m.steps) for m in mechanisms]

    sigma = tuning.calibrate_tuning(events_at, float(tune.epsilon), delta, count, score_noise)
    total = tuning.tuned_epsilon(events_at(sigma), delta, count, score_noise)
    log.info(
        "tuning: K ~ %s (E[K]=%.3g) over %d candidates; σ=%.4f per trial, total ε=%.4f (target %g), δ=%.3g",
        count.distribution,
        count.mean,
        len(jobs),
        sigma,
        total,
        tune.epsilon,
        delta,
    )

    output_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "tune": OmegaConf.to_container(tune, resolve=True),
        "candidates": jobs,
        "noise_multiplier": sigma,
    }
    state_path = output_dir / TRIALS_FILE
    if state_path.is_file():
        saved = json.loads(state_path.read_text())
        if saved.get("settings") != settings:
            raise ConfigError(
                f"{output_dir} holds a tuning with other settings ({TRIALS_FILE}); a second draw of K in "
                "the same folder is not allowed: run these settings in another hydra.run.dir"
            )
    secret = tuning_randomness(cfg, output_dir)
    k, chosen, noise = draw_plan(secret, count, len(jobs))
    if not state_path.is_file():  # before any trial: a second tuning in this folder is refused
        _write_private(state_path, {"settings": settings, "K": k, "trials": []})
    trials = []
    for index in range(k):
        folder = trials_dir / trial_folder_name(secret, index)
        job = jobs[chosen[index]]
        log.info("tuning: trial %s (%s)", folder.name, " ".join(_swept(job, swept_keys)) or "the base config")
        overrides = _trial_overrides(job, sigma, folder)
        trial_cfg = compose(overrides)
        # What reruns this trial alone (the tune command's overrides are not the trial's).
        with records.job_command(" ".join(["python -m dpbench", *map(shlex.quote, overrides)])):
            record = experiment.run(trial_cfg)
        planned = repr(events_at(sigma)[chosen[index]])
        if record["privacy"]["mechanism"]["dp_event"] != planned:
            raise RuntimeError(
                f"trial {folder} trained under {record['privacy']['mechanism']['dp_event']}, "
                f"but the tuning was calibrated for {planned}"
            )
        metric, exact, released = score_of(
            record["metrics"], float(noise[index]), tune.score, score_noise or 0.0
        )
        trials.append(
            {
                "folder": str(folder),
                "candidate": chosen[index],
                "overrides": _swept(job, swept_keys),
                "metric": metric,
                "exact": exact,
                "score": released,
                "epsilon_training": record["epsilon"],
                "final_params_sha256": record.get("final_params_sha256"),
                "test_or_eval_metrics": record["metrics"],
            }
        )
        _write_private(state_path, {"settings": settings, "K": k, "trials": trials})
    best = max(range(k), key=lambda i: trials[i]["score"]) if k else None
    if best is not None:
        trials[best]["test_metrics"] = released_test_metrics(Path(trials[best]["folder"]))
    result = tuning_record(
        cfg,
        count,
        sigma,
        total,
        delta,
        jobs,
        swept_keys,
        mechanisms,
        score_noise,
        trials[best] if best is not None else None,
        command,
    )
    records.write_json_atomic(output_dir / RECORD_FILE, result)
    if best is not None and trials[best].get("test_metrics"):
        released = released_record(Path(trials[best]["folder"]), result)
        records.write_json_atomic(output_dir / RELEASED_RECORD, released)
    return result


def released_record(folder: Path, tuned: dict) -> dict:
    """The released trial as a publishable run record: its own record with the test split's metrics
    in place of the validation split's, and without its evaluations during training (validation
    examples, exact: private like the scores), plus ``tuning`` (the total ε with the tuning)."""
    record = json.loads((folder / records.RESULTS_FILE).read_text())
    test = dict(tuned["released"]["test_metrics"])
    split, source = test.pop("split", "test"), test.pop("data_source", "")
    record["metrics"] = test
    record["dataset_info"] = {
        **record.get("dataset_info", {}),
        "metrics": f"{split} split ({source}), read once after the choice (python -m dpbench.evaluate)",
    }
    record["history"] = []
    record["baseline_metrics"] = None
    record["samples"] = None
    # Published, the released model is reproduced by the whole tuning, not by its trial alone.
    record["reproducibility"] = {**record["reproducibility"], "command": tuned["command"]}
    record["tuning"] = {
        key: tuned[key]
        for key in ("method", "trial_count", "candidates", "score", "noise_multiplier", "delta")
    } | {
        "epsilon_with_tuning": tuned["epsilon_with_tuning"],
        "target_epsilon": tuned["target_epsilon"],
        "released_overrides": tuned["released"]["overrides"],
        "command": tuned["command"],
    }
    return record


def released_test_metrics(folder: Path) -> dict | None:
    """The released trial's final model on the test split, when it trained with a validation hold-out
    (``dataset.validation_examples``): measured once, after the choice, which never read the test split.
    None when the trial evaluated on the test split already (its eval metrics are the test metrics)."""
    from dpbench import evaluate

    if not evaluate.run_config(folder)["dataset"].get("validation_examples"):
        return None
    log.info("tuning: the released trial on the test split")
    return evaluate.evaluate_on_test(folder)


def tuning_record(
    cfg, count, sigma, total, delta, jobs, swept_keys, mechanisms, score_noise, best, command
) -> dict:
    """tune.json: what the tuning releases (nothing about K, the other trials or their order)."""
    epsilon_rdp = tuning.epsilon_from_rdp(
        tuning.ORDERS,
        np.max([tuning.trial_rdp(m.sampler.dp_event(sigma, m.steps)) for m in mechanisms], axis=0),
        delta,
    )
    released = None
    if best is not None:
        released = {
            "overrides": best["overrides"],
            "run_dir": best["folder"],
            "score": best["score"],
            "score_metric": best["metric"],
            "final_params_sha256": best["final_params_sha256"],
            "epsilon_training": best["epsilon_training"],
        }
        if cfg.tune.score == "eval":  # the public split's metrics (selection-biased: chosen on them)
            released["eval_metrics"] = best["test_or_eval_metrics"]
        if best.get("test_metrics") is not None:  # the test split, unread by the choice: unbiased
            released["test_metrics"] = best["test_metrics"]
    return {
        "kind": "tuning",
        "method": "best of K random trials, K secret (Papernot & Steinke 2022, arXiv:2110.03620)",
        "trial_count": count.describe(),
        "candidates": [_swept(job, swept_keys) for job in jobs],
        "score": {
            "kind": cfg.tune.score,
            "noise_std_on_sum": score_noise,
            "what": "the evaluation split's correct count (or ROUGE-L sum) + N(0, noise²), sensitivity 1"
            if score_noise is not None
            else "the exact evaluation metric of a public evaluation split (no privacy cost)",
        },
        "noise_multiplier": sigma,
        "delta": delta,
        "target_epsilon": float(cfg.tune.epsilon),
        # Each trial's own ε under its accountant (the released trial's), and under RDP.
        "epsilon_training": released["epsilon_training"] if released else None,
        "epsilon_training_rdp": epsilon_rdp,
        "epsilon_with_tuning": total,
        "released": released,
        "not_published": "K, the trials not released, their scores and order, the total tuning time: "
        f"{TRIALS_FILE}, trials/, dpbench.log and privacy_secret stay in the run folder",
        "config": OmegaConf.to_container(cfg, resolve=True),
        "command": command,
    }


@hydra.main(version_base="1.3", config_path="../conf", config_name="tune_config")
def main(cfg: DictConfig) -> None:
    with config_lib.exit_on_setting_error():
        hydra_cfg = HydraConfig.get()
        tuning.check_settings(cfg.tune, cfg.dataset)
        jobs, keys = candidates_from_hydra(hydra_cfg)
        if not keys:
            log.warning("no grid (hydra.sweeper.params): every trial runs the same settings")
        command = " ".join(["python -m dpbench.tune", *map(shlex.quote, hydra_cfg.overrides.task)])
        try:
            result = run_tuning(
                cfg,
                jobs,
                keys,
                lambda overrides: hydra.compose("config", overrides=overrides),
                Path(hydra_cfg.runtime.output_dir),
                command,
            )
        except Preempted as stop:  # a trial checkpointed: the same command in the same folder resumes
            # hydra.run.dir is a Hydra override, never among the task's: name the folder always.
            resume = f"{command} hydra.run.dir={shlex.quote(hydra_cfg.runtime.output_dir)}"
            print(f"{stop}\nresume with: {resume}", file=sys.stderr, flush=True)
            sys.exit(stop.exit_status)
    released = result["released"]
    print(
        f"tuning: σ={result['noise_multiplier']:.4f} per trial, ε (training)={result['epsilon_training']}, "
        f"ε (with tuning)={result['epsilon_with_tuning']:.4f}, δ={result['delta']:.3g}\n"
        + (
            f"released: {' '.join(released['overrides']) or '(base config)'} "
            f"score {released['score']:.4f} in {released['run_dir']}"
            + (f"\ntest split: {released['test_metrics']}" if released.get("test_metrics") else "")
            if released
            else "released: nothing (K = 0)"
        )
        + f"\nrecord: {Path(hydra_cfg.runtime.output_dir) / RECORD_FILE}",
        flush=True,
    )


if __name__ == "__main__":
    main()
