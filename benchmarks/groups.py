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

``--study labelfree`` (issue 29): the number of groups without labels. Per set, on the pretrained
features (``start``; the mixed pile: the index ``plmetric index`` writes for it), k-means with
k = round(sqrt(N / 2)) (the rule before issue 29), k-means with k chosen label-free (the library's
default, ``choose_group_count``), k-means with the true k (an **oracle**), HDBSCAN with scikit-learn's
default cluster selection ``eom`` only (the method before issue 29) and HDBSCAN as the library runs it
(``eom`` or ``leaf``, the higher modularity); groups under ``--min-sizes[0]`` ungrouped for every row,
k-means over ``--seeds`` (means in the table). Sets: the test splits of cub200, plankton106 and cars98dev
and the mixed pile (``common.mixed_pile``: 20 CUB species and 10 plankton classes, 10 images each), on
which the modularity's resolution was chosen; then the **train** splits of the three (other classes: the
resolution was never looked at on them), the held-out check of the criterion.

    python benchmarks/groups.py --study labelfree --json benchmarks/results/groups_labelfree.json
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


LABELFREE_SETS = [
    # (name, data set or "mixed", split, held out from the choice of the resolution)
    ("cub200 test", "cub200", "test", False),
    ("plankton106 test", "plankton106", "test", False),
    ("cars98dev test", "cars98dev", "test", False),
    ("mixed pile", "mixed", "test", False),
    ("cub200 train", "cub200", "train", True),
    ("plankton106 train", "plankton106", "train", True),
    ("cars98dev train", "cars98dev", "train", True),
]


def mixed_pile_embeddings(work: Path) -> tuple[torch.Tensor, np.ndarray]:
    """The mixed pile (``common.mixed_pile``) copied into ``work/mixed/<label>/`` and indexed with the
    CLI (pretrained model, CPU; reused when the index exists): its unit embeddings and class labels."""
    import shutil

    from common import mixed_pile

    from plmetric.retrieval.index import load_embeddings

    folder, index = work / "mixed", work / "mixed.safetensors"
    rows = mixed_pile()
    for path, label in rows:
        target = folder / label.replace("/", "__") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copyfile(path, target)
    if not index.exists():
        command = [sys.executable, "-m", "plmetric.cli", "index", str(folder), "--out", str(index)]
        command += ["--num-workers", "0", "--device", "cpu", "--no-progress"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{shlex.join(command)} exited {done.returncode}:\n{done.stderr.strip()}")
    embeddings, _, paths, _ = load_embeddings(index)
    labels = np.unique([Path(p).parent.name for p in paths], return_inverse=True)[1]
    return F.normalize(embeddings.float(), dim=1), labels


def split_embeddings(dataset: str, split: str) -> tuple[torch.Tensor, np.ndarray]:
    """The split's cached pretrained 224 px pooled features, L2-normalised, and labels."""
    from plmetric.studies.features import cached_features

    features, labels, _ = cached_features(
        DATASETS[dataset][0], dataset_root(dataset), split, "efficientnet_lite0", image_size=224, progress=False
    )
    return F.normalize(features.float(), dim=1), labels.numpy()


def labelfree_rows(x: torch.Tensor, labels: np.ndarray, min_size: int, seeds: list[int]) -> list[dict]:
    """The five groupings of one set (k-means rows once per seed)."""
    from plmetric.retrieval.groups import _cluster, hdbscan_labels

    n, k_true = len(labels), int(len(np.unique(labels)))
    k_sqrt = max(1, round(math.sqrt(n / 2)))
    rows = []
    for seed in seeds:
        for name, k in (("k-means, k = round(sqrt(N/2)) (old default)", k_sqrt), ("k-means, label-free k (default)", None),
                        (f"k-means, true k = {k_true} (ORACLE)", k_true)):
            start = time.perf_counter()
            raw, _, choice = _cluster(x, "kmeans", min_size, k, seed)
            seconds = time.perf_counter() - start
            extra = {"k": k if k is not None else choice.k}
            if choice is not None:
                extra.update(choice_q=choice.score, tried=[list(t) for t in choice.tried], choice=choice.describe())
            rows.append({"method": name, "seed": seed, "seconds": seconds, **extra, **score(raw, labels)})
    xs = x.numpy()
    for name, selections in (("HDBSCAN, eom (old)", ("eom",)), ("HDBSCAN, eom or leaf by modularity (default)", None)):
        start = time.perf_counter()
        raw, choice = hdbscan_labels(xs, min_size, seeds[0], **({"selections": selections} if selections else {}))
        seconds = time.perf_counter() - start
        extra = {"selection": choice.selection, "tried": [list(t) for t in choice.tried]}
        rows.append({"method": name, "seed": seeds[0], "seconds": seconds, **extra, **score(raw, labels)})
    return rows


LABELFREE_KEYS = ["k", "groups", "ungrouped_share", "ami_all", "ami_grouped", "purity", "coverage", "seconds"]


def labelfree_table(results: list[dict]) -> list[str]:
    """Markdown: one line per set and method, k-means rows as the mean over seeds (k as the seeds' values)."""
    lines = ["| set | held out | method | k | groups | ungrouped | AMI all | AMI grouped | purity | coverage | seconds |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        order.setdefault((r["set"], r["method"]), []).append(r)
    for (name, method), rs in order.items():
        ks = "/".join(str(r.get("k", r["groups"])) for r in rs) if "k-means" in method else str(rs[0]["groups"])
        mean = {key: float(np.mean([r[key] for r in rs if r.get(key) is not None])) for key in LABELFREE_KEYS[1:]}
        lines.append(
            f"| {name} | {'yes' if rs[0]['held_out'] else 'no'} | {method} | {ks} | {mean['groups']:.0f} | "
            f"{100 * mean['ungrouped_share']:.0f} % | {mean['ami_all']:.3f} | {mean['ami_grouped']:.3f} | "
            f"{mean['purity']:.3f} | {mean['coverage']:.3f} | {mean['seconds']:.1f} |"
        )
    return lines


def labelfree_study(args: argparse.Namespace) -> dict:
    results = []
    for name, dataset, split, held_out in LABELFREE_SETS:
        if (args.sets and name.split()[0] not in args.sets) or split not in args.splits:
            continue
        if dataset == "mixed":
            x, labels = mixed_pile_embeddings(Path(args.out))
        else:
            x, labels = split_embeddings(dataset, split)
        print(f"{name}: {len(labels)} images, {len(np.unique(labels))} classes", flush=True)
        for r in labelfree_rows(x, labels, args.min_sizes[0], args.seeds):
            results.append({"set": name, "held_out": held_out, "n": len(labels), "classes": int(len(np.unique(labels))), **r})
            print(f"  {r['method']:46s} seed {r['seed']} k {r.get('k', r['groups'])} AMI {r['ami_all']:.3f} "
                  f"({r['seconds']:.1f} s)", flush=True)
    print("\n" + "\n".join(labelfree_table(results)))
    return {"min_size": args.min_sizes[0], "seeds": args.seeds, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=["embeddings", "labelfree"], default="embeddings",
                        help="embeddings: the issue-22 study (--rows); labelfree: issue 29's number of groups")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="k-means seeds of --study labelfree")
    parser.add_argument("--splits", nargs="*", default=["test", "train"], help="--study labelfree: these splits")
    parser.add_argument("--sets", nargs="*", default=None, help="--study labelfree: only these (cub200 plankton106 "
                        "cars98dev mixed)")
    parser.add_argument("--datasets", nargs="*", default=["cub200", "plankton106"], choices=sorted(DATASETS))
    parser.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, choices=["start", *TRAINED_ROWS])
    parser.add_argument("--min-sizes", nargs="*", type=int, default=[5, 10])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "groups_study"), help="run folders of the training")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    if args.study == "labelfree":
        found = labelfree_study(args)
        if args.json:
            write_json(args, found)
        return
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
        write_json(args, {"seed": args.seed, "runs": {f"{d}/{m}": v for (d, m), v in runs.items()}, "results": results})


def write_json(args: argparse.Namespace, found: dict) -> None:
    """``found`` with the command, the machine and the library's revision, written atomically to --json."""
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
            **found,
        },
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
