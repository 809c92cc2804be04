"""``python -m dpbench.privacy [overrides]``: the privacy plan of a run, without training it.

Composes the same config as ``python -m dpbench``, loads only the training set (for its size n;
text is not tokenised), then prints the sampler, sampling rate, logical steps, δ, σ and the ε the
accountant gives: what ``python -m dpbench`` with the same overrides would train under. No W&B.

    python -m dpbench.privacy +experiment=mnist_cnn
    python -m dpbench.privacy +experiment=mnist_cnn dp.epsilon=null dp.noise_multiplier=1.1
    python -m dpbench.privacy +experiment=samsum_gemma +plan.num_examples=14732  # n without the data
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from dpbench import config as config_lib
from dpbench.data.registry import load_dataset
from dpbench.privacy import accounting
from dpbench.privacy.mechanism import plan_mechanism

config_lib.register_configs()


def plan_rows(cfg: DictConfig, dataset=None, num_examples: int | None = None) -> list[tuple[str, str]]:
    """(name, value) rows describing the mechanism ``cfg`` would train under.

    The training set is loaded for its size n unless given: ``dataset`` (loaded already) or
    ``num_examples`` (n alone, e.g. ``python -m dpbench.plan``'s ``+plan.num_examples``).
    """
    config_lib.validate_static(cfg)
    if num_examples is None:
        dataset = dataset if dataset is not None else load_dataset(cfg.dataset)
        num_examples = dataset.num_train
        rows = [("dataset", f"{dataset.name} ({dataset.source})")]
    else:
        rows = [("dataset", f"{cfg.dataset.name} (not loaded: n given)")]
    if cfg.audit.name == "canary":
        # The runner trains on the real examples plus the included canaries: n (and so q) changes.
        num_examples, audit = _with_canaries(cfg.audit, num_examples)
        rows.append(("audit", audit))
    rows.append(("training examples n", str(num_examples)))
    mechanism = plan_mechanism(cfg, num_examples)
    sampler = mechanism.sampler
    rows += [
        ("dp.method", cfg.dp.method),
        ("sampler", f"{sampler.name} ({sampler.neighbouring} neighbours)"),
        (
            "batch size",
            f"{mechanism.expected_batch_size:g} ({'fixed' if sampler.name == 'shuffle' else 'expected'})",
        ),
        ("sampling rate q", f"{sampler.sampling_rate:.6g}"),
        ("logical steps", str(mechanism.steps)),
    ]
    if getattr(sampler, "cycle_length", None):
        rows.append(("cycle length (groups or bins)", str(sampler.cycle_length)))
    if mechanism.noise_multiplier is None:
        rows.append(("privacy", "none: dp.method=none adds no noise and claims no (ε, δ)"))
        return rows
    sigma = mechanism.noise_multiplier
    epsilon = accounting.compute_epsilon(sampler, sigma, mechanism.steps, mechanism.delta, cfg.accountant)
    source = (
        "given (dp.noise_multiplier)"
        if cfg.dp.noise_multiplier is not None
        else f"calibrated to dp.epsilon={cfg.dp.epsilon:g}"
    )
    accountant = cfg.accountant.name
    if cfg.accountant.name == "pld":
        accountant += f" (value_discretization_interval={cfg.accountant.value_discretization_interval:g})"
    elif cfg.accountant.name == "prv":
        delta_error = cfg.accountant.delta_error
        delta_error = f"{mechanism.delta / 1000:g} (δ/1000)" if delta_error is None else f"{delta_error:g}"
        accountant += (
            f" (eps_error={cfg.accountant.eps_error:g}, delta_error={delta_error}; ε is the upper bound)"
        )
    rows += [
        ("clip norm C", f"{cfg.dp.clip_norm:g}"),
        ("δ", f"{mechanism.delta:.6g}"),
        ("σ (noise multiplier)", f"{sigma:.6f} {source}"),
        ("noise std on the sum σC", f"{sigma * cfg.dp.clip_norm:.6g}"),
        ("noise", _noise_row(mechanism.strategy.describe())),
        ("noise std on the mean gradient", _noise_std_row(mechanism)),
        ("accounting event", repr(mechanism.dp_event())),
        ("ε", f"{epsilon:.6f}"),
        ("accountant", accountant),
    ]
    return rows


def _with_canaries(audit_cfg, num_examples: int) -> tuple[int, str]:
    """n with the included canaries (the same coins as the run's), and the audit's description."""
    from dpbench.privacy.audit import draw_canary_inclusion
    from dpbench.privacy.audit_run import check_canary_count

    check_canary_count(audit_cfg.num_canaries, num_examples)
    included = int(draw_canary_inclusion(audit_cfg.num_canaries, audit_cfg.seed).sum())
    description = (
        f"{audit_cfg.num_canaries} canaries ({included} included, seed {audit_cfg.seed}); "
        f"training set {num_examples} -> {num_examples + included} examples"
    )
    return num_examples + included, description


def _noise_row(description: dict) -> str:
    """One line for the noise strategy (coefficients rounded for reading)."""
    kind = description["kind"]
    if kind == "iid":
        return "independent Gaussian (DP-SGD)"
    details = {k: v for k, v in description.items() if k != "kind"}
    shown = ", ".join(
        f"{k}={[round(x, 4) for x in v] if isinstance(v, list) else v}" for k, v in details.items()
    )
    return f"{kind}: correlated across steps ({shown})"


def _noise_std_row(mechanism) -> str:
    """The noise per step and in the model's running sum of updates, comparable across mechanisms."""
    std = mechanism.noise_std()
    text = (
        f"per step {std['per_step']:.4g}, in the running sum {std['running_sum']:.4g} "
        f"(RMS over steps; {std['running_sum_last']:.4g} at the last step)"
    )
    # Adaptive clipping scales the noise with each step's C; the plan knows only the first.
    return text + (", at the initial C" if mechanism.adaptive is not None else "")


def format_table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns: setting, value."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    with config_lib.exit_on_setting_error():
        # +plan.num_examples=N gives n without loading any data (as for python -m dpbench.plan).
        num_examples = (cfg.get("plan") or {}).get("num_examples")
        print(format_table(plan_rows(cfg, num_examples=int(num_examples) if num_examples else None)))


if __name__ == "__main__":
    main()
