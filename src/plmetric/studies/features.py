"""The similarity study's features: a features file with its labels (:func:`load_features_file`), and a
data set split embedded once with a pretrained backbone and cached as safetensors outside the data
folder and the repo (:func:`cached_features`; :func:`cached_views` for clean and augmented views).
Used by :mod:`plmetric.studies.similarity` (which re-exports these names) and the benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from plmetric.core.files import require_regular_file
from plmetric.data.backbones.specs import DEFAULT_EVAL_RESIZE

__all__ = ["cached_features", "cached_views", "default_cache_dir", "feature_cache_path", "load_features_file"]


def _read_labels(path: Path) -> np.ndarray:
    """Integer labels from ``.npy`` (1-D, or (N, 1)), ``.txt`` (whitespace) or ``.csv`` (commas)."""
    require_regular_file(path, "labels file")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".txt", ".csv"):
        raise ValueError(f"labels file {path}: expected .npy, .txt or .csv, got '{suffix}'")
    try:
        if suffix == ".npy":
            labels = np.load(path, allow_pickle=False)
        else:
            labels = np.loadtxt(path, dtype=np.int64, delimiter="," if suffix == ".csv" else None, ndmin=1)
    except (OSError, ValueError) as err:
        raise ValueError(f"labels file {path}: cannot read it ({err})") from err
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels file {path}: expected a 1-D array of integers, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def load_features_file(
    features_path: str | os.PathLike, labels_path: str | os.PathLike | None = None
) -> tuple[Tensor, Tensor]:
    """Read features (N, d) and integer labels (N,) from files.

    ``features_path``: a ``.npy`` array (N, d), or a ``.safetensors`` file holding ``features`` or
    ``embeddings`` (N, d) and optionally ``labels`` (N,) (e.g. written by ``plmetric embed`` or by
    this module's cache). ``labels_path`` (``.npy``, ``.txt`` or ``.csv`` with one integer per item)
    is required unless the safetensors file holds labels; given, it takes precedence.

    Returns:
        ``(features float32 (N, d), labels int64 (N,))`` on the CPU.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: unreadable file, wrong shape or type, a label count that differs from the
            feature count, missing or negative (unlabelled) labels.
    """
    path = Path(features_path).expanduser()
    require_regular_file(path, "features file")
    suffix = path.suffix.lower()
    labels: np.ndarray | None = None
    if suffix == ".npy":
        try:
            features = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"features file {path}: cannot read it as a NumPy array ({err})") from err
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as err:  # safetensors raises several unrelated types
            raise ValueError(f"features file {path}: cannot read it as safetensors ({err})") from err
        key = next((k for k in ("features", "embeddings") if k in tensors), None)
        if key is None:
            raise ValueError(
                f"features file {path}: expected a 'features' or 'embeddings' tensor, found {sorted(tensors)}"
            )
        features = tensors[key].float().numpy()
        if "labels" in tensors:
            labels = tensors["labels"].long().numpy()
    else:
        raise ValueError(f"features file {path}: expected a .npy or .safetensors file, got '{suffix}'")
    if features.ndim != 2 or features.shape[0] < 2 or not np.issubdtype(features.dtype, np.number):
        raise ValueError(f"features file {path}: expected a numeric (N, d) array with N >= 2, got {features.shape}")
    if labels_path is not None:
        labels = _read_labels(Path(labels_path).expanduser())
        where = f"labels file {labels_path}"
    else:
        where = f"the labels in {path}"
    if labels is None:
        raise ValueError(
            f"features file {path} holds no labels: give --labels FILE (.npy or .txt, one integer per item)"
        )
    if len(labels) != features.shape[0]:
        raise ValueError(f"{where} has {len(labels)} labels but {path} has {features.shape[0]} feature rows")
    if (labels < 0).any():
        raise ValueError(f"{where}: labels must be >= 0 (-1 marks unlabelled items; the study needs labels)")
    x = torch.as_tensor(np.ascontiguousarray(features), dtype=torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"features file {path}: contains NaN or infinite values")
    return x, torch.as_tensor(labels, dtype=torch.int64)


def default_cache_dir() -> Path:
    """``$PLMETRIC_CACHE/features`` or ``~/.cache/plmetric/features``."""
    base = os.environ.get("PLMETRIC_CACHE")
    return Path(base).expanduser() / "features" if base else Path.home() / ".cache" / "plmetric" / "features"


def _cache_key(
    dataset: str,
    root: str | None,
    split: str,
    backbone: str,
    image_size: int,
    weights: str | None,
    eval_resize: str = DEFAULT_EVAL_RESIZE,
) -> dict:
    """What makes a cache file; ``eval_resize`` enters only when not the default (the caches made before
    the rule was a choice keep their key, and their file name)."""
    return {
        "dataset": dataset,
        "root": str(Path(root).expanduser().resolve()) if root else None,
        "split": split,
        "backbone": backbone,
        "image_size": int(image_size),
        "weights": str(Path(weights).expanduser().resolve()) if weights else None,
        "features": "pooled (avg + max), L2-normalised, eval transform",
        "version": 1,
        **({"eval_resize": eval_resize} if eval_resize != DEFAULT_EVAL_RESIZE else {}),
    }


def _rule_suffix(eval_resize: str) -> str:
    """``-whole`` in a cache file's name for the ``whole`` eval rule, nothing for the default."""
    return "" if eval_resize == DEFAULT_EVAL_RESIZE else f"-{eval_resize}"


def feature_cache_path(
    cache_dir: str | os.PathLike,
    dataset: str,
    root: str | None,
    split: str,
    backbone: str,
    image_size: int = 224,
    weights: str | None = None,
    eval_resize: str = DEFAULT_EVAL_RESIZE,
) -> Path:
    """The cache file for (data set, root, split, backbone, image size, weights, eval rule)."""
    key = _cache_key(dataset, root, split, backbone, image_size, weights, eval_resize)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{dataset}-{split}-{backbone}-{int(image_size)}px{_rule_suffix(eval_resize)}-{digest}.safetensors"
    return Path(cache_dir).expanduser() / name


def _load_cache_hit(path: Path, key: dict[str, Any], start: float) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A cache file's tensors and the info of a hit (its key, file and load seconds since ``start``)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    info = {"key": key, "cache_file": str(path), "cache_hit": True, "seconds": round(time.perf_counter() - start, 2)}
    return tensors, info


def cached_features(
    dataset: str,
    root: str | None,
    split: str,
    backbone: str = "efficientnet_lite0",
    *,
    image_size: int = 224,
    weights: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    progress: bool = True,
    eval_resize: str = DEFAULT_EVAL_RESIZE,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Pooled, L2-normalised pretrained-backbone features of a data set split, cached on disk.

    The first call embeds the split (eval transform with the rule ``eval_resize``,
    ``create_model(backbone, embedding_dim=0)``)
    and writes ``features``, ``labels`` and the key as metadata to
    :func:`feature_cache_path` (atomically); later calls read the file.

    Returns:
        ``(features float32 (N, d), labels int64 (N,), info)``; ``info`` holds the key, the cache
        path, whether it was a cache hit, and the seconds spent.

    Raises:
        ValueError: unknown split or a split without labels; a cache folder inside the data folder.
    """
    from safetensors.torch import save

    from plmetric.core.checkpoint import atomic_write_bytes

    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if root is not None:
        root_path = Path(root).expanduser().resolve()
        if cache_dir.resolve() == root_path or root_path in cache_dir.resolve().parents:
            raise ValueError(f"--cache-dir {cache_dir} lies inside the data folder {root_path}; choose another folder")
    path = feature_cache_path(cache_dir, dataset, root, split, backbone, image_size, weights, eval_resize)
    key = _cache_key(dataset, root, split, backbone, image_size, weights, eval_resize)
    start = time.perf_counter()
    if path.is_file():
        tensors, info = _load_cache_hit(path, key, start)
        return tensors["features"].float(), tensors["labels"].long(), info

    from plmetric.data.datasets import load_dataset
    from plmetric.evaluation.metrics import embed_dataset
    from plmetric.data.backbones import build_transform, create_model

    transform = build_transform(backbone, image_size=image_size, train=False, eval_resize=eval_resize)
    splits = load_dataset(dataset, root, train_transform=transform, test_transform=transform, verbose=progress)
    part = getattr(splits, split)
    if part is None or (part.labels < 0).all():
        raise ValueError(f"dataset {dataset!r}: the {split} split has no labelled images; the study needs labels")
    model = create_model(backbone, embedding_dim=0, pretrained=weights is None, weights=weights).to(device)
    features, labels, _ = embed_dataset(
        model, part, batch_size=batch_size, num_workers=num_workers, device=device, progress=progress,
        runtime="auto",  # onnxruntime on a CPU (plmetric.data.runtime): the pretrained model, cached once
    )
    features, labels = features.float().contiguous(), labels.long().contiguous()
    blob = save({"features": features, "labels": labels}, metadata={"plmetric_feature_cache": json.dumps(key)})
    atomic_write_bytes(path, blob)
    info = {"key": key, "cache_file": str(path), "cache_hit": False, "seconds": round(time.perf_counter() - start, 2)}
    return features, labels, info


def _views_file_name(key: dict[str, Any], eval_resize: str) -> str:
    """The file name of :func:`cached_views`'s cache for ``key`` (the digest of the whole key)."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    what = f"{key['dataset']}-{key['split']}-views{key['views']}-{key['backbone']}-{key['image_size']}px"
    return f"{what}{_rule_suffix(eval_resize)}-f{key['frozen']}-{digest}.safetensors"


def cached_views(
    dataset: str,
    root: str | None,
    split: str,
    backbone: str = "efficientnet_lite0",
    *,
    image_size: int = 128,
    frozen: int | None = 6,
    views: int = 5,
    crop_scale_min: float = 0.16,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    progress: bool = True,
    eval_resize: str = DEFAULT_EVAL_RESIZE,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Several views of every image of a split, passed once through the pretrained backbone's first
    ``frozen`` stages (``None``: the whole backbone and its pooling, the head setting), cached.

    View 0 is the deterministic transform (the eval rule ``eval_resize``); views 1 .. V-1 are random resized
    crops with flips (the training transform, seeded by ``seed`` and the view). The cheap cached
    settings of the studies train the rest of the network on them
    (:class:`plmetric.data.datasets.ViewFeatureDataset`, :func:`plmetric.training.networks.tail_model`).

    Returns:
        ``(views float16 (V, N, ...), labels int64 (N,), info)`` (one view for the test split).
    """
    from safetensors.torch import save

    from plmetric.core.checkpoint import atomic_write_bytes
    from plmetric.data.datasets import load_dataset
    from plmetric.evaluation.metrics import embed_dataset
    from plmetric.data.backbones import build_transform, create_model
    from plmetric.data.backbones.stages import split_backbone

    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    views = views if split == "train" else 1
    key = {
        **_cache_key(dataset, root, split, backbone, image_size, None, eval_resize),
        "features": "views through the first stages" if frozen is not None else "views, pooled (avg + max)",
        "frozen": frozen,
        "views": views,
        "crop_scale_min": crop_scale_min,
        "seed": seed,
    }
    path = cache_dir / _views_file_name(key, eval_resize)
    start = time.perf_counter()
    if path.is_file():
        tensors, info = _load_cache_hit(path, key, start)
        return tensors["views"], tensors["labels"].long(), info
    model = create_model(backbone, embedding_dim=0, pretrained=True).eval()
    if frozen is None:
        net: torch.nn.Module = _Pooled(model)
    else:
        net = split_backbone(model, frozen)[0].eval()
    splits = load_dataset(dataset, root, verbose=progress)
    part = getattr(splits, split)
    outputs, labels, index = [], None, None
    for view in range(views):
        part.transform = build_transform(backbone, image_size, view > 0, crop_scale_min, eval_resize)
        torch.manual_seed(seed * 1000 + view)  # the crops (and the workers' seeds) of this view
        out, y, i = embed_dataset(
            _Flat(net), part, batch_size=batch_size, num_workers=num_workers, progress=progress, runtime="auto"
        )
        if index is not None and not torch.equal(i, index):
            raise ValueError(f"cached_views: view {view} read other images than view 0 (unreadable files changed?)")
        outputs.append(out.half())
        labels, index = y, i
    shape = tuple(net(torch.zeros(1, 3, image_size, image_size)).shape[1:]) if frozen is not None else None
    stacked = torch.stack(outputs)
    if shape is not None:
        stacked = stacked.view(views, stacked.shape[1], *shape)
    blob = save(
        {"views": stacked.contiguous(), "labels": labels.contiguous()},
        metadata={"plmetric_view_cache": json.dumps(key)},
    )
    atomic_write_bytes(path, blob)
    info = {"key": key, "cache_file": str(path), "cache_hit": False, "seconds": round(time.perf_counter() - start, 2)}
    return stacked, labels, info


class _Pooled(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.pooled_features(x)


class _Flat(torch.nn.Module):
    """A network's output flattened to (B, -1), as :func:`plmetric.evaluation.metrics.embed_dataset` wants."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten(1)
