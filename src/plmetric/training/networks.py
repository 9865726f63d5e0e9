"""The student network in training: frozen stages, frozen BatchNorm, the PCA-initialised embedding layer.

(The teacher is its moving average: :func:`plmetric.training.sampling.make_teacher`, :func:`plmetric.training.sampling.ema_update`.)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "backbone_stages",
    "freeze_batchnorm",
    "freeze_stages",
    "frozen_stage_modules",
    "init_embedding_pca",
    "split_backbone",
    "tail_model",
]


def backbone_stages(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's top-level modules in order, with ``nn.Sequential`` children expanded one level
    (EfficientNet-Lite: stem, bn, 7 block groups, head conv, bn; ResNet: conv1 ... layer4); for a
    ``timm:NAME`` trunk its stages cut at timm's ``feature_info``
    (:meth:`plmetric.data.backbones.TimmTrunk.stages`: a ViT's patch embedding + first block, then one
    block each)."""
    from plmetric.data.backbones import TimmTrunk

    if isinstance(backbone, TimmTrunk):
        return [stage for stage in backbone.stages() if any(True for _ in stage.parameters())]
    stages: list[nn.Module] = []
    for child in backbone.children():
        stages.extend(child.children() if isinstance(child, nn.Sequential) else [child])
    return [stage for stage in stages if any(True for _ in stage.parameters())]


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


def _expanded_children(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's children in order, ``nn.Sequential`` ones expanded one level (every module,
    also those without parameters): a trunk whose forward applies them in this order."""
    children: list[nn.Module] = []
    for child in backbone.children():
        children.extend(child.children() if isinstance(child, nn.Sequential) else [child])
    return children


def split_backbone(model: nn.Module, frozen: int) -> tuple[nn.Sequential, nn.Sequential]:
    """The backbone cut after its first ``frozen`` stages (:func:`backbone_stages`): ``(prefix, tail)``
    with ``tail(prefix(x)) == backbone(x)``, sharing the modules (no copy).

    For trunks whose forward is their children in order (EfficientNet-Lite0, ResNet-50); the
    parameter-free modules right after the cut (ReLU, pooling) stay with the prefix.

    Raises:
        ValueError: ``frozen`` out of range, or a backbone whose forward is not its children in order.
    """
    backbone = model.backbone
    if getattr(model, "backbone_name", None) == "googlenet":
        raise ValueError("split_backbone: GoogLeNet's forward is not its children in order (transform_input)")
    if str(getattr(model, "backbone_name", "")).startswith("timm:"):
        raise ValueError(
            f"split_backbone: a {model.backbone_name} trunk's forward is not its children in order; "
            "train.mode=tail is for the named backbones (train it end to end or with model.frozen_stages)"
        )
    stages = backbone_stages(backbone)
    if not 0 <= frozen <= len(stages):
        raise ValueError(f"split_backbone: frozen must lie in [0, {len(stages)}], got {frozen}")
    children = _expanded_children(backbone)
    cut = 0
    if frozen:
        cut = next(i for i, c in enumerate(children) if c is stages[frozen - 1]) + 1
        while cut < len(children) and not any(True for _ in children[cut].parameters()):
            cut += 1
    return nn.Sequential(*children[:cut]), nn.Sequential(*children[cut:])


def tail_model(model: nn.Module, frozen: int) -> nn.Module:
    """The model without its first ``frozen`` backbone stages: an ``EmbeddingModel`` whose trunk
    takes the prefix's feature maps (see :func:`split_backbone`); embedding layer shared."""
    from plmetric.data.backbones import EmbeddingModel

    _, tail = split_backbone(model, frozen)
    out = EmbeddingModel(f"{model.backbone_name}[{frozen}:]", tail, model.feature_dim, 0)
    out.embedding, out.embedding_dim = model.embedding, model.embedding_dim
    return out
