"""``arwgan-autotune``: parse flags, run the tuner, print tables, write tuned.json.

Under ``torchrun --nproc-per-node N --no-python arwgan-autotune ...`` every process
measures its own device and the ranks agree on one configuration (see
:mod:`autotune.tuner`); rank 0 prints the tables and writes the one tuned file.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from arwgan.cli import Channels, DataDir, Device, ImageSize, MessageBits, Noise
from arwgan.config import ModelConfig
from arwgan.console import console, entry_point, fail, say
from arwgan.errors import UserError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
DEFAULT_OUT = Path("runs/tuned.json")


@app.command()
def autotune(
    target_mem: Annotated[Optional[str], typer.Option(help="Memory target: 20GB, 20GiB, 20000MB or 80% (of the device). (default: 90% of the GPU; half the available RAM on CPU)")] = None,
    objective: Annotated[str, typer.Option(help="goodput: the batch with the most training progress per second (images/s x statistical efficiency from the measured gradient noise scale); throughput: largest batch within 3% of the best images/s; memory: largest batch under the target.")] = "goodput",
    lr_rule: Annotated[Optional[str], typer.Option(help="How the learning rate follows the batch: adascale (goodput only) | linear | sqrt | none. (default: adascale with goodput, else linear)")] = None,
    find_edge: Annotated[bool, typer.Option("--find-edge", help="Search the memory edge even after the score has peaked (--objective memory always does).")] = False,
    noise_steps: Annotated[int, typer.Option(help="Goodput: gradient-noise measurements (each a batch of 4 x 16).")] = 16,
    from_checkpoint: Annotated[Optional[Path], typer.Option(help="Goodput: measure the noise scale on this training checkpoint (RUN/last.pt) and recommend the batch for the rest of the run.")] = None,
    try_compile: Annotated[bool, typer.Option("--try-compile", help="Measure torch.compile (compile time included) and use it when it pays within --planned-epochs.")] = False,
    planned_epochs: Annotated[int, typer.Option(help="Epochs the training run will last (decides whether compiling pays).")] = 10,
    precision: Annotated[Optional[str], typer.Option(help="Force fp32 | bf16 | fp16 instead of measuring them.")] = None,
    data_dir: DataDir = None,
    image_size: ImageSize = None,
    message_bits: MessageBits = None,
    channels: Channels = None,
    noise: Noise = None,
    device: Device = None,
    out: Annotated[Path, typer.Option(help="Where to write the tuned configuration.")] = DEFAULT_OUT,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Draw images/s and peak memory against batch size into this PNG.")] = None,
    isolate: Annotated[bool, typer.Option(help="Run each CUDA trial in a fresh subprocess (CPU trials always are).")] = False,
    start_batch: Annotated[int, typer.Option(help="First batch size tried.")] = 2,
    max_batch: Annotated[int, typer.Option(help="Never try a larger batch.")] = 4096,
    max_trials: Annotated[int, typer.Option(help="Cap on batch-search trials.")] = 16,
    trial_budget: Annotated[float, typer.Option(help="Seconds; a slower trial stops the batch growth.")] = 60.0,
    max_workers: Annotated[Optional[int], typer.Option(help="Cap on DataLoader workers tried. (default: usable cores, plus one oversubscribed count)")] = None,
    compare_steps: Annotated[int, typer.Option(help="Train steps per round when comparing seed default and recommendation.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of every RNG.")] = 0,
    show: Annotated[Optional[Path], typer.Option(help="Measure nothing: print the tables of an existing tuned file.")] = None,
) -> None:
    """Measure this machine and choose batch, precision, workers, knobs and learning rate for ARWGAN."""
    from autotune.report import machine_table, plot_trials, print_report, result_from_tuned
    from autotune.search import SearchError
    from autotune.tuned import load_tuned, save_tuned
    from autotune.tuner import TuneConfig, Tuner, tuner_timeout_s

    if show is not None:
        try:
            shown = result_from_tuned(load_tuned(show))
        except UserError as exc:
            raise fail(str(exc)) from None
        console.print(machine_table(shown.machine))
        print_report(console, shown)
        return
    from arwgan.distributed import cleanup, init_distributed, rank_prefix

    try:
        defaults = ModelConfig()
        model = ModelConfig(
            image_size=image_size if image_size is not None else defaults.image_size,
            message_bits=message_bits if message_bits is not None else defaults.message_bits,
            channels=channels if channels is not None else defaults.channels,
            noise=noise if noise is not None else defaults.noise,
        )
        if data_dir is not None and not data_dir.is_dir():
            raise UserError(f"data folder '{data_dir}' does not exist")
        if from_checkpoint is not None and not from_checkpoint.is_file():
            raise UserError(f"checkpoint '{from_checkpoint}' does not exist")
        if plot is not None and plot.suffix.lower() != ".png":
            raise UserError(f"--plot wants a .png file, got '{plot}'")
        cfg = TuneConfig(
            model=model,
            data_dir=str(data_dir) if data_dir is not None else None,
            device=device or "auto",
            target_mem=target_mem,
            objective=objective,
            lr_rule=lr_rule,
            precision=precision,
            start_batch=start_batch,
            max_batch=max_batch,
            max_trials=max_trials,
            trial_budget_s=trial_budget,
            isolate=isolate,
            max_workers=max_workers,
            compare_steps=compare_steps,
            seed=seed,
            find_edge=find_edge,
            noise_steps=noise_steps,
            from_checkpoint=str(from_checkpoint) if from_checkpoint is not None else None,
            try_compile=try_compile,
            planned_epochs=planned_epochs,
        )
        # Under torchrun: join the process group; this rank tunes cuda:LOCAL_RANK (or the CPU).
        ctx = init_distributed(cfg.device, timeout_s=tuner_timeout_s(cfg))
        if ctx.distributed:
            cfg = replace(cfg, device=str(ctx.device))
        main_rank = ctx.is_main
        with _status(console, "probing", main_rank) as status:
            tuner = Tuner(cfg, report=lambda message: status.update(f"measuring: {message}"), dist=ctx)
            machine = tuner.prepare()
        if main_rank:
            console.print(machine_table(machine))
        with _status(console, "measuring", main_rank) as status:
            tuner.report = lambda message: status.update(f"measuring: {message}")
            result = tuner.run()
        if main_rank:
            save_tuned(out, result.tuned)
            if plot is not None:
                plot_trials(result, plot)
    except UserError as exc:  # GpuNotUsable says exit 1: not a typo to correct
        raise fail(rank_prefix() + str(exc), code=getattr(exc, "exit_code", 2)) from None
    except SearchError as exc:  # under torchrun, names the rank that could not fit the start batch
        raise fail(f"{exc}; lower --start-batch, the image size, or raise --target-mem", code=1) from None
    finally:
        cleanup()
    if not main_rank:
        return
    print_report(console, result)
    say(f"wrote {out}" + (f" and {plot}" if plot else "") + f"; train with: arwgan-train --from-tuned {out}")
    if as_json:
        from dataclasses import asdict

        sys.stdout.write(json.dumps(asdict(result.tuned), indent=2) + "\n")


def _status(console, text: str, enabled: bool):
    """A spinner on rank 0; elsewhere a stand-in that ignores its updates."""
    if enabled:
        return console.status(text)
    return contextlib.nullcontext(_SilentStatus())


class _SilentStatus:
    def update(self, *args, **kwargs) -> None:
        pass


_main = entry_point(app)


def main() -> None:
    """The installed ``arwgan-autotune`` (see ``arwgan.cli.main`` for ``record``)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    record(_main)()


if __name__ == "__main__":  # torchrun --nproc-per-node N -m autotune.cli ...
    main()
