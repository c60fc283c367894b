"""Validation: image quality of the encoded images and bit accuracy under each attack."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from arwgan.metrics import MetricSums, bit_accuracy_per_image, psnr_per_image, ssim_per_image
from arwgan.step import Networks, autocast


def attack_keys(noiser) -> list[str]:
    """Short, unique, CSV-friendly names for identity and each configured layer
    ('identity', 'crop', 'jpeg', 'dropout', ...; a repeated type gets '_2', '_3')."""
    keys: list[str] = []
    for spec in noiser.specs:
        base = spec.name
        key, n = base, 1
        while key in keys:
            n += 1
            key = f"{base}_{n}"
        keys.append(key)
    return keys


@torch.no_grad()
def evaluate(
    nets: Networks,
    batches: Iterable,
    device: torch.device,
    precision: str,
    max_images: int | None = None,
    seed: int = 0,
    noiser=None,
    reduce: Callable[[MetricSums], dict[str, float]] | None = None,
) -> dict[str, float]:
    """PSNR and SSIM of encoded vs cover, bit accuracy with no noise and under every
    configured attack, each applied to every image.

    The attacks' randomness runs on a forked RNG seeded with ``seed``: validation is the
    same every epoch and does not disturb the training RNG.
    ``noiser`` defaults to the one the model trains with; pass another to evaluate under
    attacks it never saw.
    ``reduce`` turns the sums into means instead of ``MetricSums.means``: under torchrun,
    :func:`arwgan.distributed.reduce_metric_sums` adds every rank's sums and counts first.
    Every metric is then registered up front, so that a rank whose share of the images
    is empty still contributes the same (zero) entries.
    """
    noiser = noiser if noiser is not None else nets.noiser
    nets.eval()
    keys = attack_keys(noiser)
    sums = MetricSums()
    if reduce is not None:
        for name in ("psnr", "ssim", *(f"bitacc_{key}" for key in keys)):
            sums.add(name, torch.zeros(0, device=device))
    seen = 0
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        for images, messages, *_ in batches:
            if max_images is not None and seen >= max_images:
                break
            if max_images is not None:
                images, messages = images[: max_images - seen], messages[: max_images - seen]
            images = images.to(device, non_blocking=True)
            messages = messages.to(device, non_blocking=True)
            seen += images.shape[0]
            with autocast(precision, device):
                encoded = nets.encoder(images, messages).float().clamp(-1, 1)
                sums.add("psnr", psnr_per_image(encoded, images))
                sums.add("ssim", ssim_per_image(encoded, images))
                for index, key in enumerate(keys):
                    noised = noiser.apply(index, encoded, images)
                    decoded = nets.decoder(noised)
                    sums.add(f"bitacc_{key}", bit_accuracy_per_image(decoded, messages))
    nets.train()
    return sums.means() if reduce is None else reduce(sums)
