"""Knobs: exact choices from fake measurements, failures recorded (never fatal), one
tiny real CPU measurement, and channels_last carried by tuned.json."""

from __future__ import annotations

import json

import pytest

from helpers import ARWGAN_RECORD

from autotune.knobs import (
    CompileMeasurement,
    Rate,
    ThreadsWorkers,
    choose_compile,
    choose_threads_workers,
    choose_toggle,
    faster_beyond_noise,
    measure_compile,
    measure_threads_workers,
    measure_toggle,
    not_applicable,
    thread_worker_candidates,
    torch_threads,
)
from autotune.timing import TimingConfig

FAST = TimingConfig(min_samples=3, min_seconds=0.0, max_seconds=0.2, rel_ci=0.5, warmup_steps=1)


# toggles: channels_last, cudnn.benchmark --------------------------------------------------------

def test_toggle_on_when_faster_beyond_noise():
    d = choose_toggle("channels_last", Rate(100.0, 0.02), Rate(110.0, 0.02))
    assert (d.knob, d.value) == ("channels_last", True)
    assert d.reason == "on: x1.10 (110.0 img/s +-2 % vs 100.0 img/s +-2 %)"
    assert d.measured == {"off": {"images_per_s": 100.0, "rel_ci": 0.02},
                          "on": {"images_per_s": 110.0, "rel_ci": 0.02}}


def test_toggle_off_when_the_gain_is_within_the_intervals():
    # 4 % faster, but 104 x 0.97 = 100.88 < 100 x 1.02 = 102: the intervals overlap.
    d = choose_toggle("cudnn_benchmark", Rate(100.0, 0.02), Rate(104.0, 0.03))
    assert d.value is False
    assert d.reason == "off: x1.04, not faster beyond noise (104.0 img/s +-3 % vs 100.0 img/s +-2 %)"


def test_toggle_failure_is_recorded_not_raised():
    d = choose_toggle("channels_last", Rate(100.0), "RuntimeError: no kernel")
    assert d.value is False
    assert d.reason == "off: failed to run (RuntimeError: no kernel)"
    assert d.measured["on_error"] == "RuntimeError: no kernel"


def test_faster_beyond_noise_needs_the_tolerance_too():
    assert faster_beyond_noise(Rate(102.0), Rate(100.0)) is False  # 2 % < 3 %
    assert faster_beyond_noise(Rate(104.0), Rate(100.0)) is True


def test_not_applicable():
    d = not_applicable("cudnn_benchmark", None, "CPU device")
    assert (d.value, d.reason) == (None, "not measured: CPU device")


# compile -------------------------------------------------------------------------------------

def test_compile_pays_within_a_long_run():
    # 1/100 - 1/125 = 0.002 s saved per image; 30 s / 0.002 = 15000 images to break even.
    m = CompileMeasurement(Rate(100.0), Rate(125.0), compile_seconds=30.0)
    d = choose_compile(m, planned_images=100_000)
    assert d.value is True
    assert d.measured["break_even_images"] == 15000
    assert d.measured["saved_seconds"] == pytest.approx(170.0)
    assert d.reason == "on: 30.0 s to compile, pays after 15000 images, saves 170 s over the planned 100000"


def test_compile_does_not_pay_within_a_short_run():
    m = CompileMeasurement(Rate(100.0), Rate(125.0), compile_seconds=30.0)
    d = choose_compile(m, planned_images=10_000)
    assert d.value is False
    assert d.reason == "off: 30.0 s to compile pays only after 15000 images, the run plans 10000"


def test_compile_break_even_uses_the_pessimistic_ends():
    # Eager at its fastest 102, compiled at its slowest 122.5:
    # 1/102 - 1/122.5 = 0.00164066 s per image; 30 / 0.00164066 = 18285.4 -> 18286.
    m = CompileMeasurement(Rate(100.0, 0.02), Rate(125.0, 0.02), compile_seconds=30.0)
    d = choose_compile(m, planned_images=18_000)
    assert d.value is False
    assert d.measured["break_even_images"] == 18286


def test_compile_not_faster_beyond_noise():
    m = CompileMeasurement(Rate(100.0, 0.02), Rate(102.0, 0.02), compile_seconds=5.0)
    d = choose_compile(m, planned_images=10**9)
    assert d.value is False
    assert d.reason.startswith("off: not faster beyond noise (102.0 img/s +-2 % vs 100.0")


def test_compile_failure_is_recorded():
    m = CompileMeasurement(Rate(100.0), None, None, "BackendCompilerFailed: no C++ compiler")
    d = choose_compile(m, planned_images=1000)
    assert d.value is False
    assert d.reason == "off: compile failed (BackendCompilerFailed: no C++ compiler)"
    assert d.measured["error"] == "BackendCompilerFailed: no C++ compiler"
    json.dumps(d.to_dict())  # goes into tuned.json as is


def test_planned_images_validated():
    with pytest.raises(ValueError, match="planned images"):
        choose_compile(CompileMeasurement(Rate(1.0), Rate(2.0), 1.0), planned_images=0)


# threads x workers ---------------------------------------------------------------------------

@pytest.mark.parametrize("cores,pairs", [
    (1, [(1, 0), (1, 1)]),
    (2, [(2, 0), (1, 1), (2, 1), (1, 2), (2, 2)]),
    (4, [(4, 0), (3, 1), (4, 1), (2, 2), (4, 2), (1, 4), (4, 4)]),
])
def test_thread_worker_candidates(cores, pairs):
    assert thread_worker_candidates(cores) == pairs


def test_threads_workers_fewest_workers_within_noise_of_the_fastest():
    # Fastest 2t/2w (101); 2t/0w (100) and 2t/1w (99) are within noise of it
    # (100 > 101 x 0.97 = 97.97), 1t/1w and 1t/2w clearly below: 2 threads, 0 workers.
    pairs = [ThreadsWorkers(2, 0, Rate(100.0, 0.01)), ThreadsWorkers(1, 1, Rate(80.0, 0.01)),
             ThreadsWorkers(2, 1, Rate(99.0, 0.01)), ThreadsWorkers(1, 2, Rate(70.0, 0.01)),
             ThreadsWorkers(2, 2, Rate(101.0, 0.01))]
    d = choose_threads_workers(pairs)
    assert d.value == {"threads": 2, "workers": 0}
    assert d.reason == (
        "2 threads, 0 workers: 100.0 img/s +-1 %; fastest 2t/2w within noise "
        "(others: 1t/1w 80.0, 2t/1w 99.0, 1t/2w 70.0, 2t/2w 101.0)"
    )


def test_threads_workers_a_clear_winner_wins():
    pairs = [ThreadsWorkers(2, 0, Rate(60.0)), ThreadsWorkers(1, 1, Rate(90.0))]
    assert choose_threads_workers(pairs).value == {"threads": 1, "workers": 1}


def test_measure_threads_workers_sets_threads_and_skips_a_failing_pair():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    seen = []

    def measure_pair(workers):
        seen.append((torch.get_num_threads(), workers))
        if workers == 2:
            raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Bus error.")
        return Rate(100.0 - 10 * workers)

    measured, failed = measure_threads_workers(measure_pair, [(2, 0), (1, 1), (1, 2)])
    assert seen == [(2, 0), (1, 1), (1, 2)]
    assert [(m.threads, m.workers) for m in measured] == [(2, 0), (1, 1)]
    assert failed == {"1t/2w": "RuntimeError: DataLoader worker (pid 123) is killed by signal: Bus error."}
    assert torch.get_num_threads() == before
    assert choose_threads_workers(measured).value == {"threads": 2, "workers": 0}


# measuring helpers: failures are verdicts ---------------------------------------------------------

def _counting_step():
    calls = []
    return (lambda: calls.append(1)), calls


def test_measure_toggle_records_a_failure_to_build():
    def make_step(on):
        if on:
            raise RuntimeError("channels_last not supported\nsecond line")
        return _counting_step()[0]

    off, on = measure_toggle(make_step, images_per_step=4, timing=FAST)
    assert isinstance(off, Rate)
    assert on == "RuntimeError: channels_last not supported"


def test_measure_compile_records_a_failure_at_the_first_call():
    def make_step(compiled):
        step, _ = _counting_step()
        if not compiled:
            return step

        def broken():
            raise RuntimeError("compile unsupported")
        return broken

    m = measure_compile(make_step, images_per_step=4, timing=FAST)
    assert m.compiled is None and m.compile_seconds is None
    assert m.error == "RuntimeError: compile unsupported"
    assert choose_compile(m, 100).value is False


def test_measure_compile_separates_the_slow_first_calls():
    import time

    state = {"compiled": 0}

    def make_step(compiled):
        def step():
            if compiled and state["compiled"] < 2:
                state["compiled"] += 1
                time.sleep(0.05)  # "compiling"
        return step

    m = measure_compile(make_step, images_per_step=4, timing=FAST)
    assert m.compiled is not None and m.error == ""
    assert m.compile_seconds >= 0.09  # the two slow calls, not spread over the timing


# one tiny real CPU measurement ------------------------------------------------------------------

def test_tiny_real_channels_last_and_compile_measurement():
    torch = pytest.importorskip("torch")

    def make_step(setting, compiled=False):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(4, 3, 3, padding=1))
        inputs = torch.randn(4, 3, 16, 16)
        if setting and not compiled:
            net = net.to(memory_format=torch.channels_last)
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        model = torch.compile(net, backend="eager") if (setting and compiled) else net
        opt = torch.optim.SGD(net.parameters(), lr=0.01)

        def step():
            opt.zero_grad()
            model(inputs).square().mean().backward()
            opt.step()
        return step

    with torch_threads(1):
        off, on = measure_toggle(make_step, images_per_step=4, timing=FAST)
        decision = choose_toggle("channels_last", off, on)
        assert decision.value in (True, False) and decision.reason
        m = measure_compile(lambda c: make_step(c, compiled=True), images_per_step=4, timing=FAST)
    assert m.error == "" and m.compiled is not None and m.compile_seconds >= 0
    assert choose_compile(m, planned_images=1000).value in (True, False)


# tuned.json carries channels_last -----------------------------------------------------------------

def test_tuned_choice_channels_last_defaults_and_applies(tmp_path):
    from dataclasses import asdict, replace

    from arwgan.config import ModelConfig, TrainConfig
    from arwgan.tuning import apply_tuned
    from autotune.tuned import TunedChoice, TunedFile, load_tuned, save_tuned

    choice = TunedChoice(batch_size=32, num_workers=0, pin_memory=False, persistent_workers=False,
                         prefetch_factor=None, precision="fp32", learning_rates={"lr_g": 1e-3, "lr_d": 1e-3},
                         warmup_steps=0, lr_rule="linear", objective="throughput")
    assert choice.channels_last is False
    model = ModelConfig(image_size=16, message_bits=4, channels=8)
    tuned = TunedFile(2, "2026-01-01T00:00:00+00:00", {}, model.to_dict(), model.fingerprint(),
                      replace(choice, channels_last=True), {}, "test", dict(ARWGAN_RECORD))
    path = tmp_path / "tuned.json"
    save_tuned(path, tuned)
    assert load_tuned(path).choice.channels_last is True
    assert apply_tuned(tuned, TrainConfig()).channels_last is True
    # A file written before the field existed loads with today's default.
    data = json.loads(path.read_text())
    del data["choice"]["channels_last"]
    path.write_text(json.dumps(data))
    assert load_tuned(path).choice.channels_last is False
    with pytest.raises(ValueError, match="channels_last"):
        TunedChoice(**{**asdict(choice), "channels_last": "yes"})


def test_a_rate_without_an_interval_shows_none():
    """End-to-end rates (threads x workers) carry no interval: '+-0 %' would claim one."""
    assert str(Rate(94.25)) == "94.2 img/s"
    assert str(Rate(94.25, 0.021)) == "94.2 img/s +-2 %"
