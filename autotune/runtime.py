"""Where a training step runs and in which precision: device resolution (``auto``,
``cuda:N``, a GPU this torch cannot use said out loud), precision checks and autocast.
Shared by the engine's trials and every workload; imports torch."""

from __future__ import annotations

import contextlib

import torch

from autotune.decisions import PRECISIONS
from autotune.errors import ConfigError, GpuNotUsable

__all__ = ["AUTOCAST_DTYPES", "PRECISIONS", "autocast", "check_gpu_usable", "check_precision",
           "resolve_device"]

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present. An unusable request is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        check_gpu_usable()
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            check_gpu_usable()
            raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def check_gpu_usable(nvml=None) -> None:
    """Say out loud when NVML sees a GPU that this torch cannot use, instead of quietly
    running on the CPU; ``nvml`` (a probe) defaults to the real one."""
    from autotune.device import unusable_gpu_message
    from autotune.probes import NvmlProbe

    probe = nvml if nvml is not None else NvmlProbe()
    try:
        message = unusable_gpu_message(
            probe, torch.cuda.is_available(), torch.__version__, torch.version.cuda
        )
    finally:
        probe.close()
    if message:
        raise GpuNotUsable(message)


def check_precision(precision: str, device: torch.device) -> None:
    """fp16 needs CUDA (its gradient scaler is the CUDA one); bf16 needs hardware support."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if precision == "bf16" and device.type == "cuda":
        from autotune.device import CudaDevice

        # Capability 8.0+: is_bf16_supported() also counts emulation (V100, T4), slow.
        index = device.index if device.index is not None else torch.cuda.current_device()
        if not CudaDevice().bf16_supported(index):
            raise ConfigError("precision bf16 is not supported natively by this GPU "
                              "(compute capability below 8.0); use fp16 or fp32")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


