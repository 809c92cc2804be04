"""``python -m dpbench [overrides]``: compose the config with Hydra and run one job (or a sweep with -m)."""

import hydra
from omegaconf import DictConfig

from dpbench.config import register_configs
from dpbench.run import run

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    metrics = run(cfg)["metrics"]
    # Returned for Hydra sweepers that optimise an objective.
    return metrics.get("eval/accuracy", metrics.get("eval/rougeL"))


if __name__ == "__main__":
    main()
