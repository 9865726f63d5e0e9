"""``plmetric index`` under torchrun (:mod:`plmetric.cli.rank_shards`): a new index whose ranks each write
their own shards (:func:`index_by_rank`), and ``--add-to`` of a sharded index, each rank appending its
own shards (:func:`shards_by_rank`) that rank 0 then commits (:func:`commit_by_rank`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from plmetric.cli.common import CLIError
from plmetric.core.names import shown


def index_by_rank(
    args: argparse.Namespace, model: Any, description: dict[str, Any], dataset: Any, out: Path, options: Any
) -> int:
    """``plmetric index`` under torchrun: every rank writes its own shards; rank 0 calibrates and builds the
    faiss index from the shards, then commits (:mod:`plmetric.cli.rank_shards`)."""
    import sys

    from plmetric.cli.calibrate import calibrate_index
    from plmetric.cli.index_options import faiss_note
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
    print(shown(faiss_note(plan, faiss_path)))
    return 0


def shards_by_rank(
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


def commit_by_rank(
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
