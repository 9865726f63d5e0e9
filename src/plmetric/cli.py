"""The ``plmetric`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_KS = {"sop": (1, 10, 100, 1000)}
FALLBACK_KS = (1, 2, 4, 8)
NMI_AUTO_MAX_CLASSES = 1000


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
    nmi: str = "auto",
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
        nmi=args.nmi,
        progress=not args.no_progress,
    )
    print(format_metrics_table(metrics, title=f"Zero-shot retrieval on the {args.dataset} test split"))
    if args.json:
        atomic_write_json(args.json, metrics)
        print(f"wrote {args.json}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from plmetric.config import load_config
    from plmetric.training import train

    overrides = list(args.set or [])
    if args.images:
        overrides += ["data.dataset=images", f"data.root={args.images}"]
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.method:
        overrides.append(f"train.method={args.method}")
    cfg = load_config(args.config, overrides)
    result = train(cfg, args.out, resume=args.resume, progress=not args.no_progress, stop_after_epochs=args.stop_after)
    _print_before_after(result.start_metrics, result.final_metrics, result.best_metrics, result.best_epoch)
    print(f"run folder: {result.out_dir}")
    return 0


def _print_before_after(start, final, best, best_epoch) -> None:
    if start is None:
        print("no labelled test split: evaluation skipped")
        return
    if final is None:
        print("stopped before the last epoch: continue with --resume")
        return
    keys = [k for k in start if k.startswith("recall@")]
    print("            " + "  ".join(f"{k:>9}" for k in keys))
    for name, metrics in (("start", start), ("final", final), (f"best (ep {best_epoch})", best)):
        print(f"{name:<12}" + "  ".join(f"{100 * metrics[k]:9.2f}" for k in keys))


def _cmd_demo(args: argparse.Namespace) -> int:
    from plmetric.checkpoint import atomic_write_json
    from plmetric.config import load_config
    from plmetric.paths import REPO_ROOT
    from plmetric.training import train

    config_path = Path(args.config) if args.config else REPO_ROOT / "configs" / "demo.yaml"
    cfg = load_config(config_path, list(args.set or []))
    print(f"plmetric demo: {config_path.name}, digits 0-4 train (no labels used), digits 5-9 test")
    result = train(cfg, args.out, progress=not args.no_progress)
    before, after = result.start_metrics["recall@1"], result.final_metrics["recall@1"]
    _print_before_after(result.start_metrics, result.final_metrics, result.best_metrics, result.best_epoch)
    verdict = "improved" if after > before else "did NOT improve"
    print(
        f"Recall@1 on the unseen digits: {100 * before:.2f} before training, {100 * after:.2f} after: "
        f"training {verdict} the pretrained start ({100 * (after - before):+.2f} points)."
    )
    if args.json:
        atomic_write_json(
            args.json,
            {
                "recall@1_before": before,
                "recall@1_after": after,
                "start": result.start_metrics,
                "final": result.final_metrics,
                "epochs": cfg.train.epochs,
                "run_dir": str(result.out_dir),
            },
        )
        print(f"wrote {args.json}")
    return 0 if after > before else 1


def _image_list(folder: str):
    from plmetric.data import load_unlabelled_folder

    return load_unlabelled_folder(folder).train


def _cmd_embed(args: argparse.Namespace) -> int:
    from plmetric.data import load_dataset
    from plmetric.evaluation import embed_dataset
    from plmetric.models import build_transform
    from plmetric.retrieval import load_embedding_model, save_embeddings

    model, description = load_embedding_model(args.checkpoint, args.backbone, args.embedding_dim, args.weights)
    image_size = description.get("image_size", args.image_size)
    transform = build_transform(description["backbone"], image_size=image_size, train=False)
    if args.images:
        dataset = _image_list(args.images)
    else:
        if not args.dataset:
            raise CLIError("give --images DIR or --dataset NAME (with --data-root)")
        splits = load_dataset(args.dataset, args.data_root)
        dataset = getattr(splits, args.split)
        if dataset is None:
            raise CLIError(f"--dataset {args.dataset} has no {args.split} split")
    dataset.transform = transform
    device = resolve_device(args.device)
    model.to(device)
    emb, labels, index = embed_dataset(
        model,
        dataset,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=device,
        progress=not args.no_progress,
    )
    paths = [str(dataset.paths[i]) if dataset.paths is not None else f"item:{i}" for i in index.tolist()]
    description["image_size"] = image_size
    save_embeddings(args.out, emb, labels, paths, description)
    print(f"wrote {len(paths):,} embeddings of dimension {emb.shape[1]} to {args.out}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    import torch

    from plmetric.models import build_transform
    from plmetric.retrieval import draw_results, load_embedding_model, load_embeddings, top_k

    database, _, paths, description = load_embeddings(args.index)
    query_path = Path(args.query)
    if not query_path.is_file():
        raise FileNotFoundError(f"query image not found: {query_path}")
    model, _ = load_embedding_model(
        description.get("checkpoint"),
        description["backbone"],
        int(description["embedding_dim"]),
        description.get("weights"),
    )
    transform = build_transform(description["backbone"], image_size=int(description.get("image_size", 224)))
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(query_path) as img:
            image = transform(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read query image {query_path}: {err}") from err
    with torch.no_grad():
        query = model.eval()(image.unsqueeze(0))
    if query.shape[1] != database.shape[1]:
        raise ValueError(f"query embedding has dimension {query.shape[1]}, the index {database.shape[1]}")
    scores, indices = top_k(query, database, args.top_k)
    results = [paths[i] for i in indices[0].tolist()]
    for rank_, (p, s) in enumerate(zip(results, scores[0].tolist(), strict=True), start=1):
        print(f"{rank_:3d}  {s:.4f}  {p}")
    out = args.out or f"{query_path.stem}_results.png"
    draw_results(str(query_path), results, scores[0].tolist(), out)
    print(f"wrote {out}")
    return 0


def _cmd_similarity_study(args: argparse.Namespace) -> int:
    """Correlation with the ground truth of PLM and competing similarity estimates (slide 14)."""
    from plmetric.similarity_cli import run

    return run(args)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="a .safetensors model written by 'plmetric train'")
    p.add_argument("--backbone", default="efficientnet_lite0", help="pretrained backbone when no checkpoint is given")
    p.add_argument("--weights", default=None, help="local backbone weights file")
    p.add_argument("--embedding-dim", type=int, default=0)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")


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
    ev.add_argument(
        "--weights", default=None, help="local backbone weights file (.safetensors/.pth) instead of a download"
    )
    ev.add_argument("--embedding-dim", type=int, default=0, help="0 = raw pooled backbone features")
    ev.add_argument("--image-size", type=int, default=224)
    ev.add_argument("--ks", default=None, help="Recall@K cut-offs, e.g. 1,2,4,8 (default; SOP: 1,10,100,1000)")
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ev.add_argument("--backend", default="auto", choices=["auto", "torch", "faiss"], help="nearest-neighbour search")
    ev.add_argument(
        "--nmi", default="auto", choices=["auto", "on", "off"], help="NMI by k-means (auto: only up to 1,000 classes)"
    )
    ev.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_cmd_eval)

    tr = sub.add_parser("train", help="train an embedding without labels")
    tr.add_argument("--config", default=None, help="YAML config, e.g. configs/cub200.yaml (default: built-in defaults)")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    tr.add_argument("--out", required=True, help="run folder (config, log, checkpoints, plots)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    tr.add_argument(
        "--stop-after", type=int, default=None, metavar="N", help="stop after N epochs of this call (resume later)"
    )
    tr.add_argument("--images", default=None, help="train on an unlabelled folder of images (searched recursively)")
    tr.add_argument("--data-root", default=None, help="shortcut for --set data.root=PATH")
    tr.add_argument(
        "--method",
        default=None,
        choices=["plm", "stml", "none"],
        help="shortcut for --set train.method=...: plm, stml (the peer) or none (evaluate the untrained start)",
    )
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=_cmd_train)

    em = sub.add_parser("embed", help="images -> embeddings file (.safetensors)")
    _model_options(em)
    em.add_argument("--images", default=None, help="a folder of images (searched recursively)")
    em.add_argument("--dataset", default=None, choices=["cub200", "cars196", "sop", "folder", "digits"])
    em.add_argument("--data-root", default=None)
    em.add_argument("--split", default="test", choices=["train", "test"])
    em.add_argument("--out", required=True, help="output .safetensors file")
    em.set_defaults(func=_cmd_embed)

    ix = sub.add_parser("index", help="a folder of images -> a saved nearest-neighbour index")
    ix.add_argument("images", help="folder of images (searched recursively)")
    _model_options(ix)
    ix.add_argument("--out", required=True, help="output index file (.safetensors)")
    ix.set_defaults(func=_cmd_embed, dataset=None, data_root=None, split="train")

    se = sub.add_parser("search", help="an image -> its top-k most similar images in an index")
    se.add_argument("query", help="query image file")
    se.add_argument("--index", required=True, help="index written by 'plmetric index'")
    se.add_argument("--top-k", type=int, default=8)
    se.add_argument("--out", default=None, help="PNG grid of the results (default: QUERY_results.png)")
    se.set_defaults(func=_cmd_search)

    demo = sub.add_parser("demo", help="the main job: train on the embedded digits (CPU, no download), before/after")
    demo.add_argument("--config", default=None, help="default: configs/demo.yaml")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    demo.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    demo.add_argument("--json", default=None, help="write recall@1_before / recall@1_after to this file")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_cmd_demo)

    ss = sub.add_parser(
        "similarity-study", help="how well PLM and competing similarity estimates agree with the labels (slide 14)"
    )
    from plmetric.similarity_cli import add_similarity_study_arguments

    add_similarity_study_arguments(ss)
    ss.set_defaults(func=_cmd_similarity_study)
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
        from plmetric.models import WeightsUnavailableError
        from plmetric.training import NonFiniteLossError

        known += (WeightsUnavailableError, NonFiniteLossError)
        if isinstance(err, known):
            print(f"plmetric: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
