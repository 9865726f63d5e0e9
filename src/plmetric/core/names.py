"""File names as people see them: :func:`shown` makes any text (a file name, a message naming one)
safe to print to a terminal or put on a page, so that it is seen and never interpreted.

A file name is bytes chosen by whoever made the file. Printed raw, ``ESC [2J`` clears the screen,
``ESC ] 0;title BEL`` sets the window's title, the C1 control ``U+009B`` starts a sequence on
some terminals, and U+202E (right-to-left override) makes ``gpj.exe`` read as ``exe.jpg``. Bytes that
are not UTF-8 (held by Python as the surrogate escapes U+DC80-U+DCFF, :func:`os.fsdecode`) make a
UTF-8 stream refuse the whole line. :func:`shown` writes all of these as visible escapes:

* control characters (C0, DEL, C1: ``\\n``, ``\\t``, ``\\r`` as those; others ``\\x1b``, ``\\x9b``),
  the bidirectional controls (U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069) and the line and
  paragraph separators U+2028, U+2029 as ``\\xNN`` / ``\\uNNNN``;
* an undecodable byte ``NN`` of a file name as ``\\xNN`` (``b"caf\\xe9.png"`` is shown ``caf\\xe9.png``,
  as Python's ``backslashreplace`` writes the name's bytes); any other lone surrogate as ``\\udXXX``.

Everything else, letters of every script included, is shown as it is. The result is for reading,
not for finding the file again: a literal backslash is not doubled, so ``a\\x1b`` may be a name with
an escape or with those four characters. Tables and JSON keep names exactly
(:mod:`plmetric.retrieval.tables`).
"""

from __future__ import annotations

import os
import re

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's escape of the undecodable byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: str | os.PathLike[str] | os.PathLike[bytes] | bytes) -> str:
    """``text`` (a name, a path or a message naming one) with every character that a terminal or a
    page would act on, or could not encode, written as a visible escape (see the module docstring);
    bytes are decoded as :func:`os.fsdecode` does first."""
    text = os.fsdecode(text) if isinstance(text, bytes | os.PathLike) else str(text)
    return _UNSAFE.sub(_escape, text)
