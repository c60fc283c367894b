"""Train a small ARWGAN on the CPU for a fixed time on the built-in dataset, then report
PSNR, SSIM and bit accuracy without noise and under each attack of the official set.

    python benchmarks/train_cpu.py --minutes 5            # the figures in docs/results.md

The model trains with the identity attack only (``--noise ''``), as the trainer issue
specifies; the attacks are evaluation-only, to show what an unprotected model loses.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from arwgan.config import OFFICIAL_NOISE, LoaderConfig, ModelConfig, OptimConfig, TrainConfig
from arwgan.evaluate import evaluate
from arwgan.noise import Noiser
from arwgan.trainer import Trainer

EVAL_ATTACKS = OFFICIAL_NOISE + "+cropout((0.5,0.5),(0.5,0.5))+jpegreal(90)+jpegreal(50)+gaussian_noise(0.02)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--message-bits", type=int, default=8)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--noise", default="")
    parser.add_argument("--out", default="runs/bench-train-cpu")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the result here")
    args = parser.parse_args()

    cfg = TrainConfig(
        model=ModelConfig(image_size=args.image_size, message_bits=args.message_bits,
                          channels=args.channels, noise=args.noise),
        loader=LoaderConfig(batch_size=args.batch, num_workers=args.workers,
                            persistent_workers=args.workers > 0),
        optim=OptimConfig(lr_g=args.lr, lr_d=args.lr),
        precision=args.precision,
        device="cpu",
        epochs=10_000,
        steps_per_epoch=50,
        val_images=200,
        out_dir=args.out,
        max_minutes=args.minutes,
    )
    started = time.perf_counter()
    trainer = Trainer(cfg)
    result = trainer.fit()
    train_s = time.perf_counter() - started
    eval_noiser = Noiser(EVAL_ATTACKS, seed=0)
    metrics = evaluate(trainer.gan.nets, trainer.val_loader, trainer.device, cfg.precision,
                       max_images=None, seed=0, noiser=eval_noiser)
    summary = {
        "config": {k: vars(args)[k] for k in ("minutes", "image_size", "message_bits", "channels",
                                              "batch", "workers", "precision", "lr", "noise")},
        "steps": trainer.gan.step_count,
        "epochs": result.epochs_done,
        "wall_s": round(train_s, 1),
        "torch": torch.__version__,
        "metrics": metrics,
    }
    print(f"trained {summary['steps']} steps in {train_s:.0f} s ({args.precision}, batch {args.batch})")
    print(f"PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.4f}")
    print("| attack | bit accuracy |\n|---|---|")
    for key, value in metrics.items():
        if key.startswith("bitacc_"):
            print(f"| {key.removeprefix('bitacc_')} | {value:.3f} |")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
