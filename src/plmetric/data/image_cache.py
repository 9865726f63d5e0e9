"""The decode-once image cache of :mod:`plmetric.data.pipeline`: every image of a data set decoded once,
resized (shorter side ``cache_size``), stored as ``uint8`` in one flat buffer in memory or in a
memory-mapped ``.npy`` file (:class:`ImageCache`), within a size limit checked from the image headers
before anything is decoded (:func:`resolve_max_bytes`, :class:`CacheTooLargeError`);
:func:`cached_or_streaming` falls back to streaming when the limit is exceeded.

Unreadable images are recorded in :attr:`ImageCache.missing` (warned about once, and marked on the
data set so that its own loaders skip them).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from plmetric.data.datasets import DECODE_ERRORS, ImageDataset, UnreadableImageWarning
from plmetric.data.images import image_size

DEFAULT_MAX_BYTES = 8 * 2**30
"""Default size limit of an image cache: 8 GiB."""
MAX_CACHE_BYTES = 2**50
"""The largest size limit accepted (1 PiB: more memory or disk than any one machine has)."""
MAX_BYTES_ENV = "PLMETRIC_CACHE_MAX_BYTES"
"""Environment variable overriding :data:`DEFAULT_MAX_BYTES` (bytes, or e.g. ``512M``, ``16G``)."""

_FORMAT_VERSION = 2  # 2: decoded by plmetric.data.images.open_image (EXIF orientation, 16-bit modes)
_META_SUFFIX = ".meta.npz"
_ESTIMATE_SAMPLE = 512  # images whose headers give a quick size estimate before the full scan
_CHUNK = 32  # images per thread-pool task



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
