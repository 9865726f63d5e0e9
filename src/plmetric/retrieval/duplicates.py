"""Near-duplicate pairs and groups of an index (``plmetric duplicates``).

**Pairs.** Two images are a duplicate pair by either of two signals:

* ``embedding``: cosine similarity ``s_ij >= threshold``;
* ``hash``: perceptual-hash distance ``d_ij <= hash_distance`` (mirror-invariant Hamming distance of
  64-bit phashes, :mod:`plmetric.retrieval.hashes`, recorded by ``plmetric index``) *and* cosine
  ``s_ij >= hash_floor`` (default :data:`CANDIDATES`). The floor keeps apart two different images whose
  hashes collide (blank or near-uniform images, one small shape on a white background: 21 of 44,850
  pairs of different plankton images lay within distance 6); a half-size copy of a 30-120 px image
  keeps its hash (distance <= 2 for 99 % of them) while its cosine can fall well below the threshold.

A pair found by both is ``both``. With ``check_crops`` (``zoomed``), a pair whose plain cosine is below
the threshold but whose zoomed rescoring (below) reaches it is ``zoom``; its ``score`` is the rescored
one. Every pair's ``score`` is its cosine (rescored for ``zoom``), its ``hash_distance`` the hash
distance (-1 without hashes): :class:`DuplicatePairs`.

Finding the embedding pairs never forms an N x N matrix: each image's nearest others are searched
(:func:`plmetric.retrieval.neighbours.nearest_others`, exact or through the index's faiss index) with
k = :data:`START_K`; an image whose k-th neighbour still reaches the threshold may have more, so those
images alone are searched again with 4k, until every image's last neighbour falls below the threshold
(or k reaches N - 1). Exactly, this finds every pair above the threshold; through HNSW/IVF, those the
approximate search returns. Hash pairs are exact (:func:`plmetric.retrieval.hashes.hash_pair_blocks`,
block by block; each block's pairs below the floor dropped before the next block).

A threshold within float32 rounding of 1 is read as :func:`highest_cut`: the computed cosine of two
identical stored unit vectors can fall a few ulps below 1, so ``--threshold 1`` still pairs identical images.

Cropped copies (``check_crops``): a crop of a photo is the photo seen closer, and the pooled features of
a CNN are not scale invariant, so a copy keeping 80-90 % of each side can score well below the threshold.
With a ``zoomed`` function, every pair above the lower ``candidates`` cosine is rescored as the best of
its plain score and the cosines between each image's centre crops at :data:`ZOOMS` (re-embedded from the
files with the index's model) and the other image:
``s'_ij = max(s_ij, max_z <v_i^z, e_j>, max_z <v_j^z, e_i>)``. A zoomed view of one photo rarely
matches a different photo better than the photo itself does, so precision barely moves
(docs/results.md, "Near-duplicates").

**Groups never chain** (:func:`duplicate_groups`). A group is a set of images that are *all pairwise*
duplicate pairs: a resized copy of a copy, or three look-alikes A ~ B ~ C with A and C not a pair, never
make one group of three. Within each connected component of the pair graph, clusters are merged by
complete linkage (:func:`scipy.cluster.hierarchy.linkage`, ``method="complete"``) on the distance
``1 - score`` for a pair and 2 for a non-pair, cut below 2: two clusters merge only while every pair
across them is a duplicate pair, the closest first. A component of more than :data:`MAX_LINKAGE_COMPONENT`
images (linkage needs its m(m-1)/2 distances) is split greedily instead, in memory proportional to
its pairs: the image with the highest pair score not yet grouped seeds a group; among its ungrouped
neighbours that are duplicates of every member so far, the one whose weakest pair to the members is
highest joins, until none is left (complete linkage grown from one seed). Images in no group of two
or more stay out of the groups; their pairs remain in the pairs list.

Groups are ordered by how sure they are: by their weakest internal pair score (the lowest score over
the group's member pairs) descending, ties by size (larger first), then by the first member id.
``best_score`` is a member's highest score to another member of its group (an image in no group: its
highest pair score; NaN without pairs).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plmetric.core.options import DUPLICATES_CANDIDATES as CANDIDATES  # re-exported: defined there without torch
from plmetric.core.options import DUPLICATES_HASH_DISTANCE as DEFAULT_HASH_DISTANCE
from plmetric.core.options import DUPLICATES_THRESHOLD as DEFAULT_THRESHOLD
from plmetric.core.options import DUPLICATES_ZOOMS as ZOOMS
from plmetric.retrieval.stored import StoredVectors

ZOOM_CHUNK = 4096
"""Candidate images whose zoomed views are held at once (4096 x 2 views x 1280 floats = 40 MiB)."""
PAIR_CHUNK = 8192
"""Pairs rescored at once (their gathered views: 8192 x 2 x 1280 floats = 80 MiB)."""
GROUP_ROWS_PER_CHUNK = 100_000
"""Rows of the groups table written at a time."""
START_K = 16
"""Neighbours searched per image first; images with more duplicates than this are searched again."""
MAX_LINKAGE_COMPONENT = 2048
"""The largest connected component of the pair graph grouped by scipy's complete linkage (its condensed
distances: 2048 x 2047 / 2 doubles = 16 MiB); larger ones are split greedily (module docstring)."""
SIGNALS = ("embedding", "zoom", "hash", "both")
"""The ``signal`` of a pair, by its code in :attr:`DuplicatePairs.signal`."""
EMBEDDING, ZOOM, HASH, BOTH = range(len(SIGNALS))
PAIR_ROWS_PER_CHUNK = 100_000
"""Rows of the pairs table written at a time (one Parquet row group)."""
COSINE_CHUNK = 1 << 20
"""Pairs whose cosines are computed at once (two gathered rows each: 1M x 2 x 2048 floats at most)."""


@dataclass(frozen=True)
class DuplicatePairs:
    """Duplicate pairs ``i < j`` (int64), sorted by ``(i, j)``: ``score`` (float32, the cosine; rescored
    for ``zoom``), ``signal`` (int8 codes into :data:`SIGNALS`) and ``hash_distance`` (int16, -1 without
    hashes)."""

    i: np.ndarray
    j: np.ndarray
    score: np.ndarray
    signal: np.ndarray
    hash_distance: np.ndarray

    @classmethod
    def plain(cls, i: np.ndarray, j: np.ndarray, score: np.ndarray) -> DuplicatePairs:
        """Pairs found by the embedding alone, without hashes."""
        return cls(
            np.asarray(i, np.int64),
            np.asarray(j, np.int64),
            np.asarray(score, np.float32),
            np.full(len(i), EMBEDDING, np.int8),
            np.full(len(i), -1, np.int16),
        )

    def counts(self) -> dict[str, int]:
        """How many pairs each signal found (``both`` counted once, under ``both``)."""
        found = np.bincount(self.signal, minlength=len(SIGNALS))
        return {name: int(found[code]) for code, name in enumerate(SIGNALS)}


@dataclass(frozen=True)
class DuplicateGroups:
    """Groups of near-duplicates among N images.

    ``groups``: member ids of every group of two or more whose members are all pairwise duplicates,
    surest first (by ``weakest`` descending, ties by size descending, then first member id), each
    sorted by ``best_score`` descending (ties: by id); ``best_score``: (N,) each member's highest score
    to another member of its group (an image in no group: its highest pair score; NaN without pairs);
    ``pairs``: the number of distinct duplicate pairs; ``pair_list``: those pairs; ``weakest``: each
    group's lowest pair score between its members.
    """

    groups: list[np.ndarray]
    best_score: np.ndarray
    pairs: int
    pair_list: DuplicatePairs | None = None
    weakest: np.ndarray | None = None

    @property
    def members(self) -> int:
        """Images that belong to a group."""
        return sum(len(g) for g in self.groups)


def check_threshold(threshold: float) -> float:
    """A cosine threshold in (-1, 1].

    Raises:
        ValueError: outside (-1, 1] or not a finite number.
    """
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = math.nan
    if not -1.0 < value <= 1.0:  # NaN fails this too
        raise ValueError(f"--threshold must be a cosine similarity in (-1, 1], got {threshold}")
    return value


def highest_cut(dim: int) -> float:
    """The highest score :func:`similar_pairs` requires: ``1 - 4 γ_{d+3}`` (float32, γ_n = n u / (1 - n u),
    u = 2^-24). A stored unit vector's norm is within ``γ_{d+3}`` of 1 (its float32 normalisation: d
    squares, a sum, a square root, a division) and a float32 dot product of length d is off by at most
    ``γ_d ‖x‖²`` (Higham §3.1), so two identical vectors score at least
    ``(1 - γ_{d+3})² - γ_d (1 + γ_{d+3})² >= 1 - 4 γ_{d+3}``."""
    nu = (dim + 3) * 2.0**-24
    return 1.0 - 4.0 * nu / (1.0 - nu)


def similar_pairs(
    embeddings: torch.Tensor,
    threshold: float,
    faiss_index: tuple[Any, Any] | None = None,
    *,
    start_k: int = START_K,
    nprobe: int | None = None,
    ef_search: int | None = None,
    progress: bool = False,
    estimate: Callable[[int, float], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``i < j`` with cosine ``s_ij >= min(threshold, highest_cut(d))``: ``(i, j, s)`` arrays,
    each pair once. ``embeddings``: a tensor or a sharded index's mapped
    :class:`~plmetric.retrieval.stored.StoredVectors` (never materialised); ``estimate`` gets the rows and
    seconds of the first block of the first (longest) search.

    Searches each image's ``start_k`` nearest others, then the images whose last neighbour still
    reaches the threshold with 4x as many, and so on (see the module docstring).
    """
    from plmetric.retrieval.neighbours import nearest_others

    threshold = check_threshold(threshold)
    n = embeddings.shape[0]
    cut = min(threshold, highest_cut(embeddings.shape[1]))
    if n < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    rows = torch.arange(n)
    k = min(start_k, n - 1)
    found_i, found_j, found_s = [], [], []
    while rows.numel():
        scores, ids = nearest_others(
            embeddings,
            k,
            faiss_index,
            rows=rows,
            nprobe=nprobe,
            ef_search=ef_search,
            progress=progress,
            what=f"pairs (k={k})",
            estimate=estimate if k == min(start_k, n - 1) else None,
        )
        hit = scores >= cut
        found_i.append(rows[:, None].expand_as(ids)[hit])
        found_j.append(ids[hit])
        found_s.append(scores[hit])
        if k >= n - 1:
            break
        rows = rows[hit[:, -1]]  # the last neighbour reaches the threshold: there may be more
        k = min(4 * k, n - 1)
    i = torch.cat(found_i).numpy()
    j = torch.cat(found_j).numpy()
    s = torch.cat(found_s).numpy()
    low, high = np.minimum(i, j), np.maximum(i, j)
    keys = low.astype(np.int64) * n + high
    keys, first = np.unique(keys, return_index=True)  # a pair found from both ends counts once
    return low[first], high[first], s[first]


def duplicate_groups(
    n: int, i: np.ndarray, j: np.ndarray, s: np.ndarray, *, max_component: int = MAX_LINKAGE_COMPONENT
) -> DuplicateGroups:
    """The groups of the pair graph on ``n`` images with edges ``(i, j)`` of score ``s`` (``i != j``, each
    pair once), by the module docstring's rule: every member of a group a duplicate of every other,
    complete linkage within each connected component (greedy above ``max_component`` images), surest
    group first."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    s = np.asarray(s, np.float32)
    label = np.full(n, -1, dtype=np.int64)  # each image's group (-1: none), numbered as found
    if len(i):
        graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
        count, component = connected_components(graph, directed=False)
        sizes = np.bincount(component, minlength=count)
        pair_component = component[i]
        two = sizes[pair_component] == 2  # a component of two images is one pair: one group
        label[i[two]] = np.arange(int(two.sum()))
        label[j[two]] = np.arange(int(two.sum()))
        next_label = int(two.sum())
        order = np.argsort(pair_component, kind="stable")  # the pairs of each component together
        by_component = np.split(order, np.searchsorted(pair_component[order], np.arange(1, count)))
        for c in np.flatnonzero(sizes > 2).tolist():  # a loop over components, each one's work vectorised
            rows = by_component[c]
            for cluster in _clique_clusters(i[rows], j[rows], s[rows], max_component):
                label[cluster] = next_label
                next_label += 1
    return _ordered_groups(n, label, i, j, s)


def _clique_clusters(i: np.ndarray, j: np.ndarray, s: np.ndarray, max_component: int) -> list[np.ndarray]:
    """The groups (two or more image ids, all pairwise among the pairs ``(i, j)``) of one connected
    component: complete linkage, or :func:`_greedy_cliques` above ``max_component`` images."""
    members = np.unique(np.concatenate([i, j]))
    m = len(members)
    if m > max_component:
        return _greedy_cliques(members, np.searchsorted(members, i), np.searchsorted(members, j), s)
    from scipy.cluster.hierarchy import fcluster, linkage

    a, b = np.searchsorted(members, i), np.searchsorted(members, j)
    a, b = np.minimum(a, b), np.maximum(a, b)
    condensed = np.full(m * (m - 1) // 2, 2.0)  # scipy's order: (0,1), (0,2), ..., (1,2), ...
    condensed[m * a - a * (a + 1) // 2 + (b - a - 1)] = np.clip(1.0 - s.astype(np.float64), 0.0, 1.9)
    flat = fcluster(linkage(condensed, method="complete"), t=1.95, criterion="distance")
    order = np.argsort(flat, kind="stable")
    parts = np.split(members[order], np.flatnonzero(np.diff(flat[order])) + 1)
    return [part for part in parts if len(part) >= 2]


def _greedy_cliques(members: np.ndarray, a: np.ndarray, b: np.ndarray, s: np.ndarray) -> list[np.ndarray]:
    """Greedy complete linkage on a large component (local ids ``a``, ``b`` of ``members``): seeds by
    their highest pair score; each seed's group grows by the candidate with the highest weakest pair to
    the members, among its neighbours that pair with every member. Memory: the component's pairs."""
    from scipy.sparse import coo_matrix

    m = len(members)
    # symmetric adjacency with score + 3 (never an explicit zero), rows sorted by column
    adjacency = coo_matrix(
        (np.concatenate([s, s]).astype(np.float64) + 3.0, (np.concatenate([a, b]), np.concatenate([b, a]))),
        shape=(m, m),
    ).tocsr()
    adjacency.sort_indices()
    strongest = np.full(m, -np.inf)
    np.maximum.at(strongest, np.concatenate([a, b]), np.concatenate([s, s]).astype(np.float64))
    grouped = np.zeros(m, dtype=bool)
    clusters = []

    def row(v: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = adjacency.indptr[v], adjacency.indptr[v + 1]
        return adjacency.indices[lo:hi], adjacency.data[lo:hi] - 3.0

    for seed in np.argsort(-strongest, kind="stable").tolist():
        if grouped[seed]:
            continue
        candidates, weakest = row(seed)
        alive = ~grouped[candidates]
        group = [seed]
        while alive.any():
            best = int(np.flatnonzero(alive)[np.argmax(weakest[alive])])
            chosen = int(candidates[best])
            group.append(chosen)
            alive[best] = False
            neighbours, scores = row(chosen)  # never empty: the seed is one
            where = np.minimum(np.searchsorted(neighbours, candidates), len(neighbours) - 1)
            linked = neighbours[where] == candidates  # a candidate stays only if it pairs with the new member
            alive &= linked
            weakest = np.where(linked, np.minimum(weakest, scores[where]), weakest)
        if len(group) >= 2:
            grouped[group] = True
            clusters.append(members[np.array(group)])
    return clusters


def _ordered_groups(n: int, label: np.ndarray, i: np.ndarray, j: np.ndarray, s: np.ndarray) -> DuplicateGroups:
    """The groups of ``label`` (-1: none) ordered surest first, members by ``best_score`` (module docstring)."""
    groups_count = int(label.max()) + 1 if len(label) else 0
    best = np.full(n, -np.inf, dtype=np.float32)
    np.maximum.at(best, i, s)
    np.maximum.at(best, j, s)
    inside = (label[i] >= 0) & (label[i] == label[j])
    in_group = label >= 0
    best[in_group] = -np.inf  # a member: its best score to another member of its group only
    np.maximum.at(best, i[inside], s[inside])
    np.maximum.at(best, j[inside], s[inside])
    best = np.where(np.isfinite(best), best, np.nan).astype(np.float32)
    weakest = np.full(groups_count, np.inf, dtype=np.float32)
    np.minimum.at(weakest, label[i[inside]], s[inside])
    groups: list[np.ndarray] = []
    if groups_count:
        order = np.lexsort((np.arange(n), -np.nan_to_num(best, nan=-2.0), label))
        order = order[label[order] >= 0]
        sizes = np.bincount(label[order], minlength=groups_count)
        groups = np.split(order, np.cumsum(sizes)[:-1])
        firsts = np.full(groups_count, n, dtype=np.int64)
        np.minimum.at(firsts, label[order], order)
        rank = np.lexsort((firsts, -sizes, -weakest))
        groups = [groups[k] for k in rank.tolist()]
        weakest = weakest[rank]
    return DuplicateGroups(groups=groups, best_score=best, pairs=len(i), weakest=weakest)


def rescore_with_zooms(
    i: np.ndarray, j: np.ndarray, s: np.ndarray, embeddings: torch.Tensor, zoomed: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """``s'_ij = max(s_ij, max_z <v_i^z, e_j>, max_z <v_j^z, e_i>)`` for every pair, the zoomed views
    ``v`` taken from the images ``rows`` only (a pair's side whose image is not among them, or whose
    views are NaN, contributes nothing: calling this chunk by chunk of images gives the whole result).
    Pairs are processed :data:`PAIR_CHUNK` at a time, so memory stays at ``PAIR_CHUNK x Z x d`` floats.

    Args:
        i, j, s: the pairs and their current scores.
        embeddings: (N, d) unit embeddings ``e``.
        zoomed: (M, Z, d) unit embeddings of the zoomed views of images ``rows`` (M,).
    """
    from plmetric.retrieval.mapped import rows_of, vector_count

    best = np.asarray(s, dtype=np.float32).copy()
    if len(i) == 0 or len(rows) == 0:
        return best
    where = np.full(vector_count(embeddings), -1, dtype=np.int64)
    where[rows] = np.arange(len(rows))
    for side, other in ((i, j), (j, i)):
        position = where[side]
        have = np.flatnonzero(position >= 0)
        for start in range(0, len(have), PAIR_CHUNK):
            chosen = have[start : start + PAIR_CHUNK]
            views = np.einsum("pzd,pd->pz", zoomed[position[chosen]], rows_of(embeddings, other[chosen]))
            views = np.where(np.isnan(views), -np.inf, views).max(axis=1)  # unreadable: counts for nothing
            best[chosen] = np.maximum(best[chosen], views)
    return best


def find_duplicates(
    embeddings: torch.Tensor,
    threshold: float,
    faiss_index: tuple[Any, Any] | None = None,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    progress: bool = False,
    zoomed: Callable[[np.ndarray], np.ndarray] | None = None,
    candidates: float = CANDIDATES,
    announce: Callable[[int], None] | None = None,
    hashes: np.ndarray | None = None,
    hash_distance: int = DEFAULT_HASH_DISTANCE,
    hash_floor: float = CANDIDATES,
    max_component: int = MAX_LINKAGE_COMPONENT,
    estimate: Callable[[int, float], None] | None = None,
) -> DuplicateGroups:
    """Near-duplicate pairs and groups of ``embeddings`` (the module docstring's rules): the embedding
    pairs at a cosine ``threshold`` (:func:`similar_pairs`), the hash pairs of ``hashes`` ((N, 16)
    uint8, or None: the embedding alone) within ``hash_distance`` (-1: off) at cosine >= ``hash_floor``
    (:func:`combine_pairs`), then :func:`duplicate_groups`; ``pair_list`` holds every pair.

    With ``zoomed`` (image ids (M,) -> (M, Z, d) unit embeddings of their zoomed views, NaN rows for
    images it could not read), the pairs at or above ``min(candidates, threshold)`` are rescored by
    :func:`rescore_with_zooms` first (``zoomed`` is called on :data:`ZOOM_CHUNK` images at a time;
    ``announce`` first gets the number of candidate images), and those whose best score reaches
    ``threshold`` are kept (signal ``zoom`` where the plain score did not).
    """
    threshold = check_threshold(threshold)
    cut = min(threshold, highest_cut(embeddings.shape[1]))
    if zoomed is None:
        i, j, s = similar_pairs(
            embeddings, threshold, faiss_index, nprobe=nprobe, ef_search=ef_search, progress=progress,
            estimate=estimate,
        )
        zoom_only = np.zeros(len(i), dtype=bool)
    else:
        low = min(check_threshold(candidates), threshold)
        i, j, s = similar_pairs(
            embeddings, low, faiss_index, nprobe=nprobe, ef_search=ef_search, progress=progress,
            estimate=estimate,
        )
        rows = np.unique(np.concatenate([i, j]))
        if announce is not None:
            announce(len(rows))
        best = s.astype(np.float32)
        for start in range(0, len(rows), ZOOM_CHUNK):  # views of ZOOM_CHUNK images at a time: bounded memory
            chunk = rows[start : start + ZOOM_CHUNK]
            best = rescore_with_zooms(i, j, best, embeddings, zoomed(chunk), chunk)
        keep = best >= cut
        zoom_only = (s < cut)[keep]
        i, j, s = i[keep], j[keep], best[keep]
    pairs = combine_pairs(embeddings, i, j, s, zoom_only, hashes, hash_distance, hash_floor)
    groups = duplicate_groups(embeddings.shape[0], pairs.i, pairs.j, pairs.score, max_component=max_component)
    return dataclasses.replace(groups, pair_list=pairs)


def pair_cosines(embeddings: Any, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """``<e_i, e_j>`` (float32) of each pair, :data:`COSINE_CHUNK` pairs at a time; ``embeddings`` an
    array, a tensor or mapped :class:`~plmetric.retrieval.stored.StoredVectors` (rows read by id)."""
    from plmetric.retrieval.mapped import rows_of

    out = np.empty(len(i), dtype=np.float32)
    for start in range(0, len(i), COSINE_CHUNK):
        part = slice(start, start + COSINE_CHUNK)
        if isinstance(embeddings, np.ndarray):
            a, b = embeddings[i[part]], embeddings[j[part]]
        else:
            a, b = rows_of(embeddings, i[part]), rows_of(embeddings, j[part])
        out[part] = np.einsum("pd,pd->p", a, b)
    return out


def combine_pairs(
    embeddings: torch.Tensor,
    i: np.ndarray,
    j: np.ndarray,
    s: np.ndarray,
    zoom_only: np.ndarray,
    hashes: np.ndarray | None = None,
    hash_distance: int = DEFAULT_HASH_DISTANCE,
    hash_floor: float = CANDIDATES,
) -> DuplicatePairs:
    """The embedding pairs ``(i, j, s)`` (``i < j``; ``zoom_only``: found only by the zoomed views) and,
    with ``hashes``, every pair within ``hash_distance`` whose cosine is at least ``hash_floor``, as one
    :class:`DuplicatePairs` (a pair found by both once, signal ``both``, its higher score).

    Raises:
        ValueError: ``hashes`` not (N, 16) uint8 for the N embeddings, or a bad distance or floor.
    """
    from plmetric.retrieval.hashes import check_hash_distance, check_hashes, hash_distances, hash_pair_blocks

    n, dim = embeddings.shape
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    s, zoom_only = np.asarray(s, np.float32), np.asarray(zoom_only, bool)
    hash_distance = check_hash_distance(hash_distance)
    hi, hj, hs = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.float32)]
    if hashes is not None:
        hashes = check_hashes(hashes, "perceptual hashes")
        if len(hashes) != n:
            raise ValueError(f"{len(hashes)} perceptual hashes for {n} embeddings")
        floor = min(check_threshold(hash_floor), highest_cut(dim))
        e = embeddings if isinstance(embeddings, StoredVectors) else embeddings.detach().to("cpu", torch.float32).numpy()
        for bi, bj, _ in hash_pair_blocks(hashes, hash_distance):  # each block filtered before the next
            cosine = pair_cosines(e, bi, bj)
            keep = cosine >= floor
            hi.append(bi[keep])
            hj.append(bj[keep])
            hs.append(cosine[keep])
    hi, hj, hs = np.concatenate(hi), np.concatenate(hj), np.concatenate(hs)
    keys, inverse = np.unique(np.concatenate([i * n + j, hi * n + hj]), return_inverse=True)
    by_embedding, by_hash = inverse[: len(i)], inverse[len(i) :]
    score = np.full(len(keys), -np.inf, dtype=np.float32)
    np.maximum.at(score, by_embedding, s)
    np.maximum.at(score, by_hash, hs)
    embedded, hashed, zoom = (np.zeros(len(keys), dtype=bool) for _ in range(3))
    embedded[by_embedding] = True
    hashed[by_hash] = True
    zoom[by_embedding] = zoom_only
    signal = np.where(embedded & hashed, BOTH, np.where(hashed, HASH, np.where(zoom, ZOOM, EMBEDDING)))
    pi, pj = keys // n if n else keys, keys % n if n else keys
    distance = np.full(len(keys), -1, dtype=np.int16)
    if hashes is not None and len(keys):
        distance = hash_distances(hashes[pi], hashes[pj]).astype(np.int16)
    return DuplicatePairs(pi.astype(np.int64), pj.astype(np.int64), score, signal.astype(np.int8), distance)


def write_groups_table(out: str | os.PathLike, found: DuplicateGroups, paths: Any, recorded_id: str) -> None:
    """Write the ``duplicates`` table: one row per member (``group, size, path, best_score``), groups numbered
    in ``found``'s order, :data:`GROUP_ROWS_PER_CHUNK` rows at a time (Parquet row groups), atomically.
    ``paths``: a list or a sharded index's :class:`~plmetric.retrieval.stored.StoredPaths`."""
    from plmetric.retrieval.mapped import path_list
    from plmetric.retrieval.tables import TableWriter

    sizes = np.array([len(g) for g in found.groups], dtype=np.int64)
    members = np.concatenate(found.groups) if found.groups else np.empty(0, np.int64)
    numbers = np.repeat(np.arange(1, len(sizes) + 1), sizes)
    with TableWriter(out, "duplicates", index_id=recorded_id) as table:
        for start in range(0, len(members), GROUP_ROWS_PER_CHUNK):  # a few large chunks (Parquet row groups)
            rows = slice(start, start + GROUP_ROWS_PER_CHUNK)
            table.write(
                [
                    numbers[rows].tolist(),
                    np.repeat(sizes, sizes)[rows].tolist(),
                    path_list(paths, members[rows]),
                    found.best_score[members[rows]].tolist(),
                ]
            )
        table.commit()


def write_pairs_table(out: str | os.PathLike, pairs: DuplicatePairs, paths: Any, index_id: str | None) -> Path:
    """Write ``pairs`` as a ``pairs`` table (:mod:`plmetric.retrieval.tables`: path_a, path_b, score,
    hash_distance (empty without hashes), signal), :data:`PAIR_ROWS_PER_CHUNK` rows at a time, atomically.
    ``paths``: a list or a sharded index's :class:`~plmetric.retrieval.stored.StoredPaths`."""
    from plmetric.retrieval.mapped import path_list
    from plmetric.retrieval.tables import TableWriter

    names = np.array(SIGNALS, dtype=object)
    with TableWriter(out, "pairs", index_id=index_id) as table:
        for start in range(0, len(pairs.i), PAIR_ROWS_PER_CHUNK):
            rows = slice(start, start + PAIR_ROWS_PER_CHUNK)
            table.write(
                [
                    path_list(paths, pairs.i[rows]),
                    path_list(paths, pairs.j[rows]),
                    pairs.score[rows].tolist(),
                    [None if d < 0 else d for d in pairs.hash_distance[rows].tolist()],
                    names[pairs.signal[rows]].tolist(),
                ]
            )
        return table.commit()


def zoom_crop(image: Any, fraction: float) -> Any:
    """The centre crop of a PIL image keeping ``fraction`` of each side (at least one pixel):
    width ``max(1, round(w f))`` from ``(w - that) // 2``, and likewise the height."""
    width, height = image.size
    crop_w, crop_h = max(1, round(width * fraction)), max(1, round(height * fraction))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


class ZoomViews:
    """A transform: an image -> the stack of ``transform(zoom_crop(image, f))`` for each ``f``."""

    def __init__(self, transform: Callable[[Any], torch.Tensor], zooms: tuple[float, ...] = ZOOMS) -> None:
        self.transform = transform
        self.zooms = zooms

    def __call__(self, image: Any) -> torch.Tensor:
        return torch.stack([self.transform(zoom_crop(image, f)) for f in self.zooms])


class _FlattenViews(torch.nn.Module):
    """(B, Z, C, H, W) -> the model's (B * Z, d) embeddings as (B, Z * d)."""

    def __init__(self, model: torch.nn.Module, zooms: int) -> None:
        super().__init__()
        self.model = model
        self.embedding_dim = int(getattr(model, "embedding_dim", 0)) * zooms

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        batch = views.shape[0]
        return self.model(views.flatten(0, 1)).reshape(batch, -1)


def embed_zoomed(
    paths: list[str],
    model: torch.nn.Module,
    transform: Callable[[Any], torch.Tensor],
    *,
    zooms: tuple[float, ...] = ZOOMS,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """(len(paths), Z, d) unit embeddings of each image's centre crops at ``zooms`` (the model's
    outputs, L2-normalised); NaN rows for files that cannot be read."""
    from plmetric.data.datasets import ImageDataset
    from plmetric.evaluation.metrics import embed_dataset

    dataset = ImageDataset(paths, None, ZoomViews(transform, zooms), "zoomed views")
    with torch.no_grad():
        flat, _, found = embed_dataset(
            _FlattenViews(model, len(zooms)).to(device),
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            progress=progress,
            desc=f"zoomed views ({len(zooms)} per image)",
            runtime="auto",  # onnxruntime on a CPU (plmetric.data.runtime): the index's model, cached once
        )
    dim = flat.shape[1] // len(zooms) if flat.numel() else int(getattr(model, "embedding_dim", 0))
    out = np.full((len(paths), len(zooms), dim), np.nan, dtype=np.float32)
    if flat.numel():
        views = torch.nn.functional.normalize(flat.reshape(len(found), len(zooms), dim), dim=2)
        out[found.numpy()] = views.numpy()
    return out


def draw_groups(
    groups: list[list[str]],
    scores: list[list[float]],
    out: str | os.PathLike,
    *,
    max_groups: int = 8,
    max_members: int = 6,
    title: str = "group",
    software: str = "plmetric duplicates",
) -> Path:
    """A PNG grid, one row per group (the first ``max_groups``), up to ``max_members`` thumbnails
    each captioned with its score and file name, the folders below the drawn images' common one
    above (:func:`plmetric.core.names.caption_lines`); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from plmetric.core.checkpoint import atomic_write_figure
    from plmetric.core.names import caption_lines, common_folder
    from plmetric.data.images import open_image
    from plmetric.retrieval.index import GRID_CAPTION_CHARS, GRID_DECODE_SIDE

    shown = groups[:max_groups]
    folder = common_folder([path for members in shown for path in members[:max_members]])
    rows = max(1, len(shown))
    cols = max([1] + [min(len(g), max_members) for g in shown])
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (members, values) in enumerate(zip(shown, scores, strict=False)):
        for c, (image_path, value) in enumerate(list(zip(members, values, strict=True))[:max_members]):
            ax = axes[r, c]
            try:
                ax.imshow(open_image(image_path, max_side=GRID_DECODE_SIDE))
            except (OSError, ValueError):
                ax.text(0.5, 0.5, "missing" if not Path(image_path).exists() else "unreadable", ha="center")
            head = f"{title} {r + 1} ({len(members)})\n" if c == 0 else "\n"
            score = "" if value != value else f"{value:.3f}  "  # NaN: no score
            *above, name = caption_lines(image_path, folder, GRID_CAPTION_CHARS)
            # parse_math=False: a name is text; two $ in it were read as mathtext ($\frac$ raised ValueError)
            ax.set_title(head + "\n".join([*above, f"{score}{name}"]), fontsize=7, parse_math=False)
    if not shown:
        axes[0, 0].text(0.5, 0.5, "no groups", ha="center", va="center")
    fig.tight_layout()
    return atomic_write_figure(fig, out, dpi=90, software=software)


def is_our_grid(path: str | os.PathLike, software: str) -> bool:
    """Whether ``path`` is a PNG grid whose ``Software`` text is ``software`` (one this command wrote)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == software
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
