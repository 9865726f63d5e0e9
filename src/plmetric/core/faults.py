"""Fault injection for crash tests: the process kills itself (SIGKILL) at a named point.

``PLMETRIC_FAULT=POINT@N`` makes the N-th arrival (default 1) at ``POINT`` in this process end it
with SIGKILL, as a power cut or an out-of-memory kill would: no ``finally`` block, no flush.
Points: ``step`` (after an optimiser step), ``write:NAME`` (half-way through writing the file
``NAME``, e.g. ``write:state.pt``; for safetensors files, after the temporary file is written and
before it replaces the old one). Without the variable, :func:`reached` costs one dictionary lookup.
``tests/training/test_crash_resume.py`` uses it to check that every interrupted run resumes exactly.
"""

from __future__ import annotations

import os
import signal

ENV = "PLMETRIC_FAULT"
_arrivals: dict[str, int] = {}


def reached(point: str) -> None:
    """Count an arrival at ``point``; SIGKILL this process if ``$PLMETRIC_FAULT`` names this arrival."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, count = spec.partition("@")
    if name != point:
        return
    _arrivals[point] = _arrivals.get(point, 0) + 1
    if _arrivals[point] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
