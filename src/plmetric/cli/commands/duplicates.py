"""``plmetric duplicates``: near-duplicate groups of an index (resized, recompressed, cropped copies of one
photo) as a table (``group, size, path, best_score``), optionally every duplicate pair as a table
(``--pairs``: ``path_a, path_b, score, hash_distance, signal``) and a PNG grid of the first groups.
The rules (the embedding and the perceptual-hash signals, groups that never chain, surest first) are
:mod:`plmetric.retrieval.duplicates`'."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from plmetric.cli.common import (
    CLIError,
    add_command,
    batch_size,
    check_grid_output,
    check_table_output,
    cosine_threshold,
    default_workers,
    grid_rows,
    hash_distance,
    open_pile_index,
    pile_arguments,
    workers,
)
from plmetric.core.names import shown

SOFTWARE = "plmetric duplicates"


def add_parser(subparsers: Any) -> None:
    from plmetric.core.options import DUPLICATES_CANDIDATES as CANDIDATES  # no torch: --help stays fast
    from plmetric.core.options import DUPLICATES_HASH_DISTANCE as HASH_DISTANCE
    from plmetric.core.options import DUPLICATES_THRESHOLD as DEFAULT_THRESHOLD
    from plmetric.core.options import DUPLICATES_ZOOMS as ZOOMS

    du = add_command(
        subparsers,
        "duplicates",
        "near-duplicate groups of an index (copies of one photo: resized, recompressed, cropped) as a table",
    )
    pile_arguments(du)
    du.add_argument(
        "--out",
        required=True,
        help="table to write: .csv or .parquet; rows: group, size, path, best_score. A group is a set of images that "
        "are all duplicates of each other (never a chain of look-alikes), surest group first (by its weakest pair)",
    )
    du.add_argument(
        "--pairs",
        default=None,
        metavar="FILE",
        help="also write every duplicate pair to this table (.csv or .parquet): path_a, path_b, score (cosine), "
        "hash_distance (empty without hashes), signal (embedding, hash, both, or zoom with --check-crops)",
    )
    du.add_argument(
        "--hash-distance",
        type=hash_distance,
        default=None,
        metavar="N|off",
        help="images whose perceptual hashes (recorded by plmetric index; mirror-invariant) differ in at most N of 64 "
        "bits are also duplicates at cosine >= --candidates: resized or recompressed copies of small images that the "
        "embedding scores low; 0..64, or off (the embedding alone). Default: the limit calibrated by plmetric index "
        f"(recorded in the index), else {HASH_DISTANCE}",
    )
    du.add_argument(
        "--threshold",
        type=cosine_threshold,
        default=None,
        help="the threshold calibrated on this pile by plmetric index (recorded in the index); when the index "
        f"records none, default: {DEFAULT_THRESHOLD}. Two images are near-duplicates when the cosine similarity of their "
        "embeddings is at least this, in "
        "(-1, 1]; a group holds images that are all pairwise duplicates (a chain of look-alikes is not one group). Higher: "
        "fewer, closer copies; lower: also similar but different photos. The default was measured on the pretrained "
        "backbone's features with planted copies (docs/results.md): on CUB photos it found every resized, "
        "recompressed and mirrored copy and 90%% of 80-90%% crops at precision 0.97 (with --check-crops every crop, at "
        "precision 0.96). A trained checkpoint's "
        "embedding has its own scale of cosines: measure it with benchmarks/duplicates.py --checkpoint",
    )
    du.add_argument(
        "--check-crops",
        action="store_true",
        help="also find cropped copies: re-embed the images of every pair above --candidates zoomed in to "
        f"{', '.join(f'{round(100 * z)}%%' for z in ZOOMS)} of each side (centre) with the index's model and score "
        "each pair by the best view (a crop is the photo seen closer). Reads those image files again: up to "
        f"{len(ZOOMS)} extra embedding passes over them",
    )
    du.add_argument(
        "--candidates",
        type=cosine_threshold,
        default=CANDIDATES,
        help="the lowest cosine at which a pair can be a duplicate on other evidence: a close perceptual hash "
        "(--hash-distance; keeps apart different images whose hashes collide, such as blank ones), or with "
        "--check-crops a zoomed view reaching --threshold (the pairs rescored are those at or above it)",
    )
    du.add_argument("--batch-size", type=batch_size, default=32, help="with --check-crops: images per forward pass")
    du.add_argument(
        "--num-workers", type=workers, default=default_workers(), help="with --check-crops: decoding workers"
    )
    du.add_argument("--device", default="auto", help="with --check-crops: auto, cpu, cuda, cuda:1, ...")
    du.add_argument("--grid", default=None, help="also draw the first groups as a PNG grid (one row per group)")
    du.add_argument("--show", type=grid_rows, default=8, help="groups drawn on --grid and printed")
    du.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from plmetric.cli.common import refuse_indexed_outputs
    from plmetric.retrieval.duplicates import draw_groups, find_duplicates, write_groups_table, write_pairs_table
    from plmetric.retrieval.mapped import RateEstimate

    out = check_table_output(args, "duplicates")
    pairs_out = check_table_output(args, "pairs", "--pairs", args.pairs) if args.pairs else None
    grid = check_grid_output(args, SOFTWARE)
    if pairs_out is not None and pairs_out.resolve() in {p.resolve() for p in (out, grid) if p is not None}:
        raise CLIError(f"--pairs {pairs_out} is also --out or --grid: give the pairs table a file of its own")
    from plmetric.cli.calibrate import resolve_duplicates_options

    note = resolve_duplicates_options(args)  # --threshold / --hash-distance, else the index's calibration
    if args.check_crops and args.candidates > args.threshold:
        raise CLIError(
            f"--candidates {args.candidates:g} is above --threshold {args.threshold:g}: the pairs rescored for "
            "--check-crops must include those already above the threshold; give a lower --candidates"
        )
    pile, faiss_index = open_pile_index(args)
    embeddings, paths, description = pile.vectors, pile.paths, pile.model
    hashes = _index_hashes(args, pile)  # a malformed record: one line, before anything else is said
    if note:
        print(note, file=sys.stderr)
    recorded_id = pile.identity()  # recorded in the table: serve knows its index
    refuse_indexed_outputs([out, grid, pairs_out], paths)
    zoomed = _zoomed_views(args, paths, description) if args.check_crops else None
    how = f"through its faiss {faiss_index[1].kind} index" if faiss_index is not None else "exactly"
    print(f"near-duplicates among {len(paths):,} images at cosine >= {args.threshold:g}, {how}", file=sys.stderr)
    _announce_hashes(len(paths) if hashes is not None else 0)
    found = find_duplicates(
        embeddings,
        args.threshold,
        faiss_index,
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        progress=not args.no_progress,
        zoomed=zoomed,
        candidates=args.candidates,
        announce=_announce if args.check_crops else None,
        hashes=hashes,
        hash_distance=args.hash_distance,
        hash_floor=args.candidates,
        estimate=RateEstimate("near-duplicate candidates", len(paths)).first_block,
    )
    write_groups_table(out, found, paths, recorded_id)
    if pairs_out is not None:
        write_pairs_table(pairs_out, found.pair_list, paths, recorded_id)
    print(
        f"{len(found.groups):,} groups of near-duplicates: {found.members:,} of {len(paths):,} images "
        f"({_pair_summary(found.pair_list, args, hashes is not None)})"
    )
    for number, members in enumerate(found.groups[: args.show], start=1):
        names = ", ".join(shown(Path(paths[i]).name) for i in members[:4].tolist())
        more = f", ... (+{len(members) - 4})" if len(members) > 4 else ""
        print(f"  group {number} ({len(members)}): {names}{more}")
    written = [str(out)] + ([str(pairs_out)] if pairs_out is not None else [])
    if grid is not None:
        drawn = found.groups[: args.show]
        draw_groups(
            [[paths[i] for i in g.tolist()] for g in drawn],
            [found.best_score[g].tolist() for g in drawn],
            grid,
            max_groups=args.show,
            software=SOFTWARE,
        )
        written.append(str(grid))
    print(f"wrote {shown(', '.join(written))}")
    if not args.check_crops:
        print("(cropped copies score lower: --check-crops also finds them, re-reading the candidate images)")
    return 0


def _index_hashes(args: argparse.Namespace, pile: Any) -> Any:
    """The index's perceptual hashes (None: the hash signal off, or none recorded: said once)."""
    hashes = pile.hashes()  # checked even when unused: a forged record is refused either way
    if args.hash_distance < 0:
        return None
    if hashes is None:
        print(
            f"plmetric: note: {shown(args.index)} records no perceptual hashes (written by an older plmetric or by "
            "plmetric embed): duplicates uses the embedding alone; rebuild it with plmetric index to add them",
            file=sys.stderr,
        )
    return hashes


def _announce_hashes(count: int) -> None:
    """Say how long the hash pairs take where that is long (NumPy on a large pile, no faiss)."""
    from plmetric.retrieval.hashes import HASH_FAISS_ABOVE, numpy_seconds, uses_faiss

    if count >= HASH_FAISS_ABOVE and not uses_faiss(count):
        minutes = numpy_seconds(count) / 60
        print(f"hash pairs of {count:,} images in NumPy: about {minutes:.0f} min (faster with faiss)", file=sys.stderr)


def _pair_summary(pairs: Any, args: argparse.Namespace, hashed: bool) -> str:
    """How many pairs each signal found, for the printed summary."""
    counts = pairs.counts()
    parts = [f"{counts['embedding']:,} by the embedding (cosine >= {args.threshold:g})"]
    parts += [f"{counts['zoom']:,} by a zoomed view"] if args.check_crops else []
    hash_rule = f"distance <= {args.hash_distance}, cosine >= {args.candidates:g}"
    parts.append(
        f"{counts['hash']:,} by the hash alone ({hash_rule}), {counts['both']:,} by both"
        if hashed
        else ("hash signal off" if args.hash_distance < 0 else "no hashes in the index")
    )
    return f"{len(pairs.i):,} pairs: " + ", ".join(parts)


def _announce(count: int) -> None:
    from plmetric.retrieval.duplicates import ZOOMS

    print(
        f"--check-crops: {count:,} candidate images x {len(ZOOMS)} zoomed views to embed (about "
        f"{len(ZOOMS)}x the time 'plmetric index' took for them)",
        file=sys.stderr,
    )


def _zoomed_views(args: argparse.Namespace, paths: list[str], description: dict[str, Any]) -> Any:
    """The ``zoomed`` function of :func:`plmetric.retrieval.duplicates.find_duplicates`: the index's
    model (checked by its SHA-256) re-embeds the candidate images' zoomed views; a file changed or
    gone since indexing (its size or time differs from the index's record) is skipped, with a count."""
    import os

    import numpy as np

    from plmetric.core.devices import resolve_device
    from plmetric.data.backbones import description_transform
    from plmetric.retrieval.duplicates import ZOOMS, embed_zoomed
    from plmetric.retrieval.index import load_file_stats, model_from_description

    model = model_from_description(description, args.index).eval()
    device = resolve_device(args.device)
    model.to(device)
    transform = description_transform(description)
    stats = load_file_stats(args.index)  # (N, 2) int64: 16 bytes a row, also for a sharded index

    def unchanged(row: int) -> bool:
        path = paths[row]
        if path.startswith("item:"):
            return False
        try:
            st = os.stat(path)
        except OSError:
            return False
        return stats is None or (int(stats[row, 0]), int(stats[row, 1])) == (st.st_size, st.st_mtime_ns)

    def zoomed(rows: np.ndarray) -> np.ndarray:
        readable = np.array([unchanged(int(r)) for r in rows], dtype=bool)
        out = np.full((len(rows), len(ZOOMS), int(model.embedding_dim)), np.nan, dtype=np.float32)
        if readable.any():
            out[readable] = embed_zoomed(
                [paths[int(r)] for r in rows[readable]],
                model,
                transform,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                device=device,
                progress=not args.no_progress,
            )
        skipped = int((~readable).sum() + np.isnan(out[readable][:, 0, 0]).sum())
        if skipped:
            print(
                f"plmetric: warning: {skipped} candidate images were changed, moved or unreadable since "
                f"{shown(args.index)} was built: their pairs keep their plain scores",
                file=sys.stderr,
            )
        return out

    return zoomed
