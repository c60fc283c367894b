"""Goodput: choose the batch by training progress per second, not images per second.

Pure functions of measurements (images/s per candidate batch, a gradient noise scale
from :mod:`autotune.gns`); nothing here touches torch or a device.

With B0 the reference batch (the one the learning rate was tuned at), B_noise the
gradient noise scale tr(Sigma)/|G|^2 in examples, and s = B / B0 (Pollux/AdaptDL,
Qiao et al. OSDI 2021; McCandlish et al. 2018):

- gain r(s) = (tr(Sigma)/B0 + |G|^2) / (tr(Sigma)/B + |G|^2) = s (B_noise + B0) / (B_noise + B):
  how many reference-batch steps one step at batch B is worth (1 <= r <= s for B >= B0);
- efficiency E = r / s = (B_noise + B0) / (B_noise + B): what one image is worth at
  batch B, relative to one at B0 (McCandlish's examples-to-target ratio, inverted);
- goodput = images/s x E: reference-batch images' worth of progress per second.

The learning-rate gain follows AdaScale (Johnson et al. 2020): the rate is multiplied by
r(s) for SGD; for Adam-like optimisers AdaptDL's ``AdamScale`` takes r(s) ** 0.5, the
power used here by default (the model trains with Adam).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = [
    "ADAM_LR_POWER",
    "SGD_LR_POWER",
    "BatchCandidate",
    "GoodputChoice",
    "GoodputRow",
    "choose_batch_by_goodput",
    "conservative_noise_scale",
    "efficiency",
    "gain",
    "goodput_row",
    "verdict_line",
]

SGD_LR_POWER = 1.0
ADAM_LR_POWER = 0.5


def _check(batch: int, reference_batch: int, noise_scale: float) -> None:
    for name, value in (("batch", batch), ("reference batch", reference_batch)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not (isinstance(noise_scale, (int, float)) and noise_scale >= 0):
        raise ValueError(f"noise scale must be a number >= 0, got {noise_scale!r}")


def efficiency(batch: int, reference_batch: int, noise_scale: float) -> float:
    """E(B) = (B_noise + B0) / (B_noise + B): one image's worth at ``batch`` relative to one
    at the reference batch. 1 at B0, falling with B; above 1 below B0. An infinite noise
    scale (pure noise) gives 1: every image counts fully at any batch."""
    _check(batch, reference_batch, noise_scale)
    if math.isinf(noise_scale):
        return 1.0
    return (noise_scale + reference_batch) / (noise_scale + batch)


def gain(batch: int, reference_batch: int, noise_scale: float) -> float:
    """r(s) = s E(B): reference-batch steps one step at ``batch`` is worth."""
    return batch / reference_batch * efficiency(batch, reference_batch, noise_scale)


def conservative_noise_scale(noise_scale: float, stderr: float, z: float = 1.0) -> float:
    """The noise scale to decide with: ``z`` standard errors below the estimate (never
    below 0). An overestimate picks too large a batch and wastes images; an
    underestimate only keeps the batch nearer the reference, where the learning rate
    was tuned. Raises ValueError when the estimate says nothing (infinite or unknown:
    |G|^2 not yet distinguishable from noise); the caller then falls back to the
    reference batch or to another objective, and says so."""
    if not (math.isfinite(noise_scale) and math.isfinite(stderr) and stderr >= 0):
        raise ValueError(
            f"noise scale {noise_scale!r} +- {stderr!r} is not a usable estimate; measure more steps"
        )
    return max(noise_scale - z * stderr, 0.0)


@dataclass(frozen=True)
class BatchCandidate:
    """One measured batch size."""

    batch: int
    images_per_s: float
    fits: bool = True
    """Within the memory target (a candidate that does not fit is shown, never chosen)."""


@dataclass(frozen=True)
class GoodputRow:
    batch: int
    images_per_s: float
    gain: float
    efficiency: float
    goodput: float
    """Reference-batch images' worth of training progress per second."""
    lr_factor: float
    """Learning-rate multiplier relative to the reference rate: gain ** lr_power."""
    fits: bool

    def to_dict(self) -> dict:
        return asdict(self)


def goodput_row(
    candidate: BatchCandidate, reference_batch: int, noise_scale: float, lr_power: float = ADAM_LR_POWER
) -> GoodputRow:
    if not (candidate.images_per_s >= 0):
        raise ValueError(f"images/s must be >= 0, got {candidate.images_per_s!r}")
    r = gain(candidate.batch, reference_batch, noise_scale)
    e = efficiency(candidate.batch, reference_batch, noise_scale)
    return GoodputRow(
        batch=candidate.batch,
        images_per_s=candidate.images_per_s,
        gain=r,
        efficiency=e,
        goodput=candidate.images_per_s * e,
        lr_factor=r**lr_power,
        fits=candidate.fits,
    )


@dataclass(frozen=True)
class GoodputChoice:
    chosen: GoodputRow
    rows: tuple[GoodputRow, ...]
    """Every candidate, by batch."""
    noise_scale: float
    reference_batch: int

    def row(self, batch: int) -> GoodputRow:
        return next(r for r in self.rows if r.batch == batch)

    def to_dict(self) -> dict:
        return {
            "chosen_batch": self.chosen.batch,
            "noise_scale": self.noise_scale if math.isfinite(self.noise_scale) else None,
            "reference_batch": self.reference_batch,
            "rows": [r.to_dict() for r in self.rows],
        }


def choose_batch_by_goodput(
    candidates: Sequence[BatchCandidate],
    noise_scale: float,
    reference_batch: int,
    lr_power: float = ADAM_LR_POWER,
    tolerance: float = 0.0,
) -> GoodputChoice:
    """The fitting candidate with the highest goodput.

    Candidates within ``tolerance`` (a share) of the best goodput count as tied and the
    smallest batch among them wins: its learning rate moves least from the one tuned at
    the reference, and the prediction is least extrapolated.
    """
    if not candidates:
        raise ValueError("no batch candidate to choose from")
    if not (0 <= tolerance < 1):
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
    rows = tuple(
        goodput_row(c, reference_batch, noise_scale, lr_power)
        for c in sorted(candidates, key=lambda c: c.batch)
    )
    fitting = [r for r in rows if r.fits]
    if not fitting:
        raise ValueError("no batch candidate fits in memory")
    best = max(r.goodput for r in fitting)
    chosen = next(r for r in fitting if r.goodput >= (1 - tolerance) * best)
    return GoodputChoice(chosen, rows, float(noise_scale), reference_batch)


def verdict_line(
    choice: GoodputChoice, baseline_batch: int, baseline_images_per_s: float, baseline_name: str = "the seed default"
) -> str:
    """One plain sentence: predicted speed-up to the same training progress, beside the
    raw images/s ratio, against a baseline measured end to end (it may differ from the
    choice in more than the batch: precision, workers)."""
    if not baseline_images_per_s > 0:
        raise ValueError(f"baseline images/s must be > 0, got {baseline_images_per_s!r}")
    c = choice.chosen
    ref, ns = choice.reference_batch, choice.noise_scale
    base_eff = efficiency(baseline_batch, ref, ns)
    raw = c.images_per_s / baseline_images_per_s
    worth = c.efficiency / base_eff
    speedup = c.goodput / (baseline_images_per_s * base_eff)
    noise = f"{ns:,.0f}" if math.isfinite(ns) else "unmeasurably large"
    if c.batch == baseline_batch:
        per_image = f"each image is worth as much (same batch {c.batch})"
    else:
        per_image = (
            f"but at batch {c.batch} each image is worth {worth:.2f} of one at batch "
            f"{baseline_batch}"
        )
    return (
        f"predicted {speedup:.2f}x sooner to the same training progress than {baseline_name}: "
        f"{raw:.2f}x the images per second, {per_image} "
        f"(gradient noise scale {noise} images)"
    )
