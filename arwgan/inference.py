"""Use a trained model: hide a message in images of any size and read it back.

Arbitrary image sizes are handled by **tiling**, never by resizing. The image is cut into
tiles of the model's training size S (the grid starts at the top-left corner; the last
row and column of tiles are completed by mirror reflection of the image), the encoder
writes the same message into every tile, and only its *residual* (encoded - tile) is
added back to the image at full resolution; the reflected padding is dropped. So every
pixel of the output is the input pixel plus the watermark, the output has exactly the
input's size, and no resampling blurs the image. Seams between tiles may be faintly
visible at low PSNR.

Extraction tiles the image the same way, runs the decoder on every tile and averages its
raw outputs over the tiles, each weighted by its share of real (not reflected) pixels;
bit i is ``mean_i > 0.5``. Because every tile carries the whole message, a crop that
keeps at least a tile's worth of image, or an image whose tile grid was shifted, can
still be read, and the average over many tiles votes out tiles the decoder misreads.

**Confidence** of bit i is ``min(1, 2 * |mean_i - 0.5|)``: 0 when the averaged decoder
output sits on the decision threshold, 1 when it is at (or past) the 0 or 1 the decoder
was trained to produce. It is a margin, not a calibrated probability.

**Messages** (:func:`parse_message`) are a string of exactly L digits 0/1 (L = the
model's message length), or text: its UTF-8 bytes, 8 bits each, most significant bit
first, zero-padded to L, so a model carries L // 8 bytes of text. A string made only of
0s and 1s is always read as bits. :func:`decode_message` turns bits back into that text
when they hold some.

**Files**: the output keeps the input's size; its format follows the output's suffix
(PNG, TIFF and BMP are lossless; JPEG and WebP use ``quality``, 95 by default, JPEG with
full-resolution chroma because subsampling would halve the watermark's colour part).
Colour images stay RGB. Greyscale images are watermarked as RGB (grey replicated) and
saved as greyscale, which keeps only the luma of the watermark and so weakens it.
An alpha channel is carried over unchanged (dropped for formats without one, JPEG and
BMP); transparent pixels are watermarked like the others, not composited on a
background. Palette, CMYK and other modes are saved as RGB; 16-bit and float images as
8-bit. ICC profiles and EXIF data are carried over where the format holds them. Every
file is written to a temporary file in the target folder and renamed into place, so an
output is never half-written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from arwgan.checkpoint import atomic_write_bytes, load_model_weights
from arwgan.config import PRECISIONS, ModelConfig
from arwgan.data import UNREADABLE_ERRORS, IMAGE_SUFFIXES, list_images, load_rgb
from arwgan.errors import CheckpointError, DataError, UserError
from arwgan.step import Networks, autocast, check_precision, resolve_device

#: Tiles the encoder or decoder sees per forward pass (bounds memory on large images).
TILE_BATCH = 64
DEFAULT_QUALITY = 95

# --------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------


def _quote(text: str, limit: int = 40) -> str:
    """``text`` in double quotes, escaped to one line, shortened when long."""
    shown = text if len(text) <= limit else text[: limit - 1] + "…"
    return json.dumps(shown, ensure_ascii=False)


def _characters(count: int) -> str:
    return f"{count} character" + ("" if count == 1 else "s")


def parse_message(message: str, message_bits: int) -> torch.Tensor:
    """A (message_bits,) float tensor of 0/1 bits from a bit string or from text.

    Raises UserError when the message is empty, a bit string of another length, or text
    longer than the model carries.
    """
    if not message:
        raise UserError("the message is empty")
    if set(message) <= {"0", "1"}:
        if len(message) != message_bits:
            raise UserError(
                f"bit string has {len(message)} bits; this model carries {message_bits} "
                f"(give exactly {message_bits} digits 0/1, or text of at most "
                f"{_characters(message_bits // 8)})"
            )
        return torch.tensor([float(c) for c in message])
    data = message.encode("utf-8")
    needed = 8 * len(data)
    if needed > message_bits:
        raise UserError(
            f"message {_quote(message)} needs {needed} bits; this model carries "
            f"{message_bits} ({_characters(message_bits // 8)})"
        )
    bits = [(byte >> (7 - k)) & 1 for byte in data for k in range(8)]
    return torch.tensor(bits + [0] * (message_bits - needed), dtype=torch.float32)


def format_bits(bits: torch.Tensor) -> str:
    return "".join("1" if bit > 0.5 else "0" for bit in bits.tolist())


def decode_message(bits: torch.Tensor) -> str | None:
    """The text :func:`parse_message` packed into ``bits``, or None when they do not read
    as printable UTF-8 text followed by zero padding."""
    values = [1 if bit > 0.5 else 0 for bit in bits.tolist()]
    whole = len(values) // 8 * 8
    if any(values[whole:]):
        return None
    data = bytes(
        int("".join(map(str, values[start : start + 8])), 2) for start in range(0, whole, 8)
    )
    text_bytes = data.rstrip(b"\0")
    if not text_bytes or b"\0" in text_bytes:
        return None
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


# --------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------


def _reflect_indices(size: int, padded: int, device: torch.device) -> torch.Tensor:
    """Indices 0..padded-1 into an axis of ``size``, mirrored (without repeating the edge)
    past its end as often as needed; a 1-pixel axis repeats its pixel."""
    positions = torch.arange(padded, device=device)
    if size == 1:
        return torch.zeros_like(positions)
    period = 2 * (size - 1)
    folded = positions % period
    return torch.where(folded < size, folded, period - folded)


@dataclass(frozen=True)
class TileGrid:
    """How a (3, H, W) image maps onto ``rows`` x ``cols`` tiles of side ``tile``."""

    height: int
    width: int
    tile: int

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.tile)

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.tile)

    def split(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) -> (rows * cols, 3, S, S), row-major, reflection-padded."""
        s = self.tile
        rows = _reflect_indices(self.height, self.rows * s, image.device)
        cols = _reflect_indices(self.width, self.cols * s, image.device)
        padded = image.index_select(1, rows).index_select(2, cols)
        tiles = padded.reshape(3, self.rows, s, self.cols, s).permute(1, 3, 0, 2, 4)
        return tiles.reshape(-1, 3, s, s)

    def join(self, tiles: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`split`, the padding dropped: (N, 3, S, S) -> (3, H, W)."""
        s = self.tile
        image = tiles.reshape(self.rows, self.cols, 3, s, s).permute(2, 0, 3, 1, 4)
        return image.reshape(3, self.rows * s, self.cols * s)[:, : self.height, : self.width]

    def real_fraction(self, device: torch.device) -> torch.Tensor:
        """(rows * cols,) share of each tile's pixels that are the image's, not padding."""
        s = self.tile
        tile_rows = torch.tensor(
            [min(s, self.height - i * s) for i in range(self.rows)], dtype=torch.float32
        )
        tile_cols = torch.tensor(
            [min(s, self.width - j * s) for j in range(self.cols)], dtype=torch.float32
        )
        return (tile_rows[:, None] * tile_cols[None, :]).flatten().to(device) / (s * s)


# --------------------------------------------------------------------------------------
# The watermarker
# --------------------------------------------------------------------------------------


class Extraction(NamedTuple):
    """Decoded bits (0./1.) and a confidence in [0, 1] per bit, both (L,) on the CPU."""

    bits: torch.Tensor
    confidence: torch.Tensor


def _to_model_image(image, device: torch.device) -> tuple[torch.Tensor, bool]:
    """(3, H, W) float in [-1, 1] on ``device``, and whether the input was uint8 pixels."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected (H, W, 3) uint8 pixels, got {image.dtype} {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return tensor.to(device, torch.float32) / 127.5 - 1, True
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(
                f"expected a (3, H, W) float tensor in [-1, 1], got {image.dtype} "
                f"{tuple(image.shape)}"
            )
        return image.to(device, torch.float32), False
    raise TypeError(f"expected a numpy uint8 array or a torch tensor, got {type(image).__name__}")


def _to_pixels(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8, rounded."""
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).cpu().numpy()


class Watermarker:
    """A trained encoder and decoder, in eval mode, for images of any size (see the
    module docstring for the tiling, the confidence and the message format)."""

    def __init__(
        self,
        nets: Networks,
        model_cfg: ModelConfig,
        device: torch.device,
        precision: str = "fp32",
        tile_batch: int = TILE_BATCH,
    ) -> None:
        self.nets = nets.eval()
        self.model_cfg = model_cfg
        self.device = device
        self.precision = precision
        self.tile_batch = tile_batch

    @property
    def message_bits(self) -> int:
        return self.model_cfg.message_bits

    @property
    def tile_size(self) -> int:
        return self.model_cfg.image_size

    def message(self, message: str | torch.Tensor) -> torch.Tensor:
        """A message as a (L,) float 0/1 tensor on the CPU, from text, bits or a tensor."""
        if isinstance(message, str):
            return parse_message(message, self.message_bits)
        bits = torch.as_tensor(message, dtype=torch.float32).flatten()
        if bits.numel() != self.message_bits:
            raise UserError(
                f"message has {bits.numel()} bits; this model carries {self.message_bits}"
            )
        return (bits > 0.5).float()

    @torch.no_grad()
    def embed(self, image, message: str | torch.Tensor):
        """The watermarked image, of the same size and kind as ``image``: (H, W, 3) uint8
        numpy pixels in, the same out; a (3, H, W) float tensor in [-1, 1] in, a float
        tensor (clamped to [-1, 1], on the input's device) out."""
        bits = self.message(message).to(self.device)
        x, as_pixels = _to_model_image(image, self.device)
        grid = TileGrid(x.shape[1], x.shape[2], self.tile_size)
        tiles = grid.split(x)
        residuals = []
        self.nets.eval()
        with autocast(self.precision, self.device):
            for chunk in tiles.split(self.tile_batch):
                encoded = self.nets.encoder(chunk, bits.expand(chunk.shape[0], -1))
                residuals.append(encoded.float() - chunk)
        marked = (x + grid.join(torch.cat(residuals))).clamp(-1, 1)
        if as_pixels:
            return _to_pixels(marked)
        return marked.to(image.device)

    @torch.no_grad()
    def decoder_outputs(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw decoder outputs per tile (N, L) and each tile's weight (N,)."""
        x, _ = _to_model_image(image, self.device)
        grid = TileGrid(x.shape[1], x.shape[2], self.tile_size)
        outputs = []
        self.nets.eval()
        with autocast(self.precision, self.device):
            for chunk in grid.split(x).split(self.tile_batch):
                outputs.append(self.nets.decoder(chunk).float())
        return torch.cat(outputs), grid.real_fraction(self.device)

    def extract(self, image) -> Extraction:
        """Decoded bits and per-bit confidence of an image of any size."""
        outputs, weights = self.decoder_outputs(image)
        mean = (weights[:, None] * outputs).sum(dim=0) / weights.sum()
        bits = (mean > 0.5).float()
        confidence = (2 * (mean - 0.5).abs()).clamp(max=1)
        return Extraction(bits.cpu(), confidence.cpu())


def load_watermarker(
    path: str | Path, device: str = "auto", precision: str = "fp32"
) -> Watermarker:
    """The encoder and decoder of a training checkpoint (``last.pt``) or of a checkpoint
    saved by the official ARWGAN code, ready to use.

    CheckpointError when the file is missing, corrupt, would run code when opened, is
    neither format, or holds weights that do not fit its own config.
    """
    saved = load_model_weights(path)
    try:
        model_cfg = ModelConfig.from_dict(saved.config)
    except UserError as exc:
        raise CheckpointError(f"checkpoint '{path}' holds a bad config: {exc}") from None
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    torch_device = resolve_device(device)
    check_precision(precision, torch_device)
    # Building the networks draws their (discarded) initial weights: keep the caller's
    # RNG streams untouched.
    with torch.random.fork_rng(devices=[]):
        nets = Networks(model_cfg, noise_seed=0)
    target = (
        f"its config ({model_cfg.image_size}px, {model_cfg.message_bits} bits, "
        f"{model_cfg.channels} channels)"
    )
    nets.load_state_dict(saved.for_model(nets.state_dict(), target))
    return Watermarker(nets.to(torch_device), model_cfg, torch_device, precision)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------

#: Output suffix -> (PIL format, modes the format stores).
_FORMATS: dict[str, tuple[str, frozenset[str]]] = {
    ".png": ("PNG", frozenset({"L", "LA", "RGB", "RGBA"})),
    ".jpg": ("JPEG", frozenset({"L", "RGB"})),
    ".jpeg": ("JPEG", frozenset({"L", "RGB"})),
    ".bmp": ("BMP", frozenset({"L", "RGB"})),
    ".tif": ("TIFF", frozenset({"L", "LA", "RGB", "RGBA"})),
    ".tiff": ("TIFF", frozenset({"L", "LA", "RGB", "RGBA"})),
    ".webp": ("WEBP", frozenset({"RGB", "RGBA"})),
    ".ppm": ("PPM", frozenset({"L", "RGB"})),
    ".pgm": ("PPM", frozenset({"L", "RGB"})),
}
#: Which formats keep an ICC profile / EXIF block when saving.
_KEEPS_ICC = {"PNG", "JPEG", "TIFF", "WEBP"}
_KEEPS_EXIF = {"PNG", "JPEG", "WEBP"}
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


@dataclass
class LoadedImage:
    """An image file's pixels as the model sees them, and what is needed to save it back."""

    pixels: np.ndarray
    """(H, W, 3) uint8 RGB (grey replicated)."""
    alpha: np.ndarray | None = None
    """(H, W) uint8 alpha channel, when the file has one."""
    grey: bool = False
    info: dict = field(default_factory=dict)
    """ICC profile and EXIF block of the file, when present."""


def output_format(path: str | Path) -> str:
    """The PIL format an output path's suffix asks for; UserError when unsupported."""
    suffix = Path(path).suffix.lower()
    if suffix not in _FORMATS:
        known = ", ".join(sorted(_FORMATS))
        raise UserError(f"cannot write '{path}': unsupported image format (use {known})")
    return _FORMATS[suffix][0]


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if type(exc).__name__ == "UnidentifiedImageError":
        return "not an image file"
    return text[0] if text else type(exc).__name__


def read_image(path: str | Path) -> LoadedImage:
    """Decode an image file (see the module docstring for the modes); DataError when it
    does not exist or cannot be decoded."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image '{path}' does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            info = {k: image.info[k] for k in ("icc_profile", "exif") if image.info.get(k)}
            mode = image.mode
            transparent = "transparency" in image.info
            if mode in _HIGH_DEPTH_MODES:
                grey = np.clip(np.round(load_rgb(path)[..., 0] * 255), 0, 255).astype(np.uint8)
                return LoadedImage(np.repeat(grey[..., None], 3, axis=2), None, True, info)
            if mode in ("1", "L", "LA", "La"):
                if mode in ("LA", "La") or transparent:
                    grey_alpha = np.asarray(image.convert("LA"))
                    grey, alpha = grey_alpha[..., 0], grey_alpha[..., 1].copy()
                else:
                    grey, alpha = np.asarray(image.convert("L")), None
                return LoadedImage(np.repeat(grey[..., None], 3, axis=2), alpha, True, info)
            if mode in ("RGBA", "RGBa", "PA") or transparent:
                rgba = np.asarray(image.convert("RGBA"))
                return LoadedImage(rgba[..., :3].copy(), rgba[..., 3].copy(), False, info)
            return LoadedImage(np.asarray(image.convert("RGB")).copy(), None, False, info)
    except UNREADABLE_ERRORS as exc:
        raise DataError(f"image '{path}' is unreadable ({_reason(exc)})") from None


def _save_mode(grey: bool, alpha: bool, allowed: frozenset[str]) -> str:
    """The closest mode to the input's that the output format stores."""
    if grey and alpha:
        candidates = ["LA", "RGBA", "L", "RGB"]
    elif grey:
        candidates = ["L", "RGB"]
    elif alpha:
        candidates = ["RGBA", "RGB"]
    else:
        candidates = ["RGB"]
    return next(mode for mode in candidates if mode in allowed)


def write_image(
    path: str | Path, pixels: np.ndarray, like: LoadedImage, quality: int = DEFAULT_QUALITY
) -> None:
    """Save (H, W, 3) uint8 ``pixels`` in the format of ``path``'s suffix, in the mode of
    ``like`` where the format allows; atomically. UserError when it cannot be written."""
    path = Path(path)
    fmt = output_format(path)
    if not 1 <= quality <= 100:
        raise UserError(f"quality must be in 1..100, got {quality}")
    mode = _save_mode(like.grey, like.alpha is not None, _FORMATS[path.suffix.lower()][1])
    image = Image.fromarray(pixels, "RGB")
    if mode in ("L", "LA"):
        image = image.convert("L")
    if mode in ("LA", "RGBA"):
        image.putalpha(Image.fromarray(like.alpha, "L"))
    params: dict = {}
    if fmt in ("JPEG", "WEBP"):
        params["quality"] = quality
    if fmt == "JPEG":
        params["subsampling"] = 0  # 4:4:4: keep the watermark's chroma at full resolution
    if fmt in _KEEPS_ICC and "icc_profile" in like.info:
        params["icc_profile"] = like.info["icc_profile"]
    if fmt in _KEEPS_EXIF and "exif" in like.info:
        params["exif"] = like.info["exif"]
    try:
        atomic_write_bytes(path, lambda fh: image.save(fh, format=fmt, **params))
    except OSError as exc:
        raise UserError(f"cannot write '{path}': {exc.strerror or _reason(exc)}") from None


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (peak 255); +inf when they are equal."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def input_images(path: str | Path) -> list[Path]:
    """``path`` itself when it is a file; every image under it (recursively, sorted,
    hidden entries skipped) when it is a folder. UserError when there is nothing."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise UserError(f"'{path}' does not exist")
    files = list_images(path)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under '{path}'")
    return files


def plan_embedding(source: str | Path, target: str | Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs: a file to a file (or into an existing folder, same name),
    or a folder to a folder mirroring its structure (file names and formats kept).
    Checked before any work: UserError for an impossible plan."""
    source, target = Path(source), Path(target)
    if source.is_file():
        destination = target / source.name if target.is_dir() else target
        output_format(destination)
        if destination.resolve() == source.resolve():
            raise UserError(f"'{destination}' is the input itself; give another output, the original must stay")
        return [(source, destination)]
    files = input_images(source)
    if target.exists() and not target.is_dir():
        raise UserError(f"'{target}' is a file; the output of a folder must be a folder")
    if target.resolve() == source.resolve():
        raise UserError("the output folder must differ from the input folder")
    # An output folder inside the input one (``embed photos photos/marked``): its images
    # are this command's earlier outputs, not inputs to watermark once more.
    inside = target.resolve()
    files = [file for file in files if not file.resolve().is_relative_to(inside)]
    if not files:
        raise DataError(f"no images under '{source}' outside the output folder '{target}'")
    pairs = [(file, target / file.relative_to(source)) for file in files]
    inputs = {file.resolve() for file in files}
    for _, destination in pairs:
        output_format(destination)
        if destination.resolve() in inputs:
            raise UserError(f"'{destination}' is one of the inputs; give an output folder that holds none")
    return pairs


@dataclass
class EmbedResult:
    source: Path
    target: Path
    width: int
    height: int
    psnr_db: float
    """Of the watermarked 8-bit pixels against the input's, before any lossy encoding."""


def embed_file(
    marker: Watermarker,
    source: Path,
    target: Path,
    message: torch.Tensor,
    quality: int = DEFAULT_QUALITY,
) -> EmbedResult:
    loaded = read_image(source)
    marked = marker.embed(loaded.pixels, message)
    write_image(target, marked, loaded, quality)
    height, width = marked.shape[:2]
    return EmbedResult(source, target, width, height, psnr_uint8(marked, loaded.pixels))


@dataclass
class ExtractResult:
    path: Path
    bits: torch.Tensor
    confidence: torch.Tensor

    @property
    def text(self) -> str | None:
        return decode_message(self.bits)

    def as_dict(self) -> dict:
        return {
            "path": str(self.path),
            "bits": format_bits(self.bits),
            "confidence": [round(c, 4) for c in self.confidence.tolist()],
            "text": self.text,
        }


def extract_file(marker: Watermarker, path: Path) -> ExtractResult:
    bits, confidence = marker.extract(read_image(path).pixels)
    return ExtractResult(path, bits, confidence)
