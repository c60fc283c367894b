"""The verdict is a pure function of measurements: exact kinds, evidence and numbers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from autotune.verdict import DEVICE, HOST, INPUT, STORAGE, UNKNOWN, Measurements, diagnose

GIB = 2**30


def gpu(**changes) -> Measurements:
    """A GPU run that the step keeps busy: 97 % utilisation, 2 % data wait."""
    base = Measurements(
        device="cuda", data_wait_fraction=0.02, step_images_per_s=490.0, fed_images_per_s=500.0,
        device_util_mean=97.0, device_util_p10=92.0, loader_images_per_s=1500.0,
        decode_s_per_image=0.004, workers=8, worker_cpu_percent=[40.0] * 8, main_cpu_percent=100.0,
        usable_cores=32, idle_cores=20.0, storage_bytes_per_s=2e9, storage_cold=True,
        storage_streams=8, bytes_per_image=160_000, network_filesystem=False,
        peak_memory_bytes=13 * GIB, target_memory_bytes=22 * GIB,
    )
    return replace(base, **changes)


def test_busy_gpu_that_never_waits_is_gpu_bound_and_points_at_memory_headroom() -> None:
    v = diagnose(gpu())
    assert (v.kind, v.label) == (DEVICE, "GPU-bound")
    assert v.evidence == "GPU utilisation 97 % (p10 92 %); the step waits for data only 2 % of the time"
    # 13 of 22 GiB = 59 % of the target: a larger batch may fit.
    assert v.suggestion == (
        "the GPU is the limit: peak memory is 59 % of the target, so a larger batch may fit; "
        "try bf16/fp16; arwgan-autotune measures both"
    )
    assert v.notes == []


def test_gpu_bound_near_the_memory_target_does_not_suggest_a_larger_batch() -> None:
    v = diagnose(gpu(peak_memory_bytes=21 * GIB))
    assert "a larger batch" not in v.suggestion and "95 % of the target" in v.suggestion


def test_idle_gpu_that_does_not_wait_for_data_is_host_bound() -> None:
    v = diagnose(gpu(device_util_mean=45.0, data_wait_fraction=0.03))
    assert v.kind == HOST
    assert v.evidence.startswith(
        "the step waits for data only 3 % of the time, yet GPU utilisation is 45 %; main process at 100 % CPU"
    )
    assert v.suggestion.startswith("the host issues work too slowly for the GPU (55 % idle)")


def test_waiting_for_slow_decoding_is_input_bound_with_a_worker_count() -> None:
    # 2 workers supply 100 images/s (50 each); the fed step takes 500: 1.2 x 500 / 50 = 12.
    v = diagnose(gpu(data_wait_fraction=0.6, workers=2, worker_cpu_percent=[95.0, 93.0],
                     loader_images_per_s=100.0, device_util_mean=30.0, decode_s_per_image=0.02))
    assert (v.kind, v.label) == (INPUT, "input-bound (decode/augment)")
    assert v.evidence == (
        "the step waits for data 60 % of the time; the loader alone supplies 100 images/s, the step "
        "consumes 500; decode takes 20.0 ms per image; 2 workers at 94 % CPU each on average"
    )
    assert v.suggestion.startswith("raise workers from 2 to 12 (each supplies about 50 images/s")


def test_input_bound_without_enough_cores_suggests_cheaper_decoding() -> None:
    v = diagnose(gpu(data_wait_fraction=0.6, workers=2, loader_images_per_s=100.0, usable_cores=4))
    assert v.kind == INPUT
    assert v.suggestion.startswith("keeping the step fed needs about 12 loader processes of 50 images/s, "
                                   "but 4 core(s) are usable")


def test_input_bound_without_workers_counts_from_the_decode_time() -> None:
    # No workers: one process decodes at 1 / 0.01 s = 100 images/s; 1.2 x 300 / 100 -> 4.
    v = diagnose(gpu(data_wait_fraction=0.5, workers=0, worker_cpu_percent=[], loader_images_per_s=None,
                     decode_s_per_image=0.01, fed_images_per_s=300.0))
    assert v.kind == INPUT
    assert "no workers: the main process loads between steps" in v.evidence
    assert v.suggestion.startswith("raise workers from 0 to 4 (each supplies about 100 images/s")


def test_waiting_on_slow_storage_is_storage_bound() -> None:
    # 10 MB/s of 100 kB files = 100 images/s; decode alone would give 4 / 0.002 = 2000.
    v = diagnose(gpu(data_wait_fraction=0.4, storage_bytes_per_s=10e6, bytes_per_image=100_000,
                     workers=4, storage_streams=4, decode_s_per_image=0.002, fed_images_per_s=200.0))
    assert (v.kind, v.label) == (STORAGE, "storage-bound")
    assert v.evidence == (
        "the step waits for data 40 % of the time; storage reads 10.0 MB/s (cold, 4 stream(s)) = "
        "100 images/s, the step consumes 20.0 MB/s (200 images/s)"
    )
    assert v.suggestion == (
        "storage must supply 20.0 MB/s, 2.0x what it reads: copy the data to local disk (NVMe) or "
        "cache decoded crops"
    )


def test_slow_storage_but_slower_decoding_is_input_bound() -> None:
    # Storage gives 100 images/s, decode only 1 / 0.05 = 20: decoding is the limit.
    v = diagnose(gpu(data_wait_fraction=0.4, storage_bytes_per_s=10e6, bytes_per_image=100_000,
                     workers=1, decode_s_per_image=0.05, fed_images_per_s=200.0, loader_images_per_s=20.0))
    assert v.kind == INPUT


def test_storage_that_barely_keeps_up_is_a_note_not_the_verdict() -> None:
    # 500 images/s x 160 kB = 80 MB/s needed; storage reads 90 MB/s = 1.1x.
    v = diagnose(gpu(storage_bytes_per_s=90e6))
    assert v.kind == DEVICE
    assert v.notes == [
        "storage reads only 1.1x what the step consumes (90.0 MB/s for 80.0 MB/s): it will limit "
        "a faster configuration"
    ]


def test_warm_cache_and_network_filesystem_are_noted() -> None:
    v = diagnose(gpu(storage_cold=False, network_filesystem=True))
    assert v.notes == [
        "storage read rate measured on a warm cache: it shows memory, not the disk",
        "the data is on a network filesystem: its rate varies with the network's load",
    ]


def cpu(**changes) -> Measurements:
    base = Measurements(
        device="cpu", data_wait_fraction=0.01, step_images_per_s=20.0, fed_images_per_s=20.2,
        device_util_mean=95.0, device_util_p10=90.0, workers=2, worker_cpu_percent=[3.0, 4.0],
        main_cpu_percent=380.0, usable_cores=8, idle_cores=3.5, step_threads=4,
    )
    return replace(base, **changes)


def test_cpu_whose_step_threads_are_busy_is_cpu_bound() -> None:
    v = diagnose(cpu())
    assert (v.kind, v.label) == (DEVICE, "CPU-bound (compute)")
    assert v.evidence.startswith("the step's 4 thread(s) busy 95 % (p10 90 %)")
    assert v.suggestion == (
        "the CPU's arithmetic is the limit at 20 images/s: a GPU, or more threads for the step "
        "(3.5 cores idle)"
    )


def test_cpu_with_no_idle_core_and_idle_step_threads_blames_other_processes() -> None:
    v = diagnose(cpu(device_util_mean=30.0, idle_cores=0.1))
    assert v.kind == HOST
    assert v.suggestion.startswith("other processes take the cores (0.1 idle)")


def test_unreadable_utilisation_without_waiting_is_undetermined() -> None:
    v = diagnose(cpu(device_util_mean=None))
    assert v.kind == UNKNOWN and "could not be read" in v.evidence


@pytest.mark.parametrize("wait, expected", [(0.149, DEVICE), (0.15, INPUT)])
def test_the_data_wait_threshold(wait, expected) -> None:
    assert diagnose(gpu(data_wait_fraction=wait)).kind == expected
