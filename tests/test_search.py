"""Batch-size search driven by fake trials: exact sequences of batches, written by hand.

Units: GB = 1e9 bytes, so a model "1 GB + 100 MB per sample" is easy to check on paper.
"""

from __future__ import annotations

import random

import pytest

from arwgan.errors import ConfigError
from autotune.search import (
    Score,
    SearchConfig,
    SearchError,
    SearchResult,
    TrialOutcome,
    choose_batch,
    clearly_below,
    fit_peak_memory,
    plateau_reached,
    peak_passed,
    resolution,
    runoff_batches,
    runoff_label,
    runoff_winner,
    search_batch,
)

GB = 10**9
OOM_TEXT = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)"


def gb(x: float) -> int:
    return int(round(x * GB))


def linear(fixed_gb: float, per_sample_gb: float):
    return lambda b: gb(fixed_gb + per_sample_gb * b)


def _value(source, batch):
    if source is None:
        return None
    if isinstance(source, dict):
        return source[batch]  # an unplanned batch fails the test with a KeyError
    return source(batch)


class FakeTrial:
    """A trial that records the batches asked for.

    ``peaks``/``ips``/``seconds``/``ci`` are a dict (batch -> value), a function of the
    batch, or None (not measured). Above ``oom_above`` the trial reports an OOM with no
    peak. ``ci`` is the relative 95 % half-width of the images/s.
    """

    def __init__(self, peaks=None, oom_above=None, ips=float, seconds=0.01, ci=None):
        self.peaks = peaks
        self.oom_above = oom_above
        self.ips = ips
        self.seconds = seconds
        self.ci = ci
        self.calls: list[int] = []

    def __call__(self, batch: int) -> TrialOutcome:
        self.calls.append(batch)
        seconds = self.seconds if isinstance(self.seconds, float) else _value(self.seconds, batch)
        if self.oom_above is not None and batch > self.oom_above:
            return TrialOutcome(batch, False, None, None, seconds, "oom", OOM_TEXT)
        peak, ips = _value(self.peaks, batch), _value(self.ips, batch)
        return TrialOutcome(batch, True, peak, ips, seconds, "ok",
                            images_per_s_rel_ci=_value(self.ci, batch))


def run(trial: FakeTrial, **cfg) -> SearchResult:
    cfg.setdefault("target_bytes", 80 * GB)
    result = search_batch(trial, SearchConfig(**cfg))
    assert [t.batch for t in result.trials] == trial.calls
    return result


def predicted(result: SearchResult) -> list[int]:
    return [t.batch for t in result.trials if t.predicted]


# (a) a plain OOM threshold ------------------------------------------------------------

PLAIN_OOM_100 = [1, 2, 4, 8, 16, 32, 64, 128, 96, 112, 104, 100]


def test_oom_threshold_without_fit():
    # 128 fails; bisect 64..128: 96 ok, 112 oom, 104 oom, 100 ok; 104 - 100 <= resolution(100) = 5.
    trial = FakeTrial(oom_above=100)
    result = run(trial, use_fit=False)
    assert trial.calls == PLAIN_OOM_100
    assert result.chosen == 100
    assert result.stop_reason == "hit target between 100 and 104 (batch 104: oom)"
    assert [t.reason for t in result.trials if not t.ok] == ["oom", "oom", "oom"]
    assert predicted(result) == []


def test_oom_threshold_with_fit_far_from_target_changes_nothing():
    # 1 GB + 10 MB/sample under an 80 GB target predicts b* = 7900: never inside a bracket.
    trial = FakeTrial(peaks=linear(1, 0.01), oom_above=100)
    result = run(trial, use_fit=True)
    assert trial.calls == PLAIN_OOM_100
    assert predicted(result) == []
    assert result.fit == pytest.approx((1e9, 1e7))


def test_oom_threshold_without_peak_readings_has_no_fit():
    trial = FakeTrial(peaks=None, oom_above=100)
    result = run(trial, use_fit=True)
    assert trial.calls == PLAIN_OOM_100
    assert result.fit is None


def test_failed_prediction_falls_back_to_bisection():
    # 1 GB + 100 MB/sample, target 12 GB: b* = 110, inside (64, 128), so 110 is tried
    # instead of 128, and OOMs (the device runs out at 100 before the target).
    # Plain bisection of 64..110 follows: 87 ok, 98 ok, 104 oom, 101 oom; 101 - 98 <= 5.
    trial = FakeTrial(peaks=linear(1, 0.1), oom_above=100)
    result = run(trial, target_bytes=12 * GB, objective="memory")
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 110, 87, 98, 104, 101]
    assert predicted(result) == [110]
    assert result.chosen == 98


def test_start_above_one():
    trial = FakeTrial(oom_above=50)
    result = run(trial, start=3, use_fit=False)
    assert trial.calls == [3, 6, 12, 24, 48, 96, 72, 60, 54, 51, 49, 50]
    assert result.chosen == 50


# (b) memory model hitting the target between two powers of two -------------------------

def test_fit_predicts_target_between_powers_of_two():
    # 1 GB + 100 MB/sample, target 8 GB: b* = 70 exactly. Growth jumps from 64 to 70
    # (< 128) and confirms with 70 + resolution(70) = 74, which is over the target.
    trial = FakeTrial(peaks=linear(1, 0.1))
    result = run(trial, target_bytes=8 * GB, objective="memory")
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 70, 74]
    assert predicted(result) == [70, 74]
    assert result.chosen == 70
    assert result.stop_reason == "hit target between 70 and 74 (batch 74: over_target)"
    seventy = result.trials[7]
    assert seventy.ok and seventy.peak_bytes == 8 * GB  # exactly at the target still fits
    over = result.trials[8]
    assert (over.ok, over.reason, over.peak_bytes) == (False, "over_target", gb(8.4))
    assert over.detail == "peak 7.82 GiB above the target 7.45 GiB"
    assert result.fit == pytest.approx((1e9, 1e8))


def test_same_model_without_fit_bisects():
    # 128 over; 96 over, 80 over, 72 over (8.2 GB), 68 ok; 72 - 68 <= resolution(68) = 4.
    trial = FakeTrial(peaks=linear(1, 0.1))
    result = run(trial, target_bytes=8 * GB, objective="memory", use_fit=False)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 128, 96, 80, 72, 68]
    assert predicted(result) == []
    assert result.chosen == 68


def test_search_records_a_copy_for_over_target():
    returned: list[TrialOutcome] = []
    fake = FakeTrial(peaks=linear(1, 0.1))

    def trial(batch: int) -> TrialOutcome:
        returned.append(fake(batch))
        return returned[-1]

    result = search_batch(trial, SearchConfig(target_bytes=8 * GB))
    assert returned[-1].ok and returned[-1].reason == "ok"
    assert not result.trials[-1].ok and result.trials[-1].reason == "over_target"


def test_confirmed_edge_further_out_distrusts_the_fit():
    # Linear up to 64 predicts 70; 70 and the confirmation 74 both fit (memory flattens),
    # so the fit was wrong once and is not used again. A trusted refit would propose 77
    # next; instead growth doubles to 148, then bisects 74..148 plainly.
    peaks = {b: gb(1 + 0.1 * b) for b in (1, 2, 4, 8, 16, 32, 64)}
    peaks.update({70: gb(7.2), 74: gb(7.3), 148: gb(15), 111: gb(8.6), 92: gb(7.9),
                  101: gb(8.1), 96: gb(8.0)})
    trial = FakeTrial(peaks=peaks)
    result = run(trial, target_bytes=8 * GB, objective="memory")
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 70, 74, 148, 111, 92, 101, 96]
    assert predicted(result) == [70, 74]
    assert result.chosen == 96
    assert result.stop_reason == "hit target between 96 and 101 (batch 101: over_target)"


# (c) the first trial fails ---------------------------------------------------------------

def test_oom_at_first_trial_raises():
    trial = FakeTrial(oom_above=0)
    expected = r"^batch 1 does not fit: oom: CUDA out of memory\. Tried"
    with pytest.raises(SearchError, match=expected) as info:
        run(trial)
    assert trial.calls == [1]
    assert info.value.outcome.reason == "oom"
    assert isinstance(info.value, RuntimeError)


def test_over_target_at_first_trial_raises():
    trial = FakeTrial(peaks=linear(1, 0.1))
    with pytest.raises(SearchError) as info:
        run(trial, start=8, target_bytes=2 * GB, margin_bytes=gb(0.5))
    assert str(info.value) == (
        "batch 8 does not fit: over_target: peak 1.68 GiB above the limit 1.4 GiB "
        "(target 1.86 GiB - margin 477 MiB)"
    )
    assert trial.calls == [8]


# (d) the target is never reached -----------------------------------------------------------

@pytest.mark.parametrize("use_fit", [False, True])
def test_stops_at_max_batch(use_fit):
    trial = FakeTrial(peaks=linear(1, 0.001))
    result = run(trial, max_batch=256, use_fit=use_fit)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert result.chosen == 256
    assert result.stop_reason == "reached max batch 256"


def test_max_batch_not_a_power_of_two_is_clamped():
    trial = FakeTrial()
    result = run(trial, max_batch=200)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 128, 200]
    assert result.stop_reason == "reached max batch 200"


def test_start_equal_to_max_batch_is_one_trial():
    trial = FakeTrial()
    result = run(trial, start=32, max_batch=32)
    assert trial.calls == [32]
    assert result.chosen == 32


# (e) noisy, non-monotonic memory readings ------------------------------------------------------

def test_noisy_readings_with_non_positive_slope_ignore_the_fit():
    # Readings shrink as the batch grows (allocator caching): every fit has slope <= 0
    # (checked on paper), so nothing is predicted and the device's OOM above 40 decides.
    peaks = {1: gb(3.0), 2: gb(2.9), 4: gb(2.9), 8: gb(2.8), 16: gb(2.9), 32: gb(2.7), 40: gb(2.6)}
    trial = FakeTrial(peaks=peaks, oom_above=40)
    result = run(trial, target_bytes=8 * GB)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 48, 40, 44, 42, 41]
    assert predicted(result) == []
    assert result.fit is None
    assert result.chosen == 40


def test_jittered_readings_terminate_and_bracket():
    # Model about 1 GB + 100 MB/sample with jitter; batch 2 and batch 8 read lower than
    # the batch before them. Fits (worked out by hand, target 8 GB):
    #   after 1, 2: slope < 0, no prediction; after 4: b* = 64, not in (4, 8);
    #   after 8: b* = 145; after 16: b* = 63, not in (16, 32); after 32: b* = 73, not in (32, 64).
    # 64 reads 8.4 GB: over. Bracket 32..64, b* = 73 outside: midpoint 48 (7.0 GB, ok).
    # Refit: b* = 60, inside (48, 64): tried (7.7 GB ok), confirmed at 61 (7.8 GB ok):
    # the edge is further out than predicted, so plain bisection: 62 (8.2 GB) over.
    peaks = {1: gb(1.4), 2: gb(0.9), 4: gb(1.6), 8: gb(1.5), 16: gb(2.9), 32: gb(4.0),
             64: gb(8.4), 48: gb(7.0), 60: gb(7.7), 61: gb(7.8), 62: gb(8.2)}
    trial = FakeTrial(peaks=peaks)
    result = run(trial, target_bytes=8 * GB, objective="memory")
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 48, 60, 61, 62]
    assert predicted(result) == [60, 61]
    assert len(set(trial.calls)) == len(trial.calls)
    assert result.chosen == 61
    assert result.stop_reason == "hit target between 61 and 62 (batch 62: over_target)"
    fixed, per_sample = result.fit
    assert per_sample > 0


@pytest.mark.parametrize("use_fit", [False, True])
@pytest.mark.parametrize("start,max_batch", [(1, 4096), (3, 256)])
def test_invariants_over_many_limits(use_fit, start, max_batch):
    """Never repeat, never exceed max_batch or max_trials, bracket the edge when closed."""
    rng = random.Random(1234)
    for oom_above in range(start, 400, 3):
        def peak(b):  # jittered linear memory, so the fit is noisy but usable
            return gb(0.5 + 0.05 * b + rng.uniform(-0.3, 0.3))

        trial = FakeTrial(peaks=peak, oom_above=oom_above)
        result = run(trial, start=start, max_batch=max_batch, target_bytes=12 * GB,
                     objective="memory", use_fit=use_fit)
        calls = trial.calls
        assert len(set(calls)) == len(calls)
        assert max(calls) <= max_batch and len(calls) <= 20
        ok = [t.batch for t in result.trials if t.ok]
        failed = [t.batch for t in result.trials if not t.ok]
        assert result.chosen == max(ok)
        if failed:
            assert max(ok) < min(failed)
        if result.stop_reason.startswith("hit target"):
            assert min(failed) - max(ok) <= resolution(max(ok))
        else:
            assert result.stop_reason in ("reached max batch 256", "trial budget exhausted (20 trials)")


# (f) the trial cap ----------------------------------------------------------------------------

def test_max_trials_caps_the_search():
    trial = FakeTrial(oom_above=100)
    result = run(trial, use_fit=False, max_trials=9)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 128, 96]
    assert result.stop_reason == "trial budget exhausted (9 trials)"
    assert result.chosen == 96


def test_single_trial():
    trial = FakeTrial()
    result = run(trial, max_trials=1)
    assert trial.calls == [1]
    assert result.chosen == 1
    assert result.stop_reason == "trial budget exhausted (1 trials)"


# (g) the time budget ---------------------------------------------------------------------------

def test_slow_success_stops_growth_and_is_kept():
    # (--find-edge: no look-ahead, the budget acts on trials that ran.)
    trial = FakeTrial(seconds=lambda b: b / 100)
    result = run(trial, trial_time_budget_s=1.0, find_edge=True)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 128]
    assert result.stop_reason == "trial at batch 128 took 1.28 s > budget 1 s"
    assert result.trials[-1].ok and result.trials[-1].reason == "ok"
    assert result.chosen == 128


def test_slow_failure_does_not_stop_bisection_but_slow_success_does():
    # 128 OOMs after 1.28 s: only a failure, later trials are smaller. 96 fits but takes
    # 0.96 s > 0.9 s: the next trial (112) would be larger still, so the search ends.
    trial = FakeTrial(oom_above=100, seconds=lambda b: b / 100)
    result = run(trial, use_fit=False, trial_time_budget_s=0.9, find_edge=True)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 128, 96]
    assert result.stop_reason == "trial at batch 96 took 0.96 s > budget 0.9 s"
    assert result.chosen == 96


def test_a_trial_predicted_over_budget_is_not_started():
    # Past-the-peak searches look ahead: 64 took 0.64 s, so 128 would take about 1.28 s
    # x 1.25 (the margin) = 1.6 s > 1.5 s; the search ends with 64 and never pays for 128.
    trial = FakeTrial(seconds=lambda b: b / 100)
    result = run(trial, trial_time_budget_s=1.5)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64]
    assert result.stop_reason == "batch 128 would take about 1.6 s > budget 1.5 s (batch 64 took 0.64 s)"
    assert result.chosen == 64
    # Bisection looks ahead from the largest success below: trials take 0.2 s up to 64,
    # so 128 (predicted 0.5 s) runs and OOMs; 96 (predicted 0.375 s) fits but takes
    # 0.96 s; 112, predicted 0.96 x 112/96 x 1.25 = 1.4 s from 96, is not started.
    trial = FakeTrial(oom_above=100, seconds=lambda b: 0.2 if b <= 64 else b / 100)
    result = run(trial, use_fit=False, trial_time_budget_s=1.0, max_batch=128)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 128, 96]
    assert result.stop_reason.startswith("batch 112 would take about 1.4 s > budget 1 s")
    assert result.chosen == 96



# (g2) cut short before the curve turned down: the batch growth would have tried next -------------------

def test_a_search_cut_short_before_the_curve_turned_names_the_next_batch():
    # images/s still rising at 64 when the look-ahead stops 128: the answer may lie
    # above, so the result names 128 (1 GB + 0.1 GB/sample: 7.4 GB at 64, at most
    # 14.8 GB at 128, under the 80 GB target) for the tuner's runoff. Never run here.
    trial = FakeTrial(peaks=linear(1, 0.1), seconds=lambda b: b / 100)
    result = run(trial, trial_time_budget_s=1.5)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64]
    assert result.stop_reason.startswith("batch 128 would take about 1.6 s")
    assert (result.chosen, result.untried) == (64, 128)
    # A slow success ends the growth the same way (without the look-ahead, which only
    # past-the-peak searches use); so does the trial count.
    trial = FakeTrial(peaks=linear(1, 0.1), seconds=lambda b: b / 100)
    result = run(trial, trial_time_budget_s=0.5, find_edge=True)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64]
    assert result.stop_reason == "trial at batch 64 took 0.64 s > budget 0.5 s"
    assert result.untried == 128
    trial = FakeTrial(peaks=linear(1, 0.1))
    result = run(trial, max_trials=5)
    assert trial.calls == [1, 2, 4, 8, 16]
    assert result.stop_reason == "trial budget exhausted (5 trials)"
    assert result.untried == 32
    # Clamped at max_batch, like growth.
    trial = FakeTrial(peaks=linear(1, 0.1), seconds=lambda b: b / 100)
    result = run(trial, trial_time_budget_s=1.0, max_batch=96)
    assert result.stop_reason.startswith("batch 96 would take about 1.2 s")
    assert result.untried == 96


def test_no_next_batch_when_the_curve_decides_or_memory_may_not_fit():
    cut = dict(peaks=linear(1, 0.1), seconds=lambda b: b / 100)
    # The curve turned down at the largest batch tried (64 clearly below 32): nothing
    # points up. A dip within the noise (690 against 700, within 3 %) has not turned it.
    dipped = {1: 10.0, 2: 20.0, 4: 40.0, 8: 80.0, 16: 160.0, 32: 700.0, 64: 650.0}
    result = run(FakeTrial(ips=dipped, **cut), trial_time_budget_s=1.5)
    assert (result.chosen, result.untried) == (32, None)
    result = run(FakeTrial(ips={**dipped, 64: 690.0}, **cut), trial_time_budget_s=1.5)
    assert (result.chosen, result.untried) == (64, 128)
    # 7 % below, but the intervals (+-5 % each) overlap: within noise too.
    result = run(FakeTrial(ips=dipped, ci=lambda b: 0.05, **cut), trial_time_budget_s=1.5)
    assert (result.chosen, result.untried) == (64, 128)
    # The upper bound on 128's peak (2 x 7.4 GB) is over the limit (12 GB): not named,
    # even though the fit (1 + 0.1 x 128 = 13.8 GB) would say the same.
    result = run(FakeTrial(**cut), trial_time_budget_s=1.5, use_fit=False, target_bytes=gb(12))
    assert [t.batch for t in result.trials][-1] == 64 and result.untried is None
    # No peak reading at the largest batch: no bound, no name.
    result = run(FakeTrial(seconds=lambda b: b / 100), trial_time_budget_s=1.5)
    assert result.untried is None
    # The curve, not time, ended it: max batch reached, a failure, the memory objective.
    assert run(FakeTrial(peaks=linear(1, 0.1)), max_batch=64).untried is None
    result = run(FakeTrial(peaks=linear(1, 0.1), oom_above=100, seconds=lambda b: b / 100),
                 use_fit=False, trial_time_budget_s=0.9, find_edge=True)
    assert result.stop_reason.startswith("trial at batch 96") and result.untried is None
    result = run(FakeTrial(**cut), trial_time_budget_s=0.5, find_edge=True, objective="memory")
    assert result.stop_reason.startswith("trial at batch 64") and result.untried is None


def test_the_next_batch_survives_the_record():
    result = run(FakeTrial(peaks=linear(1, 0.1)), max_trials=5)
    data = result.to_dict()
    assert data["untried"] == 32
    assert SearchResult.from_dict(data).untried == 32
    del data["untried"]  # a tuned file written before it existed
    assert SearchResult.from_dict(data).untried is None

# (h) objective: throughput vs memory -------------------------------------------------------------

SATURATING_IPS = {1: 50.0, 2: 95.0, 4: 180.0, 8: 320.0, 16: 500.0, 32: 640.0,
                  64: 700.0, 96: 690.0, 100: 675.0}


def test_throughput_objective_picks_largest_within_tolerance():
    # Best 700 images/s at 64; 3 % below is 679: 96 (690) qualifies, 100 (675) does not.
    trial = FakeTrial(oom_above=100, ips=SATURATING_IPS)
    result = run(trial, use_fit=False, objective="throughput")
    assert trial.calls == PLAIN_OOM_100
    assert result.chosen == 96


def test_memory_objective_picks_largest_success():
    trial = FakeTrial(oom_above=100, ips=SATURATING_IPS)
    result = run(trial, use_fit=False, objective="memory")
    assert result.chosen == 100


def test_choose_batch_rules():
    trials = [TrialOutcome(b, True, None, SATURATING_IPS[b], 0.1, "ok") for b in (16, 64, 96, 100)]
    trials.append(TrialOutcome(128, False, None, None, 0.1, "oom"))
    assert choose_batch(trials, "throughput", 0.03) == 96
    assert choose_batch(trials, "throughput", 0.0) == 64
    assert choose_batch(trials, "throughput", 0.5) == 100
    assert choose_batch(trials, "memory", 0.03) == 100
    untimed = [TrialOutcome(b, True, None, None, 0.1, "ok") for b in (8, 16)]
    assert choose_batch(untimed, "throughput", 0.03) == 16
    with pytest.raises(ValueError, match="no successful trial"):
        choose_batch(trials[-1:], "memory", 0.03)
    with pytest.raises(ConfigError, match="objective"):
        choose_batch(trials, "speed", 0.03)


# (i) resolution --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "batch,expected",
    [(1, 1), (63, 1), (64, 4), (80, 4), (81, 5), (100, 5), (101, 6), (120, 6), (140, 7),
     (992, 50), (1000, 50)],
)
def test_resolution(batch, expected):
    assert resolution(batch) == expected


def test_bisection_above_64_stops_at_five_percent():
    # 512..1024: 768, 896, 960, 992 all fit; 1024 - 992 = 32 <= resolution(992) = 50.
    trial = FakeTrial(oom_above=1000)
    result = run(trial, use_fit=False)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 768, 896, 960, 992]
    assert result.chosen == 992
    assert result.stop_reason == "hit target between 992 and 1024 (batch 1024: oom)"


def test_bisection_below_64_is_exact():
    trial = FakeTrial(oom_above=45)
    result = run(trial, use_fit=False)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 48, 40, 44, 46, 45]
    assert result.chosen == 45


# (j) margin ---------------------------------------------------------------------------------------

def test_without_margin_the_target_itself_is_the_limit():
    # Target 8.5 GB: b* = 75 (8.5 GB, fits), confirmation 79 (8.9 GB) does not.
    trial = FakeTrial(peaks=linear(1, 0.1))
    result = run(trial, target_bytes=gb(8.5), objective="memory")
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 75, 79]
    assert result.chosen == 75


def test_margin_lowers_the_limit():
    # Target 8.5 GB - margin 0.5 GB = the 8 GB limit of the b* = 70 case above.
    trial = FakeTrial(peaks=linear(1, 0.1))
    result = run(trial, target_bytes=gb(8.5), margin_bytes=gb(0.5), objective="memory")
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 70, 74]
    assert result.chosen == 70
    assert result.trials[-1].detail == (
        "peak 7.82 GiB above the limit 7.45 GiB (target 7.92 GiB - margin 477 MiB)"
    )


# Records, config validation, fit ----------------------------------------------------------------

def test_trial_must_answer_for_the_batch_asked():
    with pytest.raises(ValueError, match="asked for batch 1 returned an outcome for batch 2"):
        search_batch(lambda b: TrialOutcome(2, True, None, None, 0.1, "ok"),
                     SearchConfig(target_bytes=GB))


def test_trial_outcome_validation_and_round_trip():
    with pytest.raises(ValueError, match="reason"):
        TrialOutcome(1, True, None, None, 0.1, "fine")
    with pytest.raises(ValueError, match="contradicts"):
        TrialOutcome(1, True, None, None, 0.1, "oom")
    outcome = TrialOutcome(8, False, None, None, 0.5, "oom", OOM_TEXT, predicted=True)
    assert TrialOutcome.from_dict(outcome.to_dict()) == outcome
    with pytest.raises(ValueError, match="unknown field"):
        TrialOutcome.from_dict({**outcome.to_dict(), "peak": 1})


def test_search_result_round_trip():
    result = run(FakeTrial(peaks=linear(1, 0.1)), target_bytes=8 * GB)
    again = SearchResult.from_dict(result.to_dict())
    assert again == result
    assert [t.batch for t in again.successes()] == [1, 2, 4, 8, 16, 32, 64, 70]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"target_bytes": 0}, "target memory"),
        ({"target_bytes": 1.5e9}, "target memory"),
        ({"margin_bytes": -1}, "margin"),
        ({"margin_bytes": GB}, "margin"),
        ({"start": 0}, "start batch"),
        ({"start": True}, "start batch"),
        ({"max_batch": 0}, "max batch"),
        ({"start": 64, "max_batch": 32}, "max batch"),
        ({"max_trials": 0}, "max trials"),
        ({"trial_time_budget_s": 0}, "time budget"),
        ({"trial_time_budget_s": float("nan")}, "time budget"),
        ({"objective": "speed"}, "objective"),
        ({"throughput_tolerance": 1.0}, "tolerance"),
        ({"throughput_tolerance": -0.1}, "tolerance"),
        ({"use_fit": "yes"}, "use_fit"),
    ],
)
def test_search_config_rejects(overrides, message):
    with pytest.raises(ConfigError, match=message):
        SearchConfig(**{"target_bytes": GB, **overrides})


def test_search_config_round_trip():
    cfg = SearchConfig(target_bytes=8 * GB, margin_bytes=GB, start=4, trial_time_budget_s=30.0)
    assert SearchConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.limit_bytes == 7 * GB
    with pytest.raises(ConfigError, match="unknown field"):
        SearchConfig.from_dict({"target_bytes": GB, "targte": 1})


def test_fit_peak_memory():
    ok = [TrialOutcome(b, True, gb(1 + 0.1 * b), None, 0.1, "ok") for b in (2, 4)]
    assert fit_peak_memory(ok) == pytest.approx((1e9, 1e8))
    assert fit_peak_memory(ok[:1]) is None
    oom = TrialOutcome(8, False, None, None, 0.1, "oom")
    assert fit_peak_memory([ok[0], oom]) is None


# (f) past the peak: stop when the answer cannot change ----------------------------------------

GROWTH = [1, 2, 4, 8, 16, 32, 64]
RISING = {1: 10.0, 2: 20.0, 4: 38.0, 8: 70.0, 16: 90.0, 32: 100.0, 64: 110.0}


def test_truly_declining_throughput_stops_growth():
    # Peak 110 at 64; 128 (80) and 256 (70) are both more than 5 % below: two successive
    # declines, so the memory edge (OOM above 1000) is never searched.
    trial = FakeTrial(ips={**RISING, 128: 80.0, 256: 70.0}, oom_above=1000)
    result = run(trial)
    assert trial.calls == GROWTH + [128, 256]
    assert result.chosen == 64
    assert result.peak_batch == 64
    assert result.stop_reason == (
        "memory edge not searched: throughput peaked at 64; batch 128, 256 clearly below"
    )


DECLINING = {**RISING, 128: 80.0, 256: 70.0, 512: 60.0, 768: 55.0, 896: 52.0, 960: 51.0,
             992: 50.0}
# The same curve searched to the edge: 1024 OOMs, bisection 512..1024 closes at 992.
TO_THE_EDGE = GROWTH + [128, 256, 512, 1024, 768, 896, 960, 992]


@pytest.mark.parametrize("cfg", [{"find_edge": True}, {"objective": "memory"}])
def test_find_edge_or_objective_memory_search_the_edge_anyway(cfg):
    trial = FakeTrial(ips=DECLINING, oom_above=1000)
    result = run(trial, **cfg)
    assert trial.calls == TO_THE_EDGE
    assert result.stop_reason == "hit target between 992 and 1024 (batch 1024: oom)"
    assert result.peak_batch is None
    assert result.chosen == (64 if cfg.get("find_edge") else 992)


@pytest.mark.parametrize("recovery,rules", [
    # 128 dips to 95 (clearly below 110) but 256 recovers to a new best (112): the decline
    # rule alone (min_gain 0 turns the plateau rule off) does not stop.
    (112.0, {"min_gain": 0.0}),
    # With both rules: 256 recovers to a clear gain over 64 (125 > 110 x 1.05), so
    # neither rule stops.
    (125.0, {}),
])
def test_one_noisy_dip_that_recovers_does_not_stop(recovery, rules):
    # 512 (100) is the first decline from 256; 1024, 768 and 640 OOM (above 600), which
    # says nothing about speed; 576 (98) is the second successive decline: stop.
    ips = {**RISING, 128: 95.0, 256: recovery, 512: 100.0, 576: 98.0}
    trial = FakeTrial(ips=ips, oom_above=600)
    result = run(trial, **rules)
    assert trial.calls == GROWTH + [128, 256, 512, 1024, 768, 640, 576]
    assert result.chosen == 256
    assert result.stop_reason == (
        "memory edge not searched: throughput peaked at 256; batch 512, 576 clearly below"
    )


def test_a_dip_then_a_flat_recovery_is_a_plateau():
    # The first curve with both rules: 128 (95) and 256 (112) together gain 1.8 % over
    # 64 (110): diminishing returns, stop at once. The choice is the one the longer
    # search made (256, the largest within 3 % of the best).
    ips = {**RISING, 128: 95.0, 256: 112.0, 512: 100.0, 576: 98.0}
    trial = FakeTrial(ips=ips, oom_above=600)
    result = run(trial)
    assert trial.calls == GROWTH + [128, 256]
    assert result.chosen == 256
    assert result.peak_batch == 64
    assert result.stop_reason == (
        "memory edge not searched: throughput flat past 64; batch 128, 256 within 5 % of it"
    )


def test_a_slowly_rising_curve_keeps_growing():
    # +6 % per doubling from 64 on: every pair of doublings gains more than 5 %.
    ips = {**RISING, 128: 116.6, 256: 123.6, 512: 131.0, 1024: 138.9}
    trial = FakeTrial(ips=ips, oom_above=5000)
    result = run(trial, max_batch=1024)
    assert trial.calls == GROWTH + [128, 256, 512, 1024]
    assert result.stop_reason == "reached max batch 1024"
    assert result.chosen == 1024


def test_the_48x48_cpu_curve_stops_on_its_plateau():
    # bf16 images/s measured on the 48x48 shape (docs/results.md grid, 0 workers):
    # flat from 8 on. 16 gains 6 % over 8, then 32 and 64 gain nothing over 16.
    ips = {1: 11.0, 2: 21.0, 4: 25.0, 8: 34.0, 16: 36.0, 32: 34.0, 64: 36.0, 128: 35.0}
    trial = FakeTrial(ips=ips, oom_above=5000)
    result = run(trial, max_batch=4096)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64]
    assert result.chosen == 64  # the largest within 3 % of the best
    assert result.stop_reason == (
        "memory edge not searched: throughput flat past 16; batch 32, 64 within 5 % of it"
    )


def test_plateau_reached_rules():
    def ok(batch, ips):
        return TrialOutcome(batch, True, None, ips, 0.1, "ok")

    failed = TrialOutcome(512, False, None, None, 0.1, "oom")
    flat = [ok(16, 100.0), ok(32, 104.0), ok(64, 101.0)]
    assert plateau_reached(flat) == 16
    assert plateau_reached(flat[:2]) is None                       # nothing before the tail
    assert plateau_reached(flat + [failed]) == 16                  # failures say nothing
    assert plateau_reached(flat, min_gain=0.0) is None             # rule off
    assert plateau_reached(flat, min_gain=0.03) is None            # 104 is a 4 % gain
    assert plateau_reached([ok(16, 100.0), ok(32, 90.0), ok(64, 106.0)]) is None  # clear gain
    assert plateau_reached(flat, patience=1) == 32                 # 64 gains nothing on 32


def test_patience_one_stops_at_the_first_dip():
    ips = {**RISING, 128: 95.0}
    trial = FakeTrial(ips=ips, oom_above=600)
    result = run(trial, stop_patience=1)
    assert trial.calls == GROWTH + [128]
    assert result.stop_reason == (
        "memory edge not searched: throughput peaked at 64; batch 128 clearly below"
    )


@pytest.mark.parametrize("ci,calls,below", [
    # Without intervals, 128 (93) is 7 % below the peak (100 at 64): a decline at once.
    (None, [128, 256], "128, 256"),
    # With +-3 % on the peak and +-5 % on 128: 93 * 1.05 = 97.65 > 100 * 0.97 = 97, the
    # intervals overlap, so 128 is within noise; 256 and 512 (+-1 %) are clearly below.
    ({**{b: 0.03 for b in GROWTH}, 128: 0.05, 256: 0.01, 512: 0.01}, [128, 256, 512],
     "256, 512"),
])
def test_a_drop_within_the_confidence_intervals_is_not_a_decline(ci, calls, below):
    ips = {**RISING, 64: 100.0, 128: 93.0, 256: 92.0, 512: 90.0}
    trial = FakeTrial(ips=ips, oom_above=5000, ci=ci)
    result = run(trial, min_gain=0.0)  # the decline rule alone
    assert trial.calls == GROWTH + calls
    assert result.stop_reason == (
        f"memory edge not searched: throughput peaked at 64; batch {below} clearly below"
    )


def test_a_noise_floor_keeps_a_drift_between_trials_from_ending_the_search():
    # The demo model on 2 cores (sixth session): a trial at 16 read 130 +-3 % and the
    # next two, during a slow spell, 112 and 110 +-3 %, though 32 and 64 run faster than
    # 16 side by side. Their own intervals are apart (112 x 1.03 < 130 x 0.97): a
    # "peak" at 16. Trials of one batch differ by 10-13 % between runs on that machine;
    # with each reading given +-10 % at least, 112 is within noise of 130 and growth goes on.
    ips = {1: 10.0, 2: 20.0, 4: 40.0, 8: 80.0, 16: 130.0, 32: 112.0, 64: 110.0, 128: 150.0}
    ci = {b: 0.03 for b in ips}
    trial = FakeTrial(ips=ips, ci=ci)
    result = run(trial, max_batch=128, min_gain=0.0)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64]
    assert result.stop_reason.startswith("memory edge not searched: throughput peaked at 16")
    assert result.chosen == 16
    trial = FakeTrial(ips=ips, ci=ci)
    result = run(trial, max_batch=128, min_gain=0.0, noise_floor=0.10)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 128]
    assert (result.stop_reason, result.chosen) == ("reached max batch 128", 128)
    # A true decline still stops it: 64 and 128 at 80 % and 75 % of the peak are more
    # than the floors apart (80 x 1.1 = 88 < 130 x 0.9 = 117).
    declining = {**ips, 32: 130.0, 64: 104.0, 128: 97.0, 256: 90.0}
    trial = FakeTrial(ips=declining, ci=ci)
    result = run(trial, max_batch=256, min_gain=0.0, noise_floor=0.10)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 128]
    assert result.stop_reason == (
        "memory edge not searched: throughput peaked at 32; batch 64, 128 clearly below")
    # The choice and the runoff read trials the same way: 112 is within noise of 130.
    trials = result.trials[:5] + [TrialOutcome(32, True, None, 112.0, 0.1, "ok",
                                               images_per_s_rel_ci=0.03)]
    trials[4] = TrialOutcome(16, True, None, 130.0, 0.1, "ok", images_per_s_rel_ci=0.03)
    assert choose_batch(trials, "throughput", 0.03) == 16
    assert choose_batch(trials, "throughput", 0.03, noise_floor=0.10) == 32
    assert runoff_batches(trials, 16) == [16]
    assert runoff_batches(trials, 32, noise_floor=0.10) == [32, 16]


def test_plateau_within_tolerance_searches_on_without_the_plateau_rule():
    # Flat at 100 from 16 on: nothing is clearly below, and the largest batch within 3 %
    # wins, so larger batches can still change the answer; without the plateau rule
    # growth reaches max_batch. With it, two flat doublings end the search.
    trial = FakeTrial(ips=lambda b: min(100.0, 10.0 * b))
    result = run(trial, max_batch=256, min_gain=0.0)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert result.chosen == 256
    assert result.peak_batch is None
    trial = FakeTrial(ips=lambda b: min(100.0, 10.0 * b))
    result = run(trial, max_batch=256)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64]
    assert (result.chosen, result.peak_batch) == (64, 16)


def test_goodput_score_stops_past_its_own_peak():
    # Images/s keeps rising, but goodput = images/s x efficiency min(1, 32 / b) peaks at
    # 32 (100), then 64 (120 x 0.5 = 60) and 128 (130 x 0.25 = 32.5) decline.
    ips = {1: 5.0, 2: 10.0, 4: 20.0, 8: 40.0, 16: 70.0, 32: 100.0, 64: 120.0, 128: 130.0}
    goodput = Score("goodput", lambda t: t.images_per_s * min(1.0, 32 / t.batch))
    trial = FakeTrial(ips=ips, oom_above=5000)
    result = search_batch(trial, SearchConfig(target_bytes=80 * GB), score=goodput)
    assert trial.calls == [1, 2, 4, 8, 16, 32, 64, 128]
    assert result.chosen == 32
    assert result.stop_reason == (
        "memory edge not searched: goodput peaked at 32; batch 64, 128 clearly below"
    )
    assert choose_batch(result.trials, "throughput", 0.03) == 128  # by images/s alone


@pytest.mark.parametrize("value,value_ci,best,best_ci,expected", [
    (94.0, 0.0, 100.0, 0.0, True),     # 6 % below, no intervals
    (95.5, 0.0, 100.0, 0.0, False),    # 4.5 %: within the 5 % tolerance
    (90.0, 0.06, 100.0, 0.05, False),  # 95.4 > 95: intervals overlap
    (90.0, 0.05, 100.0, 0.05, True),   # 94.5 < 95: apart
])
def test_clearly_below(value, value_ci, best, best_ci, expected):
    assert clearly_below(value, value_ci, best, best_ci, 0.05) is expected


def test_peak_passed_needs_patience_trials_above_the_peak():
    def ok(batch, ips):
        return TrialOutcome(batch, True, None, ips, 0.1, "ok")

    failed = TrialOutcome(512, False, None, None, 0.1, "oom")
    assert peak_passed([ok(64, 100.0), ok(128, 50.0)]) is None
    assert peak_passed([ok(64, 100.0), ok(128, 50.0), failed]) is None  # failures say nothing
    assert peak_passed([ok(32, 90.0), ok(64, 100.0), ok(128, 50.0)], patience=1) == 64
    assert peak_passed([ok(64, 100.0), ok(128, 50.0), ok(256, 40.0)]) == 64
    # Ties at the best: the larger batch is the peak, so nothing lies above it yet.
    assert peak_passed([ok(32, 50.0), ok(64, 100.0), ok(128, 100.0)], patience=1) is None


def test_search_result_round_trips_the_peak():
    trial = FakeTrial(ips={**RISING, 128: 80.0, 256: 70.0}, oom_above=1000)
    result = run(trial)
    data = result.to_dict()
    assert SearchResult.from_dict(data) == result
    del data["peak_batch"]  # a file written before the field existed
    assert SearchResult.from_dict(data).peak_batch is None


@pytest.mark.parametrize("field,value", [
    ("find_edge", 1), ("stop_patience", 0), ("stop_patience", 1.5),
    ("decline_tolerance", 1.0), ("decline_tolerance", -0.1), ("min_gain", 1.0),
    ("min_gain", -0.01), ("min_gain", "5%"), ("noise_floor", 1.0), ("noise_floor", -0.1),
    ("noise_floor", "10%"),
])
def test_stopping_rule_settings_are_validated(field, value):
    with pytest.raises(ConfigError):
        SearchConfig(target_bytes=GB, **{field: value})


def test_negative_confidence_interval_is_refused():
    with pytest.raises(ValueError, match="confidence interval"):
        TrialOutcome(8, True, None, 10.0, 0.1, "ok", images_per_s_rel_ci=-0.01)


# -- the runoff: batches the search could not tell apart ------------------------------------------
def _trial(batch, ips, ci, ok=True):
    return TrialOutcome(batch=batch, ok=ok, peak_bytes=batch if ok else None,
                        images_per_s=ips if ok else None, seconds=1.0,
                        reason="ok" if ok else "oom", images_per_s_rel_ci=ci if ok else None)


# The demo model on this 2-core machine (fifth session): 16 101 +-3 %, 32 113 +-6 %,
# 64 144 +-13 %, 128 141 +-17 %; the search kept 128 (within 3 % of 144).
DEMO_TOP = [_trial(16, 101.1, 0.03), _trial(32, 113.1, 0.06), _trial(64, 144.4, 0.13),
            _trial(128, 140.9, 0.17)]


def test_runoff_takes_the_batches_within_each_others_noise():
    # 32 is clearly below 144 (113 x 1.06 = 120 < 144 x 0.87 = 126): not a candidate.
    assert runoff_batches(DEMO_TOP, chosen=128) == [128, 64]
    assert runoff_batches(DEMO_TOP, chosen=128, limit=3) == [128, 64]
    # Wider intervals bring 32 in; the limit keeps the best-scoring ones.
    wide = [_trial(32, 113.1, 0.2)] + DEMO_TOP[2:]
    assert runoff_batches(wide, chosen=128, limit=3) == [128, 64, 32]
    assert runoff_batches(wide, chosen=128, limit=2) == [128, 64]


def test_no_runoff_when_the_search_told_the_batches_apart():
    clear = [_trial(16, 60.0, 0.02), _trial(32, 100.0, 0.02), _trial(64, 80.0, 0.02)]
    assert runoff_batches(clear, chosen=32) == [32]
    assert runoff_batches(DEMO_TOP, chosen=128, limit=1) == [128]
    # A 2 % gap is inside the 3 % tolerance: never clearly below, however tight the
    # intervals (clearly_below needs both conditions).
    close = [_trial(32, 100.0, 0.005), _trial(64, 98.0, 0.005)]
    assert runoff_batches(close, chosen=32) == [32, 64]


def test_runoff_ignores_failures_and_unscored_trials_and_reads_the_latest_retry():
    trials = [_trial(64, 144.0, 0.1), _trial(128, 10.0, 0.1), _trial(256, None, None, ok=False),
              _trial(128, 141.0, 0.1)]  # 128 measured again: the later reading counts
    assert runoff_batches(trials, chosen=64) == [64, 128]
    # The chosen batch without a score (the memory objective's largest fit): no runoff.
    unscored = [_trial(64, 144.0, 0.1), TrialOutcome(batch=96, ok=True, peak_bytes=1,
                                                     images_per_s=None, seconds=1.0, reason="ok")]
    assert runoff_batches(unscored, chosen=96) == [96]
    with pytest.raises(ConfigError):
        runoff_batches(DEMO_TOP, chosen=128, limit=0)


def test_runoff_reads_the_objectives_score():
    # Goodput halves the larger batch's worth: 128 is then clearly below 64.
    halved = Score("goodput", lambda t: None if t.images_per_s is None
                   else t.images_per_s * (0.5 if t.batch == 128 else 1.0))
    assert runoff_batches(DEMO_TOP, chosen=64, score=halved) == [64]


def test_a_challenger_must_beat_the_search_choice_clearly():
    # The fifth session's demo run: 128 (the search's) 116.7, 32 118.5: 1.5 % is noise.
    assert runoff_winner({128: 116.7, 32: 118.5}, incumbent=128) == 128
    assert runoff_winner({128: 116.7, 32: 123.0}, incumbent=128) == 32  # 5.4 % better
    assert runoff_winner({128: 100.0, 64: 105.0}, incumbent=128) == 128  # exactly 5 %: kept
    assert runoff_winner({128: 100.0, 64: 110.0, 32: 108.0}, incumbent=128) == 64
    assert runoff_winner({128: 100.0, 64: 102.0}, incumbent=128, margin=0.0) == 64
    # The incumbent did not fit end to end: the best challenger; alone, itself.
    assert runoff_winner({64: 90.0, 32: 95.0}, incumbent=128) == 32
    assert runoff_winner({128: 90.0}, incumbent=128) == 128
    with pytest.raises(ValueError):
        runoff_winner({}, incumbent=128)


def test_the_runoff_compares_configurations_not_only_batches():
    # The tuner's keys: (batch, channels_last). channels_last at the chosen batch wins.
    scores = {(128, False): 132.5, (128, True): 151.0, (64, False): 140.0}
    assert runoff_winner(scores, incumbent=(128, False)) == (128, True)
    assert runoff_label(128, True) == "batch 128 channels_last" and runoff_label(64) == "batch 64"


def test_throughput_keeps_the_largest_batch_within_noise_of_the_best():
    # The fifth session's demo search: 64 read 144 +-13 %, 128 read 129 +-10 % (10 % lower,
    # but the intervals overlap): the largest batch within noise is 128, which the tuner's
    # runoff then re-measures against 64 end to end.
    trials = [_trial(16, 101.0, 0.03), _trial(32, 113.0, 0.06), _trial(64, 144.0, 0.13),
              _trial(128, 129.0, 0.10)]
    assert choose_batch(trials, "throughput", 0.03) == 128
    # The same readings with tight intervals: 128 is clearly below, 64 stays.
    tight = [_trial(b, t.images_per_s, 0.01) for b, t in ((t.batch, t) for t in trials)]
    assert choose_batch(tight, "throughput", 0.03) == 64
    # Without intervals the rule is the tolerance alone (3 %).
    bare = [_trial(64, 144.0, None), _trial(128, 140.0, None)]
    assert choose_batch(bare, "throughput", 0.03) == 128
    assert choose_batch([_trial(64, 144.0, None), _trial(128, 139.0, None)], "throughput", 0.03) == 64
