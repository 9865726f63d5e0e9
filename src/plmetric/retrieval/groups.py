"""Groups of similar images in an index (``plmetric groups``): the pile partitioned by a clustering
library over its embeddings, with an "ungrouped" bucket, sizes and a representative per group.

Two methods, chosen by measurement (benchmarks/groups.py, docs/results.md: the test splits of the CUB
subset and plankton106, scored against their sub-folder labels):

* ``kmeans`` (the default): faiss's spherical k-means (scikit-learn's MiniBatchKMeans without faiss)
  with k = ``round(sqrt(N / 2))`` unless ``--groups`` says otherwise; groups smaller than
  ``--min-size`` form the ungrouped bucket. Over all images it scored AMI 0.765 (CUB) and 0.499
  (plankton) on the pretrained features, where knowing the true number of classes added +0.006 and
  -0.012: the rule needs no oracle. It costs O(N k d) per iteration, so it runs on millions of images.
* ``hdbscan`` (scikit-learn's ``sklearn.cluster.HDBSCAN``, a dependency already): no number of groups,
  groups of varying density, and images that fit no group are left ungrouped instead of forced into
  the nearest group. Its groups are purer (AMI over the grouped images 0.88 on CUB, 0.63 on plankton)
  but it leaves 40-52 % of the images ungrouped, so over all images it scored lower (0.585, 0.329): the
  choice when only confident groups matter. It runs on the embeddings projected by PCA to
  :data:`REDUCED_DIM` dimensions (on unit vectors the Euclidean distance ``sqrt(2 - 2 cos)`` orders
  pairs as the cosine does); its cost grows about as N^2.3 (:data:`HDBSCAN_MAX`).

Every group is then described the same way: groups renumbered 1, 2, ... by size (largest first), the
ungrouped bucket -1; each member's ``score`` is its cosine similarity to its group's mean direction
``m / |m|`` (``m`` the mean of the members' embeddings); the member with the highest score is the
group's representative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from plmetric.core.options import GROUPS_HDBSCAN_MAX as HDBSCAN_MAX  # re-exported: defined there without torch
from plmetric.core.options import GROUPS_METHODS as METHODS
from plmetric.core.options import GROUPS_REDUCED_DIM as REDUCED_DIM

MIN_SAMPLES = 2
"""HDBSCAN's density neighbourhood (``min_samples``): 2 left 40-52 % of the CUB / plankton images
ungrouped, ``min_samples = --min-size = 5`` 54-70 %, at a lower AMI on both (docs/results.md,
"Groups of similar images")."""


def hdbscan_seconds(n: int) -> float:
    """HDBSCAN's expected time on two cores for ``n`` images: ``38 s (n / 20000)^2.3`` (the measurement above)."""
    return 38.0 * (n / 20_000) ** 2.3
UNGROUPED = -1


@dataclass(frozen=True)
class Groups:
    """A partition of N images: ``group`` (N,) 1.. by size, -1 ungrouped; ``size`` (N,) the size of each
    image's group (of the bucket for the ungrouped); ``score`` (N,) cosine to the group's mean direction
    (NaN for the ungrouped); ``representative`` (N,) bool, one per group; ``method`` what made it."""

    group: np.ndarray
    size: np.ndarray
    score: np.ndarray
    representative: np.ndarray
    method: str

    @property
    def count(self) -> int:
        """Number of groups (the ungrouped bucket not counted)."""
        return int(self.group.max(initial=0))

    def order(self) -> np.ndarray:
        """Row order for a table: by group (1, 2, ..., the ungrouped last), then by score descending."""
        key_group = np.where(self.group == UNGROUPED, np.iinfo(np.int64).max, self.group)
        return np.lexsort((-np.nan_to_num(self.score, nan=-2.0), key_group))


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def cluster_labels(
    embeddings: torch.Tensor,
    *,
    method: str = "kmeans",
    min_size: int = 5,
    n_groups: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, str]:
    """Raw cluster labels (-1 = none) of (N, d) unit embeddings, and the method used.

    Raises:
        ValueError: an unknown method, ``min_size < 2``, ``n_groups`` outside [1, N], or ``n_groups``
            with HDBSCAN (which chooses the number of groups itself).
    """
    check_method(method)
    x = embeddings.detach().to("cpu", torch.float32).numpy()
    n = len(x)
    if min_size < 2:
        raise ValueError(f"--min-size must be >= 2 (a group of one is no group), got {min_size}")
    if n_groups is not None and not 1 <= n_groups <= n:
        raise ValueError(f"--groups must be between 1 and the {n} indexed images, got {n_groups}")
    if n_groups is not None and method == "hdbscan":
        raise ValueError("--groups sets the number of k-means groups; --method hdbscan chooses it itself")
    if n < min_size:
        return np.full(n, UNGROUPED, dtype=np.int64), "none (fewer images than --min-size)"
    if method == "hdbscan":
        return _hdbscan(x, min_size, seed), "hdbscan"
    return _kmeans(x, n_groups or max(1, round(math.sqrt(n / 2))), min_size, seed), "kmeans"


def _hdbscan(x: np.ndarray, min_size: int, seed: int) -> np.ndarray:
    from sklearn.cluster import HDBSCAN
    from sklearn.decomposition import PCA

    dims = min(REDUCED_DIM, x.shape[1], len(x))
    reduced = PCA(n_components=dims, random_state=seed).fit_transform(x) if dims < x.shape[1] else x
    model = HDBSCAN(min_cluster_size=min_size, min_samples=min(MIN_SAMPLES, min_size), copy=True)
    return model.fit_predict(reduced.astype(np.float64)).astype(np.int64)


def _kmeans(x: np.ndarray, k: int, min_size: int, seed: int) -> np.ndarray:
    from plmetric.manifold import ann

    if ann.faiss_available():
        faiss = ann.import_faiss()
        km = faiss.Kmeans(x.shape[1], k, niter=20, spherical=True, seed=seed, verbose=False, min_points_per_centroid=1)
        km.train(np.ascontiguousarray(x, dtype=np.float32))
        _, assigned = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        labels = assigned[:, 0].astype(np.int64)
    else:
        from sklearn.cluster import MiniBatchKMeans

        labels = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3).fit_predict(x).astype(np.int64)
    sizes = np.bincount(labels, minlength=k)
    labels[sizes[labels] < min_size] = UNGROUPED
    return labels


def describe_groups(embeddings: torch.Tensor, labels: np.ndarray, method: str = "") -> Groups:
    """Renumber raw labels by size (1 = largest; ties by the smallest member id), score each member by
    its cosine to its group's mean direction and mark the best-scoring member as representative."""
    x = embeddings.detach().to("cpu", torch.float32).numpy()
    n = len(x)
    labels = np.asarray(labels, dtype=np.int64)
    grouped = labels != UNGROUPED
    group = np.full(n, UNGROUPED, dtype=np.int64)
    score = np.full(n, np.nan, dtype=np.float32)
    representative = np.zeros(n, dtype=bool)
    if grouped.any():
        raw, inverse = np.unique(labels[grouped], return_inverse=True)
        sizes = np.bincount(inverse)
        first = np.full(len(raw), n, dtype=np.int64)
        np.minimum.at(first, inverse, np.flatnonzero(grouped))
        rank = np.empty(len(raw), dtype=np.int64)
        rank[np.lexsort((first, -sizes))] = np.arange(1, len(raw) + 1)
        group[grouped] = rank[inverse]
        sums = np.zeros((len(raw), x.shape[1]), dtype=np.float64)
        np.add.at(sums, inverse, x[grouped].astype(np.float64))
        directions = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        member_scores = np.einsum("nd,nd->n", x[grouped].astype(np.float64), directions[inverse])
        score[grouped] = member_scores.astype(np.float32)
        best = np.full(len(raw), -np.inf)
        np.maximum.at(best, inverse, member_scores)
        ids = np.flatnonzero(grouped)
        is_best = member_scores == best[inverse]
        # one representative per group: the first (lowest id) of the best-scoring members
        chosen = np.full(len(raw), n, dtype=np.int64)
        np.minimum.at(chosen, inverse[is_best], ids[is_best])
        representative[chosen] = True
    counts = np.bincount(np.where(group == UNGROUPED, 0, group), minlength=group.max(initial=0) + 1)
    size = counts[np.where(group == UNGROUPED, 0, group)]
    return Groups(group=group, size=size, score=score, representative=representative, method=method)


def find_groups(
    embeddings: torch.Tensor,
    *,
    method: str = "kmeans",
    min_size: int = 5,
    n_groups: int | None = None,
    seed: int = 0,
) -> Groups:
    """:func:`cluster_labels`, then :func:`describe_groups`."""
    labels, used = cluster_labels(embeddings, method=method, min_size=min_size, n_groups=n_groups, seed=seed)
    return describe_groups(embeddings, labels, used)
