"""The similarity study (slide 14): how well PLM and its competitors' similarities agree with the
labels, measured the way training sees them. An application on top of :mod:`plmetric.evaluation.estimators`.

:func:`run_study` measures every estimator on batches made by the neighbourhood sampler (B/k
seeds, each with its k-1 nearest neighbours; repeated items removed), averaged over many batches
with the standard deviation, and over the whole set at once. :func:`run_sweep` varies PLM's
parameters (N_α, N_β, m, τ, neighbours per seed k) one at a time around METHOD.md's defaults,
:func:`run_baseline_sweep` the competitors' own options. Its features come from
:mod:`plmetric.studies.features` (:func:`cached_features` embeds a data set split once with a
pretrained backbone and caches the features, safetensors outside the data folder and the repo).
``plmetric similarity-study`` (:func:`similarity_study_command`; its arguments are parsed by
:mod:`plmetric.cli`) prints the tables (Markdown), writes ``--json`` and a bar chart.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from plmetric.evaluation.estimators import (
    ESTIMATORS,
    FOLLOWS,
    Estimate,
    group_purity,
    group_size,
    plm_estimate,
    similarity_auc,
)
from plmetric.manifold.pieces import similarity_correlation
from plmetric.studies.features import (
    cached_features,
    cached_views,
    default_cache_dir,
    feature_cache_path,
    load_features_file,
)
from plmetric.core.options import ManifoldOptions
from plmetric.core.validation import check_embeddings, check_int

__all__ = [
    "DEFAULT_BASELINE_SWEEP",
    "DEFAULT_STUDY",
    "DEFAULT_SWEEP",
    "PAPER_CUB",
    "cached_features",
    "cached_views",
    "evaluate_estimator",
    "feature_cache_path",
    "format_study_table",
    "format_sweep_table",
    "load_features_file",
    "neighbourhood_batches",
    "ordering_verdict",
    "plot_study",
    "run_baseline_sweep",
    "run_study",
    "run_sweep",
    "similarity_study_command",
]

DEFAULT_STUDY = tuple(ESTIMATORS)

# Slide 14 (CUB-200-2011, full data set, GoogLeNet): correlation with the ground truth and purity.
PAPER_CUB = {
    "correlation": {"kmeans": 0.37, "agglomerative": 0.52, "random_walk": 0.45, "plm": 0.61},
    "purity": {"kmeans": 0.38, "agglomerative": 0.49, "plm": 0.67},
}
PAPER_BASELINES = ("kmeans", "agglomerative", "random_walk")


# --------------------------------------------------------------------------------------------
# 1. batches and the study
# --------------------------------------------------------------------------------------------


def neighbourhood_batches(
    features: Tensor, *, batch_size: int = 120, k: int = 5, n_batches: int = 50, seed: int = 0
) -> list[Tensor]:
    """Batches as training builds them: B/k random seeds, each with its k-1 nearest neighbours.

    The neighbour table is the cosine k-NN of the features (2k wide);
    :class:`plmetric.training.sampling.NeighbourhoodBatchSampler` (``avoid_duplicates=True``) builds the
    batches, epoch after epoch until ``n_batches`` are collected. Items still repeated within a
    batch are dropped (first occurrence kept), so a batch may hold slightly fewer than B points:
    a repeated item would add a pair of identical points that is trivially "same class".

    Returns:
        ``n_batches`` int64 index tensors.
    """
    from plmetric.evaluation.metrics import nearest_neighbors
    from plmetric.training.sampling import NeighbourhoodBatchSampler

    n = features.shape[0]
    batch_size = check_int("batch_size", batch_size, 2)
    k = check_int("k (neighbours per seed)", k, 1)
    n_batches = check_int("n_batches", n_batches, 1)
    if batch_size > n:
        raise ValueError(f"batch_size ({batch_size}) exceeds the number of points ({n})")
    if batch_size % k:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by k, the neighbours per seed ({k})")
    width = max(1, min(2 * k, n - 1))
    _, table = nearest_neighbors(features, width, metric="cosine")
    sampler = NeighbourhoodBatchSampler(table.cpu(), batch_size=batch_size, k=k, seed=seed, avoid_duplicates=True)
    batches: list[Tensor] = []
    epoch = 0
    while len(batches) < n_batches:
        for batch in sampler.global_batches(epoch):
            values = batch.numpy()
            _, first = np.unique(values, return_index=True)
            batches.append(torch.as_tensor(values[np.sort(first)]))
            if len(batches) == n_batches:
                break
        epoch += 1
    return batches


def _nan_stats(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _measure(fn: Callable[..., Estimate], options: Mapping[str, Any], x: Tensor, y: Tensor) -> dict[str, Any]:
    start = time.perf_counter()
    sim, groups = fn(x, **options)
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {
        "correlation": similarity_correlation(sim, y),
        "auc": similarity_auc(sim, y),
        "seconds": seconds,
    }
    if groups is not None:
        out["purity"] = group_purity(groups, y)
        out["group_size"] = group_size(groups, x.shape[0])
    return out


def _round(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, digits)
    return value


def evaluate_estimator(
    fn: Callable[..., Estimate],
    features: Tensor,
    labels: Tensor,
    batches: Sequence[Tensor] | None,
    *,
    options: Mapping[str, Any] | None = None,
    whole_set: bool = True,
) -> dict[str, Any]:
    """Correlation (and purity, group size where the estimator forms groups) of one estimator on
    each batch (mean and sample std over the batches) and on the whole set.

    Returns:
        ``{"batch": {...}, "whole_set": {...}}`` (either absent when not measured).
    """
    options = dict(options or {})
    result: dict[str, Any] = {}
    if batches:
        rows = [_measure(fn, options, features[b], labels[b]) for b in batches]
        batch: dict[str, Any] = {"n_batches": len(rows), "mean_points": float(np.mean([len(b) for b in batches]))}
        for key in ("correlation", "auc", "purity", "group_size"):
            if key in rows[0]:
                mean, std = _nan_stats([r[key] for r in rows])
                batch[f"{key}_mean"], batch[f"{key}_std"] = mean, std
        batch["seconds_per_batch"] = float(np.mean([r["seconds"] for r in rows]))
        result["batch"] = {k: _round(v) for k, v in batch.items()}
    if whole_set:
        whole = _measure(fn, options, features, labels)
        whole["points"] = int(features.shape[0])
        result["whole_set"] = {k: _round(v) for k, v in whole.items()}
    return result


def _resolve(name: str) -> Callable[..., Estimate]:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; expected one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


def _prepare_features(features: Tensor, labels: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    x = check_embeddings(torch.as_tensor(features), "features", min_rows=2).detach()
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = torch.as_tensor(labels)
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels: expected {x.shape[0]} labels (one per feature row), got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"labels: expected integers, got dtype {y.dtype}")
    if torch.unique(y).numel() < 2:
        raise ValueError("labels: the study needs at least 2 classes (the ground truth would be constant)")
    return (F.normalize(x, dim=1) if normalize else x), y.long()


def run_study(
    features: Tensor,
    labels: Tensor,
    *,
    estimators: Sequence[str] = DEFAULT_STUDY,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 120,
    k: int = 5,
    n_batches: int = 50,
    seed: int = 0,
    whole_set: bool = True,
    normalize: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Measure every estimator on neighbourhood batches and on the whole set.

    Args:
        features: (N, d) embeddings; labels: (N,) class ids (used for measuring only).
        estimators: names in :data:`ESTIMATORS`.
        options: per-estimator keyword overrides, e.g. ``{"plm": {"tau": 1.0}}``.
        batch_size, k, n_batches, seed: the neighbourhood batches (:func:`neighbourhood_batches`);
            ``n_batches=0`` skips the batch measurement.
        whole_set: also measure on all N points at once.
        normalize: L2-normalise the features first (METHOD.md: unit-sphere embeddings).

    Returns:
        ``{"settings": ..., "estimators": {name: {"follows", "options", "batch", "whole_set"}}}``.
    """
    x, y = _prepare_features(features, labels, normalize)
    options = {name: dict(opts) for name, opts in (options or {}).items()}
    fns = {name: _resolve(name) for name in estimators}
    batches = neighbourhood_batches(x, batch_size=batch_size, k=k, n_batches=n_batches, seed=seed) if n_batches else []
    results: dict[str, Any] = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        entry = evaluate_estimator(fn, x, y, batches, options=options.get(name), whole_set=whole_set)
        entry = {"follows": FOLLOWS.get(name, name), "options": _options_of(fn, options.get(name)), **entry}
        results[name] = entry
        if progress:
            print(f"  {name:<20} {time.perf_counter() - start:6.1f} s", flush=True)
    return {
        "settings": {
            "points": int(x.shape[0]),
            "classes": int(torch.unique(y).numel()),
            "dim": int(x.shape[1]),
            "batch_size": batch_size,
            "neighbours_per_seed": k,
            "n_batches": len(batches),
            "seed": seed,
            "normalized": normalize,
        },
        "estimators": results,
    }


def _options_of(fn: Callable, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    opts = dict(fn.keywords) if isinstance(fn, functools.partial) else {}
    opts.update(extra or {})
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in opts.items()}


# One-at-a-time sweep of PLM's parameters around METHOD.md's defaults.
DEFAULT_SWEEP: dict[str, tuple] = {
    "n_alpha": (1.0, 2.0, 3.0, 5.0, 8.0, 12.0),
    "n_beta": (0.0, 0.25, 0.5, 1.0, 2.0),
    "m": (1, 2, 3, 4),
    "tau": (0.25, 0.5, 1.0, 2.0, 4.0),
    "k": (2, 3, 4, 5, 6, 8, 10),
}
SAMPLER_K = 5  # neighbours per seed of the study's batches (train.neighbours_per_seed's default)
PLM_DEFAULTS = {
    "n_alpha": ManifoldOptions.n_alpha,
    "n_beta": ManifoldOptions.n_beta,
    "m": ManifoldOptions.m,
    "tau": ManifoldOptions.tau,
    "k": SAMPLER_K,
}


def run_sweep(
    features: Tensor,
    labels: Tensor,
    *,
    grid: Mapping[str, Sequence[Any]] | None = None,
    base: Mapping[str, Any] | None = None,
    batch_size: int = 120,
    n_batches: int = 50,
    seed: int = 0,
    whole_set: bool = True,
    normalize: bool = True,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Vary PLM's parameters one at a time around ``base`` (METHOD.md's defaults).

    Parameters: ``n_alpha``, ``n_beta``, ``m``, ``tau`` (options of :func:`plm_estimate`) and
    ``k``, the neighbours per seed of the batches, with the piece cap ``n_max = 2k`` following it
    (METHOD.md §2). Every row is measured on the same batches as the others with the same k; when
    k does not divide ``batch_size``, the batches hold the largest multiple of k below it.

    Returns:
        one row per (parameter, value): batch correlation mean/std, purity mean, group size,
        whole-set correlation and purity.
    """
    x, y = _prepare_features(features, labels, normalize)
    grid = dict(DEFAULT_SWEEP if grid is None else grid)
    base = {**PLM_DEFAULTS, **(base or {})}
    unknown = set(grid) - set(PLM_DEFAULTS)
    if unknown:
        raise ValueError(f"sweep: unknown parameters {sorted(unknown)}; expected some of {sorted(PLM_DEFAULTS)}")
    batch_cache: dict[int, list[Tensor]] = {}
    rows = []
    for param, values in grid.items():
        for value in values:
            setting = {**base, param: value}
            k = int(setting["k"])
            b_k = batch_size - batch_size % k  # B must be a multiple of k: the largest one <= B
            if k not in batch_cache:
                batch_cache[k] = (
                    neighbourhood_batches(x, batch_size=b_k, k=k, n_batches=n_batches, seed=seed) if n_batches else []
                )
            opts = {
                "n_alpha": float(setting["n_alpha"]),
                "n_beta": float(setting["n_beta"]),
                "m": int(setting["m"]),
                "tau": float(setting["tau"]),
                "n_max": max(2 * k, int(setting["m"]) + 1),
            }
            res = evaluate_estimator(plm_estimate, x, y, batch_cache[k], options=opts, whole_set=whole_set)
            row = _sweep_row("plm", param, value, value == PLM_DEFAULTS[param], b_k, res)
            rows.append(row)
            if progress:
                print(f"  sweep plm {param}={value}: r = {row['batch_correlation_mean']}", flush=True)
    return rows


def _sweep_row(estimator: str, param: str, value: Any, default: bool, batch_size: int, res: Mapping) -> dict:
    b, w = res.get("batch", {}), res.get("whole_set", {})
    return {
        "estimator": estimator,
        "parameter": param,
        "value": value,
        "default": bool(default),
        "batch_size": batch_size,
        "batch_correlation_mean": b.get("correlation_mean"),
        "batch_correlation_std": b.get("correlation_std"),
        "batch_auc_mean": b.get("auc_mean"),
        "batch_purity_mean": b.get("purity_mean"),
        "batch_group_size": b.get("group_size_mean"),
        "whole_correlation": w.get("correlation"),
        "whole_auc": w.get("auc"),
        "whole_purity": w.get("purity"),
        "whole_group_size": w.get("group_size"),
    }


# One-at-a-time sweep of the baselines' own parameters (fairness: PLM's were chosen by its authors).
DEFAULT_BASELINE_SWEEP: dict[str, dict[str, tuple]] = {
    "gaussian": {"sigma": (None, 0.25, 0.5, 1.0, 3.0)},
    "kmeans": {"points_per_cluster": (2, 3, 5, 10, 20, 40)},
    "agglomerative": {"points_per_cluster": (2, 3, 5, 10, 20, 40)},
    "agglomerative_ward": {"points_per_cluster": (2, 3, 5, 10, 20, 40)},
    "random_walk": {"n_neighbours": (3, 5, 10, 20), "alpha": (0.5, 0.9, 0.99), "graph": ("mutual", "union")},
    "stml": {"topk": (3, 5, 10, 20), "sigma": (1.0, 3.0)},
}


def _default_option(fn: Callable, name: str) -> Any:
    if isinstance(fn, functools.partial) and name in fn.keywords:
        return fn.keywords[name]
    base = fn.func if isinstance(fn, functools.partial) else fn
    param = inspect.signature(base).parameters.get(name)
    return None if param is None else param.default


def run_baseline_sweep(
    features: Tensor,
    labels: Tensor,
    *,
    grid: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    batch_size: int = 120,
    k: int = 5,
    n_batches: int = 50,
    seed: int = 0,
    whole_set: bool = True,
    normalize: bool = True,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Vary the competing estimators' own parameters one at a time (``grid``: estimator ->
    option -> values; default :data:`DEFAULT_BASELINE_SWEEP`), on the same neighbourhood batches.

    Returns:
        rows as :func:`run_sweep`'s, with ``estimator`` naming the estimator.
    """
    x, y = _prepare_features(features, labels, normalize)
    grid = DEFAULT_BASELINE_SWEEP if grid is None else grid
    fns = {name: _resolve(name) for name in grid}
    batches = neighbourhood_batches(x, batch_size=batch_size, k=k, n_batches=n_batches, seed=seed) if n_batches else []
    rows = []
    for name, params in grid.items():
        for param, values in params.items():
            for value in values:
                res = evaluate_estimator(fns[name], x, y, batches, options={param: value}, whole_set=whole_set)
                default = value == _default_option(fns[name], param)
                rows.append(_sweep_row(name, param, value, default, batch_size, res))
                if progress:
                    print(f"  sweep {name} {param}={value}: r = {rows[-1]['batch_correlation_mean']}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# 2. reporting
# --------------------------------------------------------------------------------------------


def _fmt(value: Any, std: Any = None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.3f} ± {std:.3f}" if std is not None else f"{value:.3f}"


def format_study_table(study: Mapping[str, Any], title: str = "") -> str:
    """A Markdown table (paste-ready) of one study: estimator, batch r, purity, whole-set r, purity."""
    s = study["settings"]
    lines = [title] if title else []
    lines.append(
        f"{s['points']} points, {s['classes']} classes, d = {s['dim']}; batches: {s['n_batches']} × "
        f"B = {s['batch_size']} (seeds + {s['neighbours_per_seed'] - 1} neighbours)"
    )
    lines.append("")
    lines.append(
        "| estimator | follows | batch r (mean ± std) | batch AUC | batch purity | group size | whole-set r | "
        "whole-set AUC | whole-set purity | whole-set group size |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, entry in study["estimators"].items():
        b, w = entry.get("batch", {}), entry.get("whole_set", {})
        lines.append(
            f"| {name} | {entry['follows']} | {_fmt(b.get('correlation_mean'), b.get('correlation_std'))} | "
            f"{_fmt(b.get('auc_mean'))} | {_fmt(b.get('purity_mean'))} | {_fmt(b.get('group_size_mean'))} | "
            f"{_fmt(w.get('correlation'))} | {_fmt(w.get('auc'))} | {_fmt(w.get('purity'))} | "
            f"{_fmt(w.get('group_size'))} |"
        )
    return "\n".join(lines)


def format_sweep_table(rows: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """A Markdown table of :func:`run_sweep` rows; the default value of each parameter is starred."""
    lines = [title] if title else []
    lines.append(
        "| estimator | parameter | value | batch r (mean ± std) | batch AUC | batch purity | group size | "
        "whole-set r | whole-set purity |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        value = f"{r['value']}{' *' if r['default'] else ''}"
        lines.append(
            f"| {r['estimator']} | {r['parameter']} | {value} | "
            f"{_fmt(r['batch_correlation_mean'], r['batch_correlation_std'])} | {_fmt(r['batch_auc_mean'])} | "
            f"{_fmt(r['batch_purity_mean'])} | {_fmt(r['batch_group_size'])} | {_fmt(r['whole_correlation'])} | "
            f"{_fmt(r['whole_purity'])} |"
        )
    return "\n".join(lines)


def ordering_verdict(study: Mapping[str, Any]) -> dict[str, Any]:
    """Does PLM (mean) correlate better than the paper's baselines (k-means, agglomerative, random
    walk) and than every other non-PLM estimator here? Per measurement (batch mean, whole set)."""
    est = study["estimators"]
    out: dict[str, Any] = {}
    for where, key in (("batch", "correlation_mean"), ("whole_set", "correlation")):
        if "plm" not in est or where not in est["plm"]:
            continue
        plm = est["plm"][where][key]
        others = {n: e[where][key] for n, e in est.items() if not n.startswith("plm") and where in e}
        paper = {n: v for n, v in others.items() if n.split("_ward")[0] in PAPER_BASELINES}
        best_paper = max(paper, key=paper.get) if paper else None
        best_any = max(others, key=others.get) if others else None
        out[where] = {
            "plm": plm,
            "best_paper_baseline": best_paper,
            "best_paper_baseline_r": paper.get(best_paper),
            "plm_beats_paper_baselines": bool(best_paper is None or plm > paper[best_paper]),
            "best_other": best_any,
            "best_other_r": others.get(best_any),
            "plm_beats_all_others": bool(best_any is None or plm > others[best_any]),
        }
    return out


def plot_study(studies: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Bar chart of the correlation with the ground truth per estimator (batch mean ± std and
    whole set), one panel per study (e.g. per split); the paper's CUB numbers as markers.
    Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from plmetric.core.checkpoint import atomic_write_figure

    names = list(studies)
    fig, axes = plt.subplots(1, len(names), figsize=(max(7.0, 6.5 * len(names)), 4.8), squeeze=False)
    for ax, split in zip(axes[0], names, strict=True):
        est = studies[split]["estimators"]
        labels = list(est)
        pos = np.arange(len(labels))
        batch = [est[n].get("batch", {}).get("correlation_mean") for n in labels]
        batch_std = [est[n].get("batch", {}).get("correlation_std") for n in labels]
        whole = [est[n].get("whole_set", {}).get("correlation") for n in labels]

        def clean(values):
            return [np.nan if v is None else v for v in values]

        ax.bar(pos - 0.2, clean(batch), 0.4, yerr=clean(batch_std), capsize=2, label="batches (mean ± std)")
        ax.bar(pos + 0.2, clean(whole), 0.4, label="whole set")
        paper = [PAPER_CUB["correlation"].get(n) for n in labels]
        marked = [(p, v) for p, v in zip(pos, paper, strict=True) if v is not None]
        if marked:
            ax.scatter(
                [p for p, _ in marked],
                [v for _, v in marked],
                marker="_",
                s=400,
                c="k",
                zorder=3,
                label="paper, full CUB (slide 14)",
            )
        ax.set_xticks(pos)
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("correlation with ground truth")
        ax.set_title(str(split))
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_write_figure(fig, path, dpi=120)


# --------------------------------------------------------------------------------------------
# 3. command line (``plmetric similarity-study``)
# --------------------------------------------------------------------------------------------


def _parse_option_overrides(items: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """``["plm.tau=1.0", "kmeans.n_clusters=30"]`` -> ``{"plm": {"tau": 1.0}, ...}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        name_key, sep, raw = item.partition("=")
        name, dot, key = name_key.partition(".")
        if not (sep and dot and name and key):
            raise ValueError(f"--set {item!r}: expected ESTIMATOR.OPTION=VALUE, e.g. plm.tau=1.0")
        if name not in ESTIMATORS:
            raise ValueError(f"--set {item!r}: unknown estimator {name!r}; expected one of {', '.join(ESTIMATORS)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(name, {})[key] = value
    return out


def _verdict_line(where: str, v: Mapping[str, Any]) -> str:
    line = f"{where}: PLM r = {_fmt(v['plm'])}"
    if v["best_paper_baseline"] is not None:
        verb = "beats" if v["plm_beats_paper_baselines"] else "does NOT beat"
        line += f"; {verb} the best paper baseline, {v['best_paper_baseline']} (r = {_fmt(v['best_paper_baseline_r'])})"
    if v["best_other"] is not None:
        line += f"; best non-PLM estimator here: {v['best_other']} (r = {_fmt(v['best_other_r'])})"
    return line


def similarity_study_command(args: Any) -> int:
    """Run ``plmetric similarity-study`` from parsed arguments; prints tables, writes JSON and PNG."""
    from plmetric.core.checkpoint import atomic_write_json

    names = [e.strip() for e in args.estimators.split(",") if e.strip()]
    estimators = list(DEFAULT_STUDY) if names == ["all"] else names
    for name in estimators:
        _resolve(name)
    options = _parse_option_overrides(args.set)
    progress = not args.no_progress
    inputs = _study_inputs(args, progress)
    report: dict[str, Any] = {
        "estimators_follow": {name: FOLLOWS.get(name, name) for name in estimators},
        "paper_cub_slide14": PAPER_CUB,
        "splits": {},
    }
    studies = {}
    for split, (x, y, info) in inputs.items():
        study = _measure_split(args, split, x, y, info, estimators, options, progress)
        if args.json and args.sweep:
            report["splits"][split] = study
            atomic_write_json(args.json, report)
        if args.sweep:
            _sweep_split(args, split, x, y, options, progress, study)
        report["splits"][split] = study
        studies[split] = study
        if args.json:  # after every split, so that an interrupted run keeps what it measured
            atomic_write_json(args.json, report)
    if args.json:
        print(f"wrote {args.json}")
    plot = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if plot:
        plot_study(studies, plot)
        print(f"wrote {plot}")
    return 0


def _study_inputs(args: Any, progress: bool) -> dict[str, tuple[Tensor, Tensor, dict[str, Any]]]:
    """The features to study by name: a features file's (``--features``, ``--labels``), or each split
    of ``--dataset`` embedded once by the backbone (read from the cache when it holds them)."""
    inputs: dict[str, tuple[Tensor, Tensor, dict[str, Any]]] = {}
    if args.features:
        if args.dataset:
            raise ValueError("give either --features FILE (with --labels) or --dataset NAME, not both")
        x, y = load_features_file(args.features, args.labels)
        inputs[Path(args.features).stem] = (x, y, {"features_file": str(Path(args.features).resolve())})
        return inputs
    if not args.dataset:
        raise ValueError("give --dataset NAME (with --data-root) or --features FILE with --labels FILE")
    if args.labels:
        raise ValueError("--labels goes with --features; a data set brings its own labels")
    from plmetric.core.devices import resolve_device

    device = resolve_device(args.device)
    for split in ("train", "test") if args.split == "both" else (args.split,):
        x, y, info = cached_features(
            args.dataset,
            args.data_root,
            split,
            args.backbone,
            image_size=args.image_size,
            weights=args.weights,
            cache_dir=args.cache_dir,
            batch_size=args.embed_batch_size,
            num_workers=args.num_workers,
            device=device,
            progress=progress,
        )
        hit = "read from cache" if info["cache_hit"] else "embedded and cached"
        print(f"{args.dataset}/{split}: {x.shape[0]} features of dimension {x.shape[1]} {hit}: {info['cache_file']}")
        inputs[split] = (x, y, info)
    return inputs


def _measure_split(
    args: Any,
    split: str,
    x: Tensor,
    y: Tensor,
    info: dict[str, Any],
    estimators: list[str],
    options: Mapping[str, Mapping[str, Any]],
    progress: bool,
) -> dict[str, Any]:
    """:func:`run_study` on one split with the command's settings (``info``: where the features came
    from); prints its table and verdict."""
    if progress:
        print(f"[{split}] measuring {len(estimators)} estimators", flush=True)
    study = run_study(
        x,
        y,
        estimators=estimators,
        options=options,
        batch_size=args.batch_size,
        k=args.neighbours_per_seed,
        n_batches=args.batches,
        seed=args.seed,
        whole_set=not args.no_whole_set,
        normalize=not args.no_normalize,
        progress=progress,
    )
    study["source"] = info
    study["verdict"] = ordering_verdict(study)
    print()
    print(format_study_table(study, title=f"### Similarity vs ground truth: {split}"))
    for where, v in study["verdict"].items():
        print(_verdict_line(where, v))
    return study


def _sweep_split(
    args: Any,
    split: str,
    x: Tensor,
    y: Tensor,
    options: Mapping[str, Mapping[str, Any]],
    progress: bool,
    study: dict[str, Any],
) -> None:
    """``--sweep``: PLM's and the baselines' parameter sweeps on one split, into ``study`` and printed."""
    if progress:
        print(f"[{split}] PLM parameter sweep", flush=True)
    plm_base = {k: v for k, v in options.get("plm", {}).items() if k in PLM_DEFAULTS}
    whole_set = args.sweep_whole_set and not args.no_whole_set
    study["sweep"] = run_sweep(
        x,
        y,
        base={**plm_base, "k": args.neighbours_per_seed},
        batch_size=args.batch_size,
        n_batches=args.batches,
        seed=args.seed,
        whole_set=whole_set,
        normalize=not args.no_normalize,
        progress=progress,
    )
    study["baseline_sweep"] = run_baseline_sweep(
        x,
        y,
        batch_size=args.batch_size,
        k=args.neighbours_per_seed,
        n_batches=args.batches,
        seed=args.seed,
        whole_set=whole_set,
        normalize=not args.no_normalize,
        progress=progress,
    )
    print()
    print(format_sweep_table(study["sweep"], title=f"### PLM parameter sweep: {split} (* = METHOD.md default)"))
    print()
    print(format_sweep_table(study["baseline_sweep"], title=f"### Baseline parameter sweep: {split} (* = default)"))
