"""``plmetric eval``: zero-shot retrieval metrics of a pretrained backbone or a checkpoint on a data
set's test split."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from plmetric.cli.common import (
    runtime_option,
    DATASET_CHOICES,
    CLIError,
    add_command,
    image_side,
    check_output,
    default_workers,
    batch_size,
    embedding_width,
    workers,
)
from plmetric.core.validation import MAX_NEIGHBOURS

DEFAULT_KS = {"sop": (1, 10, 100, 1000)}
FALLBACK_KS = (1, 2, 4, 8)
NMI_AUTO_MAX_CLASSES = 1000


def add_parser(subparsers: Any) -> None:
    ev = add_command(subparsers, "eval", "zero-shot retrieval metrics on a data set's test split")
    ev.add_argument("--dataset", required=True, choices=DATASET_CHOICES, help="data set in its official layout")
    ev.add_argument("--data-root", default=None, help="data set root in its official layout (not needed for digits)")
    ev.add_argument("--backbone", default="efficientnet_lite0", help="efficientnet_lite0/1/2, googlenet, resnet50 or timm:NAME")
    ev.add_argument("--checkpoint", default=None, help="a .safetensors model checkpoint written by plmetric")
    ev.add_argument(
        "--weights", default=None, help="local backbone weights file (.safetensors/.pth) instead of a download"
    )
    ev.add_argument("--embedding-dim", type=embedding_width, default=0, help="0 = raw pooled backbone features")
    ev.add_argument("--image-size", type=image_side, default=224, help="input side (a checkpoint's own wins)")
    ev.add_argument("--ks", default=None, help="Recall@K cut-offs, e.g. 1,2,4,8 (default; SOP: 1,10,100,1000)")
    ev.add_argument("--batch-size", type=batch_size, default=128, help="images per forward pass")
    ev.add_argument("--num-workers", type=workers, default=default_workers(), help="decoding workers")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    runtime_option(ev)
    ev.add_argument("--backend", default="auto", choices=["auto", "torch", "faiss"], help="nearest-neighbour search")
    ev.add_argument(
        "--nmi", default="auto", choices=["auto", "on", "off"], help="NMI by k-means (auto: only up to 1,000 classes)"
    )
    ev.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from plmetric.core.checkpoint import atomic_write_json
    from plmetric.core.devices import resolve_device

    if args.json:
        check_output(args.json, "--json", (".json",), (args.checkpoint, args.weights))
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
        nmi=args.nmi,
        progress=not args.no_progress,
        runtime=args.runtime,
    )
    print(format_metrics_table(metrics, title=f"Zero-shot retrieval on the {args.dataset} test split"))
    if args.json:
        atomic_write_json(args.json, metrics)
        print(f"wrote {args.json}")
    return 0


def parse_ks(text: str | None, dataset: str) -> tuple[int, ...]:
    """Parse ``--ks 1,2,4,8``; the default depends on the data set (SOP uses 1,10,100,1000)."""
    if text is None:
        return DEFAULT_KS.get(dataset, FALLBACK_KS)
    expected = f"--ks expects comma-separated positive integers (each <= {MAX_NEIGHBOURS}), got '{text[:80]}'"
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise CLIError(expected) from None
    if not ks or min(ks) < 1 or max(ks) > MAX_NEIGHBOURS:
        raise CLIError(expected)
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
    nmi: str = "auto",
    progress: bool = True,
    runtime: str = "auto",
) -> dict[str, Any]:
    """Embed a data set's zero-shot test split and compute retrieval metrics.

    Returns:
        A dict with ``recall@K``, ``map@r``, ``r_precision``, ``nmi``, ``num_images``,
        ``num_classes``, ``skipped_images``, ``seconds`` and the model description.
    """
    from plmetric.data.backbones import DEFAULT_EVAL_RESIZE, build_transform, create_model, eval_resize_of, load_model
    from plmetric.data.datasets import load_dataset
    from plmetric.evaluation.metrics import embed_dataset, evaluate

    start = time.perf_counter()
    eval_resize = DEFAULT_EVAL_RESIZE  # a pretrained backbone's; a checkpoint's own rule otherwise
    if checkpoint:
        model, meta = load_model(checkpoint)
        backbone = meta["backbone"]
        embedding_dim = int(meta["embedding_dim"])
        image_size = int(meta.get("image_size", image_size))
        eval_resize = eval_resize_of(meta)
    else:
        model = create_model(backbone, embedding_dim=embedding_dim, pretrained=True, weights=weights)
    transform = build_transform(backbone, image_size=image_size, train=False, eval_resize=eval_resize)
    splits = load_dataset(dataset, data_root, test_transform=transform)
    if splits.test is None:
        raise CLIError(f"--dataset {dataset} has no labelled test split to evaluate")
    model.to(device)
    embeddings, labels, _ = embed_dataset(
        model, splits.test, batch_size=batch_size, num_workers=num_workers, device=device, progress=progress,
        runtime=runtime,
    )
    if nmi == "auto":  # k-means with one cluster per class: slow for SOP's 11,316 classes
        nmi = "on" if splits.test.num_classes <= NMI_AUTO_MAX_CLASSES else "off"
    metrics: dict[str, Any] = evaluate(embeddings, labels, ks=ks, backend=backend, compute_nmi=nmi == "on")
    metrics["skipped_images"] = int(splits.test.skipped)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    metrics.update(
        dataset=dataset,
        backbone=backbone,
        embedding_dim=int(model.embedding_dim),
        image_size=image_size,
        checkpoint=checkpoint,
    )
    return metrics
