"""Tests of plmetric.manifold: pieces, similarities, proxies and quality measures.

Formulas are checked against independent NumPy float64 references (explicit per-point loops,
SVD instead of the Gram/eigh route); geometry against the known answers of slide 5's toy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from plmetric.manifold import (
    Pieces,
    Proxies,
    directional_similarity,
    fit_pieces,
    orthogonal_and_parallel,
    orthonormal_columns,
    piece_purity,
    plm_similarity,
    point_similarity,
    proxy_point_similarity,
    similarity_correlation,
)

DTYPES = [torch.float32, torch.float64]
RULES = ["mean", "min", "max"]


# ------------------------------------------------------------------------------------------
# NumPy references (float64, loops, SVD)
# ------------------------------------------------------------------------------------------


def np_orth_par(queries: np.ndarray, anchors: np.ndarray, bases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o = np.zeros((len(queries), len(anchors)))
    p = np.zeros_like(o)
    for qi, q in enumerate(queries):
        for j, (a, u) in enumerate(zip(anchors, bases, strict=True)):
            v = q - a
            proj = u @ (u.T @ v)
            o[qi, j] = np.linalg.norm(v - proj)
            p[qi, j] = np.linalg.norm(proj)
    return o, p


def np_sprime(o: np.ndarray, p: np.ndarray, n_alpha: float, n_beta: float) -> np.ndarray:
    return (1.0 + o / 2.0) ** (-n_alpha) * (1.0 + p) ** (-n_beta)


def np_sym(a: np.ndarray, b: np.ndarray, rule: str) -> np.ndarray:
    return {"mean": (a + b) / 2, "min": np.minimum(a, b), "max": np.maximum(a, b)}[rule]


def np_pca_basis(y: np.ndarray, m: int) -> np.ndarray:
    """Top-m right singular vectors of the anchor-centred member vectors y (k, d)."""
    return np.linalg.svd(y, full_matrices=False)[2][:m].T


def np_fit_pieces(x: np.ndarray, m: int, tau: float, n_max: int, min_points: int):
    """Per-point greedy growth (slides 5, 8): a literal loop, SVD for the PCA."""
    b = len(x)
    dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    nn = dist.min(axis=1)
    scale = np.median(nn[nn > 0])
    members = np.zeros((b, b), dtype=bool)
    bases, residual = [], []
    for i in range(b):
        order = np.argsort(dist[i], kind="stable")[: min(n_max, b) - 1]
        chosen = [i, *order[: min_points - 1]]
        for c in order[min_points - 1 :]:
            trial = [*chosen, c]
            y = x[trial] - x[i]
            u = np_pca_basis(y, m)
            if np.linalg.norm(y - y @ u @ u.T, axis=1).max() <= tau * scale:
                chosen = trial
        y = x[chosen] - x[i]
        u = np_pca_basis(y, m)
        members[i, chosen] = True
        bases.append(u)
        residual.append(np.linalg.norm(y - y @ u @ u.T, axis=1).max())
    return members, np.stack(bases), np.array(residual), scale


def random_orthonormal(rng: np.random.Generator, n: int, d: int, m: int) -> np.ndarray:
    return np.stack([np.linalg.qr(rng.standard_normal((d, m)))[0] for _ in range(n)])


def noisy_planes(
    rng: np.random.Generator, n_planes: int, per_plane: int, d: int, noise: float, spread: float = 3.0
) -> np.ndarray:
    """Points near n_planes random 2-D affine planes (coordinates in [-1, 1]²) in R^d, offsets
    ~ spread·N(0, I): far apart for spread 3, overlapping for spread 0.3."""
    pts = []
    for _ in range(n_planes):
        offset = spread * rng.standard_normal(d)
        basis = np.linalg.qr(rng.standard_normal((d, 2)))[0]
        coords = rng.uniform(-1.0, 1.0, size=(per_plane, 2))
        pts.append(offset + coords @ basis.T + noise * rng.standard_normal((per_plane, d)))
    return np.concatenate(pts)


def crossing_lines(dtype: torch.dtype, theta_deg: float = 60.0, gap: float = 0.2, d: int = 2):
    """Slide 5's toy: two lines crossing at the origin, points 0.1 apart, none within `gap` of
    the crossing (a point there would lie on both lines). With d > 2 the plane is rotated into R^d."""
    t = np.arange(-10, 11) * 0.1
    t = t[np.abs(t) >= gap - 1e-9]
    th = math.radians(theta_deg)
    a = np.stack([t, np.zeros_like(t)], 1)
    b = np.stack([t * math.cos(th), t * math.sin(th)], 1)
    x2 = np.concatenate([a, b])
    labels = np.repeat([0, 1], len(t))
    if d > 2:
        rot = np.linalg.qr(np.random.default_rng(3).standard_normal((d, 2)))[0]
        x2 = x2 @ rot.T + 0.7  # rotated and shifted off the origin
    return torch.tensor(x2, dtype=dtype), labels


def tol(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-4}


# ------------------------------------------------------------------------------------------
# o, p and s' against NumPy
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,m", [(3, 1), (8, 2), (16, 3), (64, 2), (33, 5)])
def test_orthogonal_and_parallel_matches_numpy(d: int, m: int, dtype: torch.dtype) -> None:
    rng = np.random.default_rng(d * 10 + m)
    queries = rng.standard_normal((7, d))
    anchors = rng.standard_normal((5, d))
    bases = random_orthonormal(rng, 5, d, m)
    queries[0] = anchors[2] + bases[2] @ rng.standard_normal(m)  # a query lying on piece 2
    o_ref, p_ref = np_orth_par(queries, anchors, bases)
    o, p = orthogonal_and_parallel(*(torch.tensor(a, dtype=dtype) for a in (queries, anchors, bases)))
    assert o.dtype == dtype and p.dtype == dtype and o.shape == (7, 5)
    # o² = ‖v‖² - ‖Uᵀv‖² loses half the digits near o = 0 (about sqrt(eps)); p does not
    np.testing.assert_allclose(o.numpy(), o_ref, rtol=1e-6, atol=1e-7 if dtype == torch.float64 else 2e-3)
    np.testing.assert_allclose(p.numpy(), p_ref, **tol(dtype))
    assert o_ref[0, 2] < 1e-12 and o[0, 2] < (1e-7 if dtype == torch.float64 else 2e-3)


def test_directional_similarity_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    o, p = rng.uniform(0, 3, (6, 9)), rng.uniform(0, 3, (6, 9))
    for n_alpha, n_beta in [(5.0, 0.5), (1.0, 1.5), (0.0, 2.0), (4.0, 0.0)]:
        got = directional_similarity(torch.tensor(o), torch.tensor(p), n_alpha, n_beta)
        np.testing.assert_allclose(got.numpy(), np_sprime(o, p, n_alpha, n_beta), rtol=1e-12)
    assert directional_similarity(torch.zeros(1), torch.zeros(1)).item() == 1.0
    with pytest.raises(ValueError, match="n_alpha"):
        directional_similarity(torch.zeros(1), torch.zeros(1), n_alpha=-1.0)


@pytest.mark.parametrize("rule", RULES)
def test_point_similarity_matches_numpy(rule: str) -> None:
    rng = np.random.default_rng(2)
    x = noisy_planes(rng, 3, 12, 10, 0.05)
    pieces = fit_pieces(torch.tensor(x), m=2)
    bases = pieces.bases.numpy()
    o, p = np_orth_par(x, x, bases)
    np.fill_diagonal(o, 0.0)
    np.fill_diagonal(p, 0.0)
    sp = np_sprime(o, p, 4.0, 0.75)
    s = point_similarity(pieces, n_alpha=4.0, n_beta=0.75, symmetrize=rule)
    # atol: forced members lie exactly on the piece, where o carries a sqrt(eps) rounding error
    np.testing.assert_allclose(s.numpy(), np_sym(sp, sp.T, rule), rtol=0, atol=1e-6)
    # binary variant: s'_ij = 1[x_i in P_j]
    member = pieces.members.numpy().T.astype(float)
    s_bin = point_similarity(pieces, symmetrize=rule, binary=True)
    np.testing.assert_array_equal(s_bin.numpy(), np_sym(member, member.T, rule))


@pytest.mark.parametrize("rule", RULES)
def test_proxy_point_similarity_matches_numpy(rule: str) -> None:
    rng = np.random.default_rng(4)
    x = noisy_planes(rng, 2, 10, 12, 0.05)
    pieces = fit_pieces(torch.tensor(x), m=2)
    loc = x[rng.integers(0, len(x), 6)] + 0.3 * rng.standard_normal((6, 12))
    vb = random_orthonormal(rng, 6, 12, 2)
    o_f, p_f = np_orth_par(x, loc, vb)  # x_i from the proxy's piece
    o_b, p_b = np_orth_par(loc, x, pieces.bases.numpy())  # rho_k from the point's piece
    ref = np_sym(np_sprime(o_f, p_f, 5.0, 0.5), np_sprime(o_b, p_b, 5.0, 0.5).T, rule)
    got = proxy_point_similarity(pieces, torch.tensor(loc), torch.tensor(vb), symmetrize=rule)
    assert got.shape == (len(x), 6)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# pieces against NumPy
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,tau,n_max", [(2, 0.5, 10), (1, 1.0, 8), (2, 2.0, 12), (3, 0.5, 10)])
def test_fit_pieces_matches_numpy_greedy_reference(m: int, tau: float, n_max: int) -> None:
    rng = np.random.default_rng(m * 100 + n_max)
    x = noisy_planes(rng, 4, 12, 10, 0.04, spread=0.3)
    members_ref, bases_ref, residual_ref, scale_ref = np_fit_pieces(x, m, tau, n_max, m + 1)
    pieces = fit_pieces(torch.tensor(x), m=m, tau=tau, n_max=n_max)
    sizes = members_ref.sum(1)
    assert sizes.min() < n_max and sizes.max() > m + 1, "the data must exercise acceptance and rejection"
    assert pieces.scale.item() == pytest.approx(scale_ref, rel=1e-12)
    np.testing.assert_array_equal(pieces.members.numpy(), members_ref)
    np.testing.assert_allclose(pieces.residual.numpy(), residual_ref, atol=1e-9)
    proj = np.einsum("bdm,bem->bde", pieces.bases.numpy(), pieces.bases.numpy())
    proj_ref = np.einsum("bdm,bem->bde", bases_ref, bases_ref)
    np.testing.assert_allclose(proj, proj_ref, atol=1e-8)
    assert (pieces.residual.numpy() <= tau * scale_ref + 1e-12).all()


def test_fit_pieces_without_subset_selection_is_knn_pca() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((30, 9))
    pieces = fit_pieces(torch.tensor(x), m=2, subset_selection=False, k_plain=5)
    dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    for i in range(len(x)):
        nbrs = np.argsort(dist[i])[:5]
        assert set(np.flatnonzero(pieces.members[i].numpy())) == {i, *nbrs}
        u = np_pca_basis(x[nbrs] - x[i], 2)
        np.testing.assert_allclose(pieces.bases[i].numpy() @ pieces.bases[i].numpy().T, u @ u.T, atol=1e-9)
    assert torch.isinf(pieces.threshold)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pieces_are_orthonormal_detached_and_keep_dtype(dtype: torch.dtype) -> None:
    x = torch.randn(50, 32, dtype=dtype, requires_grad=True)
    pieces = fit_pieces(x, m=3)
    assert isinstance(pieces, Pieces) and pieces.dim == 3
    for t in (pieces.anchors, pieces.bases, pieces.residual):
        assert t.dtype == dtype and not t.requires_grad
    gram = pieces.bases.transpose(1, 2) @ pieces.bases
    torch.testing.assert_close(gram, torch.eye(3, dtype=dtype).expand(50, 3, 3), **tol(dtype))
    assert pieces.members.dtype == torch.bool and pieces.members.diagonal().all()
    assert ((pieces.size >= 4) & (pieces.size <= 10)).all()


# ------------------------------------------------------------------------------------------
# known geometry: two crossing lines (slide 5)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [2, 6])
def test_crossing_lines_pieces_hold_one_line(dtype: torch.dtype, d: int) -> None:
    x, labels = crossing_lines(dtype, d=d)
    pieces = fit_pieces(x, m=1)
    same = labels[:, None] == labels[None, :]
    assert not (pieces.members.numpy() & ~same).any(), "a piece holds points of both lines"
    assert piece_purity(pieces.members, labels) == 1.0
    assert pieces.size.float().mean() > 5  # pieces do grow along their line
    # plain k-NN pieces (no subset selection) take in points of the other line near the crossing
    plain = fit_pieces(x, m=1, subset_selection=False, k_plain=5)
    assert (plain.members.numpy() & ~same).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULES)
def test_crossing_lines_similarity(dtype: torch.dtype, rule: str) -> None:
    x, labels = crossing_lines(dtype)
    s = plm_similarity(x, m=1, symmetrize=rule)
    assert s.dtype == dtype
    torch.testing.assert_close(s, s.T, rtol=0, atol=0)
    assert (s > 0).all() and (s <= 1).all()
    assert (s.diagonal() == 1).all()
    dist = torch.cdist(x.double(), x.double()).numpy()
    iu = np.triu_indices(len(x), 1)
    d_pairs, s_pairs = dist[iu], s.double().numpy()[iu]
    same = (labels[:, None] == labels[None, :])[iu]
    # same-line vs cross-line pairs at equal Euclidean distance (60 degrees: the pairs (A_t, B_t)
    # are exactly as far apart as (A_t, A_2t))
    equal = np.abs(d_pairs[same][:, None] - d_pairs[~same][None, :]) < 1e-6
    assert equal.sum() > 50
    margin = (s_pairs[same][:, None] - s_pairs[~same][None, :])[equal]
    assert margin.min() > 0.05
    assert similarity_correlation(s, labels) > 0.5


def test_similarity_falls_faster_orthogonally_than_along_the_piece() -> None:
    dtype = torch.float64
    anchor = torch.tensor([[0.3, -0.2, 0.5]], dtype=dtype)
    basis = torch.tensor([[[1.0], [0.0], [0.0]]], dtype=dtype)  # piece along the first axis
    radii = torch.tensor([0.05, 0.2, 0.5, 1.0, 1.5], dtype=dtype)
    along = anchor + radii[:, None] * torch.tensor([1.0, 0.0, 0.0], dtype=dtype)
    across = anchor + radii[:, None] * torch.tensor([0.0, 0.6, 0.8], dtype=dtype)

    def s_prime(points: torch.Tensor, n_alpha: float, n_beta: float) -> torch.Tensor:
        o, p = orthogonal_and_parallel(points, anchor, basis)
        return directional_similarity(o, p, n_alpha, n_beta)[:, 0]

    assert (s_prime(along, 5.0, 0.5) > s_prime(across, 5.0, 0.5)).all()
    assert (s_prime(across, 0.5, 5.0) > s_prime(along, 0.5, 5.0)).all()  # roles reversed
    both = s_prime(along, 5.0, 0.5), s_prime(across, 5.0, 0.5)
    for values in both:  # decreasing with distance, 1 at the anchor
        assert (values.diff() < 0).all()
    assert s_prime(anchor, 5.0, 0.5).item() == 1.0
    # on the toy: a piece of line A, similarity to a point 0.3 along A beats one 0.3 off it
    x, _ = crossing_lines(dtype, theta_deg=90.0)
    pieces = fit_pieces(x, m=1)
    i = 5  # A at t = -0.5
    anchor_i, basis_i = x[i : i + 1], pieces.bases[i : i + 1]
    o, p = orthogonal_and_parallel(anchor_i + torch.tensor([[0.3, 0.0]], dtype=dtype), anchor_i, basis_i)
    o2, p2 = orthogonal_and_parallel(anchor_i + torch.tensor([[0.0, 0.3]], dtype=dtype), anchor_i, basis_i)
    assert o.item() < 1e-9 and p.item() == pytest.approx(0.3) and o2.item() == pytest.approx(0.3)
    assert directional_similarity(o, p).item() > directional_similarity(o2, p2).item()


# ------------------------------------------------------------------------------------------
# degenerate input
# ------------------------------------------------------------------------------------------


def test_too_few_points_raise() -> None:
    with pytest.raises(ValueError, match="min_points"):
        fit_pieces(torch.randn(2, 5), m=2)
    with pytest.raises(ValueError, match="min_points"):
        plm_similarity(torch.randn(3, 5), m=3)
    fit_pieces(torch.randn(3, 5), m=2)  # exactly m + 1 points is enough


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_raises(bad: float) -> None:
    x = torch.randn(20, 8)
    x[3, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_pieces(x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        plm_similarity(x)


def test_bad_options_raise() -> None:
    x = torch.randn(20, 8)
    with pytest.raises(ValueError, match="symmetrize"):
        plm_similarity(x, symmetrize="median")
    with pytest.raises(ValueError, match="exceeds the embedding dimension"):
        fit_pieces(torch.randn(20, 2), m=3)
    with pytest.raises(ValueError, match="n_max"):
        fit_pieces(x, n_max=2)
    with pytest.raises(ValueError, match="tau"):
        fit_pieces(x, tau=-1.0)
    with pytest.raises(ValueError, match="k_plain"):
        fit_pieces(x, subset_selection=False, k_plain=1)
    with pytest.raises(ValueError, match="floating"):
        fit_pieces(torch.ones(20, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="2-D"):
        fit_pieces(torch.randn(20))


@pytest.mark.parametrize("subset_selection", [True, False])
def test_duplicates_and_zero_vectors_give_defined_similarity(subset_selection: bool) -> None:
    base = torch.randn(10, 16)
    x = torch.cat([base, base[:4], torch.zeros(3, 16)])  # 4 duplicates, 3 identical zero vectors
    pieces = fit_pieces(x, subset_selection=subset_selection)
    s = point_similarity(pieces)
    assert torch.isfinite(s).all() and torch.isfinite(pieces.bases).all()
    torch.testing.assert_close(pieces.bases.transpose(1, 2) @ pieces.bases, torch.eye(2).expand(17, 2, 2))
    torch.testing.assert_close(s, s.T)
    assert (s.diagonal() == 1).all()
    assert (s[torch.arange(4), torch.arange(10, 14)] > 0.99).all()  # a point and its copy
    assert (s[14:, 14:] > 0.99).all()


def test_all_identical_points() -> None:
    for x in (torch.zeros(12, 8), torch.ones(12, 8)):
        pieces = fit_pieces(x)
        assert pieces.scale.item() == 0.0 and (pieces.size == 10).all()
        s = plm_similarity(x)
        assert torch.isfinite(s).all() and (s > 0.99).all()


def test_small_batch_uses_all_points_as_candidates() -> None:
    x = torch.randn(5, 8)
    pieces = fit_pieces(x, m=2, n_max=10)
    assert (pieces.size <= 5).all() and (pieces.size >= 3).all()
    assert plm_similarity(x, subset_selection=False, k_plain=5).shape == (5, 5)


def test_plm_similarity_is_the_composition_and_carries_no_gradient() -> None:
    x = torch.randn(40, 16, requires_grad=True)
    s = plm_similarity(x, tau=1.0, n_alpha=3.0, symmetrize="max")
    assert not s.requires_grad
    ref = point_similarity(fit_pieces(x.detach(), tau=1.0), n_alpha=3.0, symmetrize="max")
    torch.testing.assert_close(s, ref, rtol=0, atol=0)


def test_gradients_of_o_and_p_are_finite_at_zero() -> None:
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    basis = orthonormal_columns(torch.randn(6, 5, 2, dtype=torch.float64))
    o, p = orthogonal_and_parallel(x, x.detach(), basis)  # o = p = 0 on the diagonal (up to rounding)
    (o.sum() + p.sum()).backward()
    assert torch.isfinite(x.grad).all()


def test_half_precision_input_is_fitted_in_float32() -> None:
    x = torch.nn.functional.normalize(torch.randn(60, 32), dim=1).bfloat16()
    assert fit_pieces(x).bases.dtype == torch.float32
    s = plm_similarity(x)
    assert s.dtype == torch.bfloat16
    torch.testing.assert_close(s.float(), plm_similarity(x.float()), rtol=0, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_like_on_cpu() -> None:
    x = torch.randn(60, 32, dtype=torch.float64)
    s_cpu = plm_similarity(x)
    s_gpu = plm_similarity(x.cuda())
    assert s_gpu.device.type == "cuda"
    torch.testing.assert_close(s_gpu.cpu(), s_cpu)


# ------------------------------------------------------------------------------------------
# proxies
# ------------------------------------------------------------------------------------------


def test_proxy_bases_are_orthonormal_and_differentiable() -> None:
    proxies = Proxies(dim=16, n_proxies=7, m=3, generator=torch.Generator().manual_seed(0))
    locations, bases = proxies()
    assert locations.shape == (7, 16) and bases.shape == (7, 16, 3)
    torch.testing.assert_close(bases.transpose(1, 2) @ bases, torch.eye(3).expand(7, 3, 3))
    with torch.no_grad():  # an arbitrary raw matrix still gives an orthonormal basis
        proxies.raw_bases.mul_(torch.rand(7, 1, 3) * 5).add_(0.3)
    bases = proxies.bases
    torch.testing.assert_close(bases.transpose(1, 2) @ bases, torch.eye(3).expand(7, 3, 3))
    target = torch.randn(7, 16, 3)
    (bases * target).sum().backward()
    assert proxies.raw_bases.grad is not None and proxies.raw_bases.grad.abs().sum() > 0
    before = proxies.bases.detach().clone()
    proxies.orthonormalize_()
    torch.testing.assert_close(proxies.raw_bases.detach(), before)
    torch.testing.assert_close(proxies.bases.detach(), before)


def test_proxies_init_from_embeddings_uses_local_pca() -> None:
    rng = np.random.default_rng(5)
    x = noisy_planes(rng, 3, 30, 12, 0.0)  # exactly planar neighbourhoods
    proxies = Proxies(dim=12, n_proxies=20, m=2)
    proxies.init_from_embeddings(
        torch.tensor(x, dtype=torch.float32), n_neighbours=5, generator=torch.Generator().manual_seed(1)
    )
    loc = proxies.locations.detach().double().numpy()
    bases = proxies.bases.detach().double().numpy()
    dist = np.linalg.norm(loc[:, None] - x[None], axis=-1)
    assert np.allclose(dist.min(axis=1), 0, atol=1e-5)  # every location is an embedding
    assert len(np.unique(dist.argmin(axis=1))) == 20  # distinct ones
    for k in range(20):
        i = dist[k].argmin()
        nbrs = np.argsort(dist[k])[1:6]
        u = np_pca_basis(x[nbrs] - x[i], 2)
        np.testing.assert_allclose(bases[k] @ bases[k].T, u @ u.T, atol=1e-4)
    with pytest.raises(ValueError, match="at least"):
        Proxies(dim=12, n_proxies=100).init_from_embeddings(torch.tensor(x, dtype=torch.float32))
    with pytest.raises(ValueError, match="dimension"):
        proxies.init_from_embeddings(torch.randn(40, 7))


# ------------------------------------------------------------------------------------------
# quality measures (slide 14)
# ------------------------------------------------------------------------------------------


def test_similarity_correlation_matches_numpy() -> None:
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 4, 25)
    s = rng.uniform(0, 1, (25, 25))
    iu = np.triu_indices(25, 1)
    truth = (labels[:, None] == labels[None, :]).astype(float)
    ref = np.corrcoef(s[iu], truth[iu])[0, 1]
    assert similarity_correlation(torch.tensor(s), torch.tensor(labels)) == pytest.approx(ref, abs=1e-12)
    assert similarity_correlation(s, list(labels)) == pytest.approx(ref, abs=1e-12)
    assert similarity_correlation(truth, labels) == pytest.approx(1.0)
    assert similarity_correlation(np.ones((25, 25)), labels) == 0.0
    with pytest.raises(ValueError, match="constant"):
        similarity_correlation(s, np.zeros(25))
    with pytest.raises(ValueError, match="labels"):
        similarity_correlation(s, labels[:10])


def test_piece_purity_matches_a_loop() -> None:
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 3, 15)
    members = rng.uniform(size=(15, 15)) < 0.3
    np.fill_diagonal(members, True)
    members[4] = False
    members[4, 4] = True  # a piece with only its anchor: skipped unless the anchor counts
    fractions, fractions_with = [], []
    for i in range(15):
        others = [j for j in np.flatnonzero(members[i]) if j != i]
        if others:
            fractions.append(np.mean(labels[others] == labels[i]))
        fractions_with.append(np.mean(labels[np.flatnonzero(members[i])] == labels[i]))
    assert piece_purity(torch.tensor(members), torch.tensor(labels)) == pytest.approx(np.mean(fractions))
    assert piece_purity(members, labels, include_anchor=True) == pytest.approx(np.mean(fractions_with))
    with pytest.raises(ValueError, match="besides its anchor"):
        piece_purity(np.eye(5, dtype=bool), np.arange(5))
