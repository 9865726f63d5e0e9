"""The pile tools' library functions on a sharded float16 index (issue 31): the same answers as on the
same vectors in memory, from mapped rows read block by block, never materialised."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from numerics import gamma
from plmetric.manifold import ann
from plmetric.retrieval import mapped
from plmetric.retrieval.duplicates import find_duplicates
from plmetric.retrieval.groups import find_groups_sampled
from plmetric.retrieval.index import index_identity, load_embeddings, write_index
from plmetric.retrieval.neighbours import nearest_others
from plmetric.retrieval.stored import ShardedIndexWriter, StoredPaths, StoredVectors, open_index

DIM = 16
MODEL = {"checkpoint": None, "backbone": "efficientnet_lite0", "embedding_dim": 0, "output_dim": DIM, "image_size": 32}
U16 = 2.0**-11
"""float16's unit roundoff: a stored component a is a(1 + e), |e| <= 2^-11 (normal numbers); below
2^-14 the absolute error is at most 2^-25."""
# <a', b'> - <a, b> for unit a, b rounded to float16: |<da, b> + <a, db> + <da, db>| <= 2 e + e^2 with
# ||da|| <= e = 2^-11 + sqrt(d) 2^-25 (relative, plus the subnormal floor); each side also computed in
# float32 (gamma_d each, the stored vectors' norms within 1 + e).
E16 = U16 + DIM**0.5 * 2.0**-25
FLOAT16_BOUND = 2 * E16 + E16**2 + 2 * gamma(DIM, torch.float32) * (1 + E16) ** 2


def _clustered(n: int, clusters: int = 6, seed: int = 0, spread: float = 0.15, copies: bool = True) -> torch.Tensor:
    """Unit vectors around ``clusters`` random centres (well apart in 16-d); with ``copies``, row 37 i + 1 a
    near copy of row 37 i (of another cluster's image)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[np.arange(n) % clusters] + spread * rng.normal(size=(n, DIM)) / DIM**0.5
    if copies:
        x[1::37] = x[0::37][: len(x[1::37])] + 0.002 * rng.normal(size=(len(x[1::37]), DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return torch.from_numpy(x.astype(np.float32))


def _both(tmp_path: Path, x: torch.Tensor, rows: int = 23) -> tuple[Path, Path]:
    """The same vectors as a one-file float32 index and a sharded float16 one (shards of ``rows``)."""
    names = [f"item:{i}" for i in range(len(x))]
    labels = torch.zeros(len(x), dtype=torch.long)
    single, sharded = tmp_path / "single.safetensors", tmp_path / "sharded.safetensors"
    write_index(single, x, labels, names, MODEL)
    write_index(sharded, x, labels, names, MODEL, dtype="float16", rows_per_shard=rows)
    return single, sharded


@pytest.fixture()
def no_materialising(monkeypatch):
    """Reading a sharded index whole fails the test."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a sharded index was read whole")

    monkeypatch.setattr(StoredVectors, "materialize", refuse)
    monkeypatch.setattr(StoredPaths, "to_list", refuse)
    import plmetric.retrieval.index as index_module

    monkeypatch.setattr(index_module, "load_embeddings", refuse)
    return refuse


def _same_ranks(ref_scores: np.ndarray, ids_a: np.ndarray, ids_b: np.ndarray) -> None:
    """Equal ids wherever the reference's scores around that rank are more than twice the bound apart."""
    for row in range(len(ref_scores)):
        for rank in range(ref_scores.shape[1]):
            gaps = np.abs(ref_scores[row] - ref_scores[row, rank])
            gaps[rank] = np.inf
            if gaps.min() > 2 * FLOAT16_BOUND:
                assert ids_a[row, rank] == ids_b[row, rank], (row, rank)


def test_exact_neighbours_of_a_sharded_float16_index_equal_the_in_memory_ones(tmp_path, no_materialising, monkeypatch):
    x = _clustered(200)
    single, sharded = _both(tmp_path, x)
    stored = open_index(sharded)
    monkeypatch.setattr("plmetric.retrieval.neighbours.BLOCK_ELEMENTS", 64 * 40)  # many database blocks
    monkeypatch.setattr("plmetric.retrieval.neighbours.FAISS_BATCH", 64)  # several query blocks
    said: list[tuple[int, float]] = []
    scores, ids = nearest_others(stored.vectors, 7, estimate=lambda rows, s: said.append((rows, s)))
    memory_scores, memory_ids = nearest_others(x, 7)
    assert said and said[0][0] == 64, "the estimate comes after the first block"
    assert not (ids == torch.arange(200)[:, None]).any(), "an image is never its own neighbour"
    assert (scores - memory_scores).abs().max().item() <= FLOAT16_BOUND
    _same_ranks(memory_scores.numpy(), ids.numpy(), memory_ids.numpy())
    # the ranks themselves: each row's scores are the exact top 7 of the float16 vectors
    half = x.half().float()
    sims = half @ half.T
    sims.fill_diagonal_(-torch.inf)
    assert torch.allclose(scores, sims.topk(7, dim=1).values, atol=2 * gamma(DIM, torch.float32))


@pytest.mark.skipif(not ann.faiss_available(), reason="faiss not installed")
def test_neighbours_through_faiss_read_the_query_rows_from_the_mapping(tmp_path, no_materialising):
    x = _clustered(300)
    names = [f"item:{i}" for i in range(len(x))]
    from plmetric.core.options import IndexOptions

    plan = ann.plan_index(len(x), IndexOptions(kind="hnsw"))
    path = tmp_path / "hnsw.safetensors"
    write_index(path, x, torch.zeros(len(x), dtype=torch.long), names, MODEL, plan, dtype="float16", rows_per_shard=50)
    from plmetric.retrieval.index import load_faiss_index

    faiss_index = load_faiss_index(path)
    stored = open_index(path)
    scores, ids = nearest_others(stored.vectors, 5, faiss_index)
    exact_scores, exact_ids = nearest_others(stored.vectors, 5)
    assert not (ids == torch.arange(300)[:, None]).any()
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids.tolist(), exact_ids.tolist(), strict=True)])
    assert recall >= 0.95  # HNSW on 300 clustered points: near exact
    # faiss scores the float16 vectors it was built from (float32 copies of the stored ones)
    found = (ids == exact_ids) & (ids >= 0)
    assert (scores[found] - exact_scores[found]).abs().max().item() <= FLOAT16_BOUND


def test_duplicates_of_a_sharded_float16_index_equal_the_in_memory_ones(tmp_path, no_materialising):
    x = _clustered(300, spread=0.6)  # cluster members at cosine ~0.7, planted copies above 0.9999
    _, sharded = _both(tmp_path, x)
    stored = open_index(sharded)
    hashes = np.zeros((300, 16), dtype=np.uint8)  # every hash equal: the hash signal reads mapped rows too
    mapped_found = find_duplicates(stored.vectors, 0.99, hashes=hashes, hash_distance=0, hash_floor=0.995)
    memory_found = find_duplicates(x, 0.99, hashes=hashes, hash_distance=0, hash_floor=0.995)
    a, b = mapped_found.pair_list, memory_found.pair_list
    # the planted copies (cosine > 0.999) are far from both cuts (no other pair reaches 0.99)
    assert len(a.i) == len(b.i) > 0
    assert np.array_equal(a.i, b.i) and np.array_equal(a.j, b.j) and np.array_equal(a.signal, b.signal)
    assert np.abs(a.score - b.score).max() <= FLOAT16_BOUND
    # the same groups (their order: by weakest score, which float16 rounding may swap among copies ~1e-5 apart)
    assert sorted(g.tolist() for g in mapped_found.groups) == sorted(g.tolist() for g in memory_found.groups)


def test_groups_fitted_on_a_sample_are_the_same_from_mapped_rows_and_assign_every_image(tmp_path, no_materialising):
    x = _clustered(600, clusters=4, spread=0.3, copies=False)
    _, sharded = _both(tmp_path, x, rows=97)
    stored = open_index(sharded)
    said: list[int] = []
    mapped_groups = find_groups_sampled(stored.vectors, n_groups=4, sample=150, estimate=lambda r, s: said.append(r))
    memory_groups = find_groups_sampled(x, n_groups=4, sample=150)
    assert mapped_groups.sample == 150 and said == [97]
    assert np.array_equal(mapped_groups.group, memory_groups.group)
    assert np.array_equal(mapped_groups.representative, memory_groups.representative)
    assert np.nanmax(np.abs(mapped_groups.score - memory_groups.score)) <= FLOAT16_BOUND
    # the four planted clusters, each image in its own cluster's group (k-means' assignment step)
    truth = np.arange(600) % 4
    assert mapped_groups.count == 4 and (mapped_groups.group != -1).all()
    for cluster in range(4):
        assert len(set(mapped_groups.group[truth == cluster].tolist())) == 1
    # each member's score is its cosine to its group's mean direction over the whole pile
    half = x.half().float().double().numpy()
    for g in range(1, 5):
        members = mapped_groups.group == g
        direction = half[members].sum(0)
        direction /= np.linalg.norm(direction)
        assert np.allclose(mapped_groups.score[members], half[members] @ direction, atol=1e-6)


def test_the_identity_of_a_one_file_index_is_unchanged_and_a_sharded_one_is_read_from_its_record(
    tmp_path, monkeypatch
):
    x = _clustered(120)
    single, sharded = _both(tmp_path, x)
    embeddings, _, paths, _ = load_embeddings(single)
    assert mapped.stored_identity(open_index(single)) == index_identity(embeddings, paths)
    stored = open_index(sharded)

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a vector was read")

    for name in ("rows", "block", "blocks", "materialize"):
        monkeypatch.setattr(StoredVectors, name, refuse)
    identity = mapped.stored_identity(stored)
    assert identity == mapped.stored_identity(open_index(sharded))  # the same index: the same identity
    monkeypatch.undo()
    # grown by --add-to (new shards named): another identity; the old shards untouched
    with ShardedIndexWriter.extending(stored) as writer:
        writer.add(x[:5], torch.zeros(5, dtype=torch.long), [f"item:new{i}" for i in range(5)],
                   stats=torch.zeros(5, 2, dtype=torch.long))
        writer.commit(stored.model)
    assert mapped.stored_identity(open_index(sharded)) != identity


def test_the_estimate_is_the_rows_at_the_first_blocks_rate():
    said: list[str] = []
    estimate = mapped.RateEstimate("neighbours", 1_000_000, said.append)
    estimate.first_block(10_000, 10_000 / 1_400)
    estimate.first_block(20_000, 1.0)  # said once
    assert said == ["neighbours of 1,000,000 images: about 12 min (first 10,000 at 1,400 rows/s)"]
    whole: list[str] = []
    mapped.RateEstimate("neighbours", 500, whole.append).first_block(500, 0.1)
    assert whole == []  # the first block was all of it: nothing left to estimate
    assert mapped.duration(40) == "40 s" and mapped.duration(3 * 3600) == "3.0 h"
