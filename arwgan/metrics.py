"""Image-quality and decoding metrics. Images are in [-1, 1]; results stay on the device
(callers decide when to pay for ``.item()``)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def mse_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def psnr_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB on [-1, 1] images: peak-to-peak 2, so 10 log10(4 / MSE).

    Equal to the usual PSNR on [0, 1] images with peak 1. Identical images give +inf.
    """
    return 10 * torch.log10(4.0 / mse_per_image(a, b))


@functools.lru_cache(maxsize=8)
def _gaussian_window_cpu(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """The window on ``device``. On a GPU it is built there from a few tiny kernels: a CPU
    tensor copied per call is a pageable host-to-device copy, which waits for the GPU to
    catch up (a host sync in every train step). Not cached on the GPU: a cached tensor
    would hold one of the allocator's 2 MiB blocks for the life of the process."""
    if device.type == "cpu":
        return _gaussian_window_cpu(size, sigma)
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim_per_image(
    a: torch.Tensor, b: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA
) -> torch.Tensor:
    """Mean SSIM per image, computed on [0, 1] (so C1 = 0.01^2 and C2 = 0.03^2 hold): the
    form every report, log and table shows as SSIM (the loss may use another form, see
    :func:`ssim_official_per_image`).

    Gaussian window (11x11, sigma 1.5), 'valid' filtering as in Wang et al.; images
    smaller than the window use a window of their own size. Differentiable.

    Always computed in float32, autocast or not: the variances are differences of
    nearly equal averages (E[x^2] - E[x]^2), which in bf16 cancel to noise, go
    negative and make the ratio explode.
    """
    with torch.autocast(a.device.type, enabled=False):
        return _ssim_float32(a.float(), b.float(), window, sigma)


def _ssim_float32(a: torch.Tensor, b: torch.Tensor, window: int, sigma: float) -> torch.Tensor:
    a = (a + 1) / 2
    b = (b + 1) / 2
    channels = a.shape[1]
    size = min(window, a.shape[-1], a.shape[-2])
    kernel = _gaussian_window(size, sigma, a.device)
    return _mean_ssim(a, b, kernel.expand(channels, 1, size, size), padding=0)


def _mean_ssim(a: torch.Tensor, b: torch.Tensor, kernel: torch.Tensor, padding: int) -> torch.Tensor:
    """Mean of the SSIM map per image: local statistics are ``kernel``-weighted sums per
    channel (zero ``padding`` around the image), C1 = 0.01^2, C2 = 0.03^2."""
    channels = a.shape[1]

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, padding=padding, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    )
    return ssim_map.flatten(1).mean(dim=1)


def ssim_official_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per image in the official ARWGAN loss form (pytorch-ssim): the raw
    [-1, 1] tensors, 11x11 Gaussian window (sigma 1.5), zero padding of 5 ("same"), the
    same C1 = 0.01^2 and C2 = 0.03^2. Differentiable; float32 as :func:`ssim_per_image`.

    This is the TRAINING form (``ModelConfig.ssim_loss = "official"``). Its constants are
    four times smaller relative to the [-1, 1] range and its zero padding compares
    every border window against black-grey, so a flat colour shift costs far more than
    in :func:`ssim_per_image`, which is the form REPORTED as SSIM everywhere.
    """
    with torch.autocast(a.device.type, enabled=False):
        a, b = a.float(), b.float()
        channels = a.shape[1]
        kernel = _gaussian_window_cpu(SSIM_WINDOW, SSIM_SIGMA).to(a.device)
        kernel = kernel.expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)
        return _mean_ssim(a, b, kernel, padding=SSIM_WINDOW // 2)


#: The SSIM forms a training loss can use (``ModelConfig.ssim_loss``).
SSIM_LOSS_FORMS = {"official": ssim_official_per_image, "unit": ssim_per_image}


def bit_accuracy_per_image(decoded: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
    """Fraction of bits with ``(decoded > 0.5) == message`` per image."""
    return ((decoded.float() > 0.5) == (message > 0.5)).float().mean(dim=1)


class MetricSums:
    """Running sums of per-image metrics kept on the device (no sync until ``means``)."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}

    def add(self, name: str, per_image: torch.Tensor) -> None:
        total = per_image.detach().float().sum()
        self._sums[name] = self._sums[name] + total if name in self._sums else total
        self._count[name] = self._count.get(name, 0) + per_image.numel()

    def sums_and_counts(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        names = sorted(self._sums)
        sums = torch.stack([self._sums[n] for n in names]) if names else torch.zeros(0)
        counts = torch.tensor([float(self._count[n]) for n in names], device=sums.device)
        return names, sums, counts

    def means(self) -> dict[str, float]:
        """One device sync for all metrics."""
        names, sums, counts = self.sums_and_counts()
        values = (sums / counts.clamp(min=1)).tolist()
        return dict(zip(names, values))
