"""Every image's nearest *other* images (plmetric.retrieval.neighbours.nearest_others): exact against a
NumPy float64 brute force, in blocks, self left out by id; through faiss flat, HNSW and IVF.

Error bound: the exact path and faiss compute each score as a float32 dot product of length d of the
(float32) unit vectors, within ``b = γ_d Σ|x_i y_i| <= γ_d ‖x‖ ‖y‖`` of the exact value in any
summation order (Higham §3.1); the float64 reference adds ``γ_d(float64)``. Every computed score is
within b of the exact one, so the j-th best computed score is within b of the j-th best exact score
(order statistics move by at most the largest perturbation), and where the exact scores around rank j
are more than 2b apart no rounding can put another neighbour at rank j.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from numerics import gamma
from plmetric.retrieval import neighbours
from plmetric.retrieval.neighbours import block_rows, nearest_others
from point_sets import planted_duplicates


def unit_vectors(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def score_bound(x: torch.Tensor) -> float:
    """``b``: float32 dot products of length d (``γ_d(f32) ‖x‖ ‖y‖``) plus the float64 reference's."""
    x64 = x.double()
    d = x.shape[1]
    return (gamma(d, torch.float32) + gamma(d, torch.float64)) * float(x64.norm(dim=1).max()) ** 2


def reference(x: torch.Tensor) -> np.ndarray:
    """N x N float64 cosines of the float32 vectors, the diagonal excluded (-inf)."""
    x64 = x.double().numpy()
    sims = x64 @ x64.T
    np.fill_diagonal(sims, -np.inf)
    return sims


def check_against_reference(
    scores: torch.Tensor, ids: torch.Tensor, sims: np.ndarray, rows: np.ndarray, k: int, b: float
) -> float:
    """Scores within b of the reference's j-th best, every id's exact score within 2b of it, ids equal
    where the reference's gaps around rank j exceed 2b; returns the fraction of ranks so determined."""
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    assert tuple(scores.shape) == tuple(ids.shape) == (len(rows), k)
    s, i = scores.double().numpy(), ids.numpy()
    ref = sims[rows]
    order = np.argsort(-ref, axis=1, kind="stable")
    ref_ids = order[:, : k + 1]
    ref_sorted = np.take_along_axis(ref, ref_ids, 1)
    assert (i != rows[:, None]).all(), "an image is listed as its own neighbour"
    assert (np.sort(i, 1)[:, 1:] != np.sort(i, 1)[:, :-1]).all(), "a neighbour is listed twice"
    assert np.abs(s - ref_sorted[:, :k]).max() <= b
    assert np.abs(np.take_along_axis(ref, i, 1) - ref_sorted[:, :k]).max() <= 2 * b
    gaps = ref_sorted[:, :-1] - ref_sorted[:, 1:]  # gap below rank j (k = N - 1: below is the -inf diagonal)
    above = np.concatenate([np.full((len(rows), 1), np.inf), gaps[:, :-1]], 1)
    determined = (above[:, :k] > 2 * b) & (gaps[:, :k] > 2 * b)
    assert np.array_equal(i[determined], ref_ids[:, :k][determined])
    return float(determined.mean())


def test_exact_matches_a_float64_brute_force():
    x = unit_vectors(150, 16, seed=1)
    b = score_bound(x)
    assert 2 * b < 1e-5
    scores, ids = nearest_others(x, 10)
    assert check_against_reference(scores, ids, reference(x), np.arange(150), 10, b) > 0.95
    assert bool((scores[:, :-1] >= scores[:, 1:]).all()), "best first"


def test_a_deliberately_wrong_answer_fails_the_check():
    x = unit_vectors(60, 16, seed=2)
    scores, ids = nearest_others(x, 5)
    sims, b = reference(x), score_bound(x)
    with pytest.raises(AssertionError):  # the second best in the first place
        check_against_reference(scores, ids[:, [1, 0, 2, 3, 4]], sims, np.arange(60), 5, b)
    with pytest.raises(AssertionError):  # self not left out: its own row first
        wrong = torch.cat([torch.arange(60)[:, None], ids[:, :-1]], 1)
        check_against_reference(scores, wrong, sims, np.arange(60), 5, b)
    with pytest.raises(AssertionError):  # a score off by 3b
        check_against_reference(scores + 3 * b, ids, sims, np.arange(60), 5, b)


def test_rows_give_the_same_rows_in_the_order_asked():
    x = unit_vectors(120, 16, seed=3)
    sims, b = reference(x), score_bound(x)
    rows = torch.tensor([77, 3, 119, 0, 3, 50])  # any order, repeats allowed
    scores, ids = nearest_others(x, 7, rows=rows)
    assert check_against_reference(scores, ids, sims, rows.numpy(), 7, b) > 0.9
    all_scores, all_ids = nearest_others(x, 7)
    determined = check_against_reference(all_scores, all_ids, sims, np.arange(120), 7, b)
    if determined == 1.0:  # no near-ties: any correct search gives these very ids
        assert torch.equal(ids, all_ids[rows])
    assert float((scores - all_scores[rows]).abs().max()) <= 2 * b  # both within b of the j-th best


def test_k_beyond_the_others_is_cut_to_n_minus_1():
    x = unit_vectors(6, 8, seed=4)
    scores, ids = nearest_others(x, 50)
    assert ids.shape == scores.shape == (6, 5)
    for row in range(6):
        assert sorted(ids[row].tolist()) == [j for j in range(6) if j != row]
    check_against_reference(scores, ids, reference(x), np.arange(6), 5, score_bound(x))


@pytest.mark.parametrize("k", [0, -3, 1.0, True, None])
def test_k_below_one_or_not_an_integer_is_refused(k):
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        nearest_others(unit_vectors(5, 4, seed=0), k)


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_images_are_refused(n):
    with pytest.raises(ValueError, match=rf"an index of {n} image\(s\) has no neighbours.*at least 2 images"):
        nearest_others(torch.zeros(n, 4), 1)


def test_block_rows_keeps_each_block_within_block_elements():
    for n in (1, 2, 3, 1000, 4096, 10**5, 10**6, neighbours.BLOCK_ELEMENTS):
        rows = block_rows(n)
        assert 1 <= rows <= 4096 and rows * n <= neighbours.BLOCK_ELEMENTS
    assert block_rows(10**6) == neighbours.BLOCK_ELEMENTS // 10**6  # not smaller than it needs to be


def test_small_block_elements_run_several_blocks_with_the_same_result(monkeypatch):
    n, k = 100, 6
    x = unit_vectors(n, 16, seed=5)
    scores, ids = nearest_others(x, k)
    monkeypatch.setattr(neighbours, "BLOCK_ELEMENTS", 7 * n + 3)  # 7 rows per block
    seen = []
    original = neighbours._exact_others

    def recording(x_all: torch.Tensor, rows: torch.Tensor, kk: int):
        seen.append(len(rows) * x_all.shape[0])
        return original(x_all, rows, kk)

    monkeypatch.setattr(neighbours, "_exact_others", recording)
    small_scores, small_ids = nearest_others(x, k)
    assert len(seen) == math.ceil(n / 7) and max(seen) <= neighbours.BLOCK_ELEMENTS
    determined = check_against_reference(small_scores, small_ids, reference(x), np.arange(n), k, score_bound(x))
    if determined == 1.0:  # no near-ties: the blocks change nothing
        assert torch.equal(small_ids, ids)
    assert float((small_scores - scores).abs().max()) <= 2 * score_bound(x)


def test_identical_images_list_each_other_self_left_out_by_id():
    x = unit_vectors(30, 8, seed=6)
    x[7] = x[3]
    x[20] = x[3]  # three identical vectors: 3, 7, 20
    x[11] = x[12]  # a pair
    scores, ids = nearest_others(x, 2)
    for row, others in {3: {7, 20}, 7: {3, 20}, 20: {3, 7}}.items():
        assert set(ids[row].tolist()) == others
        assert float((scores[row].double() - x[row].double() @ x[row].double()).abs().max()) <= score_bound(x)
    assert ids[11, 0] == 12 and ids[12, 0] == 11
    assert (ids != torch.arange(30)[:, None]).all()


# ----------------------------------------------------------------------------- through faiss


def test_faiss_flat_gives_the_exact_neighbours():
    pytest.importorskip("faiss")
    from plmetric.manifold.ann import AnnPlan, build_index

    x = unit_vectors(200, 16, seed=7)
    plan = AnnPlan("flat", {})
    scores, ids = nearest_others(x, 8, (build_index(x, plan), plan))
    sims, b = reference(x), score_bound(x)
    assert check_against_reference(scores, ids, sims, np.arange(200), 8, b) > 0.95
    exact_scores, _ = nearest_others(x, 8)
    assert float((scores - exact_scores).abs().max()) <= 2 * b  # both within b of the j-th best


def test_faiss_flat_keeps_identical_images_and_drops_only_self():
    pytest.importorskip("faiss")
    from plmetric.manifold.ann import AnnPlan, build_index

    x = unit_vectors(40, 8, seed=8)
    x[5] = x[9] = x[30]  # the search may return a twin before the image itself
    plan = AnnPlan("flat", {})
    _, ids = nearest_others(x, 2, (build_index(x, plan), plan))
    assert set(ids[5].tolist()) == {9, 30} and set(ids[9].tolist()) == {5, 30} and set(ids[30].tolist()) == {5, 9}
    assert (ids != torch.arange(40)[:, None]).all()


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kinds_recall_the_exact_others_and_never_self(kind):
    pytest.importorskip("faiss")
    from plmetric.manifold.ann import build_index, plan_index

    x = planted_duplicates(1500, 32, group=10, noise=0.75, seed=9)
    k = 5
    plan = plan_index(len(x), kind=kind)
    scores, ids = nearest_others(x, k, (build_index(x, plan), plan))
    _, exact_ids = nearest_others(x, k)
    assert ids.shape == (1500, k) and bool((ids >= 0).all())
    assert (ids != torch.arange(1500)[:, None]).all()
    recall = np.mean([len(set(a) & set(e)) / k for a, e in zip(ids.tolist(), exact_ids.tolist(), strict=True)])
    assert recall >= 0.95, recall
    # every returned score is the cosine of the returned pair (no slot mixed up)
    assert float((scores - (x[:, None, :] * x[ids]).sum(-1)).abs().max()) <= 2 * score_bound(x)


def test_ivf_rows_whose_cells_hold_too_few_others_are_filled_exactly():
    pytest.importorskip("faiss")
    from plmetric.manifold.ann import AnnPlan, build_index, search_index

    n, k = 200, 10
    x = unit_vectors(n, 16, seed=10)
    plan = AnnPlan("ivf", {"nlist": 100, "nprobe": 1, "trained_on": n})  # ~2 vectors per cell, one cell probed
    index = build_index(x, plan)
    _, raw_ids = search_index(index, x, k + 1, plan)
    short = np.flatnonzero((raw_ids < 0).any(1).numpy())
    assert len(short) > n // 2, "most probed cells should hold fewer than k + 1 vectors"  # the refill runs
    scores, ids = nearest_others(x, k, (index, plan))
    assert bool((ids >= 0).all()) and (ids != torch.arange(n)[:, None]).all()
    check = check_against_reference(scores[short], ids[short], reference(x), short, k, score_bound(x))
    assert check > 0.95
