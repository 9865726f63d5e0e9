"""Where the inference runtime keeps its ONNX exports, and how an entry is named and checked (no torch).

:mod:`plmetric.data.runtime` writes ``<cache_dir()>/onnx/<key>.onnx`` and ``<key>.json`` (the check
against PyTorch: ``{"error", "bound", "input_shape"}``); the torch-free query path
(:mod:`plmetric.retrieval.quick_search`) reads them by the key an index records. Both use these names.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["CACHE_ENV", "INPUT_NAME", "ONNX_KEY", "OUTPUT_NAME", "cache_dir", "entry_files", "read_check"]

CACHE_ENV = "PLMETRIC_CACHE"
INPUT_NAME, OUTPUT_NAME = "input", "output"  # the exported graph's input and output names
ONNX_KEY = re.compile(r"[0-9a-f]{64}")
"""A cache key: the SHA-256 of :func:`plmetric.data.runtime.model_key`, 64 lowercase hex digits."""


def cache_dir() -> Path:
    """``$PLMETRIC_CACHE``, else ``$XDG_CACHE_HOME/plmetric``, else ``~/.cache/plmetric``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "plmetric"


def entry_files(key: str) -> tuple[Path, Path]:
    """``(<key>.onnx, <key>.json)`` in the cache's ``onnx`` folder.

    Raises:
        ValueError: ``key`` is not 64 lowercase hex digits (an index is hostile input: no other file).
    """
    if not isinstance(key, str) or ONNX_KEY.fullmatch(key) is None:
        raise ValueError(f"not an onnx cache key (64 lowercase hex digits): {str(key)[:80]!r}")
    folder = cache_dir() / "onnx"
    return folder / f"{key}.onnx", folder / f"{key}.json"


MAX_CHECK_BYTES = 1 << 16
"""A recorded check is about 100 bytes of JSON: a larger file is not one (it is never read whole)."""


def read_check(path: Path) -> dict[str, Any] | None:
    """The recorded check of an entry when it passed (finite ``error <= bound``; an ``input_shape``, when
    recorded, of 1 to 4 positive integers), else None (missing, damaged, oversized or nested too deeply: a cache folder is
    outside input like any other)."""
    if not path.is_file():  # missing, or a FIFO that would block the read
        return None
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CHECK_BYTES + 1)
        if len(data) > MAX_CHECK_BYTES:
            return None
        check = json.loads(data)
        error, bound = float(check["error"]), float(check["bound"])
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return None
    shape = check.get("input_shape", [1])
    sides_ok = isinstance(shape, list) and 1 <= len(shape) <= 4 and all(type(n) is int and n >= 1 for n in shape)
    if not (sides_ok and math.isfinite(error) and math.isfinite(bound) and error <= bound):
        return None
    return check
