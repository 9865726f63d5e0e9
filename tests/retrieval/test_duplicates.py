"""Near-duplicate pairs and groups (plmetric.retrieval.duplicates): every pair above the threshold against a
NumPy float64 brute force (the widening search included), groups that never chain (every member a duplicate
of every other, no two groups that could merge, by complete linkage and by its greedy form), ordered by their
weakest link, the hash signal with its cosine floor, the threshold check, and the PNG grid.

Error bound: a score is a float32 dot product of length d of unit vectors, within
``b = γ_d(f32) ‖x‖ ‖y‖`` of the exact cosine (Higham §3.1), plus ``γ_d(f64)`` for the reference. The
data are built (or the threshold placed) so that no pair's exact cosine lies within b of the
threshold: then rounding cannot move a pair across it and the found set must equal the reference's.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from numerics import gamma
from plmetric.retrieval.duplicates import (
    SIGNALS,
    START_K,
    DuplicateGroups,
    check_threshold,
    duplicate_groups,
    draw_groups,
    find_duplicates,
    highest_cut,
    is_our_grid,
    similar_pairs,
)
from point_sets import planted_duplicates


def score_bound(x: torch.Tensor) -> float:
    d = x.shape[1]
    return (gamma(d, torch.float32) + gamma(d, torch.float64)) * float(x.double().norm(dim=1).max()) ** 2


def reference_pairs(x: torch.Tensor, threshold: float) -> tuple[set[tuple[int, int]], np.ndarray]:
    """Pairs i < j with float64 cosine >= threshold, and the N x N float64 cosines."""
    x64 = x.double().numpy()
    sims = x64 @ x64.T
    i, j = np.nonzero(np.triu(sims >= threshold, k=1))
    return set(zip(i.tolist(), j.tolist(), strict=True)), sims


def assert_clear_of_threshold(sims: np.ndarray, threshold: float, b: float) -> None:
    """Precondition: no pair's exact cosine within b of the threshold (else the set is not determined)."""
    upper = sims[np.triu_indices(len(sims), k=1)]
    assert np.abs(upper - threshold).min() > b, "a pair lies within the rounding error of the threshold"


def threshold_in_a_gap(sims: np.ndarray, low: float, high: float) -> float:
    """The middle of the widest gap between pair cosines in [low, high]."""
    values = np.sort(sims[np.triu_indices(len(sims), k=1)])
    values = values[(values >= low) & (values <= high)]
    widest = int(np.argmax(np.diff(values)))
    return float((values[widest] + values[widest + 1]) / 2)


def union_find_groups(n: int, pairs: list[tuple[int, int]]) -> list[set[int]]:
    parent = list(range(n))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, c in pairs:
        parent[root(a)] = root(c)
    members: dict[int, set[int]] = {}
    for a in range(n):
        members.setdefault(root(a), set()).add(a)
    return [g for g in members.values() if len(g) >= 2]


def assert_non_chaining_groups(n: int, pairs: dict[tuple[int, int], float], found: DuplicateGroups) -> None:
    """The rule of the module docstring against a plain reference: groups are disjoint cliques of ``pairs``
    (pair -> score), no two clusters (groups or single images) are joined by every pair across them (so
    none could merge), ``best_score`` and ``weakest`` as defined, surest group first."""
    groups = [g.tolist() for g in found.groups]
    label = {m: k for k, g in enumerate(groups) for m in g}
    assert len(label) == sum(len(g) for g in groups) == found.members
    linked = lambda a, c: (min(a, c), max(a, c)) in pairs  # noqa: E731
    for g in groups:
        assert len(g) >= 2 and all(linked(a, c) for a in g for c in g if a < c)
    clusters = groups + [[m] for m in range(n) if m not in label]
    for x in range(len(clusters)):
        for y in range(x + 1, len(clusters)):
            assert not all(linked(a, c) for a in clusters[x] for c in clusters[y]), (clusters[x], clusters[y])
    for m in range(n):
        mates = [c for c in range(n) if c != m and linked(m, c) and (m not in label or label.get(c) == label[m])]
        expected = max((pairs[(min(m, c), max(m, c))] for c in mates), default=np.nan)
        np.testing.assert_array_equal(found.best_score[m], np.float32(expected))
    weakest = [min(pairs[(a, c)] for a in g for c in g if a < c) for g in groups]
    np.testing.assert_array_equal(found.weakest, np.array(weakest, np.float32))
    keys = [(-w, -len(g), min(g)) for w, g in zip(weakest, groups, strict=True)]
    assert keys == sorted(keys)
    for g in groups:  # members by best score descending, ties by id
        member_keys = [(-float(found.best_score[m]), m) for m in g]
        assert member_keys == sorted(member_keys)


# ----------------------------------------------------------------------------- threshold


@pytest.mark.parametrize("value", [1, 1.0, 0.95, -0.999, 0.0, "0.5"])
def test_thresholds_in_minus_1_to_1_are_accepted(value):
    assert check_threshold(value) == float(value)


@pytest.mark.parametrize("value", [-1, -1.0, 1.0001, 2, math.nan, math.inf, -math.inf, "high", None])
def test_thresholds_outside_minus_1_to_1_are_refused(value):
    with pytest.raises(ValueError, match=r"--threshold must be a cosine similarity in \(-1, 1\]"):
        check_threshold(value)


def test_similar_pairs_checks_the_threshold():
    with pytest.raises(ValueError, match="--threshold"):
        similar_pairs(torch.eye(3), 1.5)


# ----------------------------------------------------------------------------- pairs


def test_similar_pairs_equal_the_brute_force_pairs():
    x = planted_duplicates(240, 32, group=6, noise=0.3, seed=1)
    b = score_bound(x)
    _, sims = reference_pairs(x, 1.0)
    threshold = threshold_in_a_gap(sims, 0.88, 0.95)  # inside the within-group range: chains and misses
    expected, sims = reference_pairs(x, threshold)
    assert_clear_of_threshold(sims, threshold, b)
    assert 50 < len(expected) < 240 * 5 / 2  # some groups split, some pairs found
    for start_k in (START_K, 2):  # 2: most images widen, several rounds
        i, j, s = similar_pairs(x, threshold, start_k=start_k)
        assert i.dtype == j.dtype == np.int64 and s.dtype == np.float32
        found = list(zip(i.tolist(), j.tolist(), strict=True))
        assert len(found) == len(set(found)), "a pair is listed twice"
        assert (i < j).all()
        assert set(found) == expected
        assert np.abs(s.astype(np.float64) - sims[i, j]).max() <= b


def test_a_cluster_larger_than_start_k_yields_all_its_pairs():
    """40 and 70 near-identical vectors (more than START_K = 16 and than 4 x 16 = 64): the widening
    search must reach every member's every twin: 40·39/2 + 70·69/2 pairs, each once."""
    g = torch.Generator().manual_seed(2)
    d = 32
    centres = torch.nn.functional.normalize(torch.randn(2, d, generator=g), dim=1)
    cluster40 = centres[0] + 1e-3 * torch.randn(40, d, generator=g)
    cluster70 = centres[1] + 1e-3 * torch.randn(70, d, generator=g)
    others = torch.randn(50, d, generator=g)
    x = torch.nn.functional.normalize(torch.cat([others[:20], cluster40, others[20:], cluster70]), dim=1)
    threshold = 0.99
    expected, sims = reference_pairs(x, threshold)
    assert_clear_of_threshold(sims, threshold, score_bound(x))
    members40, members70 = set(range(20, 60)), set(range(90, 160))
    cluster_pairs = {(a, c) for m in (members40, members70) for a in m for c in m if a < c}
    assert expected == cluster_pairs and len(expected) == 40 * 39 // 2 + 70 * 69 // 2
    assert START_K < 40 - 1 and 4 * START_K < 70 - 1
    i, j, _ = similar_pairs(x, threshold)
    found = list(zip(i.tolist(), j.tolist(), strict=True))
    assert len(found) == len(set(found)) == len(expected) and set(found) == expected
    groups = find_duplicates(x, threshold)
    assert sorted(sorted(g.tolist()) for g in groups.groups) == [sorted(members40), sorted(members70)]
    assert groups.pairs == len(expected) and groups.members == 110


def test_similar_pairs_through_faiss_flat_equal_the_brute_force():
    pytest.importorskip("faiss")
    from plmetric.manifold.ann import AnnPlan, build_index

    x = planted_duplicates(200, 32, group=25, noise=0.2, seed=3)  # groups of 25 > START_K: widening
    threshold = 0.9
    expected, sims = reference_pairs(x, threshold)
    assert_clear_of_threshold(sims, threshold, score_bound(x))
    assert len(expected) > 8 * 25 * 24 / 2 * 0.5
    plan = AnnPlan("flat", {})
    i, j, _ = similar_pairs(x, threshold, (build_index(x, plan), plan))
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == expected and len(i) == len(expected)


def test_fewer_than_two_images_have_no_pairs():
    i, j, s = similar_pairs(torch.ones(1, 4) / 2, 0.5)
    assert len(i) == len(j) == len(s) == 0
    assert find_duplicates(torch.ones(1, 4) / 2, 0.5).groups == []


def test_identical_images_pair_at_threshold_one():
    """A float32 unit vector's computed self-product is often a few ulps below 1 (a third of these):
    ``--threshold 1`` must still pair every two identical vectors, and nothing else."""
    g = torch.Generator().manual_seed(4)
    d = 512
    x = torch.nn.functional.normalize(torch.randn(300, d, generator=g), dim=1)
    x[150:] = x[:150]  # 150 identical pairs (i, i + 150)
    assert bool(((x[:150] * x[150:]).sum(1) < 1).any()), "no self-product below 1: the test proves nothing"
    i, j, s = similar_pairs(x, 1.0)
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(a, a + 150) for a in range(150)]
    # the cut at 1 - 4 γ_{d+3}: far above any cosine of different random vectors, within rounding of 1
    cut = 1 - 4 * gamma(d + 3, torch.float32)
    assert highest_cut(d) == pytest.approx(cut, rel=0, abs=1e-15) and 1 - cut < 2e-4
    assert s.min() >= cut
    groups = find_duplicates(x, 1.0)
    assert len(groups.groups) == 150 and groups.pairs == 150


def test_thresholds_below_the_rounding_of_1_are_used_as_given():
    x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1e-2], [1.0, 2e-2]]), dim=1)
    sims = (x.double() @ x.double().T).numpy()
    threshold = float((sims[0, 1] + sims[0, 2]) / 2)  # 0~1 and 1~2 above, 0~2 below
    i, j, _ = similar_pairs(x, threshold)
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 1), (1, 2)]


# ----------------------------------------------------------------------------- groups


def test_a_chain_never_makes_one_group():
    # a~b 0.96, b~c 0.98, a not~ c: the closer pair (b, c) is a group, a stays out with its pair kept
    groups = duplicate_groups(5, np.array([0, 1]), np.array([1, 2]), np.array([0.96, 0.98], np.float32))
    assert [g.tolist() for g in groups.groups] == [[1, 2]]
    np.testing.assert_array_equal(groups.best_score[:3], np.array([0.96, 0.98, 0.98], np.float32))
    assert np.isnan(groups.best_score[3:]).all()
    assert groups.pairs == 2 and groups.members == 2


def test_a_clique_of_four_is_one_group_and_a_tail_stays_out():
    clique = [(a, c, 0.9 + 0.01 * (a + c)) for a in range(4) for c in range(a + 1, 4)]
    pairs = clique + [(3, 4, 0.85)]  # 4 pairs with 3 alone: not a duplicate of 0, 1, 2
    i, j, s = (np.array(c) for c in zip(*pairs, strict=True))
    groups = duplicate_groups(6, i, j, s.astype(np.float32))
    assert [sorted(g.tolist()) for g in groups.groups] == [[0, 1, 2, 3]]
    assert groups.weakest.tolist() == [np.float32(0.91)]
    assert groups.best_score[4] == np.float32(0.85) and groups.best_score[3] == np.float32(0.95)


def test_no_pairs_no_groups():
    groups = duplicate_groups(4, np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
    assert groups.groups == [] and groups.pairs == 0 and groups.members == 0
    assert groups.best_score.shape == (4,) and np.isnan(groups.best_score).all()


def test_groups_order_by_weakest_link_then_size_then_first_member():
    pairs = [(9, 10, 0.97), (1, 11, 0.99), (4, 5, 0.97), (5, 6, 0.98), (4, 6, 0.995), (2, 3, 0.93), (12, 0, 0.97)]
    i, j, s = (np.array(c) for c in zip(*pairs, strict=True))
    groups = duplicate_groups(13, i, j, s.astype(np.float32))
    # weakest 0.99; then 0.97 three times: the group of three first, then by first member (0 before 9)
    assert [sorted(g.tolist()) for g in groups.groups] == [[1, 11], [4, 5, 6], [0, 12], [9, 10], [2, 3]]


@pytest.mark.parametrize("max_component", [2048, 2])  # 2: every component of 3+ by the greedy form
def test_duplicate_groups_never_chain_on_random_graphs(max_component):
    rng = np.random.default_rng(5)
    for _ in range(6):
        n = 40
        # clusters of 5 with 80 % of their pairs, and random links: chains, cliques and near-cliques
        pairs = {}
        for a in range(n):
            for c in range(a + 1, n):
                if (a // 5 == c // 5 and rng.random() < 0.8) or rng.random() < 0.03:
                    pairs[(a, c)] = float(np.float32(rng.uniform(0.8, 1.0)))
        keys = sorted(pairs)
        i = np.array([a for a, _ in keys])
        j = np.array([c for _, c in keys])
        s = np.array([pairs[k] for k in keys], np.float32)
        found = duplicate_groups(n, i, j, s, max_component=max_component)
        assert found.pairs == len(keys)
        assert_non_chaining_groups(n, pairs, found)
        assert any(len(g) >= 3 for g in found.groups)  # the case is not trivial


def test_find_duplicates_groups_the_reference_pairs():
    x = planted_duplicates(180, 32, group=6, noise=0.3, seed=6)
    _, sims = reference_pairs(x, 1.0)
    threshold = threshold_in_a_gap(sims, 0.88, 0.95)
    expected, sims = reference_pairs(x, threshold)
    assert_clear_of_threshold(sims, threshold, score_bound(x))
    found = find_duplicates(x, threshold)
    assert isinstance(found, DuplicateGroups) and found.pairs == len(expected)
    listed = found.pair_list
    assert set(zip(listed.i.tolist(), listed.j.tolist(), strict=True)) == expected
    assert (listed.signal == SIGNALS.index("embedding")).all() and (listed.hash_distance == -1).all()
    np.testing.assert_allclose(listed.score, sims[listed.i, listed.j], atol=score_bound(x))
    scores = {(a, c): v for a, c, v in zip(listed.i.tolist(), listed.j.tolist(), listed.score.tolist(), strict=True)}
    assert_non_chaining_groups(180, scores, found)
    # every planted group that is a clique at this threshold is found whole
    cliques = [g for g in union_find_groups(180, expected) if all((a, c) in expected for a in g for c in g if a < c)]
    assert cliques and all(any(set(g.tolist()) == c for g in found.groups) for c in cliques)


# ----------------------------------------------------------------------------- the grid


def tiny_images(folder: Path, count: int) -> list[str]:
    folder.mkdir()
    paths = []
    for n in range(count):
        path = folder / f"img{n}.png"
        Image.new("RGB", (12, 9), (20 * n, 100, 200 - 20 * n)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def drawn_texts(monkeypatch):
    """The texts of every figure draw_groups renders (then written as usual)."""
    from plmetric.core import checkpoint

    texts: list[str] = []
    original = checkpoint.atomic_write_figure

    def recording(fig, path, **kwargs):
        for ax in fig.axes:
            texts.extend(t.get_text() for t in ax.texts)
            texts.append(ax.get_title())
        return original(fig, path, **kwargs)

    monkeypatch.setattr(checkpoint, "atomic_write_figure", recording)
    return texts


def test_draw_groups_writes_a_tagged_png_atomically(tmp_path, drawn_texts):
    images = tiny_images(tmp_path / "images", 4)
    unreadable = tmp_path / "images" / "broken.png"
    unreadable.write_bytes(b"not a png at all")
    missing = str(tmp_path / "images" / "gone.png")
    out = tmp_path / "grids" / "dups.png"
    out.parent.mkdir()
    out.write_bytes(b"an older grid")
    groups = [[images[0], missing, images[1]], [images[2], str(unreadable)], [images[3], images[0]]]
    scores = [[0.99, 0.985, math.nan], [0.97, 0.96], [0.951, 0.95]]
    written = draw_groups(groups, scores, out, max_groups=2, max_members=2, software="plmetric duplicates")
    assert written == out and is_our_grid(out, "plmetric duplicates") and not is_our_grid(out, "plmetric groups")
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 50
    assert sorted(os.listdir(out.parent)) == ["dups.png"], "a temporary file was left"
    assert "missing" in drawn_texts and "unreadable" in drawn_texts
    titles = "\n".join(drawn_texts)
    assert "group 1 (3)" in titles and "group 2 (2)" in titles and "group 3" not in titles  # max_groups
    assert "0.990  img0.png" in titles and "0.985  gone.png" in titles
    assert "img1.png" not in titles  # max_members: the third member is not drawn
    assert "broken.png" in titles and "0.970  img2.png" in titles


def test_draw_groups_without_groups_says_so(tmp_path, drawn_texts):
    out = draw_groups([], [], tmp_path / "none.png", software="plmetric groups")
    assert is_our_grid(out, "plmetric groups") and "no groups" in drawn_texts
    assert os.listdir(tmp_path) == ["none.png"]


def test_a_nan_score_draws_no_score(tmp_path, drawn_texts):
    images = tiny_images(tmp_path / "images", 2)
    draw_groups([images], [[math.nan, 0.5]], tmp_path / "g.png", title="ungrouped")
    titles = [t for t in drawn_texts if "img" in t]
    assert titles[0].splitlines() == ["ungrouped 1 (2)", "img0.png"]
    assert titles[1].splitlines() == ["", "0.500  img1.png"]


def test_is_our_grid_is_false_for_other_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG but not really")
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    assert not is_our_grid(tmp_path / "a.png", "plmetric duplicates")
    assert not is_our_grid(tmp_path / "plain.png", "plmetric duplicates")
    assert not is_our_grid(tmp_path / "missing.png", "plmetric duplicates")
    assert not is_our_grid(tmp_path, "plmetric duplicates")


# ----------------------------------------------------------------------------- --check-crops: zoomed views


def test_rescore_with_zooms_equals_a_plain_reference():
    """``s' = max(s, max_z <v_i^z, e_j>, max_z <v_j^z, e_i>)`` against a float64 loop; a NaN view row
    (an unreadable image) adds nothing, and a score never goes down."""
    from plmetric.retrieval.duplicates import rescore_with_zooms

    g = torch.Generator().manual_seed(3)
    e = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1)
    views = torch.nn.functional.normalize(torch.randn(12, 2, 8, generator=g), dim=2).numpy()
    rows = np.arange(12)
    views[5] = np.nan  # image 5 could not be re-read
    i, j = np.triu_indices(12, 1)
    s = (e[i] * e[j]).sum(1).numpy()
    got = rescore_with_zooms(i, j, s, e, views, rows)
    e64, v64 = e.double().numpy(), views.astype(np.float64)
    for p, (a, b) in enumerate(zip(i, j, strict=True)):
        candidates = [s[p]] + [v64[a, z] @ e64[b] for z in range(2) if a != 5] + [v64[b, z] @ e64[a] for z in range(2) if b != 5]
        # float32 products of unit vectors in 8-d: within gamma_8(f32) (+ the reference's gamma_8(f64))
        assert abs(got[p] - max(candidates)) <= gamma(8, torch.float32) + gamma(8, torch.float64)
    assert (got >= s).all()
    # image by image in chunks (what find_duplicates does) and pair chunks of 7: the same result
    import plmetric.retrieval.duplicates as duplicates_module

    chunked = s.astype(np.float32)
    original = duplicates_module.PAIR_CHUNK
    try:
        duplicates_module.PAIR_CHUNK = 7
        for start in range(0, 12, 5):
            chunk = rows[start : start + 5]
            chunked = rescore_with_zooms(i, j, chunked, e, views[chunk], chunk)
    finally:
        duplicates_module.PAIR_CHUNK = original
    assert np.array_equal(chunked, got)


def test_zoom_crop_keeps_the_centre_fraction_of_each_side():
    from plmetric.retrieval.duplicates import zoom_crop

    pixels = np.zeros((7, 10, 3), np.uint8)
    pixels[..., 0] = np.arange(10)[None, :]  # red = column
    pixels[..., 1] = np.arange(7)[:, None]  # green = row
    image = Image.fromarray(pixels)
    crop = np.asarray(zoom_crop(image, 0.8))
    # width round(10 * 0.8) = 8 from (10 - 8) // 2 = 1; height round(7 * 0.8) = 6 from (7 - 6) // 2 = 0
    assert crop.shape == (6, 8, 3)
    assert crop[0, 0, 0] == 1 and crop[0, -1, 0] == 8 and crop[0, 0, 1] == 0 and crop[-1, 0, 1] == 5
    assert np.array_equal(np.asarray(zoom_crop(image, 1.0)), pixels)
    assert zoom_crop(Image.new("RGB", (1, 1)), 0.5).size == (1, 1)


def test_embed_zoomed_is_the_models_unit_embedding_of_each_zoomed_crop(tmp_path):
    from torchvision import transforms

    from plmetric.retrieval.duplicates import ZOOMS, embed_zoomed, zoom_crop
    from tiny import tiny_model

    files = tiny_images(tmp_path / "images", 3)
    (tmp_path / "broken.png").write_text("not an image")
    paths = [files[0], str(tmp_path / "broken.png"), files[1], files[2]]
    model = tiny_model(embedding_dim=6).eval()
    transform = transforms.Compose([transforms.Resize((12, 12)), transforms.ToTensor()])
    views = embed_zoomed(paths, model, transform)
    assert views.shape == (4, len(ZOOMS), 6)
    assert np.isnan(views[1]).all() and not np.isnan(views[[0, 2, 3]]).any()
    for row, path in ((0, files[0]), (3, files[2])):
        with Image.open(path) as image:
            image = image.convert("RGB")
            for z, fraction in enumerate(ZOOMS):
                with torch.no_grad():
                    expected = torch.nn.functional.normalize(model(transform(zoom_crop(image, fraction))[None]), dim=1)
                assert np.allclose(views[row, z], expected[0].numpy(), atol=1e-6)


def test_find_duplicates_with_zoomed_views_finds_a_crop_below_the_threshold():
    """Image 1 is 'a crop of' image 0: plainly 0.75 (below 0.82) but 0.95 to image 0's zoomed view;
    image 2 is unrelated (0.0 plainly, its views far too); pairs below --candidates are never rescored."""
    e = torch.zeros(4, 4)
    e[0, 0] = 1
    e[1, 0], e[1, 1] = 0.75, math.sqrt(1 - 0.75**2)
    e[2, 2] = 1
    e[3, 0], e[3, 3] = 0.5, math.sqrt(1 - 0.25)  # 0.5 to image 0: under the candidates' 0.70
    asked = []

    def zoomed(rows: np.ndarray) -> np.ndarray:
        asked.append(rows.tolist())
        out = np.zeros((len(rows), 2, 4), np.float32)
        out[:, :, 2] = 1.0  # every view points at image 2's direction: matters only for rescored pairs
        for k, r in enumerate(rows):
            if r == 0:  # image 0's first view: cosine 0.95 with image 1 (e[1] has no 4th component)
                out[k, 0] = e[1].numpy() * 0.95 + np.array([0, 0, 0, math.sqrt(1 - 0.95**2)])
        return out

    plain = find_duplicates(e, 0.82)
    assert plain.groups == []
    found = find_duplicates(e, 0.82, zoomed=zoomed, candidates=0.70)
    assert [g.tolist() for g in found.groups] == [[0, 1]] and asked == [[0, 1]]
    assert found.best_score[0] == pytest.approx(0.95, abs=1e-6)


# ----------------------------------------------------------------------------- the hash signal


def test_the_hash_signal_needs_a_close_hash_and_the_cosine_floor():
    """0-1: cosine 0.75 (under 0.82) and hashes 2 bits apart: a 'hash' pair; 2-3: identical hashes (blank
    images) but cosine 0.5, under the floor 0.70: no pair; 4-5: cosine 0.9 and close hashes: 'both';
    6-7: cosine 0.95, hashes far apart: 'embedding'."""
    e = torch.zeros(8, 8)
    for a, c, cosine in ((0, 1, 0.75), (2, 3, 0.5), (4, 5, 0.9), (6, 7, 0.95)):
        e[a, a] = 1
        e[c, a], e[c, c] = cosine, math.sqrt(1 - cosine**2)
    rng = np.random.default_rng(0)
    h = rng.integers(0, 256, (8, 16), dtype=np.uint8)
    h[:, 8:] = h[:, :8]  # mirrors like the images: the plain distance decides
    h[1] = h[0]
    h[1, 0] ^= 0b11  # 2 bits
    h[1, 8] ^= 0b11
    h[3] = h[2]
    h[5] = h[4]
    h[7] = ~h[6]  # 64 bits apart
    found = find_duplicates(e, 0.82, hashes=h, hash_distance=6, hash_floor=0.70)
    listed = found.pair_list
    got = {(a, c): (SIGNALS[k], d) for a, c, k, d in zip(listed.i, listed.j, listed.signal, listed.hash_distance)}
    assert got == {(0, 1): ("hash", 2), (4, 5): ("both", 0), (6, 7): ("embedding", 64)}
    assert listed.counts() == {"embedding": 1, "zoom": 0, "hash": 1, "both": 1}
    assert listed.score[0] == pytest.approx(0.75, abs=1e-6)
    assert sorted(sorted(g.tolist()) for g in found.groups) == [[0, 1], [4, 5], [6, 7]]
    assert [sorted(g.tolist()) for g in found.groups][-1] == [0, 1]  # the least sure last (weakest 0.75)
    # the hash signal off, or no hashes: the embedding alone
    for kwargs in ({"hashes": h, "hash_distance": -1}, {"hashes": None}):
        alone = find_duplicates(e, 0.82, **kwargs).pair_list
        assert list(zip(alone.i.tolist(), alone.j.tolist())) == [(4, 5), (6, 7)]
    with pytest.raises(ValueError, match="8 embeddings"):
        find_duplicates(e, 0.82, hashes=h[:5])
