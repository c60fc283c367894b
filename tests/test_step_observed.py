"""The train step observed from outside: which noise layer the decoder really saw, the
dtype autocast really computes in, and the gradient scaler's state across a checkpoint.

Each test reads what happened (module inputs and outputs through hooks, a checkpoint
file), never a value recomputed with the code under test.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from arwgan.checkpoint import load_checkpoint, save_checkpoint
from arwgan.config import ModelConfig, OptimConfig
from arwgan.step import GANStep

CPU = torch.device("cpu")


def _model(noise: str = "") -> ModelConfig:
    return ModelConfig(image_size=16, message_bits=4, channels=8, noise=noise)


def _batch(seed: int, n: int = 4):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 16, 16, generator=generator) * 2 - 1
    messages = torch.randint(0, 2, (n, 4), generator=generator).float()
    return images, messages


class Seen:
    """Records, for every training forward, the cover, the encoder's output and what the
    decoder was given."""

    def __init__(self, gan: GANStep) -> None:
        self.covers: list[torch.Tensor] = []
        self.encoded: list[torch.Tensor] = []
        self.decoder_inputs: list[torch.Tensor] = []
        encoder, decoder = gan.nets.encoder, gan.nets.decoder

        def on_encoder(module, inputs, output):
            if module.training:
                self.covers.append(inputs[0].detach().clone())
                self.encoded.append(output.detach().clone())

        def on_decoder(module, inputs):
            if module.training:
                self.decoder_inputs.append(inputs[0].detach().clone())

        encoder.register_forward_hook(on_encoder)
        decoder.register_forward_pre_hook(on_decoder)


def _kind(cover: torch.Tensor, encoded: torch.Tensor, seen: torch.Tensor) -> str:
    """'identity' when the decoder got the encoded image unchanged; 'dropout' when every
    pixel is either the encoded one or the cover's, with a real share of each."""
    if torch.equal(seen, encoded):
        return "identity"
    from_encoded = (seen == encoded).all(dim=1)
    from_cover = (seen == cover).all(dim=1)
    differs = (encoded != cover).any(dim=1)
    if bool((from_encoded | from_cover).all()):
        kept = from_encoded[differs].float().mean().item()
        if 0.5 < kept < 0.9:  # dropout(0.5,0.5) keeps sqrt(0.5) = 71 % (official meaning)
            return "dropout"
    return "other"


def test_training_applies_each_noise_layer_of_the_pool_including_identity() -> None:
    """Pool: identity and dropout(0.5,0.5), which keeps 71 % of the pixels. Over 24 steps the decoder must
    see both, each about half the time, and nothing else."""
    gan = GANStep(_model("dropout(0.5,0.5)"), OptimConfig(), "fp32", CPU, seed=0)
    seen = Seen(gan)
    for step in range(24):
        gan(*_batch(step))
    assert len(seen.decoder_inputs) == 24
    kinds = Counter(
        _kind(c, e, d) for c, e, d in zip(seen.covers, seen.encoded, seen.decoder_inputs)
    )
    assert set(kinds) == {"identity", "dropout"}, kinds
    assert min(kinds.values()) >= 4, kinds


def test_without_configured_layers_the_decoder_sees_the_encoded_image() -> None:
    gan = GANStep(_model(""), OptimConfig(), "fp32", CPU, seed=0)
    seen = Seen(gan)
    for step in range(3):
        gan(*_batch(step))
    assert all(torch.equal(e, d) for e, d in zip(seen.encoded, seen.decoder_inputs))


def _conv_output_dtypes(gan: GANStep) -> set[torch.dtype]:
    """dtypes of every convolution's output during one train step."""
    dtypes: set[torch.dtype] = set()
    hooks = [
        module.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
        for module in gan.nets.modules()
        if isinstance(module, nn.Conv2d)
    ]
    gan(*_batch(0))
    for hook in hooks:
        hook.remove()
    return dtypes


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_networks_compute_in_the_asked_precision(precision: str, dtype: torch.dtype) -> None:
    gan = GANStep(_model(), OptimConfig(), precision, CPU, seed=0)
    assert _conv_output_dtypes(gan) == {dtype}
    # The master weights stay float32 whatever the compute precision.
    assert {p.dtype for p in gan.nets.parameters()} == {torch.float32}


@pytest.mark.gpu
def test_fp16_networks_compute_in_half_precision_on_cuda() -> None:
    gan = GANStep(_model(), OptimConfig(), "fp16", torch.device("cuda"), seed=0)
    dtypes: set[torch.dtype] = set()
    for module in gan.nets.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    images, messages = _batch(0)
    gan(images.cuda(), messages.cuda())
    assert dtypes == {torch.float16}


def _with_enabled_scalers(gan: GANStep, init_scale: float) -> GANStep:
    """fp16 needs CUDA; its gradient scalers' bookkeeping does not. Give an fp32 CPU step
    real (enabled) scalers that grow every step, so that their state moves."""
    gan.scaler_g = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1)
    gan.scaler_d = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1)
    return gan


def test_gradient_scaler_state_survives_a_checkpoint(tmp_path) -> None:
    gan = _with_enabled_scalers(GANStep(_model(), OptimConfig(), "fp32", CPU, seed=0), 256.0)
    for step in range(2):
        gan(*_batch(step))
    # Finite steps with growth_interval 1 double the scale each step: 256 -> 1024.
    assert gan.scaler_g.get_scale() == gan.scaler_d.get_scale() == 1024.0
    save_checkpoint(tmp_path / "last.pt", {"gan": gan.state_dict()})

    resumed = _with_enabled_scalers(GANStep(_model(), OptimConfig(), "fp32", CPU, seed=0), 256.0)
    resumed.load_state_dict(load_checkpoint(tmp_path / "last.pt")["gan"])
    assert resumed.scaler_g.get_scale() == resumed.scaler_d.get_scale() == 1024.0
    resumed(*_batch(2))
    assert resumed.scaler_g.get_scale() == 2048.0
