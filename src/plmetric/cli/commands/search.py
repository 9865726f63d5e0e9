"""``plmetric search``: query images -> their top-k most similar images in an index (many queries in
one process), printed, drawn as PNG grids, and written as JSON/CSV. A query that is itself an indexed
image (the same absolute path) is left out of its own results unless ``--include-self``. One query on an
index that names its cached ONNX export is answered without importing torch
(:mod:`plmetric.retrieval.quick_search`: about a second instead of ten); anything else takes the PyTorch path."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plmetric.core.files import require_regular_file
from plmetric.cli.common import (
    CLIError,
    add_command,
    batch_size,
    beam_width,
    image_paths,
    inference_runner,
    int_at_least,
    neighbours,
    nlist_count,
    runtime_option,
    workers,
)
from plmetric.core.names import shown
from plmetric.core.validation import MAX_NEIGHBOURS

rerank_count = int_at_least(1, MAX_NEIGHBOURS)  # --rerank: ivfpq candidates re-scored exactly


def add_parser(subparsers: Any) -> None:
    se = add_command(
        subparsers, "search", "images -> their top-k most similar images in an index (many queries in one process)"
    )
    se.add_argument("query", nargs="*", help="query image files or folders (searched recursively)")
    se.add_argument("--queries-file", default=None, help="a text file of query paths, one per line")
    se.add_argument("--index", required=True, help="index written by 'plmetric index'")
    se.add_argument("--top-k", type=neighbours, default=8, help="number of results per query")
    se.add_argument(
        "--out",
        default=None,
        help="one query: PNG grid of the results (default: QUERY_results.png in the working folder, "
        "unless --json or --csv is given: then no grid without --out)",
    )
    se.add_argument("--out-dir", default=None, help="a PNG grid per query, QUERY_results.png, in this folder")
    se.add_argument("--json", default=None, help="write every query's results (rank, path, score) as JSON")
    se.add_argument("--csv", default=None, help="write every query's results as CSV: query,rank,path,score")
    se.add_argument("--batch-size", type=batch_size, default=64, help="query images per forward pass")
    se.add_argument("--num-workers", type=workers, default=0, help="decoding workers for many queries")
    runtime_option(se)
    se.add_argument("--exact", action="store_true", help="exact torch search even when the index has a faiss index")
    se.add_argument("--nprobe", type=nlist_count, default=None, help="IVF cells to scan (default: the index's own)")
    se.add_argument("--ef-search", type=beam_width, default=None, help="HNSW search beam (default: the index's own)")
    se.add_argument(
        "--rerank",
        type=rerank_count,
        default=None,
        help="ivfpq candidates re-scored exactly per query, at least --top-k (default: the index's own)",
    )
    se.add_argument(
        "--include-self",
        action="store_true",
        help="keep a query's own file in its results (left out by default: a query that is an indexed image "
        "gets the --top-k other images most similar to it)",
    )
    se.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from plmetric.cli.search_outputs import search_outputs, write_search_tables
    from plmetric.retrieval.result_grid import draw_results

    require_regular_file(args.index, "index/embeddings file")  # the index first: without it no query matters
    queries = _query_paths(args)
    grids, json_out, csv_out = search_outputs(args, queries)
    outputs = (*grids, json_out, csv_out)
    asked = args.top_k if args.include_self else args.top_k + 1  # one more: room to drop the query's own file
    searched = _quick_search(args, queries, outputs, asked)  # one query through the cached export: no torch
    paths, scores, indices, found = searched or _torch_search(args, queries, outputs, asked)
    ids = _row_finder(paths)
    report, rows, moved, count = [], [], 0, 0
    for row, q in enumerate(found):
        query = str(queries[q].resolve())  # --json and --csv both name the query by its absolute path
        own = None if args.include_self else ids(query)
        kept = without_self(indices[row].tolist(), own, args.top_k)
        results = [paths[i] for _, i in kept]
        row_scores = scores[row].tolist()
        values = [row_scores[r] for r, _ in kept]
        count += len(results)
        missing = [not Path(p).is_file() for p in results]
        moved += sum(missing)
        if len(found) > 1:
            print(f"query {shown(queries[q])}")
        for rank_, (p, value, gone) in enumerate(zip(results, values, missing, strict=True), start=1):
            note = "  (missing: moved or deleted since indexing)" if gone else ""
            print(f"{rank_:3d}  {value:.4f}  {shown(p)}{note}")
            rows.append((query, rank_, p, value))
        report.append(
            {
                "query": query,
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
            f"plmetric: warning: {moved} of {count} results no longer exist where {shown(args.index)} "
            "recorded them: the images moved or were deleted since the index was built; rebuild it",
            file=sys.stderr,
        )
    read = set(found)
    unreadable = [str(query.resolve()) for q, query in enumerate(queries) if q not in read]
    write_search_tables(args, json_out, csv_out, report, rows, unreadable)
    written = [str(g) for g in grids if g is not None] + [str(o) for o in (json_out, csv_out) if o is not None]
    if written:
        print(f"wrote {shown(', '.join(written)) if len(written) <= 3 else f'{len(written)} files'}")
    elif len(queries) > 1:
        print("no grids drawn: give --out-dir DIR for one grid per query")
    return 0


def _quick_search(
    args: argparse.Namespace, queries: list[Path], outputs: tuple[Path | None, ...], asked: int
) -> tuple[list[str], Any, Any, list[int]] | None:
    """``(index paths, scores, ids, found queries)`` of one query without importing torch
    (:mod:`plmetric.retrieval.quick_search`: the cached ONNX export the index names, NumPy search), or
    None when that path cannot give the PyTorch path's answer."""
    from plmetric.retrieval.quick_search import open_quick_index

    quick = open_quick_index(args.index, runtime=args.runtime, exact=args.exact, queries=len(queries))
    if quick is None:
        return None
    _refuse_indexed_outputs(quick.paths, outputs)
    if not quick.load_model():  # IndexMismatchError for a changed model, as the PyTorch path
        return None
    scores, indices = quick.search(quick.embed(queries[0]), asked)
    return quick.paths, scores, indices, [0]


def _torch_search(
    args: argparse.Namespace, queries: list[Path], outputs: tuple[Path | None, ...], asked: int
) -> tuple[list[str], Any, Any, list[int]]:
    """``(index paths, scores, ids, found queries)``: the index's model rebuilt with PyTorch, the queries
    embedded through ``--runtime``, searched exactly or through the index's faiss file."""
    from plmetric.data.backbones import description_transform
    from plmetric.retrieval.index import load_faiss_index, model_from_description, search
    from plmetric.retrieval.stored import open_index

    stored = open_index(args.index)  # mapped: only the vectors a search reads are read
    database, paths, description = stored.vectors, stored.paths, stored.model
    faiss_index = None if args.exact else load_faiss_index(args.index)  # faiss there, the .faiss file its own
    _refuse_indexed_outputs(paths, outputs)
    transform = description_transform(description)
    model = inference_runner(args, model_from_description(description, args.index), dict(description), "cpu")
    embeddings, found = _embed_queries(args, queries, model, transform)
    if embeddings.shape[1] != database.dim:
        raise ValueError(
            f"query embedding has dimension {embeddings.shape[1]}, the index {args.index} {database.dim}"
        )
    scores, indices = search(
        args.index, embeddings, asked, database, faiss_index, nprobe=args.nprobe, ef_search=args.ef_search,
        rerank=args.rerank,
    )
    return paths, scores, indices, found


def _refuse_indexed_outputs(paths: Any, outputs: tuple[Path | None, ...]) -> None:
    """Refuse an output file that is one of the index's images (writing it would destroy it). ``paths``:
    a list (every path resolved), or a mapped :class:`plmetric.retrieval.stored.StoredPaths` (its
    absolute paths compared as recorded, without a list of them in memory)."""
    if isinstance(paths, list):
        indexed = {Path(p).resolve() for p in paths}
        hit = lambda out: out.expanduser().resolve() in indexed  # noqa: E731
    else:
        hit = lambda out: paths.find(str(out.expanduser().resolve())) is not None  # noqa: E731
    for out in outputs:
        if out is not None and hit(out):
            raise CLIError(f"{out} is an image of the index; writing it would destroy it")


def _row_finder(paths: Any) -> Callable[[str], int | None]:
    """The row of an indexed path (None: not indexed): a dictionary for a list, a search of the bytes
    for a :class:`plmetric.retrieval.stored.StoredPaths`."""
    if isinstance(paths, list):
        rows = {p: i for i, p in enumerate(paths)}
        return rows.get
    return paths.find


def without_self(ids: list[int], own: int | None, k: int) -> list[tuple[int, int]]:
    """``(position, id)`` of the first ``k`` found ids (-1: a slot an approximate index left empty),
    leaving out ``own``, the query's own index id (None: nothing left out). Only that id is dropped,
    never an equal score: another file with the same content stays."""
    return [(r, i) for r, i in enumerate(ids) if i >= 0 and i != own][:k]


def _query_paths(args: argparse.Namespace) -> list[Path]:
    """The query images: files, folders (searched recursively) and the lines of ``--queries-file``."""
    files = [Path(query) for query in args.query]
    if files and not args.queries_file and all(f.is_file() for f in files):
        return files  # image_paths' answer for files, without importing its folder walk (and torch)
    return image_paths(args.query, args.queries_file, "query", "--queries-file")


def _embed_queries(
    args: argparse.Namespace, queries: list[Path], model: Any, transform: Callable
) -> tuple[Any, list[int]]:
    """The query embeddings and the positions of the queries they belong to. One query: any
    unreadable or oversized file is an error; several: unreadable ones are left out."""
    import torch

    from plmetric.data.datasets import ImageDataset
    from plmetric.evaluation.metrics import embed_dataset
    from plmetric.retrieval.index import read_query_image

    if len(queries) == 1:
        with torch.no_grad():
            return model.eval()(read_query_image(queries[0], transform).unsqueeze(0)), [0]
    dataset = ImageDataset(queries, None, transform, "queries")
    embeddings, _, index = embed_dataset(
        model, dataset, batch_size=args.batch_size, num_workers=args.num_workers, progress=False, runtime="torch"
    )
    if index.numel() == 0:
        raise ValueError(f"none of the {len(queries)} query images could be read")
    return embeddings, index.tolist()
