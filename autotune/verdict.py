"""What limits training: a pure function of measurements (no torch, no device, no clock).

The doctor measures; :func:`diagnose` reads the figures and names the limit:

- **input-bound**: the step waits for data and decoding/augmenting is what is slow;
- **storage-bound**: the step waits for data and the files cannot be read fast enough;
- **device-bound** ("GPU-bound"; on a CPU, "CPU-bound"): the step rarely waits and the
  device is busy: the model itself is the cost;
- **host-bound**: the step rarely waits, yet the device idles: the host cannot issue work
  fast enough (Python overhead, host-device syncs, other processes taking the cores).

Each verdict carries the evidence line it rests on and a suggestion tied to a number.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

__all__ = ["Measurements", "Verdict", "diagnose", "WAIT_HIGH", "BUSY_GPU", "BUSY_CPU"]

#: The step waits for data at least this share of the time: the input side limits it.
WAIT_HIGH = 0.15
#: Device busy at least this (mean %) with little data wait: the device is the limit.
BUSY_GPU = 85.0
BUSY_CPU = 70.0
#: Storage supplying less than this many times the step's demand is worth a note.
STORAGE_MARGIN = 1.2

INPUT, STORAGE, DEVICE, HOST, UNKNOWN = "input-bound", "storage-bound", "device-bound", "host-bound", "unknown"


@dataclass
class Measurements:
    """The figures :func:`diagnose` reads; None where a figure could not be measured."""

    device: str
    """'cuda' or 'cpu'."""
    data_wait_fraction: float
    """Share of the training wall time spent waiting for the next batch."""
    step_images_per_s: float
    """What training achieved, end to end (waits included)."""
    fed_images_per_s: float | None
    """What the step consumes when fed: images / (wall time - data wait)."""
    device_util_mean: float | None
    """GPU: NVML utilisation %. CPU: share of the step's threads the main process kept busy, %."""
    device_util_p10: float | None = None
    loader_images_per_s: float | None = None
    """The DataLoader alone, same settings, no train step."""
    decode_s_per_image: float | None = None
    """Decode + crop of one image from bytes already in memory, in one process."""
    workers: int = 0
    worker_cpu_percent: list[float] = field(default_factory=list)
    """Each worker's mean CPU % (100 = one core)."""
    main_cpu_percent: float | None = None
    usable_cores: int = 1
    idle_cores: float | None = None
    """Core-equivalents idle machine-wide during training."""
    step_threads: int = 1
    storage_bytes_per_s: float | None = None
    storage_cold: bool = False
    storage_streams: int = 1
    bytes_per_image: float | None = None
    """Mean size of a dataset file on disk."""
    network_filesystem: bool | None = None
    peak_memory_bytes: int | None = None
    target_memory_bytes: int | None = None


@dataclass
class Verdict:
    kind: str
    label: str
    """For people: 'GPU-bound', 'CPU-bound', 'input-bound (decode/augment)', ..."""
    evidence: str
    suggestion: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _pct(value: float) -> str:
    return f"{100 * value:.0f} %"


def _mb(value: float) -> str:
    return f"{value / 1e6:.1f} MB/s"


def _rate(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def storage_images_per_s(m: Measurements) -> float | None:
    if not m.storage_bytes_per_s or not m.bytes_per_image:
        return None
    return m.storage_bytes_per_s / m.bytes_per_image


def decode_images_per_s(m: Measurements) -> float | None:
    """Decode capacity of the loader's processes, reads excluded (workers in parallel)."""
    if not m.decode_s_per_image:
        return None
    return max(1, m.workers) / m.decode_s_per_image


def _workers_text(m: Measurements) -> str:
    if m.workers == 0:
        return "no workers: the main process loads between steps"
    if not m.worker_cpu_percent:
        return f"{m.workers} workers (CPU % unavailable)"
    mean = sum(m.worker_cpu_percent) / len(m.worker_cpu_percent)
    return f"{m.workers} workers at {mean:.0f} % CPU each on average"


def _storage(m: Measurements, demand_images_per_s: float) -> Verdict:
    read_ips = storage_images_per_s(m)
    need = demand_images_per_s * m.bytes_per_image
    cache = "cold" if m.storage_cold else "warm cache"
    return Verdict(
        STORAGE,
        "storage-bound",
        f"the step waits for data {_pct(m.data_wait_fraction)} of the time; storage reads "
        f"{_mb(m.storage_bytes_per_s)} ({cache}, {m.storage_streams} stream(s)) = {_rate(read_ips)} images/s, "
        f"the step consumes {_mb(need)} ({_rate(demand_images_per_s)} images/s)",
        f"storage must supply {_mb(need)}, {need / m.storage_bytes_per_s:.1f}x what it reads: "
        "copy the data to local disk (NVMe) or cache decoded crops",
    )


def _input(m: Measurements, demand_images_per_s: float | None) -> Verdict:
    parts = [f"the step waits for data {_pct(m.data_wait_fraction)} of the time"]
    if m.loader_images_per_s is not None and demand_images_per_s:
        parts.append(
            f"the loader alone supplies {_rate(m.loader_images_per_s)} images/s, "
            f"the step consumes {_rate(demand_images_per_s)}"
        )
    if m.decode_s_per_image:
        parts.append(f"decode takes {1000 * m.decode_s_per_image:.1f} ms per image")
    parts.append(_workers_text(m))
    per_worker = None
    if m.loader_images_per_s and m.workers > 0:
        per_worker = m.loader_images_per_s / m.workers
    elif m.decode_s_per_image:
        per_worker = 1.0 / m.decode_s_per_image
    if per_worker and demand_images_per_s:
        needed = max(1, math.ceil(STORAGE_MARGIN * demand_images_per_s / per_worker))
        if needed <= m.usable_cores and needed > m.workers:
            suggestion = (
                f"raise workers from {m.workers} to {needed} (each supplies about "
                f"{_rate(per_worker)} images/s, the step needs {_rate(demand_images_per_s)}); "
                "arwgan-autotune measures the best count"
            )
        else:
            suggestion = (
                f"keeping the step fed needs about {needed} loader processes of "
                f"{_rate(per_worker)} images/s, but {m.usable_cores} core(s) are usable: make "
                "decoding cheaper (smaller or pre-decoded images, cached crops)"
            )
    else:
        suggestion = "make decoding cheaper or add workers; arwgan-autotune measures the best count"
    return Verdict(INPUT, "input-bound (decode/augment)", "; ".join(parts), suggestion)


def _device(m: Measurements) -> Verdict:
    gpu = m.device == "cuda"
    util = f"{m.device_util_mean:.0f} %"
    if m.device_util_p10 is not None:
        util += f" (p10 {m.device_util_p10:.0f} %)"
    what = "GPU utilisation" if gpu else f"the step's {m.step_threads} thread(s) busy"
    evidence = f"{what} {util}; the step waits for data only {_pct(m.data_wait_fraction)} of the time"
    if gpu:
        if m.peak_memory_bytes and m.target_memory_bytes:
            share = m.peak_memory_bytes / m.target_memory_bytes
            suggestion = (
                f"the GPU is the limit: peak memory is {_pct(share)} of the target, so "
                + ("a larger batch may fit; " if share < 0.8 else "")
                + "try bf16/fp16; arwgan-autotune measures both"
            )
        else:
            suggestion = "the GPU is the limit: try bf16/fp16 or a larger batch; arwgan-autotune measures both"
        return Verdict(DEVICE, "GPU-bound", evidence, suggestion)
    suggestion = f"the CPU's arithmetic is the limit at {_rate(m.step_images_per_s)} images/s: a GPU"
    if m.idle_cores is not None and m.idle_cores >= 1:
        suggestion += f", or more threads for the step ({m.idle_cores:.1f} cores idle)"
    return Verdict(DEVICE, "CPU-bound (compute)", evidence, suggestion)


def _host(m: Measurements) -> Verdict:
    gpu = m.device == "cuda"
    what = "GPU utilisation" if gpu else f"the step's {m.step_threads} thread(s) busy"
    evidence = (
        f"the step waits for data only {_pct(m.data_wait_fraction)} of the time, yet {what} "
        f"is {m.device_util_mean:.0f} %"
    )
    if m.main_cpu_percent is not None:
        evidence += f"; main process at {m.main_cpu_percent:.0f} % CPU"
    if m.idle_cores is not None:
        evidence += f"; {m.idle_cores:.1f} of the machine's cores idle"
    if not gpu and m.idle_cores is not None and m.idle_cores < 0.5:
        suggestion = (
            f"other processes take the cores ({m.idle_cores:.1f} idle): run where the "
            "step's threads get whole cores, or with fewer workers"
        )
    elif gpu:
        suggestion = (
            f"the host issues work too slowly for the GPU ({100 - m.device_util_mean:.0f} % idle): "
            "a larger batch amortises per-step Python and sync costs; fewer host syncs "
            "(.item(), printing), CUDA graphs or torch.compile remove them"
        )
    else:
        suggestion = (
            f"the step's threads are idle {100 - m.device_util_mean:.0f} % of the time: "
            "Python overhead between operations; a larger batch amortises it"
        )
    return Verdict(HOST, "host-bound", evidence, suggestion)


def diagnose(m: Measurements) -> Verdict:
    """Name what limits training, with the evidence and a suggestion."""
    demand = m.fed_images_per_s or m.step_images_per_s
    if m.data_wait_fraction >= WAIT_HIGH:
        read_ips = storage_images_per_s(m)
        decode_ips = decode_images_per_s(m)
        storage_slowest = (
            read_ips is not None
            and read_ips < demand
            and (decode_ips is None or read_ips < decode_ips)
        )
        verdict = _storage(m, demand) if storage_slowest else _input(m, demand)
    elif m.device_util_mean is None:
        verdict = Verdict(
            UNKNOWN, "undetermined",
            f"the step waits for data only {_pct(m.data_wait_fraction)} of the time, but the "
            "device's utilisation could not be read",
            "the input pipeline is not the limit; run where NVML (GPU) or psutil (CPU) answer",
        )
    elif m.device_util_mean >= (BUSY_GPU if m.device == "cuda" else BUSY_CPU):
        verdict = _device(m)
    else:
        verdict = _host(m)
    verdict.notes.extend(_notes(m, demand, verdict.kind))
    return verdict


def _notes(m: Measurements, demand: float, kind: str) -> list[str]:
    notes = []
    read_ips = storage_images_per_s(m)
    if kind != STORAGE and read_ips is not None and read_ips < STORAGE_MARGIN * demand:
        notes.append(
            f"storage reads only {read_ips / demand:.1f}x what the step consumes "
            f"({_mb(m.storage_bytes_per_s)} for {_mb(demand * m.bytes_per_image)}): it will limit "
            "a faster configuration"
        )
    if m.storage_bytes_per_s is not None and not m.storage_cold:
        notes.append("storage read rate measured on a warm cache: it shows memory, not the disk")
    if m.network_filesystem:
        notes.append("the data is on a network filesystem: its rate varies with the network's load")
    return notes
