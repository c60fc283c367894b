"""Configuration objects: one small dataclass per component, JSON-serialisable,
validated where it is built (``__post_init__``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from arwgan.errors import ConfigError

#: The authors' ARWGAN training string, verbatim (official grammar and meanings).
OFFICIAL_NOISE = (
    "crop((0.1871,0.1871),(0.1871,0.1871))+Jpeg(0)+dropout(0.5477,0.5477)"
    "+resize(0.8,0.8)+gaussian(3,2.0)"
)

PRECISIONS = ("fp32", "bf16", "fp16")

#: Forms of SSIM the generator loss can use (see arwgan.metrics.SSIM_LOSS_FORMS).
SSIM_LOSS_FORMS = ("official", "unit")

#: Learning-rate rules (the same names as :data:`autotune.decisions.LR_RULES`).
LR_RULES = ("linear", "sqrt", "none", "adascale")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _from_dict(cls, data: dict[str, Any]):
    """Build a dataclass from a dict, refusing unknown keys (a typo must not pass silently)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(sorted(unknown))}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


@dataclass
class LossWeights:
    """Weights of the generator's loss terms (official ARWGAN values by default)."""

    adversarial: float = 0.001
    """BCE of the discriminator's verdict on the encoded image, labelled as cover."""
    ssim: float = 0.1
    """Weight of ``1 - SSIM(encoded, cover)``."""
    image_mse: float = 0.7
    """Weight of ``MSE(encoded, cover)``."""
    message_mse: float = 1.5
    """Weight of ``MSE(decoded, message)``."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            _require(
                isinstance(value, (int, float)) and value >= 0 and value == value,
                f"loss weight {f.name} must be a non-negative number, got {value!r}",
            )


@dataclass
class ModelConfig:
    """Everything that shapes the networks and what they are trained against.

    Two runs with equal ModelConfigs train the same model; its ``fingerprint`` is what
    a tuned file is checked against.
    """

    image_size: int = 128
    """Side of the square training crops, in pixels."""
    message_bits: int = 30
    """Length L of the hidden message."""
    channels: int = 64
    """Feature channels C of every network."""
    noise: str = OFFICIAL_NOISE
    """Noise layers in the official ARWGAN grammar, '+'-joined; empty string for
    identity only (docs/model.md lists every layer and what its arguments mean)."""
    weights: LossWeights = field(default_factory=LossWeights)
    ssim_loss: str = "official"
    """Form of SSIM in the generator loss: ``official`` (pytorch-ssim on the raw [-1, 1]
    images, zero "same" padding, as the authors train) or ``unit`` (on [0, 1] with
    "valid" filtering, the form reported as SSIM everywhere)."""
    residual_zero_mean: bool = False
    """Improvement (not official): the encoder removes the per-image, per-channel mean
    of its residual, so the watermark cannot be a flat colour shift."""
    decoder_jitter: float = 0.0
    """Improvement (not official): in training, add a per-image, per-channel offset
    drawn uniformly from [-j, j] ([-1, 1] units) to the attacked image before the
    decoder, so that a flat colour shift carries no message. 0 = off."""

    def __post_init__(self) -> None:
        if isinstance(self.weights, dict):
            self.weights = _from_dict(LossWeights, self.weights)
        _require(
            isinstance(self.image_size, int) and self.image_size >= 8,
            f"image size must be an integer >= 8, got {self.image_size!r}",
        )
        _require(
            isinstance(self.message_bits, int) and 1 <= self.message_bits <= 4096,
            f"message bits must be an integer in 1..4096, got {self.message_bits!r}",
        )
        _require(
            isinstance(self.channels, int) and 1 <= self.channels <= 1024,
            f"channels must be an integer in 1..1024, got {self.channels!r}",
        )
        _require(isinstance(self.noise, str), "noise must be a string")
        _require(
            self.ssim_loss in SSIM_LOSS_FORMS,
            f"SSIM loss form must be one of {', '.join(SSIM_LOSS_FORMS)}, got {self.ssim_loss!r}",
        )
        _require(
            isinstance(self.residual_zero_mean, bool),
            f"residual_zero_mean must be true or false, got {self.residual_zero_mean!r}",
        )
        _require(
            isinstance(self.decoder_jitter, (int, float)) and 0 <= self.decoder_jitter <= 1,
            f"decoder jitter must be in [0, 1], got {self.decoder_jitter!r}",
        )
        # Parse now so that a bad spec fails where the config is built, not mid-run; the
        # grammar imports no torch, so a bad --noise answers at once.
        from arwgan.noise_spec import parse_noise

        parse_noise(self.noise)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data)

    def fingerprint(self) -> str:
        """A short stable hash of everything that shapes the model and its train step."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class LoaderConfig:
    """DataLoader settings; the seed report's baseline is batch 16, 4 workers, no pinning."""

    batch_size: int = 16
    num_workers: int = 4
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int | None = 2
    """Batches loaded ahead per worker; must be None when num_workers is 0."""

    def __post_init__(self) -> None:
        _require(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"batch size must be a positive integer, got {self.batch_size!r}",
        )
        _require(
            isinstance(self.num_workers, int) and self.num_workers >= 0,
            f"workers must be a non-negative integer, got {self.num_workers!r}",
        )
        if self.num_workers == 0:
            # torch refuses prefetch_factor / persistent_workers without workers.
            self.prefetch_factor = None
            self.persistent_workers = False
        else:
            if self.prefetch_factor is None:
                self.prefetch_factor = 2
            _require(
                isinstance(self.prefetch_factor, int) and self.prefetch_factor >= 1,
                f"prefetch factor must be a positive integer, got {self.prefetch_factor!r}",
            )


@dataclass
class OptimConfig:
    """Two Adam optimisers (generator = encoder + decoder, and discriminator)."""

    lr_g: float = 1e-3
    lr_d: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    """Linear warm-up of both learning rates from lr/warmup_steps to lr."""
    d_every: int = 1
    """Update the discriminator every k-th step only (official: 1, every step). With
    the adversarial loss weight at 0 the discriminator is never run."""

    def __post_init__(self) -> None:
        for name in ("lr_g", "lr_d"):
            value = getattr(self, name)
            _require(
                isinstance(value, (int, float)) and 0 < value < 10,
                f"learning rate {name} must be in (0, 10), got {value!r}",
            )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"{name} must be in [0, 1), got {value!r}")
        _require(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            f"warm-up steps must be a non-negative integer, got {self.warmup_steps!r}",
        )
        _require(
            isinstance(self.d_every, int) and self.d_every >= 1,
            f"discriminator interval d_every must be a positive integer, got {self.d_every!r}",
        )


@dataclass
class TrainConfig:
    """One training run. Serialised into every checkpoint, so a run is reproducible."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: str = "fp32"
    """fp32 | bf16 | fp16 (fp16 uses a gradient scaler and needs CUDA)."""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda | cuda:N."""
    epochs: int = 10
    steps_per_epoch: int | None = None
    """Cap on train steps per epoch; None runs the whole train set."""
    val_images: int | None = 512
    """Cap on validation images per epoch; None validates on the whole val set."""
    data_dir: str | None = None
    """Image folder; None uses the built-in synthetic dataset."""
    val_fraction: float = 0.1
    """Share of a flat folder held out for validation."""
    out_dir: str = "runs/train"
    seed: int = 0
    channels_last: bool = False
    max_nonfinite_steps: int = 20
    """Consecutive steps with a non-finite loss before training stops."""
    log_every: int = 10
    """Steps between progress refreshes (each one is a device sync)."""
    max_minutes: float | None = None
    """Stop after the epoch during which this much training time has passed."""
    lr_rule: str | None = None
    """How the learning rates follow the world size under torchrun. None: they are used
    as given, whatever the number of processes (DDP averages gradients, so they are the
    rates of the global batch). linear | sqrt | none: they were set for a global batch
    of ``batch_size * lr_world_size`` and are rescaled with this rule
    (:func:`autotune.decisions.scale_lr`) to ``batch_size * world_size``."""
    lr_world_size: int = 1
    """The world size the learning rates were set for (1: the per-rank batch on one
    process); only read when ``lr_rule`` is set."""
    lr_noise_scale: float | None = None
    """The gradient noise scale (images) rule ``adascale`` rescales with; set by
    --from-tuned from the tuned file."""
    cpu_threads: int | None = None
    """CPU: torch intra-op threads (``torch.set_num_threads``); None: torch's default."""
    compile: bool = False
    """``torch.compile`` the networks (:meth:`arwgan.step.GANStep.compile`)."""
    cudnn_benchmark: bool | None = None
    """CUDA: cuDNN benchmark mode; None: on (unless deterministic algorithms are asked for)."""
    sync_bn: bool = False
    """With more than one process (CUDA): SyncBatchNorm, statistics over the global batch."""
    allocator_limit_bytes: int | None = None
    """CUDA: cap the caching allocator here (set by --from-tuned: the tuned memory target
    less the context measured while tuning), so training stays under the target the
    tuner measured against; None: no cap."""
    save_every: int | None = None
    """Also write the checkpoint every this many steps; None: at the end of each epoch only."""
    tensorboard: bool = False
    """Write a TensorBoard log (losses, metrics, images/s, learning rates) into the run folder."""
    samples: bool = True
    """Write a sample grid (cover, watermarked, 10x residual) into the run folder each epoch."""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        if isinstance(self.loader, dict):
            self.loader = _from_dict(LoaderConfig, self.loader)
        if isinstance(self.optim, dict):
            self.optim = _from_dict(OptimConfig, self.optim)
        _require(
            self.precision in PRECISIONS,
            f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}",
        )
        _require(
            isinstance(self.epochs, int) and self.epochs >= 1,
            f"epochs must be a positive integer, got {self.epochs!r}",
        )
        _require(
            self.steps_per_epoch is None
            or (isinstance(self.steps_per_epoch, int) and self.steps_per_epoch >= 1),
            f"steps per epoch must be a positive integer, got {self.steps_per_epoch!r}",
        )
        _require(
            self.val_images is None or (isinstance(self.val_images, int) and self.val_images >= 1),
            f"validation images must be a positive integer, got {self.val_images!r}",
        )
        _require(
            0 < self.val_fraction < 1,
            f"validation fraction must be in (0, 1), got {self.val_fraction!r}",
        )
        _require(
            isinstance(self.max_nonfinite_steps, int) and self.max_nonfinite_steps >= 1,
            "max non-finite steps must be a positive integer",
        )
        _require(isinstance(self.log_every, int) and self.log_every >= 1, "log_every must be >= 1")
        _require(
            self.max_minutes is None or (isinstance(self.max_minutes, (int, float)) and self.max_minutes > 0),
            f"max minutes must be positive, got {self.max_minutes!r}",
        )
        _require(isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        _require(
            self.lr_rule is None or self.lr_rule in LR_RULES,
            f"learning-rate rule must be one of {', '.join(LR_RULES)}, got {self.lr_rule!r}",
        )
        _require(
            self.lr_rule != "adascale" or (isinstance(self.lr_noise_scale, (int, float))
                                           and self.lr_noise_scale >= 0),
            "learning-rate rule adascale needs the gradient noise scale (lr_noise_scale)",
        )
        _require(
            self.cpu_threads is None or (isinstance(self.cpu_threads, int) and self.cpu_threads >= 1),
            f"cpu threads must be a positive integer, got {self.cpu_threads!r}",
        )
        _require(isinstance(self.compile, bool), f"compile must be true or false, got {self.compile!r}")
        _require(self.cudnn_benchmark is None or isinstance(self.cudnn_benchmark, bool),
                 f"cudnn_benchmark must be true, false or null, got {self.cudnn_benchmark!r}")
        _require(
            isinstance(self.lr_world_size, int) and self.lr_world_size >= 1,
            f"lr world size must be a positive integer, got {self.lr_world_size!r}",
        )
        _require(isinstance(self.sync_bn, bool), f"sync_bn must be true or false, got {self.sync_bn!r}")
        _require(
            self.allocator_limit_bytes is None
            or (isinstance(self.allocator_limit_bytes, int) and self.allocator_limit_bytes > 0),
            f"allocator limit must be a positive number of bytes, got {self.allocator_limit_bytes!r}",
        )
        _require(
            self.save_every is None or (isinstance(self.save_every, int) and self.save_every >= 1),
            f"--save-every must be a positive number of steps, got {self.save_every!r}",
        )
        for name in ("tensorboard", "samples"):
            _require(isinstance(getattr(self, name), bool), f"{name} must be true or false")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, data)


def with_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A new TrainConfig with dotted-path overrides applied (``{"loader.batch_size": 32}``);
    ``None`` values mean "not given" and are skipped. Validation runs on the result."""
    data = cfg.to_dict()
    for path, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        if leaf not in node:
            raise KeyError(path)
        node[leaf] = value
    return TrainConfig.from_dict(data)


def parse_loss_weights(text: str) -> dict[str, float]:
    """``adv=0.001,ssim=0.1,mse=0.7,msg=1.5`` (any subset) -> LossWeights fields."""
    aliases = {
        "adv": "adversarial", "adversarial": "adversarial", "ssim": "ssim",
        "mse": "image_mse", "image_mse": "image_mse", "msg": "message_mse",
        "message_mse": "message_mse",
    }
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in aliases:
            raise ConfigError(
                f"bad loss weight {part!r}; use e.g. adv=0.001,ssim=0.1,mse=0.7,msg=1.5"
            )
        try:
            weights[aliases[key.strip()]] = float(value)
        except ValueError:
            raise ConfigError(f"bad loss weight {part!r}: {value!r} is not a number") from None
    return weights
