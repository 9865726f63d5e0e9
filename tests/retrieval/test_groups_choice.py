"""The label-free number of k-means groups (plmetric.retrieval.groups.choose_group_count), on synthetic unit vectors with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plmetric.retrieval import groups as groups_module
from plmetric.retrieval.groups import (
    UNGROUPED,
    candidate_ks,
    choose_group_count,
    few_separated,
    find_groups,
    graph_modularity,
    link_terms,
)


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
    # the search's graph on the 120 sampled; the null references' graphs on draws of no more images
    assert graph_rows[0] == 120 and max(graph_rows) <= 120 and choice.sample == 120 and choice.labels is None
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




def gaussian_blob(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    """One structureless pile: ``n`` unit vectors around e0 with isotropic noise (the first flaw of issue 29:
    it was cut into about N/3 groups with no warning)."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.eye(d)[0] + 0.05 * torch.randn(n, d, generator=g), dim=1).numpy()


@pytest.mark.parametrize("n", [100, 300])
def test_a_structureless_blob_is_flagged_weak(n):
    # The blob is itself a draw of the null (a Gaussian of its own spread): its best Q exceeds the null's
    # only by the selection of the best of the k tried, about one sd, under the NULL_MARGIN_SD = 3 sd margin.
    choice = choose_group_count(gaussian_blob(n))
    assert choice.k > 4 and choice.null is not None and choice.weak
    assert choice.null.k == choice.k and choice.null.draws == groups_module.NULL_DRAWS
    line = choice.describe()
    assert f"weak structure: Q={choice.score:.3f} vs {choice.null.mean:.3f} +- {choice.null.sd:.3f}" in line
    assert "for structureless data of the same spread; the groups are arbitrary cuts" in line
    found = find_groups(torch.from_numpy(gaussian_blob(n)), min_size=2)
    assert "weak structure" in found.choice


def test_separated_clusters_are_not_weak():
    # 12 clusters: every link inside (Q = 2/3); a Gaussian of their spread cut in 12 cuts many links
    # (its 12 cells are not separated by gaps), its Q far lower
    choice = choose_group_count(separated_clusters(12, 20))
    assert choice.k == 12 and choice.peak is None and choice.null is not None and not choice.weak
    assert choice.score > choice.null.mean + groups_module.NULL_MARGIN_SD * choice.null.sd
    assert "weak" not in choice.describe() and "structureless data of the same spread: Q=" in choice.describe()


@pytest.mark.parametrize("count", [2, 3, 4])
def test_few_separated_clusters_give_their_k(count):
    # At resolution 4 the true partition scores 1 - 4/count <= 0 and the peak is some k >= 5 cutting the
    # clusters into arbitrary pieces; k = count keeps every link inside (Q at resolution 1: 1 - 1/count),
    # and the peak's cuts are no better than cuts of one Gaussian per cluster. 200 images: at 2 x 50 a
    # Gaussian of the two clusters' spread cut in half keeps ~97 % +- 2 % of the links inside, too close
    # to the clusters' 100 % for the weak check's 3 sd.
    x = separated_clusters(count, 200 // count)
    choice = choose_group_count(x)
    assert choice.k == count and choice.inside == 1.0 and choice.resolution == 1.0
    assert choice.score == pytest.approx(1 - 1 / count)
    assert choice.peak is not None and choice.peak[0] > groups_module.FEW_GROUPS_MAX and not choice.weak
    assert f"k={count} chosen as few well separated groups (100.0% of the 5-NN links inside groups" in choice.describe()
    found = find_groups(torch.from_numpy(x), min_size=5)
    assert found.count == count and (found.size == 200 // count).all()


def test_one_elongated_blob_cut_in_two_is_weak():
    # a 1-d Gaussian (the two clusters' spread without their gap): halved, it keeps ~97 % of the links
    # inside and passes as "few separated", but it is a draw of its own null, so it is flagged weak
    g = torch.Generator().manual_seed(0)
    e = torch.eye(32)
    along = 0.7 * torch.randn(200, 1, generator=g) * (e[0] - e[1]) / 2**0.5
    x = torch.nn.functional.normalize((e[0] + e[1]) / 2 + along + 0.05 * torch.randn(200, 32, generator=g), dim=1)
    assert choose_group_count(x.numpy()).weak


def test_few_separated_needs_links_inside_and_no_crumb():
    halves = np.repeat([0, 1], 20)
    neighbours = np.array([[i ^ 1] for i in range(40)])  # each image linked to its pair: all inside
    assert few_separated(*link_terms(neighbours, halves), 2)  # Q1 = 1 - 1/2 = 0.5 >= 0.25
    crumb = (np.arange(40) >= 38).astype(np.int64)  # 95 % and 5 %, every link inside: Q1 = 0.095
    assert link_terms(neighbours, crumb)[0] == 1.0 and not few_separated(*link_terms(neighbours, crumb), 2)
    leaky = neighbours.copy()
    leaky[[0, 20], 0] = [20, 0]  # 2 of the 40 links cross the halves: 95 % inside
    assert link_terms(leaky, halves)[0] == pytest.approx(0.95) and few_separated(*link_terms(leaky, halves), 2)
    leaky[[1, 21, 2, 22], 0] = [21, 1, 22, 2]  # 6 of 40 cross: 85 %
    assert not few_separated(*link_terms(leaky, halves), 2)
    assert not few_separated(*link_terms(neighbours, np.arange(40) // 8), 5)  # only k <= 4
