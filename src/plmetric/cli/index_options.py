"""The search-index (faiss) options of ``plmetric index``: their arguments (:func:`index_arguments`),
the ``IndexOptions`` they make (:func:`index_options`), what ``--add-to`` accepts of them
(:func:`check_add_options`), and the line naming the search structure written (:func:`faiss_note`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from plmetric.cli.common import CLIError, beam_width, int_at_least, nlist_count
from plmetric.core.options import MAX_HNSW_M, MAX_MEMORY_BUDGET_MIB, MAX_PQ_M

#: The options that shape a faiss index's structure: ``--add-to`` keeps the index's own.
BUILD_OPTIONS = (
    ("faiss", "--faiss"),
    ("nlist", "--nlist"),
    ("hnsw_m", "--hnsw-m"),
    ("ef_construction", "--ef-construction"),
    ("memory_budget_mib", "--memory-budget"),
    ("pq_m", "--pq-m"),
)


def index_arguments(p: argparse.ArgumentParser) -> None:
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


def index_options(args: argparse.Namespace) -> Any:
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


def faiss_note(plan: Any, faiss_path: Path | None) -> str:
    """One line on the search structure written beside the index."""
    if plan is None or faiss_path is None:
        return "exact search (no faiss index)"
    params = ", ".join(f"{k} {v}" for k, v in plan.params.items() if k != "trained_on")
    return f"faiss {plan.kind} index{f' ({params})' if params else ''} in {faiss_path}"


def check_add_options(args: argparse.Namespace, meta: dict[str, Any], source: Path) -> None:
    """``--add-to`` keeps the index's faiss kind and structure: build options refused, search options only
    for the kind they tune."""
    kind = (meta.get("ann") or {}).get("kind", "none")
    for dest, option in BUILD_OPTIONS:
        if getattr(args, dest) is not None:
            raise CLIError(
                f"{option}: --add-to keeps the index's own kind and structure (--faiss {kind}); "
                "to change them build a new index with --out"
            )
    if (args.nprobe is not None and kind not in ("ivf", "ivfpq")) or (args.ef_search is not None and kind != "hnsw"):
        option = "--nprobe" if args.nprobe is not None else "--ef-search"
        raise CLIError(f"{option} does not apply to {source}: its index kind is {kind}")
