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
