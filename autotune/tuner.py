"""The tuner: probe, measure, decide, and write tuned.json.

Each phase measures with the workload's real train step and data
(:class:`autotune.workload.Workload`: ARWGAN is one), then hands the numbers to a pure
decision function (``autotune.search``, ``autotune.decisions``, ``autotune.goodput``):

1. probe the machine (NVML, torch.cuda, host) and parse the memory target;
2. precision: fp32 / bf16 / fp16 trials at the reference batch -> ``choose_precision``;
2b. noise scale (objective goodput): the gradient noise scale of each of the workload's
   noise groups (ARWGAN: generator and discriminator) at the reference batch on the
   real data (from a checkpoint's weights with ``from_checkpoint``); the first group's
   -> the goodput score of the search;
3. batch: double-then-bisect trials in that precision -> ``search_batch``, stopping
   past the peak of the objective's score (unless ``find_edge``); goodput re-chooses
   among the trials with ``choose_batch_by_goodput``;
4. workers: DataLoader (CUDA) or, on a CPU, intra-op threads x workers end to end ->
   ``choose_workers`` / ``choose_threads_workers``;
4b. knobs: channels_last, cudnn.benchmark (CUDA), torch.compile (``try_compile``),
   each measured and chosen by :mod:`autotune.knobs`;
5. learning rates: ``scale_lr`` for each of the workload's reference rates from its
   reference batch (rule ``adascale`` from the measured noise scale under goodput);
6. the workload's baseline (ARWGAN's seed default: batch 16, 4 workers, fp32, no
   pinning) and the recommendation, trained end to end on the same data, alternated.

CPU trials (and CUDA ones with ``isolate``) run in forks of one pre-imported trial
server per tuning run (:mod:`autotune.trial_server`), which rebuilds the workload from
its reference (``package.module:factory``); a workload without one runs its trials in
this process, with a warning. Every trial is timed adaptively (:mod:`autotune.timing`)
and carries its 95 % interval.

Under ``torchrun`` (a :class:`autotune.distributed.DistContext` in a process group)
every rank measures its own device, and the ranks agree, since one DDP job trains with
one configuration:

- precision: per-rank measurements are combined (usable only where every rank ran it
  with finite losses, speed of the slowest rank, peak of the largest) and chosen once;
- batch: each rank searches against its own memory; the job takes the minimum over
  ranks (all_reduce MIN), so mixed GPUs are handled by the smallest, and the record
  names the rank that limited it. A rank that never tried the agreed batch verifies it
  with one more trial;
- workers: each rank measures its own loader (the ranks of a node share its cores, so
  candidates stop at cores / processes per node); rank 0's choice is broadcast;
- learning rates are scaled for the global batch (per-rank batch x world size);
- the comparison runs on every rank at once, without DDP's communication; the slowest
  rank's figures are reported (every DDP step waits for it).

Every rank's figures go to ``measurements['ranks']``; only rank 0 prints and writes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

import torch

from autotune.distributed import DistContext, local_main_first, single_process
from autotune.errors import ConfigError
from autotune.runtime import PRECISIONS, check_precision, resolve_device
from autotune.workload import LoaderSettings, Workload
from autotune.decisions import (
    LR_RULES,
    PrecisionMeasurement,
    WorkerMeasurement,
    choose_precision,
    choose_workers,
    judge_recommendation,
    lr_warning,
    scale_lr,
    warmup_steps_for,
)
from autotune.device import cap_fraction, memory_capped
from autotune.measure import loader_images_per_s, training_images_per_s
from autotune.memory import format_bytes, parse_target_mem
from autotune.oom import is_oom
from autotune.probes import Probes, device_fingerprint, real_probes, select_gpu
from autotune.gns import NoiseScale
from autotune.goodput import (
    ADAM_LR_POWER,
    BatchCandidate,
    GoodputChoice,
    choose_batch_by_goodput,
    conservative_noise_scale,
    efficiency,
    goodput_row,
    verdict_line,
)
from autotune.knobs import (
    KnobDecision,
    Rate,
    channels_last_from_runoff,
    choose_compile,
    choose_threads_workers,
    choose_toggle,
    measure_compile,
    measure_threads_workers,
    measure_toggle,
    not_applicable,
    thread_worker_candidates,
)
from autotune.search import (
    Score,
    SearchConfig,
    SearchError,
    SearchResult,
    runoff_batches,
    runoff_label,
    runoff_winner,
    search_batch,
)
from autotune.timing import TimingConfig
from autotune.trial import (
    TrialMeasurement, TrialSpec, run_trial, run_trial_in_process, run_trial_subprocess,
)
from autotune.trial_server import TrialServer, run_trial_preimported
from autotune.tuned import SCHEMA_VERSION, TunedChoice, TunedFile, fingerprint_of

OBJECTIVES = ("goodput", "throughput", "memory")
#: What a CPU trial server imports once, so that each trial's fork starts with it (and
#: the workload factory's module).
TRIAL_PRELOAD = ("torch", "autotune.trial", "autotune.workload")
#: The noise phase: micro-batches of the reference batch, this many per measurement
#: (BatchNorm sees the reference batch; their mean is a batch of 64).
NOISE_MICRO_BATCHES = 4
#: The search's noise floor on a CPU (``TuneConfig.trial_noise``): the relative
#: half-width each trial's reading is given at least when two trials are compared.
#: Six trials of each of batch 16, 32 and 64 on the demo model, on 2 shared cores,
#: read with a between-trial standard deviation of 10-13 % while each trial's own 95 %
#: interval had a median of 3-7 % (``benchmarks/trial_noise.py``, sixth session). One
#: standard deviation each side: two trials are clearly apart when about 18 % apart.
CPU_TRIAL_NOISE = 0.10
#: CPU threads x workers are measured at most at this multiple of the reference batch.
PAIR_BATCH_FACTOR = 4
#: ... and at the largest batch the search measured whose step takes at most this long.
PAIR_STEP_SECONDS = 0.5
#: The noise-scale phase takes at least this many measurements, whatever its time budget.
NOISE_MIN_STEPS = 4
#: Goodput candidates within this share of the best count as tied (the smallest wins).
GOODPUT_TOLERANCE = 0.03


@dataclass
class TuneConfig:
    """How to tune (any workload) and how hard to try."""

    device: str = "auto"
    target_mem: str | None = None
    """'20GB', '20GiB', '80%'...; None: 90 % of the GPU, half the available RAM on CPU."""
    objective: str = "goodput"
    """goodput (images/s x predicted statistical efficiency, from the measured gradient
    noise scale) | throughput (images/s) | memory (largest batch that fits)."""
    lr_rule: str | None = None
    """linear | sqrt | none | adascale; None: adascale under goodput, linear otherwise."""
    precision: str | None = None
    """Force one precision instead of measuring them."""
    start_batch: int | None = None
    """First batch of the search. None: 2 under goodput (small batches are candidates
    there: each image is worth more), the reference batch under throughput and memory
    (the precision phase ran it, so it fits; a smaller batch seldom runs more images/s,
    and its trials would cost time without changing the answer)."""
    max_batch: int = 4096
    max_trials: int = 16
    trial_budget_s: float = 25.0
    """A trial slower than this stops the batch growth."""
    margin_fraction: float = 0.03
    """Safety margin below the target, as a share of it (converted to bytes)."""
    isolate: bool = False
    """CUDA: run each trial in a subprocess of its own (CPU trials always are)."""
    timing: TimingConfig = field(default_factory=lambda: TimingConfig(max_seconds=4.0))
    """How long a trial (and a knob measurement) is timed: until its images/s is known
    within ``rel_ci``, between a floor and a ceiling."""
    find_edge: bool = False
    """Search the memory edge even after the score has peaked (objective memory always does)."""
    noise_steps: int = 16
    """Goodput: noise-scale measurements (each on a fresh batch of 4 x the reference batch)."""
    from_checkpoint: str | None = None
    """Goodput: measure the noise scale on this checkpoint's weights (a partly trained
    model) instead of a fresh one."""
    try_compile: bool = False
    """Measure torch.compile (its compile time, a minute on a small CPU, is otherwise
    not spent: it can rarely pay within a short CPU run)."""
    planned_epochs: int = 10
    """Length of the planned training run, for whether compiling pays within it."""
    worker_steps: int = 8
    """At most this many batches (or train steps on CPU) timed per worker candidate."""
    compare_steps: int = 10
    """At most this many train steps per round when comparing seed default and recommendation."""
    measure_images: int = 512
    """Image budget of one worker or comparison measurement: large batches take fewer
    steps (never fewer than 3), so that every measurement costs about the same time."""
    measure_seconds: float = 2.0
    """Time budget of one worker or comparison measurement, from the step time the
    trials measured: a slow step (a large batch of a big model on a CPU) takes fewer
    steps than the image budget asks (never fewer than 3, or 2 when two steps already take
    this long)."""
    noise_seconds: float = 15.0
    """Goodput: the noise-scale phase stops after this many seconds once it has
    ``NOISE_MIN_STEPS`` measurements, even short of ``noise_steps`` (its standard error
    is then larger, and the conservative estimate lower, which the table shows)."""
    compare_rounds: int = 2
    runoff: int = 2
    """Batches the search could not tell apart (scores within each other's noise) that
    are re-measured end to end, in alternation, in the comparison phase before the
    batch is final (the chosen one included). On a CPU the runoff also decides
    channels_last at the chosen batch. 1: no runoff (the knobs phase decides
    channels_last). No batch runoff under the memory objective; none at all under DDP
    (the ranks would have to agree on the runoff too)."""
    trial_noise: float | None = None
    """How far apart (a relative half-width each) two trials' readings must be before
    the search calls one clearly below the other (:attr:`SearchConfig.noise_floor`).
    None: :data:`CPU_TRIAL_NOISE` on a CPU, where trials of one batch a few seconds
    apart differ by 10-13 % (standard deviation; ``benchmarks/trial_noise.py``); 0 on
    CUDA, where the trials' own intervals are trusted until the same benchmark has
    measured a GPU."""
    max_workers: int | None = None
    seed: int = 0
    channels_last: bool = False
    tuner_command: str = "python -m autotune"
    """The command users re-run when the tuned file no longer fits (named in messages)."""

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(
                f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}"
            )
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"
            )
        if self.lr_rule is None:
            self.lr_rule = "adascale" if self.objective == "goodput" else "linear"
        if self.lr_rule not in LR_RULES:
            raise ConfigError(
                f"learning-rate rule must be one of {', '.join(LR_RULES)}, got {self.lr_rule!r}"
            )
        if self.lr_rule == "adascale" and self.objective != "goodput":
            raise ConfigError("learning-rate rule adascale needs --objective goodput "
                              "(it scales with the gradient noise scale that objective measures)")
        if self.from_checkpoint is not None and self.objective != "goodput":
            raise ConfigError("--from-checkpoint measures the noise scale: it needs --objective goodput")
        for name in ("start_batch", "max_batch", "max_trials", "worker_steps",
                     "compare_steps", "compare_rounds", "runoff", "noise_steps", "planned_epochs"):
            value = getattr(self, name)
            if name == "start_batch" and value is None:
                continue
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")
        if self.start_batch is not None and self.max_batch < self.start_batch:
            raise ConfigError(f"max batch {self.max_batch} is below the start batch {self.start_batch}")
        for name in ("measure_seconds", "noise_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and 0 < value < math.inf):
                raise ConfigError(f"{name.replace('_', ' ')} must be a positive number, got {value!r}")
        if self.trial_noise is not None and not (
                isinstance(self.trial_noise, (int, float)) and not isinstance(self.trial_noise, bool)
                and 0 <= self.trial_noise < 1):
            raise ConfigError(f"trial noise must be a fraction in [0, 1), got {self.trial_noise!r}")
        if not (self.trial_budget_s > 0):
            raise ConfigError(f"trial budget must be positive, got {self.trial_budget_s!r}")
        if self.max_workers is not None and self.max_workers < 0:
            raise ConfigError(f"max workers must be >= 0, got {self.max_workers!r}")


@dataclass
class TuneResult:
    tuned: TunedFile
    machine: dict
    search: SearchResult
    precision: list[PrecisionMeasurement]
    workers: list[WorkerMeasurement]
    target_bytes: int
    warnings: list[str]

    @property
    def choice(self) -> TunedChoice:
        """What to train with: :meth:`TunedChoice.dataloader_kwargs`, ``precision``,
        ``learning_rates``, ``warmup_steps``, ``channels_last``, ``cpu_threads``..."""
        return self.tuned.choice

    def print_report(self, console=None) -> None:
        """The tables ``python -m autotune`` prints (machine excluded)."""
        from autotune.console import console as default_console
        from autotune.report import print_report

        print_report(console or default_console, self)

    def save(self, path) -> None:
        """Write the tuned file (atomically), as the command's ``--out`` does."""
        from autotune.tuned import save_tuned

        save_tuned(path, self.tuned)


Report = Callable[[str], None]


class RankSearchError(SearchError):
    """The start batch does not fit on one rank of a torchrun job: every rank raises
    this, naming that rank, so the whole job stops with the same message."""

    def __init__(self, rank: int, outcome) -> None:
        super().__init__(outcome)
        self.rank = rank
        self.args = (f"rank {rank}: {self.args[0]}",)


def combine_rank_precisions(
    per_rank: list[list[PrecisionMeasurement]],
) -> list[PrecisionMeasurement]:
    """One measurement per precision for a whole job, from every rank's (rank 0 first).

    A precision is usable only when every rank ran it with finite losses; its speed is
    the slowest rank's (each DDP step waits for it) and its peak the largest. Precisions
    rank 0 did not measure are left out: rank 0 could not train in them.
    """
    combined = []
    for first in per_rank[0]:
        name = first.precision
        found = [next((m for m in rank if m.precision == name), None) for rank in per_rank]
        missing = [rank for rank, m in enumerate(found) if m is None]
        if missing:
            combined.append(PrecisionMeasurement(
                name, None, None, False, f"not measured on rank(s) {', '.join(map(str, missing))}"
            ))
            continue
        speeds = [m.images_per_s for m in found]
        peaks = [m.peak_bytes for m in found]
        combined.append(PrecisionMeasurement(
            precision=name,
            images_per_s=None if None in speeds else min(speeds),
            peak_bytes=None if None in peaks else max(peaks),
            finite=all(m.finite for m in found),
            error="; ".join(f"rank {rank}: {m.error}" for rank, m in enumerate(found) if m.error),
        ))
    return combined


def tuner_timeout_s(cfg: TuneConfig) -> float:
    """How long a collective may wait under torchrun while tuning. Ranks search on their
    own (up to ``max_trials`` trials of up to 3 budgets each, then workers and the
    comparison) and meet only between phases: a rank can be far behind the others
    without anything being wrong, and the 600 s of training would kill the job."""
    return float(cfg.max_trials * (3 * cfg.trial_budget_s + 60) + 1800)


def worker_candidates(usable_cores: int, cap: int | None = None, baseline_workers: int = 4) -> list[int]:
    """0, 1, 2, 4, ... up to the usable cores, plus one oversubscribed count (2x cores, at
    least the baseline's), because whether oversubscription pays is measured, not assumed."""
    top = usable_cores if cap is None else min(cap, usable_cores)
    counts = [0]
    n = 1
    while n <= top:
        counts.append(n)
        n *= 2
    if top not in counts:
        counts.append(top)
    over = max(2 * usable_cores, baseline_workers)
    if cap is None or over <= cap:
        counts.append(over)
    return sorted(set(counts))


class Tuner:
    def __init__(
        self,
        workload: Workload,
        cfg: TuneConfig | None = None,
        probes: Probes | None = None,
        report: Report | None = None,
        dist: DistContext | None = None,
    ):
        """Tune ``workload`` as ``cfg`` says. ``dist``: this process's place in a torchrun
        job (its device is ``cfg.device``); None tunes this process alone."""
        if not isinstance(workload, Workload):
            raise ConfigError(f"tune() needs an autotune.Workload, got {type(workload).__name__}")
        self.workload = workload
        self.ref = workload.reference()
        cfg = cfg if cfg is not None else TuneConfig()
        self.cfg = cfg
        self.reference_batch = workload.reference_batch
        self.baseline = workload.baseline
        self.probes = probes or real_probes()
        self.report = report or (lambda message: None)
        self.cuda = self.probes.cuda
        """The device seam: every torch.cuda call of the tuner goes through it."""
        self.device = self._resolve(cfg.device)
        self.index = self.device.index or 0
        self.dist = dist if dist is not None else single_process(self.device)
        if self.device.type == "cuda" and not self.dist.distributed:
            # One set_device for cuda:N: the pin-memory thread and every call without an
            # explicit device would otherwise use cuda:0 (a stray context there).
            self.cuda.set_device(self.index)
        self.warnings: list[str] = []
        self.context_bytes = 0
        self._context_remeasured = False
        self._datasets = None
        self.trials_run: list[TrialMeasurement] = []
        self._trials_by_spec: dict[str, TrialMeasurement] = {}
        """Successful trials by their spec (JSON): asked again, a trial is not re-run."""
        self.phase_seconds: dict[str, float] = {}
        self.trial_server: TrialServer | None = None
        self.noise: dict | None = None
        """The noise phase's record (objective goodput), for tuned.json."""
        self.noise_scale: float | None = None
        """The generator's noise scale the goodput choice is decided with; None when
        unusable (the reference batch is then kept)."""
        self.goodput: GoodputChoice | None = None
        if self.ref is None and (self.device.type == "cpu" or cfg.isolate):
            if cfg.isolate:
                raise ConfigError(
                    f"--isolate runs each trial in a child process, which must rebuild workload "
                    f"{workload.name}: give it a reference (package.module:factory)"
                )
            self.warnings.append(
                f"workload {workload.name} has no reference (package.module:factory), so its CPU "
                "trials ran in this process: each trial's peak is this process's peak during it "
                "(including what earlier trials left allocated), and a batch past the target is "
                "seen only after it ran; build it with autotune.load_workload to isolate trials"
            )

    def _resolve(self, name: str) -> torch.device:
        """``resolve_device``, except that an explicit cuda device is checked against the
        seam (so that a fake CUDA device drives every CUDA branch on a CPU)."""
        if name.startswith("cuda") and self.cuda.available():
            try:
                device = torch.device(name)
            except RuntimeError:
                return resolve_device(name)
            if device.index is not None and device.index >= self.cuda.device_count():
                return resolve_device(name)
            return device
        return resolve_device(name)

    # -- phase 1: the machine and the target -------------------------------------------------
    def probe(self) -> dict:
        host = self.probes.host.info()
        self.host = host
        self.gpu = None
        if self.device.type == "cuda":
            index = self.index
            nvml = self.probes.nvml
            # Device-wide NVML 'used' before this process has a context: the fallback
            # for measuring our own usage where NVML does not list our PID.
            self._device_used_before = nvml.device_used_bytes(index) if nvml.available() else None
            self.cuda.init_context(index)  # create the context so that it can be measured
            self.gpu = select_gpu(self.probes, str(self.device))
            if not nvml.available():
                self.warnings.append("NVML unavailable: GPU memory read from torch only")
            elif getattr(nvml, "last_error", None):
                self.warnings.append(f"NVML failed after init ({nvml.last_error}): "
                                     "GPU memory read from torch only")
            self._measure_context()
        self.torch = self.probes.torch()
        self.fingerprint = device_fingerprint(
            self.gpu, host, self.torch, self.device.type,
            cuda_total_bytes=self.cuda.total_bytes(self.index) if self.device.type == "cuda" else None,
        )
        self.machine = {
            "device": str(self.device),
            "host": asdict(host),
            "gpu": asdict(self.gpu) if self.gpu else None,
            "torch": asdict(self.torch),
            "context_bytes": self.context_bytes,
        }
        return self.machine

    def _measure_context(self) -> None:
        """Memory this process holds outside the caching allocator (CUDA context, cuDNN and
        cuBLAS handles and kernels, NCCL buffers): NVML's usage for our PID minus what the
        allocator reserved. Called once at the start and again after the first real
        trial, since with lazy module loading the libraries arrive with the first step.
        Where NVML does not list our PID (a container without the host PID namespace,
        MPS) the change in the device's 'used' stands in, with a warning."""
        nvml = self.probes.nvml
        if not nvml.available():
            return
        own = nvml.process_used_bytes(self.index)
        reserved = self.cuda.reserved_bytes(self.index)
        if own:
            self.context_bytes = max(self.context_bytes, own - reserved)
            return
        used = nvml.device_used_bytes(self.index)
        before = getattr(self, "_device_used_before", None)
        if used is None or before is None:
            return
        self.context_bytes = max(self.context_bytes, used - before - reserved)
        note = ("NVML does not list this process (container PID namespace, MPS or MIG): "
                "its memory outside the allocator is estimated from the device's change "
                "in use, which other processes can disturb")
        if note not in self.warnings:
            self.warnings.append(note)

    def target_bytes(self) -> int:
        if self.device.type == "cuda":
            free, total = self.cuda.mem_get_info(self.index)
            used = total - free
            default = "90%"
        else:
            total = self.host.ram_total_bytes
            # A trial is a fresh process: its floor is what torch alone takes, not what the
            # machine's other processes hold.
            used = 0
            default = None
        if self.cfg.target_mem is None and default is None:
            # The processes of one node share its RAM: each gets its part of the half.
            return self.host.ram_available_bytes // (2 * self.dist.local_world_size)
        return parse_target_mem(self.cfg.target_mem or default, total, used)

    # -- trials ---------------------------------------------------------------------------------
    def _spec(self, batch: int, precision: str) -> TrialSpec:
        isolated = self._isolated()
        return TrialSpec(
            workload=self.ref.to_dict() if isolated else None,
            precision=precision,
            device=str(self.device),
            batch=batch,
            timing=self.cfg.timing.to_dict(),
            channels_last=self.cfg.channels_last,
            seed=self.cfg.seed,
            memory_limit_bytes=self.target if self.device.type == "cpu" and isolated else None,
            context_bytes=self.context_bytes,
            memory_fraction=self._fraction() if self.device.type == "cuda" else None,
        )

    def trial(self, batch: int, precision: str) -> TrialMeasurement:
        """One trial at ``batch`` and ``precision``. A successful trial is run once per
        tuning: asked again with the same spec (the search's trial at the batch the
        precision phase measured), its measurement is reused, not paid twice."""
        spec = self._spec(batch, precision)
        key = json.dumps(asdict(spec), sort_keys=True)
        if key in self._trials_by_spec:
            self.report(f"trial: batch {batch}, {precision} (measured already)")
            return self._trials_by_spec[key]
        self.report(f"trial: batch {batch}, {precision}")
        measurement = self._execute(spec)
        measurement.precision = precision
        if self.device.type == "cuda" and not self.cfg.isolate and not self._context_remeasured:
            # The first real step loaded cuDNN/cuBLAS: measure the context again, fix this
            # trial's peak, and tighten the cap for every later allocation.
            self._context_remeasured = True
            before = self.context_bytes
            self._measure_context()
            if measurement.ok and measurement.peak_bytes is not None:
                measurement.peak_bytes += self.context_bytes - before
            if self._capped:
                self.cuda.set_memory_fraction(self._fraction(), self.index)
        self.trials_run.append(measurement)
        if measurement.ok:
            self._trials_by_spec[key] = measurement
        return measurement

    def _execute(self, spec: TrialSpec) -> TrialMeasurement:
        """Run one trial: in this process (CUDA), or in a fork of this run's pre-imported
        trial server (CPU, CUDA with --isolate). Where forking is unavailable, a fresh
        interpreter per trial, as before the server existed."""
        timeout = 3 * self.cfg.trial_budget_s + 60
        if self._isolated():
            server = self._server()
            if server is None:
                return run_trial_subprocess(spec, timeout_s=timeout)
            return run_trial_preimported(spec, timeout_s=timeout, server=server)
        if self.device.type == "cpu":
            return run_trial_in_process(spec, self.workload)
        return run_trial(spec, self.cuda, self.workload)

    def _isolated(self) -> bool:
        """Trials in a child process: CPU (its own peak) and CUDA with ``isolate``, when
        the workload can be rebuilt there."""
        return (self.device.type == "cpu" or self.cfg.isolate) and self.ref is not None

    def _server(self) -> TrialServer | None:
        """This run's trial server, started at the first trial (closed by :meth:`close`)."""
        if self.trial_server is None and hasattr(__import__("os"), "fork"):
            module = self.ref.factory.partition(":")[0] if self.ref is not None else None
            preload = TRIAL_PRELOAD + ((module,) if module else ()) + tuple(self.workload.preload)
            self.trial_server = TrialServer(preload=preload).start()
        return self.trial_server

    # -- phase 2: precision ----------------------------------------------------------------------
    def precision_candidates(self) -> list[str]:
        if self.cfg.precision is not None:
            if self.cfg.precision == "bf16" and self.device.type == "cuda":
                if not self.cuda.bf16_supported(self.index):
                    raise ConfigError("precision bf16 is not supported natively by this GPU "
                                      "(compute capability below 8.0); use fp16 or fp32")
            else:
                check_precision(self.cfg.precision, self.device)
            return [self.cfg.precision]
        if self.device.type == "cuda":
            candidates = ["fp32", "fp16"]
            if self.cuda.bf16_supported(self.index):  # native only: capability 8.0+
                candidates.insert(1, "bf16")
            return candidates
        return ["fp32", "bf16"]  # CPU autocast in bf16 is real on CPUs with AVX512-BF16/AMX

    def measure_precisions(self) -> list[PrecisionMeasurement]:
        batch = max(self.cfg.start_batch or 1, min(self.reference_batch, self.cfg.max_batch))
        results = []
        for precision in self.precision_candidates():
            with self._memory_capped():
                m = self.trial(batch, precision)
            results.append(
                PrecisionMeasurement(
                    precision=precision,
                    images_per_s=m.images_per_s,
                    peak_bytes=m.peak_bytes,
                    finite=m.finite and m.ok,
                    error="" if m.ok else f"{m.reason}: {m.detail}",
                )
            )
        return results

    # -- phase 3: batch ------------------------------------------------------------------------
    def search(self, precision: str) -> SearchResult:
        cfg = self.cfg
        search_cfg = SearchConfig(
            target_bytes=self.target,
            margin_bytes=self._margin_bytes(),
            start=self.search_start(precision),
            max_batch=cfg.max_batch,
            max_trials=cfg.max_trials,
            trial_time_budget_s=cfg.trial_budget_s,
            # Goodput searches like throughput, with its own score (below).
            objective="memory" if cfg.objective == "memory" else "throughput",
            find_edge=cfg.find_edge,
            noise_floor=self.trial_noise(),
        )
        score = self.goodput_score()
        with self._memory_capped():
            result = search_batch(lambda b: self.trial(b, precision).to_outcome(), search_cfg, score)
        if cfg.objective == "goodput":
            self.goodput = self.choose_by_goodput(result)
            result = replace(result, chosen=self.goodput.chosen.batch)
        return result

    def trial_noise(self) -> float:
        """The search's noise floor (``TuneConfig.trial_noise``, or the device's default)."""
        if self.cfg.trial_noise is not None:
            return float(self.cfg.trial_noise)
        return CPU_TRIAL_NOISE if self.device.type == "cpu" else 0.0

    def _margin_bytes(self) -> int:
        """The search's safety margin below the target, in bytes."""
        return int(self.target * self.cfg.margin_fraction)

    def search_start(self, precision: str | None = None) -> int:
        """The search's first batch (see :attr:`TuneConfig.start_batch`): under throughput
        and memory the reference batch, but only where its precision-phase trial (in
        ``precision``) fitted under the target; else, like goodput, 2."""
        if self.cfg.start_batch is not None:
            return self.cfg.start_batch
        small = min(2, self.cfg.max_batch)
        if self.cfg.objective == "goodput":
            return small
        reference = min(self.reference_batch, self.cfg.max_batch)
        limit = self.target - self._margin_bytes()
        fitted = any(t.batch == reference and t.ok and t.precision in (None, precision)
                     and t.peak_bytes is not None and t.peak_bytes <= limit
                     for t in self.trials_run)
        return reference if fitted else small

    def goodput_score(self) -> Score | None:
        """Goodput (images/s x predicted efficiency at the conservative noise scale) for
        the search's choice and its past-the-peak stop; None (images/s) otherwise, and
        when the noise scale is unusable (the growth is then stopped by throughput)."""
        goodput = self._runoff_score()
        if goodput is None:
            return None
        return Score("goodput", lambda outcome: None if outcome.images_per_s is None
                     else goodput(outcome.batch, outcome.images_per_s))

    def choose_by_goodput(self, result: SearchResult) -> GoodputChoice:
        """Among the successful trials, the batch with the best goodput (ties within
        3 %: the smallest). With an unusable noise scale, the largest batch up to the
        reference (efficiency cannot be predicted: the batch the rates were tuned at)."""
        candidates = [BatchCandidate(t.batch, t.images_per_s) for t in result.trials
                      if t.ok and t.images_per_s is not None]
        if self.noise_scale is None:
            # Efficiency unknown: every row at efficiency 1 for the table, the choice kept
            # at the reference batch (or the largest tried below it).
            shown = choose_batch_by_goodput(candidates, math.inf, self.reference_batch, ADAM_LR_POWER)
            near = [r for r in shown.rows if r.batch <= self.reference_batch] or [shown.rows[0]]
            return replace(shown, chosen=max(near, key=lambda r: r.batch))
        return choose_batch_by_goodput(candidates, self.noise_scale, self.reference_batch,
                                       ADAM_LR_POWER, GOODPUT_TOLERANCE)

    # -- phase 2b: gradient noise scale --------------------------------------------------------
    def measure_noise(self, precision: str) -> dict:
        """The gradient noise scale of each of the workload's noise groups (ARWGAN:
        generator and discriminator) at the reference batch, on the real data
        (docs/goodput.md): ``noise_steps`` times, one training step at the reference
        batch (from scratch only, so the measurement spans the first steps rather than
        one point) and a measurement on a fresh batch of 4 x the reference batch. With
        ``from_checkpoint`` the weights come from that checkpoint first. The first
        group decides; a step without ``measure_gradient_noise`` keeps the reference
        batch, with a warning."""
        cfg = self.cfg
        groups = tuple(self.workload.noise_groups) or ("model",)
        micro = self.reference_batch
        step_fn = self._step(precision, micro)
        if not hasattr(step_fn, "measure_gradient_noise"):
            del step_fn
            self._release()
            self.noise_scale = None
            self.warnings.append(
                f"workload {self.workload.name}'s train step cannot measure the gradient noise "
                f"scale (no measure_gradient_noise): batch kept at the reference "
                f"{self.reference_batch}; use --objective throughput"
            )
            self.noise = {"groups": list(groups), "decided_by": groups[0], "decided_with": None,
                          "unavailable": "the train step has no measure_gradient_noise"}
            return self.noise
        step = 0
        if cfg.from_checkpoint is not None:
            step = self.workload.load_checkpoint(step_fn, cfg.from_checkpoint)
        batch = micro * NOISE_MICRO_BATCHES
        train_loader = self._loader(LoaderSettings(micro), cfg.noise_steps + 4)
        noise_loader = self._loader(LoaderSettings(batch), cfg.noise_steps + 4)
        estimators = {name: NoiseScale() for name in groups}
        started = time.perf_counter()
        taken = 0
        with self._memory_capped():
            for i, (train_batch, noise_batch) in enumerate(zip(train_loader, noise_loader)):
                if i >= cfg.noise_steps or (
                        i >= NOISE_MIN_STEPS and time.perf_counter() - started > cfg.noise_seconds):
                    break
                taken = i + 1
                self.report(f"noise scale: measurement {i + 1} of {cfg.noise_steps}")
                if cfg.from_checkpoint is None:
                    step_fn(step_fn.to_device(train_batch))
                step_fn.measure_gradient_noise(step_fn.to_device(noise_batch), NOISE_MICRO_BATCHES,
                                               estimators)
        estimates = {name: est.estimate() for name, est in estimators.items()}
        if self.dist.distributed:  # one job, one batch: rank 0's measurement decides
            estimates = self.dist.broadcast_object(estimates)
        first = estimates[groups[0]]
        try:
            self.noise_scale = conservative_noise_scale(first.noise_scale, first.noise_scale_stderr)
        except ValueError as exc:
            self.noise_scale = None
            self.warnings.append(
                f"gradient noise scale not usable ({exc}): batch kept at the reference "
                f"{self.reference_batch}; raise --noise-steps or use --objective throughput"
            )
        del step_fn
        self._release()
        self.noise = {
            **{name: est.to_dict() for name, est in estimates.items()},
            "groups": list(groups),
            "decided_by": groups[0],
            "decided_with": self.noise_scale,
            "space": "raw",
            "micro_batch": micro,
            "micro_batches": NOISE_MICRO_BATCHES,
            "steps": taken,
            "steps_asked": cfg.noise_steps,
            "measured_at_step": step + (0 if cfg.from_checkpoint else taken),
            "checkpoint": cfg.from_checkpoint,
            "seconds": time.perf_counter() - started,
        }
        return self.noise

    def _fraction(self) -> float:
        """The allocator's cap: the target less what the process holds outside it."""
        total = self.cuda.mem_get_info(self.index)[1]
        return cap_fraction(self.target, self.context_bytes, total)

    @contextlib.contextmanager
    def _memory_capped(self):
        """Hold this process's allocator under the target for one CUDA phase, then put
        back whatever cap was in force before. With --isolate the children get the cap
        in their spec instead (:attr:`TrialSpec.memory_fraction`)."""
        if self.device.type != "cuda" or self.cfg.isolate or self._capped:
            yield
            return
        self._capped = True
        try:
            with memory_capped(self.cuda, self.index, self._fraction()):
                yield
        finally:
            self._capped = False

    _capped = False

    def verify_batch(self, batch: int, precision: str):
        """One trial at ``batch`` as the search would classify it (``over_target`` when
        its peak passes the limit): for a batch other ranks agreed on."""
        limit = self.target - int(self.target * self.cfg.margin_fraction)
        with self._memory_capped():
            outcome = self.trial(batch, precision).to_outcome()
        if outcome.ok and outcome.peak_bytes is not None and outcome.peak_bytes > limit:
            outcome = replace(
                outcome, ok=False, reason="over_target",
                detail=f"peak {format_bytes(outcome.peak_bytes)} above {format_bytes(limit)}",
            )
        return outcome

    # -- phase 4: workers ----------------------------------------------------------------------
    def dataset(self):
        """The workload's training dataset (built once, by the workload)."""
        if self._datasets is None:
            self._datasets = self.workload.dataset()
        return self._datasets

    def _loader(self, settings: LoaderSettings, steps: int):
        # Oversubscribing the cores is one of the things measured here, on purpose.
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        return self.workload.loader(settings, steps, seed=self.cfg.seed)

    def _step(self, precision: str, batch: int, channels_last: bool | None = None):
        """The workload's train step at ``batch`` with the learning rates of this run's rule."""
        memory_format = self.cfg.channels_last if channels_last is None else channels_last
        return self.workload.build_step(batch, precision, self.device, lrs=self.lrs(batch),
                                        channels_last=memory_format, seed=self.cfg.seed)

    def measure_threads_workers(self, batch: int, precision: str) -> tuple[list[WorkerMeasurement], KnobDecision]:
        """CPU: intra-op threads x DataLoader workers, end to end (they share the cores).
        Returns the worker measurements at all threads (the workers table) followed by
        the chosen pair as a :class:`WorkerMeasurement`, and the knob decision.

        Measured at ``min(batch, PAIR_BATCH_FACTOR x the reference batch)``: per image,
        both the step's compute and the loader's decoding scale with the batch, so the
        pair that wins there wins at the chosen batch, and each of the five or so
        end-to-end measurements (with its queue-draining warm-up) no longer costs a
        large batch's steps (130 s of a 320 s tuning at batch 256 on the 2-core
        machine). The comparison phase then times the chosen pair at the chosen batch."""
        cores = max(1, self.host.usable_cores // self.dist.local_world_size)
        shm_limit = self._shm_worker_limit(batch)  # what the chosen batch will put in flight
        batch = self.pair_batch(batch, precision)
        self.worker_batch = batch
        steps = self.steps_for(batch, self.cfg.worker_steps)
        candidates = [(t, w) for t, w in thread_worker_candidates(cores)
                      if (self.cfg.max_workers is None or w <= self.cfg.max_workers)
                      and (shm_limit is None or w * 2 <= shm_limit)]
        gan = self._step(precision, batch)
        pairs_run = 0

        def measure_pair(workers: int) -> Rate:
            nonlocal pairs_run
            pairs_run += 1
            self.report(f"threads x workers: {torch.get_num_threads()} threads, {workers} workers")
            loader_cfg = LoaderSettings(batch, workers, pin_memory=False, persistent_workers=workers > 0,
                                      prefetch_factor=2 if workers else None)
            # One warm-up step per pair: the step itself is warm after the first pair.
            return Rate(self._worker_speed(gan, loader_cfg, max(steps, 3 * workers),
                                           warmup=2 if pairs_run == 1 else 1))

        measured, failed = measure_threads_workers(measure_pair, candidates)
        del gan
        gc.collect()
        if not measured:
            raise ConfigError(f"no threads x workers setting could train: {failed}")
        decision = choose_threads_workers(measured)
        decision.measured["batch"] = batch
        if failed:
            decision.measured["failed"] = failed
        workers = [WorkerMeasurement(m.workers, 2 if m.workers else None, m.rate.images_per_s)
                   for m in measured if m.threads == cores]
        chosen = decision.value
        rate = next(m.rate.images_per_s for m in measured
                    if (m.threads, m.workers) == (chosen["threads"], chosen["workers"]))
        best = WorkerMeasurement(chosen["workers"], 2 if chosen["workers"] else None, rate)
        return [*workers, best], decision

    def pair_batch(self, batch: int, precision: str) -> int:
        """Where CPU threads x workers (and the knobs) are measured: at most ``batch`` and
        ``PAIR_BATCH_FACTOR`` x the reference batch, and among the batches the search
        measured (``precision``) the largest whose step took at most
        ``PAIR_STEP_SECONDS`` (else the smallest of them). Per image, the step's compute
        and the loader's decoding both scale with the batch, so the ranking of five
        pairs holds there, while each of their end-to-end measurements costs short
        steps: on 48x48 crops at batch 64, 2 s steps made this phase 90 s of a 315 s
        tuning."""
        cap = min(batch, PAIR_BATCH_FACTOR * self.reference_batch)
        measured = sorted({t.batch: t for t in self.trials_run
                           if t.ok and t.images_per_s and t.batch <= cap
                           and t.precision in (None, precision)}.values(),
                          key=lambda t: t.batch)
        if not measured:
            return cap
        quick = [t.batch for t in measured if t.batch / t.images_per_s <= PAIR_STEP_SECONDS]
        return max(quick) if quick else measured[0].batch

    # -- phase 4b: knobs -----------------------------------------------------------------------
    def measure_knobs(self, batch: int, precision: str, channels_last: bool = True) -> list[KnobDecision]:
        """channels_last, cudnn.benchmark (CUDA) and torch.compile (``try_compile``), each
        timed adaptively on the chosen batch and precision and chosen only when it pays;
        a setting that fails to build or run is recorded as such, never fatal.
        ``channels_last`` False: not measured here, the comparison's runoff decides it
        (:meth:`channels_last_in_runoff`); the decision is a placeholder until then."""
        cuda = self.device.type == "cuda"
        timing = self.cfg.timing
        sync = self._sync if cuda else None
        example = self.workload.example_batch(batch, self.cfg.seed)
        decisions = []

        def step_with(**options):
            step = self._step(precision, batch, options.get("channels_last"))
            if options.get("compiled"):
                compile_step = getattr(step, "compile", None)
                if compile_step is None:
                    raise NotImplementedError("the workload's train step has no compile()")
                compile_step()
            on_device = step.to_device(example)
            return lambda: step(on_device)

        with self._memory_capped():
            if channels_last:
                self.report("knobs: channels_last")
                off, on = measure_toggle(lambda flag: step_with(channels_last=flag), batch, timing, sync)
                decisions.append(choose_toggle("channels_last", off, on))
                self._release()
            else:
                decisions.append(KnobDecision("channels_last", False,
                                              "measured end to end in the comparison's runoff"))
            if cuda:
                self.report("knobs: cudnn.benchmark")
                decisions.append(self._measure_cudnn_benchmark(step_with, batch, timing, sync))
            else:
                decisions.append(not_applicable("cudnn_benchmark", None, "cuDNN is CUDA only"))
            if self.cfg.try_compile:
                self.report("knobs: torch.compile (compiling)")
                planned = self.cfg.planned_epochs * len(self.dataset())
                measured = measure_compile(lambda flag: step_with(compiled=flag), batch, timing, sync)
                decisions.append(choose_compile(measured, planned))
                self._release()
            else:
                decisions.append(KnobDecision(
                    "compile", False,
                    "not measured: compiling takes about a minute on a small CPU and seldom pays "
                    "in a short run; --try-compile measures whether it pays in the planned run"))
        return decisions

    def _measure_cudnn_benchmark(self, step_with, batch: int, timing, sync) -> KnobDecision:
        backends = torch.backends.cudnn
        before = backends.benchmark

        def make(flag: bool):
            backends.benchmark = flag
            return step_with()

        try:
            off, on = measure_toggle(make, batch, timing, sync)
        finally:
            backends.benchmark = before
            self._release()
        decision = choose_toggle("cudnn_benchmark", off, on)
        return decision

    def measure_workers(self, batch: int, precision: str, consumption: float | None) -> list[WorkerMeasurement]:
        cuda = self.device.type == "cuda"
        # The processes of one node share its cores.
        cores = max(1, self.host.usable_cores // self.dist.local_world_size)
        candidates = worker_candidates(cores, self.cfg.max_workers, self.baseline.num_workers)
        steps = self.steps_for(batch, self.cfg.worker_steps)
        shm_limit = self._shm_worker_limit(batch)
        gan = None if cuda else self._step(precision, batch)
        results: list[WorkerMeasurement] = []

        def measure(workers: int, prefetch: int | None) -> WorkerMeasurement:
            loader_cfg = LoaderSettings(batch, workers, pin_memory=cuda, persistent_workers=workers > 0,
                                      prefetch_factor=prefetch)
            self.report(f"workers: {workers}, prefetch {prefetch}")
            # At least three rounds of workers: DataLoader hands work out round-robin and
            # returns it in order, so workers finish in waves; a window shorter than a
            # few waves times the wave, not the rate.
            timed = max(steps, 3 * workers)
            try:
                speed, error = self._worker_speed(gan, loader_cfg, timed), ""
            except Exception as exc:  # noqa: BLE001 - one candidate's failure, recorded
                if not (_is_worker_failure(exc) or is_oom(exc)):
                    raise
                speed, error = 0.0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            m = WorkerMeasurement(workers=workers, prefetch_factor=loader_cfg.prefetch_factor,
                                  images_per_s=speed, error=error)
            results.append(m)
            return m

        with self._memory_capped():
            for workers in candidates:
                if shm_limit is not None and workers * 2 > shm_limit:
                    continue  # its batches in flight would not fit in /dev/shm
                measure(workers, 2 if workers else None)
            best = choose_workers(results, consumption)
            if best.workers > 0 and (shm_limit is None or best.workers * 4 <= shm_limit):
                measure(best.workers, 4)  # does a deeper queue help the chosen count?
        del gan
        gc.collect()
        return results

    def check_storage(self, step_images_per_s: float | None, workers: int) -> dict | None:
        """Storage read rate (cold where possible, as many streams as workers) against what
        the chosen step consumes; a warning when storage, not the workers, will limit it."""
        from autotune.storage import measure_read_rate, storage_limit

        files = self.workload.files()
        if not files:
            return None
        rate = measure_read_rate(files, max_seconds=2.0, streams=max(1, workers))
        if rate is None:
            return None
        limit = storage_limit(rate.bytes_per_s, step_images_per_s, rate.mean_file_bytes, rate.cold)
        if limit:
            self.warnings.append(limit)
        return {**rate.as_dict(), "limit": limit}

    def _shm_worker_limit(self, batch: int) -> int | None:
        """How many batches may be in flight through /dev/shm (workers x prefetch), half of
        it left for everything else; None where /dev/shm is unknown. Docker and
        Kubernetes default to 64 MiB: past it, a worker dies of SIGBUS."""
        shm = getattr(self.host, "shm_bytes", None)
        if shm is None:
            return None
        sample = self.workload.sample_bytes()
        if not sample:
            return None
        batch_bytes = batch * sample
        return max(0, (shm // 2) // max(1, batch_bytes))

    def _worker_speed(self, gan, loader_cfg: LoaderSettings, steps: int, warmup: int = 2) -> float:
        """images/s of one worker setting: the loader alone on CUDA, end to end on CPU."""
        loader = self._loader(loader_cfg, steps + loader_cfg.num_workers * (loader_cfg.prefetch_factor or 0) + 4)
        try:
            if gan is None:
                return loader_images_per_s(loader, steps)
            return training_images_per_s(gan, loader, steps, warmup=warmup, sync=self._sync)
        finally:
            del loader

    def steps_for(self, batch: int, max_steps: int) -> int:
        """Timed steps of one worker or comparison measurement: at most ``max_steps``,
        the image budget and the time budget (from the nearest trial's rate); at least
        3, or 2 when two steps already take the time budget (48x48 crops at batch 64 on
        2 cores: 1.9 s a step; the third step made each comparison round of the runoff
        about 8 s longer)."""
        steps = min(max_steps, math.ceil(self.cfg.measure_images / batch))
        floor = 3
        rate = self._rate_near(batch)
        if rate:
            by_time = math.ceil(self.cfg.measure_seconds * rate / batch)
            steps = min(steps, by_time)
            if by_time <= 2:
                floor = 2
        return max(floor, steps)

    def _rate_near(self, batch: int) -> float | None:
        """images/s of the successful trial nearest ``batch`` (by ratio; the larger on a
        tie), or None before any: an estimate of a step's cost, for time budgets."""
        rated = [t for t in self.trials_run if t.ok and t.images_per_s]
        if not rated:
            return None
        nearest = min(rated, key=lambda t: (abs(math.log(t.batch / batch)), -t.batch))
        return nearest.images_per_s

    # -- phase 5: learning rate ----------------------------------------------------------------
    def lrs(self, batch: int) -> dict[str, float]:
        """Every reference learning rate of the workload, scaled to ``batch`` by this run's rule."""
        rule = self.lr_rule()
        return {name: scale_lr(lr, self.reference_batch, batch, *rule)
                for name, lr in self.workload.reference_lrs.items()}

    def lr_rule(self) -> tuple[str, float | None]:
        """The rule the rates follow, with the noise scale ``adascale`` needs. Before the
        noise phase (the noise phase itself trains at the reference batch) and with an
        unusable noise scale, adascale has nothing to scale with: rule none."""
        if self.cfg.lr_rule == "adascale":
            if self.noise_scale is None:
                return "none", None
            return "adascale", self.noise_scale
        return self.cfg.lr_rule, None

    # -- phase 6: seed default vs recommendation -------------------------------------------------
    def runoff_challengers(self, result: SearchResult) -> list[int]:
        """The batches the comparison re-measures beside the search's choice
        (``TuneConfig.runoff - 1`` of them): first the batch the growth would have tried
        next when time cut the search short before the score turned down
        (``result.untried``: it costs a few end-to-end steps here, not a trial), then
        those whose search score lies within the noise of the best. None under the
        memory objective (the largest fit is the answer), under goodput without a
        usable noise scale (the batch stays at the reference), and under DDP (every rank
        would have to run and agree on the same runoff)."""
        cfg = self.cfg
        if (cfg.runoff < 2 or cfg.objective == "memory" or self.dist.distributed
                or (cfg.objective == "goodput" and self.noise_scale is None)):
            return []
        ahead = [result.untried] if result.untried is not None else []
        batches = runoff_batches(result.trials, result.chosen, self.goodput_score(),
                                 limit=cfg.runoff - len(ahead), noise_floor=self.trial_noise())
        return ahead + batches[1:]

    def channels_last_in_runoff(self, batch: int, knob_batch: int) -> bool:
        """Is channels_last decided in the comparison's runoff (the chosen batch trained
        end to end both ways, alternated) rather than in the knobs phase? On a CPU when
        the knobs phase would measure it at another batch than the chosen one (the
        threads x workers batch, for short steps): on the demo model channels_last runs
        x0.9 at batch 32 and x1.09 at batch 128 (fifth session), so a verdict at one
        batch does not carry to another. Not under DDP (no runoff there), nor with the
        runoff turned off, nor when the user forced channels_last on."""
        return (self.device.type == "cpu" and knob_batch != batch and self.cfg.runoff >= 2
                and not self.dist.distributed and not self.cfg.channels_last)

    def _runoff_score(self) -> Callable[[int, float], float] | None:
        """Goodput as a function of (batch, images/s): images/s x the batch's predicted
        efficiency, for the runoff (and, through :meth:`goodput_score`, the search);
        None (images/s) otherwise, and with an unusable noise scale."""
        if self.cfg.objective != "goodput" or self.noise_scale is None:
            return None
        noise, reference = self.noise_scale, self.reference_batch
        return lambda batch, rate: rate * efficiency(batch, reference, noise)

    def compare(self, loader: LoaderSettings, precision: str, channels_last: bool = False,
                threads: int | None = None, challengers: list[tuple[int, bool]] = (),
                score: Callable[[int, float], float] | None = None) -> dict:
        """Alternate the workload's baseline and the recommendation (``loader``,
        ``precision``, ``channels_last``, ``threads``), each trained end to end on the same
        data for about the same number of images; the median of the rounds counts.

        ``challengers``: other (batch, channels_last) configurations measured in the same
        rounds with the same loader settings and threads: batches the search could not
        tell apart from ``loader.batch_size`` (:func:`~autotune.search.runoff_batches`)
        and, on a CPU, the chosen batch with channels_last flipped (the knob was measured
        elsewhere: see :meth:`channels_last_in_runoff`). The runoff's winner
        (:func:`~autotune.search.runoff_winner` of ``score(batch, median images/s)``,
        default the median itself: a challenger must beat the search's choice by more
        than :data:`~autotune.search.RUNOFF_MARGIN`) becomes the recommendation; the
        record's ``runoff`` keeps every candidate's rounds.

        Under the memory target like every other phase. A configuration that does not
        fit there (ARWGAN's baseline is fp32 at batch 16) is reported in a sentence, not
        raised: the search result stands. (The record keeps the key ``seed_default`` for
        the baseline.)"""
        incumbent = (loader.batch_size, bool(channels_last))
        candidates = [incumbent] + [(b, bool(cl)) for b, cl in challengers if (b, bool(cl)) != incumbent]
        label = {c: runoff_label(*c) for c in candidates}
        configs = {"seed_default": (self.baseline.loader(), self.baseline.precision, False, None)}
        for c in candidates:
            configs[label[c]] = (replace(loader, batch_size=c[0]), precision, c[1], threads)
        speeds: dict[str, list[float]] = {name: [] for name in configs}
        failed: dict[str, str] = {}
        steps_built: dict[str, object] = {}  # each config's train step, kept across rounds
        with self._memory_capped():
            for round_index in range(self.cfg.compare_rounds):
                for name, (loader_cfg, precision, cl, threads) in configs.items():
                    if name in failed:
                        continue
                    self.report(f"compare: {name} (round {round_index + 1})")
                    steps = self.steps_for(loader_cfg.batch_size, self.cfg.compare_steps)
                    try:
                        with _threads(threads):
                            if name not in steps_built:
                                steps_built[name] = self._step(precision, loader_cfg.batch_size, cl)
                            speeds[name].append(self._train_speed(steps_built[name], loader_cfg,
                                                                  steps))
                    except Exception as exc:  # noqa: BLE001 - an OOM is an outcome
                        if not is_oom(exc):
                            raise
                        failed[name] = str(exc).splitlines()[0][:160] if str(exc) else "out of memory"
                        speeds[name] = []
                        steps_built.pop(name, None)
                    finally:
                        self._release()
            steps_built.clear()
        value = score or (lambda batch, rate: rate)
        scores = {c: value(c[0], statistics.median(speeds[label[c]]))
                  for c in candidates if speeds[label[c]]}
        winner = runoff_winner(scores, incumbent) if len(candidates) > 1 and scores else incumbent
        seed = statistics.median(speeds["seed_default"]) if speeds["seed_default"] else None
        rec = statistics.median(speeds[label[winner]]) if speeds[label[winner]] else None
        result = {
            "seed_default_images_per_s": seed,
            "recommended_images_per_s": rec,
            "speedup": rec / seed if seed and rec else None,
            "rounds": {"seed_default": speeds["seed_default"], "recommended": speeds[label[winner]]},
        }
        if len(candidates) > 1:
            result["runoff"] = {
                "search_chosen": incumbent[0],
                "channels_last": incumbent[1],
                "chosen": winner[0],
                "chosen_channels_last": winner[1],
                "rounds": {label[c]: speeds[label[c]] for c in candidates},
                "scores": {label[c]: v for c, v in scores.items()},
                "score": "images/s" if score is None else "goodput",
            }
        notes = []
        if "seed_default" in failed:
            notes.append(f"the {self.baseline.label} (batch {self.baseline.batch_size}, "
                         f"{self.baseline.precision}) does not fit under {format_bytes(self.target)}")
        if len(candidates) == 1 and label[incumbent] in failed:
            notes.append(f"the recommendation does not fit under {format_bytes(self.target)}")
        elif len(candidates) > 1:
            notes += [f"{label[c]} (runoff) does not fit under {format_bytes(self.target)}"
                      for c in candidates if label[c] in failed]
        if notes:
            result["note"] = "; ".join(notes)
            self.warnings.append(result["note"])
        return result

    def _runoff_batch_rate(self, result: SearchResult, batch: int, comparison: dict) -> float | None:
        """The runoff chose ``batch`` over the search's choice: its step images/s (the
        search trial's; for the batch the search did not reach, the runoff's end-to-end
        median, the only reading there is), with the goodput choice moved to it (a row
        made from that reading when the search had none)."""
        trial = result.success_at(batch)
        rate = trial.images_per_s if trial is not None else comparison["recommended_images_per_s"]
        if self.goodput is not None:
            rows = {r.batch: r for r in self.goodput.rows}
            if batch not in rows:
                rows[batch] = goodput_row(BatchCandidate(batch, rate), self.goodput.reference_batch,
                                          self.goodput.noise_scale, ADAM_LR_POWER)
            self.goodput = replace(self.goodput, chosen=rows[batch],
                                   rows=tuple(rows[b] for b in sorted(rows)))
        return rate

    def _train_speed(self, step, loader_cfg: LoaderSettings, steps: int) -> float:
        """End-to-end images/s of one configuration: its train step (kept across the
        comparison's rounds) fed by a fresh loader, after one untrained drain of the
        loader's queue and one warm-up step (the first allocates the optimiser state;
        the queue refills meanwhile)."""
        depth = loader_cfg.num_workers * (loader_cfg.prefetch_factor or 0)
        loader = self._loader(loader_cfg, steps + depth + 4)
        return training_images_per_s(step, loader, steps, warmup=1, sync=self._sync)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.cuda.synchronize(self.index)

    def _release(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            self.cuda.empty_cache()

    # -- the whole job ---------------------------------------------------------------------------
    def prepare(self) -> dict:
        """Probe and check every user input (target, precision, data) before measuring."""
        machine = self.probe()
        self.target = self.target_bytes()
        self.precision_candidates()
        with local_main_first(self.dist):  # e.g. a synthetic set: generated once per node
            self.dataset()
        return machine

    def run(self) -> TuneResult:
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> TuneResult:
        cfg = self.cfg
        started = time.perf_counter()
        self.trials_run: list[TrialMeasurement] = []
        self._trials_by_spec = {}
        machine = getattr(self, "machine", None) or self.prepare()
        self.report(f"memory target {format_bytes(self.target)}")
        memory_before = self._process_memory()

        world = self.dist.world_size
        self.phase_seconds = {}
        with self._phase("precision"):
            own_precisions = self.measure_precisions()
        precisions = own_precisions
        if self.dist.distributed:
            precisions = combine_rank_precisions(self.dist.all_gather_object(own_precisions))
        try:
            chosen_precision = choose_precision(precisions).precision
        except ValueError as exc:
            raise ConfigError(f"no precision could run the model: {exc}") from None
        if cfg.objective == "goodput":
            with self._phase("noise scale"):
                self.measure_noise(chosen_precision)
        with self._phase("batch search"):
            result = self.search_agreed(chosen_precision)
        batch = result.chosen
        memory_after = self._process_memory()
        if self.goodput is not None and self.goodput.chosen.batch != batch:
            # Ranks agreed on a smaller batch than this one's goodput choice.
            rows = [r for r in self.goodput.rows if r.batch == batch]
            if rows:
                self.goodput = replace(self.goodput, chosen=rows[0])

        chosen_trial = result.success_at(batch)
        consumption = chosen_trial.images_per_s if self.device.type == "cuda" else None
        knobs: list[KnobDecision] = []
        threads = None
        if self.device.type == "cpu":
            with self._phase("threads x workers"):
                workers, pairs = self.measure_threads_workers(batch, chosen_precision)
            own_best, threads = workers[-1], pairs.value["threads"]
            workers = workers[:-1]
            knobs.append(pairs)
        else:
            with self._phase("workers"):
                workers = self.measure_workers(batch, chosen_precision, consumption)
            own_best = choose_workers(workers, consumption)
        best = self.dist.broadcast_object(own_best)
        threads = self.dist.broadcast_object(threads)
        knob_batch = self.worker_batch if self.device.type == "cpu" else batch
        cl_in_runoff = self.channels_last_in_runoff(batch, knob_batch)
        with self._phase("knobs"):
            # On a CPU at the threads x workers batch (short steps, see pair_batch); on
            # CUDA, where a step is short anyway, at the chosen batch.
            knobs += self.measure_knobs(knob_batch, chosen_precision,
                                        channels_last=not cl_in_runoff)
        knobs = self.dist.broadcast_object(knobs)
        knob_value = {k.knob: k.value for k in knobs}
        channels_last = bool(knob_value.get("channels_last", cfg.channels_last))
        pin_memory = self.device.type == "cuda"
        recommended = LoaderSettings(batch, best.workers, pin_memory, best.workers > 0,
                                     best.prefetch_factor)
        challengers = [(b, channels_last) for b in self.runoff_challengers(result)]
        if cl_in_runoff:
            challengers.append((batch, not channels_last))
        with self._phase("comparison"):
            own_comparison = self.compare(recommended, chosen_precision, channels_last, threads,
                                          challengers, self._runoff_score())
        comparison = own_comparison
        if self.dist.distributed:
            comparison = slowest_rank_comparison(self.dist.all_gather_object(own_comparison))
        runoff = comparison.get("runoff")
        step_images_per_s = chosen_trial.images_per_s
        if runoff:
            if result.untried is not None and any(b == result.untried for b, _ in challengers):
                runoff["untried"] = result.untried
            if cl_in_runoff:
                knobs = [channels_last_from_runoff(runoff) if k.knob == "channels_last" else k
                         for k in knobs]
            channels_last = runoff["chosen_channels_last"]
            if runoff["chosen"] != batch:
                batch = runoff["chosen"]
                step_images_per_s = self._runoff_batch_rate(result, batch, comparison)
        with self._phase("storage"):
            storage = self.check_storage(step_images_per_s, best.workers)

        global_batch = batch * world
        factor = global_batch / self.reference_batch
        rule, noise_scale = self.lr_rule()
        lrs = self.lrs(global_batch)
        first = next(iter(self.workload.reference_lrs))
        warn = lr_warning(lrs[first] / self.workload.reference_lrs[first])
        if warn:
            self.warnings.append(warn)
        choice = TunedChoice(
            batch_size=batch,
            num_workers=best.workers,
            pin_memory=pin_memory,
            persistent_workers=best.workers > 0,
            prefetch_factor=best.prefetch_factor,
            precision=chosen_precision,
            learning_rates=lrs,
            warmup_steps=warmup_steps_for(
                rule, factor, None if noise_scale is None else noise_scale / self.reference_batch),
            lr_rule=rule,
            objective=cfg.objective,
            world_size=world,
            channels_last=channels_last,
            noise_scale=noise_scale,
            cpu_threads=threads,
            compile=bool(knob_value.get("compile", False)),
            cudnn_benchmark=knob_value.get("cudnn_benchmark"),
        )
        # Recommend only what was measured faster than the seed default (pure rule); under
        # goodput "faster" means more predicted training progress per second.
        efficiency = (self.goodput.chosen.efficiency
                      if cfg.objective == "goodput" and self.goodput is not None else 1.0)
        verdict = judge_recommendation(comparison["seed_default_images_per_s"],
                                       comparison["recommended_images_per_s"], cfg.objective,
                                       efficiency=efficiency, baseline=self.baseline.label,
                                       same_as_baseline=self._same_as_baseline(choice))
        candidate, choice = choice, choice if verdict.keep_candidate else self.seed_choice(world)
        self.warnings += [verdict.message] if verdict.message else []
        measurements = {
            "verdict": asdict(verdict),
            "candidate": asdict(candidate),
            "target_bytes": self.target,
            "context_bytes": self.context_bytes,
            "precision": [asdict(p) for p in precisions],
            "search": result.to_dict(),
            "trials": [asdict(t) for t in self.trials_run],
            "workers": [asdict(w) for w in workers],
            "worker_mode": "loader alone vs step consumption" if consumption else "end to end",
            "worker_batch": getattr(self, "worker_batch", batch),
            "step_images_per_s": step_images_per_s,
            "memory_before_search_bytes": memory_before,
            "memory_after_search_bytes": memory_after,
            "comparison": comparison,
            "knobs": [k.to_dict() for k in knobs],
            "storage": storage,
            "tuning_seconds": time.perf_counter() - started,
            "phase_seconds": dict(self.phase_seconds),
            "warnings": self.warnings,
            "machine": machine,
        }
        if self.noise is not None:
            measurements["noise_scale"] = self.noise
        if self.goodput is not None:
            measurements["goodput"] = self.goodput.to_dict()
            seed = comparison.get("seed_default_images_per_s")
            if seed and self.noise_scale is not None:
                # The verdict compares the end-to-end rates of the comparison phase.
                rec = comparison.get("recommended_images_per_s") or self.goodput.chosen.images_per_s
                chosen = replace(self.goodput.chosen, images_per_s=rec,
                                 goodput=rec * self.goodput.chosen.efficiency)
                measurements["goodput_verdict"] = verdict_line(
                    replace(self.goodput, chosen=chosen), self.baseline.batch_size, seed,
                    f"the {self.baseline.label}")
        if self.dist.distributed:
            own = {
                "rank": self.dist.rank,
                "device": str(self.device),
                **self._device_identity(),
                "target_bytes": self.target,
                "chosen_batch": self.own_search.chosen,
                "peak_bytes": self._own_chosen.peak_bytes,
                "images_per_s": self._own_chosen.images_per_s,
                "precision": [asdict(p) for p in own_precisions],
                "workers": own_best.workers,
                "prefetch_factor": own_best.prefetch_factor,
                "comparison": own_comparison,
            }
            ranks = self.dist.all_gather_object(own)
            measurements.update(
                world_size=world,
                global_batch=global_batch,
                limiting_rank=self.limiting_rank,
                ranks=ranks,
            )
        tuned = TunedFile(
            schema_version=SCHEMA_VERSION,
            created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            device=self.fingerprint,
            model=self.workload.fingerprint(),
            model_fingerprint=fingerprint_of(self.workload.fingerprint()),
            workload=self.workload_record(),
            choice=choice,
            measurements=measurements,
            tool_version=_tool_version(),
        )
        return TuneResult(tuned, machine, result, precisions, workers, self.target, self.warnings)

    @contextlib.contextmanager
    def _phase(self, name: str):
        """Time one phase of the tuning (``measurements["phase_seconds"]``, the table's
        last line): where a tuning's minutes go, for users and for the benchmark."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.perf_counter() - started

    def _same_as_baseline(self, choice: TunedChoice) -> bool:
        """Does ``choice`` train exactly as the baseline does (loader, precision, memory
        format, threads left at torch's default, no compile)?"""
        base = self.baseline.loader()
        return (
            (choice.batch_size, choice.num_workers, choice.pin_memory, choice.precision)
            == (base.batch_size, base.num_workers, base.pin_memory, self.baseline.precision)
            and (choice.num_workers == 0 or choice.prefetch_factor == base.prefetch_factor)
            and not choice.channels_last and not choice.compile
            and choice.cpu_threads in (None, torch.get_num_threads())
        )

    def workload_record(self) -> dict:
        """What the tuned file says about the workload: its name, how to rebuild it, the
        reference the learning rates were scaled from, the baseline, and the command to
        re-run when the file no longer fits."""
        return {
            "name": self.workload.name,
            "ref": self.ref.to_dict() if self.ref is not None else None,
            "reference_batch": self.reference_batch,
            "reference_lrs": dict(self.workload.reference_lrs),
            "baseline": asdict(self.baseline),
            "tuner": self.cfg.tuner_command,
        }

    def seed_choice(self, world: int) -> TunedChoice:
        """The workload's baseline as a tuned choice, learning rates by this run's rule."""
        base = self.baseline.loader()
        global_batch = base.batch_size * world
        rule, noise_scale = self.lr_rule()
        return TunedChoice(
            batch_size=base.batch_size, num_workers=base.num_workers,
            pin_memory=base.pin_memory, persistent_workers=base.persistent_workers,
            prefetch_factor=base.prefetch_factor, precision=self.baseline.precision,
            learning_rates=self.lrs(global_batch),
            warmup_steps=warmup_steps_for(
                rule, global_batch / self.reference_batch,
                None if noise_scale is None else noise_scale / self.reference_batch),
            lr_rule=rule, objective=self.cfg.objective, world_size=world, noise_scale=noise_scale,
        )

    def search_agreed(self, precision: str) -> SearchResult:
        """:meth:`search` on this rank; under torchrun, then the batch all ranks agree on
        (the minimum), with a verifying trial where this rank never ran it. Alone, the
        search result unchanged."""
        try:
            result, failure = self.search(precision), None
        except SearchError as exc:
            if not self.dist.distributed:
                raise
            result, failure = None, exc.outcome
        if not self.dist.distributed:
            return result
        failures = self.dist.all_gather_object(failure)
        for rank, outcome in enumerate(failures):
            if outcome is not None:
                raise RankSearchError(rank, outcome)
        self.own_search = result
        self._own_chosen = next(t for t in result.trials if t.batch == result.chosen and t.ok)
        agreed = self.dist.all_reduce_min(result.chosen)
        chosen = self.dist.all_gather_object(result.chosen)
        self.limiting_rank = chosen.index(agreed)
        trials = list(result.trials)
        if not any(t.batch == agreed and t.ok for t in trials):
            self.report(f"verify: batch {agreed} (agreed over ranks)")
            trials.append(self.verify_batch(agreed, precision))
        verified = [t.ok for t in trials if t.batch == agreed]
        if not self.dist.all_reduce_min(int(any(verified))):
            raise ConfigError(
                f"batch {agreed}, the smallest any rank could run, failed on another rank; "
                "lower --target-mem or check the devices"
            )
        return replace(
            result,
            trials=trials,
            chosen=agreed,
            stop_reason=(
                f"{result.stop_reason}; {self.dist.world_size} ranks agreed on batch "
                f"{agreed} (rank {self.limiting_rank} limited it)"
            ),
        )

    def close(self) -> None:
        """Stop this run's trial server and hand NVML back (``nvmlShutdown``)."""
        try:
            if self.trial_server is not None:
                self.trial_server.close()
                self.trial_server = None
        finally:
            self.probes.nvml.close()

    def _device_identity(self) -> dict:
        """Name and memory of this rank's GPU (NVML, else torch), for the per-rank record."""
        if self.gpu is not None:
            return {"gpu_name": self.gpu.name, "gpu_total_bytes": self.gpu.total_bytes}
        if self.device.type != "cuda":
            return {"gpu_name": None, "gpu_total_bytes": None}
        return {
            "gpu_name": self.cuda.device_name(self.index),
            "gpu_total_bytes": self.cuda.total_bytes(self.index),
        }

    def _process_memory(self) -> dict | None:
        if self.device.type != "cuda":
            return None
        # empty_cache through the seam also frees cuBLAS's workspaces, as torch's own
        # leak checker does: they come from the allocator and would read as a leak.
        self.cuda.empty_cache()
        nvml = self.probes.nvml.process_used_bytes(self.index) if self.probes.nvml.available() else None
        return {
            "torch_reserved_bytes": self.cuda.reserved_bytes(self.index),
            "torch_allocated_bytes": self.cuda.allocated_bytes(self.index),
            "nvml_process_bytes": nvml,
        }


def slowest_rank_comparison(per_rank: list[dict]) -> dict:
    """Every rank's :meth:`Tuner.compare` as one: each configuration's slowest rank
    (every DDP step waits for it); the rounds shown are rank 0's."""
    def slowest(key: str) -> float | None:
        values = [c[key] for c in per_rank]
        return None if None in values else min(values)

    seed, rec = slowest("seed_default_images_per_s"), slowest("recommended_images_per_s")
    combined = {
        "seed_default_images_per_s": seed,
        "recommended_images_per_s": rec,
        "speedup": rec / seed if seed and rec else None,
        "rounds": per_rank[0]["rounds"],
        "scope": f"per process, slowest of {len(per_rank)} ranks, without DDP communication",
    }
    notes = sorted({c["note"] for c in per_rank if c.get("note")})
    if notes:
        combined["note"] = "; ".join(notes)
    return combined


def _threads(threads: int | None):
    """torch's intra-op threads for a block (None: unchanged)."""
    if threads is None:
        return contextlib.nullcontext()
    from autotune.knobs import torch_threads

    return torch_threads(threads)


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("arwgan-autotune")
    except PackageNotFoundError:
        return "unknown"


def run_tuner(workload: Workload, cfg: TuneConfig | None = None, probes: Probes | None = None,
              report: Report | None = None) -> TuneResult:
    """Tune ``workload`` in this process (no torchrun), as ``cfg`` says."""
    return Tuner(workload, cfg, probes, report).run()


def _is_worker_failure(exc: BaseException) -> bool:
    """A DataLoader worker that died (SIGBUS when /dev/shm is full, killed by the OOM
    killer) or a loader that timed out: that candidate failed, the tuning goes on."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "DataLoader worker" in text or "unexpected bus error" in text.lower()
        or "shared memory" in text.lower()
    )
