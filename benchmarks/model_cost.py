"""Parameter count of the default ARWGAN and the FLOPs of one train step at 128x128.

    python benchmarks/model_cost.py              # figures in docs/results.md

FLOPs are counted by torch.utils.flop_counter on the real GANStep (both networks'
forward and backward, discriminator and generator updates; a multiply-add counts as
2 FLOPs), per image at batch 16. Optimizer arithmetic and elementwise ops are not
counted: convolutions and matmuls dominate.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from arwgan.config import ModelConfig, OptimConfig
from arwgan.model import count_parameters
from arwgan.step import GANStep


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--message-bits", type=int, default=30)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    cfg = ModelConfig(image_size=args.image_size, message_bits=args.message_bits, channels=args.channels)
    gan = GANStep(cfg, OptimConfig(), "fp32", torch.device("cpu"))
    nets = gan.nets
    print(f"model: {args.image_size}x{args.image_size}, {args.message_bits} bits, {args.channels} channels")
    print("| network | parameters |\n|---|---|")
    for name in ("encoder", "decoder", "discriminator"):
        print(f"| {name} | {count_parameters(getattr(nets, name)):,} |")
    print(f"| total | {count_parameters(nets):,} |")

    images = torch.rand(args.batch, 3, args.image_size, args.image_size) * 2 - 1
    messages = torch.randint(0, 2, (args.batch, args.message_bits)).float()
    gan(images, messages)  # first step: Adam state exists, like every later step
    counter = FlopCounterMode(display=False)
    with counter:
        gan(images, messages)
    total = counter.get_total_flops()
    per_module = counter.get_flop_counts()
    print(f"\ntrain step at batch {args.batch}: {total / 1e9:,.1f} GFLOP "
          f"= {total / args.batch / 1e9:,.2f} GFLOP per image")
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            nets.encoder(images[:1], messages[:1])
        enc = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            nets.decoder(images[:1])
        dec = counter.get_total_flops()
    print(f"forward per image: encoder {enc / 1e9:.2f} GFLOP, decoder {dec / 1e9:.2f} GFLOP")
    del per_module


if __name__ == "__main__":
    main()
