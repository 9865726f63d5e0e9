"""plmetric.evaluation.selection: label-free criteria with known answers, and the trainer's label-free pick."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import tiny_config, tiny_model, tiny_splits

from plmetric.evaluation.selection import CRITERIA, knn_indices, neighbour_overlap, selection_criteria
from plmetric.training.loop import train


def np_knn(x: np.ndarray, k: int) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn @ xn.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def test_knn_and_overlap_match_numpy_and_known_cases():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6))
    got = knn_indices(torch.tensor(x), 5).numpy()
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(np_knn(x, 5), axis=1))
    table = torch.tensor(got)
    assert neighbour_overlap(table, table) == 1.0
    shifted = torch.roll(table, 1, dims=0)  # another point's neighbours
    expected = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, np.roll(got, 1, axis=0), strict=True)])
    assert neighbour_overlap(table, shifted) == pytest.approx(expected, abs=1e-7)


def test_tight_clusters_score_higher_than_noise():
    """Four tight, far apart groups of 5 with k = 4: every neighbour is mutual (1.0) and neighbourhoods
    stand out; isotropic noise has fewer mutual neighbours."""
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:4] * 10
    clusters = centres.repeat_interleave(5, 0) + 0.01 * torch.randn(20, 8, generator=g)
    noise = torch.randn(20, 8, generator=g)
    tight = selection_criteria(clusters, clusters, k=4)
    loose = selection_criteria(noise, noise, k=4)
    assert tight["mutual_knn"] == 1.0 and tight["start_agreement"] == 1.0
    assert tight["consensus"] == tight["mutual_knn"] and tight["student_teacher_agreement"] == 1.0
    assert loose["mutual_knn"] < 1.0 and tight["neighbour_margin"] > loose["neighbour_margin"]
    scrambled = selection_criteria(noise, clusters, k=4)  # neighbourhoods unrelated to the start's
    assert scrambled["start_agreement"] < 0.5 and set(tight) == set(CRITERIA)
    # anchored: the start's own value is its mutual share; an epoch that rebuilt the neighbourhoods
    # into tight groups unrelated to the start (mutual share 1, agreement 1/4 or less) scores lower
    # than the same mutual share with the start's structure kept
    assert tight["anchored_mutual_knn"] == tight["mutual_knn"]
    relabelled = clusters[torch.randperm(20, generator=g)]  # same tight groups, members shuffled
    rebuilt = selection_criteria(relabelled, clusters, k=4)
    assert rebuilt["mutual_knn"] == 1.0 and rebuilt["start_agreement"] <= 0.25
    assert rebuilt["anchored_mutual_knn"] == pytest.approx(rebuilt["start_agreement"] ** 0.25, abs=1e-12)
    assert rebuilt["anchored_mutual_knn"] < tight["anchored_mutual_knn"]


def test_the_run_keeps_its_label_free_pick(tmp_path):
    result = train(
        tiny_config(train__epochs=3), tmp_path / "a", splits=tiny_splits(), model=tiny_model(), progress=False
    )
    summary = json.loads((tmp_path / "a/summary.json").read_text())
    assert summary["select_rule"] == "mutual_knn" and summary["selected_epoch"] == result.selected_epoch
    assert 0 <= result.selected_epoch <= 3 and (tmp_path / "a/selected.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "a/log.jsonl").read_text().splitlines()]
    scores = [summary["selection_start"]["mutual_knn"]] + [r["selection"]["mutual_knn"] for r in log]
    assert result.selected_epoch == int(np.argmax(scores))  # the first of equal maxima
    picked = [result.start_metrics] + [{k: v for k, v in r.items() if k.startswith("recall@")} for r in log]
    assert result.selected_metrics["recall@1"] == picked[result.selected_epoch]["recall@1"]
    cfg = tiny_config(train__epochs=2, train__select="final")
    final = train(cfg, tmp_path / "b", splits=tiny_splits(), model=tiny_model(), progress=False)
    assert final.selected_epoch == 2 and final.selected_metrics["recall@1"] == final.final_metrics["recall@1"]


def test_an_unlabelled_run_selects_too(tmp_path):
    splits = tiny_splits()
    splits.train.labels[:] = -1
    splits.test = None
    result = train(tiny_config(train__epochs=2), tmp_path, splits=splits, model=tiny_model(), progress=False)
    assert result.selected_epoch is not None and result.selected_metrics is None
    assert (tmp_path / "selected.safetensors").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["selected_epoch"] == result.selected_epoch


def test_effective_rank_and_uniformity_known_answers():
    """Rows spread over 4 orthonormal directions in equal numbers: effective rank 4, every distinct
    pair at squared distance 2; all rows equal: rank 1, uniformity 0."""
    basis = torch.eye(8)[:4].repeat(5, 1)  # 20 rows, 4 directions, 5 each
    c = selection_criteria(basis, basis, k=4)
    assert c["effective_rank"] == pytest.approx(4.0, rel=1e-6)
    # 80 of the 380 ordered pairs coincide (distance 0), 300 are at squared distance 2
    assert c["uniformity"] == pytest.approx(-np.log((80 + 300 * np.exp(-4.0)) / 380), rel=1e-9)
    same = torch.ones(6, 3)
    collapsed = selection_criteria(same, same, k=2)
    assert collapsed["effective_rank"] == pytest.approx(1.0, rel=1e-6)
    # cos(x, x) of float32 unit rows is 1 up to the dot product's and the normalisation's rounding,
    # about (d + 2) u32 with d = 3; the squared distance 2 - 2 cos is off by twice that, and
    # -log mean exp(-2 d²) ~ 2 d² near 0
    assert 0.0 <= collapsed["uniformity"] <= 2 * 2 * (3 + 2) * 2.0**-24
