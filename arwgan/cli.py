"""``arwgan-train``: parse flags, build a TrainConfig, hand off to ``fit``. Nothing else.

Several GPUs or machines: launch it with PyTorch's own launcher, e.g.
``torchrun --nproc-per-node 4 --no-python arwgan-train ...`` (or ``-m arwgan.cli``);
see :mod:`arwgan.distributed`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from arwgan.config import TrainConfig, parse_loss_weights, with_overrides
from arwgan.console import EXIT_INTERRUPTED, console, entry_point, fail, say, warn
from arwgan.errors import TrainingDiverged, UserError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)

# Every option defaults to None ("not given"), so that a checkpoint (--resume) or a
# tuned file (--from-tuned) supplies the value unless the user says otherwise.
DataDir = Annotated[Optional[Path], typer.Option(help="Image folder (COCO 2017, HiDDeN train/val, or flat). Default: built-in synthetic set.")]
Epochs = Annotated[Optional[int], typer.Option(help="Epochs to train. (default: 10)")]
Batch = Annotated[Optional[int], typer.Option(help="Images per step. (default: 16)")]
Workers = Annotated[Optional[int], typer.Option(help="DataLoader worker processes. (default: 4)")]
Lr = Annotated[Optional[float], typer.Option(help="Learning rate of both Adam optimisers, for the per-process batch on one process (--lr-rule scales it under torchrun). (default: 1e-3)")]
Precision = Annotated[Optional[str], typer.Option(help="fp32 | bf16 | fp16 (fp16 needs CUDA). (default: fp32)")]
ImageSize = Annotated[Optional[int], typer.Option(help="Square crop side in pixels. (default: 128)")]
MessageBits = Annotated[Optional[int], typer.Option(help="Message length L. (default: 30)")]
Channels = Annotated[Optional[int], typer.Option(help="Feature channels C. (default: 64)")]
Noise = Annotated[Optional[str], typer.Option(help="Noise layers, HiDDeN grammar, '+'-joined; '' for identity only. (default: official ARWGAN set)")]
Device = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N. (default: auto)")]


@app.command()
def train(
    data_dir: DataDir = None,
    epochs: Epochs = None,
    batch: Batch = None,
    workers: Workers = None,
    lr: Lr = None,
    precision: Precision = None,
    image_size: ImageSize = None,
    message_bits: MessageBits = None,
    channels: Channels = None,
    noise: Noise = None,
    device: Device = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder for log.csv and last.pt. (default: runs/train)")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue from this checkpoint (its config is the base; with --from-tuned, the tuned settings apply to the rest of the run).")] = None,
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
    lr_rule: Annotated[Optional[str], typer.Option(help="Under torchrun, scale the learning rates from the batch they were set for to the global batch (per-process batch x processes): linear | sqrt | none. (default: keep them; with --from-tuned: the tuned file's rule)")] = None,
    sync_bn: Annotated[Optional[bool], typer.Option("--sync-bn/--no-sync-bn", help="Under torchrun on GPUs: SyncBatchNorm (statistics over the global batch).")] = None,
) -> None:
    """Train ARWGAN (attention-guided robust watermarking GAN)."""
    from arwgan.distributed import env_world_size, is_main, rank_prefix
    from arwgan.trainer import Interrupted, config_from_checkpoint, fit

    try:
        base = config_from_checkpoint(resume) if resume else TrainConfig()
        if from_tuned is not None:
            # With --resume: the hand-off of arwgan-autotune --from-checkpoint, the rest
            # of the run under the tuned loader, precision and learning rates.
            tuned_cfg = tuned_base(
                from_tuned, base, image_size, message_bits, channels, noise, force, env_world_size()
            )
            if resume:
                check_resume_with_tuned(resume, base, tuned_cfg)
            base = tuned_cfg
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
            "precision": precision,
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
            "lr_rule": lr_rule,
            "sync_bn": sync_bn,
        }
        if loss_weights is not None:
            for key, value in parse_loss_weights(loss_weights).items():
                overrides[f"model.weights.{key}"] = value
        cfg = with_overrides(base, overrides)
        if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
            raise UserError(f"data folder '{cfg.data_dir}' does not exist")
        result = fit(cfg, resume=resume, console=console)
    except UserError as exc:  # GpuNotUsable says exit 1: not a typo to correct
        raise fail(rank_prefix() + str(exc), code=getattr(exc, "exit_code", 2)) from None
    except TrainingDiverged as exc:
        raise fail(rank_prefix() + str(exc), code=1) from None
    except Interrupted as exc:
        if is_main():
            say(f"{exc}; resume with --resume {exc.checkpoint}")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if is_main():
        say(f"done: {result.epochs_done} epoch(s); checkpoint {result.out_dir / 'last.pt'}")


def tuned_base(
    path, base, image_size, message_bits, channels, noise, force, world_size: int = 1
) -> TrainConfig:
    """The TrainConfig a tuned file prescribes, after checking it still applies here.

    A file tuned for another number of processes keeps its per-process batch; its
    learning rates are rescaled for the new global batch with its own rule, and the
    user is told so.
    """
    from dataclasses import replace

    from arwgan.config import ModelConfig
    from arwgan.distributed import env_local_rank, is_main
    from arwgan.step import resolve_device
    from autotune.probes import device_fingerprint, real_probes, torch_info
    from autotune.tuned import apply_tuned, check_tuned, load_tuned, rescale_for_world_size

    tuned = load_tuned(path)
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
    warnings = check_tuned(tuned, wanted, fingerprint, force, path=path)
    choice, message = rescale_for_world_size(tuned.choice, world_size)
    if is_main():
        for warning in warnings:
            warn(warning)
        if message:
            say(message)
    cfg = apply_tuned(replace(tuned, choice=choice), base)
    # The rates are now those of this world size's global batch; the rule stays with
    # the config so that a resume under yet another world size rescales them again.
    return replace(cfg, lr_rule=choice.lr_rule, lr_world_size=world_size)


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
_main = entry_point(app, optional_values={"--from-tuned": DEFAULT_TUNED})


def main() -> None:
    """The installed ``arwgan-train``. Under torchrun, ``record`` puts an uncaught
    exception's traceback into the error file the launcher reads, so its failure summary
    names the rank and the cause (imported here: torch is slow to import for --help)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    record(_main)()

if __name__ == "__main__":  # torchrun --nproc-per-node N -m arwgan.cli ...
    main()
