"""Settings and bookkeeping shared by the CUB-subset studies (recipe_study.py, head_to_head.py).

Three settings, all on ``cub200_subset100`` (train: 50 species, test: the other 50):

* ``head``: head-only, the CPU setting that allows seeds and grids. Pooled EfficientNet-Lite0
  features of the un-augmented 224 px images are computed once and cached
  (``plmetric.study.cached_features``); only the 512-d embedding layer (PCA-initialised)
  trains, 30 short epochs, about half a minute per run on two CPU cores. No augmentation, no
  backbone: the levers that move the backbone cannot be studied here.
* ``cpu``: end to end on the CPU: 128 px, the first 6 of 9 backbone stages frozen, 3 epochs
  (about 7 minutes per run on two cores).
* ``gpu``: the full setting for one lent GPU call: 224 px, whole backbone, 20 epochs.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

from plmetric.config import load_config
from plmetric.paths import REPO_ROOT, cub_subset_root

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
SETTINGS = {"head": HEAD_SETTING, "cpu": CPU_SETTING, "gpu": GPU_SETTING}

_HEAD_SPLITS: dict[str, Any] = {}


def head_splits(data_root: str):
    """Train/test `FeatureDataset` splits of cached 224 px pooled features (computed on first use)."""
    from plmetric.data import DatasetSplits, FeatureDataset
    from plmetric.study import cached_features

    if data_root not in _HEAD_SPLITS:
        parts = {}
        for split in ("train", "test"):
            features, labels, _ = cached_features("cub200", data_root, split, "efficientnet_lite0", image_size=224)
            parts[split] = FeatureDataset(features, labels, name=f"cub200-{split}-features")
        _HEAD_SPLITS[data_root] = DatasetSplits("cub200-features", parts["train"], parts["test"])
    return _HEAD_SPLITS[data_root]


def run_one(
    setting: str,
    overrides: list[str],
    seed: int,
    out_dir: Path,
    data_root: str | None = None,
    base: str = "cub200_paper.yaml",
) -> dict:
    """Train one configuration and return its R@1 trajectory (start, every evaluation, final, best).

    ``base`` is the config under the setting and the overrides: ``cub200_paper.yaml`` (METHOD.md's
    literal defaults, the reference of the recipe study) or ``cub200.yaml`` (the chosen recipe).
    """
    from plmetric.models import feature_model
    from plmetric.training import train

    data_root = data_root or str(cub_subset_root())
    all_overrides = [*SETTINGS[setting], f"data.root={data_root}", f"train.seed={seed}", *overrides]
    if setting == "head":  # features have one view: the teacher sees what the student sees
        all_overrides.append("train.teacher_view=same")
    cfg = load_config(REPO_ROOT / "configs" / base, all_overrides)
    splits = model = None
    if setting == "head":
        splits = head_splits(data_root)
        model = feature_model(splits.train.features.shape[1], cfg.model.embedding_dim)
    start = time.perf_counter()
    result = train(cfg, out_dir, splits=splits, model=model, progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    evaluated = [r for r in result.history if "recall@1" in r]
    start_metrics = result.start_metrics or {}
    final = result.final_metrics or start_metrics
    return {
        "overrides": overrides,
        "seed": seed,
        "seconds": round(seconds, 1),
        "start": {k: v for k, v in start_metrics.items() if k.startswith("recall@")},
        "final": {k: v for k, v in final.items() if k.startswith("recall@")},
        "best": {k: v for k, v in (result.best_metrics or start_metrics).items() if k.startswith("recall@")},
        "best_epoch": result.best_epoch,
        "r1_by_epoch": [(r["epoch"], r["recall@1"]) for r in evaluated],
        "target_label_correlation": [r.get("target_label_correlation") for r in result.history],
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict]) -> dict[str, Any]:
    """R@1 start / best / final (x100) and the worst drop below the start after the first epoch, over seeds."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
    for key in ("start", "best", "final"):
        out[key] = mean_std([100 * r[key]["recall@1"] for r in runs])
    out["gain"] = mean_std([100 * (r["final"]["recall@1"] - r["start"]["recall@1"]) for r in runs])

    def worst_after_first(run: dict) -> float:
        later = [v for e, v in run["r1_by_epoch"] if e > 1] or [run["final"]["recall@1"]]
        return 100 * (min(later) - run["start"]["recall@1"])

    out["worst_after_epoch1"] = mean_std([worst_after_first(r) for r in runs])
    for k in ("recall@1", "recall@2", "recall@4", "recall@8"):
        out[f"final_{k}"] = mean_std([100 * r["final"][k] for r in runs])
    return out


def fmt(pair: tuple[float, float], n: int) -> str:
    """``mean ± std`` (just the mean for one seed)."""
    mean, std = pair
    return f"{mean:6.2f}" if n == 1 else f"{mean:6.2f} ± {std:4.2f}"


def write_results(path: str, setting: str, extra_overrides: list[str], seeds: list[int], results: dict) -> None:
    """The study's JSON: setting, overrides, seeds, device and every run (atomically)."""
    import platform

    import torch

    from plmetric.checkpoint import atomic_write_json

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
