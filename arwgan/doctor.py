"""``arwgan doctor``: run a training configuration for a bounded time and say, from
measurements, what limits its speed (the seed report's diagnosis, automated).

Phases, each with its share of ``--seconds``:

1. storage: read a sample of the dataset's files, cold where the OS lets us drop our own
   files from the page cache (:mod:`autotune.storage`), with as many parallel streams
   as the loader has workers; the filesystem type, local or network;
2. decode: decode + crop of images whose bytes are already in memory, in this process;
3. loader alone: the DataLoader with the run's settings, no train step;
4. training: the real train step fed by the real loader, with the telemetry sampler
   (:mod:`autotune.telemetry`) reading NVML and psutil about ten times a second, and
   every step's data wait recorded.

The figures go to :func:`autotune.verdict.diagnose`, a pure function, for the verdict.
Nothing is written except the optional ``--json`` / ``--plot`` output; no checkpoint.
"""

from __future__ import annotations

import functools
import io
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from rich.table import Table

from arwgan.config import TrainConfig
from arwgan.data import EpochSampler, WatermarkDataset, build_datasets, load_rgb, make_loader
from arwgan.errors import ConfigError, UserError
from arwgan.step import GANStep, check_precision, resolve_device
from autotune.memory import format_bytes, parse_target_mem
from autotune.probes import HostProbe
from autotune.storage import filesystem_of, measure_read_rate, read_file
from autotune.telemetry import (
    DEFAULT_INTERVAL_S,
    ProcessReader,
    Reader,
    Sampler,
    device_busy_series,
    nvml_gpu_reader,
    series,
    stats,
    worker_cpu_means,
)
from autotune.verdict import Measurements, Verdict, diagnose

#: Share of ``seconds`` each measuring phase may take; training gets the rest.
STORAGE_SHARE, DECODE_SHARE, LOADER_SHARE = 0.08, 0.05, 0.17
#: Train steps left out of the figures at the start (worker start-up, first kernels).
WARMUP_STEPS = 2
#: Train steps measured at least, even past the time budget (a slow step still counts).
MIN_MEASURED_STEPS = 3


class ImageSource(Protocol):
    """How the pipeline gets an image: ``read`` a file's bytes, ``decode`` them. Tests
    pass slow or throttled doubles (they must pickle, for DataLoader workers)."""

    def read(self, path: Path) -> bytes: ...

    def decode(self, data: bytes) -> np.ndarray: ...


class FileSource:
    """The real thing: the file's bytes from disk, decoded as training decodes them."""

    def read(self, path: Path) -> bytes:
        return Path(path).read_bytes()

    def decode(self, data: bytes) -> np.ndarray:
        return load_rgb(io.BytesIO(data))


class _MemorySource:
    """Bytes already read: times decoding alone."""

    def __init__(self, blobs: dict[Path, bytes], decode: Callable[[bytes], np.ndarray]) -> None:
        self.blobs = blobs
        self._decode = decode

    def read(self, path: Path) -> bytes:
        return self.blobs[path]

    def decode(self, data: bytes) -> np.ndarray:
        return self._decode(data)


class SourcedDataset(WatermarkDataset):
    """``base``'s images and messages, each file read and decoded through ``source``."""

    def __init__(self, base: WatermarkDataset, source: ImageSource) -> None:
        super().__init__(base.files, base.image_size, base.message_bits, base.train)
        self.source = source

    def load(self, path: Path) -> np.ndarray:
        return self.source.decode(self.source.read(path))


class _EndlessSampler(torch.utils.data.Sampler):
    """One :class:`EpochSampler` epoch after another, without end: a measurement stops
    on time, never because the dataset ran out."""

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed

    def __iter__(self):
        epoch = 0
        while True:
            yield from EpochSampler(self.length, seed=self.seed, epoch=epoch)
            epoch += 1


@dataclass
class DoctorConfig:
    """How long to measure and how finely."""

    seconds: float = 60.0
    """Wall-time budget of all phases together (a run of very slow steps still measures
    at least 3 of them)."""
    interval_s: float = DEFAULT_INTERVAL_S
    """Telemetry sampling interval."""
    target_mem: str | None = None
    """The memory target peak memory is compared with ('20GB', '90%'); None: 90 % of the
    GPU, or the RAM on a CPU."""

    def __post_init__(self) -> None:
        if not (isinstance(self.seconds, (int, float)) and self.seconds >= 2):
            raise ConfigError(f"--seconds must be at least 2, got {self.seconds!r}")
        if not (isinstance(self.interval_s, (int, float)) and 0.01 <= self.interval_s <= 5):
            raise ConfigError(f"sampling interval must be in 0.01..5 s, got {self.interval_s!r}")


@dataclass
class DoctorResult:
    figures: dict[str, Any]
    """Every figure, JSON-ready (the ``--json`` output)."""
    verdict: Verdict
    timeline: dict[str, list[float]] = field(default_factory=dict)
    """``util_t``/``util`` (device busy % over time) and ``step_t``/``data_wait`` (each
    measured step's waiting share), for the plot."""

    def as_dict(self) -> dict[str, Any]:
        return {**self.figures, "verdict": self.verdict.as_dict(), "timeline": self.timeline}


# ------------------------------------------------------------------------------ phases


def data_root(files: list[Path]) -> Path:
    return Path(os.path.commonpath([str(f) for f in files[:1000]]))


def measure_decode(dataset: WatermarkDataset, source: ImageSource, seconds: float,
                   max_images: int = 64) -> tuple[float | None, int]:
    """Seconds per image to decode and crop, bytes already in memory; (None, 0) when no
    file could be read."""
    blobs: dict[Path, bytes] = {}
    indices = []
    step = max(1, len(dataset.files) // max_images)
    for index in range(0, len(dataset.files), step)[:max_images]:
        try:
            blobs[dataset.files[index]] = Path(dataset.files[index]).read_bytes()
        except OSError:
            continue
        indices.append(index)
    if not indices:
        return None, 0
    memory = SourcedDataset(dataset, _MemorySource(blobs, source.decode))
    memory[(indices[0], 0)]  # first call pays imports and allocator warm-up
    done = 0
    start = time.perf_counter()
    for index in indices:
        memory[(index, index)]
        done += 1
        if time.perf_counter() - start >= seconds:
            break
    return (time.perf_counter() - start) / done, done


def _loader(dataset, cfg: TrainConfig):
    return make_loader(dataset, cfg.loader, _EndlessSampler(len(dataset), cfg.seed), drop_last=True)


def measure_loader(dataset, cfg: TrainConfig, seconds: float) -> tuple[float | None, int]:
    """The loader alone: images/s after its first batch (worker start-up) and the
    batches already queued then, over about ``seconds``."""
    loader_cfg = cfg.loader
    depth = loader_cfg.num_workers * (loader_cfg.prefetch_factor or 0)
    iterator = iter(_loader(dataset, cfg))
    try:
        for _ in range(depth + 1):
            next(iterator)
        images = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or images == 0:
            images += next(iterator)[0].shape[0]
        elapsed = time.perf_counter() - start
    finally:
        del iterator
    return (images / elapsed if elapsed > 0 else None), images


@dataclass
class _StepRecord:
    t: float
    """End of the step, seconds since the sampler started."""
    wait_s: float
    total_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_window(gan: GANStep, loader, seconds: float, sampler: Sampler) -> tuple[list[_StepRecord], float, float]:
    """Train until ``seconds`` have passed (at least warm-up + 3 steps). Returns every
    measured step, the measured window's wall time and its start (sampler time)."""
    device = gan.device
    records: list[_StepRecord] = []
    iterator = iter(loader)
    try:
        for _ in range(WARMUP_STEPS):
            images, messages, _ = next(iterator)
            gan(*gan.to_device(images, messages))
        _sync(device)
        window_start = sampler.elapsed_s()
        start = time.perf_counter()
        while len(records) < MIN_MEASURED_STEPS or time.perf_counter() - start < seconds:
            step_start = time.perf_counter()
            images, messages, _ = next(iterator)
            got = time.perf_counter()
            gan(*gan.to_device(images, messages))
            end = time.perf_counter()
            records.append(_StepRecord(sampler.elapsed_s(), got - step_start, end - step_start))
        _sync(device)
        wall = time.perf_counter() - start
    finally:
        del iterator
    return records, wall, window_start


# ----------------------------------------------------------------------------- the run


def _gpu_reader(device: torch.device) -> Reader | None:
    return nvml_gpu_reader(device.index or 0) if device.type == "cuda" else None


def memory_target(device: torch.device, target_mem: str | None, host_total: int) -> int:
    """The bytes peak memory is compared with, read before training starts (so that our
    own memory does not count as the neighbours'): ``target_mem``, else 90 % of the GPU,
    else the RAM."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device.index or 0)
        return parse_target_mem(target_mem or "90%", total, total - free)
    return parse_target_mem(target_mem, host_total, 0) if target_mem else host_total


@functools.cache
def _nvml_probe():
    """One NVML probe per process: it initialises NVML once."""
    from autotune.probes import NvmlProbe

    return NvmlProbe()


def process_peak_bytes(device: torch.device) -> tuple[int, int | None, int | None]:
    """Peak memory as the tuner counts it: ``(peak, allocator peak, context)``.

    CUDA: the allocator's peak reservation plus what the process holds beyond the
    allocator (CUDA context, cuBLAS/cuDNN workspaces: NVML's figure for this process
    minus the allocator's current reservation; None, and not added, where NVML cannot
    tell). CPU: the peak resident set, with no allocator or context figure.
    """
    if device.type != "cuda":
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, None, None
    index = device.index or 0
    allocator_peak = int(torch.cuda.max_memory_reserved(index))
    context = None
    probe = _nvml_probe()
    try:
        own = probe.process_used_bytes(index) if probe.available() else None
    except Exception:  # noqa: BLE001 - the figure is then unavailable
        own = None
    if own:
        context = max(0, own - int(torch.cuda.memory_reserved(index)))
    return allocator_peak + (context or 0), allocator_peak, context


def _memory(device: torch.device, target: int) -> dict[str, Any]:
    peak, allocator_peak, context = process_peak_bytes(device)
    return {
        "allocator_peak_bytes": allocator_peak,
        "context_bytes": context,
        "process_peak_bytes": peak,
        "target_bytes": target,
        "peak_share_of_target": peak / target if target else None,
    }


def _stat(values) -> dict:
    return stats(values).as_dict()


def run_doctor(
    train_cfg: TrainConfig,
    cfg: DoctorConfig,
    source: ImageSource | None = None,
    gpu_reader: Reader | None = None,
    report: Callable[[str], None] = lambda message: None,
) -> DoctorResult:
    """Measure ``train_cfg`` for about ``cfg.seconds`` and diagnose it.

    ``source`` replaces how files are read and decoded (tests: slow or throttled
    doubles); ``gpu_reader`` replaces the NVML reader (tests: :class:`FakeNvml`).
    """
    device = resolve_device(train_cfg.device)
    check_precision(train_cfg.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer does
    model = train_cfg.model
    train_set, _, description = build_datasets(
        train_cfg.data_dir, model.image_size, model.message_bits,
        seed=train_cfg.seed, val_fraction=train_cfg.val_fraction,
    )
    if train_cfg.loader.batch_size > len(train_set):
        raise ConfigError(
            f"batch {train_cfg.loader.batch_size} is larger than the {len(train_set)} training images; lower --batch"
        )
    pipeline_set = SourcedDataset(train_set, source) if source is not None else train_set
    decode_source = source if source is not None else FileSource()
    host = HostProbe().info()
    target = memory_target(device, cfg.target_mem, host.ram_total_bytes)
    workers = train_cfg.loader.num_workers
    budget = cfg.seconds
    started = time.perf_counter()

    # 1. storage
    report("storage: reading a sample of the files")
    root = data_root(train_set.files)
    fs = filesystem_of(root)
    if source is None:
        reader = read_file
    else:
        def reader(path: Path) -> tuple[int, bool]:
            return len(source.read(path)), False
    rate = measure_read_rate(
        train_set.files, max_seconds=max(0.3, STORAGE_SHARE * budget), streams=max(1, workers), reader=reader
    )

    # 2. decode
    report("decode: timing decode + crop from memory")
    decode_s, decoded = measure_decode(train_set, decode_source, max(0.2, DECODE_SHARE * budget))

    # 3. the loader alone
    report("loader: the DataLoader alone")
    loader_ips, loader_images = measure_loader(pipeline_set, train_cfg, max(0.5, LOADER_SHARE * budget))

    # 4. training, with telemetry
    report("training: the train step fed by the loader, with telemetry")
    gan = GANStep(model, train_cfg.optim, train_cfg.precision, device, train_cfg.seed, train_cfg.channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gpu = gpu_reader if gpu_reader is not None else _gpu_reader(device)
    readers: dict[str, Reader] = {}
    try:
        readers["host"] = ProcessReader()
    except Exception:  # noqa: BLE001 - psutil unusable: host figures unavailable
        pass
    if gpu is not None:
        readers["gpu"] = gpu
    step_threads = torch.get_num_threads()
    sampler = Sampler(readers, cfg.interval_s)
    remaining = budget - (time.perf_counter() - started)
    sampler.start()
    try:
        loader = _loader(pipeline_set, train_cfg)
        records, wall, window_start = train_window(gan, loader, max(1.0, remaining), sampler)
    finally:
        sampler.stop()
    del loader

    samples = [s for s in sampler.samples if s.t >= window_start]
    images = len(records) * train_cfg.loader.batch_size
    wait = sum(r.wait_s for r in records)
    data_wait = wait / wall if wall > 0 else 0.0
    fed = images / (wall - wait) if wall > wait else None
    on_gpu = "gpu" in readers
    gpu_run = on_gpu or device.type == "cuda"
    # A GPU run without NVML has no utilisation figure: the main process's CPU % would
    # describe the host, not the GPU.
    busy_series = device_busy_series(samples, on_gpu, step_threads) if on_gpu or not gpu_run else []
    busy = [v for _, v in busy_series]
    gpu_figures = {
        key: _stat(v for _, v in series(samples, "gpu", key))
        for key in ("util_percent", "memory_used_bytes", "power_w", "temperature_c",
                    "sm_clock_mhz", "pcie_rx_bytes_per_s", "pcie_tx_bytes_per_s",
                    "process_memory_bytes")
    }
    limits = {
        key: stats(v for _, v in series(samples, "gpu", key)).max
        for key in ("memory_total_bytes", "power_limit_w")
    }
    worker_cpu = worker_cpu_means(samples)
    idle = stats(v for _, v in series(samples, "host", "idle_cores"))
    main_cpu = stats(v for _, v in series(samples, "host", "main_cpu_percent"))
    memory = _memory(device, target)

    bytes_per_image = rate.mean_file_bytes if rate else None
    figures: dict[str, Any] = {
        "config": {
            "device": str(device), "precision": train_cfg.precision,
            "batch": train_cfg.loader.batch_size, "workers": workers,
            "pin_memory": train_cfg.loader.pin_memory,
            "prefetch_factor": train_cfg.loader.prefetch_factor,
            "model": model.to_dict(), "data": description, "seconds": budget,
            "interval_s": cfg.interval_s,
        },
        "device": {
            "kind": device.type,
            "busy_percent": _stat(busy),
            "busy_meaning": "NVML utilisation" if on_gpu else (
                "unavailable without NVML" if gpu_run else f"main process CPU % / {step_threads} step thread(s)"
            ),
            "step_threads": step_threads,
            **({f"gpu_{k}": v for k, v in gpu_figures.items()} if on_gpu else {}),
            "memory_total_bytes": limits["memory_total_bytes"],
            "power_limit_w": limits["power_limit_w"],
            "gpu_lost_at_s": sampler.lost_at.get("gpu"),
            "gpu_error": sampler.failures.get("gpu"),
            "memory": memory,
        },
        "host": {
            "usable_cores": host.usable_cores,
            "logical_cores": host.logical_cores,
            "main_cpu_percent": main_cpu.as_dict(),
            "rss_bytes": stats(v for _, v in series(samples, "host", "rss_bytes")).max,
            "workers_rss_bytes": stats(v for _, v in series(samples, "host", "workers_rss_bytes")).max,
            "worker_cpu_percent": {str(pid): v for pid, v in worker_cpu.items()},
            "idle_cores": idle.as_dict(),
            "host_error": sampler.failures.get("host"),
        },
        "pipeline": {
            "measured_steps": len(records),
            "warmup_steps": WARMUP_STEPS,
            "window_s": wall,
            "images_per_s": images / wall if wall > 0 else None,
            "step_images_per_s_fed": fed,
            "data_wait_fraction": data_wait,
            "loader_images_per_s": loader_ips,
            "loader_images": loader_images,
            "decode_s_per_image": decode_s,
            "decoded_images": decoded,
        },
        "storage": {
            **(rate.as_dict() if rate else {"bytes_per_s": None}),
            "root": str(root),
            "filesystem": fs.type if fs else None,
            "mount_point": fs.mount_point if fs else None,
            "network": fs.network if fs else None,
            "consumed_bytes_per_s": (fed or 0) * bytes_per_image if bytes_per_image else None,
        },
    }
    measurements = Measurements(
        device="cuda" if gpu_run else "cpu",
        data_wait_fraction=data_wait,
        step_images_per_s=figures["pipeline"]["images_per_s"] or 0.0,
        fed_images_per_s=fed,
        device_util_mean=stats(busy).mean,
        device_util_p10=stats(busy).p10,
        loader_images_per_s=loader_ips,
        decode_s_per_image=decode_s,
        workers=workers,
        worker_cpu_percent=list(worker_cpu.values()),
        main_cpu_percent=main_cpu.mean,
        usable_cores=host.usable_cores,
        idle_cores=idle.mean,
        step_threads=step_threads,
        storage_bytes_per_s=rate.bytes_per_s if rate else None,
        storage_cold=bool(rate and rate.cold),
        storage_streams=rate.streams if rate else 1,
        bytes_per_image=bytes_per_image,
        network_filesystem=fs.network if fs else None,
        peak_memory_bytes=memory["process_peak_bytes"],
        target_memory_bytes=memory["target_bytes"],
    )
    verdict = diagnose(measurements)
    if sampler.lost_at.get("gpu") is not None:
        verdict.notes.append(
            f"the GPU stopped answering NVML {sampler.lost_at['gpu']:.1f} s into training "
            f"({sampler.failures.get('gpu')}); later GPU figures are unavailable"
        )
    timeline = {
        "util_t": [t - window_start for t, _ in busy_series],
        "util": busy,
        "step_t": [r.t - window_start for r in records],
        "data_wait": [r.wait_s / r.total_s if r.total_s > 0 else 0.0 for r in records],
    }
    return DoctorResult(figures, verdict, timeline)


# ---------------------------------------------------------------------------- output


def _na(value, fmt: Callable[[Any], str]) -> str:
    return "unavailable" if value is None else fmt(value)


def _pct(value: float) -> str:
    return f"{value:.0f} %"


def _mbps(value: float) -> str:
    if value < 1e5:  # a slow CPU step consumes kB/s: "0.0 MB/s" would hide it
        return f"{value / 1e3:.1f} kB/s"
    return f"{value / 1e6:.1f} MB/s"


def report_table(result: DoctorResult) -> Table:
    """The seed report's table, from measurements."""
    f = result.figures
    dev, host, pipe, store = f["device"], f["host"], f["pipeline"], f["storage"]
    mem = dev["memory"]
    table = Table(title="arwgan doctor", title_justify="left")
    for column in ("", "figure", "measured"):
        table.add_column(column)
    busy = dev["busy_percent"]
    on_gpu = "gpu_util_percent" in dev
    rows: list[tuple[str, str, str]] = []
    cfg = f["config"]
    rows.append(("run", "configuration", f"{cfg['device']}, {cfg['precision']}, batch {cfg['batch']}, "
                 f"{cfg['workers']} workers, {pipe['measured_steps']} steps in {pipe['window_s']:.1f} s"))
    if on_gpu:
        rows.append(("device", "GPU utilisation", _na(busy["mean"], lambda v: f"{v:.0f} % mean, p10 {busy['p10']:.0f} %")))
        used = dev["gpu_memory_used_bytes"]["max"]
        rows.append(("", "memory used / total", f"{_na(used, format_bytes)} / {_na(dev['memory_total_bytes'], format_bytes)}"))
    else:
        rows.append(("device", "step threads busy", _na(busy["mean"], lambda v: f"{v:.0f} % mean, p10 {busy['p10']:.0f} % ({dev['busy_meaning']})")))
    share = mem["peak_share_of_target"]
    context = f" incl. {format_bytes(mem['context_bytes'])} context" if mem.get("context_bytes") else ""
    rows.append(("", "process peak vs target",
                 f"{format_bytes(mem['process_peak_bytes'])}{context} of {format_bytes(mem['target_bytes'])}"
                 + (f" ({100 * share:.0f} %)" if share is not None else "")))
    if on_gpu:
        power = dev["gpu_power_w"]["mean"]
        rows.append(("", "power vs limit", f"{_na(power, lambda v: f'{v:.0f} W')} of {_na(dev['power_limit_w'], lambda v: f'{v:.0f} W')}"))
        rows.append(("", "temperature", _na(dev["gpu_temperature_c"]["max"], lambda v: f"{v:.0f} C max")))
        rows.append(("", "SM clock", _na(dev["gpu_sm_clock_mhz"]["mean"], lambda v: f"{v:.0f} MHz mean")))
        rx, tx = dev["gpu_pcie_rx_bytes_per_s"]["mean"], dev["gpu_pcie_tx_bytes_per_s"]["mean"]
        rows.append(("", "PCIe rx / tx", f"{_na(rx, _mbps)} / {_na(tx, _mbps)}"))
        if dev["gpu_lost_at_s"] is not None:
            rows.append(("", "GPU telemetry", f"lost at {dev['gpu_lost_at_s']:.1f} s: {dev['gpu_error']}"))
    main = host["main_cpu_percent"]["mean"]
    rows.append(("host", "main process CPU", _na(main, lambda v: f"{v:.0f} % (100 = one core)")))
    workers = host["worker_cpu_percent"]
    if workers:
        each = ", ".join(f"{v:.0f}" for v in workers.values())
        rows.append(("", "worker CPU %", f"{each} (mean {sum(workers.values()) / len(workers):.0f})"))
    elif cfg["workers"]:
        rows.append(("", "worker CPU %", "unavailable"))
    rows.append(("", "RSS main / workers", f"{_na(host['rss_bytes'], format_bytes)} / {_na(host['workers_rss_bytes'], format_bytes)}"))
    rows.append(("", "idle cores", _na(host["idle_cores"]["mean"], lambda v: f"{v:.1f} of {host['logical_cores']} (usable {host['usable_cores']})")))
    rows.append(("pipeline", "data wait", f"{100 * pipe['data_wait_fraction']:.0f} % of step time"))
    rows.append(("", "training images/s", _na(pipe["images_per_s"], lambda v: f"{v:.1f} (fed step alone: {_na(pipe['step_images_per_s_fed'], lambda x: f'{x:.1f}')})")))
    rows.append(("", "loader alone images/s", _na(pipe["loader_images_per_s"], lambda v: f"{v:.1f}")))
    rows.append(("", "decode + crop", _na(pipe["decode_s_per_image"], lambda v: f"{1000 * v:.2f} ms per image (from memory)")))
    fs = store.get("filesystem")
    rate = store.get("bytes_per_s")
    rows.append(("storage", "read rate", _na(rate, lambda v: f"{_mbps(v)} ({store['cache']}, {store['streams']} stream(s), {store['files']} files)")))
    rows.append(("", "step consumes", _na(store.get("consumed_bytes_per_s"), _mbps)))
    rows.append(("", "filesystem", "unknown" if fs is None else f"{fs} at {store['mount_point']} ({'network' if store['network'] else 'local'})"))
    for row in rows:
        table.add_row(*row)
    return table


def print_report(console, result: DoctorResult) -> None:
    from autotune.console import note, say

    console.print(report_table(result))
    v = result.verdict
    say(f"VERDICT: {v.label}", to=console)
    say(f"  evidence: {v.evidence}", to=console)
    say(f"  suggestion: {v.suggestion}", to=console)
    for line in v.notes:
        note(line, to=console)


def plot_report(result: DoctorResult, path: str | Path) -> Path:
    """Device busy % and each step's data-wait share over the training window."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'arwgan-autotune[plot]'") from None
    path = Path(path)
    tl = result.timeline
    fig, (ax_util, ax_wait) = plt.subplots(2, 1, figsize=(7, 4.5), sharex=True)
    ax_util.plot(tl["util_t"], tl["util"], color="tab:green", lw=1)
    ax_util.set_ylim(0, 105)
    ax_util.set_ylabel(f"{'GPU util' if result.figures['device']['kind'] == 'cuda' else 'step threads busy'} %")
    ax_wait.plot(tl["step_t"], [100 * w for w in tl["data_wait"]], ".-", color="tab:red", lw=1, ms=3)
    ax_wait.set_ylim(0, 105)
    ax_wait.set_ylabel("data wait % of step")
    ax_wait.set_xlabel("seconds into the measured window")
    ax_util.set_title(f"arwgan doctor: {result.verdict.label}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def doctor_json(result: DoctorResult) -> str:
    import json

    return json.dumps(result.as_dict(), indent=2, default=_json_default)


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)
