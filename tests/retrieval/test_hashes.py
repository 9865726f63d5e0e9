"""Perceptual hashes (plmetric.retrieval.hashes): hash_pairs against a brute-force NumPy reference (NumPy
blocks, many small blocks, faiss), mirror invariance on real pixels, and the checks on bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from plmetric.retrieval import hashes as hashes_module
from plmetric.retrieval.hashes import check_hash_distance, check_hashes, hash_distances, hash_pairs, perceptual_hashes


def brute_force(h: np.ndarray, max_distance: int) -> set[tuple[int, int, int]]:
    """Every pair i < j with its distance, bit by bit (np.unpackbits), no shared code with hash_pairs."""
    bits = np.unpackbits(h, axis=1).astype(np.int64)  # (N, 128): phash bits, then the mirror's
    plain, mirrored = bits[:, :64], bits[:, 64:]
    found = set()
    for a in range(len(h)):
        for c in range(a + 1, len(h)):
            d = min(int(np.abs(plain[a] - plain[c]).sum()), int(np.abs(plain[a] - mirrored[c]).sum()))
            if d <= max_distance:
                found.add((a, c, d))
    return found


def clustered_hashes(n: int = 150, seed: int = 0) -> np.ndarray:
    """Hashes in families (a random hash with a few bits flipped per member), so that every distance
    from 0 to ~40 occurs, and some members' phash equal to another's mirror phash."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, (n, 128), dtype=np.uint8)
    for start in range(0, n, 6):
        base = bits[start].copy()
        for k in range(start, min(start + 6, n)):
            flip = rng.choice(64, rng.integers(0, 12), replace=False)
            bits[k] = base
            bits[k, flip] ^= 1
    bits[5, :64] = bits[0, 64:]  # image 5's phash is image 0's mirror phash
    return np.packbits(bits, axis=1)


@pytest.mark.parametrize("max_distance", [0, 3, 6, 20, 64])
def test_hash_pairs_equal_the_brute_force(max_distance):
    h = clustered_hashes()
    expected = brute_force(h, max_distance)
    i, j, d = hash_pairs(h, max_distance, use_faiss=False)
    assert set(zip(i.tolist(), j.tolist(), d.tolist(), strict=True)) == expected
    assert len(i) == len(expected) and (i < j).all()
    assert list(zip(i.tolist(), j.tolist())) == sorted(zip(i.tolist(), j.tolist()))
    np.testing.assert_array_equal(d, hash_distances(h[i], h[j]))


def test_hash_pairs_in_many_small_blocks_equal_one_block(monkeypatch):
    h = clustered_hashes(97, seed=3)
    whole = hash_pairs(h, 10, use_faiss=False)
    monkeypatch.setattr(hashes_module, "HASH_PAIR_BLOCK_ELEMENTS", 200)  # 2 rows a block
    blocks = list(hashes_module.hash_pair_blocks(h, 10, use_faiss=False))
    assert len(blocks) >= 40
    for a, b in zip(whole, hash_pairs(h, 10, use_faiss=False), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("max_distance", [0, 6, 20])
def test_hash_pairs_through_faiss_equal_the_brute_force(max_distance, monkeypatch):
    pytest.importorskip("faiss")
    monkeypatch.setattr(hashes_module, "FAISS_QUERY_BLOCK", 32)  # several query blocks
    h = clustered_hashes(120, seed=1)
    i, j, d = hash_pairs(h, max_distance, use_faiss=True)
    assert set(zip(i.tolist(), j.tolist(), d.tolist(), strict=True)) == brute_force(h, max_distance)
    assert len(set(zip(i.tolist(), j.tolist()))) == len(i)  # each pair once


def test_a_mirrored_copy_is_at_distance_zero_and_paired():
    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(128, 60, (48, 64, 3)).cumsum(axis=1) / 8, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    other = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    h = np.stack([perceptual_hashes(image), perceptual_hashes(other), perceptual_hashes(ImageOps.mirror(image))])
    assert hash_distances(h[0], h[2])[0] == 0 and hash_distances(h[2], h[0])[0] == 0
    i, j, d = hash_pairs(h, 0)
    assert list(zip(i.tolist(), j.tolist(), d.tolist())) == [(0, 2, 0)]


def test_no_pairs_when_off_or_too_few():
    h = clustered_hashes(12)
    assert all(len(a) == 0 for a in hash_pairs(h, -1))
    assert all(len(a) == 0 for a in hash_pairs(h[:1], 64))


@pytest.mark.parametrize("bad", [65, -2, 1.5, True, "6"])
def test_a_distance_outside_0_to_64_is_refused(bad):
    with pytest.raises(ValueError, match="0..64"):
        check_hash_distance(bad)


@pytest.mark.parametrize("bad", [np.zeros((3, 8), np.uint8), np.zeros((3, 16), np.int64), np.zeros(16, np.uint8)])
def test_hashes_of_another_shape_or_type_are_refused(bad):
    with pytest.raises(ValueError, match=r"\(N, 16\) uint8"):
        check_hashes(bad)
