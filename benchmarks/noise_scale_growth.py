"""Does the gradient noise scale grow as ARWGAN trains? Train the small CPU model and
measure the generator's and the discriminator's noise scale at a few steps.

    python benchmarks/noise_scale_growth.py --at 0 100 200      # about 70 s on 2 cores

At each listed step the weights are held and ``--batches`` fresh training batches of
``--micro x --micro-batches`` images each are measured with
:meth:`arwgan.step.GANStep.measure_gradient_noise`, raw and in Adam's preconditioned
space (the same as raw before Adam has 5 steps of state), then training continues.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from arwgan.config import LoaderConfig, ModelConfig, OptimConfig
from arwgan.data import EpochSampler, build_datasets, make_loader
from arwgan.step import GANStep
from autotune.gns import NoiseScale


def batches_forever(dataset, batch: int, seed: int, workers: int):
    sampler = EpochSampler(len(dataset), seed=seed, epoch=0)
    loader_cfg = LoaderConfig(batch, workers, persistent_workers=workers > 0)
    loader = make_loader(dataset, loader_cfg, sampler, drop_last=True)
    epoch = 0
    while True:
        for images, messages, _ in loader:
            yield images, messages
        epoch += 1
        sampler.set_epoch(epoch)


def measure(gan: GANStep, stream, micro: int, k: int, batches: int, precondition: bool) -> dict:
    noise_g, noise_d = NoiseScale(), NoiseScale()
    for _ in range(batches):
        parts = [next(stream) for _ in range(k)]
        images, messages = gan.to_device(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        gan.measure_gradient_noise(images, messages, k, noise_g, noise_d, precondition=precondition)
    return {"generator": noise_g.estimate().to_dict(), "discriminator": noise_d.estimate().to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--message-bits", type=int, default=8)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="training batch")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--at", type=int, nargs="+", default=[0, 100, 200], help="training steps to measure at")
    parser.add_argument("--micro", type=int, default=16, help="micro-batch size")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8, help="measured batches per point")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = ModelConfig(image_size=args.image_size, message_bits=args.message_bits,
                        channels=args.channels, noise="")
    train_set, _, _ = build_datasets(None, model.image_size, model.message_bits, seed=0)
    gan = GANStep(model, OptimConfig(lr_g=args.lr, lr_d=args.lr), args.precision, torch.device(args.device), seed=0)
    train_stream = batches_forever(train_set, args.batch, seed=0, workers=args.workers)
    measure_stream = batches_forever(train_set, args.micro, seed=1, workers=args.workers)
    points = []
    started = time.perf_counter()
    for target in sorted(set(args.at)):
        while gan.step_count < target:
            result = gan(*gan.to_device(*next(train_stream)))
        point = {"step": gan.step_count, "images_seen": gan.step_count * args.batch}
        if gan.step_count:
            point["train_bit_accuracy"] = float(result.bit_accuracy)
        point["raw"] = measure(gan, measure_stream, args.micro, args.micro_batches, args.batches, False)
        if gan.step_count >= 5:
            point["adam_preconditioned"] = measure(
                gan, measure_stream, args.micro, args.micro_batches, args.batches, True
            )
        points.append(point)
        for space in ("raw", "adam_preconditioned"):
            if space not in point:
                continue
            for net in ("generator", "discriminator"):
                e = point[space][net]
                ns = e["noise_scale"]
                se = e["noise_scale_stderr"]
                text = "inf (|G|^2 <= 0)" if ns is None else f"{ns:9.1f} +- {se if se is not None else float('nan'):.1f}"
                print(f"step {point['step']:5d}  {space:19s} {net:13s} B_noise {text}  "
                      f"|G|^2 {e['gradient_sq']:.4g}  tr(Sigma) {e['trace']:.4g}", flush=True)
    summary = {
        "config": vars(args),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
        "points": points,
    }
    print(f"done in {summary['seconds']} s")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
