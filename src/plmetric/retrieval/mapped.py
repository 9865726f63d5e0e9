"""The pile tools (``neighbours``, ``duplicates``, ``groups``) and ``serve`` over an index that need not
fit in memory (issue 31): what they share.

A one-file (version-2) index is read as before, into memory (:func:`plmetric.retrieval.index.load_embeddings`:
at most :data:`~plmetric.retrieval.stored.DEFAULT_SHARD_ROWS` rows by construction). A sharded
(version-3) index is never materialised: its vectors stay a memory-mapped
:class:`~plmetric.retrieval.stored.StoredVectors` read a block at a time (float16 shards converted to
float32 a block at a time), its paths a :class:`~plmetric.retrieval.stored.StoredPaths` (their bytes,
not a list of strings). The functions here take either kind of vectors (a ``torch.Tensor`` or a
``StoredVectors``): :func:`rows_of`, :func:`float32_blocks`.

Identity (:func:`stored_identity`): the tables of the pile tools record the index they came from,
and ``serve`` refuses a table of another index. For a version-2 index it is
:func:`plmetric.retrieval.index.index_identity` (a SHA-256 over every path and vector), unchanged so
that tables written before keep matching. For a sharded index, hashing 10M vectors (10 GB) would take
minutes, so its identity is the SHA-256 of what the main file records of its contents: the count, the
dimension, the storage dtype and each shard's random id, row count and byte size, in order. A shard
is never rewritten in place (``--add-to`` writes new shards under new ids), and opening the index
checks every shard's id, rows and size against that record, so two sharded indexes with the same
identity hold the same shards; an index grown by ``--add-to`` gets another.

Estimates (:class:`RateEstimate`): before long work each command prints one line, the rows to do
times the rate measured on the first block, e.g. ``neighbours of 1,000,000 images: about 12 min
(first 4,096 at 1,400 rows/s)``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plmetric.retrieval.stored import StoredIndex, StoredPaths, StoredVectors

__all__ = [
    "Pile",
    "open_pile",
    "path_ids",
    "path_list",
    "RateEstimate",
    "as_stored",
    "float32_blocks",
    "rows_of",
    "search_vectors",
    "stored_identity",
    "vector_count",
]

SHARDED_IDENTITY_TAG = b"plmetric-sharded-index-identity\0"


def vector_count(vectors: torch.Tensor | StoredVectors) -> int:
    """Rows of a tensor or a :class:`StoredVectors`."""
    return int(vectors.count) if isinstance(vectors, StoredVectors) else int(vectors.shape[0])


def as_stored(vectors: torch.Tensor | StoredVectors) -> StoredVectors:
    """``vectors`` as a :class:`StoredVectors` (a tensor: one float32 part in memory, not copied when it
    already is float32 on the CPU)."""
    if isinstance(vectors, StoredVectors):
        return vectors
    array = vectors.detach().to("cpu", torch.float32).contiguous().numpy()
    return StoredVectors([array], array.shape[1], "float32")


def rows_of(vectors: torch.Tensor | StoredVectors, ids: Any) -> np.ndarray:
    """The float32 rows ``ids`` (any order, repeats allowed) of a tensor or a :class:`StoredVectors`."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if isinstance(vectors, StoredVectors):
        return vectors.rows(ids)
    return vectors.detach().to("cpu", torch.float32)[torch.from_numpy(ids)].numpy()


def float32_blocks(vectors: StoredVectors, rows_per_block: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows)`` of consecutive blocks of at most ``rows_per_block`` rows as float32: views of the
    mapping (no copy) for float32 storage, one block converted at a time for float16; a block never
    spans two shards (memory: one block)."""
    if rows_per_block < 1:
        raise ValueError(f"rows_per_block must be >= 1, got {rows_per_block}")
    for part, array in enumerate(vectors.parts):
        first = int(vectors.starts[part])
        for lo in range(0, len(array), rows_per_block):
            chunk = array[lo : lo + rows_per_block]
            yield first + lo, np.asarray(chunk, dtype=np.float32)


def search_vectors(
    queries: torch.Tensor,
    k: int,
    database: torch.Tensor | StoredVectors,
    faiss_index: tuple[Any, Any] | None,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each query over ``database``: through ``faiss_index`` (a re-ranking kind such as
    ``ivfpq`` re-scores its candidates exactly from ``database``'s stored rows, so scores are true
    cosines), else exactly (a mapped ``database`` block by block, bounded memory). The one place the
    pile tools and ``serve`` call faiss: :func:`plmetric.retrieval.index.search`."""
    from plmetric.retrieval.index import search

    return search(None, queries, k, database, faiss_index, nprobe=nprobe, ef_search=ef_search)


def stored_identity(stored: StoredIndex) -> str:
    """The identity the pile tools record in their tables and ``serve`` checks (module docstring): for a
    one-file index :func:`plmetric.retrieval.index.index_identity`'s value, computed from the mapped file a
    block at a time; for a sharded one the SHA-256 of its recorded shards (no vector read)."""
    if stored.layout == "sharded":
        record = {
            "count": stored.count,
            "dim": stored.dim,
            "dtype": stored.dtype,
            "shards": [[s["id"], s["count"], s["bytes"]] for s in stored.meta["shards"]],
        }
        return hashlib.sha256(SHARDED_IDENTITY_TAG + json.dumps(record, sort_keys=True).encode("ascii")).hexdigest()
    # index_identity(embeddings, paths) streamed: the same bytes in the same order
    digest = hashlib.sha256(b"plmetric-index-identity\0")
    digest.update(json.dumps([[stored.count, stored.dim], stored.paths.to_list()]).encode("ascii"))
    for _, block in float32_blocks(stored.vectors, 65_536):
        digest.update(np.ascontiguousarray(block, dtype="<f4").data)
    return digest.hexdigest()


def path_list(paths: list[str] | StoredPaths, start_or_ids: Any, stop: int | None = None) -> list[str]:
    """Paths of rows ``start`` to ``stop`` (two ints), or of the row ids ``start_or_ids`` (an array, any
    order, repeats allowed: each distinct path decoded once), from a list or a :class:`StoredPaths`."""
    if stop is not None:
        return paths[start_or_ids:stop] if isinstance(paths, list) else paths.slice(start_or_ids, stop)
    ids = np.asarray(start_or_ids, dtype=np.int64).reshape(-1)
    if isinstance(paths, list):
        return [paths[i] for i in ids.tolist()]
    distinct, inverse = np.unique(ids, return_inverse=True)
    decoded = [paths[i] for i in distinct.tolist()]
    return [decoded[i] for i in inverse.tolist()]


def path_ids(paths: Sequence[str], wanted: set[str], rows_per_block: int = 65_536) -> dict[str, int]:
    """The row of each path of ``wanted`` that the index holds (a repeated path: its last row), read a block
    of paths at a time: memory for ``wanted``, not a dictionary of every indexed path."""
    found: dict[str, int] = {}
    if not wanted:
        return found
    for start in range(0, len(paths), rows_per_block):
        block = path_list(paths, start, min(start + rows_per_block, len(paths)))
        found.update((p, start + i) for i, p in enumerate(block) if p in wanted)
    return found


def duration(seconds: float) -> str:
    """``seconds`` as a person reads it: ``40 s``, ``12 min``, ``3.5 h``."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class RateEstimate:
    """The line said before the rest of a long pass: ``<what> of N images: about T (first B at R rows/s)``,
    T the ``passes`` over all N rows at the rate of the first block (``passes`` > 1 where the pass timed
    is followed by lighter ones over the same rows: an upper estimate).

    ``say`` receives the line (default: printed to stderr); nothing is said when the first block was
    the whole pass."""

    def __init__(self, what: str, total: int, say: Callable[[str], None] | None = None, passes: int = 1) -> None:
        self.what, self.total, self.passes = what, int(total), int(passes)
        self.say = say if say is not None else (lambda line: print(line, file=sys.stderr, flush=True))
        self.line: str | None = None

    def first_block(self, rows: int, seconds: float) -> None:
        """Call after the first block: its ``rows`` took ``seconds`` (later calls do nothing)."""
        if self.line is not None or rows <= 0:
            return
        rate = rows / max(seconds, 1e-6)
        self.line = (
            f"{self.what} of {self.total:,} images: about {duration(self.passes * self.total / rate)} "
            f"(first {rows:,} at {rate:,.0f} rows/s)"
        )
        if rows < self.total:
            self.say(self.line)


def seeded_sample(n: int, size: int, seed: int) -> np.ndarray:
    """``min(n, size)`` distinct row ids in ``[0, n)`` drawn with ``seed``, sorted (reads in file order)."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size, replace=False)).astype(np.int64)


@dataclass
class Pile:
    """An index as the pile tools and ``serve`` read it: ``vectors`` and ``paths`` in memory (a one-file
    index: a float32 tensor and a list) or mapped (a sharded one: :class:`StoredVectors` and
    :class:`StoredPaths`, ``stored`` its :class:`StoredIndex`); ``model`` its model description,
    ``meta`` its metadata."""

    path: Path
    vectors: torch.Tensor | StoredVectors
    paths: list[str] | StoredPaths
    model: dict[str, Any]
    meta: dict[str, Any]
    stored: StoredIndex | None = None

    @property
    def count(self) -> int:
        return vector_count(self.vectors)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def identity(self) -> str:
        """The identity recorded in the pile tools' tables (:func:`stored_identity`)."""
        if self.stored is not None:
            return stored_identity(self.stored)
        from plmetric.retrieval.index import index_identity

        return index_identity(self.vectors, self.paths)

    def file_stats(self) -> torch.Tensor | None:
        """``(size, mtime ns)`` of each indexed file (N x 2 int64), None when not recorded."""
        if self.stored is not None:
            return self.stored.file_stats()
        from plmetric.retrieval.index import load_file_stats

        return load_file_stats(self.path)

    def hashes(self) -> np.ndarray | None:
        """The perceptual hashes ((N, 16) uint8), None when not recorded (checked: ValueError naming the file)."""
        if self.stored is not None:
            return self.stored.hashes()
        from plmetric.retrieval.index import load_hashes

        return load_hashes(self.path)


def open_pile(path: str | Any) -> Pile:
    """Open an index for the pile tools or ``serve``: a one-file index read into memory as before
    (:func:`plmetric.retrieval.index.load_embeddings`), a sharded one mapped (never materialised).

    Raises:
        FileNotFoundError: no such index.
        ValueError: not a plmetric index, or a damaged one (one line naming the file).
        IndexMismatchError: a shard missing, truncated, a link, or of another index (naming it).
    """
    from plmetric.core.files import require_regular_file
    from plmetric.retrieval.index import is_sharded, load_embeddings, read_index_metadata
    from plmetric.retrieval.stored import open_index

    path = Path(path)
    require_regular_file(path, "index/embeddings file")
    meta = read_index_metadata(path)
    if is_sharded(meta):
        stored = open_index(path)
        return Pile(path, stored.vectors, stored.paths, stored.model, stored.meta, stored)
    embeddings, _, paths, model = load_embeddings(path)
    meta = {k: v for k, v in (meta or {}).items() if k != "paths"}
    return Pile(path, embeddings.detach().to("cpu", torch.float32), paths, model, meta)
