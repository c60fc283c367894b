"""Using a trained model: messages, tiling, embed/extract on files of any size and mode, the
``arwgan`` command group (embed, extract, train) and its one-line errors."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from arwgan.app import group, main
from arwgan.checkpoint import load_checkpoint, save_checkpoint
from arwgan.config import ModelConfig
from arwgan.console import EXIT_USAGE, run_typer
from arwgan.errors import CheckpointError, UserError
from arwgan.inference import (
    TileGrid,
    Watermarker,
    _reflect_indices,
    decode_message,
    embed_file,
    extract_file,
    format_bits,
    load_watermarker,
    parse_message,
    read_image,
)
from arwgan.synthetic import synthetic_image
from helpers import assert_one_error_line

CPU = torch.device("cpu")


def photo(path: Path, width: int, height: int, index: int = 0, mode: str = "RGB", **save) -> Path:
    """A synthetic photo-like image of exactly width x height, saved to ``path``."""
    image = synthetic_image(index, size=max(width, height) + 8).crop((0, 0, width, height))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert(mode).save(path, **save)
    return path



def invoke(*args: str):
    return CliRunner().invoke(group, [str(arg) for arg in args])


def val_bit_accuracy(checkpoint: Path) -> float:
    with (checkpoint.parent / "log.csv").open(newline="") as fh:
        return float(list(csv.DictReader(fh))[-1]["val_bitacc_identity"])


# -- messages ----------------------------------------------------------------------------


def test_bit_string_of_the_model_length_is_bits() -> None:
    assert parse_message("0110", 4).tolist() == [0.0, 1.0, 1.0, 0.0]
    assert parse_message("1" * 30, 30).tolist() == [1.0] * 30


def test_text_is_utf8_msb_first_zero_padded_and_decodes_back() -> None:
    bits = parse_message("hi", 30)
    assert format_bits(bits) == "01101000" + "01101001" + "0" * 14
    assert decode_message(bits) == "hi"
    assert decode_message(parse_message("é", 16)) == "é"  # two UTF-8 bytes
    assert decode_message(parse_message("01a1", 32)) == "01a1"  # not only 0/1: text


@pytest.mark.parametrize(
    ("message", "bits", "fragment"),
    [
        ("hello", 30, 'message "hello" needs 40 bits; this model carries 30 (3 characters)'),
        ("hi", 4, 'message "hi" needs 16 bits; this model carries 4 (0 characters)'),
        ("01a1", 4, 'message "01a1" needs 32 bits; this model carries 4'),
        ("010", 4, "bit string has 3 bits; this model carries 4 (give exactly 4 digits 0/1"),
        ("0" * 31, 30, "bit string has 31 bits; this model carries 30"),
        ("", 4, "the message is empty"),
        ("a\nb" * 30, 8, 'message "a\\nba\\nb'),  # quoted on one line, shortened
    ],
)
def test_bad_messages_name_the_capacity(message: str, bits: int, fragment: str) -> None:
    with pytest.raises(UserError) as info:
        parse_message(message, bits)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bits", ["0000", "1011", "0110000", "01100001" + "1", "11111111"])
def test_decode_message_refuses_what_is_not_text(bits: str) -> None:
    # all zero; too short for a byte; a non-zero tail; an invalid UTF-8 byte.
    assert decode_message(torch.tensor([float(c) for c in bits])) is None


# -- tiling ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(37, 50), (16, 16), (5, 3), (1, 1), (33, 17)])
def test_tiles_join_back_exactly(size: tuple[int, int]) -> None:
    image = torch.rand(3, *size)
    grid = TileGrid(*size, tile=16)
    tiles = grid.split(image)
    assert tiles.shape == (grid.rows * grid.cols, 3, 16, 16)
    assert torch.equal(grid.join(tiles), image)
    assert torch.equal(tiles[0, :, : min(16, size[0]), : min(16, size[1])],
                       image[:, :16, :16])


def test_padding_mirrors_and_weights_count_real_pixels() -> None:
    assert _reflect_indices(3, 9, CPU).tolist() == [0, 1, 2, 1, 0, 1, 2, 1, 0]
    assert _reflect_indices(1, 4, CPU).tolist() == [0, 0, 0, 0]
    grid = TileGrid(20, 40, tile=16)  # 2 x 3 tiles: rows of 16 and 4, columns 16, 16, 8
    expected = torch.tensor([16 * 16, 16 * 16, 16 * 8, 4 * 16, 4 * 16, 4 * 8]) / 256
    assert torch.allclose(grid.real_fraction(CPU), expected)


class FakeNets(nn.Module):
    """An encoder that adds 0.1 and a decoder that returns fixed outputs per tile."""

    def __init__(self, outputs: torch.Tensor) -> None:
        super().__init__()
        self.outputs = outputs
        self.encoder = lambda tiles, message: tiles + 0.1
        self.decoder = lambda tiles: self.outputs[: tiles.shape[0]]


def fake_marker(outputs: torch.Tensor) -> Watermarker:
    cfg = ModelConfig(image_size=16, message_bits=outputs.shape[1], channels=4, noise="")
    return Watermarker(FakeNets(outputs), cfg, CPU, tile_batch=2)


def test_confidence_is_the_margin_of_the_weighted_mean_output() -> None:
    # One tile: bits from output > 0.5, confidence min(1, 2 |output - 0.5|).
    marker = fake_marker(torch.tensor([[0.9, 0.5, 0.1, 1.7]]))
    bits, confidence = marker.extract(np.zeros((16, 16, 3), np.uint8))
    assert bits.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert torch.allclose(confidence, torch.tensor([0.8, 0.0, 0.8, 1.0]))
    # Two tiles of a 16 x 24 image, the second half padding: weights 1 and 0.5.
    marker = fake_marker(torch.tensor([[1.0, 0.0, 0.8, 0.2], [0.0, 1.0, 0.2, 0.2]]))
    bits, confidence = marker.extract(np.zeros((16, 24, 3), np.uint8))
    mean = torch.tensor([2 / 3, 1 / 3, 0.6, 0.2])
    assert bits.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert torch.allclose(confidence, 2 * (mean - 0.5).abs())


def test_embed_adds_the_residual_at_full_resolution_and_keeps_the_kind() -> None:
    marker = fake_marker(torch.zeros(1, 4))
    pixels = np.full((21, 35, 3), 100, np.uint8)
    marked = marker.embed(pixels, "0101")
    assert marked.dtype == np.uint8 and marked.shape == pixels.shape
    assert (marked == 113).all()  # 100 + 0.1 * 127.5, rounded
    tensor = torch.full((3, 21, 35), 0.95)
    out = marker.embed(tensor, torch.tensor([0, 1, 0, 1]))
    assert out.shape == tensor.shape and out.max() == 1.0  # clamped to [-1, 1]
    with pytest.raises(UserError, match="message has 3 bits; this model carries 4"):
        marker.embed(tensor, torch.tensor([0, 1, 0]))


def test_one_tile_embed_is_the_encoder_output(trained_checkpoint: Path) -> None:
    marker = load_watermarker(trained_checkpoint, "cpu")
    image = torch.rand(3, 16, 16) * 2 - 1
    message = torch.tensor([1.0, 0.0, 0.0, 1.0])
    with torch.no_grad():
        expected = marker.nets.encoder(image[None], message[None])[0].clamp(-1, 1)
    assert torch.allclose(marker.embed(image, message), expected, atol=1e-5)
    assert not marker.nets.training


# -- the trained model on files -----------------------------------------------------------


SIZES = [(50, 37), (37, 50), (23, 31), (64, 48), (16, 16), (41, 29)]


def test_extract_recovers_bits_about_as_well_as_validation(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    """12 files of other sizes than the model's 16 px, PNG and JPEG 95, random messages:
    the bit accuracy after embed -> file -> extract is about what validation measured.

    Measured: 0.65 over such files against validation's 0.78 on 16 px centre crops (the
    photos here are unlike the synthetic training set, and JPEG 95 costs this tiny model).
    """
    marker = load_watermarker(trained_checkpoint, "cpu")
    generator = torch.Generator().manual_seed(1)
    correct, total = 0, 0
    for index, (width, height) in enumerate(SIZES * 2):
        suffix = ".png" if index % 2 == 0 else ".jpg"
        source = photo(tmp_path / f"in{index}{suffix}", width, height, index=20 + index)
        message = torch.randint(0, 2, (4,), generator=generator).float()
        result = embed_file(marker, source, tmp_path / f"out{index}{suffix}", message)
        assert (result.width, result.height) == (width, height)
        extracted = extract_file(marker, result.target)
        correct += int((extracted.bits == message).sum())
        total += 4
    accuracy = correct / total
    assert accuracy >= 0.6
    assert accuracy >= val_bit_accuracy(trained_checkpoint) - 0.2


def test_cli_keeps_size_and_format_and_extract_prints_bits(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    png = photo(tmp_path / "a.png", 50, 37, index=1)
    jpg = photo(tmp_path / "b.jpg", 45, 29, index=2, quality=90)
    for source, fmt in ((png, "PNG"), (jpg, "JPEG")):
        target = tmp_path / "out" / source.name
        result = invoke("embed", "-c", trained_checkpoint, "-m", "1001", source, target)
        assert result.exit_code == 0, result.output
        assert f"wrote {target}" in result.stderr and "PSNR" in result.stderr
        with Image.open(target) as written, Image.open(source) as original:
            assert (written.format, written.size, written.mode) == (fmt, original.size, "RGB")

        result = invoke("extract", "-c", trained_checkpoint, target)
        assert result.exit_code == 0, result.output
        path, bits, word, *confidence = result.stdout.split()
        library = extract_file(load_watermarker(trained_checkpoint, "cpu"), target)
        assert (path, bits, word) == (str(target), format_bits(library.bits), "confidence")
        expected = library.confidence.tolist()
        assert [float(c) for c in confidence] == pytest.approx(expected, abs=0.006)

        result = invoke("extract", "-c", trained_checkpoint, "--json", target)
        record = json.loads(result.stdout)
        assert record["bits"] == bits and len(record["confidence"]) == 4
        assert all(0 <= c <= 1 for c in record["confidence"]) and record["text"] is None


def test_cli_extract_returns_the_message_cli_embed_hid(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    """Through the commands alone: four messages (every bit 0 twice and 1 twice), each
    embedded into the same six photos, then extracted. The bits printed match the bits
    embedded about as well as validation measured, far above chance (0.5), and a 1 is
    read far more often where a 1 was hidden than where a 0 was (a model this small
    still gets single positions wrong on some photos)."""
    source = tmp_path / "in"
    for index in range(6):
        photo(source / f"p{index}.png", 32, 24, index=40 + index)
    messages = ["1001", "0110", "1100", "0011"]
    ones = torch.zeros(2, 4)  # [hidden bit, position] -> times read as 1
    correct = total = 0
    for message in messages:
        target = tmp_path / f"out{message}"
        result = invoke("embed", "-c", trained_checkpoint, "-m", message, source, target)
        assert result.exit_code == 0, result.output
        result = invoke("extract", "-c", trained_checkpoint, "--json", target)
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(records) == 6
        for record in records:
            for position, (hidden, read) in enumerate(zip(message, record["bits"])):
                correct += hidden == read
                total += 1
                ones[int(hidden), position] += read == "1"
    accuracy = correct / total
    assert accuracy >= 0.65, accuracy
    assert accuracy >= val_bit_accuracy(trained_checkpoint) - 0.12, accuracy
    assert ones[1].sum() >= ones[0].sum() + 12, ones  # of 48 each


def test_cli_jpeg_quality_and_format_by_suffix(trained_checkpoint: Path, tmp_path: Path) -> None:
    source = photo(tmp_path / "a.png", 40, 30)
    sizes = {}
    for quality in (30, 95):
        target = tmp_path / f"q{quality}.jpeg"
        result = invoke("embed", "-c", trained_checkpoint, "-m", "0110", "--quality", quality,
                        source, target)
        assert result.exit_code == 0, result.output
        sizes[quality] = target.stat().st_size
        with Image.open(target) as image:
            assert image.format == "JPEG" and image.size == (40, 30)
    assert sizes[30] < sizes[95]


def test_grey_and_transparent_images_keep_their_mode(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    grey = photo(tmp_path / "grey.png", 30, 20, mode="L")
    rgba = tmp_path / "rgba.png"
    image = synthetic_image(3, size=40).crop((0, 0, 33, 25)).convert("RGBA")
    alpha = np.tile(np.arange(33, dtype=np.uint8) * 7, (25, 1))
    image.putalpha(Image.fromarray(alpha, "L"))
    image.save(rgba)
    expected = {
        (grey, "grey.png"): "L",
        (grey, "grey.jpg"): "L",
        (rgba, "rgba.png"): "RGBA",
        (rgba, "rgba.jpg"): "RGB",  # JPEG holds no alpha
    }
    for (source, name), mode in expected.items():
        target = tmp_path / "out" / name
        result = invoke("embed", "-c", trained_checkpoint, "-m", "1100", source, target)
        assert result.exit_code == 0, result.output
        with Image.open(target) as written, Image.open(source) as original:
            assert (written.mode, written.size) == (mode, original.size)
            if mode == "RGBA":
                assert np.array_equal(np.asarray(written)[..., 3], alpha)
            pixels = np.asarray(written.convert("RGB")).astype(int)
            assert np.abs(pixels - np.asarray(original.convert("RGB"))).mean() < 30
    assert read_image(tmp_path / "out" / "grey.png").grey


def test_batch_mode_mirrors_folders_and_skips_unreadable_files(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    source = tmp_path / "in"
    photo(source / "a.png", 30, 20, index=1)
    photo(source / "sub" / "b.jpg", 20, 30, index=2)
    photo(source / ".hidden" / "c.png", 20, 20, index=3)
    (source / "sub" / "broken.png").write_bytes(b"\x89PNG not really")
    (source / "notes.txt").write_text("not an image")
    target = tmp_path / "out"
    result = invoke("embed", "-c", trained_checkpoint, "-m", "0011", source, target)
    assert result.exit_code == EXIT_USAGE
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("warning: image ") and "broken.png' is unreadable" in lines[0]
    assert lines[1] == f"watermarked 2 image(s) into {target}, message 0011"
    assert lines[2] == "error: 1 of 3 image(s) could not be read"
    written = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert written == ["a.png", "sub/b.jpg"]

    result = invoke("extract", "-c", trained_checkpoint, "--json", target)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["path"]).name for r in records] == ["a.png", "b.jpg"]
    result = invoke("extract", "-c", trained_checkpoint, source)
    assert result.exit_code == EXIT_USAGE
    assert len(result.stdout.splitlines()) == 2
    assert "warning: image " in result.stderr


def test_embed_into_an_existing_folder_keeps_the_name(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    source = photo(tmp_path / "pic.png", 20, 20)
    (tmp_path / "out").mkdir()
    result = invoke("embed", "-c", trained_checkpoint, "-m", "0101", source, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "pic.png").is_file()


# -- errors ------------------------------------------------------------------------------


@pytest.fixture
def bad_files(tmp_path: Path, trained_checkpoint: Path) -> dict[str, Path]:
    files = {
        "image": photo(tmp_path / "ok.png", 20, 18),
        "unreadable": tmp_path / "bad.png",
        "corrupt": tmp_path / "corrupt.pt",
        "foreign": tmp_path / "foreign.pt",
        "mismatch": tmp_path / "mismatch.pt",
        "a_file": tmp_path / "a_file",
    }
    files["unreadable"].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    files["corrupt"].write_bytes(b"PK\x03\x04 not really a zip file")
    torch.save({"state_dict": {}}, files["foreign"])
    state = load_checkpoint(trained_checkpoint)
    state["config"]["model"]["message_bits"] = 8  # the weights carry 4
    save_checkpoint(files["mismatch"], state)
    files["a_file"].write_text("in the way")
    return files


def _error_cases(files: dict[str, Path], checkpoint: Path, tmp_path: Path):
    """(argv, fragment of the one error line)."""
    image, out = files["image"], tmp_path / "out.png"
    embed = ["embed", "-c", checkpoint, "-m", "0101"]
    return [
        ([*embed, files["unreadable"], out], "bad.png' is unreadable"),
        (["extract", "-c", checkpoint, files["unreadable"]], "bad.png' is unreadable"),
        ([*embed, tmp_path / "missing.png", out], "missing.png' does not exist"),
        (["extract", "-c", checkpoint, tmp_path / "missing.png"], "missing.png' does not exist"),
        (["embed", "-c", checkpoint, "-m", "010", image, out], "bit string has 3 bits"),
        (["embed", "-c", checkpoint, "-m", "hi", image, out],
         'message "hi" needs 16 bits; this model carries 4 (0 characters)'),
        (["embed", "-c", checkpoint, "-m", "01a1", image, out], 'message "01a1" needs 32 bits'),
        (["embed", "-c", tmp_path / "none.pt", "-m", "0101", image, out],
         "none.pt' does not exist"),
        (["extract", "-c", files["corrupt"], image], "corrupt.pt' is unreadable"),
        (["extract", "-c", files["foreign"], image], "is not an arwgan checkpoint"),
        (["extract", "-c", files["mismatch"], image],
         "its weights do not fit its config (16px, 8 bits, 8 channels)"),
        ([*embed, image, files["a_file"] / "out.png"], "cannot write"),
        ([*embed, image, tmp_path / "out.xyz"], "unsupported image format"),
        ([*embed, tmp_path, files["a_file"]], "is a file; the output of a folder must be a folder"),
        (["eval", "-c", checkpoint, "--data-dir", tmp_path / "nope"], "nope' does not exist"),
        (["eval", "-c", checkpoint, "--data-dir", tmp_path, "--out", files["a_file"]],
         "is a file, not a folder"),
        (["eval", "-c", files["corrupt"], "--data-dir", tmp_path], "is unreadable"),
    ]


def _parse_error_cases(files: dict[str, Path], checkpoint: Path, tmp_path: Path):
    """Choices click checks while parsing: one line through run_typer, the installed path."""
    return [
        (["eval", "-c", checkpoint, "--data-dir", tmp_path, "--precision", "fp8"],
         "'fp8' is not one of 'fp32', 'bf16', 'fp16'"),
        (["extract", "-c", checkpoint, "--device", "tpu", files["image"]],
         "'tpu' is not one of auto, cpu, cuda, cuda:N"),
    ]


def test_bad_choices_are_one_error_line_and_exit_2(
    bad_files: dict[str, Path], trained_checkpoint: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    from arwgan.console import run_typer

    for argv, fragment in _parse_error_cases(bad_files, trained_checkpoint, tmp_path):
        assert run_typer(group, [str(arg) for arg in argv]) == EXIT_USAGE
        captured = capsys.readouterr()
        assert captured.out == ""
        assert_one_error_line(captured.err, fragment)


def test_bad_input_is_one_error_line_and_exit_2(
    bad_files: dict[str, Path], trained_checkpoint: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    for argv, fragment in _error_cases(bad_files, trained_checkpoint, tmp_path):
        argv = [str(arg) for arg in argv]
        result = CliRunner().invoke(group, argv)
        assert result.exit_code == EXIT_USAGE, (argv, result.output)
        assert result.stdout == ""
        assert_one_error_line(result.stderr, fragment)
        # The installed script's path (run_typer) says the same.
        assert run_typer(group, argv) == EXIT_USAGE
        assert_one_error_line(capsys.readouterr().err, fragment)
    assert not (tmp_path / "out.png").exists()


def test_load_watermarker_errors_are_checkpoint_errors(bad_files: dict[str, Path]) -> None:
    for name in ("corrupt", "foreign", "mismatch"):
        with pytest.raises(CheckpointError):
            load_watermarker(bad_files[name], "cpu")


def test_output_is_never_half_written(
    trained_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = photo(tmp_path / "in.png", 30, 20)
    target = tmp_path / "out" / "marked.png"
    real_save = Image.Image.save

    def save_then_fail(self, fp, format=None, **params):
        real_save(self, fp, format=format, **params)  # the bytes are out...
        raise OSError(28, "No space left on device")  # ...but the write fails

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    result = invoke("embed", "-c", trained_checkpoint, "-m", "0101", source, target)
    assert result.exit_code == EXIT_USAGE
    assert_one_error_line(result.stderr, f"cannot write '{target}': No space left on device")
    assert not target.exists()
    assert os.listdir(target.parent) == []  # no temporary file left behind either


# -- the command group -------------------------------------------------------------------


def test_train_is_an_alias_of_arwgan_train(tiny_data_dir: Path, tmp_path: Path) -> None:
    result = invoke("train", "--help")
    assert result.exit_code == 0
    for flag in ("--data-dir", "--batch", "--from-tuned", "--resume"):
        assert flag in result.output
    out = tmp_path / "run"
    code = run_typer(group, [
        "train", "--data-dir", str(tiny_data_dir), "--epochs", "1", "--steps-per-epoch", "1",
        "--image-size", "16", "--message-bits", "4", "--channels", "8", "--batch", "8",
        "--workers", "0", "--val-images", "8", "--device", "cpu", "--noise", "",
        "--out", str(out),
    ])
    assert code == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def test_bare_from_tuned_is_expanded_for_the_group(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["arwgan", "train", "--from-tuned", "--device", "cpu"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == EXIT_USAGE
    assert_one_error_line(capsys.readouterr().err, "tuned file 'runs/tuned.json' does not exist")


def test_group_lists_its_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("train", "embed", "extract", "eval"):
        assert command in result.output
    for command in ("embed", "extract", "eval"):
        assert invoke(command, "--help").exit_code == 0


def test_bare_arwgan_prints_the_help_once_and_exits_2(capsys: pytest.CaptureFixture) -> None:
    assert run_typer(group, []) == EXIT_USAGE
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("Usage:") == 1


def test_file_names_are_not_read_as_markup(trained_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "[draft] v1.png"
    broken.write_bytes(b"not an image")
    result = invoke("extract", "-c", trained_checkpoint, broken)
    assert result.exit_code == EXIT_USAGE
    assert_one_error_line(result.stderr, "[draft] v1.png' is unreadable (not an image file)")
