"""Noise layers, the official ARWGAN grammar parser and the Noiser, on small CPU tensors.

Expected values come from the official code's meaning (read from river-huang/ARWGAN's
noise_layers/), restated here by hand: square-rooted crop/cropout/dropout ratios, a crop
that returns the cut window, nearest resize without resizing back, and so on."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from arwgan.config import OFFICIAL_NOISE
from arwgan.errors import ConfigError
from arwgan.noise import (
    Brightness,
    ClippedGaussianNoise,
    Contrast,
    Crop,
    Cropout,
    Dropout,
    GaussianBlur,
    GaussianNoise,
    GridCrop,
    Identity,
    JpegDiff,
    JpegMask,
    JpegReal,
    Median,
    NoiseSpec,
    Noiser,
    Quantization,
    Resize,
    SaltPepper,
    Saturation,
    build_layer,
    build_noise_layers,
    differentiable_round,
    jpeg_quantization_tables,
    parse_noise,
    zigzag_mask,
)

SHAPES = [(2, 3, 32, 32), (2, 3, 24, 40)]

ALL_LAYERS = {
    "identity": "identity()",
    "crop": "crop((0.2,0.25),(0.3,0.5))",
    "cropout": "cropout((0.55,0.6),(0.4,0.6))",
    "dropout": "dropout(0.55,0.6)",
    "resize": "resize(0.7,0.8)",
    "resize_up": "resize(1.5,1.5)",
    "jpeg_mask": "jpeg()",
    "jpeg_diff": "jpeg(50)",
    "jpegreal": "jpegreal(75)",
    "blur": "gaussian(3,2.0)",
    "blur7": "gaussian(7,1.5)",
    "noise": "gaussian_noise(0.05)",
    "noise_range": "gaussian_noise(0.01,0.1)",
    "salt_pepper": "salt_pepper(0.05)",
    "salt_pepper_range": "salt_pepper(0.01,0.1)",
    "median3": "median(3)",
    "median5": "median(5)",
    "brightness": "brightness(1.3)",
    "brightness_range": "brightness(0.7,0.9)",
    "contrast": "contrast(0.7)",
    "contrast_range": "contrast(1.1,1.5)",
    "saturation": "saturation(0.5,1.5)",
    # The official names.
    "Jpeg": "Jpeg(0)",
    "sp": "sp(0.05)",
    "Gaussian_noise": "Gaussian_noise(0,0.1)",
    "Median_filter": "Median_filter(3)",
    "Adjust_hue": "Adjust_hue(1.5)",
    "Adjust_contrast": "Adjust_contrast(0.8)",
    "grid_crop": "grid_crop(0.3)",
    "quant": "quant()",
}
#: Layers that return another size, as the official crop and resize do.
RESIZING = {"crop", "resize", "resize_up"}


def layer(text: str):
    """The module of a one-layer spec (identity included, which parse_noise drops)."""
    if text == "identity()":
        return build_layer(NoiseSpec("identity"))
    (spec,) = parse_noise(text)
    return build_layer(spec)


def smooth_image(batch: int, height: int, width: int) -> torch.Tensor:
    """A low-frequency colour image in [-0.8, 0.8] (JPEG loses little of it)."""
    ys = torch.linspace(0, math.pi, height)[:, None]
    xs = torch.linspace(0, math.pi, width)[None, :]
    channels = [torch.sin(ys + phase) * torch.cos(xs * 0.7 - phase) for phase in (0.0, 0.8, 1.6)]
    image = 0.8 * torch.stack(channels)
    return image.expand(batch, 3, height, width).clone()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4 / torch.mean((a - b) ** 2)))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


# --- every layer ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=["square", "wide"])
@pytest.mark.parametrize("text", ALL_LAYERS.values(), ids=ALL_LAYERS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_keeps_shape_and_dtype(text, shape, dtype):
    encoded = (torch.rand(shape) * 2 - 1).to(dtype)
    cover = (torch.rand(shape) * 2 - 1).to(dtype)
    noised = layer(text)(encoded, cover)
    if text in (ALL_LAYERS[name] for name in RESIZING):
        assert noised.shape[:2] == encoded.shape[:2] and noised.shape != encoded.shape
    else:
        assert noised.shape == encoded.shape
    assert noised.dtype == dtype
    assert torch.isfinite(noised.float()).all()


@pytest.mark.parametrize("text", ALL_LAYERS.values(), ids=ALL_LAYERS.keys())
def test_layer_gives_finite_nonzero_gradient(text):
    encoded = (torch.rand(2, 3, 24, 40) * 2 - 1).requires_grad_()
    cover = torch.rand(2, 3, 24, 40) * 2 - 1
    noised = layer(text)(encoded, cover)
    (noised * torch.randn_like(noised)).sum().backward()
    assert torch.isfinite(encoded.grad).all()
    assert encoded.grad.abs().sum() > 0


def test_layer_keeps_dtype_under_autocast():
    encoded = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        noised = layer("jpeg(50)")(encoded, encoded)
    assert noised.dtype == torch.float32


def test_identity_returns_encoded():
    encoded = torch.rand(2, 3, 8, 8)
    assert Identity()(encoded, torch.zeros_like(encoded)) is encoded


# --- crop, cropout, dropout --------------------------------------------------------------


@pytest.mark.parametrize(
    ("height_range", "width_range", "size", "window"),
    [
        # Official: side = round(sqrt(ratio) * size).
        ((0.25, 0.25), (0.0625, 0.0625), (32, 32), (16, 8)),
        ((0.0625, 0.0625), (0.25, 0.25), (32, 32), (8, 16)),
        # sqrt(0.1871) = 0.4326: 13.84 -> 14 px of 32, 10.38 -> 10 of 24, 17.30 -> 17 of 40.
        ((0.1871, 0.1871), (0.1871, 0.1871), (32, 32), (14, 14)),
        ((0.1871, 0.1871), (0.1871, 0.1871), (24, 40), (10, 17)),
        ((0.0001, 0.0001), (1, 1), (24, 40), (1, 40)),
    ],
)
def test_crop_returns_the_window_cut_out_with_square_rooted_ratios(
    height_range, width_range, size, window
):
    image = torch.arange(2 * 3 * size[0] * size[1], dtype=torch.float32).view(2, 3, *size)
    cropped = Crop(height_range, width_range)(image, -image)
    assert cropped.shape == (2, 3, *window)
    # The cut is one contiguous window of the input, the same for every image.
    top, left = divmod(int(cropped[0, 0, 0, 0]), size[1])
    assert torch.equal(cropped, image[:, :, top : top + window[0], left : left + window[1]])


def test_official_crop_leaves_18_7_percent_of_the_area():
    image = torch.zeros(1, 3, 128, 128)
    cropped = Crop((0.1871, 0.1871), (0.1871, 0.1871))(image, image)
    # sqrt(0.1871) * 128 = 55.37 -> 55 px a side: 3025 / 16384 = 18.46 % (rounding).
    assert cropped.shape == (1, 3, 55, 55)
    assert abs(cropped[0, 0].numel() / 128**2 - 0.1871) < 2 * 128 / 128**2


def test_crop_window_moves_and_draws_sizes_in_range():
    image = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32).expand(1, 3, 32, 32)
    crop = Crop((0.25, 0.5), (0.5, 0.75))
    windows = set()
    for _ in range(60):
        cropped = crop(image, image)
        rows, cols = cropped.shape[-2:]
        # Sides sqrt(0.25..0.5) = 0.5..0.707 of 32 and sqrt(0.5..0.75) = 0.707..0.866.
        assert 16 <= rows <= 23 and 23 <= cols <= 28
        windows.add((int(cropped[0, 0, 0, 0]), rows, cols))
    assert len(windows) > 10
    # The width is drawn from its own range (the official code used its lower bound twice).
    assert len({cols for _, _, cols in windows}) > 1


def test_crop_can_start_at_the_last_position():
    image = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4).expand(1, 3, 2, 4)
    starts = {int(Crop((1, 1), (0.5625, 0.5625))(image, image)[0, 0, 0, 0]) for _ in range(60)}
    assert starts == {0, 1}  # a 3-wide window in 4 columns: both starts, the last included


def test_cropout_takes_outside_from_cover():
    ones = torch.ones(2, 3, 32, 32)
    noised = Cropout((0.25, 0.25), (0.0625, 0.0625))(ones, -ones)
    assert noised.shape == ones.shape
    assert int((noised == 1).sum()) == 2 * 3 * 16 * 8
    assert int((noised == -1).sum()) == 2 * 3 * (32 * 32 - 16 * 8)


def test_dropout_keeps_square_root_of_ratio_one_mask_per_batch():
    ones = torch.ones(4, 3, 64, 64)
    noised = Dropout((0.5477, 0.5477))(ones, -ones)
    assert set(noised.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(noised, noised[:1, :1].expand_as(noised))  # one mask, as officially
    kept = float((noised[0, 0] == 1).float().mean())
    assert abs(kept - math.sqrt(0.5477)) < 0.025  # 0.74; 4096 draws: std 0.007


def test_dropout_keeps_74_percent_in_expectation():
    ones = torch.ones(1, 3, 32, 32)
    layer_ = Dropout((0.5477, 0.5477))
    kept = sum(float((layer_(ones, -ones) == 1).float().mean()) for _ in range(50)) / 50
    assert abs(kept - 0.7401) < 0.01  # 51k draws: std 0.002


def test_dropout_keep_one_is_identity():
    encoded = torch.rand(2, 3, 16, 16)
    assert torch.equal(Dropout((1, 1))(encoded, -encoded), encoded)


# --- resize, blur, noise -----------------------------------------------------------------


def test_resize_returns_the_smaller_image_by_nearest_sampling():
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(Resize((1, 1))(image, image), image)
    small = Resize((0.8, 0.8))(image, image)
    assert small.shape == (2, 3, 25, 25)  # floor(0.8 * 32), not resized back
    # Nearest: output pixel i takes input pixel floor(i / 0.8).
    source = [math.floor(i / 0.8) for i in range(25)]
    assert torch.equal(small, image[:, :, source][:, :, :, source])
    assert Resize((0.8, 0.8))(image[:, :, :, :20], image[:, :, :, :20]).shape == (2, 3, 25, 16)


def test_resize_up_repeats_pixels():
    image = torch.rand(1, 3, 8, 8)
    big = Resize((1.5, 1.5))(image, image)
    assert big.shape == (1, 3, 12, 12)
    assert set(big.flatten().tolist()) <= set(image.flatten().tolist())


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7])
def test_blur_keeps_size_and_constant_images(kernel_size):
    constant = torch.full((2, 3, 24, 40), 0.3)
    blurred = GaussianBlur(kernel_size, 2.0)(constant, constant)
    assert blurred.shape == constant.shape
    assert torch.allclose(blurred, constant, atol=1e-6)


def test_blur_kernel_one_is_identity_and_wider_kernel_smooths_more():
    image = torch.rand(2, 3, 24, 40) * 2 - 1
    assert torch.allclose(GaussianBlur(1, 2.0)(image, image), image)
    residual = [
        float((GaussianBlur(k, 2.0)(image, image) - image).abs().mean()) for k in (3, 5, 7)
    ]
    assert residual[0] < residual[1] < residual[2]


def test_blur_uses_the_official_kernel():
    # Official utils.gaussian_kernel: exp(-d^2 / sigma^2), normalised (not 2 sigma^2).
    impulse = torch.zeros(1, 3, 9, 9)
    impulse[..., 4, 4] = 1
    blurred = GaussianBlur(3, 2.0)(impulse, impulse)[0, 0, 3:6, 3:6]
    weights = torch.tensor(
        [[math.exp(-((i - 1) ** 2 + (j - 1) ** 2) / 4.0) for j in range(3)] for i in range(3)]
    )
    assert torch.allclose(blurred, weights / weights.sum(), atol=1e-6)


def test_blur_on_image_smaller_than_kernel():
    tiny = torch.rand(1, 3, 2, 3)
    assert GaussianBlur(7, 1.0)(tiny, tiny).shape == tiny.shape


def test_gaussian_noise_has_requested_std():
    zeros = torch.zeros(4, 3, 64, 64)
    noise = GaussianNoise((0.1, 0.1))(zeros, zeros)
    assert abs(float(noise.std()) - 0.1) < 0.003
    assert torch.equal(GaussianNoise((0, 0))(zeros, zeros), zeros)


# --- salt and pepper, median, brightness, contrast ---------------------------------------


def test_salt_pepper_sets_fraction_to_black_or_white_shared_over_channels():
    image = torch.zeros(4, 3, 64, 64)
    noised = SaltPepper((0.2, 0.2))(image, image)
    assert set(noised.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal(noised, noised[:, :1].expand_as(noised))
    hit = noised[:, 0] != 0
    assert abs(float(hit.float().mean()) - 0.2) < 0.02  # 16k Bernoulli draws: std 0.003
    white = float((noised[:, 0] == 1).sum()) / float(hit.sum())
    assert abs(white - 0.5) < 0.05
    assert torch.equal(SaltPepper((0, 0))(image, image), image)


def test_median_removes_isolated_pixels_and_keeps_edges():
    image = torch.zeros(1, 3, 16, 16)
    image[:, :, :, 8:] = 1.0  # a vertical edge
    speckled = image.clone()
    speckled[0, :, 3, 3] = 1.0  # isolated white pixel in the black half
    speckled[0, :, 12, 12] = -1.0  # isolated black pixel in the white half
    filtered = Median(3)(speckled, speckled)
    assert torch.equal(filtered, image)
    assert torch.equal(Median(1)(speckled, speckled), speckled)


def test_median_matches_a_direct_loop_and_keeps_size_on_tiny_images():
    image = torch.rand(1, 2, 6, 7) * 2 - 1
    filtered = Median(3)(image, image)
    padded = torch.nn.functional.pad(image, (1, 1, 1, 1), mode="reflect")
    for row in range(6):
        for col in range(7):
            window = padded[0, :, row : row + 3, col : col + 3].reshape(2, 9)
            assert torch.equal(filtered[0, :, row, col], window.median(dim=1).values)
    tiny = torch.rand(1, 3, 2, 3)
    assert Median(5)(tiny, tiny).shape == tiny.shape


def test_brightness_scales_on_the_unit_scale_and_clamps():
    image = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    darker = Brightness((0.5, 0.5))(image, image)[0, 0, 0]
    # [0, 0.25, 0.5, 0.75, 1] * 0.5 on [0, 1], back to [-1, 1].
    assert torch.allclose(darker, torch.tensor([-1.0, -0.75, -0.5, -0.25, 0.0]))
    brighter = Brightness((1.5, 1.5))(image, image)[0, 0, 0]
    assert torch.allclose(brighter, torch.tensor([-1.0, -0.25, 0.5, 1.0, 1.0]))
    assert torch.allclose(Brightness((1, 1))(image, image), image)


def test_contrast_scales_around_each_images_mean_and_clamps():
    low = torch.linspace(-0.6, 0.2, 12).view(1, 3, 2, 2)
    high = torch.linspace(-0.2, 0.9, 12).view(1, 3, 2, 2)
    images = torch.cat([low, high])
    flat = Contrast((0.5, 0.5))(images, images)
    # Each image's mean by hand: the midpoint of its evenly spaced values.
    means = torch.tensor([(-0.6 + 0.2) / 2, (-0.2 + 0.9) / 2]).view(2, 1, 1, 1)
    assert torch.allclose(flat, means + 0.5 * (images - means))
    assert torch.allclose(flat.mean(dim=(1, 2, 3)), means.flatten())  # each keeps its own mean
    steep = Contrast((3, 3))(images, images)
    assert steep.min() == -1 and steep.max() == 1
    assert torch.allclose(Contrast((1, 1))(images, images), images)


# --- JPEG ------------------------------------------------------------------------------


def test_quantization_tables_follow_libjpeg():
    tables = jpeg_quantization_tables(50)
    assert tables[0, 0].tolist() == [16, 11, 10, 16, 24, 40, 51, 61]
    assert tables[1, 0].tolist() == [17, 18, 24, 47, 99, 99, 99, 99]
    assert torch.equal(jpeg_quantization_tables(100), torch.ones(2, 8, 8))
    # quality 10: scale 500, (16 * 500 + 50) // 100 = 80; 99 * 5 caps at 255.
    assert jpeg_quantization_tables(10)[0, 0, 0] == 80
    assert jpeg_quantization_tables(10)[1, 7, 7] == 255
    # quality 90: scale 20, (16 * 20 + 50) // 100 = 3.
    assert jpeg_quantization_tables(90)[0, 0, 0] == 3


def test_differentiable_round():
    x = torch.tensor([0.0, 0.4, 1.5, 2.6, -1.2], requires_grad=True)
    rounded = differentiable_round(x)
    # By hand: round(x) + (x - round(x))^3, rounding half to even (1.5 -> 2).
    # 0.4 -> 0 + 0.064; 1.5 -> 2 - 0.125; 2.6 -> 3 - 0.064; -1.2 -> -1 - 0.008.
    expected = torch.tensor([0.0, 0.064, 1.875, 2.936, -1.008])
    torch.testing.assert_close(rounded.detach(), expected, rtol=0, atol=1e-6)
    rounded.sum().backward()
    # d/dx = 3 (x - round(x))^2: 0, 0.48, 0.75, 0.48, 0.12.
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 0.48, 0.75, 0.48, 0.12]), rtol=0, atol=1e-6)


def dct_basis(u: int, v: int, height: int, width: int) -> torch.Tensor:
    """The (u, v) 8x8 DCT basis function tiled over a (height, width) image."""
    rows = torch.cos((2 * torch.arange(height) % 16 + 1) * u * math.pi / 16)
    cols = torch.cos((2 * torch.arange(width) % 16 + 1) * v * math.pi / 16)
    return rows[:, None] * cols[None, :]


GREY = torch.tensor([1.0, 1.0, 1.0])[:, None, None]  # Y only (analog YUV)
BLUE_CHROMA = torch.tensor([0.0, -0.39465, 2.03211])[:, None, None]  # U only (official yuv2rgb)


def test_zigzag_order_is_jpegs():
    # The JPEG zigzag scan (row = vertical frequency), written out by hand.
    scan = [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (0, 3), (1, 2), (2, 1), (3, 0)]
    for count in range(1, len(scan) + 1):
        expected = torch.zeros(8, 8)
        for u, v in scan[:count]:
            expected[u, v] = 1
        assert torch.equal(zigzag_mask(count), expected)
    assert int(zigzag_mask(25).sum()) == 25
    assert zigzag_mask(25)[6, 0] == 1 and zigzag_mask(25)[0, 6] == 0


@pytest.mark.parametrize(
    ("colour", "u", "v", "kept"),
    [
        # Y keeps the first 25: every u + v <= 5, then (6,0), (5,1), (4,2), (3,3).
        (GREY, 4, 1, True),
        (GREY, 0, 5, True),
        (GREY, 3, 3, True),
        (GREY, 6, 0, True),
        (GREY, 0, 6, False),
        (GREY, 2, 4, False),
        (GREY, 4, 4, False),
        # U keeps the first 9: u + v <= 2, then (0,3), (1,2), (2,1).
        (BLUE_CHROMA, 1, 2, True),
        (BLUE_CHROMA, 2, 1, True),
        (BLUE_CHROMA, 3, 0, False),
        (BLUE_CHROMA, 2, 2, False),
    ],
)
def test_jpeg_mask_keeps_first_zigzag_coefficients_in_yuv(colour, u, v, kept):
    pattern = 0.2 * colour * dct_basis(u, v, 16, 24)
    image = (0.1 + pattern)[None]
    masked = JpegMask()(image, image)
    expected = image if kept else torch.full_like(image, 0.1)
    assert torch.allclose(masked, expected, atol=1e-3)


def test_jpeg_mask_keeps_smooth_image():
    smooth = smooth_image(2, 24, 40)
    assert psnr(JpegMask()(smooth, smooth), smooth) > 30


def test_jpeg_diff_uses_quality():
    image = smooth_image(2, 24, 40) + 0.1 * torch.rand(2, 3, 24, 40)
    low = JpegDiff(10)(image, image)
    high = JpegDiff(90)(image, image)
    assert not torch.allclose(low, high)
    assert psnr(high, image) > psnr(low, image) + 5
    assert psnr(JpegDiff(100)(image, image), image) > 45


def test_jpeg_real_close_at_high_quality_and_worse_at_low():
    image = smooth_image(2, 32, 32)
    high = JpegReal(90)(image, image)
    low = JpegReal(10)(image, image)
    assert psnr(high, image) > 30
    assert psnr(low, image) < psnr(high, image)
    assert ((high + 1) * 127.5).round().sub((high + 1) * 127.5).abs().max() < 1e-3  # uint8 levels


def test_jpeg_real_gradient_is_straight_through():
    encoded = smooth_image(2, 24, 40).requires_grad_()
    weights = torch.randn(2, 3, 24, 40)
    (JpegReal(50)(encoded, encoded.detach()) * weights).sum().backward()
    assert torch.equal(encoded.grad, weights)


# --- parser ----------------------------------------------------------------------------


def test_parser_accepts_the_authors_string_verbatim():
    authors = (
        "crop((0.1871,0.1871),(0.1871,0.1871))+Jpeg(0)+dropout(0.5477,0.5477)"
        "+resize(0.8,0.8)+gaussian(3,2.0)"
    )
    assert OFFICIAL_NOISE == authors
    specs = parse_noise(authors)
    assert specs == [
        NoiseSpec("crop", ((0.1871, 0.1871), (0.1871, 0.1871))),
        NoiseSpec("Jpeg", (0,)),
        NoiseSpec("dropout", (0.5477, 0.5477)),
        NoiseSpec("resize", (0.8, 0.8)),
        NoiseSpec("gaussian", (3, 2.0)),
    ]
    assert "+".join(str(s) for s in specs) == authors
    layers = build_noise_layers(authors)
    assert [type(m) for m in layers] == [Crop, JpegDiff, Dropout, Resize, GaussianBlur]
    assert layers[1].quality == 50  # Jpeg(0): the official code always used quality 50


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("sp(0.05)", SaltPepper),
        ("Gaussian_noise(0,0.1)", ClippedGaussianNoise),
        ("Median_filter(3)", Median),
        ("Adjust_hue(1.5)", Saturation),
        ("Adjust_contrast(0.8)", Brightness),
        ("grid_crop(0.3)", GridCrop),
        ("quant()", Quantization),
        ("Jpeg(75)", JpegDiff),
        ("jpeg()", JpegMask),
        ("cropout((0.5,0.5),(0.5,0.5))", Cropout),
    ],
)
def test_every_official_layer_name_parses(text, kind):
    (spec,) = parse_noise(text)
    assert isinstance(build_layer(spec), kind)
    assert parse_noise(str(spec)) == [spec]


def test_official_jpeg_uses_quality_50_for_0_and_q_otherwise():
    image = smooth_image(2, 24, 40) + 0.1 * torch.rand(2, 3, 24, 40)
    assert torch.equal(layer("Jpeg(0)")(image, image), JpegDiff(50)(image, image))
    assert torch.equal(layer("Jpeg(75)")(image, image), JpegDiff(75)(image, image))


def test_sp_sets_ratio_black_and_ratio_white():
    image = torch.zeros(4, 3, 64, 64)
    noised = layer("sp(0.1)")(image, image)
    assert torch.equal(noised, noised[:, :1].expand_as(noised))
    assert abs(float((noised[:, 0] == 1).float().mean()) - 0.1) < 0.015
    assert abs(float((noised[:, 0] == -1).float().mean()) - 0.1) < 0.015


def test_official_gaussian_noise_adds_clipped_noise_once_per_channel():
    zeros = torch.zeros(4, 3, 64, 64)
    noised = layer("Gaussian_noise(0,0.1)")(zeros, zeros)
    assert noised.min() >= 0 and noised.max() <= 1
    assert torch.equal(noised, noised[:, :1].expand_as(noised))
    # E[clip(N(0, 0.1^2), 0, 1)] = 0.1 / sqrt(2 pi) = 0.0399.
    assert abs(float(noised.mean()) - 0.1 / math.sqrt(2 * math.pi)) < 0.002


def test_adjust_hue_scales_hsv_saturation_as_kornia():
    import colorsys

    rgb = [(0.8, 0.4, 0.2), (0.1, 0.5, 0.3), (0.6, 0.6, 0.6)]
    image = torch.tensor(rgb).T.reshape(1, 3, 1, 3) * 2 - 1
    for factor in (0.5, 1.6):
        out = (layer(f"Adjust_hue({factor})")(image, image) + 1) / 2
        for index, pixel in enumerate(rgb):
            h, s, v = colorsys.rgb_to_hsv(*pixel)
            expected = colorsys.hsv_to_rgb(h, min(1.0, s * factor), v)
            assert torch.allclose(out[0, :, 0, index], torch.tensor(expected), atol=1e-5)


def test_adjust_contrast_multiplies_on_the_unit_scale_as_kornia():
    image = torch.tensor([-1.0, 0.0, 0.6]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    out = layer("Adjust_contrast(0.5)")(image, image)[0, 0, 0]
    assert torch.allclose(out, torch.tensor([-1.0, -0.5, -0.2]))  # [0, .5, .8] * 0.5


def test_grid_crop_blackens_whole_8x8_blocks():
    image = torch.rand(2, 3, 20, 20)
    everything = GridCrop(1.0)(image, image)
    assert (everything[..., :16, :16] == -1).all()
    assert torch.equal(everything[..., 16:], image[..., 16:])  # partial blocks untouched
    assert torch.equal(GridCrop(0.0)(image, image), image)
    some = GridCrop(0.5)(torch.zeros(1, 3, 64, 64), image)
    blocks = (some[0, 0] == -1).view(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(64, 64)
    assert ((blocks.sum(dim=1) == 0) | (blocks.sum(dim=1) == 64)).all()  # whole blocks only


def test_quant_rounds_to_256_levels_of_the_batch_range():
    levels = torch.tensor([0.0, 10.2, 99.8, 180.1, 255.0])
    image = (levels / 255 * 2 - 1).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    out = Quantization()(image, image)
    assert torch.allclose((out + 1) / 2 * 255, levels.round(), atol=0.05)


def test_parser_accepts_hidden_spec_with_whitespace():
    hidden = "crop((0.2,0.25),(0.2,0.25))+cropout((0.55,0.6),(0.55,0.6))+dropout(0.55,0.6)" \
        "+resize(0.7,0.8)+jpeg()"
    spaced = " crop( (0.2, 0.25) ,(0.2,0.25) ) + cropout((0.55,0.6),(0.55,0.6))\n" \
        "+ dropout( 0.55 , 0.6 )+resize(0.7,0.8) + jpeg ( ) "
    assert parse_noise(spaced) == parse_noise(hidden)
    assert "+".join(str(s) for s in parse_noise(spaced)) == hidden


@pytest.mark.parametrize(
    "text",
    [
        "jpeg(50)",
        "jpeg",
        "jpegreal(1)",
        "gaussian(5,0.5)",
        "gaussian_noise(0.1)",
        "gaussian_noise(0,0.2)",
        "resize(1.5,2)",
        "dropout(1,1)",
        "gaussian_noise(1e-05)",
        "salt_pepper(0.05)",
        "salt_pepper(0,1)",
        "median(5)",
        "brightness(0.7)",
        "brightness(0.5,1.5)",
        "contrast(1.3)",
        "contrast(0.5,2)",
        "saturation(0.5)",
    ],
)
def test_parser_round_trips_other_layers(text):
    (spec,) = parse_noise(text)
    assert parse_noise(str(spec)) == [spec]


@pytest.mark.parametrize("text", ["", "  ", "identity", "identity()", " identity ( ) "])
def test_identity_only_specs_configure_nothing(text):
    assert parse_noise(text) == []


def test_numbers_keep_their_type():
    (spec,) = parse_noise("gaussian(3,2)")
    assert spec.args == (3, 2) and isinstance(spec.args[1], int)
    (spec,) = parse_noise("resize(.5,1.)")
    assert spec.args == (0.5, 1.0) and str(spec) == "resize(0.5,1.0)"


@pytest.mark.parametrize(
    ("spec", "offending"),
    [
        ("blur(3)", "'blur(3)': unknown layer 'blur' (known: Adjust_contrast, Adjust_hue, brightness, contrast, crop"),
        ("crop((0.1,0.2),(0.1,0.2)", "'crop((0.1,0.2),(0.1,0.2)': unbalanced parentheses"),
        ("jpeg())", "'jpeg())': unbalanced parentheses"),
        ("jpeg()+dropout(0.5,0.6))", "'dropout(0.5,0.6))': unbalanced parentheses"),
        ("jpeg()+", "stray '+'"),
        ("+jpeg()", "stray '+'"),
        ("jpeg()++crop((0.1,0.1),(0.1,0.1))", "stray '+'"),
        ("dropout(0.5)", "'dropout(0.5)': dropout takes 2 argument(s), got 1"),
        ("dropout((0.5,0.6))", "'dropout((0.5,0.6))': dropout takes 2 argument(s), got 1"),
        ("dropout(0.6,0.5)", "'dropout(0.6,0.5)': keep range min 0.6 > max 0.5"),
        ("dropout(0,0.5)", "'dropout(0,0.5)': keep fraction must be in (0, 1], got 0"),
        ("crop(0.2,0.3)", "'crop(0.2,0.3)': height range must be a pair (min,max), got 0.2"),
        ("crop((0.2,0.3),(0.5,1.2))", "width fraction must be in (0, 1], got 1.2"),
        ("crop((0.3,0.2),(0.5,0.6))", "'crop((0.3,0.2),(0.5,0.6))': height range min 0.3 > max"),
        ("cropout((0.5,0.6))", "'cropout((0.5,0.6))': cropout takes 2 argument(s), got 1"),
        ("gaussian(4,1.0)", "'gaussian(4,1.0)': kernel size must be odd and >= 1, got 4"),
        ("gaussian(-3,1.0)", "kernel size must be odd and >= 1, got -3"),
        ("gaussian(3.0,1.0)", "'gaussian(3.0,1.0)': kernel size must be an integer, got 3.0"),
        ("gaussian(3,0)", "'gaussian(3,0)': sigma must be > 0, got 0"),
        ("jpeg(0)", "'jpeg(0)': quality must be in 1..100, got 0"),
        ("jpeg(101)", "'jpeg(101)': quality must be in 1..100, got 101"),
        ("jpeg(50.5)", "'jpeg(50.5)': quality must be an integer, got 50.5"),
        ("jpegreal()", "'jpegreal()': jpegreal takes 1 argument(s), got 0"),
        ("gaussian_noise(-0.1)", "'gaussian_noise(-0.1)': std must be >= 0, got -0.1"),
        ("gaussian_noise(0.2,0.1)", "std range min 0.2 > max 0.1"),
        ("resize(0,0.5)", "'resize(0,0.5)': scale must be > 0, got 0"),
        ("resize(0.5,(1,2))", "argument 2 must be a number, got a pair (1,2)"),
        ("resize(0.5,,0.6)", "'resize(0.5,,0.6)': expected a number, got ','"),
        ("resize(0.5 0.6)", "'resize(0.5 0.6)': expected ')', got '0.6'"),
        ("resize(0.5;0.6)", "unexpected character ';' at column 11"),
        ("jpeg() crop((0.1,0.1),(0.1,0.1))", "unexpected 'crop' at column 8 after the layer"),
        ("crop(((0.1,0.2)),(0.1,0.2))", "expected a number, got '('"),
        ("resize(1e999,1e999)", "number '1e999' at column 8 is too large"),
        ("identity(1)", "'identity(1)': identity takes 0 argument(s), got 1"),
        ("salt_pepper()", "'salt_pepper()': salt_pepper takes 1 or 2 argument(s), got 0"),
        ("salt_pepper(1.5)", "'salt_pepper(1.5)': fraction must be in [0, 1], got 1.5"),
        ("salt_pepper(-0.1)", "fraction must be in [0, 1], got -0.1"),
        ("salt_pepper(0.2,0.1)", "fraction range min 0.2 > max 0.1"),
        ("salt_pepper((0.1,0.2))", "argument 1 must be a number, got a pair (0.1,0.2)"),
        ("median(4)", "'median(4)': kernel size must be odd and >= 1, got 4"),
        ("median(0)", "kernel size must be odd and >= 1, got 0"),
        ("median(3.0)", "'median(3.0)': kernel size must be an integer, got 3.0"),
        ("median(3,3)", "'median(3,3)': median takes 1 argument(s), got 2"),
        ("brightness(0)", "'brightness(0)': factor must be > 0, got 0"),
        ("brightness(-1.5)", "factor must be > 0, got -1.5"),
        ("brightness(1.5,0.5)", "factor range min 1.5 > max 0.5"),
        ("contrast(0)", "'contrast(0)': factor must be > 0, got 0"),
        ("contrast(1,2,3)", "'contrast(1,2,3)': contrast takes 1 or 2 argument(s), got 3"),
    ],
)
def test_parser_rejects_malformed_spec_naming_the_part(spec, offending):
    with pytest.raises(ConfigError) as info:
        parse_noise(spec)
    assert offending in str(info.value)


def test_parser_rejects_non_string():
    with pytest.raises(ConfigError, match="must be a string"):
        parse_noise(None)


def test_build_layer_validates_hand_made_spec():
    with pytest.raises(ConfigError, match=r"bad noise layer 'gaussian\(2,1.0\)'"):
        build_layer(NoiseSpec("gaussian", (2, 1.0)))
    assert isinstance(build_layer(NoiseSpec("jpeg", (75,))), JpegDiff)
    assert isinstance(build_layer(NoiseSpec("jpegreal", (75,))), JpegReal)
    assert isinstance(build_layer(NoiseSpec("cropout", ((0.5, 0.5), (0.5, 0.5)))), Cropout)
    assert isinstance(build_layer(NoiseSpec("gaussian_noise", (0.1,))), GaussianNoise)
    assert isinstance(build_layer(NoiseSpec("salt_pepper", (0.1,))), SaltPepper)
    assert isinstance(build_layer(NoiseSpec("median", (3,))), Median)
    assert isinstance(build_layer(NoiseSpec("brightness", (0.5, 1.5))), Brightness)
    assert isinstance(build_layer(NoiseSpec("contrast", (0.8,))), Contrast)
    with pytest.raises(ConfigError, match=r"bad noise layer 'median\(2\)'"):
        build_layer(NoiseSpec("median", (2,)))


# --- Noiser ----------------------------------------------------------------------------


#: Layers whose output on an all-white encoded image over an all-black cover tells them
#: apart; ``choices`` reads which one the noiser applied from its output alone.
TELLING_NOISE = "crop((0.5,0.5),(0.5,0.5))+gaussian_noise(0.5)+dropout(0.5,0.5)"


def _applied(encoded: torch.Tensor, noised: torch.Tensor) -> str:
    if noised.shape != encoded.shape:
        return "crop"  # a crop that returns the window alone
    if torch.equal(noised, encoded):
        return "identity"
    values = set(noised.unique().tolist())
    if values <= {0.0, 1.0}:
        return "crop"  # the window kept, the rest zeroed
    if values <= {-1.0, 1.0}:
        return "dropout"  # each pixel the encoded one or the cover's
    return "gaussian_noise"


def choices(noiser: Noiser, draws: int) -> list[str]:
    """Which layer the noiser applied on each of ``draws`` calls, read from its output
    (the noiser must hold :data:`TELLING_NOISE`)."""
    encoded = torch.ones(1, 3, 16, 16)
    return [_applied(encoded, noiser(encoded, -encoded)) for _ in range(draws)]


def test_noiser_names_and_layers():
    noiser = Noiser(OFFICIAL_NOISE, seed=0)
    assert noiser.names == [
        "identity",
        "crop((0.1871,0.1871),(0.1871,0.1871))",
        "Jpeg(0)",
        "dropout(0.5477,0.5477)",
        "resize(0.8,0.8)",
        "gaussian(3,2.0)",
    ]
    assert noiser.attack_names() == noiser.names[1:]
    assert [s.name for s in noiser.specs] == [
        "identity", "crop", "Jpeg", "dropout", "resize", "gaussian"
    ]
    assert isinstance(noiser.layers[0], Identity)
    assert Noiser("", seed=0).names == ["identity"]


def test_noiser_same_seed_same_choices_and_roughly_uniform():
    spec = TELLING_NOISE
    encoded, cover = torch.ones(1, 3, 8, 8), -torch.ones(1, 3, 8, 8)
    outputs = []
    for _ in range(2):
        torch.manual_seed(3)  # the layers' own randomness
        noiser = Noiser(spec, seed=7)
        outputs.append([noiser(encoded, cover) for _ in range(20)])  # a crop is smaller
    assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))

    picked = Counter(choices(Noiser(spec, seed=7), 800))
    assert sorted(picked) == ["crop", "dropout", "gaussian_noise", "identity"]
    assert all(150 < n < 250 for n in picked.values())  # 200 expected, std 12
    assert choices(Noiser(spec, seed=7), 30) == choices(Noiser(spec, seed=7), 30)
    assert choices(Noiser(spec, seed=7), 30) != choices(Noiser(spec, seed=8), 30)


def test_noiser_choice_does_not_touch_global_rng():
    noiser = Noiser("jpeg()", seed=0)
    image = torch.rand(1, 3, 8, 8)
    state = torch.get_rng_state()
    for _ in range(10):
        noiser(image, image)
    assert torch.equal(torch.get_rng_state(), state)


def test_noiser_rng_state_resumes_the_sequence():
    noiser = Noiser(TELLING_NOISE, seed=1)
    choices(noiser, 5)
    state = noiser.get_rng_state()
    expected = choices(noiser, 20)
    assert len(set(expected)) > 1
    restored = Noiser(TELLING_NOISE, seed=99)
    restored.set_rng_state(state)
    assert choices(restored, 20) == expected


def test_noiser_apply_by_name_index_and_bare_name():
    noiser = Noiser(OFFICIAL_NOISE, seed=0)
    ones = torch.ones(2, 3, 32, 32)
    by_name = noiser.apply("crop((0.1871,0.1871),(0.1871,0.1871))", ones, -ones)
    assert by_name.shape == (2, 3, 14, 14)
    spaced = noiser.apply("crop( (0.1871, 0.1871), (0.1871, 0.1871) )", ones, -ones)
    assert spaced.shape == (2, 3, 14, 14)
    assert torch.equal(noiser.apply("identity", ones, -ones), ones)
    assert torch.equal(noiser.apply("identity()", ones, -ones), ones)
    image = smooth_image(2, 32, 32)
    assert torch.equal(noiser.apply("Jpeg", image, image), noiser.apply(2, image, image))
    assert torch.equal(noiser.apply("Jpeg(0)", image, image), JpegDiff(50)(image, image))
    assert noiser.index_of("gaussian") == 5


def test_noiser_apply_rejects_unknown_attack():
    noiser = Noiser("crop((0.5,0.5),(0.5,0.5))+crop((0.2,0.2),(0.2,0.2))", seed=0)
    ones = torch.ones(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="unknown attack 'jpeg\\(\\)'"):
        noiser.apply("jpeg()", ones, ones)
    with pytest.raises(ConfigError, match="unknown attack 'crop'"):
        noiser.apply("crop", ones, ones)  # ambiguous bare name
    with pytest.raises(ConfigError, match="out of range 0..2"):
        noiser.apply(3, ones, ones)


def test_noiser_keeps_module_apply_for_parents():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), Noiser("jpeg()", seed=0))
    visited = []
    model.apply(lambda module: visited.append(type(module).__name__))
    assert visited.count("Noiser") == 1 and "JpegMask" in visited


def test_noiser_rejects_bad_spec_and_seed():
    with pytest.raises(ConfigError, match="unknown layer 'blur'"):
        Noiser("blur(3)", seed=0)
    with pytest.raises(ConfigError, match="seed"):
        Noiser("", seed="0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "text",
    [
        "resize(0.8,0.8)", "jpeg()", "jpeg(50)", "jpegreal(75)", "gaussian(5,2.0)",
        "median(3)", "brightness(1.3)", "contrast(0.7)",
    ],
)
def test_deterministic_layers_match_cpu_on_cuda_and_keep_dtype_under_autocast(text):
    image = smooth_image(2, 24, 40) + 0.05 * torch.rand(2, 3, 24, 40)
    module = layer(text)
    on_cpu = module(image, image)
    on_cuda = module(image.cuda(), image.cuda())  # the module itself stays on the CPU
    assert on_cuda.device.type == "cuda"
    assert float((on_cuda.cpu() - on_cpu).abs().mean()) < 1e-3
    encoded = image.cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        noised = module.cuda()(encoded, encoded.detach())
    assert noised.dtype == torch.float32 and noised.shape == image.shape
    noised.sum().backward()
    assert torch.isfinite(encoded.grad).all() and encoded.grad.abs().sum() > 0
