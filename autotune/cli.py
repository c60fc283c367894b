"""``python -m autotune --workload package.module:factory``: tune any importable workload.

The flags are the engine's (target, objective, LR rule, precision, batch search,
workers, knobs, outputs); the workload's own configuration comes as JSON keyword
arguments of its factory (``--workload-args '{"width": 64}'``). ``arwgan-autotune`` is
the same engine with ARWGAN's model flags (:mod:`arwgan.autotune_cli`); both run
through :func:`run_tuning`.

Under ``torchrun --nproc-per-node N -m autotune ...`` every process measures its own
device and the ranks agree on one configuration (see :mod:`autotune.tuner`); rank 0
prints the tables and writes the one tuned file.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from autotune.decisions import LR_RULES, PRECISIONS
from autotune.commands import CONTEXT_SETTINGS, VersionFlag, entry_point, fail, typer_app
from autotune.console import console, say, status
from autotune.errors import UserError
from autotune.outputs import check_output_file, os_reason, require_module

DEFAULT_OUT = Path("runs/tuned.json")

# Choices are enums so that click checks them while parsing (before torch is imported).
Objective = Enum("Objective", {name: name for name in ("goodput", "throughput", "memory")}, type=str)
Precision = Enum("Precision", {name: name for name in PRECISIONS}, type=str)
LrRule = Enum("LrRule", {name: name for name in LR_RULES}, type=str)
#: The options --show may be combined with; any other one would be silently ignored.
SHOW_OPTIONS = {"show", "as_json", "version"}


def check_device(value: Optional[str]) -> Optional[str]:
    import re

    if value is not None and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


def env_is_main() -> bool:
    """Rank 0 (or no torchrun), read from the environment: no torch import."""
    return os.environ.get("RANK", "0") == "0"


# -- the engine's flags, shared by every tuning command -----------------------------------
TargetMem = Annotated[Optional[str], typer.Option(help="Memory target: 20GB, 20GiB, 20000MB or 80% (of the device). (default: 90% of the GPU; half the available RAM on CPU)")]
ObjectiveOption = Annotated[Objective, typer.Option(help="goodput: the batch with the most training progress per second (images/s x statistical efficiency from the measured gradient noise scale); throughput: largest batch within 3% of the best images/s; memory: largest batch under the target.")]
LrRuleOption = Annotated[Optional[LrRule], typer.Option(help="How the learning rate follows the batch; adascale needs --objective goodput. (default: adascale with goodput, else linear)")]
FindEdge = Annotated[bool, typer.Option("--find-edge", help="Search the memory edge even after the score has peaked (--objective memory always does).")]
NoiseSteps = Annotated[int, typer.Option(help="Goodput: gradient-noise measurements (each a batch of 4 x the reference batch).")]
FromCheckpoint = Annotated[Optional[Path], typer.Option(help="Goodput: measure the noise scale on this training checkpoint and recommend the batch for the rest of the run.")]
TryCompile = Annotated[bool, typer.Option("--try-compile", help="Measure torch.compile (compile time included) and use it when it pays within --planned-epochs.")]
PlannedEpochs = Annotated[int, typer.Option(help="Epochs the training run will last (decides whether compiling pays).")]
PrecisionOption = Annotated[Optional[Precision], typer.Option(help="Force one precision instead of measuring them.")]
Device = Annotated[Optional[str], typer.Option(callback=check_device, help="auto | cpu | cuda | cuda:N. (default: auto)")]
Out = Annotated[Path, typer.Option(help="Where to write the tuned configuration (checked before measuring).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result (or, with --show, the file) as JSON on stdout.")]
Plot = Annotated[Optional[Path], typer.Option(help="Draw images/s and peak memory against batch size into this PNG (needs matplotlib).")]
Isolate = Annotated[bool, typer.Option(help="Run each CUDA trial in a fresh subprocess (CPU trials always are, when the workload can be rebuilt there).")]
StartBatch = Annotated[Optional[int], typer.Option(
    help="First batch size the search tries (default: 2 under goodput, the reference "
         "batch under throughput and memory).", show_default=False)]
MaxBatch = Annotated[int, typer.Option(help="Never try a larger batch.")]
MaxTrials = Annotated[int, typer.Option(help="Cap on batch-search trials.")]
TrialBudget = Annotated[float, typer.Option(help="Seconds; a slower trial stops the batch growth.")]
MaxWorkers = Annotated[Optional[int], typer.Option(help="Cap on DataLoader workers tried. (default: usable cores, plus one oversubscribed count)")]
CompareSteps = Annotated[int, typer.Option(help="Train steps per round when comparing the baseline and the recommendation.")]
Seed = Annotated[int, typer.Option(help="Seed of every RNG.")]
Show = Annotated[Optional[Path], typer.Option(help="Measure nothing: print the tables (with --json: the content) of an existing tuned file.")]

#: The engine flags' names that go into :class:`autotune.tuner.TuneConfig`.
ENGINE_OPTIONS = (
    "target_mem", "objective", "lr_rule", "find_edge", "noise_steps", "from_checkpoint",
    "try_compile", "planned_epochs", "precision", "device", "isolate", "start_batch",
    "max_batch", "max_trials", "trial_budget", "max_workers", "compare_steps", "seed",
)


def engine_options(
    target_mem: TargetMem = None,
    objective: ObjectiveOption = Objective.goodput,
    lr_rule: LrRuleOption = None,
    find_edge: FindEdge = False,
    noise_steps: NoiseSteps = 16,
    from_checkpoint: FromCheckpoint = None,
    try_compile: TryCompile = False,
    planned_epochs: PlannedEpochs = 10,
    precision: PrecisionOption = None,
    device: Device = None,
    out: Out = DEFAULT_OUT,
    as_json: AsJson = False,
    plot: Plot = None,
    isolate: Isolate = False,
    start_batch: StartBatch = None,
    max_batch: MaxBatch = 4096,
    max_trials: MaxTrials = 16,
    trial_budget: TrialBudget = 25.0,
    max_workers: MaxWorkers = None,
    compare_steps: CompareSteps = 10,
    seed: Seed = 0,
    show: Show = None,
    version: VersionFlag = False,
) -> None:
    """The flags every tuning command has (a template: :func:`with_engine_options` adds
    its parameters to a command)."""


def with_engine_options(command):
    """Give ``command`` (whose own parameters end in ``**options``) the engine's flags:
    typer reads the merged signature, and the command receives the engine's values in
    ``options``. One list of flags for ``python -m autotune`` and ``arwgan-autotune``."""
    import inspect

    own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    engine = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
              for p in inspect.signature(engine_options, eval_str=True).parameters.values()]
    command.__signature__ = inspect.Signature([*own, *engine])
    command.__annotations__ = {p.name: p.annotation for p in [*own, *engine]}
    return command


app = typer_app()


@app.command(context_settings=CONTEXT_SETTINGS)
@with_engine_options
def autotune(
    ctx: typer.Context,
    workload: Annotated[Optional[str], typer.Option(help="The workload to tune: package.module:factory (importable from here; the current folder is on the path).")] = None,
    workload_args: Annotated[Optional[str], typer.Option(help="The factory's keyword arguments as a JSON object, e.g. '{\"width\": 64}'.")] = None,
    **options: Any,
) -> None:
    """Measure this machine and choose batch, precision, workers, knobs and learning rates for any PyTorch workload."""
    if options["show"] is not None:
        show_tuned(ctx, options["show"], options["as_json"])
        return
    if workload is None:
        raise fail("--workload is required: package.module:factory (see docs/library.md)")
    try:
        kwargs = parse_workload_args(workload_args)
        from autotune.workload import WorkloadRef

        ref = WorkloadRef(workload, kwargs)
    except UserError as exc:
        raise fail(str(exc)) from None
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    run_tuning(lambda: ref.build(), options, tuner_command=f"python -m autotune --workload {workload}")


def parse_workload_args(text: Optional[str]) -> dict[str, Any]:
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--workload-args is not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise UserError("--workload-args must be a JSON object, e.g. '{\"width\": 64}'")
    return value


def check_outputs(out: Path, plot: Optional[Path]) -> None:
    """Every output is checked before the first measurement: a run must never measure
    for minutes and then fail on a path."""
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


def tune_config(options: dict[str, Any], tuner_command: str):
    """The engine's :class:`autotune.tuner.TuneConfig` from the flags."""
    from autotune.tuner import TuneConfig

    target_mem = options.get("target_mem")
    if target_mem is not None and not target_mem.strip():
        raise UserError("--target-mem is empty; write e.g. 20GB, 20GiB, 512MiB or 80%")
    from_checkpoint = options.get("from_checkpoint")
    if from_checkpoint is not None and not Path(from_checkpoint).is_file():
        raise UserError(f"checkpoint '{from_checkpoint}' does not exist")

    def value(name):
        item = options.get(name)
        return item.value if isinstance(item, Enum) else item

    return TuneConfig(
        device=options.get("device") or "auto",
        target_mem=target_mem,
        objective=value("objective") or "goodput",
        lr_rule=value("lr_rule"),
        precision=value("precision"),
        start_batch=options.get("start_batch"),
        max_batch=options.get("max_batch", 4096),
        max_trials=options.get("max_trials", 16),
        trial_budget_s=options.get("trial_budget", 25.0),
        isolate=options.get("isolate", False),
        max_workers=options.get("max_workers"),
        compare_steps=options.get("compare_steps", 10),
        seed=options.get("seed", 0),
        find_edge=options.get("find_edge", False),
        noise_steps=options.get("noise_steps", 16),
        from_checkpoint=str(from_checkpoint) if from_checkpoint is not None else None,
        try_compile=options.get("try_compile", False),
        planned_epochs=options.get("planned_epochs", 10),
        tuner_command=tuner_command,
    )


def run_tuning(
    build_workload: Callable[[], Any],
    options: dict[str, Any],
    *,
    tuner_command: str,
    check: Callable[[], None] | None = None,
) -> None:
    """The whole command: check every input and output, join torchrun's process group,
    build the workload, measure, print, write. ``options``: the engine's flags
    (:func:`engine_options`). Every user error is one line."""
    out, plot, as_json = options["out"], options["plot"], options["as_json"]
    try:
        if check is not None:
            check()
        check_outputs(out, plot)
        cfg = tune_config(options, tuner_command)
        from autotune.distributed import cleanup, init_distributed, rank_prefix
    except UserError as exc:
        raise fail(str(exc)) from None

    try:
        from autotune.search import SearchError
        from autotune.tuner import tuner_timeout_s

        # Under torchrun: join the process group; this rank tunes cuda:LOCAL_RANK (or the CPU).
        ctx_dist = init_distributed(cfg.device, timeout_s=tuner_timeout_s(cfg))
        if ctx_dist.distributed:
            cfg = replace(cfg, device=str(ctx_dist.device))
        main_rank = ctx_dist.is_main
        workload = build_workload()
        result = _measure(workload, cfg, ctx_dist, main_rank)
    except UserError as exc:  # GpuNotUsable says exit 1: not a typo to correct
        raise fail(rank_prefix() + str(exc), code=getattr(exc, "exit_code", 2)) from None
    except SearchError as exc:  # under torchrun, names the rank that could not fit the start batch
        raise fail(f"{exc}; lower --start-batch or the model size, or raise --target-mem", code=1) from None
    finally:
        cleanup()
    if main_rank:
        write_outputs(result, out, plot, as_json, getattr(workload, "train_hint", None))


def _measure(workload, cfg, ctx_dist, main_rank: bool):
    from autotune.report import machine_table
    from autotune.tuner import Tuner

    with _status("probing", main_rank) as progress:
        tuner = Tuner(workload, cfg, report=lambda message: progress.update(f"measuring: {message}"),
                      dist=ctx_dist)
        machine = tuner.prepare()
    if main_rank:
        console.print(machine_table(machine))
    with _status("measuring", main_rank) as progress:
        tuner.report = lambda message: progress.update(f"measuring: {message}")
        return tuner.run()


def write_outputs(result, out: Path, plot: Optional[Path], as_json: bool,
                  train_hint: str | None = None) -> None:
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
    hint = (train_hint.format(out=out) if train_hint
            else "apply it with autotune.load_tuned (docs/library.md)")
    say(f"wrote {' and '.join(written)}; {hint}")
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
    # Rendered whole before anything is printed: a hand-edited measurement (a field of the
    # wrong type, a key removed) is one error line, not half the tables and a traceback.
    try:
        with console.capture() as captured:
            console.print(machine_table(shown.machine))
            print_report(console, shown)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise fail(f"tuned file {path}: its measurements cannot be shown, edited by hand? "
                   f"({type(exc).__name__}: {exc}); re-run the tuner to write a new one") from None
    console.file.write(captured.get())


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
