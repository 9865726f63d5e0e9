"""No training: the untrained start, with the same embedding layer, evaluated and saved.

The floor of every table: what the pretrained backbone with the run's embedding layer (e.g. its
PCA initialisation) gives before any step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from plmetric.methods.base import Method, Objective

__all__ = ["NoTraining"]


class NoTraining(Method):
    """Evaluate the start; there is no objective."""

    name = "none"
    summary = "the untrained start, same (untrained) embedding layer"
    trains = False

    def build_objective(self, dim: int, init_embeddings: Tensor | None, generator: torch.Generator) -> Objective:
        raise ValueError("train.method=none trains nothing: it has no objective")
