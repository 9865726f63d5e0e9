"""The ``plmetric`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_KS = {"sop": (1, 10, 100, 1000)}
FALLBACK_KS = (1, 2, 4, 8)


class CLIError(Exception):
    """A user-facing error: printed without a traceback."""


def resolve_device(name: str) -> str:
    """Map ``auto`` to ``cuda`` when available, else ``cpu``; check explicit choices."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return name


def parse_ks(text: str | None, dataset: str) -> tuple[int, ...]:
    """Parse ``--ks 1,2,4,8``; the default depends on the data set (SOP uses 1,10,100,1000)."""
    if text is None:
        return DEFAULT_KS.get(dataset, FALLBACK_KS)
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise CLIError(f"--ks expects comma-separated positive integers, got '{text}'") from None
    if not ks or min(ks) < 1:
        raise CLIError(f"--ks expects comma-separated positive integers, got '{text}'")
    return ks


def format_metrics_table(metrics: dict[str, Any], title: str = "") -> str:
    """Render metrics as a two-column text table; fractions shown as percentages."""
    rows = []
    for key, value in metrics.items():
        if isinstance(value, float) and (key.startswith("recall@") or key in {"map@r", "r_precision", "nmi"}):
            rows.append((key, f"{100 * value:6.2f}"))
        elif isinstance(value, float):
            rows.append((key, f"{value:.2f}"))
        else:
            rows.append((key, f"{value:,}" if isinstance(value, int) else str(value)))
    width = max(len(k) for k, _ in rows)
    lines = [title] if title else []
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def evaluate_on_test_split(
    *,
    dataset: str,
    data_root: str | None,
    backbone: str,
    embedding_dim: int,
    image_size: int,
    checkpoint: str | None = None,
    weights: str | None = None,
    ks: Sequence[int] = FALLBACK_KS,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str = "cpu",
    backend: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Embed a data set's zero-shot test split and compute retrieval metrics.

    Returns:
        A dict with ``recall@K``, ``map@r``, ``r_precision``, ``nmi``, ``num_images``,
        ``num_classes``, ``skipped_images``, ``seconds`` and the model description.
    """
    from plmetric.checkpoint import load_model
    from plmetric.data import load_dataset
    from plmetric.evaluation import embed_dataset, evaluate
    from plmetric.models import build_transform, create_model

    start = time.perf_counter()
    if checkpoint:
        model, meta = load_model(checkpoint)
        backbone = meta["backbone"]
        embedding_dim = int(meta["embedding_dim"])
        image_size = int(meta.get("image_size", image_size))
    else:
        model = create_model(backbone, embedding_dim=embedding_dim, pretrained=True, weights=weights)
    transform = build_transform(backbone, image_size=image_size, train=False)
    splits = load_dataset(dataset, data_root, test_transform=transform)
    if splits.test is None:
        raise CLIError(f"--dataset {dataset} has no labelled test split to evaluate")
    model.to(device)
    embeddings, labels, _ = embed_dataset(
        model, splits.test, batch_size=batch_size, num_workers=num_workers, device=device, progress=progress
    )
    metrics: dict[str, Any] = evaluate(embeddings, labels, ks=ks, backend=backend)
    metrics["skipped_images"] = int(splits.test.skipped)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    metrics.update(
        dataset=dataset, backbone=backbone, embedding_dim=int(model.embedding_dim), image_size=image_size,
        checkpoint=checkpoint,
    )
    return metrics


def _cmd_eval(args: argparse.Namespace) -> int:
    from plmetric.checkpoint import atomic_write_json

    metrics = evaluate_on_test_split(
        dataset=args.dataset,
        data_root=args.data_root,
        backbone=args.backbone,
        embedding_dim=args.embedding_dim,
        image_size=args.image_size,
        checkpoint=args.checkpoint,
        weights=args.weights,
        ks=parse_ks(args.ks, args.dataset),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=resolve_device(args.device),
        backend=args.backend,
        progress=not args.no_progress,
    )
    print(format_metrics_table(metrics, title=f"Zero-shot retrieval on the {args.dataset} test split"))
    if args.json:
        atomic_write_json(args.json, metrics)
        print(f"wrote {args.json}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from plmetric.checkpoint import atomic_write_json

    metrics = evaluate_on_test_split(
        dataset="digits", data_root=None, backbone="efficientnet_lite0", embedding_dim=0,
        image_size=args.image_size, device=resolve_device(args.device), progress=not args.no_progress,
    )
    print(format_metrics_table(metrics, title="Pretrained EfficientNet-Lite0 on the digits test classes (5-9)"))
    if args.json:
        atomic_write_json(args.json, metrics)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with all subcommands."""
    from plmetric import __version__

    parser = argparse.ArgumentParser(
        prog="plmetric",
        description="Unsupervised deep metric learning with piecewise-linear manifolds.",
    )
    parser.add_argument("--version", action="version", version=f"plmetric {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ev = sub.add_parser("eval", help="zero-shot retrieval metrics on a data set's test split")
    ev.add_argument("--dataset", required=True, choices=["cub200", "cars196", "sop", "folder", "digits"])
    ev.add_argument("--data-root", default=None, help="data set root in its official layout (not needed for digits)")
    ev.add_argument("--backbone", default="efficientnet_lite0", help="efficientnet_lite0, googlenet or resnet50")
    ev.add_argument("--checkpoint", default=None, help="a .safetensors model checkpoint written by plmetric")
    ev.add_argument("--weights", default=None, help="local backbone weights file (.safetensors/.pth) instead of a download")
    ev.add_argument("--embedding-dim", type=int, default=0, help="0 = raw pooled backbone features")
    ev.add_argument("--image-size", type=int, default=224)
    ev.add_argument("--ks", default=None, help="Recall@K cut-offs, e.g. 1,2,4,8 (default; SOP: 1,10,100,1000)")
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ev.add_argument("--backend", default="auto", choices=["auto", "torch", "faiss"], help="nearest-neighbour search")
    ev.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_cmd_eval)

    demo = sub.add_parser("demo", help="the main job on the embedded digits data set (no download)")
    demo.add_argument("--image-size", type=int, default=64)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--json", default=None)
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``plmetric`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("plmetric: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug or os.environ.get("PLMETRIC_DEBUG"):
            raise
        known = (CLIError, FileNotFoundError, ValueError, NotADirectoryError, PermissionError)
        from plmetric import models

        known += (getattr(models, "WeightsUnavailableError", CLIError),)
        if isinstance(err, known):
            print(f"plmetric: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

