"""Storage: filesystem type from a mounts table, the read-rate measurement (real files,
cold reads; a throttled reader double), and the pure storage check."""

from __future__ import annotations

from pathlib import Path

import pytest

from autotune.storage import filesystem_of, measure_read_rate, parse_mounts, read_file, storage_limit

MOUNTS = """\
/dev/nvme0n1p2 / ext4 rw,relatime 0 0
proc /proc proc rw 0 0
server:/export /mnt/data nfs4 rw,vers=4.2 0 0
/dev/sdb1 /mnt/data/local xfs rw 0 0
/dev/sdc1 /mnt/my\\040disk ext4 rw 0 0
gcs /mnt/bucket fuse.gcsfuse rw 0 0
"""


def test_parse_mounts_decodes_escaped_spaces() -> None:
    assert ("/mnt/my disk", "ext4") in parse_mounts(MOUNTS)


@pytest.mark.parametrize("path, fstype, point, network", [
    ("/home/user/coco", "ext4", "/", False),
    ("/mnt/data/coco/train2017", "nfs4", "/mnt/data", True),
    ("/mnt/data/local/coco", "xfs", "/mnt/data/local", False),  # longest mount point wins
    ("/mnt/datasets", "ext4", "/", False),  # a name prefix is not a parent folder
    ("/mnt/my disk/x", "ext4", "/mnt/my disk", False),
    ("/mnt/bucket/coco", "fuse.gcsfuse", "/mnt/bucket", True),
])
def test_filesystem_of(path, fstype, point, network) -> None:
    fs = filesystem_of(path, MOUNTS)
    assert (fs.type, fs.mount_point, fs.network) == (fstype, point, network)
    assert fs.where == ("network" if network else "local")


def test_read_file_reads_everything_and_drops_the_cache_where_it_can(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"x" * 3_000_000)
    size, cold = read_file(path)
    assert size == 3_000_000
    import os

    assert cold == hasattr(os, "posix_fadvise")
    assert read_file(path, drop_cache=False) == (3_000_000, False)


class ThrottledReader:
    """A test double for slow storage: each read advances a fake clock by ``delay``."""

    def __init__(self, clock: list[float], delay: float, size: int) -> None:
        self.clock, self.delay, self.size = clock, delay, size
        self.reads: list[Path] = []

    def __call__(self, path: Path) -> tuple[int, bool]:
        self.clock[0] += self.delay
        self.reads.append(path)
        return self.size, True


def test_read_rate_of_a_throttled_reader_stops_at_the_time_budget() -> None:
    now = [0.0]
    reader = ThrottledReader(now, delay=0.125, size=50_000)  # exact in binary
    files = [Path(f"f{i}.jpg") for i in range(100)]
    rate = measure_read_rate(files, max_seconds=1.0, reader=reader, clock=lambda: now[0])
    assert rate.files == 8
    assert rate.bytes == 400_000
    assert rate.bytes_per_s == 400_000
    assert rate.cold and rate.cache == "cold"
    assert rate.mean_file_bytes == 50_000


def test_read_rate_stops_at_the_byte_budget_and_skips_unreadable_files() -> None:
    def reader(path: Path) -> tuple[int, bool]:
        if path.name == "f1.jpg":
            raise OSError("gone")
        return 1000, False

    files = [Path(f"f{i}.jpg") for i in range(50)]
    rate = measure_read_rate(files, max_bytes=5000, reader=reader)
    assert (rate.files, rate.bytes, rate.cold, rate.cache) == (5, 5000, False, "warm cache")


def test_read_rate_visits_files_spread_over_a_long_list() -> None:
    now = [0.0]
    reader = ThrottledReader(now, delay=0.0, size=1)
    files = [Path(f"f{i}") for i in range(5000)]
    measure_read_rate(files, max_bytes=3, reader=reader, clock=lambda: now[0])
    assert reader.reads == [Path("f0"), Path("f997"), Path("f1994")]


def test_read_rate_of_real_files_with_parallel_streams(tmp_path: Path) -> None:
    files = []
    for i in range(6):
        path = tmp_path / f"{i}.bin"
        path.write_bytes(bytes(10_000 + i))
        files.append(path)
    rate = measure_read_rate(files, streams=3)
    assert rate.files == 6 and rate.bytes == sum(10_000 + i for i in range(6))
    assert rate.streams == 3
    assert measure_read_rate([]) is None
    assert measure_read_rate([tmp_path / "missing"]) is None


def test_storage_limit_warns_only_when_cold_storage_cannot_feed_the_step() -> None:
    # 200 images/s of 100 kB = 20 MB/s needed; 1.2x margin = 24 MB/s.
    message = storage_limit(10e6, 200.0, 100_000, cold=True)
    assert message == (
        "storage reads 10.0 MB/s (cold) but training at 200 images/s consumes 20.0 MB/s: "
        "storage, not the workers, will limit it; copy the data to local disk or cache decoded crops"
    )
    assert storage_limit(23.9e6, 200.0, 100_000, cold=True) is not None
    assert storage_limit(24e6, 200.0, 100_000, cold=True) is None
    assert storage_limit(10e6, 200.0, 100_000, cold=False) is None  # a warm cache says nothing
    assert storage_limit(None, 200.0, 100_000, cold=True) is None


def test_tuner_warns_when_storage_cannot_feed_the_chosen_configuration(tiny_data_dir: Path) -> None:
    import os

    from arwgan.tuning import TuneConfig, Tuner
    from arwgan.config import ModelConfig

    tuner = Tuner(TuneConfig(model=ModelConfig(image_size=16, message_bits=4, channels=8, noise=""),
                             data_dir=str(tiny_data_dir), device="cpu"))
    # A step that consumes a billion images/s outruns any disk.
    storage = tuner.check_storage(1e9, workers=2)
    assert storage["files"] > 0 and storage["streams"] == 2
    if hasattr(os, "posix_fadvise"):
        assert storage["limit"] is not None and storage["limit"] in tuner.warnings
    # A step of one image/s does not.
    assert tuner.check_storage(1.0, workers=1)["limit"] is None


def test_recommendation_table_carries_the_storage_warning() -> None:
    from autotune.report import recommendation_table
    from autotune.search import SearchResult
    from autotune.tuner import TuneResult
    from test_tuned import make_tuned

    def table(storage):
        measurements = {"comparison": {"seed_default_images_per_s": 10.0, "recommended_images_per_s": 20.0,
                                       "speedup": 2.0, "rounds": {"recommended": [20.0]}},
                        "storage": storage}
        result = TuneResult(tuned=make_tuned(measurements=measurements), machine={},
                            search=SearchResult(trials=[], chosen=64, stop_reason="test"),
                            precision=[], workers=[], target_bytes=1, warnings=[])
        return recommendation_table(result)

    assert table({"limit": "storage reads 1.0 MB/s (cold)"}).caption == "storage reads 1.0 MB/s (cold)"
    assert table({"limit": None}).caption is None
    assert table(None).caption is None
