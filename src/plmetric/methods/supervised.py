"""The supervised ceiling: the same trainer, data, backbone and evaluation, trained with labels.

What labels could buy: pytorch-metric-learning's ``MultiSimilarityLoss`` with its
``MultiSimilarityMiner`` (Wang, Han, Huang, Dong & Scott, "Multi-Similarity Loss with General Pair
Weighting for Deep Metric Learning", CVPR 2019) on class-balanced batches (m images of each of
B/m classes, :class:`plmetric.training.sampling.ClassBalancedBatchSampler`) of the *train* split's labels.
The test split's classes stay unseen, so its best epoch (chosen with test labels: an oracle) is
the ceiling an unsupervised method is measured against, and its final epoch shows how a head fit
to the training classes transfers. Also a feature for users who have some labels.
Options: :class:`plmetric.core.options.SupervisedOptions`, the config's ``supervised`` section.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from plmetric.methods.base import Method, Objective, StepInputs
from plmetric.core.options import SupervisedOptions, resolve

__all__ = ["MultiSimilarityObjective", "SupervisedMethod"]


class MultiSimilarityObjective(Objective):
    """``L_MS`` of pytorch-metric-learning on the pairs its miner keeps (cosine similarities):

    ``L = 1/B Σ_i [ 1/α log(1 + Σ_{p ∈ P_i} e^{-α (S_ip - λ)}) + 1/β log(1 + Σ_{n ∈ N_i} e^{β (S_in - λ)}) ]``

    with ``P_i`` / ``N_i`` the positive / negative pairs of anchor i that survive the miner's
    margin ε (all pairs when ``miner_epsilon`` is 0).

    Args:
        options: :class:`~plmetric.core.options.SupervisedOptions`; ``**fields`` override single ones.
    """

    def __init__(self, options: SupervisedOptions | None = None, **fields: Any) -> None:
        from pytorch_metric_learning import losses, miners

        super().__init__()
        self.options = resolve(SupervisedOptions, options, **fields)
        o = self.options
        self.loss = losses.MultiSimilarityLoss(alpha=o.alpha, beta=o.beta, base=o.base)
        self.miner = miners.MultiSimilarityMiner(epsilon=o.miner_epsilon) if o.miner_epsilon > 0 else None

    def forward(self, inputs: StepInputs) -> dict[str, Tensor]:
        """``{"loss": L_MS}`` of the student's embeddings and the batch's labels."""
        if inputs.labels is None:
            raise ValueError("the supervised objective needs the batch's labels")
        embeddings, labels = inputs.student[0], inputs.labels
        pairs = self.miner(embeddings, labels) if self.miner is not None else None
        return {"loss": self.loss(embeddings, labels, pairs)}


class SupervisedMethod(Method):
    """Metric learning with the train split's labels: the ceiling of the unsupervised methods."""

    name = "supervised"
    summary = "supervised ceiling: multi-similarity loss on the train labels (an oracle for the others)"
    uses_labels = True
    uses_teacher = False
    sampling = "class_balanced"

    def build_objective(
        self, dim: int, init_embeddings: Tensor | None, generator: torch.Generator
    ) -> MultiSimilarityObjective:
        return MultiSimilarityObjective(self.cfg.supervised)
