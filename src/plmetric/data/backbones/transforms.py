"""Preprocessing: the PIL image -> normalised tensor transform of a backbone (eval and train)."""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral

from PIL import Image
from torch import Tensor
from torchvision import transforms

from plmetric.data.backbones.registry import backbone_spec


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert grayscale/CMYK/palette images (CUB has a few) to 3-channel RGB."""
    return image if image.mode == "RGB" else image.convert("RGB")


def build_transform(
    backbone: str,
    image_size: int = 224,
    train: bool = False,
    crop_scale_min: float = 0.16,
    eval_resize: str = "center_crop",
) -> Callable[[Image.Image], Tensor]:
    """Return the PIL image -> normalised ``(3, image_size, image_size)`` tensor transform for a backbone.

    Eval: resize the shorter side to ``R = round(image_size * 256 / 224)`` (the longer to
    ``int(R * long / short)``, truncated) with PIL's antialiased filter ``spec.interpolation``
    (bilinear for the named backbones, timm's choice for ``timm:NAME``), then centre-crop
    ``image_size`` at offsets ``int(round((side - image_size) / 2))``; with ``eval_resize="whole"``
    the whole image is resized to ``image_size x image_size`` instead (aspect ratio not kept).
    Train: ``RandomResizedCrop(image_size, scale=(crop_scale_min, 1))`` and a random horizontal flip.
    Then ``(x - mean) / std`` on [0, 1] pixels with the backbone's mean/std (EfficientNet-Lite:
    [-1, 1]; GoogLeNet/ResNet-50: ImageNet statistics). Images are converted to RGB first.

    Raises:
        ValueError: unknown backbone or non-positive ``image_size``.
    """
    spec = backbone_spec(backbone)
    if isinstance(image_size, bool) or not isinstance(image_size, Integral) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if not 0.0 < crop_scale_min <= 1.0:
        raise ValueError(f"crop_scale_min must lie in (0, 1], got {crop_scale_min!r}")
    interpolation = transforms.InterpolationMode(spec.interpolation)
    if train:
        geometry = [
            transforms.RandomResizedCrop(int(image_size), scale=(crop_scale_min, 1.0), interpolation=interpolation),
            transforms.RandomHorizontalFlip(),
        ]
    elif eval_resize == "whole":
        geometry = [transforms.Resize((int(image_size), int(image_size)), interpolation=interpolation)]
    elif eval_resize == "center_crop":
        geometry = [
            transforms.Resize(round(image_size * 256 / 224), interpolation=interpolation),
            transforms.CenterCrop(int(image_size)),
        ]
    else:
        raise ValueError(f"eval_resize must be center_crop or whole, got {eval_resize!r}")
    return transforms.Compose(
        [transforms.Lambda(_to_rgb), *geometry, transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    )
