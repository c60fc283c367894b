"""The tuner's other decisions, as pure functions of measurements.

Learning-rate scaling, the DataLoader worker count and the precision are chosen here
from numbers measured elsewhere; nothing in this module touches a device, so every
rule can be tested exactly. (The batch-size choice lives with its search, in
:mod:`autotune.search`.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from autotune.errors import ConfigError

__all__ = [
    "LR_RULES",
    "LR_WARNING_FACTOR",
    "PrecisionMeasurement",
    "Verdict",
    "WorkerMeasurement",
    "choose_precision",
    "judge_recommendation",
    "choose_workers",
    "lr_factor",
    "lr_warning",
    "scale_lr",
    "warmup_steps_for",
]

#: How a learning rate follows the batch: ``linear`` (Goyal et al. 2017, the usual rule
#: for SGD-like training), ``sqrt`` (keeps the gradient-noise scale, gentler for Adam
#: and GANs), ``none`` (keep the reference learning rate), ``adascale`` (the AdaScale
#: gain from the measured gradient noise scale, to the power 0.5 for Adam:
#: :func:`autotune.goodput.gain`; needs that noise scale).
LR_RULES = ("linear", "sqrt", "none", "adascale")
#: Training precisions: fp32, bf16 autocast, fp16 autocast with a gradient scaler.
PRECISIONS = ("fp32", "bf16", "fp16")

#: Above this learning-rate multiplier, warn: large jumps are where GAN training diverges.
LR_WARNING_FACTOR = 8.0

#: Warm-up length: this many steps per unit of learning-rate multiplier, capped.
WARMUP_STEPS_PER_FACTOR = 100
WARMUP_STEPS_MAX = 2000


def lr_factor(rule: str, batch_factor: float, noise_scale: float | None = None) -> float:
    """The learning-rate multiplier for ``batch_factor = batch / base_batch`` under ``rule``.

    ``adascale`` needs ``noise_scale`` expressed in units of the base batch (B_noise /
    base_batch): the gain r = s (n + 1) / (n + s), to the power
    :data:`autotune.goodput.ADAM_LR_POWER`. The gain chains exactly (r from B1 to B2
    times r from B0 to B1 is r from B0 to B2), so rescaling a rescaled rate is exact.
    """
    if rule == "adascale":
        from autotune.goodput import ADAM_LR_POWER

        if noise_scale is None or not (noise_scale >= 0 and math.isfinite(noise_scale)):
            raise ConfigError(
                f"learning-rate rule adascale needs a measured gradient noise scale, got {noise_scale!r}"
            )
        gain = batch_factor * (noise_scale + 1) / (noise_scale + batch_factor)
        return gain**ADAM_LR_POWER
    if rule == "linear":
        return batch_factor
    if rule == "sqrt":
        return math.sqrt(batch_factor)
    if rule == "none":
        return 1.0
    raise ConfigError(f"learning-rate rule must be one of {', '.join(LR_RULES)}, got {rule!r}")


def scale_lr(
    base_lr: float, base_batch: int, batch: int, rule: str, noise_scale: float | None = None
) -> float:
    """The learning rate for ``batch``, given the reference ``base_lr`` at ``base_batch``.

    Applied to the generator and the discriminator separately, each from its own
    reference rate. ``noise_scale`` (in images; rule ``adascale`` only) is the gradient
    noise scale the gain is computed from.
    """
    if not (isinstance(base_lr, (int, float)) and 0 < base_lr < math.inf):
        raise ConfigError(f"base learning rate must be a positive number, got {base_lr!r}")
    for name, value in (("base batch", base_batch), ("batch", batch)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    scaled = None if noise_scale is None else noise_scale / base_batch
    return base_lr * lr_factor(rule, batch / base_batch, scaled)


def lr_warning(factor: float) -> str | None:
    """A warning when the learning rate was multiplied by more than 8, else None.

    ``factor`` is the learning-rate multiplier (``lr_factor``), not the batch ratio:
    under ``sqrt`` a 64x batch is only an 8x learning rate.
    """
    if factor <= LR_WARNING_FACTOR:
        return None
    return (
        f"learning rate scaled x{factor:.3g} (more than x{LR_WARNING_FACTOR:g} the reference); "
        "GAN training often diverges after such a jump: consider the sqrt rule or a longer warm-up"
    )


def warmup_steps_for(rule: str, batch_factor: float, noise_scale: float | None = None) -> int:
    """Linear warm-up steps to reach the scaled learning rate.

    0 when the learning rate does not grow (multiplier <= 1: nothing to ease into);
    otherwise ``round(100 * multiplier)`` capped at 2000, so the warm-up lengthens with
    the size of the jump (Goyal et al. warm up over a few epochs for the same reason)
    while staying a small share of a training run. ``batch_factor`` is
    ``batch / base_batch``; ``rule`` turns it into the multiplier (``noise_scale`` in
    base-batch units for ``adascale``, as :func:`lr_factor`).
    """
    factor = lr_factor(rule, batch_factor, noise_scale)
    if factor <= 1:
        return 0
    return min(WARMUP_STEPS_MAX, round(WARMUP_STEPS_PER_FACTOR * factor))


@dataclass
class WorkerMeasurement:
    """One DataLoader setting and the images/s measured with it."""

    workers: int
    prefetch_factor: int | None
    """None with 0 workers, where torch refuses a prefetch factor."""
    images_per_s: float
    error: str = ""
    """Why this setting failed (a worker killed by a full /dev/shm...); its speed is 0."""


def choose_workers(
    measurements: Sequence[WorkerMeasurement],
    consumption_images_per_s: float | None,
    headroom: float = 1.2,
    tolerance: float = 0.03,
) -> WorkerMeasurement:
    """The fewest workers that keep training fed; fewer workers means less RAM and CPU.

    Two kinds of measurement, two rules:

    - ``consumption_images_per_s`` given (GPU): each measurement is the loader alone,
      and the train step consumes that many images/s. Keep the fewest workers (then
      the smallest prefetch) delivering at least ``headroom`` times the consumption:
      the margin absorbs slow images and jitter. If none does, the fastest loader.
    - ``consumption_images_per_s`` None (CPU): each measurement is end-to-end training
      with the loader feeding the step, so workers compete with the step for cores.
      Keep the fewest workers within ``tolerance`` of the best images/s.
    """
    if not measurements:
        raise ValueError("no DataLoader measurement to choose from")
    if consumption_images_per_s is not None and not consumption_images_per_s > 0:
        raise ValueError(
            f"consumption must be positive images/s, got {consumption_images_per_s!r}"
        )
    by_cost = sorted(measurements, key=lambda m: (m.workers, m.prefetch_factor or 0))
    if consumption_images_per_s is not None:
        needed = headroom * consumption_images_per_s
        enough = [m for m in by_cost if m.images_per_s >= needed]
        if enough:
            return enough[0]
        # max keeps the first of equals: the cheapest among the fastest.
        return max(by_cost, key=lambda m: m.images_per_s)
    best = max(m.images_per_s for m in by_cost)
    return next(m for m in by_cost if m.images_per_s >= (1 - tolerance) * best)


@dataclass
class PrecisionMeasurement:
    """The real train step measured at one precision (fp32, bf16, fp16 with a scaler)."""

    precision: str
    images_per_s: float | None
    """None when the step could not run at this precision."""
    peak_bytes: int | None
    finite: bool
    """False when a loss or gradient went NaN/inf during the measurement."""
    error: str = ""
    """Why the step could not run (unsupported dtype, ...), empty otherwise."""


def choose_precision(
    measurements: Sequence[PrecisionMeasurement], tolerance: float = 0.03
) -> PrecisionMeasurement:
    """The fastest precision whose losses stay finite, memory breaking near-ties.

    Among usable measurements (finite, with a speed), start from the fastest; another
    within ``tolerance`` of its images/s that peaks lower wins (the lowest peak, then
    the faster), since the memory it frees buys a larger batch while the speed
    difference is within noise. A peak that is unknown never wins a tie, and when
    the fastest's peak is unknown there is nothing to compare: the fastest stays.
    """
    usable = [m for m in measurements if m.finite and m.images_per_s is not None]
    if not usable:
        reasons = "; ".join(f"{m.precision}: {_unusable_reason(m)}" for m in measurements)
        raise ValueError(f"no usable precision ({reasons or 'nothing measured'})")
    fastest = max(usable, key=lambda m: m.images_per_s)
    if fastest.peak_bytes is None:
        return fastest
    lighter = [
        m
        for m in usable
        if m.images_per_s >= (1 - tolerance) * fastest.images_per_s
        and m.peak_bytes is not None
        and m.peak_bytes < fastest.peak_bytes
    ]
    if not lighter:
        return fastest
    return min(lighter, key=lambda m: (m.peak_bytes, -m.images_per_s))


def _unusable_reason(m: PrecisionMeasurement) -> str:
    if m.error:
        return m.error
    if not m.finite:
        return "non-finite loss"
    return "no speed measured"


@dataclass(frozen=True)
class Verdict:
    """Whether the tuned file should hold the measured candidate or the seed default."""

    keep_candidate: bool
    speedup: float | None
    """Candidate images/s over the seed default's, end to end; None when not measurable."""
    message: str
    """For the user: empty when the candidate is simply faster."""


def judge_recommendation(
    seed_images_per_s: float | None, candidate_images_per_s: float | None, objective: str,
    efficiency: float = 1.0, baseline: str = "seed default", same_as_baseline: bool = False,
) -> Verdict:
    """The verdict on a tuning run from its end-to-end comparison.

    For ``throughput`` the candidate is only worth recommending when it trained faster
    than the seed default in the same run; for ``goodput``, when its images/s times its
    predicted statistical ``efficiency`` (relative to the seed default's batch) beats the
    seed default's images/s, i.e. more training progress per second. Otherwise (slower,
    equal, or not measurable) the seed default is what to train with, and the message
    says so. For ``memory`` the candidate was chosen for its size, not its speed, so it is
    kept and a slowdown is stated plainly. A seed default that could not run at all leaves
    the candidate. ``baseline`` names it in the messages (a workload's baseline label).
    ``same_as_baseline``: the candidate is the baseline's own configuration, so the two
    timings differ by the comparison's noise alone; it is kept, and said to be the same.
    """
    def usable(value: float | None) -> bool:
        return value is not None and math.isfinite(value) and value > 0

    if not usable(seed_images_per_s):
        return Verdict(True, None, "" if usable(candidate_images_per_s) else
                       f"neither the {baseline} nor the candidate could be timed end to end")
    if not usable(candidate_images_per_s):
        keep = objective == "memory"
        return Verdict(keep, None, "the candidate could not be timed end to end; "
                       + ("kept for --objective memory" if keep else f"the tuned file holds the {baseline}"))
    speedup = candidate_images_per_s * efficiency / seed_images_per_s
    if same_as_baseline:
        return Verdict(True, speedup, (
            f"the recommendation is the {baseline}'s own configuration: the measurements found "
            f"nothing faster, and the {speedup:.2f}x between two runs of it is the comparison's noise"
        ))
    if speedup > 1.0:
        return Verdict(True, speedup, "")
    if efficiency != 1.0:
        measured = (
            f"the candidate trained at {candidate_images_per_s:,.1f} images/s x {efficiency:.2f} "
            f"predicted efficiency, not more progress per second than the {baseline}'s "
            f"{seed_images_per_s:,.1f} images/s ({speedup:.2f}x)"
        )
    else:
        measured = (
            f"the candidate trained at {candidate_images_per_s:,.1f} images/s, not faster than the "
            f"{baseline}'s {seed_images_per_s:,.1f} ({speedup:.2f}x)"
        )
    if objective == "memory":
        return Verdict(True, speedup, f"{measured}; kept because --objective memory asks for the largest batch")
    return Verdict(False, speedup, f"{measured}: the tuned file holds the {baseline}; train with it")
