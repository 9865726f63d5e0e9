"""Near-duplicates, judged: planted copies over real images, ``plmetric`` pairs against imagededup's hashes.

Per data set (``--dataset``, repeatable: ``cub200`` = the CUB subset's ``images/`` folder, ``plankton106``
= its labelled folder, ``mixed`` = issue 29's pile, :func:`common.mixed_pile`: 20 CUB species and 10
plankton classes x 10 photos, of which ``--copied`` (15) get one copy each, ``resize50``, ``jpeg``
(quality 30), ``crop`` (the centre 85 % of each side), ``flip`` dealt evenly; under ``--data-root``, else
``$PLMETRIC_DATA`` or ``../shared/data``):

1. ``--originals`` images (300), taken round-robin over the classes (class order and files within a
   class shuffled with ``--seed``), are copied byte for byte into one flat folder (a temporary one, or
   ``--work-dir``; never the repository).
2. Each original gets one planted copy, the kinds dealt evenly over a seeded permutation; a
   ``--second-share`` (20 %) of them gets a second copy of another kind. Kinds (Pillow, LANCZOS):
   ``resize50`` (half of each side), ``resize256`` (shorter side to 256 px: an upscale for both sets),
   ``jpeg`` (re-encoded at quality 20-30), ``crop`` (a random window keeping 80-90 % of each side),
   ``flip`` (mirrored), ``bright`` (``ImageEnhance.Brightness`` 0.7 or 1.3). Copies other than ``jpeg``
   are saved as JPEG quality 95 (both sets' originals are JPEGs).
3. Ground truth: every pair of files with the same original: (original, copy), whose kind is the
   copy's, and (copy, copy) of one original (``copy-copy``). A found pair of two *originals* is a
   **pre-existing near-duplicate** of the data set, not a planted one: it is counted and listed, and
   precision is given both ways: ``precision`` counts it (and every echo of it: a pair whose two
   sources form such a found pair of originals) as false, ``precision_excl`` leaves those pairs out.
4. plmetric: ``python -m plmetric.cli index FOLDER --out X.safetensors`` (pretrained EfficientNet-Lite0
   pooled features, L2-normalised; the command's wall time is its cost), then
   :func:`plmetric.retrieval.duplicates.similar_pairs` at the lowest threshold of the grid
   (``--grid``), whose pairs at each higher threshold are a filter; the curve over the grid, and the
   point at the library's ``DEFAULT_THRESHOLD``. :func:`find_duplicates` at that threshold is timed too.
5. imagededup (``pip install imagededup``: a benchmark-only tool, never a dependency): PHash, DHash,
   WHash and AHash, ``encode_images`` then ``find_duplicates`` at its default Hamming distance 10
   (timed), and a sweep 0..32 over the same hashes (pairwise Hamming in NumPy, checked against
   ``find_duplicates`` at 10): the sweep's best F1 is an **oracle** (chosen with the ground truth).

Threshold rule: a threshold *meets the target* when every target kind (``resize50``, ``resize256``,
``jpeg``, ``crop``) has recall >= 0.95 and the strict precision is >= 0.95 (strict, because the pairs of
originals found near the candidate thresholds were inspected: different photos of one species, not
duplicates; the ranges with ``precision_excl`` are reported beside). With several data sets, the
proposed default is the middle of the intersection of their ranges (rounded to the grid); without an
intersection, the threshold that maximises the smallest F1 over the data sets.

Calibrated rows: ``plmetric index`` calibrates the threshold on the pile itself and records it
(:mod:`plmetric.retrieval.calibration`); ``plmetric duplicates`` without ``--threshold`` uses it. The row
``calibrated`` scores the pairs at that threshold (what a user gets without choosing one); ``calibrated +
hash`` adds the pairs within the recorded perceptual-hash distance at cosine >= 0.70 (the hash rule).
With ``--checkpoint`` the index is the trained model's, with its own calibration.

Exploratory row: plmetric's pairs at the proposed default united with PHash's at Hamming distance
<= ``UNION_DISTANCE`` (what a combined detector would find; the distance is fixed, not tuned here).

    python benchmarks/duplicates.py --dataset cub200 --dataset plankton106
    python benchmarks/duplicates.py --dataset plankton106 --originals 100 --no-json
    python benchmarks/duplicates.py --dataset mixed --copied 30
    python benchmarks/duplicates.py --checkpoint RUN/selected.safetensors --json-dir /tmp/trained

Times depend on the machine and its load: ``--machine-note`` goes into the JSON (the default says the
cores were shared with other jobs).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS, REPO_ROOT, dataset_root, mixed_pile  # noqa: E402

from plmetric.core.checkpoint import atomic_write_json  # noqa: E402
from plmetric.data.images import open_image  # noqa: E402
from plmetric.retrieval.duplicates import (  # noqa: E402
    CANDIDATES,
    DEFAULT_THRESHOLD,
    embed_zoomed,
    find_duplicates,
    rescore_with_zooms,
    similar_pairs,
)
from plmetric.retrieval.index import load_embeddings  # noqa: E402

PLANTED = ("cub200", "plankton106", "mixed")
KINDS = ("resize50", "resize256", "jpeg", "crop", "flip", "bright")
MIXED_KINDS = ("resize50", "jpeg", "crop", "flip")
"""The copies planted in the mixed pile (issue 29: half size, JPEG q30, 85 % crop, mirror)."""
MIXED_COPIED = 15
TARGET_KINDS = ("resize50", "resize256", "jpeg", "crop")
PAIR_KINDS = (*KINDS, "copy-copy")
HASHES = ("PHash", "DHash", "WHash", "AHash")
HASH_DEFAULT = 10
HASH_SWEEP = range(0, 33)
UNION_DISTANCE = 4
TARGET = 0.95
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
DEFAULT_NOTE = "shared machine: other jobs ran on the same 2 CPU cores; times are pessimistic and noisy"


# ---------------------------------------------------------------------------------------------- data
def source_images(dataset: str, root: Path) -> list[tuple[Path, str]]:
    """Every image of the set with its class folder name (CUB: ``CUB_200_2011/images/<class>/``)."""
    folder = root / "CUB_200_2011" / "images" if dataset == "cub200" else root
    items = [(p, p.parent.name) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not items:
        raise FileNotFoundError(f"no images under {folder}")
    return sorted(items)


def pick_originals(items: list[tuple[Path, str]], count: int, rng: np.random.Generator) -> list[Path]:
    """``count`` images, classes taken round-robin (class order and files within a class shuffled)."""
    by_class: dict[str, list[Path]] = {}
    for path, label in items:
        by_class.setdefault(label, []).append(path)
    classes = sorted(by_class)
    shuffled = [classes[k] for k in rng.permutation(len(classes))]
    queues = [[by_class[c][k] for k in rng.permutation(len(by_class[c]))] for c in shuffled]
    chosen: list[Path] = []
    depth = 0
    while len(chosen) < count and any(depth < len(q) for q in queues):
        chosen += [q[depth] for q in queues if depth < len(q)][: count - len(chosen)]
        depth += 1
    return chosen


def make_copy(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """The planted copy of ``kind`` and its parameters (the JPEG quality is applied when saving)."""
    w, h = image.size
    if kind == "resize50":
        size = (max(1, round(w / 2)), max(1, round(h / 2)))
        return image.resize(size, Image.LANCZOS), {"size": size}
    if kind == "resize256":
        scale = 256 / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return image.resize(size, Image.LANCZOS), {"size": size}
    if kind == "jpeg":
        return image, {"quality": int(rng.integers(20, 31))}
    if kind == "crop":
        fw, fh = rng.uniform(0.8, 0.9, size=2)
        cw, ch = max(1, round(w * fw)), max(1, round(h * fh))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return image.crop((x0, y0, x0 + cw, y0 + ch)), {"box": (x0, y0, x0 + cw, y0 + ch)}
    if kind == "flip":
        return ImageOps.mirror(image), {}
    if kind == "bright":
        factor = float(rng.choice([0.7, 1.3]))
        return ImageEnhance.Brightness(image).enhance(factor), {"factor": factor}
    raise ValueError(f"unknown copy kind {kind}")


def mixed_copy(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """The mixed pile's copies (issue 29): JPEG quality 30, a centred window keeping 85 % of each side,
    the other kinds as :func:`make_copy`."""
    if kind == "jpeg":
        return image, {"quality": 30}
    if kind == "crop":
        w, h = image.size
        cw, ch = max(1, round(0.85 * w)), max(1, round(0.85 * h))
        box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
        return image.crop(box), {"box": box}
    return make_copy(image, kind, rng)


def plant(
    originals: list[Path],
    folder: Path,
    rng: np.random.Generator,
    second_share: float,
    kinds: tuple[str, ...] = KINDS,
    copied: int | None = None,
    exact: bool = False,
) -> list[dict]:
    """Write the originals and their copies into ``folder``; return one record per file
    (``name``, ``source``: the original's number, ``kind``: ``original`` or the copy's, ``params``).
    ``copied``: how many originals (a seeded choice) get copies (default: all), the ``kinds`` dealt evenly;
    ``exact``: the mixed pile's fixed copies (:func:`mixed_copy`)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(originals)
    first = np.full(n, -1, dtype=np.int64)
    chosen = rng.permutation(n)[: n if copied is None else min(copied, n)]
    first[chosen] = [KINDS.index(kinds[k % len(kinds)]) for k in range(len(chosen))]  # kinds dealt evenly
    second: dict[int, int] = {}
    for o in rng.permutation(chosen)[: round(second_share * len(chosen))]:
        others = [KINDS.index(k) for k in kinds if KINDS.index(k) != first[o]]
        second[int(o)] = int(others[int(rng.integers(len(others)))])  # another kind
    files: list[dict] = []
    for o, path in enumerate(originals):
        name = f"o{o:04d}{path.suffix.lower()}"
        shutil.copyfile(path, folder / name)
        files.append({"name": name, "source": o, "kind": "original", "params": {"from": str(path)}})
        image = open_image(path)
        for k in ([first[o]] if first[o] >= 0 else []) + ([second[o]] if o in second else []):
            kind = KINDS[k]
            copy, params = (mixed_copy if exact else make_copy)(image, kind, rng)
            copy_name = f"c{o:04d}_{kind}.jpg"
            copy.save(folder / copy_name, "JPEG", quality=params.get("quality", 95))
            files.append({"name": copy_name, "source": o, "kind": kind, "params": params})
    return files


# ---------------------------------------------------------------------------------------- scoring
class Truth:
    """Ground truth over the files of one folder, numbered as ``names``."""

    def __init__(self, files: list[dict], names: list[str]):
        by_name = {f["name"]: f for f in files}
        self.names = names
        self.source = np.array([by_name[n]["source"] for n in names])
        self.kind = np.array([by_name[n]["kind"] for n in names])
        self.is_original = self.kind == "original"
        same = self.source[:, None] == self.source[None, :]
        i, j = np.nonzero(np.triu(same, 1))
        self.total = {kind: int((self.pair_kind(i, j) == kind).sum()) for kind in PAIR_KINDS}
        self.total_all = len(i)

    def pair_kind(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """The kind of true pairs ``(i, j)``: the copy's kind beside an original, else ``copy-copy``."""
        return np.where(self.is_original[i], self.kind[j], np.where(self.is_original[j], self.kind[i], "copy-copy"))

    def score(self, i: np.ndarray, j: np.ndarray) -> dict:
        """Precision (both ways), recall per kind and overall, F1 of the found pairs ``(i, j)``."""
        true = self.source[i] == self.source[j]
        orig_pair = ~true & self.is_original[i] & self.is_original[j]
        n = len(self.source)
        a, b = self.source[i], self.source[j]
        key = np.minimum(a, b) * n + np.maximum(a, b)  # the pair of sources, unordered
        related = ~true & np.isin(key, key[orig_pair])  # a found pair of originals, or an echo of one
        found, tp = len(i), int(true.sum())
        kinds = self.pair_kind(i[true], j[true])
        recall = {k: (int((kinds == k).sum()) / self.total[k]) if self.total[k] else None for k in PAIR_KINDS}
        target_tp = sum(int((kinds == k).sum()) for k in TARGET_KINDS)
        out = {
            "found": found,
            "true": tp,
            "false": found - tp,
            "preexisting_pairs": int(orig_pair.sum()),
            "preexisting_related": int(related.sum()),
            "precision": tp / found if found else 1.0,
            "precision_excl": tp / (found - int(related.sum())) if found > int(related.sum()) else 1.0,
            "recall": recall,
            "recall_all": tp / self.total_all,
            "recall_target": target_tp / sum(self.total[k] for k in TARGET_KINDS),
        }
        out["f1"] = f1(out["precision"], out["recall_all"])
        out["f1_excl"] = f1(out["precision_excl"], out["recall_all"])
        return out


def f1(precision: float, recall: float) -> float:
    """``2 P R / (P + R)`` (0 when both are 0)."""
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def meets_target(point: dict, precision: str = "precision") -> bool:
    """Recall >= 0.95 for every target kind at ``precision`` (strict, or ``precision_excl``) >= 0.95."""
    return point[precision] >= TARGET and all(
        point["recall"][k] is None or point["recall"][k] >= TARGET for k in TARGET_KINDS
    )


# ----------------------------------------------------------------------------------------- methods
def run_plmetric(folder: Path, work: Path, truth_files: list[dict], grid: np.ndarray, args: argparse.Namespace) -> dict:
    """Index the folder with the CLI, then score ``similar_pairs`` over the grid."""
    index = work / f"{folder.name}.safetensors"
    command = [sys.executable, "-m", "plmetric.cli", "index", str(folder), "--out", str(index)]
    command += ["--num-workers", str(args.index_workers), "--device", args.device, "--no-progress"]
    if args.checkpoint:  # a trained model instead of the pretrained start
        command += ["--checkpoint", str(Path(args.checkpoint).resolve())]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr.strip()}")
    index_seconds = time.perf_counter() - start
    embeddings, _, paths, model = load_embeddings(index)
    names = [Path(p).name for p in paths]
    truth = Truth(truth_files, names)
    start = time.perf_counter()
    i, j, s = similar_pairs(embeddings, float(grid.min()))
    pairs_seconds = time.perf_counter() - start
    start = time.perf_counter()
    groups = find_duplicates(embeddings, DEFAULT_THRESHOLD)
    groups_seconds = time.perf_counter() - start
    curve = []
    for t in grid:
        keep = s >= t
        curve.append({"threshold": float(t), **truth.score(i[keep], j[keep])})
    at_default = truth.score(*(x[s >= DEFAULT_THRESHOLD] for x in (i, j)))
    crops = check_crops(index, embeddings, paths, model, truth, (i, j, s), grid, args) if args.check_crops else None
    calibrated = score_calibrated(index, paths, truth, (i, j, s), float(grid.min()))
    original_pairs = truth.is_original[i] & truth.is_original[j] & (truth.source[i] != truth.source[j])
    order = np.argsort(-s[original_pairs])
    preexisting = [
        {"a": source_of(truth_files, truth, a), "b": source_of(truth_files, truth, b), "cosine": round(float(c), 4)}
        for a, b, c in zip(i[original_pairs][order], j[original_pairs][order], s[original_pairs][order], strict=True)
    ][:20]
    return {
        "command": " ".join(["plmetric", *command[3:]]).replace(str(work), "WORK"),
        "model": {k: model.get(k) for k in ("backbone", "embedding_dim", "dim", "image_size") if k in model},
        "count": len(names),
        "truth": truth,
        "index_seconds": index_seconds,
        "pairs_seconds": pairs_seconds,
        "pairs_threshold": float(grid.min()),
        "find_duplicates_seconds": groups_seconds,
        "groups_at_default": {"groups": len(groups.groups), "members": groups.members, "pairs": groups.pairs},
        "curve": curve,
        "at_default": at_default,
        "preexisting_at_grid_min": preexisting,
        "scores": (i, j, s),
        "check_crops": crops,
        "calibrated": calibrated,
    }


def score_calibrated(index: Path, paths: list[str], truth: Truth, pairs, low: float) -> dict | None:
    """``plmetric duplicates`` without ``--threshold``: the threshold ``plmetric index`` calibrated and
    recorded; beside it the hash rule with the recorded limit (a pair is a duplicate when its cosine
    reaches the threshold, or its perceptual-hash distance is within the limit at cosine >= 0.70)."""
    from plmetric.retrieval.calibration import HASH_MIN_COSINE, recorded_calibration
    from plmetric.retrieval.hashes import hash_distances, perceptual_hashes
    from plmetric.retrieval.index import read_index_metadata

    recorded = recorded_calibration(read_index_metadata(index) or {}, str(index))
    if recorded is None:
        return None
    if recorded.threshold < low:
        raise SystemExit(f"the calibrated threshold {recorded.threshold} is below --grid's minimum {low}")
    i, j, s = pairs
    at = truth.score(i[s >= recorded.threshold], j[s >= recorded.threshold])
    hashes = np.stack([perceptual_hashes(open_image(p)) for p in paths])
    d = hash_distances(hashes[i], hashes[j])
    both = (s >= recorded.threshold) | ((d <= recorded.hash_distance) & (s >= HASH_MIN_COSINE))
    return {
        "calibration": recorded.record(),
        "at_threshold": {"threshold": recorded.threshold, **at},
        "with_hash": {
            "threshold": recorded.threshold,
            "hash_distance": recorded.hash_distance,
            **truth.score(i[both], j[both]),
        },
        "seconds": recorded.seconds,
    }


def check_crops(index: Path, embeddings, paths, model, truth, pairs, grid: np.ndarray, args) -> dict:
    """``plmetric duplicates --check-crops``: the pairs at or above ``CANDIDATES`` rescored by the best of
    their plain and zoomed views (:func:`rescore_with_zooms`), scored over the grid."""
    from plmetric.data.backbones import build_transform
    from plmetric.retrieval.index import model_from_description

    i, j, s = pairs
    low = max(CANDIDATES, float(grid.min()))
    keep = s >= low
    i, j, s = i[keep], j[keep], s[keep]
    rows = np.unique(np.concatenate([i, j]))
    net = model_from_description(model, index).eval()
    transform = build_transform(model["backbone"], image_size=int(model.get("image_size", 224)))
    start = time.perf_counter()
    views = embed_zoomed([paths[r] for r in rows], net, transform, num_workers=args.index_workers)
    seconds = time.perf_counter() - start
    best = rescore_with_zooms(i, j, s, embeddings, views, rows)
    curve = [{"threshold": float(t), **truth.score(i[best >= t], j[best >= t])} for t in grid if t >= low]
    at_default = truth.score(i[best >= DEFAULT_THRESHOLD], j[best >= DEFAULT_THRESHOLD])
    return {
        "candidates": low,
        "candidate_pairs": int(len(i)),
        "candidate_images": int(len(rows)),
        "zoom_seconds": seconds,
        "curve": curve,
        "at_default": at_default,
    }


def source_of(files: list[dict], truth: Truth, k: int) -> str:
    """File ``k``'s original as ``<data set folder>/...`` (the path below the shared data root)."""
    parts = Path(files[[f["name"] for f in files].index(truth.names[k])]["params"]["from"]).parts
    folders = [p for p in parts if p in {folder for _, folder in DATASETS.values()}]
    return str(Path(*parts[parts.index(folders[-1]) :])) if folders else str(Path(*parts))


def hamming_pairs(hashes: list[str], limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``i < j`` of 64-bit hex hashes with Hamming distance <= ``limit``: ``(i, j, d)``."""
    values = np.array([int(h, 16) for h in hashes], dtype=np.uint64)
    distance = np.bitwise_count(values[:, None] ^ values[None, :])
    i, j = np.nonzero(np.triu(distance <= limit, 1))
    return i, j, distance[i, j].astype(np.int64)


def run_imagededup(folder: Path, truth: Truth, workers: int) -> tuple[dict, dict]:
    """Each hash: encode, find_duplicates at the default distance (timed), the sweep, the oracle;
    and each hash's pairs within the sweep, ``(i, j, distance)``."""
    import imagededup.methods as methods

    for name in list(logging.root.manager.loggerDict):  # its loggers are set to DEBUG on import
        if name.startswith("imagededup"):
            logging.getLogger(name).setLevel(logging.WARNING)
    index_of = {name: k for k, name in enumerate(truth.names)}
    results, raw = {}, {}
    for method in HASHES:
        hasher = getattr(methods, method)(verbose=False)
        start = time.perf_counter()
        encodings = hasher.encode_images(image_dir=str(folder), num_enc_workers=workers)
        encode_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with warnings.catch_warnings():  # "num_enc_workers has no effect": encodings are given
            warnings.simplefilter("ignore", RuntimeWarning)
            found = hasher.find_duplicates(
                encoding_map=encodings, max_distance_threshold=HASH_DEFAULT, num_dist_workers=workers
            )
        find_seconds = time.perf_counter() - start
        pairs = {tuple(sorted((index_of[a], index_of[b]))) for a, dups in found.items() for b in dups}
        missing = [n for n in truth.names if n not in encodings]
        names = [n for n in truth.names if n in encodings]
        i, j, d = hamming_pairs([encodings[n] for n in names], max(HASH_SWEEP))
        number = np.array([index_of[name] for name in names], dtype=np.int64)
        i, j = number[i], number[j]
        low, high = np.minimum(i, j), np.maximum(i, j)
        own = set(zip(low[d <= HASH_DEFAULT].tolist(), high[d <= HASH_DEFAULT].tolist(), strict=True))
        sweep = [{"threshold": t, **truth.score(low[d <= t], high[d <= t])} for t in HASH_SWEEP]
        pi = np.array([p[0] for p in pairs], dtype=np.int64)
        pj = np.array([p[1] for p in pairs], dtype=np.int64)
        best = max(sweep, key=lambda p: (p["f1"], -p["threshold"]))
        raw[method] = (low, high, d)
        results[method] = {
            "encode_seconds": encode_seconds,
            "find_seconds": find_seconds,
            "unreadable": missing,
            "sweep_agrees_with_find_duplicates": own == pairs,
            "at_default": {"threshold": HASH_DEFAULT, **truth.score(pi, pj)},
            "oracle": best,
            "sweep": sweep,
        }
    return results, raw


# ------------------------------------------------------------------------------------------ report
def derive_default(curves: dict[str, list[dict]], grid: np.ndarray) -> dict:
    """Per data set the thresholds meeting the target (strict precision; the lenient ranges beside);
    the proposed default: the middle of the intersection of the strict ranges, rounded to the grid, or
    without one the threshold that maximises the smallest F1 over the data sets."""

    def describe(points: list[float]) -> dict | None:
        if not points:
            return None
        steps = round((max(points) - min(points)) / (grid[1] - grid[0])) + 1
        return {"min": min(points), "max": max(points), "count": len(points), "contiguous": len(points) == steps}

    ranges = {n: [p["threshold"] for p in c if meets_target(p)] for n, c in curves.items()}
    lenient = {n: [p["threshold"] for p in c if meets_target(p, "precision_excl")] for n, c in curves.items()}
    common = sorted(set.intersection(*(set(r) for r in ranges.values()))) if ranges else []
    worst_f1 = [min(c[k]["f1"] for c in curves.values()) for k in range(len(grid))]
    if common:
        middle = (common[0] + common[-1]) / 2
        proposed = float(grid[np.argmin(np.abs(grid - middle))])
        rule = "the middle of the intersection of the data sets' ranges meeting the target, rounded to the grid"
    else:
        best = max(worst_f1)
        ties = [float(grid[k]) for k, v in enumerate(worst_f1) if v == best]
        proposed = ties[len(ties) // 2]
        rule = "no threshold meets the target on every data set: the one maximising the smallest F1 over the data sets"
    return {
        "rule": rule,
        "ranges_meeting_target": {n: describe(r) for n, r in ranges.items()},
        "ranges_meeting_target_excl_preexisting": {n: describe(r) for n, r in lenient.items()},
        "intersection": {"min": common[0], "max": common[-1]} if common else None,
        "smallest_f1_by_threshold": {f"{t:.3f}": v for t, v in zip(grid.tolist(), worst_f1, strict=True)},
        "proposed": round(proposed, 4),
        "library_default": DEFAULT_THRESHOLD,
    }


def row(name: str, threshold: object, p: dict, seconds: float | None) -> str:
    """One table row (Markdown)."""
    recalls = " | ".join("-" if p["recall"][k] is None else f"{p['recall'][k]:.3f}" for k in PAIR_KINDS)
    time_cell = "-" if seconds is None else f"{seconds:.1f}"
    return (
        f"| {name} | {threshold} | {p['found']} | {p['precision']:.3f} | {p['precision_excl']:.3f} | "
        f"{p['preexisting_pairs']} | "
        f"{recalls} | {p['recall_all']:.3f} | {p['f1']:.3f} | {time_cell} |"
    )


def union(ours: dict, phash: tuple[np.ndarray, np.ndarray, np.ndarray], threshold: float) -> dict:
    """Scores of plmetric's pairs at ``threshold`` united with PHash's at distance <= UNION_DISTANCE."""
    i, j, s = ours["scores"]
    hi, hj, d = phash
    n = ours["count"]
    keys = np.union1d(i[s >= threshold] * n + j[s >= threshold], hi[d <= UNION_DISTANCE] * n + hj[d <= UNION_DISTANCE])
    return {"threshold": threshold, "phash_distance": UNION_DISTANCE, **ours["truth"].score(keys // n, keys % n)}


def table(dataset: str, ours: dict, hashes: dict, derived: float | None, combined: dict | None = None) -> list[str]:
    """The data set's Markdown table: plmetric at the library default (and the derived one), its best F1
    over the grid (oracle), each hash at its default and its oracle."""
    header = ["method", "threshold", "pairs found", "precision", "precision excl. pre-existing", "pre-existing"]
    header += [f"R {k}" for k in PAIR_KINDS] + ["recall", "F1", "seconds"]
    title = f"**{dataset}** ({ours['count']} files, {ours['truth'].total_all} true pairs)"
    lines = [title, "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * 2 + "---:|" * (len(header) - 2))
    ours_seconds = ours["index_seconds"] + ours["pairs_seconds"]
    by_t = {round(p["threshold"], 4): p for p in ours["curve"]}
    lines.append(row("plmetric (library default)", DEFAULT_THRESHOLD, ours["at_default"], ours_seconds))
    if derived is not None and round(derived, 4) != round(DEFAULT_THRESHOLD, 4):
        lines.append(row("plmetric (proposed default)", derived, by_t[round(derived, 4)], ours_seconds))
    best = max(ours["curve"], key=lambda p: (p["f1"], p["threshold"]))
    lines.append(row("plmetric (oracle: best F1)", best["threshold"], best, ours_seconds))
    for method, r in hashes.items():
        seconds = r["encode_seconds"] + r["find_seconds"]
        lines.append(row(f"imagededup {method}", HASH_DEFAULT, r["at_default"], seconds))
        lines.append(row(f"imagededup {method} (oracle)", r["oracle"]["threshold"], r["oracle"], seconds))
    crops = ours.get("check_crops")
    if crops is not None:
        crop_seconds = ours_seconds + crops["zoom_seconds"]
        lines.append(row("plmetric --check-crops (library default)", DEFAULT_THRESHOLD, crops["at_default"], crop_seconds))
        best = max(crops["curve"], key=lambda p: (p["f1"], p["threshold"]))
        lines.append(row("plmetric --check-crops (oracle: best F1)", best["threshold"], best, crop_seconds))
    cal = ours.get("calibrated")
    if cal is not None:
        t = f"{cal['at_threshold']['threshold']:.3f}"
        lines.append(row("plmetric calibrated (no --threshold)", t, cal["at_threshold"], ours_seconds))
        name = f"plmetric calibrated + hash ≤ {cal['with_hash']['hash_distance']}"
        lines.append(row(name, t, cal["with_hash"], ours_seconds))
    if combined is not None:
        phash_seconds = hashes["PHash"]["encode_seconds"] + hashes["PHash"]["find_seconds"]
        name = f"plmetric {combined['threshold']} ∪ PHash ≤ {combined['phash_distance']} (exploratory)"
        lines.append(row(name, "-", combined, ours_seconds + phash_seconds))
    return lines


def curve_table(dataset: str, curve: list[dict], every: int = 2) -> list[str]:
    """Precision and target-kind recalls over the grid (every ``every``-th point)."""
    recalls = " | ".join(f"R {k}" for k in (*TARGET_KINDS, "flip", "bright"))
    lines = [f"| {dataset}: threshold | precision | precision excl. | {recalls} | F1 | meets target |"]
    lines.append("|---:|" + "---:|" * (len(TARGET_KINDS) + 6))
    for p in curve[::every]:
        r = p["recall"]
        cells = [f"{p['threshold']:.3f}", f"{p['precision']:.3f}", f"{p['precision_excl']:.3f}"]
        cells += ["-" if r[k] is None else f"{r[k]:.3f}" for k in (*TARGET_KINDS, "flip", "bright")]
        cells += [f"{p['f1']:.3f}", "yes" if meets_target(p) else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def rounded(obj: object) -> object:
    """Floats to 4 decimals, recursively (compact JSON)."""
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [rounded(v) for v in obj]
    return obj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", action="append", choices=sorted(PLANTED), help="repeatable; default: both")
    parser.add_argument("--data-root", help="folder holding the data sets (default: $PLMETRIC_DATA or ../shared/data)")
    parser.add_argument("--originals", type=int, default=300, help="originals per data set (default 300)")
    parser.add_argument("--second-share", type=float, default=0.2, help="originals with a second copy (default 0.2)")
    parser.add_argument(
        "--copied",
        type=int,
        default=None,
        help=f"originals that get a copy (default: all; the mixed pile: {MIXED_COPIED} of its 300)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=float, nargs=3, default=(0.70, 0.995, 0.005), metavar=("MIN", "MAX", "STEP"))
    parser.add_argument("--work-dir", help="keep the planted folders and indexes here (default: a temporary folder)")
    parser.add_argument("--checkpoint", help="index with this trained model (default: pretrained EfficientNet-Lite0)")
    parser.add_argument("--device", default="cpu", help="the index command's --device (default cpu)")
    parser.add_argument("--index-workers", type=int, default=1, help="the index command's --num-workers (default 1)")
    parser.add_argument("--hash-workers", type=int, default=2, help="imagededup's num_enc/dist_workers (default 2)")
    parser.add_argument(
        "--json-dir", default=str(REPO_ROOT / "benchmarks" / "results"), help="writes duplicates_<dataset>.json"
    )
    parser.add_argument("--no-json", action="store_true")
    parser.add_argument(
        "--check-crops", action="store_true", help="also score plmetric duplicates --check-crops (zoomed views)"
    )
    parser.add_argument("--machine-note", default=DEFAULT_NOTE, help="how loaded the machine was (into the JSON)")
    args = parser.parse_args()
    datasets = args.dataset or list(PLANTED)
    low, high, step = args.grid
    grid = np.round(np.arange(low, high + step / 2, step), 4)
    if not low <= DEFAULT_THRESHOLD:
        parser.error(f"--grid must start at or below the library default {DEFAULT_THRESHOLD}")
    if args.originals < 2 or not 0 <= args.second_share <= 1:
        parser.error("--originals must be at least 2 and --second-share in [0, 1]")
    if args.work_dir and Path(args.work_dir).resolve().is_relative_to(REPO_ROOT):
        parser.error(f"--work-dir must lie outside the repository {REPO_ROOT}")
    try:
        import imagededup
    except ModuleNotFoundError:
        parser.error("imagededup is missing: pip install imagededup (for this benchmark only, not a dependency)")

    keep = args.work_dir is not None
    work = Path(args.work_dir) if keep else Path(tempfile.mkdtemp(prefix="plmetric-duplicates-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for dataset in datasets:
            rng = np.random.default_rng(args.seed)
            if dataset == "mixed":  # 20 CUB species + 10 plankton classes x 10 photos, a share copied once
                root = Path(args.data_root) if args.data_root else Path(dataset_root("cub200")).parent
                originals = [path for path, _ in mixed_pile(str(root), seed=args.seed)]
                plan = {"second_share": 0.0, "kinds": MIXED_KINDS, "exact": True}
                plan["copied"] = MIXED_COPIED if args.copied is None else args.copied
            else:
                root = Path(args.data_root) / DATASETS[dataset][1] if args.data_root else Path(dataset_root(dataset))
                originals = pick_originals(source_images(dataset, root), args.originals, rng)
                plan = {"second_share": args.second_share, "copied": args.copied}
            folder = work / dataset
            if folder.exists():
                shutil.rmtree(folder)
            start = time.perf_counter()
            files = plant(originals, folder, rng, **plan)
            planted = f"{len(files) - len(originals)} copies of {len(originals)} originals"
            print(f"{dataset}: planted {planted} in {time.perf_counter() - start:.1f} s", flush=True)
            ours = run_plmetric(folder, work, files, grid, args)
            print(f"{dataset}: index {ours['index_seconds']:.1f} s, pairs {ours['pairs_seconds']:.2f} s", flush=True)
            hashes, raw = run_imagededup(folder, ours["truth"], args.hash_workers)
            results[dataset] = {"ours": ours, "hashes": hashes, "raw": raw, "files": files, "root": root}
        derivation = derive_default({d: r["ours"]["curve"] for d, r in results.items()}, grid)
        for r in results.values():
            r["union"] = union(r["ours"], r["raw"]["PHash"], derivation["proposed"])
        for dataset, r in results.items():
            print()
            print("\n".join(table(dataset, r["ours"], r["hashes"], derivation["proposed"], r["union"])))
            print()
            print("\n".join(curve_table(dataset, r["ours"]["curve"])))
            if r["ours"]["check_crops"] is not None:
                print("\n--check-crops:")
                print("\n".join(curve_table(dataset, r["ours"]["check_crops"]["curve"])))
            pre = r["ours"]["preexisting_at_grid_min"]
            if pre:
                print(f"\npre-existing pairs of originals (cosine >= {grid.min()}), highest first:")
                for p in pre[:5]:
                    print(f"  {p['cosine']:.4f}  {p['a']}  {p['b']}")
        print(f"\nthreshold ranges meeting the target: {derivation['ranges_meeting_target']}")
        print(f"(precision excl. pre-existing pairs: {derivation['ranges_meeting_target_excl_preexisting']})")
        print(f"proposed default: {derivation['proposed']} ({derivation['rule']}); library default {DEFAULT_THRESHOLD}")
        if not args.no_json:
            for dataset, r in results.items():
                ours, truth = r["ours"], r["ours"]["truth"]
                kinds = {k: sum(1 for f in r["files"] if f["kind"] == k) for k in KINDS}
                best_hash = max(
                    [(m, "default", h["at_default"]["f1"]) for m, h in r["hashes"].items()]
                    + [(m, "oracle", h["oracle"]["f1"]) for m, h in r["hashes"].items()],
                    key=lambda x: x[2],
                )
                by_t = {round(p["threshold"], 4): p for p in ours["curve"]}
                proposed = by_t[round(derivation["proposed"], 4)]
                payload = {
                    "benchmark": "duplicates",
                    "command": "python benchmarks/duplicates.py " + " ".join(sys.argv[1:]),
                    "machine": {
                        "platform": platform.platform(),
                        "processor": platform.processor(),
                        "cpus": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__,
                        "numpy": np.__version__,
                        "imagededup": getattr(imagededup, "__version__", "?"),
                        "device": args.device,
                        "note": args.machine_note,
                    },
                    "dataset": dataset,
                    "data_root": str(r["root"]),
                    "seed": args.seed,
                    "counts": {
                        "originals": len(originals_of(r["files"])),
                        "copies": kinds,
                        "files": ours["count"],
                        "true_pairs": truth.total_all,
                        "true_pairs_by_kind": truth.total,
                    },
                    "target": f"recall >= {TARGET} for each of {', '.join(TARGET_KINDS)} at precision >= {TARGET}",
                    "plmetric": {
                        "command": ours["command"],
                        "model": ours["model"],
                        "index_seconds": ours["index_seconds"],
                        "pairs_seconds": ours["pairs_seconds"],
                        "pairs_threshold": ours["pairs_threshold"],
                        "find_duplicates_seconds_at_default": ours["find_duplicates_seconds"],
                        "groups_at_library_default": ours["groups_at_default"],
                        "library_default": {
                            "threshold": DEFAULT_THRESHOLD,
                            **ours["at_default"],
                            "meets_target": meets_target(ours["at_default"]),
                        },
                        "proposed_default": {**proposed, "meets_target": meets_target(proposed)},
                        "oracle_best_f1": max(ours["curve"], key=lambda p: (p["f1"], p["threshold"])),
                        "curve": [
                            {**p, "meets_target": meets_target(p), "meets_excl": meets_target(p, "precision_excl")}
                            for p in ours["curve"]
                        ],
                        "preexisting_pairs_at_grid_min": ours["preexisting_at_grid_min"],
                    },
                    "plmetric_check_crops": None
                    if ours["check_crops"] is None
                    else {
                        **{k: v for k, v in ours["check_crops"].items() if k != "curve"},
                        "at_default": {
                            "threshold": DEFAULT_THRESHOLD,
                            **ours["check_crops"]["at_default"],
                            "meets_target": meets_target(ours["check_crops"]["at_default"]),
                        },
                        "thresholds_meeting_target": [
                            p["threshold"] for p in ours["check_crops"]["curve"] if meets_target(p)
                        ],
                        "oracle_best_f1": max(ours["check_crops"]["curve"], key=lambda p: (p["f1"], p["threshold"])),
                        "curve": [{**p, "meets_target": meets_target(p)} for p in ours["check_crops"]["curve"]],
                    },
                    "plmetric_calibrated": ours["calibrated"],
                    "imagededup": r["hashes"],
                    "exploratory_union_with_phash": r["union"],
                    "best_imagededup": {"method": best_hash[0], "setting": best_hash[1], "f1": best_hash[2]},
                    "f1_beats_best_imagededup": {
                        "library_default": ours["at_default"]["f1"] > best_hash[2],
                        "proposed_default": proposed["f1"] > best_hash[2],
                    },
                    "threshold_derivation": derivation,
                }
                out = Path(args.json_dir) / f"duplicates_{dataset}.json"
                atomic_write_json(out, rounded(payload))
                print(f"wrote {out}")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def originals_of(files: list[dict]) -> list[dict]:
    """The records of the originals."""
    return [f for f in files if f["kind"] == "original"]


if __name__ == "__main__":
    main()
