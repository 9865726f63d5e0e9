"""Train PLM on the real CUB subset and report R@1/2/4/8 of the start and after training.

CPU setting (default, <= 20 min on a 2-core machine): EfficientNet-Lite0, 512-d embedding
initialised by PCA, 128 px, the first backbone stages frozen, a few short epochs.
GPU setting (``--gpu``): 224 px, the whole backbone trained, more epochs; sized for one 10-minute
call on a lent H100/H200 with the data carried along.

    python benchmarks/train_cub_subset.py --json results/train_cub_cpu.json
    python benchmarks/train_cub_subset.py --gpu --json results/train_cub_gpu.json

Extra ``--set key=value`` overrides go to the config (see ``plmetric.config.schema``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from plmetric.core.checkpoint import atomic_write_json  # noqa: E402
from plmetric.config.schema import load_config  # noqa: E402
from common import REPO_ROOT, cub_subset_root  # noqa: E402
from plmetric.training.loop import train  # noqa: E402

# The CPU setting of the studies with 4 epochs (benchmarks/common.py); the GPU setting as there.
CPU_SETTING = [*common.CPU_SETTING, "train.epochs=4"]
GPU_SETTING = common.GPU_SETTING


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(cub_subset_root()))
    parser.add_argument("--gpu", action="store_true", help="the full GPU setting")
    parser.add_argument(
        "--config",
        default="cub200",
        help="base config: a preset name (cub200_paper: METHOD.md's literal defaults) or a YAML file",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None, help="run folder (default runs/train_cub_{cpu,gpu})")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    setting = GPU_SETTING if args.gpu else CPU_SETTING
    overrides = [*setting, f"data.root={args.data_root}", *args.set]
    cfg = load_config(args.config, overrides)
    out = Path(args.out or REPO_ROOT / "runs" / f"train_cub_{'gpu' if args.gpu else 'cpu'}")
    start = time.perf_counter()
    result = train(cfg, out, progress=False, overwrite=True)
    seconds = time.perf_counter() - start

    keys = ["recall@1", "recall@2", "recall@4", "recall@8"]
    rows = [
        ("start (untrained, same layer)", result.start_metrics),
        ("final", result.final_metrics),
        (f"best (epoch {result.best_epoch})", result.best_metrics),
    ]
    print(
        f"\nCUB subset, 50 test species, {cfg.model.backbone} {cfg.model.embedding_dim}-d, "
        f"{cfg.data.image_size}px, {cfg.train.epochs} epochs, {seconds / 60:.1f} min"
    )
    print(f"{'':32}" + "".join(f"{k:>10}" for k in keys))
    for name, metrics in rows:
        print(f"{name:32}" + "".join(f"{100 * metrics[k]:10.2f}" for k in keys))
    if args.json:
        atomic_write_json(
            args.json,
            {
                "setting": "gpu" if args.gpu else "cpu",
                "overrides": overrides,
                "seconds": seconds,
                "device": torch.cuda.get_device_name()
                if torch.cuda.is_available() and args.gpu
                else platform.processor(),
                "start": result.start_metrics,
                "final": result.final_metrics,
                "best": result.best_metrics,
                "best_epoch": result.best_epoch,
                "history": result.history,
                "config": json.loads(json.dumps(cfg.to_dict())),
            },
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
