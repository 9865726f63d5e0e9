"""Similarity estimators: PLM and the estimates it competes with (slide 14), and their quality.

A library module: the trainer's methods use it (STML's targets are :func:`stml_similarity`), and
the similarity study (:mod:`plmetric.studies.similarity`) measures every estimator with it. The paper's central
claim (Bhatnagar & Ahuja, CPAL 2024, slide 14; numbers in METHOD.md): the piecewise-linear-manifold
similarity correlates better with the ground truth (same class or not) than the estimates of
k-means, hierarchical clustering and random walks, and its pieces are purer.

Estimators
----------
Every estimator is a function ``(embeddings (B, d) tensor, **options) -> (similarity, groups)``:

* ``similarity``: (B, B) tensor on the input's device and dtype (half precision gives float32);
  only its off-diagonal entries are used.
* ``groups``: what the estimator groups points into, for the label purity; ``None`` when it forms
  no groups, a (B,) int64 tensor of cluster ids for a partition (k-means, agglomerative), or a
  (B, B) bool membership matrix, ``groups[i, j]`` = ``x_j`` is in the group of ``x_i``, for
  overlapping groups (PLM's pieces, one per point).

:data:`ESTIMATORS` maps a name to such a function (variants are ``functools.partial`` objects with
their options filled in). Each estimator's docstring names the paper it follows. Slide 14 cites its
baselines only by number ([17] k-means, [15] hierarchical clustering, [24] random walk); the full
paper's bibliography is not available here, so the attributions (DeepCluster, UHML, MOM) are ours,
made from the UDML literature the paper compares with.

Quality measures
----------------
* correlation: Pearson correlation of ``s_ij`` with ``1[y_i = y_j]`` over the pairs i < j
  (:func:`plmetric.manifold.pieces.similarity_correlation`).
* purity: for every point, the fraction of the *other* members of its group that share its label,
  averaged over the points whose group has another member (:func:`group_purity`). For a partition,
  the group of a point is its cluster; for PLM, its piece. One definition for all estimators, so
  that the numbers compare (they still depend on the group size, reported alongside).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from plmetric.manifold.distances import pairwise_distances
from plmetric.manifold.pieces import plm_similarity_and_pieces
from plmetric.core.options import ManifoldOptions, STMLOptions
from plmetric.core.validation import check_choice, check_embeddings, check_int, check_number

__all__ = [
    "ESTIMATORS",
    "FOLLOWS",
    "Estimate",
    "agglomerative_comembership",
    "gaussian_similarity",
    "group_membership",
    "group_purity",
    "group_size",
    "kmeans_comembership",
    "plm_estimate",
    "random_walk_similarity",
    "similarity_auc",
    "stml_similarity",
]

Estimate = tuple[Tensor, Tensor | None]


def _embeddings(x: Any, name: str) -> Tensor:
    """A checked (B, d) tensor with B >= 2, detached, half precision as float32."""
    x = check_embeddings(x, name, min_rows=2).detach()
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _n_clusters(n_points: int, n_clusters: int | None, points_per_cluster: int) -> int:
    """``n_clusters`` if given, else ``round(B / points_per_cluster)``; clamped to [1, B]."""
    if n_clusters is None:
        points_per_cluster = check_int("points_per_cluster", points_per_cluster, 1)
        n_clusters = max(1, round(n_points / points_per_cluster))
    else:
        n_clusters = check_int("n_clusters", n_clusters, 1)
    return min(n_clusters, n_points)


def _comembership(groups: Tensor, like: Tensor) -> Tensor:
    return (groups.unsqueeze(0) == groups.unsqueeze(1)).to(device=like.device, dtype=like.dtype)


# --------------------------------------------------------------------------------------------
# 1. estimators
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def plm_estimate(embeddings: Tensor, options: ManifoldOptions | None = None, **fields: Any) -> Estimate:
    """Piecewise-linear-manifold similarity (Bhatnagar & Ahuja, CPAL 2024, slides 8-9, 14-15).

    ``s_ij = sym(s'(x_i, x_j), s'(x_j, x_i))``, ``s'(x_i, x_j) = (1 + o/2)^(-N_α) (1 + p)^(-N_β)``
    with o, p the orthogonal and in-piece distances of ``x_i`` from ``x_j``'s piece:
    :func:`plmetric.manifold.pieces.plm_similarity` with :class:`~plmetric.core.options.ManifoldOptions`
    (``subset_selection=False`` is plain k-NN + PCA, ``binary=True`` the binary ablation).

    Returns:
        ``(s (B, B), members (B, B) bool)``: ``members[i, j]`` = ``x_j`` belongs to piece i.
    """
    x = _embeddings(embeddings, "plm: embeddings")
    s, pieces = plm_similarity_and_pieces(x, options, **fields)
    return s, pieces.members


@torch.no_grad()
def gaussian_similarity(embeddings: Tensor, *, sigma: float | None = None) -> Estimate:
    """Gaussian kernel on Euclidean distances, ``s_ij = exp(-‖x_i - x_j‖² / σ)``.

    The plain distance-based estimate every neighbourhood method starts from; it is the "pairwise"
    half ``W_P`` of STML's similarity (Kim et al., "Self-Taught Metric Learning without Labels",
    CVPR 2022), where σ = 3 on unit-norm embeddings.

    Args:
        embeddings: (B, d).
        sigma: bandwidth; None = the median of the off-diagonal squared distances of the batch
            (the common median heuristic; 1 if that median is 0).

    Returns:
        ``(s (B, B), None)``.
    """
    x = _embeddings(embeddings, "gaussian: embeddings")
    d2 = pairwise_distances(x, squared=True, method="gram")
    if sigma is None:
        off = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        median = float(d2[off].median())
        sigma = median if median > 0 else 1.0
    else:
        sigma = check_number("sigma", sigma, strict=True)
    return torch.exp(-d2 / sigma), None


def _kmeans_once(x: Tensor, k: int, generator: torch.Generator, max_iter: int) -> tuple[Tensor, float]:
    """One k-means run: k-means++ seeding (D² sampling), then Lloyd iterations until the
    assignment stops changing. Returns ``(cluster ids (N,), inertia)``."""
    n = x.shape[0]
    sq = x.pow(2).sum(dim=1)
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    d2 = (sq - 2.0 * (x @ x[first]) + sq[first]).clamp_min(0)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than clusters: any remaining point will do
            nxt = int(torch.randint(n, (1,), generator=generator))
        else:
            nxt = int(torch.multinomial((d2 / total).cpu().double(), 1, generator=generator))
        centres.append(x[nxt])
        d2 = torch.minimum(d2, (sq - 2.0 * (x @ x[nxt]) + sq[nxt]).clamp_min(0))
    c = torch.stack(centres)
    assign = torch.full((n,), -1, dtype=torch.int64, device=x.device)
    for _ in range(max_iter):
        dist = (sq.unsqueeze(1) - 2.0 * (x @ c.T) + c.pow(2).sum(dim=1).unsqueeze(0)).clamp_min(0)
        new = dist.argmin(dim=1)
        if torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        filled = counts > 0  # an empty cluster keeps its centre
        c = torch.where(filled.unsqueeze(1), sums / counts.clamp_min(1).unsqueeze(1), c)
    dist = (sq.unsqueeze(1) - 2.0 * (x @ c.T) + c.pow(2).sum(dim=1).unsqueeze(0)).clamp_min(0)
    assign = dist.argmin(dim=1)
    return assign, float(dist.gather(1, assign.unsqueeze(1)).sum())


@torch.no_grad()
def kmeans_comembership(
    embeddings: Tensor,
    *,
    n_clusters: int | None = None,
    points_per_cluster: int = 5,
    n_init: int = 3,
    max_iter: int = 100,
    seed: int = 0,
) -> Estimate:
    """k-means co-membership, ``s_ij = 1[c_i = c_j]``, as in DeepCluster (Caron, Bojanowski, Joulin
    & Douze, "Deep Clustering for Unsupervised Learning of Visual Features", ECCV 2018), whose
    k-means pseudo-labels are the similarity the network is trained on (slide 14: "K-Means").

    Batched torch k-means (k-means++ seeding, Lloyd iterations; ``n_init`` restarts, lowest
    inertia wins) on the embeddings as given; on the input's device. (scikit-learn's ``KMeans``
    was minutes slower with hundreds of clusters on 2 CPU cores.)

    Args:
        embeddings: (B, d).
        n_clusters: number of clusters; None = ``round(B / points_per_cluster)`` (on a batch of
            B/k neighbourhoods of k points: B/k clusters).
        points_per_cluster: see ``n_clusters`` [5, the neighbourhood size k].
        n_init: restarts.
        max_iter: most Lloyd iterations per restart.
        seed: seed of the CPU generator of the seeding.

    Returns:
        ``(s (B, B) in {0, 1}, cluster ids (B,) int64)``.
    """
    x = _embeddings(embeddings, "kmeans: embeddings")
    k = _n_clusters(x.shape[0], n_clusters, points_per_cluster)
    n_init = check_int("n_init", n_init, 1)
    max_iter = check_int("max_iter", max_iter, 1)
    generator = torch.Generator().manual_seed(int(seed))
    best: tuple[Tensor, float] | None = None
    for _ in range(n_init):
        assign, inertia = _kmeans_once(x, k, generator, max_iter)
        if best is None or inertia < best[1]:
            best = (assign, inertia)
    groups = best[0]
    return _comembership(groups, x), groups


def agglomerative_comembership(
    embeddings: Tensor,
    *,
    n_clusters: int | None = None,
    points_per_cluster: int = 5,
    linkage: str = "average",
) -> Estimate:
    """Agglomerative (hierarchical) clustering co-membership, ``s_ij = 1[c_i = c_j]``, as in UHML
    (Yan, Luo, Deng & Huang, "Unsupervised Hyperbolic Metric Learning", CVPR 2021), which draws its
    pseudo-labels from a hierarchical clustering of the embeddings (slide 14: "Hierarchical
    Clustering"). Simplification: the clustering runs on the (Euclidean) embeddings, not in
    UHML's hyperbolic space.

    scikit-learn's ``AgglomerativeClustering`` with Euclidean distances, cut at ``n_clusters``.

    Args:
        embeddings: (B, d).
        n_clusters: number of clusters; None = ``round(B / points_per_cluster)``.
        points_per_cluster: see ``n_clusters`` [5].
        linkage: "average" (default), "ward", "complete" or "single".

    Returns:
        ``(s (B, B) in {0, 1}, cluster ids (B,) int64)``.
    """
    from sklearn.cluster import AgglomerativeClustering

    check_choice("linkage", linkage, ("average", "ward", "complete", "single"))
    x = _embeddings(embeddings, "agglomerative: embeddings")
    k = _n_clusters(x.shape[0], n_clusters, points_per_cluster)
    data = x.cpu().double().numpy()
    ids = AgglomerativeClustering(n_clusters=k, linkage=linkage).fit_predict(data)
    groups = torch.as_tensor(ids, dtype=torch.int64, device=x.device)
    return _comembership(groups, x), groups


@torch.no_grad()
def random_walk_similarity(
    embeddings: Tensor,
    *,
    n_neighbours: int = 10,
    gamma: float = 3.0,
    alpha: float = 0.99,
    graph: str = "mutual",
    steps: int | None = None,
) -> Estimate:
    """Random walk on the k-NN graph, as in MOM (Iscen, Tolias, Avrithis & Chum, "Mining on
    Manifolds: Metric Learning without Labels", CVPR 2018), which ranks points by the steady
    state of a random walk on the nearest-neighbour graph (the diffusion of Iscen et al.,
    CVPR 2017) (slide 14: "Random Walk").

    Graph: cosine similarities ``c_ij`` of the L2-normalised embeddings; ``a_ij = max(c_ij, 0)^γ``
    when ``x_j`` is among the ``n_neighbours`` nearest of ``x_i`` (self excluded), else 0;
    ``W = min(A, Aᵀ)`` (``graph="mutual"``: only reciprocal neighbours are linked, as in the
    diffusion papers) or ``max(A, Aᵀ)`` (``graph="union"``). ``D = diag(W 1)``.

    * ``steps=None`` (default, MOM): the random walk with restart / personalised PageRank steady
      state of every point at once, ``F = (1 - α)(I - α D^{-1/2} W D^{-1/2})^{-1}`` (symmetric).
    * ``steps=t``: t steps of the plain walk, ``F = ½ (Pᵗ + (Pᵗ)ᵀ)`` with ``P = D^{-1} W``
      (a point without an edge stays where it is).

    Points without any edge get ``F_ij = 0`` to every other point.

    Returns:
        ``(F (B, B), None)``.
    """
    x = _embeddings(embeddings, "random_walk: embeddings")
    b = x.shape[0]
    n_neighbours = min(check_int("n_neighbours", n_neighbours, 1), b - 1)
    gamma = check_number("gamma", gamma, strict=True)
    if not (0 < float(alpha) < 1):
        raise ValueError(f"alpha: expected a number in (0, 1), got {alpha!r}")
    check_choice("graph", graph, ("mutual", "union"))
    xn = F.normalize(x, dim=1)
    cos = xn @ xn.T
    eye = torch.eye(b, dtype=torch.bool, device=x.device)
    ranked = cos.masked_fill(eye, -math.inf)
    index = ranked.topk(n_neighbours, dim=1).indices
    a = torch.zeros_like(cos).scatter_(1, index, cos.gather(1, index).clamp_min(0).pow(gamma))
    w = torch.minimum(a, a.T) if graph == "mutual" else torch.maximum(a, a.T)
    degree = w.sum(dim=1)
    connected = degree > 0
    if steps is None:
        d_inv_sqrt = torch.where(connected, degree.clamp_min(1e-30).rsqrt(), torch.zeros_like(degree))
        s = d_inv_sqrt.unsqueeze(1) * w * d_inv_sqrt.unsqueeze(0)
        f = (1 - alpha) * torch.linalg.inv(torch.eye(b, dtype=x.dtype, device=x.device) - alpha * s)
        f = 0.5 * (f + f.T)  # exact in theory; removes rounding asymmetry
    else:
        steps = check_int("steps", steps, 1)
        p = torch.where(connected.unsqueeze(1), w / degree.clamp_min(1e-30).unsqueeze(1), eye.to(x.dtype))
        pt = torch.linalg.matrix_power(p, steps)
        f = 0.5 * (pt + pt.T)
    return f, None


@torch.no_grad()
def stml_similarity(
    embeddings: Tensor,
    *,
    sigma: float = STMLOptions.sigma,
    topk: int = STMLOptions.topk,
    query_expansion: int | None = STMLOptions.query_expansion,
    normalize: bool = True,
) -> Estimate:
    """STML's contextualised similarity (Kim, Kim, Cho & Kwak, "Self-Taught Metric Learning
    without Labels", CVPR 2022; the authors' public code, ``RC_STML`` in ``code/loss.py``).

    With ``t`` the L2-normalised embeddings:

    * ``W_P = exp(-‖t_i - t_j‖² / σ)``;
    * ``N(i)``: the ``topk`` largest entries of row i of ``W_P`` (the point itself included);
      ``V_ij = 1[j ∈ N(i) and i ∈ N(j)]``, the k-reciprocal neighbours ``R(i) = {j: V_ij = 1}``;
    * ``W̃_il = |R(i) ∩ R(l)| / |R(i)|`` for ``l ∈ R(i)``, else 0 (``= (V V)_il V_il / |R(i)|``);
    * query expansion: ``Ŵ_i = mean_{q ∈ N'(i)} W̃_q`` over the ``query_expansion`` nearest
      (self first), default ``round(topk / 2)`` (ties to even, as ``np.around`` in their code);
    * ``W_C = ½ (Ŵ + Ŵᵀ)`` and ``W = ½ (W_P + W_C)``.

    Simplification: STML's batches hold two augmented views of every image and use
    ``topk = 2 · neighbours`` (= 10 on CUB), treating the views of one image as identical for the
    neighbour ranking. Here there is one view per image (features of the un-augmented images), so
    ``topk`` counts distinct images: the default 5 matches their 5 neighbours per seed. The loop
    over points of their code is vectorised (same result, tested).

    Returns:
        ``(W (B, B), None)``.
    """
    x = _embeddings(embeddings, "stml: embeddings")
    b = x.shape[0]
    sigma = check_number("sigma", sigma, strict=True)
    topk = min(check_int("topk", topk, 1), b)
    if query_expansion is None:
        query_expansion = max(1, int(np.around(topk / 2)))
    query_expansion = min(check_int("query_expansion", query_expansion, 1), topk)
    t = F.normalize(x, dim=1) if normalize else x
    w_p = torch.exp(-pairwise_distances(t, squared=True, method="gram") / sigma)
    # The point itself always ranks first (W_P_ii = 1 is the maximum; a duplicate ties with it).
    ranking = w_p.clone()
    ranking.fill_diagonal_(math.inf)
    top = ranking.topk(topk, dim=1).indices
    w_nn = torch.zeros_like(w_p).scatter_(1, top, 1.0)
    v = w_nn * w_nn.T
    w_tilde = (v @ v) * v / v.sum(dim=1, keepdim=True)
    w_hat = w_tilde[top[:, :query_expansion]].mean(dim=1)
    w_c = 0.5 * (w_hat + w_hat.T)
    return 0.5 * (w_p + w_c), None


ESTIMATORS: dict[str, Callable[..., Estimate]] = {
    "plm": plm_estimate,
    "plm_min": functools.partial(plm_estimate, symmetrize="min"),
    "plm_max": functools.partial(plm_estimate, symmetrize="max"),
    "plm_no_subset": functools.partial(plm_estimate, subset_selection=False),
    "plm_binary": functools.partial(plm_estimate, binary=True),
    "gaussian": gaussian_similarity,
    "kmeans": kmeans_comembership,
    "agglomerative": agglomerative_comembership,
    "agglomerative_ward": functools.partial(agglomerative_comembership, linkage="ward"),
    "random_walk": random_walk_similarity,
    "stml": stml_similarity,
}
"""name -> estimator; every function returns ``(similarity (B, B), groups or None)``."""

FOLLOWS = {
    "plm": "PLM (Bhatnagar & Ahuja 2024), mean sym.",
    "plm_min": "PLM, min sym.",
    "plm_max": "PLM, max sym.",
    "plm_no_subset": "PLM without subset selection (k-NN + PCA)",
    "plm_binary": "PLM binary (piece membership)",
    "gaussian": "Gaussian kernel, median bandwidth",
    "kmeans": "k-means co-membership (DeepCluster)",
    "agglomerative": "agglomerative, average linkage (UHML)",
    "agglomerative_ward": "agglomerative, Ward linkage (UHML)",
    "random_walk": "random walk on k-NN graph (MOM)",
    "stml": "STML contextualised similarity",
}


# --------------------------------------------------------------------------------------------
# 2. quality measures
# --------------------------------------------------------------------------------------------


def group_membership(groups: Tensor | np.ndarray, n: int) -> np.ndarray:
    """(n, n) bool: ``[i, j]`` = ``x_j`` is in the group of ``x_i``, from cluster ids (n,) or a
    membership matrix (n, n)."""
    g = groups.detach().cpu().numpy() if isinstance(groups, Tensor) else np.asarray(groups)
    if g.shape == (n,):
        return g[:, None] == g[None, :]
    if g.shape == (n, n):
        return g.astype(bool)
    raise ValueError(f"groups: expected cluster ids ({n},) or a membership matrix ({n}, {n}), got {g.shape}")


def group_purity(groups: Tensor | np.ndarray, labels: Tensor | np.ndarray | Sequence[int]) -> float:
    """Label purity of the groups: ``mean_i |{j ∈ G(i), j ≠ i: y_j = y_i}| / |{j ∈ G(i), j ≠ i}|``
    over the points i whose group ``G(i)`` has another member (slide 14, as
    :func:`plmetric.manifold.pieces.piece_purity`).

    Args:
        groups: cluster ids (n,) or membership (n, n) bool (row i = the group of point i).
        labels: (n,) class labels.

    Returns:
        purity in [0, 1]; NaN when no group has a second member (all singletons).
    """
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels: expected a 1-D array, got shape {y.shape}")
    mem = group_membership(groups, len(y)) & ~np.eye(len(y), dtype=bool)
    counts = mem.sum(axis=1)
    valid = counts > 0
    if not valid.any():
        return math.nan
    same = (mem & (y[:, None] == y[None, :])).sum(axis=1)
    return float((same[valid] / counts[valid]).mean())


def similarity_auc(similarity: Tensor | np.ndarray, labels: Tensor | np.ndarray | Sequence[int]) -> float:
    """ROC AUC of the similarity as a same-class detector over the pairs i < j: the probability
    that a random same-class pair scores higher than a random different-class pair (ties count ½).
    Rank-based, so unlike the Pearson correlation it ignores any monotone rescaling of ``s``.

    Returns:
        AUC in [0, 1]; NaN when all pairs are same-class or none is.
    """
    from scipy.stats import rankdata

    s = similarity.detach().cpu().double().numpy() if isinstance(similarity, Tensor) else np.asarray(similarity)
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if s.ndim != 2 or s.shape != (len(y), len(y)):
        raise ValueError(f"similarity_auc: expected a ({len(y)}, {len(y)}) similarity, got {s.shape}")
    upper = np.triu_indices(len(y), k=1)
    values = s[upper]
    truth = (y[:, None] == y[None, :])[upper]
    n_pos = int(truth.sum())
    n_neg = truth.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(values)  # average ranks for ties
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def group_size(groups: Tensor | np.ndarray, n: int) -> float:
    """Mean number of *other* members in a point's group."""
    mem = group_membership(groups, n)
    return float(mem.sum() - np.trace(mem)) / n
