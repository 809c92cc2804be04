"""The bad-input table: every error a user can cause is one line naming the setting (exit 2 from the CLI).

Each row is run through the product's own path (compose the config, ``experiment.run``) in-process; a
few rows also through ``python -m dpbench`` for the exit status. Rows cover config, model, checkpoint,
hub, data, tokenizer, optimizer, mechanism and resume errors.
"""

import pytest

from dpbench import config as config_lib
from dpbench import experiment
from tests.helpers import TINY, compose_config, run_cli

TEXT = ["model=tiny_encoder", "dataset=sst2_rt"]
GEMMA = ["model=tiny_gemma3", "dataset=samsum_aclsum"]
ROWS = [
    # dp.*
    (["dp.epsilon=0"], "dp.epsilon"),
    (["dp.epsilon=-1"], "dp.epsilon"),
    (["dp.delta=1.5"], "dp.delta"),
    (["dp.delta=null"], "dp.delta"),
    (["dp.clip_norm=0"], "dp.clip_norm"),
    (["dp.clip_norm=-0.5"], "dp.clip_norm"),
    (["dp.sampler=uniform"], "dp.sampler"),
    (["dp.method=dpsgd"], "dp.method"),
    (["dp.clipping=fast"], "dp.clipping"),
    (["dp.randomness=os"], "dp.randomness"),
    (["dp.noise_multiplier=1.0"], "dp.noise_multiplier"),
    (["dp.epsilon=null"], "dp.epsilon"),
    (["dp=ghost", "dp.clipping=bookkeeping"], "dp.clipping"),
    (["dp=bandmf", "dp.bands=0"], "dp.bands"),
    (["dp=bandmf", "dp.bands=5"], "dp.bands"),
    (["dp=blt", "dp.buffers=0"], "dp.buffers"),
    (["dp=bandmf", "dp.sampler=poisson", "dp.bands=2"], "dp.sampler"),
    (["dp.clip_fn=auto_v"], "dp.clip_fn"),
    (["dp.clip_fn=automatic", "dp.clip_gamma=0"], "dp.clip_gamma"),
    (["dp.adaptive_clip.target_quantile=0"], "dp.adaptive_clip.target_quantile"),
    (["dp.secret_file=/no/such/secret"], "dp.secret_file"),
    (["dp.randomness=seeded", "dp.secret_file=/tmp/x"], "dp.secret_file"),
    (["dp=ffa"], "dp.method=ffa"),
    (["dp.epsilon=inf"], "dp.epsilon"),
    # dp.unit=user and the user settings
    (["dp.unit=person"], "dp.unit"),
    (["dp.unit=user"], "dataset.user_key"),
    (["dp.unit=user", "dataset.user_key=synthetic"], "dataset.synthetic_users"),
    (["dp.unit=user", "dataset.user_key=author"], "dataset.user_key=author"),
    (
        [
            "dp.unit=user",
            "dataset.user_key=synthetic",
            "dataset.synthetic_users=4",
            "dp.max_examples_per_user=0",
        ],
        "dp.max_examples_per_user",
    ),
    (
        [
            "dp.unit=user",
            "dataset.user_key=synthetic",
            "dataset.synthetic_users=4",
            "dp.max_examples_per_user=3",
        ],
        "compute.physical_batch_size",
    ),
    (
        ["dp.unit=user", "dataset.user_key=synthetic", "dataset.synthetic_users=100"],
        "dataset.synthetic_users",
    ),
    (["dp.unit=user", "dataset.user_key=synthetic", "dataset.synthetic_users=8"], "runner.batch_size"),
    (
        [
            "dp.unit=user",
            "dataset.user_key=synthetic",
            "dataset.synthetic_users=8",
            "dp.adaptive_clip.target_quantile=0.5",
        ],
        "dp.adaptive_clip",
    ),
    (
        ["dp.unit=user", "dataset.user_key=synthetic", "dataset.synthetic_users=8", "audit=canary"],
        "audit=canary",
    ),
    # accountant.*
    (["accountant=prv", "accountant.eps_error=0"], "accountant.eps_error"),
    (["accountant=prv", "accountant.delta_error=0.5"], "accountant.delta_error"),
    # runner.* and compute.*
    (["runner.steps=0"], "runner.steps"),
    (["runner.steps=null"], "runner.steps"),
    (["runner.batch_size=0"], "runner.batch_size"),
    (["runner.batch_size=100000"], "runner.batch_size"),
    (["runner.eval_every=-1"], "runner.eval_every"),
    (["runner.resume=sometimes"], "runner.resume"),
    (["runner.resume=must"], "runner.resume=must"),
    (["runner.keep_checkpoints=0"], "runner.keep_checkpoints"),
    (["runner.checkpoint_every=-2"], "runner.checkpoint_every"),
    (["compute.physical_batch_size=0"], "compute.physical_batch_size"),
    (["compute.sequence_bucket=-1"], "compute.sequence_bucket"),
    (["compute.sequence_bucket=8"], "compute.sequence_bucket"),
    # optimizer.*, logger.*, audit.*
    (["optimizer.learning_rate=-0.1"], "optimizer.learning_rate"),
    (["optimizer.name=lion"], "optimizer.name"),
    (["optimizer=adam_bc", "dp=none"], "optimizer.name=adam_bc"),
    (["logger.name=tensorboard"], "logger.name"),
    (["logger.mode=sometimes"], "logger.mode"),
    (["audit=canary", "audit.num_canaries=0"], "audit.num_canaries"),
    (["audit=canary", "audit.num_canaries=65"], "audit.num_canaries=65 is more than the training data"),
    ([*TEXT, "audit=canary", "audit.num_canaries=65"], "audit.num_canaries=65 is more than"),
    ([*GEMMA, "audit=canary", "audit.secret_digits=0"], "audit.secret_digits"),
    ([*GEMMA, "audit=canary", "audit.exposure_candidates=-1"], "audit.exposure_candidates"),
    ([*TEXT, "audit=canary", "audit.num_canaries=8", "dataset.max_length=16"], "dataset.max_length=16"),
    # dataset.*
    (["dataset.source=kaggle"], "dataset.source"),
    (["dataset.name=cifar10"], "dataset.name"),
    (["dataset.data_dir=/no/such/dir"], "dataset.data_dir"),
    (["dataset.max_train_examples=0"], "dataset.max_train_examples"),
    (["dataset.source=tfds", "dataset.download=false"], "dataset.source=tfds"),
    (["dataset.task=translation"], "dataset.task"),
    # model.* and the model-dataset fit
    (["model=tiny_encoder"], "model.arch=encoder"),
    (["dataset=sst2_rt"], "model.arch=cnn"),
    ([*TEXT[:1], "dataset=samsum_aclsum"], "model.arch=encoder"),
    (["model=tiny_gemma3", "dataset=sst2_rt"], "model.arch=gemma3"),
    ([*TEXT, "model.finetune=lora_full"], "model.finetune"),
    ([*TEXT, "model.lora_rank=-1"], "model.lora_rank"),
    ([*TEXT, "model.lora_rank=0"], "model.lora_rank"),
    ([*TEXT, "model.checkpoint=roberta-bas"], "model.checkpoint"),
    ([*TEXT, "model.random_init=null", "model.checkpoint=/no/such/model"], "model.checkpoint"),
    ([*GEMMA, "model.random_init=false", "model.checkpoint=google/gemma-3-1b-pt"], "model.checkpoint"),
    ([*GEMMA, "model.preset=huge"], "model.preset"),
    ([*GEMMA, "model.remat=some"], "model.remat"),
    ([*GEMMA, "model.dtype=float8"], "model.dtype"),
    ([*GEMMA, "dp=ghost", "model.dtype=bfloat16"], "dp.clipping"),
]


@pytest.mark.parametrize(("overrides", "named"), ROWS, ids=[" ".join(o) for o, _ in ROWS])
def test_a_bad_input_is_one_line_naming_the_setting(overrides, named, tmp_path):
    cfg = compose_config([*TINY, *overrides], tmp_path)
    with pytest.raises(config_lib.SETTING_ERRORS) as error:
        experiment.run(cfg)
    message = str(error.value)
    assert "\n" not in message and named in message, message


def test_the_table_is_long_enough():
    assert len(ROWS) >= 40


@pytest.mark.parametrize(
    "overrides",
    [["dp.epsilon=0"], ["model=tiny_encoder"], ["model=no_such_model"], ["dp.clipping=fast"]],
)
def test_the_cli_exits_2_with_one_line(overrides, tmp_path):
    done = run_cli("-m", "dpbench", *TINY, f"hydra.run.dir={tmp_path}", *overrides, timeout=300, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) <= 2, done.stderr[-2000:]  # Hydra's composition errors add one hint line
