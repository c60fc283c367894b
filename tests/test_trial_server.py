"""The pre-imported trial server: per-trial peaks that are the child's own, the memory
watchdog, errors and timeouts as results; then the real ARWGAN trial through it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers import arwgan_ref

from autotune.trial_server import EXIT_OVER_MEMORY, TrialServer, run_trial_preimported

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

MiB = 2**20

HELPERS = '''
import time

def hold(mib):
    """Allocate and touch ``mib`` MiB, hold it for a moment, return nothing big."""
    block = bytearray(mib * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(0.05)
    return len(block)

def boom(payload):
    raise ValueError(f"boom {payload}")

def sleep(seconds):
    time.sleep(seconds)
    return seconds
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server with nothing heavy preloaded and the helper module on its path."""
    folder = tmp_path_factory.mktemp("trial-helpers")
    (folder / "trial_helpers.py").write_text(HELPERS)
    with pytest.MonkeyPatch.context() as patch:
        root = str(Path(__file__).resolve().parents[1])
        patch.setenv("PYTHONPATH", os.pathsep.join([str(folder), root]))
        with TrialServer(preload=("trial_helpers",)) as started:
            yield started


def test_same_work_gives_the_same_peak_and_a_big_trial_does_not_inflate_the_next(server):
    first = server.call("trial_helpers:hold", 40)
    big = server.call("trial_helpers:hold", 160)
    second = server.call("trial_helpers:hold", 40)
    assert first.ok and big.ok and second.ok
    assert first.value == 40 * MiB
    assert first.peak_reset and second.peak_reset
    # The trial's own growth is the allocation (within 8 MiB of interpreter noise) ...
    assert abs(first.peak_rss_bytes - first.start_rss_bytes - 40 * MiB) <= 8 * MiB
    assert abs(big.peak_rss_bytes - big.start_rss_bytes - 160 * MiB) <= 8 * MiB
    # ... and the trial after the big one reports what the first did (within 4 MiB).
    assert abs(second.peak_rss_bytes - first.peak_rss_bytes) <= 4 * MiB


def test_watchdog_ends_a_child_past_its_limit(server):
    # The limit applies to the figure reported: the server's resident set + the growth.
    small = server.call("trial_helpers:hold", 1)
    assert small.process_peak_bytes == (
        small.base_rss_bytes + small.peak_rss_bytes - small.start_rss_bytes
    )
    result = server.call("trial_helpers:hold", 400,
                         memory_limit_bytes=small.base_rss_bytes + 64 * MiB)
    assert result.exit_code == EXIT_OVER_MEMORY
    assert result.over_memory and not result.ok
    assert result.value is None
    assert server.call("trial_helpers:hold", 1).ok  # the server itself is unharmed


def test_an_exception_is_a_result(server):
    result = server.call("trial_helpers:boom", 7)
    assert (result.ok, result.exit_code, result.error) == (False, 1, "ValueError: boom 7")
    assert not result.over_memory


def test_timeout_kills_the_child_and_the_server_goes_on(server):
    result = server.call("trial_helpers:sleep", 30, timeout_s=0.5)
    assert result.timed_out and not result.ok and not result.over_memory
    assert result.exit_code == -9
    assert server.call("trial_helpers:sleep", 0).value == 0


def test_unknown_target_is_an_error_result(server):
    result = server.call("trial_helpers:missing", None)
    assert result.exit_code == 1 and result.error.startswith("AttributeError")


# The real trial through the server --------------------------------------------------------------

@pytest.fixture(scope="module")
def torch_server():
    with TrialServer(preload=("torch", "autotune.trial", "arwgan.step")) as started:
        yield started


def _spec(batch: int, **kwargs):
    from arwgan.config import ModelConfig
    from autotune.trial import TrialSpec

    model = ModelConfig(image_size=16, message_bits=4, channels=8)
    return TrialSpec(workload=arwgan_ref(model), precision="fp32", device="cpu", batch=batch,
                     timing=dict(min_samples=2, max_samples=2, min_seconds=0.0, warmup_steps=1),
                     threads=1, **kwargs)


@pytest.mark.slow
def test_two_successive_cpu_trials_report_the_same_peak(torch_server):
    """Stated tolerance: 2 % of the peak (the interpreter, torch and the model weigh
    several hundred MiB; a trial's allocator noise is a few MiB; measured here: 0.1 %)."""
    first = run_trial_preimported(_spec(8), server=torch_server)
    large = run_trial_preimported(_spec(128), server=torch_server)
    second = run_trial_preimported(_spec(8), server=torch_server)
    assert first.ok and large.ok and second.ok, (first, large, second)
    assert abs(second.peak_bytes - first.peak_bytes) <= 0.02 * first.peak_bytes
    # The large batch really took more, and none of it leaked into the next trial.
    assert large.peak_bytes > first.peak_bytes + 8 * MiB
    assert first.images_per_s > 0 and first.finite


@pytest.mark.slow
def test_forked_peak_is_close_to_a_fresh_process_peak(torch_server):
    """The forked figure stands for a fresh process's: within 10 % of the peak that
    run_trial_subprocess (a new interpreter) reports for the same trial."""
    from autotune.trial import run_trial_subprocess

    forked = run_trial_preimported(_spec(8), server=torch_server)
    fresh = run_trial_subprocess(_spec(8))
    assert forked.ok and fresh.ok
    assert abs(forked.peak_bytes - fresh.peak_bytes) <= 0.10 * fresh.peak_bytes


@pytest.mark.slow
def test_trial_past_the_memory_limit_is_an_oom(torch_server):
    spec = _spec(8, memory_limit_bytes=64 * MiB)  # below what torch alone holds
    measurement = run_trial_preimported(spec, server=torch_server)
    assert (measurement.ok, measurement.reason) == (False, "oom")
    assert measurement.detail == "resident set passed the 0.06 GiB limit"


@pytest.mark.slow
def test_trial_time_limit_is_too_slow(torch_server):
    spec = _spec(8)
    spec.timing = dict(min_samples=10**6, max_samples=10**6, max_seconds=10**6, warmup_steps=1)
    measurement = run_trial_preimported(spec, timeout_s=1.0, server=torch_server)
    assert (measurement.ok, measurement.reason) == (False, "too_slow")


def test_server_module_imports_no_torch():
    import subprocess

    code = ("import sys, autotune.trial_server, autotune.timing\n"
            "assert 'torch' not in sys.modules\n")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_spawned_process_reports_its_own_peak_not_its_parents():
    """A trial process started with subprocess (vfork + exec) from a parent holding much
    memory must report its own peak: Linux carries ru_maxrss across execve, which once
    made every CPU trial spawned by a large tuner process report the tuner's peak."""
    import subprocess

    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc")
    ballast = bytearray(600 * 2**20)
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])  # touch every page: resident
    code = "from autotune.trial_server import peak_rss_bytes; print(peak_rss_bytes())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    del ballast
    child_peak = int(result.stdout.strip())
    assert child_peak < 200 * 2**20, f"child reported {child_peak / 2**20:.0f} MiB"
