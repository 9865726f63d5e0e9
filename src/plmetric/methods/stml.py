"""STML, the peer method: Self-Taught Metric Learning without Labels (Kim, Kim, Cho & Kwak, CVPR 2022).

A port of the training objective of the authors' public code (github.com/tjddus9597/STML-CVPR22,
``code/loss.py``: ``RC_STML``, ``KL_STML``, ``STML_loss``; model heads in ``code/net/*.py``).

The student has two linear heads on the same pooled backbone features: the target embedding ``f``
(evaluated, e.g. 512-d) and an auxiliary, larger head ``g`` (1024-d). The teacher is a momentum (EMA)
copy of the student; its ``g`` embeddings give soft pair targets ``W`` (the contextualised
similarity, :func:`plmetric.evaluation.estimators.stml_similarity`). With ``d̂`` the row-mean-normalised
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

The loss terms are free functions in :mod:`plmetric.methods.losses` (:func:`~plmetric.methods.losses.stml_rc_loss`,
:func:`~plmetric.methods.losses.stml_kl_loss`); options: :class:`plmetric.core.options.STMLOptions`, the config's
``stml`` section.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plmetric.evaluation.estimators import stml_similarity
from plmetric.methods.losses import stml_kl_loss, stml_rc_loss
from plmetric.methods.base import Method, Objective, StepInputs
from plmetric.data.backbones import EmbeddingModel
from plmetric.core.options import STMLOptions, resolve
from plmetric.core.validation import check_bool, check_embeddings, check_int

__all__ = ["STMLLoss", "STMLMethod", "STMLModel"]


class STMLLoss(Objective):
    """STML's objective (``STML_loss`` of the authors' code) on the two student heads.

    ``L = ½ (L_RC(f) + L_RC(g)) + weight_kl · L_KL(f, g)``, both RC terms with the same targets
    ``W = stml_similarity(teacher_g)``; see :func:`~plmetric.methods.losses.stml_rc_loss` and
    :func:`~plmetric.methods.losses.stml_kl_loss`. Gradient routing: ``teacher_g`` and ``W`` carry none;
    ``L_RC`` reaches both student heads, ``L_KL`` the ``f`` head only.

    Args:
        options: :class:`~plmetric.core.options.STMLOptions` (sigma, delta, topk, query_expansion,
            weight_kl, normalize_student; ``g_dim`` is the model's), e.g. the config's ``stml``
            section; ``**fields`` override single options.

    Attributes:
        last_similarity: the detached (B, B) ``W`` of the last batch (None before the first).

    Raises:
        ValueError: an option out of range; the message names it.
    """

    def __init__(self, options: STMLOptions | None = None, **fields: Any) -> None:
        super().__init__()
        self.options = resolve(STMLOptions, options, **fields)
        self.last_similarity: Tensor | None = None

    def forward(self, inputs: StepInputs) -> dict[str, Tensor]:
        """The terms of a batch: both student heads against the teacher's auxiliary head (:meth:`terms`)."""
        return self.terms(inputs.student[0], inputs.student[1], inputs.teacher[1])

    def terms(self, student_f: Tensor, student_g: Tensor, teacher_g: Tensor) -> dict[str, Tensor]:
        """Compute the loss terms for one batch.

        Args:
            student_f: (B, d_f) student target-head embeddings (with gradient), B >= 2.
            student_g: (B, d_g) student auxiliary-head embeddings of the same images (with gradient).
            teacher_g: (B, d_g) the teacher's auxiliary-head embeddings of the same images (detached).

        Returns:
            ``{"loss", "loss_rc", "loss_kl"}`` (scalars); ``loss = loss_rc + weight_kl · loss_kl``;
            without ``loss_kl`` when ``weight_kl`` is 0 (switched off).

        Raises:
            ValueError: a tensor that is not a finite floating (B, d) matrix, or shapes that disagree.
        """
        check_embeddings(student_f, "STMLLoss: student_f", min_rows=2)
        check_embeddings(student_g, "STMLLoss: student_g", min_rows=2)
        check_embeddings(teacher_g, "STMLLoss: teacher_g", min_rows=2)
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
        o = self.options
        with torch.no_grad():
            weights, _ = stml_similarity(
                teacher_g.detach(), sigma=o.sigma, topk=o.topk, query_expansion=o.query_expansion
            )
        normalize = o.normalize_student
        loss_rc_f = stml_rc_loss(student_f, weights, o.delta, normalize=normalize)
        loss_rc_g = stml_rc_loss(student_g, weights, o.delta, normalize=normalize)
        loss_rc = 0.5 * (loss_rc_f + loss_rc_g)
        loss_kl = stml_kl_loss(student_f, student_g, temperature=1.0, normalize=normalize)
        self.last_similarity = weights.detach()
        if o.weight_kl == 0:  # switched off: left out of the terms (the epoch line shows what trains)
            return {"loss": loss_rc, "loss_rc": loss_rc}
        return {"loss": loss_rc + o.weight_kl * loss_kl, "loss_rc": loss_rc, "loss_kl": loss_kl}


class STMLModel(nn.Module):
    """An :class:`~plmetric.data.backbones.EmbeddingModel` with STML's auxiliary head ``g``.

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

    def __init__(self, base: EmbeddingModel, g_dim: int = STMLOptions.g_dim, *, normalize_heads: bool = True) -> None:
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
        self.g_dim = check_int("g_dim", g_dim, 1)
        check_bool("normalize_heads", normalize_heads)
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


class STMLMethod(Method):
    """STML in the trainer: a second, auxiliary head whose EMA teacher's contextual similarity
    gives soft pair targets to both student heads; checkpoints hold the target head ``f``."""

    name = "stml"
    summary = "STML: contextual similarity + relaxed contrastive + self-distillation (Kim et al., CVPR 2022)"

    def wrap_student(self, model: nn.Module) -> nn.Module:
        """The model with STML's auxiliary head ``g`` (``stml.g_dim``)."""
        return model if isinstance(model, STMLModel) else STMLModel(model, g_dim=self.cfg.stml.g_dim)

    def heads(self, net: nn.Module, images: Tensor) -> tuple[Tensor, ...]:
        """``(f, g)`` from one backbone pass (through DDP or ``torch.compile`` wrappers too)."""
        return tuple(net(images, both_heads=True))

    def build_objective(self, dim: int, init_embeddings: Tensor | None, generator: torch.Generator) -> STMLLoss:
        """STML's loss with the config's ``stml`` options."""
        return STMLLoss(self.cfg.stml)

    def deployable(self, model: nn.Module) -> nn.Module:
        """The target embedding ``f`` alone (the auxiliary head is dropped from checkpoints)."""
        return model.embedding_model()
