"""``arwgan-train``: parse flags, build a TrainConfig, hand off to ``fit``. Nothing else.

Several GPUs or machines: launch it with PyTorch's own launcher, e.g.
``torchrun --nproc-per-node 4 --no-python arwgan-train ...`` (or ``-m arwgan.cli``);
see :mod:`arwgan.distributed`.
"""

from __future__ import annotations

import os
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from arwgan.config import LR_RULES, PRECISIONS, TrainConfig, parse_loss_weights, with_overrides
from arwgan.console import (
    CONTEXT_SETTINGS, EXIT_INTERRUPTED, VersionFlag, entry_point, fail, say, typer_app, warn,
)
from arwgan.errors import TrainingDiverged, UserError
from arwgan.outputs import check_output_folder, require_module
from arwgan.runs import LATEST, prepare_run_folder, resolve_resume

app = typer_app()

# Choices are enums so that click checks them while parsing (before torch is imported)
# and --help lists them.
Precision = Enum("Precision", {name: name for name in PRECISIONS}, type=str)
LrRule = Enum("LrRule", {name: name for name in LR_RULES}, type=str)
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _check_device(value: Optional[str]) -> Optional[str]:
    if value is not None and not _DEVICE.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


def _value(choice: Optional[Enum]) -> Optional[str]:
    return None if choice is None else choice.value


def _rank_prefix() -> str:
    """'rank N: ' under torchrun with several processes (read from the environment, so
    that an error line needs no torch import)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"rank {os.environ.get('RANK', '0')}: " if world > 1 else ""


def env_is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


# Every option defaults to None ("not given"), so that a checkpoint (--resume) or a
# tuned file (--from-tuned) supplies the value unless the user says otherwise.
DataDir = Annotated[Optional[Path], typer.Option(help="Image folder (COCO 2017, HiDDeN train/val, or flat). Default: built-in synthetic set.")]
Epochs = Annotated[Optional[int], typer.Option(help="Epochs to train. (default: 10)")]
Batch = Annotated[Optional[int], typer.Option(help="Images per step. With --from-tuned, the tuned learning rates are rescaled to it with the file's rule. (default: 16)")]
Workers = Annotated[Optional[int], typer.Option(help="DataLoader worker processes. (default: 4)")]
Lr = Annotated[Optional[float], typer.Option(help="Learning rate of both Adam optimisers, for the per-process batch on one process (--lr-rule scales it under torchrun). (default: 1e-3)")]
PrecisionOption = Annotated[Optional[Precision], typer.Option("--precision", help="fp16 needs CUDA. (default: fp32)")]
ImageSize = Annotated[Optional[int], typer.Option(help="Square crop side in pixels. (default: 128)")]
MessageBits = Annotated[Optional[int], typer.Option(help="Message length L. (default: 30)")]
Channels = Annotated[Optional[int], typer.Option(help="Feature channels C. (default: 64)")]
Noise = Annotated[Optional[str], typer.Option(help="Noise layers, HiDDeN grammar, '+'-joined; '' for identity only. (default: official ARWGAN set)")]
Device = Annotated[Optional[str], typer.Option(callback=_check_device, help="auto | cpu | cuda | cuda:N. (default: auto)")]


@app.command(context_settings=CONTEXT_SETTINGS)
def train(
    data_dir: DataDir = None,
    epochs: Epochs = None,
    batch: Batch = None,
    workers: Workers = None,
    lr: Lr = None,
    precision: PrecisionOption = None,
    image_size: ImageSize = None,
    message_bits: MessageBits = None,
    channels: Channels = None,
    noise: Noise = None,
    device: Device = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder for log.csv, last.pt and samples/; must be empty or new unless --resume continues it or --overwrite is given. (default: runs/train; with --resume, the checkpoint's folder)")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue from this checkpoint or run folder (its config is the base; with --from-tuned, the tuned settings apply to the rest of the run); given alone: the latest run under runs/.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start over in a non-empty --out: its earlier run's log.csv, last.pt, samples/ and tensorboard/ are removed.")] = False,
    save_every: Annotated[Optional[int], typer.Option(help="Also save last.pt every N steps (default: at the end of each epoch only).")] = None,
    tensorboard: Annotated[Optional[bool], typer.Option("--tensorboard/--no-tensorboard", help="Write a TensorBoard log into OUT/tensorboard (needs the tensorboard package).")] = None,
    samples: Annotated[Optional[bool], typer.Option("--samples/--no-samples", help="Each epoch, OUT/samples/epoch_NNN.png: cover, watermarked and 10x residual. (default: on)")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="Start a new run from these network weights: our checkpoint or one saved by the official ARWGAN code (.pyt).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of every RNG. (default: 0)")] = None,
    steps_per_epoch: Annotated[Optional[int], typer.Option(help="Cap on steps per epoch. (default: whole train set)")] = None,
    val_images: Annotated[Optional[int], typer.Option(help="Validation images per epoch. (default: 512)")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear LR warm-up steps. (default: 0)")] = None,
    pin_memory: Annotated[Optional[bool], typer.Option("--pin-memory/--no-pin-memory", help="Pin host batches (CUDA).")] = None,
    persistent_workers: Annotated[Optional[bool], typer.Option("--persistent-workers/--no-persistent-workers", help="Keep workers alive between epochs.")] = None,
    prefetch_factor: Annotated[Optional[int], typer.Option(help="Batches prefetched per worker. (default: 2)")] = None,
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="NHWC memory format.")] = None,
    loss_weights: Annotated[Optional[str], typer.Option(help="e.g. adv=0.001,ssim=0.1,mse=0.7,msg=1.5")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop after the epoch in which this much time has passed.")] = None,
    from_tuned: Annotated[Optional[Path], typer.Option(help="Train with the configuration arwgan-autotune wrote (given alone: runs/tuned.json); explicit flags override it.")] = None,
    force: Annotated[bool, typer.Option(help="Use a tuned file even if it was made for another model config.")] = False,
    lr_rule: Annotated[Optional[LrRule], typer.Option(help="Under torchrun, scale the learning rates from the batch they were set for to the global batch (per-process batch x processes). (default: keep them; with --from-tuned: the tuned file's rule)")] = None,
    sync_bn: Annotated[Optional[bool], typer.Option("--sync-bn/--no-sync-bn", help="Under torchrun on GPUs: SyncBatchNorm (statistics over the global batch).")] = None,
    version: VersionFlag = False,
) -> None:
    """Train ARWGAN (attention-guided robust watermarking GAN)."""
    # Everything up to fit() is checked without importing torch when neither --resume
    # nor --from-tuned is given: a bad flag answers at once.
    try:
        if resume and init_from:
            raise UserError("--resume and --init-from exclude each other: --resume continues a run")
        checkpoint = resolve_resume(resume) if resume is not None else None
        if checkpoint is not None:
            from arwgan.trainer import config_from_checkpoint

            base = config_from_checkpoint(checkpoint)
        else:
            base = TrainConfig()
        if from_tuned is not None:
            from arwgan.distributed import env_world_size

            # With --resume: the hand-off of arwgan-autotune --from-checkpoint, the rest
            # of the run under the tuned loader, precision and learning rates.
            tuned_cfg = tuned_base(
                from_tuned, base, image_size, message_bits, channels, noise, force,
                env_world_size(), batch=batch if lr is None else None,
            )
            if checkpoint is not None:
                check_resume_with_tuned(checkpoint, base, tuned_cfg)
            base = tuned_cfg
        if out is None and checkpoint is not None:
            out = checkpoint.parent  # continue the run where it lives, wherever it moved
        overrides = {
            "data_dir": str(data_dir) if data_dir is not None else None,
            "epochs": epochs,
            "loader.batch_size": batch,
            "loader.num_workers": workers,
            "loader.pin_memory": pin_memory,
            "loader.persistent_workers": persistent_workers,
            "loader.prefetch_factor": prefetch_factor,
            "optim.lr_g": lr,
            "optim.lr_d": lr,
            "optim.warmup_steps": warmup_steps,
            "precision": _value(precision),
            "model.image_size": image_size,
            "model.message_bits": message_bits,
            "model.channels": channels,
            "model.noise": noise,
            "device": device,
            "out_dir": str(out) if out is not None else None,
            "seed": seed,
            "steps_per_epoch": steps_per_epoch,
            "val_images": val_images,
            "channels_last": channels_last,
            "max_minutes": max_minutes,
            # An explicit --lr is for the per-process batch on one process.
            "lr_world_size": 1 if lr is not None else None,
            "lr_rule": _value(lr_rule),
            "sync_bn": sync_bn,
            "save_every": save_every,
            "tensorboard": tensorboard,
            "samples": samples,
        }
        if loss_weights is not None:
            for key, value in parse_loss_weights(loss_weights).items():
                overrides[f"model.weights.{key}"] = value
        cfg = with_overrides(base, overrides)
        if cfg.data_dir is not None:
            data = Path(cfg.data_dir)
            if not data.exists():
                raise UserError(f"data folder '{data}' does not exist")
            if not data.is_dir():
                raise UserError(f"data folder '{data}' is a file, not a folder")
        if cfg.tensorboard:
            require_module("tensorboard", "--tensorboard", "tensorboard")
        if env_is_main():  # one process prepares the folder; the others write nothing
            prepare_run_folder(cfg.out_dir, checkpoint, overwrite)
            check_output_folder(cfg.out_dir, "output folder")
        from arwgan.trainer import Interrupted, fit

        try:
            # Passed only when given: fit's other callers and fakes keep their signature.
            start = {"init_from": init_from} if init_from is not None else {}
            result = fit(cfg, resume=checkpoint, **start)
        except Interrupted as exc:
            if env_is_main():
                say(f"{exc}; resume with --resume {exc.checkpoint.parent}")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    except UserError as exc:  # GpuNotUsable says exit 1: not a typo to correct
        raise fail(_rank_prefix() + str(exc), code=getattr(exc, "exit_code", 2)) from None
    except TrainingDiverged as exc:
        raise fail(_rank_prefix() + str(exc), code=1) from None
    except OSError as exc:  # a disk that filled up or went read-only during the run
        where = f" '{exc.filename}'" if exc.filename else ""
        raise fail(f"cannot write{where}: {exc.strerror or exc}", code=1) from None
    if env_is_main():
        say(f"done: {result.epochs_done} epoch(s); checkpoint {result.out_dir / 'last.pt'}")


def tuned_base(
    path, base, image_size, message_bits, channels, noise, force, world_size: int = 1,
    batch: int | None = None,
) -> TrainConfig:
    """The TrainConfig a tuned file prescribes, after checking it still applies here.

    A file tuned for another number of processes keeps its per-process batch; its
    learning rates are rescaled for the new global batch with its own rule, and the
    user is told so. ``batch`` (an explicit ``--batch`` without ``--lr``) replaces the
    tuned batch, and the learning rates follow it with the same rule.
    """
    from dataclasses import replace

    from arwgan.config import ModelConfig
    from arwgan.distributed import env_local_rank, is_main
    from arwgan.step import resolve_device
    from arwgan.tuning import apply_tuned, load_arwgan_tuned
    from arwgan.workload import REFERENCE_BATCH, REFERENCE_LRS
    from autotune.probes import device_fingerprint, real_probes, torch_info
    from autotune.tuned import check_tuned, rescale_for_world_size

    tuned = load_arwgan_tuned(path)
    tuned_model = ModelConfig.from_dict(tuned.model)
    wanted = with_overrides(
        TrainConfig(model=tuned_model),
        {"model.image_size": image_size, "model.message_bits": message_bits,
         "model.channels": channels, "model.noise": noise},
    ).model
    device = resolve_device(base.device)
    probes = real_probes()
    gpu = None
    if device.type == "cuda" and probes.nvml.available():
        index = device.index if device.index is not None else env_local_rank()
        gpu = probes.nvml.gpu(index)
    fingerprint = device_fingerprint(gpu, probes.host.info(), torch_info(), device.type)
    warnings = check_tuned(tuned, wanted.to_dict(), fingerprint, force, path=path)
    choice, message = rescale_for_world_size(
        tuned.choice, world_size, tuned.workload.get("reference_lrs") or REFERENCE_LRS,
        tuned.workload.get("reference_batch") or REFERENCE_BATCH)
    messages = [message] if message else []
    if batch is not None and batch >= 1 and batch != choice.batch_size:
        choice, message = rescale_for_batch(choice, batch)
        messages.append(message)
    if is_main():
        for warning in warnings:
            warn(warning)
        for message in messages:
            say(message)
    cfg = apply_tuned(replace(tuned, choice=choice), base)
    # The rates are now those of this world size's global batch; the rule stays with
    # the config so that a resume under yet another world size rescales them again.
    return replace(cfg, lr_rule=choice.lr_rule, lr_world_size=world_size)


def rescale_for_batch(choice, batch: int):
    """``choice`` at per-process batch ``batch``: the learning rates follow the global
    batch with the choice's own rule (kept under 'none'). Returns the new choice and
    the line that tells the user."""
    from dataclasses import replace

    from autotune.decisions import scale_lr

    old_global, new_global = choice.batch_size * choice.world_size, batch * choice.world_size
    # AdaScale gains compose: the gain from the old batch to the new one, with the same
    # noise scale, is the ratio of their gains from the reference batch.
    old = choice.learning_rates
    lr_g = scale_lr(old["lr_g"], old_global, new_global, choice.lr_rule, choice.noise_scale)
    lr_d = scale_lr(old["lr_d"], old_global, new_global, choice.lr_rule, choice.noise_scale)
    message = (
        f"--batch {batch} instead of the tuned {choice.batch_size}: learning rates "
        f"G {old['lr_g']:.3g} -> {lr_g:.3g}, D {old['lr_d']:.3g} -> {lr_d:.3g} "
        f"(the tuned file's {choice.lr_rule} rule; --lr sets them yourself)"
    )
    return replace(choice, batch_size=batch, learning_rates={**old, "lr_g": lr_g, "lr_d": lr_d}), message


def check_resume_with_tuned(resume: Path, saved: TrainConfig, tuned: TrainConfig) -> None:
    """A checkpoint saved mid-epoch counts its place in the epoch in batches of its own
    size: under another batch size that place would be wrong, so only a checkpoint from
    the end of an epoch continues under a tuned file with another batch."""
    from arwgan.checkpoint import load_checkpoint

    if tuned.loader.batch_size == saved.loader.batch_size:
        return
    if int(load_checkpoint(resume).get("epoch_step", 0)):
        raise UserError(
            f"checkpoint '{resume}' was saved mid-epoch at batch {saved.loader.batch_size}; "
            f"continuing at the tuned batch {tuned.loader.batch_size} needs a checkpoint "
            "from the end of an epoch"
        )


DEFAULT_TUNED = "runs/tuned.json"
#: ``--from-tuned`` and ``--resume`` may be given without a value.
OPTIONAL_VALUES = {"--from-tuned": DEFAULT_TUNED, "--resume": LATEST}
main = entry_point(app, optional_values=OPTIONAL_VALUES)

if __name__ == "__main__":  # torchrun --nproc-per-node N -m arwgan.cli ...
    main()
