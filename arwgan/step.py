"""The ARWGAN train step: one discriminator update and one generator update.

This is the unit both the trainer and the autotuner run: the tuner measures exactly
this code, so what it finds holds for training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from arwgan.config import ModelConfig, OptimConfig
from arwgan.errors import ConfigError
from autotune.distributed import DistContext
from autotune.runtime import (  # noqa: F401 - part of this module's API
    AUTOCAST_DTYPES, autocast, check_gpu_usable, check_precision, resolve_device,
)
from arwgan.metrics import SSIM_LOSS_FORMS, bit_accuracy_per_image
from arwgan.model import Decoder, Discriminator, Encoder
from arwgan.noise import Noiser

def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up: step 0 runs at 1/warmup_steps of the rate, step warmup_steps-1 at full."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


@dataclass
class StepResult:
    """Losses and metrics of one step, as detached device tensors (no sync taken)."""

    d_loss: torch.Tensor
    g_loss: torch.Tensor
    g_adversarial: torch.Tensor
    g_ssim: torch.Tensor
    g_image_mse: torch.Tensor
    g_message_mse: torch.Tensor
    bit_accuracy: torch.Tensor
    skipped: bool
    """True when a non-finite loss made this step skip an optimiser update."""

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}


LOSS_NAMES = (
    "d_loss", "g_loss", "g_adversarial", "g_ssim", "g_image_mse", "g_message_mse", "bit_accuracy",
)


class Networks(nn.Module):
    """Encoder, decoder, discriminator and noise layers of one ARWGAN."""

    def __init__(self, cfg: ModelConfig, noise_seed: int) -> None:
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.discriminator = Discriminator(cfg)
        self.noiser = Noiser(cfg.noise, noise_seed)


class WatermarkGenerator(nn.Module):
    """Encoder -> noise -> decoder: everything the generator loss trains, as one module.

    It holds the same encoder, decoder and noiser objects as :class:`Networks` (so it
    adds nothing to the checkpoint); it exists so that DistributedDataParallel can wrap
    the generator as one unit with one forward and one backward per step.
    """

    def __init__(self, nets: Networks, decoder_jitter: float = 0.0) -> None:
        super().__init__()
        self.encoder = nets.encoder
        self.noiser = nets.noiser
        self.decoder = nets.decoder
        self.decoder_jitter = decoder_jitter

    def forward(self, images: torch.Tensor, messages: torch.Tensor):
        encoded = self.encoder(images, messages)
        noised = self.noiser(encoded, images)
        if self.training and self.decoder_jitter > 0:
            # ModelConfig.decoder_jitter: a random flat colour offset per image and
            # channel, so that a flat shift cannot carry the message.
            offset = torch.rand(noised.shape[0], noised.shape[1], 1, 1, device=noised.device)
            noised = noised + (offset * 2 - 1).to(noised.dtype) * self.decoder_jitter
        return encoded, self.decoder(noised)


def _data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel.

    Wrapping broadcasts rank 0's parameters and buffers: every rank starts from the same
    weights whatever its own initialisation. Buffers are not re-broadcast before every
    forward: in training BatchNorm normalises with batch statistics, so the running
    statistics only matter for validation and checkpoints, which use rank 0's (the
    trainer broadcasts them there); rank 0's own are the same either way, and each step
    saves three broadcasts.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [device.index] if device.type == "cuda" else None
    # torch >= 2.14 renamed broadcast_buffers (per forward) to forward_sync_buffers.
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(module, device_ids=device_ids, forward_sync_buffers=False)
    return DDP(module, device_ids=device_ids, broadcast_buffers=False)


class GANStep:
    """Owns the networks, both Adam optimisers and (fp16) gradient scalers.

    ``__call__(images, messages)`` runs discriminator step then generator step, with the
    encoder forward shared by both, as in the official implementation.

    With ``dist`` (a :class:`arwgan.distributed.DistContext` in a process group) the
    generator and the discriminator are each wrapped in DistributedDataParallel,
    which averages their gradients over ranks during ``backward``:

    - the generator (encoder + noise + decoder) runs forward once and backward once
      per step, the plain DDP pattern;
    - the discriminator is called through its DDP wrapper twice before the D loss's
      one backward (cover, then the detached encoded image). Both calls use the same
      parameters, whose gradients autograd sums before each parameter's gradient hook
      fires once, so DDP reduces each gradient exactly once. Keeping two calls (not one
      on ``cat([cover, encoded])``) keeps BatchNorm's statistics per call, as in the
      single-process step;
    - the generator's adversarial term calls the *unwrapped* discriminator with its
      parameters frozen: no gradient reaches D's parameters there, so DDP must not
      expect a reduction for them (it would wait for gradients that never come).

    ``sync_bn`` (more than one process, CUDA) turns every BatchNorm into SyncBatchNorm,
    whose statistics cover the global batch. Without it each rank normalises with its
    own batch, the usual DDP behaviour.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        optim_cfg: OptimConfig,
        precision: str,
        device: torch.device,
        seed: int = 0,
        channels_last: bool = False,
        dist: DistContext | None = None,
        sync_bn: bool = False,
    ) -> None:
        check_precision(precision, device)
        self.dist = dist if dist is not None and dist.distributed else None
        sync_bn = sync_bn and self.dist is not None and self.dist.world_size > 1
        if sync_bn and device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA: torch's SyncBatchNorm has no CPU kernels")
        self.model_cfg = model_cfg
        self.optim_cfg = optim_cfg
        self.precision = precision
        self.device = device
        self.channels_last = channels_last
        torch.manual_seed(seed)
        self.nets = Networks(model_cfg, noise_seed=seed).to(device)
        if channels_last:
            # The convolutional networks only: the noise layers hold 2-D buffers (JPEG's
            # DCT and zigzag tables) that have no channels_last layout.
            for module in (self.nets.encoder, self.nets.decoder, self.nets.discriminator):
                module.to(memory_format=torch.channels_last)
        if sync_bn:
            # Converted in place: the new layers keep the same parameters, buffers and
            # state_dict keys, so checkpoints move freely between the two.
            self.nets = nn.SyncBatchNorm.convert_sync_batchnorm(self.nets)
        self.generator: nn.Module = WatermarkGenerator(self.nets, model_cfg.decoder_jitter)
        self.discriminator: nn.Module = self.nets.discriminator
        if self.dist is not None:
            self.generator = _data_parallel(self.generator, device)
            self.discriminator = _data_parallel(self.nets.discriminator, device)
        betas = (optim_cfg.beta1, optim_cfg.beta2)
        generator_params = [*self.nets.encoder.parameters(), *self.nets.decoder.parameters()]
        self.opt_g = torch.optim.Adam(generator_params, lr=optim_cfg.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(
            self.nets.discriminator.parameters(), lr=optim_cfg.lr_d, betas=betas
        )
        use_scaler = precision == "fp16"
        self.scaler_g = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.scaler_d = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.step_count = 0
        self.weights = model_cfg.weights
        self.ssim_loss = SSIM_LOSS_FORMS[model_cfg.ssim_loss]
        # The discriminator's last loss, reported on the steps that skip its update.
        self._last_d_loss = torch.zeros((), device=device)
        # BatchNorm updates its running statistics during the forward pass, before we can
        # know whether the loss is finite: a skipped step must put them back.
        self._bn_stats = [
            buf
            for module in self.nets.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for buf in (module.running_mean, module.running_var)
            if buf is not None
        ]

    def compile(self) -> None:
        """``torch.compile`` the encoder, the decoder and the discriminator in place
        (``nn.Module.compile``: parameters and state_dict keys unchanged, so checkpoints
        move between compiled and eager runs). The noise layers stay eager: they draw
        at random and change shapes. Compilation happens at the first calls."""
        for module in (self.nets.encoder, self.nets.decoder, self.nets.discriminator):
            module.compile()

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "nets": self.nets.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "scaler_g": self.scaler_g.state_dict(),
            "scaler_d": self.scaler_d.state_dict(),
            "noiser_rng": self.nets.noiser.get_rng_state(),
            "step_count": self.step_count,
        }

    def load_state_dict(self, state: dict) -> None:
        self.nets.load_state_dict(state["nets"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.scaler_g.load_state_dict(state["scaler_g"])
        self.scaler_d.load_state_dict(state["scaler_d"])
        self.nets.noiser.set_rng_state(state["noiser_rng"])
        self.step_count = int(state["step_count"])

    # -- the step ----------------------------------------------------------------------
    def _set_lr(self) -> None:
        factor = warmup_factor(self.step_count, self.optim_cfg.warmup_steps)
        for group in self.opt_g.param_groups:
            group["lr"] = self.optim_cfg.lr_g * factor
        for group in self.opt_d.param_groups:
            group["lr"] = self.optim_cfg.lr_d * factor

    def to_device(self, images: torch.Tensor, messages: torch.Tensor):
        # non_blocking only overlaps the copy when the host tensor is pinned.
        images = images.to(self.device, non_blocking=True)
        messages = messages.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, messages

    def _update(self, loss: torch.Tensor, optimizer, scaler) -> bool:
        """Backward and step unless the loss is non-finite. Returns True when skipped.

        ``torch.isfinite(...).item()`` is a device sync; it is the price of never
        feeding a NaN into Adam's moment estimates.
        """
        optimizer.zero_grad(set_to_none=True)
        if not self._all_finite(loss):
            return True
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return False

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Is the loss finite, on every rank? Ranks must agree: one that skipped its
        backward would leave the others waiting in DDP's gradient all-reduce."""
        finite = torch.isfinite(loss.detach())
        if self.dist is None:
            return bool(finite.item())
        import torch.distributed as torch_dist

        flag = finite.to(torch.int32).reshape(1)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MIN)
        return bool(flag.item())

    # -- gradient noise (a measurement, not part of training) ---------------------------------
    def measure_gradient_noise(
        self, images: torch.Tensor, messages: torch.Tensor, micro_batches: int,
        noise_g, noise_d, precondition: bool = False,
    ) -> int:
        """Feed one step of the generator's and the discriminator's gradient noise scale
        (:class:`autotune.gns.NoiseScale` each) from this batch split into
        ``micro_batches`` equal parts, at the current weights.

        Each part runs this class's own step (the very losses training uses) with the
        optimisers swapped for recorders that read the gradients instead of stepping;
        afterwards weights, optimiser and scaler state, every buffer (BatchNorm
        statistics), the step count and the RNG states are as before, so training goes
        on as if this had not been called. The ordinary step is untouched; this costs one
        extra forward and backward of the batch. ``precondition`` measures in Adam's
        preconditioned space (:func:`autotune.gns.adam_preconditioner`); off by default
        because the raw noise scale predicted Adam's steps-to-target better
        (``benchmarks/gns_adam.py``, docs/goodput.md). fp16 is
        measured without loss scaling. Returns the micro-batch size the estimates are
        for (per process x world size under DDP, whose backward averages over ranks).
        """
        from autotune.gns import MicroBatchGradients, adam_preconditioner

        batch = images.shape[0]
        if micro_batches < 2 or batch % micro_batches:
            raise ConfigError(
                f"batch {batch} does not split into {micro_batches} (>= 2) equal micro-batches"
            )
        size = batch // micro_batches
        readers = [
            MicroBatchGradients(
                [p for group in opt.param_groups for p in group["params"]],
                adam_preconditioner(opt) if precondition else None,
            )
            for opt in (self.opt_g, self.opt_d)
        ]
        saved = (self.opt_g, self.opt_d, self.scaler_g, self.scaler_d, self.step_count)
        groups = [*self.opt_g.param_groups, *self.opt_d.param_groups]
        saved_lrs = [group["lr"] for group in groups]  # the steps below set them
        buffers = list(self.nets.buffers())
        buffer_snapshot = [b.clone() for b in buffers]
        noiser_rng = self.nets.noiser.get_rng_state()
        self.opt_g, self.opt_d = (_GradientRecorder(o, r) for o, r in zip(saved[:2], readers))
        self.scaler_g = self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=False)
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                for j in range(micro_batches):
                    self(images[j * size : (j + 1) * size], messages[j * size : (j + 1) * size])
        finally:
            self.opt_g, self.opt_d, self.scaler_g, self.scaler_d, self.step_count = saved
            for group, lr in zip(groups, saved_lrs):
                group["lr"] = lr
            torch._foreach_copy_(buffers, buffer_snapshot)
            self.nets.noiser.set_rng_state(noiser_rng)
            self.nets.zero_grad(set_to_none=True)
        micro = size * (self.dist.world_size if self.dist is not None else 1)
        for reader, estimator in zip(readers, (noise_g, noise_d)):
            if reader.micro_batches == micro_batches:  # a part with a non-finite loss: no step
                estimator.update(*reader.finish(), micro_batch=micro)
        return micro

    def __call__(self, images: torch.Tensor, messages: torch.Tensor) -> StepResult:
        nets, w = self.nets, self.weights
        nets.train()
        self._set_lr()
        # One multi-tensor copy of the BN statistics (a few KB); restored only on a skip.
        bn_snapshot = torch._foreach_mul(self._bn_stats, 1.0) if self._bn_stats else []
        with autocast(self.precision, self.device):
            encoded, decoded = self.generator(images, messages)
        # OptimConfig.d_every: the discriminator costs about a third of a step while its
        # gradient on the encoded image is tiny; with its loss weight at 0 it never runs.
        use_d = w.adversarial > 0
        skipped_d = False
        if use_d and self.step_count % self.optim_cfg.d_every == 0:
            with autocast(self.precision, self.device):
                # Discriminator: cover is real (1), the detached encoded image is fake (0).
                real_logits = self.discriminator(images)
                fake_logits = self.discriminator(encoded.detach())
                d_loss = F.binary_cross_entropy_with_logits(
                    real_logits.float(), torch.ones_like(real_logits, dtype=torch.float32)
                ) + F.binary_cross_entropy_with_logits(
                    fake_logits.float(), torch.zeros_like(fake_logits, dtype=torch.float32)
                )
            skipped_d = self._update(d_loss, self.opt_d, self.scaler_d)
            self._last_d_loss = d_loss.detach()

        # The generator's adversarial term must not leave gradients on D's weights:
        # freezing them here also saves computing those gradients at all. It calls the
        # unwrapped discriminator (nets.discriminator), never its DDP wrapper.
        nets.discriminator.requires_grad_(False)
        try:
            with autocast(self.precision, self.device):
                if use_d:
                    verdict = nets.discriminator(encoded)
                    g_adv = F.binary_cross_entropy_with_logits(
                        verdict.float(), torch.ones_like(verdict, dtype=torch.float32)
                    )
                else:
                    g_adv = torch.zeros((), device=encoded.device)
                # ModelConfig.ssim_loss picks the form (official: raw [-1, 1], zero padding).
                g_ssim = 1 - self.ssim_loss(encoded, images).mean()
                g_image = F.mse_loss(encoded.float(), images.float())
                g_message = F.mse_loss(decoded.float(), messages.float())
                g_loss = (
                    w.adversarial * g_adv
                    + w.ssim * g_ssim
                    + w.image_mse * g_image
                    + w.message_mse * g_message
                )
            skipped_g = self._update(g_loss, self.opt_g, self.scaler_g)
        finally:
            nets.discriminator.requires_grad_(True)
        if skipped_d or skipped_g:
            torch._foreach_copy_(self._bn_stats, bn_snapshot)
        self.step_count += 1
        return StepResult(
            d_loss=self._last_d_loss,
            g_loss=g_loss.detach(),
            g_adversarial=g_adv.detach(),
            g_ssim=g_ssim.detach(),
            g_image_mse=g_image.detach(),
            g_message_mse=g_message.detach(),
            bit_accuracy=bit_accuracy_per_image(decoded.detach(), messages).mean(),
            skipped=skipped_d or skipped_g,
        )


class _GradientRecorder:
    """Stands in for an optimiser during :meth:`GANStep.measure_gradient_noise`: ``step``
    hands the gradients to a :class:`autotune.gns.MicroBatchGradients` instead of
    updating the weights. Shares the real optimiser's param_groups (the step sets their
    learning rate; the measurement puts it back)."""

    def __init__(self, optimizer: torch.optim.Optimizer, reader) -> None:
        self.param_groups = optimizer.param_groups
        self.reader = reader

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def step(self) -> None:
        self.reader.add()
