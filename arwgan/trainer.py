"""``fit()``: the training loop, written as a handful of named steps.

setup -> for each epoch: train_epoch -> validate -> log -> checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from arwgan.checkpoint import load_checkpoint, rng_states, save_checkpoint, set_rng_states
from arwgan.config import LoaderConfig, TrainConfig
from arwgan.data import EpochSampler, build_datasets, make_loader
from arwgan.errors import CheckpointError, ConfigError, TrainingDiverged
from arwgan.evaluate import evaluate
from arwgan.step import LOSS_NAMES, GANStep, check_precision, resolve_device

CHECKPOINT_NAME = "last.pt"
LOG_NAME = "log.csv"


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak reservation. CPU: the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_reserved(device))
    # ru_maxrss is in KiB on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    """Raised by fit() after Ctrl-C, once the checkpoint is safely on disk."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(f"interrupted; checkpoint saved to {checkpoint}")
        self.checkpoint = checkpoint


class Trainer:
    def __init__(self, cfg: TrainConfig, console: Console | None = None) -> None:
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        self.device = resolve_device(cfg.device)
        check_precision(cfg.precision, self.device)  # before any slow data preparation
        self.out_dir = Path(cfg.out_dir)
        self.train_set, self.val_set, self.data_description = build_datasets(
            cfg.data_dir,
            cfg.model.image_size,
            cfg.model.message_bits,
            seed=cfg.seed,
            val_fraction=cfg.val_fraction,
        )
        self.gan = GANStep(
            cfg.model, cfg.optim, cfg.precision, self.device, cfg.seed, cfg.channels_last
        )
        if self.device.type == "cuda":
            # The input shape never changes during a run, so autotuned conv kernels pay.
            torch.backends.cudnn.benchmark = True
        self.train_sampler = EpochSampler(len(self.train_set), seed=cfg.seed, epoch=0)
        self.train_loader = make_loader(
            self.train_set, cfg.loader, self.train_sampler, drop_last=True
        )
        if len(self.train_loader) == 0:
            raise ConfigError(
                f"batch {cfg.loader.batch_size} is larger than the {len(self.train_set)} "
                "training images; lower --batch"
            )
        val_loader_cfg = LoaderConfig(
            batch_size=cfg.loader.batch_size,
            num_workers=min(cfg.loader.num_workers, 2),
            pin_memory=cfg.loader.pin_memory,
        )
        # Validation always sees the same images with the same messages (epoch fixed).
        self.val_sampler = EpochSampler(len(self.val_set), seed=cfg.seed, epoch=0, shuffle=False)
        self.val_loader = make_loader(self.val_set, val_loader_cfg, self.val_sampler, False)
        self.epoch = 0
        self.epoch_step = 0
        self.nonfinite_streak = 0
        self.stop_requested = False

    # -- checkpoints ---------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def save(self, epoch: int, epoch_step: int) -> Path:
        save_checkpoint(
            self.checkpoint_path,
            {
                "config": self.cfg.to_dict(),
                "gan": self.gan.state_dict(),
                "epoch": epoch,
                "epoch_step": epoch_step,
                "rng": rng_states(),
            },
        )
        return self.checkpoint_path

    def resume(self, path: str | Path) -> None:
        state = load_checkpoint(path)
        saved_model = TrainConfig.from_dict(state["config"]).model
        if saved_model.fingerprint() != self.cfg.model.fingerprint():
            raise CheckpointError(
                f"checkpoint '{path}' was trained with another model config "
                f"({saved_model.image_size}px, {saved_model.message_bits} bits, "
                f"{saved_model.channels} channels, noise {saved_model.noise!r})"
            )
        self.gan.load_state_dict(state["gan"])
        set_rng_states(state["rng"])
        self.epoch = int(state["epoch"])
        self.epoch_step = int(state["epoch_step"])

    # -- one epoch -----------------------------------------------------------------------
    def steps_this_epoch(self) -> int:
        steps = len(self.train_loader)
        if self.cfg.steps_per_epoch is not None:
            steps = min(steps, self.cfg.steps_per_epoch)
        return steps

    def train_epoch(self, progress: Progress) -> EpochStats:
        cfg, device, batch = self.cfg, self.device, self.cfg.loader.batch_size
        total_steps = self.steps_this_epoch()
        self.train_sampler.set_epoch(self.epoch, start=self.epoch_step * batch)
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
                    self.console.print(
                        f"[yellow]warning:[/] non-finite loss at step {self.gan.step_count}; "
                        "update skipped"
                    )
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
                if steps % cfg.log_every == 0 or self.epoch_step == total_steps:
                    # .item() here is a sync point: only every log_every steps.
                    elapsed = time.perf_counter() - start
                    good = max(steps - nonfinite, 1)
                    g = float(loss_sums.get("g_loss", torch.zeros(())) / good)
                    d = float(loss_sums.get("d_loss", torch.zeros(())) / good)
                    acc = float(loss_sums.get("bit_accuracy", torch.zeros(())) / good)
                    mem = peak_memory_bytes(device) / 2**30
                    progress.update(
                        task,
                        completed=self.epoch_step,
                        stats=f"{steps * batch / elapsed:7.1f} img/s  G {g:.4f}  D {d:.4f}  "
                        f"bits {acc:.3f}  mem {mem:.2f} GiB",
                    )
                if self.stop_requested:
                    path = self.save(self.epoch, self.epoch_step)
                    raise Interrupted(path)
        finally:
            progress.remove_task(task)
        _sync(device)
        seconds = time.perf_counter() - start
        good = max(steps - nonfinite, 1)
        losses = {name: float(value / good) for name, value in loss_sums.items()}
        return EpochStats(
            steps=steps,
            images=steps * batch,
            seconds=seconds,
            data_wait_s=data_wait,
            losses=losses,
            skipped_files=int(skipped_files),
            nonfinite_steps=nonfinite,
        )

    def validate(self) -> dict[str, float]:
        return evaluate(
            self.gan.nets,
            self.val_loader,
            self.device,
            self.cfg.precision,
            max_images=self.cfg.val_images,
            seed=self.cfg.seed,
        )

    # -- logging -------------------------------------------------------------------------
    def log_row(self, stats: EpochStats, val: dict[str, float]) -> dict[str, float]:
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
            **{f"val_{k}": round(v, 6) for k, v in val.items()},
        }
        path = self.out_dir / LOG_NAME
        new_file = not path.exists()
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        return row

    def report(self, stats: EpochStats, val: dict[str, float]) -> None:
        attacks = "  ".join(
            f"{k.removeprefix('bitacc_')} {v:.3f}" for k, v in val.items() if k.startswith("bitacc_")
        )
        self.console.print(
            f"epoch {self.epoch + 1}/{self.cfg.epochs}: {stats.images_per_s:.1f} img/s, "
            f"data wait {stats.data_wait_fraction:.0%} | val PSNR {val['psnr']:.2f} dB  "
            f"SSIM {val['ssim']:.4f} | bit accuracy: {attacks}"
        )
        if stats.skipped_files:
            self.console.print(
                f"[yellow]warning:[/] skipped {stats.skipped_files} unreadable image(s) this epoch"
            )

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
            signal.signal(signal.SIGINT, previous)
            self.console.print("[yellow]stopping after this step (Ctrl-C again to abort)[/]")

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def fit(self) -> FitResult:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        result = FitResult(out_dir=self.out_dir, epochs_done=self.epoch)
        self.console.print(
            f"training on {self.device} ({cfg.precision}), {self.data_description}; "
            f"batch {cfg.loader.batch_size}, {cfg.loader.num_workers} workers, "
            f"lr G {cfg.optim.lr_g:g} D {cfg.optim.lr_d:g}; output {self.out_dir}"
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
        )
        started = time.perf_counter()
        with progress, self._deferred_interrupt():
            while self.epoch < cfg.epochs:
                if cfg.max_minutes is not None and time.perf_counter() - started > 60 * cfg.max_minutes:
                    self.console.print(f"time budget of {cfg.max_minutes:g} min reached")
                    break
                stats = self.train_epoch(progress)
                val = self.validate()
                result.history.append(self.log_row(stats, val))
                self.report(stats, val)
                self.epoch += 1
                self.epoch_step = 0
                self.save(self.epoch, 0)
                result.epochs_done = self.epoch
        return result


def fit(cfg: TrainConfig, resume: str | Path | None = None, console: Console | None = None):
    """Train per ``cfg``; with ``resume``, continue from that checkpoint."""
    trainer = Trainer(cfg, console)
    if resume is not None:
        trainer.resume(resume)
    return trainer.fit()


def config_from_checkpoint(path: str | Path) -> TrainConfig:
    return TrainConfig.from_dict(load_checkpoint(path)["config"])

