"""Pure decisions: OOM recognition, memory amounts, LR scaling, workers, precision."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from arwgan.errors import ConfigError
from autotune.decisions import (
    LR_RULES,
    PrecisionMeasurement,
    WorkerMeasurement,
    choose_precision,
    choose_workers,
    lr_factor,
    lr_warning,
    scale_lr,
    warmup_steps_for,
)
from autotune.memory import format_bytes, parse_target_mem
from autotune.oom import is_oom

GiB = 2**30
MiB = 2**20


# Nothing here may pull in torch or NVML ---------------------------------------------------------

def test_modules_import_neither_torch_nor_nvml():
    code = (
        "import sys\n"
        "import autotune, autotune.oom, autotune.memory, autotune.search, autotune.decisions\n"
        "heavy = sorted(m for m in ('torch', 'pynvml') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# is_oom -----------------------------------------------------------------------------------------

OutOfMemoryError = type("OutOfMemoryError", (RuntimeError,), {})  # like torch.OutOfMemoryError
SubclassedOOM = type("SubclassedOOM", (OutOfMemoryError,), {})
AcceleratorError = type("AcceleratorError", (RuntimeError,), {})  # torch >= 2.8 CUDA errors


def chained(outer: BaseException, inner: BaseException, attribute: str) -> BaseException:
    setattr(outer, attribute, inner)
    return outer


@pytest.mark.parametrize(
    "exc",
    [
        OutOfMemoryError("whatever the text"),
        SubclassedOOM(),
        MemoryError(),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity; "
                     "70.00 GiB already allocated; 1.00 GiB free)"),
        RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
        AcceleratorError("CUDA error: out of memory"),
        RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in "
                     "a non-contiguous input."),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:114] . DefaultCPUAllocator: can't allocate memory: "
                     "you tried to allocate 123456 bytes. Error code 12 (Cannot allocate memory)"),
        RuntimeError("HIP out of memory. Tried to allocate 20.00 MiB"),
        RuntimeError("XPU out of memory. Tried to allocate 20.00 MiB"),
        RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 GB)"),
        RuntimeError("FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed"),
        chained(ValueError("trial failed"), OutOfMemoryError(), "__cause__"),
        chained(RuntimeError("while cleaning up"), RuntimeError("CUDA out of memory."), "__context__"),
    ],
    ids=lambda e: f"{type(e).__name__}:{str(e)[:30]}",
)
def test_is_oom_true(exc):
    assert is_oom(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad value"),
        ValueError("CUDA out of memory"),  # not what torch raises: a message, not an OOM
        TypeError("expected Tensor"),
        RuntimeError("CUDA error: device-side assert triggered"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x5)"),
        RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
        KeyboardInterrupt(),
        chained(ValueError("a"), KeyError("b"), "__cause__"),
        # two levels down is not followed
        chained(ValueError("a"), chained(ValueError("b"), MemoryError(), "__cause__"), "__cause__"),
    ],
    ids=lambda e: f"{type(e).__name__}:{str(e)[:30]}",
)
def test_is_oom_false(exc):
    assert not is_oom(exc)


def test_is_oom_follows_a_really_raised_chain():
    with pytest.raises(RuntimeError) as info:
        try:
            raise MemoryError
        except MemoryError as oom:
            raise RuntimeError("trial at batch 64 failed") from oom
    assert is_oom(info.value)


# parse_target_mem / format_bytes ---------------------------------------------------------------

@pytest.mark.parametrize(
    "text,total,expected",
    [
        ("20GB", None, 20_000_000_000),
        ("20GiB", None, 20 * GiB),
        ("20000MB", None, 20_000_000_000),
        ("512MiB", None, 512 * MiB),
        ("1.5GB", None, 1_500_000_000),
        ("0.1GB", None, 100_000_000),
        (".5GiB", None, GiB // 2),
        ("20 gb", None, 20_000_000_000),
        ("  20gib  ", None, 20 * GiB),
        ("2048B", None, 2048),
        ("1K", None, 1000),
        ("1kb", None, 1000),
        ("1KiB", None, 1024),
        ("3M", None, 3_000_000),
        ("3MB", None, 3_000_000),
        ("3MiB", None, 3 * MiB),
        ("2G", None, 2_000_000_000),
        ("2Gi", None, 2 * GiB),
        ("1T", None, 10**12),
        ("1TB", None, 10**12),
        ("1TiB", None, 2**40),
        ("80%", 80 * GiB, 64 * GiB),
        ("100 %", 80 * GiB, 80 * GiB),
        ("12.5%", 80 * GiB, 10 * GiB),
        ("80GiB", 80 * GiB, 80 * GiB),
    ],
)
def test_parse_target_mem(text, total, expected):
    assert parse_target_mem(text, total) == expected


@pytest.mark.parametrize(
    "text,total,used,message",
    [
        ("abc", None, 0, "cannot read target memory 'abc'"),
        ("", None, 0, "cannot read target memory ''"),
        ("GB", None, 0, "cannot read target memory 'GB'"),
        ("1.2.3GB", None, 0, "cannot read"),
        ("nan GB", None, 0, "cannot read"),
        ("20 GB extra", None, 0, "cannot read"),
        ("20XB", None, 0, "target memory '20XB' has an unknown unit 'XB'"),
        ("2048", None, 0, "target memory '2048' has no unit"),
        ("0GB", None, 0, "target memory '0GB' must be positive"),
        ("-5GB", None, 0, "target memory '-5GB' must be positive"),
        ("0%", 80 * GiB, 0, "target memory '0%' must be positive"),
        ("150%", 80 * GiB, 0, r"target memory '150%' must be a percentage in \(0, 100\]"),
        ("80%", None, 0, "target memory '80%' is a percentage but the device's total memory is unknown"),
        ("0.5B", None, 0, "target memory '0.5B' is less than one byte"),
        ("100GB", 80 * GiB, 0, r"target memory '100GB' \(93.1 GiB\) is more than the device's 80 GiB"),
        ("4GiB", 80 * GiB, 5 * GiB,
         r"target memory '4GiB' \(4 GiB\) is at or below the 5 GiB already in use on the device"),
        ("5GiB", 80 * GiB, 5 * GiB, r"target memory '5GiB' \(5 GiB\) is at or below the 5 GiB already"),
    ],
)
def test_parse_target_mem_rejects(text, total, used, message):
    with pytest.raises(ConfigError, match=f"^{message}") as info:
        parse_target_mem(text, total, used)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "n,text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1_234_567, "1.18 MiB"),
        (512 * MiB, "512 MiB"),
        (int(19.5 * GiB), "19.5 GiB"),
        (int(1.5 * GiB), "1.5 GiB"),
        (10**12, "931 GiB"),
        (int(1023.7 * MiB), "1 GiB"),  # not '1024 MiB'
        (2**40, "1 TiB"),
        (-2 * GiB, "-2 GiB"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


# learning rate ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "rule,batch,expected",
    [
        ("linear", 64, 4e-3),
        ("linear", 4, 2.5e-4),
        ("linear", 16, 1e-3),
        ("sqrt", 64, 2e-3),
        ("sqrt", 4, 5e-4),
        ("none", 64, 1e-3),
    ],
)
def test_scale_lr(rule, batch, expected):
    assert scale_lr(1e-3, 16, batch, rule) == pytest.approx(expected)


@pytest.mark.parametrize(
    "args,message",
    [
        ((1e-3, 16, 64, "cosine"),
         "learning-rate rule must be one of linear, sqrt, none, adascale, got 'cosine'"),
        ((0.0, 16, 64, "linear"), "base learning rate"),
        ((float("inf"), 16, 64, "linear"), "base learning rate"),
        ((1e-3, 0, 64, "linear"), "base batch"),
        ((1e-3, 16, 0, "linear"), "batch must be"),
    ],
)
def test_scale_lr_rejects(args, message):
    with pytest.raises(ConfigError, match=message):
        scale_lr(*args)


def test_lr_rules_and_factor():
    assert LR_RULES == ("linear", "sqrt", "none", "adascale")
    assert lr_factor("sqrt", 64) == 8.0
    with pytest.raises(ConfigError):
        lr_factor("exp", 2)


def test_lr_warning_threshold():
    assert lr_warning(1.0) is None
    assert lr_warning(8.0) is None
    text = lr_warning(8.5)
    assert text is not None and text.startswith("learning rate scaled x8.5 (more than x8 the reference)")


@pytest.mark.parametrize(
    "rule,batch_factor,steps",
    [
        ("linear", 0.5, 0),
        ("linear", 1.0, 0),
        ("linear", 1.5, 150),
        ("linear", 4.0, 400),
        ("sqrt", 4.0, 200),
        ("none", 64.0, 0),
        ("linear", 20.0, 2000),
        ("linear", 64.0, 2000),
    ],
)
def test_warmup_steps_for(rule, batch_factor, steps):
    assert warmup_steps_for(rule, batch_factor) == steps


def test_warmup_rejects_unknown_rule():
    with pytest.raises(ConfigError):
        warmup_steps_for("cosine", 2.0)


# DataLoader workers --------------------------------------------------------------------------------

W = WorkerMeasurement
LOADER_ALONE = [W(8, 2, 1400.0), W(4, 4, 1300.0), W(0, None, 300.0), W(4, 2, 1250.0), W(2, 2, 900.0)]


def test_workers_gpu_fewest_that_keep_up_smaller_prefetch_on_ties():
    # 1.2 * 1000 = 1200 needed: workers 4 with prefetch 2 and 4 both deliver; prefetch 2 wins.
    assert choose_workers(LOADER_ALONE, 1000.0) == W(4, 2, 1250.0)


def test_workers_gpu_headroom_is_inclusive_and_adjustable():
    assert choose_workers(LOADER_ALONE, 1250.0, headroom=1.0) == W(4, 2, 1250.0)
    assert choose_workers(LOADER_ALONE, 250.0) == W(0, None, 300.0)


def test_workers_gpu_none_keeps_up_takes_fastest_fewest_on_ties():
    measurements = [*LOADER_ALONE, W(16, 2, 1400.0)]
    assert choose_workers(measurements, 2000.0) == W(8, 2, 1400.0)


def test_workers_cpu_fewest_within_tolerance_of_best():
    end_to_end = [W(8, 2, 990.0), W(0, None, 500.0), W(4, 2, 1000.0), W(2, 2, 980.0), W(1, 2, 800.0)]
    assert choose_workers(end_to_end, None) == W(2, 2, 980.0)  # 980 >= 0.97 * 1000
    assert choose_workers(end_to_end, None, tolerance=0.0) == W(4, 2, 1000.0)


def test_workers_cpu_ties():
    end_to_end = [W(2, 4, 1000.0), W(2, 2, 1000.0), W(4, 2, 1000.0)]
    assert choose_workers(end_to_end, None) == W(2, 2, 1000.0)


def test_workers_rejects():
    with pytest.raises(ValueError, match="no DataLoader measurement"):
        choose_workers([], 100.0)
    with pytest.raises(ValueError, match="consumption"):
        choose_workers(LOADER_ALONE, 0.0)


# precision -------------------------------------------------------------------------------------

P = PrecisionMeasurement


def test_precision_fastest_finite_wins():
    measured = [P("fp32", 100.0, 10 * GiB, True), P("bf16", 180.0, 8 * GiB, True),
                P("fp16", 300.0, 7 * GiB, False)]
    assert choose_precision(measured).precision == "bf16"


def test_precision_less_memory_wins_within_tolerance():
    measured = [P("fp32", 100.0, 10 * GiB, True), P("bf16", 200.0, 8 * GiB, True),
                P("fp16", 198.0, 7 * GiB, True)]
    assert choose_precision(measured).precision == "fp16"
    assert choose_precision(measured, tolerance=0.0).precision == "bf16"


def test_precision_memory_does_not_buy_more_than_tolerance():
    measured = [P("bf16", 200.0, 8 * GiB, True), P("fp16", 190.0, 7 * GiB, True)]
    assert choose_precision(measured).precision == "bf16"


def test_precision_lowest_peak_among_near_ties():
    measured = [P("a", 200.0, 8 * GiB, True), P("b", 199.0, 7 * GiB, True),
                P("c", 195.0, 6 * GiB, True), P("d", 196.0, 6 * GiB, True)]
    assert choose_precision(measured).precision == "d"


def test_precision_unknown_peaks_keep_the_fastest():
    fastest_unknown = [P("bf16", 200.0, None, True), P("fp16", 199.0, 7 * GiB, True)]
    assert choose_precision(fastest_unknown).precision == "bf16"
    other_unknown = [P("bf16", 200.0, 8 * GiB, True), P("fp16", 199.0, None, True)]
    assert choose_precision(other_unknown).precision == "bf16"


def test_precision_all_failed_lists_reasons():
    measured = [P("fp32", None, None, True),
                P("bf16", None, None, True, "bf16 not supported on this GPU"),
                P("fp16", 300.0, 7 * GiB, False)]
    with pytest.raises(ValueError) as info:
        choose_precision(measured)
    assert str(info.value) == (
        "no usable precision (fp32: no speed measured; bf16: bf16 not supported on this GPU; "
        "fp16: non-finite loss)"
    )
    with pytest.raises(ValueError, match="nothing measured"):
        choose_precision([])


def test_adascale_rule_is_the_square_root_of_the_gain():
    # B_noise 48, B0 16, B 64: gain r = 4 (48 + 16) / (48 + 64) = 16/7; Adam takes r ** 0.5.
    assert scale_lr(1e-3, 16, 64, "adascale", noise_scale=48.0) == pytest.approx(1e-3 * (16 / 7) ** 0.5)
    assert scale_lr(1e-3, 16, 16, "adascale", noise_scale=48.0) == pytest.approx(1e-3)
    # Noise scale 0: each step is worth one reference step, whatever the batch.
    assert scale_lr(1e-3, 16, 64, "adascale", noise_scale=0.0) == pytest.approx(1e-3)
    # Warm-up follows the multiplier: 100 x (16/7) ** 0.5 = 151 steps.
    assert warmup_steps_for("adascale", 4.0, 48.0 / 16) == 151


def test_adascale_gain_chains_exactly():
    """Rescaling a rescaled rate (the trainer under another world size) equals scaling
    from the reference at once."""
    via = scale_lr(scale_lr(1e-3, 16, 64, "adascale", 30.0), 64, 256, "adascale", 30.0)
    assert via == pytest.approx(scale_lr(1e-3, 16, 256, "adascale", 30.0))


def test_adascale_without_a_noise_scale_is_refused():
    with pytest.raises(ConfigError, match="noise scale"):
        scale_lr(1e-3, 16, 64, "adascale")
