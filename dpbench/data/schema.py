"""The dataset config schema and the checks every loader applies to it.

``DatasetConfig`` is registered in Hydra's ConfigStore as ``dataset_schema`` (``@schema("dataset")``);
each ``conf/dataset/*.yaml`` option starts from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from dpbench.data.base import Dataset
from dpbench.data.roots import DATA_ROOT_ENV, describe_missing_root
from dpbench.schema import schema

log = logging.getLogger(__name__)


@schema("dataset")
@dataclasses.dataclass
class DatasetConfig:
    """What to load and how much of it.

    ``display_name`` is what tables and run names show; the YAML option sets it (e.g.
    "SST-2 (RT stand-in)") so that it is never guessed from a path.
    """

    name: str  # mnist | sst2 | samsum
    display_name: str
    task: str = "classification"  # classification | summarization (dpbench.train.tasks.TASKS)
    source: str = "auto"  # the dataset module's SOURCES
    # Folder holding the dataset's files in their public on-disk format. null: <data_root>/<folder>.
    data_dir: str | None = None
    data_root: str | None = None  # the YAML options set ${paths.data_root} (dpbench.data.roots)
    folder: str | None = None  # this dataset's folder under data_root, e.g. "mnist", "sst2-rt"
    download: bool = True  # source=auto/tfds: may TFDS download (where the network allows)?
    # Explicit subsetting for tiny runs: a seeded random subset, recorded in Dataset.source and .info.
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    max_length: int = 128  # text: tokens per training sequence (classification input or prompt+summary)
    max_prompt_length: int = 384  # summarisation: left-padded prompt length for generation
    max_new_tokens: int = 64  # summarisation: generation budget at evaluation
    seed: int = 0  # chooses the max_*_examples subset, the validation split and synthetic users
    # Hold out this many training examples (seeded by `seed`) and evaluate on them instead of the
    # test split: for tuning without touching the test set. Training (and ε) then uses the rest.
    validation_examples: int | None = None
    # dp.unit=user: the training data's column of user ids, or "synthetic" (a seeded grouping into
    # synthetic_users users, for data without one; records say so). dpbench/privacy/units.py.
    user_key: str | None = None
    synthetic_users: int | None = None


def validate_config(cfg: Any, allowed: Sequence[str]) -> None:
    """Raise early, naming the setting, when ``cfg`` cannot describe a loadable dataset
    (``allowed``: the dataset module's ``SOURCES``)."""
    if cfg.source not in allowed:
        raise ValueError(
            f"dataset.source={cfg.source!r} is not allowed for {cfg.name}; choose one of {allowed}"
        )
    if not cfg.display_name or cfg.display_name == "???":
        raise ValueError("dataset.display_name must be set (what tables show, e.g. 'SST-2 (RT stand-in)')")
    for field in ("max_train_examples", "max_eval_examples", "validation_examples"):
        value = getattr(cfg, field)
        if value is not None and value < 1:
            raise ValueError(f"dataset.{field}={value} must be a positive integer or null (= all examples)")
    for field in ("max_length", "max_prompt_length", "max_new_tokens"):
        if getattr(cfg, field) < 1:
            raise ValueError(f"dataset.{field}={getattr(cfg, field)} must be positive")


def files_folder(cfg: Any) -> tuple[str | None, str]:
    """The folder the file source reads and where it came from, or (None, why there is none).

    A set ``data_dir`` wins (its existence is checked when it is read); otherwise
    ``<data_root>/<folder>`` when that folder exists.
    """
    if cfg.data_dir is not None:
        return cfg.data_dir, "dataset.data_dir"
    if cfg.folder is None:
        return None, "dataset.data_dir is not set and dataset.folder is null"
    if cfg.data_root is None:
        return None, f"dataset.data_dir is not set and {describe_missing_root()}"
    path = os.path.join(cfg.data_root, cfg.folder)
    if not os.path.isdir(path):
        return None, f"dataset.data_dir is not set and paths.data_root has no {cfg.folder}/ ({path})"
    return path, f"{cfg.folder}/ under paths.data_root"


def require_files_folder(cfg: Any, expected: str) -> str:
    """The absolute folder of the file source, or a clear error naming the settings and ``expected`` files."""
    folder, why = files_folder(cfg)
    if folder is None:
        where = f"{cfg.folder}/ under ${DATA_ROOT_ENV}" if cfg.folder else "a folder"
        raise ValueError(
            f"{why}, but source={cfg.source!r} for {cfg.name} reads files: set dataset.data_dir "
            f"to a folder holding {expected} (or put them in {where})"
        )
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"dataset.data_dir={folder!r} is not a folder; it should hold {expected}")
    return os.path.abspath(folder)


def require_file(data_dir: str, candidates: Sequence[str], expected: str) -> str:
    """Path of the first of ``candidates`` that exists in ``data_dir``, else a clear error."""
    for name in candidates:
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"dataset.data_dir={data_dir!r} lacks {' or '.join(candidates)}; expected {expected}"
    )


TFDS_EXTRA = 'pip install -e ".[tfds]"'  # the extra that brings TensorFlow (pyproject.toml)
OFFLINE_ENV = "DPBENCH_OFFLINE"  # set (to anything but "" or "0"): never download; the tests set it
NOISY_LOGGERS = ("absl", "urllib3", "tensorflow", "etils")


def offline() -> bool:
    """Whether ``$DPBENCH_OFFLINE`` forbids downloads (then no network is even probed)."""
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def network_reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host``:443 opens within ``timeout`` seconds (False if offline()).

    Name resolution has no timeout of its own, so the attempt runs in a daemon thread: an offline
    machine answers in ``timeout`` seconds, where TFDS's own retries take minutes to give up.
    """
    if offline():
        return False
    answer: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answer and answer[0])


@contextlib.contextmanager
def quiet_tfds() -> Iterator[io.StringIO]:
    """Hold back what TFDS prints (the "Downloading and preparing" line, progress bars, absl and urllib3
    retry warnings): a load that fails then falls back in silence; the caught text is yielded."""
    caught = io.StringIO()
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(caught), contextlib.redirect_stderr(caught):
            yield caught
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class TfdsUnavailable(RuntimeError):
    """Why TFDS cannot load a dataset, found before TFDS itself was asked (nothing to install, no network)."""


def import_tfds() -> Any:
    """``tensorflow_datasets``, imported only now, or a ``RuntimeError`` saying what to install.

    TensorFlow is looked for without importing it (that takes seconds), so the offline default pays
    nothing when the ``tfds`` extra is absent. TensorFlow's C++ start-up lines are silenced.
    """
    for module, what in (("tensorflow_datasets", "tensorflow-datasets"), ("tensorflow", "TensorFlow")):
        if importlib.util.find_spec(module) is None:
            raise TfdsUnavailable(f"{what} is not installed ({TFDS_EXTRA} adds what TFDS needs)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow_datasets as tfds

    return tfds


def hide_gpus_from_tensorflow() -> None:
    """TFDS only reads data: keep TensorFlow off the GPUs JAX trains on (it would reserve their memory)."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # devices already initialised in this process: nothing to change any more
        pass


def _as_arrays(tfds: Any, split: Any, chunk: int = 8192) -> dict[str, np.ndarray]:
    """A ``tf.data`` split as one NumPy array per feature, read in chunks of ``chunk`` examples.

    Not ``batch_size=-1``: that batches by the split's recorded size, and where none is recorded
    (``tfds.testing.mock_data``) TensorFlow aborts the process trying to reserve ``sys.maxsize`` rows.
    """
    chunks = list(tfds.as_numpy(split.batch(chunk)))
    if not chunks:
        raise ValueError("the split is empty")
    return {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}


def load_tfds_numpy(
    name: str, splits: Sequence[str], download: bool, download_host: str | None = None
) -> list[dict[str, np.ndarray]]:
    """Whole TFDS splits as NumPy dicts, importing ``tensorflow_datasets`` only when asked.

    ``download_host``: where TFDS downloads ``name`` from. When the dataset is not prepared yet and
    ``download`` is on, that host is probed first (a few seconds at most), so that a machine without
    network falls back at once instead of after TFDS's minutes of retries. What TFDS prints while it
    works is held back (``quiet_tfds``). Any failure (TFDS or TensorFlow missing, no network, dataset
    not prepared) becomes one ``RuntimeError`` that says what TFDS needs, so ``source=auto`` can fall
    back and an explicit ``source=tfds`` fails clearly.
    """
    prefix = f"TFDS could not load {name!r} (download={download})"
    try:
        tfds = import_tfds()
        with quiet_tfds():  # building it and asking where its data lives log absl warnings
            builder = tfds.builder(name)
            prepared, data_dir = builder.is_prepared(), builder.data_dir
        if download and download_host is not None and not prepared:
            if not network_reachable(download_host):
                why = f"${OFFLINE_ENV} is set" if offline() else f"{download_host} cannot be reached"
                raise TfdsUnavailable(f"it is not prepared in {data_dir} and {why} (no network)")
            log.info("TFDS: downloading and preparing %s into %s (once)", name, data_dir)
        hide_gpus_from_tensorflow()
        with quiet_tfds():
            loaded = tfds.load(name, split=list(splits), download=download)
            return [_as_arrays(tfds, split) for split in loaded]
    except Exception as error:  # every TFDS failure means "this source is unavailable"
        reason = str(error) if isinstance(error, TfdsUnavailable) else f"{type(error).__name__}: {error}"
        reason = " ".join(reason.split())  # TFDS's messages span lines: the reason must fit in one
        raise RuntimeError(
            f"{prefix}: {reason}. "
            "TFDS needs TensorFlow and tensorflow-datasets installed and either network access or the "
            "dataset already prepared under TFDS_DATA_DIR (default ~/tensorflow_datasets); offline, "
            "use the dataset's file source with dataset.data_dir instead"
        ) from error


Splits = tuple[dict, dict, str]  # train split, evaluation split, source description


def choose_source(
    cfg: Any,
    *,
    sources: Sequence[str],
    expected: str,
    load_files: Callable[[str], Splits],
    load_tfds: Callable[[bool], Splits],
    others: Mapping[str, Callable[[], Splits]] | None = None,
    offline_fallback: str | None = None,
    fallback_note: str | None = None,
) -> tuple[dict, dict, str, list[str]]:
    """Load the source ``cfg.source`` names; returns train, eval, source and the sources skipped.

    The file source (``sources[1]``, the first after "auto") reads ``cfg.data_dir``, else
    ``<data_root>/<folder>``; "tfds" downloads if ``cfg.download``; ``others`` are further named
    sources. ``source=auto`` tries, in order: the files (a set ``data_dir`` must exist and is always
    read: auto never swaps the data asked for), then TFDS (downloading if ``cfg.download``), then
    ``offline_fallback`` (a key of ``others``) if given. It logs what it chose and why it skipped
    the others; falling back, it also warns that the run is on ``fallback_note`` (what the fallback
    holds, next to the full dataset) and how to get the full dataset.
    """
    others = dict(others or {})
    file_source = sources[1]
    folder, why = files_folder(cfg)
    if cfg.source == file_source or (cfg.source == "auto" and folder is not None):
        splits = load_files(require_files_folder(cfg, expected))
        if cfg.source == "auto":
            log.info("%s source=auto chose %s (%s)", cfg.display_name, splits[2], why)
        return (*splits, [])
    if cfg.source == "tfds":
        try:
            return (*load_tfds(cfg.download), [])
        except RuntimeError as error:  # TFDS's own message spans lines: one line naming the settings
            hint = "set dataset.download=true (needs network)" if not cfg.download else "check the network"
            raise ValueError(
                f"dataset.source=tfds could not load {cfg.name}: {' '.join(str(error).split())}; "
                f"{hint}, or choose dataset.source={' or '.join(s for s in sources if s != 'tfds')}"
            ) from error
    if cfg.source in others:
        return (*others[cfg.source](), [])
    if cfg.source != "auto":
        raise ValueError(f"dataset.source={cfg.source!r} has no loader for {cfg.name}")
    skipped = [f"{file_source}: {why}"]
    try:
        train, evaluation, source = load_tfds(cfg.download)
    except RuntimeError as error:
        skipped.append(str(error))
        if offline_fallback is None:
            put = f" or put them in {cfg.folder}/ under ${DATA_ROOT_ENV}" if cfg.folder else ""
            raise FileNotFoundError(
                f"No {cfg.display_name} source worked: set dataset.data_dir to a folder with {expected}"
                f"{put}. Tried: {' | '.join(skipped)}"
            ) from error
        train, evaluation, source = others[offline_fallback]()
        where = f"{cfg.folder}/ under ${DATA_ROOT_ENV}" if cfg.folder else "a folder"
        put = f"put {expected} in {where} (or set dataset.data_dir)"
        if importlib.util.find_spec("tensorflow") is None:
            tfds_way = f"or {TFDS_EXTRA} and run with network (TFDS downloads it)"
        else:
            tfds_way = "or run once with network and dataset.download=true (TFDS downloads it)"
        log.warning(
            "%s: this run trains on a SUBSET, %s, not the full dataset. For the full data, %s "
            "(download sources: README, Data), %s",
            cfg.display_name,
            fallback_note or source,
            put,
            tfds_way,
        )
    log.warning("%s source=auto chose %s; skipped: %s", cfg.display_name, source, " | ".join(skipped))
    return train, evaluation, source, skipped


def subset_split(split: dict[str, np.ndarray], limit: int | None, rng: np.random.Generator) -> dict:
    """A seeded random subset of ``limit`` rows (kept in their original order), or ``split`` itself.

    >>> split = {"x": np.arange(10)}
    >>> subset_split(split, 3, np.random.default_rng(0))["x"].tolist()
    [5, 6, 9]
    >>> subset_split(split, None, np.random.default_rng(0)) is split
    True
    """
    num = len(next(iter(split.values())))
    if limit is None or limit >= num:
        return split
    keep = np.sort(rng.choice(num, size=limit, replace=False))
    return {key: value[keep] for key, value in split.items()}


def apply_limits(dataset: Dataset, cfg: Any) -> Dataset:
    """Apply ``max_train_examples`` / ``max_eval_examples`` visibly: in ``source``, ``info`` and the log."""
    full_train, full_eval = dataset.num_train, dataset.num_eval
    dataset.info.update(num_train_full=full_train, num_eval_full=full_eval)
    if cfg.max_train_examples is None and cfg.max_eval_examples is None:
        dataset.info["subset"] = None
        return dataset
    rng = np.random.default_rng(cfg.seed)
    dataset.train = subset_split(dataset.train, cfg.max_train_examples, rng)
    dataset.eval = subset_split(dataset.eval, cfg.max_eval_examples, rng)
    note = (
        f"subset: train {dataset.num_train}/{full_train}, {dataset.eval_split} "
        f"{dataset.num_eval}/{full_eval}, seed {cfg.seed}"
    )
    dataset.info["subset"] = note
    dataset.source = f"{dataset.source} [{note}]"
    log.warning("%s uses a %s", dataset.name, note)
    return dataset


def hold_out_validation(dataset: Dataset, cfg: Any) -> Dataset:
    """With ``validation_examples`` set: a seeded held-out part of the training set becomes the
    evaluation split (the test split is not used), and the rest is the training set.

    >>> d = Dataset("toy", "mem", {"x": np.arange(10)}, {"x": np.arange(3)})
    >>> cfg = type("Cfg", (), {"validation_examples": 4, "seed": 0})
    >>> d = hold_out_validation(d, cfg)
    >>> d.num_train, d.num_eval, d.eval_split, sorted(d.train["x"].tolist() + d.eval["x"].tolist())
    (6, 4, 'validation', [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    count = getattr(cfg, "validation_examples", None)
    if count is None:
        return dataset
    if count >= dataset.num_train:
        raise ValueError(
            f"dataset.validation_examples={count} must be smaller than the training set ({dataset.num_train})"
        )
    order = np.random.default_rng(cfg.seed).permutation(dataset.num_train)
    held, kept = np.sort(order[:count]), np.sort(order[count:])
    dataset.eval = {k: v[held] for k, v in dataset.train.items()}
    dataset.train = {k: v[kept] for k, v in dataset.train.items()}
    dataset.eval_split = "validation"
    note = f"validation: {count} held out of train (seed {cfg.seed}); test split unused"
    dataset.info["validation"] = note
    dataset.source = f"{dataset.source} [{note}]"
    log.warning("%s: %s", dataset.name, note)
    return dataset


def string_array(values: Sequence[str]) -> np.ndarray:
    """A 1-D ``object`` array of Python strings (``np.array`` would make a fixed-width ``<U`` array).

    >>> string_array(["a", "bc"]).dtype
    dtype('O')
    """
    array = np.empty(len(values), dtype=object)
    array[:] = list(values)
    return array
