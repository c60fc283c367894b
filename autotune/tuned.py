"""The persisted tuned configuration (``tuned.json``): what the tuner chose and measured
for one workload, and what its training program applies (ARWGAN: ``arwgan-train
--from-tuned``; any other: :meth:`TunedChoice.dataloader_kwargs` and friends).

A tuned file is only as good as the machine and model it was measured on, so it
carries both: the device fingerprint (:func:`autotune.probes.device_fingerprint`) and
the workload's fingerprint (its model config) with a hash of it. Loading refuses a
damaged or hand-broken file with a one-line :class:`CheckpointError`; :func:`check_tuned`
warns when the machine changed and refuses (unless forced) when the model did, because
a batch size found for 64 px images can run out of memory at 128 px.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from autotune.decisions import LR_RULES, PRECISIONS, scale_lr
from autotune.errors import CheckpointError, ConfigError
from autotune.outputs import atomic_write_bytes


__all__ = [
    "OBJECTIVES",
    "SCHEMA_VERSION",
    "TunedChoice",
    "TunedFile",
    "check_tuned",
    "fingerprint_of",
    "load_tuned",
    "rescale_for_world_size",
    "save_tuned",
]

#: Bumped on any incompatible change of the file layout; older files are refused.
#: 2: learning rates by name (``learning_rates``) and the ``workload`` record.
SCHEMA_VERSION = 2

OBJECTIVES = ("goodput", "throughput", "memory")


def _is_int(value: Any) -> bool:
    # bool is an int subclass; ``"batch_size": true`` in a file is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def fingerprint_of(config: Mapping[str, Any]) -> str:
    """A short stable hash of a workload's fingerprint (JSON, keys sorted)."""
    blob = json.dumps(config, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class TunedChoice:
    """The recommended training settings. Validated where built, so a loaded file that
    passes holds values the trainer accepts."""

    batch_size: int
    """Per-process (per-GPU) batch."""
    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int | None
    precision: str
    learning_rates: dict[str, float]
    """Each of the workload's learning rates (by its name, e.g. ARWGAN's ``lr_g`` and
    ``lr_d``) for the global batch, by :attr:`lr_rule` from its reference."""
    warmup_steps: int
    lr_rule: str
    """How the learning rates were scaled with the global batch: linear | sqrt | none |
    adascale (from :attr:`noise_scale`)."""
    objective: str
    """What the batch was chosen for: goodput (training progress per second) |
    throughput (fastest) | memory (largest that fits)."""
    world_size: int = 1
    """Processes the learning rates were scaled for (global batch = batch_size * world_size)."""
    channels_last: bool = False
    """NHWC memory format, chosen when measured faster beyond noise (autotune.knobs).
    Absent from older files: False, the trainer's default."""
    noise_scale: float | None = None
    """The generator's gradient noise scale (images) the goodput choice and rule
    ``adascale`` were decided with (one standard error below the estimate)."""
    cpu_threads: int | None = None
    """CPU: torch intra-op threads measured best against the workers; None: torch's default."""
    compile: bool = False
    """torch.compile, chosen only when measured to pay within the planned run."""
    cudnn_benchmark: bool | None = None
    """CUDA: cuDNN benchmark mode as measured; None: the trainer's default (on)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "world_size"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("num_workers", "warmup_steps"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 0):
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("pin_memory", "persistent_workers", "channels_last", "compile"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, got {value!r}")
        if not (self.prefetch_factor is None or (_is_int(self.prefetch_factor)
                                                 and self.prefetch_factor >= 1)):
            raise ConfigError(
                f"prefetch_factor must be a positive integer or null, got {self.prefetch_factor!r}"
            )
        if not (isinstance(self.learning_rates, dict) and self.learning_rates):
            raise ConfigError(f"learning_rates must be a non-empty object, got {self.learning_rates!r}")
        for name, value in self.learning_rates.items():
            if not (_is_number(value) and value > 0):
                raise ConfigError(f"learning rate {name} must be a finite number > 0, got {value!r}")
        if self.cudnn_benchmark is not None and not isinstance(self.cudnn_benchmark, bool):
            raise ConfigError(f"cudnn_benchmark must be true, false or null, got {self.cudnn_benchmark!r}")
        if not (self.cpu_threads is None or (_is_int(self.cpu_threads) and self.cpu_threads >= 1)):
            raise ConfigError(f"cpu_threads must be a positive integer or null, got {self.cpu_threads!r}")
        if not (self.noise_scale is None or (_is_number(self.noise_scale) and self.noise_scale >= 0)):
            raise ConfigError(f"noise_scale must be a number >= 0 or null, got {self.noise_scale!r}")
        if self.lr_rule == "adascale" and self.noise_scale is None:
            raise ConfigError("lr_rule adascale needs the noise_scale it was computed from")
        for name, allowed in (("precision", PRECISIONS), ("lr_rule", LR_RULES),
                              ("objective", OBJECTIVES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")

    # -- for the user's own training code -------------------------------------------------
    def dataloader_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``torch.utils.data.DataLoader`` (add your dataset,
        sampler and collate_fn)."""
        kwargs: dict[str, Any] = {"batch_size": self.batch_size, "num_workers": self.num_workers,
                                  "pin_memory": self.pin_memory}
        if self.num_workers:
            kwargs.update(persistent_workers=self.persistent_workers,
                          prefetch_factor=self.prefetch_factor)
        return kwargs

    def autocast(self, device_type: str):
        """The autocast context of :attr:`precision` (a no-op for fp32); fp16 also needs
        a ``torch.amp.GradScaler`` (:attr:`needs_grad_scaler`)."""
        import contextlib

        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=device_type, dtype=dtype)

    @property
    def needs_grad_scaler(self) -> bool:
        return self.precision == "fp16"

    def lr_at(self, step: int, name: str | None = None) -> float:
        """Learning rate ``name`` (the only one by default) at optimiser step ``step``,
        with the linear warm-up of :attr:`warmup_steps`."""
        if name is None:
            if len(self.learning_rates) != 1:
                raise ConfigError(f"name one of the learning rates {', '.join(self.learning_rates)}")
            name = next(iter(self.learning_rates))
        factor = 1.0 if self.warmup_steps <= 0 else min(1.0, (step + 1) / self.warmup_steps)
        return self.learning_rates[name] * factor


@dataclass
class TunedFile:
    """Everything in ``tuned.json``."""

    schema_version: int
    created_utc: str
    device: dict[str, Any]
    """The machine's fingerprint (:func:`autotune.probes.device_fingerprint`)."""
    model: dict[str, Any]
    """The workload's :meth:`~autotune.workload.Workload.fingerprint` (its model config)."""
    model_fingerprint: str
    """:func:`fingerprint_of` ``model``."""
    choice: TunedChoice
    measurements: dict[str, Any]
    """Free-form record: trials, worker and precision benchmarks, images/s, target bytes."""
    tool_version: str
    workload: dict[str, Any] = field(default_factory=dict)
    """name, ref (how to rebuild it), reference_batch, reference_lrs, baseline, and the
    tuner command to re-run."""

    @property
    def tuner(self) -> str:
        return str(self.workload.get("tuner") or "the tuner")


def _finite_or_null(value: Any) -> Any:
    """NaN and infinities (a failed trial's images/s, a speed-up over zero) as None:
    strict JSON has no spelling for them, and jq or a browser would refuse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def save_tuned(path: str | Path, tuned: TunedFile) -> None:
    """Write ``tuned`` as JSON, atomically: a crash leaves the old file or the new one.

    Serialised before anything touches the disk, so a measurement that is not JSON (a
    programming error) raises without creating a temporary file. Non-finite floats in
    the measurements are written as null.
    """
    blob = json.dumps(_finite_or_null(asdict(tuned)), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, lambda fh: fh.write(blob.encode()))


_REQUIRED_TYPES: dict[str, type] = {
    "schema_version": int,
    "created_utc": str,
    "device": dict,
    "model": dict,
    "model_fingerprint": str,
    "choice": dict,
    "measurements": dict,
    "tool_version": str,
    "workload": dict,
}
_JSON_TYPE_NAMES = {int: "integer", str: "string", dict: "object"}


def load_tuned(path: str | Path, check_model=None) -> TunedFile:
    """Read and validate a tuned file. Every problem with the file is a one-line
    :class:`CheckpointError` naming it, never a traceback: the file is the user's.

    ``check_model``: the workload's own check of the recorded model config (raises
    ``ValueError``/``TypeError``, reported as "model config is invalid"), run before the
    fingerprint is compared."""
    where = f"tuned file '{path}'"
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{where} does not exist; run the tuner first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{where} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} does not hold a JSON object")

    if "schema_version" not in data:
        raise CheckpointError(f"{where} is not a tuned file (it has no schema_version); run the tuner")
    version = data.get("schema_version")
    if not _is_int(version) or version != SCHEMA_VERSION:
        raise CheckpointError(
            f"{where} has schema version {version!r}, this tool reads version "
            f"{SCHEMA_VERSION}; re-run the tuner that wrote it"
        )
    missing = [key for key in _REQUIRED_TYPES if key not in data]
    if missing:
        raise CheckpointError(f"{where} is missing key(s) {', '.join(missing)}")
    unknown = sorted(set(data) - set(_REQUIRED_TYPES))
    if unknown:
        raise CheckpointError(f"{where} has unknown key(s) {', '.join(unknown)}")
    for key, expected in _REQUIRED_TYPES.items():
        if not isinstance(data[key], expected):
            raise CheckpointError(
                f"{where}: {key} must be a JSON {_JSON_TYPE_NAMES[expected]}, "
                f"got {type(data[key]).__name__}"
            )

    choice = _load_choice(data["choice"], where)
    tuner = data["workload"].get("tuner") if isinstance(data["workload"].get("tuner"), str) else "the tuner"
    if check_model is not None:
        try:
            check_model(data["model"])
        except (ValueError, TypeError) as exc:  # ConfigError is a ValueError
            raise CheckpointError(f"{where}: model config is invalid: {exc}") from None
    if fingerprint_of(data["model"]) != data["model_fingerprint"]:
        raise CheckpointError(
            f"{where}: model config does not match its fingerprint (edited by hand?); "
            f"re-run {tuner}"
        )
    return TunedFile(
        schema_version=version,
        created_utc=data["created_utc"],
        device=data["device"],
        model=data["model"],
        model_fingerprint=data["model_fingerprint"],
        choice=choice,
        measurements=data["measurements"],
        tool_version=data["tool_version"],
        workload=data["workload"],
    )


def _load_choice(data: dict[str, Any], where: str) -> TunedChoice:
    names = [f.name for f in fields(TunedChoice)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise CheckpointError(f"{where}: choice has unknown key(s) {', '.join(unknown)}")
    # Fields with a default (added after schema 1 was written) may be absent.
    missing = [f.name for f in fields(TunedChoice)
               if f.name not in data and f.default is MISSING]
    if missing:
        raise CheckpointError(f"{where}: choice is missing key(s) {', '.join(missing)}")
    try:
        return TunedChoice(**data)
    except ConfigError as exc:
        raise CheckpointError(f"{where}: choice: {exc}") from None


# ------------------------------------------------------------------------ checking

#: Fingerprint keys in the order differences are reported, with their display names.
_DEVICE_KEYS = (
    ("device_type", "device type"),
    ("gpu_name", "gpu"),
    ("gpu_total_bytes", "gpu memory"),
    ("driver_version", "driver"),
    ("torch_version", "torch"),
    ("cuda_version", "cuda"),
    ("allocator_config", "PYTORCH_CUDA_ALLOC_CONF"),
    ("usable_cores", "usable cores"),
    ("cpu_name", "cpu"),
)


def _describe_device(fp: dict[str, Any]) -> str:
    if fp.get("device_type") == "cuda":
        total = fp.get("gpu_total_bytes")
        memory = f" ({_gib(total)})" if _is_int(total) else ""
        return f"{fp.get('gpu_name') or 'an unknown GPU'}{memory}"
    return f"CPU ({fp.get('cpu_name') or 'unknown'}, {fp.get('usable_cores')} usable cores)"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _device_value(key: str, value: Any) -> str:
    if value is None:
        return "none"
    if key == "gpu_total_bytes" and _is_int(value):
        return _gib(value)
    return str(value)


def _device_differences(tuned: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [
        f"{label} {_device_value(key, tuned.get(key))} -> {_device_value(key, current.get(key))}"
        for key, label in _DEVICE_KEYS
        if tuned.get(key) != current.get(key)
    ]


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _model_differences(tuned: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'image_size 128 -> 64', 'weights.ssim 0.1 -> 0.2': nested dicts name their fields."""
    differences = []
    for key in [*current, *(k for k in tuned if k not in current)]:
        old, new = tuned.get(key), current.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            differences += [f"{key}.{d}" for d in _model_differences(old, new)]
        else:
            differences.append(f"{key} {_short(old)} -> {_short(new)}")
    return differences


def check_tuned(
    tuned: TunedFile,
    model: Mapping[str, Any],
    device_fp: dict[str, Any],
    force: bool,
    *,
    path: str | Path | None = None,
) -> list[str]:
    """Is ``tuned`` still valid for this run? Returns warnings to print.

    A different machine only warns: the choice still runs, it may just not be the best
    (or may not fit, which the trainer reports). A different model config raises,
    since memory and speed depend on it directly; ``force`` turns that into a warning.
    ``path``, where the file was loaded from, is named in the message.
    """
    warnings = []
    device_diffs = _device_differences(tuned.device, device_fp)
    if device_diffs:
        warnings.append(
            f"tuned on {_describe_device(tuned.device)}, running on "
            f"{_describe_device(device_fp)} ({', '.join(device_diffs)}): "
            f"measurements may not hold; re-run {tuned.tuner}"
        )
    current = fingerprint_of(model)
    if current != tuned.model_fingerprint:
        model_diffs = _model_differences(tuned.model, dict(model)) or [
            f"fingerprint {tuned.model_fingerprint} -> {current}"
        ]
        where = f"tuned file '{path}'" if path is not None else "the tuned configuration"
        message = (
            f"{where} was made for another model config ({', '.join(model_diffs)}); "
        )
        if not force:
            raise CheckpointError(message + f"re-run {tuned.tuner} or pass --force")
        warnings.append(message + "using it anyway (--force)")
    return warnings


# ------------------------------------------------------------------------ applying


def allocator_limit(tuned: TunedFile) -> int | None:
    """The allocator's share of the tuned memory target (the target less the context the
    tuner measured), for a CUDA file; None for a CPU one or a file without the figures.
    Training code caps ``torch.cuda.set_per_process_memory_fraction`` with it."""
    if tuned.device.get("device_type") != "cuda":
        return None
    target = tuned.measurements.get("target_bytes")
    context = tuned.measurements.get("context_bytes") or 0
    if not _is_int(target) or not _is_int(context) or target - context <= 0:
        return None
    return target - context


def rescale_for_world_size(
    choice: TunedChoice, new_world_size: int, reference_lrs: Mapping[str, float],
    reference_batch: int,
) -> tuple[TunedChoice, str | None]:
    """Adapt ``choice`` to ``new_world_size`` processes, each keeping ``batch_size``.

    The global batch grows with the world size, so the learning rates are recomputed from
    the reference (``reference_lrs`` at ``reference_batch``, the tuned file's workload
    record) with the choice's own rule; with rule 'none' they stay as tuned. Returns the
    new choice and a message for the user, or the choice unchanged and None when the
    world size is the one it was tuned for.
    """
    if not (_is_int(new_world_size) and new_world_size >= 1):
        raise ConfigError(f"world size must be a positive integer, got {new_world_size!r}")
    if new_world_size == choice.world_size:
        return choice, None
    old_global = choice.batch_size * choice.world_size
    new_global = choice.batch_size * new_world_size
    if choice.lr_rule == "none":
        rescaled = replace(choice, world_size=new_world_size)
        kept = ", ".join(f"{name} {lr:.3g}" for name, lr in choice.learning_rates.items())
        lr_text = f"learning rates kept ({kept}; rule none)"
    else:
        lrs = {name: scale_lr(reference_lrs.get(name, lr), reference_batch, new_global,
                              choice.lr_rule, choice.noise_scale)
               for name, lr in choice.learning_rates.items()}
        rescaled = replace(choice, world_size=new_world_size, learning_rates=lrs)
        changes = ", ".join(f"{name} {choice.learning_rates[name]:.3g} -> {lr:.3g}"
                            for name, lr in lrs.items())
        bases = sorted({f"{reference_lrs.get(name, 0):g}" for name in lrs})
        lr_text = (
            f"{changes} ({choice.lr_rule} rule from {' / '.join(bases)} at batch {reference_batch})"
        )
    message = (
        f"tuned for world size {choice.world_size}, running with {new_world_size}: "
        f"global batch {old_global} -> {new_global}, {lr_text}"
    )
    return rescaled, message
