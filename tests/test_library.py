"""The engine as a library: one direction of dependency, the workload contract, the
Python API (in-process and subprocess trials), and the generic command on the
examples/ torchvision workload."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import autotune
from autotune.errors import ConfigError, UserError
from autotune.timing import TimingConfig
from autotune.workload import (
    Baseline, LoaderSettings, SupervisedWorkload, Workload, WorkloadRef, batch_length,
    load_workload, losses_of,
)

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------ one direction


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth (function-local imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            if node.args and isinstance(node.args[0], ast.Constant):
                found.append((node.lineno, str(node.args[0].value)))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def test_autotune_never_imports_arwgan() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / "autotune").rglob("*.py"))
        for line, module in _imports(path)
        if module == "arwgan" or module.startswith("arwgan.")
    ]
    assert offenders == []


def test_the_import_walker_sees_lazy_imports(tmp_path: Path) -> None:
    """The check above is only as good as its walker: a lazy import inside a function,
    ``__import__`` and ``importlib.import_module`` are all found."""
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import os\n"
        "def f():\n    from arwgan.step import GANStep\n"
        "def g():\n    import arwgan.data as d\n"
        "def h():\n    __import__('arwgan.noise')\n"
        "def i():\n    import importlib\n    importlib.import_module('arwgan.model')\n"
    )
    modules = [m for _, m in _imports(planted)]
    assert {"arwgan.step", "arwgan.data", "arwgan.noise", "arwgan.model"} <= set(modules)


def test_arwgan_step_and_distributed_do_not_import_each_other() -> None:
    step = {m for _, m in _imports(ROOT / "arwgan" / "step.py")}
    distributed = {m for _, m in _imports(ROOT / "arwgan" / "distributed.py")}
    assert "arwgan.distributed" not in step
    assert "arwgan.step" not in distributed


def test_importing_autotune_is_light() -> None:
    """``import autotune`` (the API's names load lazily) pulls in no torch."""
    code = "import sys, autotune; assert 'torch' not in sys.modules, 'torch'; print(autotune.__all__[0])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------ the contract


def test_loader_settings_follow_torch_rules() -> None:
    assert LoaderSettings(8).dataloader_kwargs() == {"batch_size": 8, "num_workers": 0, "pin_memory": False}
    with_workers = LoaderSettings(8, 2, True, True, None)
    assert with_workers.prefetch_factor == 2
    assert with_workers.dataloader_kwargs()["persistent_workers"] is True
    with pytest.raises(ConfigError):
        LoaderSettings(0)


@pytest.mark.parametrize("factory, message", [
    ("no_colon", "package.module:factory"),
    ("bad name:x", "package.module:factory"),
    ("no_such_module_xyz:make", "not found"),
    ("json:no_such_attribute", "has no 'no_such_attribute'"),
    ("json:__doc__", "not callable"),
    ("json:dumps", "not an autotune.Workload"),
])
def test_a_bad_workload_reference_is_one_user_error(factory: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_workload(factory, {"obj": 1} if factory == "json:dumps" else None)


def test_workload_kwargs_must_be_json() -> None:
    with pytest.raises(ConfigError, match="JSON"):
        WorkloadRef("a.b:c", {"path": Path("x")})


def test_batch_length_and_losses() -> None:
    assert batch_length([torch.zeros(3, 2), torch.zeros(3)]) == 3
    assert batch_length({"x": torch.zeros(5, 1)}) == 5
    assert losses_of(torch.tensor(2.0)) == ({"loss": 2.0}, True)
    assert losses_of({"a": torch.tensor(float("nan")), "b": 1.0})[1] is False

    class Skipped:
        skipped = True

        def as_dict(self):
            return {"loss": torch.tensor(1.0)}

    assert losses_of(Skipped()) == ({"loss": 1.0}, False)


# ------------------------------------------------------------------ a toy workload


class ToyRegression(SupervisedWorkload):
    """A small MLP on a least-squares problem: the contract's minimum."""

    name = "toy-regression"
    reference_batch = 8
    reference_lrs = {"lr": 1e-2}
    baseline = Baseline(batch_size=8, num_workers=0, precision="fp32")

    def __init__(self, width: int = 32, samples: int = 256) -> None:
        self.width, self.samples = width, samples
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(samples, 16, generator=gen)
        self.data = TensorDataset(x, x @ torch.randn(16, 1, generator=gen) + 0.1 * torch.randn(samples, 1, generator=gen))

    def fingerprint(self) -> dict:
        return {"width": self.width}

    def build_model(self):
        return nn.Sequential(nn.Linear(16, self.width), nn.ReLU(), nn.Linear(self.width, 1))

    def dataset(self):
        return self.data

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.mse_loss(model(x).float(), y)


def make_toy(width: int = 32, samples: int = 256) -> ToyRegression:
    return ToyRegression(width, samples)


QUICK = dict(
    device="cpu", target_mem="3GB", max_batch=32, max_trials=4, max_workers=0,
    compare_rounds=1, compare_steps=3, worker_steps=3, measure_images=64, noise_steps=4,
    timing=TimingConfig(min_samples=3, max_samples=6, min_seconds=0.05, max_seconds=0.5,
                        warmup_steps=1),
)


def _check_result(result, target_bytes: int) -> None:
    tuned = result.tuned
    assert tuned.workload["name"] == "toy-regression"
    assert tuned.workload["reference_lrs"] == {"lr": 1e-2}
    assert set(tuned.choice.learning_rates) == {"lr"}
    assert tuned.model == {"width": 32}
    ok = [t for t in result.search.trials if t.ok]
    assert ok, "no trial succeeded"
    assert all(t.peak_bytes is not None and t.peak_bytes < target_bytes for t in ok)
    assert result.target_bytes == target_bytes


def test_api_tunes_a_workload_defined_here_in_process(tmp_path: Path) -> None:
    """No reference: the trials run in this process, and the result says so."""
    result = autotune.tune(ToyRegression(), objective="throughput", out=tmp_path / "t.json", **QUICK)
    _check_result(result, 3 * 10**9)
    assert any("no reference" in w for w in result.warnings)
    assert result.tuned.workload["ref"] is None
    loaded = autotune.load_tuned(tmp_path / "t.json")
    assert loaded.choice == result.choice
    kwargs = loaded.choice.dataloader_kwargs()
    assert kwargs["batch_size"] == result.choice.batch_size
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    result.print_report(Console(file=buffer, width=200))
    out = buffer.getvalue()
    # Which title depends on the timing (a toy step of microseconds on a shared CPU may
    # lose to its baseline): either way the table shows the rates by the workload's names.
    assert ("Recommendation" in out or "NOT faster than the" in out) and "learning rate lr" in out


def test_api_tunes_a_workload_by_reference_with_subprocess_trials(monkeypatch, tmp_path: Path) -> None:
    """A ``package.module:factory`` workload: every CPU trial runs in a child process that
    rebuilds it (here from this test module)."""
    import autotune.tuner as tuner_module

    # No PYTHONPATH set up for the children: the trial server passes on this process's
    # import path, on which pytest put this test's folder.
    monkeypatch.delenv("PYTHONPATH", raising=False)
    isolated = []
    real = tuner_module.run_trial_preimported

    def spy(spec, **kwargs):
        isolated.append(spec.workload)
        return real(spec, **kwargs)

    monkeypatch.setattr(tuner_module, "run_trial_preimported", spy)
    result = autotune.tune("test_library:make_toy", workload_kwargs={"width": 32},
                           objective="goodput", **QUICK)
    _check_result(result, 3 * 10**9)
    assert isolated and all(w == {"factory": "test_library:make_toy", "kwargs": {"width": 32}}
                            for w in isolated)
    assert not any("no reference" in w for w in result.warnings)
    noise = result.tuned.measurements["noise_scale"]
    assert noise["groups"] == ["model"] and noise["model"]["steps"] == 4


def test_trial_children_import_what_the_owner_can(tmp_path: Path, monkeypatch) -> None:
    """A module the owner imports through a path it added itself is importable in the
    trial server and its children (no PYTHONPATH needed)."""
    from autotune.trial_server import TrialServer

    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "planted_mod_q.py").write_text("def value(payload):\n    return payload * 7\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    with TrialServer(preload=("planted_mod_q",)) as server:
        result = server.call("planted_mod_q:value", 6, timeout_s=60)
    assert result.ok and result.value == 42, result.error


def test_isolate_without_a_reference_is_refused() -> None:
    with pytest.raises(ConfigError, match="reference"):
        autotune.tune(ToyRegression(), isolate=True, **{**QUICK, "device": "cpu"})


def test_tune_refuses_what_is_not_a_workload() -> None:
    with pytest.raises(ConfigError, match="Workload"):
        autotune.tune(object())
    with pytest.raises(ConfigError, match="no_such_option"):
        autotune.tune(ToyRegression(), no_such_option=1)


def test_a_step_without_noise_measurement_keeps_the_reference_batch() -> None:
    class NoNoise(Workload):
        name = "no-noise"
        reference_batch = 4
        reference_lrs = {"lr": 1e-2}
        baseline = Baseline(4, 0, "fp32")

        def __init__(self):
            self.inner = ToyRegression()

        def fingerprint(self):
            return {}

        def dataset(self):
            return self.inner.dataset()

        def build_step(self, batch_size, precision, device, *, lrs, channels_last=False, seed=0, dist=None):
            step = self.inner.build_step(batch_size, precision, device, lrs=lrs, seed=seed)

            class Plain:  # to_device and __call__ only: the contract's minimum
                to_device = staticmethod(step.to_device)

                def __call__(self, batch):
                    return step(batch)

            return Plain()

    result = autotune.tune(NoNoise(), objective="goodput", **QUICK)
    assert result.choice.batch_size <= 4
    assert any("cannot measure the gradient noise scale" in w for w in result.warnings)


# ------------------------------------------------------------------ the generic command


def _run(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "60",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "autotune", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.mark.slow
def test_generic_command_tunes_the_torchvision_example(tmp_path: Path) -> None:
    out = tmp_path / "tuned.json"
    done = _run([
        "--workload", "examples.torchvision_workload:make_workload",
        "--workload-args", '{"model": "resnet18", "image_size": 16, "samples": 64}',
        "--device", "cpu", "--target-mem", "3GB", "--objective", "throughput",
        "--max-batch", "8", "--start-batch", "4", "--max-trials", "2", "--max-workers", "0",
        "--compare-steps", "3", "--out", str(out),
    ], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    # The tables are for humans: stderr (stdout is for --json). Either title: a candidate
    # not faster than the workload's baseline is named as such.
    assert "Recommendation" in done.stderr or "NOT faster than the baseline" in done.stderr
    tuned = json.loads(out.read_text())
    assert tuned["workload"]["name"] == "torchvision-classifier"
    assert tuned["workload"]["ref"]["factory"] == "examples.torchvision_workload:make_workload"
    target = tuned["measurements"]["target_bytes"]
    ok = [t for t in tuned["measurements"]["trials"] if t["ok"]]
    assert ok and all(t["peak_bytes"] < target for t in ok)
    assert "python -m autotune --workload examples.torchvision_workload:make_workload" == tuned["workload"]["tuner"]


@pytest.mark.parametrize("args, message", [
    ([], "--workload is required"),
    (["--workload", "nope"], "package.module:factory"),
    (["--workload", "no_such_pkg_q.mod:f", "--device", "cpu"], "not found"),
    (["--workload", "examples.torchvision_workload:make_workload", "--workload-args", "{bad"], "not JSON"),
    (["--workload", "examples.torchvision_workload:make_workload", "--workload-args", "[1]"], "JSON object"),
    (["--workload", "examples.torchvision_workload:make_workload", "--workload-args", '{"colour": 1}',
      "--device", "cpu"], "unexpected keyword argument 'colour'"),
])
def test_generic_command_user_errors_are_one_line(tmp_path: Path, args, message) -> None:
    done = _run([*args, "--out", str(tmp_path / "t.json")], cwd=ROOT, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr


# ------------------------------------------------------------------ the documented example


def doc_example() -> str:
    text = (ROOT / "docs" / "library.md").read_text()
    block = text.split("<!-- example: begin -->", 1)[1].split("<!-- example: end -->", 1)[0]
    return block.strip().removeprefix("```python").removesuffix("```")


@pytest.mark.slow
def test_the_library_doc_example_runs(tmp_path: Path) -> None:
    """docs/library.md's example, run exactly as written: it tunes, prints the tables and
    trains three steps with the result."""
    script = tmp_path / "example.py"
    script.write_text(doc_example())
    env = {**os.environ, "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Recommendation" in done.stderr  # the tables are for humans: stderr
    assert "trained 3 steps at batch" in done.stdout
    assert "no reference" in done.stderr  # the in-process warning is shown


def test_a_choice_equal_to_the_baseline_is_recognised() -> None:
    from autotune.tuned import TunedChoice
    from autotune.tuner import Tuner

    tuner = Tuner(ToyRegression(), autotune.TuneConfig(device="cpu", objective="throughput"))

    def choice(**changes):
        values = dict(batch_size=8, num_workers=0, pin_memory=False, persistent_workers=False,
                      prefetch_factor=None, precision="fp32", learning_rates={"lr": 1e-2},
                      warmup_steps=0, lr_rule="linear", objective="throughput")
        return TunedChoice(**{**values, **changes})

    assert tuner._same_as_baseline(choice())
    assert tuner._same_as_baseline(choice(cpu_threads=torch.get_num_threads()))
    for changed in (dict(batch_size=16), dict(precision="bf16"), dict(channels_last=True),
                    dict(num_workers=2, prefetch_factor=2, persistent_workers=True),
                    dict(compile=True), dict(cpu_threads=torch.get_num_threads() + 1)):
        assert not tuner._same_as_baseline(choice(**changed)), changed
