"""Hardware probes: the real host probe, NVML on a GPU-less machine and through a fake
``pynvml`` module, and describe_machine / device_fingerprint driven by fakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from dataclasses import asdict

import pytest

from autotune.probes import (
    FakeHostProbe,
    FakeNvmlProbe,
    FakeTorchCudaProbe,
    GpuInfo,
    HostInfo,
    HostProbe,
    NvmlProbe,
    ProcessMemory,
    Probes,
    TorchInfo,
    describe_machine,
    device_fingerprint,
    select_gpu,
    torch_info,
)

GiB = 2**30
PID = os.getpid()

HOST = HostInfo(
    usable_cores=8, logical_cores=16, physical_cores=8,
    ram_total_bytes=64 * GiB, ram_available_bytes=48 * GiB, cpu_name="Test CPU 9000",
)
TORCH = TorchInfo(
    torch_version="2.5.1+cu124", cuda_version="12.4", cudnn_version=90100,
    cuda_available=True, device_count=2, bf16_supported_cuda=True,
)


def make_gpu(index: int, name: str = "NVIDIA H100 80GB HBM3") -> GpuInfo:
    return GpuInfo(
        index=index, name=name, total_bytes=80 * GiB, used_bytes=3 * GiB,
        free_bytes=77 * GiB, reserved_bytes=GiB // 2, driver_version="550.54.15",
        cuda_driver_version="12.4", processes=[ProcessMemory(PID, GiB), ProcessMemory(1, 2 * GiB)],
        this_process_bytes=GiB, other_processes_bytes=2 * GiB,
    )


# ------------------------------------------------------------------- real probes


def test_import_touches_neither_torch_nor_nvml():
    code = "import sys, autotune.probes; print('torch' in sys.modules, 'pynvml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_real_host_probe_is_sane():
    probe = HostProbe()
    info = probe.info()
    assert 1 <= info.usable_cores <= info.logical_cores
    assert info.physical_cores is None or 1 <= info.physical_cores <= info.logical_cores
    assert 0 < info.ram_available_bytes <= info.ram_total_bytes
    assert isinstance(info.cpu_name, str) and info.cpu_name
    rss = probe.process_rss_bytes()
    assert rss > 0
    peak = probe.process_peak_rss_bytes()
    assert peak is None or peak >= rss // 2  # ru_maxrss is sampled; allow slack, catch units


def test_real_nvml_probe_never_raises():
    probe = NvmlProbe()
    if probe.available():  # a GPU machine: the list is real
        assert all(isinstance(g, GpuInfo) for g in probe.gpus())
    else:  # this CPU-only machine: no driver, no library
        assert probe.gpus() == []
        assert probe.process_used_bytes(0) is None
        assert probe.gpu(0) is None


def test_real_torch_info_is_consistent():
    import torch

    info = torch_info()
    assert info.torch_version == str(torch.__version__)
    if not info.cuda_available:
        assert info.device_count == 0 and info.bf16_supported_cuda is None
    json.dumps(asdict(info))


# --------------------------------------------------------------- fake pynvml


class FakeNVMLError(Exception):
    pass


def fake_pynvml(
    devices: list[dict],
    *,
    v2: bool = True,
    init_error: bool = False,
    process_error: bool = False,
    name_as_bytes: bool = True,
    fail_after_init: BaseException | None = None,
) -> types.ModuleType:
    """A stand-in for ``pynvml`` with the calls NvmlProbe makes; counts nvmlInit calls."""
    m = types.ModuleType("pynvml")
    m.NVMLError = FakeNVMLError
    m.init_calls = 0
    if v2:
        m.nvmlMemory_v2 = 0x02000028

    def nvmlInit():
        m.init_calls += 1
        if init_error:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def get_memory(handle, version=None):
        device = devices[handle]
        if version is not None:
            if not device.get("driver_has_v2", True):
                raise FakeNVMLError("Function Not Found")
            return types.SimpleNamespace(total=device["total"], used=device["used"],
                                         free=device["free"], reserved=device["reserved"])
        # v1 folds the driver's reserve into used.
        return types.SimpleNamespace(total=device["total"], free=device["free"],
                                     used=device["used"] + device["reserved"])

    def get_processes(handle):
        if process_error:
            raise FakeNVMLError("Insufficient Permissions")
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used)
                for pid, used in devices[handle]["processes"]]

    def get_name(handle):
        name = devices[handle]["name"]
        return name.encode() if name_as_bytes else name

    def by_uuid(uuid):
        for index, spec in enumerate(devices):
            if spec.get("uuid", f"GPU-{index:08d}") == uuid:
                return index
            for mig_index, mig in enumerate(spec.get("migs", [])):
                if mig["uuid"] == uuid:
                    devices.append({**spec, **mig, "migs": []})
                    return len(devices) - 1
        raise FakeNVMLError("Not Found")

    def after_init(function):
        def call(*args, **kwargs):
            if fail_after_init is not None:
                raise fail_after_init
            return function(*args, **kwargs)
        return call

    count = len(devices)
    m.nvmlInit = nvmlInit
    m.shutdown_calls = 0

    def nvmlShutdown():
        m.shutdown_calls += 1

    m.nvmlShutdown = nvmlShutdown
    m.nvmlDeviceGetCount = after_init(lambda: count)
    m.nvmlDeviceGetHandleByIndex = after_init(lambda index: index)
    m.nvmlDeviceGetHandleByUUID = after_init(by_uuid)
    m.nvmlDeviceGetUUID = after_init(lambda handle: devices[handle].get("uuid", f"GPU-{handle:08d}"))
    m.nvmlDeviceGetName = get_name
    m.nvmlDeviceGetMemoryInfo = get_memory
    m.nvmlDeviceGetComputeRunningProcesses = get_processes
    m.nvmlSystemGetDriverVersion = lambda: b"550.54.15"
    m.nvmlSystemGetCudaDriverVersion = lambda: 12040
    return m


def device(name="NVIDIA H100 80GB HBM3", processes=(), **overrides) -> dict:
    spec = {"name": name, "total": 80 * GiB, "used": 5 * GiB, "free": 74 * GiB,
            "reserved": GiB, "processes": list(processes)}
    spec.update(overrides)
    return spec


@pytest.fixture
def install_pynvml(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def install(module):
        monkeypatch.setitem(sys.modules, "pynvml", module)
        return module

    return install


def test_nvml_memory_v2_reports_reserved(install_pynvml):
    install_pynvml(fake_pynvml([device()]))
    gpu = NvmlProbe().gpu(0)
    assert (gpu.total_bytes, gpu.used_bytes, gpu.free_bytes) == (80 * GiB, 5 * GiB, 74 * GiB)
    assert gpu.reserved_bytes == GiB
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.driver_version == "550.54.15"
    assert gpu.cuda_driver_version == "12.4"


@pytest.mark.parametrize("v2", [True, False], ids=["driver-lacks-v2", "pynvml-lacks-v2"])
def test_nvml_memory_falls_back_to_v1(install_pynvml, v2):
    install_pynvml(fake_pynvml([device(driver_has_v2=False)], v2=v2))
    gpu = NvmlProbe().gpu(0)
    assert gpu.reserved_bytes is None
    assert gpu.used_bytes == 6 * GiB  # v1: reserve included


def test_nvml_splits_this_process_from_others(install_pynvml):
    install_pynvml(fake_pynvml([device(processes=[(PID, GiB), (111, 2 * GiB), (222, 3 * GiB)])]))
    probe = NvmlProbe()
    gpu = probe.gpu(0)
    assert gpu.processes == [ProcessMemory(PID, GiB), ProcessMemory(111, 2 * GiB),
                             ProcessMemory(222, 3 * GiB)]
    assert (gpu.this_process_bytes, gpu.other_processes_bytes) == (GiB, 5 * GiB)
    assert probe.process_used_bytes(0) == GiB


def test_nvml_unknown_usage_is_none_not_zero(install_pynvml):
    install_pynvml(fake_pynvml([device(processes=[(PID, None), (111, 2 * GiB), (222, None)])]))
    probe = NvmlProbe()
    gpu = probe.gpu(0)
    assert gpu.processes[0] == ProcessMemory(PID, None)
    assert gpu.this_process_bytes is None
    assert gpu.other_processes_bytes is None  # 2 GiB would understate it
    assert probe.process_used_bytes(0) is None


def test_nvml_this_process_not_listed_is_zero(install_pynvml):
    install_pynvml(fake_pynvml([device(processes=[(111, 2 * GiB)])]))
    gpu = NvmlProbe().gpu(0)
    assert (gpu.this_process_bytes, gpu.other_processes_bytes) == (0, 2 * GiB)


def test_nvml_process_list_refused(install_pynvml):
    install_pynvml(fake_pynvml([device(processes=[(PID, GiB)])], process_error=True,
                               name_as_bytes=False))
    probe = NvmlProbe()
    gpu = probe.gpu(0)
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.processes == []
    assert (gpu.this_process_bytes, gpu.other_processes_bytes) == (None, None)
    assert probe.process_used_bytes(0) is None


def test_nvml_init_failure_means_unavailable_and_init_runs_once(install_pynvml):
    module = install_pynvml(fake_pynvml([device()], init_error=True))
    probe = NvmlProbe()
    assert probe.available() is False
    assert probe.gpus() == []
    assert probe.process_used_bytes(0) is None
    assert module.init_calls == 1


def test_nvml_without_pynvml_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes ``import pynvml`` fail
    probe = NvmlProbe()
    assert probe.available() is False
    assert probe.gpus() == []


def test_nvml_init_once_across_calls(install_pynvml):
    module = install_pynvml(fake_pynvml([device(), device()]))
    probe = NvmlProbe()
    probe.gpus()
    probe.gpu(1)
    probe.process_used_bytes(0)
    assert module.init_calls == 1


@pytest.mark.parametrize(
    ("visible", "expected_names"),
    [
        (None, ["gpu0", "gpu1", "gpu2"]),
        ("2,0", ["gpu2", "gpu0"]),
        ("1,7,0", ["gpu1"]),  # CUDA ignores everything from the first invalid entry
        ("", []),  # an empty value hides every device
        ("GPU-00000002,GPU-00000000", ["gpu2", "gpu0"]),  # UUIDs resolve through NVML
        ("GPU-00000001,GPU-nowhere", ["gpu1"]),  # and stop at the first unknown one
    ],
)
def test_nvml_honours_cuda_visible_devices(install_pynvml, monkeypatch, visible, expected_names):
    install_pynvml(fake_pynvml([device(name=f"gpu{i}") for i in range(3)]))
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    gpus = NvmlProbe().gpus()
    assert [g.name for g in gpus] == expected_names
    assert [g.index for g in gpus] == list(range(len(expected_names)))


def test_nvml_gpu_index_out_of_range_is_no_reading(install_pynvml, monkeypatch):
    install_pynvml(fake_pynvml([device(), device()]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    probe = NvmlProbe()
    assert probe.gpu(1) is None
    assert "cuda:1" in probe.last_error


def test_nvml_mig_uuid_reads_the_slice_not_the_card(install_pynvml, monkeypatch):
    """gpu-review #10: MIG-<uuid> used to fall back to index 0, the whole card."""
    card = device(name="NVIDIA A100-SXM4-80GB", uuid="GPU-aaaa",
                  migs=[{"uuid": "MIG-bbbb", "name": "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
                         "total": 40 * GiB, "free": 39 * GiB, "used": GiB}])
    install_pynvml(fake_pynvml([card]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-bbbb")
    gpu = NvmlProbe().gpu(0)
    assert (gpu.name, gpu.total_bytes) == ("NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40 * GiB)


class NVMLLibraryMismatchError(Exception):
    """pynvml's own, deliberately not an NVMLError subclass."""


@pytest.mark.parametrize("error", [FakeNVMLError("GPU is lost"), NVMLLibraryMismatchError("mismatch")])
def test_nvml_errors_after_init_are_no_reading_never_a_crash(install_pynvml, error):
    """gpu-review #14: errors after a successful init used to escape the probe."""
    install_pynvml(fake_pynvml([device()], fail_after_init=error))
    probe = NvmlProbe()
    assert probe.available()
    assert probe.gpus() == [] and probe.gpu(0) is None
    assert probe.process_used_bytes(0) is None and probe.device_used_bytes(0) is None
    assert type(error).__name__ in probe.last_error


def test_nvml_close_shuts_nvml_down_and_a_later_call_initialises_again(install_pynvml):
    """gpu-review #21: nvmlShutdown was never called."""
    module = install_pynvml(fake_pynvml([device()]))
    probe = NvmlProbe()
    assert probe.gpus()
    probe.close()
    assert module.shutdown_calls == 1
    assert probe.gpus() and module.init_calls == 2


# ------------------------------------------------------------ fakes and bundle


def fake_probes(gpus: list[GpuInfo]) -> Probes:
    return Probes(
        nvml=FakeNvmlProbe(gpus),
        cuda=FakeTorchCudaProbe(40 * GiB, free_bytes=30 * GiB, name="Runtime GPU"),
        host=FakeHostProbe(HOST, rss_bytes=123),
        torch=lambda: TORCH,
    )


def test_device_fingerprint_gpu_and_cpu(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert device_fingerprint(make_gpu(1), HOST, TORCH, "cuda:1") == {
        "device_type": "cuda",
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "gpu_total_bytes": 80 * GiB,
        "driver_version": "550.54.15",
        "torch_version": "2.5.1+cu124",
        "cuda_version": "12.4",
        "allocator_config": None,
        "usable_cores": 8,
        "cpu_name": "Test CPU 9000",
    }
    cpu = device_fingerprint(None, HOST, TORCH, "cpu")
    assert cpu["device_type"] == "cpu"
    assert cpu["gpu_name"] is cpu["gpu_total_bytes"] is cpu["driver_version"] is None


def test_describe_machine_with_fakes_is_json_and_selects_the_device(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    probes = fake_probes([make_gpu(0, "first"), make_gpu(1, "second")])
    described = describe_machine(probes, "cuda:1")
    json.dumps(described)
    assert described["nvml_available"] is True
    assert [g["name"] for g in described["gpus"]] == ["first", "second"]
    assert described["selected_gpu"]["name"] == "second"
    assert described["selected_gpu"]["other_processes_bytes"] == 2 * GiB
    assert described["host"] == asdict(HOST)
    assert described["torch"] == asdict(TORCH)
    assert described["process_rss_bytes"] == 123
    assert described["fingerprint"] == {
        "device_type": "cuda",
        "gpu_name": "second",
        "gpu_total_bytes": 80 * GiB,
        "driver_version": "550.54.15",
        "torch_version": "2.5.1+cu124",
        "cuda_version": "12.4",
        "allocator_config": None,
        "usable_cores": 8,
        "cpu_name": "Test CPU 9000",
    }


def test_describe_machine_on_cpu_has_no_selected_gpu():
    described = describe_machine(fake_probes([make_gpu(0)]), "cpu")
    assert described["selected_gpu"] is None
    assert described["fingerprint"]["gpu_name"] is None


def test_select_gpu_falls_back_to_the_cuda_runtime_without_nvml():
    gpu = select_gpu(fake_probes([]), "cuda")
    assert gpu is not None
    assert (gpu.name, gpu.total_bytes, gpu.free_bytes, gpu.used_bytes) == (
        "Runtime GPU", 40 * GiB, 30 * GiB, 10 * GiB)
    assert gpu.reserved_bytes is None and gpu.driver_version == "unknown"


def test_fake_torch_cuda_probe_tracks_peaks_like_the_allocator():
    cuda = FakeTorchCudaProbe(16 * GiB)
    cuda.allocated, cuda.reserved = 3 * GiB, 4 * GiB
    assert (cuda.peak_allocated_bytes(0), cuda.peak_reserved_bytes(0)) == (3 * GiB, 4 * GiB)
    cuda.allocated = cuda.reserved = GiB
    assert cuda.peak_reserved_bytes(0) == 4 * GiB  # a peak outlives the allocation
    cuda.reset_peak(0)
    assert cuda.peak_reserved_bytes(0) == GiB
    cuda.set_memory_fraction(0.25, 0)
    assert cuda.memory_fraction(0) == 0.25
    assert cuda.mem_get_info(0) == (15 * GiB, 16 * GiB)  # the GiB still reserved is in use


def test_fingerprint_records_the_allocator_config_and_torchs_total(monkeypatch):
    """gpu-review #4 and #10: PYTORCH_CUDA_ALLOC_CONF changes every peak, and on a MIG
    slice torch's total (the slice's) is the one that matters."""
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    fp = device_fingerprint(make_gpu(0), HOST, TORCH, "cuda", cuda_total_bytes=40 * GiB)
    assert fp["allocator_config"] == "expandable_segments:True"
    assert fp["gpu_total_bytes"] == 40 * GiB
    assert device_fingerprint(None, HOST, TORCH, "cpu")["allocator_config"] is None
