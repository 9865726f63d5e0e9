"""faiss indexes (plmetric.manifold.ann): parameter rules, the planted duplicate found first by every kind,
flat = the exact torch search within float32 rounding, IVF/HNSW/ivfpq recall, growing = building at once,
ivfpq's memory-budget rules and its re-ranked scores = the exact cosines of the ids it returns."""

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
    with pytest.raises(ValueError, match="kind must be none, auto, flat, ivf, hnsw or ivfpq"):
        ann.plan_index(50, kind="lsh")
    with pytest.raises(ValueError, match="hnsw_m must be an integer >= 2"):
        ann.plan_index(50, kind="hnsw", hnsw_m=1)


@pytest.mark.parametrize("kind", ann.FAISS_KINDS)
def test_every_kind_finds_the_source_of_a_noisy_copy_first(kind):
    x = planted_duplicates(3000, 64, seed=2)
    queries, sources = noisy_copies(x, 200, noise=0.3)
    plan = ann.plan_index(len(x), kind=kind, dim=x.shape[1])
    scores, ids = ann.search_index(ann.build_index(x, plan), queries, 5, plan, vectors=_rows_of(x))
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


def _rows_of(x: torch.Tensor):
    """The ``vectors`` callable of search_index over in-memory rows."""
    return lambda ids: x[torch.from_numpy(ids)].numpy()


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_approximate_kinds_recall_the_exact_top_10(kind):
    x = planted_duplicates(5000, 64, seed=4)
    queries, _ = noisy_copies(x, 500, noise=0.3, seed=5)
    plan = ann.plan_index(len(x), kind=kind, dim=64)  # the size's default parameters
    _, ids = ann.search_index(ann.build_index(x, plan), queries, 10, plan, vectors=_rows_of(x))
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


# ----------------------------------------------------------------------------- ivfpq: budget, training, re-ranking


def test_ivfpq_parameters_follow_n_dim_and_the_memory_budget():
    mib = 2**20
    # auto: exact below AUTO_EXACT_BELOW, HNSW while its estimate fits the budget, then ivfpq
    per_vector = ann.hnsw_memory_bytes(1, 512, IndexOptions.hnsw_m)
    assert per_vector == 4 * 512 + 8 * 32 + 16 == 2320  # 2.32 GB at 1M, as measured (issue 31)
    fits = 4096 * mib // per_vector  # the largest n whose HNSW fits the default budget
    assert ann.plan_index(fits, kind="auto").kind == "hnsw"
    assert ann.plan_index(fits + 1, kind="auto").kind == "ivfpq"
    assert ann.plan_index(fits, kind="auto", memory_budget_mib=4095).kind == "ivfpq"
    assert ann.plan_index(ann.AUTO_EXACT_BELOW - 1, kind="auto", memory_budget_mib=1) is None
    # 10M 512-d: 16,384 cells (nearest power of two to 4 sqrt(n) = 12,649), HNSW quantiser, 128 sub-vectors
    big = ann.plan_index(10_000_000, kind="auto")
    assert big.params == {
        "factory": "IVF16384_HNSW32,PQ128x4fs", "nlist": 16384, "pq_m": 128, "nprobe": 128, "rerank": 100,
        "trained_on": 10_000_000,
    }
    assert ann.ivfpq_memory_bytes(10_000_000, 512, 16384, 128) < 1.5e9  # the index-file target
    # the budget sizes the code: the largest m whose index fits
    for budget in (400, 700, 1000):
        plan = ann.plan_index(10_000_000, kind="ivfpq", memory_budget_mib=budget)
        m = plan.params["pq_m"]
        assert ann.ivfpq_memory_bytes(10_000_000, 512, 16384, m) <= budget * mib
        larger = [c for c in ann.PQ_M_CHOICES if c > m and 512 % c == 0 and c <= 128]
        assert all(ann.ivfpq_memory_bytes(10_000_000, 512, 16384, c) > budget * mib for c in larger)
    assert ann.plan_index(10_000_000, kind="ivfpq", memory_budget_mib=400).params["pq_m"] < 128
    # small sets: at least 39 vectors a cell; m divides the dimension and keeps 4 dimensions a sub-vector
    small = ann.plan_index(5000, kind="ivfpq", dim=60)
    assert small.params["nlist"] <= 5000 // 39 and small.params["factory"].startswith(f"IVF{small.params['nlist']},")
    assert 60 % small.params["pq_m"] == 0 and 4 * small.params["pq_m"] <= 60 and small.params["pq_m"] == 12
    assert ann.plan_index(5000, kind="ivfpq", dim=64, pq_m=32).params["pq_m"] == 32
    with pytest.raises(ValueError, match="--pq-m 48 must divide the embedding dimension 64"):
        ann.plan_index(5000, kind="ivfpq", dim=64, pq_m=48)
    with pytest.raises(ValueError, match="pq_m must be an integer"):
        ann.plan_index(5000, kind="ivfpq", pq_m=0)


def test_a_memory_budget_too_small_is_one_line_naming_the_option():
    need = ann.ivfpq_memory_bytes(10_000_000, 512, 16384, 1)  # the smallest code: 1 byte + the 8-byte id
    assert need > 80 * 2**20
    with pytest.raises(ValueError, match=r"^--memory-budget 80 MiB is too small for an ivfpq index of 10,000,000 "
                       r"vectors of dimension 512: the smallest code \(half a byte a vector\) needs \d+ MiB$"):
        ann.plan_index(10_000_000, kind="auto", memory_budget_mib=80)
    with pytest.raises(ValueError, match="^--memory-budget 500 MiB is too small .* with --pq-m 128: it needs"):
        ann.plan_index(10_000_000, kind="ivfpq", memory_budget_mib=500, pq_m=128)
    with pytest.raises(ValueError, match="^--faiss ivfpq needs at least 16 vectors .* the index has 15: use"):
        ann.plan_index(15, kind="ivfpq")
    with pytest.raises(ValueError, match="memory_budget_mib must be an integer >= 1"):
        ann.plan_index(10, kind="ivfpq", memory_budget_mib=0)


def test_ivfpq_trains_on_a_sample_and_grows_block_by_block_as_built_at_once():
    x = planted_duplicates(6000, 32, seed=12)
    plan = ann.plan_index(len(x), kind="ivfpq", dim=32)
    rows = ann.training_rows(len(x), plan, seed=3)
    assert len(rows) == len(x)  # 6000 < 64 per cell x nlist: all rows
    small = ann.AnnPlan("ivfpq", {**plan.params, "nlist": 8, "factory": "IVF8,PQ8x4fs"})
    rows = ann.training_rows(len(x), small, seed=3)
    assert rows.dtype == np.int64 and len(rows) == 64 * 8 and bool((np.diff(rows) > 0).all())
    assert np.array_equal(rows, ann.training_rows(len(x), small, seed=3)) and rows.max() < len(x)
    assert np.array_equal(ann.training_rows(100, ann.AnnPlan("hnsw", {"m": 8}), 0), np.arange(100))
    whole = ann.train_index(x[torch.from_numpy(rows)], small, 32)
    assert whole.ntotal == 0 and whole.is_trained
    blocks = ann.train_index(x[torch.from_numpy(rows)], small, 32)
    ann.add_vectors(whole, x)
    for start in range(0, len(x), 1500):  # the same trained index, filled in blocks
        ann.add_vectors(blocks, x[start : start + 1500])
    queries, _ = noisy_copies(x, 50, seed=13)
    for a, b in zip(ann.search_index(whole, queries, 5, small, vectors=_rows_of(x)),
                    ann.search_index(blocks, queries, 5, small, vectors=_rows_of(x)), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="an ivfpq index needs the stored vectors"):
        ann.search_index(whole, queries, 5, small)


def test_ivfpq_scores_are_the_exact_cosines_of_the_ids_it_returns():
    """Re-ranking scores each candidate by a float32 dot product of length d: within ``γ_d ‖q‖ ‖x‖`` of the
    exact cosine (numerics.gamma), so the returned scores are true cosines to that bound, sorted, and no
    candidate the codes found is better than the k-th returned by more than 2 γ_d."""
    d, k = 64, 10
    x = planted_duplicates(4000, d, seed=14)
    queries, sources = noisy_copies(x, 300, noise=0.3, seed=15)
    plan = ann.plan_index(len(x), kind="ivfpq", dim=d)
    index = ann.build_index(x, plan)
    scores, ids = ann.search_index(index, queries, k, plan, vectors=_rows_of(x))
    assert bool((ids >= 0).all()) and bool((scores[:, :-1] >= scores[:, 1:]).all())
    exact = (queries.double()[:, None, :] * x.double()[ids]).sum(2)
    b = gamma(d, torch.float32) * float(queries.double().norm(dim=1).max() * x.double().norm(dim=1).max())
    assert float((scores.double() - exact).abs().max()) <= b
    assert torch.equal(ids[:, 0], sources)
    # the candidates by code: each query's re-ranked top k are the best of them by exact cosine
    candidates = torch.from_numpy(index.search(queries.numpy(), plan.params["rerank"])[1])
    candidate_exact = (queries.double()[:, None, :] * x.double()[candidates]).sum(2)
    kth = candidate_exact.topk(k, dim=1).values[:, -1]
    assert float((kth - exact[:, -1]).max()) <= 2 * b
    # a search-time rerank of k re-scores just the k best codes: still true cosines, a ranking no better
    few_scores, few_ids = ann.search_index(index, queries, k, plan, vectors=_rows_of(x), rerank=1)
    few_exact = (queries.double()[:, None, :] * x.double()[few_ids]).sum(2)
    assert float((few_scores.double() - few_exact).abs().max()) <= b


def test_knn_table_through_ivfpq_reranks_from_the_rows_in_memory():
    x = planted_duplicates(3000, 32, group=5, seed=16)
    plan = ann.plan_index(len(x), kind="ivfpq", dim=32, nprobe=32)  # half the 64 cells: these groups are loose
    table = ann.knn_table(x, 4, plan)
    assert table.shape == (3000, 4) and not bool((table == torch.arange(3000)[:, None]).any())
    sims = x @ x.T
    sims.fill_diagonal_(-torch.inf)
    exact = sims.topk(4, dim=1).indices
    recall = (table[:, :, None] == exact[:, None, :]).any(2).double().mean()
    assert float(recall) >= 0.95, float(recall)


def test_ivfpq_with_an_hnsw_quantiser_files_vectors_with_a_wide_beam():
    """From HNSW_QUANTISER_FROM cells the cells are found by an HNSW graph; adding searches it with a beam of
    IVFPQ_ADD_EF_SEARCH (faiss's 16 misfiled 2% of 200k planted vectors), a search with 2 nprobe."""
    faiss = pytest.importorskip("faiss")
    x = planted_duplicates(ann.HNSW_QUANTISER_FROM * 4, 8, seed=17)
    plan = ann.plan_index(len(x), kind="ivfpq", dim=8, nlist=ann.HNSW_QUANTISER_FROM)
    assert plan.params["factory"] == f"IVF{ann.HNSW_QUANTISER_FROM}_HNSW32,PQ2x4fs"
    index = ann.train_index(x, plan, 8)
    quantiser = faiss.downcast_index(index.quantizer)
    quantiser.hnsw.efSearch = 16
    ann.add_vectors(index, x)
    assert quantiser.hnsw.efSearch == ann.IVFPQ_ADD_EF_SEARCH == 64
    ann.search_index(index, x[:3], 2, plan, vectors=_rows_of(x), nprobe=40)
    assert quantiser.hnsw.efSearch == 80
    ann.add_vectors(index, x[:10])
    assert quantiser.hnsw.efSearch == 64 and index.ntotal == len(x) + 10
