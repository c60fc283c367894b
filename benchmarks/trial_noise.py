"""How much do two trials of the same batch differ, against what each trial claims?

The batch search compares trials run one after another, each timed until its own 95 %
interval is within 3 % (or a ceiling). That interval describes the samples of one
trial; on a shared machine the speed drifts between trials, and two trials of one batch
a few seconds apart can differ by more. This script measures both: it runs
``--repeats`` rounds of one trial per batch in ``--batches`` (round-robin, so drift
hits every batch alike), exactly as the tuner's search runs them (a fresh child per
CPU trial, the tuner's timing), and prints per batch the mean images/s, the
between-trial relative standard deviation, and the median of the trials' own relative
half-widths. The tuner's search gives each reading at least
``TuneConfig.trial_noise`` of half-width (on a CPU ``CPU_TRIAL_NOISE``, set from this
script's output); the last line prints the largest between-trial deviation measured.

    python benchmarks/trial_noise.py --device cpu --model demo --batches 16,32,64 --repeats 6

About 100 s on the demo model on 2 cores; ``--json PATH`` writes every reading.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tuner_vs_grid import describe, parse_model  # noqa: E402

from arwgan.tuning import TuneConfig, Tuner  # noqa: E402
from autotune.tuner import CPU_TRIAL_NOISE  # noqa: E402


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"--batches {text!r}: a comma-separated list of batch sizes, e.g. 16,32,64") from None
    if not batches or min(batches) < 1:
        raise SystemExit(f"--batches {text!r}: batch sizes must be positive integers")
    return batches


def summarise(readings: dict[int, list[tuple[float, float | None]]]) -> dict[int, dict]:
    """Per batch: mean images/s, between-trial relative sd, median own half-width."""
    out = {}
    for batch, rows in readings.items():
        rates = [rate for rate, _ in rows]
        own = [ci for _, ci in rows if ci is not None]
        mean = statistics.mean(rates)
        out[batch] = {
            "mean_images_per_s": mean,
            "between_trial_rel_sd": statistics.stdev(rates) / mean if len(rates) > 1 and mean else None,
            "median_own_rel_ci": statistics.median(own) if own else None,
            "readings": rows,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="demo", help='"demo" or e.g. "48x48,12 bits,24 ch,jpeg()"')
    parser.add_argument("--batches", default="16,32,64", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=6, help="trials per batch (at least 2)")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--target-mem", default="4GB")
    parser.add_argument("--json", type=Path, help="write every reading here")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        raise SystemExit("--repeats must be at least 2: one trial has no between-trial spread")
    batches = parse_batches(args.batches)
    model = parse_model(args.model, {})
    tuner = Tuner(TuneConfig(model=model, device=args.device, target_mem=args.target_mem,
                             objective="throughput"), report=lambda m: None)
    tuner.probe()
    tuner.target = tuner.target_bytes()
    tuner.trials_run = []
    print(f"== {describe(model)}, {args.precision}, {args.device}: {args.repeats} rounds of "
          f"batch {', '.join(map(str, batches))}", flush=True)
    readings: dict[int, list[tuple[float, float | None]]] = {b: [] for b in batches}
    started = time.perf_counter()
    try:
        for round_index in range(args.repeats):
            for batch in batches:
                tuner._trials_by_spec = {}  # a fresh trial every time, not the cached one
                m = tuner.trial(batch, args.precision)
                if not m.ok or m.images_per_s is None:
                    raise SystemExit(f"batch {batch}: the trial did not run ({m.reason}: {m.detail})")
                readings[batch].append((m.images_per_s, m.images_per_s_rel_ci))
                own = "-" if m.images_per_s_rel_ci is None else f"{100 * m.images_per_s_rel_ci:.1f} %"
                print(f"round {round_index + 1} batch {batch}: {m.images_per_s:.1f} images/s "
                      f"+-{own} ({m.seconds:.1f} s)", flush=True)
    finally:
        tuner.close()
    summary = summarise(readings)
    for batch, row in summary.items():
        own = row["median_own_rel_ci"]
        own = "none measured" if own is None else f"{100 * own:.1f} %"
        print(f"batch {batch}: mean {row['mean_images_per_s']:.1f} images/s, between-trial sd "
              f"{100 * row['between_trial_rel_sd']:.1f} %, median own 95 % half-width {own}")
    worst = max(row["between_trial_rel_sd"] for row in summary.values())
    print(f"largest between-trial sd {100 * worst:.1f} % (the search's CPU floor: "
          f"{100 * CPU_TRIAL_NOISE:g} %); took {time.perf_counter() - started:.0f} s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": describe(model), "device": args.device,
                                         "precision": args.precision,
                                         "batches": {str(b): r for b, r in summary.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
