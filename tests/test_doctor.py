"""``arwgan doctor`` end to end on tiny models, a few seconds each: the verdict follows a
slow decode, a throttled reader and a fed step; fake NVML readings drive the GPU half."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from arwgan.app import group
from arwgan.config import LoaderConfig
from arwgan.doctor import DoctorConfig, FileSource, print_report, report_table, run_doctor
from arwgan.errors import ConfigError
from autotune.telemetry import FakeNvml, NvmlGpuReader
from autotune.verdict import INPUT, STORAGE
from helpers import assert_one_error_line
from test_telemetry import gpu_reading

SECONDS = 3.0


class SlowDecode(FileSource):
    """A test hook: decoding sleeps ``delay`` per image (as large PNGs would)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def decode(self, data: bytes) -> np.ndarray:
        time.sleep(self.delay)
        return super().decode(data)


class ThrottledRead(FileSource):
    """A test double for slow storage: every file read sleeps ``delay``."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def read(self, path: Path) -> bytes:
        time.sleep(self.delay)
        return super().read(path)


def small(make_config, batch: int, workers: int, **model):
    cfg = make_config(batch_size=batch, **model)
    return replace(cfg, loader=LoaderConfig(batch_size=batch, num_workers=workers))


def test_slow_decode_without_workers_is_input_bound(make_config) -> None:
    cfg = small(make_config, batch=8, workers=0)
    result = run_doctor(cfg, DoctorConfig(seconds=SECONDS), source=SlowDecode(0.03))
    pipe = result.figures["pipeline"]
    assert result.verdict.kind == INPUT, result.verdict
    assert pipe["decode_s_per_image"] >= 0.03
    assert pipe["data_wait_fraction"] > 0.5
    assert pipe["loader_images_per_s"] < 1 / 0.03
    # On a 2-core machine the count needed may exceed the cores: either advice names it.
    assert "raise workers from 0 to" in result.verdict.suggestion or "loader processes" in result.verdict.suggestion


def test_throttled_reads_are_storage_bound(make_config) -> None:
    cfg = small(make_config, batch=8, workers=0)
    result = run_doctor(cfg, DoctorConfig(seconds=SECONDS), source=ThrottledRead(0.03))
    storage = result.figures["storage"]
    assert result.verdict.kind == STORAGE, result.verdict
    assert storage["bytes_per_s"] < storage["mean_file_bytes"] / 0.03
    assert storage["cache"] == "warm cache"  # a test double's reads: no page cache dropped
    assert result.figures["pipeline"]["decode_s_per_image"] < 0.03


@pytest.mark.slow
def test_a_small_model_at_batch_64_is_not_input_bound(make_config) -> None:
    cfg = small(make_config, batch=64, workers=1, image_size=32, channels=16, message_bits=8)
    result = run_doctor(cfg, DoctorConfig(seconds=SECONDS))
    assert result.verdict.kind not in (INPUT, STORAGE), result.verdict
    figures = result.figures
    assert figures["pipeline"]["measured_steps"] >= 3
    assert figures["storage"]["filesystem"]  # /proc/mounts names it on Linux
    assert figures["device"]["memory"]["process_peak_bytes"] > 0


def test_fake_nvml_readings_drive_the_gpu_half_and_a_lost_gpu_is_reported(make_config) -> None:
    cfg = small(make_config, batch=8, workers=0)
    readings = [gpu_reading(90.0, power=300.0), gpu_reading(70.0, power=200.0)]
    nvml = FakeNvml(readings, lost_after=4)
    result = run_doctor(cfg, DoctorConfig(seconds=SECONDS, interval_s=0.05),
                        gpu_reader=NvmlGpuReader(nvml, 0))
    dev = result.figures["device"]
    # Warm-up steps come first, so the window may start after the lost point: the figures
    # are then unavailable, never an error.
    util = dev["gpu_util_percent"]
    assert util["max"] is None or util["max"] <= 90.0
    assert dev["memory_total_bytes"] in (None, 24 * 2**30)
    assert dev["gpu_lost_at_s"] is not None
    assert "GPU_IS_LOST" in dev["gpu_error"] or "none of its queries" in dev["gpu_error"]
    assert any("stopped answering" in note for note in result.verdict.notes)
    rendered = render(result)
    for row in ("GPU utilisation", "power vs limit", "PCIe rx / tx", "GPU telemetry"):
        assert row in rendered


def test_fake_nvml_figures_reach_the_report(make_config) -> None:
    cfg = small(make_config, batch=8, workers=0)
    nvml = FakeNvml([gpu_reading(98.0, power=308.0)])
    result = run_doctor(cfg, DoctorConfig(seconds=SECONDS), gpu_reader=NvmlGpuReader(nvml, 0))
    dev = result.figures["device"]
    assert dev["busy_percent"]["mean"] == 98.0
    assert dev["gpu_power_w"]["mean"] == 308.0
    assert dev["power_limit_w"] == 450.0
    assert dev["gpu_pcie_rx_bytes_per_s"]["mean"] == 3e6
    assert dev["gpu_temperature_c"]["max"] == 67.0
    rendered = render(result)
    assert "308 W of 450 W" in rendered
    assert "3.0 MB/s / 1.0 MB/s" in rendered
    assert "98 % mean" in rendered


def render(result) -> str:
    import io

    from rich.console import Console

    buffer = io.StringIO()
    print_report(Console(file=buffer, width=200), result)
    return buffer.getvalue()


def test_cli_json_and_plot(tiny_data_dir: Path, tmp_path: Path) -> None:
    plot = tmp_path / "doctor.png"
    result = CliRunner().invoke(group, [
        "doctor", "--data-dir", str(tiny_data_dir), "--image-size", "16", "--message-bits", "4",
        "--channels", "8", "--noise", "", "--batch", "8", "--workers", "0", "--device", "cpu",
        "--seconds", "2", "--json", "--plot", str(plot),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert {"config", "device", "host", "pipeline", "storage", "verdict", "timeline"} <= set(data)
    assert data["config"]["batch"] == 8 and data["config"]["workers"] == 0
    assert data["verdict"]["kind"] in ("input-bound", "storage-bound", "device-bound", "host-bound", "unknown")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_a_too_short_budget(tiny_data_dir: Path) -> None:
    result = CliRunner().invoke(group, ["doctor", "--data-dir", str(tiny_data_dir), "--seconds", "1"])
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "--seconds must be at least 2")


def test_doctor_config_is_validated() -> None:
    with pytest.raises(ConfigError):
        DoctorConfig(seconds=1)
    with pytest.raises(ConfigError):
        DoctorConfig(interval_s=0)
    assert report_table  # the table builder is importable without a run


def test_cli_from_tuned_uses_its_configuration_and_memory_target(tiny_data_dir: Path, tmp_path: Path) -> None:
    from arwgan.config import ModelConfig
    from autotune.tuned import save_tuned
    from test_tuned import make_choice, make_tuned

    model = ModelConfig(image_size=16, message_bits=4, channels=8, noise="")
    tuned = make_tuned(model, choice=make_choice(batch_size=4, num_workers=0, pin_memory=False,
                                                 persistent_workers=False, prefetch_factor=None,
                                                 precision="fp32"),
                       measurements={"target_bytes": 3 * 2**30})
    path = tmp_path / "tuned.json"
    save_tuned(path, tuned)
    result = CliRunner().invoke(group, [
        "doctor", "--from-tuned", str(path), "--data-dir", str(tiny_data_dir), "--device", "cpu",
        "--seconds", "2", "--json",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert (data["config"]["batch"], data["config"]["workers"]) == (4, 0)
    assert data["config"]["model"]["channels"] == 8
    assert data["device"]["memory"]["target_bytes"] == 3 * 2**30
    assert "tuned on another machine" in result.stderr or "warning" in result.stderr


@pytest.mark.gpu
def test_doctor_reads_the_real_gpu(make_config) -> None:
    cfg = replace(small(make_config, batch=8, workers=0), device="cuda")
    result = run_doctor(cfg, DoctorConfig(seconds=SECONDS))
    dev = result.figures["device"]
    assert dev["kind"] == "cuda"
    assert dev["memory"]["allocator_peak_bytes"] > 0
    if "gpu_util_percent" in dev:  # NVML present
        assert dev["gpu_util_percent"]["n"] > 0 and dev["memory_total_bytes"] > 0
        assert dev["gpu_lost_at_s"] is None


def test_trainer_prints_telemetry_and_one_hint_when_the_device_starves(make_config) -> None:
    import io

    from rich.console import Console

    from arwgan.trainer import EpochStats, Trainer

    buffer = io.StringIO()
    trainer = Trainer(make_config(), Console(file=buffer, width=300))
    val = {"psnr": 30.0, "ssim": 0.9, "bitacc_identity": 0.5}

    def stats(util: float, wait_s: float) -> EpochStats:
        return EpochStats(steps=10, images=80, seconds=10.0, data_wait_s=wait_s, losses={},
                          skipped_files=0, nonfinite_steps=0,
                          telemetry={"device_util_mean": util, "device_util_p10": util - 10,
                                     "power_w_mean": None, "workers_cpu_percent_mean": 95.0})

    trainer.report(stats(35.0, 5.0), val)
    lines = buffer.getvalue().splitlines()
    assert lines[0].endswith("| device busy 35 % (p10 25 %), workers 95 % CPU")
    assert len(lines) == 2 and lines[1].startswith("note: device busy only 35 % while the step waits for data 50 %")
    buffer.truncate(0), buffer.seek(0)
    trainer.report(stats(95.0, 5.0), val)  # a busy device: no hint
    assert len(buffer.getvalue().splitlines()) == 1
