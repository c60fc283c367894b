"""Telemetry: a background sampler over pluggable readers, and summaries of what it saw.

A *reader* is any callable returning a :data:`Reading` (a dict of named figures, where
``None`` means "could not be read this time"). The sampler calls every reader about ten
times a second in a daemon thread and keeps the readings with their time. Two readers
come with it:

- :class:`NvmlGpuReader`: one GPU through NVML (utilisation, memory, power, temperature,
  SM clock, PCIe throughput, this process's device memory);
- :class:`ProcessReader`: this process and its children (the DataLoader workers) through
  psutil (CPU %, RSS), and the machine's idle cores.

Telemetry never stops training: a figure that fails to read is ``None``; a reader that
fails ``max_failures`` times in a row (a GPU that fell off the bus, NVML gone) is given
up, and the time it stopped answering is recorded. Nothing here imports torch or the
workload: the GPU is reached through NVML only (a small interface, so that the device
seam can provide it later), and the CPU's "device" figure is computed from the step's
thread count, which the caller passes.

What sampling costs: every reading holds the GIL for well under a millisecond (a few
NVML queries, /proc reads for a handful of processes), ten times a second;
``benchmarks/telemetry_overhead.py`` measures it against the train step.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FakeNvml",
    "NvmlGpuReader",
    "ProcessReader",
    "Reading",
    "Reader",
    "Sample",
    "Sampler",
    "Stats",
    "TrainingTelemetry",
    "nvml_gpu_reader",
    "starvation_hint",
    "telemetry_text",
    "series",
    "stats",
    "worker_cpu_means",
]

Reading = dict[str, Any]
"""Named figures of one reading; a value is a number, ``None`` (unreadable this time) or,
for per-process figures, a ``{pid: number}`` mapping."""
Reader = Callable[[], Reading]

DEFAULT_INTERVAL_S = 0.1


class ReaderFailed(Exception):
    """A reader could read none of its figures (the device or library stopped answering)."""


# ------------------------------------------------------------------------------ NVML

#: The NVML figures, as :class:`NvmlGpuReader` names them.
GPU_FIELDS = (
    "util_percent",
    "memory_util_percent",
    "memory_used_bytes",
    "memory_total_bytes",
    "process_memory_bytes",
    "power_w",
    "power_limit_w",
    "temperature_c",
    "sm_clock_mhz",
    "pcie_rx_bytes_per_s",
    "pcie_tx_bytes_per_s",
)


class NvmlGpuReader:
    """Readings of one GPU through an NVML module (``pynvml``, or :class:`FakeNvml`).

    Each figure is read on its own: one that the card or driver does not support (PCIe
    counters on some vGPUs, power on some laptops) is ``None`` and the others still
    count. When none can be read, the reader raises :class:`ReaderFailed`.
    """

    def __init__(self, nvml: Any, handle: Any, pid: int | None = None) -> None:
        self.nvml = nvml
        self.handle = handle
        self.pid = os.getpid() if pid is None else pid

    def _try(self, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except self.nvml.NVMLError:
            return None

    def _process_memory(self) -> int | None:
        processes = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        used = [p.usedGpuMemory for p in processes if p.pid == self.pid]
        if not used or None in used:
            return None
        return int(sum(used))

    def __call__(self) -> Reading:
        nvml, h = self.nvml, self.handle
        util = self._try(lambda: nvml.nvmlDeviceGetUtilizationRates(h))
        memory = self._try(lambda: nvml.nvmlDeviceGetMemoryInfo(h))
        power_mw = self._try(lambda: nvml.nvmlDeviceGetPowerUsage(h))
        limit_mw = self._try(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h))
        # NVML reports PCIe throughput in KB/s over its last 20 ms window.
        rx_kb = self._try(lambda: nvml.nvmlDeviceGetPcieThroughput(h, nvml.NVML_PCIE_UTIL_RX_BYTES))
        tx_kb = self._try(lambda: nvml.nvmlDeviceGetPcieThroughput(h, nvml.NVML_PCIE_UTIL_TX_BYTES))
        reading: Reading = {
            "util_percent": None if util is None else float(util.gpu),
            "memory_util_percent": None if util is None else float(util.memory),
            "memory_used_bytes": None if memory is None else int(memory.used),
            "memory_total_bytes": None if memory is None else int(memory.total),
            "process_memory_bytes": self._try(self._process_memory),
            "power_w": None if power_mw is None else power_mw / 1000.0,
            "power_limit_w": None if limit_mw is None else limit_mw / 1000.0,
            "temperature_c": self._try(
                lambda: float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
            ),
            "sm_clock_mhz": self._try(lambda: float(nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM))),
            "pcie_rx_bytes_per_s": None if rx_kb is None else rx_kb * 1000.0,
            "pcie_tx_bytes_per_s": None if tx_kb is None else tx_kb * 1000.0,
        }
        if all(value is None for value in reading.values()):
            raise ReaderFailed("NVML answered none of its queries")
        return reading


def nvml_gpu_reader(cuda_index: int, probe: Any = None) -> NvmlGpuReader | None:
    """The reader of the GPU torch calls ``cuda:<cuda_index>``; None without NVML.

    Built on :class:`autotune.probes.NvmlProbe` (its initialisation and its CUDA -> NVML
    mapping, which resolves UUID and MIG entries of CUDA_VISIBLE_DEVICES).
    """
    from autotune.probes import NvmlProbe

    probe = probe if probe is not None else NvmlProbe()
    try:
        if not probe.available():
            return None
        nvml = probe._nvml
        handle = probe._handle(cuda_index)
    except Exception:  # noqa: BLE001 - no GPU telemetry is never a reason to stop
        return None
    return NvmlGpuReader(nvml, handle)


@dataclass
class _FakeUtil:
    gpu: float
    memory: float


@dataclass
class _FakeMemory:
    total: int
    used: int
    free: int


@dataclass
class _FakeProcess:
    pid: int
    usedGpuMemory: int | None  # noqa: N815 - pynvml's name


class FakeNvml:
    """A stand-in for the ``pynvml`` module over a script of readings, for tests.

    ``readings`` is a list of dicts with the keys of :data:`GPU_FIELDS` (a missing key
    makes that query fail, as an unsupported one does); each call of
    ``nvmlDeviceGetUtilizationRates`` moves to the next reading (the last one repeats).
    From reading number ``lost_after`` on (counting from 0), every query fails with
    GPU_IS_LOST, as when a card falls off the bus.
    """

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_PCIE_UTIL_TX_BYTES = 0
    NVML_PCIE_UTIL_RX_BYTES = 1
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_GPU_IS_LOST = 15

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(f"NVML error {value}")
            self.value = value

    def __init__(self, readings: list[dict[str, float]], lost_after: int | None = None, pid: int | None = None) -> None:
        if not readings:
            raise ValueError("FakeNvml needs at least one reading")
        self.readings = readings
        self.lost_after = lost_after
        self.pid = os.getpid() if pid is None else pid
        self.calls = 0  # readings started so far

    def _current(self, key: str) -> float:
        index = self.calls - 1
        if self.lost_after is not None and index >= self.lost_after:
            raise self.NVMLError(self.NVML_ERROR_GPU_IS_LOST)
        reading = self.readings[min(index, len(self.readings) - 1)]
        if key not in reading:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return reading[key]

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802 - pynvml's names
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> _FakeUtil:  # noqa: N802
        self.calls += 1
        return _FakeUtil(self._current("util_percent"), self._current("memory_util_percent"))

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _FakeMemory:  # noqa: N802
        total, used = self._current("memory_total_bytes"), self._current("memory_used_bytes")
        return _FakeMemory(int(total), int(used), int(total - used))

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[_FakeProcess]:  # noqa: N802
        return [_FakeProcess(self.pid, int(self._current("process_memory_bytes")))]

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:  # noqa: N802
        return int(self._current("power_w") * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:  # noqa: N802
        return int(self._current("power_limit_w") * 1000)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:  # noqa: N802
        return int(self._current("temperature_c"))

    def nvmlDeviceGetClockInfo(self, handle: int, clock: int) -> int:  # noqa: N802
        return int(self._current("sm_clock_mhz"))

    def nvmlDeviceGetPcieThroughput(self, handle: int, counter: int) -> int:  # noqa: N802
        key = "pcie_rx_bytes_per_s" if counter == self.NVML_PCIE_UTIL_RX_BYTES else "pcie_tx_bytes_per_s"
        return int(self._current(key) / 1000)


# --------------------------------------------------------------------------- psutil


class ProcessReader:
    """This process and its child processes (a DataLoader's workers), and the machine.

    Figures: ``main_cpu_percent`` (100 = one core), ``rss_bytes`` (main process),
    ``workers_rss_bytes`` (children, summed), ``worker_cpu_percent`` ({pid: %}),
    ``idle_cores`` (core-equivalents idle machine-wide since the last reading).

    psutil's CPU % is the share since the previous call on the same Process object, so
    the objects are kept, and a worker's first reading (no previous call) is left out.
    The children are listed again every ``children_every_s`` (0: every reading).
    """

    def __init__(self, pid: int | None = None, children_every_s: float = 0.5) -> None:
        import psutil

        self._psutil = psutil
        self.main = psutil.Process(pid)
        self.children_every_s = children_every_s
        self._children: dict[int, Any] = {}
        self._primed: set[int] = set()
        self._children_read_at = -math.inf
        self.main.cpu_percent(None)
        psutil.cpu_percent(None, percpu=True)

    def _child_pids(self) -> list[int]:
        """Direct children of the process. Linux lists each thread's children in
        ``/proc/<pid>/task/<tid>/children`` (a fraction of a millisecond); psutil's own
        listing reads every process of the machine (milliseconds), so it is the fallback."""
        pids: list[int] = []
        try:
            tasks = os.listdir(f"/proc/{self.main.pid}/task")
            for task in tasks:
                with open(f"/proc/{self.main.pid}/task/{task}/children", encoding="ascii") as fh:
                    pids.extend(int(pid) for pid in fh.read().split())
            return pids
        except (OSError, ValueError):
            return [child.pid for child in self.main.children(recursive=False)]

    def _refresh_children(self) -> None:
        now = time.monotonic()
        if now - self._children_read_at < self.children_every_s:
            return
        self._children_read_at = now
        current = {}
        for pid in self._child_pids():
            child = self._children.get(pid)
            if child is None:
                try:
                    child = self._psutil.Process(pid)
                except self._psutil.Error:
                    continue
            current[pid] = child
        self._children = current

    def __call__(self) -> Reading:
        psutil = self._psutil
        self._refresh_children()
        workers: dict[int, float] = {}
        workers_rss = 0
        for pid, child in list(self._children.items()):
            try:
                percent = child.cpu_percent(None)
                workers_rss += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                self._children.pop(pid, None)
                continue
            if pid in self._primed:
                workers[pid] = percent
            else:
                self._primed.add(pid)
        per_core = psutil.cpu_percent(None, percpu=True)
        return {
            "main_cpu_percent": self.main.cpu_percent(None),
            "rss_bytes": self.main.memory_info().rss,
            "workers_rss_bytes": workers_rss,
            "worker_cpu_percent": workers,
            "idle_cores": sum(100.0 - p for p in per_core) / 100.0 if per_core else None,
        }


# -------------------------------------------------------------------------- sampler


@dataclass
class Sample:
    t: float
    """Seconds since the sampler started."""
    readings: dict[str, Reading | None]
    """Reader name -> its reading, None where the reader failed or was given up."""


class Sampler:
    """Calls every reader every ``interval_s`` in a daemon thread; never raises from it.

    ``failures`` keeps each reader's last error; ``lost_at`` the time (seconds since
    start) a reader was given up after ``max_failures`` consecutive failures.
    """

    def __init__(
        self,
        readers: Mapping[str, Reader],
        interval_s: float = DEFAULT_INTERVAL_S,
        max_failures: int = 3,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"sampling interval must be positive, got {interval_s!r}")
        if max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, got {max_failures!r}")
        self.readers = dict(readers)
        self.interval_s = interval_s
        self.max_failures = max_failures
        self.clock = clock
        self.samples: list[Sample] = []
        self.failures: dict[str, str] = {}
        self.lost_at: dict[str, float] = {}
        self._streak: dict[str, int] = {name: 0 for name in self.readers}
        self._started = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample_once(self) -> Sample:
        t = self.clock() - self._started
        readings: dict[str, Reading | None] = {}
        for name, reader in self.readers.items():
            if name in self.lost_at:
                readings[name] = None
                continue
            try:
                readings[name] = reader()
                self._streak[name] = 0
            except Exception as exc:  # noqa: BLE001 - telemetry must never stop training
                readings[name] = None
                self.failures[name] = f"{type(exc).__name__}: {exc}"
                self._streak[name] += 1
                if self._streak[name] >= self.max_failures:
                    self.lost_at[name] = t
        sample = Sample(t, readings)
        self.samples.append(sample)
        return sample

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_once()

    def start(self) -> Sampler:
        self._started = self.clock()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def elapsed_s(self) -> float:
        return self.clock() - self._started


# ------------------------------------------------------------------------ summaries


def series(samples: Iterable[Sample], reader: str, key: str) -> list[tuple[float, float]]:
    """``(t, value)`` of one figure over the samples, unreadable ones left out."""
    out = []
    for sample in samples:
        reading = sample.readings.get(reader)
        value = None if reading is None else reading.get(key)
        if isinstance(value, (int, float)) and not math.isnan(value):
            out.append((sample.t, float(value)))
    return out


@dataclass
class Stats:
    """Summary of one figure's readings; every field None when there was none."""

    n: int = 0
    mean: float | None = None
    p10: float | None = None
    p50: float | None = None
    max: float | None = None
    min: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return {"n": self.n, "mean": self.mean, "p10": self.p10, "p50": self.p50,
                "max": self.max, "min": self.min}


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by linear interpolation (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def stats(values: Iterable[float]) -> Stats:
    values = [float(v) for v in values]
    if not values:
        return Stats()
    return Stats(
        n=len(values),
        mean=sum(values) / len(values),
        p10=percentile(values, 0.1),
        p50=percentile(values, 0.5),
        max=max(values),
        min=min(values),
    )


def worker_cpu_means(samples: Iterable[Sample], reader: str = "host") -> dict[int, float]:
    """Each child process's mean CPU % over the samples in which it was read."""
    sums: dict[int, list[float]] = {}
    for sample in samples:
        reading = sample.readings.get(reader) or {}
        for pid, percent in (reading.get("worker_cpu_percent") or {}).items():
            sums.setdefault(pid, []).append(float(percent))
    return {pid: sum(v) / len(v) for pid, v in sorted(sums.items())}


# ------------------------------------------------------------------- in training


@dataclass
class TrainingTelemetry:
    """The per-epoch figures a training loop logs, sampled in the background.

    ``gpu`` None means training on the CPU: the device figure is then the share of the
    step's ``step_threads`` that the main process kept busy.
    """

    gpu: Reader | None
    step_threads: int = 1
    interval_s: float = DEFAULT_INTERVAL_S
    _sampler: Sampler | None = field(default=None, init=False, repr=False)
    _host: ProcessReader | None = field(default=None, init=False, repr=False)

    def start(self) -> None:
        readers: dict[str, Reader] = {}
        if self._host is None:
            try:
                self._host = ProcessReader()
            except Exception:  # noqa: BLE001 - psutil unusable here: figures unavailable
                self._host = None
        if self._host is not None:
            # psutil's CPU % covers the time since the previous reading: restart it here,
            # or the epoch's first sample would include the validation before it.
            with contextlib.suppress(Exception):
                self._host()
            readers["host"] = self._host
        if self.gpu is not None:
            readers["gpu"] = self.gpu
        self._sampler = Sampler(readers, self.interval_s)
        self._sampler.start()

    def stop(self) -> dict[str, float | None]:
        """Stop sampling; the epoch's figures (None where nothing could be read)."""
        sampler = self._sampler
        if sampler is None:
            return epoch_figures([], None, self.step_threads)
        sampler.stop()
        self._sampler = None
        return epoch_figures(sampler.samples, self.gpu is not None, self.step_threads)


def device_busy_series(samples: list[Sample], on_gpu: bool | None, step_threads: int) -> list[tuple[float, float]]:
    """``(t, %)`` of the device figure: NVML utilisation on a GPU; on the CPU, the main
    process's CPU % as a share of the step's threads (100 = every thread busy)."""
    if on_gpu:
        return series(samples, "gpu", "util_percent")
    threads = max(1, step_threads)
    return [(t, min(100.0, v / threads)) for t, v in series(samples, "host", "main_cpu_percent")]


def device_busy_values(samples: list[Sample], on_gpu: bool | None, step_threads: int) -> list[float]:
    return [v for _, v in device_busy_series(samples, on_gpu, step_threads)]


def epoch_figures(samples: list[Sample], on_gpu: bool | None, step_threads: int) -> dict[str, float | None]:
    """What one epoch logs: device busy % (mean, p10), power (W, mean), and the workers'
    mean CPU % (mean over workers of each one's mean; 100 = one core)."""
    busy = stats(device_busy_values(samples, on_gpu, step_threads))
    power = stats(v for _, v in series(samples, "gpu", "power_w"))
    workers = worker_cpu_means(samples)
    return {
        "device_util_mean": busy.mean,
        "device_util_p10": busy.p10,
        "power_w_mean": power.mean,
        "workers_cpu_percent_mean": sum(workers.values()) / len(workers) if workers else None,
    }


def telemetry_text(figures: Mapping[str, float | None]) -> str:
    """The epoch line's telemetry part (`` | device busy 93 % (p10 80 %), 250 W, workers
    12 % CPU``); figures that could not be read are left out, all missing gives ''."""
    parts = []
    util, p10 = figures.get("device_util_mean"), figures.get("device_util_p10")
    if util is not None:
        parts.append(f"device busy {util:.0f} %" + (f" (p10 {p10:.0f} %)" if p10 is not None else ""))
    if figures.get("power_w_mean") is not None:
        parts.append(f"{figures['power_w_mean']:.0f} W")
    if figures.get("workers_cpu_percent_mean") is not None:
        parts.append(f"workers {figures['workers_cpu_percent_mean']:.0f} % CPU")
    return " | " + ", ".join(parts) if parts else ""


#: Thresholds of the one-line hint at the end of an epoch.
HINT_UTIL_BELOW = 70.0
HINT_WAIT_ABOVE = 0.2


def starvation_hint(util_mean: float | None, data_wait_fraction: float, workers: int,
                    usable_cores: int | None) -> str | None:
    """One line when the device idles while the step waits for data; None otherwise."""
    if util_mean is None or util_mean >= HINT_UTIL_BELOW or data_wait_fraction <= HINT_WAIT_ABOVE:
        return None
    advice = "more DataLoader workers"
    if usable_cores is not None and workers >= usable_cores:
        advice = "faster decoding (smaller or pre-decoded images): every core already has a worker"
    return (
        f"device busy only {util_mean:.0f} % while the step waits for data "
        f"{100 * data_wait_fraction:.0f} % of the time: the input pipeline limits training; "
        f"try {advice} (arwgan doctor explains, arwgan-autotune measures workers)"
    )
