"""``plmetric embed``: images (folders, files, a paths file or a data set split) -> embeddings, as a
``.safetensors`` index, ``.npy`` + paths file or ``.parquet``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from plmetric.cli.common import (
    DATASET_CHOICES,
    CLIError,
    add_command,
    check_output,
    embed_images,
    image_paths,
    is_index,
    model_options,
)
from plmetric.core.names import shown


def add_parser(subparsers: Any) -> None:
    em = add_command(subparsers, "embed", "images -> embeddings (.safetensors index, .npy + paths file, or .parquet)")
    model_options(em)
    em.add_argument(
        "--images", nargs="+", default=None, metavar="DIR|FILE", help="folders (searched recursively) or image files"
    )
    em.add_argument("--paths-file", default=None, help="a text file of image paths, one per line")
    em.add_argument("--dataset", default=None, choices=DATASET_CHOICES, help="a data set instead of --images")
    em.add_argument("--data-root", default=None, help="root of --dataset in its official layout")
    em.add_argument("--split", default="test", choices=["train", "test"], help="which split of --dataset")
    em.add_argument(
        "--out",
        required=True,
        help="output: X.safetensors (an index search reads), X.npy (+ X.paths.txt, X.json) or X.parquet "
        "(columns path, label, embedding)",
    )
    em.add_argument(
        "--float16",
        action="store_true",
        help="X.safetensors only: store the vectors as float16 (a sharded index, half the size): scores then "
        "carry float16 rounding (about 1e-3 relative)",
    )
    em.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from plmetric.data.datasets import load_dataset, load_unlabelled_folder
    from plmetric.retrieval.embedding_files import SUFFIXES, require_parquet, sidecars, write_embeddings
    from plmetric.retrieval.index import load_embedding_model, write_index

    # every check on the output comes before the first image is read
    out = check_output(args.out, "--out", SUFFIXES, (args.checkpoint, args.weights), _replaceable_embeddings)
    for sidecar in sidecars(out):  # X.paths.txt, X.json: replaced only together with their X.npy
        check_output(
            sidecar, "--out", (sidecar.suffix,), (args.checkpoint, args.weights), lambda _: _replaceable_embeddings(out)
        )
    if out.suffix.lower() == ".parquet":
        require_parquet()
    if getattr(args, "float16", False) and out.suffix.lower() != ".safetensors":
        raise CLIError(f"--float16 applies to a .safetensors index, not --out {out}")
    if args.images or args.paths_file:
        if args.dataset:
            raise CLIError("give --images/--paths-file or --dataset, not both")
        if len(args.images or []) == 1 and not args.paths_file and Path(args.images[0]).is_dir():
            dataset = load_unlabelled_folder(args.images[0]).train
        else:
            from plmetric.data.datasets import ImageDataset

            listed = image_paths(args.images or [], args.paths_file, "--images")
            dataset = ImageDataset([str(p.resolve()) for p in listed], None, None, "images")
    else:
        if not args.dataset:
            raise CLIError("give --images DIR|FILE..., --paths-file or --dataset NAME (with --data-root)")
        splits = load_dataset(args.dataset, args.data_root)
        dataset = getattr(splits, args.split)
        if dataset is None:
            raise CLIError(f"--dataset {args.dataset} has no {args.split} split")
    model, description = load_embedding_model(
        args.checkpoint, args.backbone, args.embedding_dim, args.weights, image_size=args.image_size
    )
    from plmetric.cli.rank_shards import torchrun_world

    if torchrun_world() > 1 and out.suffix.lower() == ".safetensors":
        return _embed_by_rank(args, model, description, dataset, out)
    emb, labels, paths, unreadable, writer = embed_images(args, model, description, dataset)
    if emb.shape[0] == 0:
        raise CLIError(f"no image could be read ({unreadable} unreadable): nothing to write to {out}")
    if not writer:
        return 0  # torchrun: rank 0 writes the gathered result
    if out.suffix.lower() == ".safetensors":
        from plmetric.cli.storage import storage

        dtype, rows_per_shard = storage(paths, bool(getattr(args, "float16", False)), None)
        write_index(out, emb, labels, paths, description, dtype=dtype, rows_per_shard=rows_per_shard)
    else:
        write_embeddings(out, emb, labels, paths, description)
    skipped = f"; left out {unreadable} unreadable image(s)" if unreadable else ""
    beside = "".join(f" + {p.name}" for p in sidecars(out))
    print(f"wrote {len(paths):,} embeddings of dimension {emb.shape[1]} to {shown(f'{out}{beside}')}{skipped}")
    return 0


def _embed_by_rank(args: argparse.Namespace, model: Any, description: dict[str, Any], dataset: Any, out: Path) -> int:
    """Under torchrun, ``--out X.safetensors``: every rank writes its own shards, rank 0 commits the index
    (:mod:`plmetric.cli.rank_shards`)."""
    from plmetric.cli.rank_shards import RankCommit, listing_digest, write_rank_shards, written_note
    from plmetric.retrieval.stored import DEFAULT_SHARD_ROWS

    dtype = "float16" if getattr(args, "float16", False) else "float32"
    listing = listing_digest(dataset.describe(i) for i in range(len(dataset)))
    shards = write_rank_shards(
        args, model, description, dataset, out, dtype=dtype, rows_per_shard=DEFAULT_SHARD_ROWS, listing=listing
    )
    if shards is None:
        return 0  # rank 0 commits the index
    if shards.count == 0:
        raise CLIError(f"no image could be read ({shards.unreadable} unreadable): nothing to write to {out}")
    with RankCommit(out, shards, description, dtype) as commit:
        commit.commit()
    print(written_note(shards, out, dtype))
    return 0


def _replaceable_embeddings(path: Path) -> bool:
    """``embed`` replaces only its own outputs: an index, or an export of
    :mod:`plmetric.retrieval.embedding_files`."""
    from plmetric.retrieval.embedding_files import is_embedding_export

    return is_index(path) if path.suffix.lower() == ".safetensors" else is_embedding_export(path)
