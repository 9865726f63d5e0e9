"""Training on cached views: the CPU path of ``train.mode`` (``head`` and ``tail``).

On a CPU a whole backbone trains at a few images per second. With ``train.mode=head`` (what
``auto`` picks without a GPU) every training image is decoded once and ``V = train.views`` views of
it (view 0 the deterministic eval transform, views 1 .. V-1 random resized crops with flips, seeded
by ``train.seed`` and the image's index) pass once through the frozen pretrained backbone; their pooled features
``p(x) = mean_hw B(x) + max_hw B(x)`` stay in memory and only the embedding layer
``f(x) = normalize(W p(x) + b)`` trains, on a random augmented view for the student and the
clean view for the teacher. ``train.mode=tail`` keeps the feature maps after the first
``model.frozen_stages`` backbone stages instead and trains the rest of the network on them.

Either way a checkpoint holds the whole image model, the frozen part's pretrained weights and the
trained part (:meth:`CachedTraining.image_model`), so ``export``, ``index`` and ``search`` use it as
any other: the image-to-embedding function is the same. Labelled test splits are cached with their
clean view only, for the evaluation.

The trainer keeps the cached views in the run folder, in chunks written as they complete
(:mod:`plmetric.training.view_cache`): an interrupted caching pass is resumed by ``--resume`` (the
chunks done are checked and kept, only the rest computed), and a run resumed after some epochs, or
started again with ``--overwrite``, reuses every chunk that still fits instead of caching again.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from plmetric.config.schema import Config
from plmetric.core import distributed as dist_utils
from plmetric.data.datasets import DECODE_ERRORS, DatasetSplits, ViewFeatureDataset
from plmetric.training.view_cache import ViewStack

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
FINISH_SECONDS = 3.0  # the plots, the change report and summary.json (measured: 2.5 s for 1,000 images)
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


def probe_cache_seconds(net: nn.Module, dataset: Any, transforms: Sequence[Callable], device: torch.device) -> float:
    """Seconds per image of the caching pass: the median of :data:`PROBE_BATCHES` batches of the pass's
    size (after one that is not counted: the first call's allocations) of images spread evenly over the
    data set, each image decoded and cropped into its views,
    then the views through ``net`` (already the runtime's model), one after the other in this process.

    Why sequential: on two cores the pass's DataLoader workers decode while onnxruntime's threads run the
    network, and both want the same cores; measured on 1,000 CUB images the pass ran 58 images/s with no
    worker and 61 with two (``benchmarks/inference_speed.py``), so the two times add up. A probe through
    the workers would time the batches they decoded ahead while the first one ran (34 % too fast)."""
    stack = ViewStack(transforms)
    per_batch = images_per_batch(len(transforms))
    # images spread over the whole data set (a folder's first ones may all be one camera's or one class's)
    rows = iter(range(0, len(dataset), max(1, len(dataset) // (per_batch * (PROBE_BATCHES + 1)))))
    times: list[float] = []
    with torch.no_grad():
        for _ in range(PROBE_BATCHES + 1):
            start, images = time.perf_counter(), []
            for i in rows:
                try:
                    images.append(stack(dataset.load_image(i)))
                except DECODE_ERRORS:
                    continue  # the caching pass names it
                if len(images) == per_batch:
                    break
            if not images:
                break
            net(torch.cat(images).to(device))
            times.append((time.perf_counter() - start) / len(images))
    times = sorted(times[1:] or times)
    return times[len(times) // 2] if times else 0.0  # the median: one batch slowed by the machine counts once


def images_per_batch(views: int) -> int:
    """Images per DataLoader batch of the caching pass: :data:`VIEWS_PER_FORWARD` views."""
    return max(1, VIEWS_PER_FORWARD // views)


def probe_epoch_seconds(model: nn.Module, cfg: Config, num_images: int, embedding_dim: int) -> float:
    """Seconds of one epoch's work besides its steps: the label-free selection criteria of the epoch
    (:func:`plmetric.evaluation.selection.selection_criteria` on ``min(N, train.select_images)`` embeddings)
    and three files of the size of the whole image model written to disk (``model.safetensors`` every
    epoch, ``selected.safetensors`` when the pick changes, assumed as often, and ``state.pt``, taken as one
    more): the median of three, each timed as the loop does it (a copy of the model, written atomically)."""
    import tempfile

    from plmetric.core.checkpoint import save_model
    from plmetric.evaluation.selection import selection_criteria

    n = max(3, min(num_images, cfg.train.select_images))
    x = torch.nn.functional.normalize(torch.randn(n, embedding_dim, generator=torch.Generator().manual_seed(0)), dim=1)
    times = []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(3):
            start = time.perf_counter()
            selection_criteria(x, x, x, k=min(cfg.train.select_k, n - 1))
            for name in ("model", "selected", "state"):
                meta = {"backbone": cfg.model.backbone, "embedding_dim": cfg.model.embedding_dim,
                        "image_size": cfg.data.image_size}
                save_model(f"{folder}/{name}.safetensors", copy.deepcopy(model), meta)
            times.append(time.perf_counter() - start)
    return sorted(times)[1]


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


@dataclass
class _FrozenPart:
    """The part of the network whose outputs are cached, ready to run (``net``), and what it makes."""

    model: nn.Module  # the whole embedding model (its checkpoint is what the run writes)
    net: nn.Module  # the frozen part through the inference runtime
    frozen: int  # stages frozen (tail mode), else 0
    store: torch.dtype  # the cached views' dtype
    input_shape: tuple[int, ...]  # the shape of one cached view: the student's input
    digest: str  # the frozen part's weights (:func:`plmetric.training.view_cache.weights_digest`)


def _frozen_part(cfg: Config, mode: str, device: torch.device, model: nn.Module) -> _FrozenPart:
    """Cut off what is cached of ``model``: its pooled trunk (head) or its first stages (tail), through
    the inference runtime."""
    from plmetric.data.runtime import inference_model
    from plmetric.training.networks import split_backbone
    from plmetric.training.view_cache import weights_digest

    frozen = cfg.model.frozen_stages if mode == "tail" else 0
    if mode == "tail":
        net: nn.Module = split_backbone(model, frozen)[0].eval()
        store = torch.float16  # feature maps: half the memory; the tail computes in float32
    else:
        net = PooledTrunk(model).eval()
        store = torch.float32
    net.to(device)
    size = cfg.data.image_size
    with torch.no_grad():
        input_shape = tuple(net(torch.zeros(1, 3, size, size, device=device)).shape[1:])
    digest = weights_digest(net, skip_prefix="model.embedding." if mode == "head" else None)  # what is cached
    net = inference_model(net, (3, size, size), cfg.train.runtime, device, what="the frozen backbone")
    return _FrozenPart(model, net, frozen, store, input_shape, digest)


def _split_caches(
    cfg: Config, splits: DatasetSplits, part: _FrozenPart, transforms: dict[str, list[Callable]], made: dict[str, Any],
    folder: Path | None, main: bool,
) -> dict[str, Any]:
    """One :class:`~plmetric.training.view_cache.SplitCache` per split to cache: the training split with
    every view, a labelled test split (more than one class) with the clean view; the chunks of a test
    split this data no longer has are removed."""
    from plmetric.training.view_cache import SplitCache, setup_key

    def split_cache(dataset: Any, views: list[Callable], name: str) -> SplitCache:
        return SplitCache(
            part.net, dataset, views, part.input_shape, batch_images=images_per_batch(len(views)),
            seed=cfg.train.seed, store_dtype=part.store, folder=folder, split=name, key=setup_key(made, views),
            writable=main,
        )

    caches = {"train": split_cache(splits.train, transforms["train"], "train")}
    if splits.test is not None and splits.test.num_classes > 1:
        caches["test"] = split_cache(splits.test, transforms["test"], "test")
    elif folder is not None and main and folder.is_dir():
        for stale in folder.glob("test-*.safetensors"):  # a test split this data no longer has
            stale.unlink(missing_ok=True)
    return caches


def _record_progress(out_dir: Path | None, main: bool, caches: dict[str, Any], stage: str = "caching") -> None:
    """``out_dir/caching.json``: how far the caching pass is (the main process only)."""
    from plmetric.training.runs import write_caching_progress

    if out_dir is None or not main:
        return
    done = {
        name: {
            "images": len(c.dataset),
            "chunks": c.chunks,
            "chunks_done": len(c.on_disk),
            "images_done": c.images_in(c.on_disk),
        }
        for name, c in caches.items()
    }
    write_caching_progress(Path(out_dir), stage, done)


def _announce(
    cfg: Config, mode: str, device: torch.device, part: _FrozenPart, student: nn.Module, splits: DatasetSplits,
    train_transforms: list[Callable], caches: dict[str, Any], folder: Path | None,
) -> Estimate:
    """Print the estimate from timed probes (caching only what remains) and the chunks kept from before."""
    num_images = len(splits.train)
    remaining = {name: c.remaining_images for name, c in caches.items()}
    cached_images = remaining["train"] + remaining.get("test", 0) / cfg.train.views
    per_image = probe_cache_seconds(part.net, splits.train, train_transforms, device) if cached_images else 0.0
    steps = planned_steps_per_epoch(cfg, num_images) * cfg.train.epochs
    estimate = Estimate(
        images=num_images,
        views=cfg.train.views,
        epochs=cfg.train.epochs,
        steps=steps,
        cache_seconds=per_image * cached_images,
        train_seconds=steps * probe_step_seconds(cfg, student, part.input_shape, device, num_images),
        # model.safetensors every epoch, selected.safetensors when the pick changes (assumed as often)
        bookkeeping_seconds=cfg.train.epochs
        * probe_epoch_seconds(part.model, cfg, num_images, part.model.embedding_dim)
        + FINISH_SECONDS,
    )
    print(estimate.line(mode), flush=True)
    for name, c in caches.items():
        if c.kept_chunks:
            print(
                f"caching views ({name}): {c.kept_chunks} of {c.chunks} chunks kept from before "
                f"({c.kept_images} of {len(c.dataset)} images, {folder}); computing the other "
                f"{c.remaining_images} images",
                flush=True,
            )
    return estimate


def _run_caches(
    splits: DatasetSplits, caches: dict[str, Any], mode: str, device: torch.device, workers: int, progress: bool,
    on_chunk: Callable[[], None],
) -> tuple[DatasetSplits, list[str]]:
    """Run the caching pass of each split: the cached data sets and the training images left out
    (unreadable)."""
    train_views, rows = caches["train"].run(device, workers, progress, on_chunk=on_chunk)
    train_labels = torch.from_numpy(splits.train.labels[rows.numpy()])
    readable = set(rows.tolist())
    skipped = [splits.train.describe(i) for i in range(len(splits.train)) if i not in readable]
    paths = [splits.train.describe(i) for i in rows.tolist()]
    train_set = ViewFeatureDataset(train_views, train_labels.numpy(), name=f"{splits.name}-train-{mode}", paths=paths)
    test_set = None
    if "test" in caches:
        test_views, test_rows = caches["test"].run(device, workers, progress, on_chunk=on_chunk)
        test_paths = [splits.test.describe(i) for i in test_rows.tolist()]
        test_labels = splits.test.labels[test_rows.numpy()]
        test_set = ViewFeatureDataset(test_views, test_labels, name=f"{splits.name}-test-{mode}", paths=test_paths)
    return DatasetSplits(f"{splits.name}-{mode}", train_set, test_set), skipped


def build_cached_training(
    cfg: Config,
    device: torch.device,
    progress: bool,
    mode: str,
    *,
    out_dir: Path | None = None,
    listed: Callable[[int], None] | None = None,
) -> CachedTraining:
    """Load ``cfg.data`` (a listing: nothing decoded), print the estimate from a timed probe, cache
    the views of the training split (and the clean view of a labelled test split), build the student.

    With ``out_dir`` the views are kept in ``out_dir/view-cache`` in chunks
    (:mod:`plmetric.training.view_cache`): the chunks already there that still fit are loaded, only
    the others are computed (and each stored as it completes), and ``out_dir/caching.json`` says how
    far the pass is. ``listed(number of training images)`` is called once the data is listed and the
    frozen part built, before the probe and the pass (the trainer checks its sizes there and starts
    the folder of a fresh run).
    """
    import functools

    from plmetric.core import faults
    from plmetric.data.backbones import DEFAULT_EVAL_RESIZE, build_transform, create_model, feature_model
    from plmetric.data.datasets import load_dataset
    from plmetric.data.runtime import runtime_of
    from plmetric.training.networks import tail_model
    from plmetric.training.view_cache import CACHE_FOLDER

    main = dist_utils.is_main_process()
    model = create_model(
        cfg.model.backbone,
        embedding_dim=cfg.model.embedding_dim,
        pretrained=cfg.model.pretrained,
        weights=cfg.model.weights,
    ).eval()
    splits = load_dataset(cfg.data.dataset, cfg.data.root, verbose=main)  # a bad listing fails before the export
    part = _frozen_part(cfg, mode, device, model)
    size, backbone = cfg.data.image_size, cfg.model.backbone
    if mode == "head":
        student = feature_model(part.input_shape[0], cfg.model.embedding_dim)
    else:
        student = tail_model(part.model, part.frozen)
    clean = build_transform(backbone, size, train=False, eval_resize=cfg.data.eval_resize)
    crop = build_transform(backbone, size, train=True, crop_scale_min=cfg.data.crop_scale_min)
    transforms = {"train": [clean] + [crop] * (cfg.train.views - 1), "test": [clean]}
    if listed is not None:
        listed(len(splits.train))
    folder = None if out_dir is None else Path(out_dir) / CACHE_FOLDER
    made = {  # what makes the views besides the transforms (plmetric.training.view_cache.setup_key)
        "weights": part.digest,
        "backbone": backbone,
        "mode": mode,
        "frozen_stages": part.frozen,
        "store": str(part.store),
        "output_shape": list(part.input_shape),
        "seed": cfg.train.seed,
        "runtime": runtime_of(part.net),
        "device": device.type,
        # the clean view's rule (its transform's repr differs too); absent for the default: old caches still fit
        **({"eval_resize": cfg.data.eval_resize} if cfg.data.eval_resize != DEFAULT_EVAL_RESIZE else {}),
    }
    caches = _split_caches(cfg, splits, part, transforms, made, folder, main)
    record_progress = functools.partial(_record_progress, out_dir, main, caches)
    record_progress()
    estimate = None
    if main:
        estimate = _announce(cfg, mode, device, part, student, splits, transforms["train"], caches, folder)
    faults.reached("cache")
    cached, skipped = _run_caches(splits, caches, mode, device, cfg.data.num_workers, progress, record_progress)
    record_progress("cached")
    faults.reached("cached")
    return CachedTraining(mode, part.model, student, cached, part.frozen, skipped, estimate)
