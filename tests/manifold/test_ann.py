"""faiss indexes (plmetric.manifold.ann): parameter rules, the planted duplicate found first by every kind,
flat = the exact torch search within float32 rounding, IVF/HNSW recall, growing = building at once."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from numerics import gamma
from point_sets import noisy_copies, planted_duplicates

from plmetric.manifold import ann
from plmetric.core.options import IndexOptions
from plmetric.retrieval.index import top_k

pytest.importorskip("faiss")


def test_parameters_follow_the_size_and_the_options():
    assert ann.default_nlist(5000) == 5000 // 39  # 4 sqrt(n) = 283 would leave < 39 training points a cell
    assert ann.default_nlist(1_000_000) == 4000 and ann.default_nlist(10) == 1
    assert ann.default_nprobe(4000) == 250 and ann.default_nprobe(128) == 8 and ann.default_nprobe(3) == 3
    assert ann.plan_index(10_000) is None  # IndexOptions.kind: none
    assert ann.plan_index(ann.AUTO_EXACT_BELOW - 1, kind="auto") is None
    auto = ann.plan_index(ann.AUTO_EXACT_BELOW, kind="auto")
    assert auto.kind == ann.AUTO_KIND == "hnsw"
    assert auto.params == {"m": IndexOptions.hnsw_m, "ef_construction": 80, "ef_search": 64}
    big = ann.plan_index(2_000_000, kind="hnsw", hnsw_m=16)
    assert big.params == {"m": 16, "ef_construction": 200, "ef_search": 128}
    ivf = ann.plan_index(5000, kind="ivf", nprobe=500)
    assert ivf.params == {"nlist": 128, "nprobe": 128, "trained_on": 5000}  # nprobe capped at nlist
    assert ann.plan_index(5000, kind="flat").params == {}
    with pytest.raises(ValueError, match="--nlist 60: IVF needs at least as many vectors as cells"):
        ann.plan_index(50, kind="ivf", nlist=60)
    with pytest.raises(ValueError, match="kind must be none, auto, flat, ivf or hnsw"):
        ann.plan_index(50, kind="lsh")
    with pytest.raises(ValueError, match="hnsw_m must be an integer >= 2"):
        ann.plan_index(50, kind="hnsw", hnsw_m=1)


@pytest.mark.parametrize("kind", ann.FAISS_KINDS)
def test_every_kind_finds_the_source_of_a_noisy_copy_first(kind):
    x = planted_duplicates(3000, 64, seed=2)
    queries, sources = noisy_copies(x, 200, noise=0.3)
    plan = ann.plan_index(len(x), kind=kind)
    scores, ids = ann.search_index(ann.build_index(x, plan), queries, 5, plan)
    assert ids.shape == (200, 5) and bool((scores[:, :-1] >= scores[:, 1:]).all())
    assert torch.equal(ids[:, 0], sources)


def test_flat_ranks_like_the_exact_torch_search_within_float32_rounding():
    """Each score is a float32 dot product of length d: within ``b = γ_d ‖q‖ ‖x‖`` of the exact
    value, for any summation order (torch's MKL and faiss's BLAS/SIMD kernels alike). The j-th
    best computed score is then within b of the j-th best exact score, so the exact score of the
    neighbour either search puts at rank j is within 2b of the exact j-th best; where the exact
    scores around rank j are more than 2b apart, both must return the same neighbour, and their
    scores differ by at most 2b (2 γ_64 ≈ 7.6e-6 < 1e-5 for these unit vectors)."""
    d, k = 64, 10
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(4000, d, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(300, d, generator=g), dim=1)
    plan = ann.plan_index(len(x), kind="flat")
    faiss_scores, faiss_ids = ann.search_index(ann.build_index(x, plan), q, k, plan)
    torch_scores, torch_ids = top_k(q, x, k)
    exact = q.double() @ x.double().T
    best = exact.topk(k + 1, dim=1)
    b = gamma(d, torch.float32) * float(q.double().norm(dim=1).max() * x.double().norm(dim=1).max())
    assert 2 * b < 1e-5
    for ids in (faiss_ids, torch_ids):
        assert float((exact.gather(1, ids) - best.values[:, :k]).abs().max()) <= 2 * b
    gaps = best.values[:, :-1] - best.values[:, 1:]  # gap below rank j
    above = torch.cat([torch.full((len(q), 1), torch.inf, dtype=gaps.dtype), gaps[:, :-1]], 1)
    determined = (above > 2 * b) & (gaps > 2 * b)
    assert float(determined.double().mean()) > 0.95  # the check below is not vacuous
    assert torch.equal(faiss_ids[determined], torch_ids[determined])
    assert torch.equal(faiss_ids[determined], best.indices[:, :k][determined])
    assert float((faiss_scores - torch_scores)[determined].abs().max()) <= 2 * b


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_recall_the_exact_top_10(kind):
    x = planted_duplicates(5000, 64, seed=4)
    queries, _ = noisy_copies(x, 500, noise=0.3, seed=5)
    plan = ann.plan_index(len(x), kind=kind)  # the size's default parameters
    _, ids = ann.search_index(ann.build_index(x, plan), queries, 10, plan)
    _, exact = top_k(queries, x, 10)
    recall = (ids[:, :, None] == exact[:, None, :]).any(2).double().mean()
    assert float(recall) >= 0.95, float(recall)


def test_growing_a_flat_index_equals_building_it_at_once():
    x = planted_duplicates(2000, 32, seed=6)
    queries, _ = noisy_copies(x, 100, seed=7)
    plan = ann.plan_index(len(x), kind="flat")
    grown = ann.build_index(x[:1200], plan)
    ann.add_vectors(grown, x[1200:])
    whole = ann.build_index(x, plan)
    assert ann.serialize_index(grown) == ann.serialize_index(whole)
    for a, b in zip(ann.search_index(grown, queries, 7, plan), ann.search_index(whole, queries, 7, plan), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="cannot add 16-dimensional vectors to a 32-dimensional"):
        ann.add_vectors(grown, x[:3, :16])


def test_grown_hnsw_and_ivf_still_find_the_new_vectors():
    x = planted_duplicates(3000, 32, seed=8)
    for kind in ("hnsw", "ivf"):
        plan = ann.plan_index(2000, kind=kind)
        index = ann.build_index(x[:2000], plan)
        ann.add_vectors(index, x[2000:])
        queries, sources = noisy_copies(x[2000:], 100, seed=9)
        _, ids = ann.search_index(index, queries, 3, plan)
        assert float((ids[:, 0] == 2000 + sources).double().mean()) >= 0.95, kind  # approximate: not all


def test_an_ivf_query_may_find_fewer_than_k():
    x = planted_duplicates(400, 16, seed=10)
    plan = ann.plan_index(len(x), kind="ivf", nlist=10, nprobe=1)
    index = ann.build_index(x, plan)
    scores, ids = ann.search_index(index, x[:5], 100, plan)  # one cell of ~40 vectors each
    assert bool((ids == -1).any()) and bool((scores[ids == -1] == -torch.inf).all())
    assert bool((ids[:, 0] == torch.arange(5)).all())
    _, all_ids = ann.search_index(index, x[:5], 100, plan, nprobe=10)  # every cell: none missing
    assert bool((all_ids >= 0).all())


def test_round_trip_through_bytes_and_files(tmp_path):
    x = planted_duplicates(500, 16, seed=11)
    plan = ann.plan_index(len(x), kind="hnsw")
    index = ann.build_index(x, plan)
    path = tmp_path / "i.faiss"
    path.write_bytes(ann.serialize_index(index))
    again = ann.read_index(path)
    for a, b in zip(ann.search_index(index, x[:20], 4, plan), ann.search_index(again, x[:20], 4, plan), strict=True):
        assert torch.equal(a, b)
    (tmp_path / "bad.faiss").write_bytes(b"not a faiss index" * 10)
    with pytest.raises(ValueError, match="bad.faiss is not a readable faiss index"):
        ann.read_index(tmp_path / "bad.faiss")
    with pytest.raises(ValueError, match="queries have dimension 8, the faiss index 16"):
        ann.search_index(index, np.zeros((1, 8), np.float32), 1, plan)


def test_without_faiss_one_clear_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    assert not ann.faiss_available()
    with pytest.raises(ann.FaissUnavailableError, match=r'pip install "plmetric\[faiss\]"') as raised:
        ann.build_index(torch.eye(3), ann.AnnPlan("flat"))
    assert isinstance(raised.value, ValueError)  # the CLI reports it as bad input (exit status 2)
    assert ann.plan_index(10) is None  # the exact default needs no faiss
