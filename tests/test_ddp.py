"""Data-parallel training and tuning under torchrun: two CPU processes on gloo.

The process groups are real: either ``torch.multiprocessing.spawn`` with the environment
torchrun would set (``RANK``, ``WORLD_SIZE``, ``MASTER_PORT``...), so that the code under
test initialises itself exactly as it does under the launcher, or ``torchrun`` itself
(``python -m torch.distributed.run``) in a subprocess. Each multi-process test takes a
few seconds to ~20 s on a 2-core machine (mostly two fresh ``import torch``).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from helpers import ARWGAN_RECORD
import torch
import torch.multiprocessing as mp
from rich.console import Console
from typer.testing import CliRunner

from arwgan.checkpoint import load_checkpoint
from arwgan.config import ModelConfig, OptimConfig, TrainConfig
from arwgan.distributed import (
    DEFAULT_TIMEOUT_S,
    TIMEOUT_ENV,
    DistContext,
    cleanup,
    init_distributed,
    rank_prefix,
    reduce_metric_sums,
    single_process,
    timeout_from_env,
)
from arwgan.errors import CheckpointError, ConfigError
from arwgan.metrics import MetricSums
from arwgan.trainer import (
    CHECKPOINT_NAME, TELEMETRY_COLUMNS, Interrupted, Trainer, optim_for_world_size, validation_share,
)
from autotune.decisions import PrecisionMeasurement
from autotune.tuner import combine_rank_precisions, slowest_rank_comparison
from conftest import free_port, tiny_config, torchrun_env

CPU = torch.device("cpu")
MODEL_FLAGS = ["--image-size", "16", "--message-bits", "4", "--channels", "8", "--noise", ""]
TINY_FLAGS = [*MODEL_FLAGS, "--workers", "0", "--device", "cpu"]


# -- helpers --------------------------------------------------------------------------


def _entry(rank: int, fn, port: int, args: tuple) -> None:
    os.environ.update(torchrun_env(rank, 2, port))
    torch.set_num_threads(1)
    fn(rank, *args)


def run_two_ranks(fn, *args) -> None:
    """Run ``fn(rank, *args)`` in two fresh processes that form a torchrun-like job; an
    exception in either is raised here with its traceback."""
    mp.spawn(_entry, args=(fn, free_port(), args), nprocs=2, join=True)


def run_two_forked_ranks(fn, *args) -> None:
    """As :func:`run_two_ranks`, but forked from this process: no fresh ``import torch``,
    so a two-rank job costs about a second instead of ten (the fast tests use this)."""
    mp.start_processes(
        _entry, args=(fn, free_port(), args), nprocs=2, join=True, start_method="fork"
    )


def _batch(seed: int, n: int = 4):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 16, 16, generator=generator) * 2 - 1
    messages = torch.randint(0, 2, (n, 4), generator=generator).float()
    return images, messages


def _tiny_model() -> ModelConfig:
    return ModelConfig(image_size=16, message_bits=4, channels=8, noise="")


def assert_same_tensors(a: dict, b: dict, *, exact: bool = True, atol: float = 0.0) -> None:
    assert set(a) == set(b)
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), f"{key} differs"
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=atol, msg=key)


def assert_same_checkpoint(a, b, path: str = "") -> None:
    """Exact equality of nested checkpoint states (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for key in a:
            assert_same_checkpoint(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same_checkpoint(x, y, f"{path}[{index}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# -- pure parts (no process group) ----------------------------------------------------


def test_without_torchrun_the_context_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")  # set by some schedulers: not a torchrun launch
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.device) == (0, 1, None, CPU)
    assert ctx.is_main and not ctx.distributed and not torch.distributed.is_initialized()
    # Every collective is the identity in one process.
    assert ctx.all_reduce_min(7) == 7 and ctx.any(True) and not ctx.any(False)
    assert ctx.broadcast_object({"a": 1}) == {"a": 1}
    assert ctx.all_gather_object(3) == [3]
    assert rank_prefix() == ""
    cleanup()  # harmless without a group


def test_collective_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert timeout_from_env().total_seconds() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv(TIMEOUT_ENV, "90")
    assert timeout_from_env().total_seconds() == 90
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=TIMEOUT_ENV):
            timeout_from_env()


def test_world_size_without_a_rendezvous_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="launch with torchrun"):
        init_distributed("cpu")
    assert rank_prefix() == "rank 0: "


def test_reduce_metric_sums_in_one_process_is_the_plain_mean() -> None:
    sums = MetricSums()
    sums.add("psnr", torch.tensor([30.0, 40.0]))
    sums.add("ssim", torch.zeros(0))  # registered, no images (an empty shard)
    assert reduce_metric_sums(single_process(CPU), sums) == {"psnr": 35.0, "ssim": 0.0}


def test_evaluate_with_a_reduction_gives_the_same_metrics(make_config) -> None:
    from arwgan.evaluate import evaluate

    trainer = Trainer(make_config(val_images=8), Console(file=io.StringIO()))
    args = (trainer.gan.nets, trainer.val_loader, CPU, "fp32")
    plain = evaluate(*args, max_images=8)
    reduced = evaluate(*args, max_images=8, reduce=lambda sums: reduce_metric_sums(single_process(CPU), sums))
    assert reduced == pytest.approx(plain)
    # A rank with no images still reports every metric (as zeros), so the sums line up.
    empty = evaluate(*args, max_images=0, reduce=lambda sums: reduce_metric_sums(single_process(CPU), sums))
    assert set(empty) == set(plain) and set(empty.values()) == {0.0}


@pytest.mark.parametrize(
    ("rule", "lr_world_size", "world_size", "expected"),
    [
        (None, 1, 4, 1e-3),  # not scaled: the rate of the global batch, whatever it is
        ("linear", 1, 4, 4e-3),
        ("sqrt", 1, 4, 2e-3),
        ("none", 1, 4, 1e-3),
        ("linear", 2, 2, 1e-3),  # already set for this world size
        ("linear", 4, 2, 5e-4),  # tuned for 4 processes, running on 2
    ],
)
def test_learning_rates_follow_the_world_size(rule, lr_world_size, world_size, expected) -> None:
    cfg = TrainConfig(
        optim=OptimConfig(lr_g=1e-3, lr_d=1e-3), lr_rule=rule, lr_world_size=lr_world_size
    )
    optim, message = optim_for_world_size(cfg, world_size)
    assert optim.lr_g == pytest.approx(expected) and optim.lr_d == pytest.approx(expected)
    assert (message is None) == (rule is None or lr_world_size == world_size)


def test_lr_rule_and_world_size_are_validated() -> None:
    with pytest.raises(ConfigError, match="learning-rate rule"):
        TrainConfig(lr_rule="cubic")
    with pytest.raises(ConfigError, match="lr world size"):
        TrainConfig(lr_world_size=0)


def test_validation_shares_deal_out_the_first_images() -> None:
    assert [validation_share(10, r, 4) for r in range(4)] == [3, 3, 2, 2]
    assert [validation_share(1, r, 2) for r in range(2)] == [1, 0]
    assert sum(validation_share(513, r, 8) for r in range(8)) == 513


def test_rank_precisions_combine_to_the_slowest_and_largest() -> None:
    rank0 = [PrecisionMeasurement("fp32", 100.0, 10, True), PrecisionMeasurement("bf16", 180.0, 6, True)]
    rank1 = [PrecisionMeasurement("fp32", 80.0, 12, True)]  # no bf16 on this GPU
    fp32, bf16 = combine_rank_precisions([rank0, rank1])
    assert (fp32.images_per_s, fp32.peak_bytes, fp32.finite) == (80.0, 12, True)
    assert not bf16.finite and "rank(s) 1" in bf16.error
    rank1_nan = [PrecisionMeasurement("fp32", 80.0, 12, False)]
    assert not combine_rank_precisions([rank0[:1], rank1_nan])[0].finite


def test_comparison_reports_the_slowest_rank() -> None:
    per_rank = [
        {"seed_default_images_per_s": 100.0, "recommended_images_per_s": 300.0,
         "speedup": 3.0, "rounds": {"seed_default": [100.0], "recommended": [300.0]}},
        {"seed_default_images_per_s": 90.0, "recommended_images_per_s": 200.0,
         "speedup": 2.2, "rounds": {"seed_default": [90.0], "recommended": [200.0]}},
    ]
    combined = slowest_rank_comparison(per_rank)
    assert combined["seed_default_images_per_s"] == 90.0
    assert combined["recommended_images_per_s"] == 200.0
    assert combined["speedup"] == pytest.approx(200 / 90)
    assert "2 ranks" in combined["scope"]


def test_torchrun_with_one_process_trains_through_ddp_like_a_plain_run(
    make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torchrun --nproc-per-node 1``: a group of one, the DDP code path (the smoke test
    a one-GPU machine can run); averaging over one rank changes nothing."""
    from arwgan.trainer import fit

    plain = make_config(out_dir=tmp_path / "plain")
    fit(plain, console=Console(file=io.StringIO()))
    for name, value in torchrun_env(0, 1, free_port()).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    launched = make_config(out_dir=tmp_path / "torchrun")
    console = Console(file=io.StringIO(), width=200)
    fit(launched, console=console)
    assert not torch.distributed.is_initialized()  # left the group
    assert "training on 1 process (gloo, cpu)" in console.file.getvalue()
    a = load_checkpoint(tmp_path / "plain" / CHECKPOINT_NAME)["gan"]["nets"]
    b = load_checkpoint(tmp_path / "torchrun" / CHECKPOINT_NAME)["gan"]["nets"]
    assert_same_tensors(a, b)


# -- the DDP train step ----------------------------------------------------------------


def _step_worker(rank: int, out_dir: Path, same_data: bool) -> None:
    from arwgan.step import GANStep

    ctx = init_distributed("cpu")
    try:
        gan = GANStep(_tiny_model(), OptimConfig(), "fp32", CPU, seed=0, dist=ctx)
        for step in range(3):
            gan(*_batch(step if same_data else 10 * step + rank))
        torch.save(gan.nets.state_dict(), out_dir / f"rank{rank}.pt")
    finally:
        cleanup()


def _single_process_state(steps: int) -> dict:
    """The networks after ``steps`` single-process steps on ``_batch(0..steps-1)``, on one
    thread like each rank (a bit-for-bit comparison must not depend on how many threads
    split a reduction, nor on the thread count earlier tests left)."""
    from arwgan.step import GANStep
    from autotune.knobs import torch_threads

    with torch_threads(1):
        gan = GANStep(_tiny_model(), OptimConfig(), "fp32", CPU, seed=0)
        for step in range(steps):
            gan(*_batch(step))
        return gan.nets.state_dict()


@pytest.mark.slow
def test_ddp_step_on_equal_shards_is_bit_identical_to_one_process(tmp_path: Path) -> None:
    """Both ranks see the same batch: averaging two equal gradients is exact, so the DDP
    step (generator wrapped once, discriminator called twice through its wrapper and
    once unwrapped) must reproduce the single-process step bit for bit."""
    run_two_ranks(_step_worker, tmp_path, True)
    single = _single_process_state(3)
    for rank in range(2):
        assert_same_tensors(torch.load(tmp_path / f"rank{rank}.pt"), single)


@pytest.mark.slow
def test_ddp_step_on_different_shards_keeps_the_ranks_identical(tmp_path: Path) -> None:
    run_two_ranks(_step_worker, tmp_path, False)
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    # Parameters are identical (gradients were averaged); BatchNorm running statistics
    # are each rank's own until validation or a checkpoint takes rank 0's.
    stats = ("running_mean", "running_var", "num_batches_tracked")
    params = [k for k in states[0] if not k.endswith(stats)]
    assert_same_tensors({k: states[0][k] for k in params}, {k: states[1][k] for k in params})
    assert not torch.equal(states[0]["encoder.stem.weight"], _single_process_state(3)["encoder.stem.weight"])


def _averaging_worker(rank: int, out_dir: Path, steps: int) -> None:
    from arwgan.step import GANStep

    ctx = init_distributed("cpu")
    try:
        gan = GANStep(_tiny_model(), OptimConfig(), "fp32", CPU, seed=0, dist=ctx)
        for step in range(steps):
            gan(*_batch(10 * step + rank))
        torch.save(gan.nets.state_dict(), out_dir / f"rank{rank}.pt")
    finally:
        cleanup()


def _averaged_by_hand(steps: int) -> list[dict]:
    """What data parallelism must compute, without any process group: two single-process
    steps, one per rank's data, run side by side in threads; before every optimiser
    update both wait, and each parameter's gradient is replaced by the mean of the two."""
    import threading

    from arwgan.step import GANStep

    gans = [GANStep(_tiny_model(), OptimConfig(), "fp32", CPU, seed=0) for _ in range(2)]
    barrier = threading.Barrier(2, timeout=120)

    def averaged(optimizers: list[torch.optim.Optimizer], rank: int):
        original = optimizers[rank].step

        def step(*args, **kwargs):
            barrier.wait()  # both ranks hold their own gradients
            if rank == 0:
                pairs = zip(*(
                    [p for group in opt.param_groups for p in group["params"]] for opt in optimizers
                ))
                for p0, p1 in pairs:
                    assert (p0.grad is None) == (p1.grad is None)
                    if p0.grad is not None:
                        mean = (p0.grad + p1.grad) / 2
                        p0.grad.copy_(mean)
                        p1.grad.copy_(mean)
            barrier.wait()  # the mean is in place on both
            return original(*args, **kwargs)

        return step

    for rank, gan in enumerate(gans):
        gan.opt_d.step = averaged([g.opt_d for g in gans], rank)
        gan.opt_g.step = averaged([g.opt_g for g in gans], rank)
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            for step in range(steps):
                gans[rank](*_batch(10 * step + rank))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [gan.nets.state_dict() for gan in gans]


def _alone(rank: int, steps: int) -> dict:
    """One process training on ``rank``'s data alone."""
    from arwgan.step import GANStep

    gan = GANStep(_tiny_model(), OptimConfig(), "fp32", CPU, seed=0)
    for step in range(steps):
        gan(*_batch(10 * step + rank))
    return gan.nets.state_dict()


def _parameters(state: dict) -> dict:
    stats = ("running_mean", "running_var", "num_batches_tracked")
    return {k: v for k, v in state.items() if not k.endswith(stats)}


def test_ddp_on_different_data_equals_one_process_averaging_the_two_gradients(
    tmp_path: Path,
) -> None:
    """Two ranks, each on its own data, for three steps: every rank's parameters equal
    those of one process that averages the two ranks' gradients before each update, and
    differ from training on either rank's data alone."""
    steps = 3
    run_two_forked_ranks(_averaging_worker, tmp_path, steps)
    by_hand = _parameters(_averaged_by_hand(steps)[0])
    for rank in range(2):
        ddp = _parameters(torch.load(tmp_path / f"rank{rank}.pt"))
        assert_same_tensors(ddp, by_hand, exact=False, atol=1e-6)
    for rank in range(2):
        alone = _parameters(_alone(rank, steps))
        gap = max((alone[k] - by_hand[k]).abs().max().item() for k in by_hand)
        assert gap > 1e-4, f"rank {rank} alone gives the averaged model"


def _observing_fit_worker(rank: int, cfg_dict: dict, out_dir: Path) -> None:
    """Train under the trainer and record each training step's cover images, encoder
    output and decoder input."""
    ctx = init_distributed("cpu")
    try:
        trainer = Trainer(TrainConfig.from_dict(cfg_dict), Console(file=io.StringIO()), ctx)
        seen: dict[str, list] = {"covers": [], "encoded": [], "decoded_from": []}

        def on_encoder(module, inputs, output):
            if module.training:
                seen["covers"].append(inputs[0].detach().clone())
                seen["encoded"].append(output.detach().clone())

        def on_decoder(module, inputs):
            if module.training:
                seen["decoded_from"].append(inputs[0].detach().clone())

        trainer.gan.nets.encoder.register_forward_hook(on_encoder)
        trainer.gan.nets.decoder.register_forward_pre_hook(on_decoder)
        from arwgan.step import GANStep

        call = GANStep.__call__
        seen["g_loss"] = []

        def recording_step(self, images, messages):  # this forked process's class only
            result = call(self, images, messages)
            seen["g_loss"].append(float(result.g_loss))
            return result

        GANStep.__call__ = recording_step
        seen["history"] = trainer.fit().history
        torch.save(seen, out_dir / f"seen{rank}.pt")
    finally:
        cleanup()


def test_ranks_train_on_disjoint_shards_with_their_own_noise(make_config, tmp_path: Path) -> None:
    """Under the trainer, no image reaches both ranks, and where both applied dropout in
    the same step (the layer choice is shared), their masks differ: each rank draws from
    its own noise stream. The logged epoch loss averages both ranks' steps."""
    steps = 6
    cfg = make_config(batch_size=4, steps_per_epoch=steps, val_images=8, noise="dropout(0.5,0.5)")
    run_two_forked_ranks(_observing_fit_worker, cfg.to_dict(), tmp_path)
    seen = [torch.load(tmp_path / f"seen{rank}.pt") for rank in range(2)]
    assert [len(s["covers"]) for s in seen] == [steps, steps]
    images = [torch.cat(s["covers"]).flatten(1) for s in seen]
    # Each pair (rank 0 image, rank 1 image) is a different picture.
    assert torch.cdist(images[0], images[1]).min() > 1e-3
    masks_compared = 0
    for step in range(steps):
        masks = []
        for s in seen:
            cover, encoded, got = s["covers"][step], s["encoded"][step], s["decoded_from"][step]
            if torch.equal(got, encoded):
                continue  # identity this step
            masks.append((got == encoded).all(dim=1) & (encoded != cover).any(dim=1))
        if len(masks) == 2:
            masks_compared += 1
            assert not torch.equal(masks[0], masks[1]), f"step {step}: the same dropout mask"
    assert masks_compared >= 1
    # The epoch's logged loss is the mean over both ranks' steps, on both ranks.
    per_rank = [sum(s["g_loss"]) / len(s["g_loss"]) for s in seen]
    for s in seen:
        assert s["history"][0]["train_g_loss"] == pytest.approx(sum(per_rank) / 2, abs=2e-6)


# -- the trainer ------------------------------------------------------------------------


def _fit_worker(rank: int, cfg_dict: dict, out_dir: Path) -> None:
    ctx = init_distributed("cpu")
    try:
        cfg = TrainConfig.from_dict(cfg_dict)
        console = Console(file=io.StringIO(), width=200)
        trainer = Trainer(cfg, console, ctx)
        result = trainer.fit()
        torch.save(
            {"nets": trainer.gan.nets.state_dict(), "console": console.file.getvalue(),
             "history": result.history},
            out_dir / f"rank{rank}.pt",
        )
        with pytest.raises(ConfigError, match="sync-bn needs CUDA"):
            Trainer(replace(cfg, sync_bn=True), console, ctx)
    finally:
        cleanup()


@pytest.mark.slow
def test_two_ranks_train_to_identical_models_and_only_rank_0_writes(
    make_config, tmp_path: Path
) -> None:
    cfg = make_config(batch_size=4, steps_per_epoch=3, val_images=8)
    run_two_ranks(_fit_worker, cfg.to_dict(), tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    # Validation (at the end of the epoch) gave every rank rank 0's BatchNorm statistics:
    # the whole state agrees.
    assert_same_tensors(ranks[0]["nets"], ranks[1]["nets"])
    text = ranks[0]["console"]
    assert "training on 2 processes (gloo, cpu)" in text
    assert "batch 4 per process (8 global)" in text
    assert ranks[1]["console"] == ""  # only rank 0 prints
    # Losses and metrics were reduced over ranks: both ranks hold the same row (timings
    # and memory are each rank's own).
    own = ("images_per_s", "data_wait_fraction", "peak_memory_bytes", *TELEMETRY_COLUMNS)
    rows = [{k: v for k, v in r["history"][0].items() if k not in own} for r in ranks]
    assert rows[0] == rows[1]
    row = ranks[0]["history"][0]
    assert row["step"] == 3 and 0 <= row["val_bitacc_identity"] <= 1
    checkpoint = load_checkpoint(Path(cfg.out_dir) / CHECKPOINT_NAME)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng_ranks"]) == 2
    assert_same_tensors(checkpoint["gan"]["nets"], ranks[0]["nets"])
    with (Path(cfg.out_dir) / "log.csv").open() as fh:
        assert len(fh.read().strip().splitlines()) == 2  # one header, one row


def _interrupt_worker(rank: int, cfg_dict: dict, stop_rank: int, stop_after: int) -> None:
    """Train; ``stop_rank`` alone gets a Ctrl-C after ``stop_after`` steps."""
    from arwgan.step import GANStep

    ctx = init_distributed("cpu")
    try:
        trainer = Trainer(TrainConfig.from_dict(cfg_dict), Console(file=io.StringIO()), ctx)
        call = GANStep.__call__

        def step_then_maybe_stop(self, images, messages):
            result = call(self, images, messages)
            if rank == stop_rank and self.step_count == stop_after:
                trainer.stop_requested = True
            return result

        GANStep.__call__ = step_then_maybe_stop
        with pytest.raises(Interrupted):
            trainer.fit()
        assert trainer.gan.step_count == stop_after  # both ranks stopped at the same step
    finally:
        cleanup()


def _resume_worker(rank: int, cfg_dict: dict, resume: Path | None) -> None:
    ctx = init_distributed("cpu")
    try:
        trainer = Trainer(TrainConfig.from_dict(cfg_dict), Console(file=io.StringIO()), ctx)
        if resume is not None:
            trainer.resume(resume)
        trainer.fit()
    finally:
        cleanup()


@pytest.mark.slow
def test_two_ranks_resume_mid_epoch_like_an_uninterrupted_run(make_config, tmp_path: Path) -> None:
    """Rank 1 alone is interrupted mid-epoch; both ranks stop at that step, rank 0 saves;
    resuming both (each from the same file) ends exactly where an uninterrupted run does:
    the sampler skips the items all ranks consumed (epoch_step x batch x world size)."""
    kwargs = dict(batch_size=4, epochs=2, steps_per_epoch=3, val_images=8)
    straight = make_config(out_dir=tmp_path / "straight", **kwargs)
    resumed = make_config(out_dir=tmp_path / "resumed", **kwargs)
    run_two_ranks(_resume_worker, straight.to_dict(), None)
    run_two_ranks(_interrupt_worker, resumed.to_dict(), 1, 4)
    checkpoint = tmp_path / "resumed" / CHECKPOINT_NAME
    state = load_checkpoint(checkpoint)
    assert (state["epoch"], state["epoch_step"]) == (1, 1)
    # Its position counts global batches of 8: one process cannot continue it.
    with pytest.raises(CheckpointError, match="mid-epoch by 2 process"):
        Trainer(resumed, Console(file=io.StringIO())).resume(checkpoint)
    run_two_ranks(_resume_worker, resumed.to_dict(), checkpoint)
    a = load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)
    b = load_checkpoint(checkpoint)
    a["config"].pop("out_dir")
    b["config"].pop("out_dir")
    assert_same_checkpoint(a, b)


# -- SyncBatchNorm: needs CUDA (torch has no CPU kernels for it) -----------------------


def _sync_bn_worker(rank: int, cfg_dict: dict, out_dir: Path) -> None:
    # Both ranks share the one GPU of the test machine, so the group is gloo (NCCL
    # refuses two ranks on one device) and the context is built by hand.
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    ctx = DistContext(rank=rank, local_rank=rank, world_size=2, local_world_size=2,
                      backend="gloo", device=device)
    try:
        # cuDNN flags are per process: set here, in the spawned worker, not in the parent.
        # Deterministic algorithms and no benchmark (the trainer leaves benchmark off when
        # deterministic is set), so both ranks and the single process run the same kernels.
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
            trainer = Trainer(TrainConfig.from_dict(cfg_dict), Console(file=io.StringIO()), ctx)
            trainer.fit()
        if rank == 0:
            torch.save({k: v.cpu() for k, v in trainer.gan.nets.state_dict().items()},
                       out_dir / "ddp.pt")
    finally:
        cleanup()


@pytest.mark.gpu
@pytest.mark.slow
def test_sync_bn_two_ranks_match_one_process_over_the_global_batch(make_config, tmp_path: Path) -> None:
    """SyncBatchNorm normalises over both ranks' 4 images, and DDP averages the two
    ranks' mean losses: the step equals one process's over the 8 images (rank 0 gets
    items 0, 2, 4, 6 of the epoch's order, rank 1 the odd ones) at the same lr."""
    common = dict(device="cuda", steps_per_epoch=3, val_images=8)
    ddp_cfg = make_config(out_dir=tmp_path / "ddp", batch_size=4, sync_bn=True, **common)
    run_two_ranks(_sync_bn_worker, ddp_cfg.to_dict(), tmp_path)
    single_cfg = make_config(out_dir=tmp_path / "single", batch_size=8, **common)
    # The same flags as in the workers, restored afterwards (they used to leak into later tests).
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        trainer = Trainer(single_cfg, Console(file=io.StringIO()))
        trainer.fit()
    single = {k: v.cpu() for k, v in trainer.gan.nets.state_dict().items()}
    ddp = torch.load(tmp_path / "ddp.pt")
    params = [k for k in single if not k.endswith("num_batches_tracked")]
    # Float sums in another order: close, not bit-equal. Adam divides each gradient by
    # its own magnitude, so a near-zero gradient whose sign flips with the summation
    # order moves its weight by a whole step (lr 1e-3) the other way: a few elements may
    # differ by up to 2 x lr x steps. An unsynchronised BatchNorm is off by about one
    # Adam step in most elements; so at most 1 % of each tensor may differ by > 2e-4.
    for key in params:
        diff = (ddp[key].float() - single[key].float()).abs()
        assert diff.max() <= 2 * 1e-3 * 3 + 1e-6, key
        assert (diff > 2e-4).float().mean() <= 0.01, (key, (diff > 2e-4).float().mean())


# -- the tuner under two ranks ----------------------------------------------------------

#: Fake memory per image of the fake trials; each rank's target fits a different batch.
BYTES_PER_IMAGE = 10 * 2**20


def _tune_worker(rank: int, data_dir: Path, out_dir: Path, batch_limits: tuple[int, int]) -> None:
    """arwgan-autotune on two ranks whose (fake) memory fits batch_limits[rank]."""
    from arwgan.autotune_cli import app as tune_app
    from autotune.trial import TrialMeasurement
    from autotune.tuner import Tuner

    def fake_trial(self, batch, precision):
        measurement = TrialMeasurement(
            batch=batch, ok=True, reason="ok", peak_bytes=batch * BYTES_PER_IMAGE,
            images_per_s=50.0 * batch, seconds=0.01,
        )
        self.trials_run.append(measurement)
        return measurement

    def fake_target(self):
        # The search's limit is 97 % of the target: it falls half an image above the limit.
        return int((batch_limits[rank] + 0.5) * BYTES_PER_IMAGE / (1 - self.cfg.margin_fraction))

    def fake_compare(self, recommended, *args, **kwargs):
        # Each rank's own end-to-end figures; rank 1 is the slower one.
        speed = 100.0 - 40 * rank
        return {"seed_default_images_per_s": speed, "recommended_images_per_s": 2 * speed,
                "speedup": 2.0, "rounds": {"seed_default": [speed], "recommended": [2 * speed]}}

    Tuner.trial = fake_trial
    Tuner.target_bytes = fake_target
    Tuner.compare = fake_compare
    result = CliRunner().invoke(tune_app, [
        *MODEL_FLAGS, "--device", "cpu", "--data-dir", str(data_dir), "--precision", "fp32",
        "--objective", "memory",
        "--max-workers", "0", "--compare-steps", "2", "--out", str(out_dir / "tuned.json"),
    ])
    (out_dir / f"rank{rank}.json").write_text(
        json.dumps({"code": result.exit_code, "stderr": result.stderr, "output": result.output})
    )


@pytest.mark.slow
def test_ranks_agree_on_the_smallest_batch_and_the_file_names_the_limiting_rank(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    from arwgan.cli import app as train_app
    from autotune.tuned import load_tuned

    run_two_ranks(_tune_worker, tiny_data_dir, tmp_path, (16, 12))
    outputs = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [o["code"] for o in outputs] == [0, 0], outputs
    tuned = load_tuned(tmp_path / "tuned.json")
    choice, m = tuned.choice, tuned.measurements
    assert (choice.batch_size, choice.world_size) == (12, 2)
    assert choice.learning_rates["lr_g"] == pytest.approx(1e-3 * 24 / 16)  # linear, global batch 2 x 12
    assert (m["world_size"], m["global_batch"], m["limiting_rank"]) == (2, 24, 1)
    assert [r["chosen_batch"] for r in m["ranks"]] == [16, 12]
    assert [r["peak_bytes"] for r in m["ranks"]] == [16 * BYTES_PER_IMAGE, 12 * BYTES_PER_IMAGE]
    # Rank 0 never tried 12 during its own search: one verifying trial did.
    rank0_trials = m["search"]["trials"]
    assert rank0_trials[-1]["batch"] == 12 and rank0_trials[-1]["ok"]
    assert "rank 1 limited it" in m["search"]["stop_reason"]
    assert m["comparison"]["recommended_images_per_s"] == 120.0  # the slower rank's
    assert [r["comparison"]["recommended_images_per_s"] for r in m["ranks"]] == [200.0, 120.0]
    assert "Ranks" in outputs[0]["stderr"] and "limiting" in outputs[0]["stderr"]
    assert "Recommendation" not in outputs[1]["stderr"]  # rank 1 prints nothing

    # Trained in one process, the tuned rates are rescaled to the global batch of 12.
    out = tmp_path / "train"
    result = CliRunner().invoke(train_app, [
        "--from-tuned", str(tmp_path / "tuned.json"), "--data-dir", str(tiny_data_dir),
        "--epochs", "1", "--steps-per-epoch", "1", "--val-images", "8", "--device", "cpu",
        "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert "tuned for world size 2, running with 1: global batch 24 -> 12" in result.stderr
    saved = load_checkpoint(out / CHECKPOINT_NAME)["config"]
    assert saved["optim"]["lr_g"] == pytest.approx(1e-3 * 12 / 16)
    assert (saved["lr_rule"], saved["lr_world_size"]) == ("linear", 1)


# -- torchrun itself --------------------------------------------------------------------


def _torchrun(args: list[str], cwd: Path, script: list[str] | None = None,
              collective_timeout_s: int = 120):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        *(script or ["-m", "arwgan.cli"]), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ARWGAN_DIST_TIMEOUT_S": str(collective_timeout_s)}
    # The limit only turns a hang into a failure; no test measures how long a job takes.
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _tuned_file(path: Path) -> Path:
    """A tuned file made for one process: batch 4, lr 2.5e-4 (linear from 1e-3 at 16)."""
    from autotune.tuned import SCHEMA_VERSION, TunedChoice, TunedFile, save_tuned

    model = _tiny_model()
    choice = TunedChoice(
        batch_size=4, num_workers=0, pin_memory=False, persistent_workers=False,
        prefetch_factor=None, precision="fp32", learning_rates={"lr_g": 2.5e-4, "lr_d": 2.5e-4}, warmup_steps=0,
        lr_rule="linear", objective="throughput", world_size=1,
    )
    save_tuned(path, TunedFile(
        schema_version=SCHEMA_VERSION, created_utc="2025-01-01T00:00:00+00:00",
        device={"device_type": "cpu"}, model=model.to_dict(),
        model_fingerprint=model.fingerprint(), choice=choice, measurements={},
        tool_version="test", workload=dict(ARWGAN_RECORD),
    ))
    return path


@pytest.mark.slow
def test_torchrun_trains_from_a_tuned_file_with_rescaled_learning_rates(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    tuned = _tuned_file(tmp_path / "tuned.json")
    out = tmp_path / "run"
    proc = _torchrun(
        ["--from-tuned", str(tuned), "--data-dir", str(tiny_data_dir), "--epochs", "1",
         "--steps-per-epoch", "2", "--val-images", "8", "--device", "cpu", "--out", str(out)],
        cwd=tmp_path,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    # Rank 0 alone speaks: each line once.
    assert text.count("tuned for world size 1, running with 2: global batch 4 -> 8") == 1, text
    assert text.count("training on 2 processes (gloo, cpu)") == 1, text
    assert text.count("done: 1 epoch(s)") == 1, text
    state = load_checkpoint(out / CHECKPOINT_NAME)
    assert state["world_size"] == 2 and state["gan"]["step_count"] == 2
    assert state["config"]["optim"]["lr_g"] == pytest.approx(5e-4)
    assert (state["config"]["lr_rule"], state["config"]["lr_world_size"]) == ("linear", 2)


@pytest.mark.slow
def test_a_failing_rank_stops_the_whole_job_with_its_error(tiny_data_dir: Path, tmp_path: Path) -> None:
    """Rank 1 raises in its second step while rank 0 waits for it in DDP's all-reduce:
    torchrun ends the job and reports rank 1's exception. The collectives' timeout is
    set far beyond the subprocess's limit, so the job can only end because torchrun
    stopped rank 0, never because rank 0's all-reduce gave up waiting."""
    wrapper = tmp_path / "train_failing_rank.py"
    wrapper.write_text(textwrap.dedent("""
        import os

        import arwgan.step

        call = arwgan.step.GANStep.__call__

        def fail_on_rank_1(self, images, messages):
            if os.environ["RANK"] == "1" and self.step_count == 1:
                raise RuntimeError("injected failure on rank 1")
            return call(self, images, messages)

        arwgan.step.GANStep.__call__ = fail_on_rank_1

        from arwgan.cli import main

        main()
    """))
    proc = _torchrun(
        ["--data-dir", str(tiny_data_dir), *TINY_FLAGS, "--batch", "4", "--epochs", "1",
         "--steps-per-epoch", "4", "--out", str(tmp_path / "run")],
        cwd=tmp_path, script=[str(wrapper)], collective_timeout_s=24 * 3600,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "injected failure on rank 1" in text, text



def test_train_flags_for_data_parallel_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import arwgan.trainer
    from arwgan.cli import app as train_app

    seen = {}

    class Done:
        epochs_done = 1
        out_dir = tmp_path

    def fake_fit(cfg, resume=None, console=None):
        seen["cfg"] = cfg
        return Done()

    monkeypatch.setattr(arwgan.trainer, "fit", fake_fit)
    monkeypatch.chdir(tmp_path)  # the default --out, runs/train, is checked and created
    result = CliRunner().invoke(train_app, ["--device", "cpu", "--lr-rule", "sqrt", "--sync-bn"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.lr_rule, cfg.lr_world_size, cfg.sync_bn) == ("sqrt", 1, True)
    result = CliRunner().invoke(train_app, ["--device", "cpu", "--lr-rule", "cubic"])
    assert result.exit_code == 2
    assert "'cubic' is not one of 'linear', 'sqrt', 'none'" in result.stderr  # refused while parsing
