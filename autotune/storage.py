"""Storage: how fast the dataset's files can be read, where they live, and whether that
keeps up with training.

- :func:`measure_read_rate` reads a sample of the files and times it. Cold where the OS
  lets us: before reading each file it asks the kernel to drop that file's pages from
  the page cache (``posix_fadvise(DONTNEED)``; only our own files, no privileges
  needed, Linux honours it for clean pages). Where that is not possible the result is
  labelled "warm cache" and says nothing about the disk.
- :func:`filesystem_of` names the filesystem a path lives on and whether it is a
  network one (NFS, SMB, Lustre...), from ``/proc/mounts``.
- :func:`storage_limit` is the pure check: can storage supply the bytes the training
  step consumes?

No workload import here: callers pass the file list and the consumption.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "NETWORK_FILESYSTEMS",
    "FileSystem",
    "ReadRate",
    "filesystem_of",
    "measure_read_rate",
    "parse_mounts",
    "read_file",
    "storage_limit",
]

#: Filesystem types whose data travels over a network (``fuse.*`` ones by their name).
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs",
    "lustre", "gpfs", "beegfs", "ocfs2", "gfs2", "davfs", "fuse.sshfs", "fuse.s3fs",
    "fuse.gcsfuse", "fuse.rclone", "fuse.glusterfs", "fuse.cephfs", "fuse.juicefs",
    "fuse.mountpoint-s3", "fuse.blobfuse", "fuse.goofys",
})

CHUNK_BYTES = 1 << 20


@dataclass
class FileSystem:
    type: str
    mount_point: str
    network: bool

    @property
    def where(self) -> str:
        return "network" if self.network else "local"


def parse_mounts(text: str) -> list[tuple[str, str]]:
    """``(mount point, fs type)`` of each line of a ``/proc/mounts`` text (octal escapes
    such as ``\\040`` for a space decoded)."""
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            point = parts[1].encode().decode("unicode_escape")
            mounts.append((point, parts[2]))
    return mounts


def filesystem_of(path: str | Path, mounts_text: str | None = None) -> FileSystem | None:
    """The filesystem holding ``path``: the longest mount point that contains it (the last
    one mounted wins on a tie). None where ``/proc/mounts`` is missing (macOS, Windows)."""
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    target = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for point, fstype in parse_mounts(mounts_text):
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)
    if best is None:
        return None
    point, fstype = best
    return FileSystem(fstype, point, fstype in NETWORK_FILESYSTEMS)


def read_file(path: Path, drop_cache: bool = True) -> tuple[int, bool]:
    """Read ``path`` entirely; ``(bytes read, cold)``. With ``drop_cache`` the file's
    pages are dropped from the page cache first, where ``posix_fadvise`` exists; ``cold``
    says whether that was done."""
    cold = False
    size = 0
    with open(path, "rb", buffering=0) as fh:
        if drop_cache and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                cold = True
            except OSError:
                cold = False
        while True:
            chunk = fh.read(CHUNK_BYTES)
            if not chunk:
                break
            size += len(chunk)
    return size, cold


FileReader = Callable[[Path], tuple[int, bool]]


@dataclass
class ReadRate:
    files: int
    bytes: int
    seconds: float
    cold: bool
    """True when every file's cached pages were dropped before it was read."""
    mean_file_bytes: float
    streams: int = 1
    """Files read in parallel (threads), like that many DataLoader workers."""

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else float("inf")

    @property
    def cache(self) -> str:
        return "cold" if self.cold else "warm cache"

    def as_dict(self) -> dict:
        return {**asdict(self), "bytes_per_s": self.bytes_per_s, "cache": self.cache}


def measure_read_rate(
    files: Sequence[Path],
    max_seconds: float = 3.0,
    max_bytes: int = 256 << 20,
    streams: int = 1,
    reader: FileReader = read_file,
    clock: Callable[[], float] = time.perf_counter,
) -> ReadRate | None:
    """Read the files with ``streams`` threads in parallel (as that many DataLoader
    workers would) until ``max_seconds`` or ``max_bytes``; None when ``files`` is empty
    or none can be read.

    The files are taken spread evenly over the list (a shuffled epoch hits them in no
    particular order; sequential neighbours would flatter a disk's read-ahead).
    """
    if not files:
        return None
    if streams < 1:
        raise ValueError(f"streams must be >= 1, got {streams!r}")
    count = len(files)
    stride = 1
    for candidate in (997, 991, 983):  # primes: a stride coprime with the count visits all
        if count > candidate and count % candidate:
            stride = candidate
            break
    order = iter([files[(i * stride) % count] for i in range(count)])
    lock = threading.Lock()
    totals = {"files": 0, "bytes": 0, "cold": True}
    start = clock()

    def stream() -> None:
        while True:
            with lock:
                if clock() - start >= max_seconds or totals["bytes"] >= max_bytes:
                    return
                path = next(order, None)
            if path is None:
                return
            try:
                size, was_cold = reader(path)
            except OSError:
                continue
            with lock:
                totals["files"] += 1
                totals["bytes"] += size
                totals["cold"] = totals["cold"] and was_cold

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = clock() - start
    if totals["files"] == 0:
        return None
    return ReadRate(
        files=totals["files"], bytes=totals["bytes"], seconds=seconds, cold=totals["cold"],
        mean_file_bytes=totals["bytes"] / totals["files"], streams=streams,
    )


def storage_limit(
    read_bytes_per_s: float | None,
    consumption_images_per_s: float | None,
    bytes_per_image: float | None,
    cold: bool,
    margin: float = 1.2,
) -> str | None:
    """A warning when storage would limit training: the step consumes
    ``consumption_images_per_s x bytes_per_image`` bytes/s, and storage reads
    ``read_bytes_per_s`` (with as many streams as the loader has workers). Needs ``margin`` x the consumption to keep a step fed through
    slow files. None when storage keeps up, or a figure is missing, or the rate was
    measured on a warm cache (it then describes memory, not the disk)."""
    if None in (read_bytes_per_s, consumption_images_per_s, bytes_per_image) or not cold:
        return None
    need = consumption_images_per_s * bytes_per_image
    if read_bytes_per_s >= margin * need:
        return None
    return (
        f"storage reads {read_bytes_per_s / 1e6:.1f} MB/s (cold) but training at "
        f"{consumption_images_per_s:.0f} images/s consumes {need / 1e6:.1f} MB/s: storage, not "
        "the workers, will limit it; copy the data to local disk or cache decoded crops"
    )
