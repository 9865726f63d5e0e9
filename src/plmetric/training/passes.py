"""Full passes over a data set, sharded over ranks and gathered in data set order: embedding it
(the memory bank's refresh, the PCA features) and evaluating on a labelled test split.

Images come through PIL in DataLoader workers, or from a decode-once :class:`CachedImages`
(:mod:`plmetric.data.pipeline`) augmented on the device.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from plmetric.core import distributed as dist_utils
from plmetric.config.schema import Config
from plmetric.data.datasets import FeatureDataset, ImageDataset, ViewFeatureDataset
from plmetric.evaluation.metrics import embed_dataset, evaluate
from plmetric.training.sampling import MemoryBank

__all__ = [
    "CachedImages",
    "build_cached_images",
    "embed_cached",
    "embed_distributed",
    "embed_source",
    "evaluate_model",
    "loader_workers",
    "pass_runtime",
    "pooled_features",
    "refresh_bank",
]


def loader_workers(cfg: Config, dataset: Any) -> int:
    """DataLoader workers for ``dataset``: ``data.num_workers`` to decode images; none for tensors
    already in memory (cached features and views), where a worker pool only costs its start."""
    return 0 if isinstance(dataset, (FeatureDataset, ViewFeatureDataset)) else cfg.data.num_workers


# Images below which a pass over images keeps PyTorch under train.runtime=auto: the model changes every epoch,
# so each pass exports it again (EfficientNet-Lite0: about 2-3 s with the check on two cores, what PyTorch
# takes for ~20-30 images at 224 px); well above that the export pays for itself, below it gains nothing.
PASS_RUNTIME_MIN_IMAGES = 256


def pass_runtime(cfg: Config, dataset: Any, count: int | None = None) -> str:
    """``train.runtime`` for a pass over images (``auto`` keeps PyTorch for a pass of fewer than
    :data:`PASS_RUNTIME_MIN_IMAGES` images: ``count``, else the whole data set); ``torch`` over cached features (the network is the
    embedding layer, or the trained tail: nothing to gain from exporting it every epoch)."""
    if isinstance(dataset, (FeatureDataset, ViewFeatureDataset)):
        return "torch"
    if cfg.train.runtime == "auto" and (len(dataset) if count is None else count) < PASS_RUNTIME_MIN_IMAGES:
        return "torch"
    return cfg.train.runtime


def embed_distributed(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    indices: list[int] | None = None,
    progress: str | None = None,
    runtime: str = "torch",
    cache_model: bool = True,
    side: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Embed a data set (or its items ``indices``), sharded over ranks and gathered with its
    indices (no duplicates); ``progress`` names the pass's progress bar (rank 0; None: no bar);
    ``runtime``, ``cache_model`` and ``side`` as in :func:`plmetric.evaluation.metrics.embed_dataset`.

    Returns CPU float32 embeddings, labels and dataset indices sorted by index (with ``side``, the
    side tensors too, gathered and sorted alike).
    """
    world, rank = dist_utils.world_size(), dist_utils.rank()
    items = list(range(len(dataset))) if indices is None else list(indices)
    if world == 1:
        shard = dataset if indices is None else Subset(dataset, items)
    else:
        shard = Subset(dataset, items[rank::world])
    bar = progress is not None and dist_utils.is_main_process()
    found = embed_dataset(
        model, shard, batch_size=batch_size, num_workers=num_workers, device=device, progress=bar, desc=progress or "",
        runtime=runtime, cache_model=cache_model, side=side,
    )
    return _gather_in_index_order(*found[:3], device, *found[3:])


def _gather_in_index_order(
    emb: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, device: torch.device, *side: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Gather each rank's shard (CPU tensors) and sort everything by data set index (``side``: more
    per-item tensors, gathered and sorted alike)."""
    parts = (emb, labels, index, *side)
    if dist_utils.world_size() > 1:
        parts = tuple(dist_utils.all_gather_variable(part.to(device)).cpu() for part in parts)
    order = torch.argsort(parts[2])
    return tuple(part[order] for part in parts)


@torch.no_grad()
def embed_cached(
    model: nn.Module,
    cache: Any,
    augment: nn.Module,
    *,
    batch_size: int,
    device: torch.device,
    indices: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`embed_distributed` for images held in a `plmetric.data.pipeline.ImageCache` (eval-mode augment on the device)."""
    from plmetric.data.pipeline import CachedBatchLoader

    world, rank = dist_utils.world_size(), dist_utils.rank()
    items = list(range(len(cache))) if indices is None else list(indices)
    mine = items[rank::world]
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    was_training = model.training
    model.eval()
    outputs, labels, indices = [], [], []
    try:
        for batch in CachedBatchLoader(cache, batches, augment, device):
            if batch is None:
                continue
            images, batch_labels, batch_index = batch
            outputs.append(model(images).float().cpu())
            labels.append(batch_labels)
            indices.append(batch_index)
    finally:
        model.train(was_training)
    dim = int(getattr(model, "embedding_dim", 0))
    emb = torch.cat(outputs) if outputs else torch.zeros(0, dim)
    label_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    index_t = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64)
    return _gather_in_index_order(emb, label_t, index_t, device)


class CachedImages:
    """A training set's `plmetric.data.pipeline.ImageCache` with its train- and eval-mode device augmentations."""

    def __init__(
        self, cache: Any, train_augment: nn.Module, eval_augment: nn.Module, teacher_augment: nn.Module | None = None
    ) -> None:
        self.cache, self.train_augment, self.eval_augment = cache, train_augment, eval_augment
        self.teacher_augment = teacher_augment  # the teacher's own view (train.teacher_view), None: the student's


def refresh_bank(
    bank: MemoryBank,
    teacher: nn.Module,
    dataset: ImageDataset | CachedImages,
    cfg: Config,
    device: torch.device,
    progress: bool = False,
) -> None:
    """Re-embed the whole training set with the teacher into the memory bank."""
    emb, _, index = embed_source(teacher, dataset, cfg, device, progress="memory bank" if progress else None)
    bank.update(index.to(bank.embeddings.device), emb.to(bank.embeddings.device))


def embed_source(
    model: nn.Module,
    source: ImageDataset | CachedImages,
    cfg: Config,
    device: torch.device,
    indices: list[int] | None = None,
    progress: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed a data set (PIL path) or cached images (eval-mode device augmentation), all items or
    those in ``indices``, gathered over ranks in index order; ``progress`` names a progress bar
    (PIL path; the device cache is fast)."""
    if isinstance(source, CachedImages):
        return embed_cached(
            model,
            source.cache,
            source.eval_augment,
            batch_size=cfg.train.eval_batch_size,
            device=device,
            indices=indices,
        )
    return embed_distributed(
        model,
        source,
        batch_size=cfg.train.eval_batch_size,
        num_workers=loader_workers(cfg, source),
        device=device,
        indices=indices,
        progress=progress,
        runtime=pass_runtime(cfg, source, None if indices is None else len(indices)),
        cache_model=False,  # the model changes every epoch: exported in memory only
    )


def build_cached_images(cfg: Config, dataset: Any, device: torch.device) -> CachedImages | None:
    """The uint8 cache of the training images for ``data.pipeline`` (None: stream with PIL instead).

    ``auto`` caches on CUDA only; ``cached`` always (falling back to streaming, with a warning, when
    the cache would exceed ``data.cache_max_bytes``). Feature data sets stream.
    """
    from plmetric.data.pipeline import DeviceAugment, cached_or_streaming

    from plmetric.data.backbones import backbone_spec

    d = cfg.data
    wanted = d.pipeline == "cached" or (d.pipeline == "auto" and device.type == "cuda")
    if not wanted or not isinstance(dataset, ImageDataset):
        return None
    interpolation = backbone_spec(cfg.model.backbone).interpolation
    if interpolation != "bilinear":  # the device resizes are bilinear: they would not match `embed`
        if d.pipeline == "cached":
            raise ValueError(
                f"data.pipeline=cached resizes bilinear, but model.backbone {cfg.model.backbone} expects "
                f"{interpolation} resizes: use data.pipeline=pil (or auto)"
            )
        return None
    cache = cached_or_streaming(
        dataset,
        d.image_size,
        cache_size=d.cache_size,
        max_bytes=d.cache_max_bytes,
        cache_path=d.cache_path,
        num_workers=d.num_workers,
        progress=False,
    )
    if cache is None:
        return None
    backbone = cfg.model.backbone
    train_augment = DeviceAugment.from_backbone(backbone, d.image_size, train=True, crop_scale_min=d.crop_scale_min)
    eval_augment = DeviceAugment.from_backbone(backbone, d.image_size, train=False, eval_resize=d.eval_resize)
    view = cfg.train.teacher_view
    teacher_augment = None if view == "same" else eval_augment if view == "clean" else copy.deepcopy(train_augment)
    return CachedImages(cache, train_augment, eval_augment, teacher_augment)


def evaluate_model(
    model: nn.Module, dataset: ImageDataset, cfg: Config, device: torch.device, progress: bool = False
) -> dict[str, Any]:
    """Zero-shot retrieval metrics of ``model`` on a labelled test split."""
    emb, labels, _ = embed_distributed(
        model,
        dataset,
        batch_size=cfg.train.eval_batch_size,
        num_workers=loader_workers(cfg, dataset),
        device=device,
        progress="evaluation" if progress else None,
        runtime=pass_runtime(cfg, dataset),
        cache_model=False,  # the model changes every epoch: exported in memory only
    )
    return evaluate(emb, labels, compute_nmi=False)


def pooled_features(
    model: nn.Module, dataset: ImageDataset | CachedImages, cfg: Config, device: torch.device, progress: bool = False
) -> torch.Tensor:
    """Pooled backbone features of a data set (for the PCA initialisation of the embedding layer)."""

    class _Pooled(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner.pooled_features(x)

    feats, _, _ = embed_source(_Pooled(model), dataset, cfg, device, progress="start features" if progress else None)
    return feats.to(device)
