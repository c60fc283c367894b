"""Multi-process training under ``torchrun``: the engine's :mod:`autotune.distributed`
(one :class:`DistContext` per process, collectives through ``torch.distributed``),
which ARWGAN's trainer and tuner use unchanged."""

from autotune.distributed import (  # noqa: F401
    DEFAULT_TIMEOUT_S, TIMEOUT_ENV, DistContext, cleanup, env_local_rank, env_rank,
    env_world_size, init_distributed, is_main, local_main_first, rank_prefix, rank_seed,
    reduce_metric_sums, single_process, timeout_from_env,
)
