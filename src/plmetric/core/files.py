"""What a path is, read from its status only (nothing opened: opening a FIFO blocks until a writer
comes, opening some devices has effects): the one check behind every "<what> not found" and
"<what> PATH is a FIFO, not a regular file" line."""

from __future__ import annotations

import os
import stat

__all__ = ["file_kind", "require_regular_file"]


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, for a message: ``"a folder"``, ``"a FIFO"``, ``"a socket"``, ``"a device"``,
    ``"a regular file"`` or ``"not a plain file"``."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a plain file"


def require_regular_file(
    path: str | os.PathLike, what: str, not_regular: type[ValueError] = ValueError, missing: str | None = None
) -> None:
    """Check with ``stat`` (links followed, nothing opened) that ``path`` is a regular file.

    Raises:
        FileNotFoundError: ``missing`` if given, else ``<what> not found: <path>`` (also a broken link).
        ``not_regular``: ``<what> <path> is a FIFO, not a regular file`` (a folder, a device, ...), or
            ``<what> <path> cannot be read: <reason>`` (a loop of links, a name too long, no permission).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(missing or f"{what} not found: {os.fspath(path)}") from None
    except OSError as err:
        raise not_regular(f"{what} {os.fspath(path)} cannot be read: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        raise not_regular(f"{what} {os.fspath(path)} is {file_kind(mode)}, not a regular file")
