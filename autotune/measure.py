"""Throughput measurements over the real data pipeline.

- ``loader_images_per_s``: the DataLoader alone (decode, crop, collate, pin), used on CUDA
  where the loader and the train step run on different hardware.
- ``training_images_per_s``: end to end, the loader feeding the real train step. On a CPU
  the step's threads and the loader's workers share the same cores, so only this
  combined figure means anything; it is also how the seed default and the
  recommendation are compared.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from autotune.workload import batch_length


def queue_depth(loader) -> int:
    """Batches a DataLoader holds ready ahead of the consumer (workers x prefetch)."""
    return loader.num_workers * (loader.prefetch_factor or 0)


def loader_images_per_s(loader, batches: int, skip: int | None = None) -> float:
    """Images/s over ``batches`` batches after the first ``skip``.

    The skipped batches cover worker start-up and drain the prefetch queue that filled
    meanwhile (by default: the queue's depth + 2); timing the queue's contents would
    credit the workers with batches they made before the clock started.
    """
    if skip is None:
        skip = queue_depth(loader) + 2
    iterator = iter(loader)
    try:
        for _ in range(skip):
            next(iterator)
        images = 0
        start = time.perf_counter()
        for batch in itertools.islice(iterator, batches):
            images += batch_length(batch)
        elapsed = time.perf_counter() - start
    finally:
        del iterator  # shuts non-persistent workers down
    return images / elapsed if elapsed > 0 else 0.0


def training_images_per_s(
    step, loader, steps: int, warmup: int = 2, sync: Callable[[], None] | None = None,
    drain: int | None = None,
) -> float:
    """Images/s of the train ``step`` (:class:`autotune.workload.TrainStep`) fed by
    ``loader``, device synchronised around the clock.

    First the batches the workers prepared before anyone asked (``drain``, default the
    loader's queue depth) are taken and thrown away, untrained: timing them would credit
    the workers with work done before the clock started, and favour many workers. Then
    ``warmup`` real steps let the step settle (its first allocations) while the queue
    reaches its steady state: full when the step is the bottleneck, empty when the
    loader is. Draining without training costs the loader's time only; training the
    drained batches, as this function did before, cost a large batch's step per queued
    batch (8 slow steps for the seed default's 4 workers). ``sync`` waits for the device
    (the seam's ``synchronize``); None on a CPU.
    """
    if drain is None:
        drain = queue_depth(loader)
    sync = sync or (lambda: None)
    iterator = iter(loader)
    try:
        for _ in range(drain):
            next(iterator)
        for _ in range(warmup):
            step(step.to_device(next(iterator)))
        sync()
        images_seen = 0
        start = time.perf_counter()
        for batch in itertools.islice(iterator, steps):
            step(step.to_device(batch))
            images_seen += batch_length(batch)
        sync()
        elapsed = time.perf_counter() - start
    finally:
        del iterator
    return images_seen / elapsed if elapsed > 0 else 0.0
