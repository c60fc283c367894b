"""ARWGAN's side of tuning: the engine's tuner on :class:`arwgan.workload.ArwganWorkload`
with a config that carries the model and the data (:class:`TuneConfig`, :class:`Tuner`),
and what ``arwgan-train --from-tuned`` does with a tuned file (:func:`load_arwgan_tuned`,
:func:`apply_tuned`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from arwgan.config import ModelConfig, TrainConfig
from arwgan.errors import CheckpointError
from arwgan.workload import REFERENCE_LRS, ArwganWorkload
from autotune.tuned import allocator_limit, load_tuned
from autotune.tuner import TuneConfig as EngineConfig
from autotune.tuner import Tuner as Engine

__all__ = ["TuneConfig", "Tuner", "apply_tuned", "load_arwgan_tuned"]


@dataclass
class TuneConfig(EngineConfig):
    """The engine's tuning config plus ARWGAN's model and data."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data_dir: str | None = None
    tuner_command: str = "arwgan-autotune"

    def engine(self) -> EngineConfig:
        """The engine's part of this config."""
        names = {f.name for f in fields(EngineConfig)}
        return EngineConfig(**{f.name: getattr(self, f.name) for f in fields(self) if f.name in names})


class Tuner(Engine):
    """The engine's tuner on :class:`ArwganWorkload` of ``cfg.model`` and ``cfg.data_dir``."""

    def __init__(self, cfg: TuneConfig | None = None, probes=None, report=None, dist=None) -> None:
        cfg = cfg if cfg is not None else TuneConfig()
        super().__init__(ArwganWorkload(cfg.model, cfg.data_dir, seed=cfg.seed), cfg, probes,
                         report, dist)


def load_arwgan_tuned(path):
    """:func:`autotune.tuned.load_tuned`, then ARWGAN's checks: a model config ARWGAN
    accepts and the learning rates it trains with."""
    where = f"tuned file '{path}'"
    if not Path(path).exists():
        raise CheckpointError(f"{where} does not exist; run arwgan-autotune first")
    tuned = load_tuned(path, check_model=ModelConfig.from_dict)
    missing = sorted(set(REFERENCE_LRS) - set(tuned.choice.learning_rates))
    if missing or tuned.workload.get("name", "arwgan") != "arwgan":
        raise CheckpointError(
            f"{where} was tuned for workload {tuned.workload.get('name')!r}, not arwgan "
            f"(learning rates {', '.join(tuned.choice.learning_rates)})"
        )
    return tuned


def apply_tuned(tuned, base: TrainConfig) -> TrainConfig:
    """``base`` with the tuned loader, precision, learning rates, memory format, knobs
    (threads, compile, cudnn.benchmark), model and (CUDA) the allocator cap that holds
    training under the tuned memory target.

    The model comes from the file because the measurements are only valid for it;
    explicit command-line flags are applied by the caller afterwards, and
    :func:`autotune.tuned.check_tuned` is what says whether they invalidate the file.
    """
    choice = tuned.choice
    return replace(
        base,
        model=ModelConfig.from_dict(tuned.model),
        loader=replace(
            base.loader,
            batch_size=choice.batch_size,
            num_workers=choice.num_workers,
            pin_memory=choice.pin_memory,
            persistent_workers=choice.persistent_workers,
            prefetch_factor=choice.prefetch_factor,
        ),
        optim=replace(
            base.optim, lr_g=choice.learning_rates["lr_g"], lr_d=choice.learning_rates["lr_d"],
            warmup_steps=choice.warmup_steps,
        ),
        precision=choice.precision,
        channels_last=choice.channels_last,
        cpu_threads=choice.cpu_threads,
        compile=choice.compile,
        cudnn_benchmark=choice.cudnn_benchmark,
        lr_noise_scale=choice.noise_scale,
        allocator_limit_bytes=allocator_limit(tuned),
    )
