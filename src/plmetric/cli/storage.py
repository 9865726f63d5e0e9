"""The storage options of ``plmetric index`` and ``embed`` (issue 31): float16 vectors, shards
(:mod:`plmetric.retrieval.stored`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from plmetric.cli.common import CLIError, int_at_least


def storage_arguments(p: argparse.ArgumentParser) -> None:
    """``--float16`` and ``--shard-rows``: how the vectors are stored."""
    from plmetric.retrieval.shard_sizes import DEFAULT_SHARD_ROWS, SINGLE_FILE_PATH_BYTES  # no NumPy: help only

    group = p.add_argument_group("storage (indexes larger than memory)")
    group.add_argument(
        "--float16",
        action="store_true",
        help="store the vectors as float16 (half the disk and memory; a sharded index): scores then carry "
        "float16 rounding (about 1e-3 relative); search re-ranks in float32 from them",
    )
    group.add_argument(
        "--shard-rows",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help=f"write a sharded index of N rows a shard, memory-mapped when read (default: one file up to "
        f"{DEFAULT_SHARD_ROWS:,} images and {SINGLE_FILE_PATH_BYTES // 2**20} MiB of paths, shards of "
        f"{DEFAULT_SHARD_ROWS:,} above, or with --float16); with --add-to: the rows of each new shard "
        "(--add-to appends shards to a sharded index and rewrites only its main file)",
    )


def storage(paths: list[str], float16: bool, shard_rows: int | None) -> tuple[str, int | None]:
    """``(dtype, rows per shard or None for one file)`` of a new index of ``paths``."""
    from plmetric.retrieval.stored import shard_rows_for

    path_bytes = sum(len(p.encode("utf-8", "surrogatepass")) for p in paths)
    rows = shard_rows_for(len(paths), path_bytes, float16=float16, shard_rows=shard_rows)
    return ("float16" if float16 else "float32"), rows


def check_add_storage(args: argparse.Namespace, meta: dict[str, Any], source: Path, out: Path) -> None:
    """``--add-to`` keeps the index's storage: ``--float16`` only for a float16 index, and a sharded
    index's ``--out`` in its own folder (where its shards are)."""
    from plmetric.retrieval.stored import is_sharded

    if args.float16 and meta.get("dtype") != "float16":
        raise CLIError(
            f"--float16: --add-to keeps the index's own storage ({source} stores float32 vectors); "
            "to change it build a new index with --out"
        )
    if is_sharded(meta) and out.resolve().parent != source.resolve().parent:
        raise CLIError(f"--out {out}: a sharded index grows beside its shards; give a name in {source.parent}")
