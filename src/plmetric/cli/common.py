"""What several commands share: the user-facing error, the argument parser and help formatter, the
integer option types, the output-file check, the model options of ``embed``/``index``, the
config help, the before/after table of ``train``/``demo``, and turning images into embeddings.

Only the standard library and the torch-free bounds of :mod:`plmetric.core.validation` and
:mod:`plmetric.core.options` are imported at module level: the library modules (and torch) are
imported inside the functions that need them, so that ``plmetric --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import re
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from plmetric.core.options import MAX_EF, MAX_NLIST
from plmetric.core.validation import (
    MAX_BATCH_SIZE,
    MAX_EMBEDDING_DIM,
    MAX_ITEMS,
    MAX_NEIGHBOURS,
    MAX_SEED,
    MAX_WORKERS,
)

DATASET_CHOICES = ["cub200", "cars196", "sop", "folder", "digits"]


class CLIError(Exception):
    """A user-facing error: printed without a traceback."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (exit status 2), naming the option."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {bounded_quotes(message)} (see {self.prog} --help)\n")


def bounded_quotes(message: str) -> str:
    """``message`` with each quoted value over :data:`~plmetric.core.validation.SHOWN_CHARS` characters
    cut to that many and its length (argparse echoes a 100,000-character ``--dataset`` in full)."""
    from plmetric.core.validation import SHOWN_CHARS, shown

    return re.sub(rf"'([^'\n]{{{SHOWN_CHARS + 1},}})'", lambda m: shown(m[1]), message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default (unless it is None or False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def add_command(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """A sub-parser for the command ``name``: its one-line help is also its description."""
    return subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` and, when given, <= ``maximum`` (the error names
    what was expected and the value given)."""
    expected = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got '{text[:60]}'") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text.strip()[:60]}")
        return value

    parse.__name__ = expected
    return parse


# The count options of the commands, each with an upper bound generous for real use (the reasons are
# those of the bounds in plmetric.core.validation): an absurd value is refused by name, with the range.
positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
batch_size = int_at_least(1, MAX_BATCH_SIZE)
workers = int_at_least(0, MAX_WORKERS)
embedding_width = int_at_least(0, MAX_EMBEDDING_DIM)
neighbours = int_at_least(1, MAX_NEIGHBOURS)
item_count = int_at_least(1, MAX_ITEMS)
seed = int_at_least(0, MAX_SEED)
nlist_count = int_at_least(1, MAX_NLIST)  # IVF cells, --nprobe
beam_width = int_at_least(1, MAX_EF)  # HNSW --ef-construction, --ef-search
MAX_GRID_ROWS = 1_000  # --show: one row of thumbnails per group (8 by default); 1,000 rows is a 100,000-pixel-tall PNG
grid_rows = int_at_least(1, MAX_GRID_ROWS)


def image_side(text: str) -> int:
    """An argparse type: an image side in pixels, within the bounds a config or checkpoint may hold
    (:data:`plmetric.core.validation.IMAGE_SIZE_MIN` to ``IMAGE_SIZE_MAX``; a larger side would only
    exhaust memory)."""
    from plmetric.core.validation import IMAGE_SIZE_MAX, IMAGE_SIZE_MIN

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer from {IMAGE_SIZE_MIN} to {IMAGE_SIZE_MAX} (pixels), got '{text}'"
        ) from None
    if not IMAGE_SIZE_MIN <= value <= IMAGE_SIZE_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer from {IMAGE_SIZE_MIN} to {IMAGE_SIZE_MAX} (pixels), got {value}")
    return value


def default_workers() -> int:
    """The default number of decoding workers: up to 4, no more than the CPUs."""
    return min(4, os.cpu_count() or 1)


def config_help(default: str) -> str:
    """The help of ``--config``: a preset name (listed) or a YAML file."""
    from plmetric.config import preset_names  # importlib.resources: no file is read

    return f"a preset ({', '.join(preset_names())}) or a YAML file (default: {default})"


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


def is_index(path: Path) -> bool:
    """True for a file written by ``plmetric index`` (or ``embed --out X.safetensors``)."""
    from plmetric.retrieval.index import read_index_metadata

    return read_index_metadata(path) is not None


def model_options(p: argparse.ArgumentParser) -> None:
    """The embedding model and embedding-pass options of ``embed`` and ``index``."""
    p.add_argument("--checkpoint", default=None, help="a .safetensors model written by 'plmetric train'")
    p.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        help="pretrained backbone when no checkpoint is given: efficientnet_lite0/1/2, googlenet, resnet50 or "
        "timm:NAME (any timm model, e.g. timm:vit_small_patch14_dinov2.lvd142m; its weights download once)",
    )
    p.add_argument("--weights", default=None, help="local backbone weights file (.safetensors/.pth) for --backbone")
    p.add_argument(
        "--embedding-dim",
        type=embedding_width,
        default=0,
        help="0 = the backbone's pooled features (the only choice without --checkpoint)",
    )
    p.add_argument("--image-size", type=image_side, default=224, help="input side (a checkpoint's own wins)")
    p.add_argument("--batch-size", type=batch_size, default=128, help="images per forward pass")
    p.add_argument("--num-workers", type=workers, default=default_workers(), help="decoding workers")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    runtime_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def runtime_option(p: argparse.ArgumentParser) -> None:
    """``--runtime``: what runs the network's forward passes (:mod:`plmetric.data.runtime`)."""
    from plmetric.core.options import INFERENCE_RUNTIMES

    p.add_argument(
        "--runtime",
        default="auto",
        choices=INFERENCE_RUNTIMES,
        help="what runs the network: auto = onnxruntime on a CPU (several times faster; the exported model is "
        "cached under $PLMETRIC_CACHE or ~/.cache/plmetric), else PyTorch; torch; onnxruntime",
    )


def inference_runner(args: argparse.Namespace, model: Any, description: dict[str, Any], device: Any) -> Any:
    """``model`` through ``args.runtime`` for images of the description's size; the runtime used is
    recorded in ``description["runtime"]`` (``option``, ``used``, the onnxruntime version and the
    cached export's ``onnx_key``)."""
    from plmetric.data.runtime import inference_model, onnxruntime_version, runtime_of

    size = int(description["image_size"])
    runner = inference_model(model, (3, size, size), getattr(args, "runtime", "auto"), device)
    used = runtime_of(runner)
    description["runtime"] = {
        "option": getattr(args, "runtime", "auto"),
        "used": used,
        **({"onnxruntime": onnxruntime_version()} if used == "onnxruntime" else {}),
        # the cached export's key (plmetric.data.runtime.model_key): a later search finds it without torch
        **({"onnx_key": runner.key} if getattr(runner, "cache_file", None) is not None else {}),
    }
    return runner


def print_before_after(result: Any, epochs: int) -> None:
    """The Recall@K table of a finished run on its labelled test split: the untrained start, the
    model kept (the label-free pick), the last epoch, and the best epoch, marked as an oracle (chosen
    with the test labels: a yardstick, never a model to use)."""
    start, final = result.start_metrics, result.final_metrics
    if start is None:
        print("no labelled test split: evaluation skipped")
        return
    if final is None:
        print("stopped before the last epoch: continue with --resume")
        return
    keys = [k for k in start if k.startswith("recall@")]
    rows = [("start", start)]
    if result.selected_metrics is not None:
        picked = "kept: the start" if not result.selected_epoch else f"kept (ep {result.selected_epoch})"
        rows.append((picked, result.selected_metrics))
    rows.append((f"final (ep {epochs})", final))
    if result.best_metrics is not None:
        rows.append((f"best (ep {result.best_epoch}), oracle", result.best_metrics))
    width = max(len(name) for name, _ in rows) + 2
    print(" " * width + "  ".join(f"{k:>9}" for k in keys))
    for name, metrics in rows:
        print(f"{name:<{width}}" + "  ".join(f"{100 * metrics[k]:9.2f}" for k in keys))
    if result.selected_metrics is not None:
        print("kept = the epoch picked without labels (selected.safetensors); oracle = picked with the test labels")


def image_paths(
    items: Sequence[str], listing: str | None, what: str, listing_option: str = "--paths-file"
) -> list[Path]:
    """Image files from ``items`` (files, or folders searched recursively) and the lines of the text
    file ``listing`` (one path per line; blank lines and ``#`` comments skipped), in that order."""
    from plmetric.data.datasets import IMAGE_EXTENSIONS, find_images

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
        else:  # missing, or a FIFO/device that must never be opened: one line naming it
            from plmetric.data.images import require_regular_file

            require_regular_file(item, f"{what} image")
            paths.append(item)
    if not paths:
        raise CLIError(f"give at least one {what} image, folder or {listing_option}")
    return paths


def embed_images(
    args: argparse.Namespace, model: Any, description: dict[str, Any], dataset: Any, hashes: bool = False
):
    """Embed every readable image of ``dataset`` the way ``description`` says: (embeddings, labels,
    paths, unreadable count, whether this process writes the output), and with ``hashes`` a sixth
    result: each embedded image's :func:`plmetric.retrieval.hashes.perceptual_hashes` ((M, 16) uint8),
    computed in the decoding workers from the image each embedding is made of (measured 1-3 ms an image
    on 36-227 px images, one loaded core; the network takes far longer).

    Under torchrun (``WORLD_SIZE`` > 1) the images are sharded over the ranks (rank r takes items
    r, r + W, ...), embedded, and gathered in data set order (gloo on the CPU, NCCL on GPUs): every
    rank gets the whole result, and only rank 0 writes. (``embed``/``index`` to a ``.safetensors`` index
    gather nothing: each rank writes its own shards, :mod:`plmetric.cli.rank_shards`; this gathering
    path remains for ``.npy``/``.parquet`` exports and ``--add-to`` of a one-file index.)"""
    import torch

    from plmetric.core import distributed as dist_utils
    from plmetric.core.devices import resolve_device
    from plmetric.data.backbones import description_transform
    from plmetric.evaluation.metrics import embed_dataset
    from plmetric.retrieval.hashes import HASH_BYTES, HashAlongside
    from plmetric.training.passes import embed_distributed

    dataset.transform = description_transform(description)
    side = None
    if hashes:
        dataset.transform = HashAlongside(dataset.transform)
        side = torch.empty(0, HASH_BYTES, dtype=torch.uint8)
    device = resolve_device(args.device)
    started = dist_utils.init_from_env(str(device))
    try:
        model.to(device)
        runner = inference_runner(args, model, description, device)
        if dist_utils.world_size() > 1:
            found = embed_distributed(
                runner, dataset, batch_size=args.batch_size, num_workers=args.num_workers, device=device, side=side
            )
        else:
            found = embed_dataset(
                runner,
                dataset,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                device=device,
                progress=not args.no_progress,
                runtime="torch",  # runner is already the runtime's model
                side=side,
            )
        writer = dist_utils.is_main_process()
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    emb, labels, index = found[:3]
    paths = [dataset.describe(i) if dataset.paths is not None else f"item:{i}" for i in index.tolist()]
    if hashes:
        return emb, labels, paths, len(dataset) - len(paths), writer, found[3].numpy()
    return emb, labels, paths, len(dataset) - len(paths), writer


def pile_arguments(p: argparse.ArgumentParser) -> None:
    """The index and search options shared by ``neighbours``, ``duplicates`` and ``groups``."""
    p.add_argument("index", help="index written by 'plmetric index' (its embeddings are used; no image is read)")
    p.add_argument("--exact", action="store_true", help="exact torch search even when the index has a faiss index")
    p.add_argument("--nprobe", type=nlist_count, default=None, help="IVF cells to scan (default: the index's own)")
    p.add_argument("--ef-search", type=beam_width, default=None, help="HNSW search beam (default: the index's own)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_pile_index(args: argparse.Namespace, faiss: bool = True) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The index's ``(embeddings, paths, faiss index or None, model description)``; the faiss index only
    with ``faiss`` and without ``--exact``. A sharded index's embeddings and paths stay mapped
    (:class:`~plmetric.retrieval.stored.StoredVectors`, :class:`~plmetric.retrieval.stored.StoredPaths`;
    :func:`open_pile_index`).

    Raises:
        FileNotFoundError: no such index.
        ValueError: not a plmetric index, or one of fewer than two images.
    """
    pile, faiss_index = open_pile_index(args, faiss)
    return pile.vectors, pile.paths, faiss_index, pile.model


def open_pile_index(args: argparse.Namespace, faiss: bool = True) -> tuple[Any, Any]:
    """The index ``args.index`` as a :class:`~plmetric.retrieval.mapped.Pile` (a one-file index in memory,
    a sharded one mapped, never materialised) and its faiss index (None: ``faiss`` false, ``--exact``,
    or the index has none).

    Raises:
        FileNotFoundError: no such index.
        ValueError: not a plmetric index, or one of fewer than two images.
    """
    from plmetric.retrieval.index import load_faiss_index
    from plmetric.retrieval.mapped import open_pile

    pile = open_pile(args.index)
    if pile.count < 2:
        raise ValueError(f"index {args.index} holds {pile.count} image(s); expected at least 2 to compare")
    use_faiss = faiss and not getattr(args, "exact", False)
    faiss_index = load_faiss_index(args.index, pile.meta) if use_faiss else None
    return pile, faiss_index


def check_table_output(
    args: argparse.Namespace, kind: str, option: str = "--out", value: str | None = None
) -> Path:
    """A table output (``.csv`` or ``.parquet``) of ``kind``, checked before any work: not the index,
    not an indexed image, and an existing file there must be a table of ``kind`` (ours to replace)."""
    from plmetric.retrieval.tables import SUFFIXES, is_our_table, require_pyarrow

    out = check_output(value or args.out, option, SUFFIXES, [args.index], lambda p: is_our_table(p, kind))
    if out.suffix.lower() == ".parquet":
        require_pyarrow()
    return out


def check_grid_output(args: argparse.Namespace, software: str) -> Path | None:
    """``--grid`` (a PNG), checked like :func:`check_table_output`: an existing PNG must be a grid this
    command wrote (its PNG ``Software`` text)."""
    if not args.grid:
        return None
    from plmetric.retrieval.duplicates import is_our_grid

    return check_output(args.grid, "--grid", (".png",), [args.index], lambda p: is_our_grid(p, software))


def refuse_indexed_outputs(outputs: Sequence[Path | None], paths: Sequence[str]) -> None:
    """Refuse an output that is one of the index's images (writing it would destroy it). ``paths``: a
    list, or a sharded index's :class:`~plmetric.retrieval.stored.StoredPaths` (searched in its bytes,
    no set of every path built)."""
    wanted = [out for out in outputs if out is not None]
    if not wanted:
        return
    indexed = set(paths) if isinstance(paths, list) else paths
    for out in wanted:
        if str(out.expanduser().resolve()) in indexed:
            raise CLIError(f"{out} is an image of the index; writing it would destroy it")


def cosine_threshold(text: str) -> float:
    """An argparse type: a cosine similarity in (-1, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a cosine similarity in (-1, 1], got '{text}'") from None
    if not -1.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a cosine similarity in (-1, 1], got {text}")
    return value


def hash_distance(text: str) -> int:
    """An argparse type: a Hamming distance 0..64, or ``off`` (-1: no hash signal)."""
    if text.strip().lower() == "off":
        return -1
    value = int(text) if text.strip().isdigit() and text.strip().isascii() else -1
    if not 0 <= value <= 64:
        raise argparse.ArgumentTypeError(f"expected a number of differing hash bits in 0..64, or off; got '{text}'")
    return value
