"""Checkpoints are data, never code; checkpoints saved by the official ARWGAN code load.

The official model is transcribed here from the official repository's model/ files
(river-huang/ARWGAN: encoder.py, decoder.py, discriminator.py, Dense_block.py,
encoder_decoder.py), layer for layer with its attribute names, so that its state dicts
have exactly the official keys and shapes, unused layers included; utils.save_checkpoint
gives the file layout. Our weights are copied across with a key table written here, not
taken from the code under test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from arwgan.app import group
from arwgan.checkpoint import load_checkpoint, read_data, save_checkpoint
from arwgan.cli import app as train_app
from arwgan.config import ModelConfig, TrainConfig
from arwgan.console import EXIT_USAGE, run_typer
from arwgan.errors import CheckpointError
from arwgan.inference import load_watermarker
from arwgan.step import Networks
from helpers import assert_one_error_line

C, L = 8, 4  # channels and message bits of the tiny model


# --- the official model, transcribed -----------------------------------------------------


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1)


def _cbl(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(_conv(cin, cout), nn.BatchNorm2d(cout), nn.LeakyReLU(inplace=True))


class Bottleneck(nn.Module):
    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, 4 * growth, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, kernel_size=3, padding=1, bias=False)


class OfficialEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first_layer = nn.Sequential(_conv(3, C))
        self.second_layer = _cbl(C, C)
        self.third_layer = nn.Sequential(*_cbl(2 * C, C), *_cbl(C, C))
        self.fourth_layer = _cbl(3 * C + L, C)
        self.Dense_block1 = Bottleneck(C + L, C)
        self.Dense_block2 = Bottleneck(2 * C + L, C)
        self.Dense_block3 = Bottleneck(3 * C + L, C)
        self.Dense_block_a1 = Bottleneck(C, C)
        self.Dense_block_a2 = Bottleneck(2 * C, C)
        self.Dense_block_a3 = Bottleneck(3 * C, C)
        self.fivth_layer = nn.Sequential(
            nn.BatchNorm2d(C + L), nn.ReLU(inplace=True), _conv(C + L, C),
            nn.BatchNorm2d(C), nn.ReLU(inplace=True), _conv(C, L),
        )
        self.sixth_layer = nn.Sequential(
            nn.BatchNorm2d(C), nn.ReLU(inplace=True), _conv(C, C),
            nn.BatchNorm2d(C), nn.ReLU(inplace=True), _conv(C, L), nn.Softmax(dim=1),
        )
        self.softmax = nn.Sequential(nn.Softmax(dim=1))
        self.final_layer = nn.Sequential(nn.Conv2d(L, 3, kernel_size=3, padding=1))


class OfficialTrunk(nn.Module):
    """The official decoder (``linear`` L -> L) and discriminator (L -> 1)."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.first_layer = _cbl(3, C)
        self.second_layer = _cbl(C, C)
        self.third_layer = _cbl(2 * C, C)
        self.fourth_layer = _cbl(3 * C, C)
        self.Dense_block1 = Bottleneck(C, C)
        self.Dense_block2 = Bottleneck(2 * C, C)
        self.Dense_block3 = Bottleneck(3 * C, C)
        self.fivth_layer = nn.Sequential(_conv(C, L), nn.BatchNorm2d(L), nn.ReLU(inplace=True))
        self.pooling = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.linear = nn.Linear(L, outputs)


class OfficialEncoderDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = OfficialEncoder()
        self.decoder = OfficialTrunk(L)
        self.average = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.linear = nn.Linear(L, L)


# Official prefix -> ours (Bottleneck bn1/conv1/bn2/conv2 are our body.0/2/3/5).
def _key_table() -> dict[str, str]:
    table = {
        "encoder.first_layer.0.": "encoder.stem.",
        "encoder.fivth_layer.": "encoder.fuse_head.",
        "encoder.sixth_layer.": "encoder.attend_head.",
        "encoder.final_layer.0.": "encoder.to_rgb.",
    }
    parts = {"bn1": "0", "conv1": "2", "bn2": "3", "conv2": "5"}
    for k in (1, 2, 3):
        for theirs, ours in parts.items():
            table[f"encoder.Dense_block{k}.{theirs}."] = f"encoder.fuse{k}.body.{ours}."
            table[f"encoder.Dense_block_a{k}.{theirs}."] = f"encoder.attend.{k - 1}.body.{ours}."
    for net in ("decoder", "discriminator"):
        for theirs, ours in (("first_layer", "d0"), ("second_layer", "d1"), ("third_layer", "d2"),
                             ("fourth_layer", "d3"), ("fivth_layer", "head")):
            table[f"{net}.{theirs}."] = f"{net}.trunk.{ours}."
        table[f"{net}.linear."] = f"{net}.linear."
    return table


def _ours_for(official_key: str) -> str | None:
    for theirs, ours in _key_table().items():
        if official_key.startswith(theirs):
            return ours + official_key[len(theirs):]
    return None  # a layer the official forward never uses


def official_checkpoint(nets: Networks, path: Path) -> None:
    """Save ``nets``' weights as the official utils.save_checkpoint would have."""
    torch.manual_seed(1)
    enc_dec, discrim = OfficialEncoderDecoder(), OfficialTrunk(1)
    ours = nets.state_dict()
    copied = 0
    for prefix, module in (("", enc_dec), ("discriminator.", discrim)):
        state = module.state_dict()
        for key in state:
            mapped = _ours_for(prefix + key)
            if mapped is not None:
                state[key] = ours[mapped].clone()
                copied += 1
        module.load_state_dict(state)
    assert copied == len(ours)  # every weight of ours came across
    torch.save(
        {
            "enc-dec-model": enc_dec.state_dict(),
            "enc-dec-optim": torch.optim.Adam(enc_dec.parameters()).state_dict(),
            "discrim-model": discrim.state_dict(),
            "discrim-optim": torch.optim.Adam(discrim.parameters()).state_dict(),
            "epoch": 7,
        },
        path,
    )


@pytest.fixture
def source_nets() -> Networks:
    """A tiny model with non-trivial weights and BatchNorm statistics."""
    torch.manual_seed(0)
    nets = Networks(ModelConfig(image_size=16, message_bits=L, channels=C, noise=""), 0)
    with torch.no_grad():
        for name, tensor in nets.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) * 0.5 + (0.5 if "running_var" in name else -0.2))
    return nets.eval()


@pytest.fixture
def official_file(source_nets: Networks, tmp_path: Path) -> Path:
    path = tmp_path / "official.pyt"
    official_checkpoint(source_nets, path)
    return path


# --- official checkpoints ------------------------------------------------------------------


def test_official_checkpoint_gives_identical_outputs(source_nets, official_file) -> None:
    marker = load_watermarker(official_file, "cpu")
    assert (marker.model_cfg.channels, marker.model_cfg.message_bits) == (C, L)
    loaded = marker.nets.eval()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    messages = torch.randint(0, 2, (3, L)).float()
    with torch.no_grad():
        encoded = source_nets.encoder(images, messages)
        assert torch.equal(loaded.encoder(images, messages), encoded)
        assert torch.equal(loaded.decoder(encoded), source_nets.decoder(encoded))
        assert torch.equal(loaded.discriminator(encoded), source_nets.discriminator(encoded))


def test_official_checkpoint_serves_embed_extract_eval_as_our_own(
    source_nets, official_file, tmp_path, tiny_data_dir
) -> None:
    # Our checkpoint holding the same weights, with the config an official one implies.
    ours = tmp_path / "ours.pt"
    model = ModelConfig(image_size=128, message_bits=L, channels=C)
    save_checkpoint(ours, {"config": TrainConfig(model=model).to_dict(),
                           "gan": {"nets": source_nets.state_dict()}})
    image = next((tiny_data_dir / "val").rglob("*.jpg"))
    outputs = {}
    for name, checkpoint in (("official", official_file), ("ours", ours)):
        runner = CliRunner()
        marked = tmp_path / f"{name}.png"
        embed = runner.invoke(group, ["embed", str(image), str(marked), "-c", str(checkpoint),
                                      "-m", "0110", "--device", "cpu"])
        assert embed.exit_code == 0, embed.output
        extract = runner.invoke(group, ["extract", str(marked), "-c", str(checkpoint),
                                        "--device", "cpu"])
        assert extract.exit_code == 0, extract.output
        out = tmp_path / f"eval-{name}"
        evaluation = runner.invoke(group, ["eval", "-c", str(checkpoint), "--data-dir",
                                           str(tiny_data_dir), "--out", str(out), "--max-images",
                                           "4", "--workers", "0", "--device", "cpu"])
        assert evaluation.exit_code == 0, evaluation.output
        outputs[name] = (marked.read_bytes(), extract.stdout.split()[1:],
                         (out / "robustness.csv").read_text())
    assert outputs["official"] == outputs["ours"]


def test_init_from_official_checkpoint_starts_from_its_weights(
    source_nets, official_file, make_config
) -> None:
    from arwgan.trainer import Trainer

    trainer = Trainer(make_config())
    trainer.init_from(official_file)
    loaded = trainer.gan.nets.state_dict()
    for key, tensor in source_nets.state_dict().items():
        assert torch.equal(loaded[key], tensor), key
    assert trainer.gan.step_count == 0 and trainer.epoch == 0


def test_init_from_runs_a_training(official_file, tiny_data_dir, tmp_path) -> None:
    args = ["--data-dir", str(tiny_data_dir), "--epochs", "1", "--steps-per-epoch", "1",
            "--image-size", "16", "--message-bits", str(L), "--channels", str(C), "--batch", "4",
            "--workers", "0", "--val-images", "4", "--device", "cpu", "--noise", "",
            "--out", str(tmp_path / "run"), "--init-from", str(official_file)]
    result = CliRunner().invoke(train_app, args)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "run" / "last.pt")["gan"]["step_count"] == 1


def test_mismatched_official_checkpoint_is_refused_naming_the_first_misfit(
    official_file, tiny_data_dir, tmp_path, capsys
) -> None:
    args = ["--data-dir", str(tiny_data_dir), "--image-size", "16", "--message-bits", "6",
            "--channels", str(C), "--workers", "0", "--device", "cpu", "--noise", "",
            "--out", str(tmp_path / "run"), "--init-from", str(official_file)]
    fragment = "encoder.Dense_block1.bn1.weight is (12,), needs (14,)"
    assert run_typer(train_app, args) == EXIT_USAGE
    assert_one_error_line(capsys.readouterr().err, fragment)
    # A damaged official file (one layer of the wrong size) is refused by extract too.
    state = torch.load(official_file, weights_only=True)
    state["enc-dec-model"]["decoder.linear.weight"] = torch.zeros(L, L + 1)
    torch.save(state, tmp_path / "damaged.pyt")
    result = CliRunner().invoke(group, ["extract", str(tmp_path / "damaged.pyt"), "-c",
                                        str(tmp_path / "damaged.pyt"), "--device", "cpu"])
    assert result.exit_code == EXIT_USAGE
    assert_one_error_line(result.stderr, "decoder.linear.weight is (4, 5), needs (4, 4)")


def test_official_checkpoint_cannot_be_resumed(official_file) -> None:
    with pytest.raises(CheckpointError, match="--init-from"):
        load_checkpoint(official_file)


# --- checkpoints are data ----------------------------------------------------------------


class _Payload:
    """Unpickling this calls os.system, which would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture
def malicious(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "model.pt"
    torch.save({"format_version": 1, "config": _Payload(marker), "gan": {}}, path)
    return path, marker


def test_a_pickle_that_runs_code_is_refused_and_does_not_run(malicious) -> None:
    path, marker = malicious
    with pytest.raises(CheckpointError, match="refused: opening it would run code"):
        read_data(path)
    assert not marker.exists()


def test_every_command_refuses_a_code_carrying_checkpoint_in_one_line(
    malicious, tmp_path, tiny_data_dir, capsys
) -> None:
    path, marker = malicious
    image = next((tiny_data_dir / "val").rglob("*.jpg"))
    commands = [
        (train_app, ["--resume", str(path)]),
        (train_app, ["--init-from", str(path), "--data-dir", str(tiny_data_dir), "--device",
                     "cpu", "--workers", "0", "--out", str(tmp_path / "run")]),
        (group, ["embed", str(image), str(tmp_path / "out.png"), "-c", str(path), "-m", "0101"]),
        (group, ["extract", str(image), "-c", str(path)]),
        (group, ["eval", "-c", str(path), "--data-dir", str(tiny_data_dir)]),
    ]
    for app, argv in commands:
        assert run_typer(app, argv) == EXIT_USAGE, argv
        assert_one_error_line(capsys.readouterr().err, "refused: opening it would run code")
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == EXIT_USAGE, argv
        assert_one_error_line(result.stderr, "refused: opening it would run code")
    assert not marker.exists()


def test_our_checkpoints_are_plain_data(trained_checkpoint) -> None:
    # Readable with weights_only=True and nothing allow-listed: tensors and plain values.
    state = torch.load(trained_checkpoint, weights_only=True)
    assert state["format_version"] == 1 and "nets" in state["gan"]
