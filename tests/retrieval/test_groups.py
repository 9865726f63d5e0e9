"""Groups of similar images (plmetric.retrieval.groups): known answers on clusters of unit vectors, the
description of any labelling (renumbering, scores against NumPy float64, representatives, sizes), the
k-means path's size rule, refusals, and the table order.

Error bound of ``score``: the module computes in float64 from the float32 embeddings, then rounds to
float32. The float64 part (a mean of m vectors, its norm, a division, a dot product of length d) is
within ``γ_{m+2d+4}(float64)`` of the exact cosine (a chain of that many rounded operations on values
of size <= 1, Higham §3.1, Lemma 3.1); the final rounding adds ``u(float32) |score|``. The reference
is float64 NumPy from the same float32 values, within ``γ_{m+2d+4}(float64)`` itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from numerics import gamma, u
from plmetric.retrieval import groups as groups_module
from plmetric.retrieval.groups import (
    HDBSCAN_MAX,
    UNGROUPED,
    Groups,
    cluster_labels,
    describe_groups,
    find_groups,
)


def three_clusters_and_outliers(d: int = 96, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Clusters of 10, 30 and 20 tight unit vectors (in that id order) around e0, (e0+e1)/√2 and
    (e0+e2)/√2 (centres 0.77-1.0 apart, members about 0.14 apart), then 4 outliers on e10..e13, √2 from
    everything: they join the hierarchy before any cluster splits off, so HDBSCAN leaves them out.
    Returns the vectors (float32) and the expected groups (1 = the 30, 2 = the 20, 3 = the 10, -1)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.eye(d, dtype=torch.float64)
    centres = [e[0], (e[0] + e[1]) / 2**0.5, (e[0] + e[2]) / 2**0.5]
    parts = [c + 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64) for c, n in zip(centres, (10, 30, 20))]
    parts.append(e[10:14])
    x = torch.nn.functional.normalize(torch.cat(parts), dim=1).float()
    expected = np.array([3] * 10 + [1] * 30 + [2] * 20 + [UNGROUPED] * 4)
    return x, expected


def reference_scores(x: torch.Tensor, group: np.ndarray) -> np.ndarray:
    """Cosine of every member to its group's normalised mean, NumPy float64 (NaN for the ungrouped)."""
    x64 = x.double().numpy()
    scores = np.full(len(x64), np.nan)
    for g in set(group.tolist()) - {UNGROUPED}:
        members = group == g
        mean = x64[members].mean(0)
        scores[members] = x64[members] @ (mean / np.linalg.norm(mean))
    return scores


def score_bound(x: torch.Tensor, group_size: int) -> float:
    d = x.shape[1]
    return u(torch.float32) + 2 * gamma(group_size + 2 * d + 4, torch.float64)


# ----------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("method", ["hdbscan"])
def test_hdbscan_finds_three_clusters_numbered_by_size_and_leaves_outliers_out(method):
    x, expected = three_clusters_and_outliers()
    assert x.shape[1] > groups_module.REDUCED_DIM  # the PCA step runs
    found = find_groups(x, method=method, min_size=5)
    assert found.method == "hdbscan" and found.count == 3
    np.testing.assert_array_equal(found.group, expected)
    np.testing.assert_array_equal(found.size, np.array([10] * 10 + [30] * 30 + [20] * 20 + [4] * 4))
    assert np.isnan(found.score[-4:]).all() and not found.representative[-4:].any()
    for g in (1, 2, 3):
        assert found.representative[found.group == g].sum() == 1


def test_kmeans_is_the_default_with_k_chosen_label_free_and_hdbscan_takes_no_number_of_groups():
    x, expected = three_clusters_and_outliers()
    labels, used = cluster_labels(x, min_size=5)
    assert used == "kmeans" and labels.shape == (len(x),)
    found = find_groups(x, min_size=5)
    assert found.method == "kmeans" and found.choice.startswith("k=")
    assert f"k={found.choice.split()[0][2:]}" == found.choice.split()[0]  # "k=<n> chosen by ..."
    assert find_groups(x, min_size=5, n_groups=4).choice == ""  # given, not chosen
    with pytest.raises(ValueError, match="--method hdbscan chooses it itself"):
        cluster_labels(x, method="hdbscan", min_size=2, n_groups=3)


def test_hdbscan_time_estimate_follows_the_measured_growth():
    from plmetric.retrieval.groups import hdbscan_seconds

    assert hdbscan_seconds(20_000) == pytest.approx(2 * 38.0)  # eom and leaf
    assert hdbscan_seconds(40_000) == pytest.approx(2 * 38.0 * 2**2.3)
    assert hdbscan_seconds(HDBSCAN_MAX) > hdbscan_seconds(HDBSCAN_MAX // 2)


# ----------------------------------------------------------------------------- describe_groups


def test_describe_groups_renumbers_by_size_ties_by_smallest_member():
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=1)
    raw = np.array([7, 7, 3, 3, 3, UNGROUPED, 9, 9, 5, 5, 5, UNGROUPED])
    # sizes: 3 -> 3 (first id 2), 5 -> 3 (first 8), 7 -> 2 (first 0), 9 -> 2 (first 6)
    found = describe_groups(x, raw, "hand")
    np.testing.assert_array_equal(found.group, [3, 3, 1, 1, 1, -1, 4, 4, 2, 2, 2, -1])
    np.testing.assert_array_equal(found.size, [2, 2, 3, 3, 3, 2, 2, 2, 3, 3, 3, 2])  # -1: the bucket's size
    assert found.method == "hand" and found.count == 4
    assert found.group.dtype == np.int64 and found.score.dtype == np.float32


def test_scores_are_cosines_to_the_normalised_group_mean():
    g = torch.Generator().manual_seed(2)
    n, d = 80, 24
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    raw = torch.randint(-1, 5, (n,), generator=g).numpy()  # 5 groups and the ungrouped, random members
    found = describe_groups(x, raw)
    expected = reference_scores(x, found.group)
    grouped = found.group != UNGROUPED
    assert np.isnan(found.score[~grouped]).all() and not np.isnan(found.score[grouped]).any()
    bound = score_bound(x, int(np.bincount(found.group[grouped]).max()))
    np.testing.assert_array_less(np.abs(found.score[grouped] - expected[grouped]), bound)
    # the check can fail: the mean not normalised, or the raw mean's cosine of another group, is far off
    assert np.abs(found.score[grouped] - expected[grouped] * 1.001).max() > bound


def test_one_representative_per_group_the_highest_score():
    g = torch.Generator().manual_seed(3)
    n, d = 90, 24
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    raw = torch.randint(-1, 6, (n,), generator=g).numpy()
    found = describe_groups(x, raw)
    expected = reference_scores(x, found.group)
    bound = score_bound(x, n)
    assert not found.representative[found.group == UNGROUPED].any()
    checked = 0
    for group in range(1, found.count + 1):
        members = np.flatnonzero(found.group == group)
        assert found.representative[members].sum() == 1
        ranked = np.sort(expected[members])[::-1]
        if ranked[0] - ranked[1] > 2 * bound:  # the best is determined despite rounding
            assert members[found.representative[members]][0] == members[np.argmax(expected[members])]
            checked += 1
    assert checked == found.count == 6


def test_tied_best_scores_give_one_representative_the_lowest_id():
    x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]), dim=1)
    found = describe_groups(x, np.array([0, 0, -1, 0]))  # members 0 and 3 identical
    assert found.representative.tolist() == [True, False, False, False]


def test_all_ungrouped_or_no_images():
    x = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    found = describe_groups(x, np.full(5, UNGROUPED))
    assert (found.group == UNGROUPED).all() and (found.size == 5).all() and found.count == 0
    assert np.isnan(found.score).all() and not found.representative.any()
    empty = describe_groups(torch.zeros(0, 8), np.zeros(0, np.int64))
    assert empty.group.shape == empty.size.shape == (0,) and empty.count == 0


# ----------------------------------------------------------------------------- k-means, refusals


@pytest.mark.parametrize("with_faiss", [True, False])
def test_kmeans_groups_smaller_than_min_size_become_ungrouped(monkeypatch, with_faiss):
    """Whatever k-means finds, min_size only sends its groups of fewer members to -1 (same seed,
    same raw clustering)."""
    if with_faiss:
        pytest.importorskip("faiss")
    else:
        from plmetric.manifold import ann

        monkeypatch.setattr(ann, "faiss_available", lambda: False)  # scikit-learn's MiniBatchKMeans
    x, _ = three_clusters_and_outliers()
    raw, used = cluster_labels(x, method="kmeans", n_groups=6, min_size=2)  # only k-means' singletons -1
    assert used == "kmeans" and len(set(raw.tolist()) - {UNGROUPED}) <= 6
    sizes = np.where(raw == UNGROUPED, 1, np.bincount(raw[raw != UNGROUPED], minlength=6)[raw])
    assert len(set(sizes.tolist())) > 2  # groups of several sizes: the rule below is not vacuous
    for min_size in (5, 12, 25):
        labels, _ = cluster_labels(x, method="kmeans", n_groups=6, min_size=min_size)
        np.testing.assert_array_equal(labels, np.where(sizes < min_size, UNGROUPED, raw))
        if min_size == 12:
            assert (labels == UNGROUPED).any() and (labels != UNGROUPED).any()
    found = find_groups(x, method="kmeans", n_groups=6, min_size=12)
    grouped = found.group != UNGROUPED
    assert (found.size[grouped] >= 12).all()


def test_kmeans_with_one_group_groups_everything():
    x, _ = three_clusters_and_outliers()
    x = x[:60]  # the three clusters only
    found = find_groups(x, method="kmeans", n_groups=1, min_size=2)
    assert (found.group == 1).all() and found.size.tolist() == [60] * 60


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_groups": 0}, r"--groups must be between 1 and the 64 indexed images, got 0"),
        ({"n_groups": 65}, r"--groups must be between 1 and the 64 indexed images, got 65"),
        ({"min_size": 1}, r"--min-size must be >= 2"),
        ({"min_size": -3}, r"--min-size must be >= 2"),
        ({"method": "dbscan"}, r"--method must be one of kmeans, hdbscan, got 'dbscan'"),
    ],
)
def test_out_of_range_options_are_refused(kwargs, message):
    x, _ = three_clusters_and_outliers()
    with pytest.raises(ValueError, match=message):
        find_groups(x, **kwargs)


@pytest.mark.parametrize("method", ["hdbscan", "kmeans"])
def test_fewer_images_than_min_size_are_all_ungrouped(method):
    x, _ = three_clusters_and_outliers()
    found = find_groups(x[:4], method=method, min_size=5)
    assert (found.group == UNGROUPED).all() and found.count == 0 and (found.size == 4).all()
    assert found.method.startswith("none") and not found.representative.any()


# ----------------------------------------------------------------------------- table order


def test_order_is_groups_ascending_ungrouped_last_score_descending_within():
    group = np.array([2, -1, 1, 2, 1, -1, 3, 1, 2])
    score = np.array([0.5, np.nan, 0.9, 0.7, 0.95, np.nan, 0.8, 0.9, 0.6], dtype=np.float32)
    found = Groups(group=group, size=np.zeros(9, np.int64), score=score, representative=np.zeros(9, bool), method="")
    order = found.order().tolist()
    key = {i: (group[i] if group[i] != -1 else 10**9, -np.nan_to_num(score[i], nan=-2.0), i) for i in range(9)}
    assert order == sorted(range(9), key=key.__getitem__)
    assert order == [4, 2, 7, 3, 8, 0, 6, 1, 5]  # ties (2 and 7 at 0.9; the ungrouped) by id


def test_order_of_a_found_partition():
    x, _ = three_clusters_and_outliers()
    found = find_groups(x, method="hdbscan", min_size=5)
    ordered = found.group[found.order()]
    assert ordered.tolist() == [1] * 30 + [2] * 20 + [3] * 10 + [-1] * 4
    for g in (1, 2, 3):  # the representative heads its group
        first = found.order()[np.argmax(ordered == g)]
        assert found.representative[first]
