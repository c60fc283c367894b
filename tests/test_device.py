"""The device seam, and every CUDA branch of the tuner driven through a fake CUDA device.

The fake GAN below stands in for the real train step: each call takes its activations
from :class:`FakeCudaDevice` (which fails with an OutOfMemoryError past the allocator
cap, as torch's does), and its weights and Adam states live as long as the object.
The real trial runner, tuner phases, cap handling and context measurement run as on
a GPU; only the model is fake. Figures come from the fake's constants, not from the
code under test.
"""

from __future__ import annotations

import gc
import io
import json
import os
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import arwgan_ref
import torch

from arwgan.config import ModelConfig
from arwgan.errors import ConfigError
from autotune.device import (
    FakeCudaDevice,
    FakeCudaNvml,
    cap_fraction,
    memory_capped,
    shm_bytes,
    unusable_gpu_message,
    usable_cores,
    wheel_index_for_driver,
)
from autotune.oom import is_oom
from autotune.probes import FakeHostProbe, FakeNvmlProbe, HostInfo, Probes, TorchInfo
from autotune.trial import TrialSpec, run_trial
from arwgan.tuning import TuneConfig, Tuner
from autotune.timing import TimingConfig
from helpers import assert_one_error_line

# The fake CUDA device makes the tuner ask for pinned batches on a CPU-only torch.
pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")
MiB, GiB = 2**20, 2**30
TOTAL = 80 * GiB
CONTEXT = 500 * MiB  # the context right after torch.zeros(1)
LAZY = 300 * MiB  # cuDNN/cuBLAS handles and kernels loaded by the first real step
WEIGHTS = 200 * MiB  # nets + both Adam states of the fake GAN
PER_IMAGE = {"fp32": 100 * MiB, "bf16": 60 * MiB, "fp16": 60 * MiB}
PREVIOUS_FRACTION = 0.9  # a cap someone set before the tuner ran: it must come back
MODEL = ModelConfig(image_size=16, message_bits=4, channels=8, noise="")
HOST = HostInfo(usable_cores=2, logical_cores=2, physical_cores=2, ram_total_bytes=64 * GiB,
                ram_available_bytes=48 * GiB, cpu_name="Test CPU", shm_bytes=None)
TORCH = TorchInfo(torch_version="2.11.0+cu130", cuda_version="13.0", cudnn_version=91000,
                  cuda_available=True, device_count=1, bf16_supported_cuda=True)


class FakeStepResult:
    skipped = False

    def as_dict(self) -> dict:
        return {"g_loss": torch.tensor(1.0)}


def fake_gan_class(cuda: FakeCudaDevice, per_image: dict, log: list):
    """A GANStep stand-in whose memory lives on ``cuda``; ``log`` gets (precision, batch,
    cap in force) for every step."""

    class FakeGAN:
        def __init__(self, model_cfg, optim_cfg, precision, device, seed=0, channels_last=False, **_):
            self.device, self.precision = device, precision
            cuda.allocate(WEIGHTS)
            weakref.finalize(self, cuda.free, WEIGHTS)
            FakeGAN.alive.add(id(self))
            weakref.finalize(self, FakeGAN.alive.discard, id(self))

        def to_device(self, images, messages):
            return images, messages

        def __call__(self, images, messages):
            cuda.run_kernels()
            need = per_image[self.precision] * images.shape[0]
            log.append((self.precision, images.shape[0], cuda.memory_fraction(0)))
            cuda.allocate(need)
            cuda.free(need)
            return FakeStepResult()

    FakeGAN.alive = set()
    return FakeGAN


@pytest.fixture
def fake_gpu(monkeypatch):
    """A fake 80 GiB GPU with the fake GAN installed where the tuner and trials build it."""

    def make(per_image=PER_IMAGE, nvml_kwargs=None, **cuda_kwargs):
        cuda_kwargs.setdefault("context_bytes", CONTEXT)
        cuda_kwargs.setdefault("lazy_context_bytes", LAZY)
        cuda = FakeCudaDevice(TOTAL, **cuda_kwargs)
        cuda.set_memory_fraction(PREVIOUS_FRACTION, 0)
        cuda.fraction_history.clear()
        log: list = []
        gan = fake_gan_class(cuda, per_image, log)
        monkeypatch.setattr("arwgan.step.GANStep", gan)
        nvml = FakeCudaNvml(cuda, **(nvml_kwargs or {}))
        probes = Probes(nvml=nvml, cuda=cuda, host=FakeHostProbe(HOST), torch=lambda: TORCH)
        return cuda, nvml, probes, log, gan

    return make


def tune_config(tiny_data_dir: Path, **overrides) -> TuneConfig:
    cfg = dict(model=MODEL, data_dir=str(tiny_data_dir), device="cuda", target_mem="8GB",
               max_workers=0, compare_rounds=1, compare_steps=3, worker_steps=3,
               measure_images=16, max_trials=8, max_batch=256, objective="throughput",
               timing=TimingConfig(min_samples=2, max_samples=2, min_seconds=0.0, warmup_steps=1))
    cfg.update(overrides)
    return TuneConfig(**cfg)


def expected_cap(context: int) -> float:
    return (8 * 10**9 - context) / TOTAL


# ----------------------------------------------------------- the cap in every phase


@pytest.mark.slow  # a whole tuning run (fake device, real loader): ~8 s here
def test_every_cuda_phase_runs_under_the_cap_and_restores_the_previous_one(fake_gpu, tiny_data_dir):
    cuda, _, probes, log, _ = fake_gpu()
    phases = []
    tuner = Tuner(tune_config(tiny_data_dir), probes=probes,
                  report=lambda message: phases.append((message, cuda.memory_fraction(0))))
    result = tuner.run()

    assert cuda.memory_fraction(0) == PREVIOUS_FRACTION
    # Every step of the model, in every phase (precision, search, comparison), ran capped.
    assert log and all(fraction < PREVIOUS_FRACTION for _, _, fraction in log)
    # The first trial ran under the cap of the context measured at start; once its steps
    # loaded cuDNN/cuBLAS the context was measured again and the cap tightened.
    second = next(i for i, (precision, _, _) in enumerate(log) if precision != log[0][0])
    assert all(f == pytest.approx(expected_cap(CONTEXT)) for _, _, f in log[:second])
    assert all(f == pytest.approx(expected_cap(CONTEXT + LAZY)) for _, _, f in log[second:])
    kinds = {message.split(":")[0] for message, fraction in phases if fraction != PREVIOUS_FRACTION}
    assert {"trial", "workers", "knobs", "compare"} <= kinds
    # Each phase puts back the cap that was there before it, not 1.0.
    restores = [f for f in cuda.fraction_history if f == PREVIOUS_FRACTION]
    phases_run = 3 + 1 + 1 + 1 + 1  # three precision trials, search, workers, knobs, comparison
    assert len(restores) == phases_run
    assert 1.0 not in cuda.fraction_history
    assert result.tuned.choice.batch_size >= 2


@pytest.mark.slow  # a whole tuning run (fake device, real loader): ~8 s here
def test_peaks_include_the_context_measured_after_the_first_real_step(fake_gpu, tiny_data_dir):
    cuda, _, probes, _, _ = fake_gpu()
    tuner = Tuner(tune_config(tiny_data_dir), probes=probes)
    tuner.run()
    assert tuner.context_bytes == CONTEXT + LAZY
    first = tuner.trials_run[0]  # fp32 at batch 16, measured before the context grew
    assert first.peak_bytes == WEIGHTS + 16 * PER_IMAGE["fp32"] + CONTEXT + LAZY
    for trial in tuner.trials_run:
        if trial.ok:
            assert trial.peak_bytes <= 8 * 10**9


@pytest.mark.slow  # a whole tuning run (fake device, real loader): ~8 s here
def test_container_without_our_pid_estimates_the_context_from_the_device_and_warns(fake_gpu, tiny_data_dir):
    cuda, _, probes, _, _ = fake_gpu(nvml_kwargs={"lists_own_pid": False}, other_processes_bytes=3 * GiB)
    tuner = Tuner(tune_config(tiny_data_dir), probes=probes)
    tuner.run()
    assert tuner.context_bytes == CONTEXT + LAZY
    assert any("does not list this process" in w for w in tuner.warnings)


@pytest.mark.slow  # a whole tuning run (fake device, real loader): ~8 s here
def test_nvml_that_raises_after_init_leaves_a_torch_only_tuning(fake_gpu, tiny_data_dir):
    cuda, nvml, probes, _, _ = fake_gpu(nvml_kwargs={"raises_after_init": True})
    tuner = Tuner(tune_config(tiny_data_dir), probes=probes)
    result = tuner.run()
    assert tuner.context_bytes == 0
    assert result.tuned.device["gpu_name"] == "Fake GPU"  # from torch, NVML gave nothing
    assert nvml.closed  # nvmlShutdown at the end (gpu-review #21)


def test_mig_slice_total_comes_from_torch(fake_gpu, tiny_data_dir):
    cuda, _, probes, _, _ = fake_gpu(nvml_kwargs={"mig": True}, name="NVIDIA A100 MIG 1g.10gb")
    tuner = Tuner(tune_config(tiny_data_dir), probes=probes)
    tuner.prepare()
    assert tuner.fingerprint["gpu_total_bytes"] == TOTAL


@pytest.mark.slow  # a whole tuning run (fake device, real loader): ~8 s here
def test_oom_in_the_seed_default_comparison_is_a_sentence(fake_gpu, tiny_data_dir):
    """fp32 at batch 16 needs 9.6 GB here: over an 8 GB target. The precision phase
    reports it as fp32's failure, the search goes on in fp16, and the comparison says
    the seed default does not fit instead of crashing after the whole search."""
    big = {"fp32": 600 * MiB, "bf16": 200 * MiB, "fp16": 200 * MiB}
    _, _, probes, _, _ = fake_gpu(per_image=big)
    tuner = Tuner(tune_config(tiny_data_dir), probes=probes)
    result = tuner.run()
    comparison = result.tuned.measurements["comparison"]
    assert comparison["seed_default_images_per_s"] is None and comparison["speedup"] is None
    assert "the seed default (batch 16, fp32) does not fit under 7.45 GiB" in comparison["note"]
    assert comparison["note"] in result.warnings
    fp32 = next(p for p in result.precision if p.precision == "fp32")
    assert not fp32.finite and fp32.error.startswith("oom")
    assert result.tuned.choice.precision in ("bf16", "fp16")


def test_oom_of_every_precision_is_a_config_error_not_a_crash(fake_gpu, tiny_data_dir):
    huge = {"fp32": 4 * GiB, "bf16": 4 * GiB, "fp16": 4 * GiB}
    cuda, _, probes, _, _ = fake_gpu(per_image=huge)
    tuner = Tuner(tune_config(tiny_data_dir), probes=probes)
    with pytest.raises(ConfigError, match="no precision could run the model"):
        tuner.run()
    assert cuda.memory_fraction(0) == PREVIOUS_FRACTION


def test_verification_trial_runs_capped(fake_gpu, tiny_data_dir):
    cuda, _, probes, log, _ = fake_gpu()
    tuner = Tuner(tune_config(tiny_data_dir), probes=probes)
    tuner.prepare()
    outcome = tuner.verify_batch(8, "fp32")
    assert outcome.ok
    assert log and all(fraction < PREVIOUS_FRACTION for _, _, fraction in log)
    assert cuda.memory_fraction(0) == PREVIOUS_FRACTION


def test_isolated_trials_carry_the_cap_into_the_child(fake_gpu, tiny_data_dir, monkeypatch):
    """gpu-review #8: with --isolate the cap was skipped and the child set none."""
    _, _, probes, _, _ = fake_gpu()
    tuner = Tuner(tune_config(tiny_data_dir, isolate=True), probes=probes)
    tuner.prepare()
    spec = tuner._spec(32, "fp32")
    assert spec.memory_fraction == pytest.approx(expected_cap(CONTEXT))

    # The child sets that cap on its device before the trial allocates anything.
    import autotune.device
    import autotune.trial

    child_cuda = FakeCudaDevice(TOTAL)
    seen = []
    monkeypatch.setattr(autotune.device, "CudaDevice", lambda: child_cuda)
    monkeypatch.setattr(autotune.trial, "run_trial",
                        lambda s: seen.append(child_cuda.memory_fraction(0)) or run_trial_stub(s))
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(spec.__dict__)))
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    autotune.trial._worker_main()
    assert seen == [pytest.approx(expected_cap(CONTEXT))]
    assert child_cuda.current_device == 0


def run_trial_stub(spec):
    from autotune.trial import TrialMeasurement

    return TrialMeasurement(batch=spec.batch, ok=True, reason="ok")


# --------------------------------------------------------------- smaller findings


def test_bf16_offered_only_from_compute_capability_8(fake_gpu, tiny_data_dir):
    """gpu-review #16: is_bf16_supported() is True on a V100 (emulated, slow)."""
    _, _, probes, _, _ = fake_gpu(capability=(7, 0))
    tuner = Tuner(tune_config(tiny_data_dir), probes=probes)
    assert tuner.precision_candidates() == ["fp32", "fp16"]
    forced = Tuner(tune_config(tiny_data_dir, precision="bf16"), probes=probes)
    with pytest.raises(ConfigError, match="compute capability below 8.0"):
        forced.precision_candidates()
    _, _, probes, _, _ = fake_gpu(capability=(8, 0))
    assert Tuner(tune_config(tiny_data_dir), probes=probes).precision_candidates() == [
        "fp32", "bf16", "fp16"]


def test_single_process_cuda_n_sets_its_device_once(fake_gpu, tiny_data_dir):
    """gpu-review #15: cuda:1 alone never called set_device (stray context on cuda:0)."""
    cuda, _, probes, _, _ = fake_gpu(device_count=2)
    Tuner(tune_config(tiny_data_dir, device="cuda:1"), probes=probes)
    assert cuda.current_device == 1


def test_trial_drops_every_reference_before_emptying_the_cache(fake_gpu):
    """gpu-review #12: after an OOM, the nets, grads and Adam states were still held by
    the trial's locals when empty_cache ran; and the next trial reset its peak before
    clearing, so the previous trial's cached blocks counted in it."""
    cuda, _, _, _, gan = fake_gpu()
    alive_at_empty = []
    empty = cuda.empty_cache

    def empty_cache():
        alive_at_empty.append(len(gan.alive))
        empty()

    cuda.empty_cache = empty_cache
    spec = TrialSpec(workload=arwgan_ref(MODEL), precision="fp32", device="cuda", batch=4096)
    measurement = run_trial(spec, cuda)
    assert measurement.reason == "oom"
    assert alive_at_empty[-1] == 0 and cuda.allocated == 0 and cuda.reserved == 0
    # Blocks cached before a trial do not count in its peak: cleared, then reset.
    cuda.reserved = 5 * GiB
    ok = run_trial(replace(spec, batch=2), cuda)
    assert ok.peak_bytes == WEIGHTS + 2 * PER_IMAGE["fp32"]


def test_trial_warms_up_through_every_noise_layer_and_times_whole_cycles():
    """gpu-review #17: a trial timed a partial, random noise sequence."""
    from arwgan.config import OptimConfig
    from arwgan.step import GANStep
    from arwgan.workload import ArwganStep

    model = ModelConfig(image_size=16, message_bits=4, channels=8, noise="crop((0.5,0.9),(0.5,0.9))+dropout(0.3,0.5)")
    gan = GANStep(model, OptimConfig(), "fp32", torch.device("cpu"))
    cycle = ArwganStep(gan).take_turns()
    used = []
    for index, layer in enumerate(gan.nets.noiser.layers):
        layer.register_forward_hook(lambda module, inputs, output, index=index: used.append(index))
    images, messages = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randint(0, 2, (2, 4)).float()
    for _ in range(2 * cycle):
        gan(images, messages)
    assert cycle == 3 and used == [0, 1, 2, 0, 1, 2]


def test_worker_candidates_bounded_by_shm_a_crash_recorded_and_windows_of_three_rounds(
        fake_gpu, tiny_data_dir, monkeypatch):
    """gpu-review #7 and #9: the timed window covered less than one round of workers; a
    64 MiB /dev/shm killed workers with SIGBUS, uncaught, after the search."""
    _, _, probes, _, _ = fake_gpu()
    host = replace(HOST, usable_cores=8, shm_bytes=64 * MiB)
    probes = replace(probes, host=FakeHostProbe(host))
    tuner = Tuner(tune_config(tiny_data_dir, max_workers=None), probes=probes)
    tuner.prepare()
    timed = {}

    def worker_speed(gan, loader_cfg, steps):
        timed[(loader_cfg.num_workers, loader_cfg.prefetch_factor)] = steps
        if loader_cfg.num_workers == 4:
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Bus error. "
                               "It is possible that dataloader's workers are out of shared memory.")
        return 100.0 * (1 + loader_cfg.num_workers)

    monkeypatch.setattr(tuner, "_worker_speed", worker_speed)
    # One batch of 64 images of 16 px: 196 KiB; 32 MiB (half of /dev/shm) holds 166 of them.
    results = tuner.measure_workers(64, "fp32", consumption=300.0)
    assert all(steps >= 3 * workers for (workers, _), steps in timed.items())
    failed = [m for m in results if m.error]
    assert [m.workers for m in failed] == [4] and failed[0].images_per_s == 0
    assert "Bus error" in failed[0].error
    tiny_shm = replace(host, shm_bytes=MiB)  # holds 2 batches: 1 worker x prefetch 2 at most
    tuner.host = tiny_shm
    timed.clear()
    tuner.measure_workers(64, "fp32", consumption=300.0)
    assert {workers for workers, _ in timed} == {0, 1}


def test_allocator_config_is_part_of_the_tuned_fingerprint(fake_gpu, tiny_data_dir, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    _, _, probes, _, _ = fake_gpu()
    tuner = Tuner(tune_config(tiny_data_dir), probes=probes)
    tuner.prepare()
    assert tuner.fingerprint["allocator_config"] == "expandable_segments:True"


@pytest.mark.slow  # a whole tuning run (fake device, real loader): ~8 s here
def test_from_tuned_training_is_capped_at_the_tuned_target(fake_gpu, tiny_data_dir, make_config):
    """gpu-review #4: --from-tuned training ran uncapped (cuDNN benchmark workspaces sized
    from free memory could take GBs above the tuned peak)."""
    from arwgan.trainer import Trainer
    from arwgan.tuning import apply_tuned

    _, _, probes, _, _ = fake_gpu()
    tuned = Tuner(tune_config(tiny_data_dir), probes=probes).run().tuned
    cfg = apply_tuned(tuned, make_config())
    assert cfg.allocator_limit_bytes == 8 * 10**9 - (CONTEXT + LAZY)

    from rich.console import Console

    trainer = Trainer(replace(cfg, device="cpu", precision="fp32",
                              loader=replace(cfg.loader, batch_size=8, pin_memory=False, num_workers=0)),
                      Console(file=io.StringIO()))
    cuda = FakeCudaDevice(TOTAL)
    cuda.set_memory_fraction(PREVIOUS_FRACTION, 0)
    trainer.cuda, trainer.device = cuda, torch.device("cuda", 0)
    with trainer._memory_cap():
        assert cuda.memory_fraction(0) == pytest.approx((8 * 10**9 - CONTEXT - LAZY) / TOTAL)
    assert cuda.memory_fraction(0) == PREVIOUS_FRACTION


def test_tuner_process_group_timeout_outlasts_its_trials():
    """gpu-review #20: ranks search independently; 600 s of skew killed the job."""
    from arwgan.distributed import DEFAULT_TIMEOUT_S
    from autotune.tuner import tuner_timeout_s

    cfg = TuneConfig()
    assert tuner_timeout_s(cfg) > cfg.max_trials * 3 * cfg.trial_budget_s > DEFAULT_TIMEOUT_S


# ------------------------------------------------------------------ seam pieces


def test_trials_and_training_set_the_same_cudnn_flags(monkeypatch, make_config):
    """gpu-review #4: the trainer turned cudnn.benchmark on, the trials never did."""
    import arwgan.trainer
    import autotune.device
    from arwgan.trainer import Trainer
    from rich.console import Console

    calls = []
    def record(device_type, benchmark=None):
        calls.append(device_type)

    monkeypatch.setattr(autotune.device, "configure_cudnn", record)
    monkeypatch.setattr(arwgan.trainer, "configure_cudnn", record)
    run_trial(TrialSpec(workload=arwgan_ref(MODEL), precision="fp32", device="cpu", batch=2,
                        timing=dict(min_samples=2, max_samples=2, min_seconds=0.0, warmup_steps=1)))
    Trainer(make_config(), Console(file=io.StringIO()))
    assert calls == ["cpu", "cpu"]


def test_cudnn_benchmark_on_unless_deterministic_was_asked_for():
    from autotune.device import configure_cudnn

    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False):
        configure_cudnn("cuda")
        assert torch.backends.cudnn.benchmark
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        configure_cudnn("cuda")
        assert not torch.backends.cudnn.benchmark


def test_cudnn_finding_no_engine_near_the_cap_is_an_oom():
    """gpu-review #11: the tuner aborted on this message instead of recording an OOM."""
    assert is_oom(RuntimeError("GET was unable to find an engine to execute this computation"))


def test_ssim_window_is_built_on_the_device_not_copied_from_the_host(monkeypatch):
    """gpu-review #13: the window was a CPU tensor copied to the GPU in every call, a
    pageable copy that blocks the host. Played on the 'meta' device (no GPU here)."""
    from arwgan.metrics import SSIM_SIGMA, SSIM_WINDOW, _ssim_float32

    copies = []
    to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        target = torch.device(args[0]) if args and isinstance(args[0], (str, torch.device)) else None
        if self.device.type == "cpu" and target is not None and target.type != "cpu":
            copies.append(target)
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    a = torch.empty(2, 3, 16, 16, device="meta")
    assert _ssim_float32(a, a, SSIM_WINDOW, SSIM_SIGMA).shape == (2,)  # (autocast has no meta)
    assert copies == []


def test_memory_capped_restores_the_previous_fraction_even_on_error():
    cuda = FakeCudaDevice(TOTAL)
    cuda.set_memory_fraction(0.5, 0)
    with pytest.raises(RuntimeError), memory_capped(cuda, 0, 0.25):
        assert cuda.memory_fraction(0) == 0.25
        raise RuntimeError("boom")
    assert cuda.memory_fraction(0) == 0.5


def test_cap_has_no_floor_that_lets_a_small_target_pass_on_a_big_card():
    """Found on an H200 (141 GB): a 1 % floor capped the allocator at 1.4 GB, so with a
    0.8 GB context a trial under a 2 GB target peaked at 2.2 GB."""
    H200 = 143_771 * MiB
    assert cap_fraction(2 * 10**9, 800 * 10**6, H200) * H200 == pytest.approx(1.2e9)
    assert cap_fraction(10**9, 2 * 10**9, H200) == 0.0
    cuda = FakeCudaDevice(H200)
    with memory_capped(cuda, 0, 1.2e9 / H200):
        assert cuda.memory_fraction(0) * H200 == pytest.approx(1.2e9)


def test_fake_device_ooms_at_the_cap_as_torch_does():
    cuda = FakeCudaDevice(10 * GiB)
    cuda.set_memory_fraction(cap_fraction(4 * GiB, GiB, 10 * GiB), 0)
    cuda.allocate(2 * GiB)
    with pytest.raises(Exception) as info:
        cuda.allocate(2 * GiB)
    assert is_oom(info.value)


def test_usable_cores_follow_the_cgroup_cpu_quota(tmp_path: Path):
    """gpu-review #9: sched_getaffinity ignores the CFS quota (a 16-CPU pod on a 192-core
    host tried up to 384 workers)."""
    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs -> 2 threads
    assert usable_cores(str(tmp_path)) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(str(tmp_path)) == affinity
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cores(str(v1)) == 1


def test_shm_size_is_read_or_none(tmp_path: Path):
    assert shm_bytes(str(tmp_path)) > 0
    assert shm_bytes(str(tmp_path / "missing")) is None


# ----------------------------------------------- a torch that cannot see the GPU


@pytest.mark.parametrize(("driver_cuda", "wheel"), [
    ("12.4", "cu126"), ("12.9", "cu128"), ("13.0", "cu130"), ("11.8", "cu118"), ("11.4", None),
])
def test_wheel_follows_the_drivers_cuda_version(driver_cuda, wheel):
    assert wheel_index_for_driver(driver_cuda) == wheel


def nvml_seeing_a_gpu(driver="550.54.15", cuda_version="12.4") -> FakeNvmlProbe:
    from autotune.probes import GpuInfo

    return FakeNvmlProbe([GpuInfo(
        index=0, name="NVIDIA H100 80GB HBM3", total_bytes=TOTAL, used_bytes=0, free_bytes=TOTAL,
        reserved_bytes=0, driver_version=driver, cuda_driver_version=cuda_version)])


def test_unusable_gpu_message_names_driver_torch_and_the_wheel():
    message = unusable_gpu_message(nvml_seeing_a_gpu(), False, "2.11.0+cu130", "13.0")
    assert message == (
        "NVML sees NVIDIA H100 80GB HBM3 with driver 550.54.15 (supports CUDA 12.4), but torch "
        "2.11.0+cu130 (built for CUDA 13.0) cannot use it; install a matching wheel: "
        "pip install torch --index-url https://download.pytorch.org/whl/cu126")
    assert unusable_gpu_message(nvml_seeing_a_gpu(), True, "2.11.0+cu130", "13.0") is None
    assert unusable_gpu_message(FakeNvmlProbe([]), False, "2.11.0+cpu", None) is None


@pytest.mark.parametrize("command", ["autotune", "train"])
def test_cli_says_out_loud_that_torch_cannot_see_the_gpu(command, monkeypatch, tmp_path, capsys):
    """Acceptance 3: device auto with a GPU that NVML sees and torch does not -> exit 1,
    one line naming the driver, torch's CUDA and the pip command; no traceback."""
    from arwgan.console import run_typer

    if command == "autotune":
        from arwgan.autotune_cli import app

        args = ["--out", str(tmp_path / "tuned.json")]
    else:
        from arwgan.cli import app

        args = ["--out", str(tmp_path / "run"), "--epochs", "1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("autotune.probes.NvmlProbe", lambda: nvml_seeing_a_gpu())
    code = run_typer(app, args)
    captured = capsys.readouterr()
    assert code == 1, captured
    assert_one_error_line(captured.err, "NVML sees NVIDIA H100 80GB HBM3 with driver 550.54.15")
    assert "whl/cu126" in captured.err and torch.__version__ in captured.err


def test_broadcast_buffers_takes_a_non_contiguous_buffer(monkeypatch):
    """Found by the first GPU run: validation under torchrun died with NCCL's 'Tensors
    must be contiguous' on the JPEG layer's inverted colour matrix (gloo lets it pass,
    so the NCCL check is played here)."""
    from torch import nn

    import autotune.distributed
    from arwgan.distributed import DistContext

    def nccl_broadcast(tensor, src):
        if not tensor.is_contiguous():
            raise ValueError("Tensors must be contiguous")
        tensor.mul_(1)  # what src sends: the same values

    monkeypatch.setattr(autotune.distributed.dist, "broadcast", nccl_broadcast)
    module = nn.Module()
    # linalg.inv answers in column-major order, as for the JPEG layer: not contiguous.
    module.register_buffer("inverse", torch.linalg.inv(torch.tensor([[2.0, 1.0], [0.0, 1.0]])))
    assert not module.inverse.is_contiguous()
    expected = module.inverse.clone()
    DistContext(backend="nccl").broadcast_buffers(module)
    assert torch.equal(module.inverse, expected)
