"""``plmetric neighbours``: every indexed image's top-k most similar other images, as one table
(``path, rank, neighbour, score``) for other tools: CSV or Parquet."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from plmetric.cli.common import add_command, check_table_output, neighbours, open_pile_index, pile_arguments
from plmetric.core.names import shown

ROWS_PER_CHUNK = 50_000
"""Images whose neighbours are turned into table rows at a time (bounds the strings held at once)."""


def add_parser(subparsers: Any) -> None:
    nb = add_command(
        subparsers,
        "neighbours",
        "every indexed image's top-k most similar other images, as a table (path, rank, neighbour, score)",
    )
    pile_arguments(nb)
    nb.add_argument("--k", type=neighbours, default=10, help="neighbours per image (the image itself left out)")
    nb.add_argument(
        "--out", required=True, help="table to write: .csv, or .parquet (needs pyarrow); rows: path, rank, neighbour, score"
    )
    nb.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from plmetric.cli.common import refuse_indexed_outputs
    from plmetric.retrieval.mapped import RateEstimate, path_list
    from plmetric.retrieval.neighbours import nearest_others
    from plmetric.retrieval.tables import TableWriter

    out = check_table_output(args, "neighbours")
    pile, faiss_index = open_pile_index(args)
    paths = pile.paths
    recorded_id = pile.identity()  # recorded in the table: serve knows its index
    refuse_indexed_outputs([out], paths)
    n, k = len(paths), min(args.k, len(paths) - 1)
    how = f"through its faiss {faiss_index[1].kind} index" if faiss_index is not None else "exactly"
    print(f"neighbours of {n:,} images, k = {k}, {how}: {n * k:,} rows", file=sys.stderr)
    started = time.perf_counter()
    scores, ids = nearest_others(
        pile.vectors,
        k,
        faiss_index,
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        progress=not args.no_progress,
        estimate=RateEstimate("neighbours", n).first_block,
    )
    with TableWriter(out, "neighbours", index_id=recorded_id) as table:
        for start in range(0, n, ROWS_PER_CHUNK):
            stop = min(start + ROWS_PER_CHUNK, n)
            block_ids = ids[start:stop]
            table.write(
                [
                    [p for p in path_list(paths, start, stop) for _ in range(k)],
                    list(range(1, k + 1)) * (stop - start),
                    path_list(paths, block_ids.flatten().numpy()),
                    scores[start:stop].flatten().tolist(),
                ]
            )
        table.commit()
    print(f"wrote {shown(out)}: {table.rows:,} rows ({time.perf_counter() - started:.1f} s)")
    return 0
