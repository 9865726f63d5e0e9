"""PLM: Piecewise-Linear Manifolds for Deep Metric Learning (Bhatnagar & Ahuja, CPAL 2024).

The teacher's embeddings of a batch are covered by local linear pieces (:mod:`plmetric.manifold.pieces`);
their point-point and proxy-point similarities are the targets of the student's distances
(METHOD.md §2-5): ``L = w_point L_point + w_proxy L_proxy + w_neighbourhood L_neighbourhood``
(the terms in :mod:`plmetric.methods.losses`). Options: :class:`plmetric.core.options.PLMOptions`, the config's
``plm`` section.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plmetric.manifold.distances import pairwise_distances
from plmetric.methods.losses import neighbourhood_loss, point_loss, proxy_loss, relaxed_contrastive_loss, target_scales
from plmetric.manifold.pieces import Pieces, Proxies, fit_pieces, point_similarity, proxy_point_similarity
from plmetric.methods.base import Method, Objective, StepInputs
from plmetric.core.options import PLMOptions, resolve
from plmetric.core.validation import check_embeddings

__all__ = ["PLMLoss", "PLMMethod"]


class PLMLoss(Objective):
    """``L = w_point L_point + w_proxy L_proxy + w_neighbourhood L_neighbourhood`` (weights 1 by default).

    Per batch: pieces from the teacher (:func:`fit_pieces`), the point-point similarity
    (:func:`point_similarity`) and the proxy-point similarity (:func:`proxy_point_similarity`),
    all without gradient; then the three losses with METHOD.md §5's routing. The module owns the
    :class:`Proxies` (``self.proxies``; none when ``num_proxies = 0``, the no-proxy ablation, where
    the two proxy terms are 0). With ``binary=True`` only the point-point similarity becomes
    binary (proxies have no member sets); the proxy-point similarity stays graded.
    ``loss_form="contrastive"`` replaces the regression onto ``δ(1 - s)`` by STML's relaxed
    contrastive loss with ``W = s`` and margin δ on row-normalised distances.

    Args:
        dim: embedding dimension d.
        options: :class:`~plmetric.core.options.PLMOptions` (pieces, similarities, losses), e.g. the
            config's ``plm`` section; ``**fields`` override single options (``num_proxies=0``).
        generator: optional ``torch.Generator`` for the proxies' random initialisation.
    """

    def __init__(
        self,
        dim: int,
        options: PLMOptions | None = None,
        *,
        generator: torch.Generator | None = None,
        group_size: int | None = None,
        **fields: Any,
    ) -> None:
        super().__init__()
        self.options = resolve(PLMOptions, options, **fields)
        o = self.options
        if o.pair_scope == "neighbourhood" and not group_size:
            raise ValueError(
                "plm.pair_scope=neighbourhood needs the neighbourhood size (group_size, train.neighbours_per_seed)"
            )
        self.group_size = group_size
        self.proxies = Proxies(dim, o.num_proxies, o.m, generator=generator) if o.num_proxies > 0 else None
        self.last_similarity: Tensor | None = None

    def forward(self, inputs: StepInputs) -> dict[str, Tensor]:
        """The loss terms of a batch from the student's and the teacher's first heads (:meth:`terms`);
        with ``target_space`` features, blend or anneal the teacher's second output, its pooled
        features, gives (part of) the point targets, mixed by :meth:`embedding_weight`."""
        uses_features = self.options.target_space != "embedding"
        features = inputs.teacher[1] if uses_features else None
        return self.terms(inputs.student[0], inputs.teacher[0], features, self.embedding_weight(inputs.progress))

    def embedding_weight(self, progress: float | None) -> float:
        """λ, the weight of the embedding's similarity in the point targets
        ``s = (1 - λ) s_features + λ s_embedding``: 1 for ``embedding``, 0 for ``features``,
        ``target_blend`` for ``blend``, and for ``anneal`` the fraction of training done
        (``progress`` in [0, 1]; 0 when the trainer gives none)."""
        space = self.options.target_space
        if space == "embedding":
            return 1.0
        if space == "features":
            return 0.0
        if space == "blend":
            return float(self.options.target_blend)
        return min(max(float(progress or 0.0), 0.0), 1.0)

    def terms(
        self,
        student: Tensor,
        teacher: Tensor,
        teacher_features: Tensor | None = None,
        embedding_weight: float | None = None,
    ) -> dict[str, Tensor]:
        """Compute the loss terms for one batch.

        Args:
            student: (B, d) student embeddings (with gradient).
            teacher: (B, d) teacher embeddings of the same images (detached here).
            teacher_features: (B, D) the teacher's pooled features of the same images; when given,
                the point targets come (partly) from pieces fitted on them (the proxies stay in
                the embedding space, with the embedding's pieces).
            embedding_weight: λ in ``s = (1 - λ) s_features + λ s_embedding`` (default: 0 with
                features, 1 without). Pieces whose similarity gets weight 0 are not fitted,
                except the embedding's when proxies need them.

        Returns:
            ``{"loss", "loss_point", "loss_proxy", "loss_neighbourhood"}`` (scalars; ``loss`` is
            the weighted sum; a term that is off is left out: the proxy terms without proxies, any
            term of weight 0) and, detached, for monitoring: ``"piece_size"`` (mean points per
            piece), ``"target_mean"`` and ``"distance_mean"`` (mean point target δ(1 - s) and mean
            student distance over pairs i ≠ j). ``self.last_similarity`` keeps the batch's s.
        """
        teacher, weight = self._checked_inputs(student, teacher, teacher_features, embedding_weight)
        pieces, target_pieces, similarity = self._targets(teacher, teacher_features, weight)
        point_delta = self._scale(similarity, student, teacher)
        terms = self._point_term(student, similarity, point_delta)
        self.last_similarity = similarity
        if self.proxies is not None:
            terms.update(self._proxy_terms(student, teacher, pieces))
        terms = self._weighted_sum(terms, student)
        terms.update(self._monitoring(student, similarity, point_delta, target_pieces))
        return terms

    def _checked_inputs(
        self, student: Tensor, teacher: Tensor, teacher_features: Tensor | None, embedding_weight: float | None
    ) -> tuple[Tensor, float]:
        """The detached teacher and λ (the embedding's weight), after checking the shapes."""
        check_embeddings(student, "PLMLoss: student", min_rows=2)
        if teacher.shape != student.shape:
            raise ValueError(
                f"PLMLoss: teacher {tuple(teacher.shape)} and student {tuple(student.shape)} must have the same shape"
            )
        weight = (0.0 if teacher_features is not None else 1.0) if embedding_weight is None else embedding_weight
        if teacher_features is None and weight != 1.0:
            raise ValueError("PLMLoss: targets from the features (embedding_weight < 1) need teacher_features")
        return teacher.detach(), weight

    @torch.no_grad()
    def _targets(
        self, teacher: Tensor, teacher_features: Tensor | None, weight: float
    ) -> tuple[Pieces | None, Pieces, Tensor]:
        """The embedding's pieces (when its similarity or the proxies need them), the pieces the point
        targets come from, and the point similarity ``s = (1 - λ) s_features + λ s_embedding``."""
        o = self.options
        pieces = fit_pieces(teacher, o) if weight > 0 or self.proxies is not None else None
        similarity = point_similarity(pieces, o).to(teacher.dtype) if weight > 0 else None
        target_pieces = pieces
        if weight < 1:
            check_embeddings(teacher_features, "PLMLoss: teacher_features", min_rows=2)
            target_pieces = fit_pieces(teacher_features.detach(), o)
            from_features = point_similarity(target_pieces, o).to(teacher.dtype)
            similarity = from_features if similarity is None else torch.lerp(from_features, similarity, weight)
        return pieces, target_pieces, similarity

    def _point_term(self, student: Tensor, similarity: Tensor, point_delta: float | Tensor) -> dict[str, Tensor]:
        """``{"loss_point": ...}``: the relaxed contrastive or the point loss, within neighbourhoods when
        ``pair_scope`` says so."""
        o = self.options
        groups = None
        if o.pair_scope == "neighbourhood":
            groups = torch.arange(student.shape[0], device=student.device) // self.group_size
        if o.loss_form == "contrastive":
            return {"loss_point": relaxed_contrastive_loss(student, similarity, margin=o.delta)}
        return {"loss_point": point_loss(student, similarity, point_delta, o.normalize_rows, groups)}

    def _proxy_terms(self, student: Tensor, teacher: Tensor, pieces: Pieces) -> dict[str, Tensor]:
        """``{"loss_proxy", "loss_neighbourhood"}`` against the learnable proxies."""
        o = self.options
        locations, bases = self.proxies()
        with torch.no_grad():
            proxy_similarity = proxy_point_similarity(
                pieces, locations.detach().to(teacher.dtype), bases.detach().to(teacher.dtype), o
            )
        terms = {}
        if o.loss_form == "contrastive":
            detached = locations.detach()
            terms["loss_proxy"] = relaxed_contrastive_loss(student, proxy_similarity, detached, margin=o.delta)
        else:
            proxy_delta = self._scale(proxy_similarity, student, teacher, locations.detach().to(teacher.dtype))
            terms["loss_proxy"] = proxy_loss(student, proxy_similarity, locations, proxy_delta, o.normalize_rows)
        neighbours = o.proxy_neighbours
        terms["loss_neighbourhood"] = neighbourhood_loss(teacher, locations, bases, proxy_similarity, neighbours)
        return terms

    def _weighted_sum(self, terms: dict[str, Tensor], student: Tensor) -> dict[str, Tensor]:
        """Only the terms that are on (none of weight 0: the epoch line and the log show what trains) and
        ``"loss"``, their weighted sum; 0 · Σ student keeps a graph when every term is off."""
        o = self.options
        weights = {
            "loss_point": o.weight_point,
            "loss_proxy": o.weight_proxy,
            "loss_neighbourhood": o.weight_neighbourhood,
        }
        terms = {name: value for name, value in terms.items() if weights[name] != 0}
        terms["loss"] = sum((weights[name] * value for name, value in terms.items()), 0.0 * student.sum())
        return terms

    @torch.no_grad()
    def _monitoring(
        self, student: Tensor, similarity: Tensor, point_delta: float | Tensor, target_pieces: Pieces
    ) -> dict[str, Tensor]:
        """Detached: mean points per piece, mean target distance and mean student distance off the diagonal."""
        off_diagonal = ~torch.eye(student.shape[0], dtype=torch.bool, device=student.device)
        target = point_delta * (1.0 - similarity.to(student.dtype))
        distances = pairwise_distances(student.detach(), student.detach(), method="torch")
        return {
            "piece_size": target_pieces.size.to(student.dtype).mean(),
            "target_mean": target[off_diagonal].mean(),
            "distance_mean": distances[off_diagonal].mean(),
        }

    def _scale(
        self, similarity: Tensor, student: Tensor, teacher: Tensor, others: Tensor | None = None
    ) -> float | Tensor:
        """δ for targets against ``others`` (the batch itself when None, else proxy locations)."""
        o = self.options
        if o.delta_mode == "fixed":
            return o.delta
        with torch.no_grad():
            other_student = student.detach() if others is None else others.to(student.dtype)
            other_teacher = teacher if others is None else others
            return target_scales(
                o.delta_mode,
                o.delta,
                similarity.to(student.dtype),
                pairwise_distances(student.detach(), other_student, method="torch"),
                pairwise_distances(teacher, other_teacher, method="torch").to(student.dtype),
            )

    @torch.no_grad()
    def after_step(self) -> None:
        """Call after each optimiser step: re-orthonormalise the proxies' raw bases."""
        if self.proxies is not None:
            self.proxies.orthonormalize_()


class PLMMethod(Method):
    """PLM in the trainer: the student's distances regress onto the teacher's manifold similarity
    (targets from the EMA teacher's embeddings of each neighbourhood batch, or from its pooled
    features with ``plm.target_space=features``)."""

    name = "plm"
    summary = "PLM: piecewise-linear manifold similarity as targets (Bhatnagar & Ahuja, CPAL 2024)"

    def teacher_heads(self, teacher: nn.Module, images: Tensor) -> tuple[Tensor, ...]:
        """The teacher's embedding, and unless ``plm.target_space=embedding`` its L2-normalised
        pooled features (one backbone pass for both)."""
        if self.cfg.plm.target_space == "embedding":
            return (teacher(images),)
        features = teacher.pooled_features(images)
        return F.normalize(teacher.embedding(features), dim=1), F.normalize(features, dim=1)

    def check_training_size(self, num_images: int) -> None:
        """Each proxy starts at a distinct training image (METHOD.md §4): ``N_ρ ≤ n``.

        Raises:
            ValueError: more proxies than training images.
        """
        n_proxies = self.cfg.plm.num_proxies
        if n_proxies > num_images:
            raise ValueError(
                f"plm.num_proxies ({n_proxies}) exceeds the number of training images ({num_images}); "
                f"lower it (e.g. --set plm.num_proxies={max(num_images // 4, 0)})"
            )

    def build_objective(self, dim: int, init_embeddings: Tensor | None, generator: torch.Generator) -> PLMLoss:
        """The PLM loss with the config's ``plm`` options; proxies start at the teacher's local
        PCA around random training embeddings (METHOD.md §4).

        Raises:
            ValueError: more proxies than training images.
        """
        p = self.cfg.plm
        if init_embeddings is not None:
            self.check_training_size(init_embeddings.shape[0])
        objective = PLMLoss(dim, p, generator=generator, group_size=self.cfg.train.neighbours_per_seed)
        if objective.proxies is not None and init_embeddings is not None:
            objective.proxies.init_from_embeddings(init_embeddings.cpu(), generator=generator)
        return objective
