"""From an image folder to batches of (cover image, message) pairs.

Three folder layouts are recognised (COCO 2017, HiDDeN/ARWGAN, a flat folder). Every
random choice about a sample (its crop and its message) comes from a generator seeded with
that sample's own seed, which :class:`EpochSampler` derives from (run seed, epoch, index);
so a batch does not depend on worker count, worker order or the global RNG, and a run
resumed mid-epoch sees exactly the samples it would have seen.
"""

from __future__ import annotations

import hashlib
import math
import operator
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from arwgan.config import LoaderConfig
from arwgan.errors import ConfigError, DataError
from arwgan.synthetic import ensure_synthetic_dataset
from autotune.workload import short_socket_tempdir

#: File name endings read as images (compared in lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

COCO_LAYOUT = "COCO 2017"
HIDDEN_LAYOUT = "HiDDeN"
FLAT_LAYOUT = "flat folder"

#: What PIL raises for a file it cannot decode: not an image, corrupt, truncated, too
#: large (decompression bomb), an unsupported mode conversion, or vanished since listing.
UNREADABLE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)

_SEED_MASK = (1 << 63) - 1


def _hash63(*parts: object) -> int:
    """A stable 63-bit integer from ``parts`` (unlike ``hash``, the same in every process)."""
    text = ":".join(str(part) for part in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & _SEED_MASK


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of everything random about sample ``index`` in ``epoch`` of a run."""
    return _hash63("sample", seed, epoch, index)


def _no_images(folder: Path) -> DataError:
    return DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under '{folder}'")


def list_images(folder: Path) -> list[Path]:
    """Image files anywhere under ``folder``, sorted; hidden files and folders are skipped.

    Hidden entries are skipped relative to ``folder`` only (the folder itself may sit in
    ``~/.cache``); they are mostly macOS ``._x.jpg`` companions, which are not images.
    Symlinked folders are followed, each real folder once, so a link loop cannot hang.
    """
    found: list[Path] = []
    visited: set[tuple[int, int]] = set()
    for directory, subdirectories, names in os.walk(folder, followlinks=True):
        status = os.stat(directory)
        if (status.st_dev, status.st_ino) in visited:
            subdirectories.clear()
            continue
        visited.add((status.st_dev, status.st_ino))
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        found.extend(
            Path(directory, name)
            for name in names
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
        )
    return sorted(found)


def find_image_files(
    data_dir: str | Path, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Path], list[Path], str]:
    """Find the train and validation images under ``data_dir``.

    Returns ``(train_files, val_files, layout_name)``, each list sorted. The layout is

    - COCO 2017 when ``train2017/`` and ``val2017/`` both exist;
    - HiDDeN when ``train/`` and ``val/`` both exist (images in subfolders such as
      ``train/<class>/`` or directly inside);
    - otherwise a flat folder: every image in the tree, of which
      ``max(1, round(val_fraction * n))`` (at least one left for training) are held out
      for validation. The held-out files are those with the smallest hash of
      (``seed``, path relative to ``data_dir``), so the split survives moving the folder,
      and adding images moves only a few files across it.

    Raises DataError when the folder is missing, not a folder, holds no image (on either
    side of a train/val split), or a flat folder holds a single image.
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"validation fraction must be in (0, 1), got {val_fraction!r}")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(f"data folder '{root}' does not exist")
    if not root.is_dir():
        raise DataError(f"data folder '{root}' is not a folder")

    for layout, train_name, val_name in (
        (COCO_LAYOUT, "train2017", "val2017"),
        (HIDDEN_LAYOUT, "train", "val"),
    ):
        if (root / train_name).is_dir() and (root / val_name).is_dir():
            sides = [list_images(root / name) for name in (train_name, val_name)]
            for name, files in zip((train_name, val_name), sides):
                if not files:
                    raise _no_images(root / name)
            return sides[0], sides[1], layout

    files = list_images(root)
    if not files:
        raise _no_images(root)
    if len(files) == 1:
        raise DataError(
            f"only one image file under '{root}' ({files[0].name}); a flat folder needs at"
            " least 2: one is held out for validation"
        )
    val_count = min(len(files) - 1, max(1, round(val_fraction * len(files))))
    ranked = sorted(
        files, key=lambda path: _hash63("split", seed, path.relative_to(root).as_posix())
    )
    held_out = set(ranked[:val_count])
    train = [path for path in files if path not in held_out]
    val = [path for path in files if path in held_out]
    return train, val, FLAT_LAYOUT


class EpochSampler(Sampler[tuple[int, int]]):
    """The samples of one epoch, as ``(index, sample_seed)`` pairs, for one rank.

    The epoch's order is a permutation of ``range(length)`` (identity when ``shuffle`` is
    False) from a generator seeded with (``seed``, ``epoch``). It is then made a multiple
    of ``world_size`` so every rank gets as many samples:

    - by default it is padded by repeating its beginning (as ``DistributedSampler``
      does; a repeated index repeats the same sample, seed included);
    - with ``drop_last_batch_size=B`` it is instead truncated to a multiple of
      ``B * world_size``, so every rank yields the same number of full batches of B.

    ``start`` drops the first ``start`` items of that order: the number of samples all
    ranks together consumed before a mid-epoch checkpoint, so it must be a multiple of
    ``world_size``. Rank ``r`` then takes every ``world_size``-th item from the ``r``-th.
    ``sample_seed`` is :func:`sample_seed` (seed, epoch, index). No global RNG is used.
    """

    def __init__(
        self,
        length: int,
        seed: int,
        epoch: int,
        shuffle: bool = True,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last_batch_size: int | None = None,
    ) -> None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if drop_last_batch_size is not None and drop_last_batch_size < 1:
            raise ValueError(f"drop_last_batch_size must be >= 1, got {drop_last_batch_size}")
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.drop_last_batch_size = drop_last_batch_size
        self.set_epoch(epoch, start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Move to ``epoch`` (from item ``start``): a DataLoader keeps its sampler object,
        so this is how persistent workers get the next epoch's order."""
        if start < 0 or start % self.world_size:
            raise ValueError(
                f"start must be a non-negative multiple of {self.world_size}, got {start}"
            )
        if start > self.total_size:
            raise ValueError(
                f"start {start} is past the end of the epoch ({self.total_size} items)"
            )
        self.epoch = epoch
        self.start = start

    @property
    def total_size(self) -> int:
        """Length of the epoch's order over all ranks, after padding or truncation."""
        if self.drop_last_batch_size is not None:
            step = self.drop_last_batch_size * self.world_size
            return self.length // step * step
        return math.ceil(self.length / self.world_size) * self.world_size

    def __len__(self) -> int:
        return (self.total_size - self.start) // self.world_size

    def epoch_order(self) -> list[int]:
        """Every rank's indices of this epoch, interleaved, before ``start`` is applied."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(_hash63("order", self.seed, self.epoch))
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        if self.total_size > len(order) and order:
            order *= math.ceil(self.total_size / len(order))
        return order[: self.total_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.epoch_order()[self.start + self.rank :: self.world_size]:
            yield index, sample_seed(self.seed, self.epoch, index)


class WatermarkDataset(Dataset):
    """Cover images cropped to ``image_size`` squares, each with a random message.

    An item is ``(image, message, skipped)``: ``image`` float32 (3, S, S) in [-1, 1],
    ``message`` float32 (L,) of 0/1 bits, ``skipped`` the number of unreadable files passed
    over to produce it. The key is an index (its own sample seed) or an
    ``(index, sample_seed)`` pair from :class:`EpochSampler`; a generator seeded with the
    sample seed draws the message, then, in training, the crop position; validation takes
    the centre crop, so there only the message depends on the seed.

    An image smaller than S on a side is mirror-padded (reflect) up to S, centred: a
    constant border would be an easy, unnatural place for the encoder to hide bits.
    Transparent images are composited on black; 16-bit and 32-bit integer images are
    scaled from 0..65535 (values beyond it clipped); float images are taken as 0..1 when they lie in it, else
    stretched from their own minimum to maximum.

    A file that cannot be decoded is replaced by the next readable one (index + 1, ...);
    every unreadable file passed over counts in ``skipped``, also when this process had
    already found it bad (each is tried once per process), so the count does not depend
    on which worker loaded what. DataError when no file at all is readable.
    """

    def __init__(
        self, files: Sequence[Path], image_size: int, message_bits: int, train: bool
    ) -> None:
        self.files = list(files)
        self.image_size = image_size
        self.message_bits = message_bits
        self.train = train
        # Index -> reason, for the files this process failed to decode.
        self._unreadable: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.files)

    def load(self, path: Path) -> np.ndarray:
        """Read and decode one file: :func:`load_rgb`. The one place a file is read, so
        that ``arwgan doctor`` can time or throttle reads apart from decoding."""
        return load_rgb(path)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        if isinstance(key, tuple):
            index, seed = (operator.index(part) for part in key)
        else:
            index = seed = operator.index(key)
        count = len(self.files)
        if not 0 <= index < count:
            raise IndexError(f"index {index} out of range for {count} images")

        skipped = 0
        for offset in range(count):
            position = (index + offset) % count
            if position not in self._unreadable:
                try:
                    pixels = self.load(self.files[position])
                    break
                except UNREADABLE_ERRORS as exc:
                    self._unreadable[position] = f"{type(exc).__name__}: {exc}"
            skipped += 1
        else:
            raise DataError(
                f"none of the {count} image files could be read, e.g. '{self.files[index]}'"
                f" ({self._unreadable[index]})"
            )

        generator = torch.Generator().manual_seed(seed)
        message = torch.randint(0, 2, (self.message_bits,), generator=generator).to(torch.float32)
        crop = _crop(pixels, self.image_size, generator if self.train else None)
        # Copy: the decoded array is PIL's read-only buffer, and only the crop is needed.
        image = torch.from_numpy(crop.copy()).permute(2, 0, 1)
        if image.dtype == torch.uint8:
            image = image.to(torch.float32) / 127.5 - 1.0
        else:
            image = image * 2.0 - 1.0
        return image, message, skipped


def load_rgb(path: Path | BinaryIO) -> np.ndarray:
    """Decode ``path`` to (H, W, 3): uint8, or float32 in [0, 1] for high-depth greyscale.

    Raises what PIL raises for an unreadable file (truncation included: ``load`` decodes
    the whole file and truncated images are not tolerated).
    """
    with Image.open(path) as image:
        image.load()
        mode = image.mode
        if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
            # convert("RGB") would clip these to 255 instead of scaling them down.
            grey = np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
            return np.repeat(grey[..., None], 3, axis=2)
        if mode == "F":
            grey = np.asarray(image, dtype=np.float32)
            grey = np.nan_to_num(grey, nan=0.0, posinf=0.0, neginf=0.0)
            low, high = float(grey.min()), float(grey.max())
            if (low < 0.0 or high > 1.0) and high > low:
                grey = (grey - low) / (high - low)
            grey = np.clip(grey, 0.0, 1.0)  # Only a constant image outside [0, 1] is left.
            return np.repeat(grey[..., None], 3, axis=2)
        if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            return np.asarray(Image.alpha_composite(black, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))


def _crop(pixels: np.ndarray, size: int, generator: torch.Generator | None) -> np.ndarray:
    """A ``size`` square: random when ``generator`` is given, else central; mirror-padded
    (centred) first on any side shorter than ``size``."""
    height, width = pixels.shape[:2]
    pad_h, pad_w = max(0, size - height), max(0, size - width)
    if pad_h or pad_w:
        padding = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
        pixels = np.pad(pixels, padding, mode="reflect")
        height, width = pixels.shape[:2]
    if generator is None:
        top, left = (height - size) // 2, (width - size) // 2
    else:
        top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
    return pixels[top : top + size, left : left + size]


def build_datasets(
    data_dir: str | Path | None,
    image_size: int,
    message_bits: int,
    seed: int = 0,
    val_fraction: float = 0.1,
    synthetic_root: str | Path | None = None,
) -> tuple[WatermarkDataset, WatermarkDataset, str]:
    """The train and validation datasets of ``data_dir`` and a one-line description.

    ``data_dir`` None means the built-in synthetic set (generated on first use, under
    ``synthetic_root`` or the default cache). ``seed`` only affects a flat folder's split.
    """
    if data_dir is None:
        root = ensure_synthetic_dataset(synthetic_root)
        origin = "synthetic dataset, "
    else:
        root = Path(data_dir).expanduser()
        origin = ""
    train_files, val_files, layout = find_image_files(root, val_fraction, seed)
    description = (
        f"{origin}{layout} layout at {root.absolute()}: "
        f"{len(train_files)} train, {len(val_files)} val"
    )
    return (
        WatermarkDataset(train_files, image_size, message_bits, train=True),
        WatermarkDataset(val_files, image_size, message_bits, train=False),
        description,
    )


def make_loader(
    dataset: WatermarkDataset, loader_cfg: LoaderConfig, sampler: Sampler, drop_last: bool
) -> DataLoader:
    """A DataLoader over ``sampler``'s order with ``loader_cfg``'s settings.

    Batches collate to ``(images, messages, skipped)`` tensors. The loader gets its own
    generator because without one it draws the workers' base seed from the global RNG,
    which would shift every later global draw; nothing in a sample depends on that seed.
    """
    workers = loader_cfg.num_workers
    return DataLoader(
        dataset,
        batch_size=loader_cfg.batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=loader_cfg.pin_memory,
        persistent_workers=loader_cfg.persistent_workers if workers else False,
        prefetch_factor=loader_cfg.prefetch_factor if workers else None,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=short_socket_tempdir if workers else None,
    )
