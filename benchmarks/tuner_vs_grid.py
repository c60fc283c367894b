"""How good and how cheap is the tuner? Two measurements in one run, same model, same data.

(a) seed default vs tuned: the seed report's configuration (batch 16, 4 workers, fp32,
    no pinning) and the tuner's recommendation alternate, each trained end to end for the
    same number of steps on the same data; the ratio of medians is printed.
(b) exhaustive grid: every batch (powers of two up to the largest that fits the target)
    x every worker count the tuner considers x every precision, each trained end to end
    the same way. Printed: how close the tuner's choice comes to the grid's best
    images/s (goal >= 95 %) and the tuner's time as a share of the grid's (goal <= 25 %).

    python benchmarks/tuner_vs_grid.py --device cpu          # docs/results.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

from arwgan.config import LoaderConfig, ModelConfig, TrainConfig
from autotune.measure import training_images_per_s
from autotune.tuner import SEED_LOADER, SEED_PRECISION, TuneConfig, Tuner, worker_candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--message-bits", type=int, default=8)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--noise", default="")
    parser.add_argument("--target-mem", default="3GB")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per grid point")
    parser.add_argument("--rounds", type=int, default=3, help="alternations for (a)")
    parser.add_argument("--json", dest="json_out", default="runs/bench/tuner_vs_grid.json")
    args = parser.parse_args()

    model = ModelConfig(image_size=args.image_size, message_bits=args.message_bits,
                        channels=args.channels, noise=args.noise)
    tune_cfg = TuneConfig(model=model, device=args.device, target_mem=args.target_mem,
                          max_batch=args.max_batch)

    # The tuner, timed as a user would run it.
    started = time.perf_counter()
    result = Tuner(tune_cfg, report=lambda m: None).run()
    tuner_s = time.perf_counter() - started
    choice = result.tuned.choice
    print(f"tuner: {tuner_s:.0f} s -> batch {choice.batch_size}, {choice.num_workers} workers "
          f"(prefetch {choice.prefetch_factor}), {choice.precision}")

    # A fresh tuner object reuses the measuring code (same data, same step) for the grid.
    bench = Tuner(tune_cfg, report=lambda m: None)
    bench.probe()
    bench.target = bench.target_bytes()

    def measure(loader: LoaderConfig, precision: str) -> float:
        gan = bench._gan(precision, loader.batch_size)
        depth = loader.num_workers * (loader.prefetch_factor or 0)
        return training_images_per_s(gan, bench._loader(loader, args.steps + depth + 4), args.steps)

    # (a) seed default vs tuned, alternated.
    tuned_loader = LoaderConfig(choice.batch_size, choice.num_workers, choice.pin_memory,
                                choice.persistent_workers, choice.prefetch_factor)
    seed_runs, tuned_runs = [], []
    for _ in range(args.rounds):
        seed_runs.append(measure(SEED_LOADER, SEED_PRECISION))
        tuned_runs.append(measure(tuned_loader, choice.precision))
    seed_ips, tuned_ips = statistics.median(seed_runs), statistics.median(tuned_runs)
    print(f"(a) seed default {seed_ips:.1f} img/s, tuned {tuned_ips:.1f} img/s: "
          f"{tuned_ips / seed_ips:.2f}x (median of {args.rounds} alternated rounds)")

    # (b) the grid.
    largest_ok = max(t.batch for t in result.search.trials if t.ok)
    batches = [b for b in (2**i for i in range(1, 20)) if b <= largest_ok]
    workers = worker_candidates(bench.host.usable_cores)
    precisions = bench.precision_candidates()
    cuda = bench.device.type == "cuda"
    grid_started = time.perf_counter()
    grid = []
    for batch, w, precision in itertools.product(batches, workers, precisions):
        loader = LoaderConfig(batch, w, pin_memory=cuda, persistent_workers=w > 0)
        ips = measure(loader, precision)
        grid.append({"batch": batch, "workers": w, "precision": precision, "images_per_s": ips})
        print(f"  grid batch {batch:4d} workers {w:2d} {precision}: {ips:8.1f} img/s", flush=True)
    grid_s = time.perf_counter() - grid_started
    best = max(grid, key=lambda g: g["images_per_s"])
    chosen_ips = measure(tuned_loader, choice.precision)  # same protocol as the grid points
    print(f"(b) grid best: batch {best['batch']}, {best['workers']} workers, {best['precision']}: "
          f"{best['images_per_s']:.1f} img/s; tuner's choice: {chosen_ips:.1f} img/s = "
          f"{100 * chosen_ips / best['images_per_s']:.0f} % of the best")
    print(f"    grid of {len(grid)} points took {grid_s:.0f} s; the tuner took {tuner_s:.0f} s "
          f"= {100 * tuner_s / grid_s:.0f} % of the grid's time")
    summary = {
        "model": model.to_dict(), "device": str(bench.device), "tuner_s": tuner_s,
        "choice": {"batch": choice.batch_size, "workers": choice.num_workers,
                   "prefetch": choice.prefetch_factor, "precision": choice.precision},
        "seed_default_images_per_s": seed_runs, "tuned_images_per_s": tuned_runs,
        "speedup": tuned_ips / seed_ips, "grid": grid, "grid_s": grid_s, "grid_best": best,
        "choice_images_per_s_in_grid_protocol": chosen_ips,
        "choice_share_of_best": chosen_ips / best["images_per_s"],
        "tuner_time_share_of_grid": tuner_s / grid_s,
    }
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
