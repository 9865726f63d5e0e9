"""``plmetric groups``: the indexed pile partitioned into groups of similar images (faiss spherical
k-means, or HDBSCAN), with an ungrouped bucket, as a table (``group, size, path, representative, score``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from plmetric.cli.common import (
    add_command,
    check_grid_output,
    check_table_output,
    grid_rows,
    int_at_least,
    item_count,
    seed,
)
from plmetric.core.names import shown
from plmetric.core.validation import MAX_ITEMS

SOFTWARE = "plmetric groups"
ROWS_PER_CHUNK = 100_000
"""Table rows written at a time."""


def add_parser(subparsers: Any) -> None:
    from plmetric.core.options import GROUPS_CHOICE_SAMPLE as CHOICE_SAMPLE  # no torch: --help stays fast
    from plmetric.core.options import GROUPS_HDBSCAN_MAX as HDBSCAN_MAX
    from plmetric.core.options import GROUPS_METHODS as METHODS
    from plmetric.core.options import GROUPS_REDUCED_DIM as REDUCED_DIM

    gr = add_command(
        subparsers,
        "groups",
        "the indexed pile partitioned into groups of similar images, with an ungrouped bucket, as a table",
    )
    gr.add_argument("index", help="index written by 'plmetric index' (its embeddings are used; no image is read)")
    gr.add_argument(
        "--out", required=True, help="table to write: .csv or .parquet; rows: group, size, path, representative, score"
    )
    gr.add_argument(
        "--method",
        choices=METHODS,
        default="kmeans",
        help="kmeans: faiss spherical k-means into --groups groups, those smaller than --min-size ungrouped "
        "(every image lands somewhere; scales to millions); hdbscan: groups of any number and density, images that "
        f"fit none left ungrouped (purer groups, often 40-50%% of a pile ungrouped; on the first {REDUCED_DIM} "
        f"principal components; its cluster selection, eom or leaf, the one of higher 5-NN graph modularity: eom "
        f"alone collapsed mixed piles into 2 groups; slow above {HDBSCAN_MAX:,} images). Measured in docs/results.md",
    )
    gr.add_argument("--min-size", type=int_at_least(2, MAX_ITEMS), default=5, help="the smallest group worth reporting")
    gr.add_argument(
        "--groups",
        type=item_count,
        default=None,
        help="number of k-means groups (default: chosen from the embeddings alone: the k, among 2 .. N/3, whose "
        "k-means groups have the highest modularity on the 5-nearest-neighbour graph, on the first "
        f"{REDUCED_DIM} principal components and a random sample of {CHOICE_SAMPLE:,} images of a larger pile; "
        "2-4 groups instead when they keep 95%% of those links inside and the finer k's groups are no clearer "
        "than k-means cuts of one Gaussian per group; the k and why are printed, with 'weak structure' when its "
        "groups are no clearer than k-means cuts of Gaussian data of the same spread)",
    )
    gr.add_argument("--seed", type=seed, default=0, help="seed of PCA / k-means")
    gr.add_argument("--grid", default=None, help="also draw the largest groups as a PNG grid (one row per group)")
    gr.add_argument("--show", type=grid_rows, default=8, help="groups drawn on --grid and printed")
    gr.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from plmetric.cli.common import open_pile_index, refuse_indexed_outputs
    from plmetric.retrieval.duplicates import draw_groups
    from plmetric.retrieval.groups import UNGROUPED
    from plmetric.retrieval.mapped import path_list
    from plmetric.retrieval.tables import TableWriter

    out = check_table_output(args, "groups")
    grid = check_grid_output(args, SOFTWARE)
    pile, _ = open_pile_index(args, faiss=False)
    embeddings, paths = pile.vectors, pile.paths
    recorded_id = pile.identity()  # recorded in the table: serve knows its index
    refuse_indexed_outputs([out, grid], paths)
    if args.groups is not None and args.groups > len(paths):
        raise ValueError(f"--groups {args.groups} exceeds the {len(paths)} images of index {args.index}")
    if args.groups is not None and args.method == "hdbscan":
        raise ValueError("--groups sets the number of k-means groups; --method hdbscan chooses it itself")
    found = _grouped(args, embeddings)
    order = found.order()
    with TableWriter(out, "groups", index_id=recorded_id) as table:
        for start in range(0, len(order), ROWS_PER_CHUNK):  # a few large chunks (Parquet row groups)
            rows = order[start : start + ROWS_PER_CHUNK]
            table.write(
                [
                    found.group[rows].tolist(),
                    found.size[rows].tolist(),
                    path_list(paths, rows),
                    found.representative[rows].astype(int).tolist(),
                    found.score[rows].tolist(),
                ]
            )
        table.commit()
    ungrouped = int((found.group == UNGROUPED).sum())
    if found.choice:
        print(found.choice)
    fitted = (
        f" (fitted on a seeded random sample of {found.sample:,} images; the rest assigned to the nearest group)"
        if found.sample
        else ""
    )
    print(
        f"{found.count:,} groups ({found.method}) of {len(paths) - ungrouped:,} images; "
        f"{ungrouped:,} ungrouped{fitted}"
    )
    members = [order[found.group[order] == g] for g in range(1, min(found.count, args.show) + 1)]
    for number, group in enumerate(members, start=1):
        print(f"  group {number} ({len(group)}): representative {shown(Path(paths[group[0]]).name)}")
    written = [str(out)]
    if grid is not None:
        draw_groups(
            [[paths[i] for i in g.tolist()] for g in members],
            [found.score[g].tolist() for g in members],
            grid,
            max_groups=args.show,
            software=SOFTWARE,
        )
        written.append(str(grid))
    print(f"wrote {shown(', '.join(written))}")
    return 0


def _grouped(args: argparse.Namespace, embeddings: Any) -> Any:
    """The groups of ``embeddings`` (a tensor, or a sharded index's mapped vectors), said first: on every
    image, or above :data:`plmetric.retrieval.groups.FIT_SAMPLE` images fitted on a seeded sample and
    every image assigned block by block (with an estimate of that pass)."""
    import torch

    from plmetric.retrieval import groups as grouping
    from plmetric.retrieval.mapped import RateEstimate, vector_count

    n = vector_count(embeddings)
    expected = ""
    sampled = n > grouping.FIT_SAMPLE
    if sampled:
        fit = grouping.FIT_SAMPLE if args.method == "kmeans" else min(grouping.FIT_SAMPLE, grouping.HDBSCAN_MAX)
        expected = (f"; fitted on a seeded random sample of {fit:,} images, then every image assigned to its nearest "
                    "group block by block")
    elif args.method == "hdbscan" and n > 5_000:
        expected = f"; HDBSCAN takes about {grouping.hdbscan_seconds(n) / 60:.1f} min on two cores (no progress bar)"
    print(f"grouping {n:,} images (--method {args.method}, --min-size {args.min_size}){expected}", file=sys.stderr)
    if args.method == "hdbscan" and n > grouping.HDBSCAN_MAX and not sampled:
        print("plmetric: warning: --method hdbscan grows as about N^2.3; --method kmeans scales linearly", file=sys.stderr)
    if sampled:
        return grouping.find_groups_sampled(
            embeddings,
            method=args.method,
            min_size=args.min_size,
            n_groups=args.groups,
            seed=args.seed,
            # three passes over the vectors: assign (timed), the groups' sums, the scores (lighter)
            estimate=RateEstimate("assigning groups", n, passes=3).first_block,
        )
    if not isinstance(embeddings, torch.Tensor):  # mapped, at most FIT_SAMPLE rows: bounded
        embeddings = torch.from_numpy(embeddings.block(0, embeddings.count))
    return grouping.find_groups(embeddings, method=args.method, min_size=args.min_size, n_groups=args.groups,
                                seed=args.seed)
