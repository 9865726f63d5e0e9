"""Locations of shared resources (data sets used by tests and benchmarks)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_root() -> Path:
    """Return the folder that holds shared data sets.

    `$PLMETRIC_DATA` when set, else `../shared/data` beside the repository checkout.
    The folder may not exist; callers check.
    """
    env = os.environ.get("PLMETRIC_DATA")
    if env:
        return Path(env).expanduser()
    return REPO_ROOT.parent / "shared" / "data"


def cub_subset_root() -> Path:
    """Return the root of the 100-species CUB-200-2011 subset (may not exist)."""
    return shared_data_root() / "cub200_subset100"
