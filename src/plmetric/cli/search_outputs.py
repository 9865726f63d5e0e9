"""The outputs of ``plmetric search``: the PNG grids, ``--json`` and ``--csv``, checked before any work
(:func:`search_outputs`), and the two tables written once every query is answered
(:func:`write_search_tables`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from plmetric.cli.common import CLIError, check_output


def grid_names(queries: list[Path], out_dir: Path) -> list[Path]:
    """``<stem>_results.png`` in ``out_dir`` for every query; repeated stems get a counter."""
    names, used = [], set()
    for n, query in enumerate(queries):
        name = f"{query.stem}_results.png"
        if name in used:
            name = f"{query.stem}_{n}_results.png"
        used.add(name)
        names.append(out_dir / name)
    return names


def search_outputs(
    args: argparse.Namespace, queries: list[Path]
) -> tuple[list[Path | None], Path | None, Path | None]:
    """``search``'s outputs, checked before any work: a grid per query (``--out`` for one query,
    ``--out-dir`` for several, None where none is drawn), ``--json`` and ``--csv``. One query without
    ``--out`` gets ``QUERY_results.png`` only when neither ``--json`` nor ``--csv`` is asked for (a
    table asked for is the output: no grid appears in the working folder unasked)."""
    inputs = [args.index, args.queries_file, *queries]
    if args.out and len(queries) > 1:
        raise CLIError("--out names one grid: with several queries give --out-dir DIR (a grid per query)")
    grids: list[Path | None] = [None] * len(queries)
    if len(queries) == 1 and not args.out_dir and (args.out or not (args.json or args.csv)):
        out = Path(args.out) if args.out else Path(f"{queries[0].stem}_results.png")
        grids = [check_output(out, "--out", (".png",), inputs)]
    elif args.out_dir:
        out_dir = Path(args.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise CLIError(f"--out-dir {out_dir} is a file; expected a folder for the grids")
        grids = [check_output(g, "--out-dir", (".png",), inputs) for g in grid_names(queries, out_dir)]
    json_out = check_output(args.json, "--json", (".json",), inputs) if args.json else None
    csv_out = check_output(args.csv, "--csv", (".csv",), inputs) if args.csv else None
    return grids, json_out, csv_out


def write_search_tables(
    args: argparse.Namespace,
    json_out: Path | None,
    csv_out: Path | None,
    report: list[dict[str, Any]],
    rows: list[tuple[str, int, str, float]],
    unreadable: list[str],
) -> None:
    """Write ``--json`` (every query's ranked results) and ``--csv`` (query, rank, path, score); names
    as :mod:`plmetric.retrieval.tables` writes them (a name that is not UTF-8 as a ``file:`` URI of
    its bytes; in the CSV, text quoted and a formula start neutralised), read back by its
    ``decode_name`` (and ``read_csv_text`` for a CSV field)."""
    from plmetric.core.checkpoint import atomic_write_bytes, atomic_write_json
    from plmetric.retrieval.tables import csv_lines, encode_name

    if json_out is not None:
        atomic_write_json(
            json_out,
            {
                "index": encode_name(str(Path(args.index).resolve())),
                "top_k": args.top_k,
                "include_self": args.include_self,
                "queries": [
                    {
                        "query": encode_name(entry["query"]),
                        "results": [{**hit, "path": encode_name(hit["path"])} for hit in entry["results"]],
                    }
                    for entry in report
                ],
                "unreadable_queries": [encode_name(name) for name in unreadable],
            },
        )
    if csv_out is not None:
        names = ("query", "rank", "path", "score")
        lines = csv_lines(list(zip(*rows, strict=True)) or [[] for _ in names], names, float_digits=None)
        atomic_write_bytes(csv_out, (",".join(names) + "\n" + lines).encode())
