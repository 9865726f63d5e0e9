"""Tests of plmetric.methods.losses: formulas against NumPy, gradient routing, proxy learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numerics import distance_error, gamma, u

from plmetric.methods.losses import neighbourhood_loss, point_loss, proxy_loss, relaxed_contrastive_loss
from plmetric.manifold.pieces import Proxies, fit_pieces, orthonormal_columns, proxy_point_similarity


def np_pdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))


def distance_rel_error(d: int, row_length: int | None = None) -> float:
    """Relative error of one distance, from explicit differences (``distance_error``), and
    with rows normalised by their mean (``row_length`` distances: γ_n for the mean, u for the
    division, the mean's own distances): ``2 distance_error + γ_{n+1}``."""
    if row_length is None:
        return distance_error(d)
    return 2 * distance_error(d) + gamma(row_length + 1)


def mean_of_terms_bound(terms: np.ndarray, term_errors: np.ndarray) -> float:
    """|ours - reference| for a mean of N terms, each computed with the given absolute error on
    both sides: the per-term errors, plus γ_N (the sum and the division) on both sums."""
    n = terms.size
    return float(term_errors.mean() + 2 * gamma(n + 1) * np.abs(terms).mean())


def squared_residual_errors(target: np.ndarray, dist: np.ndarray, d: int, row_length: int | None = None) -> np.ndarray:
    """Error of each ``(t - D)²`` with ``t = δ(1 - s)`` (two roundings, 2u |t|), D a distance
    (``distance_rel_error``), their difference (u): ``δe``; the square adds ``2|e| δe + δe²`` and
    its own rounding (u e²). Summed over the two implementations (torch and NumPy)."""
    e = target - dist
    de = 2 * u() * np.abs(target) + distance_rel_error(d, row_length) * dist + u() * np.abs(e)
    return 2 * (2 * np.abs(e) * de + de**2 + u() * e**2)


def contrastive_bound(w: np.ndarray, dist: np.ndarray, margin: float, d: int, row_length: int | None) -> float:
    """|ours - reference| for ``mean(w D² + (1 - w) relu(δ - D)²)``: D with ``distance_rel_error``
    (δD), ``w D²`` with ``2 δD D + 3u D²``; ``relu(δ - D)`` (1-Lipschitz, so the kink is harmless)
    with ``δr = δD + u (δ + r)``, its square ``2 r δr + δr²``, the factor ``1 - w`` (2u); both
    implementations, then :func:`mean_of_terms_bound`."""
    dd = distance_rel_error(d, row_length) * dist
    r = np.maximum(margin - dist, 0.0)
    dr = dd + u() * (margin + r)
    pull, push = w * dist**2, (1 - w) * r**2
    errors = w * (2 * dd * dist + dd**2 + 3 * u() * dist**2) + (1 - w) * (2 * r * dr + dr**2) + 3 * u() * push
    return mean_of_terms_bound(pull + push, 2 * errors)


# ------------------------------------------------------------------------------------------
# formulas against NumPy
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [1.0, 0.7])
def test_point_loss_matches_numpy(delta: float) -> None:
    rng = np.random.default_rng(0)
    f = rng.standard_normal((9, 6))
    s = rng.uniform(0, 1, (9, 9))
    s = (s + s.T) / 2
    terms = [(delta * (1 - s[i, j]) - np.linalg.norm(f[i] - f[j])) ** 2 for i in range(9) for j in range(9) if i != j]
    got = point_loss(torch.tensor(f), torch.tensor(s), delta)
    off = ~np.eye(9, dtype=bool)
    bound = mean_of_terms_bound(np.array(terms), squared_residual_errors(delta * (1 - s[off]), np_pdist(f, f)[off], 6))
    assert abs(got.item() - np.mean(terms)) <= bound
    assert abs(point_loss(torch.tensor(f), torch.tensor(s), delta * (1 + 1e-9)).item() - np.mean(terms)) > bound


def test_point_loss_is_zero_when_distances_match_the_dissimilarity() -> None:
    f = torch.tensor([[0.0, 0.0], [0.3, 0.0], [0.0, 0.4]], dtype=torch.float64)
    dist = torch.cdist(f, f)
    s = 1.0 - dist / 2.0
    # targets 2(1 - (1 - D/2)) = D exactly but for 4 roundings on values <= 1 (4u) and the two
    # distance computations (γ_{d+3} D each): every residual is <= e, the loss <= e²
    e = 4 * u() + 2 * distance_error(2) * dist.max().item()
    assert 0.0 <= point_loss(f, s, delta=2.0).item() <= e**2
    # with δ = 1 the targets are D/2: residual -D/2, loss mean(D²)/4 (squared_residual_errors)
    off = ~torch.eye(3, dtype=torch.bool)
    d_off = dist[off].numpy()
    expected = np.mean(d_off**2) / 4
    bound = mean_of_terms_bound(d_off**2 / 4, squared_residual_errors(d_off / 2, d_off, 2) + 4 * u() * d_off)
    assert abs(point_loss(f, s, delta=1.0).item() - expected) <= bound


@pytest.mark.parametrize("delta", [1.0, 1.5])
def test_proxy_loss_matches_numpy(delta: float) -> None:
    rng = np.random.default_rng(1)
    f, rho = rng.standard_normal((8, 5)), rng.standard_normal((4, 5))
    s = rng.uniform(0, 1, (8, 4))
    terms = (delta * (1 - s) - np_pdist(f, rho)) ** 2
    got = proxy_loss(torch.tensor(f), torch.tensor(s), torch.tensor(rho), delta)
    bound = mean_of_terms_bound(terms, squared_residual_errors(delta * (1 - s), np_pdist(f, rho), 5))
    assert abs(got.item() - terms.mean()) <= bound


@pytest.mark.parametrize("n", [1, 3, 50])
def test_neighbourhood_loss_matches_numpy(n: int) -> None:
    rng = np.random.default_rng(2)
    x, rho = rng.standard_normal((12, 7)), rng.standard_normal((5, 7))
    v = np.stack([np.linalg.qr(rng.standard_normal((7, 2)))[0] for _ in range(5)])
    s = rng.uniform(0, 1, (12, 5))
    values, sizes = [], []
    for k in range(5):
        for i in np.argsort(-s[:, k])[: min(n, 12)]:
            diff = x[i] - rho[k]
            orth = diff - v[k] @ (v[k].T @ diff)
            values.append(orth @ orth + diff @ diff)
            sizes.append(diff @ diff)
    got = neighbourhood_loss(*(torch.tensor(a) for a in (x, rho, v, s)), n_neighbours=n)
    # per term, on each side: diff (u ‖diff‖), its m coordinates (γ_d), orth = diff - V c
    # (sqrt(m) (γ_d + γ_m + 2u) ‖diff‖, ‖orth‖ <= ‖diff‖), two squared norms (2‖·‖δ + γ_d ‖·‖²)
    d, m = 7, 2
    per_term = 2 * (2 * (1 + math.sqrt(m) * (2 * d + m + 3)) + 2 * (d + 2)) * u() * np.array(sizes)
    bound = mean_of_terms_bound(np.array(values), per_term)
    assert abs(got.item() - np.mean(values)) <= bound


# ------------------------------------------------------------------------------------------
# gradient routing (METHOD.md §5)
# ------------------------------------------------------------------------------------------


def clustered(b: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(b // 5, d, generator=g), dim=1)
    x = centres.repeat_interleave(5, 0) + 0.1 * torch.randn(b, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def test_standalone_losses_detach_their_targets() -> None:
    """The functions detach by themselves, even when handed tensors that carry a graph."""
    teacher = clustered(30, 8, 2).requires_grad_()
    student = clustered(30, 8, 3).requires_grad_()
    proxies = Proxies(8, n_proxies=6, m=2)
    locations, bases = proxies()
    s_graph = torch.sigmoid(teacher @ teacher.T)  # a differentiable stand-in for s
    point_loss(student, s_graph).backward()
    assert teacher.grad is None and student.grad is not None
    pieces = fit_pieces(teacher)
    s_proxy = proxy_point_similarity(pieces, locations, bases)  # carries a graph to the proxies
    assert s_proxy.requires_grad
    proxy_loss(student, s_proxy, locations).backward()
    assert proxies.locations.grad is None and proxies.raw_bases.grad is None and teacher.grad is None
    neighbourhood_loss(teacher, locations, bases, s_proxy).backward()
    assert teacher.grad is None
    assert proxies.locations.grad is not None and proxies.raw_bases.grad is not None


# ------------------------------------------------------------------------------------------
# proxies learn the planes
# ------------------------------------------------------------------------------------------


def test_neighbourhood_loss_moves_proxies_onto_planes() -> None:
    d, n_planes, per_plane, n_proxies = 16, 3, 40, 12
    g = torch.Generator().manual_seed(0)
    offsets = 3.0 * torch.randn(n_planes, d, generator=g)
    plane_bases = orthonormal_columns(torch.randn(n_planes, d, 2, generator=g))
    coords = torch.rand(n_planes, per_plane, 2, generator=g) * 2 - 1
    points = (offsets[:, None] + torch.einsum("pdm,pnm->pnd", plane_bases, coords)).reshape(-1, d)
    proxies = Proxies(d, n_proxies, m=2, generator=g)
    with torch.no_grad():  # start near the data, off the planes, with random bases
        start = points[torch.randperm(len(points), generator=g)[:n_proxies]]
        proxies.locations.copy_(start + 0.5 * torch.randn(n_proxies, d, generator=g))
    off_plane = torch.eye(d) - plane_bases @ plane_bases.transpose(1, 2)  # (P, d, d)

    def mean_residual() -> float:
        """Per proxy, min over planes of dist(ρ_k, plane)² + ‖(I - Π_plane) V_k‖_F²."""
        with torch.no_grad():
            loc, v = proxies()
            gap = torch.einsum("pde,ke->kpd", off_plane, loc) - torch.einsum("pde,pe->pd", off_plane, offsets)
            tilt = torch.einsum("pde,kem->kpdm", off_plane, v).pow(2).sum((-1, -2))
            return (gap.pow(2).sum(-1) + tilt).min(dim=1).values.mean().item()

    pieces = fit_pieces(points)
    optimizer = torch.optim.Adam(proxies.parameters(), lr=0.1)
    before = mean_residual()
    for _ in range(400):
        loc, v = proxies()
        with torch.no_grad():
            s = proxy_point_similarity(pieces, loc, v)
        loss = neighbourhood_loss(points, loc, v, s)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        proxies.orthonormalize_()
    after = mean_residual()
    assert before > 1.0
    assert after <= before / 10, (before, after)


# ------------------------------------------------------------------------------------------
# degenerate input and options
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("margin", [1.0, 0.8])
@pytest.mark.parametrize("normalize_rows", [True, False])
def test_relaxed_contrastive_loss_matches_a_loop_reference(margin: float, normalize_rows: bool) -> None:
    rng = np.random.default_rng(3)
    f = rng.standard_normal((10, 5))
    w = rng.uniform(0, 1, (10, 10))
    d = np_pdist(f, f)
    if normalize_rows:  # STML's code: each row divided by its mean, the zero self-distance included
        d = d / d.mean(axis=1, keepdims=True)
    total = 0.0
    for i in range(10):
        for j in range(10):
            if i != j:
                total += w[i, j] * d[i, j] ** 2 + (1 - w[i, j]) * max(margin - d[i, j], 0.0) ** 2
    got = relaxed_contrastive_loss(torch.tensor(f), torch.tensor(w), margin=margin, normalize_rows=normalize_rows)
    off = ~np.eye(10, dtype=bool)
    bound = contrastive_bound(w[off], d[off], margin, 5, 10 if normalize_rows else None)
    assert abs(got.item() - total / 90) <= bound


def test_relaxed_contrastive_loss_against_other_points_matches_numpy() -> None:
    rng = np.random.default_rng(4)
    f, p, w = rng.standard_normal((7, 4)), rng.standard_normal((5, 4)), rng.uniform(0, 1, (7, 5))
    d = np_pdist(f, p)
    d = d / d.mean(axis=1, keepdims=True)
    expected = (w * d**2 + (1 - w) * np.maximum(1.0 - d, 0) ** 2).mean()
    got = relaxed_contrastive_loss(torch.tensor(f), torch.tensor(w), torch.tensor(p))
    assert abs(got.item() - expected) <= contrastive_bound(w, d, 1.0, 4, 5)


def test_relaxed_contrastive_loss_leaves_far_dissimilar_pairs_alone() -> None:
    # two points far beyond the margin with W = 0: no force, unlike the regression onto δ(1 - s)
    f = torch.tensor([[0.0, 0.0], [3.0, 0.0]], requires_grad=True)
    w = torch.zeros(2, 2)
    relaxed_contrastive_loss(f, w, margin=0.5, normalize_rows=False).backward()
    assert torch.count_nonzero(f.grad) == 0
    g = f.detach().clone().requires_grad_()
    point_loss(g, w, 0.5).backward()
    assert g.grad.abs().sum() > 0


def test_relaxed_contrastive_loss_errors() -> None:
    from plmetric.methods.plm import PLMLoss

    with pytest.raises(ValueError, match="weights"):
        relaxed_contrastive_loss(torch.randn(4, 3), torch.rand(3, 3))
    with pytest.raises(ValueError, match="loss_form"):
        PLMLoss(4, loss_form="hinge")


def test_point_and_proxy_loss_on_row_normalised_distances_match_numpy() -> None:
    rng = np.random.default_rng(5)
    f, p = rng.standard_normal((8, 5)), rng.standard_normal((4, 5))
    s, sp = rng.uniform(0, 1, (8, 8)), rng.uniform(0, 1, (8, 4))
    d = np_pdist(f, f)
    d = d / d.mean(axis=1, keepdims=True)
    off = ~np.eye(8, dtype=bool)
    terms = (0.9 * (1 - s[off]) - d[off]) ** 2
    got = point_loss(torch.tensor(f), torch.tensor(s), 0.9, normalize_rows=True)
    assert abs(got.item() - terms.mean()) <= mean_of_terms_bound(
        terms, squared_residual_errors(0.9 * (1 - s[off]), d[off], 5, row_length=8)
    )
    dp = np_pdist(f, p)
    dp = dp / dp.mean(axis=1, keepdims=True)
    got = proxy_loss(torch.tensor(f), torch.tensor(sp), torch.tensor(p), normalize_rows=True)
    terms = ((1 - sp) - dp) ** 2
    assert abs(got.item() - terms.mean()) <= mean_of_terms_bound(
        terms, squared_residual_errors(1 - sp, dp, 5, row_length=4)
    )


def test_shape_and_option_errors_of_the_terms() -> None:
    with pytest.raises(ValueError, match="similarity"):
        point_loss(torch.randn(5, 3), torch.ones(4, 4))
    with pytest.raises(ValueError, match="delta"):
        point_loss(torch.randn(5, 3), torch.ones(5, 5), delta=-1.0)
    with pytest.raises(ValueError, match="proxy_locations"):
        proxy_loss(torch.randn(5, 3), torch.ones(5, 2), torch.randn(2, 4))
