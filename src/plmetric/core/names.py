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

Captions of images shown together (the change report, the search grid, ``serve``'s tiles):
:func:`common_folder` of the images, then :func:`caption_lines` of each, every line
:func:`shorten_name`'d in the middle. Importing this module is cheap (no torch).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from plmetric.core.validation import check_int

__all__ = ["CAPTION_CHARS", "caption_lines", "common_folder", "shorten_name", "shown"]

CAPTION_CHARS = 20
"""The change report's caption width in characters, the default of :func:`shorten_name` (the search grid
and ``serve``'s tiles, wider, pass their own)."""

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


def shorten_name(name: str, width: int = CAPTION_CHARS) -> str:
    """``name`` if it has at most ``width`` characters, else its start and its end around one
    ``…``, ``width`` characters in all, the end one longer when they differ (the end of a file
    name, with its number and extension, tells files apart): ``IMG_20240517_120000_0042.jpg`` ->
    ``IMG_20240…0_0042.jpg`` for width 20. The one shortening of every caption (the change
    report, result grids, the web page)."""
    width = check_int("width", width, 1, where="shorten_name: ")
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    tail = width - 1 - head
    return f"{name[:head]}…{name[len(name) - tail:] if tail else ''}"


def common_folder(paths: Sequence[str]) -> str | None:
    """The deepest folder that holds every one of ``paths`` when they lie in more than one folder
    (None when they share one folder, or have none in common: the file name alone is shown)."""
    folders = sorted({os.path.dirname(p) for p in paths})
    if len(folders) < 2:
        return None
    try:
        return os.path.commonpath(folders)
    except ValueError:  # absolute and relative paths mixed: nothing in common
        return None


def caption_lines(path: str, folder: str | None, width: int = CAPTION_CHARS) -> list[str]:
    """The caption of image ``path`` as lines, each :func:`shorten_name`'d to ``width`` and printable
    (:func:`shown`, before shortening, so that a line never exceeds ``width``): the folders between
    ``folder`` (:func:`common_folder` of the images shown together; None: none) and the file, when
    there are any, then the file name. Images of a pile of class folders often share their file names
    (``054.Baltimore_Oriole/0034.jpg``, ``plankton/ctenophore/31107.jpg``): the folder is what tells
    them apart."""
    name = shorten_name(shown(os.path.basename(path) or path), width)
    if folder is None:
        return [name]
    below = os.path.relpath(os.path.dirname(path), folder)
    return [name] if below in (".", "") else [shorten_name(shown(below), width), name]
