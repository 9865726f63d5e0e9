"""STML, the peer method: Self-Taught Metric Learning without Labels (Kim, Kim, Cho & Kwak, CVPR 2022).

A port of the training objective of the authors' public code (github.com/tjddus9597/STML-CVPR22,
``code/loss.py``: ``RC_STML``, ``KL_STML``, ``STML_loss``; model heads in ``code/net/*.py``).

The student has two linear heads on the same pooled backbone features: the target embedding ``f``
(evaluated, e.g. 512-d) and an auxiliary, larger head ``g`` (1024-d). The teacher is a momentum (EMA)
copy of the student; its ``g`` embeddings give soft pair targets ``W`` (the contextualised
similarity, :func:`plmetric.similarity.stml_similarity`). With ``d̂`` the row-mean-normalised
student distances:

* ``L_RC(s) = Σ_{i≠j} [W_ij d̂_ij² + (1 - W_ij) relu(δ - d̂_ij)²] / (B (B - 1))`` (relaxed contrastive);
* ``L_KL = KL(softmax(-d̂^g / T) ‖ softmax(-d̂^f / T)) T² / B`` (self-distillation g -> f, target detached);
* ``L = ½ (L_RC(f) + L_RC(g)) + λ_KL L_KL`` with ``λ_KL = 1``, ``T = 1`` in the paper.

Simplifications and differences from the authors' code:

* One view per image. Their batches hold two augmented views of every image, mark the views of an
  image as identical for the neighbour ranking (``W_P_copy[idx == idx] = 1``) and use
  ``topk = 2 · neighbours`` (10 on CUB); here ``topk`` counts distinct images (default 5) and the
  views trick reduces to the point itself ranking first. Query expansion defaults to
  ``round(topk / 2)`` of ``topk`` (2 of 5 here; 5 of 10 view entries theirs).
* Normalisation of the student. Their default (``--student_norm 0``, passed as ``disable_mu``) leaves
  both student heads un-normalised in both loss terms and evaluates the raw ``f`` with Euclidean
  distances; only the teacher's ``g`` is L2-normalised. Here both heads are L2-normalised by default,
  as everywhere in this package; ``STMLModel(normalize_heads=False)`` with
  ``STMLLoss(normalize_student=False)`` gives their default training path (evaluation via
  :meth:`STMLModel.forward` stays normalised).
* Their ``KL_STML`` takes a ``temp`` argument but always uses ``T = 1``; :func:`stml_kl_loss` exposes
  ``temperature`` (default 1) and :class:`STMLLoss` uses 1. ``weight_kl`` (their fixed 1) is an option.
* Distances come from explicit differences (``torch.cdist`` without the matrix-product shortcut) and the
  row means are clamped at 1e-12; the contextual similarity is vectorised (no loop over points).
* Their teacher network has the ``g`` head only; here it is the EMA copy of the whole two-head
  :class:`STMLModel` (the trainer uses its ``f`` for the memory bank).
"""

from __future__ import annotations

import math
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plmetric.losses import relaxed_contrastive_loss
from plmetric.manifold import _check_embeddings, _exact_pairwise_distance
from plmetric.models import EmbeddingModel
from plmetric.similarity import stml_similarity

__all__ = ["STMLLoss", "STMLModel", "stml_kl_loss", "stml_rc_loss"]


def _check_number(name: str, value: object, *, positive: bool) -> float:
    """A finite real number, > 0 when ``positive`` else >= 0; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name}: expected a finite number {'>' if positive else '>='} 0, got {value!r}")
    return v


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return int(value)


def _row_normalised_distances(x: Tensor) -> Tensor:
    """``d̂_ij = ‖x_i - x_j‖ / mean_l ‖x_i - x_l‖`` (the mean over the row includes the zero self-distance)."""
    distance = _exact_pairwise_distance(x, x)
    return distance / distance.mean(dim=1, keepdim=True).clamp_min(1e-12)


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
    delta = _check_number("delta", delta, positive=False)
    _check_embeddings(student, "stml_rc_loss: student", min_rows=2)
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
    temperature = _check_number("temperature", temperature, positive=True)
    _check_embeddings(student_f, "stml_kl_loss: student_f", min_rows=2)
    _check_embeddings(student_g, "stml_kl_loss: student_g", min_rows=2)
    if student_g.shape[0] != student_f.shape[0]:
        raise ValueError(
            f"stml_kl_loss: student_g has {student_g.shape[0]} rows, student_f {student_f.shape[0]}; "
            "they must embed the same images"
        )
    g = student_g.detach().to(student_f.dtype)
    if normalize:
        student_f, g = F.normalize(student_f, dim=1), F.normalize(g, dim=1)
    log_q = F.log_softmax(-_row_normalised_distances(student_f) / temperature, dim=1)
    log_p = F.log_softmax(-_row_normalised_distances(g) / temperature, dim=1)
    kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True)
    return kl * temperature**2 / student_f.shape[0]


class STMLLoss(nn.Module):
    """STML's objective (``STML_loss`` of the authors' code) on the two student heads.

    ``L = ½ (L_RC(f) + L_RC(g)) + weight_kl · L_KL(f, g)``, both RC terms with the same targets
    ``W = stml_similarity(teacher_g)``; see :func:`stml_rc_loss` and :func:`stml_kl_loss`.
    Gradient routing: ``teacher_g`` and ``W`` carry none; ``L_RC`` reaches both student heads,
    ``L_KL`` the ``f`` head only.

    Attributes:
        last_similarity: the detached (B, B) ``W`` of the last batch (None before the first).
    """

    def __init__(
        self,
        *,
        sigma: float = 3.0,
        delta: float = 1.0,
        topk: int = 5,
        query_expansion: int | None = None,
        weight_kl: float = 1.0,
        normalize_student: bool = True,
    ) -> None:
        """Set the options.

        Args:
            sigma: width of ``W_P = exp(-‖t_i - t_j‖² / σ)`` on the L2-normalised teacher embeddings
                (3 in the paper's runs).
            delta: margin δ of the relaxed contrastive loss (1; 0.9 on SOP).
            topk: neighbours (the point itself included) of the contextual similarity ``W_C``; counts
                distinct images (one view per image).
            query_expansion: rows averaged in ``W_C``'s query expansion; None: ``round(topk / 2)``.
            weight_kl: weight of the self-distillation term (1 in the paper).
            normalize_student: L2-normalise the student heads inside the loss (their ``disable_mu``).

        Raises:
            ValueError: an option out of range; the message names it.
        """
        super().__init__()
        self.sigma = _check_number("sigma", sigma, positive=True)
        self.delta = _check_number("delta", delta, positive=False)
        self.topk = _check_count("topk", topk)
        self.query_expansion = None if query_expansion is None else _check_count("query_expansion", query_expansion)
        self.weight_kl = _check_number("weight_kl", weight_kl, positive=False)
        if not isinstance(normalize_student, bool):
            raise ValueError(f"normalize_student: expected a bool, got {normalize_student!r}")
        self.normalize_student = normalize_student
        self.last_similarity: Tensor | None = None

    def forward(self, student_f: Tensor, student_g: Tensor, teacher_g: Tensor) -> dict[str, Tensor]:
        """Compute the loss terms for one batch.

        Args:
            student_f: (B, d_f) student target-head embeddings (with gradient), B >= 2.
            student_g: (B, d_g) student auxiliary-head embeddings of the same images (with gradient).
            teacher_g: (B, d_g) the teacher's auxiliary-head embeddings of the same images (detached).

        Returns:
            ``{"loss", "loss_rc", "loss_kl"}`` (scalars); ``loss = loss_rc + weight_kl · loss_kl``.

        Raises:
            ValueError: a tensor that is not a finite floating (B, d) matrix, or shapes that disagree.
        """
        _check_embeddings(student_f, "STMLLoss: student_f", min_rows=2)
        _check_embeddings(student_g, "STMLLoss: student_g", min_rows=2)
        _check_embeddings(teacher_g, "STMLLoss: teacher_g", min_rows=2)
        b = student_f.shape[0]
        if student_g.shape[0] != b or teacher_g.shape[0] != b:
            raise ValueError(
                f"STMLLoss: student_f, student_g and teacher_g must have the same number of rows, got "
                f"{tuple(student_f.shape)}, {tuple(student_g.shape)}, {tuple(teacher_g.shape)}"
            )
        if teacher_g.shape[1] != student_g.shape[1]:
            raise ValueError(
                f"STMLLoss: teacher_g {tuple(teacher_g.shape)} must come from the auxiliary head, the same size "
                f"as student_g {tuple(student_g.shape)}"
            )
        with torch.no_grad():
            weights, _ = stml_similarity(
                teacher_g.detach(), sigma=self.sigma, topk=self.topk, query_expansion=self.query_expansion
            )
        normalize = self.normalize_student
        loss_rc_f = stml_rc_loss(student_f, weights, self.delta, normalize=normalize)
        loss_rc_g = stml_rc_loss(student_g, weights, self.delta, normalize=normalize)
        loss_rc = 0.5 * (loss_rc_f + loss_rc_g)
        loss_kl = stml_kl_loss(student_f, student_g, temperature=1.0, normalize=normalize)
        self.last_similarity = weights.detach()
        return {"loss": loss_rc + self.weight_kl * loss_kl, "loss_rc": loss_rc, "loss_kl": loss_kl}

    def after_step(self) -> None:
        """Called by the trainer after each optimiser step; STML keeps no state to update."""


class STMLModel(nn.Module):
    """An :class:`~plmetric.models.EmbeddingModel` with STML's auxiliary head ``g``.

    ``f(x) = normalize(embedding(p(x)))`` (exactly the wrapped model) and
    ``g(x) = normalize(embedding_g(p(x)))`` with ``p`` the pooled backbone features (average + max
    pooling) computed once for both heads. The wrapped model's ``backbone`` and ``embedding`` are
    shared, not copied, and registered under the same names, so the state dict is the wrapped
    model's plus ``embedding_g.weight`` and ``embedding_g.bias``.

    Attributes:
        backbone: the wrapped model's trunk.
        embedding: the wrapped model's embedding layer (the target head ``f``).
        embedding_g: ``nn.Linear(feature_dim, g_dim)``, orthogonal weight, zero bias.
        backbone_name, feature_dim: as the wrapped model's.
        embedding_dim: size of ``f`` (what evaluation and the memory bank see).
        g_dim: size of ``g``.
        normalize_heads: whether ``forward_heads`` L2-normalises its outputs.
    """

    def __init__(self, base: EmbeddingModel, g_dim: int = 1024, *, normalize_heads: bool = True) -> None:
        """Wrap ``base`` and add the auxiliary head.

        Args:
            base: the model whose backbone and embedding layer are shared.
            g_dim: size of the auxiliary head (1024 in the paper).
            normalize_heads: L2-normalise both outputs of :meth:`forward_heads` (the default); False
                returns the raw heads as the authors' default ``--student_norm 0`` does.
                :meth:`forward` without ``both_heads`` is always normalised.

        Raises:
            TypeError: ``base`` is not an ``EmbeddingModel``.
            ValueError: ``g_dim`` is not a positive integer.
        """
        super().__init__()
        if not isinstance(base, EmbeddingModel):
            raise TypeError(f"STMLModel wraps an EmbeddingModel, got {type(base).__name__}")
        self.g_dim = _check_count("g_dim", g_dim)
        if not isinstance(normalize_heads, bool):
            raise ValueError(f"normalize_heads: expected a bool, got {normalize_heads!r}")
        self.normalize_heads = normalize_heads
        self.backbone_name = base.backbone_name
        self.feature_dim = int(base.feature_dim)
        self.embedding_dim = int(base.embedding_dim)
        self.backbone = base.backbone
        self.embedding = base.embedding
        self.embedding_g = nn.Linear(self.feature_dim, self.g_dim)
        nn.init.orthogonal_(self.embedding_g.weight)
        nn.init.zeros_(self.embedding_g.bias)

    def pooled_features(self, x: Tensor) -> Tensor:
        """``mean_{h,w} F + max_{h,w} F`` of ``F = backbone(x)``: ``(B, feature_dim)``, as ``EmbeddingModel``."""
        return EmbeddingModel.pooled_features(self, x)  # type: ignore[arg-type]

    def forward(self, x: Tensor, both_heads: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Embed images ``x`` ``(B, 3, H, W)``.

        Args:
            x: input images.
            both_heads: return ``(f, g)`` as :meth:`forward_heads` (the trainer calls this through
                DDP); otherwise the normalised ``f`` alone, exactly as the wrapped model.

        Returns:
            ``(B, embedding_dim)`` L2-normalised ``f``, or the pair ``(f, g)``.
        """
        if both_heads:
            return self.forward_heads(x)
        return F.normalize(self.embedding(self.pooled_features(x)), p=2, dim=1)

    def forward_heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(f (B, embedding_dim), g (B, g_dim))`` from one backbone pass (normalised unless
        ``normalize_heads`` is False)."""
        features = self.pooled_features(x)
        f, g = self.embedding(features), self.embedding_g(features)
        if self.normalize_heads:
            f, g = F.normalize(f, p=2, dim=1), F.normalize(g, p=2, dim=1)
        return f, g

    def embedding_model(self) -> EmbeddingModel:
        """The deployable embedding ``f`` alone: an `EmbeddingModel` sharing this backbone and layer.

        Saved checkpoints hold this (no ``embedding_g``), so they load like any plmetric model.
        """
        model = EmbeddingModel(self.backbone_name, self.backbone, self.feature_dim, 0)
        model.embedding = self.embedding
        model.embedding_dim = self.embedding_dim
        return model
