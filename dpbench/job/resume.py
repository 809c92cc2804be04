"""Resuming a run from its folder: what may differ, and in which order a resume is checked.

A job's folder (``paths.output_dir``) holds its privacy secret, its checkpoints and, once done, its
complete ``results.json``. Starting a job there, in this order (as big_vision's ``train.py`` writes
its own down):

1. A complete record with the same settings: the job is skipped (:func:`completed_record`);
   different settings: refused in one line.
2. The privacy randomness (:func:`privacy_randomness`): a resume reads the run's own secret back
   (or ``dp.secret_file``), a fresh start draws one. Missing or unreadable: refused.
3. ``runner.resume=never`` clears the checkpoints and record; otherwise the newest checkpoint is
   checked (:func:`resume`) against this run: its settings (except :data:`RESUMABLE_CHANGES`), its
   mechanism, the fingerprint of its secret, and the structure of its parameters, optimizer state
   and noise state. Any difference is refused in one line naming it.
4. The trainable parameters, optimizer state and noise state are restored; training continues at
   the next logical step with the same batches and noise as an uninterrupted run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dpbench import records
from dpbench.errors import ConfigError
from dpbench.privacy import mechanism as mechanism_lib
from dpbench.privacy import randomness as randomness_lib
from dpbench.privacy.mechanism import Mechanism
from dpbench.privacy.randomness import PrivacyRandomness
from dpbench.train import distributed
from dpbench.train.checkpoint import Checkpoints, structure_matches
from dpbench.train.loop import TrainState

log = logging.getLogger("dpbench")

# Settings that may differ between a checkpoint and the run resuming it: performance, logging,
# paths and the checkpoint/resume knobs themselves. Every other setting must match.
RESUMABLE_CHANGES = (
    "compute.",
    "logger.",
    "paths.",
    "runner.progress_bar",
    "runner.checkpoint_every",
    "runner.keep_checkpoints",
    "runner.resume",
    "dp.secret_file",  # where the secret is read from; the checkpoint's fingerprint checks it is the same
)


def config_differences(saved: dict, current: dict) -> list[str]:
    """Settings (dotted names) whose values differ, except those a resumed run may change.

    A setting only one side has (added to or removed from dpbench since the checkpoint) is logged,
    not refused: the mechanism and the parameter shapes are compared separately.

    >>> config_differences({"dp": {"epsilon": 1.0}, "compute": {"eval_batch_size": 8}},
    ...                    {"dp": {"epsilon": 8.0}, "compute": {"eval_batch_size": 16}, "new": 1})
    ['dp.epsilon=8.0 (the checkpoint has dp.epsilon=1.0)']
    """
    old, new = records.flatten(saved), records.flatten(current)
    one_sided = sorted(
        (set(old) ^ set(new)) - {k for k in set(old) | set(new) if k.startswith(RESUMABLE_CHANGES)}
    )
    if one_sided:
        log.warning(
            "settings present on one side only (dpbench changed since the checkpoint was written): %s",
            ", ".join(f"{k}={new[k]!r} (new)" if k in new else f"{k} (gone)" for k in one_sided),
        )
    return [
        f"{key}={new[key]!r} (the checkpoint has {key}={old[key]!r})"
        for key in sorted(set(old) & set(new))
        if old[key] != new[key] and not key.startswith(RESUMABLE_CHANGES)
    ]


def different_run(what: str, run_dir: Path, differences: list[str]) -> ConfigError:
    return ConfigError(
        f"runner.resume: {what} in {run_dir} differs from this run: {'; '.join(differences)}. Run the same "
        "settings to resume, or start afresh with runner.resume=never (allowed: auto, never, must) or "
        "another hydra.run.dir"
    )


def completed_record(cfg: DictConfig) -> records.RunRecord | None:
    """The complete record already in this run's folder (same settings), unless ``runner.resume=never``."""
    path = Path(cfg.paths.output_dir) / records.RESULTS_FILE
    if cfg.runner.resume == "never" or not path.is_file():
        return None
    record = records.load_record(path)
    if not record.complete:
        return None
    differences = config_differences(record.config, OmegaConf.to_container(cfg, resolve=True))
    if differences:
        raise different_run("the complete run", path.parent, differences)
    log.info("%s is complete with the same settings: skipping this job (runner.resume=never reruns it)", path)
    return record


def privacy_randomness(cfg: DictConfig, mechanism: Mechanism, output_dir: Path) -> PrivacyRandomness:
    """The privacy randomness of this run (``dp.randomness``), the same on every process.

    ``secret``: process 0 reads ``dp.secret_file``, or, when resuming a checkpoint, the run's own
    secret file (missing: one line naming it); otherwise it draws a fresh secret and stores it in the
    run folder. Then every process receives process 0's secret. ``seeded`` (and non-private runs,
    which have no privacy to protect): a hash of ``runner.seed`` and the whole mechanism.
    """
    if not mechanism.private or cfg.dp.randomness == "seeded":
        randomness = PrivacyRandomness.seeded(cfg.runner.seed, mechanism.describe())
        if mechanism.private:
            log.warning("%s", randomness_lib.SEEDED_WARNING)
        return randomness
    randomness = PrivacyRandomness("secret", bytes(randomness_lib.SECRET_BYTES))  # replaced by process 0's
    if distributed.is_main():
        own_file = output_dir / randomness_lib.SECRET_FILE
        resuming = cfg.runner.resume != "never" and Checkpoints(output_dir, 1).latest_step() is not None
        try:
            if cfg.dp.secret_file:
                randomness = randomness_lib.read_secret(cfg.dp.secret_file, "dp.secret_file")
                source = f"dp.secret_file={cfg.dp.secret_file}"
            elif resuming:
                randomness = randomness_lib.read_secret(own_file, "runner.resume")
                source = str(own_file)
            else:
                randomness = PrivacyRandomness.draw()
                randomness_lib.write_secret(own_file, randomness)
                source = f"a fresh 256-bit secret from the OS, stored (owner-only) in {own_file}"
        except randomness_lib.SecretError as error:
            hint = (
                "; restore it, or start afresh with runner.resume=never"
                if resuming and not cfg.dp.secret_file
                else ""
            )
            raise ConfigError(f"{error}{hint}") from None
        log.info("privacy randomness (batches, noise): %s; never published", source)
    return randomness_lib.share_across_processes(randomness)


def checkpoint_meta(config: dict, mechanism: Mechanism, randomness: PrivacyRandomness) -> dict:
    """What every checkpoint of a run records, so that a resume can prove it continues the same run."""
    return {
        "mechanism": mechanism.describe(),
        "config": config,
        "randomness": {"mode": randomness.mode, "fingerprint": randomness.fingerprint()},
    }


def resume(
    checkpoints: Checkpoints,
    mode: str,
    state: TrainState,
    expected_meta: dict,
    total_steps: int,
) -> tuple[int | None, dict]:
    """Restore ``state`` from the newest checkpoint per ``runner.resume`` (``mode``).

    ``expected_meta`` is this run's :func:`checkpoint_meta`. Returns the step restored (None: a fresh
    start) and the checkpoint's metadata.
    """
    run_dir = checkpoints.directory.parent
    if mode == "never":
        if checkpoints.directory.exists() or (run_dir / records.RESULTS_FILE).exists():
            log.warning("runner.resume=never: removing the checkpoints and record in %s", run_dir)
        checkpoints.clear()
        (run_dir / records.RESULTS_FILE).unlink(missing_ok=True)
        return None, {}
    latest = checkpoints.latest_step()
    if latest is None:
        if mode == "must":
            raise ConfigError(
                f"runner.resume=must but {checkpoints.directory} holds no checkpoint; choose "
                "runner.resume=auto (resume if there is one) or never, or point hydra.run.dir at the "
                "interrupted run"
            )
        return None, {}
    meta = checkpoints.read_meta(latest)
    what = f"the checkpoint at step {latest}"
    differences = config_differences(meta.get("config", {}), expected_meta["config"])
    if differences:
        raise different_run(what, run_dir, differences)
    differences = mechanism_lib.differences(meta.get("mechanism", {}), expected_meta["mechanism"])
    if differences:
        raise different_run(f"the mechanism of {what}", run_dir, differences)
    saved, current = meta.get("randomness", {}), expected_meta["randomness"]
    if saved.get("fingerprint") != current["fingerprint"]:
        saved_mode = saved.get("mode", "from runner.seed, before dp.randomness existed")
        raise ConfigError(
            f"runner.resume: {what} in {checkpoints.directory} was trained with other privacy randomness "
            f"({saved_mode}) than this run ({current['mode']}); resume with the run's own secret file or "
            "dp.secret_file, or start afresh with runner.resume=never"
        )
    if not structure_matches(meta, state.trainable, state.saved_state):
        raise different_run(what, run_dir, ["the trainable parameters, optimizer state or noise state"])
    state.trainable, saved = checkpoints.restore(latest, state.trainable, state.saved_state)
    state.restore_saved(saved)
    state.step = latest
    log.info(
        "resuming from the checkpoint at logical step %d of %d in %s",
        latest,
        total_steps,
        checkpoints.directory,
    )
    return latest, meta
