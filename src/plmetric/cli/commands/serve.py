"""``plmetric serve``: a local web page to browse an index (its model loaded once, at start-up)."""

from __future__ import annotations

import argparse
from typing import Any

from plmetric.cli.common import CLIError, HelpFormatter, add_command, neighbours, runtime_option
from plmetric.retrieval.serve_requests import MAX_API_TOP_K

ROUTES = f"""\
routes (GET unless said; N: an image's number in the index, from 0; ?page=P on the listing pages):
  /                     the indexed images, 48 a page, each a link that searches from it; an upload form
  /search?id=N          the results page of indexed image N (N itself left out unless --include-self)
  POST /search          the results page of an uploaded image (multipart field 'image')
  /api/search?id=N      the results as JSON (also POST, field 'image'): {{"index", "top_k", "query",
                        "query_id", "results": [{{"rank", "id", "path", "score", "missing"}}]}};
                        &top_k=K (1 to {MAX_API_TOP_K}) for K results instead of --top-k; an error is
                        {{"error": "..."}} with 400 (id or top_k not digits or out of range), 404 (no
                        image N), 413 (upload over 20 MiB or 50 megapixels), 429 (busy decoding)
  /thumb/N, /image/N    image N as a 256 px JPEG thumbnail / in full, decoded and re-encoded (JPEG
                        for a JPEG file, else PNG); 404 missing or not an image, 410 changed since indexing
  /groups, /groups/G    with --groups: the groups with their first members; group G's members
                        (G a number, or 'ungrouped')
  /duplicates[/G]       the same with --duplicates"""
"""serve's routes, the epilog of its --help (the README's table says the same)."""


class _RoutesFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """serve's --help: options with their defaults, the routes' table as written."""


def add_parser(subparsers: Any) -> None:
    sv = add_command(
        subparsers, "serve", "a local web page to browse an index: pick or upload a query image, click to search on"
    )
    sv.formatter_class = _RoutesFormatter
    sv.epilog = ROUTES
    sv.add_argument("index", help="index written by 'plmetric index' (its model is loaded once, at start-up)")
    sv.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (other than localhost: other machines see the images)"
    )
    sv.add_argument("--port", type=port, default=8000, help="TCP port to listen on")
    sv.add_argument("--top-k", type=neighbours, default=12, help="number of results per query")
    sv.add_argument(
        "--include-self",
        action="store_true",
        help="keep an indexed query image in its own results (left out by default: the --top-k other images)",
    )
    sv.add_argument(
        "--groups",
        default=None,
        metavar="FILE",
        help="browse the groups of this table of 'plmetric groups' (.csv/.parquet)",
    )
    sv.add_argument(
        "--duplicates",
        default=None,
        metavar="FILE",
        help="browse the near-duplicate groups of this table of 'plmetric duplicates' (.csv/.parquet)",
    )
    runtime_option(sv)
    sv.set_defaults(func=run)


def port(text: str) -> int:
    """An argparse type: a TCP port number, 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port number from 1 to 65535, got '{text}'") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port number from 1 to 65535, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    from plmetric.retrieval.serve import ServeDependencyError, serve

    try:
        serve(
            args.index,
            host=args.host,
            port=args.port,
            top_k=args.top_k,
            include_self=args.include_self,
            groups=args.groups,
            duplicates=args.duplicates,
            runtime=args.runtime,
        )
    except ServeDependencyError as err:
        raise CLIError(str(err)) from None
    return 0
