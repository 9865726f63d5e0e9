"""Zero-shot image search: embedding files, saved indices, top-k queries and result grids.

An index (or embeddings file) is one safetensors file: ``embeddings`` (N × d, L2-normalised),
``labels`` (N, -1 when unlabelled) and, in its metadata, the image paths and the model that made
it (checkpoint path or backbone name, embedding size, image size), so ``search`` can embed a
query image the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from plmetric.checkpoint import atomic_write_figure, load_model

INDEX_KEY = "plmetric_index"


def load_embedding_model(checkpoint: str | None, backbone: str, embedding_dim: int, weights: str | None = None):
    """A model from a plmetric checkpoint, or a pretrained backbone when no checkpoint is given.

    Returns:
        ``(model, description)``; the description is what an index records to rebuild the model.
    """
    from plmetric.models import create_model

    if checkpoint:
        model, meta = load_model(checkpoint)
        return model, {
            "checkpoint": str(Path(checkpoint).resolve()),
            "backbone": meta["backbone"],
            "embedding_dim": int(meta["embedding_dim"]),
            "image_size": int(meta.get("image_size", 224)),
        }
    model = create_model(backbone, embedding_dim=embedding_dim, pretrained=True, weights=weights)
    return model.eval(), {"checkpoint": None, "backbone": backbone, "embedding_dim": embedding_dim, "weights": weights}


def save_embeddings(
    path: str | os.PathLike, embeddings: torch.Tensor, labels: torch.Tensor, paths: list[str], model: dict[str, Any]
) -> Path:
    """Write embeddings, labels, image paths and the model description to one safetensors file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {path}")
    if not (len(embeddings) == len(labels) == len(paths)):
        raise ValueError(f"{len(embeddings)} embeddings, {len(labels)} labels and {len(paths)} paths disagree")
    meta = {INDEX_KEY: json.dumps({"paths": paths, "model": model})}
    buffer_path = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_file(
            {"embeddings": embeddings.float().contiguous().cpu(), "labels": labels.long().contiguous().cpu()},
            str(buffer_path),
            metadata=meta,
        )
        os.replace(buffer_path, path)
    finally:
        buffer_path.unlink(missing_ok=True)
    return path


def load_embeddings(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, list[str], dict[str, Any]]:
    """Read a file written by :func:`save_embeddings`: ``(embeddings, labels, paths, model)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index/embeddings file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(INDEX_KEY)
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises several error types for foreign files
        raise ValueError(f"{path} is not a plmetric index: {err}") from err
    if raw is None or "embeddings" not in tensors:
        raise ValueError(f"{path} is not a plmetric index (no '{INDEX_KEY}' metadata)")
    meta = json.loads(raw)
    return tensors["embeddings"], tensors["labels"], meta["paths"], meta["model"]


def top_k(query: torch.Tensor, database: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k of each query row among the database rows: ``(similarities, indices)``."""
    k = min(k, database.shape[0])
    sims = query.float() @ database.float().T
    return sims.topk(k, dim=1)


def draw_results(query_path: str, result_paths: list[str], scores: list[float], out: str | os.PathLike) -> Path:
    """Draw the query beside its results as a PNG grid, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n = len(result_paths) + 1
    cols = min(n, 6)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    tiles = [(query_path, "query")] + [
        (p, f"#{i + 1}  {s:.3f}") for i, (p, s) in enumerate(zip(result_paths, scores, strict=True))
    ]
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image_path, title) in zip(axes.flat, tiles, strict=False):
        try:
            with Image.open(image_path) as img:
                ax.imshow(img.convert("RGB"))
        except OSError:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
        ax.set_title(title, fontsize=8, color="tab:red" if title == "query" else "black")
    fig.tight_layout()
    return atomic_write_figure(fig, out, dpi=90)
