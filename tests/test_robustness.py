"""The robustness sweep: its attacks, ``evaluate_robustness`` and ``arwgan eval``'s reports."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from arwgan.app import group
from arwgan.config import ModelConfig
from arwgan.errors import DataError, UserError
from arwgan.noise import parse_noise
from arwgan.robustness import (
    NO_ATTACK,
    STANDARD_ATTACKS,
    evaluate_robustness,
    evaluation_images,
    evaluation_loader,
)
from arwgan.step import Networks
from arwgan.synthetic import synthetic_image

CPU = torch.device("cpu")


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_standard_sweep_covers_the_real_attacks() -> None:
    names = [name for name, _ in STANDARD_ATTACKS]
    assert len(set(names)) == len(names) and NO_ATTACK not in names
    specs = [spec for _, (spec,) in ((n, parse_noise(s)) for n, s in STANDARD_ATTACKS)]
    assert [str(s) for s in specs if s.name == "jpegreal"] == [
        "jpegreal(90)", "jpegreal(70)", "jpegreal(50)", "jpegreal(30)"
    ]
    assert sorted(s.args[0] for s in specs if s.name == "resize") == [0.5, 0.75, 1.25, 1.5]
    kinds = {s.name for s in specs}
    assert kinds == {
        "jpegreal", "crop", "cropout", "dropout", "resize", "gaussian", "gaussian_noise",
        "salt_pepper", "median", "brightness", "contrast",
    }


def test_arwgan_eval_writes_every_attack_to_csv_and_a_chart(
    trained_checkpoint: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    result = CliRunner().invoke(group, [
        "eval", "--checkpoint", str(trained_checkpoint), "--data-dir", str(tiny_data_dir),
        "--out", str(out), "--workers", "0", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert "Bit accuracy under attack (16 images)" in result.stderr
    assert "jpeg_q30" in result.stderr and "salt_pepper(0.05)" in result.stderr

    rows = read_rows(out / "robustness.csv")
    assert [r["attack"] for r in rows] == [NO_ATTACK, *(name for name, _ in STANDARD_ATTACKS)]
    assert [r["noise"] for r in rows] == ["identity", *(spec for _, spec in STANDARD_ATTACKS)]
    for row in rows:
        assert 0 <= float(row["bit_accuracy"]) <= 1
        assert math.isfinite(float(row["watermark_psnr_db"]))
        assert -1 <= float(row["watermark_ssim"]) <= 1
    # The same images, messages and computation as training's validation.
    with (trained_checkpoint.parent / "log.csv").open(newline="") as fh:
        last = list(csv.DictReader(fh))[-1]
    none = rows[0]
    assert float(none["bit_accuracy"]) == pytest.approx(float(last["val_bitacc_identity"]), abs=1e-5)
    assert float(none["watermark_psnr_db"]) == pytest.approx(float(last["val_psnr"]), abs=1e-4)
    # Heavy attacks hurt: cropping half of each side leaves a quarter of the image, black.
    accuracy = {r["attack"]: float(r["bit_accuracy"]) for r in rows}
    assert accuracy["crop_0.5"] < accuracy[NO_ATTACK]

    chart = out / "robustness.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.size[0] > 400
    assert sorted(p.name for p in out.iterdir()) == ["robustness.csv", "robustness.png"]


def test_eval_without_matplotlib_still_writes_the_csv(
    trained_checkpoint: Path, tiny_data_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    out = tmp_path / "eval"
    result = CliRunner().invoke(group, [
        "eval", "-c", str(trained_checkpoint), "--data-dir", str(tiny_data_dir / "val"),
        "--out", str(out), "--workers", "0", "--max-images", "3", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert "warning: matplotlib is not installed: no chart (pip install 'arwgan-autotune[plot]')" \
        in result.stderr
    assert "(3 images)" in result.stderr
    assert [p.name for p in out.iterdir()] == ["robustness.csv"]


@pytest.fixture
def tiny_loader(tiny_data_dir: Path):
    cfg = ModelConfig(image_size=16, message_bits=4, channels=4, noise="")
    files, _ = evaluation_images(tiny_data_dir)
    return cfg, evaluation_loader(files[:4], cfg, batch_size=2)


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_robustness_rows_and_mode(tiny_loader, training: bool) -> None:
    cfg, loader = tiny_loader
    nets = Networks(cfg, noise_seed=0).train(training)
    attacks = (("half", "crop((0.5,0.5),(0.5,0.5))"), ("dark", "brightness(0.5)"))
    rows = evaluate_robustness(nets, loader, CPU, "fp32", attacks, max_images=3)
    assert [(r.attack, r.noise) for r in rows] == [
        (NO_ATTACK, "identity"), ("half", "crop((0.5,0.5),(0.5,0.5))"), ("dark", "brightness(0.5)")
    ]
    assert len({(r.watermark_psnr_db, r.watermark_ssim) for r in rows}) == 1
    assert all(r.bit_accuracy * 12 == pytest.approx(round(r.bit_accuracy * 12)) for r in rows)
    assert nets.training is training


def test_evaluate_robustness_refuses_ambiguous_names(tiny_loader) -> None:
    cfg, loader = tiny_loader
    nets = Networks(cfg, noise_seed=0)
    for attacks in ((("a", "median(3)"), ("a", "median(5)")), ((NO_ATTACK, "median(3)"),)):
        with pytest.raises(UserError, match="attack names must be unique"):
            evaluate_robustness(nets, loader, CPU, "fp32", attacks)


def test_evaluation_images_by_layout(tiny_data_dir: Path, tmp_path: Path) -> None:
    files, description = evaluation_images(tiny_data_dir)
    assert len(files) == 16 and all(f.parent.parent.name == "val" for f in files)
    assert "HiDDeN validation images" in description
    flat = tmp_path / "flat"
    (flat / "deep").mkdir(parents=True)
    synthetic_image(0, size=20).save(flat / "deep" / "one.png")
    files, _ = evaluation_images(flat)  # a single image is enough to evaluate
    assert files == [flat / "deep" / "one.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found under"):
        evaluation_images(tmp_path / "empty")
    with pytest.raises(DataError, match="missing' does not exist"):
        evaluation_images(tmp_path / "missing")
