"""The tuner's wiring of the faster-tuner pieces (trial server, adaptive timing, past-the-
peak stop, knobs) and of goodput (noise phase, goodput choice, adascale, tables).

Fake trials where the measurement is not the point; a tiny real model on the CPU where
it is (the noise phase, the knobs, one adaptive trial)."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pytest

from helpers import ARWGAN_RECORD, arwgan_ref
import torch
from rich.console import Console

from arwgan.config import ModelConfig, TrainConfig
from arwgan.errors import ConfigError
from autotune.probes import FakeHostProbe, FakeNvmlProbe, FakeTorchCudaProbe, HostInfo, Probes
from autotune.timing import STOPS, TimingConfig
from autotune.trial import TrialMeasurement, TrialSpec, run_trial
from autotune.workload import LoaderSettings
from arwgan.tuning import TuneConfig, Tuner
from arwgan.workload import REFERENCE_BATCH

TINY = ModelConfig(image_size=16, message_bits=4, channels=8, noise="")
FAST_TIMING = TimingConfig(min_samples=2, max_samples=2, min_seconds=0.0, warmup_steps=1)
HOST = HostInfo(usable_cores=2, logical_cores=2, physical_cores=2, ram_total_bytes=24 * 2**30,
                ram_available_bytes=20 * 2**30, cpu_name="fake")


def cpu_tuner(data_dir: Path, **overrides) -> Tuner:
    probes = Probes(nvml=FakeNvmlProbe([]), cuda=FakeTorchCudaProbe(total_bytes=0),
                    host=FakeHostProbe(HOST))
    cfg = dict(model=TINY, data_dir=str(data_dir), device="cpu", target_mem="8GB",
               timing=FAST_TIMING, noise_steps=2, worker_steps=2, measure_images=8)
    cfg.update(overrides)
    tuner = Tuner(TuneConfig(**cfg), probes=probes)
    tuner.probe()
    tuner.target = tuner.target_bytes()
    return tuner


def fake_curve(tuner: Tuner, rates: dict[int, float], rel_ci: float = 0.01,
               seconds=lambda batch: 0.1) -> list[int]:
    """Replace the tuner's trials by a throughput curve (each trial taking
    ``seconds(batch)``); returns the batches tried."""
    tried = []

    def trial(batch: int, precision: str) -> TrialMeasurement:
        tried.append(batch)
        return TrialMeasurement(batch=batch, ok=True, reason="ok", peak_bytes=2**20 * batch,
                                images_per_s=rates[batch], seconds=seconds(batch),
                                images_per_s_rel_ci=rel_ci, timing_stop="converged")

    tuner.trial = trial
    return tried


# -- defaults ------------------------------------------------------------------------------------
def test_goodput_is_the_default_objective_with_the_adascale_rule():
    cfg = TuneConfig()
    assert (cfg.objective, cfg.lr_rule) == ("goodput", "adascale")
    assert TuneConfig(objective="throughput").lr_rule == "linear"


@pytest.mark.parametrize(("kwargs", "fragment"), [
    (dict(objective="throughput", lr_rule="adascale"), "needs --objective goodput"),
    (dict(objective="memory", from_checkpoint="x.pt"), "needs --objective goodput"),
    (dict(objective="speed"), "goodput, throughput, memory"),
    (dict(noise_steps=0), "noise steps"),
])
def test_config_refuses_combinations_that_cannot_work(kwargs, fragment):
    from arwgan.errors import ConfigError

    with pytest.raises(ConfigError, match=fragment):
        TuneConfig(**kwargs)


# -- trial server and adaptive timing ---------------------------------------------------------------
class FakeServer:
    started = 0
    closed = 0

    def __init__(self, preload):
        self.preload = preload

    def start(self):
        FakeServer.started += 1
        return self

    def close(self):
        FakeServer.closed += 1


def test_cpu_trials_share_one_preimported_server_closed_with_the_tuner(tiny_data_dir, monkeypatch):
    FakeServer.started = FakeServer.closed = 0
    calls = []

    def preimported(spec, timeout_s=None, server=None):
        calls.append((spec.batch, server))
        return TrialMeasurement(batch=spec.batch, ok=True, reason="ok", peak_bytes=1,
                                images_per_s=1.0)

    monkeypatch.setattr("autotune.tuner.TrialServer", FakeServer)
    monkeypatch.setattr("autotune.tuner.run_trial_preimported", preimported)
    tuner = cpu_tuner(tiny_data_dir)
    tuner.trial(2, "fp32")
    tuner.trial(4, "fp32")
    assert FakeServer.started == 1 and calls[0][1] is calls[1][1]
    assert calls[0][1].preload == ("torch", "autotune.trial", "autotune.workload", "arwgan.workload",
                                      "arwgan.step")
    tuner.close()
    assert FakeServer.closed == 1


def test_the_server_is_closed_when_the_run_fails(tiny_data_dir, monkeypatch):
    FakeServer.started = FakeServer.closed = 0
    monkeypatch.setattr("autotune.tuner.TrialServer", FakeServer)
    tuner = cpu_tuner(tiny_data_dir)

    def broken():
        tuner._server()
        raise RuntimeError("mid-run failure")

    tuner._run = broken
    with pytest.raises(RuntimeError, match="mid-run"):
        tuner.run()
    assert (FakeServer.started, FakeServer.closed) == (1, 1)


def test_a_trial_is_timed_adaptively_and_records_its_interval():
    spec = TrialSpec(workload=arwgan_ref(TINY), precision="fp32", device="cpu", batch=4,
                     timing=dict(min_samples=3, max_samples=3, min_seconds=0.0, warmup_steps=1))
    m = run_trial(spec)
    assert m.ok and m.images_per_s > 0
    assert m.images_per_s_rel_ci is not None and m.images_per_s_rel_ci >= 0
    assert m.timing_stop in STOPS
    assert m.to_outcome().images_per_s_rel_ci == m.images_per_s_rel_ci


# -- the stop past the peak and --find-edge -----------------------------------------------------------
PEAKED = {2: 10.0, 4: 20.0, 8: 40.0, 16: 64.0, 32: 50.0, 64: 40.0, 128: 30.0, 256: 20.0,
          512: 10.0, 1024: 5.0, 2048: 2.0, 4096: 1.0}


def test_throughput_search_stops_past_the_peak_and_says_so(tiny_data_dir):
    # Under throughput the search starts at the reference batch (16), not at 2, once the
    # precision phase has run it under the target.
    tuner = cpu_tuner(tiny_data_dir, objective="throughput")
    tuner.trials_run = [_rated(REFERENCE_BATCH, 64.0, "fp32")]
    tried = fake_curve(tuner, PEAKED)
    result = tuner.search("fp32")
    assert tried == [16, 32, 64]
    assert result.chosen == 16 and result.peak_batch == 16
    assert result.stop_reason.startswith("memory edge not searched: throughput peaked at 16")


@pytest.mark.parametrize("objective,start,first", [
    ("goodput", None, 2), ("throughput", None, REFERENCE_BATCH), ("memory", None, REFERENCE_BATCH),
    ("throughput", 2, 2), ("goodput", 8, 8),
])
def test_where_the_search_starts(tiny_data_dir, objective, start, first):
    tuner = cpu_tuner(tiny_data_dir, objective=objective, start_batch=start)
    # The precision phase ran the reference batch in bf16, and it fitted.
    tuner.trials_run = [_rated(REFERENCE_BATCH, 100.0, "bf16")]
    assert tuner.search_start("bf16") == first
    if start is None:  # never above --max-batch
        small = cpu_tuner(tiny_data_dir, objective=objective, max_batch=4)
        small.trials_run = [_rated(4, 100.0, "bf16")]
        assert small.search_start("bf16") == min(first, 4)


@pytest.mark.parametrize("peak,ok,precision", [
    (9 * 2**30, True, "bf16"),   # ran, but above the 8 GB target: a failure to the search
    (2**20, False, "bf16"),      # did not run
    (2**20, True, "fp32"),       # fitted, but in another precision
])
def test_the_reference_batch_starts_the_search_only_where_it_fitted(tiny_data_dir, peak, ok, precision):
    tuner = cpu_tuner(tiny_data_dir, objective="throughput")
    trial = _rated(REFERENCE_BATCH, 100.0, precision)
    trial.peak_bytes, trial.ok = peak, ok
    tuner.trials_run = [trial]
    assert tuner.search_start("bf16") == 2


def test_find_edge_keeps_searching_past_the_peak(tiny_data_dir):
    tuner = cpu_tuner(tiny_data_dir, objective="throughput", find_edge=True, max_trials=16,
                      start_batch=2)
    tried = fake_curve(tuner, PEAKED)
    result = tuner.search("fp32")
    assert tried == [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert result.chosen == 16 and result.peak_batch is None


# -- goodput ------------------------------------------------------------------------------------
# Throughput still rising at 64, but B_noise 16 makes each image at 64 worth (16+16)/(16+64) = 0.4.
RISING = {2: 4.0, 4: 8.0, 8: 16.0, 16: 30.0, 32: 44.0, 64: 60.0, 128: 70.0, 256: 75.0,
          512: 78.0, 1024: 79.0, 2048: 80.0, 4096: 80.0}


def test_goodput_chooses_where_efficiency_falls_faster_than_throughput_rises(tiny_data_dir):
    tuner = cpu_tuner(tiny_data_dir)
    tuner.noise_scale = 16.0
    tried = fake_curve(tuner, RISING)
    result = tuner.search("fp32")
    # goodput: 16 -> 30.0, 32 -> 44 x 32/48 = 29.3, 64 -> 60 x 0.4 = 24: 32 and 64 gain
    # nothing over 16 (32 is within noise of it, so the decline rule alone would try 128).
    assert tried == [2, 4, 8, 16, 32, 64]
    assert result.stop_reason.startswith("memory edge not searched: goodput flat past 16")
    assert result.chosen == 16
    assert tuner.goodput.chosen.batch == 16
    row = tuner.goodput.row(64)
    assert row.efficiency == pytest.approx(0.4) and row.goodput == pytest.approx(24.0)


def test_goodput_with_a_large_noise_scale_takes_a_larger_batch(tiny_data_dir):
    tuner = cpu_tuner(tiny_data_dir, max_batch=256)
    tuner.noise_scale = 1000.0
    fake_curve(tuner, RISING)
    result = tuner.search("fp32")
    # goodput at 128: 70 x 1016/1128 = 63.0; at 256: 75 x 1016/1256 = 60.7; at 64: 56.6
    assert result.chosen == 128


def test_unusable_noise_scale_keeps_the_reference_batch(tiny_data_dir):
    tuner = cpu_tuner(tiny_data_dir, max_batch=256)
    tuner.noise_scale = None  # as measure_noise leaves it when the estimate says nothing
    fake_curve(tuner, RISING)
    result = tuner.search("fp32")
    assert result.chosen == REFERENCE_BATCH
    assert tuner.lr_rule() == ("none", None) and tuner.lrs(64)["lr_g"] == pytest.approx(1e-3)


def test_adascale_learning_rate_follows_the_noise_scale(tiny_data_dir):
    tuner = cpu_tuner(tiny_data_dir)
    tuner.noise_scale = 48.0
    assert tuner.lrs(64)["lr_g"] == pytest.approx(1e-3 * (4 * 64 / 112) ** 0.5)


@pytest.mark.slow
def test_noise_phase_measures_both_networks_on_real_data(tiny_data_dir):
    tuner = cpu_tuner(tiny_data_dir)
    record = tuner.measure_noise("fp32")
    assert set(record) >= {"generator", "discriminator", "decided_with", "measured_at_step",
                           "checkpoint", "micro_batch", "micro_batches", "steps"}
    assert (record["micro_batch"], record["micro_batches"], record["steps"]) == (16, 4, 2)
    assert record["measured_at_step"] == 2 and record["checkpoint"] is None
    assert record["generator"]["steps"] == 2 and record["discriminator"]["steps"] == 2


@pytest.mark.slow
def test_noise_phase_from_a_checkpoint_records_its_training_step(tiny_data_dir, tmp_path):
    from arwgan.checkpoint import save_checkpoint
    from arwgan.config import OptimConfig
    from arwgan.step import GANStep

    gan = GANStep(TINY, OptimConfig(), "fp32", torch.device("cpu"))
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    messages = torch.randint(0, 2, (4, 4)).float()
    for _ in range(3):
        gan(images, messages)
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"config": TrainConfig(model=TINY).to_dict(), "gan": gan.state_dict()})
    tuner = cpu_tuner(tiny_data_dir, from_checkpoint=str(path))
    record = tuner.measure_noise("fp32")
    assert record["measured_at_step"] == 3 and record["checkpoint"] == str(path)


def test_checkpoint_of_another_model_is_refused(tiny_data_dir, tmp_path):
    from arwgan.checkpoint import save_checkpoint
    from arwgan.errors import CheckpointError

    other = ModelConfig(image_size=16, message_bits=6, channels=8, noise="")
    path = tmp_path / "other.pt"
    save_checkpoint(path, {"config": TrainConfig(model=other).to_dict(), "gan": {}})
    tuner = cpu_tuner(tiny_data_dir, from_checkpoint=str(path))
    with pytest.raises(CheckpointError, match="another model config"):
        tuner.measure_noise("fp32")


# -- knobs ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_knobs_are_measured_and_a_failing_compile_is_recorded(tiny_data_dir, monkeypatch):
    from arwgan.step import GANStep

    def broken(self):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(GANStep, "compile", broken)
    tuner = cpu_tuner(tiny_data_dir, try_compile=True)
    decisions = {d.knob: d for d in tuner.measure_knobs(4, "fp32")}
    assert list(decisions) == ["channels_last", "cudnn_benchmark", "compile"]
    assert set(decisions["channels_last"].measured) >= {"off", "on"}
    assert decisions["cudnn_benchmark"].reason.startswith("not measured")
    assert decisions["compile"].value is False
    assert "compile failed (RuntimeError: no C++ compiler)" in decisions["compile"].reason


@pytest.mark.slow
def test_compile_is_not_measured_without_try_compile(tiny_data_dir, monkeypatch):
    from arwgan.step import GANStep

    monkeypatch.setattr(GANStep, "compile", lambda self: pytest.fail("compiled"))
    decisions = {d.knob: d for d in cpu_tuner(tiny_data_dir).measure_knobs(4, "fp32")}
    assert decisions["compile"].value is False
    assert "--try-compile" in decisions["compile"].reason


@pytest.mark.slow
def test_cpu_threads_and_workers_are_measured_together(tiny_data_dir):
    tuner = cpu_tuner(tiny_data_dir, max_workers=1)
    workers, decision = tuner.measure_threads_workers(4, "fp32")
    pairs = {(p["threads"], p["workers"]) for p in decision.measured["pairs"]}
    assert pairs == {(2, 0), (1, 1), (2, 1)}
    assert set(decision.value) == {"threads", "workers"}
    assert workers[-1].workers == decision.value["workers"]


@pytest.mark.parametrize(("batch", "measured_at"), [(256, 64), (64, 64), (8, 8)])
def test_threads_and_workers_are_measured_at_a_capped_batch(tiny_data_dir, monkeypatch, batch, measured_at):
    """Per image the step and the loader both scale with the batch: the pairs are timed at
    most at 4 x the reference batch, not at the chosen one (130 s of a 320 s tuning)."""
    tuner = cpu_tuner(tiny_data_dir, max_workers=1)
    seen = []

    def speed(step, loader_cfg, steps, warmup=2):
        seen.append(loader_cfg.batch_size)
        return 100.0 + loader_cfg.num_workers

    monkeypatch.setattr(tuner, "_worker_speed", speed)
    monkeypatch.setattr(tuner, "_step", lambda precision, b, channels_last=None: object())
    _, decision = tuner.measure_threads_workers(batch, "fp32")
    assert seen and set(seen) == {measured_at}
    assert decision.measured["batch"] == measured_at and tuner.worker_batch == measured_at


def _rated(batch, ips, precision="bf16"):
    return TrialMeasurement(batch=batch, ok=True, reason="ok", peak_bytes=2**20, images_per_s=ips,
                            seconds=1.0, precision=precision)


@pytest.mark.parametrize(("trials", "batch", "expected"), [
    # 48x48 crops on 2 cores: 0.32 s a step at 8, 0.53 at 16, 0.94 at 32: pairs at 8.
    ([(8, 25.0), (16, 30.0), (32, 34.0), (64, 35.0)], 64, 8),
    # The demo model: 0.39 s a step at 64, the cap (4 x 16): pairs at 64.
    ([(16, 144.0), (32, 156.0), (64, 166.0), (128, 170.0)], 128, 64),
    # Every step slower than 0.5 s: the smallest measured batch.
    ([(16, 10.0), (32, 12.0)], 32, 16),
    # No trial yet (or none at or below the cap): the cap.
    ([], 256, 64),
    ([(128, 170.0)], 256, 64),
])
def test_pairs_are_measured_where_a_step_is_short(tiny_data_dir, trials, batch, expected):
    tuner = cpu_tuner(tiny_data_dir)
    tuner.trials_run = [_rated(b, ips) for b, ips in trials]
    assert tuner.pair_batch(batch, "bf16") == expected


def test_pair_batch_reads_the_chosen_precision_only(tiny_data_dir):
    tuner = cpu_tuner(tiny_data_dir)
    # The fp32 trial at 16 is slow (0.89 s a step); the bf16 one is quick (0.48 s).
    tuner.trials_run = [_rated(16, 18.0, "fp32"), _rated(16, 33.0, "bf16"), _rated(32, 34.0)]
    assert tuner.pair_batch(64, "bf16") == 16
    assert tuner.pair_batch(64, "fp32") == 16  # nothing quick in fp32: the smallest


# -- tables ---------------------------------------------------------------------------------------
def goodput_result():
    from autotune.report import result_from_tuned
    from autotune.tuned import SCHEMA_VERSION, TunedChoice, TunedFile

    choice = TunedChoice(batch_size=32, num_workers=0, pin_memory=False, persistent_workers=False,
                         prefetch_factor=None, precision="bf16", learning_rates={"lr_g": 1.2e-3, "lr_d": 1.2e-3},
                         warmup_steps=120, lr_rule="adascale", objective="goodput", noise_scale=32.0,
                         cpu_threads=1)
    trials = [dict(batch=16, ok=True, peak_bytes=2**30, images_per_s=50.0, seconds=1.0, reason="ok",
                   images_per_s_rel_ci=0.021),
              dict(batch=32, ok=True, peak_bytes=2**30, images_per_s=90.0, seconds=1.0, reason="ok",
                   images_per_s_rel_ci=0.03)]
    rows = [dict(batch=16, images_per_s=50.0, gain=1.0, efficiency=1.0, goodput=50.0, lr_factor=1.0, fits=True),
            dict(batch=32, images_per_s=90.0, gain=4 / 3, efficiency=2 / 3, goodput=60.0,
                 lr_factor=(4 / 3) ** 0.5, fits=True)]
    measurements = {
        "target_bytes": 4 * 2**30, "machine": {}, "precision": [], "workers": [], "worker_mode": "end to end",
        "search": {"trials": trials, "chosen": 32, "peak_batch": 32,
                   "stop_reason": "memory edge not searched: goodput peaked at 32; batch 64, 128 clearly below"},
        "trials": [dict(t, timing_stop="converged") for t in trials],
        "comparison": {"seed_default_images_per_s": 30.0, "recommended_images_per_s": 90.0,
                       "speedup": 3.0, "rounds": {"seed_default": [30.0], "recommended": [90.0]}},
        "noise_scale": {"generator": {"noise_scale": 40.0, "noise_scale_stderr": 8.0, "steps": 16},
                        "discriminator": {"noise_scale": 12.0, "noise_scale_stderr": 3.0, "steps": 16},
                        "decided_with": 32.0, "micro_batch": 16, "micro_batches": 4, "steps": 16,
                        "measured_at_step": 16, "checkpoint": None},
        "goodput": {"chosen_batch": 32, "noise_scale": 32.0, "reference_batch": 16, "rows": rows},
        "knobs": [{"knob": "channels_last", "value": False, "reason": "off: x0.98", "measured": {}},
                  {"knob": "compile", "value": False, "reason": "not measured: --try-compile", "measured": {}}],
        "goodput_verdict": "predicted 2.00x sooner to the same training progress than the seed default: "
                   "3.00x the images per second, but at batch 32 each image is worth 0.67 of one at batch 16",
    }
    tuned = TunedFile(schema_version=SCHEMA_VERSION, created_utc="now", device={}, model=TINY.to_dict(),
                      model_fingerprint=TINY.fingerprint(), choice=choice, measurements=measurements,
                      tool_version="test", workload=dict(ARWGAN_RECORD))
    return result_from_tuned(tuned)


def render(*tables) -> str:
    out = io.StringIO()
    console = Console(file=out, width=200)
    for table in tables:
        console.print(table)
    return out.getvalue()


def test_tables_show_the_interval_the_stop_reason_goodput_and_knobs():
    from autotune.report import goodput_table, knobs_table, noise_table, trials_table

    result = goodput_result()
    text = render(trials_table(result), goodput_table(result), noise_table(result), knobs_table(result))
    assert "50.0 ±2 %" in text and "90.0 ±3 %" in text
    assert "memory edge not searched: goodput peaked at 32" in text
    assert "predicted efficiency" in text and "0.67" in text and "60.0" in text
    assert "40.0" in text and "8.0" in text and "decided with the generator's" in text
    assert "channels_last" in text and "--try-compile" in text


def test_recommendation_puts_the_efficiency_beside_the_images_per_second():
    from autotune.report import print_report

    out = io.StringIO()
    print_report(Console(file=out, width=250), goodput_result())
    text = out.getvalue()
    # Seed batch 16 efficiency 1, chosen batch 32 at B_noise 32: 48/64 = 0.75.
    assert "3.00x images/s x 0.75 efficiency = 2.25x predicted training speed-up" in text
    assert "predicted 2.00x sooner to the same training progress" in text


def test_throughput_recommendation_does_not_call_images_per_second_a_speed_up():
    from dataclasses import replace

    from autotune.report import recommendation_table

    result = goodput_result()
    m = dict(result.tuned.measurements)
    del m["goodput"], m["noise_scale"], m["goodput_verdict"]
    choice = replace(result.tuned.choice, lr_rule="linear", objective="throughput", noise_scale=None)
    result = replace(result, tuned=replace(result.tuned, choice=choice, measurements=m))
    text = render(recommendation_table(result))
    assert "3.00x images/s; not a training speed-up" in text
    assert math.isclose(result.tuned.measurements["comparison"]["speedup"], 3.0)


def test_resume_mid_epoch_under_another_tuned_batch_is_refused(tmp_path):
    from arwgan.checkpoint import save_checkpoint
    from arwgan.cli import check_resume_with_tuned
    from arwgan.config import LoaderConfig
    from arwgan.errors import UserError

    path = tmp_path / "last.pt"
    saved = TrainConfig(loader=LoaderConfig(batch_size=16))
    save_checkpoint(path, {"config": saved.to_dict(), "epoch_step": 3})
    tuned = TrainConfig(loader=LoaderConfig(batch_size=64))
    with pytest.raises(UserError, match="saved mid-epoch at batch 16"):
        check_resume_with_tuned(path, saved, tuned)
    check_resume_with_tuned(path, saved, saved)  # same batch: the position stays right
    save_checkpoint(path, {"config": saved.to_dict(), "epoch_step": 0})
    check_resume_with_tuned(path, saved, tuned)  # end of an epoch: any batch


def test_tuned_cudnn_benchmark_false_turns_benchmark_mode_off():
    from autotune.device import configure_cudnn

    before = torch.backends.cudnn.benchmark
    try:
        configure_cudnn("cuda", False)
        assert torch.backends.cudnn.benchmark is False
        configure_cudnn("cuda", None)  # today's default: on
        assert torch.backends.cudnn.benchmark is (not torch.backends.cudnn.deterministic)
    finally:
        torch.backends.cudnn.benchmark = before


def test_a_forked_cuda_trial_sets_its_device_and_cap_first(monkeypatch):
    """--isolate runs CUDA trials in forks of the trial server: the child sets the
    allocator cap from its spec before the trial, as a fresh trial process does."""
    import autotune.device
    import autotune.trial
    from autotune.trial_server import _run_trial_payload

    calls = []

    class Cuda:
        def set_device(self, index):
            calls.append(("device", index))

        def set_memory_fraction(self, fraction, index):
            calls.append(("fraction", fraction, index))

    def trial(spec):
        calls.append(("trial", spec.batch))
        return TrialMeasurement(batch=spec.batch, ok=True, reason="ok")

    monkeypatch.setattr(autotune.device, "CudaDevice", Cuda)
    monkeypatch.setattr(autotune.trial, "run_trial", trial)
    spec = TrialSpec(workload=arwgan_ref(TINY), precision="fp32", device="cuda:1", batch=8,
                     memory_fraction=0.5)
    from dataclasses import asdict

    assert _run_trial_payload(asdict(spec))["ok"] is True
    assert calls == [("device", 1), ("fraction", 0.5, 1), ("trial", 8)]


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--from-checkpoint", "/nonexistent/last.pt"], "/nonexistent/last.pt' does not exist"),
    (["--objective", "throughput", "--lr-rule", "adascale"], "needs --objective goodput"),
    (["--noise-steps", "0"], "noise steps"),
])
def test_new_cli_flags_fail_in_one_line(flags, fragment):
    from typer.testing import CliRunner

    from arwgan.autotune_cli import app
    from helpers import assert_one_error_line

    result = CliRunner().invoke(app, ["--device", "cpu", *flags])
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, fragment)


# -- the runoff: batches the search could not tell apart, re-measured end to end ------------------
# The demo model's top on 2 cores (fifth session): 64 and 128 within each other's noise.
FLAT_TOP = {16: 101.0, 32: 113.0, 64: 144.0, 128: 141.0}


def fake_speeds(tuner: Tuner, rates: dict) -> list:
    """End-to-end speeds by configuration, one value per round: a batch (channels_last
    off; the seed default's batch 16 is in ``rates`` too) or (batch, True) for
    channels_last on. Returns the configurations measured, in order."""
    measured, calls = [], {}

    def train_speed(step, loader_cfg, steps):
        _, batch, channels_last = step
        key = (batch, True) if channels_last else batch
        measured.append(key)
        calls[key] = calls.get(key, -1) + 1
        return rates[key][calls[key]]

    tuner._train_speed = train_speed
    tuner._step = lambda precision, batch, channels_last=None: ("step", batch, bool(channels_last))
    return measured


def test_throughput_runoff_of_the_batches_within_noise(tiny_data_dir):
    tuner = cpu_tuner(tiny_data_dir, objective="throughput", max_batch=128)
    tuner.trials_run = [_rated(REFERENCE_BATCH, 101.0, "fp32")]
    fake_curve(tuner, FLAT_TOP, rel_ci=0.15)
    result = tuner.search("fp32")
    assert result.chosen == 128  # the search's tolerance rule: within 3 % of 144, the larger
    assert tuner.runoff_challengers(result) == [64]
    measured = fake_speeds(tuner, {16: [70.0, 72.0], 128: [130.0, 135.0], 64: [141.0, 144.0]})
    loader = LoaderSettings(128, 1, False, True, 2)
    comparison = tuner.compare(loader, "fp32", challengers=[(64, False)])
    # Alternated: the seed default, the search's choice, the challenger, every round.
    assert measured == [16, 128, 64, 16, 128, 64]
    assert comparison["runoff"]["chosen"] == 64 and comparison["runoff"]["search_chosen"] == 128
    # 64's median 142.5 beats 128's 132.5 by 7.5 %, more than the 5 % margin.
    assert comparison["runoff"]["rounds"] == {"batch 128": [130.0, 135.0], "batch 64": [141.0, 144.0]}
    assert comparison["recommended_images_per_s"] == pytest.approx(142.5)
    assert comparison["rounds"]["recommended"] == [141.0, 144.0]
    assert comparison["speedup"] == pytest.approx(142.5 / 71.0)
    # Within the margin (3 %), the search's choice stands.
    fake_speeds(tuner, {16: [70.0, 72.0], 128: [130.0, 135.0], 64: [135.0, 138.0]})
    comparison = tuner.compare(loader, "fp32", challengers=[(64, False)])
    assert comparison["runoff"]["chosen"] == 128
    assert comparison["recommended_images_per_s"] == pytest.approx(132.5)


def test_goodput_runoff_weighs_each_batch_by_its_efficiency(tiny_data_dir):
    tuner = cpu_tuner(tiny_data_dir)
    tuner.noise_scale = 16.0
    # At B_noise 16 (reference 16) an image at batch 8 is worth 32/24 and one at batch 32
    # 32/48 of one at 16: batch 8 at 22 img/s (goodput 29.3) beats batch 32 at 40 img/s
    # (goodput 26.7), though 32 runs almost twice the images/s.
    fake_speeds(tuner, {16: [30.0, 30.0], 8: [22.0, 22.0], 32: [40.0, 40.0]})
    comparison = tuner.compare(LoaderSettings(32), "fp32", challengers=[(8, False)],
                               score=tuner._runoff_score())
    assert comparison["runoff"]["chosen"] == 8
    assert comparison["runoff"]["scores"]["batch 8"] == pytest.approx(22.0 * 32 / 24)
    assert comparison["runoff"]["score"] == "goodput"
    assert comparison["runoff"]["scores"]["batch 32"] == pytest.approx(40.0 * 32 / 48)


@pytest.mark.parametrize("overrides,noise,expected", [
    ({"objective": "throughput"}, None, [64]),
    ({"objective": "throughput", "runoff": 1}, None, []),   # turned off
    ({"objective": "memory"}, None, []),                    # the largest fit is the answer
    ({"objective": "goodput"}, None, []),                   # no noise scale: the reference batch
])
def test_when_there_is_a_runoff(tiny_data_dir, overrides, noise, expected):
    from autotune.search import SearchResult, TrialOutcome

    tuner = cpu_tuner(tiny_data_dir, **overrides)
    tuner.noise_scale = noise
    trials = [TrialOutcome(batch=b, ok=True, peak_bytes=b, images_per_s=v, seconds=1.0, reason="ok",
                           images_per_s_rel_ci=0.15) for b, v in FLAT_TOP.items()]
    result = SearchResult(trials=trials, chosen=128, stop_reason="reached max batch 128")
    assert tuner.runoff_challengers(result) == expected


@pytest.mark.parametrize("overrides,noise,expected", [
    ({"objective": "throughput"}, None, [256]),              # the batch not reached comes first
    ({"objective": "throughput", "runoff": 3}, None, [256, 64]),
    ({"objective": "goodput"}, 1e6, [256]),                  # goodput still climbing too
    ({"objective": "goodput"}, None, []),                    # no noise scale: the reference batch
    ({"objective": "memory"}, None, []),
])
def test_the_batch_the_search_did_not_reach_runs_in_the_runoff(tiny_data_dir, overrides, noise,
                                                                expected):
    from autotune.search import SearchResult, TrialOutcome

    tuner = cpu_tuner(tiny_data_dir, **overrides)
    tuner.noise_scale = noise
    top = {**FLAT_TOP, 128: 150.0}  # 64 within 3 % of it, the best at the largest batch
    trials = [TrialOutcome(batch=b, ok=True, peak_bytes=b, images_per_s=v, seconds=1.0, reason="ok",
                           images_per_s_rel_ci=0.15) for b, v in top.items()]
    result = SearchResult(trials=trials, chosen=128, untried=256,
                          stop_reason="batch 256 would take about 30 s > budget 25 s")
    assert tuner.runoff_challengers(result) == expected


def test_a_search_cut_short_while_climbing_lets_the_runoff_try_the_next_batch(tiny_data_dir):
    """48x48 crops on 2 cores (fifth session): batch 32 took 10.5 s, the look-ahead did
    not start 64, and 64 was the grid's best. The runoff now measures it end to end."""
    from autotune.decisions import WorkerMeasurement
    from autotune.knobs import KnobDecision
    from autotune.report import print_report

    tuner = cpu_tuner(tiny_data_dir, objective="throughput", max_batch=256, precision="fp32",
                      start_batch=16, trial_budget_s=10.0)
    # 64 took 6.4 s: 128 would take about 16 s > 10 s; images/s still climbing at 64.
    tried = fake_curve(tuner, {16: 101.0, 32: 113.0, 64: 144.0}, seconds=lambda b: b / 10)
    zero = WorkerMeasurement(0, None, 140.0)

    def threads_workers(batch, precision):
        tuner.worker_batch = 32
        return [zero, zero], KnobDecision("threads_workers", {"threads": 2, "workers": 0}, "fake")

    tuner.measure_threads_workers = threads_workers
    tuner.check_storage = lambda rate, workers: None
    measured = fake_speeds(tuner, {16: [70.0, 72.0], 64: [130.0, 135.0], 128: [150.0, 152.0],
                                   (64, True): [128.0, 130.0]})
    result = tuner.run()
    assert [t.batch for t in result.search.trials] == [16, 32, 64] and 128 not in tried
    assert result.search.untried == 128
    assert measured == [16, 64, 128, (64, True)] * 2
    tuned = result.tuned
    assert (tuned.choice.batch_size, tuned.choice.channels_last) == (128, False)
    assert tuned.choice.learning_rates == tuner.lrs(128)
    runoff = tuned.measurements["comparison"]["runoff"]
    assert (runoff["untried"], runoff["chosen"], runoff["search_chosen"]) == (128, 128, 64)
    # No search trial at 128: its step rate is the runoff's end-to-end median.
    assert tuned.measurements["step_images_per_s"] == pytest.approx(151.0)
    out = io.StringIO()
    print_report(Console(file=out, width=40), result)
    lines = out.getvalue().splitlines()
    assert ("runoff of the search's choice against what it could not tell apart and the batch it "
            "did not reach, end to end in 2 alternated rounds (images/s): batch 64 132.5, batch 128 "
            "(not reached by the search) 151.0, batch 64 channels_last 129.0: batch 128 wins") in lines
    assert "batch 128 goes to the runoff" in " ".join(out.getvalue().split())


def test_goodput_gets_a_row_for_the_batch_the_search_did_not_reach(tiny_data_dir):
    from autotune.goodput import BatchCandidate, choose_batch_by_goodput, efficiency
    from autotune.search import SearchResult, TrialOutcome

    tuner = cpu_tuner(tiny_data_dir)
    tuner.goodput = choose_batch_by_goodput([BatchCandidate(16, 50.0), BatchCandidate(32, 90.0)],
                                            1000.0, 16)
    trials = [TrialOutcome(batch=b, ok=True, peak_bytes=b, images_per_s=v, seconds=1.0, reason="ok")
              for b, v in ((16, 50.0), (32, 90.0))]
    result = SearchResult(trials=trials, chosen=32, untried=64, stop_reason="cut")
    rate = tuner._runoff_batch_rate(result, 64, {"recommended_images_per_s": 150.0})
    assert rate == 150.0
    assert [r.batch for r in tuner.goodput.rows] == [16, 32, 64]
    chosen = tuner.goodput.chosen
    assert chosen.batch == 64 and chosen.images_per_s == 150.0
    assert chosen.goodput == pytest.approx(150.0 * efficiency(64, 16, 1000.0))
    # A batch the search did try keeps its trial's rate and row.
    assert tuner._runoff_batch_rate(result, 16, {"recommended_images_per_s": 1.0}) == 50.0
    assert tuner.goodput.chosen.images_per_s == 50.0 and len(tuner.goodput.rows) == 3


@pytest.mark.parametrize("device_type,overrides,expected", [
    ("cpu", {}, 0.10),                     # measured: 10-13 % between trials on 2 cores
    ("cuda", {}, 0.0),                     # not measured on a GPU yet: own intervals
    ("cpu", {"trial_noise": 0.0}, 0.0),
    ("cuda", {"trial_noise": 0.04}, 0.04),
])
def test_the_search_reads_trials_with_the_devices_noise_floor(tiny_data_dir, monkeypatch,
                                                               device_type, overrides, expected):
    import autotune.tuner as tuner_module
    from autotune.search import SearchResult, TrialOutcome

    tuner = cpu_tuner(tiny_data_dir, objective="throughput", start_batch=16, **overrides)
    tuner.device = torch.device(device_type)
    seen = []

    def search(trial, cfg, score=None):
        seen.append(cfg.noise_floor)
        return SearchResult([TrialOutcome(16, True, 1, 10.0, 0.1, "ok")], 16, "fake")

    monkeypatch.setattr(tuner_module, "search_batch", search)
    monkeypatch.setattr(tuner, "_memory_capped", contextlib.nullcontext)
    tuner.search("fp32")
    assert seen == [expected] and tuner.trial_noise() == expected
    # The runoff's candidates are read the same way: 112 +-3 % is within +-10 % of 130.
    trials = [TrialOutcome(b, True, b, v, 1.0, "ok", images_per_s_rel_ci=0.03)
              for b, v in ((16, 130.0), (32, 112.0))]
    result = SearchResult(trials=trials, chosen=16, stop_reason="fake")
    assert tuner.runoff_challengers(result) == ([32] if expected >= 0.1 else [])


@pytest.mark.parametrize("value", [-0.1, 1.0, "10%", True])
def test_a_bad_trial_noise_is_refused(value):
    with pytest.raises(ConfigError, match="trial noise"):
        TuneConfig(trial_noise=value)


def test_a_challenger_that_does_not_fit_is_named_and_the_choice_stands(tiny_data_dir):
    tuner = cpu_tuner(tiny_data_dir, objective="throughput")
    fake_speeds(tuner, {16: [70.0, 70.0], 128: [130.0, 131.0]})
    real = tuner._train_speed

    def train_speed(step, loader_cfg, steps):
        if loader_cfg.batch_size == 256:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(step, loader_cfg, steps)

    tuner._train_speed = train_speed
    comparison = tuner.compare(LoaderSettings(128), "fp32", challengers=[(256, False)])
    assert comparison["runoff"]["chosen"] == 128
    assert comparison["runoff"]["rounds"]["batch 256"] == []
    assert "batch 256 (runoff) does not fit" in comparison["note"]


def test_the_tables_mark_the_runoffs_batch_and_say_why():
    from dataclasses import replace

    from autotune.report import print_report, runoff_line, trials_table

    result = goodput_result()
    m = dict(result.tuned.measurements)
    m["comparison"] = dict(m["comparison"], runoff={
        "search_chosen": 32, "channels_last": False, "chosen": 16, "chosen_channels_last": False,
        "rounds": {"batch 32": [88.0, 90.0], "batch 16": [50.0, 52.0]},
        "scores": {"batch 32": 45.0, "batch 16": 51.0}, "score": "goodput"})
    result = replace(result, tuned=replace(result.tuned, measurements=m))
    line = runoff_line(m)
    assert line == ("runoff of the search's choice against what it could not tell apart, end to end "
                    "in 2 alternated rounds (goodput): batch 32 45.0, batch 16 51.0: batch 16 wins")
    text = render(trials_table(result))
    assert "16 *" in text and "32 *" not in text
    # Printed whole on a line of its own, however narrow the terminal.
    out = io.StringIO()
    print_report(Console(file=out, width=40), result)
    assert line in out.getvalue().splitlines()
    m["comparison"]["runoff"]["chosen"] = 32
    assert runoff_line(m).endswith(
        "the search's choice (batch 32) stands (a challenger must win by more than 5 %)")


@pytest.mark.parametrize("cl_rounds,batch,channels_last,reason", [
    # channels_last at the chosen batch wins: 151 vs 132.5, x1.14.
    ([150.0, 152.0], 128, True, "on: x1.14 end to end at batch 128, alternated in the comparison"),
    # channels_last no better; batch 64 wins (140 vs 132.5, 5.7 %).
    ([131.0, 133.0], 64, False, "off: x1.00 end to end at batch 128"),
])
def test_the_runoffs_winner_is_what_the_tuned_file_holds(tiny_data_dir, cl_rounds, batch,
                                                         channels_last, reason):
    from autotune.decisions import WorkerMeasurement
    from autotune.knobs import KnobDecision

    tuner = cpu_tuner(tiny_data_dir, objective="throughput", max_batch=128, precision="fp32",
                      start_batch=16)
    fake_curve(tuner, FLAT_TOP, rel_ci=0.15)
    zero = WorkerMeasurement(0, None, 140.0)

    def threads_workers(batch, precision):
        tuner.worker_batch = 64  # the threads x workers batch: short steps
        return [zero, zero], KnobDecision("threads_workers", {"threads": 2, "workers": 0}, "fake")

    tuner.measure_threads_workers = threads_workers
    tuner.check_storage = lambda rate, workers: None
    measured = fake_speeds(tuner, {16: [70.0, 72.0], 128: [130.0, 135.0], 64: [139.0, 141.0],
                                   (128, True): cl_rounds})
    result = tuner.run()
    tuned = result.tuned
    # The knobs phase did not time channels_last at batch 64: the runoff did, at 128.
    assert measured == [16, 128, 64, (128, True)] * 2
    assert result.search.chosen == 128  # the search's pick, kept on record
    assert (tuned.choice.batch_size, tuned.choice.channels_last) == (batch, channels_last)
    runoff = tuned.measurements["comparison"]["runoff"]
    assert (runoff["chosen"], runoff["chosen_channels_last"]) == (batch, channels_last)
    assert tuned.choice.learning_rates == tuner.lrs(batch)
    assert tuned.measurements["step_images_per_s"] == FLAT_TOP[batch]
    knob = next(k for k in tuned.measurements["knobs"] if k["knob"] == "channels_last")
    assert knob["value"] is channels_last and knob["reason"].startswith(reason)


@pytest.mark.parametrize("device_type,knob_batch,overrides,expected", [
    ("cpu", 64, {}, True),                       # measured at another batch: the runoff decides
    ("cpu", 128, {}, False),                     # measured at the chosen batch already
    ("cpu", 64, {"runoff": 1}, False),           # runoff off: the knobs phase decides
    ("cpu", 64, {"channels_last": True}, False),  # forced on by the user
    ("cuda", 64, {}, False),                     # CUDA: knobs at the chosen batch, GPU timing
])
def test_where_channels_last_is_decided(tiny_data_dir, device_type, knob_batch, overrides, expected):
    tuner = cpu_tuner(tiny_data_dir, **overrides)
    tuner.device = torch.device(device_type)
    assert tuner.channels_last_in_runoff(128, knob_batch) is expected


def test_channels_last_from_a_runoff_that_could_not_run_it():
    from autotune.knobs import channels_last_from_runoff

    runoff = {"search_chosen": 128, "channels_last": False, "chosen": 128,
              "chosen_channels_last": False,
              "rounds": {"batch 128": [130.0, 131.0], "batch 128 channels_last": []}}
    decision = channels_last_from_runoff(runoff)
    assert decision.value is False
    assert decision.reason == "off: on did not run end to end at batch 128"
