"""The eval preprocessing with Pillow and NumPy alone: the same input as the eval transform of
:func:`plmetric.data.backbones.build_transform`, without importing torch.

What ``plmetric search`` needs to embed one query through a cached ONNX export in well under a second
(importing torch and torchvision alone takes several). The rule is the one an index records
(``model.preprocessing``, :func:`plmetric.retrieval.index.preprocessing`) and an export states
(:func:`plmetric.retrieval.export.preprocessing_rule`), step by step as torchvision computes it on a
PIL image:

1. ``Resize(R)``: the shorter side to ``R = resize_shorter_side``, the longer one to
   ``int(R * long / short)`` (truncated, in double precision; a square image counts its width as
   the shorter side), with Pillow's ``Image.resize`` and the recorded filter (antialiased), skipped
   when the size is already right;
2. ``CenterCrop(S)``: ``S x S`` at ``top = int(round((h - S) / 2.0))``, ``left = int(round((w - S) / 2.0))``
   (Python's ``round``, halves to even); ``R >= S`` always, so no padding;

   or, for the ``whole`` rule (``"resize": "whole"``, ``resize_to`` ``[S, S]``), instead of 1 and 2:
   ``Resize((S, S))``, the whole image to ``S x S`` (``Image.resize((S, S), filter)``, the aspect ratio
   not kept, skipped when the size is already right), nothing cropped;
3. ``ToTensor`` + ``Normalize``: ``x = pixel / 255`` then ``(x - mean) / std`` per channel, each step
   one correctly rounded float32 operation, as torch does it: the result equals the transform's
   bit for bit (``tests/data/test_preprocess.py`` checks it on real images of odd sizes).

It imports the standard library, NumPy and Pillow only (no other plmetric module, no torch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["PIL_FILTERS", "EvalPreprocessing", "eval_input", "resized_size"]

PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
"""The interpolations an index may record (those of :data:`plmetric.data.backbones` specs) as
torchvision maps them to Pillow filters for PIL images."""


@dataclass(frozen=True)
class EvalPreprocessing:
    """The eval preprocessing of one model, by its rule ``resize``: ``center_crop`` resizes the shorter side
    to ``resize_shorter_side`` and centre-crops ``image_size``; ``whole`` resizes the whole image to
    ``image_size x image_size`` (``resize_shorter_side`` None); both with ``interpolation``, then
    ``(pixel / 255 - mean) / std`` per RGB channel."""

    resize: str
    image_size: int
    resize_shorter_side: int | None
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def center_crop(self) -> int | None:
        """The side of the centre crop (``center_crop``), None for ``whole``."""
        return self.image_size if self.resize == "center_crop" else None

    @classmethod
    def from_record(cls, record: Any, image_size: int) -> EvalPreprocessing:
        """The preprocessing an index records (``model.preprocessing``) for inputs ``image_size``
        square, checked field by field: without ``resize``, the centre crop of ``build_transform``
        (``resize_shorter_side`` ``round(S * 256 / 224)``, ``center_crop`` ``S``); with ``"resize":
        "whole"``, ``resize_to`` ``[S, S]`` and no crop fields; a known interpolation, 3 finite means and
        3 positive finite standard deviations.

        Raises:
            ValueError: a field is missing, of another type, or not what ``build_transform`` does
                for that size (the message names it).
        """
        if not isinstance(record, Mapping):
            raise ValueError(f"preprocessing must be a JSON object, got {type(record).__name__}")
        resize = record.get("resize", "center_crop")
        if resize == "whole":
            shorter = _whole_geometry(record, image_size)
        elif resize == "center_crop":
            shorter = _crop_geometry(record, image_size)
        else:
            raise ValueError(f"preprocessing resize must be whole (or absent: the centre crop), got {_shown(resize)}")
        interpolation = record.get("interpolation")
        if interpolation not in PIL_FILTERS:
            raise ValueError(
                f"preprocessing interpolation must be {' or '.join(PIL_FILTERS)}, got {_shown(interpolation)}"
            )
        mean, std = _triple(record.get("mean"), "mean", False), _triple(record.get("std"), "std", True)
        return cls(resize, image_size, shorter, interpolation, mean, std)


def _crop_geometry(record: Mapping[str, Any], image_size: int) -> int:
    """The checked ``resize_shorter_side`` of a centre-crop record for inputs ``image_size`` square."""
    if "resize_to" in record:
        raise ValueError("preprocessing records resize_to (the whole-image rule) but no resize 'whole'")
    size = _int(record.get("center_crop"), "center_crop")
    shorter = _int(record.get("resize_shorter_side"), "resize_shorter_side")
    if size != image_size or shorter != round(image_size * 256 / 224):
        raise ValueError(
            f"preprocessing resizes to {shorter} and crops {size} px; for inputs of {image_size} px the "
            f"eval transform resizes to {round(image_size * 256 / 224)} and crops {image_size}"
        )
    return shorter


def _whole_geometry(record: Mapping[str, Any], image_size: int) -> None:
    """Check a whole-image record's ``resize_to`` (``[S, S]`` for inputs ``image_size`` square) and that
    it records no crop."""
    crop = [key for key in ("center_crop", "resize_shorter_side") if key in record]
    if crop:
        raise ValueError(f"preprocessing resizes the whole image but also records {' and '.join(crop)}")
    to = record.get("resize_to")
    if not isinstance(to, list | tuple) or len(to) != 2:
        raise ValueError(f"preprocessing resize_to must be a list of 2 positive integers, got {_shown(to)}")
    width, height = _int(to[0], "resize_to"), _int(to[1], "resize_to")
    if (width, height) != (image_size, image_size):
        raise ValueError(
            f"preprocessing resizes the whole image to {width}x{height} px; for inputs of {image_size} px the "
            f"eval transform resizes it to {image_size}x{image_size}"
        )


def _shown(value: Any) -> str:
    """``repr(value)`` cut to 80 characters (a hostile record's value in a one-line message)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:80]}... ({len(text):,} characters)"


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"preprocessing {name} must be a positive integer, got {_shown(value)}")
    return value


def _triple(value: Any, name: str, positive: bool) -> tuple[float, float, float]:
    ok = isinstance(value, list | tuple) and len(value) == 3
    ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok or (positive and not all(v > 0 for v in value)):
        kind = "positive finite numbers" if positive else "finite numbers"
        raise ValueError(f"preprocessing {name} must be a list of 3 {kind}, got {_shown(value)}")
    return (float(value[0]), float(value[1]), float(value[2]))


def resized_size(width: int, height: int, shorter_side: int) -> tuple[int, int]:
    """``(new_width, new_height)`` of torchvision's ``Resize(shorter_side)``: the shorter side (the width
    of a square) becomes ``shorter_side``, the longer ``int(shorter_side * long / short)``."""
    if width <= height:
        return shorter_side, int(shorter_side * height / width)
    return int(shorter_side * width / height), shorter_side


def eval_input(image: Image.Image, rule: EvalPreprocessing) -> np.ndarray:
    """One 8-bit RGB image (e.g. from :func:`plmetric.data.images.open_image`) as the network's input:
    float32 ``(3, S, S)``, C-contiguous, equal to the eval transform's tensor."""
    if image.mode != "RGB":
        image = image.convert("RGB")  # the transform's first step (open_image already gives RGB)
    s = rule.image_size
    if rule.resize_shorter_side is None:  # whole: Resize((S, S)), the aspect ratio not kept
        new_size = (s, s)
    else:
        new_size = resized_size(image.width, image.height, rule.resize_shorter_side)
    if new_size != image.size:
        image = image.resize(new_size, PIL_FILTERS[rule.interpolation])
    new_w, new_h = new_size
    top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))  # 0, 0 for whole
    pixels = np.asarray(image, dtype=np.uint8)[top : top + s, left : left + s]
    x = pixels.astype(np.float32) / np.float32(255)
    x = (x - np.asarray(rule.mean, np.float32)) / np.asarray(rule.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
