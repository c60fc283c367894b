"""ARWGAN as the engine's workload (:class:`autotune.workload.Workload`), and what ARWGAN
does with a tuned file (in :mod:`arwgan.tuning`).

The engine drives the real train step (:class:`arwgan.step.GANStep`: both networks,
both Adam optimisers, the noise layers) on the real data pipeline; ARWGAN tells it
its reference (1e-3 for G and D at batch 16, the seed report's rates), its baseline
(the seed report: batch 16, 4 workers, fp32) and its two gradient-noise groups
(generator, discriminator; the generator's decides). ``make_workload`` rebuilds it in
a trial's child process from JSON.
"""

from __future__ import annotations

from typing import Any

from arwgan.config import LoaderConfig, ModelConfig, OptimConfig
from autotune.workload import Baseline, LoaderSettings, Workload, WorkloadRef

REFERENCE_BATCH = 16
REFERENCE_LR = 1e-3
REFERENCE_LRS = {"lr_g": REFERENCE_LR, "lr_d": REFERENCE_LR}
#: The seed report's starting point: every speed claim is measured against it.
SEED_BASELINE = Baseline(batch_size=16, num_workers=4, precision="fp32", pin_memory=False,
                         label="seed default")
SEED_LOADER = LoaderConfig(batch_size=16, num_workers=4, pin_memory=False, persistent_workers=False)
SEED_PRECISION = "fp32"


class ArwganStep:
    """:class:`autotune.workload.TrainStep` over a :class:`GANStep`: a batch is the
    loader's ``(images, messages, *extras)``."""

    def __init__(self, gan) -> None:
        self.gan = gan

    def to_device(self, batch):
        images, messages, *_ = batch
        return self.gan.to_device(images, messages)

    def __call__(self, batch):
        images, messages = batch
        return self.gan(images, messages)

    def compile(self) -> None:
        self.gan.compile()

    def measure_gradient_noise(self, batch, micro_batches: int, estimators) -> None:
        images, messages = batch
        self.gan.measure_gradient_noise(images, messages, micro_batches,
                                        estimators["generator"], estimators["discriminator"])

    def take_turns(self) -> int:
        """The noise layers take turns (0, 1, 2, ... round-robin) instead of a random draw."""
        noiser = getattr(getattr(self.gan, "nets", None), "noiser", None)
        layers = getattr(noiser, "layers", None)
        if noiser is None or not layers:
            return 1
        turn = iter(range(10**9))

        def forward(encoded, cover):
            return layers[next(turn) % len(layers)](encoded, cover)

        noiser.forward = forward
        return len(layers)


class ArwganWorkload(Workload):
    """ARWGAN at one model config, on one data folder (None: the synthetic set)."""

    name = "arwgan"
    reference_batch = REFERENCE_BATCH
    reference_lrs = REFERENCE_LRS
    baseline = SEED_BASELINE
    noise_groups = ("generator", "discriminator")
    preload = ("arwgan.step",)
    train_hint = "train with: arwgan-train --from-tuned {out}"

    def __init__(self, model: ModelConfig | None = None, data_dir: str | None = None,
                 seed: int = 0) -> None:
        self.model = model if model is not None else ModelConfig()
        self.data_dir = data_dir
        self.seed = seed
        self._datasets = None

    def reference(self) -> WorkloadRef:
        return WorkloadRef("arwgan.workload:make_workload",
                           {"model": self.model.to_dict(), "data_dir": self.data_dir,
                            "seed": self.seed})

    def fingerprint(self) -> dict[str, Any]:
        return self.model.to_dict()

    def describe(self) -> str:
        m = self.model
        return f"ARWGAN {m.image_size} px, {m.message_bits} bits, {m.channels} channels"

    # -- the step -------------------------------------------------------------------------
    def build_step(self, batch_size, precision, device, *, lrs, channels_last=False, seed=0,
                   dist=None) -> ArwganStep:
        from arwgan.step import GANStep

        optim = OptimConfig(lr_g=lrs["lr_g"], lr_d=lrs["lr_d"])
        extra = {"dist": dist} if dist is not None else {}
        return ArwganStep(GANStep(self.model, optim, precision, device, seed, channels_last, **extra))

    def load_checkpoint(self, step: ArwganStep, path: str) -> int:
        """Load a training checkpoint's weights (its model must be the one tuned)."""
        from arwgan.checkpoint import load_checkpoint, require_same_model

        state = load_checkpoint(path)
        require_same_model(path, state, self.model, "; tune with its model flags")
        step.gan.load_state_dict(state["gan"])
        return int(step.gan.step_count)

    # -- the data -------------------------------------------------------------------------
    def datasets(self):
        if self._datasets is None:
            from arwgan.data import build_datasets

            m = self.model
            self._datasets = build_datasets(self.data_dir, m.image_size, m.message_bits, seed=self.seed)
        return self._datasets

    def dataset(self):
        return self.datasets()[0]

    def loader(self, settings: LoaderSettings, batches: int, seed: int = 0):
        from arwgan.data import EpochSampler, make_loader

        train_set = self.dataset()
        # Enough samples for the timed batches whatever the dataset size: the sampler
        # is given a length that wraps around the data.
        length = max(len(train_set), (batches + 4) * settings.batch_size)
        sampler = EpochSampler(length, seed=seed, epoch=0)
        loader_cfg = LoaderConfig(settings.batch_size, settings.num_workers, settings.pin_memory,
                                  settings.persistent_workers, settings.prefetch_factor)
        return make_loader(_Wrapped(train_set), loader_cfg, sampler, drop_last=True)

    def example_batch(self, batch_size: int, seed: int = 0):
        """Random images in [-1, 1] and random bits: a trial times the step, not decoding."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        size, bits = self.model.image_size, self.model.message_bits
        images = torch.rand(batch_size, 3, size, size, generator=gen) * 2 - 1
        messages = torch.randint(0, 2, (batch_size, bits), generator=gen).float()
        return images, messages

    def sample_bytes(self) -> int:
        size = self.model.image_size
        return 3 * size * size * 4 + self.model.message_bits * 4

    def files(self):
        return self.dataset().files


def make_workload(model: dict | None = None, data_dir: str | None = None, seed: int = 0) -> ArwganWorkload:
    """The factory a trial's child process calls (JSON keyword arguments)."""
    return ArwganWorkload(ModelConfig.from_dict(model) if model is not None else ModelConfig(),
                          data_dir, seed)


class _Wrapped:
    """Lets a sampler longer than the dataset wrap around it (for timing only)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        return self.dataset[(index % len(self.dataset), seed)]
