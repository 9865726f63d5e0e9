"""HDBSCAN's cluster selection (plmetric.retrieval.groups.hdbscan_labels): ``eom`` where it finds the
classes, ``leaf`` where ``eom`` collapses a pile into a few super-groups (issue 29: the mixed pile of
birds and plankton came out as 2 groups), chosen label-free by the k-NN graph's modularity."""

from __future__ import annotations

import numpy as np
import torch

from plmetric.retrieval.groups import UNGROUPED, find_groups, hdbscan_labels

SIZES = (10, 14, 18, 24, 30, 40)


def two_families(seed: int = 0, d: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Two families of 6 blobs of the sizes above: family f's blob i around ``e(16f) + 0.3 e(16f+1+i)``
    (blobs of a family 0.42 apart, the families sqrt(2) apart), members with noise 0.04 per axis (about
    0.23 apart): each blob's 5-NN links stay inside it, but the blobs of a family touch, so HDBSCAN's
    ``eom`` keeps the two families (each more persistent than its blobs together)."""
    g = np.random.default_rng(seed)
    e = np.eye(d)
    parts, truth = [], []
    for family in (0, 1):
        for i, size in enumerate(SIZES):
            parts.append(e[16 * family] + 0.3 * e[16 * family + 1 + i] + 0.04 * g.standard_normal((size, d)))
            truth += [10 * family + i] * size
    x = np.concatenate(parts)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.array(truth)


def purity_and_blobs(labels: np.ndarray, truth: np.ndarray) -> tuple[bool, int]:
    """Whether every group lies inside one blob, and how many blobs hold a group."""
    grouped = labels != UNGROUPED
    pairs = set(zip(labels[grouped].tolist(), truth[grouped].tolist()))
    pure = len(pairs) == len(set(labels[grouped].tolist()))
    return pure, len({t for _, t in pairs})


def test_eom_alone_collapses_the_two_families_and_the_default_finds_the_blobs():
    x, truth = two_families()
    eom, _ = hdbscan_labels(x, 5, 0, selections=("eom",))
    assert eom.max() + 1 == 2  # the collapse (what --method hdbscan did before issue 29)
    found = find_groups(torch.from_numpy(x), method="hdbscan", min_size=5)
    pure, blobs = purity_and_blobs(found.group, truth)
    # every group inside one blob, and every blob found (leaf may split a blob or leave its rim out)
    assert pure and blobs == 2 * len(SIZES) and found.count >= 12
    assert "cluster selection 'leaf' chosen by the k-NN graph's modularity" in found.choice
    assert "eom: 2 groups" in found.choice


def test_a_real_dominant_group_is_kept_whole():
    """Five tight blobs (8-30) and one loose blob of 200 (70 % of the pile): ``eom`` finds exactly these
    six. At resolution 4 the big group alone would cost 4 x 0.7^2 > 1 and lose to ``leaf``'s crumbs;
    at resolution 1 ``eom`` keeps every link inside and pays 0.7^2 + small, while ``leaf`` leaves most
    of the loose blob ungrouped (each a group of its own: its links are lost)."""
    g = np.random.default_rng(0)
    d = 32
    e = np.eye(d)
    parts, truth = [], []
    for i, size in enumerate((8, 12, 16, 22, 30)):
        parts.append(e[0] + 0.5 * e[1 + i] + 0.03 * g.standard_normal((size, d)))
        truth += [i] * size
    parts.append(e[10] + 0.12 * g.standard_normal((200, d)))
    truth += [5] * 200
    x = np.concatenate(parts)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    labels, choice = hdbscan_labels(x, 5, 0)
    assert choice.selection == "eom"
    pure, blobs = purity_and_blobs(labels, np.array(truth))
    assert pure and blobs == 6 and labels.max() + 1 == 6 and (labels != UNGROUPED).all()
