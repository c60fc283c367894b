"""Tests of folder layouts, decoding, seeded sampling and the synthetic image set."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arwgan import data, synthetic
from arwgan.config import LoaderConfig
from arwgan.data import (
    EpochSampler,
    WatermarkDataset,
    build_datasets,
    find_image_files,
    make_loader,
    sample_seed,
)
from arwgan.errors import DataError
from arwgan.synthetic import MARKER_NAME, ensure_synthetic_dataset

SIZE = 16


def _rgb(width: int = 24, height: int = 20, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _touch_images(root: Path, relative_paths: list[str]) -> list[Path]:
    paths = []
    for number, relative in enumerate(relative_paths):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        _rgb(seed=number).save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")
        paths.append(path)
    return paths


def _jpeg_bytes(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    synthetic.synthetic_image(0, size).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    return ensure_synthetic_dataset(root, train_count=12, val_count=4, size=40)


# --- layouts -------------------------------------------------------------------------


def test_coco_layout_with_nested_folders(tmp_path):
    train = _touch_images(tmp_path, ["train2017/b.jpg", "train2017/a.jpg", "train2017/sub/c.png"])
    val = _touch_images(tmp_path, ["val2017/x.jpg"])
    assert find_image_files(tmp_path) == (sorted(train), val, "COCO 2017")


def test_hidden_layout_with_class_folders_and_loose_images(tmp_path):
    train = _touch_images(tmp_path, ["train/cls/a.jpg", "train/cls/deep/b.jpg", "train/loose.png"])
    val = _touch_images(tmp_path, ["val/cls/c.jpg", "val/d.JPEG"])
    assert find_image_files(tmp_path) == (sorted(train), sorted(val), "HiDDeN")


def test_flat_folder_skips_hidden_and_non_images(tmp_path):
    images = _touch_images(tmp_path, [f"d{i % 3}/sub/img{i}.JPG" for i in range(18)] + ["top.png"])
    _touch_images(tmp_path, [".git/x.jpg", "d0/._mac.jpg", "d1/.hidden/y.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    train, val, layout = find_image_files(tmp_path, val_fraction=0.1, seed=0)
    assert layout == "flat folder"
    assert len(val) == 2  # round(0.1 * 19)
    assert sorted(train + val) == sorted(images)
    assert train == sorted(train) and val == sorted(val)


def test_flat_split_is_deterministic_and_follows_the_seed(tmp_path):
    _touch_images(tmp_path, [f"img{i:02d}.png" for i in range(20)])
    first = find_image_files(tmp_path, val_fraction=0.25, seed=3)
    assert find_image_files(tmp_path, val_fraction=0.25, seed=3) == first
    assert len(first[1]) == 5
    assert find_image_files(tmp_path, val_fraction=0.25, seed=4)[1] != first[1]

    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.copytree(tmp_path, moved)
    assert [p.name for p in find_image_files(moved, 0.25, seed=3)[1]] == [p.name for p in first[1]]


def test_flat_split_keeps_one_of_each(tmp_path):
    _touch_images(tmp_path, ["a.png", "b.png"])
    for fraction in (0.01, 0.99):
        train, val, _ = find_image_files(tmp_path, val_fraction=fraction)
        assert len(train) == 1 and len(val) == 1


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=f"data folder '{tmp_path / 'nope'}' does not exist"):
        find_image_files(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    path = _touch_images(tmp_path, ["one.jpg"])[0]
    with pytest.raises(DataError, match="is not a folder"):
        find_image_files(path)


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match=r"no images \(\.jpg, .*\) found under '.*'"):
        find_image_files(tmp_path)


def test_split_with_an_empty_side(tmp_path):
    _touch_images(tmp_path, ["train/a/x.jpg"])
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=f"found under '{tmp_path / 'val'}'"):
        find_image_files(tmp_path)


def test_single_image_cannot_be_split(tmp_path):
    _touch_images(tmp_path, ["only.jpg"])
    with pytest.raises(DataError, match="only one image"):
        find_image_files(tmp_path)


# --- decoding ------------------------------------------------------------------------


def _grey16() -> Image.Image:
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    return Image.fromarray(ramp)


def _palette_with_transparency() -> Image.Image:
    image = _rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    image.info["transparency"] = 0
    return image


IMAGE_CASES = {
    "grey.png": lambda: _rgb().convert("L"),
    "bilevel.png": lambda: _rgb().convert("1"),
    "palette.png": _palette_with_transparency,
    "rgba.png": lambda: _rgb().convert("RGBA"),
    "la.png": lambda: _rgb().convert("LA"),
    "grey16.png": _grey16,
    "int32.tif": lambda: Image.fromarray(np.full((20, 20), 40000, dtype=np.int32)),
    "float.tif": lambda: Image.fromarray(np.linspace(-3, 7, 400, dtype=np.float32).reshape(20, 20)),
    "cmyk.jpg": lambda: _rgb().convert("CMYK"),
    "tiny.png": lambda: _rgb(width=5, height=3),
    "one_pixel.bmp": lambda: _rgb(width=1, height=1),
    "photo.webp": lambda: _rgb(),
    "grey.pgm": lambda: _rgb().convert("L"),
    "colour.ppm": lambda: _rgb(),
}


@pytest.mark.parametrize("name", sorted(IMAGE_CASES))
@pytest.mark.parametrize("train", [True, False])
def test_every_mode_becomes_rgb_in_range(tmp_path, name, train):
    path = tmp_path / name
    IMAGE_CASES[name]().save(path)
    image, message, skipped = WatermarkDataset([path], SIZE, 7, train=train)[(0, 123)]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert message.shape == (7,) and message.dtype == torch.float32
    assert set(message.tolist()) <= {0.0, 1.0}
    assert skipped == 0


def test_16_bit_values_are_scaled_not_clipped(tmp_path):
    path = tmp_path / "ramp.png"
    _grey16().save(path)
    with Image.open(path) as decoded:
        assert decoded.mode == "I;16"
    image = WatermarkDataset([path], 32, 4, train=False)[0][0]
    assert float(image.min()) == -1.0 and float(image.max()) == 1.0
    assert float((image == 1.0).float().mean()) < 0.01
    assert len(torch.unique(image)) > 500


def test_transparent_pixels_become_black(tmp_path):
    pixels = np.full((SIZE, SIZE, 4), 255, dtype=np.uint8)
    pixels[:, : SIZE // 2, 3] = 0
    Image.fromarray(pixels, "RGBA").save(tmp_path / "half.png")
    image = WatermarkDataset([tmp_path / "half.png"], SIZE, 4, train=False)[0][0]
    assert torch.all(image[:, :, : SIZE // 2] == -1.0)
    assert torch.all(image[:, :, SIZE // 2 :] == 1.0)


def test_small_images_are_mirror_padded(tmp_path):
    row = np.array([[[0] * 3, [255] * 3, [0] * 3]], dtype=np.uint8)
    Image.fromarray(row).save(tmp_path / "row.png")
    image = WatermarkDataset([tmp_path / "row.png"], 5, 1, train=False)[0][0]
    assert image[0].tolist() == [[1.0, -1.0, 1.0, -1.0, 1.0]] * 5  # Reflect: 255 | 0 255 0 | 255.


# --- unreadable files ----------------------------------------------------------------


@pytest.fixture
def folder_with_bad_files(tmp_path) -> list[Path]:
    """Six files, sorted; positions 1 (random bytes) and 2 (truncated JPEG) are unreadable."""
    paths = _touch_images(tmp_path, [f"img{i}.jpg" for i in (0, 3, 4, 5)])
    (tmp_path / "img1.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    whole = _jpeg_bytes()
    (tmp_path / "img2.jpg").write_bytes(whole[: len(whole) // 2])
    return sorted(paths + [tmp_path / "img1.jpg", tmp_path / "img2.jpg"])


def test_unreadable_files_are_skipped_and_counted(folder_with_bad_files):
    dataset = WatermarkDataset(folder_with_bad_files, SIZE, 5, train=False)
    assert [dataset[(i, 9)][2] for i in range(6)] == [0, 2, 1, 0, 0, 0]
    for bad in (1, 2):  # A bad file is replaced by the next readable one: file 3.
        assert torch.equal(dataset[(bad, 9)][0], dataset[(3, 9)][0])
        assert torch.equal(dataset[(bad, 9)][1], dataset[(3, 9)][1])


def test_a_bad_file_is_tried_once_per_process(folder_with_bad_files):
    dataset = WatermarkDataset(folder_with_bad_files, SIZE, 5, train=True)
    assert dataset[1][2] == 2
    shutil.copy(folder_with_bad_files[0], folder_with_bad_files[1])  # Now readable.
    assert dataset[1][2] == 2
    assert WatermarkDataset(folder_with_bad_files, SIZE, 5, train=True)[1][2] == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_pass_over_bad_files_yields_every_batch(folder_with_bad_files, workers):
    dataset = WatermarkDataset(folder_with_bad_files, SIZE, 5, train=True)
    cfg = LoaderConfig(batch_size=4, num_workers=workers)
    loader = make_loader(dataset, cfg, EpochSampler(6, 1, 0), drop_last=False)
    batches = list(loader)
    assert [len(images) for images, _, _ in batches] == [4, 2]
    assert sum(int(skipped.sum()) for _, _, skipped in batches) == 3  # 2 (from 1) + 1 (from 2)
    reference = [dataset[key] for key in EpochSampler(6, 1, 0)]
    expected = torch.stack([image for image, _, _ in reference])
    assert torch.equal(torch.cat([images for images, _, _ in batches]), expected)


def test_all_files_bad_is_a_data_error(tmp_path):
    paths = [tmp_path / f"bad{i}.png" for i in range(3)]
    for path in paths:
        path.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="none of the 3 image files could be read"):
        WatermarkDataset(paths, SIZE, 4, train=True)[1]


# --- per-sample randomness -----------------------------------------------------------


def test_same_sample_seed_same_crop_and_message(tmp_path):
    (path,) = _touch_images(tmp_path, ["big.png"])
    dataset = WatermarkDataset([path], 8, 32, train=True)
    first, again = dataset[(0, 42)], dataset[(0, 42)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    others = [dataset[(0, seed)] for seed in range(43, 53)]
    assert any(not torch.equal(first[0], other[0]) for other in others)
    assert all(not torch.equal(first[1], other[1]) for other in others)
    assert torch.equal(dataset[0][1], dataset[(0, 0)][1])  # An int key is its own seed.


def test_val_takes_the_centre_crop(tmp_path):
    (path,) = _touch_images(tmp_path, ["big.png"])  # 24 wide, 20 high.
    dataset = WatermarkDataset([path], 8, 4, train=False)
    with Image.open(path) as decoded:
        pixels = np.array(decoded)
    expected = torch.from_numpy(pixels[6:14, 8:16]).permute(2, 0, 1) / 127.5 - 1
    for seed in (0, 1, 2**62):
        assert torch.equal(dataset[(0, seed)][0], expected)


# --- sampler -------------------------------------------------------------------------


def test_sampler_is_a_seeded_permutation_per_epoch():
    items = list(EpochSampler(50, seed=3, epoch=1))
    assert items == list(EpochSampler(50, seed=3, epoch=1))
    assert sorted(index for index, _ in items) == list(range(50))
    assert all(seed == sample_seed(3, 1, index) and 0 <= seed < 2**63 for index, seed in items)
    other_epoch = list(EpochSampler(50, seed=3, epoch=2))
    assert [i for i, _ in other_epoch] != [i for i, _ in items]
    assert {s for _, s in other_epoch}.isdisjoint(s for _, s in items)
    assert [i for i, _ in EpochSampler(5, 3, 1, shuffle=False)] == [0, 1, 2, 3, 4]


def test_sampler_uses_no_global_rng():
    state = torch.get_rng_state()
    list(EpochSampler(20, seed=0, epoch=0))
    assert torch.equal(state, torch.get_rng_state())


def test_sampler_start_skips_exactly():
    full = list(EpochSampler(17, seed=5, epoch=4))
    resumed = EpochSampler(17, seed=5, epoch=4, start=6)
    assert list(resumed) == full[6:] and len(resumed) == 11
    resumed.set_epoch(5)
    assert list(resumed) == list(EpochSampler(17, seed=5, epoch=5))
    with pytest.raises(ValueError):
        EpochSampler(17, 5, 4, start=18)


def test_sampler_ranks_partition_padded_order():
    order = EpochSampler(10, seed=1, epoch=0, world_size=3).epoch_order()
    ranks = [list(EpochSampler(10, seed=1, epoch=0, rank=r, world_size=3)) for r in range(3)]
    assert [len(items) for items in ranks] == [4, 4, 4]
    assert [[i for i, _ in items] for items in ranks] == [order[r::3] for r in range(3)]
    assert sorted(i for items in ranks for i, _ in items) == sorted(list(range(10)) + order[:2])


def test_sampler_ranks_with_start_and_whole_batches():
    length, world, batch = 23, 2, 3
    order = EpochSampler(length, 7, 2, world_size=world, drop_last_batch_size=batch).epoch_order()
    assert len(order) == 18 and len(set(order)) == 18
    for rank in range(world):
        sampler = EpochSampler(
            length, 7, 2, start=6, rank=rank, world_size=world, drop_last_batch_size=batch
        )
        assert len(sampler) == 6
        assert [i for i, _ in sampler] == order[6 + rank :: world]
    with pytest.raises(ValueError):
        EpochSampler(length, 7, 2, start=3, world_size=2)


# --- loaders and datasets ------------------------------------------------------------


def test_make_loader_uses_the_config_and_no_global_rng(tiny_synthetic):
    dataset = build_datasets(str(tiny_synthetic), SIZE, 6)[0]
    cfg = LoaderConfig(batch_size=5, num_workers=0)
    loader = make_loader(dataset, cfg, EpochSampler(len(dataset), 0, 0), drop_last=True)
    assert loader.batch_size == 5 and loader.num_workers == 0
    assert loader.prefetch_factor is None and loader.drop_last
    state = torch.get_rng_state()
    batches = list(loader)
    assert torch.equal(state, torch.get_rng_state())
    images, messages, skipped = batches[0]
    assert len(batches) == 2
    assert images.shape == (5, 3, SIZE, SIZE) and messages.shape == (5, 6)
    assert skipped.tolist() == [0] * 5

    cfg = LoaderConfig(
        batch_size=2, num_workers=2, pin_memory=True, persistent_workers=True, prefetch_factor=5
    )
    loader = make_loader(dataset, cfg, EpochSampler(len(dataset), 0, 0), drop_last=False)
    assert loader.num_workers == 2 and loader.pin_memory and loader.persistent_workers
    assert loader.prefetch_factor == 5


def test_build_datasets_describes_the_layout(tmp_path):
    _touch_images(tmp_path, ["train2017/a.jpg", "train2017/b.jpg", "val2017/c.jpg"])
    train, val, description = build_datasets(tmp_path, SIZE, 4)
    assert (len(train), len(val), train.train, val.train) == (2, 1, True, False)
    assert description == f"COCO 2017 layout at {tmp_path}: 2 train, 1 val"


def test_build_datasets_without_a_folder_uses_the_synthetic_set(
    tiny_synthetic, monkeypatch, tmp_path
):
    roots = []

    def fake_ensure(root):
        roots.append(root)
        return tiny_synthetic

    monkeypatch.setattr(data, "ensure_synthetic_dataset", fake_ensure)
    train, val, description = build_datasets(None, SIZE, 4, synthetic_root=tmp_path)
    assert roots == [tmp_path] and (len(train), len(val)) == (12, 4)
    assert description.startswith("synthetic dataset, HiDDeN layout at")


# --- synthetic set -------------------------------------------------------------------


def test_synthetic_layout_and_files(tiny_synthetic):
    assert tiny_synthetic.name == "synthetic-v2-s0-n12-v4-40"
    train, val, layout = find_image_files(tiny_synthetic)
    assert layout == "HiDDeN" and len(train) == 12 and len(val) == 4
    assert {p.parent.name for p in train + val} == {"synthetic"}
    for path in train + val:
        assert path.read_bytes()[:2] == b"\xff\xd8"
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (40, 40))


def test_synthetic_is_reproducible(tiny_synthetic, tmp_path):
    again = ensure_synthetic_dataset(tmp_path, train_count=12, val_count=4, size=40)
    relative = Path("val", "synthetic", "000013.jpg")
    assert (again / relative).read_bytes() == (tiny_synthetic / relative).read_bytes()
    other = ensure_synthetic_dataset(tmp_path, train_count=12, val_count=4, size=40, seed=1)
    assert (other / relative).read_bytes() != (tiny_synthetic / relative).read_bytes()


def test_synthetic_images_look_like_photos_not_noise():
    for index in range(8):
        pixels = np.asarray(synthetic.synthetic_image(index, 96), dtype=np.float64)
        grey = pixels.mean(axis=2)
        neighbour_correlation = np.corrcoef(grey[:, :-1].ravel(), grey[:, 1:].ravel())[0, 1]
        assert neighbour_correlation > 0.8
        assert 10 < grey.std() < 110
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000


def test_synthetic_marker_means_no_regeneration(tiny_synthetic, monkeypatch):
    def fail(*args):
        raise AssertionError("regenerated")

    monkeypatch.setattr(synthetic, "synthetic_image", fail)
    again = ensure_synthetic_dataset(tiny_synthetic.parent, train_count=12, val_count=4, size=40)
    assert again == tiny_synthetic
    assert (tiny_synthetic / MARKER_NAME).is_file()


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real = synthetic.synthetic_image
    calls = []

    def crash_on_fifth(*args):
        calls.append(args)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(synthetic, "synthetic_image", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_dataset(tmp_path, train_count=6, val_count=2, size=16)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(synthetic, "synthetic_image", real)
    folder = ensure_synthetic_dataset(tmp_path, train_count=6, val_count=2, size=16)
    assert len(find_image_files(folder)[0]) == 6


def test_concurrent_generator_finishing_first_wins(tmp_path, monkeypatch):
    real_write = synthetic._write_set
    final = tmp_path / "synthetic-v2-s0-n3-v1-16"

    def write_while_another_finishes(folder, *args):
        real_write(folder, *args)
        shutil.copytree(folder, final)  # The other process renames its copy first.
        (final / "theirs").write_text("")

    monkeypatch.setattr(synthetic, "_write_set", write_while_another_finishes)
    assert ensure_synthetic_dataset(tmp_path, train_count=3, val_count=1, size=16) == final
    assert sorted(os.listdir(tmp_path)) == [final.name] and (final / "theirs").exists()


def test_synthetic_default_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ARWGAN_CACHE", str(tmp_path))
    folder = ensure_synthetic_dataset(train_count=2, val_count=1, size=16)
    assert folder == tmp_path / "synthetic-v2-s0-n2-v1-16" and (folder / MARKER_NAME).is_file()


def test_workers_deliver_batches_under_a_long_temporary_folder(tiny_data_dir, tmp_path, monkeypatch):
    """A worker passes each batch through a Unix socket that multiprocessing creates
    under the temporary folder; under a 150-character TMPDIR its path does not fit, and
    the loader used to wait forever for the first batch."""
    import multiprocessing
    import tempfile

    from arwgan.config import LoaderConfig
    from arwgan.data import EpochSampler, build_datasets, make_loader

    long_tmp = tmp_path / ("t" * max(1, 150 - len(str(tmp_path)) - 1))
    long_tmp.mkdir()
    assert len(str(long_tmp)) >= 150
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    monkeypatch.delitem(multiprocessing.current_process()._config, "tempdir", raising=False)
    train_set = build_datasets(str(tiny_data_dir), 16, 4, seed=0)[0]
    loader = make_loader(train_set, LoaderConfig(batch_size=4, num_workers=2),
                         EpochSampler(8, seed=0, epoch=0), drop_last=True)
    loader.timeout = 120  # a failure fails instead of hanging the suite
    batches = [images.shape for images, _, _ in loader]
    assert batches == [(4, 3, 16, 16)] * 2
