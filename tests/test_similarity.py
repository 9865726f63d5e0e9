"""Similarity estimators and the similarity study (slide 14)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from numerics import (
    assert_stable_topk,
    assert_within,
    function_error,
    gamma,
    gram_distance_error,
    pearson_error,
    stml_similarity_error,
    u,
)

from plmetric import similarity as sim
from plmetric.cli import main
from plmetric.manifold import fit_pieces, plm_similarity


def sphere_clusters(n_per: int = 30, classes: int = 3, d: int = 8, spread: float = 0.05, seed: int = 0):
    """Tight clusters around orthogonal unit vectors, projected back onto the unit sphere."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(d, dtype=torch.float64)[:classes]
    x = centres.repeat_interleave(n_per, 0) + spread * torch.randn(classes * n_per, d, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=1), torch.arange(classes).repeat_interleave(n_per)


def crossing_lines(n: int = 40, angle_deg: float = 60.0, d: int = 3, noise: float = 0.005, seed: int = 0):
    """Two classes, each a segment through the origin; they cross at 60 degrees."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(-1, 1, n, dtype=torch.float64)
    a = torch.zeros(d, dtype=torch.float64)
    b = torch.zeros(d, dtype=torch.float64)
    a[0] = 1.0
    b[0], b[1] = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    x = torch.cat([t[:, None] * a, t[:, None] * b]) + noise * torch.randn(2 * n, d, generator=g, dtype=torch.float64)
    return x, torch.arange(2).repeat_interleave(n)


# ------------------------------------------------------------------------------------------ estimators


def asymmetry_bound(name: str, x: torch.Tensor, s: torch.Tensor) -> np.ndarray:
    """How far from symmetric an estimate can be: 0 where it is symmetric by construction
    (PLM's mean/min/max of s'(a, b) and s'(b, a), co-membership, the random walk's ½(F + Fᵀ));
    for ``exp(-d²/σ)`` twice its error through the matrix-product ``d²`` (``gram_distance_error``;
    the same σ and exp on both halves), for STML's ``½(W_P + W_C)`` half of that (``W_C`` exact)."""
    xn = x.numpy()
    if name == "gaussian":
        # |exp(-a/σ) - exp(-b/σ)| <= max(s_ij, s_ji) |a - b| / σ, |a - b| <= 2 δd², plus each exp's
        # function error; σ (the median of the computed d²) is >= the exact median - max δd²
        norms = np.linalg.norm(xn, axis=1)
        d2 = ((xn[:, None] - xn[None]) ** 2).sum(-1)
        dd2 = gram_distance_error(xn.shape[1], x.dtype, norms, norms)
        sigma = np.median(d2[~np.eye(len(xn), dtype=bool)]) - dd2.max()
        s_max = np.maximum(s.numpy(), s.numpy().T)
        return s_max * (2 * dd2 / sigma + 2 * function_error())
    if name == "stml":
        return stml_similarity_error(xn, 3.0, CLUSTER_OPTIONS["stml"]["topk"])
    return np.zeros(s.shape)


CLUSTER_OPTIONS = {
    "kmeans": {"n_clusters": 3},
    "agglomerative": {"n_clusters": 3},
    "agglomerative_ward": {"n_clusters": 3},
    "random_walk": {"n_neighbours": 10},
    "stml": {"topk": 10},
}


@pytest.mark.parametrize("name", list(sim.ESTIMATORS))
def test_every_estimator_on_separated_clusters(name):
    x, y = sphere_clusters()
    s, groups = sim.ESTIMATORS[name](x, **CLUSTER_OPTIONS.get(name, {}))
    assert s.shape == (90, 90) and s.dtype == x.dtype
    assert_within(s, s.T, asymmetry_bound(name, x, s), f"{name}: symmetry")
    r = sim.similarity_correlation(s, y)
    # Binary PLM links only the few points sharing a piece: high purity, low recall.
    assert r > (0.3 if name == "plm_binary" else 0.75), (name, r)
    if groups is not None:
        assert sim.group_purity(groups, y) == 1.0  # every ratio is count/count: exactly 1
    if name in ("kmeans", "agglomerative", "agglomerative_ward"):
        iu = np.triu_indices(90, 1)
        truth = (y[:, None] == y[None, :]).double().numpy()[iu]
        assert abs(r - 1.0) <= pearson_error(s.numpy()[iu], truth)  # the three clusters are found exactly


def test_estimators_follow_float32_input():
    x, _ = sphere_clusters(n_per=10)
    for name, fn in sim.ESTIMATORS.items():
        s, _ = fn(x.float(), **CLUSTER_OPTIONS.get(name, {}))
        assert s.dtype == torch.float32, name


def test_plm_beats_gaussian_on_crossing_lines():
    x, y = crossing_lines()
    r_plm = sim.similarity_correlation(sim.plm_estimate(x, m=1)[0], y)
    r_gauss = sim.similarity_correlation(sim.gaussian_similarity(x)[0], y)
    assert r_plm > 0.7
    assert r_plm > r_gauss + 0.4


def test_plm_estimate_matches_manifold_module():
    x, _ = sphere_clusters(n_per=12)
    s, members = sim.plm_estimate(x, tau=1.0, n_alpha=3.0)
    assert torch.equal(s, plm_similarity(x, tau=1.0, n_alpha=3.0))
    assert torch.equal(members, fit_pieces(x, tau=1.0).members)


def test_gaussian_against_numpy():
    x = torch.randn(7, 4, dtype=torch.float64)
    xn = x.numpy()
    d2 = ((xn[:, None] - xn[None]) ** 2).sum(-1)
    s, groups = sim.gaussian_similarity(x, sigma=2.0)
    assert groups is None
    # d²: ours through ‖a‖² + ‖b‖² - 2a·b (gram_distance_error), NumPy's explicit (γ_{d+2} d²);
    # exp(-d²/σ) then moves by s (δd²/σ + u) and each exp adds a function error
    norms = np.linalg.norm(xn, axis=1)
    dd2 = gram_distance_error(4, torch.float64, norms, norms) + gamma(4 + 2) * d2
    np.fill_diagonal(dd2, 0.0)  # both diagonals are exactly 0
    ref = np.exp(-d2 / 2.0)
    assert_within(s, ref, ref * (dd2 / 2.0 + 2 * function_error() + 2 * u()), "σ = 2")
    # the median heuristic: the median is 1-Lipschitz in the values (δ <= max δd²) and the
    # exponent d²/median then moves by (δd² + z δmedian) / median
    median = np.median(d2[~np.eye(7, dtype=bool)])
    z = d2 / median
    dz = (dd2 + z * dd2.max()) / median + 2 * u() * z
    ref = np.exp(-z)
    assert_within(sim.gaussian_similarity(x)[0], ref, ref * (dz + 2 * function_error() + u()), "median σ")


def _stml_reference(t: np.ndarray, sigma: float, topk: int) -> np.ndarray:
    """Plain NumPy port of RC_STML's teacher similarity (one view, loop over points as their code)."""
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    d2 = ((t[:, None] - t[None]) ** 2).sum(-1)
    w_p = np.exp(-d2 / sigma)
    order = np.argsort(-w_p, axis=1, kind="stable")[:, :topk]
    n = len(t)
    w_nn = np.zeros((n, n))
    for i in range(n):
        w_nn[i, order[i]] = 1
    v = ((w_nn + w_nn.T) / 2 == 1).astype(float)
    w_tilde = np.zeros((n, n))
    for i in range(n):
        nz = np.where(v[i] != 0)[0]
        w_tilde[i, nz] = (v[:, nz].sum(1) / len(nz))[nz]
    half = order[:, : int(np.around(topk / 2))]
    w_hat = w_tilde[half].mean(1)
    w_c = (w_hat + w_hat.T) / 2
    return (w_p + w_c) / 2


@pytest.mark.parametrize("topk", [4, 5, 10])
def test_stml_against_loop_reference(topk):
    g = torch.Generator().manual_seed(topk)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    s, groups = sim.stml_similarity(x, sigma=3.0, topk=topk)
    assert groups is None
    assert_stable_topk(x.numpy(), 3.0, topk)  # the same neighbour sets on both sides
    bound = 2 * stml_similarity_error(x.numpy(), 3.0, topk)  # ours and the NumPy port
    assert_within(s, _stml_reference(x.numpy(), 3.0, topk), bound, "W")


def _random_walk_reference(x: np.ndarray, k: int, gamma: float, alpha: float) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = xn @ xn.T
    n = len(x)
    a = np.zeros((n, n))
    for i in range(n):
        order = [j for j in np.argsort(-c[i], kind="stable") if j != i][:k]
        for j in order:
            a[i, j] = max(c[i, j], 0) ** gamma
    w = np.minimum(a, a.T)
    deg = w.sum(1)
    dis = np.where(deg > 0, 1 / np.sqrt(np.where(deg > 0, deg, 1)), 0)
    s = dis[:, None] * w * dis[None]
    return (1 - alpha) * np.linalg.inv(np.eye(n) - alpha * s)


def _random_walk_error(x: np.ndarray, k: int, gamma_: float, alpha: float) -> float:
    """Bound on ``|F_ours - F_reference|`` (every entry) for ``F = (1 - α)(I - αS)^{-1}``.

    Cosines carry ``δc = γ_{2d+6}`` (two normalisations, a dot product); the kNN sets are the
    exact ones when the k-th and (k+1)-th cosines differ by more than ``2δc`` (asserted).
    ``a = c^γ``: ``γ δc + f a``; ``W = min(A, Aᵀ)`` selects; degrees sum n terms (γ_n relative
    plus the entries' errors); ``S = D^{-1/2} W D^{-1/2}``: rsqrt/sqrt (f) and two products (2u).
    Then, with ``‖(I - αS)^{-1}‖₂ <= 1/(1 - α)`` and ``κ <= (1 + α)/(1 - α)``:
    ``‖δF‖₂ <= α ‖δS‖_F / (1 - α) + p(n) u κ`` for the inversion (LU with partial pivoting,
    normwise, Higham §14.3: ``p(n) = 2 n γ_{3n}``, growth factor 2 taken for this positive
    definite matrix), on both sides; an entry is at most the 2-norm.
    """
    n, d = x.shape
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = xn @ xn.T
    dc = gamma(2 * d + 6)
    ranked = c.copy()
    np.fill_diagonal(ranked, -np.inf)
    ranked = -np.sort(-ranked, axis=1)
    assert (ranked[:, k - 1] - ranked[:, k] > 4 * dc).all(), "a neighbour rank lies within rounding"
    a = np.zeros((n, n))
    for i in range(n):
        order = [j for j in np.argsort(-c[i], kind="stable") if j != i][:k]
        a[i, order] = np.maximum(c[i, order], 0) ** gamma_
    da = np.where(a > 0, gamma_ * dc + function_error() * a, 0.0)
    w, dw = np.minimum(a, a.T), np.maximum(da, da.T)
    deg = w.sum(1)
    ddeg = dw.sum(1) + gamma(n) * deg
    inv_sqrt = np.where(deg > 0, 1 / np.sqrt(np.where(deg > 0, deg, 1)), 0)
    rel = np.where(deg > 0, ddeg / np.where(deg > 0, deg, 1), 0) / 2 + function_error()
    s = inv_sqrt[:, None] * w * inv_sqrt[None]
    ds = inv_sqrt[:, None] * dw * inv_sqrt[None] + s * (rel[:, None] + rel[None] + 2 * u())
    kappa = (1 + alpha) / (1 - alpha)
    inversion = 2 * n * gamma(3 * n) * kappa
    return 2 * (alpha * np.linalg.norm(ds) / (1 - alpha) + inversion)


def test_random_walk_against_numpy():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(25, 5, generator=g, dtype=torch.float64)
    f, groups = sim.random_walk_similarity(x, n_neighbours=4, gamma=3.0, alpha=0.9)
    assert groups is None
    assert_within(f, _random_walk_reference(x.numpy(), 4, 3.0, 0.9), _random_walk_error(x.numpy(), 4, 3.0, 0.9), "F")


def test_random_walk_steps_and_isolated_point():
    # Points 0-2 close together, point 3 far away and in nobody's 2-NN: it has no edge.
    x = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.99, -0.14], [-1.0, 0.05]], dtype=torch.float64)
    f, _ = sim.random_walk_similarity(x, n_neighbours=2, steps=1)
    # Triangle 0-1-2 (all mutual 2-NN): one step from 0 reaches 1 and 2 with weights ∝ a_0j.
    assert f[3, :3].abs().max() == 0 and f[3, 3] == 1
    assert f[0, 0] == 0 and f[0, 1] > 0 and f[0, 2] > 0
    f_ppr, _ = sim.random_walk_similarity(x, n_neighbours=2)
    assert f_ppr[3, :3].abs().max() == 0
    torch.testing.assert_close(f_ppr, f_ppr.T, rtol=0, atol=0)  # ½(F + Fᵀ): exactly symmetric


def test_clusterings_co_membership_is_their_groups():
    x, y = sphere_clusters(n_per=10)
    for fn in (sim.kmeans_comembership, sim.agglomerative_comembership):
        s, groups = fn(x, points_per_cluster=5)  # 30 points -> 6 clusters
        assert groups.shape == (30,) and int(groups.unique().numel()) == 6
        assert torch.equal(s, (groups[:, None] == groups[None, :]).double())


def test_bad_options_raise():
    x, _ = sphere_clusters(n_per=5)
    with pytest.raises(ValueError, match="linkage"):
        sim.agglomerative_comembership(x, linkage="median")
    with pytest.raises(ValueError, match="alpha"):
        sim.random_walk_similarity(x, alpha=1.0)
    with pytest.raises(ValueError, match="sigma"):
        sim.stml_similarity(x, sigma=0)
    with pytest.raises(ValueError, match="2-D"):
        sim.gaussian_similarity(torch.zeros(5))


# ------------------------------------------------------------------------------------------ measures


def test_purity_and_group_size_hand_computed():
    labels = [0, 1, 1, 1, 0]
    groups = torch.tensor([0, 0, 1, 1, 1])
    # point 0: {1} -> 0; point 1: {0} -> 0; point 2: {3, 4} -> 1/2; point 3: {2, 4} -> 1/2; point 4: {2, 3} -> 0
    # rationals from exact counts: <= n + 2 roundings (the ratios, their sum, the mean) for the
    # purity, one division for the size, and the rounding of the decimal literal
    purity_err, size_err = gamma(5 + 2) + u(), 2 * u()
    assert abs(sim.group_purity(groups, labels) - 0.2) <= 0.2 * purity_err
    assert abs(sim.group_size(groups, 5) - 1.6) <= 1.6 * size_err
    # Overlapping groups (pieces): row i = the group of point i; point 4 alone (not counted).
    members = np.array(
        [
            [1, 1, 1, 0, 0],  # 0: {1, 2} -> labels 1, 1 vs 0 -> 0
            [0, 1, 1, 1, 0],  # 1: {2, 3} -> 1
            [0, 0, 1, 0, 1],  # 2: {4} -> 0
            [0, 1, 0, 1, 0],  # 3: {1} -> 1
            [0, 0, 0, 0, 1],  # 4: {} -> skipped
        ],
        dtype=bool,
    )
    assert abs(sim.group_purity(members, labels) - 0.5) <= 0.5 * purity_err
    assert abs(sim.group_size(members, 5) - 6 / 5) <= 6 / 5 * size_err
    assert math.isnan(sim.group_purity(torch.arange(5), labels))


def test_correlation_hand_computed_on_four_points():
    # Pairs (01, 02, 03, 12, 13, 23); labels [0, 0, 1, 1] -> truth [1, 0, 0, 0, 0, 1].
    s = torch.tensor(
        [[1.0, 0.9, 0.2, 0.1], [0.9, 1.0, 0.3, 0.2], [0.2, 0.3, 1.0, 0.5], [0.1, 0.2, 0.5, 1.0]], dtype=torch.float64
    )
    # centred truth (2/3, -1/3 x4, 2/3); centred s: s - 11/30; cov = 2/3, Σt² = 4/3, Σs² = 0.43333...
    expected = (2 / 3) / math.sqrt((4 / 3) * (0.9**2 + 0.2**2 + 0.1**2 + 0.3**2 + 0.2**2 + 0.5**2 - 6 * (2.2 / 6) ** 2))
    assert abs(expected - 0.87706) <= 0.5e-5  # the quoted value: half a unit of its 5th decimal

    def fixed(x, **_):
        return s, None

    x = torch.zeros(4, 2, dtype=torch.float64)
    res = sim.evaluate_estimator(fixed, x, torch.tensor([0, 0, 1, 1]), None, whole_set=True)
    # the report rounds to 4 decimals (half a unit: 0.5e-4) the float64 correlation (pearson_error)
    iu = np.triu_indices(4, 1)
    truth = np.array([1.0, 0, 0, 0, 0, 1])
    assert abs(res["whole_set"]["correlation"] - expected) <= 0.5e-4 + 2 * pearson_error(s.numpy()[iu], truth)
    assert res["whole_set"]["auc"] == 1.0  # both same-class pairs (0.9, 0.5) beat all four others


def test_auc_hand_computed_with_ties():
    # same-class pairs 01 (0.9) and 23 (0.2); others 0.2, 0.1, 0.3, 0.2.
    s = torch.tensor(
        [[1.0, 0.9, 0.2, 0.1], [0.9, 1.0, 0.3, 0.2], [0.2, 0.3, 1.0, 0.2], [0.1, 0.2, 0.2, 1.0]], dtype=torch.float64
    )
    # 0.9 beats 4; 0.2 beats 0.1, ties twice (2 × ½), loses to 0.3 -> (4 + 2) / 8
    # ranks (exact halves), their sum and n(n+1)/2 are exact; one division: u
    assert abs(sim.similarity_auc(s, [0, 0, 1, 1]) - 0.75) <= 0.75 * u()
    assert math.isnan(sim.similarity_auc(s, [0, 0, 0, 0]))


# ------------------------------------------------------------------------------------------ the study


def test_neighbourhood_batches_have_no_repeats_and_hold_neighbourhoods():
    x, _ = sphere_clusters(n_per=20, classes=4)
    batches = sim.neighbourhood_batches(x, batch_size=20, k=5, n_batches=7, seed=3)
    assert len(batches) == 7  # 80 points / 4 seeds = 20 batches per epoch
    for b in batches:
        assert len(b) == len(set(b.tolist())) and 4 < len(b) <= 20
    with pytest.raises(ValueError, match="divisible"):
        sim.neighbourhood_batches(x, batch_size=21, k=5)
    with pytest.raises(ValueError, match="exceeds"):
        sim.neighbourhood_batches(x, batch_size=200, k=5)


def test_run_study_and_sweep_structure():
    x, y = sphere_clusters(n_per=20, classes=6, d=10, spread=0.15)
    study = sim.run_study(x, y, estimators=("plm", "gaussian", "kmeans"), batch_size=30, k=5, n_batches=4)
    assert study["settings"]["n_batches"] == 4 and study["settings"]["points"] == 120
    plm = study["estimators"]["plm"]
    assert set(plm["batch"]) >= {"correlation_mean", "correlation_std", "purity_mean", "group_size_mean"}
    assert "purity" not in study["estimators"]["gaussian"]["whole_set"]
    assert -1 <= plm["whole_set"]["correlation"] <= 1
    table = sim.format_study_table(study)
    assert table.count("\n|") == 5  # header, separator, 3 rows
    assert "| plm | PLM" in table and table.splitlines()[2].count("|") == 11
    verdict = sim.ordering_verdict(study)
    assert verdict["batch"]["best_paper_baseline"] == "kmeans"
    rows = sim.run_sweep(x, y, grid={"tau": (0.5, 1.0), "k": (3, 5)}, batch_size=30, n_batches=3)
    assert [(r["parameter"], r["value"], r["default"]) for r in rows] == [
        ("tau", 0.5, True),
        ("tau", 1.0, False),
        ("k", 3, False),
        ("k", 5, True),
    ]
    assert rows[0]["batch_correlation_mean"] == rows[3]["batch_correlation_mean"]  # same setting, same batches
    assert "| plm | tau | 0.5 * |" in sim.format_sweep_table(rows)
    with pytest.raises(ValueError, match="unknown estimator"):
        sim.run_study(x, y, estimators=("nope",))
    with pytest.raises(ValueError, match="labels"):
        sim.run_study(x, y[:-1])


def test_baseline_sweep_rows_and_defaults():
    x, y = sphere_clusters(n_per=20, classes=6, d=10, spread=0.15)
    grid = {"kmeans": {"points_per_cluster": (5, 20)}, "random_walk": {"alpha": (0.9, 0.99)}}
    rows = sim.run_baseline_sweep(x, y, grid=grid, batch_size=30, n_batches=3)
    assert [(r["estimator"], r["value"], r["default"]) for r in rows] == [
        ("kmeans", 5, True),
        ("kmeans", 20, False),
        ("random_walk", 0.9, False),
        ("random_walk", 0.99, True),
    ]
    # 30-point batches of 6 neighbourhoods: 20 points per cluster merges neighbourhoods of several classes.
    assert rows[0]["batch_purity_mean"] > rows[1]["batch_purity_mean"]
    assert "| kmeans | points_per_cluster | 5 * |" in sim.format_sweep_table(rows)


def test_cli_parser_lists_every_estimator():
    from plmetric.similarity_cli import STUDY_ESTIMATORS

    assert tuple(sim.ESTIMATORS) == STUDY_ESTIMATORS


# ------------------------------------------------------------------------------------------ files and CLI


def _write_tiny(tmp_path):
    x, y = sphere_clusters(n_per=12, classes=5, d=6, spread=0.2)
    np.save(tmp_path / "feat.npy", x.float().numpy())
    np.save(tmp_path / "labels.npy", y.numpy())
    return tmp_path / "feat.npy", tmp_path / "labels.npy"


def test_cli_on_tiny_features_writes_json_and_png(tmp_path, capsys):
    feats, labels = _write_tiny(tmp_path)
    out = tmp_path / "out" / "study.json"
    argv = ["similarity-study", "--features", str(feats), "--labels", str(labels), "--batch-size", "20"]
    argv += ["--batches", "3", "--estimators", "plm,gaussian,kmeans,stml", "--set", "plm.tau=1.0", "--json", str(out)]
    assert main([*argv, "--sweep", "--no-progress"]) == 0
    report = json.loads(out.read_text())
    study = report["splits"]["feat"]
    assert list(study["estimators"]) == ["plm", "gaussian", "kmeans", "stml"]
    assert study["estimators"]["plm"]["options"] == {"tau": 1.0}
    assert study["settings"]["n_batches"] == 3 and len(study["sweep"]) == sum(map(len, sim.DEFAULT_SWEEP.values()))
    n_baseline = sum(len(v) for opts in sim.DEFAULT_BASELINE_SWEEP.values() for v in opts.values())
    assert len(study["baseline_sweep"]) == n_baseline
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| plm |" in printed and "PLM parameter sweep" in printed


def test_cli_bad_input_gives_clear_errors(tmp_path, capsys):
    feats, labels = _write_tiny(tmp_path)
    np.save(tmp_path / "short.npy", np.zeros(59, dtype=np.int64))
    assert main(["similarity-study", "--features", str(feats), "--labels", str(tmp_path / "short.npy")]) == 2
    assert "59 labels but" in capsys.readouterr().err
    assert main(["similarity-study", "--features", str(tmp_path / "missing.npy"), "--labels", str(labels)]) == 2
    assert "features file not found" in capsys.readouterr().err
    assert main(["similarity-study", "--features", str(feats)]) == 2
    assert "--labels" in capsys.readouterr().err
    assert main(["similarity-study", "--features", str(feats), "--labels", str(labels), "--set", "plm=1"]) == 2
    assert "ESTIMATOR.OPTION=VALUE" in capsys.readouterr().err
    assert main(["similarity-study"]) == 2


def test_features_file_safetensors_with_labels(tmp_path):
    from safetensors.torch import save_file

    x, y = sphere_clusters(n_per=4, classes=2)
    save_file({"embeddings": x.float(), "labels": y}, str(tmp_path / "f.safetensors"))
    fx, fy = sim.load_features_file(tmp_path / "f.safetensors")
    assert fx.shape == (8, 8) and torch.equal(fy, y)
    (tmp_path / "f.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=".npy or .safetensors"):
        sim.load_features_file(tmp_path / "f.csv")


def test_feature_cache_embeds_once(tmp_path, monkeypatch):
    import tiny

    import plmetric.data
    import plmetric.models

    calls = []
    splits = tiny.tiny_splits(per_class=3, classes=4)

    def fake_load(name, root, train_transform=None, test_transform=None, verbose=True):
        calls.append(name)
        return splits

    monkeypatch.setattr(plmetric.data, "load_dataset", fake_load)
    monkeypatch.setattr(plmetric.models, "build_transform", lambda *a, **k: splits.train.transform)
    monkeypatch.setattr(plmetric.models, "create_model", lambda *a, **k: tiny.tiny_model(embedding_dim=0))
    cache = tmp_path / "cache"
    root = tmp_path / "data"
    root.mkdir()
    x1, y1, info1 = sim.cached_features("cub200", str(root), "train", cache_dir=cache, progress=False)
    x2, y2, info2 = sim.cached_features("cub200", str(root), "train", cache_dir=cache, progress=False)
    assert calls == ["cub200"] and not info1["cache_hit"] and info2["cache_hit"]
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (6, 24)
    assert info1["cache_file"] != str(sim.feature_cache_path(cache, "cub200", str(root), "test", "efficientnet_lite0"))
    with pytest.raises(ValueError, match="inside the data folder"):
        sim.cached_features("cub200", str(root), "train", cache_dir=root / "cache", progress=False)


def test_cli_dataset_path_runs_both_halves(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_cached(dataset, root, split, backbone, **kwargs):
        calls.append((dataset, split, backbone, kwargs["image_size"], kwargs["cache_dir"]))
        x, y = sphere_clusters(n_per=8, classes=5, d=6, spread=0.2, seed=len(calls))
        return x.float(), y, {"cache_file": str(tmp_path / f"{split}.safetensors"), "cache_hit": True}

    monkeypatch.setattr(sim, "cached_features", fake_cached)
    out = tmp_path / "s.json"
    argv = ["similarity-study", "--dataset", "cub200", "--data-root", str(tmp_path), "--cache-dir", str(tmp_path / "c")]
    argv += ["--batch-size", "20", "--batches", "2", "--estimators", "plm,kmeans", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    assert [c[1] for c in calls] == ["train", "test"]
    assert calls[0][2:] == ("efficientnet_lite0", 224, str(tmp_path / "c"))
    report = json.loads(out.read_text())
    assert list(report["splits"]) == ["train", "test"]
    assert report["splits"]["test"]["verdict"]["batch"]["best_paper_baseline"] == "kmeans"
    assert "read from cache" in capsys.readouterr().out
    assert main([*argv, "--features", str(out)]) == 2  # a data set and a features file: ambiguous
