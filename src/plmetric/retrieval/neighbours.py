"""Every indexed image's most similar *other* images: the neighbour graph of an index (``plmetric neighbours``),
also the first step of :mod:`plmetric.retrieval.duplicates`.

Scores are cosine similarities (the index stores L2-normalised embeddings). Through the index's faiss
index when it has one (approximate for HNSW/IVF), else exactly: the exact path multiplies one block of
rows by all N rows at a time, a block of ``max(1, BLOCK_ELEMENTS // N)`` rows, so memory stays at
``BLOCK_ELEMENTS`` floats (256 MiB) whatever N; no N x N matrix is ever formed.

A sharded index's vectors (a memory-mapped :class:`~plmetric.retrieval.stored.StoredVectors`) are never
materialised: the query rows are read by id, and the exact path scores a block of up to 4,096 query
rows against one block of ``BLOCK_ELEMENTS // 4096`` database rows at a time (float16 shards converted
a block at a time), merging each block's top k with the best so far: memory is one similarity block,
one database block and ``2k`` per query row, whatever N. Through faiss, a re-ranking kind (``ivfpq``)
re-scores its candidates from the stored rows (:func:`plmetric.retrieval.mapped.search_vectors`).

An image's own row is left out by its id, never by its score: two identical files both keep each
other. The search asks for k + 1 rows and drops the image's own id (or, when an approximate search
did not return it, the weakest row). Rows where an approximate search filled fewer than k slots
are recomputed exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from plmetric.retrieval.stored import StoredVectors

BLOCK_ELEMENTS = 2**26
"""The exact path's similarity block holds at most this many float32 values (256 MiB)."""
FAISS_BATCH = 4096
"""Rows per faiss search call (a progress step; faiss parallelises inside a call)."""


def block_rows(n: int) -> int:
    """Rows per exact block over ``n`` database rows: ``max(1, min(4096, BLOCK_ELEMENTS // n))``."""
    return max(1, min(4096, BLOCK_ELEMENTS // max(n, 1)))


def _progress(total: int, enabled: bool, what: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="img", disable=not enabled, dynamic_ncols=True, leave=False)


def _exact_others(x: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k other rows of ``x[rows]`` among all rows of ``x`` (own id excluded)."""
    sims = x[rows] @ x.T
    sims[torch.arange(len(rows)), rows] = -torch.inf
    return sims.topk(k, dim=1)


def _exact_others_blocks(
    source: StoredVectors, rows: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_exact_others` over mapped vectors: the query rows against one database block at a time
    (:data:`BLOCK_ELEMENTS` similarities at most), each block's top k merged with the best so far."""
    from plmetric.retrieval.mapped import float32_blocks

    ids = rows.numpy().astype(np.int64)
    queries = source.rows(ids)
    m = len(ids)
    best_scores = torch.full((m, 0), float("-inf"))
    best_ids = torch.zeros((m, 0), dtype=torch.int64)
    for start, block in float32_blocks(source, max(1, BLOCK_ELEMENTS // max(m, 1))):
        sims = torch.from_numpy(queries @ block.T)
        own = ids - start
        inside = np.flatnonzero((own >= 0) & (own < len(block)))
        sims[torch.from_numpy(inside), torch.from_numpy(own[inside])] = -torch.inf
        scores, found = sims.topk(min(k, sims.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_ids = torch.cat([best_ids, found + start], dim=1)
        best_scores, chosen = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_ids = merged_ids.gather(1, chosen)
        del sims  # freed before the next block's is made: one similarity block at a time
    return best_scores, best_ids


def nearest_others(
    embeddings: torch.Tensor | StoredVectors,
    k: int,
    faiss_index: tuple[Any, Any] | None = None,
    *,
    rows: torch.Tensor | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    progress: bool = False,
    what: str = "neighbours",
    estimate: Callable[[int, float], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar other images of each of ``rows`` (default: every row), best first.

    Args:
        embeddings: (N, d) L2-normalised embeddings, N >= 2: a tensor, or the mapped vectors of a sharded
            index (:class:`~plmetric.retrieval.stored.StoredVectors`, read block by block, never whole).
        k: neighbours per image, 1 <= k; more than N - 1 is cut to N - 1.
        faiss_index: ``(faiss index, AnnPlan)`` of exactly these embeddings
            (:func:`plmetric.retrieval.index.load_faiss_index`), or None for the exact search.
        rows: the query rows (int64 ids), in the order wanted.
        nprobe, ef_search: override the faiss index's search parameters.
        progress: show a progress bar with its rate.
        estimate: called once after the first block with its rows and the seconds it took
            (:meth:`plmetric.retrieval.mapped.RateEstimate.first_block`).

    Returns:
        ``(scores, ids)``: (len(rows), min(k, N-1)) float32 cosines and int64 ids.

    Raises:
        ValueError: k < 1, or fewer than two embeddings.
    """
    mapped = isinstance(embeddings, StoredVectors)
    x = embeddings if mapped else embeddings.detach().to("cpu", torch.float32)
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if n < 2:
        raise ValueError(f"an index of {n} image(s) has no neighbours to list; expected at least 2 images")
    k = min(k, n - 1)
    rows = torch.arange(n) if rows is None else rows.long()
    scores = torch.empty(len(rows), k, dtype=torch.float32)
    ids = torch.empty(len(rows), k, dtype=torch.int64)
    with _progress(len(rows), progress, what) as bar:
        size = FAISS_BATCH if faiss_index is not None or mapped else block_rows(n)
        began = time.perf_counter()
        for start, stop in _blocks(len(rows), size):
            block = rows[start:stop]
            if faiss_index is None:
                block_scores, block_ids = _exact_others_blocks(x, block, k) if mapped else _exact_others(x, block, k)
            else:
                block_scores, block_ids = _faiss_others(x, block, k, faiss_index, nprobe, ef_search)
            scores[start:stop], ids[start:stop] = block_scores, block_ids
            bar.update(stop - start)
            if estimate is not None and start == 0:
                estimate(stop, time.perf_counter() - began)
    return scores, ids


def _blocks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _faiss_others(
    x: torch.Tensor | StoredVectors,
    block: torch.Tensor,
    k: int,
    faiss_index: tuple[Any, Any],
    nprobe: int | None,
    ef_search: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from plmetric.retrieval.mapped import rows_of, search_vectors

    mapped = isinstance(x, StoredVectors)
    queries = torch.from_numpy(rows_of(x, block)) if mapped else x[block]
    found_scores, found_ids = search_vectors(queries, k + 1, x, faiss_index, nprobe=nprobe, ef_search=ef_search)
    is_self = found_ids == block[:, None]
    is_self[~is_self.any(1), -1] = True  # own id not returned: drop the weakest slot instead
    keep = ~is_self
    # a row may return its own id twice only if the faiss index is corrupt; keep exactly k per row
    keep &= keep.cumsum(1) <= k
    scores = found_scores[keep].view(len(block), k)
    ids = found_ids[keep].view(len(block), k)
    short = (ids < 0).any(1).nonzero().flatten()
    if short.numel():  # an IVF query whose cells held fewer than k others: exact for those rows
        exact = _exact_others_blocks if mapped else _exact_others
        scores[short], ids[short] = exact(x, block[short], k)
    return scores, ids
