"""CUDA-only checks (marker ``gpu``): run by benchmarks/gpu_check.sh on a GPU machine."""

from __future__ import annotations

import gc

import pytest
import torch

from arwgan.config import ModelConfig, OptimConfig
from arwgan.step import GANStep
from autotune.search import SearchConfig, search_batch
from autotune.trial import TrialSpec, run_trial

pytestmark = pytest.mark.gpu
MODEL = ModelConfig(image_size=64, message_bits=30, channels=32)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_train_step_runs_in_each_precision(precision: str) -> None:
    gan = GANStep(MODEL, OptimConfig(), precision, torch.device("cuda"))
    images = torch.rand(8, 3, 64, 64, device="cuda") * 2 - 1
    messages = torch.randint(0, 2, (8, 30), device="cuda").float()
    for _ in range(3):
        result = gan(images, messages)
    assert torch.isfinite(result.g_loss) and torch.isfinite(result.d_loss)


def test_oom_trials_leave_memory_at_its_pre_search_level() -> None:
    """A search capped far below what large batches need must hit OOM, clean up after it,
    and leave the process's reserved memory where it started."""
    device = torch.device("cuda")
    torch.zeros(1, device=device)
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved(device)
    total = torch.cuda.mem_get_info(device)[1]
    target = 2 * 2**30
    torch.cuda.set_per_process_memory_fraction(target / total, device)
    outcomes = []
    try:
        def trial(batch: int):
            m = run_trial(TrialSpec(model=MODEL.to_dict(), precision="fp32", device="cuda",
                                    batch=batch, warmup_steps=1, measure_steps=1))
            outcomes.append(m)
            return m.to_outcome()

        result = search_batch(trial, SearchConfig(target_bytes=target, start=2, max_batch=4096))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    assert any(m.reason == "oom" for m in outcomes), [(m.batch, m.reason) for m in outcomes]
    assert result.chosen >= 2
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved(device) <= before + 2 * 2**20
