"""How well a trained model survives real attacks: the standard sweep, its measurement,
and its reports (rich table, CSV, PNG chart).

Every attack is a noise layer of :mod:`arwgan.noise`, written in its grammar, applied to
every image (no random choice between attacks). Images are centre crops of the model's
training size, so the numbers are comparable with training's validation; messages are
random per image, drawn from ``seed`` like the attacks' randomness, so a run repeats.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.table import Table

from arwgan.checkpoint import atomic_write_bytes
from arwgan.config import LoaderConfig, ModelConfig
from arwgan.data import EpochSampler, WatermarkDataset, list_images, find_image_files, make_loader
from arwgan.errors import DataError, UserError
from arwgan.evaluate import attack_keys, evaluate
from arwgan.noise import Noiser

#: (name, noise layer) of the standard sweep; "none" (no attack) is always measured first.
STANDARD_ATTACKS: tuple[tuple[str, str], ...] = (
    ("jpeg_q90", "jpegreal(90)"),
    ("jpeg_q70", "jpegreal(70)"),
    ("jpeg_q50", "jpegreal(50)"),
    ("jpeg_q30", "jpegreal(30)"),
    ("crop_0.5", "crop((0.5,0.5),(0.5,0.5))"),
    ("cropout_0.5", "cropout((0.5,0.5),(0.5,0.5))"),
    ("dropout_0.5", "dropout(0.5,0.5)"),
    ("resize_0.5", "resize(0.5,0.5)"),
    ("resize_0.75", "resize(0.75,0.75)"),
    ("resize_1.25", "resize(1.25,1.25)"),
    ("resize_1.5", "resize(1.5,1.5)"),
    ("blur_3_s1", "gaussian(3,1.0)"),
    ("noise_0.05", "gaussian_noise(0.05)"),
    ("salt_pepper_0.05", "salt_pepper(0.05)"),
    ("median_3", "median(3)"),
    ("brightness_0.7", "brightness(0.7)"),
    ("brightness_1.3", "brightness(1.3)"),
    ("contrast_0.7", "contrast(0.7)"),
    ("contrast_1.3", "contrast(1.3)"),
)
NO_ATTACK = "none"
CSV_NAME = "robustness.csv"
CHART_NAME = "robustness.png"
_SPLITS = (("train2017", "val2017"), ("train", "val"))


@dataclass
class AttackRow:
    """Bit accuracy under one attack, with the watermark's image quality (the encoded
    image, clamped to [-1, 1], against its cover, before any attack: the same on every row)."""

    attack: str
    noise: str
    bit_accuracy: float
    watermark_psnr_db: float
    watermark_ssim: float


def evaluate_robustness(
    nets,
    loader,
    device: torch.device,
    precision: str,
    attacks: tuple[tuple[str, str], ...] = STANDARD_ATTACKS,
    max_images: int | None = None,
    seed: int = 0,
) -> list[AttackRow]:
    """One row for "no attack" then one per attack, over the first ``max_images`` images.

    ``nets`` needs an ``encoder`` and a ``decoder`` (a :class:`arwgan.step.Networks`);
    it is left in the train/eval mode it came in.
    """
    names = [name for name, _ in attacks]
    if len(set(names)) != len(names) or NO_ATTACK in names:
        raise UserError(f"attack names must be unique and not {NO_ATTACK!r}: {names}")
    # One Noiser holding every attack; evaluate() applies each one to every image.
    noiser = Noiser("+".join(spec for _, spec in attacks), seed=seed)
    was_training = nets.training
    try:
        means = evaluate(
            nets, loader, device, precision, max_images=max_images, seed=seed, noiser=noiser
        )
    finally:
        nets.train(was_training)
    keys = attack_keys(noiser)
    if "psnr" not in means:
        raise DataError("no image to evaluate on")
    rows = []
    for (name, spec), key in zip([(NO_ATTACK, "identity"), *attacks], keys):
        rows.append(
            AttackRow(name, spec, means[f"bitacc_{key}"], means["psnr"], means["ssim"])
        )
    return rows


def evaluation_images(data_dir: str | Path) -> tuple[list[Path], str]:
    """The validation images of a COCO 2017 or HiDDeN folder, or every image of a flat
    folder (sorted), and a description. DataError when there are none."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"data folder '{root}' {state}")
    if any((root / train).is_dir() and (root / val).is_dir() for train, val in _SPLITS):
        _, files, layout = find_image_files(root)
        return files, f"{layout} validation images under {root}"
    files = list_images(root)
    if not files:
        raise DataError(f"no images found under '{root}'")
    return files, f"images under {root}"


def evaluation_loader(
    files: list[Path],
    model_cfg: ModelConfig,
    batch_size: int = 16,
    num_workers: int = 0,
    seed: int = 0,
):
    """Batches of (centre crop of the model's size, random message, skipped count)."""
    dataset = WatermarkDataset(files, model_cfg.image_size, model_cfg.message_bits, train=False)
    sampler = EpochSampler(len(dataset), seed=seed, epoch=0, shuffle=False)
    loader_cfg = LoaderConfig(batch_size=batch_size, num_workers=num_workers)
    return make_loader(dataset, loader_cfg, sampler, drop_last=False)


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------


def _write(path: str | Path, write) -> None:
    """Atomically (temporary file, then rename); UserError when it cannot be written."""
    try:
        atomic_write_bytes(path, write)
    except OSError as exc:
        raise UserError(f"cannot write '{path}': {exc.strerror or exc}") from None


def robustness_table(rows: list[AttackRow], images: int) -> Table:
    first = rows[0]
    table = Table(
        title=f"Bit accuracy under attack ({images} images)",
        caption=f"watermarked vs cover: PSNR {first.watermark_psnr_db:.2f} dB, "
        f"SSIM {first.watermark_ssim:.4f}",
    )
    table.add_column("attack")
    table.add_column("noise layer")
    table.add_column("bit accuracy", justify="right")
    for row in rows:
        accuracy = row.bit_accuracy
        colour = "green" if accuracy >= 0.9 else "yellow" if accuracy >= 0.7 else "red"
        table.add_row(row.attack, row.noise, f"[{colour}]{row.bit_accuracy:.4f}[/]")
    return table


def write_csv(rows: list[AttackRow], path: str | Path) -> None:
    """One row per attack: attack, noise, bit_accuracy, watermark_psnr_db, watermark_ssim."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(asdict(rows[0])), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        values = asdict(row)
        for key in ("bit_accuracy", "watermark_psnr_db", "watermark_ssim"):
            values[key] = round(values[key], 6) if math.isfinite(values[key]) else values[key]
        writer.writerow(values)
    data = buffer.getvalue().encode()
    _write(path, lambda fh: fh.write(data))


def write_chart(rows: list[AttackRow], path: str | Path, images: int) -> None:
    """A horizontal bar chart of bit accuracy per attack, as PNG.

    matplotlib is imported here, with the non-interactive Agg canvas and no pyplot, so
    it costs nothing unless a chart is drawn and never needs a display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 1.2 + 0.3 * len(rows)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    names = [row.attack for row in rows][::-1]
    values = [row.bit_accuracy for row in rows][::-1]
    bars = axes.barh(names, values, color="#4878a8")
    axes.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=3, fontsize=8)
    axes.axvline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    axes.set_xlim(0, 1.1)
    axes.set_xlabel("bit accuracy")
    axes.legend(loc="lower right", fontsize=8)
    first = rows[0]
    axes.set_title(
        f"{images} images; watermark PSNR {first.watermark_psnr_db:.2f} dB, "
        f"SSIM {first.watermark_ssim:.4f}",
        fontsize=10,
    )
    _write(path, lambda fh: figure.savefig(fh, format="png", dpi=120))
