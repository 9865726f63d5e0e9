"""The faiss files beside an index that ``plmetric index --add-to`` replaces: which other index in the
folder still names one (:func:`indexes_naming`), and removing one that none names
(:func:`retire_faiss_file`), only when it is exactly the file plmetric wrote for the index (a regular
file, not a link, its recorded SHA-256)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from plmetric.core.names import shown
from plmetric.retrieval.index import faiss_file_for, read_index_metadata


def sha256_unlinked(path: Path) -> tuple[str, tuple[int, int]] | None:
    """The SHA-256 of the regular file at ``path`` and its ``(device, inode)``, opened without following
    a link (None: a link, not a regular file, or unreadable). Opened non-blocking: a FIFO never hangs."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        status = os.fstat(handle.fileno())
        if not stat.S_ISREG(status.st_mode):
            return None
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest(), (status.st_dev, status.st_ino)


def indexes_naming(faiss_file: Path, index: Path) -> list[Path]:
    """The other plmetric indexes beside ``index`` (``*.safetensors`` in its folder: regular files, or
    links to them, whose metadata is an index's) that name ``faiss_file``: recorded by that name, or
    found by their digest after the pair was renamed (:func:`plmetric.retrieval.index.faiss_file_for`)."""
    naming = []
    for sibling in sorted(index.parent.glob("*.safetensors")):
        try:
            same = sibling.samefile(index)
            regular = stat.S_ISREG(sibling.stat().st_mode)  # a FIFO or device is never opened
        except OSError:
            continue
        if same or not regular:
            continue
        meta = read_index_metadata(sibling)
        ann_meta = (meta or {}).get("ann")
        recorded = ann_meta.get("file") if isinstance(ann_meta, dict) else None
        if recorded == faiss_file.name or faiss_file_for(sibling, meta) == sibling.with_name(faiss_file.name):
            naming.append(sibling)
    return naming


def retire_faiss_file(previous: Path, digest: Any, index: Path) -> str:
    """Delete ``previous``, the faiss file ``index`` named before ``--add-to`` replaced it, when it is
    exactly the file plmetric wrote for it (a regular file, not a link, ``*.faiss``, its SHA-256 the
    recorded ``digest``) and no other index in the folder names it; the line that says what was done."""
    if previous.suffix != ".faiss" or previous.parent != index.parent:
        return f"kept the previous faiss file {shown(previous)}: not a faiss file beside {shown(index)}"
    naming = indexes_naming(previous, index)
    if naming:
        more = f" and {len(naming) - 3} more" if len(naming) > 3 else ""
        others = ", ".join(shown(p.name) for p in naming[:3]) + more
        verb = "names" if len(naming) == 1 else "name"
        return f"kept the previous faiss file {shown(previous)}: {others} in its folder {verb} it too"
    found = sha256_unlinked(previous)
    if found is None or found[0] != digest:
        return (
            f"kept the previous faiss file {shown(previous)}: it is not the file {shown(index)} recorded "
            "(a link, or another SHA-256)"
        )
    try:
        now = os.lstat(previous)
        if (now.st_dev, now.st_ino) != found[1]:
            return f"kept the previous faiss file {shown(previous)}: it was replaced meanwhile"
        previous.unlink()
    except OSError as err:
        return f"kept the previous faiss file {shown(previous)}: it could not be removed ({err.strerror})"
    return f"removed the previous faiss file {shown(previous)} (no other index in its folder names it)"
