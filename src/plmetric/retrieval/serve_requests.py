"""What a request to the web page (:mod:`plmetric.retrieval.serve`) may say, checked: numbers (an image,
a page, a group, ``top_k``) written in ASCII digits within their range, and upload names as messages
show them. A request that cannot be answered raises :class:`QueryError` with its HTTP status.
"""

from __future__ import annotations

import re

ID_MAX_DIGITS = 18
"""An id of more digits is out of range of any index (and not converted: Python refuses int() of
over 4300 digits)."""
SHOWN_NAME_CHARS = 120
MAX_API_TOP_K = 1000
"""The most results ``/api/search?top_k=K`` returns: each costs its ``missing`` check (the path resolved
and stat'ed: about 70 µs on this 2-core machine) and about 200 bytes of JSON, so 1000 are under 0.1 s
and 200 KB; an unbounded K would let one request stat every file of the pile and answer with all of it."""


class QueryError(ValueError):
    """A request that cannot be answered; ``status`` is its HTTP status (400, 404, 410, 413 or 429)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def shown_name(name: str) -> str:
    """An upload's file name as messages show it: quoted and escaped (``repr``), cut in the middle
    past :data:`SHOWN_NAME_CHARS` characters."""
    if len(name) > SHOWN_NAME_CHARS:
        half = SHOWN_NAME_CHARS // 2
        name = name[:half] + "..." + name[-half:]
    return repr(name)


def parse_number(text: str | None, what: str) -> int | None:
    """``text`` as a non-negative decimal number: ASCII digits only (no sign, space, or other
    script's digits); None when it has more than :data:`ID_MAX_DIGITS` digits (out of any range).

    Raises:
        QueryError: 400 for anything else, naming ``what``.
    """
    if text is None or re.fullmatch(r"[0-9]+", text) is None:
        shown = text if text is None or len(text) <= 24 else text[:24] + "..."
        raise QueryError(f"{what} must be a number written with the digits 0-9, got {shown!r}")
    return int(text) if len(text) <= ID_MAX_DIGITS else None


def api_top_k(text: str | None, default: int) -> int:
    """The ``top_k`` of an ``/api/search`` request: ``default`` when not given, else a number from 1 to
    :data:`MAX_API_TOP_K` (parsed as :func:`parse_number`).

    Raises:
        QueryError: 400 not ASCII digits, or outside 1 to :data:`MAX_API_TOP_K`.
    """
    if text is None:
        return default
    count = parse_number(text, "top_k")
    if count is None or not 1 <= count <= MAX_API_TOP_K:
        raise QueryError(f"top_k must be from 1 to {MAX_API_TOP_K}, got {text[:24]!r}")
    return count


def page_count(items: int, per_page: int) -> int:
    """Pages of ``per_page`` items that hold ``items`` (at least one page, empty when there are none)."""
    return max(1, (items + per_page - 1) // per_page)


def page_number(text: str | None, pages: int) -> int:
    """A page number from a request's text (parsed as :func:`parse_number`).

    Raises:
        QueryError: 400 not ASCII digits; 404 outside 1 to ``pages``.
    """
    page = parse_number(text, "page")
    if page is None or not 1 <= page <= pages:
        raise QueryError(f"no page {text[:24]!r}: pages 1 to {pages}", 404)
    return page
