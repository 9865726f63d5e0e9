"""Weights files: reading a state dict without executing code from it (safetensors, or ``torch.load``
with ``weights_only=True``), matching it to a trunk's keys, assigning it to a trunk built on the
meta device, and torchvision's ImageNet weights through the torch hub cache."""

from __future__ import annotations

import os
import pickle
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from plmetric.data.backbones.specs import WeightsUnavailableError

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")

StateDict = dict[str, Tensor]


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters (its type when empty)."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _as_state_dict(obj: object, origin: str) -> StateDict:
    """Return ``obj`` as a flat name -> tensor mapping, unwrapping ``{"state_dict": ...}``/``{"model": ...}``."""
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                return _as_state_dict(obj[wrapper], origin)
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"{origin}: expected a state dict (a mapping of parameter names to tensors), got {type(obj).__name__}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{origin}: expected a state dict of tensors; entries that are not tensors: {bad[:5]}")
    return dict(obj)


def check_regular_file(path: Path, what: str) -> None:
    """Raise unless ``path`` is a regular file (following links), saying what it is instead; reads only
    its status, so a FIFO is never opened (opening one blocks until a writer comes)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as exc:  # a too-long name, a loop of links, no permission on a folder above
        raise ValueError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise ValueError(f"{what} {path} is {kind}, not a regular file")


def read_weights_file(weights: str | os.PathLike) -> tuple[StateDict, str]:
    """Read a ``.safetensors`` or ``.pth``/``.pt`` state dict without executing code from it."""
    path = Path(weights).expanduser()
    origin = f"weights file {path}"
    check_regular_file(path, "weights file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            obj = safetensors.torch.load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"could not read {origin} as safetensors: {first_line(exc)}") from exc
    elif suffix in (".pth", ".pt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
            raise ValueError(
                f"could not read {origin} as a PyTorch state dict (torch.load with weights_only=True, "
                f"which refuses to run code from a checkpoint): {first_line(exc)}"
            ) from exc
    else:
        raise ValueError(f"{origin}: unsupported suffix {suffix!r}; expected one of {', '.join(_WEIGHT_SUFFIXES)}")
    return _as_state_dict(obj, origin), origin


def shape_of(t: Tensor) -> tuple[int, ...]:
    """A tensor's shape as a plain tuple (for messages)."""
    return tuple(t.shape)


def match_keys(
    state: StateDict, target: Mapping[str, Tensor], heads: tuple[str, ...], backbone: str, origin: str
) -> StateDict:
    """``state`` filtered to exactly the keys of ``target`` (the classifier keys under ``heads`` dropped
    when ``target`` has no head), or raise naming the missing, unexpected and wrongly shaped keys."""
    dropped = tuple(p for p in heads if not any(k.startswith(p) for k in target))
    state = {k: v for k, v in state.items() if not (dropped and k.startswith(dropped))}

    unexpected = [k for k in state if k not in target]
    missing = [k for k in target if k not in state]
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]} ({len(unexpected)} in total)")
        if missing:
            parts.append(f"missing keys {missing[:5]} ({len(missing)} in total)")
        raise ValueError(f"{origin} does not fit backbone {backbone!r}: {'; '.join(parts)}")
    wrong_shape = [
        f"{k}: {shape_of(state[k])} in file, {shape_of(v)} in model"
        for k, v in target.items()
        if shape_of(state[k]) != shape_of(v)
    ]
    if wrong_shape:
        raise ValueError(
            f"{origin} does not fit backbone {backbone!r}: {len(wrong_shape)} tensors with the wrong shape, "
            f"first: {wrong_shape[:3]}"
        )
    return {k: state[k] for k in target}


def without_module_prefix(state: StateDict) -> StateDict:
    """``state`` without the ``module.`` prefix that DataParallel/DDP checkpoints put on every key."""
    if all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return state


def assign_state_dict(module: nn.Module, state: StateDict) -> None:
    """Assign matched tensors to a module built on the meta device.

    Floating-point tensors become float32 and every tensor contiguous (the package's EfficientNet
    file holds strided tensors, which safetensors refuses to save); both are no-ops otherwise.
    """
    state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"internal error: tensors left uninitialised after loading weights: {leftover[:5]}")


def torchvision_state_dict(backbone: str, url: str) -> tuple[StateDict, str]:
    """Return torchvision ImageNet weights from the torch hub cache, downloading them there first if needed.

    The file lives at ``<torch.hub.get_dir()>/checkpoints/<file name of the URL>`` exactly as
    torchvision would store it; a download is checked against the hash prefix in the file name.
    """
    file_name = os.path.basename(urlparse(url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if not cached.is_file():
        hash_match = re.search(r"-([a-f0-9]+)\.", file_name)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), hash_prefix=hash_match.group(1) if hash_match else None)
        except (OSError, RuntimeError) as exc:  # URLError, timeouts, unwritable cache, hash mismatch
            raise WeightsUnavailableError(
                f"ImageNet weights for backbone {backbone!r} are unavailable: could not download {url} "
                f"({type(exc).__name__}: {first_line(exc)}). Download that file on a machine with network and "
                f"either give it as a local weights file (plmetric train: --set model.weights=PATH; eval, embed, "
                f"index: --weights PATH; Python: create_model(weights=PATH)) or put it, named {file_name}, in the "
                f"torch hub cache folder {cached.parent} (TORCH_HOME moves that folder)."
            ) from exc
    return read_weights_file(cached)
