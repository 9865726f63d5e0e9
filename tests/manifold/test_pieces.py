"""Tests of plmetric.manifold.pieces: pieces, similarities, proxies and quality measures.

Formulas are checked against independent NumPy float64 references (explicit per-point loops,
SVD instead of the Gram/eigh route); geometry against the known answers of slide 5's toy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numerics import (
    QR_C,
    assert_rejects,
    assert_within,
    distance_error,
    eigh_backward,
    function_error,
    gamma,
    pearson_error,
    qr_orthonormality,
    u,
)

from plmetric.manifold.pieces import (
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
        for j, (a, basis) in enumerate(zip(anchors, bases, strict=True)):
            v = q - a
            proj = basis @ (basis.T @ v)
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


def pca_error_bounds(y: np.ndarray, m: int, n_gram: int) -> dict[str, float]:
    """Error bounds of one piece's PCA, from the exact spectrum of its member vectors y (k, d).

    ``fit_pieces`` (float64): the Gram matrix (entries off by ``γ_d ‖y_i‖‖y_j‖``, so ``‖ΔG‖₂ <=
    γ_d tr G``) and ``eigh`` (backward error ``p(n) u ‖G‖``) together perturb G by ``E``; the
    top-m eigenspace moves by ``sin Θ <= E / (gap - E)`` (Davis-Kahan, gap = λ_m - λ_{m+1}),
    the Gram-route squared residual ``e_kᵀ (I - P) G (I - P) e_k`` by ``E (1 + 2 λ_{m+1} / (gap - E))``
    plus ``γ_{m+1} ‖y_k‖²`` for its own sum. The basis ``Yᵀ w_r`` adds ``γ_n sqrt(tr G / λ_m)``
    to the angle, its QR ``qr_orthonormality``. The explicit residual ``‖y - U Uᵀ y‖`` is then
    off by ``sin Θ · max ‖y‖`` plus its own rounding, two products of lengths d and m, a
    subtraction and a norm: ``γ_{2d+m+3} sqrt(m) max ‖y‖``. NumPy's SVD (backward error
    ``γ̃_{kd} ‖Y‖``, Wedin) moves its subspace by ``sin Θ_ref <= ‖ΔY‖ / (σ_m - σ_{m+1} - ‖ΔY‖)``.
    Returns inf where the subspace is not determined by the data (gap within the error).
    """
    k, d = y.shape
    sv = np.zeros(max(k, m + 1))
    sv[: min(k, d)] = np.linalg.svd(y, compute_uv=False)
    lam = sv**2
    trace, ymax = lam.sum(), float(np.linalg.norm(y, axis=1).max())
    e = gamma(d) * trace + eigh_backward(n_gram) * lam[0]
    gap = lam[m - 1] - lam[m]
    dy = gamma(QR_C * k * d) * sv[0]
    gap_ref = sv[m - 1] - sv[m]
    if gap <= 2 * e or gap_ref <= 2 * dy or lam[m - 1] <= 0:
        inf = math.inf
        return {"res2_gram": inf, "projector": inf, "residual": inf}
    sin_gram = e / (gap - e)
    sin_basis = sin_gram + gamma(n_gram) * math.sqrt(trace / lam[m - 1]) + qr_orthonormality(d, m)
    sin_ref = dy / (gap_ref - dy) + qr_orthonormality(d, m)
    explicit = gamma(2 * d + m + 3) * math.sqrt(m) * ymax
    return {
        "res2_gram": e * (1 + 2 * lam[m] / (gap - e)) + gamma(m + 1) * ymax**2,
        "projector": sin_basis + sin_ref,  # ‖P - P_ref‖₂, so also every entry
        "residual": (sin_basis + sin_ref) * ymax + 2 * explicit,  # |ours - reference|
        "residual_exact": sin_basis * ymax + explicit,  # |ours - exact|
    }


def np_fit_pieces(x: np.ndarray, m: int, tau: float, n_max: int, min_points: int, mutual: bool = False):
    """Per-point greedy growth (slides 5, 8): a literal loop, SVD for the PCA.

    With ``mutual``: candidates are the mutual ones first (j among i's n_max - 1 nearest and i
    among j's), then the others, each nearest first; the forced members are the first of that
    order and only mutual candidates are tried after them.

    Also returns, for every acceptance decision, its margin ``|r_max² - T²|`` and the error
    bound that margin must exceed for the decision of ``fit_pieces`` to be the same (its
    Gram-route squared residual, the reference's SVD residual and both thresholds).
    """
    b, d = x.shape
    n_gram = min(n_max, b)
    dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    nn = dist.min(axis=1)
    scale = np.median(nn[nn > 0])
    threshold = tau * scale
    threshold_error = threshold * (2 * distance_error(d) + 4 * u())  # both medians, see the test
    members = np.zeros((b, b), dtype=bool)
    bases, residual, decisions = [], [], []
    nearest = [np.argsort(dist[i], kind="stable")[: min(n_max, b) - 1] for i in range(b)]
    for i in range(b):
        order = nearest[i]
        is_mutual = {int(j): i in nearest[j] for j in order}
        if mutual:
            order = [j for j in order if is_mutual[j]] + [j for j in order if not is_mutual[j]]
        chosen = [i, *order[: min_points - 1]]
        for c in order[min_points - 1 :]:
            if mutual and not is_mutual[int(c)]:
                continue
            trial = [*chosen, c]
            y = x[trial] - x[i]
            uu = np_pca_basis(y, m)
            r_max = np.linalg.norm(y - y @ uu @ uu.T, axis=1).max()
            bounds = pca_error_bounds(y, m, n_gram)
            allowed = bounds["res2_gram"] + 2 * r_max * bounds["residual"] + 3 * threshold * threshold_error
            decisions.append((abs(r_max**2 - threshold**2), allowed))
            if r_max <= threshold:
                chosen = trial
        y = x[chosen] - x[i]
        uu = np_pca_basis(y, m)
        members[i, chosen] = True
        bases.append(uu)
        residual.append(np.linalg.norm(y - y @ uu @ uu.T, axis=1).max())
    return members, np.stack(bases), np.array(residual), scale, np.array(decisions)


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
    t = t[np.abs(t) >= gap - 0.05]  # half the grid step: whatever the rounding of k·0.1
    th = math.radians(theta_deg)
    a = np.stack([t, np.zeros_like(t)], 1)
    b = np.stack([t * math.cos(th), t * math.sin(th)], 1)
    x2 = np.concatenate([a, b])
    labels = np.repeat([0, 1], len(t))
    if d > 2:
        rot = np.linalg.qr(np.random.default_rng(3).standard_normal((d, 2)))[0]
        x2 = x2 @ rot.T + 0.7  # rotated and shifted off the origin
    return torch.tensor(x2, dtype=dtype), labels


def orth_par_bounds(queries, anchors, bases) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Error bounds (Q, P) of ``orthogonal_and_parallel`` against exact arithmetic on the same
    input values, before the final cast (its docstring; float64 working precision).

    Per pair ``R = ‖q - c‖ + ‖a - c‖`` with c the anchors' mean (the documented shift).
    ``o² = ‖v‖² - p²`` is off by ``δ <= (1 + sqrt(m))² (d + 3) u R²`` (dot products of length d in
    ‖v‖², in the m coordinates and in UᵀU, the m × m Cholesky of UᵀU), so
    ``|o - o_exact| <= min(sqrt(δ), δ / o_exact)``; p (no cancellation) by ``sqrt(m) (d + 1) u R``.
    First-order terms on both: the shift (2u R), the re-orthonormalisation of a basis given to
    2 qr_orthonormality (its effect on the span, counted again to be safe), and the float64
    NumPy reference's own rounding (v, two products, a norm: γ_{2d+m+3} R).
    Returns (first_order, p_bound, delta); see :func:`o_bound_from` for o.
    """
    q, a = (
        t.detach().double().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, float)
        for t in (queries, anchors)
    )
    n_pieces, d, m = tuple(bases.shape)
    centre = a.mean(axis=0)
    r = np.linalg.norm(q - centre, axis=1)[:, None] + np.linalg.norm(a - centre, axis=1)[None, :]
    first = (2 * u() + 2 * qr_orthonormality(d, m) + math.sqrt(m) * gamma(2 * d + m + 3)) * r
    delta = (1 + math.sqrt(m)) ** 2 * (d + 3) * u() * r**2
    p_bound = math.sqrt(m) * (d + 1) * u() * r + first
    return first, p_bound, delta


def o_bound_from(first: np.ndarray, delta: np.ndarray, o_ref: np.ndarray) -> np.ndarray:
    """``min(sqrt(δ), δ / o)`` plus the first-order terms (see :func:`orth_par_bounds`)."""
    with np.errstate(divide="ignore"):
        return np.minimum(np.sqrt(delta), np.where(o_ref > 0, delta / o_ref, np.inf)) + first


def sprime_bound(o, p, o_err, p_err, n_alpha: float, n_beta: float, dtype=torch.float64) -> np.ndarray:
    """Error of ``s' = exp(-(N_α log1p(o/2) + N_β log1p(p)))`` against the NumPy reference
    ``(1 + o/2)^(-N_α) (1 + p)^(-N_β)``: through o and p, ``|∂s'/∂o| <= N_α/2 s'``,
    ``|∂s'/∂p| <= N_β s'``; torch's two log1p and exp (3 function errors, 3 roundings on
    ``z = -log s'``: relative ``|z| (f + 3u) + f``); NumPy's two rounded bases raised to
    N_α, N_β, two pow and a product (``(N_α + N_β) u + 2 f + u``); and the final cast (u of dtype)."""
    sp = (1.0 + o / 2.0) ** (-n_alpha) * (1.0 + p) ** (-n_beta)
    z = -np.log(sp)
    f = function_error()
    own = z * (f + 3 * u()) + f + (n_alpha + n_beta) * u() + 2 * f + u()
    return sp * (n_alpha / 2 * o_err + n_beta * p_err + own + u(dtype))


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
    coords = rng.standard_normal(m)
    queries[0] = anchors[2] + bases[2] @ coords  # a query lying on piece 2
    o_exact, _ = np_orth_par(queries, anchors, bases)
    inputs = [torch.tensor(a, dtype=dtype) for a in (queries, anchors, bases)]
    o, p = orthogonal_and_parallel(*inputs)
    assert o.dtype == dtype and p.dtype == dtype and o.shape == (7, 5)
    # Reference on the values the function receives (rounded to dtype), distances from the span
    # of the rounded bases (re-orthonormalised in float64, as the function does).
    q_in, a_in, b_in = (t.double().numpy() for t in inputs)
    o_ref, p_ref = np_orth_par(q_in, a_in, np.stack([np.linalg.qr(b)[0] for b in b_in]))
    first, p_err, delta = orth_par_bounds(q_in, a_in, b_in)
    o_err = o_bound_from(first, delta, o_ref)
    # bounds: float64 arithmetic (orth_par_bounds), then the cast to dtype (relative u of dtype)
    assert_within(o, o_ref, o_err + u(dtype) * (o_ref + o_err), "o")
    assert_within(p, p_ref, p_err + u(dtype) * (p_ref + p_err), "p")
    # The query on piece 2: exactly on it in float64 up to the rounding of a + U c (γ_{m+1}) and
    # the reference's own; rounding q, a (relative u each) and U (‖ΔU‖_F <= u sqrt(m), the
    # projector moves by 2‖ΔU‖) to dtype moves it off by at most u (‖q‖ + ‖a‖ + 2 sqrt(m) ‖v‖).
    assert o_exact[0, 2] <= first[0, 2] + gamma(m + 1) * np.linalg.norm(queries[0])
    v = np.linalg.norm(coords)
    rounding = u(dtype) * (np.linalg.norm(queries[0]) + np.linalg.norm(anchors[2]) + 2 * math.sqrt(m) * v)
    on_piece = o_err[0, 2] + rounding + first[0, 2]
    assert o[0, 2] <= on_piece
    # the bound resolves a query moved off the piece by 10 times the bound
    normal = rng.standard_normal(d)
    normal -= bases[2] @ (bases[2].T @ normal)
    moved = queries[:1] + 10 * on_piece * normal / np.linalg.norm(normal)
    o_moved, _ = orthogonal_and_parallel(torch.tensor(moved, dtype=dtype), *inputs[1:])
    assert_rejects(o_moved[0, 2], o_ref[0, 2], o_err[0, 2] + rounding, "o of a query moved off its piece")


def test_directional_similarity_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    o, p = rng.uniform(0, 3, (6, 9)), rng.uniform(0, 3, (6, 9))
    for n_alpha, n_beta in [(5.0, 0.5), (1.0, 1.5), (0.0, 2.0), (4.0, 0.0)]:
        got = directional_similarity(torch.tensor(o), torch.tensor(p), n_alpha=n_alpha, n_beta=n_beta)
        ref = np_sprime(o, p, n_alpha, n_beta)
        # exact o, p: only the evaluation of the two formulas (sprime_bound with zero input error)
        bound = sprime_bound(o, p, 0.0, 0.0, n_alpha, n_beta)
        assert_within(got, ref, bound, f"s' for N_α={n_alpha}, N_β={n_beta}")
        wrong = directional_similarity(torch.tensor(o), torch.tensor(p), n_alpha=n_alpha + 1e-9, n_beta=n_beta)
        assert_rejects(wrong, ref, bound, "s' with N_α off by 1e-9")
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
    # bound: o, p errors of orth_par_bounds (forced members lie exactly on their piece, where o
    # carries the sqrt(δ) cancellation error) through s' (sprime_bound); the diagonal is exact;
    # mean/min/max of the two halves add at most one rounding (u).
    first, p_err, delta = orth_par_bounds(x, x, bases)
    sp_err = sprime_bound(o, p, o_bound_from(first, delta, o), p_err, 4.0, 0.75)
    np.fill_diagonal(sp_err, 0.0)
    bound = np.maximum(sp_err, sp_err.T) + u() * np_sym(sp, sp.T, rule)
    assert_within(s, np_sym(sp, sp.T, rule), bound, "s")
    assert_rejects(
        point_similarity(pieces, n_alpha=4.0 * (1 + 1e-6), n_beta=0.75, symmetrize=rule), np_sym(sp, sp.T, rule), bound
    )
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
    # bound: each half as in test_point_similarity_matches_numpy, plus one rounding for the rule
    first_f, p_err_f, delta_f = orth_par_bounds(x, loc, vb)
    first_b, p_err_b, delta_b = orth_par_bounds(loc, x, pieces.bases)
    err_f = sprime_bound(o_f, p_f, o_bound_from(first_f, delta_f, o_f), p_err_f, 5.0, 0.5)
    err_b = sprime_bound(o_b, p_b, o_bound_from(first_b, delta_b, o_b), p_err_b, 5.0, 0.5).T
    bound = np.maximum(err_f, err_b) + u() * ref
    assert_within(got, ref, bound, "proxy-point s")
    moved = torch.tensor(loc) + torch.tensor(10 * bound.max() * rng.standard_normal((6, 12)))
    assert_rejects(proxy_point_similarity(pieces, moved, torch.tensor(vb), symmetrize=rule), ref, bound)


# ------------------------------------------------------------------------------------------
# pieces against NumPy
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,tau,n_max", [(2, 0.5, 10), (1, 1.0, 8), (2, 2.0, 12), (3, 0.5, 10)])
def test_fit_pieces_matches_numpy_greedy_reference(m: int, tau: float, n_max: int) -> None:
    rng = np.random.default_rng(m * 100 + n_max)
    x = noisy_planes(rng, 4, 12, 10, 0.04, spread=0.3)
    b, d = x.shape
    members_ref, bases_ref, residual_ref, scale_ref, decisions = np_fit_pieces(x, m, tau, n_max, m + 1)
    pieces = fit_pieces(torch.tensor(x), m=m, tau=tau, n_max=n_max)
    sizes = members_ref.sum(1)
    assert sizes.min() < n_max and sizes.max() > m + 1, "the data must exercise acceptance and rejection"
    # scale: median of explicit-difference distances on both sides (relative γ_{d+3} each; the
    # median is 1-Lipschitz in the values; the mean of the two middle ones adds <= 4u)
    scale_err = scale_ref * (2 * distance_error(d) + 4 * u())
    assert abs(pieces.scale.item() - scale_ref) <= scale_err
    # equal memberships are guaranteed only where no decision lies within its error bound
    margin, allowed = decisions.T
    assert (margin > allowed).all(), "a candidate lies within the rounding error of the threshold"
    np.testing.assert_array_equal(pieces.members.numpy(), members_ref)
    # residuals and projectors: pca_error_bounds of each piece (Gram route + explicit residual
    # against NumPy's SVD); the residual is now explicit, accurate also at 0 (the min_points
    # pieces), where the Gram route's sqrt(G_kk - Σλw²) is off by sqrt(u)·‖y‖
    y_of = [x[np.flatnonzero(members_ref[i])] - x[i] for i in range(b)]
    bounds = [pca_error_bounds(y, m, min(n_max, b)) for y in y_of]
    residual_err = np.array([bd["residual"] for bd in bounds])
    assert_within(pieces.residual, residual_ref, residual_err, "residual")
    # Pieces lying exactly on their plane (only the m + 1 forced points; the first case, the
    # issue's): the Gram route's guaranteed accuracy there, sqrt(δ_res2), is rejected, so the
    # old Gram-route residual could not be relied on to pass.
    exact = residual_ref <= residual_err
    if exact.any():
        gram_route = pieces.residual.numpy().copy()
        gram_route[exact] = np.sqrt([bd["res2_gram"] for bd, e in zip(bounds, exact, strict=True) if e])
        assert_rejects(gram_route, residual_ref, residual_err, "Gram-route residual")
    proj = np.einsum("bdm,bem->bde", pieces.bases.numpy(), pieces.bases.numpy())
    proj_ref = np.einsum("bdm,bem->bde", bases_ref, bases_ref)
    assert_within(proj, proj_ref, np.array([bd["projector"] for bd in bounds])[:, None, None], "projector")
    # accepted means a Gram-route r² <= T², so the explicit residual is <= sqrt(T² + δ_res2) + its error
    threshold = pieces.threshold.item()
    limit = [math.sqrt(threshold**2 + bd["res2_gram"]) + bd["residual_exact"] for bd in bounds]
    assert (pieces.residual.numpy() <= np.array(limit)).all()


@pytest.mark.parametrize("m,tau,n_max", [(2, 0.5, 10), (2, 2.0, 12), (1, 1.0, 8)])
def test_mutual_pieces_match_numpy_greedy_reference(m: int, tau: float, n_max: int) -> None:
    rng = np.random.default_rng(m * 100 + n_max + 1)
    x = noisy_planes(rng, 4, 12, 10, 0.04, spread=0.3)
    members_ref, _, _, _, decisions = np_fit_pieces(x, m, tau, n_max, m + 1, mutual=True)
    plain_ref, *_ = np_fit_pieces(x, m, tau, n_max, m + 1)
    assert (members_ref != plain_ref).any(), "the data must have non-mutual candidates that would join"
    margin, allowed = decisions.T
    assert (margin > allowed).all(), "a candidate lies within the rounding error of the threshold"
    pieces = fit_pieces(torch.tensor(x), m=m, tau=tau, n_max=n_max, neighbourhoods="mutual")
    np.testing.assert_array_equal(pieces.members.numpy(), members_ref)


def test_a_stray_point_grows_no_piece_on_others_that_do_not_choose_it() -> None:
    """A line of points 0.1 apart and a stray 0.255 off its middle: the stray's 3 nearest are line
    points, but every line point has 3 line points nearer than the stray, so none of the stray's
    candidates is mutual. With a generous threshold the plain piece of the stray grows along them;
    the mutual piece keeps only its forced nearest member, and no line piece holds the stray."""
    t = np.arange(12, dtype=np.float64) * 0.1
    line = np.stack([t, np.zeros_like(t)], 1)
    x = torch.tensor(np.concatenate([line, [[0.55, 0.25]]]))
    stray = 12
    knn = fit_pieces(x, m=1, tau=5.0, n_max=4)
    mutual = fit_pieces(x, m=1, tau=5.0, n_max=4, neighbourhoods="mutual")
    assert knn.members[stray].sum() > 2, "the plain piece must grow by a non-mutual candidate (else vacuous)"
    assert mutual.members[stray].sum() == 2  # the anchor and its forced nearest (min_points = m + 1)
    assert not mutual.members[:stray, stray].any() and not knn.members[:stray, stray].any()


def test_fit_pieces_without_subset_selection_is_knn_pca() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((30, 9))
    pieces = fit_pieces(torch.tensor(x), m=2, subset_selection=False, k_plain=5)
    dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    for i in range(len(x)):
        nbrs = np.argsort(dist[i])[:5]
        assert set(np.flatnonzero(pieces.members[i].numpy())) == {i, *nbrs}
        y = x[[i, *nbrs]] - x[i]
        u_ref = np_pca_basis(y, 2)
        bound = pca_error_bounds(y, 2, 6)["projector"]  # Davis-Kahan / Wedin, see pca_error_bounds
        assert bound < math.sqrt(u()), "the neighbourhood must determine its plane (else the check is vacuous)"
        assert_within(pieces.bases[i].numpy() @ pieces.bases[i].numpy().T, u_ref @ u_ref.T, bound, f"piece {i}")
    assert torch.isinf(pieces.threshold)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pieces_are_orthonormal_detached_and_keep_dtype(dtype: torch.dtype) -> None:
    x = torch.randn(50, 32, dtype=dtype, requires_grad=True)
    pieces = fit_pieces(x, m=3)
    assert isinstance(pieces, Pieces) and pieces.dim == 3
    for t in (pieces.anchors, pieces.bases, pieces.residual):
        assert t.dtype == dtype and not t.requires_grad
    gram = pieces.bases.transpose(1, 2) @ pieces.bases
    # bound: float64 Householder QR (qr_orthonormality), the cast of every entry to dtype (2u:
    # unit columns, Cauchy-Schwarz), and this product in dtype (γ_d on sums of |u_i||u_j| <= 1)
    bound = qr_orthonormality(32, 3) + 2 * u(dtype) + gamma(32, dtype)
    assert_within(gram, torch.eye(3, dtype=dtype).expand(50, 3, 3), bound, "UᵀU")
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
    torch.testing.assert_close(s, s.T, rtol=0, atol=0)  # mean: ½(a + b) = ½(b + a); min, max: exact
    assert (s > 0).all() and (s <= 1).all()
    assert (s.diagonal() == 1).all()
    dist = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist").numpy()
    iu = np.triu_indices(len(x), 1)
    d_pairs, s_pairs = dist[iu], s.double().numpy()[iu]
    same = (labels[:, None] == labels[None, :])[iu]
    # same-line vs cross-line pairs at equal Euclidean distance (60 degrees: the pairs (A_t, B_t)
    # are exactly as far apart as (A_t, A_2t)). Equal in exact arithmetic means equal up to the
    # rounding of the points to dtype (2u ‖x‖ per distance) and of the distances (γ_{d+3}), twice.
    size = float(x.double().norm(dim=1).max())
    resolution = 2 * (2 * u(dtype) * size + distance_error(x.shape[1]) * 2 * size)
    gaps = np.abs(d_pairs[same][:, None] - d_pairs[~same][None, :])
    equal = gaps <= resolution
    assert equal.sum() > 50
    assert gaps[~equal].min() > 1e3 * resolution, "distances must be equal or clearly different"
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
        return directional_similarity(o, p, n_alpha=n_alpha, n_beta=n_beta)[:, 0]

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
    along_i = anchor_i + torch.tensor([[0.3, 0.0]], dtype=dtype)
    across_i = anchor_i + torch.tensor([[0.0, 0.3]], dtype=dtype)
    o, p = orthogonal_and_parallel(along_i, anchor_i, basis_i)
    o2, p2 = orthogonal_and_parallel(across_i, anchor_i, basis_i)
    # Line A's points have second coordinate exactly 0, so the basis is exactly ±e1 up to its
    # norm (qr_orthonormality); the queries are off (0.3, 0) and (0, 0.3) by one rounding
    # (u ‖x‖). Then orth_par_bounds (with o_exact = 0.3 for the second query).
    size = float(along_i.norm() + anchor_i.norm())
    first, p_err, delta = (t.item() for t in orth_par_bounds(along_i, anchor_i, basis_i))
    inexact = u() * size + 0.3 * qr_orthonormality(2, 1)
    assert o.item() <= math.sqrt(delta) + first + inexact
    assert abs(p.item() - 0.3) <= p_err + inexact
    first2, _, delta2 = (t.item() for t in orth_par_bounds(across_i, anchor_i, basis_i))
    assert abs(o2.item() - 0.3) <= delta2 / 0.3 + first2 + inexact
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
    # orthonormal as in test_pieces_are_orthonormal_detached_and_keep_dtype (d = 16, m = 2)
    bound = qr_orthonormality(16, 2) + 2 * u(torch.float32) + gamma(16, torch.float32)
    assert_within(pieces.bases.transpose(1, 2) @ pieces.bases, torch.eye(2).expand(17, 2, 2), bound, "UᵀU")
    torch.testing.assert_close(s, s.T, rtol=0, atol=0)  # ½(a + b) is exactly ½(b + a)
    assert (s.diagonal() == 1).all()
    # A point and its copy (and the coincident zeros) are at o = p = 0 exactly: s = 1 up to
    # the rounding of o and p (orth_par_bounds), through s' (sprime_bound), and the cast.
    first, p_err, delta = orth_par_bounds(x, x, pieces.bases)
    zero = np.zeros_like(delta)
    s_err = sprime_bound(zero, zero, np.sqrt(delta) + first, p_err, 5.0, 0.5, torch.float32)
    s_err = np.maximum(s_err, s_err.T)
    copies = (torch.arange(4), torch.arange(10, 14))
    assert_within(s[copies], np.ones(4), s_err[copies], "a point and its copy")
    assert_within(s[14:, 14:], np.ones((3, 3)), s_err[14:, 14:], "coincident zero vectors")


def test_all_identical_points() -> None:
    for x in (torch.zeros(12, 8), torch.ones(12, 8)):
        pieces = fit_pieces(x)
        assert pieces.scale.item() == 0.0 and (pieces.size == 10).all()
        s = plm_similarity(x)
        # every point equals the anchors' mean, so every shifted point is exactly 0 (R = 0 in
        # orth_par_bounds): o = p = 0 exactly and s = exp(-0) = 1 exactly
        assert torch.isfinite(s).all() and (s == 1).all()


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
    torch.testing.assert_close(s, ref, rtol=0, atol=0)  # the same computation on the same values


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
    # the same float32/float64 computation on the same values, then one rounding to bfloat16
    s32 = plm_similarity(x.float())
    assert_within(s.float(), s32, u(torch.bfloat16) * s32.abs(), "bfloat16 vs float32")
    assert_rejects(s.float(), plm_similarity(x.float(), n_alpha=5.5), u(torch.bfloat16) * s32.abs())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_like_on_cpu() -> None:
    x = torch.randn(60, 32, dtype=torch.float64)
    pieces_cpu, pieces_gpu = fit_pieces(x), fit_pieces(x.cuda())
    s_cpu = plm_similarity(x)
    s_gpu = plm_similarity(x.cuda())
    assert s_gpu.device.type == "cuda"
    # Different kernels, same bounds: the same members (no decision near its threshold on random
    # data), projectors within pca_error_bounds of NumPy's, s within s' bounds of each device's
    # own pieces (test_point_similarity_matches_numpy).
    torch.testing.assert_close(pieces_gpu.members.cpu(), pieces_cpu.members, rtol=0, atol=0)
    xn = x.numpy()
    for i in range(len(xn)):
        y = xn[pieces_cpu.members[i].numpy()] - xn[i]
        u_ref = np_pca_basis(y, 2)
        bound = pca_error_bounds(y, 2, 10)["projector"]
        for pieces in (pieces_cpu, pieces_gpu):
            basis = pieces.bases[i].cpu().numpy()
            assert_within(basis @ basis.T, u_ref @ u_ref.T, bound, f"piece {i}")
    for s, pieces in ((s_cpu, pieces_cpu), (s_gpu, pieces_gpu)):
        bases = pieces.bases.cpu().numpy()
        o, p = np_orth_par(xn, xn, bases)
        np.fill_diagonal(o, 0.0)
        np.fill_diagonal(p, 0.0)
        sp = np_sprime(o, p, 5.0, 0.5)
        first, p_err, delta = orth_par_bounds(xn, xn, bases)
        sp_err = sprime_bound(o, p, o_bound_from(first, delta, o), p_err, 5.0, 0.5)
        np.fill_diagonal(sp_err, 0.0)
        assert_within(s.cpu(), np_sym(sp, sp.T, "mean"), np.maximum(sp_err, sp_err.T) + u() * sp.max(), "s")


# ------------------------------------------------------------------------------------------
# proxies
# ------------------------------------------------------------------------------------------


def test_proxy_bases_are_orthonormal_and_differentiable() -> None:
    proxies = Proxies(dim=16, n_proxies=7, m=3, generator=torch.Generator().manual_seed(0))
    locations, bases = proxies()
    assert locations.shape == (7, 16) and bases.shape == (7, 16, 3)
    # float32 Householder QR (qr_orthonormality, whatever the conditioning of the raw matrix)
    # and the product in float32 (γ_16 on sums of |v_i||v_j| <= 1 + the orthonormality error)
    f32 = torch.float32
    orthonormal = qr_orthonormality(16, 3, f32) + gamma(16, f32) * (1 + qr_orthonormality(16, 3, f32))
    eye = torch.eye(3).expand(7, 3, 3)
    assert_within(bases.transpose(1, 2) @ bases, eye, orthonormal, "VᵀV")
    with torch.no_grad():  # an arbitrary raw matrix still gives an orthonormal basis
        proxies.raw_bases.mul_(torch.rand(7, 1, 3) * 5).add_(0.3)
    bases = proxies.bases
    assert_within(bases.transpose(1, 2) @ bases, eye, orthonormal, "VᵀV of a rescaled raw matrix")
    target = torch.randn(7, 16, 3)
    (bases * target).sum().backward()
    assert proxies.raw_bases.grad is not None and proxies.raw_bases.grad.abs().sum() > 0
    before = proxies.bases.detach().clone()
    proxies.orthonormalize_()
    # QR of a basis orthonormal to ε returns it up to Q's distance from orthonormal (eq. 19.13)
    # and the input's own departure (both qr_orthonormality / 2 per entry, Frobenius >= entry)
    same = qr_orthonormality(16, 3, f32)
    assert_within(proxies.raw_bases.detach(), before, same, "raw bases after orthonormalize_")
    assert_within(proxies.bases.detach(), before, same, "bases after orthonormalize_")


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
    f32, size = torch.float32, np.linalg.norm(x, axis=1).max()
    # every location is an embedding rounded to float32: off by <= u ‖x‖ (+ the norm's γ_{d+3})
    assert_within(dist.min(axis=1), np.zeros(20), u(f32) * size * (1 + distance_error(12)), "locations")
    assert len(np.unique(dist.argmin(axis=1))) == 20  # distinct ones
    for k in range(20):
        i = dist[k].argmin()
        nbrs = np.argsort(dist[k])[1:6]
        y = x[[i, *nbrs]] - x[i]
        u_ref = np_pca_basis(y, 2)
        # Rounding x to float32 moves every row of y by <= 2u ‖x‖ (Wedin: sin Θ <= ‖ΔY‖_F /
        # (σ_m - σ_{m+1} - ‖ΔY‖)); then the float64 fit against NumPy (pca_error_bounds); the
        # cast of the basis to float32 (2u sqrt(m) on its projector) and the float32 QR of
        # Proxies.bases (2 qr_orthonormality).
        dy = 2 * u(f32) * size * math.sqrt(len(y))
        sv = np.linalg.svd(y, compute_uv=False)
        assert sv[1] - sv[2] > 2 * dy
        bound = dy / (sv[1] - sv[2] - dy) + pca_error_bounds(y, 2, 6)["projector"]
        bound += 2 * u(f32) * math.sqrt(2) + 2 * qr_orthonormality(12, 2, f32)
        assert_within(bases[k] @ bases[k].T, u_ref @ u_ref.T, bound, f"proxy {k}")
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
    # two float64 Pearson correlations of the same 300 pairs, each within pearson_error
    bound = 2 * pearson_error(s[iu], truth[iu])
    assert abs(similarity_correlation(torch.tensor(s), torch.tensor(labels)) - ref) <= bound
    assert abs(similarity_correlation(s, list(labels)) - ref) <= bound
    assert abs(similarity_correlation(truth, labels) - 1.0) <= pearson_error(truth[iu], truth[iu])
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
    # both sides: a mean of <= 15 ratios in [0, 1] (one division each, a sum, a division):
    # each within γ_17 of the exact value
    bound = 2 * gamma(17)
    assert abs(piece_purity(torch.tensor(members), torch.tensor(labels)) - np.mean(fractions)) <= bound
    assert abs(piece_purity(members, labels, include_anchor=True) - np.mean(fractions_with)) <= bound
    with pytest.raises(ValueError, match="besides its anchor"):
        piece_purity(np.eye(5, dtype=bool), np.arange(5))
