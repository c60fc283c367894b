"""Adaptive timing: the stopping criterion on hand-made samples, the helper on a fake
clock (exact step counts), and one tiny real measurement (no wall-clock assert)."""

from __future__ import annotations

import itertools
import math

import pytest

from autotune.timing import (
    STOPS,
    TimingConfig,
    relative_ci,
    t_quantile_975,
    time_adaptively,
    timing_verdict,
)


class FakeClock:
    """Time moves only when a fake step runs; durations are powers of two (exact sums)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_step(clock: FakeClock, durations):
    durations = iter(durations)
    calls = []

    def step() -> None:
        calls.append(1)
        clock.now += next(durations)

    step.calls = calls
    return step


@pytest.mark.parametrize("df,expected", [
    # Published two-sided 95 % t values.
    (1, 12.706), (4, 2.776), (30, 2.042), (31, 2.0395), (100, 1.9840), (1000, 1.9623),
])
def test_t_quantile(df, expected):
    assert t_quantile_975(df) == pytest.approx(expected, abs=2e-4)


def test_relative_ci_by_hand():
    # mean 1.0, sd sqrt(0.02 / 4) = 0.070711; 2.776 * 0.070711 / sqrt(5) = 0.087785
    assert relative_ci([1.0, 1.1, 0.9, 1.0, 1.0]) == pytest.approx(0.087785, abs=2e-6)
    assert relative_ci([0.5]) is None
    assert relative_ci([0.25, 0.25]) == 0.0


def test_verdict_floors_then_tolerance_then_ceilings():
    cfg = TimingConfig(min_samples=5, min_seconds=1.0, max_seconds=3.0, max_samples=10)
    assert timing_verdict([0.25] * 4, cfg) is None                     # below 5 samples
    assert timing_verdict([0.125] * 5, cfg) is None                    # 0.625 s < 1 s
    assert timing_verdict([0.125] * 8, cfg) == "converged"             # 1 s, zero spread
    assert timing_verdict([0.25] * 3 + [0.5, 0.5], cfg) is None        # 1.75 s, +-49 %
    assert timing_verdict([0.25] * 4 + [0.5] * 4, cfg) == "max_seconds"  # 3 s, not converged
    assert timing_verdict([0.0625, 0.125] * 5, cfg) == "max_samples"  # 10 samples, 0.94 s


@pytest.mark.parametrize("step_s,expect_sps,expect_samples", [
    # 1/8 s steps: one step per sample; 5 samples make the 0.5 s floor, zero spread.
    (0.125, 1, 5),
    # 1/128 s steps: ceil(0.02 / 0.0078125) = 3 steps a sample (0.0234375 s);
    # 0.5 s needs ceil(0.5 / 0.0234375) = 22 samples.
    (0.0078125, 3, 22),
])
def test_steady_step_converges_at_the_floor(step_s, expect_sps, expect_samples):
    clock = FakeClock()
    step = fake_step(clock, itertools.repeat(step_s))
    result = time_adaptively(step, images_per_step=16, clock=clock)
    assert result.stop == "converged" and result.converged
    assert result.steps_per_sample == expect_sps
    assert len(result.samples_s) == expect_samples
    assert result.steps == expect_sps * expect_samples
    assert len(step.calls) == 2 + result.steps  # warm-up untimed
    assert result.rel_ci == 0.0
    assert result.images_per_s == pytest.approx(16 / step_s)
    assert result.warmup_seconds == pytest.approx(2 * step_s)


def test_noisy_step_stops_at_the_time_ceiling():
    # Alternating 1/8 s and 1/4 s never narrows to 3 %: 107 samples reach 20 s exactly
    # (54 x 0.125 + 53 x 0.25), 106 do not (19.875 s).
    clock = FakeClock()
    step = fake_step(clock, itertools.chain([1.0, 0.125], itertools.cycle([0.125, 0.25])))
    result = time_adaptively(step, images_per_step=8, clock=clock)
    assert result.stop == "max_seconds" and not result.converged
    assert result.steps_per_sample == 1
    assert result.steps == 107
    assert result.seconds == 20.0
    assert result.images_per_s == pytest.approx(8 * 107 / 20.0)
    assert result.rel_ci > 0.03


def test_slow_step_stops_at_three_samples_past_the_time_ceiling():
    # 8 s and 16 s steps: the 20 s ceiling passes at the second sample (24 s); the slow
    # floor asks for a third (32 s), not the five a converged measurement needs.
    clock = FakeClock()
    step = fake_step(clock, itertools.chain([8.0, 8.0], itertools.cycle([16.0, 8.0])))
    result = time_adaptively(step, images_per_step=4, clock=clock)
    assert (result.stop, result.steps, result.seconds) == ("max_seconds", 3, 40.0)
    assert result.rel_ci is not None and result.rel_ci > 0.03


def test_verdict_slow_floor():
    cfg = TimingConfig(min_samples=5, min_seconds=0.0, max_seconds=3.0)
    assert timing_verdict([2.0, 2.0], cfg) is None              # past 3 s, but 2 samples
    assert timing_verdict([2.0, 2.0, 2.0], cfg) == "max_seconds"  # never "converged" below 5
    assert timing_verdict([0.5, 0.5, 0.5], cfg) is None          # 3 samples, 1.5 s: go on
    assert timing_verdict([1.0] * 5, cfg) == "converged"
    strict = TimingConfig(min_samples=5, min_slow_samples=5, max_seconds=3.0)
    assert timing_verdict([2.0, 2.0, 2.0], strict) is None      # the old floor, on request


def test_sync_runs_before_each_clock_reading():
    clock = FakeClock()
    syncs = []
    step = fake_step(clock, itertools.repeat(0.125))
    result = time_adaptively(step, images_per_step=1, clock=clock, sync=lambda: syncs.append(1),
                             steps_per_sample=2)
    # once before warm-up, after each of the 2 warm-up steps, after each sample
    assert len(syncs) == 1 + 2 + len(result.samples_s)
    assert result.steps_per_sample == 2


@pytest.mark.parametrize("kwargs", [
    {"rel_ci": 0}, {"rel_ci": 1.5}, {"min_samples": 1}, {"max_samples": 3},
    {"min_seconds": -1.0}, {"max_seconds": 0.1}, {"warmup_steps": -1},
    {"min_slow_samples": 1}, {"min_slow_samples": 2.5},
    {"max_seconds": math.inf},
])
def test_config_is_validated(kwargs):
    with pytest.raises(ValueError):
        TimingConfig(**kwargs)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="images per step"):
        time_adaptively(lambda: None, images_per_step=0)
    with pytest.raises(ValueError, match="steps per sample"):
        time_adaptively(lambda: None, images_per_step=1, steps_per_sample=0)


def test_one_tiny_real_measurement():
    torch = pytest.importorskip("torch")
    layer = torch.nn.Linear(16, 16)
    inputs = torch.randn(8, 16)

    def step() -> None:
        layer(inputs).sum().backward()

    cfg = TimingConfig(min_seconds=0.05, max_seconds=0.5, rel_ci=0.2)
    result = time_adaptively(step, images_per_step=8, cfg=cfg)
    assert result.stop in STOPS
    assert result.steps == result.steps_per_sample * len(result.samples_s)
    assert len(result.samples_s) >= cfg.min_samples
    assert result.images_per_s > 0 and result.rel_ci is not None
    assert set(result.to_dict()) >= {"images_per_s", "rel_ci", "stop", "steps", "seconds"}


def test_one_step_samples_stop_on_whole_cycles():
    # 2 s steps, 4 s ceiling, a 3-variant cycle timed one step a sample: 2 samples pass
    # the ceiling but are 2 of 3 variants; the measurement stops at 3 (a whole cycle),
    # 6 s of timed work, not the 3 samples of 3 steps (18 s) of whole-cycle samples.
    clock = FakeClock()
    step = fake_step(clock, itertools.repeat(2.0))
    cfg = TimingConfig(max_seconds=4.0, warmup_steps=0)
    result = time_adaptively(step, images_per_step=64, cfg=cfg, clock=clock, steps_per_sample=1,
                             sample_multiple=3)
    assert (result.stop, result.steps, result.seconds) == ("max_seconds", 3, 6.0)
    # A steady step converges at the first whole cycle past the 5-sample floor: 6.
    clock = FakeClock()
    step = fake_step(clock, itertools.repeat(0.125))
    result = time_adaptively(step, images_per_step=8, cfg=TimingConfig(warmup_steps=0), clock=clock,
                             steps_per_sample=1, sample_multiple=3)
    assert (result.stop, result.steps) == ("converged", 6)


@pytest.mark.parametrize("multiple", [0, -1, 1.5])
def test_sample_multiple_is_validated(multiple):
    with pytest.raises(ValueError, match="sample multiple"):
        time_adaptively(lambda: None, 1, steps_per_sample=1, sample_multiple=multiple)


@pytest.mark.parametrize("step_s,cycle,expected", [
    (0.1, 3, (3, 1)),    # fast: whole cycles a sample (0.3 s >= 20 ms)
    (0.005, 3, (6, 1)),  # very fast: 4 steps for 20 ms, rounded up to 2 cycles
    (1.9, 3, (1, 3)),    # slow: 3 x 1.9 x 3 samples > 4 s: one step a sample, whole cycles
    (1.9, 1, (1, 1)),    # no cycle: one step a sample
])
def test_trial_sampling_by_the_warm_up_step(step_s, cycle, expected, monkeypatch):
    import autotune.trial as trial_module

    now = [0.0]
    monkeypatch.setattr(trial_module.time, "perf_counter", lambda: now[0])

    def step():
        now[0] += step_s

    cfg = TimingConfig(max_seconds=4.0, warmup_steps=cycle)
    assert trial_module._warm_up(step, cycle, cfg, None) == expected
