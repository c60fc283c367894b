"""benchmarks/trial_noise.py: between-trial spread against each trial's own interval,
the measurement behind the search's CPU noise floor."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

from autotune.trial import TrialMeasurement

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "trial_noise.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH.parent))
    try:
        spec = importlib.util.spec_from_file_location("trial_noise", BENCH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH.parent))
    return module


def test_summary_is_the_spread_between_trials_and_the_median_own_interval(bench):
    summary = bench.summarise({16: [(100.0, 0.02), (120.0, 0.03), (110.0, 0.04)]})
    row = summary[16]
    assert row["mean_images_per_s"] == pytest.approx(110.0)
    assert row["between_trial_rel_sd"] == pytest.approx(statistics.stdev([100, 120, 110]) / 110)
    assert row["median_own_rel_ci"] == pytest.approx(0.03)
    assert bench.summarise({8: [(10.0, None), (12.0, None)]})[8]["median_own_rel_ci"] is None


@pytest.mark.parametrize("text", ["", "16,x", "0,16"])
def test_bad_batches_are_one_line(bench, text):
    with pytest.raises(SystemExit, match="--batches"):
        bench.parse_batches(text)


def test_fresh_trials_round_robin(bench, monkeypatch, tmp_path, capsys):
    rates = iter([100.0, 200.0, 120.0, 180.0])
    calls = []

    class FakeTuner:
        def __init__(self, cfg, report=None):
            self.cfg = cfg

        def probe(self):
            pass

        def target_bytes(self):
            return 4 * 10**9

        def trial(self, batch, precision):
            assert self._trials_by_spec == {}  # a fresh trial, never the cached one
            self._trials_by_spec = {"cached": True}
            calls.append((batch, precision))
            return TrialMeasurement(batch=batch, ok=True, reason="ok", images_per_s=next(rates),
                                    images_per_s_rel_ci=0.02, seconds=1.0)

        def close(self):
            calls.append("closed")

    monkeypatch.setattr(bench, "Tuner", FakeTuner)
    out = tmp_path / "noise.json"
    assert bench.main(["--batches", "16,32", "--repeats", "2", "--json", str(out)]) == 0
    assert calls == [(16, "bf16"), (32, "bf16"), (16, "bf16"), (32, "bf16"), "closed"]
    data = json.loads(out.read_text())
    assert data["batches"]["16"]["readings"] == [[100.0, 0.02], [120.0, 0.02]]
    text = capsys.readouterr().out
    sd32 = 100 * statistics.stdev([200, 180]) / 190
    assert f"batch 32: mean 190.0 images/s, between-trial sd {sd32:.1f} %" in text
    sd16 = 100 * statistics.stdev([100, 120]) / 110  # 12.9 %, the larger
    assert f"largest between-trial sd {sd16:.1f} %" in text
    with pytest.raises(SystemExit, match="at least 2"):
        bench.main(["--repeats", "1"])
