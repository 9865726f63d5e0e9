"""``plmetric duplicates``: near-duplicate groups of an index (resized, recompressed, cropped copies of one
photo) as a table (``group, size, path, best_score``), and optionally a PNG grid of the first groups."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from plmetric.cli.common import (
    add_command,
    check_grid_output,
    check_table_output,
    cosine_threshold,
    load_pile_index,
    pile_arguments,
    positive_int,
)

SOFTWARE = "plmetric duplicates"


def add_parser(subparsers: Any) -> None:
    from plmetric.retrieval.duplicates import DEFAULT_THRESHOLD

    du = add_command(
        subparsers,
        "duplicates",
        "near-duplicate groups of an index (copies of one photo: resized, recompressed, cropped) as a table",
    )
    pile_arguments(du)
    du.add_argument("--out", required=True, help="table to write: .csv or .parquet; rows: group, size, path, best_score")
    du.add_argument(
        "--threshold",
        type=cosine_threshold,
        default=DEFAULT_THRESHOLD,
        help="two images are near-duplicates when the cosine similarity of their embeddings is at least this, in "
        "(-1, 1]; groups are the connected components of such pairs (members may be joined through others). Higher: "
        "fewer, closer copies; lower: also similar but different photos. The default was measured on the pretrained "
        "backbone's features with planted copies (docs/results.md): on CUB photos it found every resized, "
        "recompressed and mirrored copy and 90%% of 80-90%% crops at precision 0.97. A trained checkpoint's "
        "embedding has its own scale of cosines: measure it with benchmarks/duplicates.py --checkpoint",
    )
    du.add_argument("--grid", default=None, help="also draw the first groups as a PNG grid (one row per group)")
    du.add_argument("--show", type=positive_int, default=8, help="groups drawn on --grid and printed")
    du.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from plmetric.cli.common import refuse_indexed_outputs
    from plmetric.retrieval.duplicates import draw_groups, find_duplicates
    from plmetric.retrieval.tables import TableWriter

    out = check_table_output(args, "duplicates")
    grid = check_grid_output(args, SOFTWARE)
    embeddings, paths, faiss_index = load_pile_index(args)
    refuse_indexed_outputs([out, grid], paths)
    how = f"through its faiss {faiss_index[1].kind} index" if faiss_index is not None else "exactly"
    print(f"near-duplicates among {len(paths):,} images at cosine >= {args.threshold:g}, {how}", file=sys.stderr)
    found = find_duplicates(
        embeddings,
        args.threshold,
        faiss_index,
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        progress=not args.no_progress,
    )
    with TableWriter(out, "duplicates") as table:
        for number, members in enumerate(found.groups, start=1):
            table.write(
                [
                    [number] * len(members),
                    [len(members)] * len(members),
                    [paths[i] for i in members.tolist()],
                    found.best_score[members].tolist(),
                ]
            )
        table.commit()
    print(
        f"{len(found.groups):,} groups of near-duplicates: {found.members:,} of {len(paths):,} images "
        f"({found.pairs:,} pairs at cosine >= {args.threshold:g})"
    )
    for number, members in enumerate(found.groups[: args.show], start=1):
        names = ", ".join(Path(paths[i]).name for i in members[:4].tolist())
        more = f", ... (+{len(members) - 4})" if len(members) > 4 else ""
        print(f"  group {number} ({len(members)}): {names}{more}")
    written = [str(out)]
    if grid is not None:
        shown = found.groups[: args.show]
        draw_groups(
            [[paths[i] for i in g.tolist()] for g in shown],
            [found.best_score[g].tolist() for g in shown],
            grid,
            max_groups=args.show,
            software=SOFTWARE,
        )
        written.append(str(grid))
    print(f"wrote {', '.join(written)}")
    return 0
