"""The noise grammar: parse and check a noise spec without importing torch.

The official ARWGAN grammar (HiDDeN's, extended), e.g.
``crop((0.1871,0.1871),(0.1871,0.1871))+Jpeg(0)+dropout(0.5477,0.5477)+resize(0.8,0.8)+gaussian(3,2.0)``.
Parsing lives apart from the layers (:mod:`arwgan.noise`, which imports torch) so that a
command line with a bad ``--noise`` is refused at once, before seconds of imports.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from arwgan.errors import ConfigError

Range = tuple[float, float]

Arg = float | int | tuple[float | int, float | int]


@dataclass(frozen=True)
class NoiseSpec:
    """One parsed noise layer: its grammar name and arguments (numbers or (min, max) pairs).

    ``str()`` renders it back to grammar text, which parses to an equal spec.
    """

    name: str
    args: tuple = ()

    def __str__(self) -> str:
        return f"{self.name}({','.join(_render(arg) for arg in self.args)})"


def _render(arg: Arg) -> str:
    if isinstance(arg, tuple):
        return f"({','.join(_render(value) for value in arg)})"
    return repr(arg)


class _SpecProblem(Exception):
    """What is wrong with one layer; turned into a ConfigError that quotes the layer."""


def _number(arg: Arg, what: str) -> float | int:
    if isinstance(arg, tuple):
        raise _SpecProblem(f"{what} must be a number, got a pair {_render(arg)}")
    return arg


def _integer(arg: Arg, what: str) -> int:
    value = _number(arg, what)
    if not isinstance(value, int):
        raise _SpecProblem(f"{what} must be an integer, got {_render(value)}")
    return value


def _range(arg: Arg, what: str) -> Range:
    if not isinstance(arg, tuple):
        raise _SpecProblem(f"{what} must be a pair (min,max), got {_render(arg)}")
    low, high = arg
    if low > high:
        raise _SpecProblem(f"{what} min {_render(low)} > max {_render(high)}")
    return arg


def _check_fractions(bounds: Range, what: str) -> None:
    for value in bounds:
        if not 0 < value <= 1:
            raise _SpecProblem(f"{what} must be in (0, 1], got {_render(value)}")


def _check_window(args: tuple) -> None:
    for axis, arg in zip(("height", "width"), args):
        _check_fractions(_range(arg, f"{axis} range"), f"{axis} fraction")


def _check_keep(args: tuple) -> None:
    _check_fractions(_range(args, "keep range"), "keep fraction")


def _check_scale(args: tuple) -> None:
    for value in _range(args, "scale range"):
        if not value > 0:
            raise _SpecProblem(f"scale must be > 0, got {_render(value)}")


def _check_quality(args: tuple) -> None:
    for arg in args:
        quality = _integer(arg, "quality")
        if not 1 <= quality <= 100:
            raise _SpecProblem(f"quality must be in 1..100, got {quality}")


def _check_blur(args: tuple) -> None:
    kernel_size = _integer(args[0], "kernel size")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise _SpecProblem(f"kernel size must be odd and >= 1, got {kernel_size}")
    sigma = _number(args[1], "sigma")
    if not sigma > 0:
        raise _SpecProblem(f"sigma must be > 0, got {_render(sigma)}")


def _check_std(args: tuple) -> None:
    bounds = _range(args * 2 if len(args) == 1 else args, "std range")
    for value in bounds:
        if value < 0:
            raise _SpecProblem(f"std must be >= 0, got {_render(value)}")


def _check_probability(args: tuple) -> None:
    for value in _range(args * 2 if len(args) == 1 else args, "fraction range"):
        if not 0 <= value <= 1:
            raise _SpecProblem(f"fraction must be in [0, 1], got {_render(value)}")


def _check_factor(args: tuple) -> None:
    for value in _range(args * 2 if len(args) == 1 else args, "factor range"):
        if not value > 0:
            raise _SpecProblem(f"factor must be > 0, got {_render(value)}")


def _check_official_jpeg(args: tuple) -> None:
    quality = _integer(args[0], "quality")
    if not 0 <= quality <= 100:
        raise _SpecProblem(f"quality must be in 0..100 (0 reads as 50), got {quality}")


def _check_salt_pepper_each(args: tuple) -> None:
    ratio = _number(args[0], "ratio")
    if not 0 <= ratio <= 0.5:
        raise _SpecProblem(f"ratio (of black, and of white, pixels) must be in [0, 0.5], got {_render(ratio)}")


def _check_mean_std(args: tuple) -> None:
    _number(args[0], "mean")
    std = _number(args[1], "std")
    if std < 0:
        raise _SpecProblem(f"std must be >= 0, got {_render(std)}")


def _check_saturation(args: tuple) -> None:
    for value in _range(args * 2 if len(args) == 1 else args, "factor range"):
        if value < 0:
            raise _SpecProblem(f"factor must be >= 0, got {_render(value)}")


def _check_rate(args: tuple) -> None:
    rate = _number(args[0], "rate")
    if not 0 <= rate <= 1:
        raise _SpecProblem(f"rate must be in [0, 1], got {_render(rate)}")


def _check_median(args: tuple) -> None:
    kernel_size = _integer(args[0], "kernel size")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise _SpecProblem(f"kernel size must be odd and >= 1, got {kernel_size}")


@dataclass(frozen=True)
class LayerRule:
    """How a layer name is checked. ``arities``: accepted argument counts."""

    arities: tuple[int, ...]
    check: Callable[[tuple], None]


def _scalars(args: tuple) -> tuple:
    """The arguments of a layer written ``name(min,max)``, checked to be plain numbers."""
    return tuple(_number(arg, f"argument {i + 1}") for i, arg in enumerate(args))


#: Every layer name of the grammar and how its arguments are checked; the modules
#: are built in :mod:`arwgan.noise` (which imports torch).
RULES: dict[str, LayerRule] = {
    "identity": LayerRule((0,), lambda args: None),
    "crop": LayerRule((2,), _check_window),
    "cropout": LayerRule((2,), _check_window),
    "dropout": LayerRule((2,), lambda args: _check_keep(_scalars(args))),
    "resize": LayerRule((2,), lambda args: _check_scale(_scalars(args))),
    "jpeg": LayerRule((0, 1), _check_quality),
    "jpegreal": LayerRule((1,), _check_quality),
    "gaussian": LayerRule((2,), _check_blur),
    "gaussian_noise": LayerRule((1, 2), lambda args: _check_std(_scalars(args))),
    # Real-image attacks for evaluation sweeps (usable in training too). A single
    # argument is a fixed value, two are a (min, max) range drawn per batch.
    "salt_pepper": LayerRule((1, 2), lambda args: _check_probability(_scalars(args))),
    "median": LayerRule((1,), _check_median),
    "brightness": LayerRule((1, 2), lambda args: _check_factor(_scalars(args))),
    "contrast": LayerRule((1, 2), lambda args: _check_factor(_scalars(args))),
    "saturation": LayerRule((1, 2), lambda args: _check_saturation(_scalars(args))),
    # The official ARWGAN names (case matters, as in its parser), with its meanings.
    "Jpeg": LayerRule((1,), _check_official_jpeg),
    "sp": LayerRule((1,), _check_salt_pepper_each),
    "Gaussian_noise": LayerRule((2,), _check_mean_std),
    "Median_filter": LayerRule((1,), _check_median),
    "Adjust_hue": LayerRule((1,), lambda args: _check_saturation(_scalars(args))),
    "Adjust_contrast": LayerRule((1,), lambda args: _check_factor(_scalars(args))),
    "grid_crop": LayerRule((1,), _check_rate),
    "quant": LayerRule((0,), lambda args: None),
}


def problem_with(spec: NoiseSpec) -> str | None:
    """Why ``spec`` is not a valid layer, or None when it is."""
    rule = RULES.get(spec.name)
    if rule is None:
        return f"unknown layer {spec.name!r} (known: {', '.join(sorted(RULES, key=str.lower))})"
    if len(spec.args) not in rule.arities:
        expected = " or ".join(str(n) for n in rule.arities)
        return f"{spec.name} takes {expected} argument(s), got {len(spec.args)}"
    try:
        rule.check(spec.args)
    except _SpecProblem as problem:
        return str(problem)
    return None


_TOKEN = re.compile(
    r"(?P<number>-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_]\w*)|(?P<punct>[(),])"
)
_WANTED = {"number": "a number", "name": "a layer name", ",": "','", ")": "')'"}


class _LayerParser:
    """Recursive-descent parser of one layer: ``name [ '(' [value {',' value}] ')' ]``,
    where ``value := number | '(' number ',' number ')'``. Tokens are (kind, text, column)."""

    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str, int]] = []
        position = 0
        while position < len(text):
            if text[position].isspace():
                position += 1
                continue
            match = _TOKEN.match(text, position)
            if match is None:
                raise _SpecProblem(
                    f"unexpected character {text[position]!r} at column {position + 1}"
                )
            self.tokens.append((match.lastgroup, match.group(), position + 1))
            position = match.end()
        self.index = 0

    def _peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def _expect(self, wanted: str) -> tuple[str, str, int]:
        token = self._peek()
        if token is None:
            if wanted == ")":
                raise _SpecProblem("unbalanced parentheses: missing ')'")
            raise _SpecProblem(f"expected {_WANTED[wanted]}, got the end of the layer")
        kind, text, column = token
        if wanted not in (kind, text):
            if text == ")":
                raise _SpecProblem(f"unbalanced parentheses: unexpected ')' at column {column}")
            raise _SpecProblem(f"expected {_WANTED[wanted]}, got {text!r} at column {column}")
        self.index += 1
        return token

    def _accept(self, text: str) -> bool:
        token = self._peek()
        if token is not None and token[1] == text:
            self.index += 1
            return True
        return False

    def _number(self) -> float | int:
        _, text, column = self._expect("number")
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        value = float(text)
        if not math.isfinite(value):
            raise _SpecProblem(f"number {text!r} at column {column} is too large")
        return value

    def _value(self) -> Arg:
        if self._accept("("):
            low = self._number()
            self._expect(",")
            high = self._number()
            self._expect(")")
            return (low, high)
        return self._number()

    def parse(self) -> NoiseSpec:
        _, name, _ = self._expect("name")
        args: list[Arg] = []
        if self._accept("("):
            if not self._accept(")"):
                args.append(self._value())
                while self._accept(","):
                    args.append(self._value())
                self._expect(")")
        if self._peek() is not None:
            _, text, column = self._peek()
            if text == ")":
                raise _SpecProblem(f"unbalanced parentheses: unexpected ')' at column {column}")
            raise _SpecProblem(f"unexpected {text!r} at column {column} after the layer")
        return NoiseSpec(name, tuple(args))


def _split_layers(spec: str) -> list[str]:
    """Split at the '+' signs outside parentheses (an exponent's '+' is inside them)."""
    parts, depth, start = [], 0, 0
    for position, char in enumerate(spec):
        if char == "(":
            depth += 1
        elif char == ")":
            depth = max(depth - 1, 0)  # a stray ')' is reported by the layer parser
        elif char == "+" and depth == 0:
            parts.append(spec[start:position])
            start = position + 1
    parts.append(spec[start:])
    return parts


def parse_noise(spec: str) -> list[NoiseSpec]:
    """Parse a '+'-joined HiDDeN noise spec into validated layer specs.

    The empty string, ``identity`` and ``identity()`` give an empty list: Identity is
    always in the Noiser's pool, so listing it adds nothing and is dropped anywhere.
    Raises ConfigError quoting the offending layer.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"noise spec must be a string, got {type(spec).__name__}")
    if not spec.strip():
        return []
    layers = []
    for part in _split_layers(spec):
        text = part.strip()
        if not text:
            raise ConfigError(f"bad noise spec {spec!r}: empty layer at a stray '+'")
        try:
            layer = _LayerParser(text).parse()
        except _SpecProblem as problem:
            raise ConfigError(f"bad noise layer {text!r}: {problem}") from None
        problem = problem_with(layer)
        if problem is not None:
            raise ConfigError(f"bad noise layer {text!r}: {problem}")
        if layer.name != "identity":
            layers.append(layer)
    return layers
