"""Plant one known bug at a time in a temporary copy of the repository and see whether the
tests notice: a small mutation check of our own (not part of ``make test``).

Each mutant names the bug, the file, an exact snippet of the original code and its
replacement (several edits for bugs that span places). A mutant whose snippet is no
longer in the code (the code moved on) is reported "not applicable" rather than failing:
re-target it by editing its snippet.

For each mutant the relevant test files (and an optional ``-k`` selection) run with
``-x`` in two passes that together cover everything ``make test`` runs there: first the
fast tests (``-m "not slow and not gpu"``), and only when those pass, the ``slow`` and
``gpu`` ones (gpu tests skip without CUDA). A mutant is

- ``caught``            a fast test failed (what ``make test`` on a laptop shows first);
- ``caught (slow only)`` only a slow test failed;
- ``missed``            every selected test passed: the bug would ship;
- ``timeout``           the tests ran past ``--timeout`` seconds (counted as not caught);
- ``not applicable``    a snippet was not found exactly once.

Before the mutants, every test selection runs once on the unmodified copy: a selection
that fails there would make every mutant look caught, so the check stops.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/mutation_check.py            # all
    .venv/bin/python benchmarks/mutation_check.py --list                     # names
    .venv/bin/python benchmarks/mutation_check.py --only ssim-sigma-3.0 ...  # some
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Edit:
    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]
    select: str | None = None
    """A ``-k`` expression narrowing ``tests``; None runs the files whole."""
    known: bool = field(default=False)
    """Already caught before issue 15 (kept so that the score means something)."""


def m(name, what, edits, tests, select=None, known=False) -> Mutant:
    if isinstance(edits, Edit):
        edits = (edits,)
    return Mutant(name, what, tuple(edits), tuple(tests), select, known)


NOISE, STEP, TRAINER = "arwgan/noise.py", "arwgan/step.py", "arwgan/trainer.py"
TRIAL, TUNER, METRICS = "autotune/trial.py", "autotune/tuner.py", "arwgan/metrics.py"
SEARCH, INFERENCE = "autotune/search.py", "arwgan/inference.py"

MUTANTS: list[Mutant] = [
    # -- the bugs of issue 15's table ---------------------------------------------------
    m("noise-identity-always", "Noiser draws a layer but always applies identity",
      Edit(NOISE, "return self.layers[choice](encoded, cover)", "return self.layers[0](encoded, cover)"),
      ["tests/test_step_observed.py", "tests/test_noise.py"]),
    m("noise-identity-never", "Noiser never draws identity",
      Edit(NOISE, "choice = int(torch.randint(len(self.layers), (), generator=self._generator))",
           "choice = 1 + int(torch.randint(len(self.layers) - 1, (), generator=self._generator))"),
      ["tests/test_step_observed.py", "tests/test_noise.py"]),
    m("ddp-rank0-alone-broadcasts", "no DDP; rank 0's weights broadcast to every rank after each step",
      [Edit(STEP, "            self.generator = _data_parallel(self.generator, device)\n"
                  "            self.discriminator = _data_parallel(self.nets.discriminator, device)\n",
            "            pass\n"),
       Edit(STEP, "        self.step_count += 1\n",
            "        self.step_count += 1\n"
            "        if self.dist is not None:\n"
            "            import torch.distributed as _d\n"
            "            for _p in self.nets.parameters():\n"
            "                _d.broadcast(_p.data, 0)\n")],
      ["tests/test_ddp.py"]),
    m("ddp-same-shard", "every rank reads rank 0's shard",
      Edit(TRAINER, "len(self.train_set), seed=cfg.seed, epoch=0, rank=self.dist.rank, world_size=world",
           "len(self.train_set), seed=cfg.seed, epoch=0, rank=0, world_size=world"),
      ["tests/test_ddp.py"]),
    m("ddp-no-rank-noise-seed", "the per-rank noise seed is not applied",
      Edit(TRAINER, "            torch.manual_seed(rank_seed(cfg.seed, self.dist.rank))\n",
           "            pass\n"),
      ["tests/test_ddp.py"]),
    m("ddp-no-wrapping", "no DistributedDataParallel at all",
      Edit(STEP, "        if self.dist is not None:\n            self.generator = _data_parallel(",
           "        if False:\n            self.generator = _data_parallel("),
      ["tests/test_ddp.py"]),
    m("autocast-does-nothing", "bf16/fp16 autocast is a no-op",
      Edit(STEP, "return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])",
           "return contextlib.nullcontext()"),
      ["tests/test_step_observed.py", "tests/test_train.py", "tests/test_gpu.py"]),
    m("scaler-not-restored", "the gradient scalers' state is not restored on resume",
      Edit(STEP, '        self.scaler_g.load_state_dict(state["scaler_g"])\n'
                 '        self.scaler_d.load_state_dict(state["scaler_d"])\n', ""),
      ["tests/test_step_observed.py", "tests/test_train.py", "tests/test_gpu.py"]),
    m("trial-watchdog-disabled", "the CPU trial's memory watchdog never starts",
      Edit(TRIAL, "        _watchdog(spec.memory_limit_bytes)\n", "        pass\n"),
      ["tests/test_tuner_observed.py", "tests/test_tuner.py"]),
    m("trial-watchdog-kill-is-error", "a watchdog kill is reported as an error, not an OOM",
      Edit(TRIAL, 'batch=spec.batch, ok=False, reason="oom", detail=detail, seconds=seconds',
           'batch=spec.batch, ok=False, reason="error", detail=detail, seconds=seconds'),
      ["tests/test_tuner_observed.py", "tests/test_tuner.py"]),
    m("verdict-seed-runs-recommended", "the verdict's seed-default side runs the recommendation",
      Edit(TUNER, '"seed_default": (SEED_LOADER, SEED_PRECISION, False, None),',
           '"seed_default": (recommended.loader, recommended.precision, False, None),'),
      ["tests/test_tuner_observed.py", "tests/test_tuner.py"]),
    m("ssim-sigma-3.0", "SSIM's Gaussian window has sigma 3.0 instead of 1.5",
      Edit(METRICS, "SSIM_SIGMA = 1.5", "SSIM_SIGMA = 3.0"),
      ["tests/test_metrics.py"]),
    # -- bugs the suite caught before (batch search, resume, noise maths) ----------------
    m("search-margin-ignored", "the batch search ignores the safety margin",
      Edit(SEARCH, "return self.target_bytes - self.margin_bytes", "return self.target_bytes"),
      ["tests/test_search.py"], known=True),
    m("search-coarse-resolution", "bisection stops at 1/5 of the batch instead of 1/20",
      Edit(SEARCH, "return 1 if batch < 64 else -(-batch // 20)", "return 1 if batch < 64 else -(-batch // 5)"),
      ["tests/test_search.py"], known=True),
    m("resume-noiser-rng", "the noise layer choice's generator is not restored on resume",
      Edit(STEP, '        self.nets.noiser.set_rng_state(state["noiser_rng"])\n', ""),
      ["tests/test_train.py"], known=True),
    m("resume-sampler-position", "a mid-epoch resume restarts the epoch's order",
      Edit(TRAINER, "start=self.epoch_step * batch * world)", "start=0)"),
      ["tests/test_train.py"], known=True),
    m("resume-global-rng", "the global torch RNG is not restored on resume",
      Edit(TRAINER, '        else:\n            set_rng_states(state["rng"])\n', ""),
      ["tests/test_train.py"], known=True),
    m("noise-dropout-inverted", "dropout keeps the cover where it should keep the encoded pixel",
      Edit(NOISE, "mask = torch.rand((1, 1, height, width), device=encoded.device) < keep",
           "mask = torch.rand((1, 1, height, width), device=encoded.device) >= keep"),
      ["tests/test_noise.py"], known=True),
    m("noise-jpeg-quality-scaling", "JPEG tables scaled with 200 - q instead of 200 - 2q",
      Edit(NOISE, "else 200 - 2 * quality", "else 200 - quality"),
      ["tests/test_noise.py"], known=True),
    m("noise-crop-inverted", "crop returns the cover's window instead of the encoded image's",
      Edit(NOISE, "        return encoded[..., rows, cols]\n", "        return cover[..., rows, cols]\n"),
      ["tests/test_noise.py"], known=True),
    # -- more, across the rest of the code ------------------------------------------------
    m("psnr-peak-1", "PSNR on [-1, 1] computed with peak 1 instead of 2",
      Edit(METRICS, "10 * torch.log10(4.0 / mse_per_image(a, b))", "10 * torch.log10(1.0 / mse_per_image(a, b))"),
      ["tests/test_metrics.py"]),
    m("bit-accuracy-threshold-0", "decoded bits thresholded at 0 instead of 0.5",
      Edit(METRICS, "((decoded.float() > 0.5) == (message > 0.5))", "((decoded.float() > 0.0) == (message > 0.5))"),
      ["tests/test_metrics.py"]),
    m("extract-inverted", "extract reports the inverted bits",
      Edit(INFERENCE, "        bits = (mean > 0.5).float()\n        confidence", "        bits = (mean < 0.5).float()\n        confidence"),
      ["tests/test_inference.py"]),
    m("embed-ignores-message", "embed writes the all-zero message whatever is asked",
      Edit(INFERENCE, "self.nets.encoder(chunk, bits.expand(chunk.shape[0], -1))",
           "self.nets.encoder(chunk, torch.zeros_like(bits).expand(chunk.shape[0], -1))"),
      ["tests/test_inference.py"]),
    m("warmup-off-by-one", "warm-up starts at 0 instead of 1/warmup_steps",
      Edit(STEP, "return min(1.0, (step + 1) / warmup_steps)", "return min(1.0, step / warmup_steps)"),
      ["tests/test_train.py"]),
    m("skipped-step-keeps-bn-stats", "a skipped step keeps the BatchNorm statistics it moved",
      Edit(STEP, "            torch._foreach_copy_(self._bn_stats, bn_snapshot)\n", "            pass\n"),
      ["tests/test_train.py"]),
    m("ddp-metrics-not-averaged", "epoch losses summed over ranks instead of averaged",
      Edit(TRAINER, "reduced = {name: packed[i] / world for i, name in enumerate(names)}",
           "reduced = {name: packed[i] for i, name in enumerate(names)}"),
      ["tests/test_ddp.py"]),
    m("loader-long-tmpdir-hang", "DataLoader workers keep a temporary folder too long for their sockets",
      Edit("arwgan/data.py", "worker_init_fn=short_socket_tempdir if workers else None,", "worker_init_fn=None,"),
      ["tests/test_data.py"]),
    m("cuda-probe-always-available", "the real CUDA probe says CUDA is there",
      Edit("autotune/device.py", "        return bool(self._cuda().is_available())\n", "        return True\n"),
      ["tests/test_tuner_observed.py", "tests/test_probes.py"]),
    m("trial-peak-from-maxrss", "a CPU trial's peak read from ru_maxrss, which Linux carries across exec",
      Edit("autotune/trial_server.py", '    peak = _status_bytes("VmHWM")\n', "    peak = None\n"),
      ["tests/test_trial_server.py"]),
]


# -- running ------------------------------------------------------------------------------


def repo_files(root: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True,
        text=True, check=True,
    ).stdout
    return [line for line in out.splitlines() if line and (root / line).is_file()]


def copy_repo(root: Path, dest: Path) -> None:
    for name in repo_files(root):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)


def apply(mutant: Mutant, copy: Path) -> str | None:
    """Plant the mutant in ``copy``; the reason it cannot be planted, or None."""
    texts: dict[str, str] = {}
    for edit in mutant.edits:
        path = copy / edit.path
        if edit.path not in texts:
            if not path.is_file():
                return f"{edit.path} is gone"
            texts[edit.path] = path.read_text()
        count = texts[edit.path].count(edit.old)
        if count != 1:
            first = edit.old.strip().splitlines()[0][:60]
            return f"snippet {first!r} found {count} times in {edit.path}"
        texts[edit.path] = texts[edit.path].replace(edit.old, edit.new)
    for name, text in texts.items():
        (copy / name).write_text(text)
    return None


@dataclass
class Run:
    code: int | None  # None: timed out
    seconds: float
    failed: str = ""


def pytest_run(copy: Path, tests: tuple[str, ...], select: str | None, marks: str | None,
               timeout: float) -> Run:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    if marks:
        command += ["-m", marks]
    if select:
        command += ["-k", select]
    env = {**os.environ, "PYTHONPATH": str(copy)}
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return Run(None, time.perf_counter() - started)
    failed = ""
    for line in proc.stdout.splitlines():
        match = re.match(r"(FAILED|ERROR) (\S+)", line)
        if match:
            failed = match.group(2)
            break
    if proc.returncode not in (0, 1, 5) and not failed:
        failed = (proc.stdout.strip().splitlines() or ["no output"])[-1][:100]
    return Run(proc.returncode, time.perf_counter() - started, failed)


FAST, SLOW = "not slow and not gpu", "slow or gpu"


def passed(run: Run) -> bool:
    return run.code in (0, 5)  # 5: nothing selected in this pass


def check(mutant: Mutant, workdir: Path, timeout: float) -> tuple[str, str, float]:
    copy = workdir / mutant.name
    copy_repo(REPO, copy)
    try:
        problem = apply(mutant, copy)
        if problem is not None:
            return "not applicable", problem, 0.0
        fast = pytest_run(copy, mutant.tests, mutant.select, FAST, timeout)
        if fast.code is None:
            return "timeout", f"fast tests past {timeout:.0f} s", fast.seconds
        if not passed(fast):
            return "caught", fast.failed, fast.seconds
        slow = pytest_run(copy, mutant.tests, mutant.select, SLOW, timeout)
        seconds = fast.seconds + slow.seconds
        if slow.code is None:
            return "timeout", f"slow tests past {timeout:.0f} s", seconds
        if not passed(slow):
            return "caught (slow only)", slow.failed, seconds
        return "missed", "every selected test passed", seconds
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def baseline(mutants: list[Mutant], workdir: Path, timeout: float) -> bool:
    """Every selection passes on the unmodified code (else 'caught' would mean nothing)."""
    copy = workdir / "baseline"
    copy_repo(REPO, copy)
    selections = sorted({(mu.tests, mu.select) for mu in mutants})
    ok = True
    for tests, select in selections:
        run = pytest_run(copy, tests, select, None, 2 * timeout)
        label = " ".join(tests) + (f" -k {select!r}" if select else "")
        if not passed(run):
            print(f"baseline FAILS ({'timeout' if run.code is None else run.failed}): {label}",
                  flush=True)
            ok = False
        else:
            print(f"baseline ok ({run.seconds:.0f} s): {label}", flush=True)
    shutil.rmtree(copy, ignore_errors=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds per mutant and pass (default 600)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the run on the unmodified code")
    args = parser.parse_args()
    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {mu.name for mu in MUTANTS}
        if unknown:
            parser.error(f"unknown mutant(s): {', '.join(sorted(unknown))}")
        mutants = [mu for mu in MUTANTS if mu.name in args.only]
    if args.list:
        for mu in mutants:
            print(f"{mu.name:32} {mu.what}  [{' '.join(mu.tests)}]")
        return 0
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        workdir = Path(tmp)
        if not args.no_baseline and not baseline(mutants, workdir, args.timeout):
            print("the unmodified code fails its tests: fix that first", flush=True)
            return 2
        results = []
        for mu in mutants:
            verdict, detail, seconds = check(mu, workdir, args.timeout)
            results.append((mu, verdict))
            print(f"{verdict:19} {mu.name:32} {seconds:5.0f} s  {detail}", flush=True)
    applicable = [(mu, v) for mu, v in results if v != "not applicable"]
    caught = [mu for mu, v in applicable if v.startswith("caught")]
    fast = [mu for mu, v in applicable if v == "caught"]
    print()
    print(f"score: {len(caught)}/{len(applicable)} applicable mutants caught "
          f"({len(fast)} by fast tests, {len(caught) - len(fast)} by slow tests only); "
          f"{len(results) - len(applicable)} not applicable")
    missed = [mu.name for mu, v in applicable if not v.startswith("caught")]
    if missed:
        print("not caught: " + ", ".join(missed))
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
