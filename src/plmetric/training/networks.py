"""The student network in training: frozen stages, frozen BatchNorm, the PCA-initialised embedding layer.
(A backbone's stages and its cut in two live beside the backbones, :mod:`plmetric.data.backbones.stages`;
``backbone_stages``, ``split_backbone`` and ``tail_model`` stay importable from here.)

(The teacher is its moving average: :func:`plmetric.training.sampling.make_teacher`, :func:`plmetric.training.sampling.ema_update`.)
"""

from __future__ import annotations

import torch
from torch import nn

from plmetric.data.backbones.stages import backbone_stages, split_backbone, tail_model  # kept importable from here

__all__ = [
    "backbone_stages",
    "freeze_batchnorm",
    "freeze_stages",
    "frozen_stage_modules",
    "init_embedding_pca",
    "split_backbone",
    "tail_model",
]


def freeze_stages(model: nn.Module, count: int) -> None:
    """Freeze the parameters of the first ``count`` backbone stages (see :func:`backbone_stages`)."""
    stages = backbone_stages(model.backbone)
    if count > len(stages):
        raise ValueError(f"model.frozen_stages ({count}) exceeds the backbone's {len(stages)} stages")
    for stage in stages[:count]:
        stage.requires_grad_(False)


def frozen_stage_modules(model: nn.Module, count: int) -> list[nn.Module]:
    """The modules frozen by :func:`freeze_stages` (kept in eval mode during training)."""
    return backbone_stages(model.backbone)[:count]


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode (statistics fixed); call after ``model.train()``."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@torch.no_grad()
def init_embedding_pca(model: nn.Module, features: torch.Tensor) -> None:
    """Initialise the linear embedding layer with the top principal directions of pooled features.

    ``W = V_dᵀ`` (rows: the first ``d`` principal axes of the centred features), ``b = -W μ``, so the
    untrained embedding is the PCA projection and keeps the backbone's neighbourhoods as far as
    ``d`` components allow.
    """
    layer = model.embedding
    if not isinstance(layer, nn.Linear):
        return
    mean = features.mean(0)
    centred = (features - mean).double()
    d = layer.out_features
    q = min(d, centred.shape[0], centred.shape[1])
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    weight = torch.zeros_like(layer.weight, dtype=torch.float64)
    weight[:q] = vh[:q]
    if q < d:  # fewer samples than dimensions: fill the rest with orthogonal random directions
        extra = torch.randn(d - q, weight.shape[1], dtype=torch.float64)
        extra -= extra @ vh[:q].T @ vh[:q]
        weight[q:] = torch.linalg.qr(extra.T).Q.T
    layer.weight.copy_(weight.to(layer.weight.dtype))
    layer.bias.copy_(-(weight @ mean.double()).to(layer.bias.dtype))
