"""Assertions shared by the CLI tests."""

from __future__ import annotations


def assert_one_error_line(text: str, fragment: str) -> None:
    """A user's mistake is exactly one line 'error: ...' naming ``fragment``, no traceback."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("error: "), text
    assert fragment in lines[0], text
    assert "Traceback" not in text


def arwgan_ref(model) -> dict:
    """The workload reference of ARWGAN at ``model`` (a ModelConfig), as a trial spec holds it."""
    from arwgan.workload import ArwganWorkload

    return ArwganWorkload(model).reference().to_dict()


#: The workload record ARWGAN's tuner writes into a tuned file.
ARWGAN_RECORD = {
    "name": "arwgan", "ref": None, "reference_batch": 16,
    "reference_lrs": {"lr_g": 1e-3, "lr_d": 1e-3},
    "baseline": {"batch_size": 16, "num_workers": 4, "precision": "fp32", "pin_memory": False,
                 "label": "seed default"},
    "tuner": "arwgan-autotune",
}
