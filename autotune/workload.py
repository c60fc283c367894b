"""The workload contract: what a training program gives the engine to be tuned.

The engine (probes, memory cap, trials in this process or in forked children, batch
search, precision, threads and workers, knobs, learning-rate rule, noise scale,
comparison with the baseline, tables, tuned file) knows nothing about any model. A
training program hands it a :class:`Workload`:

- :meth:`Workload.build_step` builds the train step for one batch size, precision and
  set of learning rates: the model(s), optimiser(s) and gradient scaler(s), on the
  device. The step (:class:`TrainStep`) moves one batch to the device and runs one
  optimisation step on it;
- :meth:`Workload.dataset` and :meth:`Workload.loader` are the data and how to load it
  (collate, transforms, sampler): the engine only chooses the DataLoader settings
  (:class:`LoaderSettings`);
- :meth:`Workload.fingerprint` is what shapes memory and speed (the model config): a
  tuned file is refused for another one;
- :attr:`Workload.reference_batch` and :attr:`Workload.reference_lrs` are the batch and
  learning rates the LR rule scales from, :attr:`Workload.baseline` the configuration
  every speed claim is measured against;
- :meth:`Workload.reference` says how to rebuild the workload in a child process
  (``"package.module:factory"`` with JSON keyword arguments). Without it, trials run in
  this process only: CPU peak memory cannot be measured (a process's peak only rises),
  and the engine says so.

:class:`SupervisedWorkload` implements the contract for the common case (one model, one
optimiser, a loss function), so that a classifier needs a dozen lines
(``examples/torchvision_workload.py``).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from autotune.errors import ConfigError, UserError

__all__ = [
    "Baseline",
    "LoaderSettings",
    "SupervisedWorkload",
    "TrainStep",
    "Workload",
    "WorkloadRef",
    "batch_length",
    "load_workload",
    "losses_of",
    "short_socket_tempdir",
]


@dataclass(frozen=True)
class LoaderSettings:
    """The DataLoader settings the engine measures and recommends."""

    batch_size: int
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ConfigError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if not (isinstance(self.num_workers, int) and self.num_workers >= 0):
            raise ConfigError(f"workers must be a non-negative integer, got {self.num_workers!r}")
        if self.num_workers == 0:
            # torch refuses prefetch_factor / persistent_workers without workers.
            object.__setattr__(self, "prefetch_factor", None)
            object.__setattr__(self, "persistent_workers", False)
        elif self.prefetch_factor is None:
            object.__setattr__(self, "prefetch_factor", 2)

    def dataloader_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``torch.utils.data.DataLoader``."""
        kwargs: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
        }
        if self.num_workers:
            kwargs.update(persistent_workers=self.persistent_workers,
                          prefetch_factor=self.prefetch_factor)
        return kwargs


@dataclass(frozen=True)
class Baseline:
    """The configuration a workload's users run without tuning: every speed claim is
    measured against it, in the same run (ARWGAN's seed report: batch 16, 4 workers, fp32)."""

    batch_size: int = 16
    num_workers: int = 4
    precision: str = "fp32"
    pin_memory: bool = False
    label: str = "baseline"
    """What tables call it (ARWGAN: "seed default")."""

    def loader(self) -> LoaderSettings:
        return LoaderSettings(self.batch_size, self.num_workers, self.pin_memory, False,
                              2 if self.num_workers else None)


@dataclass(frozen=True)
class WorkloadRef:
    """How to rebuild a workload in another process: ``factory`` is
    ``"package.module:function"`` (importable there), called with ``kwargs`` (JSON)."""

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        module, sep, name = self.factory.partition(":")
        if not (module and sep and name) or not all(part.isidentifier() for part in
                                                    [*module.split("."), *name.split(".")]):
            raise ConfigError(
                f"workload {self.factory!r} is not of the form package.module:factory"
            )
        try:
            json.dumps(self.kwargs, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"workload keyword arguments must be JSON: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def build(self) -> Workload:
        return load_workload(self.factory, self.kwargs)


def load_workload(factory: str, kwargs: Mapping[str, Any] | None = None) -> Workload:
    """Import ``"package.module:factory"`` and call it with ``kwargs``. Every way this can
    fail because of what the user typed is one :class:`UserError` line."""
    ref = WorkloadRef(factory, dict(kwargs or {}))
    module_name, _, attr = ref.factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise UserError(
                f"workload module '{module_name}' not found (is its folder on PYTHONPATH, "
                "or the package installed?)"
            ) from None
        raise
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UserError(f"workload module '{module_name}' has no '{attr}'")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"workload '{ref.factory}' is not callable")
    try:
        workload = target(**ref.kwargs)
    except TypeError as exc:
        if "argument" in str(exc):
            raise UserError(f"workload '{ref.factory}': {exc}") from None
        raise
    if not isinstance(workload, Workload):
        raise UserError(
            f"workload '{ref.factory}' returned {type(workload).__name__}, not an "
            "autotune.Workload"
        )
    if workload.reference() is None:
        workload.ref = ref  # built from a reference: rebuildable the same way
    return workload


@runtime_checkable
class TrainStep(Protocol):
    """One training program's step, built for one batch size and precision.

    Required: ``to_device(batch)`` (a loader batch onto the step's device, non-blocking
    where pinned) and ``__call__(batch)`` (one optimisation step on a device batch;
    returns its losses: a tensor, a dict of tensors or floats, or an object with
    ``as_dict()``; an object with ``skipped=True`` counts as a non-finite step).

    Optional, used when present:

    - ``compile()``: ``torch.compile`` the step's modules in place (the compile knob);
    - ``measure_gradient_noise(batch, micro_batches, estimators)``: feed one
      :class:`autotune.gns.NoiseScale` per name of :attr:`Workload.noise_groups` from
      this device batch split into ``micro_batches``, leaving the training state as it
      was (the goodput objective; :class:`SupervisedWorkload` has it);
    - ``take_turns() -> int``: make steps whose work varies at random (ARWGAN's noise
      layers) take turns instead, and return the cycle length, so that every batch
      size is timed on the same work;
    - ``load_checkpoint(path) -> int``: load a training checkpoint's weights, return its
      step count (``--from-checkpoint``).
    """

    def to_device(self, batch: Any) -> Any: ...

    def __call__(self, batch: Any) -> Any: ...


class Workload:
    """Base class of everything the engine can tune. Subclass it and implement
    :meth:`build_step`, :meth:`dataset` and :meth:`fingerprint`; the rest has defaults."""

    #: A short name for tables and the tuned file.
    name: str = "workload"
    #: The batch the reference learning rates were tuned at.
    reference_batch: int = 16
    #: Learning rates at :attr:`reference_batch`, by name; the LR rule scales every one.
    reference_lrs: Mapping[str, float] = {"lr": 1e-3}
    #: What users run without tuning; the verdict is measured against it.
    baseline: Baseline = Baseline()
    #: The gradient-noise groups a step measures (the first one decides the batch).
    noise_groups: tuple[str, ...] = ("model",)
    #: Modules the trial server imports once, so that each trial's child starts with
    #: them (the step's heavy imports); the factory's module is always imported.
    preload: tuple[str, ...] = ()
    #: Set by :func:`load_workload` when the workload was built from a reference.
    ref: WorkloadRef | None = None
    #: The command that trains with a tuned file (shown after writing it); None: the
    #: generic advice (load it with autotune.load_tuned).
    train_hint: str | None = None

    # -- required ----------------------------------------------------------------------
    def build_step(self, batch_size: int, precision: str, device, *, lrs: Mapping[str, float],
                   channels_last: bool = False, seed: int = 0, dist=None) -> TrainStep:
        """The train step for ``batch_size`` (per process) in ``precision`` on
        ``device`` (a ``torch.device``), with learning rates ``lrs`` (the keys of
        :attr:`reference_lrs`). ``dist``: a :class:`autotune.distributed.DistContext`
        when the step is built under torchrun (the engine never asks for DDP)."""
        raise NotImplementedError

    def dataset(self):
        """The training dataset (a map-style ``torch.utils.data.Dataset``), built once."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """JSON describing everything that shapes memory and speed (the model config)."""
        raise NotImplementedError

    # -- with defaults -----------------------------------------------------------------
    def reference(self) -> WorkloadRef | None:
        """How to rebuild this workload in a child process; None: in-process only."""
        return self.ref

    def collate(self, samples: list) -> Any:
        from torch.utils.data import default_collate

        return default_collate(samples)

    def loader(self, settings: LoaderSettings, batches: int, seed: int = 0):
        """A DataLoader with ``settings`` that yields at least ``batches`` full batches,
        wrapping around the dataset if it is small (for timing)."""
        import torch
        from torch.utils.data import DataLoader, RandomSampler

        data = self.dataset()
        samples = max(len(data), batches * settings.batch_size)
        sampler = RandomSampler(data, replacement=len(data) < samples, num_samples=samples,
                                generator=torch.Generator().manual_seed(seed))
        return DataLoader(
            data, sampler=sampler, drop_last=True, collate_fn=self.collate,
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=short_socket_tempdir if settings.num_workers else None,
            **settings.dataloader_kwargs(),
        )

    def example_batch(self, batch_size: int, seed: int = 0) -> Any:
        """One batch on the host, what a trial steps on repeatedly (no loader in the way):
        by default the first ``batch_size`` samples (wrapping), collated."""
        data = self.dataset()
        return self.collate([data[i % len(data)] for i in range(batch_size)])

    def sample_bytes(self) -> int | None:
        """Bytes of one sample as the loader hands it over (for the /dev/shm limit on
        workers); by default measured on the first sample."""
        try:
            return _tensor_bytes(self.dataset()[0])
        except Exception:  # noqa: BLE001 - an estimate; unknown is allowed
            return None

    def files(self) -> list | None:
        """The dataset's files on disk, for the storage check; None: not file-backed."""
        return None

    def describe(self) -> str:
        """One line for the report (defaults to the name and the fingerprint)."""
        return f"{self.name} {json.dumps(self.fingerprint(), sort_keys=True)}"

    def load_checkpoint(self, step: TrainStep, path: str) -> int:
        """Load a training checkpoint into ``step`` (``--from-checkpoint``); returns its
        step count. By default the step's own ``load_checkpoint``."""
        loader = getattr(step, "load_checkpoint", None)
        if loader is None:
            raise ConfigError(f"workload {self.name} cannot load checkpoints (--from-checkpoint)")
        return int(loader(path))


def _tensor_bytes(sample: Any) -> int:
    import torch

    if isinstance(sample, torch.Tensor):
        return sample.element_size() * sample.nelement()
    if isinstance(sample, Mapping):
        return sum(_tensor_bytes(v) for v in sample.values())
    if isinstance(sample, (list, tuple)):
        return sum(_tensor_bytes(v) for v in sample)
    if isinstance(sample, (int, float, bool)):
        return 8
    return 0


def batch_length(batch: Any) -> int:
    """The number of samples in a batch: the first dimension of its first tensor."""
    import torch

    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    items: Iterable = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(items, (list, tuple)) or isinstance(batch, Mapping):
        for item in items:
            try:
                return batch_length(item)
            except TypeError:
                continue
    raise TypeError(f"no tensor in a batch of type {type(batch).__name__}")


def losses_of(result: Any) -> tuple[dict[str, float], bool]:
    """A step's result as ``({name: float}, finite)``."""
    import torch

    skipped = bool(getattr(result, "skipped", False))
    if result is None:
        values: dict = {}
    elif hasattr(result, "as_dict"):
        values = result.as_dict()
    elif isinstance(result, Mapping):
        values = dict(result)
    elif isinstance(result, torch.Tensor):
        values = {"loss": result}
    elif isinstance(result, (int, float)):
        values = {"loss": result}
    else:
        values = {}
    losses = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.detach().float().item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            losses[str(key)] = float(value)
    finite = not skipped and all(math.isfinite(v) for v in losses.values())
    return losses, finite


#: Longest temporary folder under which multiprocessing's sockets still fit: a Linux
#: AF_UNIX path holds 107 bytes, and the socket lies at ``<tmp>/pymp-XXXXXXXX/listener-XXXXXXXX``.
_SOCKET_TMP_ROOM = 107 - len("/pymp-xxxxxxxx/listener-xxxxxxxx")


def short_socket_tempdir(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: keep multiprocessing's sockets under a short folder.

    A worker hands each batch's shared memory to the main process through a Unix socket
    that multiprocessing creates under the temporary folder. Under a long ``TMPDIR`` the
    socket path does not fit, the worker's send fails in a background thread, and the
    main process waits for that batch forever. The worker alone then uses a short
    temporary folder; the main process and everything else keep the user's.
    """
    import multiprocessing

    if len(tempfile.gettempdir()) <= _SOCKET_TMP_ROOM:
        return
    for folder in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK):
            tempfile.tempdir = folder
            # A temporary folder the parent had already made is inherited: drop it.
            multiprocessing.current_process()._config.pop("tempdir", None)
            return


# ---------------------------------------------------------------------- a ready-made one


class SupervisedWorkload(Workload):
    """One model, one optimiser, one loss: implement :meth:`build_model`,
    :meth:`dataset`, :meth:`loss` and :meth:`fingerprint` (and, if not Adam,
    :meth:`build_optimizer`); the step, AMP, channels_last, compile and the gradient
    noise scale come from here."""

    noise_groups = ("model",)

    def build_model(self):
        raise NotImplementedError

    def loss(self, model, batch):
        """The scalar loss of ``model`` on a device batch."""
        raise NotImplementedError

    def build_optimizer(self, parameters, lrs: Mapping[str, float]):
        import torch

        return torch.optim.Adam(parameters, lr=lrs["lr"])

    def build_step(self, batch_size, precision, device, *, lrs, channels_last=False, seed=0,
                   dist=None):
        import torch

        torch.manual_seed(seed)
        model = self.build_model().to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = self.build_optimizer(model.parameters(), lrs)
        return SupervisedStep(self, model, optimizer, precision, device, channels_last)


class SupervisedStep:
    """:class:`TrainStep` of a :class:`SupervisedWorkload`: autocast, a gradient scaler
    for fp16, one optimiser step per call."""

    def __init__(self, workload: SupervisedWorkload, model, optimizer, precision: str, device,
                 channels_last: bool = False) -> None:
        import torch

        from autotune.runtime import check_precision

        check_precision(precision, device)
        self.workload, self.model, self.optimizer = workload, model, optimizer
        self.precision, self.device, self.channels_last = precision, device, channels_last
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def to_device(self, batch):
        import torch

        def move(item):
            if isinstance(item, torch.Tensor):
                item = item.to(self.device, non_blocking=True)
                if self.channels_last and item.dim() == 4:
                    item = item.contiguous(memory_format=torch.channels_last)
                return item
            if isinstance(item, (list, tuple)):
                return type(item)(move(i) for i in item)
            if isinstance(item, Mapping):
                return {k: move(v) for k, v in item.items()}
            return item

        return move(batch)

    def _loss(self, batch):
        from autotune.runtime import autocast

        with autocast(self.precision, self.device):
            return self.workload.loss(self.model, batch)

    def __call__(self, batch):
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(batch)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"loss": loss.detach()}

    def compile(self) -> None:
        self.model.compile()

    def measure_gradient_noise(self, batch, micro_batches: int, estimators) -> None:
        """Feed ``estimators['model']`` from ``batch`` split into ``micro_batches``
        (gradients read, no optimiser step; weights and optimiser untouched)."""
        import torch

        from autotune.gns import MicroBatchGradients

        size = batch_length(batch)
        if micro_batches < 2 or size % micro_batches:
            raise ConfigError(f"batch {size} does not split into {micro_batches} (>= 2) equal parts")
        part = size // micro_batches
        params = [p for p in self.model.parameters() if p.requires_grad]
        reader = MicroBatchGradients(params)
        buffers = list(self.model.buffers())
        saved = [b.clone() for b in buffers]
        try:
            for j in range(micro_batches):
                self.model.zero_grad(set_to_none=True)
                loss = self._loss(_slice(batch, j * part, (j + 1) * part))
                if not torch.isfinite(loss.detach()):
                    return
                loss.float().backward()
                reader.add()
        finally:
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)
            self.model.zero_grad(set_to_none=True)
        estimators[self.workload.noise_groups[0]].update(*reader.finish(), micro_batch=part)


def _slice(batch, start: int, stop: int):
    import torch

    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(b, start, stop) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _slice(v, start, stop) for k, v in batch.items()}
    return batch


def describe_ref(ref: WorkloadRef | None) -> str:
    if ref is None:
        return "in-process"
    return ref.factory + (f" {json.dumps(ref.kwargs, sort_keys=True)}" if ref.kwargs else "")


Factory = Callable[..., Workload]
