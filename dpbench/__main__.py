"""``python -m dpbench [overrides]``: compose the config with Hydra and run one job (or a sweep with -m).

A bad setting prints one line naming the setting and the allowed values and exits with status 2
(``HYDRA_FULL_ERROR=1`` shows the traceback). SIGTERM/SIGINT during training checkpoints the
current logical step and exits with 128 + the signal number, printing the command that resumes.
"""

import logging
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from dpbench import experiment, sweeps
from dpbench.config import SETTING_ERRORS, exit_on_setting_error, register_configs
from dpbench.train.preemption import Preempted

register_configs()
# JAX logs at INFO that it found no TPU on every CPU/GPU start: noise before every run's first line.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
_job_started = False
CONF = Path(__file__).resolve().parents[1] / "conf"


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    global _job_started
    _job_started = True
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        # One job of a sweep: a bad setting or a failure is recorded and the next job runs.
        try:
            record = experiment.run(cfg)
        except SETTING_ERRORS as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            raise sweeps.JobFailed(str(error)) from None
        except Preempted as stop:
            print(f"{stop}\nresume with: {resume_command()}", file=sys.stderr, flush=True)
            sys.exit(stop.exit_status)
        sweeps.SKIPPED[:] = [bool(record.get("skipped"))]
        metrics = record["metrics"]
        return metrics.get("eval/accuracy", metrics.get("eval/rougeL"))
    with exit_on_setting_error():
        try:
            metrics = experiment.run(cfg)["metrics"]
        except Preempted as stop:
            print(f"{stop}\nresume with: {resume_command()}", file=sys.stderr, flush=True)
            sys.exit(stop.exit_status)
    # Returned for Hydra sweepers that optimise an objective.
    return metrics.get("eval/accuracy", metrics.get("eval/rougeL"))


def resume_command() -> str:
    """This command again, pinned to this run's folder (or sweep folder), so it resumes."""
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    args = [a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    if hydra_cfg.mode == RunMode.MULTIRUN:
        args.append(f"hydra.sweep.dir={output_dir.parent}")  # jobs keep their subdirs: re-run the sweep
    else:
        args.append(f"hydra.run.dir={output_dir}")
    return " ".join(["python -m dpbench", *(shlex.quote(a) for a in args)])


def check_group_options(args: list[str], conf: Path = CONF) -> None:
    """``group=option`` (a sweep's ``group=a,b`` too) must name a YAML in ``conf/<group>/``: one line
    with the choices and exit 2, before Hydra prints every option it has, schemas included."""
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or arg.startswith("-") or key.startswith("hydra") or not (conf / key).is_dir():
            continue
        options = sorted(p.stem for p in (conf / key).glob("*.yaml"))
        for option in value.split(","):
            if option and option not in options:
                print(
                    f"error: {key}={option} is not an option; choose one of {', '.join(options)}",
                    file=sys.stderr,
                )
                sys.exit(2)


def help_text(conf: Path = CONF) -> str:
    """``--help``: the command, every config group with its options and what it is (the first line
    of its schema's docstring), and where the settings are described. Hydra's own: ``--hydra-help``."""
    from dpbench.schema import SCHEMAS

    described = {group: (cls.__doc__ or "").strip().split("\n")[0] for (group, _), cls in SCHEMAS.items()}
    described["model"] = "The network, its weights and what trains (model.arch: cnn, encoder, gemma3)."
    described["experiment"] = "Presets of published or CPU-sized runs: +experiment=<name>."
    described["sweep"] = "Grids over presets: python -m dpbench -m +sweep=<name>."
    lines = [
        "python -m dpbench [group=option ...] [setting=value ...]   (one job; -m: a sweep over a,b,c values)",
        "python -m dpbench +experiment=<preset>   (conf/experiment/)    dpbench --version",
        "",
        "config groups (their options: YAML files in conf/<group>/):",
    ]
    for group in sorted(p.name for p in conf.iterdir() if p.is_dir() and p.name != "hydra"):
        options = ", ".join(sorted(p.stem for p in (conf / group).glob("*.yaml")))
        what = described.get(group, "")
        lines.append(f"  {group:<11} {options}" + (f"\n  {'':<11} {what}" if what else ""))
    lines += [
        "",
        "Every setting, its default and meaning: docs/configuration.md. The composed config of a job:",
        "python -m dpbench <overrides> --cfg job. Hydra's own flags: --hydra-help.",
    ]
    return "\n".join(lines)


def cli() -> None:
    if sys.argv[1:2] in (["--help"], ["-h"]):
        print(help_text())
        return
    if "--version" in sys.argv[1:]:
        import dpbench

        print(f"dpbench {dpbench.__version__}")
        return
    check_group_options(sys.argv[1:])
    try:
        main()
    except SystemExit as stop:
        # Hydra reports a bad override or config option itself (one message, status 1) before any job.
        if stop.code == 1 and not _job_started:
            sys.exit(2)
        if sweeps.OUTCOMES:  # a sweep in which a job failed: Hydra raised it after the last job
            sys.exit(sweeps.print_summary())
        raise
    if sweeps.OUTCOMES:
        sweeps.print_summary()


if __name__ == "__main__":
    cli()
