"""More knobs, each measured, never assumed: torch.compile, channels_last, CPU threads
against DataLoader workers, cudnn.benchmark.

Two halves, as everywhere in the tuner:

- pure choosers (no torch): measurements in, a :class:`KnobDecision` out (value,
  a one-line reason for the table, the numbers behind it for tuned.json);
- measuring helpers over a generic ``make_step(setting) -> step()`` callable, timed
  with :func:`autotune.timing.time_adaptively`, so every rate carries its 95 %
  interval. A knob whose setting fails to build or run (compile unsupported, no
  C++ compiler, an op without a channels_last kernel) is recorded as failed, with
  the error, and the baseline stays: a knob is never fatal.

The rules:

- a toggle (channels_last, cudnn.benchmark) is turned on only when the step runs
  faster beyond noise: at least ``tolerance`` faster and the two intervals apart
  (:func:`autotune.search.clearly_below`, the same test the batch search uses);
- torch.compile additionally pays its compile time once per run, so it is chosen
  only when it pays *within the planned run*: with the pessimistic ends of both
  intervals, ``compile_s + images / compiled <= images / eager``, i.e. the run is
  longer than the break-even ``compile_s / (1 / eager - 1 / compiled)`` images;
- threads x workers (CPU, where they share the cores): the fastest pair, and among
  those not clearly below it the fewest workers, then the fewest threads (less RAM,
  fewer processes, and cores left to the rest of the machine).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from autotune.search import RUNOFF_MARGIN, clearly_below, runoff_label
from autotune.timing import TimingConfig, TimingResult, time_adaptively

__all__ = [
    "CompileMeasurement",
    "KnobDecision",
    "Rate",
    "ThreadsWorkers",
    "channels_last_from_runoff",
    "choose_compile",
    "choose_threads_workers",
    "choose_toggle",
    "faster_beyond_noise",
    "measure_compile",
    "measure_rate",
    "measure_threads_workers",
    "measure_toggle",
    "not_applicable",
    "thread_worker_candidates",
    "torch_threads",
]

StepFactory = Callable[[Any], Callable[[], object]]


@dataclass
class Rate:
    """A measured training speed and the relative half-width of its 95 % interval."""

    images_per_s: float
    rel_ci: float = 0.0

    def __post_init__(self) -> None:
        if not (self.images_per_s > 0 and math.isfinite(self.images_per_s)):
            raise ValueError(f"images/s must be a finite number > 0, got {self.images_per_s!r}")
        if not (0 <= self.rel_ci < 1):
            raise ValueError(f"relative interval must be in [0, 1), got {self.rel_ci!r}")

    @property
    def low(self) -> float:
        return self.images_per_s * (1 - self.rel_ci)

    @property
    def high(self) -> float:
        return self.images_per_s * (1 + self.rel_ci)

    def __str__(self) -> str:
        # No interval measured (an end-to-end rate): none shown rather than "+-0 %".
        if not self.rel_ci:
            return f"{self.images_per_s:.1f} img/s"
        return f"{self.images_per_s:.1f} img/s +-{100 * self.rel_ci:.0f} %"

    @classmethod
    def from_timing(cls, timing: TimingResult) -> Rate:
        # A single-sample timing has no interval; min(.., 0.99) keeps a wild one legal.
        return cls(timing.images_per_s, min(timing.rel_ci or 0.0, 0.99))


@dataclass
class KnobDecision:
    """One knob's verdict, as the table shows it and tuned.json stores it."""

    knob: str
    value: Any
    """The setting to train with (False / the default when the knob did not pay)."""
    reason: str
    """One line: why, with the numbers."""
    measured: dict = field(default_factory=dict)
    """The measurements behind it (JSON-serialisable)."""

    def to_dict(self) -> dict:
        return asdict(self)


def faster_beyond_noise(candidate: Rate, baseline: Rate, tolerance: float = 0.03) -> bool:
    """Is ``candidate`` faster than ``baseline`` by more than noise (see module)?"""
    return clearly_below(baseline.images_per_s, baseline.rel_ci,
                         candidate.images_per_s, candidate.rel_ci, tolerance)


def not_applicable(knob: str, value: Any, why: str) -> KnobDecision:
    """A knob that does not apply here (cudnn.benchmark on a CPU): the default, and why."""
    return KnobDecision(knob, value, f"not measured: {why}")


def choose_toggle(
    knob: str, off: Rate, on: Rate | str, tolerance: float = 0.03
) -> KnobDecision:
    """On only when measured faster beyond noise; ``on`` is the error text when it failed."""
    if isinstance(on, str):
        return KnobDecision(knob, False, f"off: failed to run ({on})",
                            {"off": asdict(off), "on_error": on})
    measured = {"off": asdict(off), "on": asdict(on)}
    ratio = on.images_per_s / off.images_per_s
    if faster_beyond_noise(on, off, tolerance):
        return KnobDecision(knob, True, f"on: x{ratio:.2f} ({on} vs {off})", measured)
    return KnobDecision(knob, False, f"off: x{ratio:.2f}, not faster beyond noise ({on} vs {off})",
                        measured)


def channels_last_from_runoff(runoff: dict, margin: float = RUNOFF_MARGIN) -> KnobDecision:
    """The channels_last verdict the comparison's runoff reached (``Tuner.compare``'s
    record: the search's batch trained end to end with channels_last off and on, in
    the same alternated rounds), as the knobs table shows it. The value is the
    runoff's: on only when that configuration won by more than ``margin``."""
    batch = runoff["search_chosen"]
    rounds = runoff["rounds"]
    off = rounds.get(runoff_label(batch, False)) or []
    on = rounds.get(runoff_label(batch, True)) or []
    value = bool(runoff["chosen_channels_last"])
    measured = {"batch": batch, "off_rounds": off, "on_rounds": on, "where": "runoff"}
    if not on or not off:
        failed = "on" if not on else "off"
        return KnobDecision("channels_last", value,
                            f"{'on' if value else 'off'}: {failed} did not run end to end at batch {batch}",
                            measured)
    off_rate, on_rate = statistics.median(off), statistics.median(on)
    ratio = on_rate / off_rate
    where = (f"end to end at batch {batch}, alternated in the comparison ({on_rate:.1f} vs "
             f"{off_rate:.1f} images/s, median of {min(len(on), len(off))})")
    if value:
        return KnobDecision("channels_last", True, f"on: x{ratio:.2f} {where}", measured)
    gap = f"; on needs more than {100 * margin:g} %" if ratio > 1 else ""
    return KnobDecision("channels_last", False, f"off: x{ratio:.2f} {where}{gap}", measured)


@dataclass
class CompileMeasurement:
    """Eager against compiled, with the one-off compile time measured apart."""

    eager: Rate
    compiled: Rate | None
    """None when compiling (or running the compiled step) failed."""
    compile_seconds: float | None
    """Time of the first compiled calls beyond what they cost once compiled."""
    error: str = ""


def choose_compile(
    m: CompileMeasurement, planned_images: int, tolerance: float = 0.03
) -> KnobDecision:
    """Compile only when it is faster beyond noise and its compile time pays back
    within ``planned_images`` (the run's length), using the pessimistic ends of both
    intervals (see the module docstring)."""
    if not (isinstance(planned_images, int) and planned_images >= 1):
        raise ValueError(f"planned images must be an integer >= 1, got {planned_images!r}")
    measured: dict[str, Any] = {"eager": asdict(m.eager), "planned_images": planned_images}
    if m.compiled is None or m.compile_seconds is None:
        measured["error"] = m.error
        return KnobDecision("compile", False, f"off: compile failed ({m.error})", measured)
    measured.update(compiled=asdict(m.compiled), compile_seconds=m.compile_seconds)
    if not faster_beyond_noise(m.compiled, m.eager, tolerance):
        return KnobDecision(
            "compile", False,
            f"off: not faster beyond noise ({m.compiled} vs {m.eager}; "
            f"compile {m.compile_seconds:.1f} s)", measured)
    # Positive: faster beyond noise means the intervals are apart (compiled.low > eager.high).
    saving_per_image = 1 / m.eager.high - 1 / m.compiled.low
    break_even = math.ceil(m.compile_seconds / saving_per_image)
    saved_s = planned_images * saving_per_image - m.compile_seconds
    measured.update(break_even_images=break_even, saved_seconds=saved_s)
    if planned_images >= break_even:
        return KnobDecision(
            "compile", True,
            f"on: {m.compile_seconds:.1f} s to compile, pays after {break_even} images, "
            f"saves {saved_s:.0f} s over the planned {planned_images}", measured)
    return KnobDecision(
        "compile", False,
        f"off: {m.compile_seconds:.1f} s to compile pays only after {break_even} images, "
        f"the run plans {planned_images}", measured)


@dataclass
class ThreadsWorkers:
    """One (intra-op threads, DataLoader workers) pair, measured end to end."""

    threads: int
    workers: int
    rate: Rate


def thread_worker_candidates(cores: int) -> list[tuple[int, int]]:
    """(threads, workers) pairs worth measuring on ``cores`` usable cores.

    Workers 0, 1, 2, 4, ... up to the cores; for each, threads on the cores the workers
    leave (at least 1) and threads on all cores (oversubscribed: measured, not assumed
    to lose). 2 cores: (2,0) (1,1) (2,1) (1,2) (2,2).
    """
    if not (isinstance(cores, int) and cores >= 1):
        raise ValueError(f"cores must be an integer >= 1, got {cores!r}")
    workers = [0]
    n = 1
    while n <= cores:
        workers.append(n)
        n *= 2
    if cores not in workers:
        workers.append(cores)
    pairs = []
    for w in workers:
        for t in sorted({max(1, cores - w), cores}):
            pairs.append((t, w))
    return pairs


def choose_threads_workers(
    measurements: Sequence[ThreadsWorkers], tolerance: float = 0.03
) -> KnobDecision:
    """The fastest pair; among the pairs not clearly below it, the fewest workers, then
    the fewest threads."""
    if not measurements:
        raise ValueError("no threads/workers measurement to choose from")
    best = max(measurements, key=lambda m: m.rate.images_per_s)
    level = [m for m in measurements
             if not clearly_below(m.rate.images_per_s, m.rate.rel_ci,
                                  best.rate.images_per_s, best.rate.rel_ci, tolerance)]
    chosen = min(level, key=lambda m: (m.workers, m.threads))
    others = ", ".join(f"{m.threads}t/{m.workers}w {m.rate.images_per_s:.1f}"
                       for m in measurements if m is not chosen)
    note = "" if chosen is best else f"; fastest {best.threads}t/{best.workers}w within noise"
    return KnobDecision(
        "threads_workers", {"threads": chosen.threads, "workers": chosen.workers},
        f"{chosen.threads} threads, {chosen.workers} workers: {chosen.rate}{note} "
        f"(others: {others})",
        {"pairs": [asdict(m) for m in measurements]},
    )


# -- measuring --------------------------------------------------------------------------------------
def measure_rate(
    step: Callable[[], object],
    images_per_step: int,
    timing: TimingConfig | None = None,
    sync: Callable[[], None] | None = None,
) -> tuple[Rate, TimingResult]:
    """Time ``step`` adaptively; the rate with its interval, and the full timing."""
    result = time_adaptively(step, images_per_step, timing, sync=sync)
    return Rate.from_timing(result), result


def _failure(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def measure_toggle(
    make_step: StepFactory,
    images_per_step: int,
    timing: TimingConfig | None = None,
    sync: Callable[[], None] | None = None,
) -> tuple[Rate, Rate | str]:
    """``make_step(False)`` then ``make_step(True)``, each timed; the second's failure
    (building or running) comes back as its error text. A failure of the baseline
    propagates: without it there is nothing to compare."""
    off, _ = measure_rate(make_step(False), images_per_step, timing, sync)
    try:
        on, _ = measure_rate(make_step(True), images_per_step, timing, sync)
    except Exception as exc:  # noqa: BLE001 - any failure of the knob is its verdict
        return off, _failure(exc)
    return off, on


def measure_compile(
    make_step: StepFactory,
    images_per_step: int,
    timing: TimingConfig | None = None,
    sync: Callable[[], None] | None = None,
    compile_calls: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> CompileMeasurement:
    """Eager (``make_step(False)``) and compiled (``make_step(True)``), compile time apart.

    The first ``compile_calls`` compiled calls are timed one by one (the first traces
    and compiles; the second often recompiles, e.g. once the optimiser state exists);
    their total beyond ``compile_calls`` steady steps is the compile time. Then the
    compiled step is timed like the eager one (its warm-up is already done).
    """
    timing = timing or TimingConfig()
    wait = sync or (lambda: None)
    eager, _ = measure_rate(make_step(False), images_per_step, timing, sync)
    try:
        step = make_step(True)
        wait()
        started = clock()
        for _ in range(compile_calls):
            step()
        wait()
        first_calls_s = clock() - started
        steady = TimingConfig(**{**timing.to_dict(), "warmup_steps": 0})
        compiled, _ = measure_rate(step, images_per_step, steady, sync)
    except Exception as exc:  # noqa: BLE001 - any failure to compile is a verdict, not fatal
        return CompileMeasurement(eager, None, None, _failure(exc))
    steady_s = compile_calls * images_per_step / compiled.images_per_s
    return CompileMeasurement(eager, compiled, max(0.0, first_calls_s - steady_s))


def measure_threads_workers(
    measure_pair: Callable[[int], Rate],
    candidates: Sequence[tuple[int, int]],
) -> tuple[list[ThreadsWorkers], dict[str, str]]:
    """Each (threads, workers) pair measured by ``measure_pair(workers)`` (end to end:
    the loader with that many workers feeding the step) under ``torch_threads(threads)``.

    A pair that fails (a worker crashed, shared memory ran out) is left out and its
    error returned by name ("2t/4w"), so the choice is made among the pairs that ran.
    """
    measured, failed = [], {}
    for threads, workers in candidates:
        try:
            with torch_threads(threads):
                rate = measure_pair(workers)
        except Exception as exc:  # noqa: BLE001 - a failing pair is a verdict, not fatal
            failed[f"{threads}t/{workers}w"] = _failure(exc)
            continue
        measured.append(ThreadsWorkers(threads, workers, rate))
    return measured, failed


@contextlib.contextmanager
def torch_threads(threads: int):
    """``torch.set_num_threads(threads)`` for the block, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
