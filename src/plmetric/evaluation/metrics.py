"""Exact zero-shot retrieval metrics (Recall@K, MAP@R, R-precision, NMI) and data set embedding.

Protocol: every embedding queries all the *other* embeddings of the test set. The query is
excluded by its index, never by dropping the first neighbour, so exact duplicates of the query are
ranked like any other point.

Scores: ``metric="cosine"`` ranks by the inner product of the L2-normalised rows (the rows are
normalised here, so already-normalised embeddings give plain inner products);
``metric="euclidean"`` ranks by the negated squared distance ``2 x·y - (|x|² + |y|²)``, and the
values returned by :func:`nearest_neighbors` are the negated distances ``-sqrt(max(d², 0))``.

Tie rule: neighbours are ordered by score, best first, and equal scores (as computed, bit for bit)
by ascending data set index. Both backends and every chunk size implement it exactly: a candidate
list is re-sorted by (score, index), and a row whose k-th score is tied with the weakest candidate
is recomputed with a full stable sort.

Metrics (Musgrave et al., "A Metric Learning Reality Check", 2020). For query ``i`` with label
``y_i``, ``R_i`` is the number of *other* items labelled ``y_i``; ``rel_i(m)`` is 1 when its m-th
nearest other item (m = 1, 2, ...) has label ``y_i``.

* ``recall@K`` = mean over all N queries of ``[exists m <= K: rel_i(m) = 1]``. A query with no
  positive (a class of one image) counts as a miss. pytorch-metric-learning's ``precision_at_1``
  instead drops such queries, so it equals ``recall@1 * N / #(queries with R_i > 0)``.
* ``R-precision_i`` = ``sum_{m<=R_i} rel_i(m) / R_i``.
* ``AP@R_i`` = ``(1/R_i) sum_{m<=R_i} rel_i(m) * P_i(m)``, ``P_i(m)`` = ``sum_{m'<=m} rel_i(m') / m``.
* ``map@r`` and ``r_precision`` average over the queries with ``R_i > 0`` (as
  pytorch-metric-learning does); they are NaN when no query has a positive.

The torch backend of the metrics (:func:`evaluate`, :func:`recall_at_k`, :func:`map_at_r`,
:func:`r_precision`) does not materialise k-nearest-neighbour lists: it sorts the points by label,
computes each score once in symmetric ``chunk_size × chunk_size`` blocks (half the matrix
products of a row-by-row search), counts for every query the items ranked ahead of its best
positive (exact Recall@K for every K) and keeps only the top ``max R_i`` neighbours for MAP@R and
R-precision. The faiss backend searches ``max(max(ks), max R_i)`` neighbours with a flat index.
Neither ever holds an N × N matrix.

Why ``backend="auto"`` is torch (``benchmarks/knn_speed.py``, docs/results.md "Why the faiss path is
slower"): with large K the faiss backend does more work, not less. It scores every ordered pair
(the torch engine each unordered pair once) and must keep the ``max(ks)`` best of every query; for
Recall@1000 faiss's selection of 1,000 candidates per query cost more than its matrix products
(20,000 × 512, one thread: 5.1 s for k = 1, 11.1 s for k = 1,000), and the 1,000-wide lists then
pass through the tie re-sort and label lookups. The torch engine only counts the items ranked ahead
of each query's best positive, whatever K: at SOP size with K up to 1,000 it needed 52 CPU seconds
against faiss's 77. Only for K ≤ 10 was faiss cheaper (by about 15 %), not enough to make the
metrics depend on whether faiss is installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "nearest_neighbors",
    "recall_at_k",
    "map_at_r",
    "r_precision",
    "nmi",
    "evaluate",
    "embed_dataset",
]

METRICS = ("cosine", "euclidean")
BACKENDS = ("auto", "torch", "faiss")

#: Square block edge of the torch metric engine: four block-sized buffers (two float32, two bool),
#: about 160 MiB at 4096, independent of N. On SOP-sized data (60,502 × 512) the whole evaluation
#: peaked at about 0.6 GiB above the embeddings; 2048 was ~10% faster on an idle 2-core machine but
#: much slower under CPU contention, and larger blocks mean fewer synchronisations on a GPU
#: (``benchmarks/eval_speed.py``).
DEFAULT_BLOCK_SIZE = 4096
#: Score budget of one row chunk of :func:`nearest_neighbors` (chunk_size × N scores).
DEFAULT_CHUNK_ELEMENTS = 1 << 26
#: Row chunk of faiss searches (the index keeps its own blocking; this bounds the result buffers).
DEFAULT_FAISS_CHUNK = 4096
#: Elements sorted at once when a tied row falls back to a full sort.
_FALLBACK_ELEMENTS = 1 << 24
#: Rank of the best positive of a query that has none (a miss for every K).
_NO_POSITIVE = torch.iinfo(torch.int64).max

FAISS_HINT = (
    "faiss is not installed: `pip install faiss-cpu` (or `pip install plmetric[faiss]`), or use backend='torch'"
)


# ----------------------------------------------------------------------------- validation


def _check_embeddings(embeddings: Any, name: str = "embeddings") -> Tensor:
    """A finite floating (N, d) tensor with N >= 2 (half precision is computed in float32)."""
    x = torch.as_tensor(embeddings)
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (N, d) tensor, got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name}: retrieval needs at least 2 items, got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name}: embedding dimension must be at least 1, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contain NaN or infinite values")
    return x.contiguous()


def _check_labels(labels: Any, n: int, device: torch.device) -> Tensor:
    """int64 class labels >= 0, one per embedding."""
    y = torch.as_tensor(labels)
    if y.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor, got shape {tuple(y.shape)}")
    if len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} embeddings: there must be one label per embedding")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    y = y.to(device=device, dtype=torch.int64)
    if bool((y < 0).any()):
        raise ValueError("labels must be >= 0: evaluation needs labelled data, and -1 marks unlabelled images")
    return y


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = (ks,) if isinstance(ks, int) else tuple(ks)
    if not ks or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    return tuple(int(k) for k in ks)


def _check_options(metric: str, backend: str, chunk_size: int | None) -> str:
    """Validate the search options; return the backend that will run ("torch" or "faiss")."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if backend == "faiss":
        _import_faiss()
        return "faiss"
    return "torch"


def _import_faiss():
    try:
        return importlib.import_module("faiss")
    except ImportError as error:
        raise ImportError(FAISS_HINT) from error


# ----------------------------------------------------------------------------- scores and exact top-k


def _prepare(x: Tensor, metric: str) -> tuple[Tensor, Tensor | None]:
    """Rows to multiply, and the squared norms for the euclidean score (None for cosine)."""
    if metric == "cosine":
        return F.normalize(x, dim=1).contiguous(), None
    return x, (x * x).sum(1)


def _score_block(a: Tensor, b: Tensor, a_sq: Tensor | None, b_sq: Tensor | None, out: Tensor | None = None) -> Tensor:
    """Ranking scores of rows of ``a`` (queries) against rows of ``b``.

    ``a @ b.T`` for cosine (rows already normalised), ``2 a·b - (|a|² + |b|²)`` for euclidean; the
    score of a pair is symmetric in its two points.
    """
    if a_sq is None:
        return torch.mm(a, b.T, out=out)
    scores = torch.add(a_sq[:, None], b_sq[None, :], out=out)
    return scores.addmm_(a, b.T, beta=-1, alpha=2)


def _sort_by_score_then_index(values: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Order each row by score (descending), equal scores by index (ascending).

    ``values`` must already be sorted descending (as topk returns them); only rows with equal
    neighbouring values are re-sorted.
    """
    if values.shape[1] < 2:
        return values, index
    tied = (values[:, 1:] == values[:, :-1]).any(1).nonzero().squeeze(1)
    if tied.numel():
        v, i = values[tied], index[tied]
        order = torch.argsort(i, dim=1, stable=True)
        v, i = v.gather(1, order), i.gather(1, order)
        order = torch.argsort(v, dim=1, descending=True, stable=True)
        values, index = values.clone(), index.clone()
        values[tied], index[tied] = v.gather(1, order), i.gather(1, order)
    return values, index


def _full_sort_rows(scores: Tensor, rows: Tensor, col_index: Tensor | None, keep: int) -> tuple[Tensor, Tensor]:
    """Exact (score desc, index asc) order of whole rows of ``scores``, first ``keep`` columns."""
    if col_index is not None:
        order = torch.argsort(col_index)
        col_index = col_index[order]
    batch = max(1, _FALLBACK_ELEMENTS // scores.shape[1])
    out_v, out_i = [], []
    for start in range(0, len(rows), batch):
        part = scores[rows[start : start + batch]]
        if col_index is not None:
            part = part[:, order]
        v, pos = torch.sort(part, dim=1, descending=True, stable=True)
        out_v.append(v[:, :keep])
        out_i.append(pos[:, :keep] if col_index is None else col_index[pos[:, :keep]])
    return torch.cat(out_v), torch.cat(out_i)


def _topk_exact(scores: Tensor, k: int, col_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``min(k, width)`` best columns of each row under the tie rule.

    ``col_index`` maps columns to data set indices (identity when None). topk takes one extra
    candidate; the first k after a (score, index) re-sort are exact unless the k-th score equals
    the weakest candidate's, in which case that row is fully sorted.
    """
    width = scores.shape[1]
    take = min(k + 1, width)
    values, pos = torch.topk(scores, take, dim=1)
    index = pos if col_index is None else col_index[pos]
    values, index = _sort_by_score_then_index(values, index)
    if take > k:
        tied = (values[:, k - 1] == values[:, take - 1]).nonzero().squeeze(1)
        if tied.numel():
            values[tied], index[tied] = _full_sort_rows(scores, tied, col_index, take)
    return values[:, :k], index[:, :k]


# ----------------------------------------------------------------------------- k nearest neighbours


def _torch_neighbor_chunks(
    x: Tensor, x_sq: Tensor | None, k: int, chunk_size: int | None
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield ``(start, scores, indices)`` for consecutive row chunks (chunk × N scores at a time)."""
    n = x.shape[0]
    rows = chunk_size or max(1, min(n, DEFAULT_CHUNK_ELEMENTS // n))
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        scores = _score_block(x[start:stop], x, None if x_sq is None else x_sq[start:stop], x_sq)
        local = torch.arange(stop - start, device=x.device)
        scores[local, start + local] = -torch.inf
        values, index = _topk_exact(scores, k)
        yield start, values, index


def _faiss_neighbor_chunks(
    x: Tensor, x_sq: Tensor | None, k: int, chunk_size: int | None
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Like :func:`_torch_neighbor_chunks`, searched with a faiss flat index (float32, CPU).

    faiss orders ties arbitrarily: the candidates are re-sorted by (score, index), and rows whose
    k-th score equals the weakest score faiss returned are recomputed exactly with torch.
    """
    faiss = _import_faiss()
    n, dim = x.shape
    data = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
    index = faiss.IndexFlatIP(dim) if x_sq is None else faiss.IndexFlatL2(dim)
    index.add(data)
    take = min(k + 2, n)  # the query itself, k neighbours and one to detect ties
    rows = chunk_size or DEFAULT_FAISS_CHUNK
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        dist, ids = index.search(data[start:stop], take)
        scores = torch.from_numpy(dist if x_sq is None else -dist)
        ids = torch.from_numpy(ids).long()
        is_self = ids == torch.arange(start, stop)[:, None]
        is_self[~is_self.any(1), -1] = True  # the query was crowded out by ties: drop the weakest
        keep = ~is_self
        values = scores[keep].view(stop - start, take - 1)
        neighbors = ids[keep].view(stop - start, take - 1)
        values, neighbors = _sort_by_score_then_index(values, neighbors)
        if take < n:
            tied = (values[:, k - 1] == scores[:, -1]).nonzero().squeeze(1)
            if tied.numel():
                query = start + tied.to(x.device)
                exact = _score_block(x[query], x, None if x_sq is None else x_sq[query], x_sq)
                local = torch.arange(len(query), device=x.device)
                exact[local, query] = -torch.inf
                v, i = _full_sort_rows(exact, local, None, k)
                values[tied, :k] = v.to("cpu", values.dtype)
                neighbors[tied, :k] = i.cpu()
        yield start, values[:, :k].to(x.device), neighbors[:, :k].to(x.device)


def _neighbor_chunks(x, x_sq, k, backend, chunk_size):
    chunks = _faiss_neighbor_chunks if backend == "faiss" else _torch_neighbor_chunks
    return chunks(x, x_sq, k, chunk_size)


def nearest_neighbors(
    embeddings: Tensor,
    k: int,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
    metric: str = "cosine",
) -> tuple[Tensor, Tensor]:
    """The k nearest *other* points of every point, best first, ties by ascending index.

    Args:
        embeddings: (N, d) floating tensor (or array).
        k: neighbours per point, ``1 <= k <= N - 1``.
        chunk_size: query rows scored at once; memory is about ``chunk_size × N`` scores. None picks
            ``2**26 // N`` rows (256 MiB of float32 scores) for torch and 4096 for faiss.
        backend: "torch" (chunked matrix products + topk), "faiss" (flat index; needs faiss-cpu),
            or "auto" (= torch; see the module docstring).
        metric: "cosine" (inner product of L2-normalised rows) or "euclidean".

    Returns:
        ``(values, indices)``, both (N, k): cosine similarities or negated euclidean distances, and
        int64 indices, on the device of ``embeddings``.
    """
    backend = _check_options(metric, backend, chunk_size)
    x = _check_embeddings(embeddings)
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n - 1:
        raise ValueError(f"k must be an integer in [1, N - 1] = [1, {n - 1}], got {k!r}")
    x, x_sq = _prepare(x, metric)
    values, indices = [], []
    for _, v, i in _neighbor_chunks(x, x_sq, int(k), backend, chunk_size):
        values.append(v)
        indices.append(i)
    values, indices = torch.cat(values), torch.cat(indices)
    if metric == "euclidean":
        values = values.neg().clamp_(min=0).sqrt_().neg_()
    return values, indices


# ----------------------------------------------------------------------------- rank statistics


@dataclass
class _RankStats:
    """What the metrics need from the ranking of each query (original order)."""

    first_positive_rank: Tensor  # (N,) items ranked ahead of the best positive; _NO_POSITIVE if none
    top_relevant: Tensor  # (N, max R) bool: same label at neighbour rank 1, 2, ...
    num_relevant: Tensor  # (N,) R_i


def _count_ahead(
    scores: Tensor,
    best: Tensor,
    best_index: Tensor,
    other_index: Tensor,
    dim: int,
    buffer: Tensor,
    known_equal: Tensor | int = 0,
) -> Tensor:
    """Per query, the items of this block ranked ahead of the query's best positive.

    Queries run along the axis other than ``dim`` (rows for dim=1, columns for dim=0): an item is
    ahead when its score is greater, or equal with a smaller data set index. ``known_equal`` items
    per query (the best positive itself) score exactly ``best``; only queries with more equal
    scores than that are checked item by item.
    """
    threshold = best[:, None] if dim == 1 else best[None, :]
    buffer = buffer[: scores.numel()].view_as(scores)
    greater = torch.gt(scores, threshold, out=buffer).sum(dim)  # float sums are exact below 2**24
    at_least = torch.ge(scores, threshold, out=buffer).sum(dim)
    count = greater.long()
    tied = (at_least - greater > known_equal).nonzero().squeeze(1)
    if tied.numel():
        tied_scores = scores[tied] if dim == 1 else scores[:, tied].T
        equal = tied_scores == best[tied, None]
        count[tied] += (equal & (other_index[None, :] < best_index[tied, None])).sum(1)
    return count


def _merge_top(top_values: Tensor, top_index: Tensor, rows: Tensor, values: Tensor, index: Tensor) -> None:
    """Merge candidates (row, score, data set index) into the per-row top lists, in place."""
    if rows.numel() == 0:
        return
    n, k = top_values.shape
    touched = torch.zeros(n, dtype=torch.bool, device=rows.device)
    touched[rows] = True
    touched = touched.nonzero().squeeze(1)
    rows = torch.cat([touched.repeat_interleave(k), rows])
    values = torch.cat([top_values[touched].reshape(-1), values])
    index = torch.cat([top_index[touched].reshape(-1), index])
    # order by (row, score descending) with two stable sorts ...
    order = torch.argsort(values, descending=True, stable=True)
    rows, values, index = rows[order], values[order], index[order]
    order = torch.argsort(rows, stable=True)
    rows, values, index = rows[order], values[order], index[order]
    # ... then by index among equal scores, re-sorting only the (rare) rows that have some
    tied = (rows[1:] == rows[:-1]) & (values[1:] == values[:-1])
    if bool(tied.any()):
        tied_rows = torch.zeros(n, dtype=torch.bool, device=rows.device)
        tied_rows[rows[1:][tied]] = True
        part = tied_rows[rows].nonzero().squeeze(1)
        r, v, i = rows[part], values[part], index[part]
        order = torch.argsort(i, stable=True)  # lexicographic (row, score desc, index), last key first
        r, v, i = r[order], v[order], i[order]
        order = torch.argsort(v, descending=True, stable=True)
        r, v, i = r[order], v[order], i[order]
        order = torch.argsort(r, stable=True)
        rows[part], values[part], index[part] = r[order], v[order], i[order]
    counts = torch.bincount(rows, minlength=n)
    rank = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    keep = rank < k
    top_values[rows[keep], rank[keep]] = values[keep]
    top_index[rows[keep], rank[keep]] = index[keep]


def _candidates(
    scores: Tensor, a0: int, b0: int, perm: Tensor, top_values: Tensor, top_index: Tensor, masks: list[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Entries of a block of rows ``a0...`` × columns ``b0...`` that may enter a top list.

    A score enters row r's list when it beats the list's last entry under the tie rule, for the
    rows and (by symmetry) for the columns of the block. Returns ``(rows, scores, indices)``.
    """
    a1, b1 = a0 + scores.shape[0], b0 + scores.shape[1]
    row_last, col_last = top_values[a0:a1, -1], top_values[b0:b1, -1]
    candidate = torch.ge(scores, row_last[:, None], out=masks[0].view_as(scores))
    candidate |= torch.ge(scores, col_last[None, :], out=masks[1].view_as(scores))
    i, j = candidate.nonzero(as_tuple=True)
    v, index_i, index_j = scores[i, j], perm[a0 + i], perm[b0 + j]
    row_min, col_min = row_last[i], col_last[j]
    for_row = (v > row_min) | ((v == row_min) & (index_j < top_index[a0 + i, -1]))
    for_col = (v > col_min) | ((v == col_min) & (index_i < top_index[b0 + j, -1]))
    return (
        torch.cat([a0 + i[for_row], b0 + j[for_col]]),
        torch.cat([v[for_row], v[for_col]]),
        torch.cat([index_j[for_row], index_i[for_col]]),
    )


def _class_aligned_blocks(class_starts: Tensor, n: int, block: int) -> list[tuple[int, int]]:
    """Split [0, n) into ranges of about ``block`` rows that never cut a class."""
    first_of_block = torch.ones_like(class_starts, dtype=torch.bool)
    block_id = torch.div(class_starts, block, rounding_mode="floor")
    first_of_block[1:] = block_id[1:] != block_id[:-1]
    starts = class_starts[first_of_block].tolist()
    return list(zip(starts, starts[1:] + [n], strict=True))


@dataclass
class _ByLabel:
    """The points sorted by (label, index): ``perm`` (sorted position -> index), the sorted
    embeddings ``x``, squared norms ``sq`` (or None), labels ``labels`` and each point's number of
    other points of its class ``relevant``."""

    perm: Tensor
    x: Tensor
    sq: Tensor | None
    labels: Tensor
    relevant: Tensor

    def sq_rows(self, start: int, stop: int) -> Tensor | None:
        return None if self.sq is None else self.sq[start:stop]


@dataclass
class _Partial:
    """Rank statistics being gathered, in sorted order: each query's best positive score ``best``
    (+inf: no positive) and its index, the count of items ahead of it, and the top list (index n:
    an empty slot)."""

    best: Tensor
    best_index: Tensor
    ahead: Tensor
    top_values: Tensor
    top_index: Tensor

    @classmethod
    def empty(cls, n: int, k_top: int, dtype: torch.dtype, device: torch.device) -> _Partial:
        return cls(
            best=torch.full((n,), torch.inf, dtype=dtype, device=device),  # +inf: no positive, nothing ahead
            best_index=torch.full((n,), -1, dtype=torch.int64, device=device),
            ahead=torch.zeros(n, dtype=torch.int64, device=device),
            top_values=torch.full((n, k_top), -torch.inf, dtype=dtype, device=device),
            top_index=torch.full((n, k_top), n, dtype=torch.int64, device=device),  # n: empty slot
        )


def _rank_stats_torch(
    x: Tensor, x_sq: Tensor | None, labels: Tensor, *, count_first: bool, k_top: int, block: int
) -> _RankStats:
    """Exact rank statistics from symmetric score blocks (see the module docstring).

    Points are sorted by (label, index) and cut into class-aligned blocks, so each query's
    positives all lie in its own block. Phase 1 scores each block against itself and finds every
    query's best positive; phase 2 scores each pair of different blocks once, using the block for
    the queries of both, counting items ahead of the best positive and offering scores above the
    current top-list threshold as candidates.
    """
    n = x.shape[0]
    perm = torch.argsort(labels, stable=True)
    lp = labels[perm]
    _, counts = torch.unique_consecutive(lp, return_counts=True)
    points = _ByLabel(perm, x[perm], None if x_sq is None else x_sq[perm], lp, (counts - 1).repeat_interleave(counts))
    blocks = _class_aligned_blocks(torch.cumsum(counts, 0) - counts, n, block)
    partial = _Partial.empty(n, k_top, x.dtype, x.device)
    _rank_within_blocks(points, partial, blocks, block, count_first=count_first, k_top=k_top)
    _rank_between_blocks(points, partial, blocks, block, count_first=count_first, k_top=k_top)
    return _unsorted_stats(points, partial, labels, k_top)


def _rank_within_blocks(
    points: _ByLabel, partial: _Partial, blocks: list[tuple[int, int]], block: int, *, count_first: bool, k_top: int
) -> None:
    """Phase 1: each class-aligned block against itself (row strips of at most ``block`` queries):
    every query's best positive, the items of its own block ahead of it, its first top list."""
    n, device = points.x.shape[0], points.x.device
    perm, xp, lp, relevant_p = points.perm, points.x, points.labels, points.relevant
    for start, stop in blocks:
        col_index, col_labels = perm[start:stop], lp[start:stop]
        for r0 in range(start, stop, block):
            r1 = min(r0 + block, stop)
            scores = _score_block(xp[r0:r1], xp[start:stop], points.sq_rows(r0, r1), points.sq_rows(start, stop))
            local = torch.arange(r1 - r0, device=device)
            scores[local, r0 - start + local] = -torch.inf
            if count_first:
                positive = lp[r0:r1, None] == col_labels[None, :]
                positive[local, r0 - start + local] = False
                p = scores.masked_fill(~positive, -torch.inf).amax(1)
                p = torch.where(relevant_p[r0:r1] > 0, p, torch.inf)
                # within a class, columns are in index order: the first best positive has the lowest index
                positive &= scores == p[:, None]
                p_index = col_index[positive.to(torch.uint8).argmax(1)]
                has_positive = (relevant_p[r0:r1] > 0).to(scores.dtype)
                partial.ahead[r0:r1] = _count_ahead(
                    scores, p, p_index, col_index, 1, torch.empty_like(scores), known_equal=has_positive
                )
                partial.best[r0:r1], partial.best_index[r0:r1] = p, p_index
            if k_top:
                v, i = _topk_exact(scores, k_top, col_index)
                width = v.shape[1]
                partial.top_values[r0:r1, :width] = v
                partial.top_index[r0:r1, :width] = torch.where(v == -torch.inf, n, i)  # never the query itself


def _rank_between_blocks(
    points: _ByLabel, partial: _Partial, blocks: list[tuple[int, int]], block: int, *, count_first: bool, k_top: int
) -> None:
    """Phase 2: every pair of different blocks, each score used for both of its points. Candidates
    for the top lists are merged once per block row, or earlier when a quarter of a block has
    piled up (few large sorts rather than many small ones, in bounded memory)."""
    n, device, dtype = points.x.shape[0], points.x.device, points.x.dtype
    perm, xp, sq_rows = points.perm, points.x, points.sq_rows
    best, best_index, ahead = partial.best, partial.best_index, partial.ahead
    top_values, top_index = partial.top_values, partial.top_index
    edge = min(block, n)
    score_buffer = torch.empty(edge * edge, dtype=dtype, device=device)
    count_buffer = torch.empty(edge * edge, dtype=dtype, device=device) if count_first else None
    masks = [torch.empty(edge * edge, dtype=torch.bool, device=device) for _ in range(2)] if k_top else []
    merge_limit = max(1, edge * edge // 4)  # bounds the pending candidates whatever the data
    for bi, (s1, e1) in enumerate(blocks):
        pending: list[tuple[Tensor, Tensor, Tensor]] = []
        pending_size = 0
        for s2, e2 in blocks[bi + 1 :]:
            for a0 in range(s1, e1, block):
                a1 = min(a0 + block, e1)
                for b0 in range(s2, e2, block):
                    b1 = min(b0 + block, e2)
                    out = score_buffer[: (a1 - a0) * (b1 - b0)].view(a1 - a0, b1 - b0)
                    scores = _score_block(xp[a0:a1], xp[b0:b1], sq_rows(a0, a1), sq_rows(b0, b1), out=out)
                    if count_first:
                        ahead[a0:a1] += _count_ahead(
                            scores, best[a0:a1], best_index[a0:a1], perm[b0:b1], 1, count_buffer
                        )
                        ahead[b0:b1] += _count_ahead(
                            scores, best[b0:b1], best_index[b0:b1], perm[a0:a1], 0, count_buffer
                        )
                    if k_top:
                        block_masks = [m[: scores.numel()] for m in masks]
                        pending.append(_candidates(scores, a0, b0, perm, top_values, top_index, block_masks))
                        pending_size += len(pending[-1][0])
                        if pending_size > merge_limit:
                            _merge_top(top_values, top_index, *(torch.cat(part) for part in zip(*pending, strict=True)))
                            pending, pending_size = [], 0
        if pending:
            _merge_top(top_values, top_index, *(torch.cat(part) for part in zip(*pending, strict=True)))


def _unsorted_stats(points: _ByLabel, partial: _Partial, labels: Tensor, k_top: int) -> _RankStats:
    """The gathered statistics back in the points' own order."""
    n, device, perm = points.x.shape[0], points.x.device, points.perm
    first = torch.empty(n, dtype=torch.int64, device=device)
    first[perm] = torch.where(points.relevant > 0, partial.ahead, _NO_POSITIVE)
    relevant = torch.empty(n, dtype=torch.int64, device=device)
    relevant[perm] = points.relevant
    top_relevant = torch.empty((n, k_top), dtype=torch.bool, device=device)
    if k_top:
        top_relevant[perm] = labels[partial.top_index] == points.labels[:, None]
    return _RankStats(first, top_relevant, relevant)


def _rank_stats_from_neighbors(chunks: Iterator[tuple[int, Tensor, Tensor]], labels: Tensor, k_top: int) -> _RankStats:
    """Rank statistics read off k-nearest-neighbour lists (no positive in the list: _NO_POSITIVE)."""
    n = len(labels)
    first = torch.empty(n, dtype=torch.int64, device=labels.device)
    top_relevant = torch.empty((n, k_top), dtype=torch.bool, device=labels.device)
    for start, _, neighbors in chunks:
        stop = start + len(neighbors)
        same = labels[neighbors] == labels[start:stop, None]
        first[start:stop] = torch.where(same.any(1), same.to(torch.uint8).argmax(1), _NO_POSITIVE)
        top_relevant[start:stop] = same[:, :k_top]
    counts = torch.bincount(labels)
    return _RankStats(first, top_relevant, counts[labels] - 1)


def _rank_stats(
    embeddings: Any,
    labels: Any,
    *,
    max_k: int,
    need_top: bool,
    backend: str,
    chunk_size: int | None,
    metric: str,
) -> tuple[_RankStats, Tensor]:
    """Validate, then compute the statistics with the chosen backend; returns them and the labels."""
    backend = _check_options(metric, backend, chunk_size)
    x = _check_embeddings(embeddings)
    y = _check_labels(labels, x.shape[0], x.device)
    n = x.shape[0]
    k_top = int(torch.bincount(y).max()) - 1 if need_top else 0
    x, x_sq = _prepare(x, metric)
    if backend == "torch":
        stats = _rank_stats_torch(
            x, x_sq, y, count_first=max_k > 0, k_top=k_top, block=chunk_size or DEFAULT_BLOCK_SIZE
        )
    else:
        k = max(min(max_k, n - 1), k_top, 1)
        stats = _rank_stats_from_neighbors(_neighbor_chunks(x, x_sq, k, backend, chunk_size), y, k_top)
    return stats, y


# ----------------------------------------------------------------------------- metrics


def _recalls(stats: _RankStats, ks: tuple[int, ...]) -> dict[str, float]:
    return {f"recall@{k}": (stats.first_positive_rank < k).double().mean().item() for k in ks}


def _map_and_r_precision(stats: _RankStats) -> tuple[float, float]:
    valid = stats.num_relevant > 0
    if not bool(valid.any()):
        return float("nan"), float("nan")
    relevant = stats.num_relevant[valid].double()
    k_top = stats.top_relevant.shape[1]
    rank = torch.arange(1, k_top + 1, device=relevant.device, dtype=torch.float64)
    hits = (stats.top_relevant[valid] & (rank[None, :] <= relevant[:, None])).double()
    precision = hits.cumsum(1) / rank
    average_precision = (precision * hits).sum(1) / relevant
    return average_precision.mean().item(), (hits.sum(1) / relevant).mean().item()


def recall_at_k(
    embeddings: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
    metric: str = "cosine",
) -> dict[str, float]:
    """Recall@K: the fraction of queries with a same-label item among their K nearest others.

    Queries without any other item of their class count as misses. ``chunk_size``, ``backend``
    and ``metric`` are the search options of :func:`nearest_neighbors` (for the torch backend
    ``chunk_size`` is the edge of the square score blocks).

    Returns:
        ``{"recall@K": fraction in [0, 1]}`` for each K.
    """
    ks = _check_ks(ks)
    stats, _ = _rank_stats(
        embeddings, labels, max_k=max(ks), need_top=False, backend=backend, chunk_size=chunk_size, metric=metric
    )
    return _recalls(stats, ks)


def map_at_r(
    embeddings: Tensor,
    labels: Tensor,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
    metric: str = "cosine",
) -> float:
    """MAP@R (mean over queries with R_i > 0 of ``(1/R_i) sum_{m<=R_i} rel_i(m) P_i(m)``); NaN if none."""
    stats, _ = _rank_stats(
        embeddings, labels, max_k=0, need_top=True, backend=backend, chunk_size=chunk_size, metric=metric
    )
    return _map_and_r_precision(stats)[0]


def r_precision(
    embeddings: Tensor,
    labels: Tensor,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
    metric: str = "cosine",
) -> float:
    """R-precision (mean over queries with R_i > 0 of the same-label fraction of their R_i nearest)."""
    stats, _ = _rank_stats(
        embeddings, labels, max_k=0, need_top=True, backend=backend, chunk_size=chunk_size, metric=metric
    )
    return _map_and_r_precision(stats)[1]


def nmi(embeddings: Tensor, labels: Tensor, seed: int = 0) -> float:
    """Normalized mutual information between the labels and a k-means clustering.

    The L2-normalised embeddings are clustered by scikit-learn's ``KMeans`` (k-means++, one
    initialisation, ``random_state=seed``) into as many clusters as there are classes; the score is
    ``sklearn.metrics.normalized_mutual_info_score`` (arithmetic normalisation). Cost grows as
    N × classes × d per iteration.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    x = _check_embeddings(embeddings)
    y = _check_labels(labels, x.shape[0], x.device).cpu().numpy()
    num_classes = len(np.unique(y))
    points = F.normalize(x, dim=1).cpu().numpy()
    if num_classes == 1:
        return float(normalized_mutual_info_score(y, np.zeros_like(y)))
    clusters = KMeans(n_clusters=num_classes, n_init=1, random_state=seed).fit_predict(points)
    return float(normalized_mutual_info_score(y, clusters))


def evaluate(
    embeddings: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
    compute_nmi: bool = True,
    seed: int = 0,
    metric: str = "cosine",
) -> dict[str, float | int]:
    """All zero-shot retrieval metrics of a labelled test set from one shared search.

    The torch backend ranks exactly for every K at once; the faiss backend searches
    ``max(max(ks), largest class size - 1)`` neighbours (capped at N - 1).

    Returns:
        ``{"recall@K": ... for K in ks, "map@r", "r_precision", "nmi" (when compute_nmi),
        "num_images", "num_classes"}``; fractions lie in [0, 1].
    """
    ks = _check_ks(ks)
    stats, y = _rank_stats(
        embeddings, labels, max_k=max(ks), need_top=True, backend=backend, chunk_size=chunk_size, metric=metric
    )
    metrics: dict[str, float | int] = dict(_recalls(stats, ks))
    metrics["map@r"], metrics["r_precision"] = _map_and_r_precision(stats)
    if compute_nmi:
        metrics["nmi"] = nmi(embeddings, y, seed=seed)
    metrics["num_images"] = len(y)
    metrics["num_classes"] = int(torch.unique(y).numel())
    return metrics


# ----------------------------------------------------------------------------- embedding a data set


@torch.no_grad()
def embed_dataset(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "embedding",
    runtime: str = "torch",
    cache_model: bool = True,
    side: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Embed every readable item of a data set whose items are ``(image, label, index)``; with
    ``progress``, a bar named ``desc`` with its rate (images/s).

    With ``side`` (an empty ``(0, ...)`` tensor of the side tensors' shape and dtype), each item's image
    is a pair ``(image tensor, side tensor)`` (e.g. the transform
    :class:`plmetric.retrieval.hashes.HashAlongside`: something computed from the decoded image in the
    same worker); the side tensors are returned as a fourth result, stacked in the same order.

    The model runs in eval mode (its previous train/eval mode is restored afterwards) on batches
    made by :func:`plmetric.data.datasets.collate_skip_none`, which drops unreadable (None) items.
    ``runtime`` (``auto`` | ``torch`` | ``onnxruntime``) picks what computes the forward passes
    (:func:`plmetric.data.runtime.inference_model`, built on the first batch's shape; ``cache_model``
    keeps its export on disk, False for a model that changes every epoch); the ``num_workers``
    DataLoader processes decode and resize the next batches while it runs.

    Returns:
        ``(embeddings, labels, indices)``: float32 (M, D), int64 (M,) and int64 (M,) CPU tensors
        in data set order, M = the number of readable items; (0, 0), (0,) and (0,) when none is
        (and with ``side`` the (M, ...) side tensors; ``side`` itself when none is).
    """
    from tqdm import tqdm  # not tqdm.auto: its asyncio tqdm calls iter(loader), a 2nd worker pool

    from plmetric.data.runtime import inference_model

    device = torch.device(device)
    loader = _embedding_loader(dataset, batch_size, num_workers, device)
    was_training = model.training
    model.eval()
    embeddings, labels, indices, sides = [], [], [], []
    runner: torch.nn.Module | None = None
    bar = tqdm(total=_sized(dataset), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for batch in loader:
            if batch is None:
                continue
            images, batch_labels, batch_indices = batch
            if side is not None:
                images, batch_side = images
                sides.append(torch.as_tensor(batch_side).cpu())
            if runner is None:
                runner = inference_model(model, tuple(images.shape[1:]), runtime, device, cache=cache_model)
            net = runner if getattr(runner, "input_shape", images.shape[1:]) == tuple(images.shape[1:]) else model
            output = net(images.to(device, non_blocking=True))
            if not isinstance(output, Tensor) or output.dim() != 2:
                raise ValueError(
                    f"embed_dataset: the model must return a (batch, dim) tensor, got "
                    f"{type(output).__name__} {tuple(output.shape) if isinstance(output, Tensor) else ''}"
                )
            embeddings.append(output.float().cpu())
            labels.append(torch.as_tensor(batch_labels).long().cpu())
            indices.append(torch.as_tensor(batch_indices).long().cpu())
            bar.update(len(batch_indices))
    finally:
        bar.close()
        model.train(was_training)
    dim = int(getattr(model, "embedding_dim", 0) or 0)
    if not embeddings:
        empty = torch.empty(0, dtype=torch.int64)
        out = torch.empty(0, dim), empty, empty.clone()
    else:
        out = torch.cat(embeddings), torch.cat(labels), torch.cat(indices)
    _report_unreadable(dataset, out[2])
    if side is not None:
        return (*out, torch.cat(sides) if sides else side)
    return out


def _embedding_loader(
    dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int, device: torch.device
) -> torch.utils.data.DataLoader:
    """The in-order DataLoader of :func:`embed_dataset` (unreadable items dropped), its sizes checked."""
    from plmetric.data.datasets import collate_skip_none

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skip_none,
        pin_memory=device.type == "cuda",
    )


def _sized(dataset: torch.utils.data.Dataset) -> int | None:
    """The number of items (the progress bar's total), or None for a data set without a length."""
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


def _report_unreadable(dataset: torch.utils.data.Dataset, embedded: Tensor) -> None:
    """Tell the (underlying) data set which requested items were not embedded: they were unreadable
    in whichever process decoded them, and later passes skip them without decoding them again."""
    base, requested = dataset, None
    while isinstance(base, torch.utils.data.Subset):
        requested = [base.indices[i] for i in requested] if requested is not None else list(base.indices)
        base = base.dataset
    mark = getattr(base, "mark_unreadable", None)
    if mark is None:
        return
    requested_set = set(range(len(base))) if requested is None else {int(i) for i in requested}
    missing = requested_set - set(embedded.tolist())
    if missing:
        mark(missing)
