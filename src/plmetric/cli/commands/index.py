"""``plmetric index``: a folder of images -> a saved, self-checking nearest-neighbour index (exact, or
with a faiss index beside it); ``--add-to`` extends an index with the images it lacks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from plmetric.cli.common import (
    CLIError,
    add_command,
    check_output,
    embed_images,
    beam_width,
    int_at_least,
    is_index,
    model_options,
    nlist_count,
)
from plmetric.core.names import shown
from plmetric.core.options import MAX_HNSW_M, MAX_MEMORY_BUDGET_MIB, MAX_PQ_M

_NO_HASHES = (
    " (an older index), nor do the added images: duplicates uses the embedding alone; build a new index with --out "
    "to record them"
)
_BUILD_OPTIONS = (
    ("faiss", "--faiss"),
    ("nlist", "--nlist"),
    ("hnsw_m", "--hnsw-m"),
    ("ef_construction", "--ef-construction"),
    ("memory_budget_mib", "--memory-budget"),
    ("pq_m", "--pq-m"),
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
    _index_arguments(ix)
    from plmetric.cli.storage import storage_arguments

    storage_arguments(ix)
    from plmetric.cli.calibrate import add_calibration_options  # duplicates calibration (issue 29)

    add_calibration_options(ix)
    ix.set_defaults(func=run, dataset=None, data_root=None, split="train")


def _index_arguments(p: argparse.ArgumentParser) -> None:
    """The faiss options of ``plmetric index`` (defaults from ``plmetric.core.options.IndexOptions``; unset
    ones are chosen from the number of vectors n by ``plmetric.manifold.ann.plan_index``)."""
    from plmetric.core.options import (  # no torch
        AUTO_EXACT_BELOW,
        AUTO_KIND,
        INDEX_KINDS,
        MEMORY_BUDGET_MIB,
        IndexOptions,
    )

    group = p.add_argument_group('search index (faiss, optional: pip install "plmetric[faiss]")')
    group.add_argument(
        "--faiss",
        default=None,
        choices=INDEX_KINDS,
        help=f"default: {IndexOptions.kind} = exact torch search (no extra file); auto = exact below "
        f"{AUTO_EXACT_BELOW:,} vectors, else {AUTO_KIND} while it fits --memory-budget, else ivfpq; flat = faiss "
        "exact; ivf, hnsw = faiss approximate; ivfpq = IVF with product-quantised codes, its candidates re-ranked "
        "exactly (a .faiss file beside the index; inner product of the L2-normalised embeddings = their cosine)",
    )
    group.add_argument(
        "--memory-budget",
        dest="memory_budget_mib",
        metavar="MIB",
        type=int_at_least(1, MAX_MEMORY_BUDGET_MIB),
        default=None,
        help=f"MiB the faiss index may take in memory (default: {MEMORY_BUDGET_MIB}): --faiss auto uses HNSW while "
        "its estimate (n (4 d + 8 M + 16) bytes) fits, else ivfpq, whose code size it sets",
    )
    group.add_argument(
        "--pq-m",
        type=int_at_least(1, MAX_PQ_M),
        default=None,
        help="ivfpq sub-vectors, 4 bits each, dividing the dimension (default: the largest of 128, 96, 64, ... "
        "with at least 4 dimensions each that fits --memory-budget)",
    )
    group.add_argument(
        "--nlist",
        type=nlist_count,
        default=None,
        help="IVF cells (default: round(4 sqrt(n)), at most n / 39; ivfpq: the power of two nearest 4 sqrt(n))",
    )
    group.add_argument(
        "--nprobe",
        type=nlist_count,
        default=None,
        help="IVF cells scanned per query (default: ceil(nlist / 16), at least 8; ivfpq: ceil(sqrt(nlist)), at "
        "least 16); search --nprobe overrides it",
    )
    group.add_argument(
        "--hnsw-m",
        type=int_at_least(2, MAX_HNSW_M),
        default=None,
        help=f"HNSW links per vector (default: {IndexOptions.hnsw_m})",
    )
    group.add_argument(
        "--ef-construction",
        type=beam_width,
        default=None,
        help="HNSW build beam (default: 80 below 100k vectors, 128 below 1M, else 200)",
    )
    group.add_argument(
        "--ef-search",
        type=beam_width,
        default=None,
        help="HNSW search beam, at least --top-k (default: 64 below 1M vectors, else 128); "
        "search --ef-search overrides it",
    )


def _index_options(args: argparse.Namespace) -> Any:
    """The ``IndexOptions`` of ``plmetric index``; an option of another kind than --faiss is an error."""
    from plmetric.core.options import IndexOptions

    kind = args.faiss or IndexOptions.kind
    uses = {
        "nlist": ("ivf", "ivfpq"),
        "nprobe": ("ivf", "ivfpq"),
        "hnsw_m": ("hnsw", "auto"),
        "ef_construction": ("hnsw", "auto"),
        "memory_budget_mib": ("auto", "ivfpq"),
        "pq_m": ("ivfpq", "auto"),
    }
    uses["ef_search"] = uses["hnsw_m"]
    names = {"memory_budget_mib": "--memory-budget"}
    for dest, kinds in uses.items():
        if getattr(args, dest) is not None and kind not in kinds:
            option = names.get(dest, "--" + dest.replace("_", "-"))
            raise CLIError(f"{option} applies to --faiss {' or '.join(kinds)}, not --faiss {kind}")
    options = IndexOptions(
        kind=kind,
        nlist=args.nlist,
        nprobe=args.nprobe,
        hnsw_m=IndexOptions.hnsw_m if args.hnsw_m is None else args.hnsw_m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        memory_budget_mib=args.memory_budget_mib,
        pq_m=args.pq_m,
    )
    options.validate("--faiss: ")
    return options


def _faiss_note(plan: Any, faiss_path: Path | None) -> str:
    """One line on the search structure written beside the index."""
    if plan is None or faiss_path is None:
        return "exact search (no faiss index)"
    params = ", ".join(f"{k} {v}" for k, v in plan.params.items() if k != "trained_on")
    return f"faiss {plan.kind} index{f' ({params})' if params else ''} in {faiss_path}"


def _faiss_file_of(index: Path) -> Path | None:
    """The faiss file the index at ``index`` names now (None: no such index or no faiss file)."""
    from plmetric.retrieval.index import faiss_file_for, read_index_metadata

    return faiss_file_for(index, read_index_metadata(index)) if index.is_file() else None


def run(args: argparse.Namespace) -> int:
    from plmetric.data.datasets import load_unlabelled_folder
    from plmetric.manifold import ann
    from plmetric.retrieval.index import load_embedding_model, write_index

    if args.add_to:
        return _index_add(args)
    if args.out is None:
        raise CLIError("give --out INDEX.safetensors (the index to write), or --add-to INDEX.safetensors to extend one")
    # every check on the output and the options comes before the first image is read
    out = check_output(args.out, "--out", (".safetensors",), (args.checkpoint, args.weights), is_index)
    options = _index_options(args)
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
        return _index_by_rank(args, model, description, dataset, out, options)
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
    print(shown(_faiss_note(plan, faiss_path)))
    return 0


def _index_by_rank(
    args: argparse.Namespace, model: Any, description: dict[str, Any], dataset: Any, out: Path, options: Any
) -> int:
    """``plmetric index`` under torchrun: every rank writes its own shards; rank 0 calibrates and builds the
    faiss index from the shards, then commits (:mod:`plmetric.cli.rank_shards`)."""
    import sys

    from plmetric.cli.calibrate import calibrate_index
    from plmetric.cli.rank_shards import RankCommit, faiss_plan, listing_digest, write_rank_shards, written_note
    from plmetric.retrieval.index import build_faiss_from_stored, write_faiss_file
    from plmetric.retrieval.stored import DEFAULT_SHARD_ROWS

    dtype = "float16" if args.float16 else "float32"
    listing = listing_digest(dataset.describe(i) for i in range(len(dataset)))
    shards = write_rank_shards(
        args, model, description, dataset, out, dtype=dtype, rows_per_shard=args.shard_rows or DEFAULT_SHARD_ROWS,
        hashes=True, listing=listing,
    )
    if shards is None:
        return 0  # rank 0 calibrates, builds the faiss index and commits
    if shards.count == 0:
        raise CLIError(f"no image could be read ({shards.unreadable} unreadable): nothing to write to {out}")
    plan = faiss_plan(shards.count, shards.dim, options)
    with RankCommit(out, shards, description, dtype) as staged:
        stored = staged.stored
        calibration = None
        if not args.no_calibrate and stored.count >= 2:  # reads the pile back from the shards
            calibration = calibrate_index(
                args, model, description, stored.vectors.materialize(), stored.paths.to_list(),
                shards.images_per_second, stored.hashes(),
            )
        ann_meta, faiss_path = None, None
        if plan is not None:
            print(f"building the faiss {plan.kind} index of {stored.count:,} vectors from the shards", file=sys.stderr)
            faiss_index = build_faiss_from_stored(stored, plan)
            ann_meta, faiss_path = write_faiss_file(out, plan, faiss_index, stored.count)
        staged.commit(ann_meta, calibration)
    print(written_note(shards, out, dtype))
    print(shown(_faiss_note(plan, faiss_path)))
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


def _check_add_options(args: argparse.Namespace, meta: dict[str, Any], source: Path) -> None:
    """``--add-to`` keeps the index's faiss kind and structure: build options refused, search options only
    for the kind they tune."""
    kind = (meta.get("ann") or {}).get("kind", "none")
    for dest, option in _BUILD_OPTIONS:
        if getattr(args, dest) is not None:
            raise CLIError(
                f"{option}: --add-to keeps the index's own kind and structure (--faiss {kind}); "
                "to change them build a new index with --out"
            )
    if (args.nprobe is not None and kind not in ("ivf", "ivfpq")) or (args.ef_search is not None and kind != "hnsw"):
        option = "--nprobe" if args.nprobe is not None else "--ef-search"
        raise CLIError(f"{option} does not apply to {source}: its index kind is {kind}")


def _extend(args: argparse.Namespace, source: Path) -> int:
    import os

    import torch

    from plmetric.data.datasets import ImageDataset, load_unlabelled_folder
    from plmetric.retrieval.faiss_files import retire_faiss_file
    from plmetric.retrieval.index import (
        check_same_model,
        extend_index,
        is_sharded,
        load_faiss_index,
        load_hashes,
        model_from_description,
        new_images,
        read_index_metadata,
    )
    from plmetric.cli.storage import check_add_storage
    from plmetric.retrieval.stored import open_index

    meta = read_index_metadata(source)
    if meta is None:
        raise ValueError(f"--add-to {source} is not a plmetric index (expected a file written by plmetric index)")
    _check_add_options(args, meta, source)
    recorded = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    inputs = (args.checkpoint, args.weights, recorded.get("checkpoint"), recorded.get("weights"))
    out = check_output(args.out or source, "--out", (".safetensors",), inputs, is_index)
    check_add_storage(args, meta, source, out)
    stored = open_index(source)  # its recorded sizes and every shard checked; no vector read
    indexed, description = stored.paths, stored.model
    check_same_model(description, source, args.checkpoint, args.weights)
    old = "" if load_hashes(source) is not None else f"\nnote: {shown(source)} records no perceptual hashes{_NO_HASHES}"
    model = model_from_description(description, source)  # the recorded checkpoint, unchanged
    faiss_index = load_faiss_index(source, meta)  # faiss installed, the .faiss file the right one
    candidates = load_unlabelled_folder(args.images).train
    fresh, present = new_images([Path(p) for p in candidates.paths], indexed)
    from plmetric.cli.calibrate import kept_calibration

    kept = kept_calibration(meta, len(indexed) + len(fresh), f"--add-to {source}")  # checked before any embedding
    in_place = out.resolve() == source.resolve()
    if not fresh and in_place and args.nprobe is None and args.ef_search is None:
        print(f"added 0 images to {shown(source)} (still {len(indexed):,}); skipped {present:,} already in the index")
        return 0
    dataset = ImageDataset(fresh, None, None, candidates.name)
    from plmetric.cli.rank_shards import torchrun_world

    shards = None
    if not fresh and os.environ.get("RANK", "0") != "0":
        return 0  # torchrun: rank 0 alone rewrites the index's search parameters
    emb, labels, paths, skipped = torch.empty(0, stored.dim), torch.empty(0, dtype=torch.long), [], 0
    hashes = torch.empty(0, 16, dtype=torch.uint8).numpy()
    if fresh and torchrun_world() > 1 and is_sharded(meta):  # each rank appends its own shards
        shards = _shards_by_rank(args, model, description, dataset, stored, out, fresh)
        if shards is None:
            return 0  # rank 0 commits
        added, skipped = shards.count, shards.unreadable
    elif fresh:
        emb, labels, paths, skipped, writer, hashes = embed_images(args, model, description, dataset, hashes=True)
        if not writer:
            return 0  # torchrun, a one-file index: rank 0 extends it with the gathered result
        added = len(paths)
    else:
        added = 0
    unreadable = f"; left out {skipped} unreadable image(s)" if skipped else ""
    if not added and in_place and args.nprobe is None and args.ef_search is None:
        print(
            f"added 0 images to {shown(source)} (still {len(indexed):,}); skipped {present:,} already in the index"
            f"{unreadable}"
        )
        return 0
    previous = _faiss_file_of(out)
    previous_digest = ((read_index_metadata(out) or {}).get("ann") or {}).get("sha256") if previous else None
    if shards is not None and shards.count:
        count, faiss_path, plan = _commit_by_rank(args, shards, stored, out, faiss_index, kept)
    else:
        count, faiss_path, plan = extend_index(
            source, out, emb, labels, paths, faiss_index, nprobe=args.nprobe, ef_search=args.ef_search,
            hashes=hashes, extra=kept, rows_per_shard=args.shard_rows,
        )
    print(
        f"added {added:,} images to {shown(out)} (now {count:,}); skipped {present:,} already in the index"
        f"{unreadable}{old}"
    )
    if plan is not None:
        print(shown(_faiss_note(plan, faiss_path)))
        if previous is not None and previous.is_file() and previous.resolve() != Path(faiss_path).resolve():
            print(retire_faiss_file(previous, previous_digest, out))
        trained_on = plan.params.get("trained_on")
        if trained_on and count > 4 * trained_on:
            print(
                f"note: the IVF cells were trained on {trained_on:,} vectors; the index now holds {count:,}: "
                f"rebuilding it (plmetric index --faiss {plan.kind} --out ...) would restore the best recall"
            )
    return 0


def _shards_by_rank(
    args: argparse.Namespace, model: Any, description: dict[str, Any], dataset: Any, stored: Any, out: Path,
    fresh: list[Path],
) -> Any:
    """``--add-to`` of a sharded index under torchrun: every rank embeds its range of the new images and writes
    it as shards after the index's rows (None on ranks other than 0)."""
    from plmetric.cli.rank_shards import listing_digest, write_rank_shards
    from plmetric.retrieval.stored import DEFAULT_SHARD_ROWS

    # every rank must grow the same index by the same images
    listing = listing_digest([str(stored.count), *(r["id"] for r in stored.meta["shards"]), *map(str, fresh)])
    return write_rank_shards(
        args, model, description, dataset, out, dtype=stored.dtype,
        rows_per_shard=args.shard_rows or DEFAULT_SHARD_ROWS, first_row=stored.count, hashes=True, listing=listing,
    )


def _commit_by_rank(
    args: argparse.Namespace, shards: Any, stored: Any, out: Path, faiss_index: Any, kept: dict[str, Any] | None
) -> tuple[int, Path | None, Any]:
    """Rank 0 of ``--add-to`` under torchrun: the faiss index grown from the new shards, then the main file
    naming the old shards and the new: ``(count, faiss file or None, AnnPlan or None)``."""
    from plmetric.cli.rank_shards import RankCommit
    from plmetric.retrieval.index import grow_faiss_from_stored, write_faiss_file
    from plmetric.retrieval.stored import ShardedIndexWriter

    old_records = ShardedIndexWriter.extending(stored, out).kept  # the old shards, named as they are now
    with RankCommit(out, shards, stored.model, stored.dtype, kept=old_records, kept_rows=stored.count) as staged:
        grown, plan = grow_faiss_from_stored(
            faiss_index, staged.stored, stored.count, nprobe=args.nprobe, ef_search=args.ef_search
        )
        ann_meta, faiss_path = None, None
        if plan is not None:
            ann_meta, faiss_path = write_faiss_file(out, plan, grown, staged.stored.count)
        staged.commit(ann_meta, kept)
    return staged.stored.count, faiss_path, plan
