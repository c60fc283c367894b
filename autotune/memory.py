"""Memory amounts as users write them (``--target-mem 20GB``) and as tables show them.

Decimal and binary units are both accepted because users copy numbers from
different tools: ``nvidia-smi`` and torch print MiB, spec sheets print GB. The two
differ by 7 % at the gigabyte scale, which is more than the tuner's resolution, so a
unit is mandatory: a bare number is refused rather than guessed.
"""

from __future__ import annotations

import re
from decimal import Decimal

from autotune.errors import ConfigError

__all__ = ["format_bytes", "parse_target_mem"]

#: Bytes per unit, keyed by the lower-cased unit. A bare prefix (``K``, ``G``) is
#: decimal like ``KB``/``GB``; ``Ki``/``Gi`` (Kubernetes style) are binary like ``KiB``.
_UNIT_BYTES = {"b": 1}
for _power, _prefix in enumerate("kmgt", start=1):
    for _suffix in ("", "b"):
        _UNIT_BYTES[_prefix + _suffix] = 1000**_power
        _UNIT_BYTES[_prefix + "i" + _suffix] = 1024**_power

_AMOUNT = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*([a-z%]*)\s*$", re.IGNORECASE)

_EXAMPLES = "write e.g. 20GB, 20GiB, 512MiB or 80%"


def parse_target_mem(text: str, total_bytes: int | None, used_bytes: int = 0) -> int:
    """Parse a memory target into bytes, checked against the device.

    ``text`` is a number with a unit (``20GB`` = 20e9, ``20GiB`` = 20 * 2**30,
    ``1.5 gb``, ``2048B``) or a percentage of ``total_bytes`` (``80%``). ``total_bytes``
    is the device's capacity, ``None`` when unknown (no probe); ``used_bytes`` is what
    other processes and the driver already hold, so a target at or below it leaves
    nothing for training. Every refusal is a :class:`ConfigError` quoting the input.
    """
    match = _AMOUNT.match(text)
    if match is None:
        raise ConfigError(f"cannot read target memory {text!r}: {_EXAMPLES}")
    number, unit = match.group(1), match.group(2).lower()
    value = Decimal(number)  # exact, so '0.1GB' is 100000000 bytes, not 99999999
    if value <= 0:
        raise ConfigError(f"target memory {text!r} must be positive")
    if unit == "":
        raise ConfigError(f"target memory {text!r} has no unit: {_EXAMPLES}")
    if unit == "%":
        if value > 100:
            raise ConfigError(f"target memory {text!r} must be a percentage in (0, 100]")
        if total_bytes is None:
            raise ConfigError(
                f"target memory {text!r} is a percentage but the device's total memory "
                "is unknown; give an amount such as 20GB instead"
            )
        target = int(value * total_bytes / 100)
    elif unit in _UNIT_BYTES:
        target = int(value * _UNIT_BYTES[unit])
    else:
        raise ConfigError(
            f"target memory {text!r} has an unknown unit {match.group(2)!r}: {_EXAMPLES}"
        )
    if target <= 0:
        raise ConfigError(f"target memory {text!r} is less than one byte")
    if total_bytes is not None and target > total_bytes:
        raise ConfigError(
            f"target memory {text!r} ({format_bytes(target)}) is more than the device's "
            f"{format_bytes(total_bytes)}"
        )
    if target <= used_bytes:
        raise ConfigError(
            f"target memory {text!r} ({format_bytes(target)}) is at or below the "
            f"{format_bytes(used_bytes)} already in use on the device"
        )
    return target


_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units with three significant digits: '19.5 GiB', '512 MiB'.

    Binary because that is what nvidia-smi and torch's allocator report, so the table
    can be compared with them by eye. Trailing zeros are dropped ('2 GiB', '1.5 GiB').
    """
    sign = "-" if n < 0 else ""
    value = abs(n)
    if value < 1024:
        return f"{sign}{value} B"
    for unit in _BINARY_UNITS[1:]:
        value /= 1024
        text = _three_digits(value)
        # 1023.7 MiB rounds to '1024': show it as '1 GiB' instead.
        if float(text) < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{sign}{text} {unit}"
    raise AssertionError("unreachable: the last unit always returns")


def _three_digits(value: float) -> str:
    decimals = 0 if value >= 100 else 1 if value >= 10 else 2
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
