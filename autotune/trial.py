"""A trial: the only code in the tuner that runs the model.

One trial builds the workload's real train step (:meth:`autotune.workload.Workload.build_step`:
for ARWGAN both networks, both Adam optimisers, the noise layers) at one batch size and
precision, runs warm-up steps (the first allocates the optimisers' state and, on CUDA,
lets cuDNN pick kernels) through every variant of the step in turn (``take_turns``),
then times whole cycles of them with the device synchronised around the clock until
its images/s is known within a stated tolerance (:mod:`autotune.timing`: 95 %
interval within 3 % by default, with a floor and a ceiling on samples and seconds),
and reports the peak memory it took and the interval. cuDNN runs with the trainer's flags.

Peak memory:
- CUDA: the allocator's peak *reserved* bytes (what the process really holds, not just
  what tensors use) plus the CUDA context and other non-allocator usage, measured
  through NVML by the tuner (again after the first real step, when cuDNN and cuBLAS
  have loaded); every CUDA phase caps the allocator at the target with
  ``set_per_process_memory_fraction`` so that an OOM means "past the target" (an
  isolated child sets the cap from its spec before its first allocation). Every
  torch.cuda call goes through the device seam (:mod:`autotune.device`).
- CPU: the peak resident set of a fresh subprocess that runs only this trial (the only
  honest per-trial peak on a CPU); a watchdog thread ends the child if it grows past the
  limit, so a too-large batch cannot exhaust the machine's RAM.
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace

from autotune.oom import is_oom
from autotune.search import TrialOutcome
from autotune.trial_server import peak_rss_bytes
from autotune.timing import TimingConfig, time_adaptively

#: Exit code of a trial subprocess stopped by its memory watchdog.
EXIT_OVER_MEMORY = 86
_RESULT_PREFIX = "AUTOTUNE_TRIAL_RESULT "


@dataclass
class TrialSpec:
    """Everything a trial needs; JSON-serialisable so it can cross a process boundary."""

    workload: dict | None
    """:meth:`autotune.workload.WorkloadRef.to_dict` of the workload, to rebuild it in a
    child process; None: the workload object is passed to :func:`run_trial` directly."""
    precision: str
    device: str
    batch: int
    timing: dict | None = None
    """:meth:`autotune.timing.TimingConfig.to_dict` of the adaptive timing (warm-up
    steps included); None: the defaults. The step is timed until its images/s is
    known within ``rel_ci``, not for a fixed number of steps."""
    channels_last: bool = False
    seed: int = 0
    memory_limit_bytes: int | None = None
    """CPU subprocess: the watchdog ends the trial past this resident set."""
    context_bytes: int = 0
    """CUDA: memory the process holds outside the caching allocator (context, cuBLAS...)."""
    threads: int | None = None
    """torch intra-op threads for CPU trials; None keeps torch's default."""
    memory_fraction: float | None = None
    """CUDA in a subprocess (``--isolate``): the allocator cap, set in the child before
    its first allocation, so that an OOM there also means "past the target"."""


@dataclass
class TrialMeasurement:
    batch: int
    ok: bool
    reason: str
    detail: str = ""
    peak_bytes: int | None = None
    images_per_s: float | None = None
    seconds: float = 0.0
    finite: bool = True
    """Did every measured step's losses stay finite (decides whether a precision is usable)."""
    losses: dict = field(default_factory=dict)
    images_per_s_rel_ci: float | None = None
    """Half-width of the 95 % interval of ``images_per_s``, relative to it."""
    timing_stop: str = ""
    """How the timing ended (:data:`autotune.timing.STOPS`): ``converged`` when the
    interval met the tolerance, else a ceiling stopped it."""
    precision: str | None = None
    """The precision the trial ran in (set by the tuner; None in older records)."""

    def to_outcome(self) -> TrialOutcome:
        return TrialOutcome(
            batch=self.batch,
            ok=self.ok,
            peak_bytes=self.peak_bytes,
            images_per_s=self.images_per_s,
            seconds=self.seconds,
            reason=self.reason,
            detail=self.detail,
            images_per_s_rel_ci=self.images_per_s_rel_ci,
        )




def _take_turns(step) -> int:
    """Let a step whose work varies at random (ARWGAN's noise layers) take turns instead
    (``take_turns``), and return the cycle length: a trial then warms up through every
    variant (their first-use kernel loads land in the warm-up) and times whole cycles,
    so that every batch size is timed on the same work. Training still draws at random."""
    take_turns = getattr(step, "take_turns", None)
    return max(1, int(take_turns())) if take_turns is not None else 1


def _trial_body(spec: TrialSpec, device, cuda, workload) -> TrialMeasurement:
    """The trial itself. A function of its own so that, when it raises, every tensor it
    made (model, grads, optimiser state, inputs, results) dies with its frame before the
    caller empties the cache."""
    import torch

    from autotune.workload import losses_of

    started = time.perf_counter()
    if spec.threads is not None and device.type == "cpu":
        torch.set_num_threads(spec.threads)
    if cuda is not None:
        # Clear first, then reset: blocks cached by the previous trial would otherwise
        # count in this one's peak.
        cuda.empty_cache()
        cuda.synchronize(device.index or 0)
        cuda.reset_peak(device.index or 0)
    lrs = dict(workload.reference_lrs)
    step_fn = workload.build_step(spec.batch, spec.precision, device, lrs=lrs,
                                  channels_last=spec.channels_last, seed=spec.seed)
    cycle = _take_turns(step_fn)
    batch = step_fn.to_device(workload.example_batch(spec.batch, spec.seed))
    timing_cfg = TimingConfig(**spec.timing) if spec.timing else TimingConfig()
    # Warm up through every variant of the step (their first-use kernel loads land there).
    timing_cfg = replace(timing_cfg, warmup_steps=max(timing_cfg.warmup_steps, cycle))
    finite = True
    result = None

    def step() -> None:
        nonlocal finite, result
        result = step_fn(batch)
        finite = finite and not getattr(result, "skipped", False)

    sync = (lambda: cuda.synchronize(device.index or 0)) if cuda is not None else None
    per_sample, multiple = _warm_up(step, cycle, timing_cfg, sync)
    # Whole cycles, so every batch size is timed on the same work: per sample, or, for a
    # slow step, in whole cycles of one-step samples.
    timing = time_adaptively(step, spec.batch, replace(timing_cfg, warmup_steps=0), sync=sync,
                             steps_per_sample=per_sample, sample_multiple=multiple)
    losses, last_finite = losses_of(result)
    finite = finite and last_finite
    if cuda is not None:
        peak = cuda.peak_reserved_bytes(device.index or 0) + spec.context_bytes
    else:
        peak = peak_rss_bytes()
    return TrialMeasurement(
        batch=spec.batch,
        ok=True,
        reason="ok",
        peak_bytes=peak,
        images_per_s=timing.images_per_s if math.isfinite(timing.images_per_s) else None,
        seconds=time.perf_counter() - started,
        finite=finite,
        losses=losses,
        images_per_s_rel_ci=timing.rel_ci,
        timing_stop=timing.stop,
    )


def _warm_up(step, cycle: int, cfg: TimingConfig, sync) -> tuple[int, int]:
    """Run ``cfg.warmup_steps`` untimed steps; return (steps per timing sample, samples
    the measurement must stop on a multiple of), by the last warm-up step's time.

    Normally a sample is whole noise cycles lasting at least ``cfg.min_sample_seconds``
    (multiple 1). When one cycle would be too long a sample (the slow-step floor of
    ``cfg.min_slow_samples`` samples would overrun ``cfg.max_seconds``: 48x48 crops at
    batch 64 on 2 cores take 1.9 s a step, 5.7 s a cycle), a sample is one step and the
    measurement stops on whole cycles instead: the same work, a third of the time. Its
    interval then includes the variants' differences, wider and so on the safe side."""
    wait = sync or (lambda: None)
    one = 0.0
    for _ in range(cfg.warmup_steps):
        wait()
        clock = time.perf_counter()
        step()
        wait()
        one = time.perf_counter() - clock
    if cycle > 1 and cycle * one * cfg.min_slow_samples > cfg.max_seconds:
        return 1, cycle
    steps = max(1, math.ceil(cfg.min_sample_seconds / one)) if one > 0 else 1
    return math.ceil(steps / cycle) * cycle, 1


def run_trial(spec: TrialSpec, cuda=None, workload=None) -> TrialMeasurement:
    """Run one trial in this process. An OOM is an outcome, not an exception.

    ``cuda``: the device seam (:class:`autotune.device.CudaDevice` by default on CUDA);
    ``workload``: the workload object (None: rebuilt from ``spec.workload``).
    """
    import torch

    from autotune.device import CudaDevice, configure_cudnn

    device = torch.device(spec.device)
    if device.type == "cuda" and cuda is None:
        cuda = CudaDevice()
    configure_cudnn(device.type)  # the trainer's settings, so the figures describe it
    if workload is None:
        from autotune.workload import WorkloadRef

        if spec.workload is None:
            raise ValueError("a trial needs a workload or a workload reference")
        workload = WorkloadRef(**spec.workload).build()
    started = time.perf_counter()
    try:
        return _trial_body(spec, device, cuda if device.type == "cuda" else None, workload)
    except Exception as exc:  # noqa: BLE001 - classified right below
        if not is_oom(exc):
            raise
        # Keep only text: the traceback holds the body's frame, which holds the tensors.
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    finally:
        gc.collect()
        if device.type == "cuda":
            cuda.empty_cache()
    return TrialMeasurement(
        batch=spec.batch,
        ok=False,
        reason="oom",
        detail=detail,
        seconds=time.perf_counter() - started,
    )


def run_trial_in_process(spec: TrialSpec, workload) -> TrialMeasurement:
    """A CPU trial in this process, for a workload that cannot be rebuilt in a child (no
    reference). The resident-set high-water mark is reset first where Linux allows
    (``/proc/self/clear_refs``), so the peak is this process's during the trial, not
    since it started; it still includes whatever the process held before, and nothing
    stops a batch past the target before it has run."""
    from autotune.trial_server import _reset_peak

    _reset_peak()
    return run_trial(spec, None, workload)


# -- subprocess isolation ------------------------------------------------------------------
def _watchdog(limit_bytes: int, interval_s: float = 0.01) -> None:
    """End this process the moment its resident set passes ``limit_bytes``."""
    import psutil

    process = psutil.Process()

    def watch() -> None:
        while True:
            if process.memory_info().rss > limit_bytes:
                os._exit(EXIT_OVER_MEMORY)
            time.sleep(interval_s)

    threading.Thread(target=watch, daemon=True).start()


def _worker_main() -> None:
    """Entry of ``python -m autotune.trial``: read a TrialSpec as JSON on stdin, print the
    TrialMeasurement as one tagged JSON line on stdout."""
    spec = TrialSpec(**json.loads(sys.stdin.read()))
    if spec.memory_limit_bytes:
        _watchdog(spec.memory_limit_bytes)
    measurement = run_isolated_trial(spec)
    print(_RESULT_PREFIX + json.dumps(asdict(measurement)), flush=True)


def run_isolated_trial(spec: TrialSpec) -> TrialMeasurement:
    """:func:`run_trial` in a process of its own (a fresh interpreter or a fork of the
    trial server): on CUDA, select the device and set the allocator cap from the spec
    before the first allocation, so that an OOM there also means "past the target"."""
    if spec.device.startswith("cuda"):
        from autotune.device import CudaDevice

        index = int(spec.device.partition(":")[2] or 0)
        cuda = CudaDevice()
        cuda.set_device(index)
        if spec.memory_fraction is not None:
            cuda.set_memory_fraction(spec.memory_fraction, index)
    return run_trial(spec)


def run_trial_subprocess(spec: TrialSpec, timeout_s: float | None = None) -> TrialMeasurement:
    """Run one trial in a fresh Python process: isolated memory, honest peak RSS."""
    started = time.perf_counter()
    env = dict(os.environ)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "autotune.trial"],
            input=json.dumps(asdict(spec)),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return TrialMeasurement(
            batch=spec.batch,
            ok=False,
            reason="too_slow",
            detail=f"no result within {timeout_s:.0f} s",
            seconds=time.perf_counter() - started,
        )
    seconds = time.perf_counter() - started
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            measurement = TrialMeasurement(**json.loads(line[len(_RESULT_PREFIX) :]))
            measurement.seconds = seconds
            return measurement
    if proc.returncode in (EXIT_OVER_MEMORY, -9):
        limit = spec.memory_limit_bytes
        detail = (
            f"resident set passed the {limit / 2**30:.2f} GiB limit"
            if proc.returncode == EXIT_OVER_MEMORY and limit
            else "killed (out of memory)"
        )
        return TrialMeasurement(
            batch=spec.batch, ok=False, reason="oom", detail=detail, seconds=seconds
        )
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return TrialMeasurement(
        batch=spec.batch,
        ok=False,
        reason="error",
        detail=f"trial process exited {proc.returncode}: {tail}",
        seconds=seconds,
    )


if __name__ == "__main__":
    _worker_main()
