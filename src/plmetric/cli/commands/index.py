"""``plmetric index``: a folder of images -> a saved, self-checking nearest-neighbour index (exact, or
with a faiss index beside it); ``--add-to`` extends an index with the images it lacks."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plmetric.cli.common import CLIError, add_command, check_output, embed_images, is_index, model_options
from plmetric.core.names import shown

_NO_HASHES = (
    " (an older index), nor do the added images: duplicates uses the embedding alone; build a new index with --out "
    "to record them"
)


def add_parser(subparsers: Any) -> None:
    ix = add_command(subparsers, "index", "a folder of images -> a saved, self-checking nearest-neighbour index")
    ix.add_argument("images", help="folder of images (searched recursively)")
    model_options(ix)
    ix.add_argument("--out", default=None, help="output index file (.safetensors); with --add-to: default the same")
    ix.add_argument(
        "--add-to",
        default=None,
        metavar="INDEX",
        help="extend this index (atomically, in place unless --out) with the images of the folder that it lacks "
        "(by absolute path), embedded with the index's own model: a --checkpoint, if given, must be that model; "
        "the faiss file it replaces is removed unless another index in its folder names it",
    )
    from plmetric.cli.index_options import index_arguments  # the faiss options
    from plmetric.cli.storage import storage_arguments

    index_arguments(ix)

    storage_arguments(ix)
    from plmetric.cli.calibrate import add_calibration_options  # duplicates calibration (issue 29)

    add_calibration_options(ix)
    ix.set_defaults(func=run, dataset=None, data_root=None, split="train")


def run(args: argparse.Namespace) -> int:
    from plmetric.cli.index_options import faiss_note, index_options
    from plmetric.data.datasets import load_unlabelled_folder
    from plmetric.manifold import ann
    from plmetric.retrieval.index import load_embedding_model, write_index

    if args.add_to:
        return _index_add(args)
    if args.out is None:
        raise CLIError("give --out INDEX.safetensors (the index to write), or --add-to INDEX.safetensors to extend one")
    # every check on the output and the options comes before the first image is read
    out = check_output(args.out, "--out", (".safetensors",), (args.checkpoint, args.weights), is_index)
    options = index_options(args)
    dataset = load_unlabelled_folder(args.images).train
    model, description = load_embedding_model(
        args.checkpoint, args.backbone, args.embedding_dim, args.weights, image_size=args.image_size
    )
    dim = int(description["output_dim"])
    # before the first image is embedded: nlist possible, the memory budget large enough, faiss installed
    if ann.plan_index(len(dataset), options, dim=dim) is not None:
        try:
            ann.import_faiss()
        except ann.FaissUnavailableError as err:
            raise CLIError(f"--faiss {options.kind}: {err}") from None
    import time

    from plmetric.cli.calibrate import calibrate_index
    from plmetric.cli.rank_shards import torchrun_world

    if torchrun_world() > 1:
        from plmetric.cli.index_ranks import index_by_rank

        return index_by_rank(args, model, description, dataset, out, options)
    started = time.perf_counter()
    emb, labels, paths, unreadable, writer, hashes = embed_images(args, model, description, dataset, hashes=True)
    rate = len(paths) / max(time.perf_counter() - started, 1e-6)
    if emb.shape[0] == 0:
        raise CLIError(f"no image could be read ({unreadable} unreadable): nothing to write to {out}")
    if not writer:
        return 0  # torchrun: rank 0 builds and writes the index of the gathered result
    calibration = calibrate_index(args, model, description, emb, paths, rate, hashes)  # None with --no-calibrate
    plan = ann.plan_index(len(paths), options, dim=emb.shape[1])
    from plmetric.cli.storage import storage

    dtype, rows_per_shard = storage(paths, args.float16, args.shard_rows)
    _, faiss_path = write_index(
        out, emb, labels, paths, description, plan, hashes=hashes, extra=calibration, dtype=dtype,
        rows_per_shard=rows_per_shard,
    )
    skipped = f"; left out {unreadable} unreadable image(s)" if unreadable else ""
    layout = "" if rows_per_shard is None else f" ({dtype}, {-(-len(paths) // rows_per_shard)} shard(s) beside it)"
    print(f"wrote {len(paths):,} embeddings of dimension {emb.shape[1]} to {shown(out)}{layout}{skipped}")
    print(shown(faiss_note(plan, faiss_path)))
    return 0


def _index_add(args: argparse.Namespace) -> int:
    """``plmetric index DIR --add-to INDEX``: embed the images of DIR that INDEX lacks, append them,
    holding INDEX's lock from the first read to the commit (a second --add-to stops at once)."""
    import os

    from plmetric.retrieval.index import exclusive_index_lock, read_index_metadata

    source = Path(args.add_to).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"--add-to: index not found: {source}")
    if read_index_metadata(source) is None:
        raise ValueError(f"--add-to {source} is not a plmetric index (expected a file written by plmetric index)")
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 alone reads, extends and writes the index
        return _extend(args, source)
    with exclusive_index_lock(source, "--add-to"):
        return _extend(args, source)


@dataclass
class _Growth:
    """What ``--add-to`` reads and checks before it embeds anything."""

    source: Path
    out: Path
    meta: dict[str, Any]
    stored: Any  # the index opened (plmetric.retrieval.stored.open_index): its sizes and shards checked
    model: Any
    faiss_index: Any
    fresh: list[Path]  # the folder's images the index lacks
    present: int  # the folder's images already in it
    kept: dict[str, Any] | None  # the duplicates calibration kept (plmetric.cli.calibrate.kept_calibration)
    folder: str
    no_hashes_note: str
    in_place: bool

    def unchanged(self, args: argparse.Namespace) -> bool:
        """Nothing to rewrite without new rows: in place, no new search parameters."""
        return self.in_place and args.nprobe is None and args.ef_search is None

    def nothing_added(self, unreadable: str = "") -> str:
        """The report of an ``--add-to`` that adds no image and rewrites nothing."""
        return (
            f"added 0 images to {shown(self.source)} (still {len(self.stored.paths):,}); skipped {self.present:,} "
            f"already in the index{unreadable}"
        )


@dataclass
class _NewRows:
    """The images ``--add-to`` embedded: in memory, or as shards the torchrun ranks wrote (``shards``)."""

    emb: Any
    labels: Any
    paths: list[str]
    hashes: Any
    added: int
    skipped: int
    shards: Any = None


def _extend(args: argparse.Namespace, source: Path) -> int:
    """``--add-to``'s stages: read and check the index and the options (:func:`_open_growth`), embed the
    images it lacks (:func:`_embed_new`), append them and report (:func:`_append`)."""
    import os

    growth = _open_growth(args, source)
    if not growth.fresh and growth.unchanged(args):
        print(growth.nothing_added())
        return 0
    if not growth.fresh and os.environ.get("RANK", "0") != "0":
        return 0  # torchrun: rank 0 alone rewrites the index's search parameters
    new = _embed_new(args, growth)
    if new is None:
        return 0  # torchrun: rank 0 appends what the ranks embedded
    unreadable = f"; left out {new.skipped} unreadable image(s)" if new.skipped else ""
    if not new.added and growth.unchanged(args):
        print(growth.nothing_added(unreadable))
        return 0
    _append(args, growth, new, unreadable)
    return 0


def _open_growth(args: argparse.Namespace, source: Path) -> _Growth:
    """Every check before the first image is embedded: the options against the index's kind and storage,
    ``--out``, the model, the faiss file and the calibration kept; then the folder's images it lacks."""
    from plmetric.cli.calibrate import kept_calibration
    from plmetric.cli.index_options import check_add_options
    from plmetric.cli.storage import check_add_storage
    from plmetric.data.datasets import load_unlabelled_folder
    from plmetric.retrieval.index import (
        check_same_model,
        load_faiss_index,
        load_hashes,
        model_from_description,
        new_images,
        read_index_metadata,
    )
    from plmetric.retrieval.stored import open_index

    meta = read_index_metadata(source)
    if meta is None:
        raise ValueError(f"--add-to {source} is not a plmetric index (expected a file written by plmetric index)")
    check_add_options(args, meta, source)
    recorded = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    inputs = (args.checkpoint, args.weights, recorded.get("checkpoint"), recorded.get("weights"))
    out = check_output(args.out or source, "--out", (".safetensors",), inputs, is_index)
    check_add_storage(args, meta, source, out)
    stored = open_index(source)  # its recorded sizes and every shard checked; no vector read
    check_same_model(stored.model, source, args.checkpoint, args.weights)
    old = "" if load_hashes(source) is not None else f"\nnote: {shown(source)} records no perceptual hashes{_NO_HASHES}"
    model = model_from_description(stored.model, source)  # the recorded checkpoint, unchanged
    faiss_index = load_faiss_index(source, meta)  # faiss installed, the .faiss file the right one
    candidates = load_unlabelled_folder(args.images).train
    fresh, present = new_images([Path(p) for p in candidates.paths], stored.paths)
    kept = kept_calibration(meta, len(stored.paths) + len(fresh), f"--add-to {source}")  # checked before embedding
    in_place = out.resolve() == source.resolve()
    return _Growth(source, out, meta, stored, model, faiss_index, fresh, present, kept, candidates.name, old, in_place)


def _embed_new(args: argparse.Namespace, growth: _Growth) -> _NewRows | None:
    """Embed the images the index lacks: under torchrun into a sharded index, each rank its own shards
    (:func:`plmetric.cli.index_ranks.shards_by_rank`); else in memory (gathered to rank 0 under
    torchrun). None on the ranks whose part is done."""
    import torch

    from plmetric.cli.rank_shards import torchrun_world
    from plmetric.data.datasets import ImageDataset
    from plmetric.retrieval.index import is_sharded

    stored, description = growth.stored, growth.stored.model
    dataset = ImageDataset(growth.fresh, None, None, growth.folder)
    new = _NewRows(
        torch.empty(0, stored.dim), torch.empty(0, dtype=torch.long), [],
        torch.empty(0, 16, dtype=torch.uint8).numpy(), added=0, skipped=0,
    )
    if growth.fresh and torchrun_world() > 1 and is_sharded(growth.meta):  # each rank appends its own shards
        from plmetric.cli.index_ranks import shards_by_rank

        new.shards = shards_by_rank(args, growth.model, description, dataset, stored, growth.out, growth.fresh)
        if new.shards is None:
            return None  # rank 0 commits
        new.added, new.skipped = new.shards.count, new.shards.unreadable
    elif growth.fresh:
        found = embed_images(args, growth.model, description, dataset, hashes=True)
        new.emb, new.labels, new.paths, new.skipped, writer, new.hashes = found
        if not writer:
            return None  # torchrun, a one-file index: rank 0 extends it with the gathered result
        new.added = len(new.paths)
    return new


def _append(args: argparse.Namespace, growth: _Growth, new: _NewRows, unreadable: str) -> None:
    """Write the grown index (rank 0 committing the ranks' shards, or :func:`extend_index`), retire the faiss
    file it replaced, and report."""
    from plmetric.cli.index_options import faiss_note
    from plmetric.retrieval.faiss_files import retire_faiss_file
    from plmetric.retrieval.index import extend_index, faiss_file_for, read_index_metadata

    out = growth.out
    previous = faiss_file_for(out, read_index_metadata(out)) if out.is_file() else None  # the faiss file it names now
    previous_digest = ((read_index_metadata(out) or {}).get("ann") or {}).get("sha256") if previous else None
    if new.shards is not None and new.shards.count:
        from plmetric.cli.index_ranks import commit_by_rank

        count, faiss_path, plan = commit_by_rank(args, new.shards, growth.stored, out, growth.faiss_index, growth.kept)
    else:
        count, faiss_path, plan = extend_index(
            growth.source, out, new.emb, new.labels, new.paths, growth.faiss_index, nprobe=args.nprobe,
            ef_search=args.ef_search, hashes=new.hashes, extra=growth.kept, rows_per_shard=args.shard_rows,
        )
    print(
        f"added {new.added:,} images to {shown(out)} (now {count:,}); skipped {growth.present:,} already in the "
        f"index{unreadable}{growth.no_hashes_note}"
    )
    if plan is not None:
        print(shown(faiss_note(plan, faiss_path)))
        if previous is not None and previous.is_file() and previous.resolve() != Path(faiss_path).resolve():
            print(retire_faiss_file(previous, previous_digest, out))
        trained_on = plan.params.get("trained_on")
        if trained_on and count > 4 * trained_on:
            print(
                f"note: the IVF cells were trained on {trained_on:,} vectors; the index now holds {count:,}: "
                f"rebuilding it (plmetric index --faiss {plan.kind} --out ...) would restore the best recall"
            )
