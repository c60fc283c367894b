"""Runs that are safe and readable (issue 8): one-line messages that survive a narrow
terminal and paths with brackets, outputs checked before any work, run folders that
never corrupt, SIGTERM, progress off a terminal, the verdict, and the CLI conventions."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import arwgan.trainer
import autotune.console
from arwgan.checkpoint import atomic_write_bytes, load_checkpoint
from arwgan.cli import app as train_app
from arwgan.console import EXIT_INTERRUPTED, EXIT_USAGE, run_typer
from arwgan.errors import UserError
from arwgan.runs import LATEST, prepare_run_folder, resolve_resume
from arwgan.autotune_cli import app as tune_app
from autotune.console import HumanConsole, ProgressLines
from autotune.decisions import judge_recommendation
from helpers import assert_one_error_line

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--epochs", "1", "--steps-per-epoch", "2", "--image-size", "16", "--message-bits", "4",
    "--channels", "8", "--batch", "8", "--workers", "0", "--val-images", "16",
    "--device", "cpu", "--noise", "", "--no-samples",
]
#: Every awkward character a path may hold: rich markup brackets, a closing tag, spaces.
AWKWARD = "sweep[v1] o[/]x [bold]y"


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """The one console as a 40-column terminal (no colour), writing into a buffer."""
    buffer = io.StringIO()
    narrow_console = HumanConsole(file=buffer, width=40, force_terminal=True, color_system=None)
    monkeypatch.setattr(autotune.console, "console", narrow_console)
    return buffer


def _lines(buffer: io.StringIO) -> list[str]:
    return buffer.getvalue().splitlines()


def _line_with(buffer: io.StringIO, *parts: str) -> str:
    """The one printed line that holds every part, each exactly as given."""
    found = [line for line in _lines(buffer) if all(part in line for part in parts)]
    assert len(found) == 1, buffer.getvalue()
    return found[0]


class _Done:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.epochs_done = out_dir, 1


# -- one line, never wrapped, never read as markup -------------------------------------------


def test_train_messages_keep_awkward_paths_whole_on_a_narrow_terminal(
    narrow: io.StringIO, tmp_path: Path, tiny_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / AWKWARD / "run"
    missing = tmp_path / AWKWARD / "no data"
    assert run_typer(train_app, [*TINY, "--data-dir", str(missing)]) == EXIT_USAGE
    assert _line_with(narrow, "error: data folder", f"'{missing}'").startswith("error:")

    monkeypatch.setattr(arwgan.trainer, "fit", lambda cfg, resume=None: _Done(Path(cfg.out_dir)))
    assert run_typer(train_app, [*TINY, "--data-dir", str(tiny_data_dir), "--out", str(out)]) == 0
    _line_with(narrow, "done:", str(out / "last.pt"))

    def interrupted(cfg, resume=None):
        raise arwgan.trainer.Interrupted(Path(cfg.out_dir) / "last.pt")

    monkeypatch.setattr(arwgan.trainer, "fit", interrupted)
    assert run_typer(train_app, [*TINY, "--data-dir", str(tiny_data_dir), "--out", str(out)]) == EXIT_INTERRUPTED
    _line_with(narrow, f"resume with --resume {out}")


def test_unknown_flag_with_markup_is_one_line(narrow: io.StringIO) -> None:
    from arwgan.app import group

    assert run_typer(group, ["--foo[/]"]) == EXIT_USAGE
    assert _line_with(narrow, "--foo[/]").startswith("error: ")


def test_tuner_messages_keep_awkward_paths_whole_on_a_narrow_terminal(
    narrow: io.StringIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import autotune.cli
    import autotune.report
    import autotune.tuned

    folder = tmp_path / AWKWARD  # '[/]' makes it two folders deep
    folder.mkdir(parents=True)
    assert run_typer(tune_app, ["--device", "cpu", "--out", str(folder)]) == EXIT_USAGE
    _line_with(narrow, f"'{folder}' is a folder")

    out = folder / "tuned [x].json"
    monkeypatch.setattr(autotune.report, "print_report", lambda console, result: None)
    monkeypatch.setattr(autotune.tuned, "save_tuned", lambda path, tuned: None)
    autotune.cli.write_outputs(type("R", (), {"tuned": None})(), out, None, False,
                               "train with: arwgan-train --from-tuned {out}")
    _line_with(narrow, f"train with: arwgan-train --from-tuned {out}")


# -- every output checked before any work ----------------------------------------------------


@pytest.fixture
def no_tuning(monkeypatch: pytest.MonkeyPatch):
    import autotune.tuner

    class Refuse:
        def __init__(self, *args, **kwargs):
            raise AssertionError("measuring started despite a bad output")

    monkeypatch.setattr(autotune.tuner, "Tuner", Refuse)


@pytest.mark.parametrize("case", ["out-folder", "out-under-a-file", "plot-under-a-file", "no-matplotlib"])
def test_tuner_outputs_are_checked_before_measuring(
    case: str, tmp_path: Path, no_tuning, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("in the way")
    flags, fragment = {
        "out-folder": (["--out", str(tmp_path)], "is a folder"),
        "out-under-a-file": (["--out", str(a_file / "t.json")], "is a file, not a folder"),
        "plot-under-a-file": (["--plot", str(a_file / "p.png")], "is a file, not a folder"),
        "no-matplotlib": (["--plot", str(tmp_path / "p.png")], "--plot needs matplotlib: pip install 'arwgan-autotune[plot]'"),
    }[case]
    if case == "no-matplotlib":
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert run_typer(tune_app, ["--device", "cpu", "--out", str(tmp_path / "t.json"), *flags]) == EXIT_USAGE
    assert_one_error_line(capsys.readouterr().err, fragment)


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started despite a bad flag")

    monkeypatch.setattr(arwgan.trainer, "fit", refuse)


def test_train_outputs_and_tensorboard_are_checked_before_training(
    tmp_path: Path, tiny_data_dir: Path, no_training, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("in the way")
    base = [*TINY, "--data-dir", str(tiny_data_dir)]
    cases = [
        (["--out", str(a_file)], f"output folder '{a_file}' is a file"),
        (["--out", str(a_file / "run")], f"'{a_file}' is a file, not a folder"),
        (["--data-dir", str(a_file)], f"data folder '{a_file}' is a file, not a folder"),
    ]
    for flags, fragment in cases:
        assert run_typer(train_app, [*base, *flags]) == EXIT_USAGE
        assert_one_error_line(capsys.readouterr().err, fragment)

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert run_typer(train_app, [*base, "--out", str(tmp_path / "tb"), "--tensorboard"]) == EXIT_USAGE
    assert_one_error_line(capsys.readouterr().err, "--tensorboard needs tensorboard: pip install 'arwgan-autotune[tensorboard]'")


# -- run folders -----------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_used_out_is_refused_and_left_byte_identical(tmp_path: Path, tiny_data_dir: Path, capsys) -> None:
    out = tmp_path / "run"
    args = [*TINY, "--data-dir", str(tiny_data_dir), "--out", str(out)]
    assert run_typer(train_app, args) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert run_typer(train_app, args) == EXIT_USAGE
    assert_one_error_line(capsys.readouterr().err, f"output folder '{out}' is not empty")
    assert _snapshot(out) == before

    # --resume DIR continues it (the folder is the checkpoint's own)...
    assert run_typer(train_app, ["--resume", str(out), "--epochs", "2"]) == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    header, *rows = (out / "log.csv").read_text().splitlines()
    assert len(rows) == 2 and all(row.count(",") == header.count(",") for row in rows)

    # ...and --overwrite starts it over: one header, one row.
    capsys.readouterr()
    assert run_typer(train_app, [*args, "--overwrite"]) == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert len((out / "log.csv").read_text().splitlines()) == 2


def test_prepare_run_folder_removes_only_the_runs_own_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    for name in ("last.pt", "log.csv", "samples/epoch_001.png", "notes.txt"):
        (out / name).write_text("x")
    with pytest.raises(UserError, match="not empty"):
        prepare_run_folder(out, None, overwrite=False)
    prepare_run_folder(out, None, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # Continuing the checkpoint that lives there is not refused.
    (out / "last.pt").write_text("x")
    prepare_run_folder(out, out / "last.pt", overwrite=False)
    assert (out / "last.pt").exists()


def test_resume_accepts_a_folder_the_latest_run_and_names_a_json_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, mtime in (("older", 1_000_000), ("newer", 2_000_000)):
        checkpoint = Path("runs") / name / "last.pt"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"x")
        os.utime(checkpoint, (mtime, mtime))
    assert resolve_resume(LATEST) == Path("runs/newer/last.pt")
    assert resolve_resume(Path("runs/older")) == Path("runs/older/last.pt")
    with pytest.raises(UserError, match="holds no last.pt"):
        resolve_resume(Path("runs"))
    Path("tuned.json").write_text("{}")
    with pytest.raises(UserError, match="is a JSON file, not a checkpoint .* use --from-tuned"):
        resolve_resume(Path("tuned.json"))
    from arwgan.console import expand_optional_value

    assert expand_optional_value(["--resume", "--epochs", "3"], "--resume", LATEST)[1] == LATEST


def test_sigterm_saves_like_ctrl_c_and_resume_continues(make_config, tmp_path: Path) -> None:
    from arwgan.trainer import Interrupted, Trainer, fit

    cfg = make_config(epochs=1, steps_per_epoch=3, samples=False)
    trainer = Trainer(cfg, HumanConsole(file=io.StringIO()))
    to_device = trainer.gan.to_device
    calls = []

    def sigterm_on_step_two(images, messages):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return to_device(images, messages)

    trainer.gan.to_device = sigterm_on_step_two
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted):
        trainer.fit()
    assert signal.getsignal(signal.SIGTERM) is previous
    state = load_checkpoint(trainer.checkpoint_path)
    assert (state["epoch"], state["epoch_step"]) == (0, 2)
    assert "SIGTERM: stopping after this step" in trainer.console.file.getvalue()
    result = fit(cfg, resume=trainer.checkpoint_path, console=HumanConsole(file=io.StringIO()))
    assert result.epochs_done == 1
    assert load_checkpoint(trainer.checkpoint_path)["gan"]["step_count"] == 3


def test_save_every_writes_checkpoints_between_epochs(make_config, monkeypatch: pytest.MonkeyPatch) -> None:
    from arwgan.trainer import Trainer

    saved = []
    real_save = Trainer.save

    def record(self, epoch, epoch_step):
        saved.append((epoch, epoch_step, self.gan.step_count))
        return real_save(self, epoch, epoch_step)

    monkeypatch.setattr(Trainer, "save", record)
    cfg = make_config(epochs=1, steps_per_epoch=5, save_every=2, samples=False)
    Trainer(cfg, HumanConsole(file=io.StringIO())).fit()
    assert saved == [(0, 2, 2), (0, 4, 4), (1, 0, 5)]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f.bin", lambda fh: fh.write(b"x"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == mode


# -- progress off a terminal ------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_are_rate_limited_and_a_quiet_log_gets_a_heartbeat() -> None:
    buffer = io.StringIO()
    clock = _Clock()
    lines = ProgressLines(5.0, to=HumanConsole(file=buffer), clock=clock)
    lines.update("trial: batch 2")          # printed: the first line
    clock.now = 1.0
    lines.update("trial: batch 4")          # within 5 s of the last line: not printed
    clock.now = 3.0
    lines.heartbeat()                       # not quiet long enough
    clock.now = 5.5
    lines.heartbeat()                       # quiet for 5.5 s: the latest state, not yet shown
    clock.now = 11.0
    lines.heartbeat()                       # still the same state: with its age
    clock.now = 12.0
    lines.update("trial: batch 8", force=True)
    text = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in buffer.getvalue().splitlines()]
    assert text == ["trial: batch 2", "trial: batch 4", "trial: batch 4 (for 10 s)", "trial: batch 8"]
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in buffer.getvalue().splitlines())


def test_training_off_a_terminal_prints_steps_with_rate_and_eta(
    make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    from arwgan.trainer import Trainer

    monkeypatch.setattr(arwgan.trainer, "PROGRESS_LINE_S", 0.0)
    buffer = io.StringIO()
    cfg = make_config(epochs=1, steps_per_epoch=3, samples=False)
    Trainer(cfg, HumanConsole(file=buffer)).fit()
    steps = [line for line in buffer.getvalue().splitlines() if " step " in line]
    assert steps and all(re.match(r"\d\d:\d\d:\d\d epoch 1/1 step \d/3: .* img/s, ETA ", line) for line in steps)
    assert any("validating" in line for line in buffer.getvalue().splitlines())


def test_sample_grid_has_three_rows_of_the_validation_images(make_config, tmp_path: Path) -> None:
    from arwgan.trainer import Trainer

    cfg = make_config(epochs=1, steps_per_epoch=1)
    Trainer(cfg, HumanConsole(file=io.StringIO())).fit()
    grid = Image.open(tmp_path / "run" / "samples" / "epoch_001.png")
    size, pad = cfg.model.image_size, 2  # torchvision's make_grid padding
    assert grid.size == (8 * (size + pad) + pad, 3 * (size + pad) + pad)


def test_tensorboard_log_is_written(make_config, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from arwgan.trainer import Trainer

    cfg = make_config(epochs=1, steps_per_epoch=1, samples=False, tensorboard=True)
    Trainer(cfg, HumanConsole(file=io.StringIO())).fit()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_oversubscribed_workers_are_one_note(monkeypatch: pytest.MonkeyPatch) -> None:
    from arwgan.trainer import _oversubscription_note

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert _oversubscription_note(2) is None
    assert _oversubscription_note(4).startswith("4 DataLoader workers on 2 usable core(s)")


# -- the verdict --------------------------------------------------------------------------------


def test_a_candidate_not_faster_than_the_seed_default_is_not_recommended() -> None:
    slower = judge_recommendation(250.6, 64.0, "throughput")
    assert not slower.keep_candidate
    assert slower.speedup == pytest.approx(64.0 / 250.6)
    assert "0.26x" in slower.message and "holds the seed default" in slower.message
    assert not judge_recommendation(100.0, 100.0, "throughput").keep_candidate
    faster = judge_recommendation(100.0, 150.0, "throughput")
    assert (faster.keep_candidate, faster.message) == (True, "")
    kept = judge_recommendation(250.6, 64.0, "memory")
    assert kept.keep_candidate and "--objective memory" in kept.message
    assert not judge_recommendation(100.0, None, "throughput").keep_candidate
    assert judge_recommendation(float("nan"), 50.0, "throughput").keep_candidate


def test_a_candidate_that_is_the_baseline_is_called_the_same_not_faster_or_slower() -> None:
    """Two runs of one configuration differ by noise: neither a speed-up nor a fallback."""
    for candidate in (80.0, 120.0):
        same = judge_recommendation(100.0, candidate, "throughput", baseline="baseline",
                                    same_as_baseline=True)
        assert same.keep_candidate and "the baseline's own configuration" in same.message
        assert "noise" in same.message


def test_under_goodput_the_verdict_weighs_images_per_second_by_efficiency() -> None:
    # 1.5x the images/s at 0.6 efficiency is 0.9x the training progress per second.
    behind = judge_recommendation(100.0, 150.0, "goodput", efficiency=0.6)
    assert not behind.keep_candidate and behind.speedup == pytest.approx(0.9)
    assert "0.60 predicted efficiency" in behind.message and "holds the seed default" in behind.message
    ahead = judge_recommendation(100.0, 150.0, "goodput", efficiency=0.8)
    assert ahead.keep_candidate and ahead.speedup == pytest.approx(1.2)


def test_explicit_batch_with_a_tuned_file_rescales_the_learning_rates() -> None:
    from arwgan.cli import rescale_for_batch
    from autotune.tuned import TunedChoice

    choice = TunedChoice(
        batch_size=64, num_workers=2, pin_memory=False, persistent_workers=True,
        prefetch_factor=2, precision="fp32", learning_rates={"lr_g": 4e-3, "lr_d": 2e-3}, warmup_steps=0,
        lr_rule="linear", objective="throughput",
    )
    rescaled, message = rescale_for_batch(choice, 16)
    assert (rescaled.batch_size, rescaled.learning_rates["lr_g"], rescaled.learning_rates["lr_d"]) == (16, pytest.approx(1e-3), pytest.approx(5e-4))
    assert "--batch 16 instead of the tuned 64" in message and "linear rule" in message
    from dataclasses import replace

    sqrt, _ = rescale_for_batch(replace(choice, lr_rule="sqrt"), 16)
    assert sqrt.learning_rates["lr_g"] == pytest.approx(2e-3)
    kept, _ = rescale_for_batch(replace(choice, lr_rule="none"), 16)
    assert kept.learning_rates["lr_g"] == 4e-3
    # adascale, noise scale 32 images: the gain at 64 from the reference 16 is
    # (32/16 + 1) / (32/64 + 1) = 2, so the tuned rate is 1e-3 x sqrt(2) and --batch 16
    # brings it back to the reference 1e-3 (the rule's noise scale goes with it).
    ada = replace(choice, lr_rule="adascale", noise_scale=32.0, learning_rates={"lr_g": 1e-3 * 2**0.5, "lr_d": 1e-3 * 2**0.5})
    back, message = rescale_for_batch(ada, 16)
    assert back.learning_rates["lr_g"] == pytest.approx(1e-3) and back.noise_scale == 32.0
    assert "adascale rule" in message


# -- CLI conventions ---------------------------------------------------------------------------


def _python(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, *(["-c", code] if code else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_python_m_arwgan_without_a_command_prints_help_on_stderr() -> None:
    result = _python("-m", "arwgan")
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""
    assert "Usage:" in result.stderr and "autotune" in result.stderr and "train" in result.stderr


IMPORTS_TORCH = """
import sys
from {module} import main
sys.argv = ["cmd", *{argv!r}]
try:
    main()
except SystemExit as exc:
    print(exc.code, "torch" in sys.modules)
"""


@pytest.mark.parametrize(("module", "argv"), [
    ("arwgan.cli", ["--help"]),
    ("arwgan.cli", ["--batch", "0"]),
    ("arwgan.cli", ["--precision", "fp8"]),
    ("arwgan.cli", ["--device", "tpu"]),
    ("arwgan.autotune_cli", ["-h"]),
    ("arwgan.autotune_cli", ["--objective", "speed"]),
    ("arwgan.app", ["train", "--epochs", "0"]),
    ("arwgan.cli", ["--noise", "crop((0.2,0.3),(0.2,0.3))+blur(3)"]),
    ("arwgan.autotune_cli", ["--noise", "Jpeg(0)+dropout(1.5,0.6)"]),
])
def test_help_and_bad_flags_answer_without_importing_torch(module: str, argv: list[str]) -> None:
    result = _python(code=IMPORTS_TORCH.format(module=module, argv=argv))
    assert result.stdout.strip().splitlines()[-1] in ("0 False", "2 False"), result.stdout + result.stderr


def test_version_and_short_help(capsys) -> None:
    from arwgan.app import group

    for app, argv in ((train_app, ["--version"]), (tune_app, ["--version"]), (group, ["--version"])):
        assert run_typer(app, argv) == 0
        assert re.fullmatch(r"arwgan-autotune \S+.*\n", capsys.readouterr().out)
    assert run_typer(group, ["autotune", "-h"]) == 0
    assert "--target-mem" in capsys.readouterr().out


def test_show_json_prints_the_file_and_refuses_other_flags(tmp_path: Path, capsys) -> None:
    from autotune.tuned import save_tuned
    from test_tuned import make_tuned

    path = tmp_path / "tuned.json"
    save_tuned(path, make_tuned())
    assert run_typer(tune_app, ["--show", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == json.loads(path.read_text())
    assert run_typer(tune_app, ["--show", str(path), "--max-batch", "8", "--objective", "memory"]) == EXIT_USAGE
    assert_one_error_line(capsys.readouterr().err, "--max-batch, --objective would be ignored")


def test_embed_never_rewatermarks_its_outputs_nor_overwrites_an_input(tmp_path: Path) -> None:
    from arwgan.inference import plan_embedding

    photos = tmp_path / "photos"
    (photos / "marked").mkdir(parents=True)
    for name in ("a.png", "b.png", "marked/a.png"):
        Image.new("RGB", (8, 8)).save(photos / name)
    pairs = plan_embedding(photos, photos / "marked")
    assert [(s.relative_to(photos).as_posix(), t.relative_to(photos).as_posix()) for s, t in pairs] == [
        ("a.png", "marked/a.png"), ("b.png", "marked/b.png"),
    ]
    with pytest.raises(UserError, match="is the input itself"):
        plan_embedding(photos / "a.png", photos / "a.png")
    with pytest.raises(UserError, match="is the input itself"):
        plan_embedding(photos / "a.png", photos)


def test_a_tuned_file_given_as_checkpoint_is_named(tmp_path: Path, capsys) -> None:
    path = tmp_path / "tuned.json"
    path.write_text("{}")
    assert run_typer(train_app, ["--resume", str(path)]) == EXIT_USAGE
    assert_one_error_line(capsys.readouterr().err, "is a JSON file, not a checkpoint (a tuned file? use --from-tuned)")


def test_an_empty_json_object_is_not_a_tuned_file(tmp_path: Path) -> None:
    from arwgan.errors import CheckpointError
    from autotune.tuned import load_tuned

    path = tmp_path / "t.json"
    path.write_text("{}")
    with pytest.raises(CheckpointError, match=r"is not a tuned file \(it has no schema_version\)"):
        load_tuned(path)


def test_eval_reports_the_images_handed_out() -> None:
    from arwgan.app import _Reporting

    seen = []

    class Progress:
        def update(self, text: str, force: bool = False) -> None:
            seen.append(text)

    batches = [([0] * 4, None), ([0] * 4, None), ([0] * 2, None)]
    assert list(_Reporting(batches, Progress(), 10)) == batches
    assert seen == [f"evaluating: images {a}-{b} of 10" for a, b in ((1, 4), (5, 8), (9, 10))]


def test_the_seed_default_as_a_choice_follows_the_runs_rule() -> None:
    from arwgan.tuning import TuneConfig, Tuner
    from arwgan.workload import SEED_LOADER

    tuner = Tuner(TuneConfig(device="cpu", lr_rule="sqrt", objective="throughput"))
    choice = tuner.seed_choice(world=4)
    assert (choice.batch_size, choice.num_workers, choice.precision) == (
        SEED_LOADER.batch_size, SEED_LOADER.num_workers, "fp32")
    assert choice.learning_rates["lr_g"] == pytest.approx(1e-3 * 2)  # sqrt of the global batch 64 over 16
    assert (choice.world_size, choice.lr_rule) == (4, "sqrt")
