"""``arwgan-train``: every user mistake is exit code 2 and one ``error:`` line on stderr,
never a traceback; a tiny real run and its resumption work end to end.

Two ways in: typer's ``CliRunner`` (click's standalone mode) and ``run_typer``, the wrapper
the installed script uses, which also turns click's parse errors into one line.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import arwgan.data
import arwgan.trainer
from arwgan.checkpoint import load_checkpoint, save_checkpoint
from arwgan.cli import app
from arwgan.config import TrainConfig
from arwgan.console import EXIT_INTERRUPTED, EXIT_USAGE, run_typer
from arwgan.errors import TrainingDiverged
from arwgan.trainer import Interrupted
from helpers import assert_one_error_line

TINY = [
    "--epochs", "1", "--steps-per-epoch", "2", "--image-size", "16", "--message-bits", "4",
    "--channels", "8", "--batch", "8", "--workers", "0", "--val-images", "16",
    "--device", "cpu", "--noise", "",
]


@pytest.fixture
def base_args(tiny_data_dir: Path, tmp_path: Path) -> list[str]:
    """Valid flags for a tiny run; a test appends the one bad flag (the last one wins)."""
    return ["--data-dir", str(tiny_data_dir), *TINY, "--out", str(tmp_path / "run")]


@pytest.fixture
def corrupt_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"PK\x03\x04 not really a zip file")
    return path


def _bad_cases(tmp_path: Path, corrupt: Path) -> list[tuple[list[str], str]]:
    """(extra flags, a fragment of the expected message)."""
    return [
        (["--batch", "-1"], "batch size must be a positive integer, got -1"),
        (["--batch", "0"], "batch size must be a positive integer, got 0"),
        (["--batch", "abc"], "Invalid value for '--batch'"),
        (["--precision", "fp8"], "'fp8' is not one of 'fp32', 'bf16', 'fp16'"),
        (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
        (["--noise", "blur(3)"], "blur(3)"),
        (["--data-dir", "/nope"], "data folder '/nope' does not exist"),
        (["--device", "tpu"], "'tpu' is not one of auto, cpu, cuda, cuda:N"),
        (["--workers", "-1"], "workers must be a non-negative integer, got -1"),
        (["--epochs", "-1"], "epochs must be a positive integer, got -1"),
        (["--epochs", "0"], "epochs must be a positive integer, got 0"),
        (["--image-size", "4"], "image size must be an integer >= 8"),
        (["--loss-weights", "adv=abc"], "'abc' is not a number"),
        (["--loss-weights", "colour=1"], "bad loss weight 'colour=1'"),
        (["--loss-weights", "ssim=-1"], "loss weight ssim must be a non-negative number"),
        (["--lr", "0"], "learning rate lr_g must be in (0, 10)"),
        (["--resume", str(tmp_path / "missing.pt")], "missing.pt' does not exist"),
        (["--resume", str(corrupt)], "is unreadable"),
        (["--from-tuned", str(tmp_path / "missing.json")], "missing.json' does not exist"),
        (["--resume", str(corrupt), "--from-tuned", str(tmp_path / "t.json")], "is unreadable"),
        (["--no-such-flag"], "No such option"),
    ]


BAD_IDS = [
    "batch-negative", "batch-zero", "batch-abc", "precision-fp8", "fp16-on-cpu",
    "noise-blur", "data-dir-missing", "device-tpu", "workers-negative", "epochs-negative",
    "epochs-zero", "image-size-4", "loss-weight-not-number", "loss-weight-unknown",
    "loss-weight-negative", "lr-zero", "resume-missing", "resume-corrupt",
    "from-tuned-missing", "resume-corrupt-with-from-tuned", "unknown-flag",
]


PARSE_ERRORS = (
    ["--batch", "abc"], ["--no-such-flag"], ["--precision", "fp8"], ["--device", "tpu"],
)


@pytest.fixture(params=range(len(BAD_IDS)), ids=BAD_IDS)
def bad_case(request, tmp_path: Path, corrupt_checkpoint: Path) -> tuple[list[str], str]:
    return _bad_cases(tmp_path, corrupt_checkpoint)[request.param]


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch):
    """Fail the test if a bad flag got as far as training (or building datasets)."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started despite a bad flag")

    monkeypatch.setattr(arwgan.trainer, "fit", refuse)



def test_bad_value_with_run_typer(
    base_args: list[str], bad_case, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """The message; the exit code is checked in test_run_typer_returns_the_exit_code."""
    flags, fragment = bad_case
    run_typer(app, [*base_args, *flags])
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_error_line(captured.err, fragment)
    assert not (tmp_path / "run" / "last.pt").exists()


def _raise_interrupted(cfg, resume=None, console=None):
    raise Interrupted(Path(cfg.out_dir) / "last.pt")


def _raise_diverged(cfg, resume=None, console=None):
    raise TrainingDiverged("losses non-finite for 20 consecutive steps")




@pytest.mark.parametrize("flags", PARSE_ERRORS, ids=["batch-abc", "unknown-flag", "precision", "device"])
def test_run_typer_parse_errors_exit_2(base_args: list[str], flags: list[str]) -> None:
    assert run_typer(app, [*base_args, *flags]) == EXIT_USAGE


def test_run_typer_returns_the_exit_code(
    base_args: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    corrupt_checkpoint: Path,
) -> None:
    """What the installed ``arwgan-train`` script exits with (``sys.exit(run_typer(app))``)."""
    codes = {
        " ".join(flags): run_typer(app, [*base_args, *flags])
        for flags, _ in _bad_cases(tmp_path, corrupt_checkpoint)
    }
    assert codes == {name: EXIT_USAGE for name in codes}
    monkeypatch.setattr(arwgan.trainer, "fit", _raise_interrupted)
    assert run_typer(app, base_args) == EXIT_INTERRUPTED
    monkeypatch.setattr(arwgan.trainer, "fit", _raise_diverged)
    assert run_typer(app, base_args) == 1


def test_bad_value_with_cli_runner(base_args: list[str], bad_case) -> None:
    flags, fragment = bad_case
    result = CliRunner().invoke(app, [*base_args, *flags])
    assert result.exit_code == EXIT_USAGE, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    if flags in PARSE_ERRORS:
        # Caught by click while parsing: its own usage block (run_typer makes it one line).
        assert "Usage:" in result.stderr and fragment in result.stderr
    else:
        assert_one_error_line(result.stderr, fragment)


def test_bad_values_fail_before_any_training(
    base_args: list[str], no_training, capsys: pytest.CaptureFixture, tmp_path: Path,
    corrupt_checkpoint: Path,
) -> None:
    """Config-level mistakes are caught before ``fit`` is even called."""
    for flags, fragment in _bad_cases(tmp_path, corrupt_checkpoint):
        if flags[:2] == ["--precision", "fp16"]:
            continue  # the device is resolved by the Trainer, inside fit
        run_typer(app, [*base_args, *flags])
        assert_one_error_line(capsys.readouterr().err, fragment)


def test_help_lists_the_flags(capsys: pytest.CaptureFixture) -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for flag in ("--data-dir", "--batch", "--precision", "--resume", "--from-tuned"):
        assert flag in result.output


# -- the flags reach the config ----------------------------------------------------------


def test_flags_map_onto_the_train_config(
    base_args: list[str], monkeypatch: pytest.MonkeyPatch, tiny_data_dir: Path, tmp_path: Path
) -> None:
    seen: dict = {}

    class Done:
        epochs_done = 1
        out_dir = tmp_path

    def fake_fit(cfg, resume=None, console=None):
        seen.update(cfg=cfg, resume=resume)
        return Done()

    monkeypatch.setattr(arwgan.trainer, "fit", fake_fit)
    code = run_typer(app, [
        *base_args, "--lr", "0.002", "--loss-weights", "adv=0,msg=2.5", "--warmup-steps", "7",
        "--precision", "bf16", "--seed", "9", "--channels-last",
    ])
    assert code == 0
    cfg: TrainConfig = seen["cfg"]
    assert seen["resume"] is None
    assert (cfg.optim.lr_g, cfg.optim.lr_d, cfg.optim.warmup_steps) == (0.002, 0.002, 7)
    assert cfg.model.weights.adversarial == 0.0 and cfg.model.weights.message_mse == 2.5
    assert cfg.model.weights.ssim == 0.1  # untouched weights keep their defaults
    assert (cfg.model.image_size, cfg.model.message_bits, cfg.model.channels) == (16, 4, 8)
    assert cfg.model.noise == ""
    assert (cfg.loader.batch_size, cfg.loader.num_workers) == (8, 0)
    assert (cfg.precision, cfg.device, cfg.seed, cfg.channels_last) == ("bf16", "cpu", 9, True)
    assert (cfg.epochs, cfg.steps_per_epoch, cfg.val_images) == (1, 2, 16)
    assert cfg.data_dir == str(tiny_data_dir)
    assert cfg.out_dir == str(tmp_path / "run")


def test_interrupt_exits_130_and_names_the_checkpoint(
    base_args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(arwgan.trainer, "fit", _raise_interrupted)
    result = CliRunner().invoke(app, base_args)
    assert result.exit_code == EXIT_INTERRUPTED
    assert "resume with --resume" in result.stderr and "last.pt" in result.stderr
    assert "Traceback" not in result.output


def test_divergence_exits_1_with_one_error_line(
    base_args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(arwgan.trainer, "fit", _raise_diverged)
    result = CliRunner().invoke(app, base_args)
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "non-finite for 20 consecutive steps")


# -- real runs ---------------------------------------------------------------------------


def _log_rows(out_dir: Path) -> list[dict[str, str]]:
    with (out_dir / "log.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_tiny_run_then_resume(base_args: list[str], tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "run"
    result = CliRunner().invoke(app, base_args)
    assert result.exit_code == 0, result.output
    assert "done: 1 epoch(s)" in result.stderr
    assert (out_dir / "last.pt").is_file() and (out_dir / "log.csv").is_file()
    rows = _log_rows(out_dir)
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "2")]
    assert load_checkpoint(out_dir / "last.pt")["epoch"] == 1

    # The checkpoint's config is the base; only --epochs changes.
    code = run_typer(app, ["--resume", str(out_dir / "last.pt"), "--epochs", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "done: 2 epoch(s)" in err
    rows = _log_rows(out_dir)
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "2"), ("2", "4")]
    state = load_checkpoint(out_dir / "last.pt")
    assert (state["epoch"], state["gan"]["step_count"]) == (2, 4)
    assert state["config"]["epochs"] == 2
    assert state["config"]["model"]["channels"] == 8


def test_resume_with_another_model_is_one_error_line(
    base_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out_dir = tmp_path / "run"
    assert run_typer(app, [*base_args, "--steps-per-epoch", "1"]) == 0
    capsys.readouterr()
    args = ["--resume", str(out_dir / "last.pt"), "--epochs", "2", "--channels", "16"]
    run_typer(app, args)
    assert_one_error_line(capsys.readouterr().err, "another model config")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_USAGE
    assert_one_error_line(result.stderr, "another model config")


def test_resume_of_a_foreign_file_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, path)
    bad_config = tmp_path / "bad_config.pt"
    save_checkpoint(bad_config, {"config": {"epochs": -3}})
    for checkpoint, fragment in [(path, "is not an arwgan checkpoint"),
                                 (bad_config, "epochs must be a positive integer")]:
        run_typer(app, ["--resume", str(checkpoint)])
        assert_one_error_line(capsys.readouterr().err, fragment)
        result = CliRunner().invoke(app, ["--resume", str(checkpoint)])
        assert result.exit_code == EXIT_USAGE
        assert_one_error_line(result.stderr, fragment)


def test_bare_from_tuned_reads_the_default_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from arwgan.console import expand_optional_value

    monkeypatch.chdir(tmp_path)
    for argv in (["--device", "cpu", "--from-tuned"], ["--from-tuned", "--device", "cpu"]):
        expanded = expand_optional_value(argv, "--from-tuned", "runs/tuned.json")
        assert "runs/tuned.json" in expanded and expanded[expanded.index("--device") + 1] == "cpu"
        result = CliRunner().invoke(app, expanded)
        assert result.exit_code == EXIT_USAGE
        assert_one_error_line(result.stderr, "tuned file 'runs/tuned.json' does not exist")


def test_precision_is_checked_before_the_datasets_are_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_dataset(*args, **kwargs):
        raise AssertionError("datasets built before the precision check")

    monkeypatch.setattr(arwgan.data, "ensure_synthetic_dataset", no_dataset)
    result = CliRunner().invoke(
        app, ["--precision", "fp16", "--device", "cpu", "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == EXIT_USAGE
    assert_one_error_line(result.stderr, "fp16 needs a CUDA device")
