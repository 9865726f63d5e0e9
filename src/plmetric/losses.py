"""The three PLM losses and their combination (METHOD.md §5, slide 11, flowchart).

``L = L_point + L_proxy + L_neighbourhood``. Gradient routing (METHOD.md §5): the similarity
targets come from the teacher's manifold and carry no gradient; ``L_point`` and ``L_proxy`` reach
the student's embeddings only (the proxies' locations and bases are detached there);
``L_neighbourhood`` reaches the proxies only (the teacher's embeddings and the proxy-point
similarity are detached).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from plmetric.manifold import (
    Proxies,
    Symmetrize,
    _check_embeddings,
    _check_exponents,
    _check_symmetrize,
    _exact_pairwise_distance,
    fit_pieces,
    point_similarity,
    proxy_point_similarity,
    value_checks_enabled,
)

__all__ = ["LOSS_FORMS", "PLMLoss", "neighbourhood_loss", "point_loss", "proxy_loss", "relaxed_contrastive_loss"]


def _check_delta(delta: float | Tensor) -> None:
    if isinstance(delta, Tensor):
        if not value_checks_enabled():  # a value check would cost a host-device synchronisation
            return
        if not bool(torch.isfinite(delta).all()) or bool((delta < 0).any()):
            raise ValueError("delta: expected finite values >= 0")
        return
    if not (math.isfinite(delta) and delta >= 0):
        raise ValueError(f"delta: expected a finite number >= 0, got {delta!r}")


def point_loss(
    student: Tensor, similarity: Tensor, delta: float | Tensor = 1.0, normalize_rows: bool = False
) -> Tensor:
    """``L_point = mean_{i≠j} (δ (1 - s_ij) - ‖f_i - f_j‖₂)²`` (slide 11).

    With ``normalize_rows`` the distances are divided by their row mean first (the zero
    self-distance included), as STML does: only relative distances within a row are matched.

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
    _check_delta(delta)
    _check_embeddings(student, "point_loss: student", min_rows=2)
    b = student.shape[0]
    if similarity.shape != (b, b):
        raise ValueError(f"point_loss: similarity must be ({b}, {b}) for {b} embeddings, got {tuple(similarity.shape)}")
    delta = delta.detach().to(student.dtype) if isinstance(delta, Tensor) else delta
    target = delta * (1.0 - similarity.detach().to(student.dtype))
    residual = (target - _distances(student, student, normalize_rows)).pow(2)
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=student.device)
    return (residual * off_diagonal).sum() / (b * (b - 1))


def _distances(a: Tensor, b: Tensor, normalize_rows: bool) -> Tensor:
    distance = _exact_pairwise_distance(a, b)
    return distance / distance.mean(dim=1, keepdim=True).clamp_min(1e-12) if normalize_rows else distance


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
    _check_delta(delta)
    _check_embeddings(student, "proxy_loss: student")
    locations = proxy_locations.detach().to(student.dtype)
    expected = (student.shape[0], locations.shape[0])
    if locations.dim() != 2 or locations.shape[1] != student.shape[1] or proxy_similarity.shape != expected:
        raise ValueError(
            f"proxy_loss: expected proxy_locations (N, {student.shape[1]}) and proxy_similarity (B, N); got "
            f"{tuple(proxy_locations.shape)} and {tuple(proxy_similarity.shape)} for student {tuple(student.shape)}"
        )
    delta = delta.detach().to(student.dtype) if isinstance(delta, Tensor) else delta
    target = delta * (1.0 - proxy_similarity.detach().to(student.dtype))
    return (target - _distances(student, locations, normalize_rows)).pow(2).mean()


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
    _check_delta(margin)
    _check_embeddings(student, "relaxed_contrastive_loss: student", min_rows=2 if others is None else 1)
    b = student.shape[0]
    target = student if others is None else others.to(student.dtype)
    if target.dim() != 2 or target.shape[1] != student.shape[1] or weights.shape != (b, target.shape[0]):
        raise ValueError(
            f"relaxed_contrastive_loss: expected weights ({b}, {target.shape[0]}) and others (P, {student.shape[1]}); "
            f"got weights {tuple(weights.shape)}, others {tuple(target.shape)}"
        )
    distance = _distances(student, target, normalize_rows)
    w = weights.detach().to(student.dtype)
    terms = w * distance.pow(2) + (1.0 - w) * torch.relu(margin - distance).pow(2)
    if others is None:
        off_diagonal = ~torch.eye(b, dtype=torch.bool, device=student.device)
        return (terms * off_diagonal).sum() / (b * (b - 1))
    return terms.mean()


LOSS_FORMS = ("regression", "contrastive")
DELTA_MODES = ("fixed", "batch", "teacher")


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
    raise ValueError(f"delta_mode: expected one of {DELTA_MODES}, got {mode!r}")


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
    _check_embeddings(teacher, "neighbourhood_loss: teacher")
    if not (isinstance(n_neighbours, int) and n_neighbours >= 1):
        raise ValueError(f"n_neighbours: expected an integer >= 1, got {n_neighbours!r}")
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


class PLMLoss(nn.Module):
    """``L = w_point L_point + w_proxy L_proxy + w_neighbourhood L_neighbourhood`` (weights 1 by default).

    Per batch: pieces from the teacher (:func:`fit_pieces`), the point-point similarity
    (:func:`point_similarity`) and the proxy-point similarity (:func:`proxy_point_similarity`),
    all without gradient; then the three losses with METHOD.md §5's routing. The module owns the
    :class:`Proxies` (``self.proxies``; none when ``n_proxies = 0``, the no-proxy ablation, where
    the two proxy terms are 0). With ``binary=True`` only the point-point similarity becomes
    binary (proxies have no member sets); the proxy-point similarity stays graded.

    Args:
        dim: embedding dimension d.
        n_proxies: N_ρ [choice: 300]; 0 disables the proxies.
        m, tau, n_max, min_points, subset_selection, k_plain: :func:`fit_pieces` options.
        n_alpha, n_beta, symmetrize, binary: :func:`point_similarity` options.
        delta: δ of the point and proxy losses [choice: 1].
        delta_mode: how δ scales the targets, see :func:`target_scales` [choice: fixed].
        loss_form: ``regression`` (the paper: distances regressed onto δ(1 - s)) or ``contrastive``
            (:func:`relaxed_contrastive_loss` with ``W = s`` and margin δ on row-normalised distances).
        normalize_rows: regression form only: match row-normalised student distances (as STML does)
            [choice: False].
        proxy_neighbours: n of :func:`neighbourhood_loss` [choice: 5].
        weight_point, weight_proxy, weight_neighbourhood: term weights [choice: 1, 1, 1].
        generator: optional ``torch.Generator`` for the proxies' random initialisation.
    """

    def __init__(
        self,
        dim: int,
        *,
        n_proxies: int = 300,
        m: int = 2,
        tau: float = 0.5,
        n_max: int = 10,
        min_points: int | None = None,
        subset_selection: bool = True,
        k_plain: int = 5,
        n_alpha: float = 5.0,
        n_beta: float = 0.5,
        symmetrize: Symmetrize = "mean",
        binary: bool = False,
        delta: float = 1.0,
        delta_mode: str = "fixed",
        loss_form: str = "regression",
        normalize_rows: bool = False,
        proxy_neighbours: int = 5,
        weight_point: float = 1.0,
        weight_proxy: float = 1.0,
        weight_neighbourhood: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        _check_symmetrize(symmetrize)
        _check_exponents(n_alpha, n_beta)
        _check_delta(delta)
        if not (isinstance(n_proxies, int) and n_proxies >= 0):
            raise ValueError(f"n_proxies: expected an integer >= 0, got {n_proxies!r}")
        if not (isinstance(proxy_neighbours, int) and proxy_neighbours >= 1):
            raise ValueError(f"proxy_neighbours: expected an integer >= 1, got {proxy_neighbours!r}")
        for name, value in (
            ("weight_point", weight_point),
            ("weight_proxy", weight_proxy),
            ("weight_neighbourhood", weight_neighbourhood),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        self.piece_options = dict(
            m=m, tau=tau, n_max=n_max, min_points=min_points, subset_selection=subset_selection, k_plain=k_plain
        )
        self.similarity_options = dict(n_alpha=n_alpha, n_beta=n_beta, symmetrize=symmetrize)
        self.binary = binary
        if delta_mode not in DELTA_MODES:
            raise ValueError(f"delta_mode: expected one of {DELTA_MODES}, got {delta_mode!r}")
        if loss_form not in LOSS_FORMS:
            raise ValueError(f"loss_form: expected one of {LOSS_FORMS}, got {loss_form!r}")
        self.delta = delta
        self.delta_mode = delta_mode
        self.loss_form = loss_form
        self.normalize_rows = normalize_rows
        self.proxy_neighbours = proxy_neighbours
        self.weights = dict(point=weight_point, proxy=weight_proxy, neighbourhood=weight_neighbourhood)
        self.proxies = Proxies(dim, n_proxies, m, generator=generator) if n_proxies > 0 else None
        self.last_similarity: Tensor | None = None

    def forward(self, student: Tensor, teacher: Tensor) -> dict[str, Tensor]:
        """Compute the loss terms for one batch.

        Args:
            student: (B, d) student embeddings (with gradient).
            teacher: (B, d) teacher embeddings of the same images (detached here).

        Returns:
            ``{"loss", "loss_point", "loss_proxy", "loss_neighbourhood"}`` (scalars; ``loss`` is
            the weighted sum) and, detached, for monitoring: ``"piece_size"`` (mean points per
            piece), ``"target_mean"`` and ``"distance_mean"`` (mean point target δ(1 - s) and mean
            student distance over pairs i ≠ j). ``self.last_similarity`` keeps the batch's s.
        """
        _check_embeddings(student, "PLMLoss: student", min_rows=2)
        if teacher.shape != student.shape:
            raise ValueError(
                f"PLMLoss: teacher {tuple(teacher.shape)} and student {tuple(student.shape)} must have the same shape"
            )
        teacher = teacher.detach()
        with torch.no_grad():
            pieces = fit_pieces(teacher, **self.piece_options)
            similarity = point_similarity(pieces, binary=self.binary, **self.similarity_options)
        point_delta = self._scale(similarity, student, teacher)
        if self.loss_form == "contrastive":
            terms = {"loss_point": relaxed_contrastive_loss(student, similarity, margin=self.delta)}
        else:
            terms = {"loss_point": point_loss(student, similarity, point_delta, self.normalize_rows)}
        self.last_similarity = similarity
        if self.proxies is not None:
            locations, bases = self.proxies()
            with torch.no_grad():
                proxy_similarity = proxy_point_similarity(
                    pieces,
                    locations.detach().to(teacher.dtype),
                    bases.detach().to(teacher.dtype),
                    **self.similarity_options,
                )
            if self.loss_form == "contrastive":
                terms["loss_proxy"] = relaxed_contrastive_loss(
                    student, proxy_similarity, locations.detach(), margin=self.delta
                )
            else:
                proxy_delta = self._scale(proxy_similarity, student, teacher, locations.detach().to(teacher.dtype))
                terms["loss_proxy"] = proxy_loss(student, proxy_similarity, locations, proxy_delta, self.normalize_rows)
            terms["loss_neighbourhood"] = neighbourhood_loss(
                teacher, locations, bases, proxy_similarity, self.proxy_neighbours
            )
        else:
            zero = student.new_zeros(())
            terms["loss_proxy"] = zero
            terms["loss_neighbourhood"] = zero
        terms["loss"] = (
            self.weights["point"] * terms["loss_point"]
            + self.weights["proxy"] * terms["loss_proxy"]
            + self.weights["neighbourhood"] * terms["loss_neighbourhood"]
        )
        terms["piece_size"] = pieces.size.to(student.dtype).mean()
        with torch.no_grad():  # monitoring: mean target distance vs mean student distance, off the diagonal
            off_diagonal = ~torch.eye(student.shape[0], dtype=torch.bool, device=student.device)
            target = point_delta * (1.0 - similarity.to(student.dtype))
            terms["target_mean"] = target[off_diagonal].mean()
            terms["distance_mean"] = torch.cdist(student.detach(), student.detach())[off_diagonal].mean()
        return terms

    def _scale(
        self, similarity: Tensor, student: Tensor, teacher: Tensor, others: Tensor | None = None
    ) -> float | Tensor:
        """δ for targets against ``others`` (the batch itself when None, else proxy locations)."""
        if self.delta_mode == "fixed":
            return self.delta
        with torch.no_grad():
            other_student = student.detach() if others is None else others.to(student.dtype)
            other_teacher = teacher if others is None else others
            return target_scales(
                self.delta_mode,
                self.delta,
                similarity.to(student.dtype),
                torch.cdist(student.detach(), other_student),
                torch.cdist(teacher, other_teacher).to(student.dtype),
            )

    @torch.no_grad()
    def after_step(self) -> None:
        """Call after each optimiser step: re-orthonormalise the proxies' raw bases."""
        if self.proxies is not None:
            self.proxies.orthonormalize_()
