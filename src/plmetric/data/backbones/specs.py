"""The backbones' names and static facts (`BackboneSpec`), and the error for weights that cannot be obtained."""

from __future__ import annotations

from dataclasses import dataclass

BACKBONE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "googlenet", "resnet50")
TIMM_PREFIX = "timm:"  # model.backbone = "timm:NAME": any model timm knows

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGNED_UNIT_MEAN = (0.5, 0.5, 0.5)  # (x - 0.5) / 0.5 maps [0, 1] to [-1, 1]
SIGNED_UNIT_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about a backbone.

    Attributes:
        name: one of `BACKBONE_NAMES` or ``timm:NAME``.
        feature_dim: channels of the final feature map, i.e. the pooled feature size.
        mean: per-channel mean for input normalisation, ``x' = (x - mean) / std`` on [0, 1] pixels.
        std: per-channel std for input normalisation.
        default_image_size: side of the square input crop used by default (the native size).
        interpolation: resampling filter of the resizes (``bilinear`` or ``bicubic``; PIL's
            antialiased filters on PIL images).
    """

    name: str
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_image_size: int
    interpolation: str = "bilinear"


NAMED_SPECS: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", 1280, SIGNED_UNIT_MEAN, SIGNED_UNIT_STD, 224),
    "efficientnet_lite1": BackboneSpec("efficientnet_lite1", 1280, SIGNED_UNIT_MEAN, SIGNED_UNIT_STD, 240),
    "efficientnet_lite2": BackboneSpec("efficientnet_lite2", 1280, SIGNED_UNIT_MEAN, SIGNED_UNIT_STD, 260),
    "googlenet": BackboneSpec("googlenet", 1024, IMAGENET_MEAN, IMAGENET_STD, 224),
    "resnet50": BackboneSpec("resnet50", 2048, IMAGENET_MEAN, IMAGENET_STD, 224),
}


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (no network, missing package file, ...)."""


BACKBONE_CHOICES = f"one of {', '.join(BACKBONE_NAMES)}, or {TIMM_PREFIX}NAME with a model timm knows"


INTERPOLATIONS = ("bilinear", "bicubic")

EVAL_RESIZE_RULES = ("center_crop", "whole")
"""How the eval transform (:func:`plmetric.data.backbones.build_transform`) fits an image to ``S x S``:
``center_crop`` resizes the shorter side to ``round(S * 256 / 224)`` and crops the centre; ``whole``
resizes the whole image to ``S x S`` (the aspect ratio is not kept). A checkpoint or index without the
field was made with ``center_crop``."""
DEFAULT_EVAL_RESIZE = "center_crop"
