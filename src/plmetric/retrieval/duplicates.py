"""Near-duplicate groups of an index (``plmetric duplicates``): the connected components of the graph whose
edges are the pairs of images with cosine similarity >= a threshold.

Finding the pairs never forms an N x N matrix: each image's nearest others are searched
(:func:`plmetric.retrieval.neighbours.nearest_others`, exact or through the index's faiss index) with
k = :data:`START_K`; an image whose k-th neighbour still reaches the threshold may have more, so those
images alone are searched again with 4k, until every image's last neighbour falls below the threshold
(or k reaches N - 1). Exactly, this finds every pair above the threshold; through HNSW/IVF, those the
approximate search returns. Components are found by :func:`scipy.sparse.csgraph.connected_components`.

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

A component is a chain: two members are joined through others, so two members of one group can be
less similar than the threshold (a resized copy of a copy). ``best_score`` is each member's highest
similarity to another member, the evidence that it belongs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plmetric.core.options import DUPLICATES_CANDIDATES as CANDIDATES  # re-exported: defined there without torch
from plmetric.core.options import DUPLICATES_THRESHOLD as DEFAULT_THRESHOLD
from plmetric.core.options import DUPLICATES_ZOOMS as ZOOMS

ZOOM_CHUNK = 4096
"""Candidate images whose zoomed views are held at once (4096 x 2 views x 1280 floats = 40 MiB)."""
PAIR_CHUNK = 8192
"""Pairs rescored at once (their gathered views: 8192 x 2 x 1280 floats = 80 MiB)."""
START_K = 16
"""Neighbours searched per image first; images with more duplicates than this are searched again."""


@dataclass(frozen=True)
class DuplicateGroups:
    """Groups of near-duplicates among N images.

    ``groups``: member ids of every group of two or more, largest first (ties: by first member id),
    each sorted by ``best_score`` descending; ``best_score``: (N,) each image's highest similarity to
    another image at or above the threshold (NaN when it has none); ``pairs``: the number of distinct
    pairs at or above the threshold.
    """

    groups: list[np.ndarray]
    best_score: np.ndarray
    pairs: int

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
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``i < j`` with cosine ``s_ij >= min(threshold, highest_cut(d))``: ``(i, j, s)`` arrays,
    each pair once.

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


def duplicate_groups(n: int, i: np.ndarray, j: np.ndarray, s: np.ndarray) -> DuplicateGroups:
    """The connected components (two or more members) of the graph on ``n`` images with edges ``(i, j)``
    of similarity ``s``, largest first, members by ``best_score`` descending."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    best = np.full(n, np.nan, dtype=np.float32)
    if len(i):
        filled = np.full(n, -np.inf, dtype=np.float32)
        np.maximum.at(filled, i, s.astype(np.float32))
        np.maximum.at(filled, j, s.astype(np.float32))
        best = np.where(np.isfinite(filled), filled, np.nan).astype(np.float32)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    groups: list[np.ndarray] = []
    if (sizes >= 2).any():  # vectorised: members of each component, sorted by component then by best score
        order = np.lexsort((-np.nan_to_num(best, nan=-2.0), component))
        ordered = component[order]
        starts = np.searchsorted(ordered, np.flatnonzero(sizes >= 2))
        groups = [order[a : a + sizes[ordered[a]]] for a in starts]
        groups.sort(key=lambda g: (-len(g), int(g.min())))
    return DuplicateGroups(groups=groups, best_score=best, pairs=len(i))


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
    best = np.asarray(s, dtype=np.float32).copy()
    if len(i) == 0 or len(rows) == 0:
        return best
    e = embeddings.detach().to("cpu", torch.float32).numpy()
    where = np.full(e.shape[0], -1, dtype=np.int64)
    where[rows] = np.arange(len(rows))
    for side, other in ((i, j), (j, i)):
        position = where[side]
        have = np.flatnonzero(position >= 0)
        for start in range(0, len(have), PAIR_CHUNK):
            chosen = have[start : start + PAIR_CHUNK]
            views = np.einsum("pzd,pd->pz", zoomed[position[chosen]], e[other[chosen]])
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
) -> DuplicateGroups:
    """Near-duplicate groups of ``embeddings`` at a cosine ``threshold``: :func:`similar_pairs`, then
    :func:`duplicate_groups`.

    With ``zoomed`` (image ids (M,) -> (M, Z, d) unit embeddings of their zoomed views, NaN rows for
    images it could not read), the pairs at or above ``min(candidates, threshold)`` are rescored by
    :func:`rescore_with_zooms` first (``zoomed`` is called on :data:`ZOOM_CHUNK` images at a time;
    ``announce`` first gets the number of candidate images), and those whose best score reaches
    ``threshold`` are kept.
    """
    threshold = check_threshold(threshold)
    if zoomed is None:
        i, j, s = similar_pairs(
            embeddings, threshold, faiss_index, nprobe=nprobe, ef_search=ef_search, progress=progress
        )
        return duplicate_groups(embeddings.shape[0], i, j, s)
    low = min(check_threshold(candidates), threshold)
    i, j, s = similar_pairs(embeddings, low, faiss_index, nprobe=nprobe, ef_search=ef_search, progress=progress)
    rows = np.unique(np.concatenate([i, j]))
    if announce is not None:
        announce(len(rows))
    best = s.astype(np.float32)
    for start in range(0, len(rows), ZOOM_CHUNK):  # views of ZOOM_CHUNK images at a time: bounded memory
        chunk = rows[start : start + ZOOM_CHUNK]
        best = rescore_with_zooms(i, j, best, embeddings, zoomed(chunk), chunk)
    keep = best >= min(threshold, highest_cut(embeddings.shape[1]))
    return duplicate_groups(embeddings.shape[0], i[keep], j[keep], best[keep])


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
            ax.set_title(head + "\n".join([*above, f"{score}{name}"]), fontsize=7)
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
