"""Indexes whose embeddings need not fit in memory: memory-mapped reading and sharded writing.

:func:`open_index` opens an index written by ``plmetric index`` or ``plmetric embed`` without reading
its vectors: a :class:`StoredIndex` whose :class:`StoredVectors` and :class:`StoredPaths` are views
of the file(s) mapped read-only with :mod:`mmap` (NumPy arrays at each tensor's byte offset, found by
parsing the safetensors header here: 8 bytes of little-endian header length, then the JSON header;
every tensor's dtype, shape and offsets are checked against the file's size before anything is mapped,
so a truncated or forged file is refused in one line naming it). Two layouts are read:

* **version 2** (one file, what small indexes still write by default, see
  :mod:`plmetric.retrieval.index`): ``embeddings`` float32, ``labels``, ``file_stat``, optional
  ``phash``, and the paths as a JSON list in the metadata. Its paths are parsed from that JSON (small
  by definition: they fit in safetensors' 100 MB header) and packed into a :class:`StoredPaths`.
* **version 3** (sharded): the main file ``INDEX.safetensors`` holds no tensors, only the metadata
  ``plmetric_index``: ``format``, ``version`` 3, ``layout`` ``"sharded"``, ``created``, ``count``,
  ``dim``, ``dtype`` (``"float16"`` or ``"float32"``), ``model``, optional ``ann`` and calibration,
  and ``shards``: ``[{file, id, count, bytes}]`` in row order. Each shard is a safetensors file
  beside it, ``INDEX.<id[:12]>.shard.safetensors``, with tensors ``embeddings`` (count x dim, the
  index's dtype), ``labels`` (int64), ``file_stat`` (count x 2 int64), optional ``phash``
  (count x 16 uint8), ``path_bytes`` (uint8: the UTF-8 of every path concatenated; lone surrogates of
  undecodable file names kept by ``surrogatepass``) and ``path_ends`` (int64: each path's end in
  ``path_bytes``), and its own metadata ``plmetric_index_shard``: ``format``
  ``"plmetric-index-shard"``, its random ``id`` (32 hex digits), ``first`` (its first row in the
  index), ``count``, ``dim`` and ``dtype``. A shard is found by its recorded name, else as
  ``<index stem>.<id[:12]>.shard.safetensors`` (the index and its shards renamed together).

On open every shard is checked against the main file's record: it exists, is a regular file and not a
link, has the recorded byte size, and its header records the same id, first row, count, dim and dtype
with tensors of those shapes; ``path_ends`` is checked to rise to the end of ``path_bytes`` (one
vectorised pass over 8 bytes a row). A missing, truncated, replaced or foreign shard is an
:class:`~plmetric.retrieval.quick_search.IndexMismatchError` naming the shard (one line; the CLI
exits with status 2). No content hash is taken on open: hashing 10M float16 512-d vectors reads 10 GB
(about 20 s at disk speed, minutes from a cold disk), which would break ``serve``'s 30 s start; the
random id, the sizes and the shapes catch every ordinary mix-up (a shard of another index or run, a
truncated copy, a shard from before ``--add-to``), and a shard is never rewritten in place (a new
run writes new files under new random ids), so only a deliberate forgery of the same size and header
passes, which a hash recorded in the same folder would not stop either.

:class:`ShardedIndexWriter` writes the version-3 layout: ``add`` buffers rows and writes each full
shard to a new file (fsynced); ``commit`` writes the main file atomically, last: it is the commit
point. Nothing half written replaces a good index: shards are new files under fresh random ids, and
the main file is replaced only by an atomic rename once every shard it names is complete on disk
(:func:`retire_shards` then removes the shards of the replaced index that no index in the folder
names any more: a new index written over an old one leaves no orphaned gigabytes). A
run that fails removes its shards (:meth:`ShardedIndexWriter.abort`, also on an exception inside
``with``); one killed outright leaves shard files that no index names. Growing a sharded index
(:meth:`ShardedIndexWriter.extending`) writes the new rows as new shards and rewrites only the main
file: the old shards are neither read nor copied.

Float16 storage halves the vectors on disk; every read returns float32 (``rows``, ``block``,
``materialize``): scores computed from them carry float16 rounding (relative 2^-11 a component,
about 1e-3 on a cosine).

Importing this module imports NumPy, not torch (torch only where a tensor is returned): the command
line's parser reads its constants, and the torch-free search path
(:mod:`plmetric.retrieval.quick_search`) must stay free of torch.
"""

from __future__ import annotations

import datetime
import json
import math
import mmap
import os
import re
import secrets
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from plmetric.retrieval.quick_search import INDEX_KEY, IndexMismatchError
from plmetric.retrieval.shard_sizes import DEFAULT_SHARD_ROWS, SINGLE_FILE_PATH_BYTES

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_SHARD_ROWS",
    "SHARD_FORMAT",
    "SHARD_KEY",
    "SHARDED_VERSION",
    "SINGLE_FILE_PATH_BYTES",
    "ShardedIndexWriter",
    "StoredIndex",
    "StoredPaths",
    "StoredVectors",
    "named_shards",
    "open_index",
    "retire_shards",
    "shard_rows_for",
]

INDEX_FORMAT = "plmetric-index"
FILE_STAT_KEY = "file_stat"
"""The tensor of an index holding each image file's ``(size in bytes, mtime in ns)`` at indexing."""
HASH_KEY = "phash"
"""The tensor of an index holding each image's perceptual hashes ((N, 16) uint8)."""
SHARDED_VERSION = 3
"""The index format version of the sharded layout (version 2: one file)."""
SHARD_FORMAT = "plmetric-index-shard"
SHARD_KEY = "plmetric_index_shard"
"""The safetensors metadata key of a shard's JSON description."""
MAX_HEADER_BYTES = 100_000_000
"""safetensors' own limit on a header."""
SHARD_NAME = re.compile(r"[^/\\\x00]+\.shard\.safetensors")
_ID = re.compile(r"[0-9a-f]{32}")
_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "I64": np.dtype("<i8"), "U8": np.dtype("u1")}
_STORED = {"float16": "F16", "float32": "F32"}
_PATH_ERRORS = "surrogatepass"
"""How paths become bytes and back: exact for every Python string, undecodable file names included."""


def is_sharded(meta: dict[str, Any] | None) -> bool:
    """Whether index metadata describes the sharded layout (version 3)."""
    return isinstance(meta, dict) and meta.get("version") == SHARDED_VERSION and meta.get("layout") == "sharded"


def file_stats(paths: Sequence[str]) -> torch.Tensor:
    """``(size in bytes, mtime in ns)`` of each file (N × 2 int64), -1 -1 for an ``item:`` or a file
    that cannot be stat'ed: what an index records to recognise the indexed files later."""
    stats = []
    for p in paths:
        try:
            st = os.stat(p) if not p.startswith("item:") else None
        except OSError:
            st = None
        stats.append((st.st_size, st.st_mtime_ns) if st is not None else (-1, -1))
    import torch

    return torch.tensor(stats, dtype=torch.int64).reshape(len(paths), 2)


# ----------------------------------------------------------------------------- reading safetensors files


class _DamagedIndex(ValueError):
    """A plmetric file whose header is readable but whose tensors do not fit the file."""


class _MappedFile:
    """A safetensors file mapped read-only: its metadata and its tensors as NumPy views (no copy)."""

    def __init__(self, path: Path, what: str, error: type[ValueError] = ValueError) -> None:
        self.path, self.what = path, what
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags)
        except OSError as err:
            raise error(f"{what} cannot be read: {err.strerror or err}") from None
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise error(f"{what} is not a regular file")
            self.size = status.st_size
            self.identity = (status.st_dev, status.st_ino)
            if self.size < 8:
                raise error(f"{what} is not a safetensors file: {self.size} bytes, shorter than its header")
            self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        length = int.from_bytes(self._map[:8], "little")
        if length > min(self.size - 8, MAX_HEADER_BYTES):
            raise error(f"{what} is truncated or not a safetensors file: its header claims {length} bytes")
        try:
            header = json.loads(bytes(self._map[8 : 8 + length]))
        except (ValueError, RecursionError):
            header = None
        if not isinstance(header, dict):
            raise error(f"{what} is not a safetensors file: its header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise error(f"{what} is not a safetensors file: malformed '__metadata__'")
        self.metadata: dict[str, Any] = metadata
        self.data_start = 8 + length
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        room = self.size - self.data_start
        for name, entry in header.items():
            ok = isinstance(entry, dict) and entry.get("dtype") in _DTYPES
            shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
            ok = ok and isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)
            ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            if ok:
                dtype = _DTYPES[entry["dtype"]]
                begin, end = offsets
                ok = 0 <= begin <= end <= room and end - begin == math.prod(shape) * dtype.itemsize
            if not ok:  # an index's header read: "truncated", else simply not an index (open_index says so)
                kind = _DamagedIndex if error is ValueError and INDEX_KEY in metadata else error
                raise kind(
                    f"{what} is truncated or damaged: its tensor '{str(name)[:40]}' does not fit the file's "
                    f"{self.size} bytes"
                )
            self.entries[name] = (dtype, tuple(shape), begin, end)

    def json_metadata(self, key: str) -> Any:
        """The JSON under metadata ``key`` (None: absent or not JSON)."""
        raw = self.metadata.get(key)
        if not isinstance(raw, str):
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            return None

    def tensor(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a read-only NumPy view of the mapping."""
        dtype, shape, begin, end = self.entries[name]
        count = math.prod(shape)
        if count == 0:
            return np.empty(shape, dtype)
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=self.data_start + begin).reshape(shape)

    def shape(self, name: str) -> tuple[np.dtype, tuple[int, ...]] | None:
        """``(dtype, shape)`` of tensor ``name``, None when the file has none of that name."""
        entry = self.entries.get(name)
        return None if entry is None else (entry[0], entry[1])


# ----------------------------------------------------------------------------- vectors and paths


class StoredVectors:
    """An index's vectors, read-only, memory-mapped in one or more parts (shards): read as float32.

    Attributes:
        count: number of rows; dim: their dimension; dtype: ``"float16"`` or ``"float32"`` (storage).
    """

    def __init__(self, parts: Sequence[np.ndarray], dim: int, dtype: str) -> None:
        self.parts = list(parts)
        self.dim, self.dtype = int(dim), dtype
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts], dtype=np.int64)]).astype(np.int64)
        self.count = int(self.starts[-1])

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int, int]:
        return (self.count, self.dim)

    def rows(self, ids: Any) -> np.ndarray:
        """The vectors of rows ``ids`` (any order, repeats allowed) as float32 ``(m, dim)``.

        Raises:
            IndexError: an id outside ``[0, count)``.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        if len(ids) == 0:
            return out
        if ids.min() < 0 or ids.max() >= self.count:
            raise IndexError(f"row ids must be in [0, {self.count}), got {int(ids.min())}..{int(ids.max())}")
        part_of = np.searchsorted(self.starts, ids, side="right") - 1
        for part in np.unique(part_of):
            chosen = np.flatnonzero(part_of == part)
            local = ids[chosen] - self.starts[part]
            order = np.argsort(local, kind="stable")  # ascending offsets: sequential reads of the mapping
            out[chosen[order]] = self.parts[part][local[order]]
        return out

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop`` (exclusive) as float32 ``(stop - start, dim)`` (a copy)."""
        start, stop = max(0, int(start)), min(self.count, int(stop))
        out = np.empty((max(0, stop - start), self.dim), dtype=np.float32)
        for part, array in enumerate(self.parts):
            first, last = int(self.starts[part]), int(self.starts[part + 1])
            lo, hi = max(start, first), min(stop, last)
            if lo < hi:
                out[lo - start : hi - start] = array[lo - first : hi - first]
        return out

    def blocks(self, rows_per_block: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, block)`` for consecutive blocks of at most ``rows_per_block`` rows, float32."""
        if rows_per_block < 1:
            raise ValueError(f"rows_per_block must be >= 1, got {rows_per_block}")
        for start in range(0, self.count, rows_per_block):
            yield start, self.block(start, start + rows_per_block)

    def materialize(self) -> torch.Tensor:
        """Every vector in memory: a float32 tensor ``(count, dim)``."""
        import torch

        return torch.from_numpy(self.block(0, self.count))


def _encoded(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(path_bytes uint8, path_ends int64)`` of a list of paths."""
    encoded = [p.encode("utf-8", _PATH_ERRORS) for p in paths]
    ends = np.cumsum([len(b) for b in encoded], dtype=np.int64) if encoded else np.zeros(0, np.int64)
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), ends.astype(np.int64)


def _decoded(data: bytes) -> str:
    try:
        return data.decode("utf-8", _PATH_ERRORS)
    except UnicodeDecodeError:  # a forged shard: a name that no file has
        return data.decode("utf-8", "replace")


class StoredPaths:
    """An index's image paths as concatenated UTF-8 bytes and int64 ends (per part, mapped or in
    memory): about the paths' bytes plus 8 bytes a path, not a Python list of strings."""

    def __init__(self, parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        self.parts = list(parts)
        self.starts = np.concatenate([[0], np.cumsum([len(e) for _, e in self.parts], dtype=np.int64)]).astype(np.int64)
        self.count = int(self.starts[-1])

    @classmethod
    def from_list(cls, paths: Sequence[str]) -> StoredPaths:
        """Pack a list of paths (one part in memory)."""
        return cls([_encoded(paths)])

    def __len__(self) -> int:
        return self.count

    def _locate(self, i: int) -> tuple[int, int]:
        if not -self.count <= i < self.count:
            raise IndexError(f"path index {i} out of range for {self.count} paths")
        i = i % self.count if self.count else i
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return part, i - int(self.starts[part])

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        part, local = self._locate(int(i))
        data, ends = self.parts[part]
        begin = int(ends[local - 1]) if local else 0
        return _decoded(bytes(data[begin : int(ends[local])]))

    def __iter__(self) -> Iterator[str]:
        for start in range(0, self.count, 65536):
            yield from self.slice(start, start + 65536)

    def slice(self, start: int, stop: int) -> list[str]:
        """Paths ``start`` to ``stop`` (exclusive) as a list."""
        start, stop = max(0, int(start)), min(self.count, int(stop))
        out: list[str] = []
        for part, (data, ends) in enumerate(self.parts):
            first, last = int(self.starts[part]), int(self.starts[part + 1])
            lo, hi = max(start, first) - first, min(stop, last) - first
            if lo >= hi:
                continue
            begin = int(ends[lo - 1]) if lo else 0
            chunk = bytes(data[begin : int(ends[hi - 1])])
            bounds = (ends[lo:hi] - begin).tolist()
            previous = 0
            for end in bounds:
                out.append(_decoded(chunk[previous:end]))
                previous = end
        return out

    def to_list(self) -> list[str]:
        """Every path as a Python list (memory: a list of ``count`` strings)."""
        return self.slice(0, self.count)

    def find(self, path: str) -> int | None:
        """The row of the exact string ``path`` (the first if repeated), None when absent: a vectorised
        comparison of the paths of the same byte length, in bounded blocks."""
        target = np.frombuffer(path.encode("utf-8", _PATH_ERRORS), dtype=np.uint8)
        size = len(target)
        for part, (data, ends) in enumerate(self.parts):
            begins = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
            candidates = np.flatnonzero((ends - begins) == size)
            step = max(1, (1 << 24) // max(size, 1))
            for lo in range(0, len(candidates), step):
                chosen = candidates[lo : lo + step]
                if size == 0:
                    return int(self.starts[part] + chosen[0])
                matrix = np.asarray(data)[begins[chosen][:, None] + np.arange(size)]
                hits = np.flatnonzero((matrix == target).all(axis=1))
                if len(hits):
                    return int(self.starts[part] + chosen[hits[0]])
        return None

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self.find(path) is not None


# ----------------------------------------------------------------------------- an opened index


class StoredIndex:
    """An opened index (either layout): its metadata and mapped contents.

    Attributes:
        path: the main file; meta: its metadata (without the version-2 ``paths`` list); model: the
        model description; count, dim; dtype: storage dtype of the vectors; layout: ``"single"``
        (version 2) or ``"sharded"`` (version 3); vectors: :class:`StoredVectors`; paths:
        :class:`StoredPaths`; shard_files: the shards' paths (empty for one file).
    """

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        vectors: StoredVectors,
        paths: StoredPaths,
        files: Sequence[_MappedFile],
        layout: str,
    ) -> None:
        self.path, self.meta, self.vectors, self.paths = path, meta, vectors, paths
        self.model: dict[str, Any] = meta["model"]
        self.count, self.dim, self.dtype, self.layout = vectors.count, vectors.dim, vectors.dtype, layout
        self._files = list(files)
        self.shard_files = [f.path for f in self._files] if layout == "sharded" else []

    def _joined(self, name: str, dtype: np.dtype, tail: tuple[int, ...]) -> np.ndarray | None:
        """Tensor ``name`` of every file concatenated (None: some file lacks it or has another shape)."""
        arrays = []
        for f in self._files:
            found = f.shape(name)
            rows = len(self.vectors.parts[len(arrays)])
            if found is None or found[0] != dtype or found[1] != (rows, *tail):
                return None
            arrays.append(f.tensor(name))
        return np.concatenate(arrays) if arrays else np.zeros((0, *tail), dtype)

    def labels(self) -> torch.Tensor:
        """Every row's label (int64, -1 unlabelled)."""
        import torch

        return torch.from_numpy(self._joined("labels", _DTYPES["I64"], ()).astype(np.int64))

    def file_stats(self) -> torch.Tensor | None:
        """``(size, mtime ns)`` of each indexed file (N x 2 int64), None when not recorded."""
        joined = self._joined(FILE_STAT_KEY, _DTYPES["I64"], (2,))
        import torch

        return None if joined is None else torch.from_numpy(joined.astype(np.int64))

    def hashes(self) -> np.ndarray | None:
        """The perceptual hashes ((N, 16) uint8), None when some part has none.

        Raises:
            ValueError: a ``phash`` tensor of another type or shape (one line naming the file)."""
        from plmetric.retrieval.hashes import HASH_BYTES

        if any(f.shape(HASH_KEY) is None for f in self._files):
            return None
        joined = self._joined(HASH_KEY, _DTYPES["U8"], (HASH_BYTES,))
        if joined is None:
            raise ValueError(
                f"{self.path} is not a valid plmetric index: its '{HASH_KEY}' tensor is not uint8 [rows, {HASH_BYTES}]"
            )
        return np.array(joined)


def open_index(path: str | os.PathLike) -> StoredIndex:
    """Open an index of either layout without reading its vectors (see the module docstring).

    Raises:
        FileNotFoundError: no such index.
        ValueError: not a plmetric index, or a damaged one (one line naming the file).
        IndexMismatchError: a shard missing, truncated, a link, or of another index (naming it).
    """
    from plmetric.core.files import require_regular_file

    path = Path(path)
    require_regular_file(path, "index/embeddings file")
    try:
        main: _MappedFile | None = _MappedFile(path, f"index {path}")
    except _DamagedIndex:
        raise
    except ValueError:  # not safetensors at all: said as for any other file that is not an index
        main = None
    meta = main.json_metadata(INDEX_KEY) if main is not None else None
    if not isinstance(meta, dict):
        raise ValueError(
            f"{path} is not a plmetric index (expected a .safetensors file written by plmetric index or "
            f"plmetric embed, with '{INDEX_KEY}' metadata)"
        )
    if meta.get("version") == SHARDED_VERSION and meta.get("layout") == "sharded":
        return _open_sharded(path, meta)
    return _open_single(path, main, meta)


def _check_model(meta: dict[str, Any], path: Path, dim: int, rows: int) -> None:
    from plmetric.data.backbones import check_model_metadata

    model = meta.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("backbone"), str):
        raise ValueError(f"{path} is not a valid plmetric index (its model description is missing)")
    check_model_metadata(model, f"index {path}: model")
    output_dim = model.get("output_dim")
    if output_dim is not None and (isinstance(output_dim, bool) or output_dim != dim):
        raise ValueError(
            f"{path} is not a valid plmetric index: it records model 'output_dim' {str(output_dim)[:40]}, but its "
            f"embeddings tensor has shape {[rows, dim]}"
        )


def _open_single(path: Path, main: _MappedFile, meta: dict[str, Any]) -> StoredIndex:
    """A version-2 (one file) index, mapped; the checks of ``load_embeddings``."""
    embeddings, labels = main.shape("embeddings"), main.shape("labels")
    paths, model = meta.get("paths"), meta.get("model")
    if (
        not isinstance(model, dict)
        or not isinstance(model.get("backbone"), str)
        or embeddings is None
        or labels is None
        or len(embeddings[1]) != 2
        or not isinstance(paths, list)
        or len(paths) != embeddings[1][0]
        or labels != (_DTYPES["I64"], (embeddings[1][0],))
        or not all(isinstance(p, str) for p in paths)
    ):
        raise ValueError(
            f"{path} is not a valid plmetric index (embeddings, labels, paths and model disagree or are missing)"
        )
    if embeddings[0] not in (_DTYPES["F16"], _DTYPES["F32"]):
        raise ValueError(f"{path} is not a valid plmetric index: its embeddings are {embeddings[0]}, not float32")
    rows, dim = embeddings[1]
    for field, actual in (("count", rows), ("dim", dim)):
        value = meta.get(field)
        if value is not None and (isinstance(value, bool) or value != actual):
            raise ValueError(
                f"{path} is not a valid plmetric index: it records {field} {str(value)[:40]}, but its embeddings "
                f"tensor has shape {[rows, dim]}"
            )
    _check_model(meta, path, dim, rows)
    dtype = "float16" if embeddings[0] == _DTYPES["F16"] else "float32"
    vectors = StoredVectors([main.tensor("embeddings")], dim, dtype)
    stored_paths = StoredPaths.from_list(paths)
    meta = {k: v for k, v in meta.items() if k != "paths"}
    return StoredIndex(path, meta, vectors, stored_paths, [main], "single")


def shard_file_name(index_path: Path, shard_id: str) -> Path:
    """Where shard ``shard_id`` of ``INDEX.safetensors`` is written: ``INDEX.<id[:12]>.shard.safetensors``."""
    return index_path.with_name(f"{index_path.stem}.{shard_id[:12]}.shard.safetensors")


def _shard_records(path: Path, meta: dict[str, Any]) -> tuple[int, int, str, list[dict[str, Any]]]:
    """``(count, dim, dtype, shards)`` of a version-3 main file, checked (ValueError naming it)."""
    from plmetric.core.validation import MAX_EMBEDDING_DIM

    count, dim, dtype, shards = meta.get("count"), meta.get("dim"), meta.get("dtype"), meta.get("shards")
    bad = None
    if type(count) is not int or count < 0:
        bad = "count"
    elif type(dim) is not int or not 1 <= dim <= MAX_EMBEDDING_DIM:
        bad = "dim"
    elif dtype not in _STORED:
        bad = "dtype"
    elif not isinstance(shards, list) or not all(
        isinstance(s, dict)
        and isinstance(s.get("file"), str)
        and SHARD_NAME.fullmatch(s["file"])
        and isinstance(s.get("id"), str)
        and _ID.fullmatch(s["id"])
        and type(s.get("count")) is int
        and s["count"] >= 0
        and type(s.get("bytes")) is int
        and s["bytes"] > 0
        for s in shards
    ):
        bad = "shards"
    elif sum(s["count"] for s in shards) != count:
        bad = "count (not the sum of its shards' counts)"
    if bad is not None:
        raise ValueError(f"{path} is not a valid plmetric index: malformed sharded-index field {bad}")
    return count, dim, dtype, shards


def find_shard(index_path: Path, record: dict[str, Any]) -> Path:
    """The shard a record names: by its recorded name beside the index, else renamed with the index."""
    recorded = index_path.with_name(record["file"])
    if os.path.lexists(recorded):
        return recorded
    renamed = shard_file_name(index_path, record["id"])
    return renamed if os.path.lexists(renamed) else recorded


def _open_shard(index_path: Path, record: dict[str, Any], first: int, dim: int, dtype: str) -> _MappedFile:
    """One shard, checked against its record (see the module docstring)."""
    shard = find_shard(index_path, record)
    name = f"shard {shard} of index {index_path}"
    try:
        status = os.lstat(shard)
    except FileNotFoundError:
        raise IndexMismatchError(
            f"{name} is missing: keep every shard file beside its index (or rebuild the index)"
        ) from None
    except OSError as err:
        raise IndexMismatchError(f"{name} cannot be read: {err.strerror or err}") from None
    if stat.S_ISLNK(status.st_mode):
        raise IndexMismatchError(f"{name} is a link, not a regular file: a shard must be the file itself")
    if not stat.S_ISREG(status.st_mode):
        raise IndexMismatchError(f"{name} is not a regular file")
    if status.st_size != record["bytes"]:
        raise IndexMismatchError(
            f"{name} is {status.st_size} bytes, the index recorded {record['bytes']}: truncated or replaced; "
            "rebuild the index"
        )
    mapped = _MappedFile(shard, name, IndexMismatchError)
    if mapped.size != record["bytes"]:
        raise IndexMismatchError(f"{name} changed while it was opened; open the index again")
    own = mapped.json_metadata(SHARD_KEY)
    expected = {"format": SHARD_FORMAT, "id": record["id"], "first": first, "count": record["count"], "dim": dim,
                "dtype": dtype}
    if not isinstance(own, dict) or any(own.get(k) != v for k, v in expected.items()):
        found = own.get("id") if isinstance(own, dict) else None
        raise IndexMismatchError(
            f"{name} is not the shard the index recorded (id {record['id'][:12]}... recorded, "
            f"{str(found)[:12] + '...' if isinstance(found, str) else 'none'} found, or other rows): a shard of "
            "another index or run; rebuild the index"
        )
    rows = record["count"]
    shapes = {
        "embeddings": (_DTYPES[_STORED[dtype]], (rows, dim)),
        "labels": (_DTYPES["I64"], (rows,)),
        "path_ends": (_DTYPES["I64"], (rows,)),
    }
    for tensor, wanted in shapes.items():
        if mapped.shape(tensor) != wanted:
            raise IndexMismatchError(f"{name} is damaged: its '{tensor}' tensor is not {wanted[0]} {list(wanted[1])}")
    data = mapped.shape("path_bytes")
    ends = mapped.tensor("path_ends")
    if (
        data is None
        or data[0] != _DTYPES["U8"]
        or len(data[1]) != 1
        or (rows and (ends[0] < 0 or ends[-1] != data[1][0] or bool((np.diff(ends) < 0).any())))
        or (not rows and data[1][0] != 0)
    ):
        raise IndexMismatchError(f"{name} is damaged: its 'path_bytes' and 'path_ends' disagree")
    return mapped


def _open_sharded(path: Path, meta: dict[str, Any]) -> StoredIndex:
    count, dim, dtype, records = _shard_records(path, meta)
    _check_model(meta, path, dim, count)
    files, first = [], 0
    for record in records:
        files.append(_open_shard(path, record, first, dim, dtype))
        first += record["count"]
    vectors = StoredVectors([f.tensor("embeddings") for f in files], dim, dtype)
    paths = StoredPaths([(f.tensor("path_bytes"), f.tensor("path_ends")) for f in files])
    return StoredIndex(path, meta, vectors, paths, files, "sharded")


# ----------------------------------------------------------------------------- writing shards


def shard_rows_for(count: int, path_bytes: int, float16: bool = False, shard_rows: int | None = None) -> int | None:
    """Rows per shard for an index of ``count`` rows whose paths take ``path_bytes`` UTF-8 bytes: None
    (one version-2 file) unless ``shard_rows`` is given, ``float16`` storage is asked for, the index has
    more than :data:`DEFAULT_SHARD_ROWS` rows or its paths more than :data:`SINGLE_FILE_PATH_BYTES`."""
    if shard_rows is not None:
        return int(shard_rows)
    if float16 or count > DEFAULT_SHARD_ROWS or path_bytes > SINGLE_FILE_PATH_BYTES:
        return DEFAULT_SHARD_ROWS
    return None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardedIndexWriter:
    """Write a sharded (version-3) index: ``add`` rows (full shards stream to disk), then ``commit``.

    Use as a context manager: an exception inside ``with`` removes the shards written so far (they
    were never named by an index). ``extending`` continues an opened sharded index: its shards are
    kept, named again by the new main file, and never read.
    """

    def __init__(
        self,
        index_path: str | os.PathLike,
        dim: int,
        dtype: str = "float32",
        rows_per_shard: int = DEFAULT_SHARD_ROWS,
        *,
        kept_shards: Sequence[dict[str, Any]] = (),
        first_row: int = 0,
    ) -> None:
        if dtype not in _STORED:
            raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.index_path = Path(index_path)
        if self.index_path.suffix != ".safetensors":
            raise ValueError(f"--out must end in .safetensors, got {self.index_path}")
        self.dim, self.dtype, self.rows_per_shard = int(dim), dtype, int(rows_per_shard)
        self.kept = [dict(s) for s in kept_shards]
        self.count = int(first_row)
        self.written: list[Path] = []
        self.records: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []
        self._pending_rows = 0
        self._committed = False

    @classmethod
    def extending(cls, stored: StoredIndex, out: str | os.PathLike | None = None,
                  rows_per_shard: int | None = None) -> ShardedIndexWriter:
        """A writer that appends to the sharded index ``stored`` (written to ``out``, default its own
        path; ``out`` must be in the same folder, where the shards are)."""
        out = Path(out) if out is not None else stored.path
        if stored.layout != "sharded":
            raise ValueError(f"{stored.path} is a one-file index, not a sharded one")
        if out.resolve().parent != stored.path.resolve().parent:
            raise ValueError(
                f"--out {out}: a sharded index grows beside its shards; give a name in {stored.path.parent}"
            )
        records = []
        for record, shard in zip(stored.meta["shards"], stored.shard_files, strict=True):
            records.append({**record, "file": shard.name})  # found renamed: named as it is now
        return cls(out, stored.dim, stored.dtype, rows_per_shard or DEFAULT_SHARD_ROWS, kept_shards=records,
                   first_row=stored.count)

    def __enter__(self) -> ShardedIndexWriter:
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is not None and not self._committed:
            self.abort()

    def add(
        self,
        embeddings: Any,
        labels: Any,
        paths: Sequence[str],
        stats: Any = None,
        hashes: Any = None,
    ) -> None:
        """Append rows: ``embeddings`` (m x dim), ``labels`` (m), absolute ``paths`` (m), ``stats`` (m x 2
        int64, default taken now from the files), ``hashes`` (m x 16 uint8 or None). Full shards are
        written at once."""

        vectors = _numpy(embeddings).astype(np.float32, copy=False)
        m = len(paths)
        if vectors.ndim != 2 or vectors.shape != (m, self.dim) or len(labels) != m:
            raise ValueError(
                f"{vectors.shape[0] if vectors.ndim else 0} embeddings of dimension "
                f"{vectors.shape[1] if vectors.ndim == 2 else '?'}, {len(labels)} labels and {m} paths disagree "
                f"(index dimension {self.dim})"
            )
        stats_array = _numpy(file_stats(list(paths)) if stats is None else stats).astype(np.int64).reshape(m, 2)
        hash_array = None
        if hashes is not None:
            from plmetric.retrieval.hashes import check_hashes

            hash_array = check_hashes(hashes, f"perceptual hashes of {self.index_path}")
            if len(hash_array) != m:
                raise ValueError(f"{len(hash_array)} perceptual hashes for {m} images")
        chunk = {
            "embeddings": vectors.astype(np.float16 if self.dtype == "float16" else np.float32),  # a copy:
            # the caller's array may change after add returns
            "labels": _numpy(labels).astype(np.int64).reshape(m),
            "file_stat": stats_array,
            "phash": None if hash_array is None else np.array(hash_array, dtype=np.uint8),
            "paths": list(paths),
        }
        self._pending.append(chunk)
        self._pending_rows += m
        while self._pending_rows >= self.rows_per_shard:
            self._write_shard(self.rows_per_shard)

    def _take(self, rows: int) -> list[dict[str, Any]]:
        """The first ``rows`` pending rows, as the chunks they came in (views, never joined)."""
        taken: list[dict[str, Any]] = []
        need = rows
        while need:
            chunk = self._pending[0]
            size = len(chunk["paths"])
            if size <= need:
                taken.append(self._pending.pop(0))
                need -= size
            else:
                taken.append({k: (v[:need] if v is not None else None) for k, v in chunk.items()})
                self._pending[0] = {k: (v[need:] if v is not None else None) for k, v in chunk.items()}
                need = 0
        self._pending_rows -= rows
        return taken

    def _write_shard(self, rows: int) -> None:
        """Write the next ``rows`` pending rows as a new shard file (safetensors, written here chunk by
        chunk: no joined copy of the rows), fsynced."""
        from plmetric.core import faults
        from plmetric.core.checkpoint import file_mode

        chunks = self._take(rows)
        shard_id = secrets.token_hex(16)
        target = shard_file_name(self.index_path, shard_id)
        encoded = [_encoded(c["paths"]) for c in chunks]
        offset, ends = 0, []
        for data, chunk_ends in encoded:
            ends.append(chunk_ends + offset)
            offset += len(data)
        # int64 tensors first, then the vectors, then bytes: every tensor starts aligned to its type
        parts: list[tuple[str, str, list[int], list[np.ndarray]]] = [
            ("file_stat", "I64", [rows, 2], [c["file_stat"] for c in chunks]),
            ("labels", "I64", [rows], [c["labels"] for c in chunks]),
            ("path_ends", "I64", [rows], ends),
            ("embeddings", _STORED[self.dtype], [rows, self.dim], [c["embeddings"] for c in chunks]),
        ]
        if all(c["phash"] is not None for c in chunks):
            parts.append(("phash", "U8", [rows, chunks[0]["phash"].shape[1] if chunks else 16],
                          [c["phash"] for c in chunks]))
        parts.append(("path_bytes", "U8", [offset], [data for data, _ in encoded]))
        own = {"format": SHARD_FORMAT, "version": SHARDED_VERSION, "id": shard_id, "first": self.count,
               "count": rows, "dim": self.dim, "dtype": self.dtype}
        header: dict[str, Any] = {"__metadata__": {SHARD_KEY: json.dumps(own)}}
        position = 0
        for name, code, shape, arrays in parts:
            size = sum(a.nbytes for a in arrays)
            header[name] = {"dtype": code, "shape": shape, "data_offsets": [position, position + size]}
            position += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.written.append(target)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(target, flags, file_mode()), "wb") as handle:
            handle.write(len(text).to_bytes(8, "little") + text)
            for _, code, _, arrays in parts:
                for array in arrays:
                    handle.write(np.ascontiguousarray(array, dtype=_DTYPES[code]).data)
            handle.flush()
            os.fsync(handle.fileno())
        faults.reached("write:shard")
        self.records.append({"file": target.name, "id": shard_id, "count": rows, "bytes": target.stat().st_size})
        self.count += rows

    def flush(self) -> None:
        """Write the pending rows as a (short) shard."""
        if self._pending_rows:
            self._write_shard(self._pending_rows)

    def commit(self, model: dict[str, Any], ann: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> Path:
        """Write the last shard, then the main file atomically (the commit point); returns its path."""
        from plmetric.core.checkpoint import atomic_save_safetensors

        self.flush()
        shards = self.kept + self.records
        meta: dict[str, Any] = {
            "format": INDEX_FORMAT,
            "version": SHARDED_VERSION,
            "layout": "sharded",
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "count": self.count,
            "dim": self.dim,
            "dtype": self.dtype,
            "shards": shards,
            "model": model,
        }
        if ann is not None:
            meta["ann"] = ann
        meta.update({k: v for k, v in (extra or {}).items() if k not in meta})
        atomic_save_safetensors(self.index_path, {}, {INDEX_KEY: json.dumps(meta)})
        self._committed = True
        return self.index_path

    def abort(self) -> None:
        """Remove the shards this writer wrote (no index names them)."""
        for shard in self.written:
            shard.unlink(missing_ok=True)
        self.written, self.records, self._pending, self._pending_rows = [], [], [], 0


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


def named_shards(index_path: str | os.PathLike) -> list[dict[str, Any]]:
    """The shard records of the sharded index at ``index_path`` (empty: none there, or one file)."""
    index_path = Path(index_path)
    try:
        meta = _MappedFile(index_path, str(index_path)).json_metadata(INDEX_KEY) if index_path.is_file() else None
    except (OSError, ValueError):
        meta = None
    shards = meta.get("shards") if is_sharded(meta) else None
    return [s for s in shards if isinstance(s, dict)] if isinstance(shards, list) else []


def retire_shards(previous: Sequence[dict[str, Any]], index_path: str | os.PathLike) -> list[Path]:
    """Remove the shards of ``previous`` (the records of the index that ``index_path`` replaced) that no
    index in its folder names now (by file name or id), and only when such a file is exactly the shard
    written for it: a regular file, not a link, whose header records the recorded id. Returns those removed."""
    index_path = Path(index_path)
    named_files, named_ids = set(), set()
    for sibling in index_path.parent.glob("*.safetensors"):
        if sibling.name.endswith(".shard.safetensors") or not sibling.is_file():
            continue
        for record in named_shards(sibling):
            named_files.add(record.get("file"))
            named_ids.add(record.get("id"))
    removed = []
    for record in previous:
        name, shard_id = record.get("file"), record.get("id")
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name) or name in named_files or shard_id in named_ids:
            continue
        shard = index_path.with_name(name)
        try:
            if not stat.S_ISREG(os.lstat(shard).st_mode):
                continue
            own = _MappedFile(shard, f"shard {shard}").json_metadata(SHARD_KEY)
        except (OSError, ValueError):
            continue
        if isinstance(own, dict) and own.get("id") == shard_id:
            shard.unlink(missing_ok=True)
            removed.append(shard)
    return removed
