"""The training loop: momentum teacher, neighbourhood sampling, PLM losses, checkpoints.

One readable loop (:func:`train`), in the spirit of DINO's training script:

* the teacher is an exponential moving average of the student; a memory bank holds the teacher's
  embeddings of the whole training set and is refreshed from every batch, plus a full
  re-embedding every ``train.bank_refresh_every`` epochs;
* batches are ``B/k`` seed images, each with its ``k-1`` nearest neighbours in the bank;
* the objective (``train.method``: PLM, or STML as the peer; ``none`` only evaluates the start)
  turns the teacher's embeddings of a batch into targets for the student's distances; the teacher
  may see its own view of each image (``train.teacher_view``);
* input: PIL decoding in DataLoader workers, or (``data.pipeline``) a uint8 cache decoded once and
  augmented on the device (`plmetric.pipeline`); nothing in a step waits for the device;
* every epoch writes a JSON-lines log record, a full training state (for exact ``--resume``) and
  the student as a safetensors model checkpoint; the best evaluated epoch is kept as ``best``.

Multi-GPU / multi-node: launch with ``torchrun``; each rank takes a slice of the same global
batch, embeddings are gathered so every rank computes the one-process loss, the bank is kept
identical on every rank, and rank 0 alone writes files.
"""

from __future__ import annotations

import copy
import io
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from plmetric import distributed as dist_utils
from plmetric import faults
from plmetric.checkpoint import atomic_write_bytes, atomic_write_figure, atomic_write_json, save_model
from plmetric.config import Config, save_config
from plmetric.data import DatasetSplits, FeatureDataset, ImageDataset, PairedViews, collate_skip_none, load_dataset
from plmetric.evaluation import embed_dataset, evaluate
from plmetric.manifold import value_checks
from plmetric.sampling import MemoryBank, NeighbourhoodBatchSampler, ema_update, make_teacher

STATE_FILE = "state.pt"
MODEL_FILE = "model.safetensors"
BEST_MODEL_FILE = "best.safetensors"
LOG_FILE = "log.jsonl"
CONFIG_FILE = "config.yaml"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a finished run reports."""

    out_dir: Path
    history: list[dict[str, Any]]
    start_metrics: dict[str, Any] | None
    final_metrics: dict[str, Any] | None
    best_metrics: dict[str, Any] | None
    best_epoch: int | None
    skipped_images: list[str] = field(default_factory=list)  # unreadable training images, left out


# ----------------------------------------------------------------------------- set-up helpers


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np_state = np.random.get_state()
    state["numpy"] = (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(obj: Any) -> Any:
    return tuple(_to_tuple(o) for o in obj) if isinstance(obj, list | tuple) else obj


def resolve_device(name: str) -> torch.device:
    """``auto`` → the local CUDA device when available (per rank under torchrun), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist_utils.is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name}: CUDA is not available on this machine")
    return torch.device(name)


def with_transform(dataset: ImageDataset, transform: Any) -> ImageDataset:
    """A shallow copy of ``dataset`` that applies another transform (images are shared)."""
    clone = copy.copy(dataset)
    clone.transform = transform
    return clone


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_objective(cfg: Config, dim: int, init_embeddings: torch.Tensor | None = None) -> nn.Module:
    """The training objective of ``cfg.train.method``: STML's loss (``cfg.stml``), or the PLM loss
    with its proxies (``cfg.plm``); proxies start at the teacher's local PCA.

    Args:
        cfg: Run configuration.
        dim: Embedding dimension.
        init_embeddings: Teacher embeddings of the training set (the memory bank); proxies are
            placed on random ones with the PCA of their nearest neighbours (METHOD.md §4).
    """
    from plmetric.losses import PLMLoss

    if cfg.train.method == "stml":
        from plmetric.stml import STMLLoss

        st = cfg.stml
        return STMLLoss(sigma=st.sigma, delta=st.delta, topk=st.topk, weight_kl=st.weight_kl)
    p = cfg.plm
    generator = torch.Generator().manual_seed(cfg.train.seed)
    objective = PLMLoss(
        dim,
        n_proxies=p.num_proxies,
        m=p.m,
        tau=p.tau,
        n_max=p.n_max,
        subset_selection=p.subset_selection,
        k_plain=p.k_plain,
        n_alpha=p.n_alpha,
        n_beta=p.n_beta,
        symmetrize=p.symmetrize,
        binary=p.binary,
        delta=p.delta,
        delta_mode=p.delta_mode,
        loss_form=p.loss_form,
        normalize_rows=p.normalize_rows,
        proxy_neighbours=p.proxy_neighbours,
        weight_point=p.weight_point,
        weight_proxy=p.weight_proxy,
        weight_neighbourhood=p.weight_neighbourhood,
        generator=generator,
    )
    if objective.proxies is not None and init_embeddings is not None:
        if init_embeddings.shape[0] < p.num_proxies:
            raise ValueError(
                f"plm.num_proxies ({p.num_proxies}) exceeds the number of training images "
                f"({init_embeddings.shape[0]}); lower it"
            )
        objective.proxies.init_from_embeddings(init_embeddings.cpu(), generator=generator)
    return objective


def build_optimizer(cfg: Config, student: nn.Module, objective: nn.Module) -> torch.optim.Optimizer:
    """AdamW with three parameter groups: backbone, embedding layer(s) (every student parameter outside
    the backbone, e.g. STML's auxiliary head too), objective (proxies)."""
    t = cfg.train
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


def backbone_stages(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's top-level modules in order, with ``nn.Sequential`` children expanded one level
    (EfficientNet-Lite0: stem, bn, 7 block groups, head conv, bn; ResNet: conv1 ... layer4)."""
    stages: list[nn.Module] = []
    for child in backbone.children():
        stages.extend(child.children() if isinstance(child, nn.Sequential) else [child])
    return [stage for stage in stages if any(True for _ in stage.parameters())]


def freeze_stages(model: nn.Module, count: int) -> None:
    """Freeze the parameters of the first ``count`` backbone stages (see :func:`backbone_stages`)."""
    stages = backbone_stages(model.backbone)
    if count > len(stages):
        raise ValueError(f"model.frozen_stages ({count}) exceeds the backbone's {len(stages)} stages")
    for stage in stages[:count]:
        stage.requires_grad_(False)


def frozen_stage_modules(model: nn.Module, count: int) -> list[nn.Module]:
    """The modules frozen by :func:`freeze_stages` (kept in eval mode during training)."""
    return backbone_stages(model.backbone)[:count]


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode (statistics fixed); call after ``model.train()``."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@torch.no_grad()
def init_embedding_pca(model: nn.Module, features: torch.Tensor) -> None:
    """Initialise the linear embedding layer with the top principal directions of pooled features.

    ``W = V_dᵀ`` (rows: the first ``d`` principal axes of the centred features), ``b = -W μ``, so the
    untrained embedding is the PCA projection and keeps the backbone's neighbourhoods as far as
    ``d`` components allow.
    """
    layer = model.embedding
    if not isinstance(layer, nn.Linear):
        return
    mean = features.mean(0)
    centred = (features - mean).double()
    d = layer.out_features
    q = min(d, centred.shape[0], centred.shape[1])
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    weight = torch.zeros_like(layer.weight, dtype=torch.float64)
    weight[:q] = vh[:q]
    if q < d:  # fewer samples than dimensions: fill the rest with orthogonal random directions
        extra = torch.randn(d - q, weight.shape[1], dtype=torch.float64)
        extra -= extra @ vh[:q].T @ vh[:q]
        weight[q:] = torch.linalg.qr(extra.T).Q.T
    layer.weight.copy_(weight.to(layer.weight.dtype))
    layer.bias.copy_(-(weight @ mean.double()).to(layer.bias.dtype))


# ----------------------------------------------------------------------------- embedding passes


def embed_distributed(
    model: nn.Module, dataset: ImageDataset, *, batch_size: int, num_workers: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed a data set, sharded over ranks and gathered with its indices (no duplicates).

    Returns CPU float32 embeddings, labels and dataset indices sorted by index.
    """
    world, rank = dist_utils.world_size(), dist_utils.rank()
    shard = dataset if world == 1 else Subset(dataset, range(rank, len(dataset), world))
    emb, labels, index = embed_dataset(model, shard, batch_size=batch_size, num_workers=num_workers, device=device)
    return _gather_in_index_order(emb, labels, index, device)


def _gather_in_index_order(
    emb: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather each rank's shard (CPU tensors) and sort everything by data set index."""
    if dist_utils.world_size() > 1:
        emb = dist_utils.all_gather_variable(emb.to(device)).cpu()
        labels = dist_utils.all_gather_variable(labels.to(device)).cpu()
        index = dist_utils.all_gather_variable(index.to(device)).cpu()
    order = torch.argsort(index)
    return emb[order], labels[order], index[order]


@torch.no_grad()
def embed_cached(
    model: nn.Module, cache: Any, augment: nn.Module, *, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`embed_distributed` for images held in a `plmetric.pipeline.ImageCache` (eval-mode augment on the device)."""
    from plmetric.pipeline import CachedBatchLoader

    world, rank = dist_utils.world_size(), dist_utils.rank()
    mine = list(range(rank, len(cache), world))
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    was_training = model.training
    model.eval()
    outputs, labels, indices = [], [], []
    try:
        for batch in CachedBatchLoader(cache, batches, augment, device):
            if batch is None:
                continue
            images, batch_labels, batch_index = batch
            outputs.append(model(images).float().cpu())
            labels.append(batch_labels)
            indices.append(batch_index)
    finally:
        model.train(was_training)
    dim = int(getattr(model, "embedding_dim", 0))
    emb = torch.cat(outputs) if outputs else torch.zeros(0, dim)
    label_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    index_t = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64)
    return _gather_in_index_order(emb, label_t, index_t, device)


class CachedImages:
    """A training set's `plmetric.pipeline.ImageCache` with its train- and eval-mode device augmentations."""

    def __init__(
        self, cache: Any, train_augment: nn.Module, eval_augment: nn.Module, teacher_augment: nn.Module | None = None
    ) -> None:
        self.cache, self.train_augment, self.eval_augment = cache, train_augment, eval_augment
        self.teacher_augment = teacher_augment  # the teacher's own view (train.teacher_view), None: the student's


def refresh_bank(
    bank: MemoryBank, teacher: nn.Module, dataset: ImageDataset | CachedImages, cfg: Config, device: torch.device
) -> None:
    """Re-embed the whole training set with the teacher into the memory bank."""
    emb, _, index = embed_source(teacher, dataset, cfg, device)
    bank.update(index.to(bank.embeddings.device), emb.to(bank.embeddings.device))


def embed_source(
    model: nn.Module, source: ImageDataset | CachedImages, cfg: Config, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed a data set (PIL path) or cached images (eval-mode device augmentation), gathered over ranks."""
    if isinstance(source, CachedImages):
        return embed_cached(
            model, source.cache, source.eval_augment, batch_size=cfg.train.eval_batch_size, device=device
        )
    return embed_distributed(
        model, source, batch_size=cfg.train.eval_batch_size, num_workers=cfg.data.num_workers, device=device
    )


def build_cached_images(cfg: Config, dataset: Any, device: torch.device) -> CachedImages | None:
    """The uint8 cache of the training images for ``data.pipeline`` (None: stream with PIL instead).

    ``auto`` caches on CUDA only; ``cached`` always (falling back to streaming, with a warning, when
    the cache would exceed ``data.cache_max_bytes``). Feature data sets stream.
    """
    from plmetric.pipeline import DeviceAugment, cached_or_streaming

    d = cfg.data
    wanted = d.pipeline == "cached" or (d.pipeline == "auto" and device.type == "cuda")
    if not wanted or not isinstance(dataset, ImageDataset):
        return None
    cache = cached_or_streaming(
        dataset,
        d.image_size,
        cache_size=d.cache_size,
        max_bytes=d.cache_max_bytes,
        cache_path=d.cache_path,
        num_workers=d.num_workers,
        progress=False,
    )
    if cache is None:
        return None
    backbone = cfg.model.backbone
    train_augment = DeviceAugment.from_backbone(backbone, d.image_size, train=True, crop_scale_min=d.crop_scale_min)
    eval_augment = DeviceAugment.from_backbone(backbone, d.image_size, train=False)
    view = cfg.train.teacher_view
    teacher_augment = None if view == "same" else eval_augment if view == "clean" else copy.deepcopy(train_augment)
    return CachedImages(cache, train_augment, eval_augment, teacher_augment)


def evaluate_model(model: nn.Module, dataset: ImageDataset, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Zero-shot retrieval metrics of ``model`` on a labelled test split."""
    emb, labels, _ = embed_distributed(
        model, dataset, batch_size=cfg.train.eval_batch_size, num_workers=cfg.data.num_workers, device=device
    )
    return evaluate(emb, labels, compute_nmi=False)


# ----------------------------------------------------------------------------- checkpoints


def _state_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


# Config keys that may change when a run is resumed: where the data lives and bookkeeping that
# does not touch the numbers. ``train.epochs`` may grow (extending a run: the cosine schedule is
# then rebuilt for the new length, so an extended run is not the run it would have been had it
# been planned that long from the start). Any other change would break exact resumption.
RESUMABLE_KEYS = frozenset(
    {"data.root", "data.num_workers", "data.cache_path", "data.cache_max_bytes", "train.eval_every"}
)
STATE_KEYS = (
    "epoch",
    "config_json",
    "student",
    "teacher",
    "objective",
    "optimizer",
    "scheduler",
    "bank",
    "rng",
    "history_json",
    "start_metrics_json",
    "best_json",
)


def load_training_state(path: Path, cfg: Config) -> dict[str, Any]:
    """Load a full training state written by :func:`train` (``weights_only``: no code runs).

    Only :data:`RESUMABLE_KEYS` and a longer ``train.epochs`` may differ from the state's config.

    Raises:
        FileNotFoundError: no state at ``path``.
        ValueError: the file is not a plmetric training state (corrupt, truncated, crafted), or
            it belongs to a run with another configuration (the message lists the differences).
    """
    if not path.is_file():
        raise FileNotFoundError(f"no training state to resume from: {path} (start the run without --resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, EOFError, RuntimeError (zip), ...: never load it unsafely
        detail = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path} is not a plmetric training state (it cannot be read as one: {type(err).__name__}: {detail}); "
            "it may be truncated or not written by plmetric: start the run again with --overwrite"
        ) from None
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        raise ValueError(f"{path} is not a plmetric training state (expected the keys {', '.join(STATE_KEYS)})")
    try:
        saved = json.loads(state["config_json"])
    except (TypeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a plmetric training state (its config is not JSON)") from None
    current = json.loads(json.dumps(cfg.to_dict()))
    diff = []
    for section, values in current.items():
        for key, value in values.items():
            before = saved.get(section, {}).get(key) if isinstance(saved.get(section), dict) else None
            name = f"{section}.{key}"
            if before == value or name in RESUMABLE_KEYS:
                continue
            if name == "train.epochs" and isinstance(before, int) and value >= int(state["epoch"]) + 1:
                continue
            diff.append(f"{name}: {before!r} -> {value!r}")
    if diff:
        raise ValueError(
            f"cannot resume {path}: it was written with another config, and these changes would break exact resumption "
            f"({'; '.join(sorted(diff))}); only {', '.join(sorted(RESUMABLE_KEYS))} and a larger train.epochs "
            "may change"
        )
    return state


RUN_FILES = (CONFIG_FILE, STATE_FILE, LOG_FILE, MODEL_FILE, BEST_MODEL_FILE, "summary.json")


def existing_run(out_dir: Path) -> dict[str, Any] | None:
    """What ``out_dir`` already holds of a training run (None: nothing): the files found and, from
    ``log.jsonl``, the last epoch logged."""
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not found:
        return None
    last_epoch = None
    try:
        lines = (out_dir / LOG_FILE).read_text().splitlines()
        last_epoch = int(json.loads(lines[-1])["epoch"]) if lines else None
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass
    return {"files": found, "last_epoch": last_epoch}


def _stopped_before_first_epoch(out_dir: Path) -> bool:
    """A run killed before its first training state was written: a config, no state, no summary,
    and at most the first epoch's model and log line (written just before that state)."""
    if not (out_dir / CONFIG_FILE).is_file() or (out_dir / STATE_FILE).exists() or (out_dir / "summary.json").exists():
        return False
    found = existing_run(out_dir)
    return found is not None and (found["last_epoch"] is None or found["last_epoch"] <= 1)


def check_run_folder(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start over a run unless ``overwrite`` (before any work: nothing is removed here;
    :func:`clear_run_folder` does that when the new run writes its first file).

    Raises:
        FileExistsError: ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` was given.
        NotADirectoryError: ``out_dir`` is a file.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; the run folder must be a directory")
    found = existing_run(out_dir) if out_dir.is_dir() else None
    if found is not None and not resume and not overwrite:
        epochs = f" (epoch {found['last_epoch']} logged)" if found["last_epoch"] else ""
        raise FileExistsError(
            f"--out {out_dir} already holds a training run{epochs}: add --resume to continue or extend it "
            "(--resume --set train.epochs=N), or --overwrite to replace it, or choose another --out"
        )


def clear_run_folder(out_dir: Path, *, replace: bool) -> None:
    """Remove what an interrupted write left (stale temporaries) and, with ``replace``, the files of
    the run being replaced (``--overwrite``); rank 0 only."""
    from plmetric.checkpoint import remove_stale_temporaries

    if not out_dir.is_dir() or not dist_utils.is_main_process():
        return
    if replace:
        for name in (*RUN_FILES, "model.json", "best.json", "losses.png", "recall.png"):
            (out_dir / name).unlink(missing_ok=True)
    remove_stale_temporaries(out_dir)


def _model_metadata(cfg: Config, model: nn.Module, epoch: int, metrics: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "backbone": cfg.model.backbone,
        "embedding_dim": cfg.model.embedding_dim,
        "output_dim": int(getattr(model, "embedding_dim", cfg.model.embedding_dim)),
        "image_size": cfg.data.image_size,
        "epoch": epoch,
        "metrics": metrics,
        "config": cfg.to_dict(),
    }


# ----------------------------------------------------------------------------- the loop

NONFINITE_CHECK_EVERY = 50  # steps between the (synchronising) checks of the device-side NaN flag


class TrainStep:
    """One optimisation step of the loop, shared with ``benchmarks/throughput.py``.

    Teacher forward (no gradient) on the teacher's views, student forward on the student's views
    (bf16 autocast on CUDA), gathering across ranks, the objective, backward, AdamW, schedule,
    proxy re-orthonormalisation, EMA update of the teacher and the memory-bank update. Nothing in
    it waits for the device: the returned terms stay on the device.
    """

    def __init__(
        self,
        cfg: Config,
        student: nn.Module,
        ddp_student: nn.Module,
        teacher: nn.Module,
        objective: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        bank: MemoryBank,
        device: torch.device,
        teacher_forward: nn.Module | None = None,
    ) -> None:
        self.cfg, self.device = cfg, device
        self.student, self.ddp_student, self.teacher = student, ddp_student, teacher
        self.objective, self.optimizer, self.scheduler, self.bank = objective, optimizer, scheduler, bank
        self.two_heads = cfg.train.method == "stml"
        self.use_bf16 = cfg.train.bf16 and device.type == "cuda"
        cuda_channels_last = device.type == "cuda" and cfg.train.channels_last
        self.memory_format = torch.channels_last if cuda_channels_last else torch.preserve_format
        self.objective_params = list(objective.parameters())
        self.teacher_forward = teacher if teacher_forward is None else teacher_forward  # e.g. torch.compile(teacher)

    def _forward(self, net: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _as_tuple(net(images, both_heads=True) if self.two_heads else net(images))

    def __call__(
        self,
        student_images: torch.Tensor,
        teacher_images: torch.Tensor,
        index: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run one step; ``labels`` (monitoring only) add ``target_label_correlation``. Returns detached terms."""
        device = self.device
        same_views = teacher_images is student_images
        student_images = student_images.to(device, non_blocking=True, memory_format=self.memory_format)
        teacher_images = (
            student_images
            if same_views
            else teacher_images.to(device, non_blocking=True, memory_format=self.memory_format)
        )
        index = index.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            with torch.no_grad():
                teacher_out = self._forward(self.teacher_forward, teacher_images)
            student_out = self._forward(self.ddp_student, student_images)
        teacher_all = [dist_utils.all_gather_variable(t.float()) for t in teacher_out]
        student_all = [dist_utils.all_gather_with_grad(t.float()) for t in student_out]
        index_all = dist_utils.all_gather_variable(index)
        if self.two_heads:  # STML: both student heads against the teacher's auxiliary head
            terms = self.objective(student_all[0], student_all[1], teacher_all[1])
        else:
            terms = self.objective(student_all[0], teacher_all[0])
        if labels is not None:  # labels watch the targets' quality; they never reach the loss
            labels_all = dist_utils.all_gather_variable(labels.to(device, non_blocking=True))
            terms["target_label_correlation"] = label_correlation(self.objective.last_similarity, labels_all)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        dist_utils.average_gradients(self.objective_params)
        if self.cfg.train.grad_clip:
            nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.objective.after_step()
        ema_update(self.teacher, self.student, self.cfg.train.momentum)
        self.bank.update(index_all, teacher_all[0].detach())
        return {name: value.detach() for name, value in terms.items()}


def _raise_if_nonfinite(first_bad: torch.Tensor, epoch: int, sums: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Raise `NonFiniteLossError` when the device-side flag recorded a non-finite loss (one host sync)."""
    bad_step = int(first_bad)
    if bad_step >= 0:
        raise NonFiniteLossError(
            f"the loss became non-finite at epoch {epoch + 1}, step {bad_step + 1} "
            f"(running sums: { {name: float(v) for name, v in sums.items()} }); "
            f"the last good checkpoint is in {out_dir}"
        )


def train(
    cfg: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    splits: DatasetSplits | None = None,
    model: nn.Module | None = None,
    progress: bool = True,
    stop_after_epochs: int | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train an embedding without labels (labels, when present, are used for evaluation only).

    Args:
        cfg: The run's configuration (validated here before any work starts).
        out_dir: Run folder: ``config.yaml``, ``log.jsonl``, ``state.pt``, ``model.safetensors``,
            ``best.safetensors``, plots.
        resume: Continue from ``out_dir/state.pt`` exactly where it stopped (the log is cut back
            to the state's epoch); with a larger ``cfg.train.epochs``, extend a finished run.
        splits: Data sets to use instead of loading ``cfg.data`` (tests, notebooks).
        model: Student network to use instead of ``create_model(cfg.model...)``; it must have
            ``backbone`` and ``embedding`` sub-modules and return L2-normalised embeddings.
        progress: Show tqdm progress bars (rank 0).
        stop_after_epochs: Stop (resumably) after this many epochs of this invocation, e.g. to fit
            a job's time limit; ``resume=True`` later continues exactly.
        overwrite: Replace a run already in ``out_dir`` (without it, such a folder is refused).

    Returns:
        The per-epoch history and the metrics of the start, the final and the best epoch.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if resume and _stopped_before_first_epoch(out_dir):
        # nothing was finished (no state, no logged epoch, no model): there is nothing to continue
        if dist_utils.is_main_process():
            print(f"{out_dir} has no training state yet (stopped in its first epoch): starting it from the beginning")
        resume, overwrite = False, True
    state = load_training_state(out_dir / STATE_FILE, cfg) if resume else None
    check_run_folder(out_dir, resume=resume, overwrite=overwrite)
    device = resolve_device(cfg.train.device)
    group_created_here = dist_utils.init_from_env(str(device))
    try:
        # value checks (finiteness, index ranges) would cost a host sync per call; the loop checks its loss
        with value_checks(False):
            return _train(cfg, out_dir, state, splits, model, progress, stop_after_epochs)
    finally:
        if group_created_here:
            torch.distributed.destroy_process_group()


def _train(
    cfg: Config,
    out_dir: Path,
    state: dict[str, Any] | None,
    splits: DatasetSplits | None,
    model: nn.Module | None,
    progress: bool,
    stop_after_epochs: int | None,
) -> TrainResult:
    from tqdm import tqdm  # not tqdm.auto: its asyncio tqdm calls iter(loader), a 2nd worker pool

    from plmetric.models import build_transform, create_model
    from plmetric.pipeline import CachedBatchLoader

    device = resolve_device(cfg.train.device)
    main_process = dist_utils.is_main_process()
    seed_everything(cfg.train.seed)

    # --- data
    if splits is None:
        eval_transform = build_transform(cfg.model.backbone, cfg.data.image_size, train=False)
        splits = load_dataset(
            cfg.data.dataset,
            cfg.data.root,
            train_transform=build_transform(
                cfg.model.backbone, cfg.data.image_size, train=True, crop_scale_min=cfg.data.crop_scale_min
            ),
            test_transform=eval_transform,
            verbose=main_process,
        )
    else:  # injected data sets: the test split's transform is the deterministic one
        eval_transform = splits.test.transform if splits.test is not None else splits.train.transform
    train_set = splits.train
    bank_set = with_transform(train_set, eval_transform)
    if cfg.train.teacher_view != "same":
        if isinstance(train_set, FeatureDataset):
            raise ValueError(
                f"train.teacher_view={cfg.train.teacher_view} needs images; a feature data set has one view"
            )
        teacher_transform = eval_transform if cfg.train.teacher_view == "clean" else train_set.transform
        train_set = with_transform(train_set, PairedViews(train_set.transform, teacher_transform))
    test_set = splits.test if splits.test is not None and splits.test.num_classes > 1 else None
    cached = build_cached_images(cfg, train_set, device)
    if cached is not None:
        bank_set = cached
    num_items = len(train_set)
    k = cfg.train.neighbours_per_seed
    if k > num_items or cfg.train.batch_size > num_items:
        raise ValueError(
            f"train.neighbours_per_seed ({k}) and train.batch_size ({cfg.train.batch_size}) must not exceed "
            f"the number of training images ({num_items})"
        )

    # --- networks
    student = (
        model
        if model is not None
        else create_model(
            cfg.model.backbone,
            embedding_dim=cfg.model.embedding_dim,
            pretrained=cfg.model.pretrained,
            weights=cfg.model.weights,
        )
    )
    method = cfg.train.method
    if method == "stml":
        from plmetric.stml import STMLModel

        if not isinstance(student, STMLModel):
            student = STMLModel(student, g_dim=cfg.stml.g_dim)
    student.to(device)
    if cfg.model.frozen_stages:
        freeze_stages(student, cfg.model.frozen_stages)
    if cfg.model.embedding_init == "pca" and state is None:
        feats = _pooled_features(student, bank_set, cfg, device)
        init_embedding_pca(student, feats)
    if device.type == "cuda" and cfg.train.channels_last:
        student.to(memory_format=torch.channels_last)
    teacher = make_teacher(student)
    kept = teacher if cfg.train.keep == "teacher" else student  # the network evaluated and saved
    dim = int(student.embedding_dim)

    bank = MemoryBank(num_items, dim, device=device)
    if state is None:
        refresh_bank(bank, teacher, bank_set, cfg, device)
    else:
        try:
            bank.load_state_dict(state["bank"])
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise _state_mismatch(out_dir, err) from None
    # Images that could not be decoded in the first full pass stay out of the bank's neighbour
    # search and the sampler for the whole run (named once in the summary).
    readable_rows, skipped_images = _readable_items(bank, train_set, cfg)
    num_readable = num_items if readable_rows is None else int(readable_rows.numel())
    init_rows = bank.embeddings if readable_rows is None else bank.embeddings[readable_rows]
    objective = build_objective(cfg, dim, init_embeddings=init_rows).to(device)
    optimizer = build_optimizer(cfg, student, objective)
    world = dist_utils.world_size()
    sampler = NeighbourhoodBatchSampler(
        bank.neighbours(k - 1, rows=readable_rows),
        batch_size=cfg.train.batch_size,
        k=k,
        seed=cfg.train.seed,
        rank=dist_utils.rank(),
        world_size=world,
        items=None if readable_rows is None else readable_rows.cpu(),
    )
    # An epoch shows about as many images as the training set holds (STML's convention): N // B batches,
    # each with a fresh random set of seeds, rather than every image as a seed (k times longer).
    steps_per_epoch = min(len(sampler), num_readable // cfg.train.batch_size)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(
            f"an epoch has no batch: {num_items} training images, train.batch_size {cfg.train.batch_size}, "
            f"neighbours_per_seed {k}"
        )
    total_steps = steps_per_epoch * cfg.train.epochs
    schedule = cosine_with_warmup(total_steps, int(cfg.train.warmup_epochs * steps_per_epoch))
    head_only_steps = int(cfg.train.head_warmup_epochs * steps_per_epoch)

    def backbone_schedule(step: int) -> float:  # the backbone waits while the head warms up
        return 0.0 if step < head_only_steps else schedule(step)

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [backbone_schedule if g.get("name") == "backbone" else schedule for g in optimizer.param_groups]
    )
    ddp_student = student
    if world > 1:
        ddp_student = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    teacher_forward: nn.Module = teacher
    if cfg.train.compile:  # the compiled wrappers share parameters with the modules they wrap
        ddp_student = torch.compile(ddp_student)
        teacher_forward = torch.compile(teacher)

    history: list[dict[str, Any]] = []
    start_epoch, best_epoch = 0, None
    start_metrics = best_metrics = None
    if state is not None:
        try:
            student.load_state_dict(state["student"])
            teacher.load_state_dict(state["teacher"])
            objective.load_state_dict(state["objective"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = int(state["epoch"]) + 1
            history = json.loads(state["history_json"])
            start_metrics = json.loads(state["start_metrics_json"])
            best = json.loads(state["best_json"])
            best_epoch, best_metrics = best["epoch"], best["metrics"]
            _set_rng_state(state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise _state_mismatch(out_dir, err) from None
        if main_process:
            # the log and config follow the state: records of epochs after it (written before a crash
            # cut the state's write short) are dropped, and an extended run records its new length
            clear_run_folder(out_dir, replace=False)
            atomic_write_bytes(out_dir / LOG_FILE, "".join(json.dumps(r) + "\n" for r in history).encode())
            save_config(cfg, out_dir / CONFIG_FILE)
            print(f"resuming {out_dir} after epoch {start_epoch}")
    elif main_process:  # the run's first file: only now is a replaced run (--overwrite) removed
        clear_run_folder(out_dir, replace=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / CONFIG_FILE)
    if test_set is not None and start_metrics is None:
        start_metrics = evaluate_model(teacher, test_set, cfg, device)
        if main_process:
            print(f"start: R@1 {100 * start_metrics['recall@1']:.2f}")
    if method == "none":  # the floor: the untrained start with the same embedding layer, saved as the model
        if main_process:
            save_model(out_dir / MODEL_FILE, student, _model_metadata(cfg, student, 0, start_metrics))
            atomic_write_json(
                out_dir / "summary.json",
                {
                    "start": start_metrics,
                    "final": start_metrics,
                    "best": start_metrics,
                    "best_epoch": 0,
                    "epochs": 0,
                    **_skipped_summary(skipped_images, test_set),
                },
            )
        return TrainResult(out_dir, [], start_metrics, start_metrics, start_metrics, 0, skipped_images)

    monitor_labels = bool((train_set.labels >= 0).all()) and train_set.num_classes > 1
    step = TrainStep(cfg, student, ddp_student, teacher, objective, optimizer, scheduler, bank, device, teacher_forward)
    end_epoch = (
        cfg.train.epochs if stop_after_epochs is None else min(cfg.train.epochs, start_epoch + stop_after_epochs)
    )
    for epoch in range(start_epoch, end_epoch):
        if epoch > 0 and epoch % cfg.train.bank_refresh_every == 0:
            refresh_bank(bank, teacher, bank_set, cfg, device)
        if epoch > 0:
            sampler.set_neighbours(bank.neighbours(k - 1, rows=readable_rows))
        sampler.set_epoch(epoch)
        if cached is not None:  # decoded once, cropped and flipped on the device, prefetched by a thread
            loader: Any = CachedBatchLoader(
                cached.cache, sampler, cached.train_augment, device, teacher_augment=cached.teacher_augment
            )
        else:
            loader = DataLoader(
                train_set,
                batch_sampler=sampler,
                num_workers=cfg.data.num_workers,
                collate_fn=collate_skip_none,
                pin_memory=device.type == "cuda",
                persistent_workers=False,
            )
        student.train()
        if cfg.model.freeze_bn:
            freeze_batchnorm(student)
        for stage in frozen_stage_modules(student, cfg.model.frozen_stages):
            stage.eval()
        sums: dict[str, torch.Tensor] = {}
        seen, steps, t0 = 0, 0, time.perf_counter()
        first_bad = torch.tensor(-1, device=device)
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
            leave=False,
            disable=not (progress and main_process),
        )
        for batch in loader:
            if steps >= steps_per_epoch:
                break
            # a batch whose every image was unreadable is skipped, by all ranks together under DDP
            if not dist_utils.all_ranks_true(batch is not None, device):
                continue
            images, labels, index = batch
            # one tensor (the teacher sees the student's images) or [student views, teacher views]
            views = [images] if isinstance(images, torch.Tensor) else images
            try:
                terms = step(views[0], views[-1], index, labels if monitor_labels else None)
            except (RuntimeError, ValueError):  # e.g. a decomposition failing on weights a NaN step ruined
                _raise_if_nonfinite(first_bad, epoch, sums, out_dir)
                raise
            # no host sync per step: a non-finite loss is noted on the device and raised below
            first_bad = torch.where(~torch.isfinite(terms["loss"]) & (first_bad < 0), steps, first_bad)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value
            seen += int(index.numel()) * world
            steps += 1
            bar.update(1)
            faults.reached("step")
            if steps % NONFINITE_CHECK_EVERY == 0 or steps >= steps_per_epoch:
                _raise_if_nonfinite(first_bad, epoch, sums, out_dir)
        bar.close()
        _raise_if_nonfinite(first_bad, epoch, sums, out_dir)
        elapsed = time.perf_counter() - t0
        record: dict[str, Any] = {"epoch": epoch + 1}
        record.update({name: float(total) / max(steps, 1) for name, total in sums.items()})
        record["lr"] = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        record["images_per_second"] = seen / max(elapsed, 1e-9)
        record["seconds"] = elapsed
        metrics = None
        evaluate_now = test_set is not None and (
            (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs
        )
        if evaluate_now:
            metrics = evaluate_model(kept, test_set, cfg, device)
            record.update({key: value for key, value in metrics.items() if key.startswith("recall@")})
            record["map@r"] = metrics.get("map@r")
            if best_metrics is None or metrics["recall@1"] > best_metrics["recall@1"]:
                best_metrics, best_epoch = metrics, epoch + 1
                if main_process:
                    save_model(
                        out_dir / BEST_MODEL_FILE, _deployable(kept), _model_metadata(cfg, kept, epoch + 1, metrics)
                    )
        history.append(record)
        if main_process:
            _log_line(out_dir / LOG_FILE, record)
            save_model(out_dir / MODEL_FILE, _deployable(kept), _model_metadata(cfg, kept, epoch + 1, metrics))
            state = {
                "epoch": epoch,
                "config_json": json.dumps(cfg.to_dict()),
                "student": student.state_dict(),
                "teacher": teacher.state_dict(),
                "objective": objective.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "bank": bank.state_dict(),
                "rng": _rng_state(),
                "history_json": json.dumps(history),
                "start_metrics_json": json.dumps(start_metrics),
                "best_json": json.dumps({"epoch": best_epoch, "metrics": best_metrics}),
            }
            atomic_write_bytes(out_dir / STATE_FILE, _state_bytes(state))
            summary = " ".join(f"{key} {value:.4f}" for key, value in record.items() if key.startswith("loss"))
            r1 = f" R@1 {100 * metrics['recall@1']:.2f}" if metrics else ""
            print(f"epoch {epoch + 1}/{cfg.train.epochs}: {summary}{r1} ({record['images_per_second']:.0f} img/s)")
        dist_utils.barrier()

    final_metrics = None
    finished = bool(history) and history[-1]["epoch"] == cfg.train.epochs
    if finished and test_set is not None and "recall@1" in history[-1]:
        final_metrics = {
            key: value for key, value in history[-1].items() if key.startswith("recall@") or key == "map@r"
        }
    if main_process and history:
        plot_history(history, out_dir, start_metrics)
        atomic_write_json(
            out_dir / "summary.json",
            {
                "start": start_metrics,
                "final": final_metrics,
                "best": best_metrics,
                "best_epoch": best_epoch,
                "epochs": cfg.train.epochs,
                **_skipped_summary(skipped_images, test_set),
            },
        )
    return TrainResult(out_dir, history, start_metrics, final_metrics, best_metrics, best_epoch, skipped_images)


def _skipped_summary(skipped_images: list[str], test_set: Any) -> dict[str, list[str]]:
    """The summary's record of unreadable images: training images (left out of the bank and the
    sampler) and test images (left out of the evaluation)."""
    test_skipped = [test_set.describe(i) for i in test_set.unreadable] if test_set is not None else []
    return {"skipped_images": skipped_images, "skipped_test_images": test_skipped}


def _state_mismatch(out_dir: Path, err: BaseException) -> ValueError:
    detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return ValueError(
        f"{out_dir / STATE_FILE} does not fit this run's networks, bank and optimiser ({detail}): "
        "not a state of this run"
    )


def _readable_items(bank: MemoryBank, train_set: Any, cfg: Config) -> tuple[torch.Tensor | None, list[str]]:
    """The bank rows filled by the first full pass (None when every image was readable) and the
    paths of the images that were not; those are marked unreadable so no loader decodes them again.

    Raises:
        ValueError: too few readable images remain for one batch.
    """
    missing = (~bank.filled).nonzero().flatten().cpu()
    if missing.numel() == 0:
        return None, []
    train_set.mark_unreadable(missing.tolist())
    readable = bank.filled.nonzero().flatten()
    needed = max(cfg.train.batch_size, cfg.train.neighbours_per_seed + 1)
    if readable.numel() < needed:
        raise ValueError(
            f"only {readable.numel()} of {bank.num_items} training images are readable; train.batch_size "
            f"({cfg.train.batch_size}) needs at least {needed}"
        )
    skipped = [train_set.describe(int(i)) for i in missing.tolist()]
    if dist_utils.is_main_process():
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"skipping {len(skipped)} unreadable training image(s) for the whole run: {shown}")
    return readable, skipped


def _deployable(model: nn.Module) -> nn.Module:
    """What a model checkpoint holds: the embedding network alone (STML's auxiliary head is dropped)."""
    return model.embedding_model() if hasattr(model, "embedding_model") else model


def _as_tuple(output: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return output if isinstance(output, tuple) else (output,)


@torch.no_grad()
def label_correlation(similarity: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over pairs i < j of ``s_ij`` with ``1[y_i = y_j]`` (slide 14), on the device.

    Monitoring only (no host sync); 0 when either side is constant over the pairs.
    """
    b = similarity.shape[0]
    upper = torch.triu(torch.ones(b, b, dtype=torch.bool, device=similarity.device), diagonal=1)
    s = similarity[upper].double()
    same = (labels[:, None] == labels[None, :])[upper].double()
    s, same = s - s.mean(), same - same.mean()
    denominator = (s.square().sum() * same.square().sum()).sqrt()
    return torch.where(denominator > 0, (s * same).sum() / denominator.clamp_min(1e-300), 0.0).float()


def _pooled_features(
    model: nn.Module, dataset: ImageDataset | CachedImages, cfg: Config, device: torch.device
) -> torch.Tensor:
    """Pooled backbone features of a data set (for the PCA initialisation of the embedding layer)."""

    class _Pooled(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner.pooled_features(x)

    feats, _, _ = embed_source(_Pooled(model), dataset, cfg, device)
    return feats.to(device)


def _log_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON record; a line cut short by a crash is dropped on resume (the log is rebuilt
    from the training state)."""
    line = json.dumps(record) + "\n"
    with open(path, "a") as handle:
        handle.write(line[: len(line) // 2])
        handle.flush()
        faults.reached(f"write:{path.name}")
        handle.write(line[len(line) // 2 :])


def plot_history(history: list[dict[str, Any]], out_dir: Path, start: dict[str, Any] | None) -> None:
    """Write ``losses.png`` (each loss term per epoch) and ``recall.png`` (R@1 per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def finish(fig: Any, ax: Any, ylabel: str, name: str) -> None:
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write_figure(fig, out_dir / name)

    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({k for r in history for k in r if k.startswith("loss")}):
        ax.plot(epochs, [r.get(key, float("nan")) for r in history], marker="o", label=key)
    finish(fig, ax, "loss", "losses.png")

    evaluated = [r for r in history if "recall@1" in r]
    if evaluated:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["epoch"] for r in evaluated]
        ys = [100 * r["recall@1"] for r in evaluated]
        if start is not None:
            xs, ys = [0, *xs], [100 * start["recall@1"], *ys]
            ax.axhline(100 * start["recall@1"], color="grey", linestyle="--", label="start")
        ax.plot(xs, ys, marker="o", label="R@1")
        finish(fig, ax, "Recall@1 (%)", "recall.png")
