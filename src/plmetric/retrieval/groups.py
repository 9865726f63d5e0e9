"""Groups of similar images in an index (``plmetric groups``): the pile partitioned by a clustering
library over its embeddings, with an "ungrouped" bucket, sizes and a representative per group.

Two methods, chosen by measurement (benchmarks/groups.py, docs/results.md: the test splits of the CUB
subset and plankton106, scored against their sub-folder labels):

* ``kmeans`` (the default): faiss's spherical k-means (scikit-learn's MiniBatchKMeans without faiss)
  with k chosen from the embeddings alone unless ``--groups`` says otherwise (:func:`choose_group_count`,
  issue 29: the k of a geometric grid 2 .. N/3 whose k-means groups have the highest modularity at
  resolution 4 on the 5-NN graph, searched on the PCA-64 projection, then k-means at that k on the
  embeddings themselves); groups smaller than ``--min-size`` form the ungrouped bucket. Before issue 29
  k was ``round(sqrt(N / 2))``: 13 groups for the 30 classes of a 300-image pile. The label-free k's AMI
  against the sub-folder labels is within k-means' seed noise of the true-k oracle's on the test splits
  and the mixed pile (benchmarks/groups.py ``--study labelfree``, docs/results.md); the resolution was
  chosen on those sets. At resolution 4, 2 .. 4 real groups cannot win (two halves of the pile with
  every link inside score 1 - 4 x 1/2 < 0), so a k <= 4 whose groups keep >= 95 % of the links inside
  and score at resolution 1 at least half of 1 - 1/k (:func:`few_separated`) replaces the peak when the
  peak's finer groups are no clearer than cuts of one Gaussian fitted to each of those few groups.
  A structureless blob is still cut (into ~N/3 groups of a few images), but said to be: the chosen
  groups' Q is compared with k-means at the same k on Gaussian data of the same spread (mean and PCA
  covariance; :func:`null_reference`, a few seeded draws of up to 2,000 images), and the printed choice
  says "weak structure ... the groups are arbitrary cuts" unless Q is above the null's mean + 3 sd. The
  choice costs a k-NN graph and k-means at up to ~20 k on the 64-d projection: seconds on ~3k images
  (about 40 s at the full 1280-d); the null references add 1-5 s on one core. k-means costs O(N k d) per
  iteration, so it runs on millions of images.
* ``hdbscan`` (scikit-learn's ``sklearn.cluster.HDBSCAN``, a dependency already): no number of groups,
  groups of varying density, and images that fit no group are left ungrouped instead of forced into
  the nearest group. Its groups are purer (AMI over the grouped images 0.88 on CUB, 0.63 on plankton)
  but it leaves 40-52 % of the images ungrouped, so over all images it scored lower (0.585, 0.329): the
  choice when only confident groups matter. It runs on the embeddings projected by PCA to
  :data:`REDUCED_DIM` dimensions (on unit vectors the Euclidean distance ``sqrt(2 - 2 cos)`` orders
  pairs as the cosine does); its cost grows about as N^2.3 (:data:`HDBSCAN_MAX`). Its default cut of
  the cluster tree (``eom``) collapsed piles of several kinds of images into a few super-groups (the
  mixed pile of birds and plankton: 2 groups; cars98dev: one group of 97 %), so both cuts, ``eom`` and
  ``leaf``, are made and the one of higher k-NN graph modularity kept (:func:`hdbscan_labels`,
  :data:`SELECTION_RESOLUTION`): ``eom`` on CUB and plankton, ``leaf`` on the mixed pile and cars.

A pile of more than :data:`FIT_SAMPLE` images (a sharded index of millions: issue 31) is grouped by
:func:`find_groups_sampled`: the method runs on a seeded random sample of :data:`FIT_SAMPLE` images
(:data:`HDBSCAN_MAX` for HDBSCAN), then every image, sampled or not, is assigned block by block to the
group whose sample members' mean direction is nearest (k-means: always, which is k-means' own
assignment step; HDBSCAN: only when its cosine to that direction reaches the lowest cosine of the
group's own sample members, else ungrouped), groups under ``--min-size`` over the whole pile are
ungrouped, and the groups are described as below in two passes over the vectors. Memory: the sample,
one block, and a few numbers a row; the output says that a sample was used.

Every group is then described the same way: groups renumbered 1, 2, ... by size (largest first), the
ungrouped bucket -1; each member's ``score`` is its cosine similarity to its group's mean direction
``m / |m|`` (``m`` the mean of the members' embeddings); the member with the highest score is the
group's representative.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from plmetric.core.options import GROUPS_CHOICE_SAMPLE as CHOICE_SAMPLE
from plmetric.core.options import GROUPS_HDBSCAN_MAX as HDBSCAN_MAX  # re-exported: defined there without torch
from plmetric.core.options import GROUPS_METHODS as METHODS
from plmetric.core.options import GROUPS_REDUCED_DIM as REDUCED_DIM

MIN_SAMPLES = 2
"""HDBSCAN's density neighbourhood (``min_samples``): 2 left 40-52 % of the CUB / plankton images
ungrouped, ``min_samples = --min-size = 5`` 54-70 %, at a lower AMI on both (docs/results.md,
"Groups of similar images")."""


def hdbscan_seconds(n: int) -> float:
    """HDBSCAN's expected time on two cores for ``n`` images: two fits (:data:`HDBSCAN_SELECTIONS`) of
    ``38 s (n / 20000)^2.3`` each (the measurement above)."""
    return 2 * 38.0 * (n / 20_000) ** 2.3


UNGROUPED = -1

CHOICE_NEIGHBOURS = 5
"""The k-NN graph of the group-count criterion links each image to its 5 nearest (3 and 8 compared:
5 peaked nearest the labels' number of classes on the dev sets)."""
CHOICE_RESOLUTION = 4.0
"""Resolution ``gamma`` of the criterion ``Q = in-group share of the k-NN links - gamma * sum of squared
link shares of the groups`` (Newman's modularity at gamma = 1). At gamma = 1 the modularity peaked at
k = 10-31 where the classes number 30-53 (the resolution limit: it merges groups smaller than about
the square root of the links); gamma 1-8 compared on the dev sets and the mixed pile, 4 is the
smallest at which every set's chosen k scored an AMI within k-means' seed noise of the true-k oracle's
(docs/results.md, benchmarks/results/groups_labelfree.json)."""
CHOICE_GRID_RATIO = 1.25
"""Successive k tried grow by this factor (2, 3, 4, 5, 6, 7, 9, 11, ...)."""
CHOICE_PATIENCE = 4
"""The search stops after this many successive k below the best so far (Q falls past its peak)."""

NULL_DRAWS = 5
"""Seeded draws of structureless data (:func:`gaussian_like`) behind a null reference (:func:`null_reference`)."""
NULL_SAMPLE = 2_000
"""Images per null draw at most: a draw costs a k-NN graph O(m^2 dims) and one k-means O(m k dims), well
under a second at 2,000 x 64; a larger sample's null is cut into proportionally fewer groups (the same
images per group, what the share of links kept inside a group depends on)."""
NULL_MARGIN_SD = 3.0
"""Structure is "clear" when Q exceeds the null draws' mean by more than this many of their standard
deviations. The data's Q is the best of the k tried, the null's is at one k: the margin covers that
selection (about one sd between neighbouring k whose Q are correlated) and the noise of a sd estimated
from :data:`NULL_DRAWS` draws (it may be off by a third)."""
FEW_GROUPS_MAX = 4
"""At resolution 4 a pile of 2 .. 4 real groups cannot win (every link inside, k equal groups: Q =
1 - 4/k <= 0), so k <= 4 is judged by :func:`few_separated` instead."""
FEW_GROUPS_INSIDE = 0.95
"""A small k is "well separated" when at least this share of the 5-NN links stay inside its groups (k-means
halving a structureless blob of many dimensions cuts a large part of them)..."""
FEW_GROUPS_RESOLUTION = 1.0
"""... and its modularity at Newman's resolution 1 is at least half the best a k-partition can reach,
(1 - 1/k) / 2: two groups of 95 % and 5 % of a pile with every link inside score 0.095 < 0.25, a far
off crumb and not two groups."""


@dataclass(frozen=True)
class NullReference:
    """The criterion on structureless data (:func:`null_reference`): ``mean`` and ``sd`` of its Q over
    ``draws`` draws of ``sample`` images drawn from ``components`` Gaussians, cut into ``k`` groups."""

    mean: float
    sd: float
    draws: int
    sample: int
    components: int
    k: int

    def beaten_by(self, score: float) -> bool:
        """Whether ``score`` is clearly above this null: above ``mean + NULL_MARGIN_SD sd``."""
        return score > self.mean + NULL_MARGIN_SD * self.sd

    def text(self) -> str:
        return f"{self.mean:.3f} +- {self.sd:.3f}"


@dataclass(frozen=True)
class GroupCount:
    """The label-free choice of k: ``k``, its criterion ``score``, every ``(k, score)`` tried and the
    ``sample`` of images it was chosen on; ``labels`` the k-means labels at ``k`` when the sample was the
    whole pile (else None)."""

    k: int
    score: float
    tried: tuple[tuple[int, float], ...]
    sample: int
    labels: np.ndarray | None = None
    sampled: bool = False
    """Whether ``sample`` is a random sample of a larger pile."""
    dims: int | None = None
    """The principal components the choice ran on (None: the embeddings themselves)."""
    resolution: float = CHOICE_RESOLUTION
    """The resolution ``score`` is at: :data:`CHOICE_RESOLUTION` for the peak of the search,
    :data:`FEW_GROUPS_RESOLUTION` for few well separated groups."""
    inside: float | None = None
    """Share of the k-NN links inside the chosen groups."""
    null: NullReference | None = None
    """The same criterion at ``k`` on structureless data of the same spread (one Gaussian); None when
    not measured (a pile too small to cut)."""
    peak: tuple[int, float, NullReference] | None = None
    """When few well separated groups were chosen over the resolution-4 peak: the peak's k, its Q and
    the Q of cutting Gaussians fitted to the few groups into as many groups."""

    @property
    def weak(self) -> bool:
        """Whether the chosen groups are no clearer than cuts of structureless data (:data:`NULL_MARGIN_SD`)."""
        return self.null is not None and not self.null.beaten_by(self.score)

    def describe(self) -> str:
        """One line: the k chosen and why, and whether its groups beat structureless data."""
        ks = [k for k, _ in self.tried]
        on = f" on a random sample of {self.sample:,} images" if self.sampled else ""
        pca = f" (on {self.dims} principal components)" if self.dims else ""
        among = f"among {len(ks)} k from {min(ks)} to {max(ks)}{on}{pca}"
        if self.peak is None:
            line = (
                f"k={self.k} chosen by the k-NN graph's modularity (resolution {CHOICE_RESOLUTION:g}, "
                f"{CHOICE_NEIGHBOURS} neighbours: Q={self.score:.3f}) {among}"
            )
        else:
            peak_k, peak_q, peak_null = self.peak
            line = (
                f"k={self.k} chosen as few well separated groups ({self.inside:.1%} of the {CHOICE_NEIGHBOURS}-NN "
                f"links inside groups, Q={self.score:.3f} at resolution {self.resolution:g}; the resolution "
                f"{CHOICE_RESOLUTION:g} peak k={peak_k}, Q={peak_q:.3f}, is no clearer than cutting {self.k} "
                f"Gaussian groups of the same spread: {peak_null.text()}) {among}"
            )
        if self.null is None:
            return line
        if self.weak:
            return (
                f"{line}; weak structure: Q={self.score:.3f} vs {self.null.text()} for structureless data of the "
                "same spread; the groups are arbitrary cuts"
            )
        return f"{line}; structureless data of the same spread: Q={self.null.text()}"


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
    choice: str = ""
    """How the number of groups was chosen (empty when given or not applicable)."""
    sample: int = 0
    """Images the groups were fitted on when that was a seeded random sample of a larger pile
    (:func:`find_groups_sampled`; 0: fitted on every image)."""

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
    """Raw cluster labels (-1 = none) of (N, d) unit embeddings, and the method used; without
    ``n_groups`` k-means takes k from :func:`choose_group_count`.

    Raises:
        ValueError: an unknown method, ``min_size < 2``, ``n_groups`` outside [1, N], or ``n_groups``
            with HDBSCAN (which chooses the number of groups itself).
    """
    labels, used, _ = _cluster(embeddings, method, min_size, n_groups, seed)
    return labels, used


def _cluster(
    embeddings: torch.Tensor, method: str, min_size: int, n_groups: int | None, seed: int
) -> tuple[np.ndarray, str, GroupCount | HdbscanChoice | None]:
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
        return np.full(n, UNGROUPED, dtype=np.int64), "none (fewer images than --min-size)", None
    if method == "hdbscan":
        labels, selection = hdbscan_labels(x, min_size, seed)
        return labels, "hdbscan", selection
    if n_groups is not None:
        return _drop_small(_kmeans_labels(x, n_groups, seed), min_size), "kmeans", None
    choice = choose_group_count(x, seed=seed)
    raw = choice.labels if choice.labels is not None else _kmeans_labels(x, choice.k, seed)
    return _drop_small(raw.copy(), min_size), "kmeans", choice


def knn_graph(x: np.ndarray, neighbours: int) -> np.ndarray:
    """(n, neighbours) ids of each unit vector's nearest others by cosine (exact; O(n^2 d) in row
    blocks, memory O(block n))."""
    n = len(x)
    m = min(neighbours, n - 1)
    data = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = np.empty((n, m), dtype=np.int64)
    block = max(1, min(n, 2**24 // max(n, 1)))  # a block's similarity rows hold at most 16M floats
    for start in range(0, n, block):
        sims = data[start : start + block] @ data.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = -torch.inf  # not oneself
        out[start : start + block] = sims.topk(m, dim=1).indices.numpy()
    return out


def graph_modularity(neighbours: np.ndarray, labels: np.ndarray, resolution: float = CHOICE_RESOLUTION) -> float:
    """Modularity of ``labels`` on the k-NN graph ``neighbours`` (each link i -> j counted once, its
    two ends in the degrees): the share of links inside a group minus ``resolution`` times the sum over
    groups of the squared share of link ends in the group (:func:`link_terms`)."""
    inside, spread = link_terms(neighbours, labels)
    return inside - resolution * spread


def link_terms(neighbours: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The two terms of :func:`graph_modularity`: the share of k-NN links inside a group, and the sum over
    groups of the squared share of link ends in the group (0, 0 for a graph without links)."""
    src = np.repeat(labels, neighbours.shape[1])
    dst = labels[neighbours.ravel()]
    if len(src) == 0:
        return 0.0, 0.0
    inside = float(np.mean(src == dst))
    count = int(labels.max()) + 1
    ends = np.bincount(src, minlength=count) + np.bincount(dst, minlength=count)
    return inside, float(np.sum((ends / (2 * len(src))) ** 2))


def gaussian_like(x: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` unit rows of structureless data of the spread of ``x``: drawn from one Gaussian per label
    of ``labels``, each of its group's mean, covariance (its principal axes and variances) and share of the
    rows, then L2-normalised as the embeddings are."""
    values, inverse = np.unique(labels, return_inverse=True)
    counts = rng.multinomial(count, np.bincount(inverse) / len(labels))
    parts = []
    for group, drawn in enumerate(counts.tolist()):  # one Gaussian per group (at most a few)
        members = x[inverse == group].astype(np.float64)
        centre = members.mean(axis=0)
        _, spread, axes = np.linalg.svd(members - centre, full_matrices=False)
        scale = spread / math.sqrt(max(len(members) - 1, 1))
        parts.append(centre + (rng.standard_normal((drawn, len(scale))) * scale) @ axes)
    drawn_rows = np.concatenate(parts)
    return (drawn_rows / np.maximum(np.linalg.norm(drawn_rows, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def null_reference(
    x: np.ndarray, labels: np.ndarray, k: int, spread: float, resolution: float, seed: int
) -> NullReference:
    """The criterion at ``k`` on :data:`NULL_DRAWS` seeded draws of :func:`gaussian_like` ``x`` (one
    Gaussian per label of ``labels``; all zeros: structureless data), of ``len(x)`` rows up to
    :data:`NULL_SAMPLE` (then cut into proportionally fewer groups). Each draw's Q is its share of 5-NN
    links inside its k-means groups minus ``resolution`` times the data's own ``spread`` term
    (:func:`link_terms`): data and null are compared on the links their groups keep."""
    rows = min(len(x), NULL_SAMPLE)
    k_null = k if rows == len(x) else max(2, round(k * rows / len(x)))
    scores = []
    for draw in range(NULL_DRAWS):
        drawn = gaussian_like(x, labels, rows, np.random.default_rng([seed, draw]))
        inside, _ = link_terms(knn_graph(drawn, CHOICE_NEIGHBOURS), _kmeans_labels(drawn, k_null, seed + draw))
        scores.append(inside - resolution * spread)
    components = len(np.unique(labels))
    return NullReference(float(np.mean(scores)), float(np.std(scores, ddof=1)), NULL_DRAWS, rows, components, k_null)


def few_separated(inside: float, spread: float, k: int) -> bool:
    """Whether a partition into ``k <= FEW_GROUPS_MAX`` groups is a few well separated groups: at least
    :data:`FEW_GROUPS_INSIDE` of the k-NN links inside groups and modularity at resolution
    :data:`FEW_GROUPS_RESOLUTION` at least half of its best for k groups, (1 - 1/k) / 2."""
    high = inside - FEW_GROUPS_RESOLUTION * spread >= (1 - 1 / k) / 2
    return k <= FEW_GROUPS_MAX and inside >= FEW_GROUPS_INSIDE and high


def candidate_ks(n: int) -> list[int]:
    """k tried for ``n`` images: 2, then growing by :data:`CHOICE_GRID_RATIO`, up to ``n // 3``
    (a group of three images on average)."""
    top = max(1, n // 3)
    if top < 2:
        return [1]
    count = int(math.floor(math.log(top / 2) / math.log(CHOICE_GRID_RATIO))) + 1
    return sorted({min(top, round(2 * CHOICE_GRID_RATIO**i)) for i in range(count + 1)})


def choose_group_count(
    x: np.ndarray, *, seed: int = 0, max_sample: int = CHOICE_SAMPLE, dims: int = REDUCED_DIM
) -> GroupCount:
    """The number of k-means groups from the (n, d) unit embeddings alone: k-means at each of
    :func:`candidate_ks`, scored by :func:`graph_modularity` on the 5-NN graph; the k of the highest
    score, unless a k <= :data:`FEW_GROUPS_MAX` splits the pile into few well separated groups
    (:func:`few_separated`; the largest such k) and the peak's finer groups are no clearer than cuts of one
    Gaussian per few group (:func:`null_reference`): then that few. The chosen groups are compared with
    cuts of structureless data of the same spread (one Gaussian; :attr:`GroupCount.weak`). Bounded cost:
    on a seeded random sample of ``max_sample`` images when there are more, projected on ``dims`` principal
    components (:func:`reduced_unit`) when the embeddings have more (the k-NN graph O(m^2 dims) once, each
    k O(m k dims); the search stops :data:`CHOICE_PATIENCE` k past the best; each null reference
    :data:`NULL_DRAWS` graphs and k-means on :data:`NULL_SAMPLE` images at most)."""
    n = len(x)
    rng = np.random.default_rng(seed)
    sampled = n > max_sample
    xs = x[np.sort(rng.choice(n, max_sample, replace=False))] if sampled else x
    ks = candidate_ks(len(xs))
    if ks == [1]:
        labels = np.zeros(len(xs), dtype=np.int64)
        return GroupCount(1, 0.0, ((1, 0.0),), len(xs), None if sampled else labels, sampled)
    reduced = x.shape[1] > dims
    if reduced:  # the search's k-NN graph and k-means on the first principal components: cost / (d / dims)
        xs = reduced_unit(xs, seed, dims)
    neighbours = knn_graph(xs, CHOICE_NEIGHBOURS)
    tried: list[tuple[int, float]] = []
    terms: dict[int, tuple[float, float]] = {}
    few: dict[int, np.ndarray] = {}  # labels of the small k that split the pile into well separated groups
    best, best_labels, worse = -math.inf, None, 0
    for k in ks:
        labels = _kmeans_labels(xs, k, seed)
        terms[k] = link_terms(neighbours, labels)
        q = terms[k][0] - CHOICE_RESOLUTION * terms[k][1]
        tried.append((k, q))
        if few_separated(*terms[k], k):
            few[k] = labels
        if q > best:
            best, best_labels, worse = q, labels, 0
        else:
            worse += 1
            if worse >= CHOICE_PATIENCE:
                break
    k = max(tried, key=lambda t: t[1])[0]
    score, labels, resolution = best, best_labels, CHOICE_RESOLUTION
    peak: tuple[int, float, NullReference] | None = None
    k_few = max(few, default=k)
    if k_few < k:  # few well separated groups, and a finer peak: are its cuts more than arbitrary?
        peak_null = null_reference(xs, few[k_few], k, terms[k][1], CHOICE_RESOLUTION, seed)
        if not peak_null.beaten_by(best):
            peak = (k, best, peak_null)
            k, labels, resolution = k_few, few[k_few], FEW_GROUPS_RESOLUTION
            score = terms[k][0] - resolution * terms[k][1]
    null = null_reference(xs, np.zeros(len(xs), dtype=np.int64), k, terms[k][1], resolution, seed)
    keep = None if sampled or reduced else labels  # labels of the embeddings themselves only
    return GroupCount(
        k,
        score,
        tuple(tried),
        len(xs),
        keep,
        sampled,
        dims if reduced else None,
        resolution=resolution,
        inside=terms[k][0],
        null=null,
        peak=peak,
    )


HDBSCAN_SELECTIONS = ("eom", "leaf")
"""HDBSCAN's two ways to cut its cluster tree: ``eom`` (excess of mass, scikit-learn's default) keeps the
most persistent clusters, and on a pile of unequal densities it can keep one or two huge ones (the mixed
pile of issue 29: 2 groups, birds and plankton); ``leaf`` keeps the tree's leaves (many small groups,
more images ungrouped). :func:`hdbscan_labels` runs both and keeps the one of higher modularity."""
SELECTION_RESOLUTION = 1.0
"""Resolution of the modularity that picks between :data:`HDBSCAN_SELECTIONS`: Newman's own (1). At the
k-means choice's 4 a real group holding over half the pile costs more than 1 (4 x 1/4) and would always
lose to ``leaf``'s crumbs; at 1 the two cuts are compared on links kept inside groups less the share
expected by chance. On the test splits and the mixed pile it kept ``eom`` on CUB and plankton106 (Q 0.52
vs 0.31, 0.35 vs 0.25) and ``leaf`` where ``eom`` collapsed: the mixed pile (0.60 vs 0.44) and cars98dev
(0.17 vs 0.05)."""


@dataclass(frozen=True)
class HdbscanChoice:
    """The cluster selection :func:`hdbscan_labels` kept: ``selection`` and every ``(selection, groups,
    ungrouped share, modularity)`` tried."""

    selection: str
    tried: tuple[tuple[str, int, float, float], ...]

    def describe(self) -> str:
        """One line: the selection kept and why."""
        parts = "; ".join(f"{s}: {g} groups, {u:.0%} ungrouped, Q={q:.3f}" for s, g, u, q in self.tried)
        return (
            f"HDBSCAN cluster selection '{self.selection}' chosen by the k-NN graph's modularity (resolution "
            f"{SELECTION_RESOLUTION:g}, {CHOICE_NEIGHBOURS} neighbours, each ungrouped image a group of its own): {parts}"
        )


def reduced_unit(x: np.ndarray, seed: int, dims: int = REDUCED_DIM) -> np.ndarray:
    """The rows projected on their first ``dims`` principal components (PCA, ``seed`` for its
    randomised solver) and L2-normalised again; ``x`` itself when it has no more than ``dims`` columns."""
    from sklearn.decomposition import PCA

    dims = min(dims, len(x))
    if dims >= x.shape[1]:
        return np.ascontiguousarray(x, dtype=np.float32)
    reduced = PCA(n_components=dims, random_state=seed).fit_transform(x.astype(np.float32))
    return (reduced / np.maximum(np.linalg.norm(reduced, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def with_singletons(labels: np.ndarray) -> np.ndarray:
    """Labels 0.. with each ungrouped (-1) image given a group of its own (for :func:`graph_modularity`)."""
    out = np.asarray(labels, dtype=np.int64).copy()
    loose = out == UNGROUPED
    out[loose] = out.max(initial=-1) + 1 + np.arange(int(loose.sum()))
    return out


def hdbscan_labels(
    x: np.ndarray, min_size: int, seed: int, selections: tuple[str, ...] = HDBSCAN_SELECTIONS
) -> tuple[np.ndarray, HdbscanChoice]:
    """HDBSCAN's labels (-1 = ungrouped) of the (n, d) unit rows on their PCA projection, with the cluster
    selection (:data:`HDBSCAN_SELECTIONS`) whose partition has the higher :func:`graph_modularity`
    (resolution :data:`SELECTION_RESOLUTION`) on the 5-NN graph of the unit PCA projection, each ungrouped
    image counted as a group of its own: the label-free criterion k-means' number of groups is chosen by.
    Two super-groups of many classes each (eom's collapse on the mixed pile) keep every link inside but
    score at most 1 - 2 (1/2)^2 = 1/2, below a cut into the classes that keeps most links inside.
    ``selections``: those tried (``("eom",)``: scikit-learn's default alone, the method before issue 29)."""
    from sklearn.cluster import HDBSCAN
    from sklearn.decomposition import PCA

    dims = min(REDUCED_DIM, x.shape[1], len(x))
    reduced = PCA(n_components=dims, random_state=seed).fit_transform(x) if dims < x.shape[1] else x
    neighbours = knn_graph(reduced_unit(x, seed), CHOICE_NEIGHBOURS)
    tried, best = [], None
    for selection in selections:
        model = HDBSCAN(
            min_cluster_size=min_size,
            min_samples=min(MIN_SAMPLES, min_size),
            cluster_selection_method=selection,
            copy=True,
        )
        labels = model.fit_predict(reduced.astype(np.float64)).astype(np.int64)
        q = graph_modularity(neighbours, with_singletons(labels), SELECTION_RESOLUTION)
        tried.append((selection, int(labels.max(initial=-1)) + 1, float(np.mean(labels == UNGROUPED)), q))
        if best is None or q > best[0]:
            best = (q, selection, labels)
    assert best is not None
    return best[2], HdbscanChoice(best[1], tuple(tried))


def _kmeans_labels(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Spherical k-means' assignment (0 .. k-1) of every row, from k-means++ seeds (faiss' own random
    seeds left two centres in one of 12 well-separated clusters and none in another)."""
    from sklearn.cluster import kmeans_plusplus

    from plmetric.manifold import ann

    if ann.faiss_available():
        faiss = ann.import_faiss()
        data = np.ascontiguousarray(x, dtype=np.float32)
        start, _ = kmeans_plusplus(data, k, random_state=seed)
        km = faiss.Kmeans(x.shape[1], k, niter=20, spherical=True, seed=seed, verbose=False, min_points_per_centroid=1)
        km.train(data, init_centroids=np.ascontiguousarray(start, dtype=np.float32))
        _, assigned = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        return assigned[:, 0].astype(np.int64)
    from sklearn.cluster import MiniBatchKMeans

    return MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3).fit_predict(x).astype(np.int64)


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Labels of groups smaller than ``min_size`` set to the ungrouped bucket."""
    sizes = np.bincount(labels, minlength=int(labels.max(initial=0)) + 1)
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
    """:func:`cluster_labels`, then :func:`describe_groups`; ``choice`` says how k was chosen."""
    labels, used, choice = _cluster(embeddings, method, min_size, n_groups, seed)
    found = describe_groups(embeddings, labels, used)
    return replace(found, choice=choice.describe()) if choice is not None else found


FIT_SAMPLE = 100_000
"""Above this many images the groups are fitted on a seeded random sample of this many (k-means at
the chosen k costs O(sample x k x d) an iteration; 100,000 x 512 float32 is 200 MB) and the rest are
assigned to them (:func:`find_groups_sampled`)."""
ASSIGN_ELEMENTS = 2**26
"""The assignment pass scores blocks of at most this many (row, group) cosines (256 MiB)."""


def find_groups_sampled(
    vectors: Any,
    *,
    method: str = "kmeans",
    min_size: int = 5,
    n_groups: int | None = None,
    seed: int = 0,
    sample: int | None = None,
    estimate: Callable[[int, float], None] | None = None,
) -> Groups:
    """:func:`find_groups` for a pile too large to cluster whole (the module docstring): fitted on a seeded
    random sample of ``sample`` (default :data:`FIT_SAMPLE`) images (HDBSCAN: at most :data:`HDBSCAN_MAX`),
    every image assigned block by block. ``vectors``: a tensor or mapped
    :class:`~plmetric.retrieval.stored.StoredVectors` (never materialised). ``estimate`` gets the rows
    of the first assigned block and the seconds they took.

    Raises:
        ValueError: as :func:`cluster_labels`; ``n_groups`` above the sample's size.
    """
    from plmetric.retrieval.mapped import as_stored, float32_blocks, rows_of, seeded_sample

    check_method(method)
    source = as_stored(vectors)
    n = source.count
    if min_size < 2:
        raise ValueError(f"--min-size must be >= 2 (a group of one is no group), got {min_size}")
    if n_groups is not None and not 1 <= n_groups <= n:
        raise ValueError(f"--groups must be between 1 and the {n} indexed images, got {n_groups}")
    sample = FIT_SAMPLE if sample is None else sample
    size = min(n, sample if method == "kmeans" else min(sample, HDBSCAN_MAX))
    if n_groups is not None and n_groups > size:
        raise ValueError(
            f"--groups {n_groups} exceeds the {size:,} images the groups of a pile of {n:,} are fitted on; "
            f"give at most {size:,}"
        )
    chosen = seeded_sample(n, size, seed)
    fitted = rows_of(source, chosen)
    # k-means' groups under --min-size in the sample may be larger in the pile: only singletons dropped here
    labels, used, choice = _cluster(torch.from_numpy(fitted), method, min_size if method == "hdbscan" else 2,
                                    n_groups, seed)
    kept = labels != UNGROUPED
    raw, inverse = np.unique(labels[kept], return_inverse=True)
    sums = _group_sums(inverse, fitted[kept], len(raw))
    centres = (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    floor = np.full(len(raw), -np.inf, dtype=np.float32)
    if method == "hdbscan" and len(raw):  # an image joins a density group only as close as its own members
        own = np.einsum("nd,nd->n", fitted[kept], centres[inverse])
        floor = np.full(len(raw), np.inf, dtype=np.float32)
        np.minimum.at(floor, inverse, own.astype(np.float32))
    del fitted
    assigned = np.full(n, UNGROUPED, dtype=np.int64)
    if len(raw):
        rows = max(1, min(65_536, ASSIGN_ELEMENTS // len(raw)))
        began = time.perf_counter()
        for start, block in float32_blocks(source, rows):
            sims = block @ centres.T
            best = sims.argmax(axis=1)
            close = sims[np.arange(len(block)), best] >= floor[best]
            assigned[start : start + len(block)] = np.where(close, best, UNGROUPED)
            del sims
            if estimate is not None and start == 0:
                estimate(len(block), time.perf_counter() - began)
    labels = assigned
    if (labels != UNGROUPED).any():
        labels = _drop_small(labels, min_size)
    found = _describe_blocks(source, labels, used)
    return replace(found, choice=choice.describe() if choice is not None else "", sample=size)


def _group_sums(slots: np.ndarray, rows: np.ndarray, groups: int) -> np.ndarray:
    """(groups, d) float64 sums of ``rows`` by their group ``slots`` (a sparse one-hot product: no loop)."""
    from scipy.sparse import csr_matrix

    one_hot = csr_matrix(
        (np.ones(len(slots)), (slots, np.arange(len(slots)))), shape=(groups, len(slots)), dtype=np.float64
    )
    return np.asarray(one_hot @ rows.astype(np.float64))


def _describe_blocks(source: Any, labels: np.ndarray, method: str) -> Groups:
    """:func:`describe_groups` over mapped vectors, in two passes of blocks: the groups' sums, then each
    member's cosine to its group's mean direction (the same numbering, scores and representatives)."""
    from plmetric.retrieval.mapped import float32_blocks

    n = source.count
    grouped = labels != UNGROUPED
    group = np.full(n, UNGROUPED, dtype=np.int64)
    score = np.full(n, np.nan, dtype=np.float32)
    representative = np.zeros(n, dtype=bool)
    if grouped.any():
        raw, inverse_grouped = np.unique(labels[grouped], return_inverse=True)
        slot = np.full(n, -1, dtype=np.int64)
        slot[grouped] = inverse_grouped
        sizes = np.bincount(inverse_grouped, minlength=len(raw))
        first = np.full(len(raw), n, dtype=np.int64)
        np.minimum.at(first, inverse_grouped, np.flatnonzero(grouped))
        rank = np.empty(len(raw), dtype=np.int64)
        rank[np.lexsort((first, -sizes))] = np.arange(1, len(raw) + 1)
        group[grouped] = rank[inverse_grouped]
        block_rows = 65_536
        sums = np.zeros((len(raw), source.dim), dtype=np.float64)
        for start, block in float32_blocks(source, block_rows):
            mine = slot[start : start + len(block)]
            inside = mine >= 0
            sums += _group_sums(mine[inside], block[inside], len(raw))
        directions = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        for start, block in float32_blocks(source, block_rows):
            mine = slot[start : start + len(block)]
            inside = np.flatnonzero(mine >= 0)
            member = np.einsum("nd,nd->n", block[inside].astype(np.float64), directions[mine[inside]])
            score[start + inside] = member.astype(np.float32)
        member_scores = score[grouped].astype(np.float64)
        best = np.full(len(raw), -np.inf)
        np.maximum.at(best, inverse_grouped, member_scores)
        ids = np.flatnonzero(grouped)
        is_best = member_scores == best[inverse_grouped]
        chosen = np.full(len(raw), n, dtype=np.int64)
        np.minimum.at(chosen, inverse_grouped[is_best], ids[is_best])
        representative[chosen] = True
    counts = np.bincount(np.where(group == UNGROUPED, 0, group), minlength=group.max(initial=0) + 1)
    size = counts[np.where(group == UNGROUPED, 0, group)]
    return Groups(group=group, size=size, score=score, representative=representative, method=method)
