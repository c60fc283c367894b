"""autotune: measure, then choose batch size, precision, DataLoader workers, threads, knobs
and learning rates for any PyTorch training step, by goodput (throughput x statistical
efficiency) under an absolute memory target.

    import autotune
    result = autotune.tune(MyWorkload(), target_mem="20GB", objective="throughput")
    result.print_report()
    loader = DataLoader(dataset, **result.choice.dataloader_kwargs())

See docs/library.md. Importing this package is light (no torch): the names below load
on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Baseline", "ConfigError", "LoaderSettings", "SupervisedWorkload", "TrainStep", "TuneConfig",
    "TuneResult", "TunedChoice", "TunedFile", "Tuner", "UserError", "Workload", "WorkloadRef",
    "load_tuned", "load_workload", "save_tuned", "tune",
]

_LAZY = {
    "Baseline": "autotune.workload", "LoaderSettings": "autotune.workload",
    "SupervisedWorkload": "autotune.workload", "TrainStep": "autotune.workload",
    "Workload": "autotune.workload", "WorkloadRef": "autotune.workload",
    "load_workload": "autotune.workload",
    "TuneConfig": "autotune.tuner", "TuneResult": "autotune.tuner", "Tuner": "autotune.tuner",
    "TunedChoice": "autotune.tuned", "TunedFile": "autotune.tuned",
    "load_tuned": "autotune.tuned", "save_tuned": "autotune.tuned",
    "UserError": "autotune.errors", "ConfigError": "autotune.errors",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'autotune' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def tune(workload, *, workload_kwargs: dict | None = None, out=None, report=None, **options):
    """Tune ``workload`` on this machine and return a :class:`autotune.tuner.TuneResult`.

    ``workload``: an :class:`autotune.workload.Workload`, or ``"package.module:factory"``
    (built with ``workload_kwargs``; such a workload's CPU trials run in child processes,
    which rebuild it the same way). ``options`` are :class:`autotune.tuner.TuneConfig`'s
    fields, named like the command's flags: ``target_mem="20GB"``,
    ``objective="throughput"``, ``lr_rule``, ``precision``, ``device``, ``max_batch``,
    ``max_trials``, ``max_workers``, ``find_edge``, ``try_compile``, ``seed``...
    (``trial_budget`` for ``trial_budget_s``). ``out``: also write the tuned file there.
    ``report``: called with a line per measurement (progress).
    """
    from autotune.errors import ConfigError
    from autotune.tuner import TuneConfig, Tuner
    from autotune.workload import Workload, load_workload

    if isinstance(workload, str):
        workload = load_workload(workload, workload_kwargs)
    elif workload_kwargs:
        raise ConfigError("workload_kwargs only go with a 'package.module:factory' workload")
    if not isinstance(workload, Workload):
        raise ConfigError(f"tune() needs an autotune.Workload, got {type(workload).__name__}")
    if "trial_budget" in options:
        options["trial_budget_s"] = options.pop("trial_budget")
    try:
        cfg = TuneConfig(**options)
    except TypeError as exc:
        raise ConfigError(f"tune(): {exc}") from None
    result = Tuner(workload, cfg, report=report).run()
    if out is not None:
        result.save(out)
    return result
