"""PSNR, SSIM, bit accuracy and MetricSums against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from arwgan.metrics import (
    SSIM_C1,
    SSIM_C2,
    MetricSums,
    bit_accuracy_per_image,
    mse_per_image,
    psnr_per_image,
    ssim_per_image,
)


def _full(value: float, batch: int = 1, size: int = 16) -> torch.Tensor:
    return torch.full((batch, 3, size, size), value)


# -- PSNR --------------------------------------------------------------------------------


def test_psnr_of_a_constant_offset() -> None:
    # MSE = 0.1^2 = 0.01 on [-1, 1]; peak-to-peak 2, so 10 log10(4 / 0.01) = 10 log10(400).
    psnr = psnr_per_image(_full(0.0), _full(0.1))
    assert psnr.shape == (1,)
    assert psnr.item() == pytest.approx(10 * math.log10(400), abs=1e-4)
    assert psnr.item() == pytest.approx(26.0206, abs=1e-4)


def test_psnr_equals_the_usual_psnr_on_unit_range() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 8, 8, generator=generator) * 2 - 1
    b = torch.rand(3, 3, 8, 8, generator=generator) * 2 - 1
    a01, b01 = (a + 1) / 2, (b + 1) / 2
    expected = 10 * torch.log10(1.0 / ((a01 - b01) ** 2).flatten(1).mean(1))
    torch.testing.assert_close(psnr_per_image(a, b), expected, rtol=1e-5, atol=1e-4)


def test_psnr_per_image_and_identical_images() -> None:
    a = torch.cat([_full(0.0), _full(0.0), _full(0.5)])
    b = torch.cat([_full(0.0), _full(-1.0), _full(0.5)])
    psnr = psnr_per_image(a, b)
    assert psnr[0].item() == math.inf
    # MSE 1: 10 log10(4) dB.
    assert psnr[1].item() == pytest.approx(10 * math.log10(4), abs=1e-5)
    assert psnr[2].item() == math.inf


def test_mse_per_image_hand_values() -> None:
    a = torch.zeros(2, 3, 2, 2)
    b = torch.zeros(2, 3, 2, 2)
    b[0, 0, 0, 0] = 1.2  # one pixel of 12: MSE 1.44 / 12
    b[1] = -0.5
    torch.testing.assert_close(mse_per_image(a, b), torch.tensor([1.44 / 12, 0.25]))


# -- SSIM --------------------------------------------------------------------------------


def test_ssim_of_identical_images_is_one() -> None:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 24, 24, generator=generator) * 2 - 1
    ssim = ssim_per_image(images, images.clone())
    assert ssim.shape == (2,)
    torch.testing.assert_close(ssim, torch.ones(2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("a_value, b_value", [(0.0, 0.2), (-0.6, 0.4), (0.9, -0.9)])
def test_ssim_of_constant_images_by_hand(a_value: float, b_value: float) -> None:
    # On [0, 1]: mu = (v + 1) / 2. Constant images have var = cov = 0, so the structure
    # term (2 cov + C2) / (var_a + var_b + C2) is 1 and SSIM = luminance term alone.
    # Tolerance: the variances are E[x^2] - E[x]^2 in float32, whose cancellation leaves
    # about 1e-6 where mu is near 1; next to C2 = 9e-4 that moves SSIM by up to ~1e-3 of
    # its value (measured: 1e-4 absolute at most for these three pairs).
    mu_a, mu_b = (a_value + 1) / 2, (b_value + 1) / 2
    c1 = 0.01**2  # Wang et al.: (K1 L)^2 with K1 = 0.01, L = 1
    expected = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    ssim = ssim_per_image(_full(a_value, size=16), _full(b_value, size=16))
    assert ssim.item() == pytest.approx(expected, abs=3e-4)


def test_ssim_constants_and_window() -> None:
    assert SSIM_C1 == pytest.approx(0.01**2)
    assert SSIM_C2 == pytest.approx(0.03**2)
    # Images smaller than the 11x11 window still give one value each.
    ssim = ssim_per_image(_full(0.0, batch=2, size=6), _full(0.2, batch=2, size=6))
    assert ssim.shape == (2,)


def test_ssim_decreases_with_noise_and_is_per_image() -> None:
    generator = torch.Generator().manual_seed(2)
    cover = torch.rand(1, 3, 24, 24, generator=generator) * 2 - 1
    noise = torch.randn(1, 3, 24, 24, generator=generator)
    batch_a = torch.cat([cover, cover, cover])
    batch_b = torch.cat([cover, cover + 0.05 * noise, cover + 0.3 * noise])
    ssim = ssim_per_image(batch_a, batch_b)
    assert ssim[0].item() == pytest.approx(1.0, abs=1e-6)
    assert 1.0 > ssim[1].item() > ssim[2].item()
    # Per image: the second image's score does not depend on its batch neighbours.
    alone = ssim_per_image(cover, cover + 0.05 * noise)
    torch.testing.assert_close(ssim[1:2], alone)


def test_ssim_is_differentiable() -> None:
    generator = torch.Generator().manual_seed(3)
    cover = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    encoded = (cover + 0.1 * torch.randn(2, 3, 16, 16, generator=generator)).requires_grad_()
    loss = 1 - ssim_per_image(encoded, cover).mean()
    loss.backward()
    assert encoded.grad is not None
    assert encoded.grad.shape == encoded.shape
    assert torch.isfinite(encoded.grad).all()
    assert encoded.grad.abs().sum() > 0


def test_ssim_under_bf16_autocast_matches_float32() -> None:
    # The variances are E[x^2] - E[x]^2: in bf16 they cancel to noise, so SSIM must stay
    # in float32 even inside the train step's autocast region.
    generator = torch.Generator().manual_seed(4)
    cover = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    encoded = cover + 0.05 * torch.randn(2, 3, 16, 16, generator=generator)
    encoded, cover = encoded.bfloat16(), cover.bfloat16()
    reference = ssim_per_image(encoded.float(), cover.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = ssim_per_image(encoded, cover)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference, rtol=0, atol=1e-6)


# -- bit accuracy ------------------------------------------------------------------------


def test_bit_accuracy_hand_example() -> None:
    message = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    decoded = torch.tensor(
        [
            [0.9, 0.1, 0.51, 0.49],  # all four right
            [0.5, -3.0, 0.5, 2.0],  # 0.5 reads as 0: right, right, wrong, right
        ]
    )
    torch.testing.assert_close(
        bit_accuracy_per_image(decoded, message), torch.tensor([1.0, 0.75])
    )


def test_bit_accuracy_extremes_and_dtypes() -> None:
    message = torch.tensor([[1.0, 1.0, 0.0]])
    assert bit_accuracy_per_image(1 - message, message).item() == 0.0
    assert bit_accuracy_per_image(message.to(torch.bfloat16), message).item() == 1.0
    assert bit_accuracy_per_image(message, message.bool()).item() == 1.0


# -- MetricSums --------------------------------------------------------------------------


def test_metric_sums_means_over_all_images() -> None:
    sums = MetricSums()
    sums.add("psnr", torch.tensor([30.0, 40.0]))
    sums.add("psnr", torch.tensor([50.0]))
    sums.add("bitacc_identity", torch.tensor([1.0, 0.5, 0.75, 0.25]))
    means = sums.means()
    assert means == {"bitacc_identity": pytest.approx(0.625), "psnr": pytest.approx(40.0)}
    assert list(means) == ["bitacc_identity", "psnr"]


def test_metric_sums_empty_and_detached() -> None:
    assert MetricSums().means() == {}
    sums = MetricSums()
    value = torch.tensor([1.0, 3.0], requires_grad=True)
    sums.add("x", value * 2)
    names, totals, counts = sums.sums_and_counts()
    assert names == ["x"]
    assert not totals.requires_grad
    assert totals.tolist() == [8.0]
    assert counts.tolist() == [2.0]
    assert sums.means() == {"x": 4.0}


def _pytorch_ssim_by_hand(a, b) -> float:
    """SSIM as pytorch-ssim (the official ARWGAN loss) defines it, pixel by pixel in
    float64: each local statistic is a Gaussian-weighted sum over the 11x11 window
    around the pixel, pixels outside the image counting as 0 (zero "same" padding)."""
    import math

    g = [math.exp(-((x - 5) ** 2) / (2 * 1.5**2)) for x in range(11)]
    g = [v / sum(g) for v in g]
    channels, height, width = a.shape
    total = 0.0
    for c in range(channels):
        for row in range(height):
            for col in range(width):
                s = {"a": 0.0, "b": 0.0, "aa": 0.0, "bb": 0.0, "ab": 0.0}
                for i in range(11):
                    for j in range(11):
                        y, x = row + i - 5, col + j - 5
                        if 0 <= y < height and 0 <= x < width:
                            w = g[i] * g[j]
                            pa, pb = float(a[c, y, x]), float(b[c, y, x])
                            s["a"] += w * pa
                            s["b"] += w * pb
                            s["aa"] += w * pa * pa
                            s["bb"] += w * pb * pb
                            s["ab"] += w * pa * pb
                var_a, var_b = s["aa"] - s["a"] ** 2, s["bb"] - s["b"] ** 2
                cov = s["ab"] - s["a"] * s["b"]
                c1, c2 = 0.01**2, 0.03**2
                total += ((2 * s["a"] * s["b"] + c1) * (2 * cov + c2)) / (
                    (s["a"] ** 2 + s["b"] ** 2 + c1) * (var_a + var_b + c2)
                )
    return total / (channels * height * width)


def test_official_ssim_form_matches_pytorch_ssim_computed_by_hand():
    from arwgan.metrics import ssim_official_per_image

    generator = torch.Generator().manual_seed(0)
    textured = torch.rand(1, 3, 12, 12, generator=generator) * 1.6 - 0.8
    shifted = textured + 0.05  # a flat colour shift, on the [-1, 1] scale
    got = float(ssim_official_per_image(shifted, textured)[0])
    assert got == pytest.approx(_pytorch_ssim_by_hand(shifted[0], textured[0]), abs=1e-5)
    # The reported form (on [0, 1], 'valid') charges the same shift far less.
    assert 1 - float(ssim_per_image(shifted, textured)[0]) < (1 - got) / 3


# -- against an independent implementation -------------------------------------------


def _textured(seed: int, size: int = 32) -> np.ndarray:
    """A (3, size, size) image in [0, 1] with texture at several scales: smooth ramps,
    stripes and pixel noise, so that every SSIM window sees real variance."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = []
    for c in range(3):
        ramp = 0.5 + 0.3 * np.sin(2 * np.pi * (x * (c + 1) + y * rng.uniform(0.5, 2)))
        stripes = 0.15 * np.sign(np.sin(2 * np.pi * x * rng.integers(3, 7)))
        channels.append(ramp + stripes + 0.1 * rng.standard_normal((size, size)))
    return np.clip(np.stack(channels), 0, 1)


def _ssim_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two (C, H, W) images on [0, 1], written from Wang et al. (2004): an
    11x11 Gaussian window of sigma 1.5 normalised to sum 1, placed at every position
    where it fits inside the image; per window the weighted means, variances and
    covariance (weighted sums of deviations from the window's mean); K1 = 0.01,
    K2 = 0.03, L = 1; the mean over windows and channels."""
    size, sigma = 11, 1.5
    offsets = np.arange(size) - (size - 1) / 2
    g = np.exp(-(offsets**2) / (2 * sigma**2))
    weights = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 1) ** 2, (0.03 * 1) ** 2
    values = []
    channels, height, width = a.shape
    for c in range(channels):
        for i in range(height - size + 1):
            for j in range(width - size + 1):
                x = a[c, i : i + size, j : j + size]
                y = b[c, i : i + size, j : j + size]
                mx, my = (weights * x).sum(), (weights * y).sum()
                vx = (weights * (x - mx) ** 2).sum()
                vy = (weights * (y - my) ** 2).sum()
                cov = (weights * (x - mx) * (y - my)).sum()
                values.append(
                    ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
                )
    return float(np.mean(values))


def _as_model_range(unit: np.ndarray) -> torch.Tensor:
    """A [0, 1] numpy image as a (1, C, H, W) float32 tensor in the models' [-1, 1]."""
    return torch.from_numpy(unit * 2 - 1).float()[None]


@pytest.mark.parametrize("noise", [0.02, 0.1, 0.3])
def test_ssim_matches_an_independent_implementation_on_textured_images(noise: float) -> None:
    cover = _textured(0)
    rng = np.random.default_rng(1)
    distorted = np.clip(cover + noise * rng.standard_normal(cover.shape), 0, 1)
    expected = _ssim_numpy(cover, distorted)
    got = ssim_per_image(_as_model_range(cover), _as_model_range(distorted)).item()
    assert got == pytest.approx(expected, abs=1e-5)


def test_psnr_matches_the_textbook_formula_on_textured_images() -> None:
    cover, other = _textured(2), _textured(3)
    mse = np.mean((cover - other) ** 2)  # on [0, 1], peak 1
    expected = 10 * np.log10(1.0 / mse)
    got = psnr_per_image(_as_model_range(cover), _as_model_range(other)).item()
    assert got == pytest.approx(expected, abs=1e-3)
