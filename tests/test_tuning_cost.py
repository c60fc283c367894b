"""What a tuning pays for: each cost cut of issue 12 (a trial measured once, worker and
comparison measurements sized by time, the loader's queue drained without training,
the noise phase bounded in seconds), each with a test that fails without it."""

from __future__ import annotations

import time

import pytest
import torch

from autotune.measure import training_images_per_s
from autotune.trial import TrialMeasurement

from test_wiring import cpu_tuner


class FakeLoader:
    """A DataLoader stand-in: ``num_workers`` x ``prefetch_factor`` batches were ready
    before anyone asked; every later batch takes ``batch_s`` to make."""

    def __init__(self, batches: int, batch: int, workers: int, prefetch: int, batch_s: float):
        self.num_workers, self.prefetch_factor = workers, prefetch
        self.batches, self.batch, self.batch_s = batches, batch, batch_s
        self.handed = 0

    def __iter__(self):
        ready = self.num_workers * self.prefetch_factor
        for i in range(self.batches):
            if i >= ready:
                time.sleep(self.batch_s)
            self.handed += 1
            yield torch.zeros(self.batch, 1)


class CountingStep:
    def __init__(self):
        self.calls = 0

    def to_device(self, batch):
        return batch

    def __call__(self, batch):
        self.calls += 1


def test_the_queue_is_drained_without_training_it():
    loader = FakeLoader(batches=20, batch=4, workers=2, prefetch=2, batch_s=0.0)
    step = CountingStep()
    training_images_per_s(step, loader, steps=5)
    # 4 queued batches thrown away, 2 warm-up steps, 5 timed steps.
    assert loader.handed == 4 + 2 + 5
    assert step.calls == 2 + 5


def test_a_loader_bound_pipeline_is_not_credited_with_its_queue():
    # The step is free, the loader makes a batch of 4 in 20 ms: 200 images/s, however
    # many batches were queued beforehand (8 here, more than the 5 timed).
    loader = FakeLoader(batches=40, batch=4, workers=4, prefetch=2, batch_s=0.02)
    rate = training_images_per_s(CountingStep(), loader, steps=5)
    assert rate == pytest.approx(200, rel=0.25)
    assert rate < 260  # timing the queue would have given thousands


def _trial(batch: int, ips: float) -> TrialMeasurement:
    return TrialMeasurement(batch=batch, ok=True, reason="ok", peak_bytes=2**20, images_per_s=ips,
                            seconds=1.0, images_per_s_rel_ci=0.01, timing_stop="converged")


def test_a_successful_trial_is_run_once_per_spec(tiny_data_dir, monkeypatch):
    tuner = cpu_tuner(tiny_data_dir)
    ran = []

    def execute(spec):
        ran.append((spec.batch, spec.precision))
        return _trial(spec.batch, 100.0)

    monkeypatch.setattr(tuner, "_execute", execute)
    tuner.trials_run = []
    first = tuner.trial(16, "bf16")
    again = tuner.trial(16, "bf16")
    tuner.trial(16, "fp32")
    assert ran == [(16, "bf16"), (16, "fp32")]
    assert again is first
    assert len(tuner.trials_run) == 2


def test_a_failed_trial_is_run_again(tiny_data_dir, monkeypatch):
    tuner = cpu_tuner(tiny_data_dir)
    ran = []

    def execute(spec):
        ran.append(spec.batch)
        return TrialMeasurement(batch=spec.batch, ok=False, reason="oom", peak_bytes=None,
                                images_per_s=None, seconds=1.0)

    monkeypatch.setattr(tuner, "_execute", execute)
    tuner.trials_run = []
    tuner.trial(64, "fp32")
    tuner.trial(64, "fp32")
    assert ran == [64, 64]


def test_measurements_are_sized_by_the_step_time_the_trials_saw(tiny_data_dir):
    tuner = cpu_tuner(tiny_data_dir, measure_images=512, measure_seconds=3.0)
    tuner.trials_run = []
    # No trial yet: the image budget alone (512 / 16 = 32, capped at 10).
    assert tuner.steps_for(16, 10) == 10
    # 35 images/s at batch 64 (1.8 s a step): 3 s buys 2 steps, and two steps already
    # take the time budget, so the floor is 2, not 3. At 20 images/s (3.2 s a step) one
    # step would, but one step is no measurement: 2.
    tuner.trials_run = [_trial(64, 35.0), _trial(8, 400.0)]
    assert tuner.steps_for(64, 10) == 2
    tuner.trials_run = [_trial(64, 20.0), _trial(8, 400.0)]
    assert tuner.steps_for(64, 10) == 2
    # The image budget alone (512 / 512 = 1) does not lower the floor: fast steps, 3.
    tuner.trials_run = [_trial(512, 4000.0)]
    assert tuner.steps_for(512, 10) == 3
    tuner.trials_run = [_trial(64, 35.0), _trial(8, 400.0)]
    # Batch 16 is nearer 8 than 64 by ratio (2x vs 4x): 400 images/s, 3 s = 75 steps,
    # so the image budget (32) and max steps (10) decide.
    assert tuner.steps_for(16, 10) == 10
    # Batch 32 is nearer 64 (2x) than 8 (4x): 35 images/s, 3 s x 35 / 32 = 3.3 -> 4 steps.
    assert tuner.steps_for(32, 10) == 4


def test_the_noise_phase_stops_on_its_time_budget(tiny_data_dir, monkeypatch):
    import autotune.tuner as tuner_module

    tuner = cpu_tuner(tiny_data_dir, noise_steps=50, noise_seconds=0.01)
    clock = iter(range(1000))
    monkeypatch.setattr(tuner_module.time, "perf_counter", lambda: float(next(clock)))
    record = tuner.measure_noise("fp32")
    assert record["steps"] == tuner_module.NOISE_MIN_STEPS
    assert record["steps_asked"] == 50
    assert record["measured_at_step"] == tuner_module.NOISE_MIN_STEPS


@pytest.mark.parametrize("field", ["measure_seconds", "noise_seconds"])
@pytest.mark.parametrize("value", [0, -1.0, float("inf"), "3", True])
def test_time_budgets_are_validated(field, value):
    from autotune.errors import ConfigError
    from autotune.tuner import TuneConfig

    with pytest.raises(ConfigError, match=field.replace("_", " ")):
        TuneConfig(**{field: value})
