"""The trainer: one readable loop in named stages, for every method of :mod:`plmetric.methods`.

In the spirit of DINO's training script (``train_dino``):

* **data**: the training split (its teacher may see its own view, ``train.teacher_view``), the
  deterministic copy the memory bank embeds, the labelled test split; PIL decoding in DataLoader
  workers, or a uint8 cache decoded once and augmented on the device (``data.pipeline``);
* **networks**: the student (wrapped by the method, e.g. STML's second head; the embedding layer
  PCA-initialised on request), its EMA teacher, DDP and ``torch.compile`` wrappers;
* **bank and batches**: the teacher's embeddings of every readable training image (a full
  re-embedding every ``train.bank_refresh_every`` epochs) and batches of B/k seeds each with its
  k-1 nearest neighbours; or class-balanced batches for a method that trains with labels;
* **objective and optimiser**: the method's objective, AdamW, cosine schedule with warm-up;
* **the epochs**: :func:`train_one_epoch` (:class:`TrainStep` per batch; nothing waits for the
  device), then :func:`evaluate_and_save` (test metrics, the best epoch, model checkpoints, the
  resumable :class:`~plmetric.training.runs.TrainingState`, the log line).

The stages that set the run up (data, networks, bank and batches) are in :mod:`plmetric.training.stages`;
this module runs them, then the epochs.

Multi-GPU / multi-node: launch with ``torchrun``; each rank takes a slice of the same global
batch, embeddings are gathered so every rank computes the one-process loss, the bank is kept
identical on every rank, and rank 0 alone writes files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from plmetric.core import distributed as dist_utils
from plmetric.core import faults
from plmetric.core.checkpoint import save_model
from plmetric.config.schema import Config, save_config
from plmetric.data.datasets import DatasetSplits, collate_skip_none
from plmetric.core.devices import resolve_device
from plmetric.methods import get_method
from plmetric.methods.base import Method, Objective, StepInputs
from plmetric.training.networks import freeze_batchnorm, frozen_stage_modules
from plmetric.training.cached import CACHED_MODES, CachedTraining, build_cached_training, resolve_mode
from plmetric.training.optimization import build_optimizer, build_scheduler
from plmetric.training.passes import embed_source, evaluate_model, loader_workers
from plmetric.training.runs import (
    BEST_MODEL_FILE,
    CONFIG_FILE,
    LOG_FILE,
    MODEL_FILE,
    SELECTED_MODEL_FILE,
    STATE_FILE,
    SUMMARY_FILE,
    TrainingState,
    append_log,
    check_run_folder,
    clear_run_folder,
    load_training_state,
    model_metadata,
    plot_history,
    restart_line,
    seed_everything,
    skipped_summary,
    stopped_before_first_epoch,
    write_summary,
)
from plmetric.training.sampling import MemoryBank, ema_update
from plmetric.training.stages import (
    Batches,
    Networks,
    TrainData,
    build_batches,
    build_data,
    build_networks,
    check_training_sizes,
    frozen_stages,
    wrap_for_step,
)
from plmetric.evaluation.selection import selection_criteria
from plmetric.core.validation import value_checks

__all__ = ["NonFiniteLossError", "TrainResult", "TrainStep", "label_correlation", "train"]

NONFINITE_CHECK_EVERY = 50  # steps between the (synchronising) checks of the device-side NaN flag


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
    selected_epoch: int | None = None  # the label-free pick (train.select; 0 = the start)
    selected_metrics: dict[str, Any] | None = None  # its test metrics (None without a test split)
    selection_start: dict[str, float] | None = None  # the selection criteria of the start (epoch 0)
    selected_score: float | None = None  # selection_criterion(train.select) at the pick
    change: dict[str, Any] | None = None  # what training changed (training.report; rank 0, finished runs)


# ============================================================================ one step


class TrainStep:
    """One optimisation step of the loop, shared with ``benchmarks/throughput.py``.

    Teacher forward (no gradient) on the teacher's views when the method uses a teacher, student
    forward on the student's views (bf16 autocast on CUDA), gathering across ranks, the objective
    (:class:`~plmetric.methods.base.StepInputs` in, terms out), backward, AdamW, schedule,
    ``objective.after_step``, EMA update of the teacher and the memory-bank update. Nothing in it
    waits for the device: the returned terms stay on the device.
    """

    def __init__(
        self,
        cfg: Config,
        method: Method,
        student: nn.Module,
        ddp_student: nn.Module,
        teacher: nn.Module,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        bank: MemoryBank | None,
        device: torch.device,
        teacher_forward: nn.Module | None = None,
    ) -> None:
        self.cfg, self.method, self.device = cfg, method, device
        self.student, self.ddp_student, self.teacher = student, ddp_student, teacher
        self.objective, self.optimizer, self.scheduler, self.bank = objective, optimizer, scheduler, bank
        self.use_bf16 = cfg.train.bf16 and device.type == "cuda"
        cuda_channels_last = device.type == "cuda" and cfg.train.channels_last
        self.memory_format = torch.channels_last if cuda_channels_last else torch.preserve_format
        self.objective_params = list(objective.parameters())
        self.teacher_forward = teacher if teacher_forward is None else teacher_forward  # e.g. torch.compile(teacher)

    def __call__(
        self,
        student_images: torch.Tensor,
        teacher_images: torch.Tensor,
        index: torch.Tensor,
        labels: torch.Tensor | None = None,
        progress: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run one step. ``labels`` reach the objective only for a method that trains with them;
        otherwise they only monitor the targets (``target_label_correlation``); ``progress`` (the
        fraction of training done) reaches every objective. Returns detached terms."""
        device, method = self.device, self.method
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
                teacher_out = method.teacher_heads(self.teacher_forward, teacher_images) if method.uses_teacher else ()
            student_out = method.heads(self.ddp_student, student_images)
        teacher_all = tuple(dist_utils.all_gather_variable(t.float()) for t in teacher_out)
        student_all = tuple(dist_utils.all_gather_with_grad(t.float()) for t in student_out)
        index_all = dist_utils.all_gather_variable(index)
        labels_all = None if labels is None else dist_utils.all_gather_variable(labels.to(device, non_blocking=True))
        inputs = StepInputs(student_all, teacher_all, labels_all if method.uses_labels else None, progress)
        terms = self.objective(inputs)
        if labels_all is not None and self.objective.last_similarity is not None:  # labels watch the targets
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
        if self.bank is not None and teacher_all:
            self.bank.update(index_all, teacher_all[method.bank_head].detach())
        return {name: value.detach() for name, value in terms.items()}


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


@dataclass
class Run:
    """Everything the epochs work with."""

    cfg: Config
    method: Method
    data: TrainData
    nets: Networks
    batches: Batches
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: TrainStep
    device: torch.device
    out_dir: Path
    progress: bool = False  # progress bars with a rate on the passes (rank 0)

    def parts(self) -> dict[str, Any]:
        """What a training state saves and restores, by name (the state file's layout)."""
        return {
            "student": self.nets.student,
            "teacher": self.nets.teacher,
            "objective": self.objective,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "bank": self.batches.bank,
        }


def train_one_epoch(run: Run, epoch: int, progress: bool) -> dict[str, Any]:
    """Train one epoch and return its log record (mean of every term over the steps, learning
    rates, the steps, images per second); a non-finite loss raises :class:`NonFiniteLossError`."""
    from tqdm import tqdm  # not tqdm.auto: its asyncio tqdm calls iter(loader), a 2nd worker pool

    cfg, nets, batches, device = run.cfg, run.nets, run.batches, run.device
    batches.start_epoch(cfg, epoch, nets, run.data, device, progress=progress)
    loader = _epoch_loader(run)
    nets.student.train()
    if cfg.model.freeze_bn:
        freeze_batchnorm(nets.student)
    for stage in frozen_stage_modules(nets.student, frozen_stages(cfg, run.data)):
        stage.eval()
    monitor_labels = run.data.labelled
    sums: dict[str, torch.Tensor] = {}
    seen, steps, t0 = 0, 0, time.perf_counter()
    first_bad = torch.tensor(-1, device=device)
    main = dist_utils.is_main_process()
    bar = tqdm(
        total=batches.steps_per_epoch,
        desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
        leave=False,
        disable=not (progress and main),
    )
    for batch in loader:
        if steps >= batches.steps_per_epoch:
            break
        # a batch whose every image was unreadable is skipped, by all ranks together under DDP
        if not dist_utils.all_ranks_true(batch is not None, device):
            continue
        images, labels, index = batch
        views = [images] if isinstance(images, torch.Tensor) else images  # [student views, teacher views]
        try:
            progress_done = (epoch + steps / batches.steps_per_epoch) / cfg.train.epochs
            terms = run.step(views[0], views[-1], index, labels if monitor_labels else None, progress_done)
        except (RuntimeError, ValueError):  # e.g. a decomposition failing on weights a NaN step ruined
            _raise_if_nonfinite(first_bad, epoch, sums, run.out_dir)
            raise
        # no host sync per step: a non-finite loss is noted on the device and raised below
        first_bad = torch.where(~torch.isfinite(terms["loss"]) & (first_bad < 0), steps, first_bad)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value
        seen += int(index.numel()) * dist_utils.world_size()
        steps += 1
        bar.update(1)
        faults.reached("step")
        if steps % NONFINITE_CHECK_EVERY == 0 or steps >= batches.steps_per_epoch:
            _raise_if_nonfinite(first_bad, epoch, sums, run.out_dir)
    bar.close()
    _raise_if_nonfinite(first_bad, epoch, sums, run.out_dir)
    elapsed = time.perf_counter() - t0
    record: dict[str, Any] = {"epoch": epoch + 1}
    record.update({name: float(total) / max(steps, 1) for name, total in sums.items()})
    record["lr"] = {g.get("name", str(i)): g["lr"] for i, g in enumerate(run.optimizer.param_groups)}
    record["steps"] = steps  # optimiser steps of the epoch (train.min_steps' floor included)
    record["images_per_second"] = seen / max(elapsed, 1e-9)
    record["seconds"] = elapsed
    return record


def _epoch_loader(run: Run) -> Any:
    """The epoch's batches: from the device cache (decoded once, cropped and flipped on the device,
    prefetched by a thread) or through PIL in DataLoader workers."""
    from plmetric.data.pipeline import CachedBatchLoader

    cached, sampler, device = run.data.cached, run.batches.sampler, run.device
    if cached is not None:
        return CachedBatchLoader(
            cached.cache, sampler, cached.train_augment, device, teacher_augment=cached.teacher_augment
        )
    return DataLoader(
        run.data.train_set,
        batch_sampler=sampler,
        num_workers=loader_workers(run.cfg, run.data.train_set),
        collate_fn=collate_skip_none,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def evaluate_and_save(run: Run, state: TrainingState, epoch: int, record: dict[str, Any]) -> None:
    """Evaluate on the test split when due, keep the best epoch, then (rank 0) write the log line,
    the model, the training state, and print the epoch's line."""
    cfg, kept, out_dir = run.cfg, run.nets.kept, run.out_dir
    main = dist_utils.is_main_process()
    metrics = None
    due = (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs
    if run.data.test_set is not None and due:
        metrics = evaluate_model(kept, run.data.test_set, cfg, run.device, progress=run.progress)
        record.update({key: value for key, value in metrics.items() if key.startswith("recall@")})
        record["map@r"] = metrics.get("map@r")
        if state.record_best(epoch + 1, metrics) and main:
            save_model(
                out_dir / BEST_MODEL_FILE,
                run.nets.deployable(run.method, kept),
                model_metadata(cfg, kept, epoch + 1, metrics),
            )
    select_epoch(run, state, epoch + 1, record, metrics)
    state.history.append(record)
    state.next_epoch = epoch + 1
    if main:
        append_log(out_dir / LOG_FILE, record)
        save_model(
            out_dir / MODEL_FILE, run.nets.deployable(run.method, kept), model_metadata(cfg, kept, epoch + 1, metrics)
        )
        state.save(out_dir / STATE_FILE, cfg, run.parts())
        losses = " ".join(f"{key} {value:.4f}" for key, value in record.items() if key.startswith("loss"))
        r1 = f" R@1 {100 * metrics['recall@1']:.2f}" if metrics else ""
        print(f"epoch {epoch + 1}/{cfg.train.epochs}: {losses}{r1} ({record['images_per_second']:.0f} img/s)")
    dist_utils.barrier()


def start_selection(
    cfg: Config,
    method: Method,
    nets: Networks,
    data: TrainData,
    batches: Batches | None,
    state: TrainingState,
    device: torch.device,
    out_dir: Path,
    progress: bool = False,
) -> None:
    """Fix the subset of training images the label-free criteria are computed on, embed it with the
    start, and make the start the first candidate (epoch 0, saved as ``selected.safetensors``)."""
    rows = batches.readable_rows if batches is not None else None
    rows = torch.arange(len(data.train_set)) if rows is None else rows.cpu()
    generator = torch.Generator().manual_seed(cfg.train.seed)
    items = rows[torch.randperm(rows.numel(), generator=generator)[: cfg.train.select_images]].sort().values
    bar = "selection (start)" if progress else None
    start, _, index = embed_source(nets.kept, data.bank_set, cfg, device, indices=items.tolist(), progress=bar)
    state.selection_items, state.selection_start, state.selection_kept = index, start, start
    rule = cfg.train.select
    state.selection_start_criteria = selection_criteria(start, start, k=cfg.train.select_k)
    score = state.selection_start_criteria[selection_criterion(rule)]
    state.record_selected(0, score, state.start_metrics, rule)
    if dist_utils.is_main_process():
        model = nets.deployable(method, nets.kept)
        save_model(out_dir / SELECTED_MODEL_FILE, model, model_metadata(cfg, nets.kept, 0, state.start_metrics))


def select_epoch(
    run: Run, state: TrainingState, epoch: int, record: dict[str, Any], metrics: dict[str, Any] | None
) -> None:
    """Compute the label-free criteria of the epoch on the training subset, log them, and keep the
    epoch as ``selected.safetensors`` when the rule (``train.select``) prefers it."""
    cfg, nets = run.cfg, run.nets
    items = state.selection_items.tolist()
    bar = "selection" if run.progress else None
    kept, _, _ = embed_source(nets.kept, run.data.bank_set, cfg, run.device, indices=items, progress=bar)
    student = None
    if nets.kept is not nets.student:
        student, _, _ = embed_source(nets.student, run.data.bank_set, cfg, run.device, indices=items, progress=bar)
    criteria = selection_criteria(kept, state.selection_start, student, k=cfg.train.select_k)
    record["selection"] = criteria
    rule = cfg.train.select
    selected = state.record_selected(epoch, criteria[selection_criterion(rule)], metrics, rule)
    if selected:
        state.selection_kept = kept
    if selected and dist_utils.is_main_process():
        model = nets.deployable(run.method, nets.kept)
        save_model(run.out_dir / SELECTED_MODEL_FILE, model, model_metadata(cfg, nets.kept, epoch, metrics))


def _raise_if_nonfinite(first_bad: torch.Tensor, epoch: int, sums: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Raise `NonFiniteLossError` when the device-side flag recorded a non-finite loss (one host sync)."""
    bad_step = int(first_bad)
    if bad_step >= 0:
        raise NonFiniteLossError(
            f"the loss became non-finite at epoch {epoch + 1}, step {bad_step + 1} "
            f"(running sums: { {name: float(v) for name, v in sums.items()} }); "
            f"the last good checkpoint is in {out_dir}"
        )


# ============================================================================ the run

DEFAULT_CRITERION = "mutual_knn"  # the label-free criterion reported when train.select keeps the final epoch


def selection_criterion(rule: str) -> str:
    """The label-free criterion a run records for its selected epoch (``selected_score``): the one
    ``train.select`` maximises, or :data:`DEFAULT_CRITERION` when the rule keeps the final epoch."""
    return DEFAULT_CRITERION if rule == "final" else rule


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
    """Train an embedding with ``cfg.train.method`` (labels, when present, are used for evaluation
    only, except by a method that trains with them: the supervised ceiling).

    Args:
        cfg: The run's configuration (validated here before any work starts).
        out_dir: Run folder (:mod:`plmetric.training.runs`).
        resume: Continue from ``out_dir/state.pt`` exactly where it stopped (the log is cut back
            to the state's epoch); with a larger ``cfg.train.epochs``, extend a finished run. A run
            with no state yet starts again; in a cached mode its caching pass resumes: the chunks of
            views already in ``out_dir/view-cache`` are checked and kept, only the rest is computed
            (:mod:`plmetric.training.view_cache`), and a resume after some epochs reuses them all.
        splits: Data sets to use instead of loading ``cfg.data`` (tests, notebooks).
        model: Student network to use instead of ``create_model(cfg.model...)``; it must have
            ``backbone`` and ``embedding`` sub-modules and return L2-normalised embeddings.
        progress: Show tqdm progress bars (rank 0).
        stop_after_epochs: Stop (resumably) after this many epochs of this invocation, e.g. to fit
            a job's time limit; ``resume=True`` later continues exactly.
        overwrite: Replace a run already in ``out_dir`` (without it, such a folder is refused, a run
            stopped while caching included); cached views that still fit are reused.

    Returns:
        The per-epoch history and the metrics of the start, the final and the best epoch.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if resume and stopped_before_first_epoch(out_dir):
        # nothing was finished (no state, at most the first epoch's files): there is nothing to continue
        # but a cached mode's views, which the new start reuses (plmetric.training.view_cache)
        if dist_utils.is_main_process():
            print(restart_line(out_dir))
        resume, overwrite = False, True
    raw_state = load_training_state(out_dir / STATE_FILE, cfg) if resume else None
    check_run_folder(out_dir, resume=resume, overwrite=overwrite)
    device = resolve_device(cfg.train.device, option="train.device")
    group_created_here = dist_utils.init_from_env(str(device))
    try:
        # value checks (finiteness, index ranges) would cost a host sync per call; the loop checks its loss
        with value_checks(False):
            cached = None
            mode = resolve_mode(cfg, device)
            if dist_utils.is_main_process() and cfg.train.mode == "auto":
                print(f"train.mode=auto: {mode} ({'a GPU' if device.type == 'cuda' else 'no GPU'}; "
                      "change with --set train.mode=end_to_end|head|tail)")
            started = False
            if mode in CACHED_MODES and splits is None and model is None:

                def listed(num_images: int) -> None:  # the data listed; before the probe and the caching pass
                    nonlocal started
                    check_training_sizes(cfg, get_method(cfg.train.method)(cfg), num_images)
                    if raw_state is None and dist_utils.is_main_process():
                        start_run_folder(cfg, out_dir, caching=True)  # the run exists from here
                    started = raw_state is None

                cached = build_cached_training(cfg, device, progress, mode, out_dir=out_dir, listed=listed)
                splits, model = cached.splits, cached.student
            return _train(
                cfg, out_dir, raw_state, splits, model, progress, stop_after_epochs, device, cached, started=started
            )
    finally:
        if group_created_here:
            torch.distributed.destroy_process_group()


def _train(
    cfg: Config,
    out_dir: Path,
    raw_state: dict[str, Any] | None,
    splits: DatasetSplits | None,
    model: nn.Module | None,
    progress: bool,
    stop_after_epochs: int | None,
    device: torch.device,
    cached: CachedTraining | None = None,
    started: bool = False,
) -> TrainResult:
    main = dist_utils.is_main_process()
    seed_everything(cfg.train.seed)
    method = get_method(cfg.train.method)(cfg)
    if not method.trains:
        raw_state = None  # nothing to resume: the start is evaluated again

    # ---------------------------------------------------------------- data, networks, bank, batches
    data = build_data(cfg, splits, device, method, announce=main and splits is None)
    image_model = cached.image_model if cached is not None else None
    nets = build_networks(
        cfg, method, model, data, device, fresh=raw_state is None, image_model=image_model, progress=progress
    )
    batches = build_batches(cfg, method, nets, data, device, raw_state, out_dir, progress) if method.trains else None

    # ---------------------------------------------------------------- objective, optimiser, schedule
    run = _build_run(cfg, method, data, nets, batches, device, out_dir, progress) if method.trains else None

    # ---------------------------------------------------------------- resume, or start the folder
    if raw_state is not None:
        state = TrainingState.restore(raw_state, run.parts() | {"bank": None}, out_dir / STATE_FILE)
        if main:
            clear_run_folder(out_dir, replace=False)
            state.rewrite_log(out_dir)  # records after the state (cut short by a crash) are dropped
            save_config(cfg, out_dir / CONFIG_FILE)  # an extended run records its new length
            print(f"resuming {out_dir} after epoch {state.next_epoch}")
    else:
        state = TrainingState()
        if main and not started:  # the run's first file: only now is a replaced run (--overwrite) removed
            start_run_folder(cfg, out_dir)
    if data.test_set is not None and state.start_metrics is None:
        state.start_metrics = evaluate_model(nets.teacher, data.test_set, cfg, device, progress=progress)
        if main:
            print(f"start: R@1 {100 * state.start_metrics['recall@1']:.2f}")
    if not method.trains:
        return _report_start(cfg, method, nets, data, state, out_dir, cached.skipped_images if cached else [])
    if state.selection_items is None:
        start_selection(cfg, method, nets, data, batches, state, device, out_dir, progress)

    # ---------------------------------------------------------------- the epochs
    end = cfg.train.epochs if stop_after_epochs is None else min(cfg.train.epochs, state.next_epoch + stop_after_epochs)
    for epoch in range(state.next_epoch, end):
        record = train_one_epoch(run, epoch, progress)
        evaluate_and_save(run, state, epoch, record)
    skipped = (cached.skipped_images if cached is not None else []) + batches.skipped_images
    return _finish(cfg, state, data, skipped, out_dir)


def start_run_folder(cfg: Config, out_dir: Path, caching: bool = False) -> None:
    """Start a fresh run in ``out_dir`` (rank 0): remove a replaced run's files (``--overwrite``; the
    cached views stay, each reused only where it still fits), write ``config.yaml`` and, for a cached
    mode, ``caching.json`` (the caching pass has started; nothing done yet)."""
    from plmetric.training.runs import write_caching_progress

    clear_run_folder(out_dir, replace=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / CONFIG_FILE)
    if caching:
        write_caching_progress(out_dir, "caching", {})


def _build_run(
    cfg: Config,
    method: Method,
    data: TrainData,
    nets: Networks,
    batches: Batches,
    device: torch.device,
    out_dir: Path,
    progress: bool = False,
) -> Run:
    """The method's objective (proxies placed on the bank's embeddings), AdamW, the schedule, the
    DDP/compile wrappers and the step."""
    init = None
    if batches.bank is not None:
        rows = batches.readable_rows
        init = batches.bank.embeddings if rows is None else batches.bank.embeddings[rows]
    objective = method.build_objective(nets.dim, init, torch.Generator().manual_seed(cfg.train.seed)).to(device)
    optimizer = build_optimizer(cfg.train, nets.student, objective)
    scheduler = build_scheduler(cfg.train, optimizer, batches.steps_per_epoch)
    wrap_for_step(cfg, nets, device)
    step = TrainStep(
        cfg,
        method,
        nets.student,
        nets.ddp_student,
        nets.teacher,
        objective,
        optimizer,
        scheduler,
        batches.bank,
        device,
        nets.teacher_forward,
    )
    return Run(cfg, method, data, nets, batches, objective, optimizer, scheduler, step, device, out_dir, progress)


def _report_start(
    cfg: Config,
    method: Method,
    nets: Networks,
    data: TrainData,
    state: TrainingState,
    out_dir: Path,
    skipped_before: list[str],
) -> TrainResult:
    """A method that does not train: the start is the final and the best, saved as the model."""
    start = state.start_metrics
    skipped = skipped_before + [data.train_set.describe(i) for i in data.train_set.unreadable]
    if dist_utils.is_main_process():
        model = nets.deployable(method, nets.student)
        save_model(out_dir / MODEL_FILE, model, model_metadata(cfg, nets.student, 0, start))
        summary = {"start": start, "final": start, "best": start, "best_epoch": None if start is None else 0}
        summary.update(epochs=0, selected=start, selected_epoch=0, select_rule=cfg.train.select)
        write_summary(out_dir / SUMMARY_FILE, {**summary, **skipped_summary(skipped, data.test_set)})
    return TrainResult(out_dir, [], start, start, start, 0, skipped, 0, start)


def change_report(cfg: Config, state: TrainingState, data: TrainData, out_dir: Path) -> dict[str, Any] | None:
    """What training changed, on the label-free criteria's images: the criterion (``train.select``, or
    ``mutual_knn`` when the rule keeps the final epoch) of the start and of the kept model, the share
    of each image's 10 nearest neighbours that changed, and ``report.html``/``report.png`` (a few
    random queries' top 8 before and after); None when the state holds no embeddings of the kept
    model (a run resumed from an older state)."""
    from plmetric.training.report import write_change_report

    if state.selection_kept is None or state.selection_start is None or not state.history:
        return None
    rule, epoch = cfg.train.select, state.selected_epoch
    criterion = selection_criterion(rule)
    kept_score = state.history[-1]["selection"][criterion] if rule == "final" else float(state.selected_score)
    items = state.selection_items.tolist()
    paths = [data.train_set.describe(i) for i in items]
    if rule == "final":
        label = f"the last epoch ({epoch} of {cfg.train.epochs}; train.select=final)"
    elif not epoch:
        label = f"the untrained start, picked without labels by {rule}"
    else:
        label = f"epoch {epoch} of {cfg.train.epochs}, picked without labels by {rule}"
    return write_change_report(
        out_dir,
        paths,
        state.selection_start,
        state.selection_kept,
        criterion=criterion,
        start_score=state.selection_start_criteria[criterion],
        kept_score=kept_score,
        kept_label=label,
        k=cfg.train.select_k,
        seed=cfg.train.seed,
    )


def _finish(cfg: Config, state: TrainingState, data: TrainData, skipped: list[str], out_dir: Path) -> TrainResult:
    """The final epoch's metrics (None before the last epoch), the plots and ``summary.json``."""
    history = state.history
    final = change = None
    if history and history[-1]["epoch"] == cfg.train.epochs and data.test_set is not None and "recall@1" in history[-1]:
        final = {key: value for key, value in history[-1].items() if key.startswith("recall@") or key == "map@r"}
    if dist_utils.is_main_process() and history:
        plot_history(history, out_dir, state.start_metrics)
        summary = {  # the fields: plmetric.training.runs.write_summary (None: left out)
            "start": state.start_metrics,
            "final": final,
            "best": state.best_metrics,
            "best_epoch": state.best_epoch,
            "selected": state.selected_metrics,
            "selected_epoch": state.selected_epoch,
            "select_rule": cfg.train.select,
            "selection_start": state.selection_start_criteria,
            "selected_criterion": selection_criterion(cfg.train.select),
            "selected_score": state.selected_score,  # the criterion's value at the selected epoch
            "final_selection": history[-1].get("selection"),  # every criterion at the last epoch
            "epochs": cfg.train.epochs,
        }
        if history[-1]["epoch"] == cfg.train.epochs:
            change = summary["change"] = change_report(cfg, state, data, out_dir)
        write_summary(out_dir / SUMMARY_FILE, {**summary, **skipped_summary(skipped, data.test_set)})
    return TrainResult(
        out_dir,
        history,
        state.start_metrics,
        final,
        state.best_metrics,
        state.best_epoch,
        skipped,
        state.selected_epoch,
        state.selected_metrics,
        state.selection_start_criteria,
        state.selected_score,
        change,
    )
