"""Shared fixtures: a private cache folder, a tiny image set and a tiny TrainConfig."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from arwgan.config import LoaderConfig, ModelConfig, OptimConfig, TrainConfig


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Point ``ARWGAN_CACHE`` at a temporary folder for the whole session, so that no test
    ever writes the synthetic set (or anything else) into ``~/.cache``."""
    root = tmp_path_factory.mktemp("arwgan-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ARWGAN_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic set in the HiDDeN layout: 64 train and 16 val images of 40 px.

    Generated once per session (well under a second); the default synthetic set (2200
    images at 160 px) would take about 12 s.
    """
    from arwgan.synthetic import ensure_synthetic_dataset

    return ensure_synthetic_dataset(
        root=tmp_path_factory.mktemp("tiny-data"), train_count=64, val_count=16, size=40, seed=0
    )


def tiny_config(
    out_dir: str | Path,
    data_dir: str | Path,
    *,
    image_size: int = 16,
    message_bits: int = 4,
    channels: int = 8,
    noise: str = "",
    batch_size: int = 8,
    epochs: int = 1,
    steps_per_epoch: int | None = 2,
    val_images: int | None = 16,
    lr: float = 1e-3,
    precision: str = "fp32",
    seed: int = 0,
    device: str = "cpu",
    **train_fields,
) -> TrainConfig:
    """A TrainConfig small enough for a 2-core CPU: a step takes a few milliseconds."""
    return TrainConfig(
        model=ModelConfig(
            image_size=image_size, message_bits=message_bits, channels=channels, noise=noise
        ),
        loader=LoaderConfig(batch_size=batch_size, num_workers=0),
        optim=OptimConfig(lr_g=lr, lr_d=lr),
        precision=precision,
        device=device,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        val_images=val_images,
        data_dir=str(data_dir),
        out_dir=str(out_dir),
        seed=seed,
        **train_fields,
    )


@pytest.fixture
def make_config(tmp_path: Path, tiny_data_dir: Path):
    """``make_config(**overrides)`` -> a tiny TrainConfig writing into ``tmp_path / 'run'``
    and reading :func:`tiny_data_dir`; ``out_dir`` and ``data_dir`` may be overridden."""

    def make(**overrides) -> TrainConfig:
        overrides.setdefault("out_dir", tmp_path / "run")
        overrides.setdefault("data_dir", tiny_data_dir)
        return tiny_config(**overrides)

    return make


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """One intra-op thread: the tensors here are tiny, and on a busy 2-core machine
    OpenMP threads spinning against each other made a train step 70x slower (5.6 s
    instead of 0.08 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip cleanly where CUDA is absent (CI, this 2-core box)."""
    if torch.cuda.is_available():
        return
    if not any("gpu" in item.keywords for item in items):
        return
    from arwgan.errors import GpuNotUsable
    from arwgan.step import check_gpu_usable

    reason = f"needs a CUDA GPU (torch {torch.__version__}: torch.cuda.is_available() is False)"
    try:
        check_gpu_usable()
    except GpuNotUsable as exc:  # a GPU is there, this torch cannot use it: say why
        reason = f"needs a CUDA GPU torch can use: {exc}"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> Path:
    """``last.pt`` of a tiny model trained until it decodes clearly above chance; its
    ``log.csv`` lies beside it.

    4 bits, 16 px, 8 channels, identity noise, lr 1e-2, 288 steps of 16 images, with the
    options that learn fastest on the synthetic set (zero-mean residual, no discriminator:
    docs/results.md); the official loss alone reached only 0.69 in 144 steps. Measured
    (torch 2.14 CPU): val_bitacc_identity 0.78, PSNR 32.9 dB, in about 20 s on a busy
    2-core machine. Trained once per session, shared by the inference and robustness tests.
    """
    import io

    from rich.console import Console

    from arwgan.trainer import fit

    out_dir = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(
        out_dir, tiny_data_dir, batch_size=16, epochs=72, steps_per_epoch=4, lr=1e-2,
        log_every=1000,
    )
    cfg.model.residual_zero_mean = True
    cfg.model.weights.adversarial = 0.0
    fit(cfg, console=Console(file=io.StringIO()))
    return out_dir / "last.pt"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a process group's
    rendezvous; the small race with other programs is acceptable in tests)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The environment torchrun gives process ``rank`` of a one-node job on 127.0.0.1."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        # A hung collective fails the test within a minute instead of ten.
        "ARWGAN_DIST_TIMEOUT_S": "60",
    }
