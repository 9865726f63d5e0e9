"""Perceptual hashes of images (``imagehash.phash``), a second signal for near-duplicates beside the
embedding: a resized or recompressed copy of a small image can fall far from its original in the
network's features, while the 64-bit DCT hash of the 32 x 32 grey image barely changes.

Each image is recorded as :data:`HASH_BYTES` bytes: the phash of the image and the phash of its mirror
image (8 bytes each, ``np.packbits`` of imagehash's 8 x 8 boolean array, row-major). The distance of two
images is mirror-invariant: ``d(x, y) = min(H(h(x), h(y)), H(h(x), m(y)))`` with ``H`` the Hamming
distance (bits that differ, 0..64), ``h`` the phash and ``m`` the mirror's phash (``H(m(x), m(y))``
equals ``H(h(x), h(y))`` up to the DCT's sign pattern, so two terms suffice).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

HASH_BITS = 64
HASH_BYTES = 16
"""Bytes recorded per image: phash (8) then the mirror image's phash (8)."""


def perceptual_hashes(image: Any) -> np.ndarray:
    """``(16,)`` uint8: the phash of a PIL image and of its mirror image, packed."""
    import imagehash
    from PIL import ImageOps

    grey = image.convert("L")
    plain = np.packbits(imagehash.phash(grey).hash.reshape(-1))
    mirrored = np.packbits(imagehash.phash(ImageOps.mirror(grey)).hash.reshape(-1))
    return np.concatenate([plain, mirrored]).astype(np.uint8)


def hash_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mirror-invariant Hamming distances of rows ``a[k]`` and ``b[k]`` (both ``(n, 16)`` uint8):
    ``min(H(h_a, h_b), H(h_a, m_b))``, ints in 0..64."""
    a = np.asarray(a, dtype=np.uint8).reshape(-1, HASH_BYTES)
    b = np.asarray(b, dtype=np.uint8).reshape(-1, HASH_BYTES)
    plain = np.bitwise_count(a[:, :8] ^ b[:, :8]).sum(axis=1, dtype=np.int64)
    mirrored = np.bitwise_count(a[:, :8] ^ b[:, 8:]).sum(axis=1, dtype=np.int64)
    return np.minimum(plain, mirrored)


HASH_PAIR_BLOCK_ELEMENTS = 1 << 24
"""Hash comparisons held at once by :func:`hash_pair_blocks` (NumPy): rows x columns of a block, 16M
uint64 XORs (128 MiB) and their bit counts (16 MiB twice)."""
HASH_FAISS_ABOVE = 50_000
"""From this many images on, :func:`hash_pair_blocks` uses faiss's binary flat index (C++, all cores) when
faiss is installed. Measured on a shared 2-core machine, random hashes at distance <= 20: NumPy made
0.14 G comparisons a second (N^2 for N images: N^2 / 2 pairs, two orientations), 20k images in 2.9 s;
faiss 1.5 s. N = 50k then takes about 18 s in NumPy, 200k about 5 minutes, 1M about 2 hours
(:func:`numpy_seconds`); faiss is about 2x faster on 2 cores and scales with the cores."""
NUMPY_COMPARISONS_PER_SECOND = 0.14e9
"""The NumPy rate measured above, for :func:`numpy_seconds`' estimate."""
FAISS_QUERY_BLOCK = 4096
"""Query rows of one faiss range search (its results are held per block)."""


class HashAlongside:
    """A transform: an image -> ``(transform(image), its perceptual hashes as a (16,) uint8 tensor)``,
    so that the hashes are computed where the image is decoded (a DataLoader worker), from the same
    decoded image the embedding sees, before it is resized for the network."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> tuple[Any, Any]:
        import torch

        return self.transform(image), torch.from_numpy(perceptual_hashes(image))


def check_hashes(hashes: Any, what: str = "hashes") -> np.ndarray:
    """``hashes`` as a C-contiguous ``(N, 16)`` uint8 array.

    Raises:
        ValueError: another shape or type (naming ``what``).
    """
    array = np.asarray(hashes)
    if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != HASH_BYTES:
        raise ValueError(f"{what}: expected an (N, {HASH_BYTES}) uint8 array, got {array.dtype} {list(array.shape)}")
    return np.ascontiguousarray(array)


def check_hash_distance(value: Any) -> int:
    """A Hamming distance bound 0..64, or -1 (the hash signal off).

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not -1 <= int(value) <= HASH_BITS:
        raise ValueError(f"hash distance must be an integer in 0..{HASH_BITS} (or -1: off), got {value!r}")
    return int(value)


def _words(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The phash and the mirror's phash of each image as one uint64 each (the bytes' order does not
    change a Hamming distance)."""
    plain = np.ascontiguousarray(hashes[:, :8]).view(np.uint64).ravel()
    mirrored = np.ascontiguousarray(hashes[:, 8:]).view(np.uint64).ravel()
    return plain, mirrored


def hash_pair_blocks(
    hashes: np.ndarray, max_distance: int, *, use_faiss: bool | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The pairs of :func:`hash_pairs`, block by block of rows ``i`` (each pair in exactly one block), so
    that a caller can filter them before the next block is computed.

    NumPy: rows ``[a, b)`` are compared with columns ``[a, N)`` (only ``j > i`` kept) in blocks of at most
    :data:`HASH_PAIR_BLOCK_ELEMENTS` comparisons. faiss (``use_faiss``; default: from
    :data:`HASH_FAISS_ABOVE` images on, when installed): an ``IndexBinaryFlat`` of the phashes and one of
    the mirrors' phashes, each range-searched with the phashes of :data:`FAISS_QUERY_BLOCK` rows at a
    time (its radius is strict: ``max_distance + 1``); exact as well.
    """
    hashes = check_hashes(hashes)
    max_distance = check_hash_distance(max_distance)
    n = hashes.shape[0]
    if max_distance < 0 or n < 2:
        return
    if use_faiss is None:
        use_faiss = uses_faiss(n)
    if use_faiss:
        yield from _faiss_blocks(hashes, max_distance)
        return
    plain, mirrored = _words(hashes)
    rows = max(1, HASH_PAIR_BLOCK_ELEMENTS // n)
    for start in range(0, n - 1, rows):
        stop = min(start + rows, n - 1)
        columns = slice(start, n)
        block = plain[start:stop, None]
        distance = np.minimum(
            np.bitwise_count(block ^ plain[None, columns]), np.bitwise_count(block ^ mirrored[None, columns])
        )
        offsets = np.arange(start, stop)[:, None]
        keep = (distance <= max_distance) & (np.arange(start, n)[None, :] > offsets)
        r, c = np.nonzero(keep)
        yield (r + start).astype(np.int64), (c + start).astype(np.int64), distance[r, c].astype(np.int64)


def numpy_seconds(n: int) -> float:
    """About how long :func:`hash_pair_blocks` takes in NumPy for ``n`` images (the measured rate)."""
    return float(n) * float(n) / NUMPY_COMPARISONS_PER_SECOND


def uses_faiss(n: int) -> bool:
    """Whether :func:`hash_pair_blocks` picks faiss for ``n`` images by default."""
    return n >= HASH_FAISS_ABOVE and _faiss() is not None


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_blocks(hashes: np.ndarray, max_distance: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    faiss = _faiss()
    if faiss is None:
        raise ValueError('hash pairs through faiss: faiss is not installed (pip install "plmetric[faiss]")')
    plain = np.ascontiguousarray(hashes[:, :8])
    databases = []
    for part in (plain, np.ascontiguousarray(hashes[:, 8:])):
        index = faiss.IndexBinaryFlat(HASH_BITS)
        index.add(part)
        databases.append(index)
    n = hashes.shape[0]
    for start in range(0, n, FAISS_QUERY_BLOCK):
        queries = plain[start : start + FAISS_QUERY_BLOCK]
        found_i, found_j, found_d = [], [], []
        for index in databases:
            limits, distances, ids = index.range_search(queries, max_distance + 1)
            rows = np.repeat(np.arange(len(queries), dtype=np.int64) + start, np.diff(limits).astype(np.int64))
            keep = ids > rows
            found_i.append(rows[keep])
            found_j.append(ids[keep].astype(np.int64))
            found_d.append(distances[keep].astype(np.int64))
        i, j, d = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)
        order = np.lexsort((d, j, i))  # per pair, the smaller of its two distances first
        i, j, d = i[order], j[order], d[order]
        first = np.ones(len(i), dtype=bool)
        first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
        yield i[first], j[first], d[first]


def hash_pairs(
    hashes: np.ndarray, max_distance: int, *, use_faiss: bool | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``i < j`` whose mirror-invariant distance (:func:`hash_distances` of rows i and j) is at
    most ``max_distance``: ``(i, j, d)`` int64 arrays sorted by ``(i, j)``. Exact; memory bounded by the
    block (see :func:`hash_pair_blocks`) plus the pairs found. ``max_distance`` -1: no pairs."""
    blocks = list(hash_pair_blocks(hashes, max_distance, use_faiss=use_faiss))
    if not blocks:
        empty = np.empty(0, np.int64)
        return empty, empty.copy(), empty.copy()
    i, j, d = (np.concatenate(parts) for parts in zip(*blocks, strict=True))
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]
