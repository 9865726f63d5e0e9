"""The piecewise-linear manifold: local linear pieces, similarities, proxies, quality measures.

METHOD.md §2-4 and the slides 5, 8, 9, 10 and 14 of Bhatnagar & Ahuja (CPAL 2024). Everything
works on embeddings (not images), is batched (no Python loop over points or pairs), and follows the
device and dtype of its input (float32 or float64; half precision is fitted in float32). The
cancellation-prone arithmetic (the orthogonal distance ``o``, the pieces' Gram matrices and
residuals) runs in float64 internally, on devices that have it, and is cast back (see
:func:`orthogonal_and_parallel` and :func:`fit_pieces` for the error bounds).

Notation: a batch of teacher embeddings ``x`` (B × d). Every point ``x_i`` gets a *piece*
``P_i = (x_i, U_i)``, the affine subspace ``{x_i + U_i c}`` with an orthonormal basis
``U_i`` (d × m). For a pair of points and ``v = x_i - x_j``:

* ``o(x_i, x_j) = ‖(I - U_j U_jᵀ) v‖``  orthogonal distance of ``x_i`` from ``P_j``;
* ``p(x_i, x_j) = ‖U_j U_jᵀ v‖``        distance of ``x_j`` from the projection of ``x_i`` on ``P_j``;
* ``s'(x_i, x_j) = (1 + o/2)^(-N_α) · (1 + p)^(-N_β)``;
* ``s(x_i, x_j) = sym(s'(x_i, x_j), s'(x_j, x_i))`` with sym = mean (default), min or max.

Proxies (§4) are learnable pieces ``(ρ_k, V_k)`` that stand in for ``P_j`` in the same formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from plmetric.manifold.distances import pairwise_distances
from plmetric.core.options import SYMMETRIZE_RULES, ManifoldOptions, PieceOptions, PLMLossOptions, SimilarityOptions, resolve
from plmetric.core.validation import check_choice, check_embeddings, check_int

__all__ = [
    "Pieces",
    "Proxies",
    "directional_similarity",
    "fit_pieces",
    "orthogonal_and_parallel",
    "orthonormal_columns",
    "piece_purity",
    "plm_similarity",
    "plm_similarity_and_pieces",
    "point_similarity",
    "proxy_point_similarity",
    "similarity_correlation",
    "symmetrize_similarity",
]


# --------------------------------------------------------------------------------------------
# small numerical helpers
# --------------------------------------------------------------------------------------------


def _working_dtype(x: Tensor) -> Tensor:
    """Half precision is fitted in float32 (eigh/QR need it); float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# Device types without float64 arithmetic; there the accurate dtype falls back to float32.
_NO_FLOAT64_DEVICES = frozenset({"mps"})


def _accurate_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the cancellation-prone arithmetic: float64, or float32 on devices without it.

    Differences of squares (``‖v‖² - ‖Uᵀv‖²``, ``G_kk - Σ λ_r W[k, r]²``) lose half the digits
    of the dtype they are computed in: an error of about ``sqrt(c·u)·‖v‖`` near 0, with ``u`` the
    unit roundoff and c a small multiple of d. In float64 ``sqrt(u) = 1.1e-8``, below float32's
    own ``u = 6e-8``, so float32 and half-precision inputs get results accurate to their dtype.
    The float64 work is on (Q, P)-, (P, d, m)- and (B, n, n)-sized tensors only.
    """
    return torch.float32 if device.type in _NO_FLOAT64_DEVICES else torch.float64


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(max(x, 0))`` with a zero (not infinite) gradient at 0, so duplicates never give NaN."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def orthonormal_columns(a: Tensor) -> Tensor:
    """Orthonormalise the columns of a batch of matrices: ``Q`` of ``a = Q R`` with ``diag(R) >= 0``.

    Householder QR, so ``Q`` has orthonormal columns even when ``a`` is rank deficient (a zero
    column is replaced by a unit vector orthogonal to the previous ones). The sign fix makes
    ``Q`` a continuous, differentiable function of a full-rank ``a``, and ``Q = a`` when ``a``'s
    columns are already orthonormal.

    Args:
        a: (..., d, m) with m <= d.

    Returns:
        (..., d, m) with ``Qᵀ Q = I_m``.
    """
    q, r = torch.linalg.qr(a, mode="reduced")
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign.unsqueeze(-2)


def _masked_pca(gram: Tensor, mask: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Anchor-centred PCA of the masked members, from their Gram matrix (the t × t route).

    With ``Y`` (B, n, d) the member vectors minus the anchor (non-members zeroed), ``G = Y Yᵀ``
    and ``G = W Λ Wᵀ``: the top-m principal directions are ``Yᵀ w_r / sqrt(λ_r)``, the
    coordinates of member k on them are ``sqrt(λ_r) W[k, r]``, so its squared residual is
    ``G_kk - Σ_r λ_r W[k, r]²`` (no d-dimensional work).

    Computed in ``gram``'s dtype; callers pass a float64 Gram (:func:`_accurate_dtype`). The
    squared residual is a difference of squares: its error is about ``c·u·max_k ‖y_k‖²``
    (``u`` the unit roundoff of that dtype, ``c`` a small multiple of n for the Gram products
    and the eigensolver's backward error), so the residual itself is accurate only to
    ``sqrt(c·u)·‖y‖`` near 0, and to ``c·u·‖y‖²/(2·residual)`` away from 0 (e.g. at the
    acceptance threshold). :func:`_member_residual` gives ``c·u·‖y‖`` from the vectors.

    Returns:
        ``w`` (B, n, m) top eigenvectors, largest first; ``lam`` (B, m) their eigenvalues (>= 0);
        ``res2`` (B, n) squared residual of every member (0 for non-members).
    """
    weight = mask.to(gram.dtype)
    masked = gram * weight.unsqueeze(-1) * weight.unsqueeze(-2)
    evals, evecs = torch.linalg.eigh(masked)
    lam = evals[..., -m:].flip(-1).clamp_min(0)
    w = evecs[..., -m:].flip(-1)
    res2 = torch.diagonal(masked, dim1=-2, dim2=-1) - (w.pow(2) * lam.unsqueeze(-2)).sum(-1)
    return w, lam, res2.clamp_min(0) * weight


def _basis_from_gram(y: Tensor, w: Tensor, mask: Tensor) -> Tensor:
    """Orthonormal basis (B, d, m) spanned by ``Yᵀ w_r`` (the principal directions), completed
    by orthonormal directions where the members span fewer than m dimensions."""
    raw = torch.einsum("bnd,bnm->bdm", y * mask.to(y.dtype).unsqueeze(-1), w)
    return orthonormal_columns(raw)


def _member_residual(y: Tensor, bases: Tensor, mask: Tensor) -> Tensor:
    """(B,) ``max_{k member} ‖y_k - U (Uᵀ y_k)‖``, the largest distance of a member from its piece.

    From the member vectors themselves (y (B, n, d), bases (B, d, m) orthonormal, mask (B, n)),
    not from the Gram matrix: the residual vector is formed explicitly, so the result is
    accurate to about ``c·u·‖y‖`` (``u`` the unit roundoff of y's dtype, ``c`` ~ d·m from the two
    products, plus the basis' departure from orthonormality), also at and near 0, where
    ``sqrt(G_kk - Σ λ W²)`` is accurate only to ``sqrt(c·u)·‖y‖``.
    """
    coords = y @ bases  # (B, n, m)
    residual = y - coords @ bases.transpose(1, 2)  # (B, n, d)
    return (torch.linalg.vector_norm(residual, dim=-1) * mask.to(y.dtype)).amax(dim=1)


# --------------------------------------------------------------------------------------------
# 1. local linear pieces
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pieces:
    """One local linear piece per point of a batch (METHOD.md §2).

    Attributes:
        anchors: (B, d) the anchor of piece i is the point ``x_i`` itself.
        bases: (B, d, m) orthonormal basis ``U_i`` of piece i (``U_iᵀ U_i = I_m``).
        members: (B, B) bool, ``members[i, j]`` is True when ``x_j`` belongs to piece i
            (``members[i, i]`` is always True).
        scale: () the median nearest-neighbour distance of the batch (duplicates ignored).
        threshold: () the acceptance threshold ``τ · scale`` (``inf`` without subset selection).

    :attr:`residual` is computed on first access (the training objective never reads it).
    """

    anchors: Tensor
    bases: Tensor
    members: Tensor
    scale: Tensor
    threshold: Tensor

    @cached_property
    def residual(self) -> Tensor:
        """(B,) largest distance of a member of piece i from the piece,
        ``max_{j ∈ P_i} ‖(I - U_i U_iᵀ)(x_j - x_i)‖``, computed from the member vectors in the
        accurate dtype with the stored bases (accurate to about ``c·u·‖x_j - x_i‖``, ``u`` the unit
        roundoff of the pieces' dtype, to which the bases are rounded, ``c`` ~ d·m)."""
        accurate = _accurate_dtype(self.anchors.device)
        most = int(self.size.max())
        # each row's members first (index order among them), then the rest: (B, most) gathers
        _, index = torch.sort(self.members.to(torch.uint8), dim=1, descending=True, stable=True)
        index = index[:, :most]
        member = torch.gather(self.members, 1, index)
        xa = self.anchors.to(accurate)
        y = xa[index] - xa.unsqueeze(1)
        return _member_residual(y, self.bases.to(accurate), member).to(self.anchors.dtype)

    @property
    def size(self) -> Tensor:
        """(B,) number of points in each piece, the anchor included."""
        return self.members.sum(dim=1)

    @property
    def dim(self) -> int:
        """m, the dimension of the pieces."""
        return self.bases.shape[-1]


@torch.no_grad()
def fit_pieces(x: Tensor, options: PieceOptions | None = None, **fields: Any) -> Pieces:
    """Fit an m-dimensional linear piece around every point of a batch (slides 5, 8).

    With subset selection (the paper's method), for every anchor ``x_i`` at once:

    1. candidates: the ``n_max - 1`` nearest other batch points, nearest first;
    2. the ``min_points - 1`` nearest are always members (with the anchor, ``min_points``
       points; default ``m + 1``);
    3. each further candidate in order of distance is tried: the piece is refitted by PCA of the
       members plus the candidate, centred at the anchor (``U_i`` = top-m eigenvectors of
       ``Σ_{j ∈ P_i} (x_j - x_i)(x_j - x_i)ᵀ``), and the candidate is accepted when the largest
       residual of any member stays within the threshold,
       ``max_{j ∈ P_i ∪ {c}} ‖(I - U U ᵀ)(x_j - x_i)‖ <= τ · median_k min_{l≠k} ‖x_k - x_l‖``;
       a rejected candidate is skipped, later ones may still join. With
       ``neighbourhoods="mutual"`` the candidates are reordered mutual neighbours first
       (``j ∈ N(i)`` and ``i ∈ N(j)``, N the ``n_max - 1`` nearest) and only those may join in
       this step: the forced members of step 2 are the nearest mutual ones, completed by the
       nearest others where a point has fewer than ``min_points - 1`` mutual neighbours.

    The loop runs over the growth step (at most ``n_max - min_points`` steps), never over points;
    each step is one batched ``eigh`` of (B, n_max, n_max) Gram matrices.

    Precision: the member vectors ``y = x_j - x_i``, their Gram matrices, the ``eigh`` and the
    basis are computed in float64 whatever the input dtype (float32 on devices without float64,
    such as ``mps``); the bases are then cast to the output dtype. The acceptance test uses the
    Gram-route squared residual, whose error is about ``c·u₆₄·‖y‖²`` (a residual at the
    threshold ``T`` is then off by ``c·u₆₄·‖y‖²/(2T)``, so decisions can only differ from exact
    arithmetic for candidates within that of the threshold). The
    reported :attr:`Pieces.residual` is computed from the member vectors and the final basis,
    ``max_j ‖y_j - U (Uᵀ y_j)‖`` (:func:`_member_residual`), so it is accurate to about
    ``c·u·‖y‖`` with ``u`` the unit roundoff of the output dtype (the basis is rounded to it) and
    ``c`` ~ d·m, also for members lying exactly on the piece, where the Gram route
    ``sqrt(G_kk - Σ λ W²)`` would give ``sqrt(c·u)·‖y‖`` instead of 0.

    Without subset selection (ablation, slide 15): the piece is the anchor plus its ``k_plain``
    nearest neighbours, fitted by the same anchor-centred PCA.

    The median nearest-neighbour distance (the mean of the two middle values for an even count)
    ignores zero distances (duplicates); when every point is a duplicate it is 0 and only points
    lying exactly on a piece join it. Where the members span fewer than m dimensions
    (duplicates, collinear points) the basis is completed with arbitrary orthonormal directions,
    so ``U_iᵀ U_i = I`` always holds. A batch smaller than ``n_max`` (or ``k_plain + 1``) uses
    all its points as candidates.

    Args:
        x: (B, d) teacher embeddings; detached (no gradient flows through the pieces).
        options: :class:`~plmetric.core.options.PieceOptions` (m, tau, n_max, min_points,
            subset_selection, k_plain), or an object holding its fields (the config's ``plm``
            section); default: their defaults.
        **fields: single options overriding ``options``, e.g. ``tau=1.0``.

    Returns:
        The :class:`Pieces` of the batch, on ``x``'s device and dtype (float32 for a
        half-precision ``x``: bases rounded to half precision would not be orthonormal enough).

    Raises:
        ValueError: bad options, fewer than ``max(m + 1, min_points)`` points, ``m > d``, or
            non-finite input.
    """
    opts = resolve(PieceOptions, options, **fields)
    _check_batch(x, opts)
    xw = _working_dtype(x.detach())
    index, y, eligible, scale = _candidate_pool(xw, opts)
    gram = y @ y.transpose(1, 2)
    member, threshold = _select_members(gram, eligible, scale, opts)
    w, _, _ = _masked_pca(gram, member, opts.m)
    bases = _basis_from_gram(y, w, member)
    members = torch.zeros(xw.shape[0], xw.shape[0], dtype=torch.bool, device=x.device)
    members.scatter_(1, index, member)
    return Pieces(anchors=xw, bases=bases.to(xw.dtype), members=members, scale=scale, threshold=threshold)


def _check_batch(x: Tensor, opts: PieceOptions) -> None:
    """Raise unless ``x`` holds finite embeddings, at least ``min_points`` of them, of dimension >= m."""
    m, min_points = opts.m, opts.minimum_points
    check_embeddings(x, "fit_pieces: x", min_rows=1)
    if x.shape[0] < min_points:
        raise ValueError(
            f"fit_pieces: x has {x.shape[0]} points; a piece of dimension m={m} needs at least "
            f"min_points={min_points} points"
        )
    if m > x.shape[1]:
        raise ValueError(f"m: the pieces' dimension {m} exceeds the embedding dimension {x.shape[1]}")


def _candidate_pool(xw: Tensor, opts: PieceOptions) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each anchor's candidates, nearest first (mutual neighbours first with ``neighbourhoods="mutual"``):
    ``(index, y, eligible, scale)`` with ``index`` (B, n) the anchor then its candidates, ``y`` (B, n, d)
    the member vectors ``x_j - x_i`` in the accurate dtype (row 0, the anchor, zero), ``eligible``
    (B, n) which candidates may join, and ``scale`` the median nearest-neighbour distance (zeros
    ignored; 0 when every point is a duplicate)."""
    b, device = xw.shape[0], xw.device
    n_pool = min(opts.n_max if opts.subset_selection else opts.k_plain + 1, b)
    order, nn_dist, differences = _nearest_others(xw, xw.to(_accurate_dtype(device)), n_pool - 1)
    scale = torch.nan_to_num(torch.nanquantile(torch.where(nn_dist > 0, nn_dist, math.nan), 0.5), nan=0.0)
    scale = scale.to(xw.dtype)
    eligible = torch.ones(b, n_pool, dtype=torch.bool, device=device)
    if opts.neighbourhoods == "mutual" and opts.subset_selection:
        order, eligible[:, 1:], position = _mutual_first(order)
        differences = torch.gather(differences, 1, position.unsqueeze(-1).expand_as(differences))
    index = torch.cat([torch.arange(b, device=device).unsqueeze(1), order], dim=1)  # (B, n)
    y = torch.cat([differences.new_zeros(b, 1, differences.shape[-1]), differences], dim=1)
    return index, y, eligible, scale


def _select_members(
    gram: Tensor, eligible: Tensor, scale: Tensor, opts: PieceOptions
) -> tuple[Tensor, Tensor]:
    """``(member, threshold)``: which candidates join each piece, grown one candidate a step (the
    ``min_points`` nearest always; a further one when the refitted piece keeps every member's
    residual within ``τ · scale``), or all of them without subset selection (threshold +inf)."""
    b, n_pool = eligible.shape
    member = torch.zeros(b, n_pool, dtype=torch.bool, device=eligible.device)
    if not opts.subset_selection:
        member[:] = True
        return member, torch.full_like(scale, math.inf)
    min_points = opts.minimum_points
    member[:, :min_points] = True
    threshold = opts.tau * scale
    limit2 = threshold.to(gram.dtype).square()
    for t in range(min_points, n_pool):
        trial = member[:, : t + 1].clone()  # the candidates after t play no part yet
        trial[:, t] = True
        _, _, res2 = _masked_pca(gram[:, : t + 1, : t + 1], trial, opts.m)
        member[:, t] = (res2.amax(dim=1) <= limit2) & eligible[:, t]
    return member, threshold


def _mutual_first(order: Tensor) -> tuple[Tensor, Tensor]:
    """Reorder each row of a k-nearest table so that mutual neighbours come first.

    ``j`` is a mutual neighbour of ``i`` when ``j ∈ N_k(i)`` and ``i ∈ N_k(j)`` (k = the table's
    width); within the mutual and within the other candidates the order stays nearest first.

    Returns:
        ``(order (B, k), mutual (B, k) bool, position (B, k))``, the first two in the new order;
        ``position[i, t]`` is the old column of the new column t.
    """
    b = order.shape[0]
    in_table = torch.zeros(b, b, dtype=torch.bool, device=order.device)
    in_table.scatter_(1, order, True)
    mutual = torch.gather(in_table.T, 1, order)  # [i, t]: i ∈ N_k(order[i, t])
    position = torch.sort((~mutual).to(torch.uint8), dim=1, stable=True).indices
    return torch.gather(order, 1, position), torch.gather(mutual, 1, position), position


_POOL_MARGIN = 2  # extra candidates ranked by the Gram route, re-ranked by explicit differences


def _nearest_others(xw: Tensor, xa: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k nearest other points of every point, nearest first, each point's nearest distance and
    the difference vectors to the k.

    Candidates come from the squared distances of one Gram matrix of the centred points in the
    working dtype (``‖a‖² + ‖b‖² - 2 a·b``, off by about ``c·u·R²``, R the largest centred norm);
    the ``k + 2`` nearest by that route are then re-ranked by explicit differences
    ``‖x_j - x_i‖`` in the accurate dtype (``xa``; error ``γ_{d+3}·‖x_j - x_i‖``, as ``torch.cdist``
    without its matrix-product shortcut), ties in index order. So the order and the distances are
    those of explicit differences unless the k-th and the (k + 3)-th neighbour lie within the Gram
    route's error of each other. No (B, B, d) tensor: one (B, d) × (d, B) product and (B, k + 2, d)
    differences.

    Returns:
        ``order`` (B, k) int64, ``nearest`` (B,) the distance to the nearest other point and
        ``differences`` (B, k, d) ``x_order[i, t] - x_i``, both in ``xa``'s dtype.
    """
    b = xa.shape[0]
    centred = xw - xw.mean(dim=0)
    sq = centred.pow(2).sum(dim=1)
    d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (centred @ centred.T)
    d2.fill_diagonal_(math.inf)
    pool = min(k + _POOL_MARGIN, b - 1)
    candidates = torch.topk(d2, pool, dim=1, largest=False, sorted=False).indices.sort(dim=1).values
    differences = xa[candidates] - xa.unsqueeze(1)  # (B, pool, d)
    ranked, position = torch.sort(torch.linalg.vector_norm(differences, dim=-1), dim=1, stable=True)
    take = position[:, :k]
    order = torch.gather(candidates, 1, take)
    differences = torch.gather(differences, 1, take.unsqueeze(-1).expand(-1, -1, differences.shape[-1]))
    return order, ranked[:, 0], differences


# --------------------------------------------------------------------------------------------
# 2. similarities
# --------------------------------------------------------------------------------------------


def _projection_norm2(coords: Tensor, bases: Tensor) -> Tensor:
    """``‖Π_j v‖²`` (Q, P) for the projector ``Π_j`` onto ``span(U_j)``, from ``c = U_jᵀ v`` (Q, P, m).

    ``Π = U G⁻¹ Uᵀ`` with ``G = UᵀU``, so ``‖Π v‖² = cᵀ G⁻¹ c = ‖L⁻¹ c‖²`` for ``G = L Lᵀ``.
    For a basis orthonormal to its own precision (``G = I + E``, ``‖E‖ ~ u₃₂`` for float32) this is
    ``‖Uᵀv‖²`` corrected by ``-cᵀEc`` to the working precision, i.e. the bases re-orthonormalised
    without touching the (P, d, m) tensor: ``G`` and ``L⁻¹`` are (P, m, m). A basis that is not of
    full rank (no valid input) falls back to ``G = I``, the plain ``‖Uᵀv‖²``.
    """
    m = bases.shape[-1]
    gram = bases.transpose(1, 2) @ bases
    chol, info = torch.linalg.cholesky_ex(gram)
    eye = torch.eye(m, dtype=bases.dtype, device=bases.device)
    chol = torch.where((info == 0).view(-1, 1, 1), chol, eye)
    inverse = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)  # L⁻¹
    return torch.einsum("pkm,qpm->qpk", inverse, coords).pow(2).sum(-1)


def orthogonal_and_parallel(queries: Tensor, anchors: Tensor, bases: Tensor) -> tuple[Tensor, Tensor]:
    """Orthogonal and in-piece distances of query points from pieces (slide 9).

    For query ``q`` and piece ``(a_j, U_j)`` with ``v = q - a_j``:
    ``o[q, j] = ‖(I - U_j U_jᵀ) v‖`` and ``p[q, j] = ‖U_j U_jᵀ v‖ = ‖U_jᵀ v‖``.
    With ``a_j = x_j`` these are METHOD.md §3's ``o(x_q, x_j)`` and ``p(x_q, x_j)``.

    Computed without (Q, P, d) tensors: ``U_jᵀ v = (q U_j) - (a_j U_j)`` from one (Q, d) × (d, P·m)
    product, ``‖v‖²`` from norms and dot products (after a common shift ``c`` to the anchors' mean,
    which leaves v unchanged and reduces cancellation), ``o² = max(‖v‖² - p², 0)``.

    Precision. All of it runs in float64 for float16/bfloat16/float32/float64 inputs (in
    float32 on devices without float64, e.g. ``mps``), and the results are cast back to the
    queries' dtype. The bases are re-orthonormalised in that precision: a float32 basis is
    orthonormal only to ``~u₃₂``, and ``UᵀU = I + E`` alone makes ``‖Uᵀv‖²`` wrong by
    ``‖E‖·p²``, i.e. ``o`` wrong by ``sqrt(u₃₂)·p``; so ``p² = cᵀ (UᵀU)⁻¹ c`` with ``c = Uᵀv``,
    the exact squared projection onto ``span(U_j)`` (a Cholesky factor of the (P, m, m) ``UᵀU``;
    equal to ``‖Uᵀv‖²`` for an exactly orthonormal basis). With ``u`` the unit roundoff of the
    working precision and, per pair, ``R = ‖q - c‖ + ‖a - c‖`` (c the shift):

    * ``o² = ‖v‖² - p²`` is a difference of squares, off by at most ``δ = c_d·u·R²`` with
      ``c_d = (1 + sqrt(m))²·(d + 3)`` (the length-d dot products of ``‖v‖²``, of the m
      coordinates and of ``UᵀU``, and the m × m Cholesky), so ``|o - o_exact| <= sqrt(δ)``
      everywhere (the worst case is ``o = 0``) and ``<= δ / o`` away from 0. In float64 that is
      ``1.1e-8·sqrt(c_d)·R``: below float32's resolution for float32 inputs, ``sqrt(u)`` of the
      input for float64 ones;
    * ``p`` is accurate to ``sqrt(m)·(d + 1)·u·R`` (no cancellation);
    * on top of both, the final cast rounds to the output dtype (relative ``u`` of that dtype).

    The square roots have a zero gradient at 0; the whole computation is differentiable in
    queries, anchors and bases.

    Args:
        queries: (Q, d).
        anchors: (P, d) piece locations.
        bases: (P, d, m) orthonormal piece bases.

    Returns:
        ``o`` and ``p``, both (Q, P), >= 0.
    """
    if queries.dim() != 2 or anchors.dim() != 2 or bases.dim() != 3:
        raise ValueError(
            "orthogonal_and_parallel: expected queries (Q, d), anchors (P, d), bases (P, d, m); got "
            f"{tuple(queries.shape)}, {tuple(anchors.shape)}, {tuple(bases.shape)}"
        )
    n_pieces, d, m = bases.shape
    if anchors.shape != (n_pieces, d) or queries.shape[1] != d:
        raise ValueError(
            "orthogonal_and_parallel: shapes disagree: queries "
            f"{tuple(queries.shape)}, anchors {tuple(anchors.shape)}, bases {tuple(bases.shape)}"
        )
    out_dtype = queries.dtype
    accurate = _accurate_dtype(queries.device)
    queries, anchors, bases = queries.to(accurate), anchors.to(accurate), bases.to(accurate)
    shift = anchors.detach().mean(dim=0)
    q = queries - shift
    a = anchors - shift
    q_coords = (q @ bases.permute(1, 0, 2).reshape(d, n_pieces * m)).view(-1, n_pieces, m)
    a_coords = torch.einsum("pd,pdm->pm", a, bases)
    par2 = _projection_norm2(q_coords - a_coords.unsqueeze(0), bases)
    v2 = q.pow(2).sum(1, keepdim=True) + a.pow(2).sum(1).unsqueeze(0) - 2.0 * (q @ a.T)
    orth2 = (v2.clamp_min(0) - par2).clamp_min(0)
    return _safe_sqrt(orth2).to(out_dtype), _safe_sqrt(par2).to(out_dtype)


def directional_similarity(o: Tensor, p: Tensor, options: SimilarityOptions | None = None, **fields: Any) -> Tensor:
    """``s' = α·β`` with ``α = (1 + o/2)^(-N_α)``, ``β = (1 + p)^(-N_β)`` (slide 9).

    Evaluated as ``exp(-N_α log1p(o/2) - N_β log1p(p))``; in (0, 1] for o, p >= 0, 1 at o = p = 0.

    Args:
        o: orthogonal distances (any shape), >= 0.
        p: in-piece distances (same shape), >= 0.
        options: :class:`~plmetric.core.options.SimilarityOptions` (``n_alpha``, ``n_beta`` are read);
            ``**fields`` override single ones.
    """
    opts = resolve(SimilarityOptions, options, **fields)
    return _directional(o, p, opts)


def _directional(o: Tensor, p: Tensor, opts: SimilarityOptions) -> Tensor:
    return torch.exp(-(opts.n_alpha * torch.log1p(o / 2) + opts.n_beta * torch.log1p(p)))


def symmetrize_similarity(forward: Tensor, backward: Tensor, rule: str = SimilarityOptions.symmetrize) -> Tensor:
    """``s = mean | min | max (s'(a, b), s'(b, a))``, elementwise (METHOD.md §3).

    Args:
        forward: ``s'(a_i, b_j)`` (N, M).
        backward: ``s'(b_j, a_i)`` laid out as (N, M).
        rule: "mean" [choice: default], "min" or "max".
    """
    check_choice("symmetrize", rule, SYMMETRIZE_RULES)
    return _symmetrize(forward, backward, rule)


def _symmetrize(forward: Tensor, backward: Tensor, rule: str) -> Tensor:
    if rule == "mean":
        return 0.5 * (forward + backward)
    if rule == "min":
        return torch.minimum(forward, backward)
    return torch.maximum(forward, backward)


def point_similarity(pieces: Pieces, options: SimilarityOptions | None = None, **fields: Any) -> Tensor:
    """Point-point similarity ``s`` (B × B) of the batch the pieces were fitted on (slide 9).

    ``s'_ij = s'(x_i, x_j) = (1 + o(x_i, x_j)/2)^(-N_α) (1 + p(x_i, x_j))^(-N_β)`` with o, p
    measured from piece ``P_j`` (:func:`orthogonal_and_parallel`), and
    ``s_ij = sym(s'_ij, s'_ji)``; the diagonal is exactly 1 (``o_ii = p_ii = 0``).

    Binary variant (ablation, slide 15): ``s'_ij = 1[x_i ∈ P_j]`` (membership in the piece)
    symmetrised by the same rule, so "max" gives 1 when either piece holds the other point,
    "min" when both do, and "mean" gives values in {0, ½, 1}.

    Args:
        pieces: from :func:`fit_pieces`.
        options: :class:`~plmetric.core.options.SimilarityOptions` (n_alpha, n_beta, symmetrize,
            binary) or an object holding its fields; ``**fields`` override single ones.

    Returns:
        (B, B) symmetric, values in (0, 1] (graded) or {0, ½, 1} (binary), 1 on the diagonal.
    """
    opts = resolve(SimilarityOptions, options, **fields)
    if opts.binary:
        one_sided = pieces.members.T.to(pieces.anchors.dtype)  # [i, j] = x_i ∈ P_j
        return _symmetrize(one_sided, one_sided.T, opts.symmetrize)
    o, p = orthogonal_and_parallel(pieces.anchors, pieces.anchors, pieces.bases)
    eye = torch.eye(o.shape[0], dtype=torch.bool, device=o.device)
    o = o.masked_fill(eye, 0.0)
    p = p.masked_fill(eye, 0.0)
    s_prime = _directional(o, p, opts)
    return _symmetrize(s_prime, s_prime.T, opts.symmetrize)


def proxy_point_similarity(
    pieces: Pieces,
    proxy_locations: Tensor,
    proxy_bases: Tensor,
    options: SimilarityOptions | None = None,
    **fields: Any,
) -> Tensor:
    """Proxy-point similarity ``s(x_i, ρ_k)`` (B × N_ρ) (METHOD.md §4).

    One half uses the proxy's piece ``(ρ_k, V_k)`` in place of ``P_j``:
    ``s'(x_i, ρ_k) = (1 + ‖(I - V_k V_kᵀ)(x_i - ρ_k)‖/2)^(-N_α) (1 + ‖V_kᵀ(x_i - ρ_k)‖)^(-N_β)``;
    the "vice versa" half uses the point's piece ``P_i``:
    ``s'(ρ_k, x_i) = (1 + ‖(I - U_i U_iᵀ)(ρ_k - x_i)‖/2)^(-N_α) (1 + ‖U_iᵀ(ρ_k - x_i)‖)^(-N_β)``;
    ``s = sym(s'(x_i, ρ_k), s'(ρ_k, x_i))``. Always graded (proxies have no member sets, so
    ``binary`` is not read). Differentiable in all inputs; the losses use it as a detached target.

    Args:
        pieces: the batch's pieces (:func:`fit_pieces`).
        proxy_locations: (N_ρ, d) ``ρ_k``.
        proxy_bases: (N_ρ, d, m) orthonormal ``V_k``.
        options, fields: as in :func:`point_similarity`.

    Returns:
        (B, N_ρ), values in (0, 1].
    """
    opts = resolve(SimilarityOptions, options, **fields)
    o_fwd, p_fwd = orthogonal_and_parallel(pieces.anchors, proxy_locations, proxy_bases)
    o_bwd, p_bwd = orthogonal_and_parallel(proxy_locations, pieces.anchors, pieces.bases)
    forward = _directional(o_fwd, p_fwd, opts)
    backward = _directional(o_bwd, p_bwd, opts).T
    return _symmetrize(forward, backward, opts.symmetrize)


@torch.no_grad()
def plm_similarity_and_pieces(
    embeddings: Tensor, options: ManifoldOptions | None = None, **fields: Any
) -> tuple[Tensor, Pieces]:
    """:func:`plm_similarity` and the pieces it was computed from: ``(s (B, B), pieces)``."""
    opts = resolve(ManifoldOptions, options, **fields)
    pieces = fit_pieces(embeddings, opts)
    return point_similarity(pieces, opts).to(embeddings.dtype), pieces


@torch.no_grad()
def plm_similarity(embeddings: Tensor, options: ManifoldOptions | None = None, **fields: Any) -> Tensor:
    """The whole estimate: ``s = point_similarity(fit_pieces(x))`` for a batch of embeddings.

    ``s_ij = sym((1 + o(x_i,x_j)/2)^(-N_α)(1 + p(x_i,x_j))^(-N_β), (1 + o(x_j,x_i)/2)^(-N_α)
    (1 + p(x_j,x_i))^(-N_β))`` with the pieces of :func:`fit_pieces`; computed without gradient
    on the detached input.

    Args:
        embeddings: (B, d) finite floating tensor.
        options: :class:`~plmetric.core.options.ManifoldOptions` (the piece and similarity options),
            or an object holding its fields (the config's ``plm`` section); ``**fields`` override.

    Returns:
        (B, B) symmetric similarity, 1 on the diagonal, on the input's device and dtype.
    """
    return plm_similarity_and_pieces(embeddings, options, **fields)[0]


# --------------------------------------------------------------------------------------------
# 3. proxies
# --------------------------------------------------------------------------------------------


class Proxies(nn.Module):
    """N_ρ learnable linear pieces ``(ρ_k, V_k)`` (METHOD.md §4, slide 10).

    Parameters: ``locations`` (N_ρ, d) = ``ρ_k`` and ``raw_bases`` (N_ρ, d, m), an unconstrained
    matrix. The basis used everywhere is ``V_k = orthonormal_columns(raw_bases[k])`` (QR with
    ``diag(R) > 0``), so ``V_kᵀ V_k = I`` holds by construction and gradients flow through the QR.
    :meth:`orthonormalize_` (call it after an optimiser step) resets ``raw_bases`` to ``V`` so the
    raw matrix stays well conditioned; it does not change ``V``.

    A fresh module has unit-norm random locations and random orthonormal bases;
    :meth:`init_from_embeddings` replaces them by teacher embeddings and their local PCA.

    Args:
        dim: embedding dimension d.
        n_proxies: N_ρ [choice: 300].
        m: dimension of the proxy pieces [choice: 2, as the data pieces].
        generator: optional ``torch.Generator`` for the random initialisation.
    """

    def __init__(
        self,
        dim: int,
        n_proxies: int = PLMLossOptions.num_proxies,
        m: int = PieceOptions.m,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        check_int("dim", dim, 1)
        check_int("n_proxies", n_proxies, 1)
        check_int("m", m, 1)
        if m > dim:
            raise ValueError(f"m must be an integer in [1, dim={dim}], got {m!r}")
        locations = torch.randn(n_proxies, dim, generator=generator)
        locations = locations / locations.norm(dim=1, keepdim=True)
        raw = orthonormal_columns(torch.randn(n_proxies, dim, m, generator=generator))
        self.locations = nn.Parameter(locations)
        self.raw_bases = nn.Parameter(raw)

    @property
    def n_proxies(self) -> int:
        return self.locations.shape[0]

    @property
    def dim(self) -> int:
        return self.locations.shape[1]

    @property
    def m(self) -> int:
        return self.raw_bases.shape[2]

    @property
    def bases(self) -> Tensor:
        """(N_ρ, d, m) orthonormal ``V_k`` (differentiable function of ``raw_bases``)."""
        return orthonormal_columns(self.raw_bases)

    def forward(self) -> tuple[Tensor, Tensor]:
        """Return ``(locations (N_ρ, d), bases (N_ρ, d, m))``."""
        return self.locations, self.bases

    @torch.no_grad()
    def orthonormalize_(self) -> None:
        """Set ``raw_bases`` to its orthonormalised value (``V`` itself is unchanged)."""
        self.raw_bases.copy_(orthonormal_columns(self.raw_bases))

    @torch.no_grad()
    def init_from_embeddings(
        self, x: Tensor, n_neighbours: int = PieceOptions.k_plain, generator: torch.Generator | None = None
    ) -> Proxies:
        """Place the proxies on N_ρ random embeddings, each with the local PCA of its neighbours.

        ``ρ_k = x_{i_k}`` for N_ρ distinct random indices ``i_k``; ``V_k`` = top-m principal
        directions of ``{x_j - x_{i_k}}`` over the ``n_neighbours`` nearest other embeddings
        (anchor-centred PCA, as in :func:`fit_pieces` without subset selection).

        Args:
            x: (N, d) teacher embeddings, N >= N_ρ and N > n_neighbours (e.g. a memory bank).
            n_neighbours: neighbours for the local PCA [choice: 5, >= m].
            generator: optional ``torch.Generator`` (CPU) for the choice of embeddings.

        Returns:
            ``self``.

        Raises:
            ValueError: shape mismatch, non-finite input, too few embeddings.
        """
        check_embeddings(x, "Proxies.init_from_embeddings: x")
        if x.shape[1] != self.dim:
            raise ValueError(f"Proxies.init_from_embeddings: x has dimension {x.shape[1]}, the proxies {self.dim}")
        check_int("n_neighbours", n_neighbours, self.m)
        if x.shape[0] < self.n_proxies or x.shape[0] < n_neighbours + 1:
            raise ValueError(
                f"Proxies.init_from_embeddings: need at least max(N_ρ={self.n_proxies}, "
                f"n_neighbours+1={n_neighbours + 1}) embeddings, got {x.shape[0]}"
            )
        xw = _working_dtype(x.detach())
        chosen = torch.randperm(xw.shape[0], generator=generator)[: self.n_proxies].to(xw.device)
        centres = xw[chosen]
        dist = pairwise_distances(centres, xw, method="torch")
        dist[torch.arange(self.n_proxies, device=xw.device), chosen] = math.inf
        neighbours = torch.topk(dist, n_neighbours, dim=1, largest=False).indices
        xa = xw.to(_accurate_dtype(xw.device))  # the Gram/eigh route in float64, as in fit_pieces
        y = xa[neighbours] - xa[chosen].unsqueeze(1)
        mask = torch.ones(y.shape[:2], dtype=torch.bool, device=xw.device)
        w, _, _ = _masked_pca(y @ y.transpose(1, 2), mask, self.m)
        bases = _basis_from_gram(y, w, mask)
        self.locations.copy_(centres.to(self.locations))
        self.raw_bases.copy_(bases.to(self.raw_bases))
        return self


# --------------------------------------------------------------------------------------------
# 6. quality of a similarity estimate (slide 14)
# --------------------------------------------------------------------------------------------


def _as_labels(labels: Tensor | np.ndarray | list, n: int, name: str) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if arr.shape != (n,):
        raise ValueError(f"{name}: expected labels of shape ({n},), got {arr.shape}")
    return arr


def similarity_correlation(similarity: Tensor | np.ndarray, labels: Tensor | np.ndarray | list) -> float:
    """Pearson correlation of a similarity estimate with the ground truth (slide 14).

    ``r = corr({s_ij}, {1[y_i = y_j]})`` over the pairs i < j, computed in float64.

    Args:
        similarity: (N, N) estimated similarity (only the upper triangle is read).
        labels: (N,) class labels.

    Returns:
        r in [-1, 1]; 0.0 when the estimate is constant over the pairs.

    Raises:
        ValueError: shapes, non-finite values, fewer than 2 points, or a constant ground truth
            (all pairs same-class, or none), for which the correlation is undefined.
    """
    s = similarity.detach().cpu().double().numpy() if isinstance(similarity, Tensor) else np.asarray(similarity, float)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] < 2:
        raise ValueError(f"similarity_correlation: expected a square (N, N) matrix with N >= 2, got {s.shape}")
    y = _as_labels(labels, s.shape[0], "similarity_correlation: labels")
    upper = np.triu_indices(s.shape[0], k=1)
    values = s[upper]
    if not np.isfinite(values).all():
        raise ValueError("similarity_correlation: the similarity holds NaN or infinite values")
    truth = (y[:, None] == y[None, :])[upper].astype(np.float64)
    truth_c = truth - truth.mean()
    if not truth_c.any():
        raise ValueError(
            "similarity_correlation: the ground truth is constant (every pair same-class or none); "
            "the correlation is undefined"
        )
    values_c = values - values.mean()
    denom = math.sqrt(float((values_c**2).sum()) * float((truth_c**2).sum()))
    if denom == 0.0:
        return 0.0
    return float((values_c * truth_c).sum() / denom)


def piece_purity(
    members: Tensor | np.ndarray, labels: Tensor | np.ndarray | list, include_anchor: bool = False
) -> float:
    """Label purity of the pieces (slide 14).

    ``purity = mean_i |{j ∈ P_i, j ≠ i : y_j = y_i}| / |{j ∈ P_i, j ≠ i}|``: for every piece, the
    fraction of its members that share the anchor's label, the anchor itself not counted (it
    always matches), averaged over the pieces that have another member. With
    ``include_anchor=True`` the anchor is counted in both numerator and denominator.

    Args:
        members: (B, B) bool, ``members[i, j]`` = ``x_j`` belongs to piece i (:attr:`Pieces.members`).
        labels: (B,) class labels.
        include_anchor: count the anchor as a member.

    Returns:
        purity in [0, 1].

    Raises:
        ValueError: shapes, or no piece with a member besides its anchor.
    """
    mem = members.detach().cpu().numpy() if isinstance(members, Tensor) else np.asarray(members)
    if mem.ndim != 2 or mem.shape[0] != mem.shape[1]:
        raise ValueError(f"piece_purity: expected a square (B, B) membership matrix, got {mem.shape}")
    y = _as_labels(labels, mem.shape[0], "piece_purity: labels")
    mem = mem.astype(bool)
    eye = np.eye(mem.shape[0], dtype=bool)
    mem = (mem | eye) if include_anchor else (mem & ~eye)
    counts = mem.sum(axis=1)
    valid = counts > 0
    if not valid.any():
        raise ValueError("piece_purity: no piece has a member besides its anchor")
    same = (mem & (y[:, None] == y[None, :])).sum(axis=1)
    return float((same[valid] / counts[valid]).mean())
