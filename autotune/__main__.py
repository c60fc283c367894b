"""``python -m autotune --workload package.module:factory ...`` (see :mod:`autotune.cli`)."""

from autotune.cli import main

main()
