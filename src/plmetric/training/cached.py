"""Training on cached views: the CPU path of ``train.mode`` (``head`` and ``tail``).

On a CPU a whole backbone trains at a few images per second. With ``train.mode=head`` (what
``auto`` picks without a GPU) every training image is decoded once and ``V = train.views`` views of
it (view 0 the deterministic eval transform, views 1 .. V-1 random resized crops with flips, seeded
by ``train.seed``) pass once through the frozen pretrained backbone; their pooled features
``p(x) = mean_hw B(x) + max_hw B(x)`` stay in memory and only the embedding layer
``f(x) = normalize(W p(x) + b)`` trains, on a random augmented view for the student and the
clean view for the teacher. ``train.mode=tail`` keeps the feature maps after the first
``model.frozen_stages`` backbone stages instead and trains the rest of the network on them.

Either way a checkpoint holds the whole image model, the frozen part's pretrained weights and the
trained part (:meth:`CachedTraining.image_model`), so ``export``, ``index`` and ``search`` use it as
any other: the image-to-embedding function is the same. Labelled test splits are cached with their
clean view only, for the evaluation.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from plmetric.config.schema import Config
from plmetric.core import distributed as dist_utils
from plmetric.data.datasets import DECODE_ERRORS, DatasetSplits, ViewFeatureDataset

__all__ = [
    "CACHED_MODES",
    "CachedTraining",
    "Estimate",
    "build_cached_training",
    "planned_steps_per_epoch",
    "resolve_mode",
]

CACHED_MODES = ("head", "tail")
PROBE_BATCHES = 6  # caching batches timed for the estimate (after one that is not counted)
FINISH_SECONDS = 2.0  # the plots, the change report and summary.json (measured: about 1 s for 1,000 images)
# Views per DataLoader batch of the caching pass (onnxruntime runs them in pieces of ORT_ROWS_PER_RUN, PyTorch
# whole). On two CPU cores PyTorch ran EfficientNet-Lite0 at 224 px at 38 images/s in batches of 8-16 and 24
# in batches of 64-128 (larger activations fall out of the caches); 32 views keep the workers' batches of
# a few images each (the first results come early, the estimate's probe is short).
VIEWS_PER_FORWARD = 32


def resolve_mode(cfg: Config, device: torch.device) -> str:
    """``train.mode`` with ``auto`` resolved: ``end_to_end`` on a GPU, ``head`` elsewhere."""
    mode = cfg.train.mode
    if mode == "auto":
        return "end_to_end" if device.type == "cuda" else "head"
    return mode


def planned_steps_per_epoch(cfg: Config, num_images: int) -> int:
    """The steps of one epoch for ``num_images`` training images, before any is decoded: the
    steps the trainer runs when all of them are readable (the samplers yield as many batches as
    the epoch needs; :func:`plmetric.training.optimization.epoch_steps` gives the rule)."""
    from plmetric.training.optimization import epoch_steps

    return epoch_steps(cfg.train, num_images)


class ViewStack:
    """A transform that turns one decoded image into ``V`` views stacked ``(V, 3, H, W)``."""

    def __init__(self, transforms: Sequence[Callable[[Any], Tensor]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any) -> Tensor:
        return torch.stack([transform(image) for transform in self.transforms])


class FrozenViews(nn.Module):
    """The frozen part applied to every view of a batch: ``(B, V, 3, H, W) -> (B, V * prod(out))``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        batch, views = x.shape[:2]
        return self.net(x.flatten(0, 1)).reshape(batch, -1)


class PooledTrunk(nn.Module):
    """The pretrained model's pooled features ``mean_hw B(x) + max_hw B(x)`` (the head's input)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.pooled_features(x)


@dataclass
class Estimate:
    """What a run will do and how long it should take, from a short timed probe."""

    images: int
    views: int
    epochs: int
    steps: int
    cache_seconds: float
    train_seconds: float
    bookkeeping_seconds: float = 0.0  # checkpoints each epoch, the finish

    @property
    def seconds(self) -> float:
        """The whole run's expected seconds."""
        return self.cache_seconds + self.train_seconds + self.bookkeeping_seconds

    def line(self, mode: str) -> str:
        """One line for the user, before any pass starts."""
        minutes = self.seconds / 60
        return (
            f"train.mode={mode}: {self.images:,} images x {self.views} views cached once, then "
            f"{self.steps:,} steps ({self.epochs} epochs); expected about {minutes:.1f} min "
            f"(caching {self.cache_seconds / 60:.1f} min, training {(self.seconds - self.cache_seconds) / 60:.1f} min; "
            "from a timed probe)"
        )


@dataclass
class CachedTraining:
    """What the trainer gets for a cached mode: the splits of cached views, the student that trains
    on them, and how to turn a trained student back into the whole image model."""

    mode: str
    model: nn.Module  # the pretrained image model; its trained part is replaced in image_model
    student: nn.Module
    splits: DatasetSplits
    frozen: int
    skipped_images: list[str]
    estimate: Estimate | None = None

    def image_model(self, trained: nn.Module) -> nn.Module:
        """The whole image model with ``trained``'s weights in its trained part (head: the
        embedding layer; tail: the stages after the cut and the embedding layer)."""
        full = copy.deepcopy(self.model)
        if self.mode == "head":
            full.embedding.load_state_dict(trained.embedding.state_dict())
        else:
            from plmetric.training.networks import tail_model

            tail_model(full, self.frozen).load_state_dict(trained.state_dict())
        return full.eval()


def cache_views(
    net: nn.Module,
    dataset: Any,
    transforms: Sequence[Callable[[Any], Tensor]],
    cfg: Config,
    device: torch.device,
    progress: bool,
    store_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Every readable image of ``dataset`` decoded once, its views passed through ``net`` (the frozen
    part, already through the inference runtime: :func:`plmetric.data.runtime.inference_model`).

    Returns:
        ``(views (V, M, ...), labels (M,), rows (M,))`` over the M readable images.
    """
    from plmetric.evaluation.metrics import embed_dataset

    dataset.transform = ViewStack(transforms)
    net.eval()  # the frozen part: BatchNorm statistics fixed (embed_dataset restores the wrapper's mode only)
    with torch.no_grad():
        out_shape = tuple(net(torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size, device=device)).shape[1:])
    torch.manual_seed(cfg.train.seed)  # the crops (and the workers' seeds) are reproducible: resume recomputes them
    flat, labels, rows = embed_dataset(
        FrozenViews(net).to(device).eval(),
        dataset,
        batch_size=images_per_batch(len(transforms)),
        num_workers=cfg.data.num_workers,
        device=device,
        progress=progress,
        desc="caching views",
        runtime="torch",  # net is the runtime's model already
    )
    views = flat.reshape(flat.shape[0], len(transforms), *out_shape).transpose(0, 1).to(store_dtype).contiguous()
    return views, labels, rows


def probe_cache_seconds(
    net: nn.Module, dataset: Any, transforms: Sequence[Callable], device: torch.device, num_workers: int
) -> float:
    """Seconds per image of the caching pass, timed as the pass runs it: the same DataLoader (``num_workers``
    processes decoding and cropping the next batches while ``net``, already the runtime's model, runs), the
    same batches, over the first :data:`PROBE_BATCHES` + 1 batches of images. The first batch (the workers'
    start, the first call's allocations) is not counted: the rate is that of the batches after it."""
    from plmetric.data.datasets import collate_skip_none

    per_batch = images_per_batch(len(transforms))
    probe = _QuietViews(dataset, ViewStack(transforms), min(len(dataset), per_batch * (PROBE_BATCHES + 1)))
    loader = torch.utils.data.DataLoader(
        probe, batch_size=per_batch, num_workers=num_workers, collate_fn=collate_skip_none
    )
    frozen = FrozenViews(net).eval()
    marks: list[tuple[float, int]] = []
    with torch.no_grad():
        for batch in loader:
            if batch is not None:
                frozen(batch[0].to(device))
                marks.append((time.perf_counter(), len(batch[2])))
    if len(marks) < 2:
        return 0.0
    images = sum(count for _, count in marks[1:])
    return (marks[-1][0] - marks[0][0]) / images


class _QuietViews(torch.utils.data.Dataset):
    """The first ``count`` items of an image data set as stacked views, an unreadable one None without a
    warning (the caching pass names it, once)."""

    def __init__(self, dataset: Any, stack: ViewStack, count: int) -> None:
        self.dataset, self.stack, self.count = dataset, stack, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[Tensor, int, int] | None:
        try:
            image = self.dataset.load_image(i)
        except DECODE_ERRORS:
            return None
        return self.stack(image), 0, i


def images_per_batch(views: int) -> int:
    """Images per DataLoader batch of the caching pass: :data:`VIEWS_PER_FORWARD` views."""
    return max(1, VIEWS_PER_FORWARD // views)


def probe_save_seconds(model: nn.Module) -> float:
    """Seconds to serialise the image model's weights once (each epoch writes a checkpoint)."""
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    save(state)
    return time.perf_counter() - start


def probe_step_seconds(
    cfg: Config, student: nn.Module, input_shape: tuple[int, ...], device: torch.device, num_images: int
) -> float:
    """Seconds of one optimisation step (student and teacher forward, the method's objective,
    backward, AdamW) on random inputs of the cached shape: the median of three after a warm-up."""
    from plmetric.methods import get_method
    from plmetric.methods.base import StepInputs
    from plmetric.training.optimization import build_optimizer

    method = get_method(cfg.train.method)(cfg)
    if not method.trains:
        return 0.0
    net = method.wrap_student(copy.deepcopy(student)).to(device).train()
    teacher = copy.deepcopy(net).eval()
    generator = torch.Generator().manual_seed(0)
    b = cfg.train.batch_size
    rows = max(num_images, b)  # the bank's rows place the proxies
    init = torch.nn.functional.normalize(torch.randn(rows, int(net.embedding_dim), generator=generator), dim=1)
    objective = method.build_objective(int(net.embedding_dim), init if method.sampling == "neighbourhood" else None,
                                       generator).to(device)
    optimizer = build_optimizer(cfg.train, net, objective)
    labels = torch.arange(b) // max(1, cfg.supervised.per_class) if method.uses_labels else None
    times = []
    for _ in range(4):
        x = torch.randn(b, *input_shape, generator=generator).to(device)
        start = time.perf_counter()
        with torch.no_grad():
            target = method.teacher_heads(teacher, x)
        terms = objective(StepInputs(method.heads(net, x), target, labels))
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return times[len(times) // 2]


def build_cached_training(cfg: Config, device: torch.device, progress: bool, mode: str) -> CachedTraining:
    """Load ``cfg.data`` (a listing: nothing decoded), print the estimate from a timed probe, cache
    the views of the training split (and the clean view of a labelled test split), build the student."""
    from plmetric.data.backbones import build_transform, create_model, feature_model
    from plmetric.data.datasets import load_dataset
    from plmetric.data.runtime import inference_model
    from plmetric.training.networks import split_backbone, tail_model

    main = dist_utils.is_main_process()
    model = create_model(
        cfg.model.backbone,
        embedding_dim=cfg.model.embedding_dim,
        pretrained=cfg.model.pretrained,
        weights=cfg.model.weights,
    ).eval()
    frozen = cfg.model.frozen_stages if mode == "tail" else 0
    if mode == "tail":
        net: nn.Module = split_backbone(model, frozen)[0].eval()
        store = torch.float16  # feature maps: half the memory; the tail computes in float32
    else:
        net = PooledTrunk(model).eval()
        store = torch.float32
    net.to(device)
    size, backbone = cfg.data.image_size, cfg.model.backbone
    with torch.no_grad():
        input_shape = tuple(net(torch.zeros(1, 3, size, size, device=device)).shape[1:])
    net = inference_model(net, (3, size, size), cfg.train.runtime, device, what="the frozen backbone")
    student = feature_model(input_shape[0], cfg.model.embedding_dim) if mode == "head" else tail_model(model, frozen)
    splits = load_dataset(cfg.data.dataset, cfg.data.root, verbose=main)
    clean = build_transform(backbone, size, train=False)
    crop = build_transform(backbone, size, train=True, crop_scale_min=cfg.data.crop_scale_min)
    train_transforms = [clean] + [crop] * (cfg.train.views - 1)
    estimate = None
    if main:
        per_image = probe_cache_seconds(net, splits.train, train_transforms, device, cfg.data.num_workers)
        test_images = len(splits.test) if splits.test is not None else 0
        steps = planned_steps_per_epoch(cfg, len(splits.train)) * cfg.train.epochs
        estimate = Estimate(
            images=len(splits.train),
            views=cfg.train.views,
            epochs=cfg.train.epochs,
            steps=steps,
            cache_seconds=per_image * (len(splits.train) + test_images / cfg.train.views),
            train_seconds=steps * probe_step_seconds(cfg, student, input_shape, device, len(splits.train)),
            # model.safetensors every epoch, selected.safetensors when the pick changes (assumed as often)
            bookkeeping_seconds=2 * cfg.train.epochs * probe_save_seconds(model) + FINISH_SECONDS,
        )
        print(estimate.line(mode), flush=True)
    train_views, train_labels, rows = cache_views(net, splits.train, train_transforms, cfg, device, progress, store)
    readable = set(rows.tolist())
    skipped = [splits.train.describe(i) for i in range(len(splits.train)) if i not in readable]
    paths = [splits.train.describe(i) for i in rows.tolist()]
    train_set = ViewFeatureDataset(train_views, train_labels.numpy(), name=f"{splits.name}-train-{mode}", paths=paths)
    test_set = None
    if splits.test is not None and splits.test.num_classes > 1:
        test_views, test_labels, test_rows = cache_views(net, splits.test, [clean], cfg, device, progress, store)
        test_paths = [splits.test.describe(i) for i in test_rows.tolist()]
        test_set = ViewFeatureDataset(test_views, test_labels.numpy(), name=f"{splits.name}-test-{mode}", paths=test_paths)
    cached = DatasetSplits(f"{splits.name}-{mode}", train_set, test_set)
    return CachedTraining(mode, model, student, cached, frozen, skipped, estimate)
