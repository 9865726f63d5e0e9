"""faiss nearest-neighbour indexes over L2-normalised embeddings: choose, build, grow, search, store.

Every index scores by the inner product, which on unit vectors *is* the cosine similarity that the
exact search of :func:`plmetric.retrieval.index.top_k` ranks by (``plmetric embed``/``index`` store the
model's L2-normalised outputs), so the scores of every path are comparable:

* ``flat`` (``IndexFlatIP``): exact; the same neighbours as the torch search up to float32
  rounding (each score within ``γ_d`` of the true inner product, ``γ_d = d u / (1 - d u)``).
* ``ivf`` (``IndexIVFFlat`` on a spherical k-means quantiser of ``nlist`` cells): a query scans
  the ``nprobe`` cells whose centroids are most similar to it.
* ``hnsw`` (``IndexHNSWFlat``, ``M`` links per node): a greedy beam search (``efSearch``) on a
  proximity graph; vectors can be added at any time without retraining.
* ``ivfpq`` (faiss ``index_factory`` ``IVF{nlist}[_HNSW32],PQ{m}x4fs``): IVF cells whose vectors are stored
  as product-quantisation codes of their residuals, ``m`` sub-vectors of 4 bits each (``m / 2`` bytes; faiss's
  SIMD "fast scan" layout: at the same code size as 8-bit PQ, as good after re-ranking and 2-3x faster to
  scan and to train, benchmarks/index_scale.py at 100k), an HNSW coarse quantiser from
  :data:`HNSW_QUANTISER_FROM` cells); the ``rerank`` best candidates by code are re-scored exactly from the
  stored vectors (:func:`search_index`'s ``vectors``), so its scores are true cosines. It is the kind for
  indexes whose vectors do not fit in memory: trained on a sample (:func:`training_rows`,
  :func:`train_index`), then filled block by block (:func:`add_vectors`).

Parameters left unset are chosen from the number of vectors n by :func:`plan_index`; they and the
faiss version are recorded in the index file's metadata (see :mod:`plmetric.retrieval.index`).
faiss is an optional dependency (``pip install "plmetric[faiss]"``); only this module imports it.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from plmetric.core.options import AUTO_EXACT_BELOW, AUTO_KIND, MEMORY_BUDGET_MIB, IndexOptions, resolve

__all__ = [
    "AUTO_EXACT_BELOW",
    "AUTO_KIND",
    "FAISS_INSTALL_HINT",
    "FAISS_KINDS",
    "AnnPlan",
    "FaissUnavailableError",
    "VectorRows",
    "add_vectors",
    "build_index",
    "default_ef_construction",
    "default_ef_search",
    "default_nlist",
    "default_nprobe",
    "default_rerank",
    "faiss_available",
    "hnsw_memory_bytes",
    "import_faiss",
    "ivfpq_memory_bytes",
    "knn_table",
    "plan_index",
    "read_index",
    "search_index",
    "serialize_index",
    "train_index",
    "training_rows",
]

FAISS_KINDS = ("flat", "ivf", "hnsw", "ivfpq")
FAISS_INSTALL_HINT = 'faiss is not installed: pip install "plmetric[faiss]"'
#: faiss's k-means warns below this many training points per centroid; nlist stays under n / 39.
MIN_POINTS_PER_CELL = 39
#: ivfpq's coarse k-means trains on this many sampled vectors per cell (faiss's lower bound is 39; 64 keeps
#: a 10M, 16,384-cell training sample at 1M rows, 2 GiB of float32 at 512-d).
IVFPQ_TRAIN_POINTS_PER_CELL = 64
#: ivfpq's coarse k-means iterations: the HNSW-assigned k-means costs one search of the sample per iteration.
IVFPQ_KMEANS_ITERATIONS = 10
#: From this many cells the ivfpq coarse quantiser is an HNSW graph over the centroids (``IVF{nlist}_HNSW32``):
#: assigning 10M vectors to 16k cells exactly costs 10M x 16k x 512 x 2 = 1.7e14 flops (about an hour on two
#: cores), the graph about 100 distance computations per vector. autofaiss switches at 1,000 cells.
HNSW_QUANTISER_FROM = 1024
#: Centroids of each 4-bit PQ codebook: ivfpq needs at least this many training vectors.
PQ_CENTROIDS = 16
#: The beam of ivfpq's HNSW coarse quantiser while vectors are added (each is filed into the cell found): with
#: faiss's default of 16, 2% of 200k planted vectors (2,048 cells) went to a cell their own queries never
#: probe (recall@10 0.982, top-1 0.994); with 64, recall@10 0.999 and top-1 1.0, the adds 2.6x slower.
IVFPQ_ADD_EF_SEARCH = 64
#: The PQ sub-vector counts (4 bits each: m / 2 bytes per vector) ivfpq may choose, largest first; ``m`` must
#: divide the dimension.
PQ_M_CHOICES = (128, 96, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1)
#: The largest code ``plan_index`` chooses by itself (``--pq-m`` may ask more): with exact re-ranking the codes
#: only have to bring the true neighbours among the ``rerank`` candidates, and each doubling of ``m`` doubles
#: the index file and the scan time (10M x (64 code + 8 id) bytes = 0.67 GiB). At 100k planted 512-d vectors
#: (1,024 cells), recall@10 after re-ranking 100 was 0.995 with m = 128, 0.985 with m = 64.
PQ_M_DEFAULT_MAX = 128
#: HNSW memory per vector beyond its float32 vector and its 2M base-layer links (4 bytes each): the level
#: (4 bytes), the offset of its links (8) and the upper layers' M links with probability 1/M each (4 x M / M);
#: 512-d, M = 32: 2,048 + 256 + 16 = 2,320 bytes, as measured (2.32 GB at 1M vectors, issue 31).
HNSW_OVERHEAD_BYTES = 16
#: Bytes an IVF list entry costs besides its code: its int64 id.
IVF_ID_BYTES = 8
#: Queries whose ivfpq candidates are re-scored together: 256 x 100 candidates x 512-d float32 = 50 MiB at most.
RERANK_QUERY_BLOCK = 256


class FaissUnavailableError(ImportError, ValueError):
    """faiss is needed (a ``--faiss`` option, an index with a faiss file) but not installed.

    A ValueError too, so that the command line reports it as one line with exit status 2.
    """


def import_faiss() -> Any:
    """The ``faiss`` module.

    Raises:
        FaissUnavailableError: faiss is not installed (the message says how to install it).
    """
    try:
        return importlib.import_module("faiss")
    except ImportError:
        raise FaissUnavailableError(FAISS_INSTALL_HINT) from None


def faiss_available() -> bool:
    """Whether faiss can be imported."""
    try:
        import_faiss()
    except FaissUnavailableError:
        return False
    return True


# ----------------------------------------------------------------------------- parameters


def default_nlist(n: int) -> int:
    """IVF cells for n vectors: ``round(4 sqrt(n))``, at most ``n // 39`` (faiss's k-means wants 39
    training points per centroid), at least 1."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_CELL))


def default_nprobe(nlist: int) -> int:
    """IVF cells scanned per query: ``ceil(nlist / 16)``, at least 8 (all of them below 8 cells).

    A query then scans about 1/16 of the database. On planted near-duplicates
    (benchmarks/index_scale.py) recall@10 was 1.0 with it at 10k and 100k vectors, and still
    0.9998 at a fifth of it (nprobe 16 of 1,265 cells; 0.9925 at 8): the margin is for real
    embeddings, which are less clustered. ``search --nprobe`` changes it without a rebuild.
    """
    return min(nlist, max(8, math.ceil(nlist / 16)))


def default_ef_construction(n: int) -> int:
    """HNSW build beam: 80 below 100k vectors, 128 below 1M, 200 from 1M (a larger graph needs a
    wider beam to keep its links good; the build time grows about linearly with it)."""
    return 80 if n < 100_000 else 128 if n < 1_000_000 else 200


def default_ef_search(n: int) -> int:
    """HNSW search beam: 64 below 1M vectors, 128 from 1M (never below the k asked for)."""
    return 64 if n < 1_000_000 else 128


def default_ivfpq_nlist(n: int) -> int:
    """ivfpq cells for n vectors: the power of two nearest ``4 sqrt(n)`` (faiss's guideline; 16,384 at 10M,
    4,096 at 1M), at most the largest power of two with 39 vectors a cell (k-means), at least 1."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    cap = max(1, n // MIN_POINTS_PER_CELL)
    return max(1, min(nlist, 2 ** int(math.log2(cap))))


def default_ivfpq_nprobe(nlist: int) -> int:
    """ivfpq cells scanned per query: ``ceil(sqrt(nlist))`` (16,384 cells: 128), at least 16, at most nlist.

    The share of the database scanned falls as ``1 / sqrt(nlist)``. At 100k planted 512-d vectors (1,024 cells,
    m = 128, 100 re-ranked) recall@10 was 0.974 at nprobe 8, 0.995 at 16-32, 0.996 at 64.
    """
    return min(nlist, max(16, math.ceil(math.sqrt(nlist))))


def default_rerank(k: int = 10) -> int:
    """ivfpq candidates re-scored exactly per query: ``max(100, 10 k)``; a search re-scores at least k."""
    return max(100, 10 * k)


def hnsw_memory_bytes(n: int, dim: int, m: int) -> int:
    """HNSW's memory for n vectors: ``n (4 dim + 8 m + HNSW_OVERHEAD_BYTES)`` (the float32 vectors, 2m
    base-layer links of 4 bytes, the rest: :data:`HNSW_OVERHEAD_BYTES`)."""
    return n * (4 * dim + 8 * m + HNSW_OVERHEAD_BYTES)


def ivfpq_memory_bytes(n: int, dim: int, nlist: int, pq_m: int) -> int:
    """ivfpq's memory for n vectors: the 4-bit codes and ids ``n (ceil(pq_m / 2) + 8)``, each cell's list
    padded to a block of 32 codes (``nlist x 32 x ceil(pq_m / 2)`` at most), the float32 centroids and, with an
    HNSW quantiser, its links (``nlist (4 dim + 8 x 32 + 16)``), the PQ codebooks (``16 x 4 dim``)."""
    code = -(-pq_m // 2)
    centroid = 4 * dim + 32 * code + (8 * 32 + HNSW_OVERHEAD_BYTES if nlist >= HNSW_QUANTISER_FROM else 0)
    return n * (code + IVF_ID_BYTES) + nlist * centroid + 16 * 4 * dim


def _ivfpq_factory(nlist: int, pq_m: int) -> str:
    quantiser = "_HNSW32" if nlist >= HNSW_QUANTISER_FROM else ""
    return f"IVF{nlist}{quantiser},PQ{pq_m}x4fs"


@dataclass(frozen=True)
class AnnPlan:
    """A faiss index kind and its resolved parameters (what an index file records)."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": dict(self.params)}


def plan_index(n: int, options: IndexOptions | None = None, *, dim: int = 512, **fields: Any) -> AnnPlan | None:
    """The faiss index for n vectors of dimension ``dim``, or None for the exact torch search.

    ``options.kind``: ``none`` -> None; ``auto`` -> None below :data:`AUTO_EXACT_BELOW` vectors, else
    :data:`AUTO_KIND` while :func:`hnsw_memory_bytes` fits the memory budget, else ``ivfpq``; ``flat``,
    ``ivf``, ``hnsw`` or ``ivfpq`` -> that kind. Unset parameters come from :func:`default_nlist`,
    :func:`default_nprobe`, :func:`default_ef_construction` and :func:`default_ef_search`; ``nprobe`` is
    capped at ``nlist``.

    ivfpq (the rule follows autofaiss's, sized for two CPU cores): ``nlist`` from
    :func:`default_ivfpq_nlist`; ``m`` (bytes per code, ``--pq-m``) the largest of :data:`PQ_M_CHOICES` that
    divides ``dim``, is at most :data:`PQ_M_DEFAULT_MAX` and ``dim / 4`` (sub-vectors of 4 dimensions or
    more) and whose :func:`ivfpq_memory_bytes` fits the budget; ``nprobe`` from :func:`default_ivfpq_nprobe`;
    ``rerank`` from :func:`default_rerank`. The memory budget is ``options.memory_budget_mib`` or
    :data:`plmetric.core.options.MEMORY_BUDGET_MIB`.

    Raises:
        ValueError: an option out of range, ``nlist`` larger than n (k-means needs at least one vector per
            cell), a ``pq_m`` that does not divide ``dim``, or a memory budget too small for the smallest
            ivfpq code (the message names --memory-budget).
    """
    options = resolve(IndexOptions, options, **fields)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"plan_index: n must be a positive integer, got {n!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"plan_index: dim must be a positive integer, got {dim!r}")
    budget_mib = options.memory_budget_mib if options.memory_budget_mib is not None else MEMORY_BUDGET_MIB
    kind = options.kind
    if kind == "auto":
        if n < AUTO_EXACT_BELOW:
            kind = "none"
        elif hnsw_memory_bytes(n, dim, options.hnsw_m) <= budget_mib * 2**20:
            kind = AUTO_KIND
        else:
            kind = "ivfpq"
    if kind == "ivfpq":
        return _plan_ivfpq(n, dim, options, budget_mib)
    if kind == "none":
        return None
    if kind == "flat":
        return AnnPlan("flat", {})
    if kind == "ivf":
        nlist = options.nlist if options.nlist is not None else default_nlist(n)
        if nlist > n:
            raise ValueError(f"--nlist {nlist}: IVF needs at least as many vectors as cells, the index has {n}")
        nprobe = options.nprobe if options.nprobe is not None else default_nprobe(nlist)
        return AnnPlan("ivf", {"nlist": nlist, "nprobe": min(nprobe, nlist), "trained_on": n})
    ef_construction = options.ef_construction
    ef_search = options.ef_search
    return AnnPlan(
        "hnsw",
        {
            "m": options.hnsw_m,
            "ef_construction": ef_construction if ef_construction is not None else default_ef_construction(n),
            "ef_search": ef_search if ef_search is not None else default_ef_search(n),
        },
    )


def _plan_ivfpq(n: int, dim: int, options: IndexOptions, budget_mib: int) -> AnnPlan:
    """The ivfpq plan of :func:`plan_index` (its docstring states the rules)."""
    nlist = options.nlist if options.nlist is not None else default_ivfpq_nlist(n)
    if nlist > n:
        raise ValueError(f"--nlist {nlist}: IVF needs at least as many vectors as cells, the index has {n}")
    budget = budget_mib * 2**20
    if options.pq_m is not None:
        if dim % options.pq_m:
            raise ValueError(f"--pq-m {options.pq_m} must divide the embedding dimension {dim}")
        pq_m = options.pq_m
        need = ivfpq_memory_bytes(n, dim, nlist, pq_m)
        if need > budget:
            raise ValueError(
                f"--memory-budget {budget_mib} MiB is too small for an ivfpq index of {n:,} vectors with --pq-m "
                f"{pq_m}: it needs {math.ceil(need / 2**20)} MiB"
            )
    else:
        fitting = [m for m in PQ_M_CHOICES if dim % m == 0 and ivfpq_memory_bytes(n, dim, nlist, m) <= budget]
        if not fitting:
            need = ivfpq_memory_bytes(n, dim, nlist, 1)
            raise ValueError(
                f"--memory-budget {budget_mib} MiB is too small for an ivfpq index of {n:,} vectors of dimension "
                f"{dim}: the smallest code (half a byte a vector) needs {math.ceil(need / 2**20)} MiB"
            )
        preferred = [m for m in fitting if m <= PQ_M_DEFAULT_MAX and 4 * m <= dim]
        pq_m = preferred[0] if preferred else fitting[-1]
    if n < PQ_CENTROIDS:
        raise ValueError(
            f"--faiss ivfpq needs at least {PQ_CENTROIDS} vectors to train its codebooks ({PQ_CENTROIDS} centroids "
            f"each), the index has {n}: use --faiss flat or hnsw"
        )
    nprobe = options.nprobe if options.nprobe is not None else default_ivfpq_nprobe(nlist)
    params = {
        "factory": _ivfpq_factory(nlist, pq_m),
        "nlist": nlist,
        "pq_m": pq_m,
        "nprobe": min(nprobe, nlist),
        "rerank": default_rerank(),
        "trained_on": n,
    }
    return AnnPlan("ivfpq", params)


# ----------------------------------------------------------------------------- build, grow, search


def _as_float32(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    array = x.detach().to("cpu", torch.float32).numpy() if isinstance(x, Tensor) else np.asarray(x, np.float32)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty (N, d) array, got shape {array.shape}")
    return np.ascontiguousarray(array)


def training_rows(n: int, plan: AnnPlan, seed: int = 0) -> np.ndarray:
    """The sorted int64 rows of an n-vector set that :func:`train_index` should train ``plan`` on.

    ivfpq: a seeded random sample of ``IVFPQ_TRAIN_POINTS_PER_CELL x nlist`` rows (all of them when n is
    smaller); ivf: of ``256 x nlist`` (faiss's k-means uses no more); flat and hnsw need no training: all
    rows (they are trained by nothing and filled by :func:`add_vectors`).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"training_rows: n must be a positive integer, got {n!r}")
    per_cell = {"ivfpq": IVFPQ_TRAIN_POINTS_PER_CELL, "ivf": 256}.get(plan.kind)
    if per_cell is None or n <= per_cell * plan.params["nlist"]:
        return np.arange(n, dtype=np.int64)
    rows = np.random.default_rng(seed).choice(n, size=per_cell * plan.params["nlist"], replace=False)
    return np.sort(rows).astype(np.int64)


def train_index(sample: Tensor | np.ndarray, plan: AnnPlan, dim: int) -> Any:
    """An empty faiss index of ``plan`` for ``dim``-dimensional vectors, trained on ``sample`` (rows of
    :func:`training_rows`; flat and hnsw ignore it).

    IVF and ivfpq train their cells by spherical k-means (centroids renormalised, as suits unit vectors;
    faiss's fixed seed makes it deterministic), ivfpq with :data:`IVFPQ_KMEANS_ITERATIONS` iterations
    assigned through its HNSW quantiser when it has one, then its PQ codebooks on the residuals.
    """
    faiss = import_faiss()
    if plan.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, plan.params["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = plan.params["ef_construction"]
        index.hnsw.efSearch = plan.params["ef_search"]
        return index
    if plan.kind not in FAISS_KINDS:
        raise ValueError(f"unknown faiss index kind {plan.kind!r}; expected one of {', '.join(FAISS_KINDS)}")
    x = _as_float32(sample, "training sample")
    if x.shape[1] != dim:
        raise ValueError(f"the training sample has dimension {x.shape[1]}, the index {dim}")
    nlist = plan.params["nlist"]
    if nlist > len(x):
        raise ValueError(f"IVF with {nlist} cells needs at least {nlist} vectors to train, got {len(x)}")
    if plan.kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.index_factory(dim, plan.params["factory"], faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = IVFPQ_KMEANS_ITERATIONS
    index.cp.spherical = True
    index.cp.min_points_per_centroid = min(MIN_POINTS_PER_CELL, len(x) // nlist)  # no warning on tiny sets
    index.train(x)
    index.nprobe = plan.params["nprobe"]
    return index


def build_index(embeddings: Tensor | np.ndarray, plan: AnnPlan) -> Any:
    """Build the faiss index of ``plan`` on (N, d) L2-normalised embeddings (inner product): trained on
    the rows of :func:`training_rows` (:func:`train_index`), then all rows added (:func:`add_vectors`)."""
    x = _as_float32(embeddings, "embeddings")
    needs_sample = plan.kind in ("ivf", "ivfpq")
    index = train_index(x[training_rows(len(x), plan)] if needs_sample else x[:0], plan, x.shape[1])
    add_vectors(index, x)
    return index


def add_vectors(index: Any, embeddings: Tensor | np.ndarray) -> None:
    """Append rows to a built index (their ids continue from ``index.ntotal``).

    IVF and ivfpq file them into their existing cells (ivfpq encodes them with its trained codebooks, its HNSW
    quantiser searching with a beam of :data:`IVFPQ_ADD_EF_SEARCH`; no retraining: after much growth,
    rebuild for the best recall); HNSW links them into its graph; flat stores
    them. A large set can be added block by block: the result is the same.
    """
    x = _as_float32(embeddings, "embeddings")
    if x.shape[1] != index.d:
        raise ValueError(f"cannot add {x.shape[1]}-dimensional vectors to a {index.d}-dimensional faiss index")
    quantiser = _hnsw_quantiser(index)
    if quantiser is not None:  # file each vector into its nearest cell, not one a narrow beam stopped at
        quantiser.hnsw.efSearch = IVFPQ_ADD_EF_SEARCH
    index.add(x)


def _hnsw_quantiser(index: Any) -> Any:
    """The HNSW coarse quantiser of an IVF index (ivfpq from HNSW_QUANTISER_FROM cells), else None."""
    faiss = import_faiss()
    try:
        quantiser = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    except RuntimeError:  # not an IVF index
        return None
    return quantiser if isinstance(quantiser, faiss.IndexHNSW) else None


VectorRows = Callable[[np.ndarray], np.ndarray]
"""The stored vectors of some rows: (m,) int64 ids -> (m, d) float32 (e.g. ``StoredVectors.rows``)."""


def search_index(
    index: Any,
    queries: Tensor | np.ndarray,
    k: int,
    plan: AnnPlan,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    vectors: VectorRows | None = None,
    rerank: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The k most similar indexed rows of each query: ``(scores, ids)``, (Q, min(k, N)) tensors.

    Scores are inner products (cosines of unit vectors), best first. An approximate index may find
    fewer than k rows for a query (an IVF query whose cells hold fewer); those slots hold id -1
    and score -inf. ``nprobe``/``ef_search`` override the plan's search parameters for this call;
    HNSW's beam is never narrower than k.

    ivfpq: the index is searched for ``max(rerank or plan.params["rerank"], k)`` candidates by their codes,
    which are re-scored exactly as ``queries @ vectors(ids).T`` (float32) and the best k kept: the scores are
    true cosines and the ranking exact among the candidates. Its HNSW quantiser's beam is ``2 nprobe``.
    Other kinds ignore ``vectors`` and ``rerank``.

    Raises:
        ValueError: k < 1, queries of another dimension, or ivfpq without ``vectors`` (a caller's bug).
    """
    faiss = import_faiss()
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"search_index: k must be an integer >= 1, got {k!r}")
    x = _as_float32(queries, "queries")
    if x.shape[1] != index.d:
        raise ValueError(f"queries have dimension {x.shape[1]}, the faiss index {index.d}")
    k = min(k, int(index.ntotal))
    if plan.kind in ("ivf", "ivfpq"):
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(int(nprobe or plan.params["nprobe"]), ivf.nlist)
        quantiser = _hnsw_quantiser(index)
        if quantiser is not None:
            quantiser.hnsw.efSearch = max(2 * ivf.nprobe, 16)
    elif plan.kind == "hnsw":
        index.hnsw.efSearch = max(int(ef_search or plan.params["ef_search"]), k)
    if plan.kind == "ivfpq":
        if vectors is None:
            raise ValueError("search_index: an ivfpq index needs the stored vectors (vectors=) to re-rank")
        candidates = min(max(int(rerank or plan.params["rerank"]), k), int(index.ntotal))
        _, found = index.search(x, candidates)
        scores, ids = _rerank(x, found, k, vectors)
    else:
        scores, ids = index.search(x, k)
    scores = torch.from_numpy(scores)
    ids = torch.from_numpy(ids).long()
    scores[ids < 0] = -torch.inf
    return scores, ids


def _rerank(queries: np.ndarray, found: np.ndarray, k: int, vectors: VectorRows) -> tuple[np.ndarray, np.ndarray]:
    """The best k of each query's candidate ids ``found`` (-1: none) by their exact inner products with the
    rows ``vectors`` returns, best first: ``(scores, ids)`` (Q, k), empty slots -inf and -1.

    The distinct rows of :data:`RERANK_QUERY_BLOCK` queries are fetched at once (one ``vectors`` call); the
    dot products are taken 16 queries at a time, so their gathered candidates stay in the CPU cache.
    """
    q, c = found.shape
    scores = np.full((q, c), -np.inf, dtype=np.float32)
    for start in range(0, q, RERANK_QUERY_BLOCK):
        block = found[start : start + RERANK_QUERY_BLOCK]
        valid = block >= 0
        wanted = np.unique(block[valid])
        if not len(wanted):
            continue
        rows = np.asarray(vectors(wanted), dtype=np.float32)
        if rows.shape != (len(wanted), queries.shape[1]):
            raise ValueError(f"vectors gave shape {rows.shape} for {len(wanted)} rows of dimension {queries.shape[1]}")
        where = np.searchsorted(wanted, np.where(valid, block, wanted[0]))
        for sub in range(0, len(block), 16):
            at = start + sub
            candidates = rows[where[sub : sub + 16]]  # (16, c, d)
            sims = np.matmul(candidates, queries[at : at + len(candidates), :, None])[:, :, 0]  # float32 dot products
            scores[at : at + len(candidates)] = np.where(valid[sub : sub + 16], sims, -np.inf)
    best, order = torch.from_numpy(scores).topk(k, dim=1)  # equal scores: either order is exact
    ids = torch.from_numpy(found).gather(1, order).masked_fill(best == -torch.inf, -1)
    return best.numpy(), ids.numpy()


def knn_table(embeddings: Tensor, k: int, plan: AnnPlan) -> Tensor:
    """The k most similar *other* rows of every row through a faiss index of ``plan`` (the
    trainer's neighbour table of a large memory bank): (N, k) int64 on the CPU, best first.

    The index is searched for k + 1 rows; a row's own id is dropped (when the search did not return
    it, the weakest result is dropped instead). Rows for which the approximate search found fewer
    than k others (id -1) are recomputed exactly. With HNSW the table is approximate (benchmarks/
    index_scale.py measures its recall) and, built on several threads, not bit-reproducible.
    """
    x = embeddings.detach().to("cpu", torch.float32)
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"knn_table: k must be an integer in [1, N) = [1, {n}), got {k!r}")
    index = build_index(x, plan)
    _, ids = search_index(index, x, k + 1, plan, vectors=lambda rows: x[torch.from_numpy(rows)].numpy())
    is_self = ids == torch.arange(n)[:, None]
    is_self[~is_self.any(1), -1] = True  # self not returned: drop the weakest result instead
    table = ids[~is_self].view(n, k)
    short = (table < 0).any(1).nonzero().flatten()
    if short.numel():  # fewer than k found (e.g. IVF cells too small): exact for those rows
        sims = x[short] @ x.T
        sims[torch.arange(short.numel()), short] = -torch.inf
        table[short] = sims.topk(k, dim=1).indices
    return table


# ----------------------------------------------------------------------------- storage


def serialize_index(index: Any) -> bytes:
    """The faiss index as bytes (faiss's own format), for an atomic write."""
    return import_faiss().serialize_index(index).tobytes()


def read_index(path: str | os.PathLike) -> Any:
    """Read a faiss index file.

    Raises:
        ValueError: the file is not a faiss index faiss can read (the message names it).
    """
    faiss = import_faiss()
    try:
        return faiss.read_index(str(Path(path)))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()
        raise ValueError(f"{path} is not a readable faiss index ({reason[-1] if reason else 'unreadable'})") from None
