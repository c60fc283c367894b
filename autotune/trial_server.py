"""A pre-imported trial server: import torch once, run each trial in a fork of it.

A CPU trial runs in its own process so that its peak memory is its own and a batch
too large for the RAM ends that process, not the tuner. A fresh interpreter per trial
pays ``import torch`` (several seconds on a small machine) before it measures
anything. Here one *server* process imports the heavy modules once, then forks a
*child* per trial; the child starts with everything imported.

Why the peak stays honest:

- the server only imports; it never runs a trial, so every child inherits the same
  lean image, and nothing one trial allocates survives into the next (the child
  exits; its memory goes back to the system);
- the child resets its resident-set high-water mark right after the fork (Linux:
  ``echo 5 > /proc/self/clear_refs``) and reports ``VmHWM`` at the end: the peak
  of its own resident set during this trial only, not an inherited one;
  ``start_rss_bytes`` is what it held at the start, so ``peak - start`` is the
  trial's own growth;
- a forked child counts only the inherited pages it maps at once (the server's
  anonymous memory) or touches later, not the shared-library pages the server had
  resident, so its own peak is below a fresh process's (measured: 440 MiB against
  728 MiB for a tiny ARWGAN trial). A training process holds everything its imports
  touched, so the figure compared with the memory target is
  :attr:`ForkedResult.process_peak_bytes` = the server's resident set at the fork +
  the child's growth (748 MiB there: within 3 % of the fresh process, on the safe
  side, since growth also counts library pages the server already held);
- a watchdog thread in the child ends it with :data:`EXIT_OVER_MEMORY` the moment
  that same figure (its resident set + server's - its start) passes the limit: reported as ``over_memory`` (the tuner's
  ``oom``), never a swapping machine.

Why not ``multiprocessing``'s forkserver with ``set_forkserver_preload``: it does the
same fork, but its preload list is process-global and fixed at the first start, and
each child re-imports the parent's ``__main__`` (the CLI, pytest). This server is
private to its owner and stops with it (``close``, or when its stdin closes).

Protocol (JSON lines): the owner writes ``{"target": "module:function", "payload":
..., "limit": bytes|null}``; the server forks, answers ``{"pid": n}`` at once (so the
owner can kill a child past its time limit), then ``{"exit": code, "result": ...}``
when the child has ended. ``target`` is called in the child with ``payload`` and
must return something JSON can carry.

POSIX only (``os.fork``). Generic: nothing here knows about ARWGAN; the adapter for
:class:`autotune.trial.TrialSpec` is :func:`run_trial_preimported`.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "EXIT_OVER_MEMORY",
    "ForkedResult",
    "TrialServer",
    "TrialServerError",
    "default_server",
    "run_trial_preimported",
]

#: Exit code of a child stopped by its memory watchdog (the same as autotune.trial's).
EXIT_OVER_MEMORY = 86
#: Exit code of a child whose target raised (the message comes in the result).
EXIT_ERROR = 1

_START_TIMEOUT_S = 300.0  # importing torch on a loaded 2-core machine can take a minute
_REPLY_TIMEOUT_S = 30.0


class TrialServerError(RuntimeError):
    """The server died or broke the protocol (not a trial's failure: that is a result)."""


@dataclass
class ForkedResult:
    """What one child did, as the owner sees it."""

    value: Any
    """The target's return value; None unless the child finished normally."""
    exit_code: int | None
    """The child's exit code; negative: killed by that signal (-9: SIGKILL)."""
    peak_rss_bytes: int | None
    """High-water mark of the child's resident set since its fork; None if unknown."""
    start_rss_bytes: int | None
    """The child's resident set right after the fork (inherited pages it maps)."""
    base_rss_bytes: int | None
    """The server's resident set when it forked the child: the imports' footprint."""
    peak_reset: bool
    """True when the high-water mark was reset at the fork (Linux clear_refs)."""
    seconds: float
    """Wall time from the request to the child's end, as the owner measured it."""
    timed_out: bool = False
    error: str = ""
    """The exception the target raised (one line), or the log's last line for a crash."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def process_peak_bytes(self) -> int | None:
        """Peak of a process that imported what the server did and ran this call: the
        server's resident set plus the child's own growth (None when unmeasured)."""
        if None in (self.peak_rss_bytes, self.start_rss_bytes, self.base_rss_bytes):
            return None
        return self.base_rss_bytes + self.peak_rss_bytes - self.start_rss_bytes

    @property
    def over_memory(self) -> bool:
        """Ended by its watchdog, or by the kernel's OOM killer (SIGKILL, not ours)."""
        return self.exit_code == EXIT_OVER_MEMORY or (
            self.exit_code == -signal.SIGKILL and not self.timed_out
        )


class TrialServer:
    """A server process holding ``preload`` imported, forking one child per call.

    Use as a context manager, or call :meth:`close`; a server whose owner exits
    also stops (its stdin closes). Calls are sequential: one child at a time, so
    trials never compete for the cores they measure.
    """

    def __init__(self, preload: tuple[str, ...] = ("torch",)) -> None:
        self.preload = tuple(preload)
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._buffer = b""

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> TrialServer:
        if self._proc is not None:
            return self
        # The log collects what the server and its children print (torch warnings, a
        # crash's traceback); the owner's console stays clean.
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "autotune.trial_server", *self.preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=_child_env(),
        )
        reply = self._read(_START_TIMEOUT_S)
        if reply.get("ready") is not True:
            self.close()
            raise TrialServerError(f"trial server did not start: {reply}")
        return self

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()  # the server's loop ends at EOF
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        self._buffer = b""

    def __enter__(self) -> TrialServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- one call -----------------------------------------------------------------------
    def call(
        self,
        target: str,
        payload: Any,
        *,
        memory_limit_bytes: int | None = None,
        timeout_s: float | None = None,
    ) -> ForkedResult:
        """Run ``target(payload)`` in a fresh fork of the server and wait for it.

        Past ``timeout_s`` the child is killed and the result says ``timed_out``.
        """
        self.start()
        started = time.perf_counter()
        self._write({"target": target, "payload": payload, "limit": memory_limit_bytes})
        forked = self._read(_REPLY_TIMEOUT_S)
        pid = forked["pid"]
        timed_out = False
        try:
            reply = self._read(timeout_s)
        except TimeoutError:
            timed_out = True
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it ended just now; its reply follows
            reply = self._read(_REPLY_TIMEOUT_S)
        seconds = time.perf_counter() - started
        result = reply.get("result") or {}
        error = result.get("error", "")
        if reply["exit"] != 0 and not error:
            error = self._log_tail()
        return ForkedResult(
            value=result.get("value"),
            exit_code=reply["exit"],
            peak_rss_bytes=result.get("peak_rss_bytes"),
            start_rss_bytes=result.get("start_rss_bytes"),
            base_rss_bytes=forked.get("base_rss"),
            peak_reset=bool(result.get("peak_reset")),
            seconds=seconds,
            timed_out=timed_out,
            error=error,
        )

    # -- pipes ----------------------------------------------------------------------------
    def _write(self, message: dict) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise TrialServerError(f"trial server is not running; its log: {self._log_tail()}")
        try:
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            proc.stdin.flush()
        except BrokenPipeError:
            raise TrialServerError(f"trial server died; its log: {self._log_tail()}") from None

    def _read(self, timeout_s: float | None) -> dict:
        """The server's next message. TimeoutError past ``timeout_s`` (None: no limit)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise TrialServerError(f"trial server died; its log: {self._log_tail()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0, os.SEEK_END)
        size = self._log.tell()
        self._log.seek(max(0, size - 4096))
        lines = self._log.read().decode(errors="replace").strip().splitlines()
        self._log.seek(0, os.SEEK_END)
        return lines[-1][:300] if lines else "no output"


# -- the default server and the TrialSpec adapter ---------------------------------------------
_servers: dict[tuple[str, ...], TrialServer] = {}


def default_server(preload: tuple[str, ...] = ("torch", "autotune.trial")) -> TrialServer:
    """A started server for ``preload``, shared within this process, closed at exit."""
    server = _servers.get(preload)
    if server is None or not server.running:
        server = _servers[preload] = TrialServer(preload).start()
        atexit.register(server.close)
    return server


def _run_trial_payload(payload: dict) -> dict:
    """Child side of :func:`run_trial_preimported`: the unchanged in-process trial."""
    from autotune.trial import TrialSpec, run_isolated_trial

    # As a fresh trial process does: on CUDA (--isolate), device and allocator cap first.
    return asdict(run_isolated_trial(TrialSpec(**payload)))


def run_trial_preimported(spec, timeout_s: float | None = None, server: TrialServer | None = None):
    """:func:`autotune.trial.run_trial_subprocess`, in a fork of a pre-imported server.

    Same outcomes: ``too_slow`` past ``timeout_s``, ``oom`` when the watchdog (or the
    kernel) ended the child, ``error`` for any other failure. On a CPU the peak is
    :attr:`ForkedResult.process_peak_bytes` (see the module docstring); on CUDA the
    trial's allocator figure is kept.
    """
    from autotune.trial import TrialMeasurement

    server = server or default_server()
    result = server.call("autotune.trial_server:_run_trial_payload", asdict(spec),
                         memory_limit_bytes=spec.memory_limit_bytes, timeout_s=timeout_s)

    def failed(reason: str, detail: str) -> TrialMeasurement:
        return TrialMeasurement(batch=spec.batch, ok=False, reason=reason, detail=detail,
                                seconds=result.seconds)

    if result.timed_out:
        return failed("too_slow", f"no result within {timeout_s:.0f} s")
    if result.over_memory:
        limit = spec.memory_limit_bytes
        if result.exit_code == EXIT_OVER_MEMORY and limit:
            return failed("oom", f"resident set passed the {limit / 2**30:.2f} GiB limit")
        return failed("oom", "killed (out of memory)")
    if not result.ok:
        return failed("error", f"trial process exited {result.exit_code}: {result.error}")
    measurement = TrialMeasurement(**result.value)
    measurement.seconds = result.seconds
    if measurement.ok and spec.device.startswith("cpu") and result.process_peak_bytes is not None:
        measurement.peak_bytes = result.process_peak_bytes
    return measurement


# -- server and child side ----------------------------------------------------------------------
def _status_bytes(key: str) -> int | None:
    """A ``kB`` line of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset this process's resident-set high-water mark to its current size (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """Peak resident set of this process: VmHWM, whose count starts afresh with the new
    address space of an exec (and at a reset). Not ``ru_maxrss`` where VmHWM exists: Linux
    carries that maximum across execve, so a trial process spawned from a large parent
    (subprocess uses vfork) would report the parent's peak instead of its own."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # bytes on macOS


def _watchdog(limit_bytes: int, offset_bytes: int = 0, interval_s: float = 0.01) -> None:
    """End this process the moment its resident set + ``offset_bytes`` passes ``limit_bytes``."""
    import psutil

    process = psutil.Process()

    def watch() -> None:
        while True:
            if process.memory_info().rss + offset_bytes > limit_bytes:
                os._exit(EXIT_OVER_MEMORY)
            time.sleep(interval_s)

    threading.Thread(target=watch, daemon=True).start()


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _child(request: dict, result_fd: int, base_rss: int | None) -> None:
    """Run one request in the forked child; never returns."""
    code = 0
    try:
        os.dup2(2, 1)  # stray prints go to the log, never into the server's protocol
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        reset = _reset_peak()
        start_rss = _status_bytes("VmRSS")
        if request.get("limit"):
            offset = base_rss - start_rss if None not in (base_rss, start_rss) else 0
            _watchdog(int(request["limit"]), offset)
        value = _resolve(request["target"])(request["payload"])
        result = {"value": value, "peak_rss_bytes": peak_rss_bytes(),
                  "start_rss_bytes": start_rss, "peak_reset": reset}
    except BaseException as exc:  # noqa: BLE001 - reported to the owner, whatever it is
        traceback.print_exc()
        text = str(exc).splitlines()[0][:300] if str(exc) else ""
        result = {"error": f"{type(exc).__name__}: {text}" if text else type(exc).__name__}
        code = EXIT_ERROR
    try:
        blob = json.dumps(result).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        blob = json.dumps({"error": f"result is not JSON: {exc}"}).encode() + b"\n"
        code = EXIT_ERROR
    view = memoryview(blob)
    while view:
        view = view[os.write(result_fd, view):]
    sys.stderr.flush()
    os._exit(code)


def _child_env() -> dict[str, str]:
    """The owner's environment, with its import path: whatever the owner can import
    (a workload's module found through a path it added, the folder it was started
    in) the server and its children can import too. Entries of the interpreter's own
    installation are left to the interpreter."""
    env = dict(os.environ)
    own = (os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix))
    extra = []
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        if path.startswith(own) or not os.path.isdir(path) or path in extra:
            continue
        extra.append(path)
    given = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*extra, *(p for p in given if os.path.realpath(p) not in extra)])
    return env


def _serve(preload: list[str]) -> None:
    """Server loop: import ``preload``, then one fork per request line on stdin."""
    for name in preload:
        importlib.import_module(name)
    out = sys.stdout.buffer

    def send(message: dict) -> None:
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    send({"ready": True})
    for line in sys.stdin.buffer:
        request = json.loads(line)
        read_fd, write_fd = os.pipe()
        base_rss = _status_bytes("VmRSS")
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child(request, write_fd, base_rss)
        os.close(write_fd)
        send({"pid": pid, "base_rss": base_rss})
        with os.fdopen(read_fd, "rb") as reader:
            # One line, then the child exits; a killed child gives EOF instead. (Not
            # read to EOF: a grandchild holding the pipe would keep us waiting.)
            raw = reader.readline()
        _, status = os.waitpid(pid, 0)
        send({"exit": os.waitstatus_to_exitcode(status),
              "result": json.loads(raw) if raw.strip() else None})


if __name__ == "__main__":
    _serve(sys.argv[1:])
