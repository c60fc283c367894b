"""Checkpoint files: data, never code.

Written atomically (a temporary file, fsynced, then renamed over the target), so a crash
or Ctrl-C never leaves a half-written checkpoint behind. A checkpoint holds only tensors
and plain values (dicts, lists, tuples, numbers, strings, None), and every file is read
with ``torch.load(weights_only=True)``: a file whose pickle would call anything else
(``os.system``, a class of ours) is refused before anything in it runs. Watermark models
are handed around (a detector given to whoever must verify images) and the authors'
weights come from the internet, so opening one must never execute it.

Besides our own format, the official ARWGAN code's checkpoints (``*.pyt``: the
``enc-dec-model`` and ``discrim-model`` state dicts) are read: their keys are mapped
onto ours, their unused layers ignored (:func:`official_to_ours`).
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from arwgan.errors import CheckpointError
from autotune.outputs import atomic_write_bytes

FORMAT_VERSION = 1
#: Image size assumed for an official checkpoint (the official default; the networks
#: are fully convolutional, so it only matters for training and evaluation crops).
OFFICIAL_IMAGE_SIZE = 128


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    payload = {"format_version": FORMAT_VERSION, **state}
    atomic_write_bytes(path, lambda fh: torch.save(payload, fh))


def read_data(path: str | Path) -> Any:
    """The contents of a torch file, read as data only (``weights_only=True``).

    A pickle that asks for any callable beyond tensors and plain containers is refused
    with a CheckpointError, and nothing in it has run. Missing or damaged files are
    CheckpointErrors too.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is several lines; name the global the file asked for.
        asked = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(exc))
        what = f" (it calls {asked.group(1)})" if asked else ""
        raise CheckpointError(
            f"checkpoint '{path}' refused: opening it would run code{what}; "
            "a checkpoint must hold only tensors and plain values"
        ) from None
    except Exception as exc:  # torch raises many types for a damaged zip/pickle
        raise CheckpointError(f"checkpoint '{path}' is unreadable: {type(exc).__name__}") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one of our training checkpoints on the CPU, as data only (:func:`read_data`).
    Missing, corrupt, code-carrying or foreign files are user errors."""
    state = read_data(path)
    if is_official(state):
        raise CheckpointError(
            f"'{path}' is an official ARWGAN checkpoint: it holds weights, not a run to "
            "resume; start a run from it with --init-from"
        )
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"'{path}' is not an arwgan checkpoint (format {FORMAT_VERSION})")
    return state


# --------------------------------------------------------------------------------------
# Model weights from either format
# --------------------------------------------------------------------------------------

_OFFICIAL_KEYS = ("enc-dec-model", "discrim-model")
# Our module prefix -> the official one. Official Bottleneck: bn1, conv1, bn2, conv2 =
# our body.0, body.2, body.3, body.5; the official Sequentials keep our indices.
_BOTTLENECK = {"0": "bn1", "2": "conv1", "3": "bn2", "5": "conv2"}


def _official_prefixes() -> list[tuple[str, str]]:
    pairs = [("encoder.stem.", "encoder.first_layer.0."),
             ("encoder.fuse_head.", "encoder.fivth_layer."),
             ("encoder.attend_head.", "encoder.sixth_layer."),
             ("encoder.to_rgb.", "encoder.final_layer.0.")]
    for k in (1, 2, 3):
        for ours, theirs in _BOTTLENECK.items():
            pairs.append((f"encoder.fuse{k}.body.{ours}.", f"encoder.Dense_block{k}.{theirs}."))
            pairs.append(
                (f"encoder.attend.{k - 1}.body.{ours}.", f"encoder.Dense_block_a{k}.{theirs}.")
            )
    for net in ("decoder", "discriminator"):
        for ours, theirs in (("d0", "first_layer"), ("d1", "second_layer"),
                             ("d2", "third_layer"), ("d3", "fourth_layer"),
                             ("head", "fivth_layer")):
            pairs.append((f"{net}.trunk.{ours}.", f"{net}.{theirs}."))
        pairs.append((f"{net}.linear.", f"{net}.linear."))
    return pairs


_PREFIXES = _official_prefixes()


def official_key(ours: str) -> str:
    """The official state-dict key (decoder and discriminator keys prefixed by their
    network, as :func:`official_weights` flattens them) of one of our keys."""
    for our_prefix, official_prefix in _PREFIXES:
        if ours.startswith(our_prefix):
            return official_prefix + ours[len(our_prefix):]
    raise KeyError(ours)


def is_official(state: Any) -> bool:
    """Is this a checkpoint saved by the official ARWGAN code?"""
    return isinstance(state, dict) and all(
        isinstance(state.get(key), dict) for key in _OFFICIAL_KEYS
    )


def official_weights(state: dict) -> dict[str, torch.Tensor]:
    """The official encoder-decoder and discriminator weights as one flat dict, the
    discriminator's keys prefixed ``discriminator.`` (the encoder-decoder's already
    carry ``encoder.`` / ``decoder.``)."""
    flat = dict(state["enc-dec-model"])
    flat.update({f"discriminator.{k}": v for k, v in state["discrim-model"].items()})
    return flat


def official_to_ours(
    official: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    path: str | Path,
    target: str = "this model",
) -> dict[str, torch.Tensor]:
    """Our state dict (keys and shapes of ``expected``) filled from official weights.

    The official model also holds layers its forward never uses (the encoder's second to
    fourth layers, the decoder's and discriminator's dense blocks, the encoder-decoder's
    own linear layer): they are ignored. A missing key or a shape that does not fit is
    refused, naming the first one.
    """
    mapped = {}
    for ours, tensor in expected.items():
        theirs = official_key(ours)
        if theirs not in official:
            raise CheckpointError(f"official checkpoint '{path}' lacks {theirs} (our {ours})")
        value = official[theirs]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(
                f"official checkpoint '{path}': its weights do not fit {target}: {theirs} "
                f"is {shape}, needs {tuple(tensor.shape)} (our {ours})"
            )
        mapped[ours] = value
    return mapped


@dataclass
class ModelWeights:
    """The network weights of a checkpoint of either format, with its model config.

    ``config``: a ModelConfig dict (ours: the saved one; official: channels and message
    bits read off the weights, official image size and noise). ``state``: the weights in
    the file's own naming; :meth:`for_model` maps and checks them against a model.
    """

    path: Path
    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    official: bool

    def for_model(
        self, expected: dict[str, torch.Tensor], target: str = "this model"
    ) -> dict[str, torch.Tensor]:
        """Weights under the keys of ``expected`` (a model's state dict), checked to fit:
        a CheckpointError names the first key whose shape differs or that is missing.
        ``target`` names the model in that message."""
        if self.official:
            return official_to_ours(self.state, expected, self.path, target)
        if not isinstance(self.state, dict):
            raise CheckpointError(f"checkpoint '{self.path}' lacks its weights")
        for key, tensor in expected.items():
            value = self.state.get(key)
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(
                    f"checkpoint '{self.path}': its weights do not fit {target}: {key} is missing"
                )
            if value.shape != tensor.shape:
                raise CheckpointError(
                    f"checkpoint '{self.path}': its weights do not fit {target}: {key} is "
                    f"{tuple(value.shape)}, needs {tuple(tensor.shape)}"
                )
        return {key: self.state[key] for key in expected}


def load_model_weights(path: str | Path) -> ModelWeights:
    """Network weights and model config of our checkpoint or an official one."""
    path = Path(path)
    state = read_data(path)
    if is_official(state):
        weights = official_weights(state)
        try:
            channels = int(weights["encoder.first_layer.0.weight"].shape[0])
            bits = int(weights["decoder.linear.weight"].shape[0])
        except (KeyError, AttributeError, IndexError):
            raise CheckpointError(
                f"official checkpoint '{path}' lacks the encoder's first layer or the "
                "decoder's linear layer"
            ) from None
        config = {"image_size": OFFICIAL_IMAGE_SIZE, "message_bits": bits, "channels": channels}
        return ModelWeights(path, config, weights, official=True)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"'{path}' is not an arwgan checkpoint (format {FORMAT_VERSION}) "
            "nor an official ARWGAN one"
        )
    try:
        config = state["config"]["model"]
        weights = state["gan"]["nets"]
        if not isinstance(config, dict):
            raise TypeError("config is not a dict")
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint '{path}' lacks its config or weights ({exc})") from None
    return ModelWeights(path, config, weights, official=False)


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def require_same_model(path: str | Path, state: dict[str, Any], model: Any, hint: str = "") -> None:
    """Refuse a checkpoint whose model config is not ``model`` (a ModelConfig): its
    weights, and every measurement made on them, belong to another network."""
    from arwgan.config import TrainConfig

    saved = TrainConfig.from_dict(state["config"]).model
    if saved.fingerprint() != model.fingerprint():
        raise CheckpointError(
            f"checkpoint '{path}' was trained with another model config "
            f"({saved.image_size}px, {saved.message_bits} bits, {saved.channels} channels, "
            f"noise {saved.noise!r}){hint}"
        )
