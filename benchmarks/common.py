"""Settings and bookkeeping shared by the studies (recipe_study.py, head_to_head.py).

Three development data sets in ``../shared/data`` (``--dataset``; each README there has the split):
``cub200`` (the CUB subset, 50 / 50 species), ``plankton106`` (NDSB plankton, a labelled folder,
53 / 53 classes) and ``cars98dev`` (Stanford Cars classes 1-98 only, 49 / 49; the benchmark's test
classes 99-196 are never seen). Settings:

* ``head``: head-only, the CPU setting that allows seeds and grids. Pooled EfficientNet-Lite0
  features of the un-augmented 224 px images are computed once and cached
  (``plmetric.studies.similarity.cached_features``); only the 512-d embedding layer (PCA-initialised)
  trains, 30 short epochs, about half a minute per run on two CPU cores. No augmentation, no
  backbone: the levers that move the backbone cannot be studied here.
* ``cpu``: end to end on the CPU: 128 px, the first 6 of 9 backbone stages frozen, 3 epochs
  (about 7 minutes per run on two cores).
* ``tail``: where the backbone learns on a CPU (issue 27): the last 3 backbone stages and the layer
  train on cached maps of 5 views at 224 px (whole images), 30 epochs, 9-13 minutes a run.
* ``gpu``: the full setting for one lent GPU call: 224 px, whole backbone, 20 epochs.

``--set data.eval_resize=center_crop|whole`` picks the clean views' rule in the cached settings (``head``:
``center_crop`` by default, ``tail``: ``whole``).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plmetric.config.schema import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # shared_data: where ../shared/data is (tests and benchmarks only)
from shared_data import cub_subset_root, shared_data_root  # noqa: E402

# --dataset -> (loader name, folder under ../shared/data)
DATASETS = {
    "cub200": ("cub200", "cub200_subset100"),
    "plankton106": ("folder", "plankton106"),
    "cars98dev": ("cars196", "cars98dev"),
}


def dataset_root(dataset: str, data_root: str | None = None) -> str:
    """The data set's folder: ``data_root`` when given, else ``../shared/data/<folder>``."""
    return data_root or str(shared_data_root() / DATASETS[dataset][1])


HEAD_SETTING = [
    "model.backbone=efficientnet_lite0",
    "model.embedding_dim=512",
    "model.embedding_init=pca",
    "data.num_workers=0",
    "train.epochs=30",
    "train.eval_every=1",
    "train.device=cpu",
    "train.eval_batch_size=1024",
]
CPU_SETTING = [
    "model.backbone=efficientnet_lite0",
    "model.embedding_dim=512",
    "model.embedding_init=pca",
    "model.frozen_stages=6",
    "data.image_size=128",
    "data.num_workers=2",
    "train.epochs=3",
    "train.eval_every=1",
    "train.bank_refresh_every=2",
    "train.warmup_epochs=0.5",
    "train.device=cpu",
    "train.eval_batch_size=128",
]
GPU_SETTING = [
    "model.backbone=efficientnet_lite0",
    "model.embedding_dim=512",
    "model.embedding_init=pca",
    "data.image_size=224",
    "data.num_workers=12",
    "train.epochs=20",
    "train.eval_every=2",
    "train.bank_refresh_every=2",
    "train.warmup_epochs=1",
    "train.device=cuda",
    "train.eval_batch_size=512",
]
# The setting where the backbone learns on a CPU (issue 27): the last 3 of the 11 backbone stages
# (block group 7, the head convolution and its BatchNorm) and the embedding layer train, with learning
# rates 2e-4 (backbone; the recipe's 1e-5 moved nothing) and 1e-3 (embedding), on cached outputs of the
# first 8 (frozen) stages for 5 views per image at 224 px, the whole image resized (view 0: the clean
# image, the teacher's), 30 epochs. Issue 22's version (128 px, 6 frozen stages, 1e-5, 10 epochs) gave
# labels under a point of room on cars98dev; the room curve is in docs/results.md (issue 27).
TAIL_SETTING = [
    "model.backbone=efficientnet_lite0",
    "model.embedding_dim=512",
    "model.embedding_init=pca",
    "data.image_size=224",
    "data.num_workers=0",
    "train.epochs=30",
    "train.eval_every=1",
    "train.bank_refresh_every=2",
    "train.warmup_epochs=0.5",
    "train.lr_backbone=2e-4",
    "train.lr_embedding=1e-3",
    "train.device=cpu",
    "train.eval_batch_size=256",
]
TAIL_FROZEN, TAIL_VIEWS, TAIL_SIZE, TAIL_EVAL_RESIZE = 8, 5, 224, "whole"
# The head setting with augmentation: pooled 224 px features of 4 random crops per image (view 0
# the clean image, the teacher's); only the embedding layer trains.
HEAD_AUG_SETTING = HEAD_SETTING
HEAD_AUG_VIEWS = 5
SETTINGS = {
    "head": HEAD_SETTING,
    "head_aug": HEAD_AUG_SETTING,
    "tail": TAIL_SETTING,
    "cpu": CPU_SETTING,
    "gpu": GPU_SETTING,
}
CACHED_SETTINGS = ("head", "head_aug", "tail")

_HEAD_SPLITS: dict[tuple[str, str], Any] = {}
_VIEW_SPLITS: dict[tuple[str, str, str], Any] = {}


def view_splits(setting: str, dataset: str, data_root: str, eval_resize: str | None = None):
    """Train/test `ViewFeatureDataset` splits of cached views (``tail``: the first 8 stages' maps at
    224 px; ``head_aug``: pooled 224 px features), computed on first use; ``eval_resize`` the clean
    view's rule (default: the setting's, `TAIL_EVAL_RESIZE` or ``center_crop``)."""
    from plmetric.data.datasets import DatasetSplits, ViewFeatureDataset
    from plmetric.studies.similarity import cached_views

    rule = eval_resize or (TAIL_EVAL_RESIZE if setting == "tail" else "center_crop")
    key = (setting, dataset, data_root, rule)
    if key not in _VIEW_SPLITS:
        loader = DATASETS[dataset][0]
        frozen, size, views = (TAIL_FROZEN, TAIL_SIZE, TAIL_VIEWS) if setting == "tail" else (None, 224, HEAD_AUG_VIEWS)
        parts = {}
        for split in ("train", "test"):
            tensors, labels, _ = cached_views(
                loader, data_root, split, "efficientnet_lite0", image_size=size, frozen=frozen, views=views,
                eval_resize=rule,
            )
            parts[split] = ViewFeatureDataset(tensors, labels, name=f"{dataset}-{split}-{setting}")
        _VIEW_SPLITS[key] = DatasetSplits(f"{dataset}-{setting}", parts["train"], parts["test"])
    return _VIEW_SPLITS[key]


def head_splits(dataset: str, data_root: str, eval_resize: str = "center_crop"):
    """Train/test `FeatureDataset` splits of cached 224 px pooled features of the clean images (the eval
    rule ``eval_resize``), computed on first use."""
    from plmetric.data.datasets import DatasetSplits, FeatureDataset
    from plmetric.studies.similarity import cached_features

    key = (dataset, data_root, eval_resize)
    if key not in _HEAD_SPLITS:
        loader = DATASETS[dataset][0]
        parts = {}
        for split in ("train", "test"):
            features, labels, _ = cached_features(
                loader, data_root, split, "efficientnet_lite0", image_size=224, eval_resize=eval_resize
            )
            parts[split] = FeatureDataset(features, labels, name=f"{dataset}-{split}-features")
        _HEAD_SPLITS[key] = DatasetSplits(f"{dataset}-features", parts["train"], parts["test"])
    return _HEAD_SPLITS[key]


def run_one(
    setting: str,
    overrides: list[str],
    seed: int,
    out_dir: Path,
    data_root: str | None = None,
    base: str = "cub200_paper.yaml",
    dataset: str = "cub200",
) -> dict:
    """Train one configuration and return its R@1 trajectory (start, every evaluation, final, best,
    the label-free pick and every epoch's selection criteria).

    ``base`` is the config under the setting and the overrides: ``cub200_paper.yaml`` (METHOD.md's
    literal defaults, the reference of the recipe study) or ``cub200.yaml`` (the chosen recipe);
    its data section is replaced by ``dataset``'s.
    """
    from plmetric.data.backbones import feature_model
    from plmetric.training.loop import train

    data_root = dataset_root(dataset, data_root)
    loader = DATASETS[dataset][0]
    # the clean views' rule: the setting's unless an override names one (the cached settings' caches
    # are made with it and the checkpoint records it)
    rule = [f"data.eval_resize={TAIL_EVAL_RESIZE if setting == 'tail' else 'center_crop'}"]
    all_overrides = [*SETTINGS[setting], f"data.dataset={loader}", f"train.seed={seed}", *rule, *overrides]
    if setting in CACHED_SETTINGS:  # cached views: the data set pairs a crop with the clean view itself
        all_overrides += ["train.teacher_view=same", "model.frozen_stages=0"]
    cfg = load_config(base.removesuffix(".yaml"), all_overrides)  # a preset name
    cfg.data.root = data_root
    splits = model = None
    if setting == "head":
        splits = head_splits(dataset, data_root, cfg.data.eval_resize)
        model = feature_model(splits.train.features.shape[1], cfg.model.embedding_dim)
    elif setting == "head_aug":
        splits = view_splits(setting, dataset, data_root, cfg.data.eval_resize)
        model = feature_model(splits.train.features.shape[1], cfg.model.embedding_dim)
    elif setting == "tail":
        from plmetric.data.backbones import create_model
        from plmetric.training.networks import tail_model

        splits = view_splits(setting, dataset, data_root, cfg.data.eval_resize)
        torch.manual_seed(seed)
        full = create_model("efficientnet_lite0", embedding_dim=cfg.model.embedding_dim, pretrained=True)
        model = tail_model(full, TAIL_FROZEN)
    start = time.perf_counter()
    result = train(cfg, out_dir, splits=splits, model=model, progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    evaluated = [r for r in result.history if "recall@1" in r]
    start_metrics = result.start_metrics or {}
    final = result.final_metrics or start_metrics

    def recalls(metrics: dict | None) -> dict:
        return {k: v for k, v in (metrics or start_metrics).items() if k.startswith("recall@")}

    return {
        "dataset": dataset,
        "overrides": overrides,
        "seed": seed,
        "seconds": round(seconds, 1),
        "start": recalls(start_metrics),
        "final": recalls(final),
        "best": recalls(result.best_metrics),
        "best_epoch": result.best_epoch,
        "selected": recalls(result.selected_metrics),
        "selected_epoch": result.selected_epoch,
        "select_rule": cfg.train.select,
        "r1_by_epoch": [(r["epoch"], r["recall@1"]) for r in evaluated],
        "selection_by_epoch": [(0, result.selection_start)]
        + [(r["epoch"], r.get("selection")) for r in result.history],
        "target_label_correlation": [r.get("target_label_correlation") for r in result.history],
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict]) -> dict[str, Any]:
    """R@1 (x100) of the start, the best (an oracle: chosen with test labels), the final and the
    label-free pick, gains over the start, and the worst drop below the start after the first
    epoch, over seeds (mean, std)."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
    for key in ("start", "best", "final", "selected"):
        out[key] = mean_std([100 * r[key]["recall@1"] for r in runs])
    out["gain"] = mean_std([100 * (r["final"]["recall@1"] - r["start"]["recall@1"]) for r in runs])
    out["gain_selected"] = mean_std([100 * (r["selected"]["recall@1"] - r["start"]["recall@1"]) for r in runs])
    out["selected_epoch"] = [r.get("selected_epoch") for r in runs]

    def worst_after_first(run: dict) -> float:
        later = [v for e, v in run["r1_by_epoch"] if e > 1] or [run["final"]["recall@1"]]
        return 100 * (min(later) - run["start"]["recall@1"])

    out["worst_after_epoch1"] = mean_std([worst_after_first(r) for r in runs])
    for k in ("recall@1", "recall@2", "recall@4", "recall@8"):
        out[f"final_{k}"] = mean_std([100 * r["final"][k] for r in runs])
    return out


def share_of_ceiling(value: float, start: float, ceiling: float) -> float:
    """``(value - start) / (ceiling - start)``: the share of what labels could buy (NaN without room)."""
    room = ceiling - start
    return (value - start) / room if room > 0 else math.nan


def fmt(pair: tuple[float, float], n: int) -> str:
    """``mean ± std`` (just the mean for one seed)."""
    mean, std = pair
    return f"{mean:6.2f}" if n == 1 else f"{mean:6.2f} ± {std:4.2f}"


def results_table(results: dict, dataset: str, n: int) -> list[str]:
    """The Markdown table of one data set's rows; the share of the ceiling uses the best epoch (an
    oracle) of the ``supervised`` (or ``ceiling``) row when the study has one."""
    rows = {r["row"]: r for r in results.values() if r["dataset"] == dataset}
    ceiling_row = rows.get("supervised") or rows.get("ceiling") or {}
    ceiling = ceiling_row.get("summary", {}).get("best", (math.nan,))[0]
    header = "start | final | label-free pick | best (oracle) | pick - start | share of ceiling | worst after ep 1"
    lines = [f"| {dataset} | {header} |", "|---|---|---|---|---|---|---|---|"]
    for result in rows.values():
        s = result["summary"]
        share = share_of_ceiling(s["selected"][0], s["start"][0], ceiling)
        cells = [fmt(s["start"], n), fmt(s["final"], n), fmt(s["selected"], n), fmt(s["best"], n)]
        cells += [fmt(s["gain_selected"], n), f"{100 * share:5.0f} %", fmt(s["worst_after_epoch1"], n)]
        lines.append(f"| {result['row']} | " + " | ".join(c.strip() for c in cells) + " |")
    return lines


def write_results(path: str, setting: str, extra_overrides: list[str], seeds: list[int], results: dict) -> None:
    """The study's JSON: setting, overrides, seeds, device and every run (atomically)."""
    import platform

    import torch

    from plmetric.core.checkpoint import atomic_write_json

    atomic_write_json(
        path,
        {
            "setting": setting,
            "setting_overrides": SETTINGS[setting],
            "extra_overrides": extra_overrides,
            "seeds": seeds,
            "device": torch.cuda.get_device_name() if setting == "gpu" else f"cpu {platform.processor()}",
            "results": results,
        },
    )


MIXED_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def mixed_pile(
    shared_root: str | None = None, species: int = 20, plankton: int = 10, per_class: int = 10, seed: int = 0
) -> list[tuple[Path, str]]:
    """The mixed pile of issue 29: ``species`` CUB classes and ``plankton`` plankton106 classes (each with
    at least ``per_class`` images), ``per_class`` images each, as ``(path, label)`` sorted by label then
    path; labels ``cub/<class>`` and ``plankton/<class>``. Classes and files are drawn with ``seed``, so
    the pile is the same on every machine; few photos per class, so look-alikes abound. ``shared_root``:
    the folder holding ``cub200_subset100/`` and ``plankton106/`` (default ``../shared/data``)."""
    rng = np.random.default_rng(seed)
    root = Path(shared_root) if shared_root else shared_data_root()
    folders = [
        (root / DATASETS["cub200"][1] / "CUB_200_2011" / "images", species, "cub"),
        (root / DATASETS["plankton106"][1], plankton, "plankton"),
    ]
    chosen: list[tuple[Path, str]] = []
    for folder, count, prefix in folders:
        classes = sorted(d for d in folder.iterdir() if d.is_dir())
        files = {
            d.name: sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in MIXED_IMAGE_SUFFIXES)
            for d in classes
        }
        eligible = [d.name for d in classes if len(files[d.name]) >= per_class]
        if len(eligible) < count:
            raise ValueError(f"{folder}: {len(eligible)} classes with {per_class}+ images, {count} wanted")
        for name in sorted(eligible[k] for k in rng.permutation(len(eligible))[:count]):
            picks = sorted(rng.permutation(len(files[name]))[:per_class].tolist())
            chosen += [(files[name][k], f"{prefix}/{name}") for k in picks]
    return chosen
