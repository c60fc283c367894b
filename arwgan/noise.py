"""Noise layers ("attacks") applied between the encoder and the decoder.

Images are (B, 3, H, W) tensors in [-1, 1]. Every layer is an ``nn.Module`` with
``forward(encoded, cover) -> noised`` that returns the input's dtype; some layers take
pixels from ``cover`` (the unwatermarked image). :class:`Crop` and :class:`Resize` return a
smaller (or larger) image, as in the official ARWGAN code: the decoder ends in a global
average pool and takes any size. Every other layer keeps the shape.

Layers are configured with the official ARWGAN grammar (HiDDeN's, extended), e.g. the
authors' training string
``crop((0.1871,0.1871),(0.1871,0.1871))+Jpeg(0)+dropout(0.5477,0.5477)+resize(0.8,0.8)+gaussian(3,2.0)``,
parsed by :func:`parse_noise`; every official layer name has its official meaning (see
docs/model.md, "Noise layers", for each argument and for the official bugs not copied).
:class:`Noiser` picks one layer per batch, Identity included.

Randomness inside a layer comes from torch's global RNG, so a checkpointed torch RNG state
replays it; per-batch parameters are drawn as device tensors so that no layer forces a
host-device sync in the training step. Crop and Resize need Python ints for the output
size; they draw them from torch's global *CPU* generator, which costs no sync either.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.io import decode_jpeg, encode_jpeg

from arwgan.errors import ConfigError
from arwgan.noise_spec import NoiseSpec, Range, parse_noise, problem_with

# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


class NoiseLayer(nn.Module):
    """Base class: runs :meth:`attack` in float32 (or wider) with autocast off.

    Autocast would run the DCT matmuls and the blur convolution in bf16/fp16, whose short
    mantissa turns JPEG quantisation into noise; the layers are cheap next to the networks,
    so computing them in float32 and casting back costs little.
    """

    def forward(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        dtype = encoded.dtype
        compute_dtype = torch.promote_types(dtype, torch.float32)
        with torch.autocast(encoded.device.type, enabled=False):
            noised = self.attack(encoded.to(compute_dtype), cover.to(compute_dtype))
        return noised.to(dtype)

    def attack(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Identity(nn.Module):
    """No attack: the decoder sees the encoded image as is."""

    def forward(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        return encoded


def _uniform(bounds: Range, device: torch.device) -> torch.Tensor:
    """A scalar drawn uniformly from ``bounds`` on ``device`` (no sync, global RNG)."""
    low, high = bounds
    return low + (high - low) * torch.rand((), device=device)


def _area_to_side(bounds: Range) -> Range:
    """Official ARWGAN reading of a crop/cropout/dropout ratio: the square root (the
    constructor applies ``np.sqrt``), so crop 0.1871 keeps sides of 0.433, 18.7 % of the area."""
    return (math.sqrt(bounds[0]), math.sqrt(bounds[1]))


def _cpu_uniform(bounds: Range) -> float:
    """A float from ``bounds``, from torch's global CPU generator (no device sync)."""
    low, high = bounds
    return low if low == high else low + (high - low) * float(torch.rand(()))


def _window_slices(
    side_height: Range, side_width: Range, height: int, width: int
) -> tuple[slice, slice]:
    """Rows and columns of one random window, drawn on the CPU (no device sync).

    Each side is round(fraction * size), at least 1, with the fraction drawn from its
    own range (the official code drew the width from its lower bound twice: a bug). Every
    start position is equally likely, the last one included (the official
    ``randint(0, size - side)`` never chose it).
    """
    sides = []
    for bounds, size in ((side_height, height), (side_width, width)):
        side = min(size, max(1, round(_cpu_uniform(bounds) * size)))
        start = int(torch.randint(size - side + 1, ()))
        sides.append(slice(start, start + side))
    return sides[0], sides[1]


class Crop(NoiseLayer):
    """Cut a random window out of the encoded image: the decoder sees the smaller image.

    ``crop((hmin,hmax),(wmin,wmax))`` as in the official code: each ratio is an AREA
    fraction per axis pair, so the window's height is sqrt(h) * H with h drawn per batch
    from (hmin, hmax), its width sqrt(w) * W likewise; crop((0.1871,0.1871),(0.1871,0.1871))
    keeps a 0.433 x 0.433 window, 18.7 % of the pixels. Same window for the whole batch.
    """

    def __init__(self, height_range: Range, width_range: Range) -> None:
        super().__init__()
        self.side_height = _area_to_side(height_range)
        self.side_width = _area_to_side(width_range)

    def attack(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        rows, cols = _window_slices(self.side_height, self.side_width, *encoded.shape[-2:])
        return encoded[..., rows, cols]


class Cropout(NoiseLayer):
    """Encoded pixels inside a random window (sized as :class:`Crop`, square-rooted
    ratios), cover pixels outside; the shape is kept."""

    def __init__(self, height_range: Range, width_range: Range) -> None:
        super().__init__()
        self.side_height = _area_to_side(height_range)
        self.side_width = _area_to_side(width_range)

    def attack(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        rows, cols = _window_slices(self.side_height, self.side_width, *encoded.shape[-2:])
        noised = cover.clone()
        noised[..., rows, cols] = encoded[..., rows, cols]
        return noised


class Dropout(NoiseLayer):
    """Keep each encoded pixel with probability p, else take the cover's.

    ``dropout(min,max)`` as in the official code: p is drawn per batch between sqrt(min)
    and sqrt(max), so dropout(0.5477,0.5477) keeps 74 % of the pixels. One (H, W) mask
    for the whole batch and all channels, as officially.
    """

    def __init__(self, keep_range: Range) -> None:
        super().__init__()
        self.keep_range = _area_to_side(keep_range)

    def attack(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        keep = _uniform(self.keep_range, encoded.device)
        height, width = encoded.shape[-2:]
        mask = torch.rand((1, 1, height, width), device=encoded.device) < keep
        return torch.where(mask, encoded, cover)


class Resize(NoiseLayer):
    """Rescale by s (drawn per batch) with nearest-neighbour sampling, NOT resized back:
    the decoder sees the floor(s * H) x floor(s * W) image, as in the official code.

    The output size must be a Python int, so s comes from torch's global CPU generator
    (no device sync); with a fixed scale (min == max, as officially) nothing is drawn.
    """

    def __init__(self, scale_range: Range) -> None:
        super().__init__()
        self.scale_range = scale_range

    def attack(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        scale = _cpu_uniform(self.scale_range)
        height, width = encoded.shape[-2:]
        if math.floor(scale * height) < 1 or math.floor(scale * width) < 1:
            return F.interpolate(encoded, size=(1, 1), mode="nearest")
        return F.interpolate(encoded, scale_factor=scale, mode="nearest")


class GaussianBlur(NoiseLayer):
    """``gaussian(k,s)``: depthwise k x k blur with the official kernel exp(-d^2 / s^2)
    (d the distance to the centre, normalised to sum 1), size kept.

    The official code pads by 1 whatever k (so only k = 3 kept the size) and with zeros
    (a grey frame on [-1, 1] images); here the padding is k // 2, reflected where the image
    is large enough, replicated otherwise. The kernel is separable, so it runs as a
    vertical then a horizontal 1-D convolution.
    """

    def __init__(self, kernel_size: int, sigma: float) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        offsets = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
        taps = torch.exp(-(offsets**2) / sigma**2)
        self.register_buffer("taps", (taps / taps.sum()).float(), persistent=False)

    def attack(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        padded = _pad_same(encoded, self.kernel_size // 2)
        channels = encoded.shape[1]
        taps = self.taps.to(encoded)
        vertical = taps.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
        horizontal = taps.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
        blurred = F.conv2d(padded, vertical, groups=channels)
        return F.conv2d(blurred, horizontal, groups=channels)


class GaussianNoise(NoiseLayer):
    """Add N(0, std^2) noise, std in [-1, 1] image units, drawn per batch from ``std_range``."""

    def __init__(self, std_range: Range) -> None:
        super().__init__()
        self.std_range = std_range

    def attack(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        std = _uniform(self.std_range, encoded.device)
        return encoded + std * torch.randn_like(encoded)


class SaltPepper(NoiseLayer):
    """Set each pixel, with probability p (drawn per batch), to black (-1) or white (+1),
    each as likely; the choice is shared over channels, as a dead or hot sensor pixel."""

    def __init__(self, fraction_range: Range) -> None:
        super().__init__()
        self.fraction_range = fraction_range

    def attack(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        fraction = _uniform(self.fraction_range, encoded.device)
        batch, _, height, width = encoded.shape
        hit = torch.rand((batch, 1, height, width), device=encoded.device) < fraction
        white = torch.rand((batch, 1, height, width), device=encoded.device) < 0.5
        extreme = torch.where(white, 1.0, -1.0).to(encoded.dtype)
        return torch.where(hit, extreme, encoded)


def _pad_same(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad by ``pad`` on every side: reflected where the image is large enough (no dark
    border), replicated otherwise."""
    height, width = x.shape[-2:]
    mode = "reflect" if pad < min(height, width) else "replicate"
    return F.pad(x, (pad, pad, pad, pad), mode=mode)


class Median(NoiseLayer):
    """Median filter over a ``kernel_size`` x ``kernel_size`` window (odd), per channel,
    size kept (padding as :class:`GaussianBlur`).

    Built on ``unfold``, so it holds kernel_size^2 copies of the image: fine for the
    3x3 and 5x5 filters of an evaluation sweep, costly for large kernels. The gradient
    reaches the pixel each median was taken from.
    """

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def attack(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        if k == 1:
            return encoded
        padded = _pad_same(encoded, k // 2)
        windows = padded.unfold(2, k, 1).unfold(3, k, 1)  # (B, C, H, W, k, k), a view
        return windows.reshape(*encoded.shape, k * k).median(dim=-1).values


class Brightness(NoiseLayer):
    """Multiply the intensities, on the [0, 1] scale, by a factor drawn per batch from
    ``factor_range`` (below 1 darkens), then clamp to the valid range."""

    def __init__(self, factor_range: Range) -> None:
        super().__init__()
        self.factor_range = factor_range

    def attack(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        factor = _uniform(self.factor_range, encoded.device)
        return (((encoded + 1) / 2 * factor).clamp(0, 1)) * 2 - 1


class Contrast(NoiseLayer):
    """Scale each image's deviations from its own mean intensity (over channels and
    pixels) by a factor drawn per batch from ``factor_range`` (below 1 flattens), then
    clamp to the valid range. The mean is the same on either scale, so no rescaling."""

    def __init__(self, factor_range: Range) -> None:
        super().__init__()
        self.factor_range = factor_range

    def attack(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        factor = _uniform(self.factor_range, encoded.device)
        mean = encoded.mean(dim=(1, 2, 3), keepdim=True)
        return (mean + factor * (encoded - mean)).clamp(-1, 1)


class ClippedGaussianNoise(NoiseLayer):
    """``Gaussian_noise(m,s)``, the official layer: add n = clip(N(m, s^2), 0, 1), one draw
    per pixel shared by the three channels (so the noise only brightens).

    The official loop ``image[:, i:] += n`` for i = 0, 1, 2 added n once to red, twice to
    green and three times to blue (a slicing bug); here every channel gets n once.
    """

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean = mean
        self.std = std

    def attack(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = encoded.shape
        draw = torch.randn((batch, 1, height, width), device=encoded.device, dtype=encoded.dtype)
        return encoded + (self.mean + self.std * draw).clamp(0, 1)


class Saturation(NoiseLayer):
    """Scale the HSV saturation, on the [0, 1] scale, by a factor drawn per batch from
    ``factor_range`` (clamped to [0, 1] as kornia's ``adjust_saturation``); hue and value
    are kept. The official ``Adjust_hue(h)`` layer is this (it calls AdjustSaturation).

    With hue and value V = max(r, g, b) fixed, every channel is V - S * V * k(hue), so
    scaling S to S' moves each channel to V - (S' / S) (V - c).
    """

    def __init__(self, factor_range: Range) -> None:
        super().__init__()
        self.factor_range = factor_range

    def attack(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        factor = _uniform(self.factor_range, encoded.device)
        rgb = ((encoded + 1) / 2).clamp(0, 1)
        value = rgb.amax(dim=1, keepdim=True)
        spread = value - rgb.amin(dim=1, keepdim=True)
        saturation = spread / value.clamp(min=1e-8)
        new_saturation = (saturation * factor).clamp(0, 1)
        ratio = torch.where(saturation > 0, new_saturation / saturation.clamp(min=1e-8), 0.0)
        return (value - ratio * (value - rgb)) * 2 - 1


class GridCrop(NoiseLayer):
    """``grid_crop(r)``, the official layer: each whole 8x8 block is set to black (-1)
    with probability r, one draw per block for the whole batch; a partial block at the
    right or bottom edge is never touched."""

    BLOCK = 8

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def attack(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        height, width = encoded.shape[-2:]
        rows, cols = height // self.BLOCK, width // self.BLOCK
        hit = torch.rand((rows, cols), device=encoded.device) < self.rate
        hit = hit.repeat_interleave(self.BLOCK, 0).repeat_interleave(self.BLOCK, 1)
        hit = F.pad(hit, (0, width - cols * self.BLOCK, 0, height - rows * self.BLOCK))
        return torch.where(hit, torch.full_like(encoded, -1.0), encoded)


class Quantization(NoiseLayer):
    """``quant()``, the official layer (from HiDDeN): stretch the batch to 0..255 (by its
    minimum and maximum), round with the differentiable 10-term Fourier series
    x - sum_n (-1)^n sin(2 pi n x) / (pi n), and stretch back to the batch's range."""

    TERMS = 10

    def __init__(self) -> None:
        super().__init__()
        n = torch.arange(1, self.TERMS + 1, dtype=torch.float64)
        self.register_buffer("weights", ((-1) ** n / (math.pi * n)).float(), persistent=False)
        self.register_buffer("frequencies", (2 * math.pi * n).float(), persistent=False)

    def attack(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        low, high = encoded.min(), encoded.max()
        pixels = ((encoded - low) / (high - low).clamp(min=1e-12) * 255).clamp(0, 255)
        shape = (-1,) + (1,) * pixels.dim()
        waves = torch.sin(pixels * self.frequencies.to(pixels).view(shape))
        rounded = pixels + (self.weights.to(pixels).view(shape) * waves).sum(dim=0)
        r_low, r_high = rounded.min(), rounded.max()
        return (rounded - r_low) / (r_high - r_low).clamp(min=1e-12) * (high - low) + low


# JPEG ----------------------------------------------------------------------------------

#: Annex K quantisation tables of the JPEG standard (quality 50).
_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
) + ((99,) * 8,) * 4

# Full-range BT.601 (JFIF) colour transform; chroma is centred on 0 here instead of 128
# because the level shift of JPEG (-128) would remove that offset again.
_RGB_TO_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)
# Analog YUV (BT.601), the space of HiDDeN's and the official JPEG-Mask.
_RGB_TO_YUV = (
    (0.299, 0.587, 0.114),
    (-0.14713, -0.28886, 0.436),
    (0.615, -0.51499, -0.10001),
)


def zigzag_mask(keep: int) -> torch.Tensor:
    """(8, 8) mask of the first ``keep`` DCT coefficients in JPEG's zigzag order; row =
    vertical frequency. Anti-diagonals in turn, walked up-right on even ones, down-left
    on odd ones (the order HiDDeN's JPEG-Mask uses)."""
    order = sorted(
        ((u, v) for u in range(8) for v in range(8)),
        key=lambda uv: (uv[0] + uv[1], -uv[1] if (uv[0] + uv[1]) % 2 else uv[1]),
    )
    mask = torch.zeros(8, 8)
    for u, v in order[:keep]:
        mask[u, v] = 1
    return mask


def jpeg_quantization_tables(quality: int) -> torch.Tensor:
    """The (2, 8, 8) luminance and chrominance tables that libjpeg uses at ``quality``.

    Same integer arithmetic as libjpeg's ``jpeg_quality_scaling`` and
    ``jpeg_add_quant_table`` with baseline limits, so quality 50 gives the Annex K tables
    and quality 100 gives all ones.
    """
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    tables = [
        [[min(255, max(1, (value * scale + 50) // 100)) for value in row] for row in table]
        for table in (_LUMA_TABLE, _CHROMA_TABLE)
    ]
    return torch.tensor(tables, dtype=torch.float32)


def _dct_matrix() -> torch.Tensor:
    """The orthonormal 8-point DCT-II matrix D (coefficients = D @ block @ D.T)."""
    n = torch.arange(8, dtype=torch.float64)
    basis = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16)
    basis[0] /= math.sqrt(2)
    return (basis / 2).float()


def differentiable_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) + (x - round(x))^3: equal to rounding within 0.125, with a usable gradient.

    Plain rounding has zero gradient almost everywhere; this approximation (Shin & Song,
    2017) keeps a small gradient, so the encoder learns from quantisation.
    """
    rounded = torch.round(x)
    return rounded + (x - rounded) ** 3


class _BlockDctJpeg(NoiseLayer):
    """RGB -> YCbCr -> 8x8 block DCT -> :meth:`process` -> inverse, on the input's device.

    Pixels are mapped to JPEG's 0..255 scale with the -128 level shift, so that the
    standard quantisation tables apply unchanged. The image is padded to a multiple of 8
    by edge replication (as libjpeg does) and the padding is cropped afterwards.
    """

    def __init__(self, rgb_to_colour=_RGB_TO_YCBCR) -> None:
        super().__init__()
        self.register_buffer("dct", _dct_matrix(), persistent=False)
        to_ycbcr = torch.tensor(rgb_to_colour, dtype=torch.float64)
        self.register_buffer("rgb_to_ycbcr", to_ycbcr.float(), persistent=False)
        self.register_buffer("ycbcr_to_rgb", torch.linalg.inv(to_ycbcr).float(), persistent=False)

    def attack(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        height, width = encoded.shape[-2:]
        dct = self.dct.to(encoded)
        shifted = encoded * 127.5 - 0.5  # [-1, 1] -> [0, 255], minus the level shift 128
        ycbcr = torch.einsum("dc,bchw->bdhw", self.rgb_to_ycbcr.to(encoded), shifted)
        padded = F.pad(ycbcr, (0, -width % 8, 0, -height % 8), mode="replicate")
        batch, channels, padded_height, padded_width = padded.shape
        blocks = padded.reshape(batch, channels, padded_height // 8, 8, padded_width // 8, 8)
        coefficients = torch.einsum("uh,bcihjw,vw->bciujv", dct, blocks, dct)
        blocks = torch.einsum("uh,bciujv,vw->bcihjw", dct, self.process(coefficients), dct)
        ycbcr = blocks.reshape(padded.shape)[..., :height, :width]
        rgb = torch.einsum("dc,bchw->bdhw", self.ycbcr_to_rgb.to(encoded), ycbcr)
        return (rgb + 0.5) / 127.5

    def process(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Change the (B, 3, H/8, 8, W/8, 8) YCbCr DCT coefficients; u and v are dims 3, 5."""
        raise NotImplementedError

    @staticmethod
    def _per_channel(tables: torch.Tensor) -> torch.Tensor:
        """(3, 8, 8) per-channel tables shaped to broadcast against the coefficients."""
        return tables[:, None, :, None, :]


class JpegMask(_BlockDctJpeg):
    """``jpeg()``, HiDDeN's and the official JPEG-Mask: in analog YUV, keep the first 25
    DCT coefficients of Y and 9 of U and V in zigzag order, zero the rest.

    A fixed, linear and differentiable stand-in for JPEG's loss of high frequencies. The
    image is padded to a multiple of 8 by edge replication (officially with zeros).
    """

    def __init__(self) -> None:
        super().__init__(_RGB_TO_YUV)
        keep = torch.stack([zigzag_mask(25), zigzag_mask(9), zigzag_mask(9)])
        self.register_buffer("keep", self._per_channel(keep), persistent=False)

    def process(self, coefficients: torch.Tensor) -> torch.Tensor:
        return coefficients * self.keep.to(coefficients)


class JpegDiff(_BlockDctJpeg):
    """Differentiable JPEG at ``quality``: libjpeg's tables, quantised with
    :func:`differentiable_round`, on the input's device, gradient kept. ``Jpeg(Q)`` (the
    official layer) and ``jpeg(Q)`` build it.

    Like the official simulation it does not subsample chroma (its ``downsample_c`` is
    off); unlike it, it does not clamp to [0, 255] (that would only remove gradient).
    """

    def __init__(self, quality: int) -> None:
        super().__init__()
        self.quality = quality
        luma, chroma = jpeg_quantization_tables(quality)
        steps = torch.stack([luma, chroma, chroma])
        self.register_buffer("steps", self._per_channel(steps), persistent=False)

    def process(self, coefficients: torch.Tensor) -> torch.Tensor:
        steps = self.steps.to(coefficients)
        return differentiable_round(coefficients / steps) * steps


class JpegReal(NoiseLayer):
    """Real JPEG at ``quality`` (libjpeg through torchvision, on the CPU, uint8).

    Forward is the real codec; backward is the identity (straight-through), because the
    codec has no gradient. Costs a device round trip: meant for evaluation.
    """

    def __init__(self, quality: int) -> None:
        super().__init__()
        self.quality = quality

    def attack(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        pixels = ((encoded.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        decoded = decode_jpeg(encode_jpeg(list(pixels), quality=self.quality))
        compressed = torch.stack(decoded).to(encoded.device, encoded.dtype) / 127.5 - 1
        return encoded + (compressed - encoded).detach()


#: The module each layer name builds (names and argument checks: arwgan.noise_spec.RULES).
_BUILDERS: dict[str, Callable[[tuple], nn.Module]] = {
    "identity": lambda args: Identity(),
    "crop": lambda args: Crop(*args),
    "cropout": lambda args: Cropout(*args),
    "dropout": lambda args: Dropout(args),
    "resize": lambda args: Resize(args),
    "jpeg": lambda args: JpegDiff(args[0]) if args else JpegMask(),
    "jpegreal": lambda args: JpegReal(args[0]),
    "gaussian": lambda args: GaussianBlur(*args),
    "gaussian_noise": lambda args: GaussianNoise((args[0], args[-1])),
    # Real-image attacks for evaluation sweeps (usable in training too). A single
    # argument is a fixed value, two are a (min, max) range drawn per batch.
    "salt_pepper": lambda args: SaltPepper((args[0], args[-1])),
    "median": lambda args: Median(args[0]),
    "brightness": lambda args: Brightness((args[0], args[-1])),
    "contrast": lambda args: Contrast((args[0], args[-1])),
    "saturation": lambda args: Saturation((args[0], args[-1])),
    # The official ARWGAN names (case matters, as in its parser), with its meanings.
    "Jpeg": lambda args: JpegDiff(args[0] if args[0] else 50),
    "sp": lambda args: SaltPepper((2 * args[0], 2 * args[0])),
    "Gaussian_noise": lambda args: ClippedGaussianNoise(*args),
    "Median_filter": lambda args: Median(args[0]),
    "Adjust_hue": lambda args: Saturation((args[0], args[0])),
    "Adjust_contrast": lambda args: Brightness((args[0], args[0])),
    "grid_crop": lambda args: GridCrop(args[0]),
    "quant": lambda args: Quantization(),
}


def build_layer(spec: NoiseSpec) -> nn.Module:
    """The module for one layer spec (validated again: a spec may be built by hand)."""
    problem = problem_with(spec)
    if problem is not None:
        raise ConfigError(f"bad noise layer '{spec}': {problem}")
    return _BUILDERS[spec.name](spec.args)


def build_noise_layers(spec: str) -> list[nn.Module]:
    """The modules of a noise spec string, without the implicit Identity."""
    return [build_layer(layer) for layer in parse_noise(spec)]


# --------------------------------------------------------------------------------------
# Noiser
# --------------------------------------------------------------------------------------


class Noiser(nn.Module):
    """Applies one layer of ``[Identity, *configured]``, drawn uniformly per call.

    ``layers``, ``specs`` and ``names`` (grammar text, ``'identity'`` first) are parallel.

    The choice comes from the Noiser's own CPU generator seeded with ``seed``: drawing it
    costs no device sync, and it does not shift the global RNG streams that the layers and
    the data pipeline use. Save it with :meth:`get_rng_state` to resume a run exactly.
    """

    def __init__(self, spec: str, seed: int) -> None:
        super().__init__()
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"noise seed must be an integer, got {seed!r}")
        configured = parse_noise(spec)
        self.specs: list[NoiseSpec] = [NoiseSpec("identity"), *configured]
        self.layers = nn.ModuleList([build_layer(s) for s in self.specs])
        self.names: list[str] = ["identity", *(str(s) for s in configured)]
        self._generator = torch.Generator().manual_seed(seed)

    def forward(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        choice = int(torch.randint(len(self.layers), (), generator=self._generator))
        return self.layers[choice](encoded, cover)

    def attack_names(self) -> list[str]:
        """Grammar text of the configured layers, without the implicit identity."""
        return self.names[1:]

    def index_of(self, name: str) -> int:
        """Position of a layer in :attr:`names`, given its grammar text (spacing free) or,
        when only one layer has it, its bare name such as ``'jpeg'``."""
        if name in self.names:
            return self.names.index(name)
        kinds = [s.name for s in self.specs]
        if kinds.count(name) == 1:
            return kinds.index(name)
        try:
            parsed = parse_noise(name) if name.strip() else None
        except ConfigError:
            parsed = None
        if parsed is not None and len(parsed) <= 1:
            canonical = str(parsed[0]) if parsed else "identity"  # 'identity()' parses to []
            if canonical in self.names:
                return self.names.index(canonical)
        raise ConfigError(f"unknown attack {name!r} (configured: {', '.join(self.names)})")

    def apply(self, name_or_index, encoded=None, cover=None):
        """Apply one layer, by name or index, to every image of the batch (evaluation
        under a single attack).

        Called with a function alone it is ``nn.Module.apply``: a parent module's
        ``apply(init_fn)`` recurses into its children, and must keep working when a
        Noiser is one of them.
        """
        if callable(name_or_index):
            return super().apply(name_or_index)
        if encoded is None or cover is None:
            raise TypeError("Noiser.apply(name_or_index, encoded, cover) needs both images")
        if isinstance(name_or_index, int):
            if not 0 <= name_or_index < len(self.layers):
                raise ConfigError(
                    f"attack index {name_or_index} out of range 0..{len(self.layers) - 1}"
                )
            index = name_or_index
        else:
            index = self.index_of(name_or_index)
        return self.layers[index](encoded, cover)

    def get_rng_state(self) -> torch.Tensor:
        """State of the layer-choice generator, for a checkpoint."""
        return self._generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore the layer-choice generator from :meth:`get_rng_state`."""
        self._generator.set_state(state)
