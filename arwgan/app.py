"""``arwgan``: one command group for training and using a model.

``arwgan train`` is ``arwgan-train`` under another name; ``embed``, ``extract`` and
``eval`` use what was trained; ``doctor`` says what limits a configuration's speed. Each command parses, calls the library
(:mod:`arwgan.inference`, :mod:`arwgan.robustness`) and prints: results on stdout,
messages and tables on stderr. Every user mistake is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from arwgan import cli
from arwgan.cli import OPTIONAL_VALUES, Precision, _check_device, train
from arwgan.console import (
    CONTEXT_SETTINGS, EXIT_USAGE, VersionFlag, console, entry_point, fail, say, warn,
)
from arwgan.errors import DataError, UserError
from arwgan.outputs import check_output_folder, os_reason
from autotune.console import status
from arwgan.autotune_cli import autotune

group = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: never truncated at a narrow terminal, no markup read
    context_settings=CONTEXT_SETTINGS,
    help="ARWGAN image watermarking: tune, train a model, embed and extract messages, "
    "measure robustness.",
)
group.command("train", context_settings=CONTEXT_SETTINGS)(train)
group.command("autotune", context_settings=CONTEXT_SETTINGS)(autotune)


@group.callback(invoke_without_command=True)
def _show_help_without_a_command(ctx: typer.Context, version: VersionFlag = False) -> None:
    # Not no_args_is_help: its error prints the help as it is built, and run_typer
    # prints it once more. On stderr: a missing command is a usage error, not output.
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help(), err=True)
        raise typer.Exit(EXIT_USAGE)


Checkpoint = Annotated[
    Path, typer.Option("--checkpoint", "-c", help="Training checkpoint (runs/train/last.pt).")
]
DeviceName = Annotated[str, typer.Option("--device", callback=_check_device, help="auto | cpu | cuda | cuda:N.")]


def _error(exc: UserError) -> typer.Exit:
    # Escaped: a file name such as '[draft].png' must not be read as rich markup.
    return fail(str(exc))


def _skip(exc: DataError) -> None:
    warn(f"{exc}; skipped")


@group.command()
def embed(
    source: Annotated[Path, typer.Argument(metavar="IN", help="Image file, or folder (recursed).")],
    target: Annotated[Path, typer.Argument(metavar="OUT", help="Output file (its suffix picks the format), or folder (mirrors IN).")],
    checkpoint: Checkpoint,
    message: Annotated[str, typer.Option("--message", "-m", help="Exactly L digits 0/1, or short text (L // 8 UTF-8 bytes).")],
    quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG / WebP quality.")] = 95,
    device: DeviceName = "auto",
) -> None:
    """Hide a message in images of any size (tiled; output keeps size, mode and format)."""
    from arwgan.inference import decode_message, embed_file, format_bits, load_watermarker, plan_embedding

    try:
        pairs = plan_embedding(source, target)
        for folder in sorted({destination.parent for _, destination in pairs}):
            check_output_folder(folder, "watermarked images")
        marker = load_watermarker(checkpoint, device)
        bits = marker.message(message)
    except UserError as exc:
        raise _error(exc) from None
    text = decode_message(bits)
    described = f"message {format_bits(bits)}"
    if text:
        described += f" (text {json.dumps(text, ensure_ascii=False)})"
    batch = source.is_dir()
    written = skipped = 0
    for image_in, image_out in pairs:
        try:
            result = embed_file(marker, image_in, image_out, bits, quality)
        except DataError as exc:
            if not batch:
                raise _error(exc) from None
            _skip(exc)
            skipped += 1
            continue
        except UserError as exc:
            raise _error(exc) from None
        written += 1
        if not batch:
            say(
                f"wrote {result.target}: {result.width}x{result.height}, {described}, "
                f"PSNR {result.psnr_db:.2f} dB"
            )
    if batch:
        say(f"watermarked {written} image(s) into {target}, {described}")
    if skipped:
        raise fail(f"{skipped} of {len(pairs)} image(s) could not be read")


@group.command()
def extract(
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="Image file, or folder (recursed).")],
    checkpoint: Checkpoint,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image (JSON Lines).")] = False,
    device: DeviceName = "auto",
) -> None:
    """Print the decoded bits and a confidence per bit (0..1), one line per image."""
    from arwgan.inference import extract_file, format_bits, input_images, load_watermarker

    try:
        files = input_images(image)
        marker = load_watermarker(checkpoint, device)
    except UserError as exc:
        raise _error(exc) from None
    batch = image.is_dir()
    skipped = 0
    for path in files:
        try:
            result = extract_file(marker, path)
        except DataError as exc:
            if not batch:
                raise _error(exc) from None
            _skip(exc)
            skipped += 1
            continue
        if as_json:
            typer.echo(json.dumps(result.as_dict(), ensure_ascii=False))
        else:
            confidence = " ".join(f"{c:.2f}" for c in result.confidence.tolist())
            line = f"{path}  {format_bits(result.bits)}  confidence {confidence}"
            text = result.text
            typer.echo(line + (f"  text {json.dumps(text, ensure_ascii=False)}" if text else ""))
    if skipped:
        raise fail(f"{skipped} of {len(files)} image(s) could not be read")


@group.command("eval")
def evaluate_command(
    checkpoint: Checkpoint,
    data_dir: Annotated[Path, typer.Option(help="Images: the val split of a COCO/HiDDeN folder, or every image of a flat one.")],
    out: Annotated[Path, typer.Option(help="Folder for robustness.csv and robustness.png.")] = Path("runs/eval"),
    max_images: Annotated[int, typer.Option(min=1, help="Evaluate on the first N images.")] = 1000,
    batch: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 16,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader worker processes.")] = 2,
    device: DeviceName = "auto",
    precision: Annotated[Precision, typer.Option(help="fp16 needs CUDA.")] = Precision.fp32,
    seed: Annotated[int, typer.Option(help="Seed of the messages and the attacks' randomness.")] = 0,
) -> None:
    """PSNR, SSIM and bit accuracy with no attack and under a sweep of real attacks."""
    from arwgan.inference import load_watermarker
    from arwgan.robustness import (
        CHART_NAME, CSV_NAME, STANDARD_ATTACKS, evaluate_robustness, evaluation_images,
        evaluation_loader, robustness_table, write_chart, write_csv,
    )

    try:
        marker = load_watermarker(checkpoint, device, precision.value)
        files, description = evaluation_images(data_dir)
        files = files[:max_images]
        check_output_folder(out, "eval output folder")  # before the sweep, not after it
        say(
            f"evaluating on {len(files)} of the {description}, {len(STANDARD_ATTACKS)} attacks, "
            f"{marker.device} ({marker.precision})"
        )
        loader = evaluation_loader(files, marker.model_cfg, batch, workers, seed)
        with status("evaluating") as progress:
            rows = evaluate_robustness(
                marker.nets, _Reporting(loader, progress, len(files)), marker.device,
                marker.precision, STANDARD_ATTACKS, max_images=len(files), seed=seed,
            )
        console.print(robustness_table(rows, len(files)))
        write_csv(rows, out / CSV_NAME)
        written = [out / CSV_NAME]
        try:
            write_chart(rows, out / CHART_NAME, len(files))
            written.append(out / CHART_NAME)
        except ImportError:
            warn("matplotlib is not installed: no chart (pip install 'arwgan-autotune[plot]')")
    except UserError as exc:
        raise _error(exc) from None
    except OSError as exc:  # the disk filled up or the folder went away during the sweep
        raise fail(f"cannot write '{exc.filename or out}': {os_reason(exc)}", code=1) from None
    say("wrote " + ", ".join(map(str, written)))


class _Reporting:
    """A loader that reports how many images were handed out (every attack of a batch
    is run before the next one is drawn)."""

    def __init__(self, loader, progress, total: int) -> None:
        self.loader, self.progress, self.total = loader, progress, total

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        done = 0
        for batch in self.loader:
            self.progress.update(f"evaluating: images {done + 1}-{min(done + len(batch[0]), self.total)} of {self.total}")
            done += len(batch[0])
            yield batch


@group.command()
def doctor(
    data_dir: cli.DataDir = None,
    batch: cli.Batch = None,
    workers: cli.Workers = None,
    precision: cli.PrecisionOption = None,
    image_size: cli.ImageSize = None,
    message_bits: cli.MessageBits = None,
    channels: cli.Channels = None,
    noise: cli.Noise = None,
    device: cli.Device = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of every RNG. (default: 0)")] = None,
    pin_memory: Annotated[Optional[bool], typer.Option("--pin-memory/--no-pin-memory", help="Pin host batches (CUDA).")] = None,
    persistent_workers: Annotated[Optional[bool], typer.Option("--persistent-workers/--no-persistent-workers", help="Keep workers alive between epochs.")] = None,
    prefetch_factor: Annotated[Optional[int], typer.Option(help="Batches prefetched per worker. (default: 2)")] = None,
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="NHWC memory format.")] = None,
    from_tuned: Annotated[Optional[Path], typer.Option(help="Diagnose the configuration arwgan-autotune wrote (given alone: runs/tuned.json); explicit flags override it.")] = None,
    force: Annotated[bool, typer.Option(help="Use a tuned file even if it was made for another model config.")] = False,
    seconds: Annotated[float, typer.Option(help="Measure for about this long, all phases together.")] = 60.0,
    target_mem: Annotated[Optional[str], typer.Option(help="Memory target peak memory is compared with. (default: the tuned file's, else 90% of the GPU, or the RAM)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print every figure as JSON on stdout.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Draw utilisation and data wait over time into this PNG.")] = None,
) -> None:
    """Run a training configuration briefly and say what limits its speed, from measurements."""
    from arwgan.doctor import DoctorConfig, doctor_json, plot_report, print_report, run_doctor
    from arwgan.config import TrainConfig, with_overrides

    try:
        base, tuned_target = TrainConfig(), None
        if from_tuned is not None:
            from autotune.tuned import load_tuned

            base = cli.tuned_base(from_tuned, base, image_size, message_bits, channels, noise, force)
            tuned_target = load_tuned(from_tuned).measurements.get("target_bytes")
        cfg = with_overrides(base, {
            "data_dir": str(data_dir) if data_dir is not None else None,
            "loader.batch_size": batch,
            "loader.num_workers": workers,
            "loader.pin_memory": pin_memory,
            "loader.persistent_workers": persistent_workers,
            "loader.prefetch_factor": prefetch_factor,
            "precision": cli._value(precision),
            "model.image_size": image_size,
            "model.message_bits": message_bits,
            "model.channels": channels,
            "model.noise": noise,
            "device": device,
            "seed": seed,
            "channels_last": channels_last,
        })
        if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
            raise UserError(f"data folder '{cfg.data_dir}' does not exist")
        if target_mem is None and tuned_target:
            target_mem = f"{int(tuned_target)}B"
        doctor_cfg = DoctorConfig(seconds=seconds, target_mem=target_mem)
        with status("measuring") as progress:
            result = run_doctor(cfg, doctor_cfg, report=lambda message: progress.update(message))
        print_report(console, result)
        if plot is not None:
            say(f"wrote {plot_report(result, plot)}")
    except UserError as exc:
        raise _error(exc) from None
    if as_json:
        typer.echo(doctor_json(result))


main = entry_point(group, optional_values=OPTIONAL_VALUES)
