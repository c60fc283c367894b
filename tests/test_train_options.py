"""The official default train step and the named improvements (issue 13), on a tiny model."""

from __future__ import annotations

import pytest
import torch

from arwgan.config import OFFICIAL_NOISE, LossWeights, ModelConfig, OptimConfig, TrainConfig
from arwgan.errors import ConfigError
from arwgan.metrics import ssim_official_per_image, ssim_per_image
from arwgan.step import GANStep


def _gan(noise: str = "", optim: dict | None = None, **model) -> GANStep:
    cfg = ModelConfig(image_size=16, message_bits=4, channels=8, noise=noise, **model)
    return GANStep(cfg, OptimConfig(**(optim or {})), "fp32", torch.device("cpu"), seed=0)


def _batch(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, size, size, generator=generator) * 2 - 1
    return images, torch.randint(0, 2, (4, 4), generator=generator).float()


def test_defaults_are_the_official_training() -> None:
    cfg = TrainConfig().model
    assert cfg.noise == OFFICIAL_NOISE and cfg.ssim_loss == "official"
    assert not cfg.residual_zero_mean and cfg.decoder_jitter == 0
    assert OptimConfig().d_every == 1
    assert _gan().ssim_loss is ssim_official_per_image
    assert _gan(ssim_loss="unit").ssim_loss is ssim_per_image


def test_official_noise_trains_though_crop_and_resize_shrink_the_image() -> None:
    gan = _gan(OFFICIAL_NOISE)
    images, messages = _batch()
    sizes = set()
    gan.nets.decoder.register_forward_pre_hook(lambda m, args: sizes.add(args[0].shape[-1]))
    for _ in range(15):  # the noiser's seed 0 draws every layer within 15 steps
        result = gan(images, messages)
        assert not result.skipped and torch.isfinite(result.g_loss)
    assert sizes == {16, 7, 12}  # full size, crop sqrt(0.1871) * 16 = 6.9, resize floor(12.8)


def test_residual_zero_mean_removes_the_flat_shift() -> None:
    gan = _gan(residual_zero_mean=True)
    images, messages = _batch()
    residual = gan.nets.encoder(images, messages) - images
    assert residual.mean(dim=(2, 3)).abs().max() < 1e-6
    assert residual.abs().max() > 0


def test_discriminator_updates_every_k_steps_only() -> None:
    gan = _gan(optim={"d_every": 3})
    images, messages = _batch()
    changed = []
    for _ in range(6):
        before = [p.detach().clone() for p in gan.nets.discriminator.parameters()]
        gan(images, messages)
        after = list(gan.nets.discriminator.parameters())
        changed.append(any(not torch.equal(a, b) for a, b in zip(after, before)))
    assert changed == [True, False, False, True, False, False]


def test_zero_adversarial_weight_never_runs_the_discriminator(monkeypatch) -> None:
    gan = _gan(weights=LossWeights(adversarial=0.0))
    calls = []
    monkeypatch.setattr(gan.nets.discriminator, "forward", lambda x: calls.append(1))
    result = gan(*_batch())
    assert calls == [] and float(result.g_adversarial) == 0 and float(result.d_loss) == 0


def test_decoder_jitter_applies_in_training_only() -> None:
    gan = _gan(decoder_jitter=0.5)
    images, messages = _batch()
    seen = []
    gan.nets.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    gan.generator.train()
    encoded, _ = gan.generator(images, messages)
    shift = seen[-1] - encoded  # identity noise: only the jitter remains
    assert torch.allclose(shift, shift.mean(dim=(2, 3), keepdim=True), atol=1e-6)
    assert 0 < shift.abs().max() <= 0.5
    gan.generator.eval()
    encoded, _ = gan.generator(images, messages)
    assert torch.equal(seen[-1], encoded)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"ssim_loss": "valid"}, "SSIM loss form must be one of official, unit"),
        ({"decoder_jitter": 2}, "decoder jitter must be in [0, 1]"),
        ({"residual_zero_mean": "yes"}, "residual_zero_mean must be true or false"),
    ],
)
def test_bad_option_values_are_config_errors(fields, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        ModelConfig(**fields)
    with pytest.raises(ConfigError, match="d_every must be a positive integer"):
        OptimConfig(d_every=0)


@pytest.mark.parametrize("noise", ["jpeg()", "Jpeg(0)", "jpeg()+dropout(0.5,0.6)"])
def test_channels_last_trains_with_noise_layers_that_hold_2d_buffers(noise: str) -> None:
    """channels_last applies to the convolutional networks only: JPEG's 2-D tables have
    no channels_last layout, and converting the whole model refused to build."""
    gan = _gan(noise)
    layered = GANStep(gan.model_cfg, OptimConfig(), "fp32", torch.device("cpu"), seed=0,
                      channels_last=True)
    weight = layered.nets.encoder.state_dict()
    convs = [t for t in weight.values() if t.dim() == 4]
    assert convs and all(t.is_contiguous(memory_format=torch.channels_last) for t in convs)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    result = layered(*layered.to_device(images, torch.randint(0, 2, (2, gan.model_cfg.message_bits)).float()))
    assert torch.isfinite(result.g_loss)
