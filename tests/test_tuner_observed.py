"""The tuner observed from outside: the CPU trial's memory watchdog really stops a trial
and calls it an OOM, the verdict's two sides really run the configurations they are
named after, and the real CUDA probe behaves on a machine without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autotune.workload import LoaderSettings

from helpers import arwgan_ref
import torch

from arwgan.config import ModelConfig
from autotune.probes import TorchCudaProbe, describe_machine, real_probes, select_gpu
from autotune.timing import TimingConfig
from autotune.trial import TrialSpec, run_trial_subprocess
from arwgan.tuning import TuneConfig, Tuner

TINY = ModelConfig(image_size=16, message_bits=4, channels=8, noise="")
MiB = 2**20


def test_cpu_trial_past_its_memory_limit_is_stopped_and_reported_as_oom() -> None:
    """64 MiB is less than ``import torch`` alone takes: without the watchdog this tiny
    trial would finish fine; with it, the trial process is stopped and the outcome is an
    OOM that names the limit (an OOM ends the batch growth; an error would abort)."""
    spec = TrialSpec(
        workload=arwgan_ref(TINY), precision="fp32", device="cpu", batch=2,
        timing=TimingConfig(min_samples=2, max_samples=2, min_seconds=0.0, warmup_steps=1).to_dict(),
        memory_limit_bytes=64 * MiB,
    )
    measurement = run_trial_subprocess(spec, timeout_s=300)
    assert (measurement.ok, measurement.reason) == (False, "oom"), measurement
    assert "limit" in measurement.detail, measurement
    assert measurement.images_per_s is None


def test_the_verdict_runs_the_seed_default_and_the_recommendation(
    tiny_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each side of the seed-vs-recommended comparison is trained with its own batch,
    precision and loader; the speed-up is recommended / seed. The seed default is the
    project's starting point: batch 16, 4 loader workers, no pinned memory, fp32."""
    import autotune.tuner

    ran: list[dict] = []
    speeds = {16: 50.0, 48: 150.0}

    def fake_speed(step, loader, steps, **kwargs):
        ran.append({
            "batch": loader.batch_size, "workers": loader.num_workers,
            "pin_memory": loader.pin_memory, "precision": step.gan.precision,
        })
        return speeds[loader.batch_size]

    monkeypatch.setattr(autotune.tuner, "training_images_per_s", fake_speed)
    tuner = Tuner(TuneConfig(model=TINY, data_dir=str(tiny_data_dir), device="cpu",
                             compare_rounds=1, compare_steps=3))
    verdict = tuner.compare(LoaderSettings(batch_size=48, num_workers=1), "bf16")
    seed = {"batch": 16, "workers": 4, "pin_memory": False, "precision": "fp32"}
    mine = {"batch": 48, "workers": 1, "pin_memory": False, "precision": "bf16"}
    assert sorted(ran, key=lambda r: r["batch"]) == [seed, mine]
    assert verdict["seed_default_images_per_s"] == 50.0
    assert verdict["recommended_images_per_s"] == 150.0
    assert verdict["speedup"] == pytest.approx(3.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only paths")
def test_real_torch_cuda_probe_without_cuda() -> None:
    probe = TorchCudaProbe()
    assert probe.available() is False
    assert probe.bf16_supported(0) is False
    probes = real_probes()
    assert select_gpu(probes, "cpu") is None
    if not probes.nvml.available():
        # No NVML and no CUDA runtime: asking for a GPU finds none instead of raising.
        assert select_gpu(probes, "cuda") is None
    described = describe_machine(probes, "cpu")
    json.dumps(described)
    assert described["selected_gpu"] is None
    assert described["torch"]["cuda_available"] is False
    assert described["fingerprint"]["device_type"] == "cpu"
    assert described["fingerprint"]["gpu_name"] is None
