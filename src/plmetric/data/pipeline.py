"""A decode-once input pipeline: a compact ``uint8`` image cache and augmentation with tensor ops.

Streaming training data through PIL decodes every JPEG again in every epoch and augments it on the
CPU, which starves a fast GPU. This module decodes each image once into an :class:`ImageCache`
(``uint8``, shorter side resized to ``cache_size``, one flat buffer in memory or in a memory-mapped
file) and then augments batches with tensor ops (:class:`DeviceAugment`) on the training device, fed
by :class:`CachedBatchLoader`, which prefetches batches in a background thread. The same code runs on
the CPU, where resizing uses PyTorch's ``uint8`` antialiased kernel (a port of Pillow's, so results
match PIL's to the rounding); on other devices the crops are converted to ``float32`` first.

Relation to :func:`plmetric.data.backbones.build_transform`:

* Eval (``train=False``): resize the shorter side to ``round(S * 256 / 224)`` and centre-crop ``S``.
  With ``cache_size`` equal to that eval resize (the default), the cache already *is* the resized
  image and the device only crops: the output equals the PIL transform's.
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

import hashlib
import math
import os
import queue
import re
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from plmetric.data.datasets import DECODE_ERRORS, ImageDataset, UnreadableImageWarning
from plmetric.data.images import image_size

DEFAULT_MAX_BYTES = 8 * 2**30
MAX_CACHE_BYTES = 2**50
"""The largest size limit accepted (1 PiB: more memory or disk than any one machine has)."""
"""Default size limit of an image cache: 8 GiB."""
MAX_BYTES_ENV = "PLMETRIC_CACHE_MAX_BYTES"
"""Environment variable overriding :data:`DEFAULT_MAX_BYTES` (bytes, or e.g. ``512M``, ``16G``)."""

_FORMAT_VERSION = 2  # 2: decoded by plmetric.data.images.open_image (EXIF orientation, 16-bit modes)
_META_SUFFIX = ".meta.npz"
_ESTIMATE_SAMPLE = 512  # images whose headers give a quick size estimate before the full scan
_CHUNK = 32  # images per thread-pool task

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


class CacheTooLargeError(RuntimeError):
    """The image cache would exceed its size limit; stream images instead.

    Attributes:
        estimated_bytes: the (estimated or exact) size the cache would need.
        max_bytes: the limit it exceeds.
    """

    def __init__(self, message: str, estimated_bytes: int, max_bytes: int) -> None:
        super().__init__(message)
        self.estimated_bytes = estimated_bytes
        self.max_bytes = max_bytes


class CacheFallbackWarning(UserWarning):
    """An image cache was not built (too large); images are streamed from disk instead."""


# ----------------------------------------------------------------------------- sizes


def default_cache_size(image_size: int) -> int:
    """The eval resize of :func:`plmetric.data.backbones.build_transform`: ``round(image_size * 256 / 224)``."""
    return round(image_size * 256 / 224)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)`` after resizing the shorter side to ``size``, exactly as ``transforms.Resize(size)``.

    The longer side is ``int(size * long / short)`` (truncated), the rule torchvision uses.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resolve_max_bytes(max_bytes: int | str | None = None) -> int:
    """The cache size limit: ``max_bytes``, else ``$PLMETRIC_CACHE_MAX_BYTES``, else 8 GiB.

    Args:
        max_bytes: bytes as an int, or a string such as ``"1500000"``, ``"512M"``, ``"16GiB"``
            (K/M/G/T are powers of 1024).

    Raises:
        ValueError: a string that is not a size, or a size over :data:`MAX_CACHE_BYTES`.
    """
    if max_bytes is None:
        max_bytes = os.environ.get(MAX_BYTES_ENV) or DEFAULT_MAX_BYTES
    given = max_bytes
    if isinstance(max_bytes, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", max_bytes, re.IGNORECASE)
        if match is None:
            raise ValueError(f"not a size in bytes: {max_bytes[:60]!r} (e.g. 8589934592, 512M, 16G)")
        power = " kmgt".index(match.group(2).lower() or " ")
        max_bytes = float(match.group(1)) * 1024**power  # 1e999: inf
    if not max_bytes <= MAX_CACHE_BYTES:
        raise ValueError(f"a size in bytes must be at most {MAX_CACHE_BYTES} (1024T), got {str(given)[:60]!r}")
    return int(max_bytes)


def _gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------- the cache


class ImageCache:
    """Every image of a data set decoded once, resized (shorter side ``cache_size``), stored as ``uint8``.

    Pixels live in one flat ``uint8`` buffer (a NumPy array, or a copy-on-write ``np.memmap`` of a
    ``.npy`` file), image ``i`` at ``data[offsets[i] : offsets[i] + 3 * h_i * w_i]`` in ``(h, w, 3)``
    order. Build one with :meth:`build` (or :func:`cached_or_streaming`), reopen a file with
    :meth:`load`.

    Attributes:
        data: the flat ``uint8`` buffer.
        offsets: ``int64 (N,)`` start of each image in ``data``.
        shapes: ``int64 (N, 2)`` cached ``(h, w)`` of each image; ``(0, 0)`` for missing ones.
        missing: ``bool (N,)``, True for images that could not be decoded.
        labels: ``int64 (N,)`` labels of the source data set (-1 = unlabelled).
        cache_size: the shorter side of every cached image.
        name: the source data set's name.
        path: the file holding ``data``, or ``None`` when it is in memory.
        fingerprint: hash of the source files and ``cache_size`` (file caches only), used to
            decide whether a file can be reused.
    """

    def __init__(
        self,
        data: np.ndarray,
        offsets: np.ndarray,
        shapes: np.ndarray,
        missing: np.ndarray,
        labels: np.ndarray,
        cache_size: int,
        name: str = "",
        path: Path | None = None,
        fingerprint: str = "",
    ) -> None:
        self.data = data
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
        self.missing = np.asarray(missing, dtype=bool)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.cache_size = int(cache_size)
        self.name = name
        self.path = path
        self.fingerprint = fingerprint
        n = len(self.offsets)
        if not (len(self.shapes) == len(self.missing) == len(self.labels) == n):
            raise ValueError("ImageCache: offsets, shapes, missing and labels must have the same length")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        dataset: ImageDataset,
        cache_size: int,
        *,
        max_bytes: int | str | None = None,
        path: str | os.PathLike | None = None,
        num_workers: int | None = None,
        progress: bool = False,
    ) -> ImageCache:
        """Decode every image of ``dataset`` once (PIL, RGB) and cache it at shorter side ``cache_size``.

        The resize is ``transforms.Resize(cache_size)`` on the PIL image (antialiased bilinear), so a
        cached image equals the eval transform's resized image when ``cache_size`` is the eval resize.

        Args:
            dataset: the source; its ``load_image`` decodes an item, its ``labels`` are copied.
            cache_size: shorter side of the cached images (see :func:`default_cache_size`).
            max_bytes: size limit (see :func:`resolve_max_bytes`). Checked first on an estimate from
                up to 512 image headers, then on the exact size from all headers, before anything is
                decoded or allocated.
            path: write the buffer to this ``.npy`` file (memory-mapped) with its index in
                ``<path>.meta.npz``, both written atomically (temporary files, then ``os.replace``).
                An existing valid cache there built from the same files (paths, sizes and
                modification times, or the same in-memory pixels) and ``cache_size`` is reused.
            num_workers: decoding threads (PIL releases the GIL while decoding and resizing);
                0 decodes in the calling thread; default ``min(8, cpu_count)``.
            progress: show a tqdm progress bar.

        Returns:
            The cache; unreadable images are marked in :attr:`missing` with a single
            :class:`~plmetric.data.datasets.UnreadableImageWarning` naming them.

        Raises:
            CacheTooLargeError: the cache would exceed ``max_bytes``.
        """
        cache_size = int(cache_size)
        if cache_size <= 0:
            raise ValueError(f"cache_size must be a positive integer, got {cache_size}")
        limit = resolve_max_bytes(max_bytes)
        workers = min(8, os.cpu_count() or 1) if num_workers is None else int(num_workers)
        path = Path(path) if path is not None else None
        fingerprint = _fingerprint(dataset, cache_size) if path is not None else ""
        if path is not None:
            reused = cls._try_load(path, fingerprint)
            if reused is not None:
                reused.labels = dataset.labels.copy()
                reused.name = dataset.name
                if reused.missing.any():
                    _warn_unreadable(dataset, dict.fromkeys(np.flatnonzero(reused.missing).tolist(), f"in {path}"))
                return reused
        layout = _plan_layout(dataset, cache_size, limit, workers, progress)  # 1. sizes, from headers only
        data = _decode_into_buffer(dataset, layout, path, fingerprint, workers, progress)  # 2. the pixels
        if layout.errors:
            _warn_unreadable(dataset, layout.errors)
        return cls(
            data,
            layout.offsets,
            layout.shapes,
            layout.missing,
            dataset.labels.copy(),
            cache_size,
            dataset.name,
            path,
            fingerprint,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImageCache:
        """Open a cache written by :meth:`build` with ``path`` (memory-mapped, copy-on-write).

        Raises:
            FileNotFoundError: no complete cache at ``path``.
            ValueError: the files are inconsistent or of another format version.
        """
        path = Path(path)
        meta_path = _meta_path(path)
        if not (path.exists() and meta_path.exists()):
            raise FileNotFoundError(f"no image cache at {path} (expects {path} and {meta_path})")
        with np.load(meta_path) as meta:
            fields = {key: meta[key] for key in meta.files}
        if int(fields.get("version", -1)) != _FORMAT_VERSION:
            raise ValueError(f"image cache {path}: format version {fields.get('version')}, expected {_FORMAT_VERSION}")
        data = np.load(path, mmap_mode="c")
        if data.dtype != np.uint8 or data.ndim != 1 or data.size < int(fields["data_bytes"]):
            raise ValueError(f"image cache {path}: data file does not match its index {meta_path}")
        return cls(
            data,
            fields["offsets"],
            fields["shapes"],
            fields["missing"],
            fields["labels"],
            int(fields["cache_size"]),
            str(fields["name"]),
            path,
            str(fields["fingerprint"]),
        )

    @classmethod
    def _try_load(cls, path: Path, fingerprint: str) -> ImageCache | None:
        """The cache at ``path`` if it is complete and has ``fingerprint``, else ``None``."""
        try:
            cache = cls.load(path)
        except (OSError, ValueError, KeyError):
            return None
        return cache if cache.fingerprint == fingerprint else None

    # -- access -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        """Bytes of pixel data."""
        return int((3 * self.shapes[:, 0] * self.shapes[:, 1]).sum())

    def get(self, i: int) -> Tensor:
        """Cached image ``i`` as a ``uint8 (3, h, w)`` tensor.

        It is a view of the buffer, without a copy, with channels-last strides (the buffer is in
        ``(h, w, 3)`` order); do not write to it.

        Raises:
            KeyError: image ``i`` is missing (it could not be decoded).
        """
        i = int(i)
        if self.missing[i]:
            raise KeyError(f"image {i} of {self.name or 'the cache'} is missing (it could not be decoded)")
        h, w = (int(v) for v in self.shapes[i])
        start = int(self.offsets[i])
        return torch.from_numpy(self.data[start : start + 3 * h * w]).view(h, w, 3).permute(2, 0, 1)

    def __repr__(self) -> str:
        where = f", file {self.path}" if self.path is not None else ", in memory"
        return (
            f"ImageCache({self.name!r}, {len(self)} images, {int(self.missing.sum())} missing, "
            f"shorter side {self.cache_size}, {_gib(self.nbytes)}{where})"
        )


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + _META_SUFFIX)


@dataclass
class _Layout:
    """Where each image goes in a cache's buffer, planned from the image headers: cached ``shapes``
    (``(0, 0)`` for missing images), ``nbytes`` and ``offsets`` in the buffer, the ``missing`` images
    with their ``errors``, and the ``total`` bytes."""

    cache_size: int
    shapes: np.ndarray
    nbytes: np.ndarray
    offsets: np.ndarray
    missing: np.ndarray
    errors: dict[int, str]
    total: int


def _plan_layout(dataset: ImageDataset, cache_size: int, limit: int, workers: int, progress: bool) -> _Layout:
    """Step 1 of :meth:`ImageCache.build`: the sizes, from headers only, checked against ``limit``
    first on an estimate from up to :data:`_ESTIMATE_SAMPLE` headers, then on the exact total.

    Raises:
        CacheTooLargeError: the estimate or the exact total exceeds ``limit``.
    """
    n = len(dataset)
    if n > _ESTIMATE_SAMPLE:
        sample = np.linspace(0, n - 1, _ESTIMATE_SAMPLE).round().astype(np.int64)
        sizes, _ = _header_sizes(dataset, sample, workers)
        ok = sizes[:, 0] > 0
        if ok.any():
            per_image = np.mean([3 * math.prod(resized_shape(h, w, cache_size)) for h, w in sizes[ok]])
            estimate = int(per_image * n)
            if estimate > limit:
                raise CacheTooLargeError(_too_large(dataset, n, cache_size, estimate, limit, "about "), estimate, limit)
    sizes, errors = _header_sizes(dataset, np.arange(n), workers, progress)
    missing = sizes[:, 0] <= 0
    shapes = np.zeros((n, 2), dtype=np.int64)
    for i in np.flatnonzero(~missing):
        shapes[i] = resized_shape(int(sizes[i, 0]), int(sizes[i, 1]), cache_size)
    nbytes = 3 * shapes[:, 0] * shapes[:, 1]
    total = int(nbytes.sum())
    if total > limit:
        raise CacheTooLargeError(_too_large(dataset, n, cache_size, total, limit, ""), total, limit)
    offsets = np.zeros(n, dtype=np.int64)
    if n:
        offsets[1:] = np.cumsum(nbytes)[:-1]
    return _Layout(cache_size, shapes, nbytes, offsets, missing, errors, total)


def _decode_into_buffer(
    dataset: ImageDataset, layout: _Layout, path: Path | None, fingerprint: str, workers: int, progress: bool
) -> np.ndarray:
    """Step 2 of :meth:`ImageCache.build`: every image decoded into one buffer, in memory or a ``.npy``
    file at ``path`` with its index, both written atomically (temporary files, then ``os.replace``;
    removed on any error). Returns the buffer (a file's memory-mapped copy-on-write)."""
    if path is None:
        data = np.empty(layout.total, dtype=np.uint8)
        _decode_all(dataset, layout, data, workers, progress)
        return data
    suffix = f".tmp-{os.getpid()}-{threading.get_ident()}"
    tmp = path.with_name(f".{path.name}{suffix}")
    meta_tmp = path.with_name(f".{_meta_path(path).name}{suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(max(layout.total, 1),))
    try:
        _decode_all(dataset, layout, data, workers, progress)
        data.flush()
        meta = {
            "version": np.int64(_FORMAT_VERSION),
            "cache_size": np.int64(layout.cache_size),
            "offsets": layout.offsets,
            "shapes": layout.shapes,
            "missing": layout.missing,
            "labels": dataset.labels,
            "data_bytes": np.int64(layout.total),
            "fingerprint": np.str_(fingerprint),
            "name": np.str_(dataset.name),
        }
        with open(meta_tmp, "wb") as f:
            np.savez(f, **meta)
        os.replace(tmp, path)
        os.replace(meta_tmp, _meta_path(path))  # the index last: its presence marks a complete cache
        return np.load(path, mmap_mode="c")
    except BaseException:
        for leftover in (tmp, meta_tmp):
            leftover.unlink(missing_ok=True)
        raise


def _decode_all(dataset: ImageDataset, layout: _Layout, data: np.ndarray, workers: int, progress: bool) -> None:
    """Decode every image the headers found into ``data`` at its offset (PIL, ``Resize(cache_size)``),
    in ``workers`` threads; an image that fails is added to the layout's ``missing`` and ``errors``."""
    shapes, offsets, nbytes, missing = layout.shapes, layout.offsets, layout.nbytes, layout.missing
    cache_size = layout.cache_size

    def decode(indices: np.ndarray) -> list[tuple[int, str]]:
        failed = []
        for i in indices:
            i = int(i)
            try:
                image = TF.resize(dataset.load_image(i), [cache_size], InterpolationMode.BILINEAR)
                pixels = np.asarray(image, dtype=np.uint8)
                # the header's size is the stored one; the EXIF orientation may swap it
                # (the same bytes: resized_shape is symmetric), so the decoded shape is kept
                stored = (int(shapes[i, 0]), int(shapes[i, 1]))
                if pixels.shape[2:] != (3,) or pixels.shape[:2] not in (stored, stored[::-1]):
                    raise ValueError(
                        f"decoded size {pixels.shape[:2]} differs from the header's "
                        f"(expected {stored} after resizing)"
                    )
                shapes[i] = pixels.shape[:2]
                data[offsets[i] : offsets[i] + nbytes[i]] = pixels.reshape(-1)
            except DECODE_ERRORS as err:
                failed.append((i, f"{type(err).__name__}: {err}"))
        return failed

    todo = np.flatnonzero(~missing)
    for i, err in _run_chunks(decode, todo, workers, progress, f"caching {dataset.name or 'images'}"):
        missing[i] = True
        layout.errors[i] = err
    shapes[missing] = 0


def _fingerprint(dataset: ImageDataset, cache_size: int) -> str:
    """Hash of what a cache depends on: format, cache size and the source files (or pixels)."""
    digest = hashlib.sha256(f"v{_FORMAT_VERSION} size {cache_size} n {len(dataset)}\n".encode())
    if dataset.paths is not None:
        for p in dataset.paths:
            try:
                st = os.stat(p)
                stamp = f"{st.st_size} {st.st_mtime_ns}"
            except OSError:
                stamp = "unreadable"
            digest.update(f"{p}\0{stamp}\n".encode())
    else:
        digest.update(str(dataset.arrays.shape).encode())
        digest.update(memoryview(np.ascontiguousarray(dataset.arrays)).cast("B"))
    return digest.hexdigest()


def _header_sizes(
    dataset: ImageDataset, indices: np.ndarray, workers: int, progress: bool = False
) -> tuple[np.ndarray, dict[int, str]]:
    """``(len(indices), 2)`` original ``(h, w)`` per index (-1 where unreadable) and the errors."""
    sizes = np.full((len(indices), 2), -1, dtype=np.int64)
    errors: dict[int, str] = {}
    if dataset.arrays is not None:
        sizes[:] = dataset.arrays.shape[1:3]
        return sizes, errors
    position = {int(i): k for k, i in enumerate(indices)}

    def read(chunk: np.ndarray) -> list[tuple[int, str]]:
        failed = []
        for i in chunk:
            i = int(i)
            try:
                w, h = image_size(str(dataset.paths[i]))  # stored size; the pixel limit and file checks
                sizes[position[i]] = (h, w)
            except DECODE_ERRORS as err:
                failed.append((i, f"{type(err).__name__}: {err}"))
        return failed

    for i, err in _run_chunks(read, indices, workers, progress, "reading image sizes"):
        errors[i] = err
    return sizes, errors


def _run_chunks(fn: Any, indices: np.ndarray, workers: int, progress: bool, desc: str) -> list[Any]:
    """Run ``fn`` on chunks of ``indices`` (in a thread pool if ``workers`` > 0); concatenate the lists."""
    from tqdm import tqdm  # not tqdm.auto: its asyncio tqdm calls iter(loader), a 2nd worker pool

    chunks = [indices[k : k + _CHUNK] for k in range(0, len(indices), _CHUNK)]
    results: list[Any] = []
    with tqdm(total=len(indices), desc=desc, disable=not progress, leave=False) as bar:
        if workers <= 0 or len(chunks) <= 1:
            for chunk in chunks:
                results += fn(chunk)
                bar.update(len(chunk))
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for chunk, out in zip(chunks, pool.map(fn, chunks), strict=True):
                    results += out
                    bar.update(len(chunk))
    return results


def _too_large(dataset: ImageDataset, n: int, cache_size: int, nbytes: int, limit: int, about: str) -> str:
    return (
        f"an image cache of {dataset.name or 'the data set'} ({n:,} images, shorter side {cache_size}) would take "
        f"{about}{_gib(nbytes)} ({nbytes:,} bytes), over the limit max_bytes={limit:,} bytes ({_gib(limit)}); "
        f"raise it with the max_bytes argument or the {MAX_BYTES_ENV} environment variable, or lower cache_size"
    )


def _warn_unreadable(dataset: ImageDataset, errors: dict[int, str]) -> None:
    """One warning for all unreadable images of a cache build (listing up to five); the data set
    records them, so that its own loaders skip them without decoding them again."""
    dataset.mark_unreadable(errors)
    shown = sorted(errors)[:5]
    where = [str(dataset.paths[i]) if dataset.paths is not None else f"in-memory item {i}" for i in shown]
    details = "; ".join(f"{w} ({errors[i]})" for w, i in zip(where, shown, strict=True))
    more = f" and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    warnings.warn(
        f"image cache of {dataset.name or 'the data set'}: {len(errors)} unreadable image(s) will be skipped: "
        f"{details}{more}",
        UnreadableImageWarning,
        stacklevel=3,
    )


def cached_or_streaming(
    dataset: ImageDataset,
    image_size: int | None = None,
    *,
    cache_size: int | None = None,
    max_bytes: int | str | None = None,
    cache_path: str | os.PathLike | None = None,
    num_workers: int | None = None,
    progress: bool = False,
) -> ImageCache | None:
    """Build (or reuse) an :class:`ImageCache` of ``dataset``, or return ``None`` to stream instead.

    Args:
        dataset: the source data set.
        image_size: the network's input side; gives the default ``cache_size``
            (:func:`default_cache_size`).
        cache_size: shorter side of the cached images; required if ``image_size`` is not given.
        max_bytes: size limit (int bytes or e.g. ``"16G"``); default ``$PLMETRIC_CACHE_MAX_BYTES`` or 8 GiB.
        cache_path: ``.npy`` file to memory-map (reused when it matches), or ``None`` for memory.
        num_workers: decoding threads (see :meth:`ImageCache.build`).
        progress: show a progress bar while building.

    Returns:
        The cache, or ``None`` (with a :class:`CacheFallbackWarning` naming the estimated size, the
        limit and how to raise it) when it would exceed ``max_bytes``.
    """
    if cache_size is None:
        if image_size is None:
            raise ValueError("cached_or_streaming needs image_size or cache_size")
        cache_size = default_cache_size(image_size)
    try:
        return ImageCache.build(
            dataset, cache_size, max_bytes=max_bytes, path=cache_path, num_workers=num_workers, progress=progress
        )
    except CacheTooLargeError as err:
        warnings.warn(f"{err}; streaming images from disk instead", CacheFallbackWarning, stacklevel=2)
        return None


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
    is ``Resize(eval_resize)`` + ``CenterCrop(S)``; both end with ``ToTensor`` + ``Normalize(mean,
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
        self.uint8_resize = uint8_resize
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std == x * (1 / (255 std)) - mean / std
        self.register_buffer("_mul", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("_sub", mean_t / std_t, persistent=False)

    @classmethod
    def from_backbone(
        cls, backbone: str, image_size: int = 224, train: bool = False, crop_scale_min: float = 0.16
    ) -> DeviceAugment:
        """The tensor counterpart of :func:`plmetric.data.backbones.build_transform` with the same arguments."""
        from plmetric.data.backbones import backbone_spec

        spec = backbone_spec(backbone)
        if not 0.0 < crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must lie in (0, 1], got {crop_scale_min!r}")
        return cls(image_size, spec.mean, spec.std, train=train, scale=(crop_scale_min, 1.0))

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
