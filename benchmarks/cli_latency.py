"""How long the CLIs take to answer ``--help`` and a bad flag, as a ratio against an
empty Python start (``python -c pass``) measured in the same run, so that the figure
means the same on a fast and a slow machine.

    python benchmarks/cli_latency.py [--runs 7]

Each command runs ``--runs`` times, interleaved with the baseline; the medians are
compared. ``arwgan-train --batch 0`` must stop at flag validation, before torch is
imported (acceptance of issue 8: well under a second on an ordinary machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "arwgan-train --help": ["-m", "arwgan.cli", "--help"],
    "arwgan-train --batch 0": ["-m", "arwgan.cli", "--batch", "0"],
    "arwgan-autotune --help": ["-m", "arwgan.autotune_cli", "--help"],
    "arwgan (no command)": ["-m", "arwgan"],
}


def wall_s(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(runs):  # interleaved: a load change hits every command alike
        for name, args in COMMANDS.items():
            times[name].append(wall_s(args, env))
    base = statistics.median(times["python -c pass"])
    print(f"{'command':28} {'median s':>9} {'x python -c pass':>17}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:28} {median:9.3f} {median / base:17.1f}")


if __name__ == "__main__":
    main()
