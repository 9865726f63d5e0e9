"""The interface every training method implements (one call shape for every objective).

A :class:`Method` says how it wraps the student network, which outputs ("heads") one forward pass
gives, how it builds its :class:`Objective` from the config, how batches are drawn and what the
memory bank holds. An objective takes one step's :class:`StepInputs` and returns a dict of
scalar terms with the total under ``"loss"``, as pytorch-metric-learning's losses share one call
shape. The trainer (:mod:`plmetric.training.loop`) knows nothing else about any method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from plmetric.config.schema import Config

__all__ = ["Method", "Objective", "StepInputs"]


@dataclass
class StepInputs:
    """What one optimisation step gives the objective (gathered over all ranks).

    Attributes:
        student: the student's heads for the batch, with gradient (``(f,)``, or ``(f, g)`` for STML).
        teacher: the teacher's heads for the same images (its own view of them), detached; empty
            for methods that need no teacher forward.
        labels: the batch's class labels, only for methods that train with labels
            (:attr:`Method.uses_labels`); None otherwise: labels never reach an unsupervised objective.
        progress: the fraction of training done before this step, in [0, 1] (for schedules
            inside an objective); None outside a training run.
    """

    student: tuple[Tensor, ...]
    teacher: tuple[Tensor, ...]
    labels: Tensor | None = None
    progress: float | None = None


class Objective(nn.Module, ABC):
    """A method's training objective: ``forward(StepInputs) -> {"loss": total, name: term, ...}``.

    Attributes:
        last_similarity: the (B, B) detached targets of the last batch (monitoring: their
            correlation with the labels is logged), or None for objectives without pair targets.
    """

    last_similarity: Tensor | None = None

    @abstractmethod
    def forward(self, inputs: StepInputs) -> dict[str, Tensor]:
        """The loss terms of one batch; ``"loss"`` is the one that is minimised."""

    @torch.no_grad()
    def after_step(self) -> None:
        """Called after each optimiser step (e.g. to re-orthonormalise the proxies' bases)."""


class Method(ABC):
    """A training method: PLM, STML, the supervised ceiling, or none (the untrained start).

    Class attributes:
        name: the registry name (``train.method``).
        summary: one line for tables and ``--help``.
        trains: False for a method that only evaluates the start.
        uses_labels: True when the objective trains with the train split's labels.
        uses_teacher: True when the objective needs the EMA teacher's outputs every step.
        sampling: ``"neighbourhood"`` (seeds + their nearest neighbours in the memory bank) or
            ``"class_balanced"`` (m images of each of B/m classes; needs labels).
        bank_head: which of the teacher's heads the memory bank holds (its neighbours drive the
            neighbourhood sampler).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    trains: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = False
    uses_teacher: ClassVar[bool] = True
    sampling: ClassVar[str] = "neighbourhood"
    bank_head: ClassVar[int] = 0

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def wrap_student(self, model: nn.Module) -> nn.Module:
        """The network trained as the student (default: ``model`` itself)."""
        return model

    def heads(self, net: nn.Module, images: Tensor) -> tuple[Tensor, ...]:
        """One forward pass of ``net`` (the student, its DDP wrapper, or the teacher): its heads."""
        return (net(images),)

    def teacher_heads(self, teacher: nn.Module, images: Tensor) -> tuple[Tensor, ...]:
        """The teacher's outputs the objective reads (default: the same heads as the student's)."""
        return self.heads(teacher, images)

    @abstractmethod
    def build_objective(self, dim: int, init_embeddings: Tensor | None, generator: torch.Generator) -> Objective:
        """The objective for embeddings of dimension ``dim``.

        Args:
            dim: the embedding dimension.
            init_embeddings: the teacher's embeddings of the (readable) training images, e.g. to
                place proxies; None when there is no bank.
            generator: a CPU generator seeded from ``train.seed`` for random initialisation.
        """

    def check_training_size(self, num_images: int) -> None:
        """Raise ValueError when the method's options cannot work on ``num_images`` training
        images (called before any image is decoded; default: no constraint)."""
        del num_images

    def deployable(self, model: nn.Module) -> nn.Module:
        """What a model checkpoint holds: the embedding network (default: ``model`` itself)."""
        return model
