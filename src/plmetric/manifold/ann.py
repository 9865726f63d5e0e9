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
from typing import Any

import numpy as np
import torch
from torch import Tensor

from plmetric.core.options import AUTO_EXACT_BELOW, AUTO_KIND, IndexOptions, resolve

__all__ = [
    "AUTO_EXACT_BELOW",
    "AUTO_KIND",
    "FAISS_INSTALL_HINT",
    "FAISS_KINDS",
    "AnnPlan",
    "FaissUnavailableError",
    "add_vectors",
    "build_index",
    "default_ef_construction",
    "default_ef_search",
    "default_nlist",
    "default_nprobe",
    "faiss_available",
    "import_faiss",
    "plan_index",
    "read_index",
    "search_index",
    "serialize_index",
]

FAISS_KINDS = ("flat", "ivf", "hnsw")
FAISS_INSTALL_HINT = 'faiss is not installed: pip install "plmetric[faiss]"'
#: faiss's k-means warns below this many training points per centroid; nlist stays under n / 39.
MIN_POINTS_PER_CELL = 39


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


@dataclass(frozen=True)
class AnnPlan:
    """A faiss index kind and its resolved parameters (what an index file records)."""

    kind: str
    params: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": dict(self.params)}


def plan_index(n: int, options: IndexOptions | None = None, **fields: Any) -> AnnPlan | None:
    """The faiss index for n vectors, or None for the exact torch search.

    ``options.kind``: ``none`` -> None; ``auto`` -> None below :data:`AUTO_EXACT_BELOW` vectors,
    else :data:`AUTO_KIND`; ``flat``, ``ivf`` or ``hnsw`` -> that kind. Unset parameters come from
    :func:`default_nlist`, :func:`default_nprobe`, :func:`default_ef_construction` and
    :func:`default_ef_search`; ``nprobe`` is capped at ``nlist``.

    Raises:
        ValueError: an option out of range, or ``nlist`` larger than n (k-means needs at least one
            vector per cell).
    """
    options = resolve(IndexOptions, options, **fields)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"plan_index: n must be a positive integer, got {n!r}")
    kind = options.kind
    if kind == "auto":
        kind = "none" if n < AUTO_EXACT_BELOW else AUTO_KIND
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


# ----------------------------------------------------------------------------- build, grow, search


def _as_float32(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    array = x.detach().to("cpu", torch.float32).numpy() if isinstance(x, Tensor) else np.asarray(x, np.float32)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty (N, d) array, got shape {array.shape}")
    return np.ascontiguousarray(array)


def build_index(embeddings: Tensor | np.ndarray, plan: AnnPlan) -> Any:
    """Build the faiss index of ``plan`` on (N, d) L2-normalised embeddings (inner product).

    IVF trains its quantiser by spherical k-means (centroids renormalised, as suits unit vectors;
    faiss's fixed seed makes it deterministic) on at most 256 points per cell, then adds all rows.
    """
    faiss = import_faiss()
    x = _as_float32(embeddings, "embeddings")
    dim = x.shape[1]
    if plan.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif plan.kind == "ivf":
        nlist = plan.params["nlist"]
        if nlist > len(x):
            raise ValueError(f"IVF with {nlist} cells needs at least {nlist} vectors to train, got {len(x)}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True
        index.cp.min_points_per_centroid = min(MIN_POINTS_PER_CELL, len(x) // nlist)  # no warning on tiny sets
        index.train(x)
        index.nprobe = plan.params["nprobe"]
    elif plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, plan.params["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = plan.params["ef_construction"]
        index.hnsw.efSearch = plan.params["ef_search"]
    else:
        raise ValueError(f"unknown faiss index kind {plan.kind!r}; expected one of {', '.join(FAISS_KINDS)}")
    index.add(x)
    return index


def add_vectors(index: Any, embeddings: Tensor | np.ndarray) -> None:
    """Append rows to a built index (their ids continue from ``index.ntotal``).

    IVF files them into its existing cells (no retraining: after much growth, rebuild for the best
    recall); HNSW links them into its graph; flat stores them.
    """
    x = _as_float32(embeddings, "embeddings")
    if x.shape[1] != index.d:
        raise ValueError(f"cannot add {x.shape[1]}-dimensional vectors to a {index.d}-dimensional faiss index")
    index.add(x)


def search_index(
    index: Any,
    queries: Tensor | np.ndarray,
    k: int,
    plan: AnnPlan,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The k most similar indexed rows of each query: ``(scores, ids)``, (Q, min(k, N)) tensors.

    Scores are inner products (cosines of unit vectors), best first. An approximate index may find
    fewer than k rows for a query (an IVF query whose cells hold fewer); those slots hold id -1
    and score -inf. ``nprobe``/``ef_search`` override the plan's search parameters for this call;
    HNSW's beam is never narrower than k.
    """
    faiss = import_faiss()
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"search_index: k must be an integer >= 1, got {k!r}")
    x = _as_float32(queries, "queries")
    if x.shape[1] != index.d:
        raise ValueError(f"queries have dimension {x.shape[1]}, the faiss index {index.d}")
    k = min(k, int(index.ntotal))
    if plan.kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(int(nprobe or plan.params["nprobe"]), ivf.nlist)
    elif plan.kind == "hnsw":
        index.hnsw.efSearch = max(int(ef_search or plan.params["ef_search"]), k)
    scores, ids = index.search(x, k)
    scores = torch.from_numpy(scores)
    ids = torch.from_numpy(ids).long()
    scores[ids < 0] = -torch.inf
    return scores, ids


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
    _, ids = search_index(index, x, k + 1, plan)
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
