"""The ``plmetric`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
import typing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_KS = {"sop": (1, 10, 100, 1000)}
FALLBACK_KS = (1, 2, 4, 8)
NMI_AUTO_MAX_CLASSES = 1000
DEMO_OUT = "runs/demo"


class CLIError(Exception):
    """A user-facing error: printed without a traceback."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (exit status 2), naming the option."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def check_output(
    path: str | os.PathLike,
    option: str,
    suffixes: Sequence[str],
    inputs: Sequence[str | os.PathLike | None] = (),
    replaceable: Callable[[Path], bool] | None = None,
) -> Path:
    """Check an output file before any work: its suffix, that it is none of the command's inputs,
    and (with ``replaceable``) that an existing file there is one this command may replace.

    Raises:
        CLIError: naming ``option``.
    """
    out = Path(path).expanduser()
    if out.suffix.lower() not in suffixes:
        raise CLIError(f"{option} {path}: expected a file name ending in {' or '.join(suffixes)}")
    if out.is_dir():
        raise CLIError(f"{option} {path} is a folder; expected a file name ending in {' or '.join(suffixes)}")
    resolved = out.resolve()
    for item in inputs:
        if item is not None and Path(item).expanduser().resolve() == resolved:
            raise CLIError(f"{option} {path} is also an input of this command; writing it would destroy it")
    if out.exists() and replaceable is not None and not replaceable(out):
        raise CLIError(f"{option} {path} exists and is not a file this command writes; choose another {option}")
    return out


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
    from plmetric.devices import resolve_device

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
    )
    print(format_metrics_table(metrics, title=f"Zero-shot retrieval on the {args.dataset} test split"))
    if args.json:
        atomic_write_json(args.json, metrics)
        print(f"wrote {args.json}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from plmetric.config import load_config, set_value
    from plmetric.training import CONFIG_FILE, train

    overrides = list(args.set or [])
    if args.images:
        overrides.append("data.dataset=images")
    if args.method:
        overrides.append(f"train.method={args.method}")
    config_path = args.config
    if args.resume and config_path is None:  # a run resumes from its own config (plus any --set)
        config_path = Path(args.out) / CONFIG_FILE
        if not config_path.is_file():
            raise CLIError(f"--resume: {args.out} holds no run to resume (no {CONFIG_FILE}); start it without --resume")
    preset = args.images and config_path is None  # a folder without a config: the folder preset
    if preset:
        config_path = FOLDER_PRESET
    cfg = load_config(config_path, overrides)
    root = args.images or args.data_root
    if root is not None:  # set directly, not through YAML: any folder name is a path
        set_value(cfg, "data.root", str(root))
        cfg.validate()
    if preset:
        _fit_preset_to_folder(cfg, Path(args.images), overrides)
    result = train(
        cfg,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        stop_after_epochs=args.stop_after,
    )
    _print_before_after(result.start_metrics, result.final_metrics, result.best_metrics, result.best_epoch)
    if result.skipped_images:
        print(f"left out {len(result.skipped_images)} unreadable training image(s): listed in summary.json")
    print(f"run folder: {result.out_dir}")
    _print_selected_and_next(cfg, result, args.images)
    return 0


FOLDER_PRESET_NAME = "configs/folder.yaml"
FOLDER_PRESET = Path(__file__).resolve().parents[2] / FOLDER_PRESET_NAME
PROXIES_PER_IMAGE = 0.25  # the preset's proxies: at most a quarter of the folder's images


def _fit_preset_to_folder(cfg: Any, folder: Path, overrides: Sequence[str]) -> None:
    """Fit the folder preset's sizes to the number of images in ``folder`` (a listing, nothing
    decoded): batch ≤ n (a multiple of the neighbours per seed), proxies ≤ n/4, embedding ≤ n
    dimensions, selection neighbours < n. Keys the user set with ``--set`` are left alone."""
    from plmetric.config import set_value
    from plmetric.data import find_images

    if not folder.is_dir():
        return  # the data loader names the problem
    n = len(find_images(folder))
    if n == 0:
        return
    given = {item.split("=", 1)[0].strip() for item in overrides}
    k = cfg.train.neighbours_per_seed
    fitted = {
        "train.batch_size": min(cfg.train.batch_size, max(k, n - n % k)),
        "plm.num_proxies": min(cfg.plm.num_proxies, int(PROXIES_PER_IMAGE * n)),
        "model.embedding_dim": min(cfg.model.embedding_dim, n),
        "train.select_k": min(cfg.train.select_k, max(n - 1, 1)),
    }
    changed = []
    for key, value in fitted.items():
        section, name = key.split(".")
        if key not in given and getattr(getattr(cfg, section), name) != value:
            set_value(cfg, key, value)
            changed.append(f"{key}={value}")
    cfg.validate()
    fit = f", fitted: {' '.join(changed)}" if changed else ""
    print(f"{FOLDER_PRESET_NAME} for {n:,} images{fit} (change any with --set KEY=VALUE)")


def _print_selected_and_next(cfg: Any, result: Any, images: str | None) -> None:
    """Name the model to use (the label-free pick) and the next command."""
    from plmetric.runs import MODEL_FILE, SELECTED_MODEL_FILE

    if result.history and result.history[-1]["epoch"] != cfg.train.epochs:
        return  # stopped early (--stop-after): nothing is final yet
    rule = cfg.train.select if result.history else "final"  # a method that does not train: its start
    model = result.out_dir / (SELECTED_MODEL_FILE if rule != "final" else MODEL_FILE)
    if rule != "final" and result.selected_epoch == 0:
        print(
            f"training did not improve the label-free criterion {rule} over the untrained start: "
            f"{model} is the start (the last epoch is {result.out_dir / MODEL_FILE})"
        )
    elif rule != "final":
        print(f"model: {model} (epoch {result.selected_epoch} of {cfg.train.epochs}, picked without labels by {rule})")
    else:
        print(f"model: {model}")
    folder = images if images else "IMAGES_DIR"
    print(f"next:  plmetric index {folder} --checkpoint {model} --out {result.out_dir / 'index.safetensors'}")


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
    # the demo replaces its own previous run in the default folder; any other --out is protected
    overwrite = args.overwrite or Path(args.out) == Path(DEMO_OUT)
    result = train(cfg, args.out, progress=not args.no_progress, overwrite=overwrite)
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


def _is_index(path: Path) -> bool:
    from plmetric.retrieval import read_index_metadata

    return read_index_metadata(path) is not None


def _embed_images(args: argparse.Namespace, model: Any, description: dict[str, Any], dataset: Any):
    """Embed every readable image of ``dataset`` the way ``description`` says: (embeddings, labels,
    paths, unreadable count, whether this process writes the output).

    Under torchrun (``WORLD_SIZE`` > 1) the images are sharded over the ranks (rank r takes items
    r, r + W, ...), embedded, and gathered in data set order (gloo on the CPU, NCCL on GPUs): every
    rank gets the whole result, and only rank 0 writes."""
    from plmetric import distributed as dist_utils
    from plmetric.devices import resolve_device
    from plmetric.evaluation import embed_dataset
    from plmetric.models import build_transform
    from plmetric.passes import embed_distributed

    dataset.transform = build_transform(description["backbone"], image_size=description["image_size"], train=False)
    device = resolve_device(args.device)
    started = dist_utils.init_from_env(str(device))
    try:
        model.to(device)
        if dist_utils.world_size() > 1:
            emb, labels, index = embed_distributed(
                model, dataset, batch_size=args.batch_size, num_workers=args.num_workers, device=device
            )
        else:
            emb, labels, index = embed_dataset(
                model,
                dataset,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                device=device,
                progress=not args.no_progress,
            )
        writer = dist_utils.is_main_process()
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    paths = [dataset.describe(i) if dataset.paths is not None else f"item:{i}" for i in index.tolist()]
    return emb, labels, paths, len(dataset) - len(paths), writer


def _cmd_embed(args: argparse.Namespace) -> int:
    from plmetric.data import load_dataset, load_unlabelled_folder
    from plmetric.embedding_files import SUFFIXES, require_parquet, sidecars, write_embeddings
    from plmetric.retrieval import load_embedding_model, write_index

    # every check on the output comes before the first image is read
    out = check_output(args.out, "--out", SUFFIXES, (args.checkpoint, args.weights), _replaceable_embeddings)
    for sidecar in sidecars(out):  # X.paths.txt, X.json: replaced only together with their X.npy
        check_output(
            sidecar, "--out", (sidecar.suffix,), (args.checkpoint, args.weights), lambda _: _replaceable_embeddings(out)
        )
    if out.suffix.lower() == ".parquet":
        require_parquet()
    if args.images or args.paths_file:
        if args.dataset:
            raise CLIError("give --images/--paths-file or --dataset, not both")
        if len(args.images or []) == 1 and not args.paths_file and Path(args.images[0]).is_dir():
            dataset = load_unlabelled_folder(args.images[0]).train
        else:
            from plmetric.data import ImageDataset

            listed = _image_paths(args.images or [], args.paths_file, "--images")
            dataset = ImageDataset([str(p.resolve()) for p in listed], None, None, "images")
    else:
        if not args.dataset:
            raise CLIError("give --images DIR|FILE..., --paths-file or --dataset NAME (with --data-root)")
        splits = load_dataset(args.dataset, args.data_root)
        dataset = getattr(splits, args.split)
        if dataset is None:
            raise CLIError(f"--dataset {args.dataset} has no {args.split} split")
    model, description = load_embedding_model(
        args.checkpoint, args.backbone, args.embedding_dim, args.weights, image_size=args.image_size
    )
    emb, labels, paths, unreadable, writer = _embed_images(args, model, description, dataset)
    if emb.shape[0] == 0:
        raise CLIError(f"no image could be read ({unreadable} unreadable): nothing to write to {out}")
    if not writer:
        return 0  # torchrun: rank 0 writes the gathered result
    if out.suffix.lower() == ".safetensors":
        write_index(out, emb, labels, paths, description)
    else:
        write_embeddings(out, emb, labels, paths, description)
    skipped = f"; left out {unreadable} unreadable image(s)" if unreadable else ""
    beside = "".join(f" + {p.name}" for p in sidecars(out))
    print(f"wrote {len(paths):,} embeddings of dimension {emb.shape[1]} to {out}{beside}{skipped}")
    return 0


def _replaceable_embeddings(path: Path) -> bool:
    """``embed`` replaces only its own outputs: an index, or an export of :mod:`plmetric.embedding_files`."""
    from plmetric.embedding_files import is_embedding_export

    return _is_index(path) if path.suffix.lower() == ".safetensors" else is_embedding_export(path)


_BUILD_OPTIONS = (
    ("faiss", "--faiss"),
    ("nlist", "--nlist"),
    ("hnsw_m", "--hnsw-m"),
    ("ef_construction", "--ef-construction"),
)


def _index_options(args: argparse.Namespace) -> Any:
    """The ``IndexOptions`` of ``plmetric index``; an option of another kind than --faiss is an error."""
    from plmetric.options import IndexOptions

    kind = args.faiss or IndexOptions.kind
    uses = {"nlist": ("ivf",), "nprobe": ("ivf",), "hnsw_m": ("hnsw", "auto"), "ef_construction": ("hnsw", "auto")}
    uses["ef_search"] = uses["hnsw_m"]
    for dest, kinds in uses.items():
        if getattr(args, dest) is not None and kind not in kinds:
            option = "--" + dest.replace("_", "-")
            raise CLIError(f"{option} applies to --faiss {' or '.join(kinds)}, not --faiss {kind}")
    options = IndexOptions(
        kind=kind,
        nlist=args.nlist,
        nprobe=args.nprobe,
        hnsw_m=IndexOptions.hnsw_m if args.hnsw_m is None else args.hnsw_m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
    )
    options.validate("--faiss: ")
    return options


def _faiss_note(plan: Any, faiss_path: Path | None) -> str:
    if plan is None or faiss_path is None:
        return "exact search (no faiss index)"
    params = ", ".join(f"{k} {v}" for k, v in plan.params.items() if k != "trained_on")
    return f"faiss {plan.kind} index{f' ({params})' if params else ''} in {faiss_path}"


def _cmd_index(args: argparse.Namespace) -> int:
    from plmetric import ann
    from plmetric.data import load_unlabelled_folder
    from plmetric.retrieval import load_embedding_model, write_index

    if args.add_to:
        return _index_add(args)
    if args.out is None:
        raise CLIError("give --out INDEX.safetensors (the index to write), or --add-to INDEX.safetensors to extend one")
    # every check on the output and the options comes before the first image is read
    out = check_output(args.out, "--out", (".safetensors",), (args.checkpoint, args.weights), _is_index)
    options = _index_options(args)
    dataset = load_unlabelled_folder(args.images).train
    if ann.plan_index(len(dataset), options) is not None:  # faiss installed, nlist possible
        try:
            ann.import_faiss()
        except ann.FaissUnavailableError as err:
            raise CLIError(f"--faiss {options.kind}: {err}") from None
    model, description = load_embedding_model(
        args.checkpoint, args.backbone, args.embedding_dim, args.weights, image_size=args.image_size
    )
    emb, labels, paths, unreadable, writer = _embed_images(args, model, description, dataset)
    if emb.shape[0] == 0:
        raise CLIError(f"no image could be read ({unreadable} unreadable): nothing to write to {out}")
    if not writer:
        return 0  # torchrun: rank 0 builds and writes the index of the gathered result
    plan = ann.plan_index(len(paths), options)
    _, faiss_path = write_index(out, emb, labels, paths, description, plan)
    skipped = f"; left out {unreadable} unreadable image(s)" if unreadable else ""
    print(f"wrote {len(paths):,} embeddings of dimension {emb.shape[1]} to {out}{skipped}")
    print(_faiss_note(plan, faiss_path))
    return 0


def _index_add(args: argparse.Namespace) -> int:
    """``plmetric index DIR --add-to INDEX``: embed the images of DIR that INDEX lacks, append them."""
    import torch

    from plmetric.data import ImageDataset, load_unlabelled_folder
    from plmetric.retrieval import (
        check_same_model,
        extend_index,
        load_embeddings,
        load_faiss_index,
        model_from_description,
        new_images,
        read_index_metadata,
    )

    source = Path(args.add_to).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"--add-to: index not found: {source}")
    meta = read_index_metadata(source)
    if meta is None:
        raise ValueError(f"--add-to {source} is not a plmetric index (expected a file written by plmetric index)")
    kind = (meta.get("ann") or {}).get("kind", "none")
    for dest, option in _BUILD_OPTIONS:
        if getattr(args, dest) is not None:
            raise CLIError(
                f"{option}: --add-to keeps the index's own kind and structure (--faiss {kind}); "
                "to change them build a new index with --out"
            )
    if (args.nprobe is not None and kind != "ivf") or (args.ef_search is not None and kind != "hnsw"):
        option = "--nprobe" if args.nprobe is not None else "--ef-search"
        raise CLIError(f"{option} does not apply to {source}: its index kind is {kind}")
    recorded = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    inputs = (args.checkpoint, args.weights, recorded.get("checkpoint"), recorded.get("weights"))
    out = check_output(args.out or source, "--out", (".safetensors",), inputs, _is_index)
    _, _, indexed, description = load_embeddings(source)
    check_same_model(description, source, args.checkpoint, args.weights)
    model = model_from_description(description, source)  # the recorded checkpoint, unchanged
    faiss_index = load_faiss_index(source, meta)  # faiss installed, the .faiss file the right one
    candidates = load_unlabelled_folder(args.images).train
    fresh, present = new_images([Path(p) for p in candidates.paths], indexed)
    in_place = out.resolve() == source.resolve()
    if not fresh and in_place and args.nprobe is None and args.ef_search is None:
        print(f"added 0 images to {source} (still {len(indexed):,}); skipped {present:,} already in the index")
        return 0
    dataset = ImageDataset(fresh, None, None, candidates.name)
    if fresh:
        emb, labels, paths, skipped, writer = _embed_images(args, model, description, dataset)
        if not writer:
            return 0  # torchrun: rank 0 extends the index with the gathered result
    else:
        emb, labels, paths, skipped = torch.empty(0, int(meta["dim"])), torch.empty(0, dtype=torch.long), [], 0
    unreadable = f"; left out {skipped} unreadable image(s)" if skipped else ""
    if not paths and in_place and args.nprobe is None and args.ef_search is None:
        print(
            f"added 0 images to {source} (still {len(indexed):,}); skipped {present:,} already in the index{unreadable}"
        )
        return 0
    count, faiss_path, plan = extend_index(
        source, out, emb, labels, paths, faiss_index, nprobe=args.nprobe, ef_search=args.ef_search
    )
    print(f"added {len(paths):,} images to {out} (now {count:,}); skipped {present:,} already in the index{unreadable}")
    if plan is not None:
        print(_faiss_note(plan, faiss_path))
        trained_on = plan.params.get("trained_on")
        if trained_on and count > 4 * trained_on:
            print(
                f"note: the IVF cells were trained on {trained_on:,} vectors; the index now holds {count:,}: "
                "rebuilding it (plmetric index --faiss ivf --out ...) would restore the best recall"
            )
    return 0


def _query_paths(args: argparse.Namespace) -> list[Path]:
    """The query images: files, folders (searched recursively) and the lines of ``--queries-file``."""
    return _image_paths(args.query, args.queries_file, "query", "--queries-file")


def _image_paths(
    items: Sequence[str], listing: str | None, what: str, listing_option: str = "--paths-file"
) -> list[Path]:
    """Image files from ``items`` (files, or folders searched recursively) and the lines of the text
    file ``listing`` (one path per line; blank lines and ``#`` comments skipped), in that order."""
    from plmetric.data import IMAGE_EXTENSIONS, find_images

    entries = [Path(item) for item in items]
    if listing:
        listing_path = Path(listing)
        if not listing_path.is_file():
            raise FileNotFoundError(f"{listing_option} not found: {listing_path}")
        try:
            lines = listing_path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{listing_option} {listing_path}: not UTF-8 text ({err.reason} at byte {err.start})"
            ) from None
        entries += [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    paths: list[Path] = []
    for item in entries:
        if item.is_dir():
            found = find_images(item)
            if not found:
                raise ValueError(
                    f"{what} folder {item} holds no images (extensions {' '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"{what} image not found: {item}")
    if not paths:
        raise CLIError(f"give at least one {what} image, folder or {listing_option}")
    return paths


def _grid_names(queries: list[Path], out_dir: Path) -> list[Path]:
    """``<stem>_results.png`` in ``out_dir`` for every query; repeated stems get a counter."""
    names, used = [], set()
    for n, query in enumerate(queries):
        name = f"{query.stem}_results.png"
        if name in used:
            name = f"{query.stem}_{n}_results.png"
        used.add(name)
        names.append(out_dir / name)
    return names


def _search_outputs(
    args: argparse.Namespace, queries: list[Path]
) -> tuple[list[Path | None], Path | None, Path | None]:
    """``search``'s outputs, checked before any work: a grid per query (``--out`` for one query,
    ``--out-dir`` for several, None where none is drawn), ``--json`` and ``--csv``."""
    inputs = [args.index, args.queries_file, *queries]
    if args.out and len(queries) > 1:
        raise CLIError("--out names one grid: with several queries give --out-dir DIR (a grid per query)")
    grids: list[Path | None] = [None] * len(queries)
    if len(queries) == 1 and not args.out_dir:
        out = Path(args.out) if args.out else Path(f"{queries[0].stem}_results.png")
        grids = [check_output(out, "--out", (".png",), inputs)]
    elif args.out_dir:
        out_dir = Path(args.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise CLIError(f"--out-dir {out_dir} is a file; expected a folder for the grids")
        grids = [check_output(g, "--out-dir", (".png",), inputs) for g in _grid_names(queries, out_dir)]
    json_out = check_output(args.json, "--json", (".json",), inputs) if args.json else None
    csv_out = check_output(args.csv, "--csv", (".csv",), inputs) if args.csv else None
    return grids, json_out, csv_out


def _write_search_tables(
    args: argparse.Namespace,
    json_out: Path | None,
    csv_out: Path | None,
    report: list[dict[str, Any]],
    rows: list[tuple[str, int, str, float]],
    unreadable: list[str],
) -> None:
    """Write ``--json`` (every query's ranked results) and ``--csv`` (query, rank, path, score)."""
    from plmetric.checkpoint import atomic_write_bytes, atomic_write_json

    if json_out is not None:
        atomic_write_json(
            json_out,
            {
                "index": str(Path(args.index).resolve()),
                "top_k": args.top_k,
                "queries": report,
                "unreadable_queries": unreadable,
            },
        )
    if csv_out is not None:
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["query", "rank", "path", "score"])
        writer.writerows(rows)
        atomic_write_bytes(csv_out, buffer.getvalue().encode())


def _embed_queries(
    args: argparse.Namespace, queries: list[Path], model: Any, transform: Callable
) -> tuple[Any, list[int]]:
    """The query embeddings and the positions of the queries they belong to. One query: any
    unreadable or oversized file is an error; several: unreadable ones are left out."""
    import torch

    from plmetric.data import ImageDataset
    from plmetric.evaluation import embed_dataset
    from plmetric.retrieval import read_query_image

    if len(queries) == 1:
        with torch.no_grad():
            return model.eval()(read_query_image(queries[0], transform).unsqueeze(0)), [0]
    dataset = ImageDataset(queries, None, transform, "queries")
    embeddings, _, index = embed_dataset(
        model, dataset, batch_size=args.batch_size, num_workers=args.num_workers, progress=False
    )
    if index.numel() == 0:
        raise ValueError(f"none of the {len(queries)} query images could be read")
    return embeddings, index.tolist()


def _cmd_search(args: argparse.Namespace) -> int:
    from plmetric.models import build_transform
    from plmetric.retrieval import draw_results, load_embeddings, load_faiss_index, model_from_description, search

    if not Path(args.index).is_file():  # the index first: without it no query matters
        raise FileNotFoundError(f"index/embeddings file not found: {args.index}")
    queries = _query_paths(args)
    grids, json_out, csv_out = _search_outputs(args, queries)
    database, _, paths, description = load_embeddings(args.index)
    faiss_index = None if args.exact else load_faiss_index(args.index)  # faiss there, the .faiss file its own
    indexed = {Path(p).resolve() for p in paths}
    for out in (*grids, json_out, csv_out):
        if out is not None and out.expanduser().resolve() in indexed:
            raise CLIError(f"{out} is an image of the index; writing it would destroy it")
    transform = build_transform(description["backbone"], image_size=int(description.get("image_size", 224)))
    model = model_from_description(description, args.index)
    embeddings, found = _embed_queries(args, queries, model, transform)
    if embeddings.shape[1] != database.shape[1]:
        raise ValueError(
            f"query embedding has dimension {embeddings.shape[1]}, the index {args.index} {database.shape[1]}"
        )
    scores, indices = search(
        args.index, embeddings, args.top_k, database, faiss_index, nprobe=args.nprobe, ef_search=args.ef_search
    )
    report, rows, moved, shown = [], [], 0, 0
    for row, q in enumerate(found):
        hit = indices[row] >= 0  # an approximate index may find fewer than --top-k
        results = [paths[i] for i in indices[row][hit].tolist()]
        values = scores[row][hit].tolist()
        shown += len(results)
        missing = [not Path(p).is_file() for p in results]
        moved += sum(missing)
        if len(found) > 1:
            print(f"query {queries[q]}")
        for rank_, (p, value, gone) in enumerate(zip(results, values, missing, strict=True), start=1):
            print(f"{rank_:3d}  {value:.4f}  {p}{'  (missing: moved or deleted since indexing)' if gone else ''}")
            rows.append((str(queries[q]), rank_, p, value))
        report.append(
            {
                "query": str(queries[q].resolve()),
                "results": [
                    {"rank": r, "path": p, "score": v, "missing": g}
                    for r, (p, v, g) in enumerate(zip(results, values, missing, strict=True), start=1)
                ],
            }
        )
        if grids[q] is not None:
            draw_results(str(queries[q]), results, values, grids[q])
    if moved:
        print(
            f"plmetric: warning: {moved} of {shown} results no longer exist where {args.index} "
            "recorded them: the images moved or were deleted since the index was built; rebuild it",
            file=sys.stderr,
        )
    read = set(found)
    unreadable = [str(query) for q, query in enumerate(queries) if q not in read]
    _write_search_tables(args, json_out, csv_out, report, rows, unreadable)
    written = [str(g) for g in grids if g is not None] + [str(o) for o in (json_out, csv_out) if o is not None]
    if written:
        print(f"wrote {', '.join(written) if len(written) <= 3 else f'{len(written)} files'}")
    elif len(queries) > 1:
        print("no grids drawn: give --out-dir DIR for one grid per query")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from plmetric.export import FORMATS, export_model, is_export, read_sidecar, require_backend, sidecar_path

    inputs = (args.checkpoint,)
    out = check_output(args.out, "--out", FORMATS[args.format], inputs, is_export)
    check_output(sidecar_path(out), "--out", (".json",), inputs, lambda p: read_sidecar(p) is not None)
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    require_backend(args.format)
    meta = export_model(args.checkpoint, out, args.format, image_size=args.image_size)
    print(
        f"wrote {out} ({args.format}: {meta['backbone']}, {meta['image_size']} px input, "
        f"{meta['output_dim']}-d L2-normalised output; max |diff| to PyTorch {meta['check']['max_abs_diff']:.1e}) "
        f"and {sidecar_path(out)}"
    )
    return 0


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port number from 1 to 65535, got '{text}'") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port number from 1 to 65535, got {value}")
    return value


def _cmd_serve(args: argparse.Namespace) -> int:
    from plmetric.serve import ServeDependencyError, serve

    try:
        serve(args.index, host=args.host, port=args.port, top_k=args.top_k)
    except ServeDependencyError as err:
        raise CLIError(str(err)) from None
    return 0


def _cmd_similarity_study(args: argparse.Namespace) -> int:
    """Correlation with the ground truth of PLM and competing similarity estimates (slide 14)."""
    from plmetric.study import similarity_study_command

    return similarity_study_command(args)


def _similarity_study_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``plmetric similarity-study`` on an argparse (sub)parser."""
    src = p.add_argument_group("input: a data set + backbone (features embedded once and cached), or a features file")
    src.add_argument("--dataset", default=None, choices=["cub200", "cars196", "sop", "folder", "digits"])
    src.add_argument("--data-root", default=None, help="data set root in its official layout")
    src.add_argument("--split", default="both", choices=["train", "test", "both"], help="default: both halves")
    src.add_argument("--backbone", default="efficientnet_lite0", help="pretrained backbone (raw pooled features)")
    src.add_argument("--weights", default=None, help="local backbone weights file instead of the packaged ones")
    src.add_argument("--image-size", type=int, default=224)
    src.add_argument("--cache-dir", default=None, help="feature cache (default ~/.cache/plmetric/features)")
    src.add_argument("--embed-batch-size", type=int, default=64)
    src.add_argument("--num-workers", type=int, default=min(2, os.cpu_count() or 1))
    src.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (embedding only)")
    src.add_argument(
        "--features", default=None, help="features file (.npy (N, d) or .safetensors) instead of a data set"
    )
    src.add_argument("--labels", default=None, help="labels file (.npy/.txt, N integers) for --features")
    st = p.add_argument_group("study")
    st.add_argument(
        "--estimators",
        default="all",
        help="comma-separated names of plmetric.estimators.ESTIMATORS (a wrong one lists them), or all",
    )
    st.add_argument("--set", action="append", metavar="EST.OPT=VALUE", help="estimator option, e.g. plm.tau=1.0")
    st.add_argument("--batch-size", type=int, default=120, help="B, points per neighbourhood batch")
    st.add_argument("--neighbours-per-seed", "-k", type=int, default=5, help="k: a seed and its k-1 neighbours")
    st.add_argument("--batches", type=int, default=50, help="number of batches (0: whole set only)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--no-whole-set", action="store_true", help="skip the whole-set measurement")
    st.add_argument("--no-normalize", action="store_true", help="do not L2-normalise the features")
    st.add_argument(
        "--sweep",
        action="store_true",
        help="also sweep PLM's N_α, N_β, m, τ, k and the baselines' own options, one at a time",
    )
    st.add_argument(
        "--sweep-whole-set", action="store_true", help="sweeps: also measure on the whole set (slow: N×N per setting)"
    )
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--plot", default=None, help="bar chart PNG (default: the --json path with .png)")
    p.add_argument("--no-progress", action="store_true")


DATASET_CHOICES = ["cub200", "cars196", "sop", "folder", "digits"]


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="a .safetensors model written by 'plmetric train'")
    p.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        help="pretrained backbone when no checkpoint is given: efficientnet_lite0, googlenet or resnet50",
    )
    p.add_argument("--weights", default=None, help="local backbone weights file (.safetensors/.pth) for --backbone")
    p.add_argument(
        "--embedding-dim",
        type=non_negative_int,
        default=0,
        help="0 = the backbone's pooled features (the only choice without --checkpoint)",
    )
    p.add_argument("--image-size", type=positive_int, default=224, help="input side (a checkpoint's own wins)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per forward pass")
    p.add_argument("--num-workers", type=non_negative_int, default=min(4, os.cpu_count() or 1), help="decoding workers")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _index_arguments(p: argparse.ArgumentParser) -> None:
    """The faiss options of ``plmetric index`` (defaults from ``plmetric.options.IndexOptions``; unset
    ones are chosen from the number of vectors n by ``plmetric.ann.plan_index``)."""
    from plmetric import ann
    from plmetric.options import INDEX_KINDS, IndexOptions

    group = p.add_argument_group('search index (faiss, optional: pip install "plmetric[faiss]")')
    group.add_argument(
        "--faiss",
        default=None,
        choices=INDEX_KINDS,
        help=f"default: {IndexOptions.kind} = exact torch search (no extra file); auto = exact below "
        f"{ann.AUTO_EXACT_BELOW:,} vectors, else {ann.AUTO_KIND}; flat = faiss exact; ivf, hnsw = faiss approximate "
        "(a .faiss file beside the index; inner product of the L2-normalised embeddings = their cosine)",
    )
    group.add_argument(
        "--nlist",
        type=positive_int,
        default=None,
        help="IVF cells (default: round(4 sqrt(n)), at most n / 39)",
    )
    group.add_argument(
        "--nprobe",
        type=positive_int,
        default=None,
        help="IVF cells scanned per query (default: ceil(nlist / 16), at least 8); search --nprobe overrides it",
    )
    group.add_argument(
        "--hnsw-m",
        type=_int_at_least(2),
        default=None,
        help=f"HNSW links per vector (default: {IndexOptions.hnsw_m})",
    )
    group.add_argument(
        "--ef-construction",
        type=positive_int,
        default=None,
        help="HNSW build beam (default: 80 below 100k vectors, 128 below 1M, else 200)",
    )
    group.add_argument(
        "--ef-search",
        type=positive_int,
        default=None,
        help="HNSW search beam, at least --top-k (default: 64 below 1M vectors, else 128); "
        "search --ef-search overrides it",
    )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default (unless it is None or False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with all subcommands."""
    from plmetric import __version__
    from plmetric.methods import method_names

    parser = OneLineArgumentParser(
        prog="plmetric",
        description="Unsupervised deep metric learning with piecewise-linear manifolds.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"plmetric {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)

    ev = command("eval", "zero-shot retrieval metrics on a data set's test split")
    ev.add_argument("--dataset", required=True, choices=DATASET_CHOICES, help="data set in its official layout")
    ev.add_argument("--data-root", default=None, help="data set root in its official layout (not needed for digits)")
    ev.add_argument("--backbone", default="efficientnet_lite0", help="efficientnet_lite0, googlenet or resnet50")
    ev.add_argument("--checkpoint", default=None, help="a .safetensors model checkpoint written by plmetric")
    ev.add_argument(
        "--weights", default=None, help="local backbone weights file (.safetensors/.pth) instead of a download"
    )
    ev.add_argument("--embedding-dim", type=non_negative_int, default=0, help="0 = raw pooled backbone features")
    ev.add_argument("--image-size", type=positive_int, default=224, help="input side (a checkpoint's own wins)")
    ev.add_argument("--ks", default=None, help="Recall@K cut-offs, e.g. 1,2,4,8 (default; SOP: 1,10,100,1000)")
    ev.add_argument("--batch-size", type=positive_int, default=128, help="images per forward pass")
    ev.add_argument(
        "--num-workers", type=non_negative_int, default=min(4, os.cpu_count() or 1), help="decoding workers"
    )
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ev.add_argument("--backend", default="auto", choices=["auto", "torch", "faiss"], help="nearest-neighbour search")
    ev.add_argument(
        "--nmi", default="auto", choices=["auto", "on", "off"], help="NMI by k-means (auto: only up to 1,000 classes)"
    )
    ev.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=_cmd_eval)

    tr = command("train", "train an embedding without labels")
    tr.add_argument("--config", default=None, help="YAML config, e.g. configs/cub200.yaml (default: built-in defaults)")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    tr.add_argument("--out", required=True, help="run folder (config, log, checkpoints, plots)")
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out exactly where it stopped (reads its config.yaml; "
        "--set train.epochs=N extends a finished run)",
    )
    tr.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    tr.add_argument(
        "--stop-after",
        type=positive_int,
        default=None,
        metavar="N",
        help="stop after N epochs of this call (resume later)",
    )
    tr.add_argument("--images", default=None, help="train on an unlabelled folder of images (searched recursively)")
    tr.add_argument("--data-root", default=None, help="shortcut for --set data.root=PATH")
    tr.add_argument(
        "--method",
        default=None,
        choices=method_names(),
        help="shortcut for --set train.method=...: none (evaluate the untrained start), plm, stml (the peer) "
        "or supervised (the ceiling, with the train split's labels)",
    )
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.set_defaults(func=_cmd_train)

    em = command("embed", "images -> embeddings (.safetensors index, .npy + paths file, or .parquet)")
    _model_options(em)
    em.add_argument(
        "--images", nargs="+", default=None, metavar="DIR|FILE", help="folders (searched recursively) or image files"
    )
    em.add_argument("--paths-file", default=None, help="a text file of image paths, one per line")
    em.add_argument("--dataset", default=None, choices=DATASET_CHOICES, help="a data set instead of --images")
    em.add_argument("--data-root", default=None, help="root of --dataset in its official layout")
    em.add_argument("--split", default="test", choices=["train", "test"], help="which split of --dataset")
    em.add_argument(
        "--out",
        required=True,
        help="output: X.safetensors (an index search reads), X.npy (+ X.paths.txt, X.json) or X.parquet "
        "(columns path, label, embedding)",
    )
    em.set_defaults(func=_cmd_embed)

    ix = command("index", "a folder of images -> a saved, self-checking nearest-neighbour index")
    ix.add_argument("images", help="folder of images (searched recursively)")
    _model_options(ix)
    ix.add_argument("--out", default=None, help="output index file (.safetensors); with --add-to: default the same")
    ix.add_argument(
        "--add-to",
        default=None,
        metavar="INDEX",
        help="extend this index (atomically, in place unless --out) with the images of the folder that it lacks "
        "(by absolute path), embedded with the index's own model: a --checkpoint, if given, must be that model",
    )
    _index_arguments(ix)
    ix.set_defaults(func=_cmd_index, dataset=None, data_root=None, split="train")

    se = command("search", "images -> their top-k most similar images in an index (many queries in one process)")
    se.add_argument("query", nargs="*", help="query image files or folders (searched recursively)")
    se.add_argument("--queries-file", default=None, help="a text file of query paths, one per line")
    se.add_argument("--index", required=True, help="index written by 'plmetric index'")
    se.add_argument("--top-k", type=positive_int, default=8, help="number of results per query")
    se.add_argument("--out", default=None, help="one query: PNG grid of the results (default: QUERY_results.png)")
    se.add_argument("--out-dir", default=None, help="a PNG grid per query, QUERY_results.png, in this folder")
    se.add_argument("--json", default=None, help="write every query's results (rank, path, score) as JSON")
    se.add_argument("--csv", default=None, help="write every query's results as CSV: query,rank,path,score")
    se.add_argument("--batch-size", type=positive_int, default=64, help="query images per forward pass")
    se.add_argument("--num-workers", type=non_negative_int, default=0, help="decoding workers for many queries")
    se.add_argument("--exact", action="store_true", help="exact torch search even when the index has a faiss index")
    se.add_argument("--nprobe", type=positive_int, default=None, help="IVF cells to scan (default: the index's own)")
    se.add_argument("--ef-search", type=positive_int, default=None, help="HNSW search beam (default: the index's own)")
    se.set_defaults(func=_cmd_search)

    ex = command("export", "a checkpoint's embedding model -> ONNX or TorchScript, its preprocessing in the metadata")
    ex.add_argument("checkpoint", help="a .safetensors model written by 'plmetric train' (it names its backbone)")
    ex.add_argument(
        "--format", required=True, choices=["onnx", "torchscript"], help="onnx (.onnx) or torchscript (.pt)"
    )
    ex.add_argument(
        "--out", required=True, help="output file: .onnx, or .pt/.torchscript; the metadata also goes to OUT.json"
    )
    ex.add_argument("--image-size", type=positive_int, default=224, help="input side when the checkpoint records none")
    ex.set_defaults(func=_cmd_export)

    sv = command("serve", "a local web page to browse an index: pick or upload a query image, click to search on")
    sv.add_argument("index", help="index written by 'plmetric index' (its model is loaded once, at start-up)")
    sv.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (other than localhost: other machines see the images)"
    )
    sv.add_argument("--port", type=_port, default=8000, help="TCP port to listen on")
    sv.add_argument("--top-k", type=positive_int, default=12, help="number of results per query")
    sv.set_defaults(func=_cmd_serve)

    demo = command("demo", "the main job: train on the embedded digits (CPU, no download), before/after")
    demo.add_argument("--config", default=None, help="default: configs/demo.yaml")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    demo.add_argument("--out", default=DEMO_OUT, help="run folder (the demo replaces its own earlier run there)")
    demo.add_argument("--overwrite", action="store_true", help="replace a run in a --out other than the default")
    demo.add_argument("--json", default=None, help="write recall@1_before / recall@1_after to this file")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    ss = command("similarity-study", "how well PLM and competing similarity estimates agree with the labels (slide 14)")
    _similarity_study_arguments(ss)
    ss.set_defaults(func=_cmd_similarity_study)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """Warnings as one line naming what happened (not the library line that warned)."""
    return f"plmetric: warning: {message}\n"


def error_line(err: BaseException) -> str:
    """The one-line form of a user-facing error (first line of the message, a layout hint)."""
    text = str(err).strip()
    if isinstance(err, KeyError | OSError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]  # KeyError's str() adds quotes; OSError(str) is fine either way
    line = text.splitlines()[0] if text else type(err).__name__
    hint = getattr(err, "layout_hint", None)
    return f"{line} (expected layout: {hint})" if hint else line


def _known_errors() -> tuple[type[BaseException], ...]:
    import yaml
    from PIL import Image

    from plmetric.export import ExportDependencyError
    from plmetric.models import WeightsUnavailableError
    from plmetric.training import NonFiniteLossError

    return (
        CLIError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        ValueError,
        yaml.YAMLError,
        Image.DecompressionBombError,
        WeightsUnavailableError,
        NonFiniteLossError,
        ExportDependencyError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``plmetric`` console script.

    Exit status: 0 done; 2 bad input (one line on stderr naming the file or option and what was
    expected, no traceback, nothing existing overwritten); 1 an internal error (one line; run with
    ``--debug`` or ``PLMETRIC_DEBUG=1`` for the traceback); 130 interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # usage errors (2) and --help/--version (0), also when called in-process
        return int(done.code or 0)
    debug = args.debug or bool(os.environ.get("PLMETRIC_DEBUG"))
    if not debug:
        warnings.formatwarning = _one_line_warning  # DataLoader workers forked later inherit it
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("plmetric: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        if isinstance(err, _known_errors()):
            print(f"plmetric: error: {error_line(err)}", file=sys.stderr)
            return 2
        print(
            f"plmetric: internal error: {type(err).__name__}: {error_line(err)} "
            "(rerun with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
