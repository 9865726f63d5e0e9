"""How long an end-to-end run will take, said before its first pass (the cached modes have their own
estimate in :mod:`plmetric.training.cached`).

A short timed probe on the run's device: the image decode and transform of a few training images
(``t_d`` per image), the forward pass of a freshly built network of the run's backbone and size
without gradient (``t_f``) and with its backward in train mode, frozen stages as configured (``t_b``),
on a batch of ``PROBE_BATCH`` random images, after one warm-up call. The run then costs about

* training: ``steps * B * (t_d + t_b + t_f)`` (the teacher's forward of every batch),
* passes: the start's PCA features and memory bank, each bank refresh (``n`` images), the label-free
  criteria every epoch (``min(select_images, n)``, twice when the teacher is kept), every evaluation
  of a labelled test split, at ``t_d + t_f`` per image.

The probe runs under :func:`torch.random.fork_rng`: the run's random stream is untouched. It is a
lower bound: it times the work a step must do, not the contention of DataLoader workers with the
network on the same CPU cores, nor the per-batch overheads of larger batches (measured on two cores:
96 images at 128 px, 10 steps of 95, probe 0.5 min, run 1.2 min).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from plmetric.config.schema import Config
from plmetric.data.datasets import DECODE_ERRORS

__all__ = ["PROBE_BATCH", "end_to_end_estimate"]

PROBE_BATCH = 16


def _timed(fn: Any, device: torch.device, repeats: int = 2) -> float:
    """Mean seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def _decode_seconds(dataset: Any, count: int) -> float:
    """Seconds per image to decode and transform the first readable training images."""
    times = []
    for i in range(min(len(dataset), 3 * count)):
        start = time.perf_counter()
        try:
            image = dataset.load_image(i)
        except DECODE_ERRORS:
            continue
        if dataset.transform is not None:
            dataset.transform(image)
        times.append(time.perf_counter() - start)
        if len(times) == count:
            break
    return sum(times) / len(times) if times else 0.0


def end_to_end_estimate(cfg: Config, train_set: Any, test_set: Any, device: torch.device, steps: int) -> str:
    """One line: the images, the steps and the expected minutes of an end-to-end run (see the module)."""
    from plmetric.data.backbones import create_model
    from plmetric.training.networks import freeze_stages

    n, size, t = len(train_set), cfg.data.image_size, cfg.train
    forks = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forks):
        model = create_model(cfg.model.backbone, embedding_dim=cfg.model.embedding_dim, pretrained=False).to(device)
        if cfg.model.frozen_stages:
            freeze_stages(model, cfg.model.frozen_stages)
        images = torch.randn(PROBE_BATCH, 3, size, size, device=device)

        def forward() -> None:
            with torch.no_grad():
                model.eval()(images)

        def step() -> None:
            model.train()(images).sum().backward()

        t_f = _timed(forward, device) / PROBE_BATCH
        t_b = _timed(step, device) / PROBE_BATCH
    t_d = _decode_seconds(train_set, PROBE_BATCH) if hasattr(train_set, "load_image") else 0.0
    if device.type == "cuda":  # decoding overlaps the device in DataLoader workers
        t_d /= max(1, cfg.data.num_workers)
    train_seconds = steps * t.batch_size * (t_d + t_b + t_f)
    epochs, pass_image = t.epochs, t_d + t_f
    selection = (epochs + 1) * min(t.select_images, n) * (2 if t.keep == "teacher" else 1)
    refreshes = 1 + (epochs - 1) // t.bank_refresh_every
    start_features = n if cfg.model.embedding_init == "pca" else 0
    evaluations = (1 + epochs // t.eval_every) * (len(test_set) if test_set is not None else 0)
    pass_seconds = pass_image * (start_features + refreshes * n + selection + evaluations)
    minutes = (train_seconds + pass_seconds) / 60
    return (
        f"train.mode=end_to_end: {n:,} images, {steps:,} steps of {t.batch_size} ({epochs} epochs); expected "
        f"at least {minutes:.1f} min (training {train_seconds / 60:.1f} min, passes over the images "
        f"{pass_seconds / 60:.1f} min; a lower bound from a timed probe: on a CPU, decoding workers competing "
        "with the network for the cores made a run take up to twice as long)"
    )
