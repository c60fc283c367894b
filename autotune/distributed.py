"""Process-group plumbing for data-parallel runs launched with PyTorch's ``torchrun``.

Nothing here launches processes: ``torchrun`` (or any launcher that sets the same
environment) starts one process per device and exports ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``.
:func:`init_distributed` reads them; without them a run is a single process and no
process group is created, so every single-process path stays exactly as it was.
``torchrun --nproc-per-node 1`` does create a (one-member) group and trains through
DDP: the same code path as N processes, which makes it a cheap smoke test on one GPU.

Backends: NCCL for CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo for the CPU.
Every collective has a timeout (``ARWGAN_DIST_TIMEOUT_S``, default 600 s): a rank that
dies or hangs makes the others fail with an error instead of waiting forever, and
``torchrun`` tears the group down as soon as one process exits non-zero.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autotune.errors import ConfigError

#: Environment variable: seconds a collective may wait before the job fails.
TIMEOUT_ENV = "ARWGAN_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. A single-process run has world_size 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    """Processes on this node (they share its CPU cores and RAM)."""
    backend: str | None = None
    """'nccl' | 'gloo'; None when no process group exists (one process)."""
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        """True when this process is in a process group (launched by torchrun), even
        one of a single member; the collectives below are no-ops otherwise."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, logs, draws progress and writes files."""
        return self.rank == 0

    # -- collectives (each a no-op in a single process) ----------------------------------
    def all_reduce_min(self, value: int) -> int:
        return self._all_reduce_int(value, dist.ReduceOp.MIN)

    def all_reduce_max(self, value: int) -> int:
        return self._all_reduce_int(value, dist.ReduceOp.MAX)

    def _all_reduce_int(self, value: int, op) -> int:
        if not self.distributed:
            return int(value)
        tensor = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return int(tensor.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank."""
        return bool(self.all_reduce_max(int(bool(flag))))

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place (it must live on this rank's device)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``src``'s ``obj`` on every rank (pickled: for small Python values only)."""
        if not self.distributed:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=src, device=self._object_device())
        return holder[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, indexed by rank (pickled: small Python values only)."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def broadcast_buffers(self, module: nn.Module, src: int = 0) -> None:
        """Copy ``src``'s buffers (BatchNorm running statistics) to every rank.

        DDP does this at the start of every forward; validation and checkpoints run
        outside DDP's forward, so they call this to see the model rank 0 saves.
        """
        if not self.distributed:
            return
        for buffer in module.buffers():
            if buffer.is_contiguous():
                dist.broadcast(buffer, src=src)
                continue
            # NCCL refuses a non-contiguous tensor (the JPEG layer's inverted colour
            # matrix is one): send a contiguous copy, then put it back in place.
            packed = buffer.contiguous()
            dist.broadcast(packed, src=src)
            buffer.copy_(packed)

    def _object_device(self) -> torch.device:
        # NCCL moves pickled objects through a device tensor; gloo through a host one.
        return self.device if self.backend == "nccl" else torch.device("cpu")


def single_process(device: torch.device) -> DistContext:
    return DistContext(device=device)


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun, 1 without it (usable before initialising)."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    return _env_int("RANK", 0)


def env_local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def rank_prefix() -> str:
    """'rank N: ' under torchrun with more than one process, else '' (for error lines:
    torchrun interleaves every process's stderr)."""
    return f"rank {env_rank()}: " if env_world_size() > 1 else ""


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer") from None


def timeout_from_env(default_s: float = DEFAULT_TIMEOUT_S) -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return datetime.timedelta(seconds=default_s)
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def init_distributed(device_str: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the process group torchrun describes in the environment, or return a
    single-process context when there is none (``WORLD_SIZE`` unset or 1).

    ``device_str`` is the user's ``--device``: under torchrun, 'auto' and 'cuda' mean
    ``cuda:LOCAL_RANK`` (NCCL); 'cpu' means gloo. An explicit ``cuda:N`` is refused
    with more than one process, since every process would pick the same GPU. A group of
    one is joined only when torchrun launched it (``TORCHELASTIC_RUN_ID``), not merely
    because ``WORLD_SIZE=1`` is set. ``timeout_s``: how long a collective may wait
    (``ARWGAN_DIST_TIMEOUT_S`` overrides it); the tuner's ranks search independently
    and need far longer than a training step.
    """
    from autotune.runtime import resolve_device

    world_size = env_world_size()
    launched = world_size > 1 or (world_size == 1 and "TORCHELASTIC_RUN_ID" in os.environ)
    if not launched:
        return single_process(resolve_device(device_str))
    rank, local_rank = env_rank(), env_local_rank()
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    base = resolve_device(device_str)
    if base.type == "cuda":
        if world_size > 1 and device_str not in ("auto", "cuda"):
            raise ConfigError(
                f"--device {device_str} with {world_size} processes: under torchrun each "
                "process uses cuda:LOCAL_RANK; pass --device cuda (or auto)"
            )
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible "
                "on this node; lower --nproc-per-node"
            )
        device = torch.device("cuda", local_rank if base.index is None else base.index)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing and not dist.is_initialized():
        raise ConfigError(
            f"WORLD_SIZE={world_size} is set but {' and '.join(missing)} not: launch with "
            "torchrun (e.g. torchrun --nproc-per-node N --no-python arwgan-train ...)"
        )
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, timeout=timeout_from_env(timeout_s),
            **kwargs,
        )
    return DistContext(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=local_world_size,
        backend=backend,
        device=device,
    )


def rank_seed(*parts: object) -> int:
    """A seed from ``parts`` (run seed, rank, ...) that is the same in every process and
    every run, unlike ``hash``: gives each rank its own random stream, reproducibly."""
    text = ":".join(str(part) for part in ("rank-seed", *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def is_main() -> bool:
    """Is this process rank 0? (Also right before or after the group exists.)"""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_rank() == 0


def cleanup() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def reduce_metric_sums(ctx: DistContext, sums) -> dict[str, float]:
    """Means of a metric-sums object (e.g. ARWGAN's ``MetricSums``) over every rank's images: the
    sums and the counts are summed over ranks (one all_reduce), then divided."""
    names, totals, counts = sums.sums_and_counts()
    if ctx.distributed:
        packed = torch.cat([totals.float(), counts.float()]).to(ctx.device)
        ctx.all_reduce_sum_(packed)
        totals, counts = packed[: len(names)], packed[len(names) :]
    values = (totals / counts.clamp(min=1)).tolist()
    return dict(zip(names, values))


@contextlib.contextmanager
def local_main_first(ctx: DistContext) -> Iterator[None]:
    """Let local rank 0 of each node run the body first (e.g. generate the synthetic
    dataset into the node's cache), the other ranks after it is done."""
    if ctx.distributed and ctx.local_rank != 0:
        ctx.barrier()
    yield
    if ctx.distributed and ctx.local_rank == 0:
        ctx.barrier()
