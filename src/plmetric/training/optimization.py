"""Optimiser and learning-rate schedule: AdamW with per-part learning rates, cosine with warm-up."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from plmetric.config.schema import TrainConfig

__all__ = ["build_optimizer", "build_scheduler", "cosine_with_warmup", "epoch_steps"]


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def epoch_steps(train: TrainConfig, num_images: int) -> int:
    """Optimiser steps of one epoch: about one pass over the ``num_images`` training images
    (``num_images // B`` batches, STML's convention).

    ``train.min_steps`` is a floor on the run's steps: a small pile gets ``ceil(min_steps / epochs)``
    steps an epoch, so that the run performs at least ``min_steps`` (exactly
    ``ceil(min_steps / epochs) * epochs`` when the floor decides); the batch samplers yield as many
    batches as the epoch needs (further rounds of seeds, :mod:`plmetric.training.sampling`) and the
    learning-rate schedule follows the steps. ``train.max_steps_per_epoch`` caps the result (quick
    runs, tests), the floor included.
    """
    steps = num_images // train.batch_size
    if train.min_steps:
        steps = max(steps, math.ceil(train.min_steps / train.epochs))
    if train.max_steps_per_epoch:
        steps = min(steps, train.max_steps_per_epoch)
    return steps


def build_optimizer(train: TrainConfig, student: nn.Module, objective: nn.Module) -> torch.optim.Optimizer:
    """AdamW with three parameter groups: backbone, embedding layer(s) (every student parameter outside
    the backbone, e.g. STML's auxiliary head too), objective (proxies)."""
    t = train
    backbone_ids = {id(p) for p in student.backbone.parameters()}
    groups = [
        {
            "name": "backbone",
            "params": [p for p in student.backbone.parameters() if p.requires_grad],
            "lr": t.lr_backbone,
        },
        {
            "name": "embedding",
            "params": [p for p in student.parameters() if p.requires_grad and id(p) not in backbone_ids],
            "lr": t.lr_embedding,
        },
        {
            "name": "proxies",
            "params": [p for p in objective.parameters() if p.requires_grad],
            "lr": t.lr_proxies,
            "weight_decay": 0.0,
        },
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, weight_decay=t.weight_decay)


def build_scheduler(
    train: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay with a linear warm-up over ``train.epochs`` epochs; the backbone's learning rate
    stays 0 for the first ``train.head_warmup_epochs`` (only the head trains)."""
    schedule = cosine_with_warmup(steps_per_epoch * train.epochs, int(train.warmup_epochs * steps_per_epoch))
    head_only_steps = int(train.head_warmup_epochs * steps_per_epoch)

    def backbone_schedule(step: int) -> float:  # the backbone waits while the head warms up
        return 0.0 if step < head_only_steps else schedule(step)

    factors: list[Callable[[int], float]] = [
        backbone_schedule if g.get("name") == "backbone" else schedule for g in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
