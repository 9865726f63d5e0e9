"""Preprocessing: the PIL image -> normalised tensor transform of a backbone (eval and train)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from numbers import Integral
from typing import Any

from PIL import Image
from torch import Tensor
from torchvision import transforms

from plmetric.data.backbones.registry import backbone_spec
from plmetric.data.backbones.specs import DEFAULT_EVAL_RESIZE, EVAL_RESIZE_RULES


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert grayscale/CMYK/palette images (CUB has a few) to 3-channel RGB."""
    return image if image.mode == "RGB" else image.convert("RGB")


def build_transform(
    backbone: str,
    image_size: int = 224,
    train: bool = False,
    crop_scale_min: float = 0.16,
    eval_resize: str = DEFAULT_EVAL_RESIZE,
) -> Callable[[Image.Image], Tensor]:
    """Return the PIL image -> normalised ``(3, image_size, image_size)`` tensor transform for a backbone.

    Eval, by ``eval_resize`` (:data:`~plmetric.data.backbones.specs.EVAL_RESIZE_RULES`), with PIL's
    antialiased filter ``spec.interpolation`` (bilinear for the named backbones, timm's choice for
    ``timm:NAME``):

    * ``center_crop``: resize the shorter side to ``R = round(image_size * 256 / 224)`` (the longer to
      ``int(R * long / short)``, truncated), then centre-crop ``image_size`` at offsets
      ``int(round((side - image_size) / 2))``: the borders of the longer side are cut off;
    * ``whole``: resize the whole image to ``image_size x image_size`` (``Resize((S, S))``: the aspect
      ratio is not kept, nothing is cut off).

    Train (``eval_resize`` unused): ``RandomResizedCrop(image_size, scale=(crop_scale_min, 1))`` and a random
    horizontal flip.
    Then ``(x - mean) / std`` on [0, 1] pixels with the backbone's mean/std (EfficientNet-Lite:
    [-1, 1]; GoogLeNet/ResNet-50: ImageNet statistics). Images are converted to RGB first.

    Raises:
        ValueError: unknown backbone, non-positive ``image_size`` or unknown ``eval_resize``.
    """
    spec = backbone_spec(backbone)
    if isinstance(image_size, bool) or not isinstance(image_size, Integral) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if not 0.0 < crop_scale_min <= 1.0:
        raise ValueError(f"crop_scale_min must lie in (0, 1], got {crop_scale_min!r}")
    if eval_resize not in EVAL_RESIZE_RULES:
        raise ValueError(f"eval_resize must be {' or '.join(EVAL_RESIZE_RULES)}, got {eval_resize!r}")
    interpolation = transforms.InterpolationMode(spec.interpolation)
    if train:
        geometry = [
            transforms.RandomResizedCrop(int(image_size), scale=(crop_scale_min, 1.0), interpolation=interpolation),
            transforms.RandomHorizontalFlip(),
        ]
    elif eval_resize == "whole":
        geometry = [transforms.Resize((int(image_size), int(image_size)), interpolation=interpolation)]
    else:
        geometry = [
            transforms.Resize(round(image_size * 256 / 224), interpolation=interpolation),
            transforms.CenterCrop(int(image_size)),
        ]
    return transforms.Compose(
        [transforms.Lambda(_to_rgb), *geometry, transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    )


def eval_resize_of(description: Mapping[str, Any]) -> str:
    """The eval rule a checkpoint's metadata or an index's model description records (``eval_resize``,
    checked by :func:`plmetric.data.backbones.check_model_metadata`); ``center_crop`` when it records
    none (checkpoints and indexes made before the choice existed)."""
    return str(description.get("eval_resize", DEFAULT_EVAL_RESIZE))


def description_transform(description: Mapping[str, Any]) -> Callable[[Image.Image], Tensor]:
    """The eval transform a checkpoint's metadata or an index's model description records: its
    ``backbone``, ``image_size`` (224 when absent) and :func:`eval_resize_of`."""
    return build_transform(
        description["backbone"],
        image_size=int(description.get("image_size", 224)),
        train=False,
        eval_resize=eval_resize_of(description),
    )
