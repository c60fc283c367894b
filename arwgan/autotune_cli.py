"""``arwgan-autotune``: the engine's tuning command (:mod:`autotune.cli`) with ARWGAN's
model and data flags. Parse flags, build the ARWGAN workload, run the engine, print
tables, write tuned.json for ``arwgan-train --from-tuned``.

Under ``torchrun --nproc-per-node N --no-python arwgan-autotune ...`` every process
measures its own device and the ranks agree on one configuration (see
:mod:`autotune.tuner`); rank 0 prints the tables and writes the one tuned file.
"""

from __future__ import annotations

import typer

from typing import Any

from arwgan.cli import Channels, DataDir, ImageSize, MessageBits, Noise
from arwgan.console import CONTEXT_SETTINGS, entry_point, fail, typer_app
from arwgan.errors import UserError
from autotune.cli import run_tuning, show_tuned, with_engine_options

app = typer_app()


@app.command(context_settings=CONTEXT_SETTINGS)
@with_engine_options
def autotune(
    ctx: typer.Context,
    data_dir: DataDir = None,
    image_size: ImageSize = None,
    message_bits: MessageBits = None,
    channels: Channels = None,
    noise: Noise = None,
    **options: Any,
) -> None:
    """Measure this machine and choose batch, precision, workers, knobs and learning rate for ARWGAN."""
    if options["show"] is not None:
        show_tuned(ctx, options["show"], options["as_json"])
        return
    try:
        from arwgan.config import ModelConfig

        defaults = ModelConfig()
        model = ModelConfig(
            image_size=image_size if image_size is not None else defaults.image_size,
            message_bits=message_bits if message_bits is not None else defaults.message_bits,
            channels=channels if channels is not None else defaults.channels,
            noise=noise if noise is not None else defaults.noise,
        )
    except UserError as exc:
        raise fail(str(exc)) from None
    from_checkpoint = options["from_checkpoint"]

    def check() -> None:
        if data_dir is not None and not data_dir.exists():
            raise UserError(f"data folder '{data_dir}' does not exist")
        if from_checkpoint is not None and not from_checkpoint.is_file():
            raise UserError(f"checkpoint '{from_checkpoint}' does not exist")
        if data_dir is not None and not data_dir.is_dir():
            raise UserError(f"data folder '{data_dir}' is a file, not a folder")

    def build():
        from arwgan.workload import ArwganWorkload

        return ArwganWorkload(model, str(data_dir) if data_dir is not None else None,
                              seed=options["seed"])

    run_tuning(build, options, tuner_command="arwgan-autotune", check=check)


main = entry_point(app)


if __name__ == "__main__":  # torchrun --nproc-per-node N -m arwgan.autotune_cli ...
    main()
