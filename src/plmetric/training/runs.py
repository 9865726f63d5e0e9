"""The run folder and the training state: what a run writes, how it resumes, what it refuses.

A run folder holds ``config.yaml``, ``log.jsonl`` (one JSON record per epoch), ``state.pt`` (the
full training state, for an exact ``--resume``), ``model.safetensors`` (the kept network after the
last epoch), ``best.safetensors`` (after the best evaluated epoch), ``summary.json`` and plots.
Every file is written atomically. A folder that holds a run is never started over without
``overwrite``; resuming cuts the log back to the state and removes what an interrupted write left.

A cached mode (``train.mode=head|tail``) starts its folder before the caching pass: ``config.yaml``
and ``caching.json`` (the stage, ``caching`` then ``cached``, and per split the chunks and images
done so far, rewritten after each chunk), then the views in ``view-cache/``
(:mod:`plmetric.training.view_cache`). A run stopped while caching is a run like any other: ``train``
without ``--resume`` refuses the folder, ``--resume`` keeps the chunks done and computes the rest.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from plmetric.core import distributed as dist_utils
from plmetric.core import faults
from plmetric.core.checkpoint import atomic_write_bytes, atomic_write_figure, atomic_write_json
from plmetric.config.schema import Config

__all__ = [
    "BEST_MODEL_FILE",
    "CACHING_FILE",
    "CONFIG_FILE",
    "LOG_FILE",
    "MODEL_FILE",
    "RESUMABLE_KEYS",
    "SELECTED_MODEL_FILE",
    "STATE_FILE",
    "SUMMARY_FILE",
    "TrainingState",
    "check_run_folder",
    "caching_progress",
    "clear_run_folder",
    "existing_run",
    "interrupted_line",
    "load_training_state",
    "model_metadata",
    "plot_history",
    "restart_line",
    "seed_everything",
    "stopped_before_first_epoch",
    "write_caching_progress",
    "write_summary",
]

STATE_FILE = "state.pt"
MODEL_FILE = "model.safetensors"
BEST_MODEL_FILE = "best.safetensors"
LOG_FILE = "log.jsonl"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
SELECTED_MODEL_FILE = "selected.safetensors"
CACHING_FILE = "caching.json"  # a cached mode's caching pass: started, what it has done


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
    except (TypeError, json.JSONDecodeError, RecursionError):
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


RUN_FILES = (
    CONFIG_FILE, CACHING_FILE, STATE_FILE, LOG_FILE, MODEL_FILE, BEST_MODEL_FILE, SELECTED_MODEL_FILE, SUMMARY_FILE
)


def write_caching_progress(out_dir: Path, stage: str, splits: Mapping[str, Mapping[str, int]]) -> None:
    """Write ``caching.json`` (atomically): ``stage`` (``caching`` or ``cached``), the chunk folder and,
    per split, ``images``, ``chunks``, ``chunks_done`` and ``images_done`` (the images the done chunks
    cover, readable or not)."""
    from plmetric.training.view_cache import CACHE_FOLDER

    atomic_write_json(out_dir / CACHING_FILE, {"stage": stage, "folder": CACHE_FOLDER, "splits": dict(splits)})


def caching_progress(out_dir: Path) -> dict[str, Any] | None:
    """What ``caching.json`` says, summed over the splits: ``stage``, ``chunks``, ``chunks_done``,
    ``images``, ``images_done``; None when there is no such file or it does not read as one."""
    try:
        record = json.loads((out_dir / CACHING_FILE).read_text())
        splits = record.get("splits") or {}
        total = {"stage": str(record["stage"])}
        for name in ("chunks", "chunks_done", "images", "images_done"):
            total[name] = sum(int(split[name]) for split in splits.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return total


def _caching_stopped(progress: dict[str, Any]) -> str:
    """``stopped while caching its views (k of n chunks kept, m of N images)``."""
    return (
        f"stopped while caching its views ({progress['chunks_done']} of {progress['chunks']} chunks kept, "
        f"{progress['images_done']} of {progress['images']} images)"
    )


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


def stopped_before_first_epoch(out_dir: Path) -> bool:
    """A run killed before its first training state was written: a config, no state, no summary,
    and at most the first epoch's model and log line (written just before that state)."""
    if not (out_dir / CONFIG_FILE).is_file() or (out_dir / STATE_FILE).exists() or (out_dir / SUMMARY_FILE).exists():
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
        progress = caching_progress(out_dir)
        if progress is not None and progress["stage"] == "caching" and not (out_dir / STATE_FILE).exists():
            raise FileExistsError(
                f"--out {out_dir} holds a run {_caching_stopped(progress)}: add --resume to continue it, "
                "or --overwrite to start it over (cached chunks that still fit are reused), or choose another --out"
            )
        epochs = f" (epoch {found['last_epoch']} logged)" if found["last_epoch"] else ""
        raise FileExistsError(
            f"--out {out_dir} already holds a training run{epochs}: add --resume to continue or extend it "
            "(--resume --set train.epochs=N), or --overwrite to replace it, or choose another --out"
        )


def restart_line(out_dir: Path) -> str:
    """What ``--resume`` does with a run that has no training state yet (:func:`stopped_before_first_epoch`)."""
    progress = caching_progress(out_dir)
    if progress is not None and progress["stage"] == "caching":
        return f"{out_dir} was {_caching_stopped(progress)}: continuing the caching, then training from the beginning"
    kept = " (its cached views are reused)" if progress is not None else ""
    return f"{out_dir} has no training state yet (stopped in its first epoch): starting it from the beginning{kept}"


def interrupted_line(out_dir: Path) -> str:
    """One line for an interrupted ``train``: what ``out_dir`` keeps and how to go on."""
    resume = f"continue with: plmetric train --out {out_dir} --resume"
    if not out_dir.is_dir() or existing_run(out_dir) is None:
        return f"nothing kept: {out_dir} holds no run yet (start it again)"
    epoch = None
    try:
        epoch = int(torch.load(out_dir / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)["epoch"]) + 1
    except Exception:  # noqa: BLE001 - no state, or one that does not read: say what the rest keeps
        pass
    progress = caching_progress(out_dir)
    if epoch is not None:
        return f"{out_dir} keeps the training state after epoch {epoch}; {resume}"
    if progress is not None and progress["stage"] == "caching":
        return f"{out_dir} keeps a run {_caching_stopped(progress)}; {resume} (the kept chunks are not computed again)"
    if progress is not None:
        return f"{out_dir} keeps its cached views but no finished epoch; {resume} (training starts from the beginning)"
    return f"{out_dir} keeps no finished epoch; {resume} (it starts from the beginning)"


def clear_run_folder(out_dir: Path, *, replace: bool) -> None:
    """Remove what an interrupted write left (stale temporaries) and, with ``replace``, the files of
    the run being replaced (``--overwrite``); rank 0 only."""
    from plmetric.core.checkpoint import remove_stale_temporaries

    if not out_dir.is_dir() or not dist_utils.is_main_process():
        return
    if replace:
        for name in (*RUN_FILES, "model.json", "best.json", "selected.json", "losses.png", "recall.png"):
            (out_dir / name).unlink(missing_ok=True)
    remove_stale_temporaries(out_dir)


def model_metadata(cfg: Config, model: nn.Module, epoch: int, metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON a model checkpoint carries: backbone, dimensions, image size and eval rule (``eval_resize``:
    every command embeds with it), epoch, metrics, config."""
    return {
        "backbone": cfg.model.backbone,
        "embedding_dim": cfg.model.embedding_dim,
        "output_dim": int(getattr(model, "embedding_dim", cfg.model.embedding_dim)),
        "image_size": cfg.data.image_size,
        "eval_resize": cfg.data.eval_resize,
        "epoch": epoch,
        "metrics": metrics,
        "config": cfg.to_dict(),
    }


def skipped_summary(skipped_images: list[str], test_set: Any) -> dict[str, list[str]]:
    """The summary's record of unreadable images: training images (left out of the bank and the
    sampler) and, with a test split, test images (left out of the evaluation)."""
    if test_set is None:
        return {"skipped_images": skipped_images}
    return {"skipped_images": skipped_images, "skipped_test_images": [test_set.describe(i) for i in test_set.unreadable]}


def write_summary(path: Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``summary.json`` (atomically) from ``fields``, leaving out every field the run cannot
    fill (``None``): a run without a labelled test split (a pile, ``train --images``) has no test
    metrics, and writes none rather than nulls. Returns what was written.

    The fields (each only when the run has it):

    * ``epochs``: ``train.epochs`` (0: a method that does not train).
    * ``start``, ``final``, ``best``: the labelled test split's retrieval metrics (``recall@K``,
      ``map@r``, ...) of the untrained start, of the last epoch (once it has run) and of the epoch
      with the best R@1 (an oracle: it reads the test labels); ``best_epoch``: that epoch (0: the start).
    * ``select_rule``: ``train.select``; ``selected_epoch``: the epoch it kept as
      ``selected.safetensors`` (0: the untrained start; ``final``: the last epoch run);
      ``selected``: that epoch's test metrics (with a test split, when that epoch was evaluated).
    * ``selected_criterion``: the label-free criterion (:mod:`plmetric.evaluation.selection`) the
      rule maximises, or ``mutual_knn`` when it keeps the final epoch; ``selected_score``: its value
      at the selected epoch, the value ``log.jsonl`` holds in that epoch's ``selection`` (the
      start's: ``selection_start``).
    * ``selection_start``: every label-free criterion of the start; ``final_selection``: every one
      at the last epoch run.
    * ``change``: what training changed (:func:`plmetric.training.report.write_change_report`:
      the criterion for the start and the kept model, the share of neighbours that changed); once
      the last epoch has run.
    * ``skipped_images``: unreadable training images, left out; ``skipped_test_images``: unreadable
      test images, left out of the evaluation (with a test split).
    """
    summary = {key: value for key, value in fields.items() if value is not None}
    atomic_write_json(path, summary)
    return summary


def state_mismatch(path: Path, err: BaseException) -> ValueError:
    """The error for a training state that does not fit the run it is loaded into."""
    detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return ValueError(
        f"{path} does not fit this run's networks, bank and optimiser ({detail}): not a state of this run"
    )


@dataclass
class TrainingState:
    """The bookkeeping of a run: the next epoch, the history and the metrics of the start and of
    the best evaluated epoch. :meth:`save` writes it with the parts of the run (networks, objective,
    optimiser, scheduler, bank: anything with ``state_dict``) and the RNG states; :meth:`restore`
    reads them back, so an interrupted run continues exactly.
    """

    next_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    start_metrics: dict[str, Any] | None = None
    best_epoch: int | None = None
    best_metrics: dict[str, Any] | None = None
    # label-free selection (plmetric.evaluation.selection): the epoch picked so far (0 = the start), its score
    # and its test metrics (None when not evaluated), the image subset and the start's embeddings of it
    selected_epoch: int | None = None
    selected_score: float | None = None
    selected_metrics: dict[str, Any] | None = None
    selection_items: torch.Tensor | None = None
    selection_start: torch.Tensor | None = None
    selection_kept: torch.Tensor | None = None  # the selected epoch's embeddings of the same images
    selection_start_criteria: dict[str, float] | None = None

    def record_best(self, epoch: int, metrics: dict[str, Any]) -> bool:
        """Keep ``metrics`` as the best when its R@1 beats the best so far; True when it does."""
        if self.best_metrics is None or metrics["recall@1"] > self.best_metrics["recall@1"]:
            self.best_metrics, self.best_epoch = metrics, epoch
            return True
        return False

    def record_selected(self, epoch: int, score: float, metrics: dict[str, Any] | None, rule: str) -> bool:
        """Keep ``epoch`` as the selected one when its ``score`` beats the selected so far (rule
        ``final``: every epoch replaces the last); True when it does."""
        if rule == "final" or self.selected_score is None or score > self.selected_score:
            self.selected_epoch, self.selected_score, self.selected_metrics = epoch, score, metrics
            return True
        return False

    def save(self, path: Path, cfg: Config, parts: Mapping[str, Any]) -> None:
        """Write the state after epoch ``next_epoch`` (atomically, rank 0's job)."""
        state = {
            "epoch": self.next_epoch - 1,
            "config_json": json.dumps(cfg.to_dict()),
            **{name: part.state_dict() if part is not None else {} for name, part in parts.items()},
            "rng": _rng_state(),
            "history_json": json.dumps(self.history),
            "start_metrics_json": json.dumps(self.start_metrics),
            "best_json": json.dumps({"epoch": self.best_epoch, "metrics": self.best_metrics}),
            "selected_json": json.dumps(
                {
                    "epoch": self.selected_epoch,
                    "score": self.selected_score,
                    "metrics": self.selected_metrics,
                    "start_criteria": self.selection_start_criteria,
                }
            ),
            "selection": {"items": self.selection_items, "start": self.selection_start, "kept": self.selection_kept}
            if self.selection_items is not None
            else {},
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def restore(cls, raw: dict[str, Any], parts: Mapping[str, Any], path: Path) -> TrainingState:
        """Load the parts' states and the RNG states from ``raw`` (:func:`load_training_state`).

        Raises:
            ValueError: the state does not fit these parts (shapes, keys).
        """
        try:
            for name, part in parts.items():
                if part is not None:
                    part.load_state_dict(raw[name])
            best = json.loads(raw["best_json"])
            selected = json.loads(raw.get("selected_json", "{}"))
            selection = raw.get("selection") or {}
            restored = cls(
                next_epoch=int(raw["epoch"]) + 1,
                history=json.loads(raw["history_json"]),
                start_metrics=json.loads(raw["start_metrics_json"]),
                best_epoch=best["epoch"],
                best_metrics=best["metrics"],
                selected_epoch=selected.get("epoch"),
                selected_score=selected.get("score"),
                selected_metrics=selected.get("metrics"),
                selection_items=selection.get("items"),
                selection_start=selection.get("start"),
                selection_kept=selection.get("kept"),
                selection_start_criteria=selected.get("start_criteria"),
            )
            _set_rng_state(raw["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise state_mismatch(path, err) from None
        return restored

    def rewrite_log(self, out_dir: Path) -> None:
        """Make ``log.jsonl`` hold exactly the history (records after the state, written before a
        crash cut the state's write short, are dropped)."""
        atomic_write_bytes(out_dir / LOG_FILE, "".join(json.dumps(r) + "\n" for r in self.history).encode())


def append_log(path: Path, record: dict[str, Any]) -> None:
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
