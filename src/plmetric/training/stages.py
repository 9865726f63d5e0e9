"""The stages that set up a training run (:mod:`plmetric.training.loop`), in the loop's order:

* **data** (:func:`build_data`): the training split (with paired views when the teacher has its own,
  ``train.teacher_view``), the deterministic copy (or the device cache) the memory bank embeds, the
  labelled test split; the sizes checked against the number of training images first
  (:func:`check_training_sizes`);
* **networks** (:func:`build_networks`, :func:`wrap_for_step`): the student as the method wraps it,
  its frozen stages, the PCA-initialised embedding layer, the EMA teacher, DDP and ``torch.compile``;
* **bank and batches** (:func:`build_batches`): the memory bank filled (or restored), the unreadable
  images left out, the batch sampler (neighbourhoods, or class-balanced for a method with labels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plmetric.config.schema import Config
from plmetric.core import distributed as dist_utils
from plmetric.core.names import shown
from plmetric.data.datasets import (
    DatasetSplits,
    FeatureDataset,
    PairedViews,
    ViewFeatureDataset,
    load_dataset,
    with_transform,
)
from plmetric.methods.base import Method
from plmetric.training.cached import planned_steps_per_epoch
from plmetric.training.estimate import end_to_end_estimate
from plmetric.training.networks import freeze_stages, init_embedding_pca
from plmetric.training.optimization import epoch_steps
from plmetric.training.passes import CachedImages, build_cached_images, pooled_features, refresh_bank
from plmetric.training.runs import STATE_FILE, state_mismatch
from plmetric.training.sampling import ClassBalancedBatchSampler, MemoryBank, NeighbourhoodBatchSampler, make_teacher


@dataclass
class TrainData:
    """The data of a run: the training split (with paired views when the teacher has its own), the
    deterministic copy (or the device cache) the bank embeds, the labelled test split (or None)."""

    train_set: Any
    bank_set: Any
    test_set: Any
    cached: CachedImages | None

    @property
    def labelled(self) -> bool:
        """Whether every training image has a label (and there are at least two classes)."""
        return bool((self.train_set.labels >= 0).all()) and self.train_set.num_classes > 1


def build_data(
    cfg: Config,
    splits: DatasetSplits | None,
    device: torch.device,
    method: Method | None = None,
    announce: bool = False,
) -> TrainData:
    """Load ``cfg.data`` (or take the injected ``splits``) and prepare the views each pass needs;
    the sizes (batch, neighbours, the method's own, e.g. proxies) are checked against the number of
    training images before any image is decoded. With ``announce`` a training method's expected
    minutes are printed then, before the first pass (:mod:`plmetric.training.estimate`)."""
    from plmetric.data.backbones import build_transform

    if splits is None:
        eval_transform = build_transform(
            cfg.model.backbone, cfg.data.image_size, train=False, eval_resize=cfg.data.eval_resize
        )
        train_transform = build_transform(
            cfg.model.backbone, cfg.data.image_size, train=True, crop_scale_min=cfg.data.crop_scale_min
        )
        splits = load_dataset(
            cfg.data.dataset,
            cfg.data.root,
            train_transform=train_transform,
            test_transform=eval_transform,
            verbose=dist_utils.is_main_process(),
        )
    elif isinstance(splits.train, ViewFeatureDataset):  # cached views: any other transform gives the clean view
        eval_transform = None
    else:  # injected data sets: the test split's transform is the deterministic one
        eval_transform = splits.test.transform if splits.test is not None else splits.train.transform
    train_set = splits.train
    bank_set = with_transform(train_set, eval_transform)
    view = cfg.train.teacher_view
    if view != "same" and not isinstance(train_set, ViewFeatureDataset):  # cached views pair themselves
        if isinstance(train_set, FeatureDataset):
            raise ValueError(f"train.teacher_view={view} needs images; a feature data set has one view")
        teacher_transform = eval_transform if view == "clean" else train_set.transform
        train_set = with_transform(train_set, PairedViews(train_set.transform, teacher_transform))
    test_set = splits.test if splits.test is not None and splits.test.num_classes > 1 else None
    n = len(train_set)
    check_training_sizes(cfg, method, n)
    if method is not None and method.trains:
        if announce:
            steps = planned_steps_per_epoch(cfg, n) * cfg.train.epochs
            print(end_to_end_estimate(cfg, train_set, test_set, device, steps), flush=True)
    cached = build_cached_images(cfg, train_set, device)
    return TrainData(train_set, cached if cached is not None else bank_set, test_set, cached)


def check_training_sizes(cfg: Config, method: Method | None, num_images: int) -> None:
    """Check the sizes (batch, neighbours, the method's own, e.g. proxies) against the number of
    training images, before any image is decoded.

    Raises:
        ValueError: a size the images cannot fill (the message names the option and both numbers).
    """
    k = cfg.train.neighbours_per_seed
    if k > num_images or cfg.train.batch_size > num_images:
        raise ValueError(
            f"train.neighbours_per_seed ({k}) and train.batch_size ({cfg.train.batch_size}) must not exceed "
            f"the number of training images ({num_images})"
        )
    if method is not None and method.trains:
        method.check_training_size(num_images)


@dataclass
class Networks:
    """The student (as the method wraps it), its EMA teacher, the network evaluated and saved
    (``train.keep``) and the wrappers the step calls (DDP, ``torch.compile``)."""

    student: nn.Module
    teacher: nn.Module
    kept: nn.Module
    ddp_student: nn.Module
    teacher_forward: nn.Module
    dim: int
    # the whole image model a checkpoint holds, given the trained network (cached modes: the frozen
    # pretrained part + the trained part; otherwise the network itself)
    image_model: Callable[[nn.Module], nn.Module] = field(default=lambda model: model)

    def deployable(self, method: Method, model: nn.Module) -> nn.Module:
        """What a checkpoint of ``model`` holds: the method's deployable network as an image model."""
        return self.image_model(method.deployable(model))


def build_networks(
    cfg: Config,
    method: Method,
    model: nn.Module | None,
    data: TrainData,
    device: torch.device,
    fresh: bool,
    image_model: Callable[[nn.Module], nn.Module] | None = None,
    progress: bool = False,
) -> Networks:
    """Create (or take) the student, let the method wrap it, freeze stages, PCA-initialise the
    embedding layer of a fresh run, and make the teacher (wrappers come with :func:`wrap_for_step`)."""
    from plmetric.data.backbones import create_model

    if model is None:
        model = create_model(
            cfg.model.backbone,
            embedding_dim=cfg.model.embedding_dim,
            pretrained=cfg.model.pretrained,
            weights=cfg.model.weights,
        )
    student = method.wrap_student(model)
    student.to(device)
    if frozen_stages(cfg, data):
        freeze_stages(student, cfg.model.frozen_stages)
    if cfg.model.embedding_init == "pca" and fresh:
        init_embedding_pca(student, pooled_features(student, data.bank_set, cfg, device, progress=progress))
    if device.type == "cuda" and cfg.train.channels_last:
        student.to(memory_format=torch.channels_last)
    teacher = make_teacher(student)
    kept = teacher if cfg.train.keep == "teacher" else student
    nets = Networks(student, teacher, kept, student, teacher, int(student.embedding_dim))
    if image_model is not None:
        nets.image_model = image_model
    return nets


def frozen_stages(cfg: Config, data: TrainData) -> int:
    """The student's frozen stages: ``model.frozen_stages``, or none when it trains on cached inputs
    (train.mode tail: the frozen stages were run once, before training; the student is the rest)."""
    return 0 if isinstance(data.train_set, (FeatureDataset, ViewFeatureDataset)) else cfg.model.frozen_stages


def wrap_for_step(cfg: Config, nets: Networks, device: torch.device) -> None:
    """DDP around the student under torchrun; ``torch.compile`` of both networks with
    ``train.compile`` (the wrappers share parameters with the modules they wrap)."""
    if dist_utils.world_size() > 1:
        nets.ddp_student = nn.parallel.DistributedDataParallel(
            nets.student, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        nets.ddp_student = torch.compile(nets.ddp_student)
        nets.teacher_forward = torch.compile(nets.teacher)


@dataclass
class Batches:
    """Where the batches come from: the memory bank (None for class-balanced sampling), the batch
    sampler, the steps of an epoch and the readable training images."""

    bank: MemoryBank | None
    sampler: NeighbourhoodBatchSampler | ClassBalancedBatchSampler
    steps_per_epoch: int
    readable_rows: torch.Tensor | None  # None: every training image is readable
    skipped_images: list[str]

    def start_epoch(
        self, cfg: Config, epoch: int, nets: Networks, data: TrainData, device: torch.device, progress: bool = False
    ) -> None:
        """Refresh the bank every ``train.bank_refresh_every`` epochs, renew the neighbour table,
        select the epoch's batches."""
        if self.bank is not None and epoch > 0:
            if epoch % cfg.train.bank_refresh_every == 0:
                refresh_bank(self.bank, nets.teacher, data.bank_set, cfg, device, progress=progress)
            self.sampler.set_neighbours(
                self.bank.neighbours(cfg.train.neighbours_per_seed - 1, rows=self.readable_rows)
            )
        self.sampler.set_epoch(epoch)


def build_batches(
    cfg: Config,
    method: Method,
    nets: Networks,
    data: TrainData,
    device: torch.device,
    raw_state: dict[str, Any] | None,
    out_dir: Path,
    progress: bool = False,
) -> Batches:
    """Fill (or restore) the memory bank, find the unreadable images, build the batch sampler."""
    world, rank, k = dist_utils.world_size(), dist_utils.rank(), cfg.train.neighbours_per_seed
    num_images = len(data.train_set)
    bank = None
    if method.sampling == "neighbourhood":
        bank = MemoryBank(len(data.train_set), nets.dim, device=device)
        if raw_state is None:
            refresh_bank(bank, nets.teacher, data.bank_set, cfg, device, progress=progress)
        else:
            try:
                bank.load_state_dict(raw_state["bank"])
            except (ValueError, KeyError, TypeError, RuntimeError) as err:
                raise state_mismatch(out_dir / STATE_FILE, err) from None
        readable, skipped = _readable_items((~bank.filled).nonzero().flatten().cpu(), data.train_set, cfg)
        steps = _steps(cfg, num_images if readable is None else int(readable.numel()))
        sampler: Any = NeighbourhoodBatchSampler(
            bank.neighbours(k - 1, rows=readable),
            batch_size=cfg.train.batch_size,
            k=k,
            seed=cfg.train.seed,
            rank=rank,
            world_size=world,
            items=None if readable is None else readable.cpu(),
            min_batches=steps,
        )
    else:  # class-balanced batches of the labelled training images
        if not data.labelled:
            raise ValueError(f"train.method={method.name} trains with labels; the training split has none")
        readable, skipped = _readable_items(
            torch.tensor(data.train_set.unreadable, dtype=torch.int64), data.train_set, cfg
        )
        rows = torch.arange(num_images) if readable is None else readable.cpu()
        steps = _steps(cfg, int(rows.numel()))
        sampler = ClassBalancedBatchSampler(
            data.train_set.labels[rows.numpy()],
            cfg.train.batch_size,
            cfg.supervised.per_class,
            seed=cfg.train.seed,
            rank=rank,
            world_size=world,
            items=rows,
            min_batches=steps,
        )
    return Batches(bank, sampler, steps, readable, skipped)


def _steps(cfg: Config, num_readable: int) -> int:
    """The steps of an epoch over ``num_readable`` images (:func:`epoch_steps`); the sampler is built
    to yield at least that many batches.

    An epoch shows about as many images as the training set holds (STML's convention): N // B batches,
    each with a fresh random set of seeds, rather than every image as a seed (k times longer);
    train.min_steps raises it for a small pile.
    """
    steps = epoch_steps(cfg.train, num_readable)
    if steps == 0:
        raise ValueError(
            f"an epoch has no batch: {num_readable} training images, train.batch_size {cfg.train.batch_size}, "
            f"neighbours_per_seed {cfg.train.neighbours_per_seed}"
        )
    return steps


def _readable_items(missing: torch.Tensor, train_set: Any, cfg: Config) -> tuple[torch.Tensor | None, list[str]]:
    """The readable rows (None when every image was readable) and the paths of the ``missing``
    ones, which are marked unreadable so that no loader decodes them again.

    Raises:
        ValueError: too few readable images remain for one batch.
    """
    if missing.numel() == 0:
        return None, []
    train_set.mark_unreadable(missing.tolist())
    keep = torch.ones(len(train_set), dtype=torch.bool)
    keep[missing] = False
    readable = keep.nonzero().flatten()
    needed = max(cfg.train.batch_size, cfg.train.neighbours_per_seed + 1)
    if readable.numel() < needed:
        raise ValueError(
            f"only {readable.numel()} of {len(train_set)} training images are readable; train.batch_size "
            f"({cfg.train.batch_size}) needs at least {needed}"
        )
    skipped = [train_set.describe(int(i)) for i in missing.tolist()]
    if dist_utils.is_main_process():
        listed = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"skipping {len(skipped)} unreadable training image(s) for the whole run: {shown(listed)}")
    return readable, skipped
