"""Goodput choice from fake throughput and noise-scale numbers (exact expectations)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from autotune.goodput import (
    BatchCandidate,
    choose_batch_by_goodput,
    conservative_noise_scale,
    efficiency,
    gain,
    verdict_line,
)


def test_gain_and_efficiency_by_hand():
    # B0 = 16, B_noise = 48: at B = 64, E = (48 + 16) / (48 + 64) = 64/112, r = 4 E.
    assert efficiency(64, 16, 48.0) == pytest.approx(64 / 112)
    assert gain(64, 16, 48.0) == pytest.approx(4 * 64 / 112)
    assert efficiency(16, 16, 48.0) == 1.0
    assert gain(16, 16, 48.0) == 1.0
    # Pure noise: perfect scaling; no noise: a bigger batch buys nothing per step.
    assert gain(64, 16, math.inf) == 4.0
    assert gain(64, 16, 0.0) == pytest.approx(1.0)
    # Below the reference an image is worth more than one.
    assert efficiency(8, 16, 8.0) == pytest.approx(24 / 16)
    with pytest.raises(ValueError):
        efficiency(0, 16, 1.0)
    with pytest.raises(ValueError):
        efficiency(16, 16, -1.0)


def test_reference_batch_wins_when_efficiency_falls_faster_than_throughput_rises():
    # B_noise = 8: E(32) = 24/40 = 0.6, E(64) = 24/72 = 1/3.
    # goodput: 16 -> 100, 32 -> 150 * 0.6 = 90, 64 -> 180 / 3 = 60.
    candidates = [BatchCandidate(16, 100.0), BatchCandidate(32, 150.0), BatchCandidate(64, 180.0)]
    choice = choose_batch_by_goodput(candidates, noise_scale=8.0, reference_batch=16)
    assert choice.chosen.batch == 16
    assert [round(r.goodput, 6) for r in choice.rows] == [100.0, 90.0, 60.0]
    assert choice.chosen.lr_factor == 1.0
    # The throughput objective would have taken 64: the point of the goodput objective.
    assert max(candidates, key=lambda c: c.images_per_s).batch == 64


def test_large_noise_scale_picks_the_largest_batch_that_fits():
    # B_noise = 1008: E(64) = 1024/1072, goodput 200 * 0.9552 = 191.0 > 150 * 0.9808 > 100.
    # Batch 128 would be better still but does not fit in memory.
    candidates = [
        BatchCandidate(16, 100.0),
        BatchCandidate(32, 150.0),
        BatchCandidate(64, 200.0),
        BatchCandidate(128, 400.0, fits=False),
    ]
    choice = choose_batch_by_goodput(candidates, noise_scale=1008.0, reference_batch=16)
    assert choice.chosen.batch == 64
    assert choice.chosen.goodput == pytest.approx(200 * 1024 / 1072)
    # AdaScale for Adam: sqrt of the gain r = 4 * 1024/1072; SGD power 1 gives r itself.
    assert choice.chosen.lr_factor == pytest.approx(math.sqrt(4 * 1024 / 1072))
    sgd = choose_batch_by_goodput(candidates, 1008.0, 16, lr_power=1.0)
    assert sgd.chosen.lr_factor == pytest.approx(4 * 1024 / 1072)


def test_middle_batch_wins_at_a_moderate_noise_scale():
    # B_noise = 48: goodput 16 -> 100, 32 -> 160 * 64/80 = 128, 64 -> 200 * 64/112 = 114.3.
    candidates = [BatchCandidate(16, 100.0), BatchCandidate(32, 160.0), BatchCandidate(64, 200.0)]
    assert choose_batch_by_goodput(candidates, 48.0, 16).chosen.batch == 32


def test_near_tie_goes_to_the_smaller_batch():
    # B_noise = 48: 32 -> 128.0, 64 -> 225 * 64/112 = 128.57: within 1 % of each other.
    candidates = [BatchCandidate(16, 100.0), BatchCandidate(32, 160.0), BatchCandidate(64, 225.0)]
    assert choose_batch_by_goodput(candidates, 48.0, 16).chosen.batch == 64
    assert choose_batch_by_goodput(candidates, 48.0, 16, tolerance=0.01).chosen.batch == 32


def test_nothing_to_choose_is_an_error():
    with pytest.raises(ValueError):
        choose_batch_by_goodput([], 10.0, 16)
    with pytest.raises(ValueError):
        choose_batch_by_goodput([BatchCandidate(16, 10.0, fits=False)], 10.0, 16)


def test_verdict_states_progress_speedup_beside_raw_ratio():
    # Seed default: batch 16 at 32 images/s. Choice: batch 64 at 71 images/s, B_noise 16:
    # E(64) = 32/80 = 0.4, goodput 28.4, speed-up 28.4 / 32 = 0.89; raw ratio 2.22.
    choice = choose_batch_by_goodput([BatchCandidate(64, 71.0)], 16.0, 16)
    line = verdict_line(choice, baseline_batch=16, baseline_images_per_s=32.0)
    assert line == (
        "predicted 0.89x sooner to the same training progress than the seed default: "
        "2.22x the images per second, but at batch 64 each image is worth 0.40 of one at "
        "batch 16 (gradient noise scale 16 images)"
    )
    same = verdict_line(choose_batch_by_goodput([BatchCandidate(16, 58.0)], 16.0, 16), 16, 32.0)
    assert same.startswith("predicted 1.81x sooner")
    assert "each image is worth as much" in same


def test_imports_no_torch():
    code = "import sys, autotune.goodput\nassert 'torch' not in sys.modules\n"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_conservative_noise_scale_is_one_standard_error_lower_and_refuses_no_estimate():
    assert conservative_noise_scale(150.0, 40.0) == 110.0
    assert conservative_noise_scale(150.0, 40.0, z=2.0) == 70.0
    assert conservative_noise_scale(20.0, 30.0) == 0.0
    for value, stderr in ((math.inf, 1.0), (10.0, math.inf), (math.nan, 1.0)):
        with pytest.raises(ValueError):
            conservative_noise_scale(value, stderr)
