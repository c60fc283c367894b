"""Train a small ARWGAN on the CPU under several option sets and print each one's
learning curve: bit accuracy and PSNR per 1,000 images seen, and per minute.

    python benchmarks/train_cpu.py --minutes 5          # official default beside the best
    python benchmarks/train_cpu.py --images 20000 --variants official,unit_ssim,zero_mean
    python benchmarks/train_cpu.py --minutes 5 --photos auto   # on real photographs too

Every variant trains the same model (32x32, 8 bits, 32 channels, batch 8 by default) from the
same seed on the same stream of crops; only the option set differs. ``official`` is
what arwgan-train does with no flags (official SSIM loss form, discriminator every
step); the others switch on one improvement each, ``best`` the combination kept.
Compare variants by IMAGES SEEN when the CPU is shared (that axis does not depend on
the load); the per-minute column only means something on a quiet machine.

Data: the built-in synthetic set (``~/.cache/arwgan``), or with ``--photos DIR`` the
photographs in DIR: the last two files (sorted by name) are kept aside for
validation, random crops of the others (at full and half size) train. ``--photos
auto`` uses the six colour photographs that scikit-image ships, when it is installed
(``pip install scikit-image``; nothing is downloaded): chelsea and rocket validate. Validation is a fixed set of
crops and messages, scored with BatchNorm in eval mode (what a user of the checkpoint
gets) and, as a check on early training, in train mode.

The training noise (``--noise``, default: identity only) is the same for every
variant; after training, the best run is also scored under each attack of the
official set and a few real ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from arwgan.config import OFFICIAL_NOISE, LossWeights, ModelConfig, OptimConfig
from arwgan.evaluate import evaluate
from arwgan.metrics import bit_accuracy_per_image, psnr_per_image
from arwgan.noise import Noiser
from arwgan.step import GANStep
from arwgan.synthetic import ensure_synthetic_dataset

EVAL_ATTACKS = (
    OFFICIAL_NOISE + "+cropout((0.25,0.25),(0.25,0.25))+jpegreal(90)+jpegreal(50)"
    "+gaussian_noise(0.02)"
)
#: Colour photographs among scikit-image's bundled data files (skimage/data); the last
#: two are kept aside for validation (the two motorcycle views, a stereo pair, must stay
#: on the same side).
SKIMAGE_PHOTOS = (
    "astronaut.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png",
    "chelsea.png", "rocket.jpg",
)


@dataclass(frozen=True)
class Variant:
    """One option set: model-config and optimiser fields changed from the defaults."""

    name: str
    model: dict = field(default_factory=dict)
    optim: dict = field(default_factory=dict)
    what: str = ""
    decay: bool = False
    """Both learning rates fall linearly to 10 % of their value over the run's budget
    (minutes or images): a short run spends its end refining rather than moving."""


VARIANTS = {
    v.name: v
    for v in (
        Variant("official", what="arwgan-train defaults: official SSIM form, D every step"),
        Variant("unit_ssim", {"ssim_loss": "unit"}, what="SSIM on [0, 1], valid (our old loss)"),
        Variant("zero_mean", {"residual_zero_mean": True}, what="residual without its mean"),
        Variant("jitter", {"decoder_jitter": 0.1}, what="colour offset +-0.1 before decoding"),
        Variant("d_every4", optim={"d_every": 4}, what="discriminator every 4th step"),
        Variant("no_d", {"weights": {"adversarial": 0.0}}, what="no discriminator"),
        Variant(
            "best",
            {"residual_zero_mean": True, "weights": {"adversarial": 0.0}},
            what="zero_mean + no discriminator",
        ),
        Variant(
            "best_decay",
            {"residual_zero_mean": True, "weights": {"adversarial": 0.0}},
            decay=True,
            what="best with the learning rates decayed linearly to 10 % over the run",
        ),
        Variant(
            "best_low_mse",
            {"residual_zero_mean": True, "weights": {"adversarial": 0.0, "image_mse": 0.2}},
            what="best with the image MSE weight 0.7 -> 0.2",
        ),
        Variant(
            "best_lr3",
            {"residual_zero_mean": True, "weights": {"adversarial": 0.0}},
            optim={"lr_g": 3e-3},
            what="best with the generator's learning rate 1e-3 -> 3e-3",
        ),
        Variant(
            "best_lr3_low_mse",
            {"residual_zero_mean": True, "weights": {"adversarial": 0.0, "image_mse": 0.2}},
            optim={"lr_g": 3e-3},
            what="best with lr_g 3e-3 and image MSE weight 0.2",
        ),
    )
}


# --- data ------------------------------------------------------------------------------


def _load(path: Path, scales: tuple[float, ...]) -> list[torch.Tensor]:
    image = Image.open(path).convert("RGB")
    out = []
    for scale in scales:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        resized = image if scale == 1 else image.resize(size, Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1))
    return out


def photo_files(spec: str) -> list[Path]:
    if spec == "auto":
        found = importlib.util.find_spec("skimage")
        if found is None or not found.submodule_search_locations:
            raise SystemExit("--photos auto needs scikit-image (pip install scikit-image)")
        folder = Path(list(found.submodule_search_locations)[0]) / "data"
        return [folder / name for name in SKIMAGE_PHOTOS if (folder / name).is_file()]
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
    return sorted(p for p in Path(spec).iterdir() if p.suffix.lower() in suffixes)


def image_pools(photos: str | None, size: int) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    """(train images, val images, description) as uint8 (3, H, W) tensors, each at least
    ``size`` pixels a side."""
    if photos:
        files = photo_files(photos)
        if len(files) < 3:
            raise SystemExit(f"--photos {photos}: need at least 3 images, found {len(files)}")
        train = [t for f in files[:-2] for t in _load(f, (1.0, 0.5))]
        val = [t for f in files[-2:] for t in _load(f, (1.0, 0.5))]
        description = f"photographs ({len(files) - 2} train, {len(files[-2:])} val: " \
            f"{', '.join(f.name for f in files[-2:])})"
    else:
        root = ensure_synthetic_dataset()
        train = [_load(p, (1.0,))[0] for p in sorted((root / "train").rglob("*.jpg"))]
        val = [_load(p, (1.0,))[0] for p in sorted((root / "val").rglob("*.jpg"))]
        description = f"synthetic set {root.name}"
    keep = [t for t in train if min(t.shape[1:]) >= size]
    keep_val = [t for t in val if min(t.shape[1:]) >= size]
    return keep, keep_val, description


def random_crops(pool: list[torch.Tensor], count: int, size: int, generator) -> torch.Tensor:
    """``count`` random crops in [-1, 1], each from an image drawn with probability
    proportional to its area (so a big photograph gives more crops than a small one)."""
    areas = torch.tensor([float(t.shape[1] * t.shape[2]) for t in pool])
    picks = torch.multinomial(areas, count, replacement=True, generator=generator)
    crops = []
    for index in picks.tolist():
        image = pool[index]
        top = int(torch.randint(image.shape[1] - size + 1, (), generator=generator))
        left = int(torch.randint(image.shape[2] - size + 1, (), generator=generator))
        crops.append(image[:, top : top + size, left : left + size])
    return torch.stack(crops).float() / 127.5 - 1


# --- one run ---------------------------------------------------------------------------


@dataclass
class Point:
    images: int
    train_s: float
    bitacc: float
    psnr: float
    bitacc_train_bn: float
    flat_share: float
    """Share of the watermark's energy (encoded - cover) in its per-image, per-channel
    mean: a flat colour shift, which a crop or a colour change of the photo defeats."""


def _score(gan: GANStep, images, messages, precision_ctx) -> tuple[float, float, float]:
    nets = gan.nets
    with torch.no_grad(), precision_ctx():
        encoded = nets.encoder(images, messages).float().clamp(-1, 1)
        decoded = nets.decoder(encoded)
    residual = encoded - images
    flat = residual.mean(dim=(2, 3)).pow(2).sum() / residual.pow(2).mean(dim=(2, 3)).sum()
    return (float(bit_accuracy_per_image(decoded, messages).mean()),
            float(psnr_per_image(encoded, images).mean()), float(flat))


def train_variant(variant: Variant, args, train_pool, val_images, val_messages) -> tuple[list[Point], GANStep]:
    weights = {**LossWeights().__dict__, **variant.model.get("weights", {})}
    model_fields = {k: v for k, v in variant.model.items() if k != "weights"}
    model_cfg = ModelConfig(
        image_size=args.image_size, message_bits=args.message_bits, channels=args.channels,
        noise=args.noise, weights=LossWeights(**weights), **model_fields,
    )
    optim_cfg = OptimConfig(**{"lr_g": args.lr, "lr_d": args.lr, **variant.optim})
    gan = GANStep(model_cfg, optim_cfg, args.precision, torch.device("cpu"), seed=args.seed)
    data_rng = torch.Generator().manual_seed(args.seed)
    precision_ctx = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if args.precision == "bf16" else torch.enable_grad
    )
    points: list[Point] = []
    seen, train_s, next_eval = 0, 0.0, args.eval_every
    budget_s = args.minutes * 60 if args.minutes else math.inf
    budget_images = args.images or math.inf
    if variant.decay:
        base_set_lr = gan._set_lr

        def decayed_lr() -> None:
            base_set_lr()
            done = max(train_s / budget_s if math.isfinite(budget_s) else 0.0,
                       seen / budget_images if math.isfinite(budget_images) else 0.0)
            factor = 1.0 - 0.9 * min(1.0, done)
            for group in (*gan.opt_g.param_groups, *gan.opt_d.param_groups):
                group["lr"] *= factor

        gan._set_lr = decayed_lr
    while seen < budget_images and train_s < budget_s:
        images = random_crops(train_pool, args.batch, args.image_size, data_rng)
        messages = torch.randint(0, 2, (args.batch, args.message_bits), generator=data_rng).float()
        start = time.perf_counter()
        gan(images, messages)
        train_s += time.perf_counter() - start
        seen += args.batch
        if seen >= next_eval or seen >= budget_images or train_s >= budget_s:
            next_eval += args.eval_every
            gan.nets.eval()
            bitacc, psnr, flat = _score(gan, val_images, val_messages, precision_ctx)
            gan.nets.train()
            # Train-mode BatchNorm normalises with this batch's statistics; scoring in
            # it also updates the running statistics, so put them back afterwards.
            saved = {k: v.clone() for k, v in gan.nets.state_dict().items() if "running" in k or "num_batches" in k}
            bitacc_train_bn, _, _ = _score(gan, val_images, val_messages, precision_ctx)
            gan.nets.load_state_dict(saved, strict=False)
            points.append(Point(seen, train_s, bitacc, psnr, bitacc_train_bn, flat))
            if args.verbose:
                print(f"  {variant.name}: {seen} images, {train_s:.0f} s, bits {bitacc:.3f} "
                      f"(train-mode BN {bitacc_train_bn:.3f}), PSNR {psnr:.2f} dB, flat "
                      f"share {flat:.2f}", flush=True)
    return points, gan


def at_images(points: list[Point], images: int) -> Point | None:
    """The last point at or before ``images`` images seen."""
    before = [p for p in points if p.images <= images]
    return before[-1] if before else None


def at_seconds(points: list[Point], seconds: float) -> Point | None:
    before = [p for p in points if p.train_s <= seconds]
    return before[-1] if before else None


def _cell(point: Point | None) -> str:
    return "-" if point is None else f"{point.bitacc:.3f} / {point.psnr:5.2f}"


def print_curves(runs: dict[str, list[Point]], step_images: int) -> None:
    names = list(runs)
    print(f"\nper {step_images:,} images seen: bit accuracy / PSNR dB (eval-mode BN, no attack)")
    print("| images | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    # Every variant sees the same batches, so the points fall at the same counts.
    for images in sorted({p.images for pts in runs.values() for p in pts}):
        row = [_cell(at_images(runs[n], images)) for n in names]
        print(f"| {images} | " + " | ".join(row) + " |")
    print("\nper minute of training (CPU time of the steps; only meaningful on a quiet machine)")
    print("| minute | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    longest = max(p.train_s for pts in runs.values() for p in pts)
    for minute in range(1, math.ceil(longest / 60) + 1):
        row = [_cell(at_seconds(runs[n], minute * 60)) for n in names]
        print(f"| {minute} | " + " | ".join(row) + " |")
    print("\nfinal point: images, seconds, bits (eval BN), bits (train BN), PSNR, flat share")
    for name in names:
        p = runs[name][-1]
        print(f"  {name:10s} {p.images:7d} {p.train_s:7.0f} s  {p.bitacc:.3f}  "
              f"{p.bitacc_train_bn:.3f}  {p.psnr:5.2f} dB  {p.flat_share:.2f}  "
              f"({VARIANTS[name].what})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=None,
                        help="training time per variant (default 5 unless --images is given)")
    parser.add_argument("--images", type=int, default=None, help="images per variant instead")
    parser.add_argument("--variants", default="official,best",
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--message-bits", type=int, default=8)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8,
                        help="default 8: the goodput tuner's pick for this model (noise scale 0.2-5 images)")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--noise", default="", help="training noise of every variant")
    parser.add_argument("--photos", default=None, help="folder of photographs, or 'auto'")
    parser.add_argument("--eval-every", type=int, default=1000, help="images between points")
    parser.add_argument("--val-images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--no-attacks", action="store_true", help="skip the attack table")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the curves here")
    args = parser.parse_args()
    if args.minutes is None and args.images is None:
        args.minutes = 5.0
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")

    train_pool, val_pool, description = image_pools(args.photos, args.image_size)
    val_rng = torch.Generator().manual_seed(12345)
    val_images = random_crops(val_pool, args.val_images, args.image_size, val_rng)
    val_messages = torch.randint(0, 2, (args.val_images, args.message_bits), generator=val_rng).float()
    budget = f"{args.minutes} min" if args.minutes else f"{args.images} images"
    print(f"data: {description}; {args.image_size}px, {args.message_bits} bits, "
          f"{args.channels} channels, batch {args.batch}, {args.precision}, noise "
          f"{args.noise or 'identity'}; {budget} per variant; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)

    runs: dict[str, list[Point]] = {}
    gans: dict[str, GANStep] = {}
    for name in names:
        print(f"training {name}: {VARIANTS[name].what}", flush=True)
        runs[name], gans[name] = train_variant(VARIANTS[name], args, train_pool, val_images, val_messages)
    print_curves(runs, args.eval_every)
    print("\ntarget: >= 95 % bits at >= 28 dB PSNR (issue 13)")
    for name in names:
        hit = next((p for p in runs[name] if p.bitacc >= 0.95 and p.psnr >= 28), None)
        verdict = (f"met at {hit.images} images, {hit.train_s:.0f} s" if hit
                   else f"not met (last: {runs[name][-1].bitacc:.3f} at {runs[name][-1].psnr:.2f} dB)")
        print(f"  {name}: {verdict}")

    best = max(names, key=lambda n: (runs[n][-1].psnr >= 28, runs[n][-1].bitacc))
    if not args.no_attacks:
        noiser = Noiser(EVAL_ATTACKS, seed=0)
        batches = [(val_images[i : i + 64], val_messages[i : i + 64])
                   for i in range(0, args.val_images, 64)]
        metrics = evaluate(gans[best].nets, batches, torch.device("cpu"), args.precision,
                           seed=0, noiser=noiser)
        print(f"\nrobustness of {best} (trained with noise {args.noise or 'identity'}): "
              f"PSNR {metrics['psnr']:.2f} dB, SSIM [0,1] {metrics['ssim']:.4f}")
        print("| attack | bit accuracy |\n|---|---|")
        for key, value in metrics.items():
            if key.startswith("bitacc_"):
                print(f"| {key.removeprefix('bitacc_')} | {value:.3f} |")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(
            {"args": vars(args), "data": description,
             "curves": {n: [p.__dict__ for p in pts] for n, pts in runs.items()}}, indent=2))


if __name__ == "__main__":
    main()
