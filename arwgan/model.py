"""ARWGAN networks: attention-guided encoder, decoder, discriminator.

Only math lives here: no device choice, no logging, no files. Shapes follow
docs/model.md; C is ``cfg.channels`` and L is ``cfg.message_bits`` throughout.
"""

from __future__ import annotations

import torch
from torch import nn

from arwgan.config import ModelConfig


def conv3x3(in_ch: int, out_ch: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=bias)


class DenseBottleneck(nn.Module):
    """DenseNet-BC bottleneck: BN-ReLU-Conv1x1(in->4C)-BN-ReLU-Conv3x3(4C->C).

    Returns ``cat(x, out)`` (in + C channels), or ``out`` alone (C channels) when
    ``last`` is set, which is how the encoder closes each dense chain.
    """

    def __init__(self, in_ch: int, growth: int, last: bool = False) -> None:
        super().__init__()
        self.last = last
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_ch, 4 * growth, kernel_size=1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(inplace=True),
            nn.Conv2d(4 * growth, growth, kernel_size=3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out if self.last else torch.cat([x, out], dim=1)


def _bn_relu_conv(in_ch: int, mid_ch: int, out_ch: int) -> nn.Sequential:
    """BN-ReLU-Conv3x3(in->mid)-BN-ReLU-Conv3x3(mid->out): the head of both encoder branches."""
    return nn.Sequential(
        nn.BatchNorm2d(in_ch),
        nn.ReLU(inplace=True),
        conv3x3(in_ch, mid_ch),
        nn.BatchNorm2d(mid_ch),
        nn.ReLU(inplace=True),
        conv3x3(mid_ch, out_ch),
    )


class Encoder(nn.Module):
    """Hides an L-bit message in an image as a residual, shaped by an attention mask."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, bits = cfg.channels, cfg.message_bits
        self.stem = conv3x3(3, c)
        # Fusion branch: three dense bottlenecks, each seeing every earlier feature map.
        self.fuse1 = DenseBottleneck(c + bits, c, last=True)
        self.fuse2 = DenseBottleneck(2 * c + bits, c, last=True)
        self.fuse3 = DenseBottleneck(3 * c + bits, c, last=True)
        self.fuse_head = _bn_relu_conv(c + bits, c, bits)
        # Attention branch: C -> 2C -> 3C -> C channels, then a per-pixel softmax over L.
        self.attend = nn.Sequential(
            DenseBottleneck(c, c),
            DenseBottleneck(2 * c, c),
            DenseBottleneck(3 * c, c, last=True),
        )
        self.attend_head = _bn_relu_conv(c, c, bits)
        self.to_rgb = conv3x3(bits, 3)
        self.residual_zero_mean = cfg.residual_zero_mean

    def forward(self, image: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        bits = message.shape[1]
        m = message.to(image.dtype)[:, :, None, None].expand(-1, -1, height, width)
        f0 = self.stem(image)
        f1 = self.fuse1(torch.cat([f0, m], dim=1))
        f2 = self.fuse2(torch.cat([f0, m, f1], dim=1))
        f3 = self.fuse3(torch.cat([f0, m, f1, f2], dim=1))
        fused = self.fuse_head(torch.cat([f3, m], dim=1))
        # Softmax over the L message channels, times L, so the mask averages 1 per pixel.
        mask = torch.softmax(self.attend_head(self.attend(f0)), dim=1) * bits
        residual = self.to_rgb(fused * mask)
        if self.residual_zero_mean:
            # A flat per-image colour shift is cheap under MSE yet useless after a crop.
            residual = residual - residual.mean(dim=(2, 3), keepdim=True)
        return image + residual


class _DenseConvTrunk(nn.Module):
    """Conv3x3-BN-LeakyReLU(0.01) layers with dense concatenation, then Conv(C->out)-BN-act and
    global average pooling. Shared by the decoder and the discriminator."""

    def __init__(self, channels: int, out_ch: int, final_act: nn.Module) -> None:
        super().__init__()
        c = channels
        self.d0 = self._cbl(3, c)
        self.d1 = self._cbl(c, c)
        self.d2 = self._cbl(2 * c, c)
        self.d3 = self._cbl(3 * c, c)
        self.head = nn.Sequential(conv3x3(c, out_ch), nn.BatchNorm2d(out_ch), final_act)
        self.pool = nn.AdaptiveAvgPool2d(1)

    @staticmethod
    def _cbl(in_ch: int, out_ch: int) -> nn.Sequential:
        return nn.Sequential(
            conv3x3(in_ch, out_ch), nn.BatchNorm2d(out_ch), nn.LeakyReLU(0.01, inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d0 = self.d0(x)
        d1 = self.d1(d0)
        d2 = self.d2(torch.cat([d0, d1], dim=1))
        d3 = self.d3(torch.cat([d0, d1, d2], dim=1))
        return self.pool(self.head(d3)).flatten(1)


class Decoder(nn.Module):
    """Recovers the message: raw outputs, a bit reads as ``output > 0.5``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        bits = cfg.message_bits
        self.trunk = _DenseConvTrunk(cfg.channels, bits, nn.ReLU(inplace=True))
        self.linear = nn.Linear(bits, bits)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.linear(self.trunk(image))


class Discriminator(nn.Module):
    """Tells covers from watermarked images: one logit per image."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        bits = cfg.message_bits
        self.trunk = _DenseConvTrunk(cfg.channels, bits, nn.LeakyReLU(0.01, inplace=True))
        self.linear = nn.Linear(bits, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.linear(self.trunk(image)).squeeze(1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
