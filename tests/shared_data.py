"""Where the shared real data sets are, for tests and benchmarks (never for the library).

``$PLMETRIC_DATA`` when set, else ``../shared/data`` beside this checkout. The folders may not
exist; callers check (tests skip).
"""

from __future__ import annotations

import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    """The folder that holds the shared data sets: ``$PLMETRIC_DATA`` or ``../shared/data``."""
    env = os.environ.get("PLMETRIC_DATA")
    return Path(env).expanduser() if env else CHECKOUT.parent / "shared" / "data"


def cub_subset_root() -> Path:
    """The root of the 100-species CUB-200-2011 subset (may not exist)."""
    return shared_data_root() / "cub200_subset100"
