"""Shapes, layer sizes and invariants of the ARWGAN networks (docs: arwgan.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from arwgan.config import ModelConfig
from arwgan.errors import ConfigError
from arwgan.model import (
    Decoder,
    DenseBottleneck,
    Discriminator,
    Encoder,
    count_parameters,
)

C = 8


def _cfg(bits: int = 8, channels: int = C, image_size: int = 16) -> ModelConfig:
    return ModelConfig(image_size=image_size, message_bits=bits, channels=channels, noise="")


def _inputs(batch: int, height: int, width: int, bits: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, height, width, generator=generator) * 2 - 1
    messages = torch.randint(0, 2, (batch, bits), generator=generator).float()
    return images, messages


# -- output shapes ---------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 30])
@pytest.mark.parametrize("height, width", [(16, 16), (32, 32), (24, 40)])
def test_output_shapes(bits: int, height: int, width: int) -> None:
    torch.manual_seed(0)
    cfg = _cfg(bits)
    images, messages = _inputs(2, height, width, bits)
    encoder, decoder, discriminator = Encoder(cfg), Decoder(cfg), Discriminator(cfg)
    with torch.no_grad():
        encoded = encoder(images, messages)
        decoded = decoder(encoded)
        logits = discriminator(encoded)
    assert encoded.shape == (2, 3, height, width)
    assert decoded.shape == (2, bits)
    assert logits.shape == (2,)
    assert encoded.dtype == decoded.dtype == logits.dtype == torch.float32


def test_batch_of_one_in_eval_mode() -> None:
    cfg = _cfg(8)
    images, messages = _inputs(1, 16, 16, 8)
    nets = [Encoder(cfg).eval(), Decoder(cfg).eval(), Discriminator(cfg).eval()]
    with torch.no_grad():
        encoded = nets[0](images, messages)
        assert nets[1](encoded).shape == (1, 8)
        assert nets[2](encoded).shape == (1,)


# -- parameter shapes ------------------------------------------------------------------


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def _bns(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def _dense_shapes(block: DenseBottleneck, in_ch: int, growth: int) -> None:
    """BN(in) -> ReLU -> Conv1x1(in->4C, no bias) -> BN(4C) -> ReLU -> Conv3x3(4C->C, no bias)."""
    conv1, conv3 = _convs(block)
    bn1, bn2 = _bns(block)
    assert bn1.num_features == in_ch
    assert conv1.weight.shape == (4 * growth, in_ch, 1, 1)
    assert conv1.bias is None
    assert bn2.num_features == 4 * growth
    assert conv3.weight.shape == (growth, 4 * growth, 3, 3)
    assert conv3.bias is None


@pytest.mark.parametrize("bits", [8, 30])
def test_encoder_layer_shapes(bits: int) -> None:
    encoder = Encoder(_cfg(bits))
    assert encoder.stem.weight.shape == (C, 3, 3, 3)
    assert encoder.stem.bias.shape == (C,)
    # Fusion branch: each bottleneck sees f0, m and every earlier output, returns C maps.
    _dense_shapes(encoder.fuse1, C + bits, C)
    _dense_shapes(encoder.fuse2, 2 * C + bits, C)
    _dense_shapes(encoder.fuse3, 3 * C + bits, C)
    assert encoder.fuse1.last and encoder.fuse2.last and encoder.fuse3.last
    # Fusion head: BN(C+L) -> ReLU -> Conv(C+L -> C) -> BN(C) -> ReLU -> Conv(C -> L).
    head_convs, head_bns = _convs(encoder.fuse_head), _bns(encoder.fuse_head)
    assert [bn.num_features for bn in head_bns] == [C + bits, C]
    assert [tuple(conv.weight.shape) for conv in head_convs] == [
        (C, C + bits, 3, 3), (bits, C, 3, 3)
    ]
    # Attention branch: C -> 2C -> 3C -> C channels (64 -> 128 -> 192 -> 64 at C = 64).
    ba1, ba2, ba3 = encoder.attend
    _dense_shapes(ba1, C, C)
    _dense_shapes(ba2, 2 * C, C)
    _dense_shapes(ba3, 3 * C, C)
    assert (ba1.last, ba2.last, ba3.last) == (False, False, True)
    attention_convs, attention_bns = _convs(encoder.attend_head), _bns(encoder.attend_head)
    assert [bn.num_features for bn in attention_bns] == [C, C]
    assert [tuple(conv.weight.shape) for conv in attention_convs] == [(C, C, 3, 3), (bits, C, 3, 3)]
    assert encoder.to_rgb.weight.shape == (3, bits, 3, 3)
    assert encoder.to_rgb.bias.shape == (3,)


def test_attention_branch_channel_growth() -> None:
    encoder = Encoder(_cfg(8))
    x = torch.randn(2, C, 8, 8)
    widths = []
    with torch.no_grad():
        for block in encoder.attend:
            x = block(x)
            widths.append(x.shape[1])
    assert widths == [2 * C, 3 * C, C]


@pytest.mark.parametrize("net_cls, out_features", [(Decoder, None), (Discriminator, 1)])
def test_trunk_layer_shapes(net_cls, out_features) -> None:
    bits = 30
    net = net_cls(_cfg(bits))
    trunk = net.trunk
    assert trunk.d0[0].weight.shape == (C, 3, 3, 3)
    assert trunk.d1[0].weight.shape == (C, C, 3, 3)
    assert trunk.d2[0].weight.shape == (C, 2 * C, 3, 3)
    assert trunk.d3[0].weight.shape == (C, 3 * C, 3, 3)
    for layer in (trunk.d0, trunk.d1, trunk.d2, trunk.d3):
        assert isinstance(layer[1], nn.BatchNorm2d) and layer[1].num_features == C
        assert isinstance(layer[2], nn.LeakyReLU) and layer[2].negative_slope == 0.01
    head_conv, head_bn, head_act = trunk.head
    assert head_conv.weight.shape == (bits, C, 3, 3)
    assert head_bn.num_features == bits
    expected_act = nn.ReLU if net_cls is Decoder else nn.LeakyReLU
    assert type(head_act) is expected_act
    assert net.linear.weight.shape == (out_features or bits, bits)
    assert net.linear.bias.shape == (out_features or bits,)


# -- invariants ------------------------------------------------------------------------


def test_encoder_output_is_image_plus_residual() -> None:
    torch.manual_seed(0)
    encoder = Encoder(_cfg(8))
    with torch.no_grad():
        encoder.to_rgb.weight.zero_()
        encoder.to_rgb.bias.zero_()
    images, messages = _inputs(2, 16, 24, 8)
    with torch.no_grad():
        encoded = encoder(images, messages)
    assert torch.equal(encoded, images)
    # The bias alone is then the whole residual (a zero-weight conv adds exactly its bias).
    bias = torch.tensor([0.25, -0.5, 0.125])
    with torch.no_grad():
        encoder.to_rgb.bias.copy_(bias)
        shifted = encoder(images, messages)
    assert torch.equal(shifted, images + bias.view(1, 3, 1, 1))


@pytest.mark.parametrize("bits", [8, 30])
def test_attention_mask_sums_to_message_length(bits: int) -> None:
    """The mask is read from what ``to_rgb`` receives (fused features times the mask),
    divided by the fused features: non-negative, L per pixel, and not uniform."""
    torch.manual_seed(0)
    encoder = Encoder(_cfg(bits))
    captured: dict[str, torch.Tensor] = {}
    encoder.fuse_head.register_forward_hook(lambda m, i, o: captured.update(fused=o))
    encoder.to_rgb.register_forward_pre_hook(lambda m, i: captured.update(product=i[0]))
    images, messages = _inputs(2, 12, 20, bits)
    with torch.no_grad():
        encoder(images, messages)
    fused, product = captured["fused"].double(), captured["product"].double()
    assert fused.shape == product.shape == (2, bits, 12, 20)
    # Pixels where every fused channel is far enough from 0 for the division to be exact.
    usable = (fused.abs() > 1e-2).all(dim=1)
    assert usable.sum() >= 20
    mask = (product / fused).permute(0, 2, 3, 1)[usable]  # (pixels, bits)
    assert (mask > -1e-4).all()
    torch.testing.assert_close(mask.sum(dim=1), torch.full((len(mask),), float(bits), dtype=torch.float64),
                               rtol=1e-3, atol=1e-3)
    assert mask.std(dim=0).max() > 1e-3  # it attends: not the same weights everywhere


def test_encoder_depends_on_message() -> None:
    torch.manual_seed(0)
    encoder = Encoder(_cfg(8))
    images, messages = _inputs(2, 16, 16, 8)
    # Mixed messages: in train mode BatchNorm maps a message channel that is constant over
    # the batch (all zeros or all ones) to zero, which would hide the message entirely.
    with torch.no_grad():
        encoded = encoder(images, messages)
        flipped = encoder(images, 1 - messages)
    assert not torch.allclose(encoded, flipped)


def test_count_parameters() -> None:
    assert count_parameters(nn.Linear(3, 5)) == 3 * 5 + 5
    assert count_parameters(nn.Conv2d(3, 4, 3)) == 4 * 3 * 9 + 4
    bits = 4
    decoder = Decoder(_cfg(bits))
    # Trunk: 4 conv3x3 with bias + BN (2 params per channel), head conv + BN, then linear.
    trunk = (
        (C * 3 * 9 + C) + (C * C * 9 + C) + (C * 2 * C * 9 + C) + (C * 3 * C * 9 + C)
        + 4 * 2 * C
        + (bits * C * 9 + bits) + 2 * bits
    )
    assert count_parameters(decoder) == trunk + bits * bits + bits
    discriminator = Discriminator(_cfg(bits))
    assert count_parameters(discriminator) == trunk + bits + 1
    # Encoder, layer by layer (BN has 2 parameters per channel).
    def dense(in_ch: int) -> int:
        return 2 * in_ch + 4 * C * in_ch + 2 * 4 * C + C * 4 * C * 9

    def head(in_ch: int) -> int:
        return 2 * in_ch + (C * in_ch * 9 + C) + 2 * C + (bits * C * 9 + bits)

    encoder = (
        (C * 3 * 9 + C)
        + dense(C + bits) + dense(2 * C + bits) + dense(3 * C + bits) + head(C + bits)
        + dense(C) + dense(2 * C) + dense(3 * C) + head(C)
        + (3 * bits * 9 + 3)
    )
    assert count_parameters(Encoder(_cfg(bits))) == encoder


# -- config validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"image_size": 4}, "image size"),
        ({"image_size": 16.0}, "image size"),
        ({"message_bits": 0}, "message bits"),
        ({"message_bits": 4097}, "message bits"),
        ({"channels": 0}, "channels"),
        ({"channels": -3}, "channels"),
        ({"noise": "blur(3)"}, "blur"),
        ({"noise": "crop(2)"}, "crop"),
        ({"noise": "jpeg()+"}, "noise"),
        ({"weights": {"ssim": -1.0}}, "loss weight ssim"),
        ({"weights": {"typo": 1.0}}, "typo"),
    ],
)
def test_model_config_rejects_bad_values(fields: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        ModelConfig(**fields)


def test_model_config_round_trips_and_fingerprints() -> None:
    cfg = _cfg(8)
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.fingerprint() == cfg.fingerprint()
    assert _cfg(9).fingerprint() != cfg.fingerprint()
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": 1})
