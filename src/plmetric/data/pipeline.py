"""A decode-once input pipeline: a compact ``uint8`` image cache and augmentation with tensor ops.

Streaming training data through PIL decodes every JPEG again in every epoch and augments it on the
CPU, which starves a fast GPU. This module decodes each image once into an :class:`ImageCache`
(``uint8``, shorter side resized to ``cache_size``, one flat buffer in memory or in a memory-mapped
file: :mod:`plmetric.data.image_cache`, its names re-exported here) and then augments batches with
tensor ops (:class:`DeviceAugment`) on the training device, fed
by :class:`CachedBatchLoader`, which prefetches batches in a background thread. The same code runs on
the CPU, where resizing uses PyTorch's ``uint8`` antialiased kernel (a port of Pillow's, so results
match PIL's to the rounding); on other devices the crops are converted to ``float32`` first.

Relation to :func:`plmetric.data.backbones.build_transform`:

* Eval (``train=False``): resize the shorter side to ``round(S * 256 / 224)`` and centre-crop ``S``.
  With ``cache_size`` equal to that eval resize (the default), the cache already *is* the resized
  image and the device only crops: the output equals the PIL transform's. With
  ``data.eval_resize=whole`` the whole cached image is resized to ``S x S``: a resize of a resize,
  close to the PIL transform's ``Resize((S, S))`` of the original but not bit-equal to it.
* Train: ``RandomResizedCrop(S, scale=(crop_scale_min, 1))`` plus a horizontal flip. Here the crop
  box is drawn on the *cached* image (see :func:`sample_crop_params`); since the cached image is a
  uniformly rescaled original, a box of relative area ``a`` and aspect ``r`` on it covers the same
  part of the scene as that box on the original, so the distribution of crops is the same. What
  differs is the resolution a crop starts from: a crop of the cached image is a crop of a resized
  original, so a small crop (``scale`` near ``crop_scale_min``) holds fewer source pixels and is
  upsampled where the PIL path would have downsampled. Choose a larger ``cache_size`` (e.g.
  ``image_size / sqrt(crop_scale_min)``) when that matters more than memory.

Unreadable images are recorded in :attr:`ImageCache.missing` (warned about once) and dropped from
batches the way :func:`plmetric.data.datasets.collate_skip_none` drops them; a batch left empty is ``None``.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plmetric.data.image_cache import (
    DEFAULT_MAX_BYTES,
    MAX_BYTES_ENV,
    CacheFallbackWarning,
    CacheTooLargeError,
    ImageCache,
    cached_or_streaming,
    default_cache_size,
    resized_shape,
    resolve_max_bytes,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_BYTES_ENV",
    "CacheFallbackWarning",
    "CacheTooLargeError",
    "CachedBatchLoader",
    "DeviceAugment",
    "ImageCache",
    "cached_or_streaming",
    "default_cache_size",
    "resized_shape",
    "resolve_max_bytes",
    "sample_crop_params",
    "sample_flips",
]


# ----------------------------------------------------------------------------- random crops


def sample_crop_params(
    heights: Tensor | Sequence[int] | int,
    widths: Tensor | Sequence[int] | int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Crop boxes drawn as ``transforms.RandomResizedCrop.get_params`` draws them, for many images at once.

    For each image (``height x width``, area ``A``): up to 10 tries of a target area
    ``A * U(scale)`` and an aspect ratio ``exp(U(log ratio))``, giving ``w = round(sqrt(area * r))``,
    ``h = round(sqrt(area / r))``; the first try with ``0 < w <= width`` and ``0 < h <= height`` is
    placed uniformly (``top ~ U{0..height-h}``, ``left ~ U{0..width-w}``). If all 10 fail, the centre
    crop of the whole image clamped to the ratio range. All tries are drawn at once, so the
    distribution is torchvision's but the random stream is not (the same seed gives other boxes).

    The scale is relative to the image given, here the cached (already resized) image: the same
    distribution of relative crop areas and aspect ratios as on the original.

    Args:
        heights: image heights, ``(B,)`` (or an int for one image).
        widths: image widths, ``(B,)`` (or an int).
        scale: range of the crop area relative to the image area.
        ratio: range of the crop aspect ratio (width / height).
        generator: CPU random generator (default: the global one).

    Returns:
        ``int64 (B, 4)`` boxes ``(top, left, height, width)``.
    """
    heights = torch.as_tensor(heights, dtype=torch.int64).reshape(-1)
    widths = torch.as_tensor(widths, dtype=torch.int64).reshape(-1)
    if heights.shape != widths.shape:
        raise ValueError(f"heights and widths differ in length: {heights.numel()} and {widths.numel()}")
    if scale[0] > scale[1] or ratio[0] > ratio[1]:
        raise ValueError(f"scale and ratio must be (min, max) ranges, got {scale} and {ratio}")
    n = heights.numel()
    hf, wf = heights.double(), widths.double()
    area = (hf * wf)[:, None]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * (torch.rand(n, 10, generator=generator, dtype=torch.float64) * (scale[1] - scale[0]) + scale[0])
    aspect = torch.exp(torch.rand(n, 10, generator=generator, dtype=torch.float64) * (log_hi - log_lo) + log_lo)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = ok.long().argmax(dim=1, keepdim=True)  # index of the first successful try (0 if none)
    found = ok.any(dim=1)
    h = h.gather(1, first).squeeze(1)
    w = w.gather(1, first).squeeze(1)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.floor(u[:, 0] * (heights - h + 1).double()).long().clamp_(min=0)
    left = torch.floor(u[:, 1] * (widths - w + 1).double()).long().clamp_(min=0)
    top = torch.minimum(top, heights - h)
    left = torch.minimum(left, widths - w)
    if not bool(found.all()):  # torchvision's fallback: the centre crop, clamped to the ratio range
        for b in torch.nonzero(~found).flatten().tolist():
            height, width = int(heights[b]), int(widths[b])
            in_ratio = width / height
            if in_ratio < min(ratio):
                fw, fh = width, int(round(width / min(ratio)))
            elif in_ratio > max(ratio):
                fh, fw = height, int(round(height * max(ratio)))
            else:
                fw, fh = width, height
            top[b], left[b], h[b], w[b] = (height - fh) // 2, (width - fw) // 2, fh, fw
    return torch.stack([top, left, h, w], dim=1)


def sample_flips(n: int, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """``bool (n,)`` horizontal-flip flags, each True with probability ``p`` (``RandomHorizontalFlip``)."""
    return torch.rand(n, generator=generator) < p


# ----------------------------------------------------------------------------- augmentation


class DeviceAugment(nn.Module):
    """Crop, resize, flip and normalise a batch of ``uint8`` images of different sizes with tensor ops.

    Train mode is ``RandomResizedCrop(S, scale, ratio)`` + ``RandomHorizontalFlip(flip_p)``; eval mode
    is ``Resize(eval_resize)`` + ``CenterCrop(S)`` (``eval_rule="whole"``: ``Resize((S, S))`` of the
    whole cached image); both end with ``ToTensor`` + ``Normalize(mean,
    std)``, i.e. ``(x / 255 - mean) / std``. Resizing is ``F.interpolate(mode="bilinear",
    antialias=True, align_corners=False)``, the tensor equivalent of PIL's bilinear resize. On the
    CPU it runs on ``uint8`` (PyTorch's port of Pillow's kernel: fast and equal to PIL's result to
    the rounding; the float kernel is much slower there), elsewhere on ``float32`` (PyTorch's
    ``uint8`` antialiased path is a CPU one), set by ``uint8_resize``.

    The mode is fixed at construction (attribute ``train_mode``); ``nn.Module.train()`` / ``.eval()``
    do not change it: build one module per mode.

    The crop, resize and flip loop over the images (they differ in size); images needing no resize
    (eval with the cache at the eval size) are only sliced. The normalisation (and the conversion to
    ``float32``) is one fused op on the whole batch.

    Args:
        image_size: output side ``S``.
        mean: per-channel mean on [0, 1] pixels.
        std: per-channel std on [0, 1] pixels.
        train: random crops and flips (True) or resize + centre crop (False).
        scale: crop-area range of the random crops (relative to the input image).
        ratio: aspect-ratio range of the random crops.
        flip_p: probability of a horizontal flip.
        eval_resize: shorter side before the centre crop in eval mode; default
            ``round(S * 256 / 224)`` as :func:`plmetric.data.backbones.build_transform`.
        eval_rule: ``center_crop`` (the above) or ``whole`` (the whole image to ``S x S``), as
            ``build_transform``'s ``eval_resize``.
        uint8_resize: resize ``uint8`` pixels (True) or ``float32`` ones (False); default: True on
            the CPU.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        train: bool = False,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        eval_resize: int | None = None,
        eval_rule: str = "center_crop",
        uint8_resize: bool | None = None,
    ) -> None:
        super().__init__()
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.train_mode = bool(train)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_p = float(flip_p)
        self.eval_resize = default_cache_size(self.image_size) if eval_resize is None else int(eval_resize)
        if self.eval_resize < self.image_size:
            raise ValueError(f"eval_resize {self.eval_resize} is smaller than image_size {self.image_size}")
        if eval_rule not in ("center_crop", "whole"):
            raise ValueError(f"eval_rule must be center_crop or whole, got {eval_rule!r}")
        self.eval_rule = eval_rule
        self.uint8_resize = uint8_resize
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std == x * (1 / (255 std)) - mean / std
        self.register_buffer("_mul", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("_sub", mean_t / std_t, persistent=False)

    @classmethod
    def from_backbone(
        cls,
        backbone: str,
        image_size: int = 224,
        train: bool = False,
        crop_scale_min: float = 0.16,
        eval_resize: str = "center_crop",
    ) -> DeviceAugment:
        """The tensor counterpart of :func:`plmetric.data.backbones.build_transform` with the same arguments."""
        from plmetric.data.backbones import backbone_spec

        spec = backbone_spec(backbone)
        if not 0.0 < crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must lie in (0, 1], got {crop_scale_min!r}")
        return cls(image_size, spec.mean, spec.std, train=train, scale=(crop_scale_min, 1.0), eval_rule=eval_resize)

    def sample_params(
        self, heights: Tensor | Sequence[int], widths: Tensor | Sequence[int], generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Random crop boxes ``int64 (B, 4)`` (top, left, h, w) and flips ``bool (B,)`` for train mode."""
        boxes = sample_crop_params(heights, widths, self.scale, self.ratio, generator)
        return boxes, sample_flips(len(boxes), self.flip_p, generator)

    def _use_uint8(self, device: torch.device) -> bool:
        return device.type == "cpu" if self.uint8_resize is None else self.uint8_resize

    def _resize(self, x: Tensor, size: tuple[int, int], use_uint8: bool) -> Tensor:
        """``(3, h, w)`` -> ``(1, 3, *size)``: antialiased bilinear, ``uint8`` or ``float32``."""
        x = x.unsqueeze(0)
        if tuple(x.shape[-2:]) == size:
            return x if use_uint8 else x.float()
        if not use_uint8:
            x = x.float()
        return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)

    def forward(
        self,
        images: Sequence[Tensor],
        boxes: Tensor | None = None,
        flips: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Augment ``B`` images into one normalised batch.

        Args:
            images: ``uint8 (3, h_i, w_i)`` tensors on this module's device (any strides).
            boxes: train mode: ``(B, 4)`` crop boxes (top, left, h, w) in each image's pixels;
                drawn with :meth:`sample_params` when ``None``. Ignored in eval mode.
            flips: train mode: ``bool (B,)`` horizontal flips; drawn when ``None``. Ignored in eval.
            generator: CPU generator for the draws.

        Returns:
            ``float32 (B, 3, S, S)``, contiguous, on the images' device.
        """
        size = self.image_size
        device = self._mul.device
        if len(images) == 0:
            return torch.empty(0, 3, size, size, device=device)
        use_uint8 = self._use_uint8(images[0].device)
        out = []
        if self.train_mode:
            if boxes is None or flips is None:
                shapes = torch.tensor([tuple(img.shape[-2:]) for img in images], dtype=torch.int64)
                drawn_boxes, drawn_flips = self.sample_params(shapes[:, 0], shapes[:, 1], generator)
                boxes = drawn_boxes if boxes is None else boxes
                flips = drawn_flips if flips is None else flips
            flip_list = torch.as_tensor(flips, dtype=torch.bool).tolist()
            for img, (top, left, h, w), flip in zip(images, boxes.tolist(), flip_list, strict=True):
                crop = self._resize(img[:, top : top + h, left : left + w], (size, size), use_uint8)
                out.append(crop.flip(-1) if flip else crop)  # flipping after the resize, as torchvision
        elif self.eval_rule == "whole":
            out = [self._resize(img, (size, size), use_uint8) for img in images]
        else:
            for img in images:
                h, w = img.shape[-2:]
                rh, rw = resized_shape(h, w, self.eval_resize)
                x = img if (rh, rw) == (h, w) else self._resize(img, (rh, rw), use_uint8)[0]
                top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
                out.append(x[:, top : top + size, left : left + size].unsqueeze(0))
        # uint8 pieces are converted to float once, by the fused normalisation -mean/std + x / (255 std)
        batch = torch.cat(out) if use_uint8 else torch.cat([o.float() for o in out])
        return torch.addcmul(-self._sub, batch, self._mul).contiguous()


# ----------------------------------------------------------------------------- the loader

_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class CachedBatchLoader:
    """Batches of augmented images from an :class:`ImageCache`, prefetched by a background thread.

    A drop-in replacement for ``DataLoader(dataset, batch_sampler=..., collate_fn=collate_skip_none)``
    whose images come out already on ``device``. For each list of indices from ``batch_sampler``
    the thread drops missing (unreadable) items, draws the crops and flips (train mode), and slices
    the ``uint8`` crops out of the cache. On the CPU it also runs ``augment`` (PyTorch kernels
    release the GIL, so this overlaps the training step); on an accelerator it packs the crops into
    one pinned buffer, and the consuming thread copies it with ``non_blocking=True`` and runs
    ``augment`` there (asynchronous kernels on the current stream).

    Like a ``DataLoader`` with workers, the thread runs up to ``prefetch`` batches ahead, so a batch
    sampler's position counts batches handed out, not trained on.

    Args:
        cache: the decoded images.
        batch_sampler: iterable of index lists (e.g. ``NeighbourhoodBatchSampler``), re-iterated
            by every ``iter()``.
        augment: the transform (train or eval); moved to ``device``.
        device: where the images go.
        prefetch: batches prepared ahead; 0 prepares each in the consuming thread.
        generator: CPU generator for crops and flips; default: seeded from the global torch RNG at
            each ``iter()`` (so ``torch.manual_seed`` makes runs repeatable).
        pin_memory: stage crops in pinned memory; default True for CUDA devices.
        teacher_augment: a second view of every image (e.g. eval mode: the whole, un-augmented
            image for the teacher); batches then hold ``[images, teacher_images]``.

    Yields:
        ``(images float32 (B, 3, S, S) on device, labels int64 (B,), index int64 (B,))`` with
        labels and index on the CPU (as a ``DataLoader`` gives them), or ``None`` for a batch whose
        every item is missing.
    """

    def __init__(
        self,
        cache: ImageCache,
        batch_sampler: Iterable[Sequence[int]],
        augment: DeviceAugment,
        device: torch.device | str = "cpu",
        *,
        prefetch: int = 2,
        generator: torch.Generator | None = None,
        pin_memory: bool | None = None,
        teacher_augment: DeviceAugment | None = None,
    ) -> None:
        self.cache = cache
        self.batch_sampler = batch_sampler
        self.device = torch.device(device)
        self.augment = augment.to(self.device)
        self.teacher_augment = teacher_augment.to(self.device) if teacher_augment is not None else None
        self.augments = [self.augment] + ([self.teacher_augment] if self.teacher_augment is not None else [])
        self.prefetch = int(prefetch)
        self.generator = generator
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        # CPU: the producer thread augments; elsewhere it stages crops and the consumer augments
        self._augment_in_thread = self.device.type == "cpu"

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def _cut(
        self, augment: DeviceAugment, images: list[Tensor], index: np.ndarray, generator: torch.Generator
    ) -> tuple[list[Tensor], Tensor | None]:
        """Draw one view's crops and flips (train mode) and slice the crops; eval mode keeps whole images."""
        if not augment.train_mode:
            return images, None
        shapes = torch.from_numpy(self.cache.shapes[index])
        boxes, flips = augment.sample_params(shapes[:, 0], shapes[:, 1], generator)
        crops = [img[:, t : t + h, s : s + w] for img, (t, s, h, w) in zip(images, boxes.tolist(), strict=True)]
        return crops, flips

    def _prepare(self, indices: Sequence[int], generator: torch.Generator) -> tuple | None:
        """CPU side of one batch: drop missing items, draw params, gather crops (and augment on the CPU)."""
        index = np.asarray(list(indices), dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= len(self.cache)):
            raise IndexError(f"batch index out of range for a cache of {len(self.cache)} images: {index.tolist()}")
        index = index[~self.cache.missing[index]]
        if index.size == 0:
            return None
        labels = torch.from_numpy(self.cache.labels[index])
        index_t = torch.from_numpy(index)
        images = [self.cache.get(i) for i in index]
        views = [self._cut(augment, images, index, generator) for augment in self.augments]
        if self._augment_in_thread:
            out = [self._augment(a, crops, flips) for a, (crops, flips) in zip(self.augments, views, strict=True)]
            return (out[0] if len(out) == 1 else out), labels, index_t
        return [(*self._pack(crops), flips) for crops, flips in views], labels, index_t

    def _pack(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Pack crops, (h, w, 3) each, into one (pinned) buffer for a single host-to-device copy."""
        shapes_hw = [tuple(img.shape[-2:]) for img in images]
        sizes = [3 * h * w for h, w in shapes_hw]
        flat = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=self.pin_memory)
        start = 0
        for img, (h, w), n in zip(images, shapes_hw, sizes, strict=True):
            flat[start : start + n].view(h, w, 3).copy_(img.permute(1, 2, 0))
            start += n
        return flat, shapes_hw

    @staticmethod
    def _augment(augment: DeviceAugment, images: list[Tensor], flips: Tensor | None) -> Tensor:
        """Run a transform on crops already cut (train: each crop is the whole of its tensor)."""
        boxes = None
        if augment.train_mode:
            boxes = torch.tensor([[0, 0, *img.shape[-2:]] for img in images], dtype=torch.int64)
        return augment(images, boxes, flips)

    def _finish(self, item: tuple | None) -> tuple[Any, Tensor, Tensor] | None:
        """Consumer side: for accelerators, copy the packed crops to the device and augment them."""
        if item is None or self._augment_in_thread:
            return item
        packed_views, labels, index = item
        out = []
        for augment, (flat, shapes_hw, flips) in zip(self.augments, packed_views, strict=True):
            flat = flat.to(self.device, non_blocking=self.pin_memory)
            images, start = [], 0
            for h, w in shapes_hw:
                images.append(flat[start : start + 3 * h * w].view(h, w, 3).permute(2, 0, 1))
                start += 3 * h * w
            out.append(self._augment(augment, images, flips))
        return (out[0] if len(out) == 1 else out), labels, index

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor] | None]:
        generator = self.generator
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        if self.prefetch <= 0:
            for indices in self.batch_sampler:
                yield self._finish(self._prepare(indices, generator))
            return
        slots: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    slots.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for indices in self.batch_sampler:
                    if stop.is_set() or not put(self._prepare(indices, generator)):
                        return
                put(_END)
            except BaseException as err:  # handed to the consumer, re-raised there
                put(_Failure(err))

        thread = threading.Thread(target=produce, name="CachedBatchLoader", daemon=True)
        thread.start()
        try:
            while True:
                item = slots.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield self._finish(item)
        finally:
            stop.set()
            thread.join()
