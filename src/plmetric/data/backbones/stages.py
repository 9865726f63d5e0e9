"""A backbone's stages: the units ``model.frozen_stages`` counts (`backbone_stages`), and the backbone
cut after its first stages (`split_backbone`, `tail_model`) for training only the tail on cached maps.
"""

from __future__ import annotations

from torch import nn

from plmetric.data.backbones.model import EmbeddingModel
from plmetric.data.backbones.timm_models import TimmTrunk


def backbone_stages(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's top-level modules in order, with ``nn.Sequential`` children expanded one level
    (EfficientNet-Lite: stem, bn, 7 block groups, head conv, bn; ResNet: conv1 ... layer4); for a
    ``timm:NAME`` trunk its stages cut at timm's ``feature_info``
    (:meth:`TimmTrunk.stages`: a ViT's patch embedding + first block, then one
    block each)."""
    if isinstance(backbone, TimmTrunk):
        return [stage for stage in backbone.stages() if any(True for _ in stage.parameters())]
    stages: list[nn.Module] = []
    for child in backbone.children():
        stages.extend(child.children() if isinstance(child, nn.Sequential) else [child])
    return [stage for stage in stages if any(True for _ in stage.parameters())]


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
    _, tail = split_backbone(model, frozen)
    out = EmbeddingModel(f"{model.backbone_name}[{frozen}:]", tail, model.feature_dim, 0)
    out.embedding, out.embedding_dim = model.embedding, model.embedding_dim
    return out
