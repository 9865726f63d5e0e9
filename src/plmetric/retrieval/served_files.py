"""Which file the web page (:mod:`plmetric.retrieval.serve`) may serve: the checks behind ``/image/N``
and ``/thumb/N`` and behind a result's ``missing`` mark.

The class of attacks they close:

* Images are addressed by their number in the index only: no route takes a path.
* A file is opened only at the path the index recorded (an absolute path with every link resolved
  at indexing), only if that path still resolves to itself (no link anywhere on it now: a file or
  folder swapped for a link is refused, ``O_NOFOLLOW`` on the open, and the opened descriptor's path
  checked on Linux), only if it is a regular file, and only if its size and modification time are
  those recorded at indexing (``file_stat`` of :mod:`plmetric.retrieval.index`; 410 when changed).
  An index written before they were recorded is served on the decode check alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from typing import IO

from plmetric.retrieval.serve_requests import QueryError


def changed_since_indexing(found: os.stat_result, recorded: Sequence[int] | None) -> bool:
    """Whether ``found`` (a file's stat) differs from the ``(size, mtime_ns)`` recorded at indexing;
    never when nothing was recorded (``recorded`` None, or a size below 0)."""
    if recorded is None:
        return False
    size, mtime_ns = recorded
    return size >= 0 and (found.st_size, found.st_mtime_ns) != (size, mtime_ns)


def unavailable(path: str, recorded: Sequence[int] | None) -> bool:
    """Whether :func:`open_unchanged` would refuse the indexed file ``path`` (``recorded``: its
    ``(size, mtime_ns)`` at indexing, None when the index has none): an item without a file, moved or
    deleted, reached through a link now, not a regular file, or changed since indexing. Only a file
    that no longer decodes is found out later, by ``/thumb`` and ``/image``."""
    if path.startswith("item:"):
        return True
    try:
        if os.path.realpath(path) != path:
            return True
        found = os.lstat(path)
    except (OSError, ValueError):  # ValueError: a NUL byte in an edited index's path
        return True
    if not stat.S_ISREG(found.st_mode):
        return True
    return changed_since_indexing(found, recorded)


def open_unchanged(path: str, image_id: int, recorded: Sequence[int] | None) -> IO[bytes]:
    """The file of indexed image ``image_id`` at its recorded ``path``, opened only if it is still the
    file that was indexed (``recorded``: its ``(size, mtime_ns)`` at indexing, None when the index
    has none).

    Checks, in order: the recorded path resolves to itself (no link on it now); it opens with
    ``O_NOFOLLOW``; it is a regular file; on Linux the opened descriptor's path is the recorded
    one; its size and mtime (ns) are the recorded ones.

    Raises:
        QueryError: 404 missing file, a link, not a regular file, unreadable; 410 changed since indexing.
    """
    what = f"image {image_id} ({path})"
    if path.startswith("item:"):
        raise QueryError(f"image {image_id} has no file (an item of a data set)", 404)
    link = QueryError(f"{what} is now reached through a link: refused (it was indexed as a plain file)", 404)
    if os.path.realpath(path) != path:
        if not os.path.lexists(path):
            raise QueryError(f"{what} is missing: moved or deleted since indexing", 404)
        raise link
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise QueryError(f"{what} is missing: moved or deleted since indexing", 404) from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise link from None
        raise QueryError(f"{what} cannot be opened ({err.strerror})", 404) from None
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise QueryError(f"{what} is not a regular file: refused", 404)
        with contextlib.suppress(OSError):  # Linux: the path of what was actually opened
            if os.readlink(f"/proc/self/fd/{fd}") != path:
                raise link
        if changed_since_indexing(found, recorded):
            raise QueryError(
                f"{what} has changed since indexing (another size or modification time): refused; "
                "rebuild the index to show it",
                410,
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
