"""The near-duplicate threshold calibrated on the pile itself (``plmetric index`` records it; ``plmetric
duplicates`` uses it when ``--threshold`` is not given).

Two distributions are measured with the index's own model:

* **copies**: a seeded sample of the pile's images (:data:`DEFAULT_SAMPLE`), each copied with the edits
  that make duplicates in real piles (:data:`EDITS`), embedded with the index's transform; a copy's score
  is ``C = cos(original, copy)`` and its perceptual-hash distance ``d`` (:mod:`plmetric.retrieval.hashes`);
* **impostors**: each pile image's :data:`NEIGHBOURS` nearest *other* images, their cosines and the
  hash distances of those pairs (every image up to :data:`IMPOSTOR_ROWS` when the pile's hashes are
  given, else up to :data:`HASHED_ROWS` images, a seeded sample beyond, whose files are hashed). An
  image's impostor score ``I`` is its nearest other that the hash does not catch as its duplicate.

A false pair needs an image whose nearest non-duplicate scores above the threshold, so the per-image
false-pair rate is the upper tail of ``I`` and must be estimated on the pile's images, not on the copies'
sample: precision 0.95 with 15 true pairs among 315 images allows less than one false pair.

The rule (:func:`choose_threshold`, pure):

1. **Hash limit** ``h``. The hash rule pairs two images when ``cos >= HASH_MIN_COSINE`` and ``d <= h``.
   The distances of each image's 2nd to K-th nearest others (its look-alikes; the nearest left out, as
   the pair most likely to be a duplicate) have a body found robustly (median ``m``, ``1.4826 MAD``
   ``s``: a minority of duplicates does not move them, even in a pile where every image has a copy). An
   image meets about ``L`` look-alikes (the mean count of others at ``cos >= HASH_MIN_COSINE``, measured
   on the sample), so a per-image false rate of :data:`ALPHA` allows a per-pair rate ``ALPHA / L``:
   ``h_null = floor(m - z s)``, ``z = Φ⁻¹(1 - ALPHA / L)`` (a normal approximation of the distance's
   lower tail). ``h = min(h_null, h_copies)`` where ``h_copies`` is the 95th percentile of the copies'
   distances (no use reaching further than copies need), at most :data:`HASH_MAX`; ``-1`` turns the hash
   signal off. **Empirical guard** (:func:`closest_look_alike`): ``h`` also stays below the smallest
   distance seen between an image and its 3rd-K-th nearest others at ``cos >= HASH_MIN_COSINE``. The
   normal approximation pools a pile's image kinds: on the mixed pile of issue 29 (photos 16+ bits apart,
   tiny plankton images 2-6 bits apart) it allowed 6 bits, and 6 pairs of different plankton images lay
   within them (precision 0.70). The 3rd and later neighbours are look-alikes unless an image has three
   or more duplicates; a distance of 0 (the same 64-bit hash at a high cosine) is left out as a copy.
   The guard limits the pairs the hash makes; step 2 reads the pile's duplicates with the unguarded
   limit (a neighbour that close is more likely a copy than what sets the threshold), and measures the
   copies' share ``π`` with the same limit. Measured both ways on issue 29's six indexes: guarding step 2
   as well lowered the mixed pile's threshold (0.895 -> 0.879, two false pairs by the embedding).
2. **Contamination.** The pile's own duplicates sit at the top of the nearest others. A neighbour within
   the hash limit (``d <= h``, ``cos >= HASH_MIN_COSINE``) is explained as a duplicate (the hash rule
   pairs it anyway) and skipped: ``E`` such (image, neighbour) entries. The copies say which share ``π``
   of duplicates the hash catches (copies with ``d <= h``), so about ``E (1 - π) / π`` entries are
   duplicates it missed (crops, mostly). The top ``I`` values are tested as outliers of the impostors'
   upper tail: the tail above the ``(R+M+1)``-th value, with the top ``R`` left out, is modelled as
   exponential with scale ``σ`` (the mean excess of the next :data:`TAIL_POINTS` ``M`` values over it);
   the top ``R`` values are duplicates when the lowest of them looks like a copy (at or above the copies'
   10th percentile) and the expected number of impostors that high, ``M exp(-(s_R - u)/σ)``, is at most
   :data:`OUTLIER_LEVEL`, or at most :data:`MISSED_LEVEL` for ``R`` within the hash's misses (rounded
   down; only values at or above the 10th percentile of the missed copies' scores). The largest such
   ``R`` is taken. With no hash-caught duplicate only the strict test applies, so a pile of look-alikes
   keeps its precision; a continuous tail of look-alikes passes neither test.
3. **Threshold.** Of the rest (the impostors of the ``n`` images examined), ``k = floor(ALPHA n)`` may lie
   above the threshold (:data:`ALPHA`: with duplicates on at least 2 % of a pile's images, 0.1 % false
   images keeps precision near 0.95). ``t0 = s_(k+1) + σ ln(2N / n)``: the level the top impostor of a
   pile of 2N images reaches (the maximum of an exponential tail grows by ``σ ln 2`` when N doubles), so
   ``--add-to`` may double the pile before the calibration is stale. When every copy scores above ``t0``
   the threshold is the midpoint of ``t0`` and the lowest copy (the widest margin on both sides; recall
   1 on the sample); otherwise it is ``t0`` (precision wins over recall). It is kept in
   ``[HASH_MIN_COSINE, 1]``.

The expected false-pair rate is the exponential tail's ``(k+1)/n exp(-(t - s_(k+1))/σ)``; the expected
recall is per edit, the share of copies at or above ``t`` (and with the hash rule beside it).

Why these edits (:func:`edit_copy`): ``resize50`` (half of each side: thumbnails and re-posts, the
hardest for small images), ``jpeg30`` (re-encoded at quality 30: messaging apps and the web), ``crop85``
(the centre 85 % of each side: trimmed borders and screenshots; pooled CNN features are not scale
invariant), ``flip`` (mirrored re-posts), ``tone`` (brightness x1.2 and contrast x0.85: an auto-enhanced
or filtered copy). Every copy except ``jpeg30`` goes through JPEG quality 95, as a saved copy does. An
upscale is left out: it adds no detail, and scored like a plain re-save in docs/results.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from plmetric.core.options import CALIBRATION_EDITS as EDITS  # defined there without torch
from plmetric.core.options import CALIBRATION_MAX_SAMPLE as MAX_SAMPLE
from plmetric.core.options import CALIBRATION_SAMPLE as DEFAULT_SAMPLE
from plmetric.retrieval.hashes import HASH_BITS

CALIBRATION_KEY = "duplicates_calibration"
"""The index metadata field holding the calibration."""
DEFAULT_SEED = 0
ALPHA = 1e-3
"""Images whose nearest other may be a false pair above the threshold, as a share of the pile."""
TAIL_POINTS = 10
"""Order statistics the upper tail's exponential scale is estimated from."""
OUTLIER_LEVEL = 0.1
"""Expected impostors at or above a top value for it to be read as a duplicate of the pile."""
MISSED_LEVEL = 1.0
"""The same, for the top values that the hash's misses (``E (1 - π) / π``) may account for."""
HASH_MIN_COSINE = 0.70
"""The hash rule's floor: two images are paired by their hashes only at or above this cosine."""
NEIGHBOURS = 4
"""Nearest others examined per image: its nearest one not caught by the hash is its impostor (a pile's
duplicate groups rarely exceed this; an image whose all are caught is left out)."""
HASH_MAX = 10
"""The hash limit's ceiling (imagededup's default for 64-bit hashes). Above it lie the crops' distances
(12-22 bits on CUB and plankton copies), which the hash cannot tell from look-alikes, and the normal
approximation of the look-alikes' lower tail is too thin there: on the CUB subset 17 bits paired 25
different photos at cosine >= 0.70 where it predicted under one."""
HASHED_ROWS = 2048
"""Images examined (with their neighbours, hashed from the files) when the pile's hashes are not given."""
IMPOSTOR_ROWS = 20_000
"""Images examined when the pile's hashes are given (all N up to this many, else a seeded sample)."""


@dataclass(frozen=True)
class ThresholdChoice:
    """What :func:`choose_threshold` decides: the cosine ``threshold``, the ``hash_distance`` limit (-1:
    no hash signal), the expected ``recall`` per edit (embedding alone) and ``recall_with_hash`` (either
    signal), the expected ``false_pair_rate`` per image, and how many nearest pairs of the pile were read
    as its own duplicates (``explained_by_hash``, ``outliers``)."""

    threshold: float
    hash_distance: int
    recall: dict[str, float]
    recall_with_hash: dict[str, float]
    false_pair_rate: float
    explained_by_hash: int
    outliers: int


@dataclass(frozen=True)
class Calibration:
    """A recorded calibration: the choice and where it comes from (``sample`` copies' originals, ``seed``,
    the ``count`` of images it saw, the ``model`` identity (:func:`model_identity`), ``seconds``)."""

    threshold: float
    hash_distance: int
    recall: dict[str, float]
    recall_with_hash: dict[str, float]
    false_pair_rate: float
    sample: int
    seed: int
    count: int
    model: str
    seconds: float
    edits: tuple[str, ...] = field(default=EDITS)

    def record(self) -> dict[str, Any]:
        """The JSON object stored under :data:`CALIBRATION_KEY`."""
        return {
            "threshold": round(self.threshold, 6),
            "hash_distance": self.hash_distance,
            "recall": {k: round(v, 4) for k, v in self.recall.items()},
            "recall_with_hash": {k: round(v, 4) for k, v in self.recall_with_hash.items()},
            "false_pair_rate": float(f"{self.false_pair_rate:.4g}"),
            "sample": self.sample,
            "seed": self.seed,
            "count": self.count,
            "model": self.model,
            "seconds": round(self.seconds, 2),
            "edits": list(self.edits),
        }


# ------------------------------------------------------------------------------------------ the rule
def _normal_quantile(p: float) -> float:
    """Φ⁻¹(p) for 0 < p < 1 (:func:`statistics.NormalDist`)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(min(max(p, 1e-300), 1 - 1e-16))


def hash_limit(
    copy_hash: Mapping[str, np.ndarray], look_alike_hash: np.ndarray, look_alikes: float = 1.0, alpha: float = ALPHA
) -> int:
    """The hash rule's distance limit (step 1 of the module docstring); -1 when none is safe."""
    pooled = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in copy_hash.values()] or [np.empty(0)])
    body = np.asarray(look_alike_hash, dtype=np.float64).ravel()
    body = body[body >= 0]
    if pooled.size == 0 or body.size < 5:
        return -1  # too few look-alike pairs to know their spread
    median = float(np.median(body))
    spread = max(1.4826 * float(np.median(np.abs(body - median))), 1.0)  # at least a bit: distances are integers
    z = _normal_quantile(1.0 - alpha / max(1.0, float(look_alikes)))
    null = math.floor(median - z * spread)
    need = math.ceil(float(np.quantile(pooled, 0.95)))
    return int(max(-1, min(null, need, HASH_MAX)))


def closest_look_alike(nearest: np.ndarray, nearest_hash: np.ndarray) -> int:
    """The smallest hash distance (> 0) of an image and its 3rd-K-th nearest others at ``cos >=
    HASH_MIN_COSINE`` (65 when there is none): step 1's empirical guard. The hash limit stays below it."""
    beyond_hash, beyond_cos = nearest_hash[:, 2:], nearest[:, 2:]
    close = beyond_hash[(beyond_hash > 0) & (beyond_cos >= HASH_MIN_COSINE)]
    return int(close.min()) if close.size else HASH_BITS + 1


def _tail(values: np.ndarray, start: int, points: int) -> tuple[float, float]:
    """``(u, σ)``: the ``(start+m+1)``-th largest of ``values`` (sorted descending) and the mean excess
    over it of the ``m`` values from ``start`` (``m = min(points, len - start - 1)``); σ = 0 when m < 1."""
    m = min(points, len(values) - start - 1)
    if m < 1:
        return (float(values[start]) if start < len(values) else -1.0), 0.0
    u = float(values[start + m])
    return u, float(np.mean(values[start : start + m] - u))


def choose_threshold(
    copy_scores: Mapping[str, np.ndarray],
    copy_hash: Mapping[str, np.ndarray],
    nearest: np.ndarray,
    nearest_hash: np.ndarray,
    *,
    count: int | None = None,
    look_alikes: float = 1.0,
    alpha: float = ALPHA,
) -> ThresholdChoice:
    """The threshold and hash limit from the two distributions (the module docstring's rule).

    Args:
        copy_scores: per edit, the cosines of the sampled images with their copies.
        copy_hash: per edit, the copies' hash distances to their originals (same order).
        nearest: (n, K) each examined pile image's cosines with its K nearest other images, best first
            ((n,) for K = 1).
        nearest_hash: (n, K) the hash distances of those pairs, -1 where not measured.
        count: the pile's number of images N (default n: every image examined).
        look_alikes: the mean number of other images at ``cos >= HASH_MIN_COSINE`` per image.
        alpha: the per-image false-pair budget.
    """
    nearest = np.asarray(nearest, dtype=np.float64)
    nearest_hash = np.asarray(nearest_hash, dtype=np.int64)
    nearest = nearest.reshape(len(nearest), -1) if nearest.size else nearest.reshape(0, 1)
    nearest_hash = nearest_hash.reshape(nearest.shape[0], -1) if nearest_hash.size else nearest_hash.reshape(0, 1)
    if nearest.shape != nearest_hash.shape:
        raise ValueError(f"nearest scores of shape {nearest.shape} but hash distances of shape {nearest_hash.shape}")
    rows = max(1, nearest.shape[0])
    n = max(rows, int(count or rows))
    body = nearest_hash[:, 1:] if nearest_hash.shape[1] > 1 else nearest_hash  # beyond the nearest: few duplicates
    h_explain = hash_limit(copy_hash, body[body >= 0], look_alikes, alpha)  # what the hash calls a copy
    h = min(h_explain, closest_look_alike(nearest, nearest_hash) - 1)  # what it may pair (the guard)
    explained = (nearest_hash >= 0) & (nearest_hash <= h_explain) & (nearest >= HASH_MIN_COSINE)
    first = np.argmin(explained, axis=1)  # each row's nearest other not caught by the hash
    open_rows = ~explained.all(axis=1)
    rest = np.sort(nearest[np.flatnonzero(open_rows), first[open_rows]])[::-1]
    pooled = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in copy_scores.values()] or [np.empty(0)])
    pooled_hash = np.concatenate(
        [np.asarray(copy_hash.get(e, np.full(np.shape(v), 65)), dtype=np.int64).ravel() for e, v in copy_scores.items()]
        or [np.empty(0, np.int64)]
    )
    missed = _unexplained_duplicates(int(explained.sum()), rest, pooled, pooled_hash, h_explain)
    outliers = max(
        _duplicate_outliers(rest, pooled, OUTLIER_LEVEL),
        _duplicate_outliers(rest, pooled, MISSED_LEVEL, missed),  # the hash's misses: weaker evidence suffices
    )
    impostors = rest[outliers:]
    k = int(math.floor(alpha * rows))
    if k < len(impostors):
        top = float(impostors[k])
        _, scale = _tail(impostors, k, TAIL_POINTS)
        reach = top + scale * math.log(2.0 * n / rows)  # the top of a pile of 2N from n examined images
        t0 = float(np.nextafter(np.float32(reach), np.float32(2.0)))  # strictly above
    else:
        top, scale, t0 = HASH_MIN_COSINE, 0.0, HASH_MIN_COSINE
    threshold = (t0 + float(pooled.min())) / 2 if pooled.size and pooled.min() > t0 else t0
    threshold = float(min(max(threshold, HASH_MIN_COSINE), 1.0))
    if k < len(impostors) and scale > 0:
        rate = (k + 1) / rows * math.exp(-(threshold - top) / scale)
    else:
        rate = float((impostors >= threshold).sum()) / rows
    recall, with_hash = {}, {}
    for edit, scores in copy_scores.items():
        scores = np.asarray(scores, dtype=np.float64).ravel()
        distances = np.asarray(copy_hash.get(edit, np.full(scores.shape, 65)), dtype=np.int64).ravel()
        found = scores >= threshold
        recall[edit] = float(found.mean()) if scores.size else float("nan")
        by_hash = found | ((distances <= h) & (scores >= HASH_MIN_COSINE))
        with_hash[edit] = float(by_hash.mean()) if scores.size else float("nan")
    return ThresholdChoice(
        threshold=threshold,
        hash_distance=h,
        recall=recall,
        recall_with_hash=with_hash,
        false_pair_rate=float(rate),
        explained_by_hash=int(explained.sum()),
        outliers=outliers,
    )


def _unexplained_duplicates(
    explained: int, values: np.ndarray, copies: np.ndarray, copy_hash: np.ndarray, limit: int
) -> int:
    """How many of the top ``values`` (sorted descending) are the pile's duplicates that the hash missed
    (step 2): the copies tell which share ``π`` of duplicates the hash rule catches, so ``explained``
    caught images stand for ``explained (1 - π) / π`` missed ones (rounded down); they are taken from the
    top, among the values at or above the 10th percentile of the missed copies' scores (where such
    duplicates lie). No caught duplicate: none is assumed (a pile of look-alikes keeps its precision)."""
    if explained == 0 or copies.size == 0 or limit < 0:
        return 0
    caught = (copy_hash <= limit) & (copies >= HASH_MIN_COSINE)
    share = float(caught.mean())
    if share <= 0.0 or caught.all():
        return 0
    missed = int(math.floor(explained * (1.0 - share) / share))
    low = float(np.quantile(copies[~caught], 0.10))
    return min(missed, int((values >= low).sum()))


def _duplicate_outliers(values: np.ndarray, copies: np.ndarray, level: float, most: int | None = None) -> int:
    """How many of the top ``values`` (sorted descending) are the pile's own duplicates (step 2): the
    largest R (at most ``most``) whose lowest value looks like a copy (at or above the copies' 10th
    percentile) and lies where the exponential tail of the values below expects at most ``level``
    impostors."""
    if copies.size == 0 or len(values) < TAIL_POINTS + 2:
        return 0
    like_copy = float(np.quantile(copies, 0.10))
    limit = min(int((values >= like_copy).sum()), len(values) // 4, len(values) - TAIL_POINTS - 1)
    limit = limit if most is None else min(limit, most)
    r = np.arange(1, limit + 1)
    if r.size == 0:
        return 0
    m = TAIL_POINTS
    u = values[r + m]
    csum = np.concatenate([[0.0], np.cumsum(values)])
    scale = (csum[r + m] - csum[r]) / m - u
    lowest = values[r - 1]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        expected = np.where(scale > 0, m * np.exp(-(lowest - u) / np.where(scale > 0, scale, 1.0)), np.inf)
    passing = np.flatnonzero((lowest >= like_copy) & (expected <= level))
    return int(r[passing].max()) if passing.size else 0


# ----------------------------------------------------------------------------------------- the copies
def edit_copy(image: Any, edit: str) -> Any:
    """The copy of a PIL RGB image made by ``edit`` (:data:`EDITS`; see the module docstring), decoded
    back from the JPEG bytes a saved copy would hold."""
    from PIL import Image, ImageEnhance, ImageOps

    width, height = image.size
    quality = 95
    if edit == "resize50":
        image = image.resize((max(1, round(width / 2)), max(1, round(height / 2))), Image.LANCZOS)
    elif edit == "jpeg30":
        quality = 30
    elif edit == "crop85":
        from plmetric.retrieval.duplicates import zoom_crop

        image = zoom_crop(image, 0.85)
    elif edit == "flip":
        image = ImageOps.mirror(image)
    elif edit == "tone":
        image = ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(1.2)).enhance(0.85)
    else:
        raise ValueError(f"unknown copy edit {edit!r}; expected one of {', '.join(EDITS)}")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


class CopyViews:
    """A transform: an image -> ``(stack of transform(copy) per edit, (1 + E, 16) uint8 hashes of the
    image and of each copy)``."""

    def __init__(self, transform: Callable[[Any], torch.Tensor], edits: tuple[str, ...] = EDITS) -> None:
        self.transform = transform
        self.edits = edits

    def __call__(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from plmetric.retrieval.hashes import perceptual_hashes

        copies = [edit_copy(image, edit) for edit in self.edits]
        views = torch.stack([self.transform(c) for c in copies])
        hashes = np.stack([perceptual_hashes(image)] + [perceptual_hashes(c) for c in copies])
        return views, torch.from_numpy(hashes)


class _HashOnly:
    """A transform: an image -> its (16,) perceptual hashes as a tensor."""

    def __call__(self, image: Any) -> torch.Tensor:
        from plmetric.retrieval.hashes import perceptual_hashes

        return torch.from_numpy(perceptual_hashes(image))


def _loader(paths: list[str], transform: Any, batch_size: int, num_workers: int) -> Any:
    from plmetric.data.datasets import ImageDataset, collate_skip_none

    dataset = ImageDataset(paths, None, transform, "calibration")
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_skip_none
    )


def embed_copies(
    paths: list[str],
    embed: Callable[[torch.Tensor], torch.Tensor],
    transform: Callable[[Any], torch.Tensor],
    *,
    edits: tuple[str, ...] = EDITS,
    batch_size: int = 16,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embed each image's copies: ``(rows read (M,), unit embeddings (M, E, d), hashes (M, 1 + E, 16))``;
    ``embed`` maps a batch of transformed images to embeddings. Unreadable files are left out."""
    rows, embedded, hashes = [], [], []
    for batch in _loader(paths, CopyViews(transform, edits), batch_size, num_workers):
        if batch is None:
            continue
        (views, batch_hashes), _, index = batch
        flat = embed(views.flatten(0, 1)).float().cpu()
        embedded.append(torch.nn.functional.normalize(flat, dim=1).reshape(len(index), len(edits), -1).numpy())
        hashes.append(batch_hashes.numpy())
        rows.append(index.numpy())
    if not rows:
        empty = np.empty((0, 1 + len(edits), 16), np.uint8)
        return np.empty(0, np.int64), np.empty((0, len(edits), 0), np.float32), empty
    return np.concatenate(rows), np.concatenate(embedded), np.concatenate(hashes)


def hashes_of(paths: list[str], *, batch_size: int = 64, num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes (len(paths), 16) uint8, known (len(paths),) bool)``: each file's perceptual hashes, and
    whether it could be read (an unreadable file's row is zeros and not known)."""
    out = np.zeros((len(paths), 16), dtype=np.uint8)
    known = np.zeros(len(paths), dtype=bool)
    for batch in _loader(paths, _HashOnly(), batch_size, num_workers):
        if batch is None:
            continue
        values, _, index = batch
        out[index.numpy()] = values.numpy()
        known[index.numpy()] = True
    return out, known


# ------------------------------------------------------------------------------------- the whole pass
def model_identity(description: Mapping[str, Any]) -> str:
    """A short identity of the index's model: SHA-256 of its checkpoint (or backbone, weights file
    hash) and the image size, so a trained checkpoint's index has its own calibration."""
    keys = ("checkpoint_sha256", "backbone", "weights_sha256", "image_size", "embedding_dim")
    text = json.dumps({k: description.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sample_rows(n: int, sample: int, seed: int) -> np.ndarray:
    """``min(n, sample)`` distinct rows of ``n``, seeded, ascending."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n)[: min(n, sample)])


def estimated_seconds(sample: int, n: int, images_per_second: float, edits: int = len(EDITS)) -> float:
    """Forward passes of the copies (``sample x edits`` images) at the index's own rate, plus the hashes
    (decoding an image again: about a tenth of its embedding)."""
    hashed = min(n, (NEIGHBOURS + 1) * HASHED_ROWS)
    return (sample * edits + 0.1 * hashed) / max(images_per_second, 1e-3)


def calibrate(
    embeddings: torch.Tensor,
    paths: list[str],
    embed: Callable[[torch.Tensor], torch.Tensor],
    transform: Callable[[Any], torch.Tensor],
    description: Mapping[str, Any],
    *,
    sample: int = DEFAULT_SAMPLE,
    seed: int = DEFAULT_SEED,
    hashes: np.ndarray | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
) -> Calibration:
    """Calibrate the duplicates threshold of a pile (module docstring): ``embeddings`` (N, d) unit rows of
    ``paths``; ``embed`` and ``transform`` the index's model and input transform; ``hashes`` the pile's
    (N, 16) perceptual hashes when recorded (else the images of the highest nearest pairs are hashed).

    Raises:
        ValueError: fewer than two images, or no sampled image could be read.
    """
    from plmetric.retrieval.hashes import hash_distances
    from plmetric.retrieval.neighbours import nearest_others

    started = time.perf_counter()
    x = torch.nn.functional.normalize(embeddings.detach().to("cpu", torch.float32), dim=1)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"calibration needs at least 2 images, got {n}")
    chosen = sample_rows(n, sample, seed)
    readable = [int(r) for r in chosen if not paths[int(r)].startswith("item:")]
    found, copies, copy_hashes = embed_copies(
        [paths[r] for r in readable], embed, transform, batch_size=batch_size, num_workers=num_workers
    )
    if found.size == 0:
        raise ValueError("calibration: none of the sampled images could be read again")
    rows = np.asarray(readable)[found]
    originals = x[torch.from_numpy(rows)].numpy()
    scores = np.einsum("med,md->me", copies, originals)
    copy_scores = {edit: scores[:, e] for e, edit in enumerate(EDITS)}
    copy_hash = {
        edit: hash_distances(copy_hashes[:, 0], copy_hashes[:, 1 + e]) for e, edit in enumerate(EDITS)
    }
    examined = n if hashes is not None else min(n, HASHED_ROWS)  # without recorded hashes: decode a bounded few
    examined = min(examined, IMPOSTOR_ROWS)
    queries = np.arange(n) if examined == n else sample_rows(n, examined, seed)
    near_scores, near_ids = nearest_others(x, NEIGHBOURS, rows=torch.from_numpy(queries), what="calibration")
    near_scores, near_ids = near_scores.numpy(), near_ids.numpy()
    if hashes is None:
        needed = np.unique(np.concatenate([queries, near_ids.ravel()]))
        pile_hashes = np.zeros((n, 16), dtype=np.uint8)
        known = np.zeros(n, dtype=bool)
        files = needed[[not paths[int(i)].startswith("item:") for i in needed]]
        pile_hashes[files], known[files] = hashes_of([paths[int(i)] for i in files], num_workers=num_workers)
    else:
        pile_hashes, known = np.asarray(hashes, dtype=np.uint8), np.ones(n, dtype=bool)
    a = np.repeat(queries, near_ids.shape[1])
    b = near_ids.ravel()
    near_hash = np.where(known[a] & known[b], hash_distances(pile_hashes[a], pile_hashes[b]), -1)
    near_hash = near_hash.reshape(near_ids.shape)
    look_alikes = float(((torch.from_numpy(originals) @ x.T) >= HASH_MIN_COSINE).sum(1).float().mean()) - 1.0
    choice = choose_threshold(
        copy_scores, copy_hash, near_scores, near_hash, count=n, look_alikes=max(1.0, look_alikes)
    )
    return Calibration(
        threshold=choice.threshold,
        hash_distance=choice.hash_distance,
        recall=choice.recall,
        recall_with_hash=choice.recall_with_hash,
        false_pair_rate=choice.false_pair_rate,
        sample=int(len(rows)),
        seed=int(seed),
        count=int(n),
        model=model_identity(description),
        seconds=time.perf_counter() - started,
    )


# ----------------------------------------------------------------------------------- the recorded one
def _number(record: Mapping[str, Any], key: str, low: float, high: float, integer: bool = False) -> Any:
    value = record.get(key)
    kind_ok = type(value) is int if integer else (type(value) in (int, float))
    if not kind_ok or not (low <= value <= high):  # NaN fails the comparison
        expected = "an integer" if integer else "a number"
        raise ValueError(f"{key} {str(value)[:40]!r}: expected {expected} in [{low:g}, {high:g}]")
    return value


def recorded_calibration(meta: Mapping[str, Any], where: str = "index") -> Calibration | None:
    """The calibration an index's metadata records, every field checked; None when it records none.

    Raises:
        ValueError: one line naming ``where``, the field and what was expected (forged or damaged
            metadata, or a calibration of another model than the index's).
    """
    record = meta.get(CALIBRATION_KEY)
    if record is None:
        return None
    try:
        if not isinstance(record, dict):
            raise ValueError("expected a JSON object")
        edits = record.get("edits")
        if not isinstance(edits, list) or not edits or len(edits) > len(EDITS) or not set(edits) <= set(EDITS):
            raise ValueError(f"edits: expected a list of {', '.join(EDITS)}")
        recalls = {}
        for key in ("recall", "recall_with_hash"):
            values = record.get(key)
            if not isinstance(values, dict) or set(values) != set(edits):
                raise ValueError(f"{key}: expected one share per edit")
            recalls[key] = {edit: float(_number(values, edit, 0.0, 1.0)) for edit in edits}
        model = record.get("model")
        if not isinstance(model, str) or len(model) != 16 or any(c not in "0123456789abcdef" for c in model):
            raise ValueError("model: expected 16 hex digits")
        description = meta.get("model") if isinstance(meta.get("model"), dict) else {}
        if model != model_identity(description):
            raise ValueError("model: made with another model than the index's (re-index to calibrate)")
        count = meta.get("count") if type(meta.get("count")) is int else 10**12
        calibration = Calibration(
            threshold=float(_number(record, "threshold", HASH_MIN_COSINE, 1.0)),
            hash_distance=int(_number(record, "hash_distance", -1, 64, integer=True)),
            recall=recalls["recall"],
            recall_with_hash=recalls["recall_with_hash"],
            false_pair_rate=float(_number(record, "false_pair_rate", 0.0, 1.0)),
            sample=int(_number(record, "sample", 1, MAX_SAMPLE, integer=True)),
            seed=int(_number(record, "seed", 0, 2**32 - 1, integer=True)),
            count=int(_number(record, "count", 2, max(2, count), integer=True)),
            model=model,
            seconds=float(_number(record, "seconds", 0.0, 1e7)),
            edits=tuple(edits),
        )
    except ValueError as err:
        raise ValueError(f"{where}: its '{CALIBRATION_KEY}' metadata is invalid: {err}") from None
    return calibration


def describe(calibration: Calibration | ThresholdChoice) -> str:
    """One line: the threshold, the expected recall per edit and the false-pair rate."""
    recalls = ", ".join(f"{k} {v:.2f}" for k, v in calibration.recall.items())
    hashed = (
        f"; hash distance <= {calibration.hash_distance} at cosine >= {HASH_MIN_COSINE:g} "
        f"(with it: {', '.join(f'{k} {v:.2f}' for k, v in calibration.recall_with_hash.items())})"
        if calibration.hash_distance >= 0
        else "; no hash limit is safe on this pile"
    )
    return (
        f"threshold {calibration.threshold:.3f}: expected recall {recalls}; false pairs per image "
        f"{calibration.false_pair_rate:.2g}{hashed}"
    )
