"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared_data import cub_subset_root


@pytest.fixture(autouse=True)
def _few_threads_and_seed():
    """Keep tests deterministic and light on the 2-core CI machine."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def cub_root() -> Path:
    """Root of the real CUB-200-2011 subset; skips the test when it is absent."""
    root = cub_subset_root()
    if not (root / "CUB_200_2011" / "images.txt").exists():
        pytest.skip(f"CUB subset not found at {root} (set PLMETRIC_DATA)")
    return root
