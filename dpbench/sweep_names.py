"""The name of a sweep's folder under ``multirun/`` (a leaf: imported by ``dpbench.data.roots``,
which registers it as a resolver, and by ``dpbench.sweeps``)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

RESOLVER = "dpbench_sweep_name"  # conf/config.yaml: hydra.sweep.dir
UNSAFE = re.compile(r"[^A-Za-z0-9._,=+@%-]")
MAX_NAME = 120


def sweep_name(task_overrides: Sequence[str]) -> str:
    """The folder of a sweep under ``multirun/``, from its command line's overrides.

    The same overrides in any order give the same name, so the literal command run again finds its
    finished jobs. ``+sweep=<name>`` leads; ``hydra...`` overrides (the launcher, the folder) do not
    count. Characters unsafe in a folder name become ``_``, and a name that had some, or is long,
    ends in a hash of the overrides so that two sweeps never share a folder by accident.

    >>> sweep_name(["runner.seed=0,1", "dp.epsilon=1,8"])
    'dp.epsilon=1,8__runner.seed=0,1'
    >>> sweep_name(["+sweep=mnist_epsilon_cpu", "runner.steps=50", "hydra/launcher=slurm"])
    'mnist_epsilon_cpu/runner.steps=50'
    >>> sweep_name(["+sweep=mnist_epsilon_cpu"]), sweep_name([])
    ('mnist_epsilon_cpu', 'default')
    >>> sweep_name(["dataset.data_dir=/data/mnist", "dp.epsilon=1,2"])
    'dataset.data_dir=_data_mnist__dp.epsilon=1,2-3f4d7cd1'
    """
    kept = sorted(o for o in map(str, task_overrides) if not o.lstrip("+~").startswith("hydra"))
    sweep = [o.split("=", 1)[1] for o in kept if o.lstrip("+").split("=", 1)[0] == "sweep"]
    rest = [o for o in kept if o.lstrip("+").split("=", 1)[0] != "sweep"]
    name = "__".join(rest)
    safe = UNSAFE.sub("_", name)
    if safe != name or len(safe) > MAX_NAME:
        safe = f"{safe[: MAX_NAME - 9]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    if sweep:
        return f"{UNSAFE.sub('_', sweep[0])}/{safe}" if safe else UNSAFE.sub("_", sweep[0])
    return safe or "default"
