"""Fault injection for crash tests: the process kills itself (SIGKILL) at a named point.

``PLMETRIC_FAULT=POINT@N`` makes the N-th arrival (default 1) at ``POINT`` in this process end it
with SIGKILL, as a power cut or an out-of-memory kill would: no ``finally`` block, no flush.
Points: ``step`` (after an optimiser step), ``write:NAME`` (half-way through writing the file
``NAME``, e.g. ``write:state.pt``; for safetensors files, after the temporary file is written and
before it replaces the old one), ``cache`` (a cached mode's caching pass starts: its run folder
written, the chunks kept from before loaded, none computed yet), ``cache-chunk`` (after a chunk of
views is stored and ``caching.json`` updated), ``cached`` (every view cached, before training).
``PLMETRIC_FAULT_SIGNAL=SIGINT`` (or another signal's name) sends that signal instead, as a
terminal's Ctrl-C does: to the whole process group when this process leads it (a DataLoader's
workers included), else to this process. Without the variables, :func:`reached` costs one
dictionary lookup. ``tests/training/test_crash_resume.py`` and ``test_cache_resume.py`` use it to
check that every interrupted run resumes exactly.
"""

from __future__ import annotations

import os
import signal

ENV = "PLMETRIC_FAULT"
SIGNAL_ENV = "PLMETRIC_FAULT_SIGNAL"
_arrivals: dict[str, int] = {}


def reached(point: str) -> None:
    """Count an arrival at ``point``; SIGKILL this process (or send ``$PLMETRIC_FAULT_SIGNAL``) if
    ``$PLMETRIC_FAULT`` names this arrival."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, count = spec.partition("@")
    if name != point:
        return
    _arrivals[point] = _arrivals.get(point, 0) + 1
    if _arrivals[point] != int(count or 1):
        return
    sent = signal.Signals[os.environ.get(SIGNAL_ENV) or "SIGKILL"]
    if sent != signal.SIGKILL and os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), sent)
    else:
        os.kill(os.getpid(), sent)
