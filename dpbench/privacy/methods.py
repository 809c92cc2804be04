"""The DP methods a run can choose (``dp.method``): how a logical batch becomes one gradient.

- ``none``: the non-private baseline, mean gradient over the examples actually drawn.
- ``vanilla``: DP-SGD. Per-example gradients of all trainable parameters, clipped to norm C,
  summed over the whole logical batch, N(0, σ²C²) added once to that sum, divided by the
  *expected* logical batch size (dividing by the realised size would leak it).
- ``ffa``: the same clipping and noise; LoRA's A matrices stay frozen at their random init
  (the method freezes the parameter label ``lora_a``), so only B (and any head) train.
- ``ghost``: ``vanilla`` with exact ghost clipping (Li et al. 2022; Bu et al. 2022): the same
  mechanism, so the same ε and, up to float rounding, the same result.
- ``bandmf``: DP-FTRL with banded matrix factorization (Choquette-Choo et al. 2023): the same
  clipping, noise correlated across steps by a ``dp.bands``-banded strategy, cyclic Poisson
  sampling (``dp.sampler=cyclic_poisson``); ``dp.bands=1`` is DP-SGD.
- ``blt``: DP-FTRL with a buffered linear Toeplitz strategy (Dvijotham et al. 2024; McKenna 2024),
  balls-in-bins participation (``dp.sampler=balls_in_bins``), no amplification.

How the noise is drawn and correlated is ``dpbench.privacy.noise`` (built by the ``Mechanism``).

``dp.clipping`` (``per_example``, ``ghost``, ``bookkeeping``, or ``auto``) only chooses how the
clipped sum is computed: every choice is exact, so it never changes ε or the result. ``auto`` is
the fastest exact implementation that ``make bench`` measured (results/bench.md). Ghost is not
exact in a bfloat16 model (its second backward pass rounds in bfloat16) and is refused there
(``check_clipping_dtype``); book-keeping and per-example are.

A new method is one entry in ``METHODS`` plus one YAML in ``conf/dp/``. A method that changes what trains
names parameter labels (``dpbench.models.base.LABELS``, plain strings: privacy code imports no model).
"""

from __future__ import annotations

import dataclasses

from dpbench.privacy import clipping as clipping_lib

AUTO = "auto"
# Measured by `make bench` (results/bench.md): book-keeping is the fastest exact implementation.
FASTEST_EXACT = "bookkeeping"
CLIPPING_CHOICES = (AUTO, *clipping_lib.CLIPPING_IMPLEMENTATIONS)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What a ``dp.method`` name means: private or not, the parameter labels it freezes on top of what
    ``model.finetune`` leaves frozen, which clipping."""

    private: bool
    frozen_labels: tuple[str, ...] = ()
    required_clipping: str | None = None  # e.g. ghost: the method *is* that implementation
    noise: str = "iid"  # dpbench.privacy.noise.NOISE_KINDS
    # The samplers its accounting holds under (dpbench.privacy.batch_selection).
    samplers: tuple[str, ...] = ("poisson", "shuffle", "cyclic_poisson", "balls_in_bins")


METHODS: dict[str, MethodSpec] = {
    "none": MethodSpec(private=False),
    "vanilla": MethodSpec(private=True),
    "ffa": MethodSpec(private=True, frozen_labels=("lora_a",)),
    "ghost": MethodSpec(private=True, required_clipping="ghost"),
    # Banded: column-normalised with bands <= the cycle, so each participation has sensitivity C.
    "bandmf": MethodSpec(private=True, noise="bandmf", samplers=("cyclic_poisson",)),
    # Not banded: only the (k, b)-min-sep sensitivity of balls-in-bins participation is known.
    "blt": MethodSpec(private=True, noise="blt", samplers=("balls_in_bins",)),
}


@dataclasses.dataclass(frozen=True)
class GradientMethod:
    name: str
    clip_norm: float | None  # None for the non-private method
    frozen_labels: tuple[str, ...] = ()  # parameter labels the method freezes (ModelBundle.with_frozen)
    clipping: str = "per_example"  # how the clipped sum is computed; exact either way
    clip_fn: str = "fixed"  # dp.clip_fn: fixed (min(1, C/‖g‖)) | automatic (C/(‖g‖+γ))
    clip_gamma: float = 0.01  # dp.clip_gamma: γ of automatic clipping
    unit_size: int = 1  # rows per privacy unit (dp.unit=user: dp.max_examples_per_user); one unit is clipped

    @property
    def private(self) -> bool:
        return self.clip_norm is not None

    def grad_sum(self, losses_fn, trainable, batch, mask, *args, clip_norm=None):
        """Sum over one physical batch; sums from several physical batches simply add up.
        ``clip_norm``: this step's C when it changes during the run (adaptive clipping), else
        ``self.clip_norm``."""
        if self.private:
            return clipping_lib.clipped_grad_sum(
                losses_fn,
                trainable,
                batch,
                mask,
                self.clip_norm if clip_norm is None else clip_norm,
                *args,
                clipping=self.clipping,
                clip_fn=self.clip_fn,
                gamma=self.clip_gamma,
                unit_size=self.unit_size,
            )
        return clipping_lib.masked_grad_sum(losses_fn, trainable, batch, mask, *args)


def resolve_clipping(method: str, clipping: str) -> str:
    """The implementation a (method, dp.clipping) pair runs; refuses contradictions.

    >>> resolve_clipping("vanilla", "auto") == FASTEST_EXACT
    True
    >>> resolve_clipping("ghost", "auto")
    'ghost'
    """
    if clipping not in CLIPPING_CHOICES:
        raise ValueError(
            f"dp.clipping={clipping!r} is not known; choose one of {', '.join(CLIPPING_CHOICES)}"
        )
    spec = METHODS[method]
    if spec.required_clipping is not None:
        if clipping not in (AUTO, spec.required_clipping):
            raise ValueError(
                f"dp.method={method} is {spec.required_clipping} clipping, but dp.clipping={clipping}; "
                f"use dp=vanilla dp.clipping={clipping}, or dp.clipping={spec.required_clipping} / auto"
            )
        return spec.required_clipping
    return FASTEST_EXACT if clipping == AUTO else clipping


def check_clipping_dtype(method: str, clipping: str, dtype) -> None:
    """Refuse (``dpbench.config.ConfigError``, one line) a (``dp.method``, ``dp.clipping``) pair that is
    not exact in a model computing in ``dtype`` (``model.dtype``; None: float32): ghost clipping in
    bfloat16. Needs no data or model, so config validation can call it before anything loads.

    >>> check_clipping_dtype("vanilla", "auto", "bfloat16")  # book-keeping: exact in bfloat16
    >>> check_clipping_dtype("none", "ghost", "bfloat16")  # non-private: nothing is clipped
    """
    if not METHODS[method].private:
        return
    clipping_lib.require_exact_in(resolve_clipping(method, clipping), dtype, method=method)


def make_method(dp_cfg) -> GradientMethod:
    if dp_cfg.method not in METHODS:
        raise ValueError(f"dp.method={dp_cfg.method!r} is not known; choose one of {', '.join(METHODS)}")
    spec = METHODS[dp_cfg.method]
    if not spec.private:
        return GradientMethod(dp_cfg.method, clip_norm=None)
    users = dp_cfg.get("unit", "example") == "user"
    clipping = resolve_clipping(dp_cfg.method, dp_cfg.get("clipping", AUTO) or AUTO)
    return GradientMethod(
        dp_cfg.method,
        clip_norm=float(dp_cfg.clip_norm),
        frozen_labels=spec.frozen_labels,
        clipping=clipping,
        clip_fn=dp_cfg.get("clip_fn", "fixed"),
        clip_gamma=float(dp_cfg.get("clip_gamma", 0.01)),
        unit_size=int(dp_cfg.max_examples_per_user) if users else 1,
    )
