"""Hardware behind small probes: NVML, torch.cuda and the host, each with a fake.

The tuner's decisions are pure functions of measurements; this module is where the
measurements of the machine itself come from. Every probe imports its library
lazily (inside a method), so importing this module never touches the GPU, never
initialises CUDA and never imports torch: a CPU-only test run, or ``--help``, stays
fast and cannot fail on a broken driver. The fakes carry the same methods and are
configured through their constructors, so the tuner can be tested without a GPU.

Memory views, and why there are several (see docs/design.md, "Memory facts"):

* NVML sees the whole device: every process and the driver. Its v2 memory info
  reports the driver's ``reserved`` memory separately (and then ``used`` excludes it);
  v1 folds it into ``used``. NVML also lists the processes holding memory, which is how
  "memory other processes hold" is told apart from ours.
* ``torch.cuda.mem_get_info`` is the device-wide free/total as the CUDA runtime sees it.
* The caching allocator's peaks (``max_memory_reserved``) are what this process really
  needed for a trial.
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from autotune.device import CudaDevice, FakeCudaDevice, allocator_config, shm_bytes, usable_cores

__all__ = [
    "FakeHostProbe",
    "FakeNvmlProbe",
    "FakeTorchCudaProbe",
    "GpuInfo",
    "HostInfo",
    "HostProbe",
    "NvmlProbe",
    "ProcessMemory",
    "Probes",
    "TorchCudaProbe",
    "TorchInfo",
    "describe_machine",
    "device_fingerprint",
    "real_probes",
    "select_gpu",
    "torch_info",
]


@dataclass
class ProcessMemory:
    """One process holding device memory, as NVML lists it."""

    pid: int
    used_bytes: int | None
    """None where the driver cannot tell (Windows WDDM, some MIG and vGPU setups)."""


@dataclass
class GpuInfo:
    """One GPU as NVML (or, without NVML, the CUDA runtime) reports it."""

    index: int
    """CUDA device index as torch numbers it (``cuda:<index>``), not the NVML index."""
    name: str
    total_bytes: int
    used_bytes: int
    """NVML's ``used``: excludes ``reserved_bytes`` with memory info v2, includes it with v1."""
    free_bytes: int
    reserved_bytes: int | None
    """Memory the driver reserves (NVML memory info v2); None where the driver lacks v2."""
    driver_version: str
    cuda_driver_version: str | None
    """Highest CUDA version the driver supports ('12.4'); None where NVML cannot tell."""
    processes: list[ProcessMemory] = field(default_factory=list)
    this_process_bytes: int | None = None
    """What this process holds; 0 when it is not listed, None when the list is unavailable
    or NVML cannot tell its usage."""
    other_processes_bytes: int | None = None
    """What every other process holds; None when the list is unavailable or any other
    process's usage is unknown (a partial sum would understate it)."""


@dataclass
class HostInfo:
    usable_cores: int
    """Cores this process may run on (CPU affinity, cgroup cpusets, a cgroup CPU quota),
    not the machine's count."""
    logical_cores: int
    physical_cores: int | None
    """None where psutil cannot tell (some containers and VMs)."""
    ram_total_bytes: int
    ram_available_bytes: int
    cpu_name: str
    shm_bytes: int | None = None
    """Size of /dev/shm, through which DataLoader workers pass batches; None: unknown."""


@dataclass
class TorchInfo:
    torch_version: str
    cuda_version: str | None
    """CUDA version torch was built with; None for a CPU build."""
    cudnn_version: int | None
    cuda_available: bool
    device_count: int
    bf16_supported_cuda: bool | None
    """Native bf16 on cuda:0 (compute capability 8.0+; emulated bf16 does not count);
    None when CUDA is unavailable (the question does not apply)."""


# --------------------------------------------------------------------------- NVML


def _visible_tokens() -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it: None when unset, else its entries."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return None
    return [token.strip() for token in env.split(",")]


def _visible_nvml_indices(nvml_count: int) -> list[int]:
    """NVML indices of the devices this process sees, in CUDA index order, for integer
    ``CUDA_VISIBLE_DEVICES`` (``2,3`` makes ``cuda:0`` NVML device 2). CUDA stops at the
    first entry that names no device, and an empty value hides every device; both are
    honoured. UUID entries are resolved by :meth:`NvmlProbe._visible_handles`.
    Limitation: CUDA numbers devices fastest-first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``,
    while NVML uses PCI bus order, so on a machine mixing GPU models the identity
    mapping may pair the wrong devices.
    """
    tokens = _visible_tokens()
    if tokens is None:
        return list(range(nvml_count))
    indices: list[int] = []
    for token in tokens:
        try:
            index = int(token)
        except ValueError:
            break
        if not 0 <= index < nvml_count:
            break
        indices.append(index)
    return indices


def _text(value: str | bytes) -> str:
    """pynvml returns bytes from older releases and str from newer ones."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class NvmlProbe:
    """GPUs as NVML sees them. Initialises NVML on first use, at most once.

    A machine without the NVIDIA driver, or without ``nvidia-ml-py`` installed, is not an
    error here: ``available()`` is False and ``gpus()`` is empty. NVML is optional, so no
    call after a successful init may end the caller either: a GPU lost, a permission
    refused, ``NVMLLibraryMismatchError`` (not an NVMLError subclass), a device index
    that maps nowhere all read as "no NVML reading" (None or empty), and
    ``last_error`` says why.
    """

    def __init__(self) -> None:
        self._nvml: Any = None
        self._initialised: bool | None = None  # None: not tried yet
        self.last_error: str | None = None

    def available(self) -> bool:
        if self._initialised is None:
            self._initialised = self._init()
        return self._initialised

    def _init(self) -> bool:
        try:
            import pynvml
        except ImportError:
            return False
        try:
            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - NVMLError, OSError, NVMLLibraryMismatchError...
            # "library not found", "driver not loaded", a libnvidia-ml that exists but
            # cannot be loaded or does not match: NVML is then simply unavailable.
            return False
        self._nvml = pynvml
        return True

    def close(self) -> None:
        """``nvmlShutdown`` (NVML counts inits); a later call initialises it again."""
        if self._initialised:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
        self._initialised = None
        self._nvml = None

    def _guarded(self, read: Callable[[], Any], default: Any) -> Any:
        try:
            return read()
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            self.last_error = f"{type(exc).__name__}: {exc}"
            return default

    def _visible_handles(self) -> list[Any]:
        """NVML handles of the devices this process sees, in CUDA index order.

        ``GPU-<uuid>`` and ``MIG-<uuid>`` entries (full, or a unique prefix as CUDA
        accepts) resolve by UUID: a MIG entry gives the slice's handle, whose memory is
        the slice's, not the whole card's.
        """
        nvml = self._nvml
        count = nvml.nvmlDeviceGetCount()
        tokens = _visible_tokens()
        if tokens is None or not tokens[0] or tokens[0].lstrip("-").isdigit():
            return [nvml.nvmlDeviceGetHandleByIndex(i) for i in _visible_nvml_indices(count)]
        handles = []
        for token in tokens:
            handle = self._handle_by_uuid(token, count)
            if handle is None:
                break  # CUDA stops at the first entry that names no device
            handles.append(handle)
        return handles

    def _handle_by_uuid(self, token: str, count: int) -> Any:
        nvml = self._nvml
        try:
            return nvml.nvmlDeviceGetHandleByUUID(token)
        except Exception:  # noqa: BLE001 - a prefix: match it below
            pass
        matches = []
        for index in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            if _text(nvml.nvmlDeviceGetUUID(handle)).startswith(token):
                matches.append(handle)
        return matches[0] if len(matches) == 1 else None

    def gpus(self) -> list[GpuInfo]:
        """Every GPU visible to this process, indexed as torch numbers them."""
        if not self.available():
            return []
        return self._guarded(
            lambda: [self._read(i, h) for i, h in enumerate(self._visible_handles())], []
        )

    def gpu(self, index: int) -> GpuInfo | None:
        """The GPU torch calls ``cuda:<index>``; None when NVML cannot say."""
        if not self.available():
            return None
        return self._guarded(lambda: self._read(index, self._handle(index)), None)

    def process_used_bytes(self, index: int) -> int | None:
        """Device memory this process holds on ``cuda:<index>`` according to NVML.

        Read after the first real step to measure the context and the libraries' handles,
        which the allocator's counters do not include. 0 when this process is not listed;
        inside a container without the host's PID namespace NVML reports host PIDs, so
        this process is never found (see :meth:`device_used_bytes`). None when NVML is
        unavailable or cannot list processes or their usage.
        """
        if not self.available():
            return None

        def read() -> int | None:
            processes = self._processes(self._handle(index))
            return None if processes is None else _split_processes(processes, os.getpid())[0]

        return self._guarded(read, None)

    def device_used_bytes(self, index: int) -> int | None:
        """NVML's device-wide ``used``: the fallback when this process is not listed."""
        if not self.available():
            return None
        return self._guarded(lambda: int(self._memory(self._handle(index))[0].used), None)

    def _handle(self, index: int) -> Any:
        visible = self._visible_handles()
        if not 0 <= index < len(visible):
            raise IndexError(f"no GPU cuda:{index} visible to NVML ({len(visible)} visible)")
        return visible[index]

    def _read(self, cuda_index: int, handle: Any) -> GpuInfo:
        nvml = self._nvml
        memory, reserved = self._memory(handle)
        processes = self._processes(handle)
        if processes is None:
            this_bytes = other_bytes = None
        else:
            this_bytes, other_bytes = _split_processes(processes, os.getpid())
        return GpuInfo(
            index=cuda_index,
            name=_text(nvml.nvmlDeviceGetName(handle)),
            total_bytes=int(memory.total),
            used_bytes=int(memory.used),
            free_bytes=int(memory.free),
            reserved_bytes=reserved,
            driver_version=_text(nvml.nvmlSystemGetDriverVersion()),
            cuda_driver_version=self._cuda_driver_version(),
            processes=processes or [],
            this_process_bytes=this_bytes,
            other_processes_bytes=other_bytes,
        )

    def _memory(self, handle: Any) -> tuple[Any, int | None]:
        """Memory info v2 where the driver and pynvml have it, else v1 (no ``reserved``)."""
        nvml = self._nvml
        version = getattr(nvml, "nvmlMemory_v2", None)
        if version is not None:
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
                return memory, int(memory.reserved)
            except (nvml.NVMLError, TypeError):
                # Drivers before R510 lack the v2 entry point (FUNCTION_NOT_FOUND) or
                # refuse the version (ARGUMENT_VERSION_MISMATCH); old pynvml has no
                # ``version`` argument. v1 still answers.
                pass
        return nvml.nvmlDeviceGetMemoryInfo(handle), None

    def _processes(self, handle: Any) -> list[ProcessMemory] | None:
        """Compute processes on the device; None where NVML refuses to list them
        (no permission, MIG without the right privileges, unsupported)."""
        nvml = self._nvml
        try:
            running = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except nvml.NVMLError:
            return None
        return [
            ProcessMemory(
                pid=int(p.pid),
                used_bytes=None if p.usedGpuMemory is None else int(p.usedGpuMemory),
            )
            for p in running
        ]

    def _cuda_driver_version(self) -> str | None:
        nvml = self._nvml
        try:
            version = int(nvml.nvmlSystemGetCudaDriverVersion())
        except (nvml.NVMLError, AttributeError):
            return None
        return f"{version // 1000}.{version % 1000 // 10}"  # 12040 -> '12.4'


def _split_processes(processes: list[ProcessMemory], pid: int) -> tuple[int | None, int | None]:
    """(this process's bytes, other processes' bytes); None where a usage is unknown."""
    return (
        _sum_known([p.used_bytes for p in processes if p.pid == pid]),
        _sum_known([p.used_bytes for p in processes if p.pid != pid]),
    )


def _sum_known(values: list[int | None]) -> int | None:
    total = 0
    for value in values:
        if value is None:
            return None
        total += value
    return total


class FakeNvmlProbe:
    """NvmlProbe over a fixed list of GPUs; an empty list behaves like a machine without NVML."""

    def __init__(self, gpus: list[GpuInfo]) -> None:
        self._gpus = list(gpus)

    def available(self) -> bool:
        return bool(self._gpus)

    def gpus(self) -> list[GpuInfo]:
        return list(self._gpus)

    def gpu(self, index: int) -> GpuInfo | None:
        return next((gpu for gpu in self._gpus if gpu.index == index), None)

    def process_used_bytes(self, index: int) -> int | None:
        gpu = self.gpu(index)
        return None if gpu is None else gpu.this_process_bytes

    def device_used_bytes(self, index: int) -> int | None:
        gpu = self.gpu(index)
        return None if gpu is None else gpu.used_bytes

    def close(self) -> None:
        pass


# --------------------------------------------------------------------- torch.cuda
# The torch.cuda probe is the device seam itself (autotune.device); these names stay
# for the code and tests that knew it as a probe.
TorchCudaProbe = CudaDevice
FakeTorchCudaProbe = FakeCudaDevice


# ---------------------------------------------------------------------------- host


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    # ARM Linux has no 'model name'; macOS and Windows have no /proc.
    return platform.processor() or platform.machine() or "unknown CPU"


class HostProbe:
    """CPU cores, RAM and this process's memory, through psutil and the OS."""

    def info(self) -> HostInfo:
        import psutil

        memory = psutil.virtual_memory()
        return HostInfo(
            usable_cores=usable_cores(),
            shm_bytes=shm_bytes(),
            logical_cores=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
            physical_cores=psutil.cpu_count(logical=False),
            ram_total_bytes=int(memory.total),
            ram_available_bytes=int(memory.available),
            cpu_name=_cpu_name(),
        )

    def process_rss_bytes(self) -> int:
        import psutil

        return int(psutil.Process().memory_info().rss)

    def process_peak_rss_bytes(self) -> int | None:
        """Peak resident memory of this process (VmHWM, not a parent's peak carried across
        exec); None where neither /proc nor ``resource`` exists (Windows)."""
        try:
            from autotune.trial_server import peak_rss_bytes

            return peak_rss_bytes()
        except ImportError:
            return None


class FakeHostProbe:
    """HostProbe with a fixed HostInfo; the RSS readings are plain attributes."""

    def __init__(self, info: HostInfo, rss_bytes: int = 0, peak_rss_bytes: int | None = 0) -> None:
        self._info = info
        self.rss_bytes = rss_bytes
        self.peak_rss_bytes = peak_rss_bytes

    def info(self) -> HostInfo:
        return self._info

    def process_rss_bytes(self) -> int:
        return self.rss_bytes

    def process_peak_rss_bytes(self) -> int | None:
        return self.peak_rss_bytes


# --------------------------------------------------------------------------- torch


def torch_info() -> TorchInfo:
    """What torch was built with and what it sees. Initialises CUDA when it is present."""
    import torch

    cuda_available = torch.cuda.is_available()
    try:
        cudnn_version = torch.backends.cudnn.version()
    except RuntimeError:  # a cuDNN that fails to load reports here, not at import
        cudnn_version = None
    return TorchInfo(
        torch_version=str(torch.__version__),
        cuda_version=torch.version.cuda,
        cudnn_version=cudnn_version,
        cuda_available=cuda_available,
        device_count=torch.cuda.device_count() if cuda_available else 0,
        bf16_supported_cuda=CudaDevice().bf16_supported(0) if cuda_available else None,
    )


# -------------------------------------------------------------------------- bundle


@dataclass
class Probes:
    """The probes the tuner reads the machine through; tests pass fakes."""

    nvml: NvmlProbe | FakeNvmlProbe
    cuda: TorchCudaProbe | FakeTorchCudaProbe
    host: HostProbe | FakeHostProbe
    torch: Callable[[], TorchInfo] = torch_info
    """Returns the TorchInfo; a test passes ``lambda: TorchInfo(...)``."""


def real_probes() -> Probes:
    """Probes of this machine. Cheap: nothing is read until a method is called."""
    return Probes(nvml=NvmlProbe(), cuda=TorchCudaProbe(), host=HostProbe())


def _parse_device(device_type: str) -> tuple[str, int]:
    """'cuda:1' -> ('cuda', 1); 'cuda' -> ('cuda', 0); 'cpu' -> ('cpu', 0)."""
    kind, _, index = device_type.partition(":")
    return kind, int(index) if index else 0


def select_gpu(probes: Probes, device_type: str) -> GpuInfo | None:
    """The GPU a run on ``device_type`` ('cpu', 'cuda', 'cuda:N') uses; None on the CPU.

    Prefers NVML (driver version, other processes); without it (NVML library missing,
    e.g. some WSL and container setups) falls back to what the CUDA runtime reports,
    with the driver version unknown.
    """
    kind, index = _parse_device(device_type)
    if kind != "cuda":
        return None
    if probes.nvml.available():
        gpu = probes.nvml.gpu(index)
        if gpu is not None:
            return gpu
    if not probes.cuda.available():
        return None
    free, total = probes.cuda.mem_get_info(index)
    return GpuInfo(
        index=index,
        name=probes.cuda.device_name(index),
        total_bytes=total,
        used_bytes=total - free,
        free_bytes=free,
        reserved_bytes=None,
        driver_version="unknown",
        cuda_driver_version=None,
    )


def device_fingerprint(
    gpu: GpuInfo | None,
    host: HostInfo,
    torch: TorchInfo,
    device_type: str,
    cuda_total_bytes: int | None = None,
) -> dict[str, Any]:
    """What a tuned file's measurements depend on; a change means they may not hold.

    ``device_type`` is reduced to its kind ('cuda:1' -> 'cuda'): two identical cards give
    the same measurements whatever their index. GPU keys are None on the CPU. The
    allocator configuration (``PYTORCH_CUDA_ALLOC_CONF``) changes every peak, so it is
    part of it.
    """
    kind, _ = _parse_device(device_type)
    return {
        "device_type": kind,
        "gpu_name": gpu.name if gpu else None,
        # torch's own total where known: on a MIG slice NVML's parent view would let a
        # file tuned on a 3g.40gb slice pass for a 1g.10gb one.
        "gpu_total_bytes": (cuda_total_bytes or gpu.total_bytes) if gpu else None,
        "allocator_config": allocator_config() if kind == "cuda" else None,
        "driver_version": gpu.driver_version if gpu else None,
        "torch_version": torch.torch_version,
        "cuda_version": torch.cuda_version,
        "usable_cores": host.usable_cores,
        "cpu_name": host.cpu_name,
    }


def describe_machine(probes: Probes, device_type: str) -> dict[str, Any]:
    """Everything the probes know, as plain JSON-ready data, for printing and for logs.

    ``gpus`` lists every visible GPU (other processes' memory included), not only the one
    ``device_type`` selects, because a busy neighbour card explains surprises.
    """
    host = probes.host.info()
    torch = probes.torch()
    gpu = select_gpu(probes, device_type)
    return {
        "device_type": device_type,
        "nvml_available": probes.nvml.available(),
        "gpus": [asdict(g) for g in probes.nvml.gpus()],
        "selected_gpu": asdict(gpu) if gpu else None,
        "host": asdict(host),
        "process_rss_bytes": probes.host.process_rss_bytes(),
        "torch": asdict(torch),
        "fingerprint": device_fingerprint(gpu, host, torch, device_type),
    }
