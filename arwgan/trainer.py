"""``fit()``: the training loop, written as a handful of named steps.

setup -> for each epoch: train_epoch -> validate -> log -> checkpoint.

Under ``torchrun`` every process runs this same loop on its own shard of the data
(see :mod:`arwgan.distributed`): the networks are DDP-wrapped by :class:`GANStep`,
decisions that end the loop (Ctrl-C, the time budget, non-finite losses) are agreed
over ranks so that no rank is left waiting in a collective, metrics are reduced over
ranks, and only rank 0 prints, logs, draws progress and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import io
import resource
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from autotune.console import ProgressLines, console as default_console, interactive, note, say, warn
from autotune.device import CudaDevice, configure_cudnn, memory_capped
from autotune.probes import HostProbe
from autotune.telemetry import TrainingTelemetry, nvml_gpu_reader, starvation_hint, telemetry_text
from arwgan.checkpoint import (
    atomic_write_bytes,
    load_checkpoint,
    load_model_weights,
    require_same_model,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from arwgan.config import LoaderConfig, OptimConfig, TrainConfig
from arwgan.data import EpochSampler, build_datasets, make_loader
from arwgan.doctor import process_peak_bytes
from arwgan.distributed import (
    DistContext,
    cleanup,
    init_distributed,
    local_main_first,
    rank_seed,
    reduce_metric_sums,
    single_process,
)
from arwgan.errors import CheckpointError, ConfigError, TrainingDiverged
from arwgan.evaluate import evaluate
from arwgan.runs import CHECKPOINT_NAME, LOG_NAME, SAMPLES_DIR, TENSORBOARD_DIR
from arwgan.step import LOSS_NAMES, GANStep, autocast, check_precision, resolve_device

#: log.csv's telemetry columns (autotune.telemetry), NaN where a figure is unavailable.
TELEMETRY_COLUMNS = (
    "device_util_mean", "device_util_p10", "peak_process_memory_bytes", "power_w_mean",
    "workers_cpu_percent_mean",
)
#: Off a terminal, a progress line at least this often (and a heartbeat when a step or
#: a validation pass takes longer).
PROGRESS_LINE_S = 5.0
#: Images in the per-epoch sample grid.
SAMPLE_IMAGES = 8
#: The residual (watermarked - cover) is this many times amplified in the sample grid.
RESIDUAL_GAIN = 10


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak reservation. CPU: the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_reserved(device))
    # ru_maxrss is in KiB on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optim_for_world_size(cfg: TrainConfig, world_size: int) -> tuple[OptimConfig, str | None]:
    """The learning rates to train with under ``world_size`` processes, and a line saying
    how they were rescaled (None when they are used as given).

    ``cfg.lr_rule`` None keeps them; otherwise they were set for a global batch of
    ``batch_size * cfg.lr_world_size`` and follow the rule to ``batch_size * world_size``
    (for linear and sqrt this equals recomputing them from the tuner's reference).
    """
    if cfg.lr_rule is None or world_size == cfg.lr_world_size:
        return cfg.optim, None
    from autotune.decisions import scale_lr

    batch = cfg.loader.batch_size
    old_global, new_global = batch * cfg.lr_world_size, batch * world_size
    lr_g = scale_lr(cfg.optim.lr_g, old_global, new_global, cfg.lr_rule, cfg.lr_noise_scale)
    lr_d = scale_lr(cfg.optim.lr_d, old_global, new_global, cfg.lr_rule, cfg.lr_noise_scale)
    message = (
        f"learning rates set for world size {cfg.lr_world_size} (global batch {old_global}), "
        f"running with {world_size} (global batch {new_global}): lr G {cfg.optim.lr_g:.3g} -> "
        f"{lr_g:.3g}, D {cfg.optim.lr_d:.3g} -> {lr_d:.3g} ({cfg.lr_rule} rule)"
    )
    return replace(cfg.optim, lr_g=lr_g, lr_d=lr_d), message


def validation_share(total: int, rank: int, world_size: int) -> int:
    """How many of the first ``total`` validation images rank ``rank`` evaluates when
    they are dealt out round-robin (as :class:`EpochSampler` shards them)."""
    return len(range(rank, total, world_size))


@dataclass
class EpochStats:
    """What one epoch of training measured (means over its steps)."""

    steps: int
    images: int
    seconds: float
    data_wait_s: float
    losses: dict[str, float]
    skipped_files: int
    nonfinite_steps: int
    telemetry: dict[str, float | None] = field(default_factory=dict)
    """Sampled in the background: :func:`autotune.telemetry.epoch_figures`."""

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait_s / self.seconds if self.seconds > 0 else 0.0


@dataclass
class FitResult:
    out_dir: Path
    epochs_done: int
    history: list[dict[str, float]] = field(default_factory=list)
    interrupted: bool = False

    @property
    def last(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


class Interrupted(Exception):
    """Raised by fit() after Ctrl-C or SIGTERM, once the checkpoint is safely on disk."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(f"interrupted; checkpoint saved to {checkpoint}")
        self.checkpoint = checkpoint


class Trainer:
    def __init__(
        self, cfg: TrainConfig, console: Console | None = None, dist: DistContext | None = None
    ) -> None:
        """``dist``: this process's place in a torchrun job (see :func:`fit`); None trains
        in this process alone, on ``cfg.device``."""
        self.cfg = cfg
        self.dist = dist if dist is not None else single_process(resolve_device(cfg.device))
        self.device = self.dist.device
        world = self.dist.world_size
        self.cuda = CudaDevice() if self.device.type == "cuda" else None
        if self.cuda is not None and not self.dist.distributed and self.device.index is not None:
            # cuda:N alone: the pin-memory thread and calls without a device use the
            # current one, cuda:0 unless set (a stray context there).
            self.cuda.set_device(self.device.index)
        # Only rank 0 talks; the others keep a console that writes nowhere.
        if self.dist.is_main:
            self.console = console or default_console
        else:
            self.console = Console(file=io.StringIO(), quiet=True)
        check_precision(cfg.precision, self.device)  # before any slow data preparation
        if cfg.sync_bn and world > 1 and self.device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA: torch's SyncBatchNorm has no CPU kernels")
        self.out_dir = Path(cfg.out_dir)
        # The synthetic set is generated on first use: once per node, not once per rank.
        with local_main_first(self.dist):
            self.train_set, self.val_set, self.data_description = build_datasets(
                cfg.data_dir,
                cfg.model.image_size,
                cfg.model.message_bits,
                seed=cfg.seed,
                val_fraction=cfg.val_fraction,
            )
        self.optim, self.lr_message = optim_for_world_size(cfg, world)
        self.gan = GANStep(
            cfg.model, self.optim, cfg.precision, self.device, cfg.seed, cfg.channels_last,
            dist=self.dist, sync_bn=cfg.sync_bn,
        )
        if self.dist.distributed:
            # Same initial weights on every rank (seeded above, and DDP broadcasts rank
            # 0's), but each rank's own stream for the random noise layers: identical
            # streams would give every shard the same dropout masks and crops.
            torch.manual_seed(rank_seed(cfg.seed, self.dist.rank))
        # The same cuDNN settings as every tuner trial (benchmark on: the input shape
        # never changes during a run, so autotuned conv kernels pay), unless the tuned
        # file measured otherwise.
        configure_cudnn(self.device.type, cfg.cudnn_benchmark)
        if cfg.cpu_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        if cfg.compile:
            self.gan.compile()
        # DistributedSampler's role: EpochSampler shards each epoch's order exactly as
        # DistributedSampler does (padded to a multiple of the world size, rank r takes
        # every world_size-th item from the r-th), and set_epoch() moves it on each epoch.
        self.train_sampler = EpochSampler(
            len(self.train_set), seed=cfg.seed, epoch=0, rank=self.dist.rank, world_size=world
        )
        self.workers_note = _oversubscription_note(cfg.loader.num_workers)
        # torch warns on every loader and iterator it builds (at least twice a run), in a
        # raw multi-line UserWarning; the note above says it once. (A process-wide
        # filter: iterators are also built inside evaluate().)
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        self.train_loader = make_loader(
            self.train_set, cfg.loader, self.train_sampler, drop_last=True
        )
        if len(self.train_loader) == 0:
            per_rank = f" x {world} processes" if world > 1 else ""
            raise ConfigError(
                f"batch {cfg.loader.batch_size}{per_rank} is larger than the "
                f"{len(self.train_set)} training images; lower --batch"
            )
        val_loader_cfg = LoaderConfig(
            batch_size=cfg.loader.batch_size,
            num_workers=min(cfg.loader.num_workers, 2),
            pin_memory=cfg.loader.pin_memory,
        )
        # Validation always sees the same images with the same messages (epoch fixed),
        # dealt out over the ranks; each evaluates its share of the first val_images.
        self.val_sampler = EpochSampler(
            len(self.val_set), seed=cfg.seed, epoch=0, shuffle=False,
            rank=self.dist.rank, world_size=world,
        )
        self.val_loader = make_loader(self.val_set, val_loader_cfg, self.val_sampler, False)
        val_total = len(self.val_set) if cfg.val_images is None else min(cfg.val_images, len(self.val_set))
        self.val_images = (
            cfg.val_images if not self.dist.distributed
            else validation_share(val_total, self.dist.rank, world)
        )
        self.telemetry = TrainingTelemetry(
            gpu=nvml_gpu_reader(self.device.index or 0) if self.device.type == "cuda" else None,
            step_threads=torch.get_num_threads(),
        )
        self.usable_cores = HostProbe().info().usable_cores
        self.epoch = 0
        self.epoch_step = 0
        self.nonfinite_streak = 0
        self.stop_requested = False
        self.lines: ProgressLines | None = None
        self.tensorboard = None

    # -- checkpoints ---------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def save(self, epoch: int, epoch_step: int) -> Path:
        """Write the checkpoint (rank 0). Under torchrun every rank must call this: each
        rank's RNG state is gathered into the file, and rank 0's BatchNorm statistics
        are the ones saved (all ranks hold the same parameters)."""
        state = {
            "config": self.cfg.to_dict(),
            "gan": self.gan.state_dict(),
            "epoch": epoch,
            "epoch_step": epoch_step,
            "rng": rng_states(),
        }
        if self.dist.distributed:
            state["world_size"] = self.dist.world_size
            state["rng_ranks"] = self.dist.all_gather_object(rng_states())
        if self.dist.is_main:
            save_checkpoint(self.checkpoint_path, state)
        return self.checkpoint_path

    def resume(self, path: str | Path) -> None:
        state = load_checkpoint(path)
        require_same_model(path, state, self.cfg.model)
        saved_world = int(state.get("world_size", 1))
        if int(state["epoch_step"]) and saved_world != self.dist.world_size:
            # Its position counts global batches of another size: the samples already
            # seen this epoch would be mis-counted.
            raise CheckpointError(
                f"checkpoint '{path}' was saved mid-epoch by {saved_world} process(es); resume "
                f"it with {saved_world} (checkpoints from the end of an epoch resume with any number)"
            )
        self.gan.load_state_dict(state["gan"])
        rng_ranks = state.get("rng_ranks")
        if rng_ranks is not None and len(rng_ranks) == self.dist.world_size:
            set_rng_states(rng_ranks[self.dist.rank])
        elif self.dist.distributed:
            # Another world size: rank 0's state, then each rank's own stream (as at start).
            set_rng_states(state["rng"])
            torch.manual_seed(rank_seed(self.cfg.seed, self.dist.rank, self.gan.step_count))
        else:
            set_rng_states(state["rng"])
        self.epoch = int(state["epoch"])
        self.epoch_step = int(state["epoch_step"])

    def init_from(self, path: str | Path) -> None:
        """Start from the network weights of ``path`` (our checkpoint or an official
        ARWGAN one), with fresh optimisers, step count and epoch: a new run, not a resume.
        Every rank loads the same file, so the ranks stay identical."""
        model = self.cfg.model
        target = f"this run's config ({model.message_bits} bits, {model.channels} channels)"
        weights = load_model_weights(path).for_model(self.gan.nets.state_dict(), target)
        self.gan.nets.load_state_dict(weights)

    # -- one epoch -----------------------------------------------------------------------
    def steps_this_epoch(self) -> int:
        steps = len(self.train_loader)
        if self.cfg.steps_per_epoch is not None:
            steps = min(steps, self.cfg.steps_per_epoch)
        return steps

    def train_epoch(self, progress: Progress) -> EpochStats:
        cfg, device, batch = self.cfg, self.device, self.cfg.loader.batch_size
        world = self.dist.world_size
        total_steps = self.steps_this_epoch()
        # start counts the items all ranks together consumed before a mid-epoch checkpoint.
        self.train_sampler.set_epoch(self.epoch, start=self.epoch_step * batch * world)
        task = progress.add_task(
            f"epoch {self.epoch + 1}/{cfg.epochs}", total=total_steps, completed=self.epoch_step,
            stats="",
        )
        loss_sums: dict[str, torch.Tensor] = {}
        skipped_files = torch.zeros((), dtype=torch.long)
        nonfinite = 0
        steps = 0
        data_wait = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        iterator = iter(self.train_loader)
        self.telemetry.start()
        try:
            while self.epoch_step < total_steps:
                wait_start = time.perf_counter()
                try:
                    images, messages, skipped = next(iterator)
                except StopIteration:
                    break
                data_wait += time.perf_counter() - wait_start
                skipped_files += skipped.sum()
                images, messages = self.gan.to_device(images, messages)
                result = self.gan(images, messages)
                self.epoch_step += 1
                steps += 1
                if result.skipped:
                    nonfinite += 1
                    self.nonfinite_streak += 1
                    warn(f"non-finite loss at step {self.gan.step_count}; update skipped", to=self.console)
                    if self.nonfinite_streak >= cfg.max_nonfinite_steps:
                        path = self.save(self.epoch, self.epoch_step)
                        raise TrainingDiverged(
                            f"losses non-finite for {self.nonfinite_streak} consecutive steps; "
                            f"checkpoint saved to {path}; try a lower learning rate or fp32"
                        )
                else:
                    self.nonfinite_streak = 0
                    for name, value in result.as_dict().items():
                        loss_sums[name] = loss_sums.get(name, 0) + value
                lines_due = self.lines is not None and self.lines.due()
                show = not progress.disable or lines_due
                if show and (steps % cfg.log_every == 0 or self.epoch_step == total_steps or lines_due):
                    # One device sync for the three figures, every log_every steps only.
                    elapsed = time.perf_counter() - start
                    good = max(steps - nonfinite, 1)
                    zero = torch.zeros((), device=device)
                    g, d, acc = (
                        torch.stack([torch.as_tensor(loss_sums.get(n, zero), device=device)
                                     for n in ("g_loss", "d_loss", "bit_accuracy")]) / good
                    ).tolist()
                    mem = peak_memory_bytes(device) / 2**30
                    rate = steps * batch * world / elapsed
                    figures = f"G {g:.4f}  D {d:.4f}  bits {acc:.3f}  mem {mem:.2f} GiB"
                    progress.update(
                        task, completed=self.epoch_step, stats=f"{rate:7.1f} img/s  {figures}"
                    )
                    if self.lines is not None:
                        eta = (total_steps - self.epoch_step) * elapsed / steps
                        self.lines.update(
                            f"epoch {self.epoch + 1}/{cfg.epochs} step {self.epoch_step}/{total_steps}: "
                            f"{rate:.1f} img/s, ETA {_duration(eta)} (epoch) | {figures}"
                        )
                if (cfg.save_every is not None and self.gan.step_count % cfg.save_every == 0
                        and self.epoch_step < total_steps):
                    self.save(self.epoch, self.epoch_step)
                # Ctrl-C reaches the ranks at different moments: stop where any has seen
                # it, all at the same step (one tiny all_reduce per step, only under DDP).
                if self.dist.distributed:
                    self.stop_requested = self.dist.any(self.stop_requested)
                if self.stop_requested:
                    path = self.save(self.epoch, self.epoch_step)
                    raise Interrupted(path)
        finally:
            progress.remove_task(task)
            telemetry = self.telemetry.stop()
        _sync(device)
        seconds = time.perf_counter() - start
        good = max(steps - nonfinite, 1)
        if self.dist.distributed:
            loss_sums, skipped_files = self._reduce_epoch_sums(loss_sums, skipped_files)
        losses = {name: float(value / good) for name, value in loss_sums.items()}
        return EpochStats(
            steps=steps,
            images=steps * batch * world,
            seconds=seconds,
            data_wait_s=data_wait,
            losses=losses,
            skipped_files=int(skipped_files),
            nonfinite_steps=nonfinite,
            telemetry=telemetry,
        )

    def _reduce_epoch_sums(self, loss_sums: dict[str, torch.Tensor], skipped_files: torch.Tensor):
        """Loss sums averaged over ranks, unreadable files summed: one all_reduce.
        Every rank has the same loss names (ranks agree on which steps were skipped)."""
        world = self.dist.world_size
        names = sorted(loss_sums)
        packed = torch.stack(
            [*(loss_sums[n].detach().float().to(self.device) for n in names),
             skipped_files.float().to(self.device)]
        )
        self.dist.all_reduce_sum_(packed)
        reduced = {name: packed[i] / world for i, name in enumerate(names)}
        return reduced, packed[-1].round().long()

    def validate(self) -> dict[str, float]:
        if not self.dist.distributed:
            return evaluate(
                self.gan.nets,
                self.val_loader,
                self.device,
                self.cfg.precision,
                max_images=self.cfg.val_images,
                seed=self.cfg.seed,
            )
        # Every rank evaluates rank 0's model (the one the checkpoint holds) on its share
        # of the images; sums and counts are added over ranks. Attacks draw from a
        # generator seeded per rank, so their random choices differ from a single run.
        self.dist.broadcast_buffers(self.gan.nets)
        return evaluate(
            self.gan.nets,
            self.val_loader,
            self.device,
            self.cfg.precision,
            max_images=self.val_images,
            seed=rank_seed(self.cfg.seed, self.dist.rank, "validation"),
            reduce=lambda sums: reduce_metric_sums(self.dist, sums),
        )

    # -- logging -------------------------------------------------------------------------
    def log_row(self, stats: EpochStats, val: dict[str, float]) -> dict[str, float]:
        """The epoch's row of log.csv (written by rank 0 only; every rank returns it)."""
        row: dict[str, float] = {
            "epoch": self.epoch + 1,
            "step": self.gan.step_count,
            # Every column on every row, NaN when an epoch had no finite step, so that the
            # CSV's columns never shift.
            **{f"train_{k}": round(stats.losses.get(k, float("nan")), 6) for k in LOSS_NAMES},
            "images_per_s": round(stats.images_per_s, 2),
            "data_wait_fraction": round(stats.data_wait_fraction, 4),
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "skipped_files": stats.skipped_files,
            "nonfinite_steps": stats.nonfinite_steps,
            **self._telemetry_columns(stats),
            **{f"val_{k}": round(v, 6) for k, v in val.items()},
        }
        if not self.dist.is_main:
            return row
        if self.tensorboard is not None:
            for key, value in row.items():
                if key not in ("epoch", "step"):
                    self.tensorboard.add_scalar(key, value, self.gan.step_count)
            self.tensorboard.add_scalar("lr_g", self.optim.lr_g, self.gan.step_count)
            self.tensorboard.add_scalar("lr_d", self.optim.lr_d, self.gan.step_count)
            self.tensorboard.flush()
        path = self.out_dir / LOG_NAME
        new_file = not path.exists()
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        return row

    def _telemetry_columns(self, stats: EpochStats) -> dict[str, float]:
        """Device busy % (GPU: NVML utilisation; CPU: the step's threads), peak memory as
        the tuner counts it (context included), power, the workers' mean CPU %; NaN where
        unavailable."""
        figures = {**stats.telemetry, "peak_process_memory_bytes": process_peak_bytes(self.device)[0]}
        return {
            name: float("nan") if figures.get(name) is None else round(figures[name], 2)
            for name in TELEMETRY_COLUMNS
        }

    def report(self, stats: EpochStats, val: dict[str, float]) -> None:
        attacks = "  ".join(
            f"{k.removeprefix('bitacc_')} {v:.3f}" for k, v in val.items() if k.startswith("bitacc_")
        )
        say(
            f"epoch {self.epoch + 1}/{self.cfg.epochs}: {stats.images_per_s:.1f} img/s, "
            f"data wait {stats.data_wait_fraction:.0%} | val PSNR {val['psnr']:.2f} dB  "
            f"SSIM {val['ssim']:.4f} | bit accuracy: {attacks}{telemetry_text(stats.telemetry)}",
            to=self.console,
        )
        if stats.skipped_files:
            warn(f"skipped {stats.skipped_files} unreadable image(s) this epoch", to=self.console)
        util = stats.telemetry.get("device_util_mean")
        hint = starvation_hint(
            util, stats.data_wait_fraction, self.cfg.loader.num_workers, self.usable_cores
        )
        if hint:
            note(hint, to=self.console)

    # -- the loop ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _deferred_interrupt(self):
        """The first Ctrl-C lets the running step finish, then saves and stops; a second
        one interrupts at once. A step cut in half would save an inconsistent state."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            self.stop_requested = True
            signal.signal(signal.SIGINT, previous[signal.SIGINT])
            name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
            say(f"{name}: stopping after this step (Ctrl-C again to abort)", to=self.console)

        # SIGTERM is how Slurm and Kubernetes preempt a job: save like Ctrl-C rather than
        # lose the epoch. A second SIGTERM is ignored; the scheduler's SIGKILL follows anyway.
        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _memory_cap(self):
        """--from-tuned on CUDA: hold the allocator under the share of the tuned target
        the tuner measured against, then put back the cap that was there before."""
        limit = self.cfg.allocator_limit_bytes
        if self.cuda is None or limit is None:
            return contextlib.nullcontext()
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        total = self.cuda.mem_get_info(index)[1]
        return memory_capped(self.cuda, index, min(1.0, limit / total))

    def fit(self) -> FitResult:
        cfg, world = self.cfg, self.dist.world_size
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        result = FitResult(out_dir=self.out_dir, epochs_done=self.epoch)
        if self.lr_message:
            say(self.lr_message, to=self.console)
        if self.workers_note:
            note(self.workers_note, to=self.console)
        if cfg.sync_bn and world == 1:
            note("--sync-bn has no effect in a single process", to=self.console)
        where = f"{self.device}" if not self.dist.distributed else (
            f"{world} process{'es' if world > 1 else ''} ({self.dist.backend}, {self.device.type}"
            f"{', SyncBatchNorm' if cfg.sync_bn and world > 1 else ''})"
        )
        batch_text = (
            f"batch {cfg.loader.batch_size}" if world == 1
            else f"batch {cfg.loader.batch_size} per process ({cfg.loader.batch_size * world} global)"
        )
        say(
            f"training on {where} ({cfg.precision}), {self.data_description}; "
            f"{batch_text}, {cfg.loader.num_workers} workers, "
            f"lr G {self.optim.lr_g:g} D {self.optim.lr_d:g}; output {self.out_dir}",
            to=self.console,
        )
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=self.console,
            transient=True,
            disable=not (self.dist.is_main and interactive(self.console)),
        )
        if self.dist.is_main and progress.disable:
            self.lines = ProgressLines(PROGRESS_LINE_S, to=self.console)
        if self.dist.is_main and cfg.tensorboard:
            self.tensorboard = _tensorboard_writer(self.out_dir / TENSORBOARD_DIR)
        started = time.perf_counter()
        with progress, self._deferred_interrupt(), self._memory_cap(), \
                self.lines or contextlib.nullcontext(), self._tensorboard_closed():
            while self.epoch < cfg.epochs:
                over_budget = (
                    cfg.max_minutes is not None
                    and time.perf_counter() - started > 60 * cfg.max_minutes
                )
                if self.dist.any(over_budget):  # every rank's clock differs: agree
                    say(f"time budget of {cfg.max_minutes:g} min reached", to=self.console)
                    break
                stats = self.train_epoch(progress)
                if self.lines is not None:
                    self.lines.update(f"epoch {self.epoch + 1}/{cfg.epochs}: validating", force=True)
                val = self.validate()
                result.history.append(self.log_row(stats, val))
                self.report(stats, val)
                if cfg.samples and self.dist.is_main:
                    self.write_samples()
                self.epoch += 1
                self.epoch_step = 0
                self.save(self.epoch, 0)
                result.epochs_done = self.epoch
        return result


    @contextlib.contextmanager
    def _tensorboard_closed(self):
        try:
            yield
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()

    def sample_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same validation images and messages every epoch."""
        count = min(SAMPLE_IMAGES, len(self.val_set))
        items = [self.val_set[index] for index in range(count)]
        return torch.stack([item[0] for item in items]), torch.stack([item[1] for item in items])

    @torch.no_grad()
    def write_samples(self) -> Path:
        """``samples/epoch_NNN.png``: a row of covers, a row of watermarked images and a
        row of their residuals amplified RESIDUAL_GAIN times (grey is no change)."""
        from torchvision.utils import make_grid

        images, messages = self.sample_batch()
        images, messages = self.gan.to_device(images, messages)
        encoder = self.gan.nets.encoder
        was_training = encoder.training
        encoder.eval()
        try:
            with autocast(self.cfg.precision, self.device):
                encoded = encoder(images, messages)
        finally:
            encoder.train(was_training)
        encoded = encoded.float().clamp(-1, 1)
        residual = ((encoded - images) * RESIDUAL_GAIN).clamp(-1, 1)
        grid = make_grid(torch.cat([images, encoded, residual]).cpu(), nrow=len(images), padding=2)
        pixels = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        path = self.out_dir / SAMPLES_DIR / f"epoch_{self.epoch + 1:03d}.png"
        from PIL import Image

        image = Image.fromarray(pixels)
        atomic_write_bytes(path, lambda fh: image.save(fh, format="PNG"))
        return path


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _oversubscription_note(workers: int) -> str | None:
    """One line when more loader workers than usable cores were asked for (torch would
    print its own UserWarning once per loader)."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    if workers <= cores:
        return None
    return (
        f"{workers} DataLoader workers on {cores} usable core(s): they compete for the CPU; "
        f"lower --workers, or let arwgan-autotune measure the best count"
    )


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs tensorboard: pip install 'arwgan-autotune[tensorboard]'") from None
    return SummaryWriter(log_dir=str(folder))


def fit(
    cfg: TrainConfig,
    resume: str | Path | None = None,
    console: Console | None = None,
    dist: DistContext | None = None,
    init_from: str | Path | None = None,
):
    """Train per ``cfg``; with ``resume``, continue from that checkpoint; with
    ``init_from``, start a new run from that checkpoint's network weights (ours or an
    official ARWGAN ``.pyt``).

    Launched by ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment), this process
    joins the process group, trains its shard and leaves the group when done or
    failed; an exception is never swallowed, so the process exits non-zero and torchrun
    stops the whole job. ``dist`` passes a context that the caller set up (and cleans
    up) itself.
    """
    own_group = dist is None
    if dist is None:
        dist = init_distributed(cfg.device)
    try:
        trainer = Trainer(cfg, console, dist)
        if resume is not None:
            trainer.resume(resume)
        elif init_from is not None:
            trainer.init_from(init_from)
        return trainer.fit()
    finally:
        if own_group:
            cleanup()


def config_from_checkpoint(path: str | Path) -> TrainConfig:
    return TrainConfig.from_dict(load_checkpoint(path)["config"])

