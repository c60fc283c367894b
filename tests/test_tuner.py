"""The tuner end to end on the CPU, its CLI errors, and the hand-off to the trainer."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from arwgan.cli import app as train_app
from arwgan.autotune_cli import app as tune_app
from autotune.probes import FakeHostProbe, HostInfo
from autotune.tuned import load_tuned
from arwgan.tuning import TuneConfig, Tuner
from autotune.tuner import worker_candidates
from autotune.timing import TimingConfig
from helpers import ARWGAN_RECORD, assert_one_error_line

TINY_MODEL = ["--image-size", "16", "--message-bits", "4", "--channels", "8", "--noise", ""]
# The trial budget is far above any trial here: it ends the batch growth after a slow
# trial, so a tight one made the outcome depend on how busy the machine was (a trial
# that overran it at the start batch failed the whole run).
FAST = [
    "--device", "cpu", "--max-batch", "32", "--max-trials", "6", "--max-workers", "1",
    "--compare-steps", "2", "--trial-budget", "3600", "--noise-steps", "4",
]



def test_worker_candidates_cover_cores_and_one_oversubscribed_count() -> None:
    assert worker_candidates(2) == [0, 1, 2, 4]
    assert worker_candidates(16) == [0, 1, 2, 4, 8, 16, 32]
    assert worker_candidates(6) == [0, 1, 2, 4, 6, 12]
    assert worker_candidates(16, cap=4) == [0, 1, 2, 4]
    assert worker_candidates(1) == [0, 1, 4]


def test_default_cpu_target_is_half_the_available_ram(tiny_data_dir: Path) -> None:
    from autotune.probes import FakeNvmlProbe, FakeTorchCudaProbe, Probes

    host = HostInfo(usable_cores=2, logical_cores=2, physical_cores=2,
                    ram_total_bytes=24 * 2**30, ram_available_bytes=20 * 2**30, cpu_name="fake")
    probes = Probes(nvml=FakeNvmlProbe([]), cuda=FakeTorchCudaProbe(total_bytes=0),
                    host=FakeHostProbe(host))
    tuner = Tuner(TuneConfig(device="cpu", data_dir=str(tiny_data_dir)), probes=probes)
    tuner.probe()
    assert tuner.target_bytes() == 10 * 2**30
    tuner.cfg.target_mem = "50%"
    assert tuner.target_bytes() == 12 * 2**30


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--target-mem", "lots"], "lots"),
        (["--target-mem", "0GB"], "0GB"),
        (["--target-mem", "-5GB"], "-5GB"),
        (["--target-mem", "150%"], "150%"),
        (["--target-mem", "100TB"], "100TB"),
        (["--target-mem", "20"], "unit"),
        (["--target-mem", ""], "--target-mem is empty"),
        (["--objective", "speed"], "objective"),
        (["--lr-rule", "cubic"], "cubic"),
        (["--precision", "fp8"], "fp8"),
        (["--precision", "fp16"], "fp16"),
        (["--noise", "blur(3)"], "blur"),
        (["--data-dir", "/nonexistent/images"], "/nonexistent/images"),
        (["--plot", "trials.svg"], "png"),
        (["--max-batch", "0"], "max batch"),
        (["--image-size", "4"], "image size"),
        (["--show", "/nonexistent/tuned.json"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line_exit_2(flags: list[str], fragment: str, capsys) -> None:
    """Through run_typer, the installed script's path: choices are refused by click while
    parsing, and click's usage block becomes one line there."""
    from arwgan.console import run_typer

    argv = flags if flags[0] == "--show" else ["--device", "cpu", *flags]  # --show takes no other flag
    assert run_typer(tune_app, argv) == 2
    assert_one_error_line(capsys.readouterr().err, fragment)


def test_cli_rejects_non_numeric_option_with_exit_2() -> None:
    from arwgan.console import run_typer

    assert run_typer(tune_app, ["--max-batch", "lots"]) == 2


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path):
    """One real tuning run of a tiny model on the CPU, through the CLI."""
    out = tmp_path_factory.mktemp("tune")
    tuned_path = out / "tuned.json"
    result = CliRunner().invoke(
        tune_app,
        [*FAST, *TINY_MODEL, "--data-dir", str(tiny_data_dir), "--target-mem", "3GB",
         "--out", str(tuned_path), "--plot", str(out / "trials.png"), "--json"],
    )
    assert result.exit_code == 0, result.output
    return tuned_path, result


@pytest.mark.slow
def test_tuning_writes_a_complete_tuned_file(tuned_run) -> None:
    tuned_path, result = tuned_run
    tuned = load_tuned(tuned_path)
    choice, m = tuned.choice, tuned.measurements
    assert json.loads(result.stdout)["choice"]["batch_size"] == choice.batch_size
    batches = [t["batch"] for t in m["search"]["trials"]]
    assert batches[0] == 2 and len(batches) == len(set(batches)) and max(batches) <= 32
    # The measured candidate; the file holds it only if it trained faster than the seed
    # default (on a loaded CPU it may not: then the file holds the seed default).
    candidate, verdict = m["candidate"], m["verdict"]
    assert candidate["batch_size"] in {t["batch"] for t in m["search"]["trials"] if t["ok"]}
    assert candidate["precision"] in {"fp32", "bf16"}
    assert {p["precision"] for p in m["precision"]} == {"fp32", "bf16"}
    assert candidate["num_workers"] in (0, 1)
    assert {w["workers"] for w in m["workers"]} >= {0, 1}
    # The default objective: goodput, learning rates by the adascale rule.
    assert candidate["objective"] == "goodput"
    noise = m["noise_scale"]
    assert noise["steps"] == 4 and noise["measured_at_step"] == 4 and noise["checkpoint"] is None
    if candidate["noise_scale"] is None:  # an estimate that says nothing: reference batch, rate kept
        assert (candidate["lr_rule"], candidate["learning_rates"]["lr_g"]) == ("none", pytest.approx(1e-3))
    else:
        assert candidate["lr_rule"] == "adascale" and candidate["noise_scale"] == noise["decided_with"]
        b, n = candidate["batch_size"], candidate["noise_scale"]
        assert candidate["learning_rates"]["lr_g"] == pytest.approx(1e-3 * (b / 16 * (n + 16) / (n + b)) ** 0.5)
        assert m["goodput"]["chosen_batch"] == candidate["batch_size"]
        assert "to the same training progress" in m["goodput_verdict"]
    if verdict["keep_candidate"]:
        assert asdict(choice) == candidate
    else:
        assert (choice.batch_size, choice.num_workers, choice.precision) == (16, 4, "fp32")
        assert "holds the seed default" in verdict["message"]
    assert [k["knob"] for k in m["knobs"]] == ["threads_workers", "channels_last", "cudnn_benchmark",
                                               "compile"]
    assert candidate["cpu_threads"] in (1, 2) and candidate["compile"] is False
    for trial in m["trials"]:
        assert trial["timing_stop"] in ("converged", "max_samples", "max_seconds")
    comparison = m["comparison"]
    assert comparison["seed_default_images_per_s"] > 0 and comparison["recommended_images_per_s"] > 0
    assert comparison["speedup"] == pytest.approx(
        comparison["recommended_images_per_s"] / comparison["seed_default_images_per_s"]
    )
    for trial in m["search"]["trials"]:
        if trial["ok"]:
            assert 0 < trial["peak_bytes"] <= m["target_bytes"]
    assert tuned.device["device_type"] == "cpu" and tuned.device["usable_cores"] >= 1
    assert (tuned_path.parent / "trials.png").stat().st_size > 1000
    assert ("Recommendation" if verdict["keep_candidate"] else "Candidate:") in result.stderr
    assert "training images/s" in result.stderr and "verdict" in result.stderr


@pytest.mark.slow
def test_train_from_tuned_uses_the_tuned_configuration(tuned_run, tiny_data_dir: Path, tmp_path: Path) -> None:
    tuned_path, _ = tuned_run
    tuned = load_tuned(tuned_path)
    out = tmp_path / "train"
    result = CliRunner().invoke(
        train_app,
        ["--from-tuned", str(tuned_path), "--data-dir", str(tiny_data_dir), "--epochs", "1",
         "--steps-per-epoch", "2", "--val-images", "8", "--device", "cpu", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    saved = torch.load(out / "last.pt", weights_only=False)["config"]
    assert saved["loader"]["batch_size"] == tuned.choice.batch_size
    assert saved["loader"]["num_workers"] == tuned.choice.num_workers
    assert saved["precision"] == tuned.choice.precision
    assert saved["optim"]["lr_g"] == pytest.approx(tuned.choice.learning_rates["lr_g"])
    assert saved["model"] == tuned.model
    assert saved["cpu_threads"] == tuned.choice.cpu_threads
    assert saved["channels_last"] == tuned.choice.channels_last
    assert saved["lr_noise_scale"] == tuned.choice.noise_scale
    with (out / "log.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 1

    # An explicit flag overrides the tuned value.
    result = CliRunner().invoke(
        train_app,
        ["--from-tuned", str(tuned_path), "--data-dir", str(tiny_data_dir), "--epochs", "1",
         "--steps-per-epoch", "1", "--val-images", "8", "--device", "cpu", "--workers", "0",
         "--batch", "4", "--out", str(tmp_path / "override")],
    )
    assert result.exit_code == 0, result.output
    saved = torch.load(tmp_path / "override" / "last.pt", weights_only=False)["config"]
    assert saved["loader"]["batch_size"] == 4 and saved["loader"]["num_workers"] == 0


@pytest.mark.slow
def test_show_prints_the_tables_of_a_tuned_file(tuned_run) -> None:
    tuned_path, _ = tuned_run
    result = CliRunner().invoke(tune_app, ["--show", str(tuned_path)])
    assert result.exit_code == 0, result.output
    assert "Batch search" in result.stderr and "training images/s" in result.stderr
    assert "Recommendation" in result.stderr or "Candidate:" in result.stderr


@pytest.mark.parametrize("edit", [
    lambda m: m["comparison"].update(runoff="garbage"),
    lambda m: m["comparison"].update(runoff={"chosen": 8}),
    lambda m: m["comparison"].pop("rounds"),
    lambda m: m.update(knobs=[1, 2]),
])
def test_show_of_hand_edited_measurements_is_one_error_line(tuned_run, tmp_path: Path, edit) -> None:
    tuned_path, _ = tuned_run
    data = json.loads(tuned_path.read_text())
    edit(data["measurements"])
    bad = tmp_path / "[edited] tuned.json"
    bad.write_text(json.dumps(data))
    result = CliRunner().invoke(tune_app, ["--show", str(bad)])
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, "its measurements cannot be shown")
    assert "Batch search" not in result.stderr  # nothing half-printed before it


@pytest.fixture
def hand_tuned(tmp_path: Path) -> Path:
    """A tuned file for the tiny model, written by hand (no tuning run needed)."""
    from arwgan.config import ModelConfig
    from autotune.tuned import SCHEMA_VERSION, TunedChoice, TunedFile, save_tuned

    model = ModelConfig(image_size=16, message_bits=4, channels=8, noise="")
    choice = TunedChoice(
        batch_size=4, num_workers=0, pin_memory=False, persistent_workers=False,
        prefetch_factor=None, precision="fp32", learning_rates={"lr_g": 2.5e-4, "lr_d": 2.5e-4}, warmup_steps=0,
        lr_rule="linear", objective="throughput", world_size=1,
    )
    path = tmp_path / "hand" / "tuned.json"
    save_tuned(path, TunedFile(
        schema_version=SCHEMA_VERSION, created_utc="2025-01-01T00:00:00+00:00",
        device={"device_type": "cpu"}, model=model.to_dict(),
        model_fingerprint=model.fingerprint(), choice=choice, measurements={},
        tool_version="test", workload=dict(ARWGAN_RECORD),
    ))
    return path


def _bounded(tiny_data_dir: Path, out: Path) -> list[str]:
    """Flags that keep a run to one tiny step: should a refusal break, the test fails in
    a second instead of training on the default data for minutes."""
    return ["--device", "cpu", "--data-dir", str(tiny_data_dir), "--epochs", "1",
            "--steps-per-epoch", "1", "--val-images", "8", "--out", str(out)]


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--image-size", "32"], "image_size 16 -> 32"),
        (["--message-bits", "8"], "message_bits 4 -> 8"),
        (["--noise", "jpeg()"], "noise"),
    ],
)
def test_model_shaping_flag_that_differs_is_refused(
    hand_tuned: Path, flags, fragment, tiny_data_dir: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        train_app, ["--from-tuned", str(hand_tuned), *_bounded(tiny_data_dir, tmp_path / "run"), *flags]
    )
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, fragment)
    assert not (tmp_path / "run").exists()


def test_a_tuned_file_for_the_same_model_is_accepted(
    hand_tuned: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """The control of the refusal above: without a differing flag the same run trains."""
    result = CliRunner().invoke(
        train_app, ["--from-tuned", str(hand_tuned), *_bounded(tiny_data_dir, tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_force_accepts_a_tuned_file_for_another_model(tuned_run, tiny_data_dir: Path, tmp_path: Path) -> None:
    tuned_path, _ = tuned_run
    result = CliRunner().invoke(
        train_app,
        ["--from-tuned", str(tuned_path), "--force", "--message-bits", "6", "--data-dir",
         str(tiny_data_dir), "--epochs", "1", "--steps-per-epoch", "1", "--val-images", "8",
         "--device", "cpu", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr
    assert torch.load(tmp_path / "last.pt", weights_only=False)["config"]["model"]["message_bits"] == 6


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda d: d["choice"].update(batch_size=0), "batch"),
        (lambda d: d["choice"]["learning_rates"].update(lr_g=-1.0), "lr_g"),
        (lambda d: d["choice"].update(precision="fp8"), "precision"),
        (lambda d: d.update(schema_version=99), "schema"),
    ],
)
def test_hand_edited_tuned_file_is_a_one_line_error(
    hand_tuned: Path, edit, fragment, tiny_data_dir: Path, tmp_path: Path
) -> None:
    data = json.loads(hand_tuned.read_text())
    edit(data)
    bad = tmp_path / "tuned.json"
    bad.write_text(json.dumps(data))
    result = CliRunner().invoke(
        train_app, ["--from-tuned", str(bad), *_bounded(tiny_data_dir, tmp_path / "run")]
    )
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, fragment)


def test_corrupt_tuned_file_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "tuned.json"
    bad.write_text("{ not json")
    result = CliRunner().invoke(train_app, ["--from-tuned", str(bad), "--device", "cpu"])
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "tuned.json")


@pytest.mark.slow
def test_objective_memory_lands_between_85_and_100_percent_of_a_small_target(tiny_data_dir: Path) -> None:
    """Acceptance: on the CPU, with a small target, the chosen batch's peak memory (the
    peak resident set of the trial's process) lies within 85-100 % of the target."""
    cfg = TuneConfig(
        model=TuneConfig().model.__class__(image_size=32, message_bits=8, channels=16, noise=""),
        data_dir=str(tiny_data_dir), device="cpu", target_mem="1.6GB", objective="memory",
        precision="fp32", start_batch=8, max_batch=4096, max_trials=12,
        trial_budget_s=3600,  # never binds: the outcome must not depend on load
        timing=TimingConfig(min_samples=2, max_samples=2, min_seconds=0.0, warmup_steps=1),
    )
    tuner = Tuner(cfg)
    tuner.probe()
    tuner.target = tuner.target_bytes()
    tuner.trials_run = []
    result = tuner.search("fp32")
    chosen = next(t for t in result.trials if t.batch == result.chosen)
    share = chosen.peak_bytes / tuner.target
    assert 0.85 <= share <= 1.0, (share, [(t.batch, t.peak_bytes, t.reason) for t in result.trials])


@pytest.mark.slow
def test_resume_continues_under_a_tuned_file(tuned_run, tiny_data_dir: Path, tmp_path: Path) -> None:
    """The hand-off of --from-checkpoint: a run saved at the end of an epoch continues
    with the tuned batch, precision and learning rates."""
    tuned_path, _ = tuned_run
    tuned = load_tuned(tuned_path)
    out = tmp_path / "run"
    common = ["--data-dir", str(tiny_data_dir), "--steps-per-epoch", "1", "--val-images", "8",
              "--device", "cpu", "--out", str(out), *TINY_MODEL]
    first = CliRunner().invoke(train_app, [*common, "--epochs", "1", "--batch", "4", "--workers", "0"])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(
        train_app, ["--resume", str(out / "last.pt"), "--from-tuned", str(tuned_path), "--epochs", "2",
                    "--data-dir", str(tiny_data_dir), "--steps-per-epoch", "1", "--val-images", "8",
                    "--out", str(out)])
    assert second.exit_code == 0, second.output
    saved = torch.load(out / "last.pt", weights_only=False)
    assert saved["epoch"] == 2
    assert saved["config"]["loader"]["batch_size"] == tuned.choice.batch_size
    assert saved["config"]["precision"] == tuned.choice.precision
