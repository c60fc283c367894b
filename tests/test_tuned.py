"""tuned.json: round trip, atomic writes, refusal of every kind of broken file, the
staleness check against the machine and the model, applying it, and world-size rescaling."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest

from arwgan.config import LoaderConfig, ModelConfig, OptimConfig, TrainConfig
from arwgan.errors import CheckpointError, ConfigError, UserError
from arwgan.tuning import apply_tuned, load_arwgan_tuned
from autotune.tuned import (
    SCHEMA_VERSION,
    TunedChoice,
    TunedFile,
    check_tuned,
    load_tuned,
    rescale_for_world_size,
    save_tuned,
)

GiB = 2**30

MODEL = ModelConfig(image_size=32, message_bits=8, channels=16, noise="")

H100 = {
    "device_type": "cuda",
    "gpu_name": "NVIDIA H100 80GB HBM3",
    "gpu_total_bytes": 80 * GiB,
    "driver_version": "550.54.15",
    "torch_version": "2.5.1+cu124",
    "cuda_version": "12.4",
    "usable_cores": 16,
    "cpu_name": "AMD EPYC 7R13",
}


REF = {"lr_g": 1e-3, "lr_d": 1e-3}


def make_choice(**overrides) -> TunedChoice:
    values = dict(
        batch_size=64, num_workers=3, pin_memory=True, persistent_workers=True,
        prefetch_factor=4, precision="bf16", learning_rates={"lr_g": 4e-3, "lr_d": 4e-3},
        warmup_steps=300,
        lr_rule="linear", objective="throughput",
    )
    values.update(overrides)
    return TunedChoice(**values)


def make_tuned(model: ModelConfig = MODEL, **overrides) -> TunedFile:
    values = dict(
        schema_version=SCHEMA_VERSION,
        created_utc="2025-01-02T03:04:05+00:00",
        device=dict(H100),
        model=model.to_dict(),
        model_fingerprint=model.fingerprint(),
        choice=make_choice(),
        measurements={"trials": [{"batch": 64, "peak_bytes": 5 * GiB, "images_per_s": 812.5}],
                      "baseline_images_per_s": 200.0, "recommended_images_per_s": 812.5},
        tool_version="0.1.0",
        workload={"name": "arwgan", "ref": None, "reference_batch": 16,
                  "reference_lrs": {"lr_g": 1e-3, "lr_d": 1e-3}, "tuner": "arwgan-autotune"},
    )
    values.update(overrides)
    return TunedFile(**values)


# ------------------------------------------------------------------ round trip


def test_save_load_round_trip(tmp_path):
    tuned = make_tuned()
    path = tmp_path / "nested" / "dir" / "tuned.json"  # parents are created
    save_tuned(path, tuned)
    assert load_tuned(path) == tuned
    text = path.read_text()
    assert text.endswith("}\n") and '\n  "schema_version": 2,' in text  # indent 2, key order kept
    assert list(json.loads(text)) == [f.name for f in fields(TunedFile)]


def test_non_finite_measurements_are_written_as_null(tmp_path):
    path = tmp_path / "tuned.json"
    save_tuned(path, make_tuned(measurements={"speedup": math.inf, "rates": [1.0, math.nan]}))
    assert load_tuned(path).measurements == {"speedup": None, "rates": [1.0, None]}


def test_save_leaves_no_temporary_files(tmp_path):
    save_tuned(tmp_path / "tuned.json", make_tuned())
    save_tuned(tmp_path / "tuned.json", make_tuned(tool_version="0.2.0"))
    assert [p.name for p in tmp_path.iterdir()] == ["tuned.json"]
    assert load_tuned(tmp_path / "tuned.json").tool_version == "0.2.0"


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    save_tuned(path, make_tuned())
    before = path.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)  # the rename that would publish the new file
    with pytest.raises(OSError, match="disk full"):
        save_tuned(path, make_tuned(tool_version="0.2.0"))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tuned.json"]


def test_unserialisable_measurement_raises_before_touching_disk(tmp_path):
    path = tmp_path / "tuned.json"
    save_tuned(path, make_tuned())
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_tuned(path, make_tuned(measurements={"oops": {1, 2}}))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tuned.json"]


# ------------------------------------------------------------- invalid files


def _valid() -> dict:
    return json.loads(json.dumps(asdict(make_tuned())))


_DELETE = object()


def _with(**changes) -> str:
    """The valid file with ``choice__lr_g=...``-style changes; ``_DELETE`` removes a key."""
    data = _valid()
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return json.dumps(data)



def _hand_edited_model() -> str:
    data = _valid()
    data["model"]["image_size"] = 64  # fingerprint left as it was
    return json.dumps(data)


INVALID_FILES = {
    "empty": ("", "not valid JSON"),
    "not json": ("{batch: 64", "not valid JSON"),
    "json list": ("[1, 2]", "does not hold a JSON object"),
    "wrong schema version": (_with(schema_version=1), "schema version 1"),
    "schema version as bool": (_with(schema_version=True), "schema version True"),
    "missing key": (_with(device=_DELETE), "missing key(s) device"),
    "unknown key": (_with(extra=1), "unknown key(s) extra"),
    "device not an object": (_with(device=[]), "device must be a JSON object"),
    "choice missing key": (_with(choice__precision=_DELETE), "choice is missing key(s) precision"),
    "choice unknown key": (_with(choice__batch=64), "choice has unknown key(s) batch"),
    "batch 0": (_with(choice__batch_size=0), "batch_size must be a positive integer"),
    "batch as string": (_with(choice__batch_size="64"), "batch_size must be a positive integer"),
    "batch as bool": (_with(choice__batch_size=True), "batch_size must be a positive integer"),
    "negative workers": (_with(choice__num_workers=-1), "num_workers must be a non-negative"),
    "negative lr": (_with(choice__learning_rates__lr_g=-1e-3), "lr_g must be a finite number > 0"),
    "zero lr": (_with(choice__learning_rates__lr_d=0), "lr_d must be a finite number > 0"),
    "lr as string": (_with(choice__learning_rates__lr_g="1e-3"), "lr_g must be a finite number > 0"),
    "lr NaN": (_with(choice__learning_rates__lr_g=math.nan), "lr_g must be a finite number > 0"),
    "no learning rates": (_with(choice__learning_rates={}), "learning_rates must be a non-empty"),
    "no workload record": (_with(workload=_DELETE), "missing key(s) workload"),
    "another workload's rates": (_with(choice__learning_rates={"lr": 1e-3}), "not arwgan"),
    "pin_memory as int": (_with(choice__pin_memory=1), "pin_memory must be true or false"),
    "prefetch 0": (_with(choice__prefetch_factor=0), "prefetch_factor must be a positive"),
    "unknown precision": (_with(choice__precision="fp8"), "unknown precision 'fp8'"),
    "unknown rule": (_with(choice__lr_rule="cubic"), "unknown lr_rule 'cubic'"),
    "unknown objective": (_with(choice__objective="speed"), "unknown objective 'speed'"),
    "world size 0": (_with(choice__world_size=0), "world_size must be a positive integer"),
    "invalid model": (_with(model__image_size=4), "model config is invalid"),
    "unknown model field": (_with(model__depth=3), "model config is invalid"),
    "hand-edited model": (_hand_edited_model(), "does not match its fingerprint"),
}


@pytest.mark.parametrize(("text", "problem"), INVALID_FILES.values(), ids=INVALID_FILES.keys())
def test_invalid_files_are_refused_with_one_line_naming_the_file(tmp_path, text, problem):
    path = tmp_path / "my-tuned.json"
    path.write_text(text)
    with pytest.raises(CheckpointError) as info:
        load_arwgan_tuned(path)
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert f"tuned file '{path}'" in message
    assert problem in message
    assert "\n" not in message
    # No chained traceback behind the one line: the file is the user's, not a bug.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(CheckpointError, match="^tuned file '.*nope.json' does not exist; "
                                              "run the tuner first$"):
        load_tuned(path)


def test_unreadable_file(tmp_path):
    with pytest.raises(CheckpointError, match="is unreadable"):
        load_tuned(tmp_path)  # a directory
    binary = tmp_path / "tuned.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="tuned.json"):
        load_tuned(binary)


def test_choice_validation_names_the_field_when_built_in_code():
    with pytest.raises(ConfigError, match="batch_size"):
        make_choice(batch_size=0)
    with pytest.raises(ConfigError, match="lr_d"):
        make_choice(learning_rates={"lr_g": 1e-3, "lr_d": math.inf})
    make_choice(num_workers=0, prefetch_factor=None, persistent_workers=False,
                learning_rates={"lr_g": 1, "lr_d": 1})


# ------------------------------------------------------------------- checking


def test_same_machine_and_model_gives_no_warning():
    assert check_tuned(make_tuned(), MODEL.to_dict(), dict(H100), force=False) == []


def test_device_differences_are_one_warning_naming_each():
    a100 = dict(H100, gpu_name="NVIDIA A100-SXM4-40GB", gpu_total_bytes=40 * GiB,
                driver_version="535.104.05", usable_cores=8)
    warnings = check_tuned(make_tuned(), MODEL.to_dict(), a100, force=False)
    assert warnings == [
        "tuned on NVIDIA H100 80GB HBM3 (80.0 GiB), running on NVIDIA A100-SXM4-40GB (40.0 GiB) "
        "(gpu NVIDIA H100 80GB HBM3 -> NVIDIA A100-SXM4-40GB, gpu memory 80.0 GiB -> 40.0 GiB, "
        "driver 550.54.15 -> 535.104.05, usable cores 16 -> 8): "
        "measurements may not hold; re-run arwgan-autotune"
    ]


def test_versions_and_device_type_differences_are_named():
    cpu = dict(H100, device_type="cpu", gpu_name=None, gpu_total_bytes=None,
               driver_version=None, torch_version="2.6.0", cuda_version=None)
    [warning] = check_tuned(make_tuned(), MODEL.to_dict(), cpu, force=False)
    assert warning.startswith("tuned on NVIDIA H100 80GB HBM3 (80.0 GiB), running on "
                              "CPU (AMD EPYC 7R13, 16 usable cores)")
    for part in ("device type cuda -> cpu", "gpu memory 80.0 GiB -> none",
                 "torch 2.5.1+cu124 -> 2.6.0", "cuda 12.4 -> none"):
        assert part in warning
    assert "usable cores 16 ->" not in warning and "cpu AMD" not in warning  # unchanged


def test_model_mismatch_raises_naming_the_fields():
    other = replace(MODEL, image_size=64, channels=8, weights=replace(MODEL.weights, ssim=0.2))
    with pytest.raises(CheckpointError) as info:
        check_tuned(make_tuned(), other.to_dict(), dict(H100), force=False, path="runs/tuned.json")
    assert str(info.value) == (
        "tuned file 'runs/tuned.json' was made for another model config "
        "(image_size 32 -> 64, channels 16 -> 8, weights.ssim 0.1 -> 0.2); "
        "re-run arwgan-autotune or pass --force"
    )


def test_force_turns_model_mismatch_into_a_warning():
    other = replace(MODEL, noise="dropout(0.3,0.3)")
    warnings = check_tuned(make_tuned(), other.to_dict(), dict(H100), force=True)
    assert warnings == [
        "the tuned configuration was made for another model config "
        "(noise '' -> 'dropout(0.3,0.3)'); using it anyway (--force)"
    ]


# ------------------------------------------------------------------- applying


def test_apply_tuned_sets_every_field():
    base = TrainConfig(
        model=ModelConfig(),
        loader=LoaderConfig(batch_size=16, num_workers=4, pin_memory=False,
                            persistent_workers=False, prefetch_factor=2),
        optim=OptimConfig(lr_g=1e-3, lr_d=1e-3, beta1=0.5, warmup_steps=0),
        precision="fp32", epochs=3, seed=7,
    )
    applied = apply_tuned(make_tuned(), base)
    assert applied.model == MODEL
    assert applied.loader == LoaderConfig(batch_size=64, num_workers=3, pin_memory=True,
                                          persistent_workers=True, prefetch_factor=4)
    assert applied.optim == OptimConfig(lr_g=4e-3, lr_d=4e-3, beta1=0.5, warmup_steps=300)
    assert applied.precision == "bf16"
    assert (applied.epochs, applied.seed) == (3, 7)  # not the tuner's business
    assert base.loader.batch_size == 16  # base untouched
    # Knobs absent from the choice keep today's behaviour.
    assert (applied.cpu_threads, applied.compile, applied.cudnn_benchmark) == (None, False, None)


def test_apply_tuned_applies_the_knobs_and_the_noise_scale():
    choice = make_choice(channels_last=True, cpu_threads=1, compile=True, cudnn_benchmark=False,
                         lr_rule="adascale", objective="goodput", noise_scale=40.0)
    applied = apply_tuned(make_tuned(choice=choice), TrainConfig())
    assert (applied.channels_last, applied.cpu_threads, applied.compile, applied.cudnn_benchmark) == (
        True, 1, True, False)
    assert applied.lr_noise_scale == 40.0


def test_file_without_the_new_fields_loads_with_todays_defaults(tmp_path):
    """A tuned file written before the knobs and goodput (no noise_scale, cpu_threads,
    compile, cudnn_benchmark) still loads."""
    path = tmp_path / "tuned.json"
    save_tuned(path, make_tuned())
    data = json.loads(path.read_text())
    for key in ("noise_scale", "cpu_threads", "compile", "cudnn_benchmark", "channels_last"):
        del data["choice"][key]
    path.write_text(json.dumps(data))
    choice = load_tuned(path).choice
    assert (choice.noise_scale, choice.cpu_threads, choice.compile, choice.cudnn_benchmark) == (
        None, None, False, None)


def test_adascale_choice_needs_its_noise_scale():
    with pytest.raises(ConfigError, match="noise_scale"):
        make_choice(lr_rule="adascale", objective="goodput")


def test_rescale_adascale_for_world_size_uses_the_noise_scale():
    choice = make_choice(lr_rule="adascale", objective="goodput", noise_scale=48.0)
    rescaled, _ = rescale_for_world_size(choice, 4, REF, 16)  # global batch 256 from 16
    assert rescaled.learning_rates["lr_g"] == pytest.approx(1e-3 * (16 * (48 + 16) / (48 + 256)) ** 0.5)


def test_apply_tuned_without_workers_clears_prefetch():
    tuned = make_tuned(choice=make_choice(num_workers=0, prefetch_factor=None,
                                          persistent_workers=False))
    loader = apply_tuned(tuned, TrainConfig()).loader
    assert (loader.num_workers, loader.prefetch_factor, loader.persistent_workers) == (0, None, False)


# --------------------------------------------------------------- world size


def test_same_world_size_is_unchanged():
    choice = make_choice()
    assert rescale_for_world_size(choice, 1, REF, 16) == (choice, None)


@pytest.mark.parametrize(
    ("rule", "expected_lr"),
    [("linear", 1e-3 * 256 / 16), ("sqrt", 1e-3 * math.sqrt(256 / 16)), ("none", 4e-3)],
)
def test_rescale_for_world_size(rule, expected_lr):
    choice = make_choice(lr_rule=rule)
    rescaled, message = rescale_for_world_size(choice, 4, REF, 16)
    assert rescaled.world_size == 4
    assert rescaled.batch_size == 64
    lrs = rescaled.learning_rates
    assert lrs["lr_g"] == pytest.approx(expected_lr) and lrs["lr_d"] == pytest.approx(expected_lr)
    assert message.startswith("tuned for world size 1, running with 4: global batch 64 -> 256, ")
    assert rule in message


def test_rescale_uses_the_reference_it_is_given():
    rescaled, _ = rescale_for_world_size(make_choice(world_size=2), 1, {"lr_g": 2e-4, "lr_d": 2e-4}, 32)
    assert rescaled.learning_rates["lr_g"] == pytest.approx(2e-4 * 64 / 32)


def test_rescale_refuses_a_bad_world_size():
    with pytest.raises(ConfigError, match="world size"):
        rescale_for_world_size(make_choice(), 0, REF, 16)


def test_saved_file_is_plain_json(tmp_path):
    path = Path(tmp_path / "tuned.json")
    save_tuned(path, make_tuned())
    data = json.loads(path.read_text())
    assert data["choice"]["precision"] == "bf16" and data["device"] == H100
