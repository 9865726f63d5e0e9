"""plmetric.core.devices: the one resolve_device."""

from __future__ import annotations

import pytest
import torch

from plmetric.core.devices import resolve_device


def test_auto_and_explicit_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="train.device banana: not a device name"):
        resolve_device("banana", option="train.device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda:1: CUDA is not available"):
            resolve_device("cuda:1")
