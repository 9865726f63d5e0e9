"""Zero-shot image search: self-contained, self-checking indexes, top-k queries and result grids.

An index (or embeddings file) is one safetensors file: ``embeddings`` (N × d, L2-normalised),
``labels`` (N, -1 when unlabelled) and, in its metadata (``plmetric_index``, JSON):

* ``paths``: the absolute path of every image (``search`` works from any folder);
* ``model``: everything needed to embed a query the same way and to check that it is the same
  model: the checkpoint's absolute path *and SHA-256* (a run rewrites ``model.safetensors`` every
  epoch: a changed file is refused with both hashes named), or the pretrained backbone (and the
  weights file with its hash); the embedding and output dimensions, the image size and the
  preprocessing (resize, crop, mean, std);
* ``format``, ``version``, ``created``, ``count``, ``dim``.

An index is never built with an untrained random embedding layer: without a checkpoint only the
backbone's pooled features (``embedding_dim = 0``) are reproducible.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from plmetric.checkpoint import atomic_save_safetensors, atomic_write_figure, file_sha256, load_model

INDEX_KEY = "plmetric_index"
INDEX_FORMAT = "plmetric-index"
INDEX_VERSION = 2


class IndexMismatchError(ValueError):
    """The model an index records is not the model found now (changed or missing checkpoint)."""


def preprocessing(backbone: str, image_size: int) -> dict[str, Any]:
    """The deterministic input transform of :func:`plmetric.models.build_transform` as data."""
    from plmetric.models import backbone_spec

    spec = backbone_spec(backbone)
    return {
        "resize_shorter_side": round(image_size * 256 / 224),
        "center_crop": int(image_size),
        "interpolation": "bilinear",
        "mean": list(spec.mean),
        "std": list(spec.std),
        "color": "RGB",
    }


def load_embedding_model(
    checkpoint: str | os.PathLike | None,
    backbone: str,
    embedding_dim: int,
    weights: str | os.PathLike | None = None,
    image_size: int = 224,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A model from a plmetric checkpoint, or a pretrained backbone's pooled features.

    Returns:
        ``(model, description)``; the description is what an index records to rebuild and check
        the model (:func:`model_from_description`). A checkpoint's own image size wins over
        ``image_size``.

    Raises:
        ValueError: ``embedding_dim > 0`` without a checkpoint (an untrained random layer: no
            later search could rebuild it), or an unreadable checkpoint.
    """
    from plmetric.models import create_model

    if checkpoint:
        path = Path(checkpoint).expanduser().resolve()
        model, meta = load_model(path)
        size = int(meta.get("image_size", image_size))
        return model, {
            "checkpoint": str(path),
            "checkpoint_sha256": file_sha256(path),
            "backbone": meta["backbone"],
            "embedding_dim": int(meta["embedding_dim"]),
            "output_dim": int(model.embedding_dim),
            "image_size": size,
            "weights": None,
            "weights_sha256": None,
            "preprocessing": preprocessing(meta["backbone"], size),
        }
    if embedding_dim:
        raise ValueError(
            f"--embedding-dim {embedding_dim} without --checkpoint would embed with an untrained, random "
            "embedding layer that no later search could rebuild; pass --checkpoint (a model from plmetric train) "
            "or --embedding-dim 0 (the backbone's pooled features)"
        )
    weights_path = str(Path(weights).expanduser().resolve()) if weights else None
    model = create_model(backbone, embedding_dim=0, pretrained=True, weights=weights_path)
    return model.eval(), {
        "checkpoint": None,
        "checkpoint_sha256": None,
        "backbone": backbone,
        "embedding_dim": 0,
        "output_dim": int(model.embedding_dim),
        "image_size": int(image_size),
        "weights": weights_path,
        "weights_sha256": file_sha256(weights_path) if weights_path else None,
        "preprocessing": preprocessing(backbone, int(image_size)),
    }


def model_from_description(description: dict[str, Any], index_path: str | os.PathLike) -> torch.nn.Module:
    """Rebuild the model an index records, after checking it is the same one.

    Raises:
        IndexMismatchError: the checkpoint (or weights file) is missing or its SHA-256 differs from
            the one recorded when the index was built; the message names both hashes.
    """
    from plmetric.models import create_model

    checkpoint = description.get("checkpoint")
    if checkpoint:
        _check_same_file(checkpoint, description.get("checkpoint_sha256"), "checkpoint", index_path)
        model, _ = load_model(checkpoint)
        return model
    weights = description.get("weights")
    if weights:
        _check_same_file(weights, description.get("weights_sha256"), "weights file", index_path)
    model = create_model(description["backbone"], embedding_dim=0, pretrained=True, weights=weights)
    return model.eval()


def _check_same_file(path: str, recorded: str | None, what: str, index_path: str | os.PathLike) -> None:
    if not Path(path).is_file():
        raise IndexMismatchError(
            f"index {index_path} was built with the {what} {path}, which no longer exists; "
            "rebuild the index (plmetric index) with the model you want to search with"
        )
    if recorded is None:
        raise IndexMismatchError(
            f"index {index_path} records no SHA-256 of its {what} {path} (an index from an older plmetric): "
            "it cannot be checked; rebuild it with plmetric index"
        )
    found = file_sha256(path)
    if found != recorded:
        raise IndexMismatchError(
            f"the {what} {path} has changed since index {index_path} was built (SHA-256 {recorded[:16]}... then, "
            f"{found[:16]}... now): the index's embeddings came from another model; rebuild the index, or keep "
            "the model an index is built with (e.g. copy best.safetensors) instead of a run's latest model"
        )


def save_embeddings(
    path: str | os.PathLike,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    paths: list[str],
    model: dict[str, Any],
) -> Path:
    """Write embeddings, labels, absolute image paths and the model description to one safetensors file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {path}")
    if not (len(embeddings) == len(labels) == len(paths)):
        raise ValueError(f"{len(embeddings)} embeddings, {len(labels)} labels and {len(paths)} paths disagree")
    absolute = [p if p.startswith("item:") else str(Path(p).expanduser().resolve()) for p in paths]
    meta = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "count": len(absolute),
        "dim": int(embeddings.shape[1]) if embeddings.dim() == 2 else 0,
        "paths": absolute,
        "model": model,
    }
    tensors = {"embeddings": embeddings.float().contiguous().cpu(), "labels": labels.long().contiguous().cpu()}
    return atomic_save_safetensors(path, tensors, {INDEX_KEY: json.dumps(meta)})


def read_index_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The index metadata of a plmetric index file, or None when ``path`` is some other file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(INDEX_KEY)
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError):
        return None
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return meta if isinstance(meta, dict) else None


def load_embeddings(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, list[str], dict[str, Any]]:
    """Read a file written by :func:`save_embeddings`: ``(embeddings, labels, paths, model)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a plmetric index (the message names the file and says why).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index/embeddings file not found: {path}")
    meta = read_index_metadata(path)
    if meta is None:
        raise ValueError(
            f"{path} is not a plmetric index (expected a .safetensors file written by plmetric index or "
            f"plmetric embed, with '{INDEX_KEY}' metadata)"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable plmetric index: {err}") from None
    embeddings, labels = tensors.get("embeddings"), tensors.get("labels")
    paths, model = meta.get("paths"), meta.get("model")
    if (
        embeddings is None
        or labels is None
        or embeddings.dim() != 2
        or not isinstance(paths, list)
        or not isinstance(model, dict)
        or len(paths) != embeddings.shape[0]
        or labels.shape != (embeddings.shape[0],)
        or not all(isinstance(p, str) for p in paths)
        or not isinstance(model.get("backbone"), str)
    ):
        raise ValueError(
            f"{path} is not a valid plmetric index (embeddings, labels, paths and model disagree or are missing)"
        )
    return embeddings, labels, paths, model


def decode_image(source: str | os.PathLike | bytes, what: str = "query image", max_side: int | None = None) -> Any:
    """Decode an image file (or its bytes) to an RGB ``PIL.Image``.

    Args:
        source: a path, or the bytes of an image file (an upload).
        what: how the errors name the image, e.g. ``"query image photo.jpg"``; a path is appended.
        max_side: let JPEG decoding shrink the image towards this side (``Image.draft``: thumbnails);
            None decodes at full size (embedding).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a decodable image, or one whose pixel count makes it a decompression bomb
            (over PIL's ``Image.MAX_IMAGE_PIXELS``); one line naming ``what``.
    """
    from PIL import Image

    if isinstance(source, bytes):
        name, handle = what, io.BytesIO(source)
    else:
        name, handle = f"{what} {source}", Path(source)
        if not handle.is_file():
            raise FileNotFoundError(f"{what} not found: {source}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as img:
                if max_side is not None:
                    img.draft("RGB", (max_side, max_side))
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{name} is too large to decode safely ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"cannot read {name}: {err}") from None


def read_query_image(
    source: str | os.PathLike | bytes, transform: Callable[[Any], torch.Tensor], what: str = "query image"
) -> torch.Tensor:
    """Decode a query image (a path or an upload's bytes) and apply the index's transform.

    Raises:
        FileNotFoundError, ValueError: as :func:`decode_image`, one clear line for any unreadable
            or oversized file.
    """
    return transform(decode_image(source, what))


def top_k(query: torch.Tensor, database: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k of each query row among the database rows: ``(similarities, indices)``."""
    if k < 1:
        raise ValueError(f"top_k: k must be >= 1, got {k}")
    k = min(k, database.shape[0])
    sims = query.float() @ database.float().T
    return sims.topk(k, dim=1)


def draw_results(query_path: str, result_paths: list[str], scores: list[float], out: str | os.PathLike) -> Path:
    """Draw the query beside its results as a PNG grid (file names and scores as captions), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n = len(result_paths) + 1
    cols = min(n, 6)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.7 * rows), squeeze=False)
    tiles = [(query_path, f"query\n{_short(query_path)}")] + [
        (p, f"#{i + 1}  {s:.3f}\n{_short(p)}") for i, (p, s) in enumerate(zip(result_paths, scores, strict=True))
    ]
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image_path, title) in zip(axes.flat, tiles, strict=False):
        try:
            with Image.open(image_path) as img:
                ax.imshow(img.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError):
            ax.text(0.5, 0.5, "missing" if not Path(image_path).exists() else "unreadable", ha="center", va="center")
        ax.set_title(title, fontsize=7, color="tab:red" if title.startswith("query") else "black")
    fig.tight_layout()
    return atomic_write_figure(fig, out, dpi=90)


def _short(path: str, limit: int = 28) -> str:
    name = Path(path).name
    return name if len(name) <= limit else name[: limit - 3] + "..."
