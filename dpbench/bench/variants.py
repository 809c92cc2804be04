"""The variants of the head-to-head table. Importing this module loads neither JAX nor torch."""

from __future__ import annotations

import dataclasses
import importlib.util

CLIPPINGS = ("per_example", "ghost", "bookkeeping")


@dataclasses.dataclass(frozen=True)
class Variant:
    id: str
    label: str
    framework: str  # dpbench | jax | torch: the ratio columns divide by this framework's baseline
    private: bool
    runtime: str  # jax | torch: which kind of subprocess runs it
    requires: str | None = None  # an optional peer package (the `bench` extra)
    clipping: str | None = None  # dpbench's dp.clipping
    noise: str = "iid"  # dpbench's noise strategy (dpbench.privacy.noise): iid | bandmf

    @property
    def is_baseline(self) -> bool:
        return not self.private


VARIANTS: tuple[Variant, ...] = (
    Variant("dpbench-none", "dpbench `dp=none`", "dpbench", False, "jax"),
    *(
        Variant(f"dpbench-{c}", f"dpbench `dp=vanilla dp.clipping={c}`", "dpbench", True, "jax", clipping=c)
        for c in CLIPPINGS
    ),
    # Correlated noise (dp=bandmf, 4 bands) on the fastest clipping: its cost over the i.i.d. row is the
    # streaming noise (a tensordot over the bands and one buffer write per step).
    Variant(
        "dpbench-bandmf",
        "dpbench `dp=bandmf dp.bands=4 dp.clipping=bookkeeping`",
        "dpbench",
        True,
        "jax",
        clipping="bookkeeping",
        noise="bandmf",
    ),
    Variant("jax-nonprivate", "JAX + optax non-private (one jit)", "jax", False, "jax"),
    Variant(
        "jax_privacy-clipped_grad",
        "jax-privacy {jax_privacy} `clipped_grad` + `gaussian_privatizer`",
        "jax",
        True,
        "jax",
        requires="jax_privacy",
    ),
    Variant("torch-nonprivate", "PyTorch {torch} non-private", "torch", False, "torch"),
    Variant(
        "opacus-hooks",
        "Opacus {opacus} hooks (per-sample gradients)",
        "torch",
        True,
        "torch",
        requires="opacus",
    ),
    Variant("opacus-ghost", "Opacus {opacus} ghost clipping", "torch", True, "torch", requires="opacus"),
)
BY_ID = {v.id: v for v in VARIANTS}
BASELINE = {"dpbench": "dpbench-none", "jax": "jax-nonprivate", "torch": "torch-nonprivate"}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions = {}
    for name, dist in (
        ("jax", "jax"),
        ("flax", "flax"),
        ("torch", "torch"),
        ("transformers", "transformers"),
        ("opacus", "opacus"),
        ("jax_privacy", "jax-privacy"),
    ):
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def select(ids: list[str] | None) -> list[Variant]:
    if not ids:
        return list(VARIANTS)
    unknown = [i for i in ids if i not in BY_ID]
    if unknown:
        raise ValueError(f"--variants: {', '.join(unknown)} not known; choose from {', '.join(BY_ID)}")
    return [BY_ID[i] for i in ids]
