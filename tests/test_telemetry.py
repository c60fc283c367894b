"""Telemetry: NVML readings through a fake NVML, the sampler's failure handling (a GPU
that stops answering mid-run), psutil readings of a real child process, summaries."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from autotune.telemetry import (
    GPU_FIELDS,
    FakeNvml,
    NvmlGpuReader,
    ProcessReader,
    ReaderFailed,
    Sample,
    Sampler,
    epoch_figures,
    percentile,
    starvation_hint,
    stats,
    telemetry_text,
    worker_cpu_means,
)

GIB = 2**30


def gpu_reading(util: float, power: float = 300.0, **extra) -> dict[str, float]:
    reading = {
        "util_percent": util,
        "memory_util_percent": 40.0,
        "memory_used_bytes": 13 * GIB,
        "memory_total_bytes": 24 * GIB,
        "process_memory_bytes": 12 * GIB,
        "power_w": power,
        "power_limit_w": 450.0,
        "temperature_c": 67.0,
        "sm_clock_mhz": 2520.0,
        "pcie_rx_bytes_per_s": 3_000_000.0,
        "pcie_tx_bytes_per_s": 1_000_000.0,
    }
    reading.update(extra)
    return reading


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the NVML reader ----------------------------------------------------------------------


def test_nvml_reader_converts_nvml_units() -> None:
    nvml = FakeNvml([gpu_reading(98.0, power=308.0)])
    reading = NvmlGpuReader(nvml, nvml.nvmlDeviceGetHandleByIndex(0))()
    assert set(reading) == set(GPU_FIELDS)
    assert reading["util_percent"] == 98.0
    assert reading["memory_used_bytes"] == 13 * GIB
    assert reading["memory_total_bytes"] == 24 * GIB
    assert reading["process_memory_bytes"] == 12 * GIB
    assert reading["power_w"] == 308.0  # NVML: milliwatts
    assert reading["power_limit_w"] == 450.0
    assert reading["temperature_c"] == 67.0
    assert reading["sm_clock_mhz"] == 2520.0
    assert reading["pcie_rx_bytes_per_s"] == 3_000_000.0  # NVML: KB/s
    assert reading["pcie_tx_bytes_per_s"] == 1_000_000.0


def test_an_unsupported_nvml_figure_is_none_and_the_others_count() -> None:
    reading = gpu_reading(50.0)
    del reading["pcie_rx_bytes_per_s"], reading["power_w"]
    nvml = FakeNvml([reading])
    got = NvmlGpuReader(nvml, 0)()
    assert got["pcie_rx_bytes_per_s"] is None and got["power_w"] is None
    assert got["util_percent"] == 50.0 and got["pcie_tx_bytes_per_s"] == 1_000_000.0


def test_process_memory_is_none_when_this_process_is_not_listed() -> None:
    nvml = FakeNvml([gpu_reading(50.0)], pid=-1)
    assert NvmlGpuReader(nvml, 0)()["process_memory_bytes"] is None


def test_a_lost_gpu_makes_the_reader_raise() -> None:
    nvml = FakeNvml([gpu_reading(50.0)], lost_after=1)
    reader = NvmlGpuReader(nvml, 0)
    assert reader()["util_percent"] == 50.0
    with pytest.raises(ReaderFailed):
        reader()


# -- the sampler --------------------------------------------------------------------------


def test_a_gpu_that_stops_answering_mid_run_is_given_up_and_the_rest_goes_on() -> None:
    clock = FakeClock()
    nvml = FakeNvml([gpu_reading(90.0), gpu_reading(80.0), gpu_reading(70.0)], lost_after=3)
    host_calls = []
    sampler = Sampler(
        {"gpu": NvmlGpuReader(nvml, 0), "host": lambda: host_calls.append(1) or {"main_cpu_percent": 100.0}},
        interval_s=0.1, max_failures=2, clock=clock,
    )
    for _ in range(7):
        clock.now += 0.1
        sampler.sample_once()
    utils = [s.readings["gpu"] and s.readings["gpu"]["util_percent"] for s in sampler.samples]
    assert utils == [90.0, 80.0, 70.0, None, None, None, None]
    # Failures at samples 4 and 5 (t = 0.4, 0.5): given up at the second, never called again.
    assert sampler.lost_at["gpu"] == pytest.approx(0.5)
    assert nvml.calls == 5
    assert "NVML answered none" in sampler.failures["gpu"]
    assert len(host_calls) == 7  # the host reader kept going
    figures = epoch_figures(sampler.samples, on_gpu=True, step_threads=1)
    assert figures["device_util_mean"] == pytest.approx(80.0)
    assert figures["power_w_mean"] == pytest.approx(300.0)


def test_one_failure_is_forgiven_when_the_next_reading_works() -> None:
    answers = iter([RuntimeError("blip"), {"x": 1.0}, RuntimeError("blip"), {"x": 2.0}])

    def flaky():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    sampler = Sampler({"flaky": flaky}, max_failures=2)
    for _ in range(4):
        sampler.sample_once()
    assert "flaky" not in sampler.lost_at
    assert [s.readings["flaky"] for s in sampler.samples] == [None, {"x": 1.0}, None, {"x": 2.0}]


def test_the_sampler_thread_samples_until_stopped_and_never_raises() -> None:
    enough = threading.Event()
    count = []

    def counting():
        count.append(1)
        if len(count) >= 3:
            enough.set()
        return {"n": float(len(count))}

    def broken():
        raise OSError("no such device")

    sampler = Sampler({"counting": counting, "broken": broken}, interval_s=0.01, max_failures=1)
    with sampler:
        assert enough.wait(10)
    taken = len(sampler.samples)
    assert taken >= 3
    assert sampler.lost_at.keys() == {"broken"}
    assert len(sampler.samples) == taken  # stopped: nothing more is sampled


@pytest.mark.parametrize("interval, failures", [(0, 3), (-1, 3), (0.1, 0)])
def test_sampler_settings_are_checked(interval, failures) -> None:
    with pytest.raises(ValueError):
        Sampler({}, interval_s=interval, max_failures=failures)


# -- psutil -------------------------------------------------------------------------------


def test_process_reader_sees_a_child_process_after_priming() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        reader = ProcessReader(children_every_s=0.0)
        first = reader()
        second = reader()
    finally:
        child.kill()
        child.wait()
    assert first["rss_bytes"] > 0 and first["main_cpu_percent"] >= 0
    assert child.pid not in first["worker_cpu_percent"]  # no previous reading to compare with
    assert child.pid in second["worker_cpu_percent"]
    assert second["workers_rss_bytes"] > 0
    assert second["idle_cores"] is None or second["idle_cores"] >= 0


# -- summaries ----------------------------------------------------------------------------


def test_percentile_interpolates_as_numpy_does() -> None:
    values = [10.0, 20.0, 30.0, 40.0, 50.0]
    assert percentile(values, 0.1) == pytest.approx(14.0)
    assert percentile(values, 0.5) == 30.0
    assert percentile([7.0], 0.1) == 7.0


def test_stats_of_nothing_is_all_none() -> None:
    empty = stats([])
    assert empty.n == 0 and empty.mean is None and empty.p10 is None


def samples_of(*readings: dict) -> list[Sample]:
    return [Sample(t=0.1 * i, readings=r) for i, r in enumerate(readings)]


def test_cpu_device_figure_is_the_main_process_share_of_the_step_threads() -> None:
    samples = samples_of(
        {"host": {"main_cpu_percent": 200.0, "worker_cpu_percent": {11: 50.0, 12: 10.0}}},
        {"host": {"main_cpu_percent": 100.0, "worker_cpu_percent": {11: 70.0}}},
        {"host": None},
    )
    figures = epoch_figures(samples, on_gpu=False, step_threads=4)
    assert figures["device_util_mean"] == pytest.approx(37.5)  # (50 + 25) / 2
    assert figures["power_w_mean"] is None
    # Worker 11: mean 60; worker 12: 10; mean over workers 35.
    assert worker_cpu_means(samples) == {11: 60.0, 12: 10.0}
    assert figures["workers_cpu_percent_mean"] == pytest.approx(35.0)


def test_nothing_read_gives_unavailable_figures_and_no_text() -> None:
    figures = epoch_figures([], on_gpu=True, step_threads=1)
    assert all(value is None for value in figures.values())
    assert telemetry_text(figures) == ""


def test_telemetry_text() -> None:
    text = telemetry_text({"device_util_mean": 93.4, "device_util_p10": 80.2, "power_w_mean": 250.0,
                           "workers_cpu_percent_mean": 12.0})
    assert text == " | device busy 93 % (p10 80 %), 250 W, workers 12 % CPU"


def test_starvation_hint_only_when_idle_and_waiting() -> None:
    assert starvation_hint(95.0, 0.5, 4, 8) is None  # busy device
    assert starvation_hint(40.0, 0.1, 4, 8) is None  # not waiting
    assert starvation_hint(None, 0.5, 4, 8) is None  # unknown utilisation
    hint = starvation_hint(40.0, 0.35, 4, 8)
    assert hint.startswith("device busy only 40 % while the step waits for data 35 %")
    assert "more DataLoader workers" in hint
    assert "every core already has a worker" in starvation_hint(40.0, 0.35, 8, 8)
