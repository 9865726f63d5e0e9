"""Similarity estimators of plmetric.evaluation.estimators (slide 14) and their quality measures."""

from __future__ import annotations

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
from point_sets import crossing_lines, sphere_clusters

from plmetric.evaluation import estimators as sim
from plmetric.manifold.pieces import fit_pieces, plm_similarity, similarity_correlation
from plmetric.studies.similarity import evaluate_estimator

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
    r = similarity_correlation(s, y)
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
    r_plm = similarity_correlation(sim.plm_estimate(x, m=1)[0], y)
    r_gauss = similarity_correlation(sim.gaussian_similarity(x)[0], y)
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
    res = evaluate_estimator(fixed, x, torch.tensor([0, 0, 1, 1]), None, whole_set=True)
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
