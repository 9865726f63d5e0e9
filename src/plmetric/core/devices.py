"""Which device to run on: the one ``resolve_device`` of the package."""

from __future__ import annotations

import torch

from plmetric.core import distributed as dist_utils
__all__ = ["resolve_device"]


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """``auto`` → the local CUDA device when available (this rank's under torchrun), else the CPU;
    an explicit name is checked.

    Raises:
        ValueError: a CUDA device on a machine without CUDA, or a name torch does not know
            (the message names ``option``).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist_utils.is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{option} {name}: CUDA is not available on this machine (use cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"{option} {name}: not a device name (auto, cpu, cuda, cuda:1, ...)") from None
