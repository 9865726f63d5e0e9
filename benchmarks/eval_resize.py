"""Whole image or centre crop: the raw backbone's R@1 on each development set's test split under both
eval rules (``data.eval_resize``), no training.

Pooled (mean + max) EfficientNet-Lite0 features at 224 px of the test split (the unseen classes),
L2-normalised, R@1/2/4/8 by exact search; ``center_crop`` resizes the shorter side to 256 and keeps
the centre 224 x 224, ``whole`` resizes the whole image to 224 x 224 (aspect ratio not kept). The
features are cached (``plmetric.studies.features.cached_features``), so a second run only scores.

    python benchmarks/eval_resize.py --datasets cub200 plankton106 cars98dev \\
        --json benchmarks/results/eval_resize_start.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATASETS, dataset_root  # noqa: E402

RULES = ("center_crop", "whole")


def main() -> None:
    import torch

    from plmetric.core.checkpoint import atomic_write_json
    from plmetric.evaluation.metrics import recall_at_k
    from plmetric.studies.features import cached_features

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=sorted(DATASETS))
    parser.add_argument("--data-root", default=None, help="one data set's folder (default ../shared/data/<name>)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.data_root and len(args.datasets) > 1:
        parser.error("--data-root names one data set's folder: give one --datasets")

    results: dict = {}
    for dataset in args.datasets:
        root = dataset_root(dataset, args.data_root)
        for rule in RULES:
            features, labels, info = cached_features(
                DATASETS[dataset][0], root, "test", "efficientnet_lite0", image_size=224, eval_resize=rule
            )
            recalls = recall_at_k(torch.nn.functional.normalize(features, dim=1), labels, ks=(1, 2, 4, 8))
            results[f"{dataset}/{rule}"] = {
                "dataset": dataset,
                "eval_resize": rule,
                "images": len(labels),
                **{k: round(100 * float(v), 2) for k, v in recalls.items()},
                "cache_hit": info.get("cache_hit"),
            }
    print("| data set | R@1 centre crop | R@1 whole image | difference |\n|---|---|---|---|")
    for dataset in args.datasets:
        crop, whole = results[f"{dataset}/center_crop"]["recall@1"], results[f"{dataset}/whole"]["recall@1"]
        print(f"| {dataset} | {crop:.2f} | {whole:.2f} | {whole - crop:+.2f} |")
    if args.json:
        atomic_write_json(args.json, {"backbone": "efficientnet_lite0", "image_size": 224, "results": results})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
