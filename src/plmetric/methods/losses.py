"""Loss terms as free functions, each with its gradient routing stated (METHOD.md §5, slide 11).

PLM: ``L = L_point + L_proxy + L_neighbourhood`` (:class:`plmetric.methods.plm.PLMLoss` combines
them). Gradient routing (METHOD.md §5): the similarity targets come from the teacher's manifold
and carry no gradient; ``L_point`` and ``L_proxy`` reach the student's embeddings only (the
proxies' locations and bases are detached there); ``L_neighbourhood`` reaches the proxies only
(the teacher's embeddings and the proxy-point similarity are detached).

STML (Kim et al., CVPR 2022; :mod:`plmetric.methods.stml`): the relaxed contrastive loss
(:func:`relaxed_contrastive_loss`, :func:`stml_rc_loss`) and the self-distillation term
(:func:`stml_kl_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from plmetric.manifold.distances import pairwise_distances
from plmetric.core.options import DELTA_MODES
from plmetric.core.validation import check_choice, check_embeddings, check_int, check_number, check_scale

__all__ = [
    "neighbourhood_loss",
    "point_loss",
    "proxy_loss",
    "relaxed_contrastive_loss",
    "stml_kl_loss",
    "stml_rc_loss",
    "target_scales",
]


def point_loss(
    student: Tensor,
    similarity: Tensor,
    delta: float | Tensor = 1.0,
    normalize_rows: bool = False,
    groups: Tensor | None = None,
) -> Tensor:
    """``L_point = mean_{i≠j} (δ (1 - s_ij) - ‖f_i - f_j‖₂)²`` (slide 11).

    With ``normalize_rows`` the distances are divided by their row mean first (the zero
    self-distance included), as STML does: only relative distances within a row are matched.
    With ``groups`` (the batch's neighbourhoods: a seed and its neighbours share an id), only pairs
    inside a neighbourhood are regressed onto their targets; a pair across neighbourhoods adds
    ``relu(δ (1 - s_ij) - ‖f_i - f_j‖)²``: it is pushed apart when closer than its target, never
    pulled together (a local objective with a margin).

    The similarity is a detached target; distances come from explicit differences, with a zero
    (finite) gradient where two student embeddings coincide.

    Args:
        student: (B, d) student embeddings ``f_θ(x_i)``, B >= 2.
        similarity: (B, B) point-point similarity ``s`` (e.g. :func:`plm_similarity`).
        delta: the distance that similarity 0 maps to [choice: 1]; a scalar or a (B, B) tensor of
            per-pair scales (detached), see :func:`target_scales`.
        normalize_rows: match row-normalised distances [choice: False, the paper's form].

    Returns:
        Scalar loss; gradient to ``student`` only.
    """
    check_scale("delta", delta)
    check_embeddings(student, "point_loss: student", min_rows=2)
    b = student.shape[0]
    if similarity.shape != (b, b):
        raise ValueError(f"point_loss: similarity must be ({b}, {b}) for {b} embeddings, got {tuple(similarity.shape)}")
    delta = delta.detach().to(student.dtype) if isinstance(delta, Tensor) else delta
    target = delta * (1.0 - similarity.detach().to(student.dtype))
    difference = target - pairwise_distances(student, student, normalize_rows=normalize_rows)
    if groups is not None:
        if groups.shape != (b,):
            raise ValueError(f"point_loss: groups must be ({b},), got {tuple(groups.shape)}")
        inside = groups.unsqueeze(0) == groups.unsqueeze(1)
        difference = torch.where(inside, difference, torch.relu(difference))
    residual = difference.pow(2)
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=student.device)
    return (residual * off_diagonal).sum() / (b * (b - 1))


def proxy_loss(
    student: Tensor,
    proxy_similarity: Tensor,
    proxy_locations: Tensor,
    delta: float | Tensor = 1.0,
    normalize_rows: bool = False,
) -> Tensor:
    """``L_proxy = mean_{i,k} (δ (1 - s(x_i, ρ_k)) - ‖f_i - ρ_k‖₂)²`` (METHOD.md §5).

    The proxies are treated like data embeddings; ``ρ_k`` and the similarity are detached here,
    so the loss updates the embedding network only.

    Args:
        student: (B, d) student embeddings.
        proxy_similarity: (B, N_ρ) ``s(x_i, ρ_k)`` (:func:`proxy_point_similarity`).
        proxy_locations: (N_ρ, d) ``ρ_k``.
        delta: as in :func:`point_loss` [choice: 1].
        normalize_rows: divide each row of point-proxy distances by its mean first.

    Returns:
        Scalar loss; gradient to ``student`` only.
    """
    check_scale("delta", delta)
    check_embeddings(student, "proxy_loss: student")
    locations = proxy_locations.detach().to(student.dtype)
    expected = (student.shape[0], locations.shape[0])
    if locations.dim() != 2 or locations.shape[1] != student.shape[1] or proxy_similarity.shape != expected:
        raise ValueError(
            f"proxy_loss: expected proxy_locations (N, {student.shape[1]}) and proxy_similarity (B, N); got "
            f"{tuple(proxy_locations.shape)} and {tuple(proxy_similarity.shape)} for student {tuple(student.shape)}"
        )
    delta = delta.detach().to(student.dtype) if isinstance(delta, Tensor) else delta
    target = delta * (1.0 - proxy_similarity.detach().to(student.dtype))
    return (target - pairwise_distances(student, locations, normalize_rows=normalize_rows)).pow(2).mean()


def relaxed_contrastive_loss(
    student: Tensor, weights: Tensor, others: Tensor | None = None, margin: float = 1.0, normalize_rows: bool = True
) -> Tensor:
    """STML's relaxed contrastive loss with soft pair weights ``W`` (Kim et al., CVPR 2022, ``RC_STML``).

    ``L = Σ_{i≠j} [W_ij d̂_ij² + (1 - W_ij) relu(δ - d̂_ij)²] / (B (B - 1))`` with
    ``d̂_ij = d_ij / mean_l d_il`` (each row divided by its mean, the zero self-distance included, as
    in the authors' code) when ``normalize_rows``. Unlike the regression of :func:`point_loss`, pairs
    with ``W ≈ 0`` that already lie beyond the margin feel no force, so a good ranking is left alone.

    Args:
        student: (B, d) student embeddings.
        weights: (B, B) pull weights in [0, 1] (detached), or (B, P) against ``others``.
        others: (P, d) points the rows are compared with (e.g. detached proxy locations); the
            batch itself when None, and then the diagonal is excluded.
        margin: δ, the normalised distance beyond which dissimilar pairs stop being pushed.
        normalize_rows: divide each row of distances by its mean.

    Returns:
        Scalar loss; gradient to ``student`` (and to ``others`` unless detached by the caller).
    """
    check_scale("margin", margin)
    check_embeddings(student, "relaxed_contrastive_loss: student", min_rows=2 if others is None else 1)
    b = student.shape[0]
    target = student if others is None else others.to(student.dtype)
    if target.dim() != 2 or target.shape[1] != student.shape[1] or weights.shape != (b, target.shape[0]):
        raise ValueError(
            f"relaxed_contrastive_loss: expected weights ({b}, {target.shape[0]}) and others (P, {student.shape[1]}); "
            f"got weights {tuple(weights.shape)}, others {tuple(target.shape)}"
        )
    distance = pairwise_distances(student, target, normalize_rows=normalize_rows)
    w = weights.detach().to(student.dtype)
    terms = w * distance.pow(2) + (1.0 - w) * torch.relu(margin - distance).pow(2)
    if others is None:
        off_diagonal = ~torch.eye(b, dtype=torch.bool, device=student.device)
        return (terms * off_diagonal).sum() / (b * (b - 1))
    return terms.mean()


@torch.no_grad()
def target_scales(
    mode: str, delta: float, similarity: Tensor, student_distances: Tensor, teacher_distances: Tensor
) -> float | Tensor:
    """The scale δ of the targets ``δ (1 - s)`` under a ``delta_mode`` [choice; METHOD.md: fixed δ = 1].

    * ``fixed``: ``δ`` as given (the paper's form).
    * ``batch``: one scalar per batch so the mean target equals the mean current student distance,
      ``δ_b = δ · mean(‖f_i - f_j‖) / mean(1 - s_ij)`` (off-diagonal means for square inputs).
    * ``teacher``: per pair, ``δ_ij = δ · c · ‖x_i - x_j‖`` with the teacher's distance and
      ``c = mean(‖x_i - x_j‖) / mean(‖x_i - x_j‖ (1 - s_ij))``, so the targets keep the teacher's
      mean distance: pairs more similar than average contract, less similar ones expand.

    Args:
        mode: one of :data:`DELTA_MODES`.
        delta: the base δ.
        similarity: (B, P) similarity s.
        student_distances: (B, P) current student distances (only ``batch`` uses them).
        teacher_distances: (B, P) teacher distances (only ``teacher`` uses them).
    """
    if mode == "fixed":
        return delta
    square = similarity.shape[0] == similarity.shape[1]
    keep = ~torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device) if square else None

    def mean(t: Tensor) -> Tensor:
        return t[keep].mean() if keep is not None else t.mean()

    dissimilarity = 1.0 - similarity
    if mode == "batch":
        return delta * mean(student_distances) / mean(dissimilarity).clamp_min(1e-12)
    if mode == "teacher":
        scale = mean(teacher_distances) / mean(teacher_distances * dissimilarity).clamp_min(1e-12)
        return delta * scale * teacher_distances
    check_choice("delta_mode", mode, DELTA_MODES)
    raise AssertionError(mode)  # every mode is handled above


def neighbourhood_loss(
    teacher: Tensor,
    proxy_locations: Tensor,
    proxy_bases: Tensor,
    proxy_similarity: Tensor,
    n_neighbours: int = 5,
) -> Tensor:
    """Align each proxy piece with its most similar teacher embeddings (METHOD.md §5, [choice]).

    For proxy k let ``N_k`` be the ``n`` batch points with the largest ``s(x_i, ρ_k)``; with
    ``v = x_i - ρ_k``:
    ``L_neighbourhood = mean_{k, i ∈ N_k} ( ‖(I - V_k V_kᵀ) v‖² + ‖v‖² )``,
    the squared orthogonal distance to the proxy's piece plus the squared distance to ``ρ_k``.
    The teacher embeddings and the similarity are detached: the gradient reaches ``ρ_k`` and
    ``V_k`` only.

    Args:
        teacher: (B, d) teacher embeddings.
        proxy_locations: (N_ρ, d) ``ρ_k`` (with gradient).
        proxy_bases: (N_ρ, d, m) orthonormal ``V_k`` (with gradient, e.g. :attr:`Proxies.bases`).
        proxy_similarity: (B, N_ρ) ``s(x_i, ρ_k)``, used only to choose ``N_k``.
        n_neighbours: n [choice: 5 = k, the neighbourhood size of the sampler]; capped at B.

    Returns:
        Scalar loss; gradient to the proxies only.
    """
    check_embeddings(teacher, "neighbourhood_loss: teacher")
    check_int("n_neighbours", n_neighbours, 1)
    b, d = teacher.shape
    if (
        proxy_locations.dim() != 2
        or proxy_locations.shape[1] != d
        or proxy_bases.dim() != 3
        or proxy_bases.shape[:2] != proxy_locations.shape
        or proxy_similarity.shape != (b, proxy_locations.shape[0])
    ):
        raise ValueError(
            "neighbourhood_loss: expected proxy_locations (N, d), proxy_bases (N, d, m), proxy_similarity (B, N); "
            f"got {tuple(proxy_locations.shape)}, {tuple(proxy_bases.shape)}, {tuple(proxy_similarity.shape)} "
            f"for teacher {tuple(teacher.shape)}"
        )
    n = min(n_neighbours, b)
    chosen = torch.topk(proxy_similarity.detach(), n, dim=0).indices.T  # (N, n)
    diff = teacher.detach().to(proxy_locations.dtype)[chosen] - proxy_locations.unsqueeze(1)  # (N, n, d)
    coords = torch.einsum("knd,kdm->knm", diff, proxy_bases)
    orthogonal = diff - torch.einsum("kdm,knm->knd", proxy_bases, coords)
    return (orthogonal.pow(2).sum(-1) + diff.pow(2).sum(-1)).mean()


def stml_rc_loss(student: Tensor, weights: Tensor, delta: float = 1.0, normalize: bool = True) -> Tensor:
    """STML's relaxed contrastive loss (``RC_STML`` of the authors' code) for one student head.

    ``L_RC = Σ_{i≠j} [W_ij d̂_ij² + (1 - W_ij) relu(δ - d̂_ij)²] / (B (B - 1))`` with
    ``d̂_ij = ‖s_i - s_j‖ / mean_l ‖s_i - s_l‖`` (the row mean over all B entries, the zero diagonal
    included) and ``W`` the teacher's contextualised similarity
    (``stml_similarity(teacher_g)[0]``), a detached target.

    Args:
        student: (B, d) embeddings of one student head, B >= 2.
        weights: (B, B) pair weights ``W`` in [0, 1] (detached here).
        delta: the margin δ on normalised distances beyond which pairs with ``W < 1`` are no longer
            pushed (1; 0.9 on SOP in the paper).
        normalize: L2-normalise ``student`` first (their ``disable_mu`` flag; their default is False).

    Returns:
        Scalar loss; gradient to ``student`` only.
    """
    delta = check_number("delta", delta)
    check_embeddings(student, "stml_rc_loss: student", min_rows=2)
    if normalize:
        student = F.normalize(student, dim=1)
    return relaxed_contrastive_loss(student, weights, margin=delta, normalize_rows=True)


def stml_kl_loss(student_f: Tensor, student_g: Tensor, temperature: float = 1.0, normalize: bool = True) -> Tensor:
    """STML's self-distillation term (``KL_STML`` of the authors' code): the ``g`` head teaches ``f``.

    With ``d̂^f`` and ``d̂^g`` the row-mean-normalised distance matrices of the two heads (diagonal
    included), ``P_i = softmax(-d̂^g_i / T)`` (detached) and ``Q_i = softmax(-d̂^f_i / T)``:
    ``L_KL = Σ_i KL(P_i ‖ Q_i) · T² / B = Σ_ij P_ij (log P_ij - log Q_ij) · T² / B``
    (``F.kl_div(log Q, P, reduction="sum") · T² / B``).

    Args:
        student_f: (B, d_f) target-head embeddings (with gradient), B >= 2.
        student_g: (B, d_g) auxiliary-head embeddings of the same images (detached here).
        temperature: T > 0 (always 1 in the authors' code).
        normalize: L2-normalise both heads first (their ``disable_mu`` flag; their default is False).

    Returns:
        Scalar loss; gradient to ``student_f`` only.
    """
    temperature = check_number("temperature", temperature, strict=True)
    check_embeddings(student_f, "stml_kl_loss: student_f", min_rows=2)
    check_embeddings(student_g, "stml_kl_loss: student_g", min_rows=2)
    if student_g.shape[0] != student_f.shape[0]:
        raise ValueError(
            f"stml_kl_loss: student_g has {student_g.shape[0]} rows, student_f {student_f.shape[0]}; "
            "they must embed the same images"
        )
    g = student_g.detach().to(student_f.dtype)
    if normalize:
        student_f, g = F.normalize(student_f, dim=1), F.normalize(g, dim=1)
    log_q = F.log_softmax(-pairwise_distances(student_f, normalize_rows=True) / temperature, dim=1)
    log_p = F.log_softmax(-pairwise_distances(g, normalize_rows=True) / temperature, dim=1)
    kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True)
    return kl * temperature**2 / student_f.shape[0]
