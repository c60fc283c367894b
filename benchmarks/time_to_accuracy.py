"""Time to accuracy: does the goodput prediction hold? Train several configurations for
the same wall time, alternated, and compare validation bit accuracy and PSNR.

    python benchmarks/time_to_accuracy.py --minutes 6 --segment-s 60 --plot runs/tta.png

Configurations (``--config``, repeatable; defaults below) are
``name=...,batch=...,precision=...,workers=...,lr=...,warmup=...``:

- ``seed``: the seed default (batch 16, fp32, 4 workers, lr 1e-3);
- ``throughput``: what the throughput objective recommends on this CPU (batch 64, bf16,
  0 workers, lr 4e-3 by the linear rule, 400 warm-up steps);
- ``goodput``: what the goodput objective chooses (batch 16, bf16, 0 workers, lr 1e-3:
  the reference batch wins when the noise scale is small; pass another with --config).

With ``--choose`` the last two are not given but chosen per shape, as the tuner would:
each ``--candidates`` batch trains ``--choose-s`` seconds for its images/s, the noise
scale is measured on the batch-16 candidate, and the throughput and goodput rules pick.

Every configuration of a shape trains in turn for ``--segment-s`` seconds of its own
clock until each has ``--minutes``; the clock stops during validation (the same
``--val-images`` every time) and during noise-scale measurement, so neither is charged
to anyone. Alternating short segments spreads any change in the machine's load over all
configurations alike.

Prediction: the gradient noise scale of the generator (raw gradients, see docs/goodput.md) is measured
along the ``seed`` run (``--noise-batches`` measurements per segment, batch 64 as 4 x 16),
and each configuration's predicted speed-up to the same training progress over ``seed``
is goodput_X / goodput_seed = (images/s_X E(B_X)) / (images/s_seed E(16)), with the
images/s each one achieved here and E(B) = (B_noise + 16) / (B_noise + B). Observed
speed-up: seed's training time to the common accuracy (the lowest final accuracy of all
configurations, smoothed) divided by X's, both read off the validation curves by linear
interpolation.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from arwgan.config import LoaderConfig, ModelConfig, OptimConfig
from arwgan.data import EpochSampler, build_datasets, make_loader
from arwgan.evaluate import evaluate
from arwgan.step import GANStep
from autotune.decisions import warmup_steps_for
from autotune.gns import NoiseScale
from autotune.goodput import BatchCandidate, choose_batch_by_goodput, conservative_noise_scale, efficiency

REFERENCE_BATCH = 16
REFERENCE_LR = 1e-3
DEFAULT_CONFIGS = (
    "name=seed,batch=16,precision=fp32,workers=4,lr=1e-3,warmup=0",
    "name=throughput,batch=64,precision=bf16,workers=0,lr=4e-3,warmup=400",
    "name=goodput,batch=16,precision=bf16,workers=0,lr=1e-3,warmup=0",
)


@dataclass
class RunConfig:
    name: str
    batch: int
    precision: str
    workers: int
    lr: float
    warmup: int = 0

    @classmethod
    def parse(cls, text: str) -> RunConfig:
        fields_ = dict(part.split("=", 1) for part in text.split(","))
        kinds = {"name": str, "batch": int, "precision": str, "workers": int, "lr": float, "warmup": int}
        unknown = set(fields_) - set(kinds)
        if unknown:
            raise SystemExit(f"error: unknown config field(s) {', '.join(sorted(unknown))} in {text!r}")
        try:
            return cls(**{k: kinds[k](v) for k, v in fields_.items()})
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"error: bad config {text!r}: {exc}") from None


def parse_shape(text: str) -> ModelConfig:
    """'32x8x32' = image size x message bits x channels, identity noise."""
    try:
        size, bits, channels = (int(v) for v in text.split("x"))
    except ValueError:
        raise SystemExit(f"error: shape must be SIZExBITSxCHANNELS, got {text!r}") from None
    return ModelConfig(image_size=size, message_bits=bits, channels=channels, noise="")


@dataclass
class Run:
    """One configuration training on one shape, resumable segment by segment."""

    cfg: RunConfig
    model: ModelConfig
    train_set: object
    val_loader: object
    val_images: int
    seed: int
    train_s: float = 0.0
    images: int = 0
    curve: list = field(default_factory=list)

    def __post_init__(self) -> None:
        optim = OptimConfig(lr_g=self.cfg.lr, lr_d=self.cfg.lr, warmup_steps=self.cfg.warmup)
        self.gan = GANStep(self.model, optim, self.cfg.precision, torch.device("cpu"), self.seed)
        self.sampler = EpochSampler(len(self.train_set), seed=self.seed, epoch=0)
        loader_cfg = LoaderConfig(self.cfg.batch, self.cfg.workers, persistent_workers=self.cfg.workers > 0)
        self.loader = make_loader(self.train_set, loader_cfg, self.sampler, drop_last=True)
        self.epoch = 0
        self.iterator = iter(self.loader)
        self.record()

    def next_batch(self):
        while True:
            try:
                images, messages, _ = next(self.iterator)
                return images, messages
            except StopIteration:
                self.epoch += 1
                self.sampler.set_epoch(self.epoch)
                self.iterator = iter(self.loader)

    def train_for(self, seconds: float) -> None:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            images, messages = self.next_batch()
            self.gan(images, messages)
            self.images += images.shape[0]
        self.train_s += time.perf_counter() - start

    def record(self) -> None:
        metrics = evaluate(self.gan.nets, self.val_loader, torch.device("cpu"), self.cfg.precision,
                           max_images=self.val_images, seed=0)
        self.curve.append({"train_s": round(self.train_s, 2), "steps": self.gan.step_count,
                           "images": self.images, "bit_accuracy": metrics["bitacc_identity"],
                           "psnr": metrics["psnr"]})

    @property
    def images_per_s(self) -> float:
        return self.images / self.train_s if self.train_s > 0 else math.nan


def measure_noise(run: Run, stream_set, noise: NoiseScale, batches: int, seed: int) -> None:
    """Generator noise scale at the run's current weights from fresh batches of 4 x 16."""
    gen = torch.Generator().manual_seed(seed)
    discard = NoiseScale()
    for _ in range(batches):
        indices = torch.randint(0, len(stream_set), (4 * REFERENCE_BATCH,), generator=gen).tolist()
        items = [stream_set[(i, seed)] for i in indices]
        images = torch.stack([item[0] for item in items])
        messages = torch.stack([item[1] for item in items])
        run.gan.measure_gradient_noise(images, messages, 4, noise, discard)


def choose_configs(model, train_set, val_loader, args) -> tuple[list[RunConfig], dict]:
    """What the two objectives would pick, measured here as the tuner would: each
    candidate batch trains briefly (``--choose-precision``, 0 workers) for its images/s,
    and the generator's noise scale is measured on the batch-16 candidate after its
    training. Throughput: the highest images/s, linear learning-rate rule. Goodput: the
    highest goodput with a noise scale one standard error lower than measured, AdaScale
    learning rate (gain ** 0.5 for Adam)."""
    speeds = {}
    noise = NoiseScale()
    for batch in sorted(set(args.candidates) | {REFERENCE_BATCH}):
        probe = Run(RunConfig(f"probe-{batch}", batch, args.choose_precision, 0, REFERENCE_LR),
                    model, train_set, val_loader, 16, args.seed)
        probe.train_for(3.0)  # first steps: allocation and warm-up, not timed
        probe.train_s, probe.images = 0.0, 0
        probe.train_for(args.choose_s)
        speeds[batch] = probe.images_per_s
        if batch == REFERENCE_BATCH:
            measure_noise(probe, train_set, noise, args.choose_noise_batches, seed=args.seed + 7)
    est = noise.estimate()
    decide_with = conservative_noise_scale(est.noise_scale, est.noise_scale_stderr)
    candidates = [BatchCandidate(b, v) for b, v in sorted(speeds.items())]
    good = choose_batch_by_goodput(candidates, decide_with, REFERENCE_BATCH, tolerance=0.03)
    fastest = max(candidates, key=lambda c: c.images_per_s)
    tp_factor = fastest.batch / REFERENCE_BATCH
    chosen = [
        RunConfig("throughput", fastest.batch, args.choose_precision, 0, REFERENCE_LR * tp_factor,
                  warmup_steps_for("linear", tp_factor)),
        # warmup_steps_for("linear", f) is the tuner's warm-up for a learning-rate multiplier f.
        RunConfig("goodput", good.chosen.batch, args.choose_precision, 0,
                  REFERENCE_LR * good.chosen.lr_factor, warmup_steps_for("linear", good.chosen.lr_factor)),
    ]
    if (chosen[0].batch, chosen[0].lr) == (chosen[1].batch, chosen[1].lr):
        chosen = chosen[1:]  # the same configuration: train it once
    for row in good.rows:
        print(f"  choose: batch {row.batch:3d} {row.images_per_s:6.1f} img/s  E {row.efficiency:.2f}  "
              f"goodput {row.goodput:6.1f}  lr x{row.lr_factor:.2f}" + ("  <- goodput" if row is good.chosen else ""))
    print(f"  choose: noise scale {est.noise_scale:.1f} +- {est.noise_scale_stderr:.1f} "
          f"(decided with {decide_with:.1f}); chose {', '.join(f'{c.name} batch {c.batch} lr {c.lr:.3g}' for c in chosen)}")
    record = {"noise_scale": est.to_dict(), "decided_with": decide_with, "goodput": good.to_dict(),
              "configs": [asdict(c) for c in chosen]}
    return chosen, record


def smoothed(values: list[float]) -> list[float]:
    """Running mean of each point with its neighbours (validation on a few hundred
    images is noisy; a crossing should not hinge on one point)."""
    out = values[:1]  # the untrained model's point stays as measured
    for i in range(1, len(values)):
        window = values[max(1, i - 1) : i + 2]
        out.append(sum(window) / len(window))
    return out


def time_to(curve: list[dict], key: str, level: float) -> float | None:
    """Training seconds at which the smoothed curve first reaches ``level`` (linear
    interpolation between validation points), None if never."""
    times = [p["train_s"] for p in curve]
    values = smoothed([p[key] for p in curve])
    for i, v in enumerate(values):
        if v >= level:
            if i == 0:
                return times[0]
            v0, t0, t1 = values[i - 1], times[i - 1], times[i]
            return t0 + (level - v0) / (v - v0) * (t1 - t0) if v > v0 else t1
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=None, help="name=..,batch=..,precision=..,workers=..,lr=..,warmup=..")
    parser.add_argument("--shape", action="append", default=None, help="SIZExBITSxCHANNELS (default 32x8x32 and 32x16x16)")
    parser.add_argument("--minutes", type=float, default=6.0, help="training time per configuration")
    parser.add_argument("--segment-s", type=float, default=60.0)
    parser.add_argument("--val-images", type=int, default=256)
    parser.add_argument("--noise-batches", type=int, default=4, help="noise-scale measurements per seed segment")
    parser.add_argument("--noise-scale", type=float, default=None, help="use this B_noise instead of measuring")
    parser.add_argument("--choose", action="store_true",
                        help="measure candidates first and let the throughput and goodput objectives pick those two configurations")
    parser.add_argument("--candidates", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--choose-precision", default="bf16")
    parser.add_argument("--choose-s", type=float, default=30.0, help="timed training per candidate")
    parser.add_argument("--choose-noise-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", dest="json_out", default=None)
    parser.add_argument("--plot", default=None, help="write the curves to this PNG")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # The seed default's 4 workers on a 2-core machine are part of what is compared.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    configs = [RunConfig.parse(t) for t in (args.config or DEFAULT_CONFIGS)]
    if "seed" not in {c.name for c in configs}:
        raise SystemExit("error: one configuration must be named 'seed' (the baseline)")
    shapes = [parse_shape(s) for s in (args.shape or ["32x8x32", "32x16x16"])]
    results = []
    for model in shapes:
        shape = f"{model.image_size}x{model.message_bits}x{model.channels}"
        train_set, val_set, _ = build_datasets(None, model.image_size, model.message_bits, seed=args.seed)
        val_loader = make_loader(val_set, LoaderConfig(64, 0), EpochSampler(len(val_set), args.seed, 0, shuffle=False), False)
        shape_configs, choice = configs, None
        if args.choose:
            chosen, choice = choose_configs(model, train_set, val_loader, args)
            shape_configs = [c for c in configs if c.name not in ("throughput", "goodput")] + chosen
        runs = [Run(c, model, train_set, val_loader, args.val_images, args.seed) for c in shape_configs]
        noise = NoiseScale()
        budget = 60 * args.minutes
        segment = 0
        while any(r.train_s < budget - 1e-6 for r in runs):
            for run in runs:
                left = budget - run.train_s
                if left <= 1e-6:
                    continue
                run.train_for(min(args.segment_s, left))
                run.record()
                p = run.curve[-1]
                print(f"{shape} {run.cfg.name:12s} {p['train_s']:7.1f} s  step {p['steps']:5d}  "
                      f"{run.images_per_s:6.1f} img/s  bits {p['bit_accuracy']:.3f}  PSNR {p['psnr']:.2f}",
                      flush=True)
                if run.cfg.name == "seed" and args.noise_scale is None and args.noise_batches:
                    measure_noise(run, train_set, noise, args.noise_batches, seed=1000 + segment)
            segment += 1
        if args.noise_scale is not None:
            bn, bn_se = args.noise_scale, None
        else:
            est = noise.estimate()
            bn, bn_se = est.noise_scale, est.noise_scale_stderr
        seed_run = next(r for r in runs if r.cfg.name == "seed")
        start = seed_run.curve[0]["bit_accuracy"]  # every run starts from the same weights
        common = min(smoothed([p["bit_accuracy"] for p in r.curve])[-1] for r in runs)
        # Two levels of progress every run reached: half way from the untrained model to
        # the common accuracy, and the common accuracy itself.
        levels = {"half": start + 0.5 * (common - start), "common": common}
        base_goodput = seed_run.images_per_s * efficiency(seed_run.cfg.batch, REFERENCE_BATCH, bn)
        t_seed = {name: time_to(seed_run.curve, "bit_accuracy", level) for name, level in levels.items()}
        print(f"{shape}: generator noise scale {bn:.1f}" + (f" +- {bn_se:.1f}" if bn_se else "")
              + f"; bit accuracy untrained {start:.3f}, common {common:.3f}"
              + ("" if common > start + 0.01 else " (no common progress: observed speed-ups meaningless)"))
        rows = []
        for run in runs:
            e = efficiency(run.cfg.batch, REFERENCE_BATCH, bn)
            predicted = run.images_per_s * e / base_goodput
            observed = {}
            for name, level in levels.items():
                t = time_to(run.curve, "bit_accuracy", level)
                observed[name] = t_seed[name] / t if (t and t_seed[name]) else None
            final = run.curve[-1]
            rows.append({"config": asdict(run.cfg), "images_per_s": run.images_per_s, "efficiency": e,
                         "raw_ratio": run.images_per_s / seed_run.images_per_s,
                         "predicted_speedup": predicted, "observed_speedup": observed,
                         "final": final, "curve": run.curve})
            obs = ", ".join(f"{v:.2f}x to {levels[k]:.3f}" if v else f"- to {levels[k]:.3f}"
                            for k, v in observed.items())
            print(f"  {run.cfg.name:12s} batch {run.cfg.batch:3d} {run.cfg.precision}: "
                  f"{run.images_per_s:6.1f} img/s ({run.images_per_s / seed_run.images_per_s:.2f}x raw), "
                  f"E {e:.2f}, predicted {predicted:.2f}x, observed {obs}; "
                  f"final bits {final['bit_accuracy']:.3f} PSNR {final['psnr']:.2f}")
        results.append({"shape": shape, "choice": choice, "noise_scale": bn, "noise_scale_stderr": bn_se,
                        "untrained_bit_accuracy": start, "levels": levels, "runs": rows})
        del runs
    summary = {"args": vars(args), "torch": torch.__version__, "results": results}
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    if args.plot:
        plot(results, args.plot)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 7), squeeze=False)
    for col, result in enumerate(results):
        for row, key, label in ((0, "bit_accuracy", "validation bit accuracy"), (1, "psnr", "validation PSNR (dB)")):
            ax = axes[row][col]
            for run in result["runs"]:
                c = run["config"]
                ax.plot([p["train_s"] for p in run["curve"]], [p[key] for p in run["curve"]], "o-", ms=3,
                        label=f"{c['name']}: b{c['batch']} {c['precision']} w{c['workers']} lr {c['lr']:g}")
            if key == "bit_accuracy":
                for level in result["levels"].values():
                    ax.axhline(level, color="grey", linestyle=":", linewidth=1)
                ax.set_title(f"{result['shape']} (B_noise {result['noise_scale']:.0f})")
            ax.set_xlabel("training seconds (validation excluded)")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
