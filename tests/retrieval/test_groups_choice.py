"""The label-free number of k-means groups (plmetric.retrieval.groups.choose_group_count), on synthetic unit vectors with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plmetric.retrieval import groups as groups_module
from plmetric.retrieval.groups import UNGROUPED, candidate_ks, choose_group_count, find_groups, graph_modularity


def separated_clusters(count: int, per: int, d: int = 32, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """``count`` clusters of ``per`` unit vectors around the axes e0 .. e(count-1) (centres sqrt(2) apart,
    members about ``noise sqrt(2 d)`` = 0.4 apart): every 5-NN link stays inside its cluster."""
    g = torch.Generator().manual_seed(seed)
    e = torch.eye(d)
    parts = [e[i] + noise * torch.randn(per, d, generator=g) for i in range(count)]
    return torch.nn.functional.normalize(torch.cat(parts), dim=1).numpy()


def test_twelve_separated_clusters_give_k_12():
    # At the true partition every link is inside a group and each group holds 1/12 of the link ends:
    # Q = 1 - 4 * 12 / 144 = 2/3. Merging two clusters (k = 10 on the grid) keeps every link inside but
    # Q <= 1 - 4 * (8/144 + 2 * 4/144) ... < 2/3; splitting one (k = 15) cuts links: Q < 2/3.
    x = separated_clusters(12, 20)
    choice = choose_group_count(x)
    assert 12 in candidate_ks(len(x))
    assert choice.k == 12 and choice.score == pytest.approx(1 - 4 / 12)
    assert choice.labels is not None and len(np.unique(choice.labels)) == 12
    found = find_groups(torch.from_numpy(x), min_size=5)
    assert found.count == 12 and (found.size == 20).all()
    assert "k=12 chosen by the k-NN graph's modularity" in found.choice


def test_modularity_of_known_partitions():
    # two groups, each linking only to itself: Q = 1 - gamma * (1/4 + 1/4)
    neighbours = np.array([[1], [0], [3], [2]])
    assert graph_modularity(neighbours, np.array([0, 0, 1, 1]), resolution=1.0) == pytest.approx(0.5)
    assert graph_modularity(neighbours, np.array([0, 0, 1, 1]), resolution=4.0) == pytest.approx(-1.0)
    # one group: every link inside, all the link ends in it
    assert graph_modularity(neighbours, np.zeros(4, dtype=np.int64), resolution=1.0) == pytest.approx(0.0)


def test_candidate_grid_runs_from_2_to_a_third_of_the_pile():
    ks = candidate_ks(300)
    assert ks[0] == 2 and ks[-1] == 100 and ks == sorted(set(ks))
    assert all(b <= 1.25 * (a + 0.5) + 0.5 for a, b in zip(ks, ks[1:]))  # geometric up to rounding
    assert candidate_ks(5) == [1]  # fewer than 6 images: one group


def test_the_choice_runs_on_a_bounded_sample_of_a_large_pile(monkeypatch):
    x = separated_clusters(8, 40)  # 320 images
    graph_rows = []
    real_graph = groups_module.knn_graph
    monkeypatch.setattr(groups_module, "knn_graph", lambda v, m: graph_rows.append(len(v)) or real_graph(v, m))
    choice = choose_group_count(x, max_sample=120)
    assert graph_rows == [120] and choice.sample == 120 and choice.labels is None
    assert max(k for k, _ in choice.tried) <= 120 // 3
    assert choice.k == 8  # 15 per cluster on average in the sample: still found
    assert "random sample of 120 images" in choice.describe()
    monkeypatch.setattr(groups_module, "CHOICE_SAMPLE", 120)
    found = find_groups(torch.from_numpy(x), min_size=5)  # k from the sample, k-means on every image
    assert found.count == 8 and (found.group != UNGROUPED).all()


def test_the_search_stops_past_the_peak():
    x = separated_clusters(8, 30)  # peak at k = 8: the next CHOICE_PATIENCE k are lower, then it stops
    choice = choose_group_count(x)
    ks = [k for k, _ in choice.tried]
    assert choice.k == 8 and ks == candidate_ks(len(x))[: ks.index(8) + 1 + groups_module.CHOICE_PATIENCE]
    assert len(ks) < len(candidate_ks(len(x)))


