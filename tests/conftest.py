"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared_data import cub_subset_root


@pytest.fixture(autouse=True, scope="session")
def _runtime_cache(tmp_path_factory: pytest.TempPathFactory):
    """The onnxruntime exports of the session (plmetric.data.runtime) in a temporary folder, never in the
    user's ~/.cache; subprocesses (the command-line tests) inherit it."""
    import os

    previous = os.environ.get("PLMETRIC_CACHE")
    os.environ["PLMETRIC_CACHE"] = str(tmp_path_factory.mktemp("plmetric-cache"))
    yield
    if previous is None:
        os.environ.pop("PLMETRIC_CACHE", None)
    else:
        os.environ["PLMETRIC_CACHE"] = previous


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
