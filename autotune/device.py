"""The device seam: every ``torch.cuda`` call the tuner, a trial and the trainer make.

One small interface (:class:`CudaDevice` and its stand-ins) so that CPU tests can drive
every CUDA branch through :class:`FakeCudaDevice`: memory that fills and fails at the
per-process cap, a context that grows when cuDNN/cuBLAS first run, a MIG slice, a
UUID. The host side of the seam (usable cores under a CPU quota, the size of /dev/shm)
and the "torch cannot see the GPU NVML sees" check live here too.

Nothing here imports torch or NVML at import time, and nothing imports ``arwgan``: the
engine must not depend on one workload.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CpuDevice",
    "CudaDevice",
    "FakeCudaDevice",
    "FakeCudaNvml",
    "FakeOutOfMemoryError",
    "allocator_config",
    "configure_cudnn",
    "memory_capped",
    "shm_bytes",
    "unusable_gpu_message",
    "usable_cores",
    "wheel_index_for_driver",
]

#: Compute capability from which bf16 runs natively (Ampere). ``is_bf16_supported()``
#: also answers True where it is emulated (V100, T4): offered there, it is slow.
BF16_MIN_CAPABILITY = (8, 0)


# ------------------------------------------------------------------------------- CUDA


class CudaDevice:
    """``torch.cuda`` behind the methods the tuner and the trainer use; torch is
    imported on the first call. Methods take the CUDA index (``cuda:<index>``)."""

    def __init__(self) -> None:
        # Fallback for torch builds without get_per_process_memory_fraction: the last
        # fraction this process set (torch's default is 1.0).
        self._fractions: dict[int, float] = {}

    @staticmethod
    def _cuda() -> Any:
        import torch

        return torch.cuda

    def available(self) -> bool:
        return bool(self._cuda().is_available())

    def device_count(self) -> int:
        return int(self._cuda().device_count())

    def init_context(self, index: int) -> None:
        """Create the CUDA context on ``cuda:<index>`` (one tiny allocation)."""
        import torch

        torch.zeros(1, device=torch.device("cuda", index))

    def set_device(self, index: int) -> None:
        """Make ``cuda:<index>`` current: the pin-memory thread and every call without an
        explicit device otherwise go to cuda:0 (a stray context there)."""
        self._cuda().set_device(index)

    def device_name(self, index: int) -> str:
        return str(self._cuda().get_device_name(index))

    def capability(self, index: int) -> tuple[int, int]:
        major, minor = self._cuda().get_device_capability(index)
        return int(major), int(minor)

    def uuid(self, index: int) -> str | None:
        uuid = getattr(self._cuda().get_device_properties(index), "uuid", None)
        return None if uuid is None else str(uuid)

    def total_bytes(self, index: int) -> int:
        """The memory torch can address on this device (a MIG slice's, not the card's)."""
        return int(self._cuda().get_device_properties(index).total_memory)

    def bf16_supported(self, index: int) -> bool:
        """Native bf16 only (compute capability 8.0+), see :data:`BF16_MIN_CAPABILITY`."""
        return self.available() and self.capability(index) >= BF16_MIN_CAPABILITY

    def mem_get_info(self, index: int) -> tuple[int, int]:
        """(free, total) bytes, device-wide: other processes' memory counts as used."""
        free, total = self._cuda().mem_get_info(index)
        return int(free), int(total)

    def synchronize(self, index: int) -> None:
        self._cuda().synchronize(index)

    def reset_peak(self, index: int) -> None:
        self._cuda().reset_peak_memory_stats(index)

    def peak_reserved_bytes(self, index: int) -> int:
        """What the allocator held at its peak since the last reset: the trial's real need."""
        return int(self._cuda().max_memory_reserved(index))

    def peak_allocated_bytes(self, index: int) -> int:
        return int(self._cuda().max_memory_allocated(index))

    def reserved_bytes(self, index: int) -> int:
        return int(self._cuda().memory_reserved(index))

    def allocated_bytes(self, index: int) -> int:
        return int(self._cuda().memory_allocated(index))

    def empty_cache(self) -> None:
        """Give every cached block back, cuBLAS's per-handle workspaces included: they come
        from the caching allocator and ``empty_cache`` alone never frees them (torch's own
        leak checker clears them the same way before it compares readings)."""
        import torch

        gc.collect()
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        self._cuda().empty_cache()

    def memory_fraction(self, index: int) -> float:
        """The per-process cap now in force (1.0: none)."""
        getter = getattr(self._cuda(), "get_per_process_memory_fraction", None)
        if getter is not None:
            return float(getter(index))
        return self._fractions.get(index, 1.0)

    def set_memory_fraction(self, fraction: float, index: int) -> None:
        """Make allocations fail at ``fraction`` of the device instead of at its limit."""
        self._cuda().set_per_process_memory_fraction(fraction, index)
        self._fractions[index] = fraction


class CpuDevice:
    """The seam on a CPU: nothing to synchronise, cap or empty."""

    def available(self) -> bool:
        return False

    def synchronize(self, index: int) -> None:
        pass

    def empty_cache(self) -> None:
        gc.collect()


class OutOfMemoryError(RuntimeError):
    """Raised by :class:`FakeCudaDevice`; named like torch's so that ``is_oom`` knows it."""


FakeOutOfMemoryError = OutOfMemoryError


class FakeCudaDevice:
    """A CUDA device with fixed capacity and an allocator that honours the cap.

    Tests either set ``allocated`` / ``reserved`` directly (the peaks follow them as
    torch's do, until ``reset_peak``) or call :meth:`allocate`, which fails with an
    OutOfMemoryError past ``fraction x total`` as torch's allocator does. The first
    :meth:`run_kernels` grows the context by ``lazy_context_bytes`` (cuDNN/cuBLAS handles
    and kernels loaded on first use, outside the allocator).
    """

    def __init__(
        self,
        total_bytes: int,
        free_bytes: int | None = None,
        name: str = "Fake GPU",
        bf16: bool = True,
        *,
        capability: tuple[int, int] | None = None,
        uuid: str = "GPU-00000000-1111-2222-3333-444444444444",
        context_bytes: int = 0,
        lazy_context_bytes: int = 0,
        other_processes_bytes: int = 0,
        device_count: int = 1,
    ) -> None:
        self.total = total_bytes
        self.free_bytes = free_bytes
        """A fixed answer for mem_get_info; None: the total less what is in use."""
        self.name = name
        self._capability = capability or ((9, 0) if bf16 else (7, 0))
        self._uuid = uuid
        self.context_size_bytes = context_bytes
        """The CUDA context :meth:`init_context` creates (outside the allocator)."""
        self.context_bytes = 0
        """Memory the process holds outside the allocator now."""
        self.lazy_context_bytes = lazy_context_bytes
        self.other_processes_bytes = other_processes_bytes
        self._device_count = device_count
        self._allocated = self._reserved = 0
        self._peak_allocated = self._peak_reserved = 0
        self.memory_fraction_value = 1.0
        self.fraction_history: list[float] = []
        self.empty_cache_calls = 0
        self.current_device: int | None = None
        self.kernels_loaded = False
        self.context_created = False

    # -- tests play a trial through these -------------------------------------------
    @property
    def allocated(self) -> int:
        return self._allocated

    @allocated.setter
    def allocated(self, value: int) -> None:
        self._allocated = value
        self._peak_allocated = max(self._peak_allocated, value)

    @property
    def reserved(self) -> int:
        return self._reserved

    @reserved.setter
    def reserved(self, value: int) -> None:
        self._reserved = value
        self._peak_reserved = max(self._peak_reserved, value)

    def allocate(self, nbytes: int) -> None:
        """Take ``nbytes``: from blocks already cached where they suffice, else by growing
        the reservation; OutOfMemoryError when that passes the cap or the card."""
        limit = min(self.memory_fraction_value * self.total,
                    self.total - self.other_processes_bytes - self.context_bytes)
        needed = max(self._reserved, self._allocated + nbytes)
        if needed > limit:
            raise OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {nbytes} bytes (cap {int(limit)} bytes)"
            )
        self.allocated = self._allocated + nbytes
        self.reserved = needed

    def free(self, nbytes: int) -> None:
        """Tensors die; the allocator keeps their blocks cached (reserved stays)."""
        self.allocated = max(0, self._allocated - nbytes)

    def run_kernels(self) -> None:
        """The first real step: cuDNN/cuBLAS load, and the context grows."""
        if not self.kernels_loaded:
            self.kernels_loaded = True
            self.context_bytes += self.lazy_context_bytes

    def process_bytes(self) -> int:
        """What NVML would list for this process: the context plus the allocator's blocks."""
        return self.context_bytes + self._reserved

    # -- the CudaDevice interface ---------------------------------------------------
    def available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self._device_count

    def init_context(self, index: int) -> None:
        if not self.context_created:
            self.context_created = True
            self.context_bytes += self.context_size_bytes

    def set_device(self, index: int) -> None:
        self.current_device = index

    def device_name(self, index: int) -> str:
        return self.name

    def capability(self, index: int) -> tuple[int, int]:
        return self._capability

    def uuid(self, index: int) -> str | None:
        return self._uuid

    def total_bytes(self, index: int) -> int:
        return self.total

    def bf16_supported(self, index: int) -> bool:
        return self._capability >= BF16_MIN_CAPABILITY

    def mem_get_info(self, index: int) -> tuple[int, int]:
        if self.free_bytes is not None:
            return self.free_bytes, self.total
        used = self.other_processes_bytes + self.process_bytes()
        return self.total - used, self.total

    def synchronize(self, index: int) -> None:
        """Nothing runs asynchronously on a fake device."""

    def reset_peak(self, index: int) -> None:
        self._peak_allocated = self._allocated
        self._peak_reserved = self._reserved

    def peak_reserved_bytes(self, index: int) -> int:
        return self._peak_reserved

    def peak_allocated_bytes(self, index: int) -> int:
        return self._peak_allocated

    def reserved_bytes(self, index: int) -> int:
        return self._reserved

    def allocated_bytes(self, index: int) -> int:
        return self._allocated

    def empty_cache(self) -> None:
        self.empty_cache_calls += 1
        self.reserved = self._allocated

    def memory_fraction(self, index: int) -> float:
        return self.memory_fraction_value

    def set_memory_fraction(self, fraction: float, index: int) -> None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"invalid fraction {fraction}")
        self.memory_fraction_value = fraction
        self.fraction_history.append(fraction)


@contextlib.contextmanager
def memory_capped(cuda: Any, index: int, fraction: float | None) -> Iterator[None]:
    """Hold the allocator under ``fraction`` of ``cuda:<index>``, then put back the cap
    that was in force before (not 1.0: a caller may have set its own). None: no cap."""
    if fraction is None:
        yield
        return
    previous = float(cuda.memory_fraction(index))
    cuda.set_memory_fraction(max(0.0, min(1.0, fraction)), index)
    try:
        yield
    finally:
        cuda.set_memory_fraction(previous, index)


def cap_fraction(target_bytes: int, context_bytes: int, total_bytes: int) -> float:
    """The allocator's share of the device that keeps allocator + context under target.

    No floor above 0: a 1 % floor (the old code's) is 1.4 GB on a 141 GB H200, above a
    2 GB target less a 0.8 GB context; the GPU tests ran past their target that way.
    A target at or below the context gives 0: every allocation fails, and the search
    says that the start batch does not fit."""
    return max(0.0, min(1.0, (target_bytes - context_bytes) / total_bytes))


def configure_cudnn(device_type: str, benchmark: bool | None = None) -> None:
    """The cuDNN settings of every trial AND of training, so that the tuned throughput
    and peaks describe what the trainer runs. Benchmark mode autotunes conv kernels for
    the (fixed) input shape; it stays off where the process asked for deterministic
    algorithms (a test comparing runs bit for bit). ``benchmark`` False (measured slower
    by the tuner's knobs phase) turns it off."""
    if device_type != "cuda":
        return
    import torch

    torch.backends.cudnn.benchmark = (benchmark is not False) and not torch.backends.cudnn.deterministic


def allocator_config() -> str | None:
    """The caching allocator's configuration from the environment; it changes peaks
    (``expandable_segments``, ``max_split_size_mb``), so a tuned file records it."""
    return os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")


# ------------------------------------------------------------------------- fake NVML


class FakeCudaNvml:
    """An NVML probe that reads a :class:`FakeCudaDevice`, for context measurements.

    ``lists_own_pid=False`` plays a container without the host's PID namespace (NVML
    lists host PIDs: this process is never found); ``raises_after_init`` an NVML that
    answers ``nvmlInit`` and then fails every call (GPU lost, permissions, a library
    mismatch); ``mig`` a MIG slice (NVML reports no per-process usage).
    """

    def __init__(
        self,
        cuda: FakeCudaDevice,
        *,
        lists_own_pid: bool = True,
        raises_after_init: bool = False,
        mig: bool = False,
        driver_version: str = "580.65.06",
        cuda_driver_version: str = "13.0",
    ) -> None:
        self.cuda = cuda
        self.lists_own_pid = lists_own_pid
        self.raises_after_init = raises_after_init
        self.mig = mig
        self.driver_version = driver_version
        self.cuda_driver_version = cuda_driver_version
        self.closed = False

    def available(self) -> bool:
        return True

    def _check(self) -> None:
        if self.raises_after_init:
            raise RuntimeError("NVMLError_GpuIsLost")

    def gpus(self) -> list:
        gpu = self.gpu(0)
        return [] if gpu is None else [gpu]

    def gpu(self, index: int):
        from autotune.probes import GpuInfo, ProcessMemory

        if self.raises_after_init or index != 0:
            return None
        own = self.cuda.process_bytes()
        processes = [] if self.mig else [ProcessMemory(1, self.cuda.other_processes_bytes or None)]
        if self.lists_own_pid and not self.mig:
            processes.append(ProcessMemory(os.getpid(), own))
        used = self.cuda.other_processes_bytes + own
        return GpuInfo(
            index=0, name=self.cuda.name, total_bytes=self.cuda.total, used_bytes=used,
            free_bytes=self.cuda.total - used, reserved_bytes=0,
            driver_version=self.driver_version, cuda_driver_version=self.cuda_driver_version,
            processes=processes,
            this_process_bytes=None if self.mig else (own if self.lists_own_pid else 0),
            other_processes_bytes=None if self.mig else self.cuda.other_processes_bytes,
        )

    def process_used_bytes(self, index: int) -> int | None:
        if self.raises_after_init or self.mig:
            return None
        return self.cuda.process_bytes() if self.lists_own_pid else 0

    def device_used_bytes(self, index: int) -> int | None:
        if self.raises_after_init:
            return None
        return self.cuda.other_processes_bytes + self.cuda.process_bytes()

    def close(self) -> None:
        self.closed = True


# ------------------------------------------------------------------------------ host


def _cgroup_quota_cores(root: str = "/sys/fs/cgroup") -> float | None:
    """Cores the CFS quota allows (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``);
    None without a quota. A pod with ``cpu: 16`` on a 192-core host gets 16 here, while
    its affinity still lists all 192."""
    candidates = [(os.path.join(root, "cpu.max"), None)]
    candidates.append((os.path.join(root, "cpu", "cpu.cfs_quota_us"),
                       os.path.join(root, "cpu", "cpu.cfs_period_us")))
    candidates.append((os.path.join(root, "cpu,cpuacct", "cpu.cfs_quota_us"),
                       os.path.join(root, "cpu,cpuacct", "cpu.cfs_period_us")))
    for quota_path, period_path in candidates:
        try:
            with open(quota_path, encoding="ascii") as fh:
                text = fh.read().split()
            if period_path is None:
                quota, period = text[0], text[1] if len(text) > 1 else "100000"
            else:
                with open(period_path, encoding="ascii") as fh:
                    quota, period = text[0], fh.read().strip()
        except (OSError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            cores = int(quota) / int(period)
        except (ValueError, ZeroDivisionError):
            return None
        return cores if cores > 0 else None
    return None


def usable_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Cores this process can really use: its CPU affinity (taskset, Slurm, cpusets),
    further bounded by a cgroup CPU quota (rounded up: a 1.5-core quota runs 2 threads
    at 75 %)."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    quota = _cgroup_quota_cores(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def shm_bytes(path: str = "/dev/shm") -> int | None:
    """Size of the shared-memory file system DataLoader workers hand batches through;
    None where there is none (macOS, Windows). Docker's default is 64 MiB."""
    try:
        stat = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return int(stat.f_frsize * stat.f_blocks)


# -------------------------------------------------------- torch that cannot see the GPU


#: PyTorch wheel indexes, (CUDA major, minor) -> index suffix. A CUDA 12.x wheel runs on
#: any 12.x driver (minor-version compatibility), so the choice follows the driver's
#: major version; 12.8+ drivers get the newer 12.x build.
_WHEELS = (((13, 0), "cu130"), ((12, 8), "cu128"), ((12, 0), "cu126"), ((11, 8), "cu118"))


def wheel_index_for_driver(cuda_driver_version: str | None) -> str | None:
    """The ``--index-url`` suffix of the newest torch wheel the driver can run."""
    if not cuda_driver_version:
        return None
    try:
        major, minor = (int(part) for part in cuda_driver_version.split(".")[:2])
    except ValueError:
        return None
    for version, suffix in _WHEELS:
        if (major, minor) >= version:
            return suffix
    return None


@dataclass
class _Seen:
    name: str
    driver_version: str
    cuda_driver_version: str | None


def unusable_gpu_message(nvml: Any, torch_cuda_available: bool, torch_version: str,
                         torch_cuda_version: str | None) -> str | None:
    """One line when NVML sees a GPU that torch cannot use (typically a CUDA 13 wheel on
    a driver older than 580, or a CPU-only wheel); None when there is nothing to say."""
    if torch_cuda_available:
        return None
    try:
        gpus = nvml.gpus() if nvml.available() else []
    except Exception:  # noqa: BLE001 - NVML is optional: no reading, nothing to say
        return None
    if not gpus:
        return None
    seen = _Seen(gpus[0].name, gpus[0].driver_version, gpus[0].cuda_driver_version)
    built = f"built for CUDA {torch_cuda_version}" if torch_cuda_version else "a CPU-only build"
    supports = f" (supports CUDA {seen.cuda_driver_version})" if seen.cuda_driver_version else ""
    wheel = wheel_index_for_driver(seen.cuda_driver_version)
    fix = (
        f"install a matching wheel: pip install torch --index-url https://download.pytorch.org/whl/{wheel}"
        if wheel else "update the NVIDIA driver or install a torch wheel built for its CUDA version"
    )
    return (
        f"NVML sees {seen.name} with driver {seen.driver_version}{supports}, but torch "
        f"{torch_version} ({built}) cannot use it; {fix}"
    )
