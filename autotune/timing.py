"""Adaptive timing: time a step until its images/s is known within a stated tolerance.

A fixed image budget is too long for a steady step and too short for a noisy one.
Here a measurement takes *samples* (each the wall time of ``steps_per_sample`` steps,
device synchronised at both ends) until the 95 % confidence interval of the mean
sample time is narrower than ``rel_ci`` of it, with a floor and a ceiling:

- floor: at least ``min_samples`` samples and ``min_seconds`` of timed work before a
  measurement may converge (five samples: below that, Student's t makes every interval
  wide and one outlier decides);
- ceiling: stop after ``max_samples`` samples or ``max_seconds`` of timed work
  (whichever first), recorded as not converged. The time ceiling gives way to the
  sample floor only down to ``min_slow_samples`` (3): a step so slow that five samples
  would overrun ``max_seconds`` (a large batch of a big model on a CPU, where one
  sample is a whole cycle of several-second steps) stops at three samples instead of
  costing five. Its interval is then wide, and says so in the table; a search reads
  it as "not clearly different".

Images/s is ``images_per_sample * n / sum(samples)`` (a mean rate: a training run pays
for its slow steps too, so no outlier is dropped); its relative interval is the
mean's, ``t(0.975, n - 1) * sd / sqrt(n) / mean`` (the delta method: 1/mean has the
same relative half-width to first order).

Learned from ``torch.utils.benchmark.Timer.adaptive_autorange``, which repeats blocks
of a statement until ``IQR / median < threshold`` (default 10 %) between a minimum and
a maximum run time, with a block size estimated so that the timer's own overhead is
negligible. Kept: blocks of steps (here sized so that a sample lasts at least
``min_sample_seconds``, which amortises a CUDA sync), a minimum count before any
verdict, and time bounds. Changed: the verdict is a confidence interval of the mean
rather than IQR/median, because a throughput is a mean and the interval is what the
table reports; and Timer runs a statement string, while a train step is a callable
with state (optimiser, scaler) that must not be rebuilt per block.

Caveat: samples from one run on a shared machine are correlated (another process's
burst slows several in a row), so the interval is a within-trial figure; the search
compares trials with it, and the floor on seconds spreads each measurement over time.

Nothing here imports torch: the device sync is an injected callable.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

__all__ = [
    "STOPS",
    "TimingConfig",
    "TimingResult",
    "relative_ci",
    "t_quantile_975",
    "time_adaptively",
    "timing_verdict",
]

#: Why a measurement stopped: its interval met the tolerance, or a ceiling came first.
STOPS = ("converged", "max_samples", "max_seconds")

# Student's t, two-sided 95 % (the 0.975 quantile), for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom.

    A table (3 decimals) up to 30; beyond, the Cornish-Fisher expansion around the
    normal quantile, within 1e-4 of the exact value there.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def relative_ci(samples_s: Sequence[float]) -> float | None:
    """Half-width of the 95 % confidence interval of the mean sample, relative to the
    mean; None with fewer than two samples (no spread to estimate)."""
    n = len(samples_s)
    if n < 2:
        return None
    mean = statistics.fmean(samples_s)
    if mean <= 0:
        return math.inf
    return t_quantile_975(n - 1) * statistics.stdev(samples_s) / math.sqrt(n) / mean


@dataclass
class TimingConfig:
    """When an adaptive measurement stops; validated here so a bad value fails early."""

    rel_ci: float = 0.03
    """Stop once the 95 % interval of images/s is within this fraction (0.03: +-3 %)."""
    min_samples: int = 5
    """Floor: never converged with fewer samples."""
    min_slow_samples: int = 3
    """Floor under the time ceiling: past ``max_seconds`` a measurement stops once it has
    this many samples (at most ``min_samples``), so that a slow step costs three samples,
    not five."""
    max_samples: int = 200
    """Ceiling on samples (recorded as ``max_samples`` when it stops the measurement)."""
    min_seconds: float = 0.5
    """Floor on timed seconds: a fast step is still observed over this long a window."""
    max_seconds: float = 20.0
    """Ceiling on timed seconds, applied once the sample floor is met."""
    min_sample_seconds: float = 0.02
    """A sample groups enough steps to last at least this long (by the warm-up's last
    step), so the clock and the device sync are a negligible share of it."""
    warmup_steps: int = 2
    """Untimed steps first: the first allocates optimiser state, picks kernels."""

    def __post_init__(self) -> None:
        _require(_is_number(self.rel_ci) and 0 < self.rel_ci < 1,
                 f"timing tolerance must be in (0, 1), got {self.rel_ci!r}")
        _require(_is_int(self.min_samples) and self.min_samples >= 2,
                 f"min samples must be an integer >= 2, got {self.min_samples!r}")
        _require(_is_int(self.min_slow_samples) and self.min_slow_samples >= 2,
                 f"min slow samples must be an integer >= 2, got {self.min_slow_samples!r}")
        _require(_is_int(self.max_samples) and self.max_samples >= self.min_samples,
                 f"max samples must be an integer >= min samples ({self.min_samples}), "
                 f"got {self.max_samples!r}")
        for name in ("min_seconds", "min_sample_seconds"):
            value = getattr(self, name)
            _require(_is_number(value) and 0 <= value < math.inf,
                     f"{name.replace('_', ' ')} must be a number >= 0, got {value!r}")
        _require(_is_number(self.max_seconds) and self.min_seconds <= self.max_seconds < math.inf,
                 f"max seconds must be a number >= min seconds ({self.min_seconds}), "
                 f"got {self.max_seconds!r}")
        _require(_is_int(self.warmup_steps) and self.warmup_steps >= 0,
                 f"warm-up steps must be an integer >= 0, got {self.warmup_steps!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def timing_verdict(samples_s: Sequence[float], cfg: TimingConfig) -> str | None:
    """One of :data:`STOPS` once the measurement should stop; None to take another sample."""
    n = len(samples_s)
    total = sum(samples_s)
    if n >= cfg.min_samples:
        if total >= cfg.min_seconds:
            ci = relative_ci(samples_s)
            if ci is not None and ci <= cfg.rel_ci:
                return "converged"
        if n >= cfg.max_samples:
            return "max_samples"
    if total >= cfg.max_seconds and n >= min(cfg.min_slow_samples, cfg.min_samples):
        return "max_seconds"
    return None


@dataclass
class TimingResult:
    """One adaptive measurement: the rate, its interval, and how it was obtained."""

    images_per_s: float
    rel_ci: float | None
    """Relative half-width of the 95 % interval of images/s (None: a single sample)."""
    stop: str
    """One of :data:`STOPS`: ``converged`` exactly when the interval met the tolerance."""
    steps: int
    """Timed steps (warm-up excluded)."""
    steps_per_sample: int
    seconds: float
    """Timed seconds (warm-up excluded)."""
    warmup_seconds: float
    samples_s: list[float] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return self.stop == "converged"

    def to_dict(self) -> dict:
        return asdict(self)


def time_adaptively(
    step: Callable[[], object],
    images_per_step: int,
    cfg: TimingConfig | None = None,
    *,
    sync: Callable[[], None] | None = None,
    steps_per_sample: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sample_multiple: int = 1,
) -> TimingResult:
    """Run ``step`` until its images/s is known within ``cfg.rel_ci`` (see the module).

    ``sync`` waits for the device (``torch.cuda.synchronize``); None on a CPU.
    ``sample_multiple``: the measurement stops only after a multiple of this many
    samples (a step whose work cycles through k variants, timed one step a sample
    because a whole cycle would be too long a sample, stops on whole cycles, so the
    rate is every variant's in equal parts).
    ``steps_per_sample`` None sizes a sample from the last warm-up step (at least
    ``cfg.min_sample_seconds``; one step without warm-up). ``clock`` is injectable
    for tests. An exception from ``step`` propagates (an OOM is the caller's to
    classify).
    """
    cfg = cfg or TimingConfig()
    if not (_is_int(images_per_step) and images_per_step >= 1):
        raise ValueError(f"images per step must be an integer >= 1, got {images_per_step!r}")
    wait = sync or (lambda: None)

    wait()
    warm_started = last_start = clock()
    last_step_s = 0.0
    for _ in range(cfg.warmup_steps):
        last_start = clock()
        step()
        wait()
        last_step_s = clock() - last_start
    warmup_seconds = clock() - warm_started if cfg.warmup_steps else 0.0
    if steps_per_sample is None:
        steps_per_sample = (max(1, math.ceil(cfg.min_sample_seconds / last_step_s))
                            if last_step_s > 0 else 1)
    elif not (_is_int(steps_per_sample) and steps_per_sample >= 1):
        raise ValueError(f"steps per sample must be an integer >= 1, got {steps_per_sample!r}")
    if not (_is_int(sample_multiple) and sample_multiple >= 1):
        raise ValueError(f"sample multiple must be an integer >= 1, got {sample_multiple!r}")

    samples: list[float] = []
    while True:
        start = clock()
        for _ in range(steps_per_sample):
            step()
        wait()
        samples.append(clock() - start)
        stop = timing_verdict(samples, cfg) if len(samples) % sample_multiple == 0 else None
        if stop is not None:
            break
    seconds = sum(samples)
    images = images_per_step * steps_per_sample * len(samples)
    return TimingResult(
        images_per_s=images / seconds if seconds > 0 else math.inf,
        rel_ci=relative_ci(samples),
        stop=stop,
        steps=steps_per_sample * len(samples),
        steps_per_sample=steps_per_sample,
        seconds=seconds,
        warmup_seconds=warmup_seconds,
        samples_s=samples,
    )


def _require(condition: bool, message: str) -> None:
    if not condition:
        from autotune.errors import ConfigError

        raise ConfigError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
