"""``arwgan-autotune``: parse flags, run the tuner, print tables, write tuned.json.

Under ``torchrun --nproc-per-node N --no-python arwgan-autotune ...`` every process
measures its own device and the ranks agree on one configuration (see
:mod:`autotune.tuner`); rank 0 prints the tables and writes the one tuned file.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from arwgan.cli import (
    Channels, DataDir, Device, ImageSize, LrRule, MessageBits, Noise, Precision, env_is_main,
)
from arwgan.config import ModelConfig
from arwgan.console import CONTEXT_SETTINGS, VersionFlag, entry_point, fail, say
from arwgan.errors import UserError
from arwgan.outputs import check_output_file, os_reason, require_module
from autotune.console import console, status

app = typer.Typer(
    add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
    context_settings=CONTEXT_SETTINGS,
)
DEFAULT_OUT = Path("runs/tuned.json")
Objective = Enum("Objective", {name: name for name in ("goodput", "throughput", "memory")}, type=str)
#: The options --show may be combined with; any other one would be silently ignored.
SHOW_OPTIONS = {"show", "as_json", "version"}


@app.command(context_settings=CONTEXT_SETTINGS)
def autotune(
    ctx: typer.Context,
    target_mem: Annotated[Optional[str], typer.Option(help="Memory target: 20GB, 20GiB, 20000MB or 80% (of the device). (default: 90% of the GPU; half the available RAM on CPU)")] = None,
    objective: Annotated[Objective, typer.Option(help="goodput: the batch with the most training progress per second (images/s x statistical efficiency from the measured gradient noise scale); throughput: largest batch within 3% of the best images/s; memory: largest batch under the target.")] = Objective.goodput,
    lr_rule: Annotated[Optional[LrRule], typer.Option(help="How the learning rate follows the batch; adascale needs --objective goodput. (default: adascale with goodput, else linear)")] = None,
    find_edge: Annotated[bool, typer.Option("--find-edge", help="Search the memory edge even after the score has peaked (--objective memory always does).")] = False,
    noise_steps: Annotated[int, typer.Option(help="Goodput: gradient-noise measurements (each a batch of 4 x 16).")] = 16,
    from_checkpoint: Annotated[Optional[Path], typer.Option(help="Goodput: measure the noise scale on this training checkpoint (RUN/last.pt) and recommend the batch for the rest of the run.")] = None,
    try_compile: Annotated[bool, typer.Option("--try-compile", help="Measure torch.compile (compile time included) and use it when it pays within --planned-epochs.")] = False,
    planned_epochs: Annotated[int, typer.Option(help="Epochs the training run will last (decides whether compiling pays).")] = 10,
    precision: Annotated[Optional[Precision], typer.Option(help="Force one precision instead of measuring them.")] = None,
    data_dir: DataDir = None,
    image_size: ImageSize = None,
    message_bits: MessageBits = None,
    channels: Channels = None,
    noise: Noise = None,
    device: Device = None,
    out: Annotated[Path, typer.Option(help="Where to write the tuned configuration (checked before measuring).")] = DEFAULT_OUT,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result (or, with --show, the file) as JSON on stdout.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Draw images/s and peak memory against batch size into this PNG (needs matplotlib).")] = None,
    isolate: Annotated[bool, typer.Option(help="Run each CUDA trial in a fresh subprocess (CPU trials always are).")] = False,
    start_batch: Annotated[int, typer.Option(help="First batch size tried.")] = 2,
    max_batch: Annotated[int, typer.Option(help="Never try a larger batch.")] = 4096,
    max_trials: Annotated[int, typer.Option(help="Cap on batch-search trials.")] = 16,
    trial_budget: Annotated[float, typer.Option(help="Seconds; a slower trial stops the batch growth.")] = 60.0,
    max_workers: Annotated[Optional[int], typer.Option(help="Cap on DataLoader workers tried. (default: usable cores, plus one oversubscribed count)")] = None,
    compare_steps: Annotated[int, typer.Option(help="Train steps per round when comparing seed default and recommendation.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of every RNG.")] = 0,
    show: Annotated[Optional[Path], typer.Option(help="Measure nothing: print the tables (with --json: the content) of an existing tuned file.")] = None,
    version: VersionFlag = False,
) -> None:
    """Measure this machine and choose batch, precision, workers, knobs and learning rate for ARWGAN."""
    if show is not None:
        show_tuned(ctx, show, as_json)
        return
    try:
        if target_mem is not None and not target_mem.strip():
            raise UserError("--target-mem is empty; write e.g. 20GB, 20GiB, 512MiB or 80%")
        defaults = ModelConfig()
        model = ModelConfig(
            image_size=image_size if image_size is not None else defaults.image_size,
            message_bits=message_bits if message_bits is not None else defaults.message_bits,
            channels=channels if channels is not None else defaults.channels,
            noise=noise if noise is not None else defaults.noise,
        )
        if data_dir is not None and not data_dir.exists():
            raise UserError(f"data folder '{data_dir}' does not exist")
        if from_checkpoint is not None and not from_checkpoint.is_file():
            raise UserError(f"checkpoint '{from_checkpoint}' does not exist")
        if data_dir is not None and not data_dir.is_dir():
            raise UserError(f"data folder '{data_dir}' is a file, not a folder")
        # Every output is checked before the first measurement: a run must never measure
        # for minutes and then fail on a path.
        if plot is not None:
            if plot.suffix.lower() != ".png":
                raise UserError(f"--plot wants a .png file, got '{plot}'")
            if plot.absolute() == out.absolute():
                raise UserError(f"--plot and --out are the same file '{plot}'")
            require_module("matplotlib", "--plot", "plot")
        if env_is_main():  # rank 0 writes the files
            check_output_file(out, "tuned file")
            if plot is not None:
                check_output_file(plot, "plot")
        from autotune.search import SearchError
        from autotune.tuner import TuneConfig, Tuner

        cfg = TuneConfig(
            model=model,
            data_dir=str(data_dir) if data_dir is not None else None,
            device=device or "auto",
            target_mem=target_mem,
            objective=objective.value,
            lr_rule=lr_rule.value if lr_rule is not None else None,
            precision=precision.value if precision is not None else None,
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
        from arwgan.distributed import cleanup, init_distributed, rank_prefix
    except UserError as exc:
        raise fail(str(exc)) from None

    try:
        # Under torchrun: join the process group; this rank tunes cuda:LOCAL_RANK (or the CPU).
        from autotune.tuner import tuner_timeout_s

        ctx_dist = init_distributed(cfg.device, timeout_s=tuner_timeout_s(cfg))
        if ctx_dist.distributed:
            cfg = replace(cfg, device=str(ctx_dist.device))
        main_rank = ctx_dist.is_main
        result = _measure(cfg, ctx_dist, main_rank)
    except UserError as exc:  # GpuNotUsable says exit 1: not a typo to correct
        raise fail(rank_prefix() + str(exc), code=getattr(exc, "exit_code", 2)) from None
    except SearchError as exc:  # under torchrun, names the rank that could not fit the start batch
        raise fail(f"{exc}; lower --start-batch, the image size, or raise --target-mem", code=1) from None
    finally:
        cleanup()
    if main_rank:
        write_outputs(result, out, plot, as_json)


def _measure(cfg, ctx_dist, main_rank: bool):
    from autotune.report import machine_table
    from autotune.tuner import Tuner

    with _status("probing", main_rank) as progress:
        tuner = Tuner(cfg, report=lambda message: progress.update(f"measuring: {message}"), dist=ctx_dist)
        machine = tuner.prepare()
    if main_rank:
        console.print(machine_table(machine))
    with _status("measuring", main_rank) as progress:
        tuner.report = lambda message: progress.update(f"measuring: {message}")
        return tuner.run()


def write_outputs(result, out: Path, plot: Optional[Path], as_json: bool) -> None:
    """The report first, then the files: the measurements are on screen even if a disk
    fills up or a path disappears in the meantime."""
    from autotune.report import plot_trials, print_report
    from autotune.tuned import save_tuned

    print_report(console, result)
    written = []
    for path, write in ((out, lambda: save_tuned(out, result.tuned)),
                        (plot, lambda: plot_trials(result, plot))):
        if path is None:
            continue
        try:
            write()
        except OSError as exc:
            raise fail(f"cannot write '{path}': {os_reason(exc)} (the report above has the measurements)", code=1) from None
        except UserError as exc:
            raise fail(str(exc), code=1) from None
        written.append(str(path))
    say(f"wrote {' and '.join(written)}; train with: arwgan-train --from-tuned {out}")
    if as_json:
        sys.stdout.write(json.dumps(asdict(result.tuned), indent=2) + "\n")


def show_tuned(ctx: typer.Context, path: Path, as_json: bool) -> None:
    """``--show FILE``: the tables of a tuned file, or (``--json``) its content on stdout."""
    from autotune.report import machine_table, print_report, result_from_tuned
    from autotune.tuned import load_tuned

    given = sorted(
        "--" + name.replace("_", "-") for name in ctx.params
        if name not in SHOW_OPTIONS and ctx.get_parameter_source(name).name != "DEFAULT"
    )
    if given:
        raise fail(f"--show measures nothing: {', '.join(given)} would be ignored; drop it or drop --show")
    try:
        tuned = load_tuned(path)
        if as_json:
            sys.stdout.write(json.dumps(asdict(tuned), indent=2) + "\n")
            return
        shown = result_from_tuned(tuned)
    except UserError as exc:
        raise fail(str(exc)) from None
    console.print(machine_table(shown.machine))
    print_report(console, shown)


def _status(text: str, enabled: bool):
    """A spinner (terminal) or timestamped lines (log) on rank 0; elsewhere nothing."""
    if enabled:
        return status(text)
    return _Silent()


class _Silent:
    def update(self, *args, **kwargs) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc) -> None:
        pass


main = entry_point(app)


if __name__ == "__main__":  # torchrun --nproc-per-node N -m autotune.cli ...
    main()
