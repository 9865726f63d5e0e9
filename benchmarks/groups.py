"""Groups of similar images (``plmetric groups``) scored against the sub-folder labels (issue 22).

Per data set (the test split: classes never trained on) and embedding, ``find_groups`` of
``plmetric.retrieval.groups`` (HDBSCAN on the PCA-64 projection of the unit embeddings, the
ungrouped bucket -1) at ``--min-sizes``, beside k-means with k = the true number of classes (an
oracle on k: a pile's owner does not know it; the library's k-means, faiss spherical, groups of one
left ungrouped) and the library's k-means without ``--groups`` (k = round(sqrt(N / 2)), groups under
the first ``--min-sizes`` ungrouped: what ``plmetric groups --method kmeans`` does). Embeddings of
the test split's cached 224 px pooled EfficientNet-Lite0 features
(``benchmarks/common.py`` ``head_splits``; no image is decoded):

* ``start``: the pretrained pooled features, L2-normalised (the untrained start);
* ``plm``: the head setting trained with the committed PLM recipe (the ``cub200`` preset, as
  ``benchmarks/head_to_head.py`` row ``plm``, ``common.run_one``), its label-free pick
  (``selected.safetensors``, the model ``plmetric train`` names) applied to the test features;
* ``plm_final``: the same run's last epoch (``model.safetensors``);
* ``supervised`` (with ``--rows ... supervised``): the supervised ceiling's label-free pick (trained
  with the train split's labels: an oracle embedding).

Scores, with the test labels: the number of groups, the share of images left ungrouped, adjusted
mutual information and NMI (``sklearn.metrics``, arithmetic normalisation) over all images with the
ungrouped bucket counted as one group, AMI over the grouped images only, purity (the share of grouped
images in their group's majority class) and coverage (the share of *all* images that are grouped and
in their group's majority class: purity x grouped share).

    python benchmarks/groups.py --rows start plm plm_final supervised --json benchmarks/results/groups_study.json

(about 5 minutes on two quiet cores: four head runs of 30-90 s, each clustering a second or two).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATASETS, REPO_ROOT, dataset_root, head_splits, run_one  # noqa: E402

TRAINED_ROWS = {
    # row -> (overrides of run_one, checkpoint of the run folder)
    "plm": (["train.method=plm"], "selected.safetensors"),
    "plm_final": (["train.method=plm"], "model.safetensors"),
    "supervised": (["train.method=supervised"], "selected.safetensors"),
}
DEFAULT_ROWS = ["start", "plm", "plm_final"]


def purity_coverage(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Purity = sum over groups of the majority class's count / grouped images; coverage = the same
    sum / all images (the ungrouped, label -1 in ``pred``, count as misses)."""
    grouped = pred >= 0
    if not grouped.any():
        return float("nan"), 0.0
    _, g = np.unique(pred[grouped], return_inverse=True)
    _, t = np.unique(truth[grouped], return_inverse=True)
    table = np.zeros((g.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(table, (g, t), 1)
    majority = int(table.max(axis=1).sum())
    return majority / int(grouped.sum()), majority / len(pred)


def score(pred: np.ndarray, truth: np.ndarray) -> dict:
    """The scores of one partition (``pred`` -1 = ungrouped) against the class labels."""
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    grouped = pred >= 0
    purity, coverage = purity_coverage(pred, truth)
    out = {
        "groups": int(len(np.unique(pred[grouped]))),
        "ungrouped_share": float(1 - grouped.mean()),
        "ami_all": float(adjusted_mutual_info_score(truth, pred)),
        "nmi_all": float(normalized_mutual_info_score(truth, pred)),
        "ami_grouped": float(adjusted_mutual_info_score(truth[grouped], pred[grouped])) if grouped.sum() > 1 else None,
        "purity": purity,
        "coverage": coverage,
    }
    sizes = np.bincount(np.unique(pred[grouped], return_inverse=True)[1]) if grouped.any() else np.zeros(0)
    out["median_group_size"] = float(np.median(sizes)) if len(sizes) else None
    out["largest_group_share"] = float(sizes.max() / len(pred)) if len(sizes) else 0.0
    return out


def trained_embeddings(dataset: str, row: str, seed: int, out_root: Path, runs: dict) -> tuple[torch.Tensor, dict]:
    """Train (once per run folder) with run_one's head setting and embed the test features with the
    row's checkpoint: the feature model's state (``load_state_dict`` strict) applied to the cached
    test features."""
    from safetensors.torch import load_file

    from plmetric.data.backbones import feature_model

    overrides, checkpoint = TRAINED_ROWS[row]
    method = overrides[0].split("=")[1]
    out_dir = out_root / dataset / f"{method}-seed{seed}"
    if (dataset, method) not in runs:
        runs[(dataset, method)] = run_one("head", overrides, seed, out_dir, base="cub200.yaml", dataset=dataset)
        run = runs[(dataset, method)]
        print(
            f"  trained {dataset} {method} seed {seed} in {run['seconds']} s: R@1 start "
            f"{100 * run['start']['recall@1']:.2f}, final {100 * run['final']['recall@1']:.2f}, "
            f"pick {100 * run['selected']['recall@1']:.2f} (epoch {run['selected_epoch']})",
            flush=True,
        )
    run = runs[(dataset, method)]
    splits = head_splits(dataset, dataset_root(dataset))
    features = splits.test.features
    model = feature_model(features.shape[1], 512)
    model.load_state_dict(load_file(str(out_dir / checkpoint)), strict=True)
    model.eval()
    with torch.no_grad():
        embeddings = torch.cat([model(block) for block in features.split(1024)])
    epoch = run["selected_epoch"] if checkpoint == "selected.safetensors" else run["r1_by_epoch"][-1][0]
    recall = run["selected" if checkpoint == "selected.safetensors" else "final"]["recall@1"]
    return embeddings, {"checkpoint": str(out_dir / checkpoint), "epoch": epoch, "test_recall@1": recall}


def cluster_rows(x: torch.Tensor, labels: np.ndarray, min_sizes: list[int], seed: int) -> list[dict]:
    from plmetric.retrieval.groups import find_groups

    k_true = int(len(np.unique(labels)))
    rows = []
    for min_size in min_sizes:
        start = time.perf_counter()
        groups = find_groups(x, method="hdbscan", min_size=min_size, seed=seed)
        seconds = time.perf_counter() - start
        rows.append({"method": f"hdbscan min_size={min_size}", "seconds": seconds, **score(groups.group, labels)})
    start = time.perf_counter()
    groups = find_groups(x, method="kmeans", n_groups=k_true, min_size=2, seed=seed)
    seconds = time.perf_counter() - start
    rows.append({"method": f"k-means k={k_true} (oracle k)", "seconds": seconds, **score(groups.group, labels)})
    k_default = max(1, round(math.sqrt(len(labels) / 2)))  # the library's k without --groups
    start = time.perf_counter()
    groups = find_groups(x, method="kmeans", min_size=min_sizes[0], seed=seed)
    seconds = time.perf_counter() - start
    name = f"k-means k={k_default} (library default, min_size={min_sizes[0]})"
    rows.append({"method": name, "seconds": seconds, **score(groups.group, labels)})
    return rows


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=["cub200", "plankton106"], choices=sorted(DATASETS))
    parser.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, choices=["start", *TRAINED_ROWS])
    parser.add_argument("--min-sizes", nargs="*", type=int, default=[5, 10])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "groups_study"), help="run folders of the training")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    results, runs = [], {}
    for dataset in args.datasets:
        splits = head_splits(dataset, dataset_root(dataset))
        labels = np.asarray(splits.test.labels)
        print(f"{dataset}: {len(labels)} test images, {len(np.unique(labels))} classes", flush=True)
        for row in args.rows:
            info: dict = {}
            if row == "start":
                x = F.normalize(splits.test.features.float(), dim=1)
                info = {"description": "pretrained pooled features, L2-normalised", "dim": int(x.shape[1])}
            else:
                x, info = trained_embeddings(dataset, row, args.seed, Path(args.out), runs)
            for r in cluster_rows(x, labels, args.min_sizes, args.seed):
                results.append({"dataset": dataset, "embedding": row, "n": len(labels), **info, **r})
                print(f"  {row:10s} {r['method']:44s} AMI {r['ami_all']:.3f} groups {r['groups']}", flush=True)

    keys = ["groups", "ungrouped_share", "ami_all", "nmi_all", "ami_grouped", "purity", "coverage", "seconds"]
    print("\n| data set | embedding | method | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---:|" * len(keys))
    for r in results:
        print(f"| {r['dataset']} | {r['embedding']} | {r['method']} | " + " | ".join(fmt(r[k]) for k in keys) + " |")
    if args.json:
        from plmetric.core.checkpoint import atomic_write_json

        git = ["git", "rev-parse", "--short", "HEAD"]
        revision = subprocess.run(git, capture_output=True, text=True, cwd=REPO_ROOT)
        atomic_write_json(
            args.json,
            {
                "command": "python " + shlex.join(sys.argv),
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "processor": platform.processor(),
                    "torch": torch.__version__,
                    "load_average_end": os.getloadavg()[0],
                    "note": "a shared machine (2 cores, other jobs running): the seconds are not timings",
                },
                "git_revision": revision.stdout.strip(),
                "seed": args.seed,
                "runs": {f"{d}/{m}": v for (d, m), v in runs.items()},
                "results": results,
            },
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
