"""``python -m dpbench [overrides]``: compose the config with Hydra and run one job (or a sweep with -m).

A bad setting prints one line naming the setting and the allowed values and exits with status 2
(``HYDRA_FULL_ERROR=1`` shows the traceback).
"""

import sys

import hydra
from omegaconf import DictConfig

from dpbench import experiment
from dpbench.config import exit_on_setting_error, register_configs

register_configs()
_job_started = False


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    global _job_started
    _job_started = True
    with exit_on_setting_error():
        metrics = experiment.run(cfg)["metrics"]
    # Returned for Hydra sweepers that optimise an objective.
    return metrics.get("eval/accuracy", metrics.get("eval/rougeL"))


def cli() -> None:
    try:
        main()
    except SystemExit as stop:
        # Hydra reports a bad override or config option itself (one message, status 1) before any job.
        if stop.code == 1 and not _job_started:
            sys.exit(2)
        raise


if __name__ == "__main__":
    cli()
