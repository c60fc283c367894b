"""A built-in procedural image set, so demos, tests and benchmarks run without a download.

Uniform noise would be a poor stand-in for photos: a watermark encoder learns to hide bits
where content is busy and a JPEG attack removes high frequencies, so the images need what
photos have: smooth areas, hard and soft edges, textures and a little sensor noise. Each
image is a smooth multi-colour background under uneven lighting, with shapes (ellipses,
rectangles, polygons, lines) that are flat, shaded, striped or grainy, have soft edges and
partial opacity, sometimes a slight blur, and mild noise. The files are JPEGs in the HiDDeN
layout, so a loader decodes them at the cost real data has.

Image ``i`` depends only on ``(seed, i)``, so a set is reproducible and its images could be
drawn in any order or in parallel.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from arwgan.errors import ConfigError

#: Bumped whenever the drawing changes, so a cached set from older code is not reused.
GENERATOR_VERSION = 2
#: Written last into a finished set; a folder without it is not trusted.
MARKER_NAME = ".complete.json"
JPEG_QUALITY = 90
#: Temporary folders of interrupted generations older than this are removed.
_STALE_PARTIAL_S = 3600.0


def default_cache_root() -> Path:
    """``$ARWGAN_CACHE`` when set, else ``~/.cache/arwgan``."""
    return Path(os.environ.get("ARWGAN_CACHE") or Path.home() / ".cache" / "arwgan").expanduser()


def synthetic_image(index: int, size: int = 160, seed: int = 0) -> Image.Image:
    """Draw image ``index`` of the set with this ``seed``: an RGB PIL image of side ``size``."""
    rng = np.random.default_rng([seed, index])
    return Image.fromarray(_render(rng, size))


def ensure_synthetic_dataset(
    root: str | Path | None = None,
    train_count: int = 2000,
    val_count: int = 200,
    size: int = 160,
    seed: int = 0,
) -> Path:
    """Return the folder of the synthetic set with these parameters, generating it once.

    The set lives in ``<root>/synthetic-v<version>-s<seed>-n<train>-v<val>-<size>`` with
    images in ``train/synthetic/*.jpg`` and ``val/synthetic/*.jpg`` (validation images use
    indices after the training ones, so the two sides never share an image). ``root``
    defaults to :func:`default_cache_root`.

    A finished set is recognised by its marker file and returned at once. Generation
    writes into a temporary sibling folder that is renamed into place only when complete,
    so an interrupted run never leaves a folder that looks finished; when another process
    finishes the same set first, this one's copy is discarded and theirs is returned.
    """
    for name, value, minimum in (
        ("seed", seed, 0),
        ("train_count", train_count, 1),
        ("val_count", val_count, 1),
        ("size", size, 8),
    ):
        if not isinstance(value, int) or value < minimum:
            raise ConfigError(f"synthetic {name} must be an integer >= {minimum}, got {value!r}")

    parent = Path(root).expanduser() if root is not None else default_cache_root()
    name = f"synthetic-v{GENERATOR_VERSION}-s{seed}-n{train_count}-v{val_count}-{size}"
    final = parent / name
    if (final / MARKER_NAME).is_file():
        return final

    parent.mkdir(parents=True, exist_ok=True)
    partial_prefix = f".{name}.partial-"
    _remove_stale_partials(parent, partial_prefix)
    partial = Path(tempfile.mkdtemp(prefix=partial_prefix, dir=parent))
    partial.chmod(0o755)  # mkdtemp makes it private; the cache may be shared.
    try:
        _write_set(partial, train_count, val_count, size, seed)
        _publish(partial, final)
    finally:
        # After a successful rename the partial path no longer exists; otherwise it is ours.
        shutil.rmtree(partial, ignore_errors=True)
    return final


def _write_set(folder: Path, train_count: int, val_count: int, size: int, seed: int) -> None:
    """Write every image, then the marker (last, so its presence means "complete")."""
    for split, first, count in (("train", 0, train_count), ("val", train_count, val_count)):
        directory = folder / split / "synthetic"
        directory.mkdir(parents=True)
        # Serial on purpose: threads gain nothing (the many small numpy steps hold the GIL)
        # and worker processes are unsafe to fork from a trainer that has started CUDA.
        for index in range(first, first + count):
            image = synthetic_image(index, size, seed)
            image.save(directory / f"{index:06d}.jpg", quality=JPEG_QUALITY)

    marker = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "train_count": train_count,
        "val_count": val_count,
        "size": size,
        "jpeg_quality": JPEG_QUALITY,
    }
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")


def _publish(partial: Path, final: Path) -> None:
    """Rename the finished ``partial`` to ``final`` unless a complete copy got there first."""
    try:
        os.rename(partial, final)
        return
    except OSError:
        if (final / MARKER_NAME).is_file():
            return  # A concurrent generator won; its set is identical.
    # ``final`` exists without a marker: not written by this code (renames are atomic),
    # so it cannot be trusted. Replace it.
    shutil.rmtree(final, ignore_errors=True)
    try:
        os.rename(partial, final)
    except OSError:
        if not (final / MARKER_NAME).is_file():
            raise


def _remove_stale_partials(parent: Path, prefix: str) -> None:
    """Delete leftovers of generations that were killed (they are hidden, but take space)."""
    now = time.time()
    for entry in parent.glob(prefix + "*"):
        try:
            if now - entry.stat().st_mtime > _STALE_PARTIAL_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue  # Removed meanwhile by another process.


@lru_cache(maxsize=8)
def _coordinates(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1], shape (size, 1) and (1, size); read-only."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    ys, xs = axis[:, None].copy(), axis[None, :].copy()
    ys.flags.writeable = False
    xs.flags.writeable = False
    return ys, xs


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """An RGB colour in [0, 1] with the moderate saturation typical of photos."""
    grey = rng.uniform(0.05, 0.95)
    hue = rng.random(3).astype(np.float32)
    saturation = rng.uniform(0.0, 0.7)
    return np.clip(grey + saturation * (hue - hue.mean()), 0.0, 1.0).astype(np.float32)


def _upsampled(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Value noise: a ``cells`` x ``cells`` grid of uniform values, bicubically upsampled."""
    grid = Image.fromarray(rng.random((cells, cells), dtype=np.float32))  # Mode "F".
    return np.asarray(grid.resize((size, size), Image.BICUBIC))


def _fractal_noise(
    rng: np.random.Generator, size: int, base_cells: int, octaves: int
) -> np.ndarray:
    """Octaves of value noise (each twice as fine and half as strong), scaled to [0, 1]."""
    total = np.zeros((size, size), dtype=np.float32)
    for octave in range(octaves):
        cells = min(size, base_cells * 2**octave)
        total += _upsampled(rng, cells, size) * (0.5**octave)
    low, high = float(total.min()), float(total.max())
    return (total - low) / max(high - low, 1e-6)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth multi-colour gradient: a few random colours bicubically blended."""
    cells = int(rng.integers(2, 5))
    grid = np.stack([_random_colour(rng) for _ in range(cells * cells)])
    grid = (grid.reshape(cells, cells, 3) * 255).astype(np.uint8)
    smooth = Image.fromarray(grid).resize((size, size), Image.BICUBIC)
    return np.asarray(smooth, dtype=np.float32) / 255.0


def _shape_alpha(
    rng: np.random.Generator, size: int
) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """Coverage in [0, 1] of one random shape with a softened edge, and its bounding box.

    Returns ``(alpha, (left, top, right, bottom))`` with ``alpha`` covering only the box,
    or None when the shape fell outside the frame. Blurring just the box, not the whole
    frame, is what keeps generation fast.
    """
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    kind = rng.choice(4, p=[0.3, 0.25, 0.3, 0.15])
    centre = rng.uniform(-0.1, 1.1, 2) * size
    extent = rng.uniform(0.03, 0.4, 2) * size
    if kind == 0:
        draw.ellipse([*(centre - extent), *(centre + extent)], fill=255)
    elif kind == 1:
        draw.rectangle([*(centre - extent), *(centre + extent)], fill=255)
    elif kind == 2:
        corners = int(rng.integers(3, 8))
        angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
        radii = rng.uniform(0.4, 1.0, corners)[:, None] * extent
        points = centre + radii * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        draw.polygon([tuple(p) for p in points], fill=255)
    else:
        points = rng.uniform(-0.1, 1.1, (int(rng.integers(2, 5)), 2)) * size
        width = max(1, int(rng.integers(1, 7) * size / 160))
        draw.line([tuple(p) for p in points], fill=255, width=width)
    softness = rng.uniform(0.0, 2.5) * size / 160
    box = mask.getbbox()
    if box is None:
        return None
    if softness > 0.3:
        margin = int(np.ceil(3 * softness))
        left, top, right, bottom = box
        box = (max(0, left - margin), max(0, top - margin),
               min(size, right + margin), min(size, bottom + margin))
        mask = mask.crop(box).filter(ImageFilter.GaussianBlur(softness))
    else:
        mask = mask.crop(box)
    return np.asarray(mask, dtype=np.float32) / 255.0, box


def _fill(rng: np.random.Generator, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """The colour of a shape inside ``box`` (left, top, right, bottom): (h, w, 3) or (3,)."""
    left, top, right, bottom = box
    ys, xs = _coordinates(size)
    ys, xs = ys[top:bottom], xs[:, left:right]
    colour = _random_colour(rng)
    kind = rng.choice(4, p=[0.3, 0.2, 0.2, 0.3])
    if kind == 0:
        return colour
    if kind == 1:  # Linear shading between two colours, as on a lit curved surface.
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * xs + np.sin(angle) * ys
        t = np.clip((ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6), 0, 1)
        return colour + (_random_colour(rng) - colour) * t[..., None]
    if kind == 2:  # Stripes of random period, angle and sharpness (fabric, blinds, fences).
        angle = rng.uniform(0, np.pi)
        period_px = rng.uniform(3.0, 20.0)
        phase = np.cos(angle) * xs + np.sin(angle) * ys
        wave = np.sin(phase * (2 * np.pi * size / period_px) + rng.uniform(0, 2 * np.pi))
        t = np.clip(0.5 + 0.5 * rng.uniform(1.0, 4.0) * wave, 0, 1)
        return colour + (_random_colour(rng) - colour) * t[..., None]
    # Grain (foliage, gravel, carpet): fine value noise modulating the colour.
    grain = _fractal_noise(rng, size, int(rng.integers(12, 40)), 2)[top:bottom, left:right]
    return colour * (0.6 + 0.8 * grain)[..., None]


def _render(rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw one image from ``rng``: (size, size, 3) uint8.

    Version 2 made the set busier at the 32-pixel scale the CPU runs train on: version 1
    crops were smooth (median high-pass std of 32x32 crops 0.0065, against 0.016 for
    real photographs, measured as in benchmarks/train_cpu.py), which let an encoder hide
    its message as a flat colour shift. Now every surface carries fine texture (paper,
    plaster, skin, foliage), and more and smaller shapes add edges.
    """
    image = _background(rng, size)
    lighting = _fractal_noise(rng, size, int(rng.integers(2, 5)), 3)
    image *= (0.7 + 0.6 * lighting)[..., None]

    for _ in range(int(rng.integers(8, 24))):
        shape = _shape_alpha(rng, size)
        if shape is None:
            continue  # Drawn entirely outside the frame.
        alpha, box = shape
        left, top, right, bottom = box
        if rng.random() < 0.4:
            alpha *= rng.uniform(0.5, 1.0)  # Translucent: glass, shadows, haze.
        region = image[top:bottom, left:right]
        region += (_fill(rng, size, box) - region) * alpha[..., None]
    # Surface texture over everything, flat shapes included (no real surface is flat).
    texture = _fractal_noise(rng, size, int(rng.integers(size // 5, size // 2)), 3)
    strength = rng.uniform(0.15, 0.5)
    image *= (1 - strength / 2 + strength * texture)[..., None]

    pixels = Image.fromarray((np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    if rng.random() < 0.15:  # Out of focus or motion: some photos are not sharp.
        pixels = pixels.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5) * size / 160))
    sensor_noise = rng.standard_normal((size, size, 3), dtype=np.float32) * rng.uniform(1.5, 5.0)
    noisy = np.asarray(pixels, dtype=np.float32) + sensor_noise
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
