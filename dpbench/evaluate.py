"""``python -m dpbench.evaluate RUN_DIR``: a finished run's final model on its dataset's test split.

A run that held out ``dataset.validation_examples`` from its training set evaluated on that held-out
part; this evaluates its saved ``model/`` on the dataset's own evaluation split (the test split) once,
afterwards. The tuning command uses it for the released trial: the trials are chosen on validation
scores, and the test split, never read during the choice, then measures the released model.
The test split is not training data, so its metrics cost no privacy.

    python -m dpbench.evaluate multirun/mnist_best_tuned/trials/<trial>      # prints the metrics (JSON)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from dpbench.config import exit_on_setting_error
from dpbench.errors import ConfigError

log = logging.getLogger("dpbench")


def run_config(run_dir: Path) -> dict:
    """The resolved config a run recorded in its ``results.json``."""
    from dpbench import records

    path = Path(run_dir) / records.RESULTS_FILE
    if not path.is_file():
        raise ConfigError(f"RUN_DIR={run_dir} has no {records.RESULTS_FILE}: evaluate a finished run")
    record = json.loads(path.read_text())
    if not record.get("complete", True):
        raise ConfigError(f"RUN_DIR={run_dir} holds an unfinished run; finish it first (runner.resume)")
    return record["config"]


def evaluate_on_test(run_dir: Path) -> dict:
    """Metrics of ``run_dir``'s ``model/`` on the dataset's evaluation split, with the validation
    hold-out switched off (the run's other data settings unchanged)."""
    from dpbench.data.registry import load_dataset
    from dpbench.errors import as_config_error
    from dpbench.models import saved as saved_lib
    from dpbench.train import sharding
    from dpbench.train.loop import split_params
    from dpbench.train.tasks import task_class

    run_dir = Path(run_dir)
    config = run_config(run_dir)
    if not (run_dir / saved_lib.MODEL_DIR / saved_lib.CONFIG_FILE).is_file():
        raise ConfigError(f"RUN_DIR={run_dir} has no model/ (a run writes it when it completes)")
    cfg = OmegaConf.create(config)
    cfg.dataset.validation_examples = None  # the dataset's own evaluation split
    dataset = as_config_error(load_dataset, cfg.dataset)
    bundle = saved_lib.load_model(run_dir / saved_lib.MODEL_DIR).bundle
    task_type = task_class(cfg.dataset.task)
    _, eval_arrays, _ = task_type.prepare(dataset, bundle, cfg)
    task = task_type.build(bundle, dataset, cfg)
    mesh = as_config_error(sharding.mesh_from_config, cfg.compute)
    rules = as_config_error(sharding.model_rules, cfg.model)
    trainable, frozen = split_params(bundle.params, bundle.is_trainable)
    trainable, frozen = (sharding.put_sharded(p, mesh, rules) for p in (trainable, frozen))
    metrics = task.evaluate(trainable, frozen, eval_arrays, cfg.compute.eval_batch_size, mesh)
    log.info("%s on %s (%s split): %s", run_dir, dataset.name, dataset.eval_split, metrics)
    return {"split": dataset.eval_split, "data_source": dataset.source, **metrics}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dpbench.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder (with model/)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    with exit_on_setting_error():
        print(json.dumps(evaluate_on_test(args.run_dir), indent=1, default=float))


if __name__ == "__main__":
    main()
