"""What the training telemetry costs: the train step with and without the background
sampler, alternated in one run, on the same model, data and loader.

    python benchmarks/telemetry_overhead.py                        # default model, batch 16
    python benchmarks/telemetry_overhead.py --device cuda --batch 64 --workers 8

Each round trains ``--steps`` steps with telemetry off, then ``--steps`` with it on (the
order flips every round, so a drift in machine load does not favour one side); the
median over rounds of each side's seconds per step gives the overhead. It also times
the readings themselves (one sample of every reader, as the sampler takes it), which
is the cost independent of run-to-run noise: cost per sample x samples per second is
the share of one core that sampling takes. The issue's bar: under 2 % of step time.
Run it on a quiet machine; on a loaded one the alternation noise exceeds 2 %.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from arwgan.config import LoaderConfig, ModelConfig, OptimConfig, TrainConfig
from arwgan.data import EpochSampler, build_datasets, make_loader
from arwgan.step import GANStep, resolve_device
from autotune.telemetry import ProcessReader, Sampler, TrainingTelemetry, nvml_gpu_reader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def endless(loader_factory):
    """Batches forever from fresh epochs of one persistent-worker loader."""
    loader = loader_factory()
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def timed_steps(gan: GANStep, batches, steps: int) -> float:
    """Seconds per step over ``steps`` steps, device synchronised around the clock."""
    _sync(gan.device)
    start = time.perf_counter()
    for _ in range(steps):
        images, messages, _ = next(batches)
        gan(*gan.to_device(images, messages))
    _sync(gan.device)
    return (time.perf_counter() - start) / steps


def reading_cost_s(device: torch.device, samples: int = 50) -> float:
    """Seconds one sample of every reader takes, the children listed every time (the
    sampler lists them every 0.5 s: an upper bound)."""
    readers = {"host": ProcessReader(children_every_s=0.0)}
    if device.type == "cuda":
        gpu = nvml_gpu_reader(device.index or 0)
        if gpu is not None:
            readers["gpu"] = gpu
    sampler = Sampler(readers)
    sampler.sample_once()
    start = time.perf_counter()
    for _ in range(samples):
        sampler.sample_once()
    return (time.perf_counter() - start) / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--message-bits", type=int, default=30)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--noise", default="")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--steps", type=int, default=30, help="train steps per side per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--interval", type=float, default=0.1, help="sampling interval, seconds")
    parser.add_argument("--data-dir", default=None, help="default: the built-in synthetic set")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the result here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    model = ModelConfig(image_size=args.image_size, message_bits=args.message_bits,
                        channels=args.channels, noise=args.noise)
    cfg = TrainConfig(model=model, loader=LoaderConfig(args.batch, args.workers, device.type == "cuda",
                                                       args.workers > 0),
                      optim=OptimConfig(), precision=args.precision, device=str(device))
    train_set, _, description = build_datasets(args.data_dir, model.image_size, model.message_bits)
    gan = GANStep(model, cfg.optim, cfg.precision, device, seed=0)
    batches = endless(lambda: make_loader(train_set, cfg.loader, EpochSampler(len(train_set), 0, 0), True))
    telemetry = TrainingTelemetry(
        gpu=nvml_gpu_reader(device.index or 0) if device.type == "cuda" else None,
        step_threads=torch.get_num_threads(), interval_s=args.interval,
    )
    print(f"{device}, {description}; batch {args.batch}, {args.workers} workers, {args.precision}, "
          f"{args.steps} steps x {args.rounds} rounds per side, sampling every {args.interval} s")
    timed_steps(gan, batches, max(2, args.steps // 4))  # warm-up: workers, kernels, allocator

    seconds: dict[str, list[float]] = {"off": [], "on": []}
    for round_index in range(args.rounds):
        order = ("off", "on") if round_index % 2 == 0 else ("on", "off")
        for side in order:
            if side == "on":
                telemetry.start()
            try:
                seconds[side].append(timed_steps(gan, batches, args.steps))
            finally:
                if side == "on":
                    telemetry.stop()
        print(f"round {round_index + 1}: off {1000 * seconds['off'][-1]:.1f} ms/step, "
              f"on {1000 * seconds['on'][-1]:.1f} ms/step")

    off, on = statistics.median(seconds["off"]), statistics.median(seconds["on"])
    overhead = (on - off) / off
    cost = reading_cost_s(device)
    core_share = cost / args.interval
    result = {
        "device": str(device), "batch": args.batch, "workers": args.workers,
        "step_s_off": off, "step_s_on": on, "overhead_fraction": overhead,
        "reading_cost_s": cost, "interval_s": args.interval, "core_share": core_share,
        "rounds": seconds,
    }
    print(f"step time: {1000 * off:.2f} ms without telemetry, {1000 * on:.2f} ms with "
          f"(median of {args.rounds} alternated rounds)")
    print(f"overhead: {100 * overhead:+.2f} % of step time (bar: under 2 %)")
    print(f"one sample of every reader: {1000 * cost:.3f} ms; at {1 / args.interval:.0f} Hz "
          f"that is {100 * core_share:.2f} % of one core")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
