"""The same retrieval numbers through onnxruntime as through PyTorch (issue 28), on the three development sets.

For each set, the first ``--count`` images of its zero-shot test half (sorted by class, so whole classes)
are embedded by EfficientNet-Lite0's pooled features at 224 px (``plmetric index`` without a checkpoint)
with ``runtime=torch`` and ``runtime=onnxruntime``; printed: R@1, R@2, MAP@R of each, the largest
``|onnxruntime - torch|`` over all embedding entries beside its bound (:func:`plmetric.data.runtime.tolerance`),
and how many queries' nearest neighbour differs.

    python benchmarks/runtime_agreement.py --json benchmarks/results/runtime_agreement.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS, dataset_root  # noqa: E402

from plmetric.core.checkpoint import atomic_write_json
from plmetric.data.backbones import build_transform, create_model
from plmetric.data.datasets import load_dataset
from plmetric.data.runtime import tolerance
from plmetric.evaluation.metrics import embed_dataset, evaluate



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("PLMETRIC_CACHE", tempfile.mkdtemp(prefix="plmetric-agreement-"))
    model = create_model("efficientnet_lite0", embedding_dim=0).eval()
    transform = build_transform("efficientnet_lite0", image_size=224, train=False)
    rows = {}
    print(f"{'set':<12} {'runtime':<12} {'R@1':>7} {'R@2':>7} {'MAP@R':>7} {'s':>6}")
    for name, (kind, _) in DATASETS.items():
        test = load_dataset(kind, dataset_root(name), test_transform=transform, verbose=False).test
        part = torch.utils.data.Subset(test, range(min(args.count, len(test))))
        out = {}
        for runtime in ("torch", "onnxruntime"):
            start = time.perf_counter()
            emb, labels, _ = embed_dataset(model, part, batch_size=64, num_workers=2, runtime=runtime)
            seconds = time.perf_counter() - start
            metrics = evaluate(emb, labels, ks=(1, 2), compute_nmi=False)
            out[runtime] = {"emb": emb, "metrics": metrics, "seconds": seconds}
            print(f"{name:<12} {runtime:<12} {100 * metrics['recall@1']:7.2f} {100 * metrics['recall@2']:7.2f} "
                  f"{100 * metrics['map@r']:7.2f} {seconds:6.1f}", flush=True)
        a, b = out["torch"]["emb"], out["onnxruntime"]["emb"]
        a_n, b_n = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
        first = [(x @ x.T).fill_diagonal_(-2).argmax(1) for x in (a_n, b_n)]
        rows[name] = {
            "images": len(part),
            **{f"{r}_{k}": v for r in out for k, v in out[r]["metrics"].items() if k != "num_images"},
            **{f"{r}_seconds": out[r]["seconds"] for r in out},
            "max_abs_diff": float((a - b).abs().max()),
            "bound": tolerance(a),
            "nearest_neighbour_differs": int((first[0] != first[1]).sum()),
        }
        print(f"{'':<12} max |ort - torch| {rows[name]['max_abs_diff']:.2e} (bound {rows[name]['bound']:.1e}); "
              f"nearest neighbour differs for {rows[name]['nearest_neighbour_differs']} of {len(part)}", flush=True)
    if args.json:
        atomic_write_json(args.json, {"count": args.count, "torch": torch.__version__, "sets": rows})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
