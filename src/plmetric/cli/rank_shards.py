"""``plmetric embed`` / ``plmetric index`` under torchrun: one shard per rank, no gather of the vectors.

Row order: the images (the sorted folder listing, the ``--images``/``--paths-file`` order, or a data
set's order) are cut into ``WORLD_SIZE`` contiguous ranges, rank r taking items
``[r N / W, (r + 1) N / W)`` (:func:`rank_range`), so the ranks' rows concatenated in rank order are
exactly the rows one process writes, unreadable images left out the same way: the index equals the
one-process index (same paths, same order; vectors equal up to the float rounding of other batches).

Every rank embeds its range and writes it as shards of :mod:`plmetric.retrieval.stored` beside
``--out`` (so ``--out`` must be on a file system every node writes to: NFS, a cluster file system).
A shard records its first row, so the ranks first exchange how many rows each embedded (one integer
a rank); then each writes its shards and sends rank 0 its shard records ``{file, id, count, bytes}``.
Only these small objects travel (:func:`torch.distributed.all_gather_object`), never a vector. A rank
that fails sends its error instead: every rank still reaches each exchange, so nobody waits on a rank
that raised, and rank 0 removes every shard written and reports the first error in one line.

Rank 0 then works alone (the other ranks have exited): it writes a staged main file naming every
shard (:class:`RankCommit`), opens it with :func:`plmetric.retrieval.stored.open_index` (so a shard
that did not reach the shared folder, or is truncated or foreign, is refused in one line naming it
before anything replaces ``--out``), runs what needs the whole pile from the shards (``index``: the
duplicates calibration, the faiss index trained on a sample and filled block by block,
:func:`plmetric.retrieval.index.build_faiss_from_stored`), then commits the main file ``--out``
atomically and removes the staged one. ``--add-to`` of a sharded index works the same way: each rank
appends its own shards after the index's rows, rank 0 commits the old shards and the new ones.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plmetric.cli.common import CLIError


def torchrun_world() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when not launched by it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def rank_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """The contiguous items ``[start, stop)`` of ``n`` that rank ``rank`` of ``world`` embeds: sizes differ
    by at most one, and the ranges in rank order cover ``0..n`` once, in order."""
    return n * rank // world, n * (rank + 1) // world


def listing_digest(items: Iterable[str]) -> str:
    """A SHA-256 of a list of paths (each rank lists the images itself: they must agree)."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


@dataclass
class RankShards:
    """What rank 0 learns from every rank: the shard records in row (= rank) order and the totals."""

    records: list[dict[str, Any]]
    count: int
    dim: int
    unreadable: int
    images_per_second: float
    """rank 0's own embedding rate (one process's: what a calibration on rank 0 runs at)."""


def _absolute(paths: Sequence[str]) -> list[str]:
    return [p if p.startswith("item:") else str(Path(p).expanduser().resolve()) for p in paths]


def _exchange(value: Any) -> list[Any]:
    """Every rank's ``value`` (a small picklable object), in rank order."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _failure(err: Exception, doing: str = "") -> dict[str, Any]:
    """A rank's error as a status to exchange: its one line, and whether it is a bug rather than bad input."""
    from plmetric.cli.errors import error_line, known_errors

    return {"error": f"{doing}{error_line(err)}", "internal": not isinstance(err, known_errors()), "records": []}


def _first_error(statuses: Sequence[dict[str, Any]]) -> Exception | None:
    """The first rank's error, named by its rank: a CLIError (exit 2), or a RuntimeError for a bug (exit 1)."""
    for rank, status in enumerate(statuses):
        if status.get("error"):
            return (RuntimeError if status.get("internal") else CLIError)(f"rank {rank}: {status['error']}")
    return None


def remove_shards(out: Path, records: Iterable[dict[str, Any]]) -> None:
    """Remove the shard files ``records`` name beside ``out`` (written by this run, named by no index)."""
    for record in records:
        (out.parent / record["file"]).unlink(missing_ok=True)


def write_rank_shards(
    args: argparse.Namespace,
    model: Any,
    description: dict[str, Any],
    dataset: Any,
    out: Path,
    *,
    dtype: str,
    rows_per_shard: int,
    first_row: int = 0,
    hashes: bool = False,
    listing: str = "",
) -> RankShards | None:
    """Under torchrun: embed this rank's range of ``dataset`` and write it as shards beside ``out`` whose
    first row is ``first_row`` plus the rows of the ranks before (see the module docstring).

    ``listing`` identifies what every rank must agree on (e.g. :func:`listing_digest` of the images
    and the index grown): a rank that sees another list stops the run. Returns the records on rank 0
    and None on the others (their part is done; they exit).

    Raises:
        CLIError: on rank 0, when some rank failed on bad input (naming the rank and its error's line;
            every shard removed); RuntimeError the same for a bug.
    """
    import torch.distributed as dist

    from plmetric.core import distributed as dist_utils
    from plmetric.core.devices import resolve_device

    side = _set_transform(dataset, description, hashes)
    device = resolve_device(args.device)
    started = dist_utils.init_from_env(str(device))
    rank = dist.get_rank()
    try:
        if not _same_listing(listing, len(dataset), rank):
            return None  # rank 0 reports it
        found, seconds, statuses = _embed_range(args, model, description, dataset, device, side)
        error = _first_error(statuses)
        if error is not None:
            if rank == 0:
                raise error
            return None  # rank 0 reports it
        offset = first_row + sum(s["rows"] for s in statuses[:rank])
        statuses = _exchange(_write_range(found, dataset, out, dtype, rows_per_shard, offset, hashes))
    finally:
        if started:
            dist.destroy_process_group()
    if rank != 0:
        return None
    return _collected(statuses, out, len(dataset), seconds)


def _set_transform(dataset: Any, description: dict[str, Any], hashes: bool) -> Any:
    """Give ``dataset`` the model's evaluation transform (with the perceptual hash of each image alongside
    when ``hashes``); returns the empty hash batch ``embed_dataset`` fills, or None without hashes."""
    import torch

    from plmetric.data.backbones import description_transform
    from plmetric.retrieval.hashes import HASH_BYTES, HashAlongside

    dataset.transform = description_transform(description)
    if not hashes:
        return None
    dataset.transform = HashAlongside(dataset.transform)
    return torch.empty(0, HASH_BYTES, dtype=torch.uint8)


def _same_listing(listing: str, count: int, rank: int) -> bool:
    """Whether every rank lists the same images (checked before the long embedding: every rank must cut
    the same list); rank 0 raises when they differ, the others return False."""
    if all(s == (listing, count) for s in _exchange((listing, count))):
        return True
    if rank == 0:
        raise CLIError(
            "the ranks list different images (another folder, or files added or removed meanwhile): every "
            "node must see the same images at the same paths"
        )
    return False


def _embed_range(
    args: argparse.Namespace, model: Any, description: dict[str, Any], dataset: Any, device: Any, side: Any
) -> tuple[tuple[Any, ...], float, list[Any]]:
    """Embed this rank's :func:`rank_range` of ``dataset``, then exchange how many rows each rank embedded
    (a rank that failed sends its error instead): ``(what embed_dataset found, seconds, every rank's status)``."""
    import torch.distributed as dist
    from torch.utils.data import Subset

    from plmetric.cli.common import inference_runner
    from plmetric.evaluation.metrics import embed_dataset

    rank, world = dist.get_rank(), dist.get_world_size()
    status: dict[str, Any] = {}
    found: tuple[Any, ...] = ()
    began = time.perf_counter()
    try:
        start, stop = rank_range(len(dataset), world, rank)
        if stop > start:
            model.to(device)
            runner = inference_runner(args, model, description, device)
            found = embed_dataset(
                runner, Subset(dataset, range(start, stop)), batch_size=args.batch_size,
                num_workers=args.num_workers, device=device, progress=rank == 0 and not args.no_progress,
                runtime="torch", side=side,
            )
        status["rows"] = len(found[2]) if found else 0
    except Exception as err:  # every rank must reach the exchange: send the error instead
        status = _failure(err)
    seconds = time.perf_counter() - began
    return found, seconds, _exchange(status)


def _write_range(
    found: tuple[Any, ...], dataset: Any, out: Path, dtype: str, rows_per_shard: int, offset: int, hashes: bool
) -> dict[str, Any]:
    """Write this rank's rows as shards beside ``out``, the first one row ``offset``: the status to exchange,
    ``{records, dim}`` (a failure's status instead, its shards removed)."""
    from plmetric.retrieval.stored import ShardedIndexWriter

    writer: ShardedIndexWriter | None = None
    try:
        if not (found and len(found[2])):
            return {"records": [], "dim": None}
        emb, labels, index = found[:3]
        dim = int(emb.shape[1])
        named = dataset.paths is not None
        paths = _absolute([dataset.describe(i) if named else f"item:{i}" for i in index.tolist()])
        writer = ShardedIndexWriter(out, dim, dtype, rows_per_shard, first_row=offset)
        writer.add(emb, labels, paths, None, found[3].numpy() if hashes else None)
        writer.flush()
        return {"records": writer.records, "dim": dim}
    except Exception as err:
        if writer is not None:
            writer.abort()
        return _failure(err, f"cannot write its shards beside {out}: ")


def _collected(statuses: Sequence[dict[str, Any]], out: Path, items: int, seconds: float) -> RankShards:
    """Rank 0: every rank's shard records in row order, or the first rank's error (every shard removed)."""
    records = [r for s in statuses for r in s["records"]]
    error = _first_error(statuses)
    if error is not None:
        remove_shards(out, records)
        raise error
    count = sum(r["count"] for r in records)
    dims = {s["dim"] for s in statuses if s["dim"] is not None}
    if len(dims) > 1:
        remove_shards(out, records)
        raise CLIError(
            f"the ranks embedded vectors of different dimensions {sorted(dims)}: one model must run everywhere"
        )
    mine = statuses[0]["records"]
    rate = sum(r["count"] for r in mine) / max(seconds, 1e-6) if mine else 1.0
    return RankShards(records, count, dims.pop() if dims else 0, items - count, rate)


class RankCommit:
    """Rank 0's commit of shards written by every rank: entering writes a staged main file and opens it
    (``.stored``, every shard checked: the whole pile, read from the shards); :meth:`commit` writes
    ``out``. Leaving the block removes the staged main file, and on an exception (or without a commit)
    the new shards too; ``kept`` shards (of the index grown by ``--add-to``) are never removed."""

    def __init__(
        self,
        out: Path,
        shards: RankShards,
        model: dict[str, Any],
        dtype: str,
        *,
        kept: Sequence[dict[str, Any]] = (),
        kept_rows: int = 0,
    ) -> None:
        self.out, self.shards, self.model, self.dtype = Path(out), shards, model, dtype
        self.kept, self.kept_rows = [dict(r) for r in kept], int(kept_rows)
        self.staged = self.out.with_name(f".{self.out.stem}.staged-{secrets.token_hex(6)}.safetensors")
        self.committed = False
        self.stored: Any = None

    def _writer(self, path: Path) -> Any:
        from plmetric.retrieval.stored import ShardedIndexWriter

        return ShardedIndexWriter(
            path, self.shards.dim, self.dtype, kept_shards=self.kept + self.shards.records,
            first_row=self.kept_rows + self.shards.count,
        )

    def __enter__(self) -> RankCommit:
        from plmetric.retrieval.stored import open_index

        try:
            self._writer(self.staged).commit(self.model)
            # a shard missing from the shared folder, truncated or foreign: one line naming it
            self.stored = open_index(self.staged)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def commit(self, ann: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
        """Write the main file ``out`` naming every shard (atomically: the commit point)."""
        path = self._writer(self.out).commit(self.model, ann, extra)
        self.committed = True
        return path

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        self.staged.unlink(missing_ok=True)
        if not self.committed:
            remove_shards(self.out, self.shards.records)


def written_note(shards: RankShards, out: Path, dtype: str) -> str:
    """The line rank 0 prints once the index is committed."""
    from plmetric.core.names import shown

    skipped = f"; left out {shards.unreadable} unreadable image(s)" if shards.unreadable else ""
    return (
        f"wrote {shards.count:,} embeddings of dimension {shards.dim} to {shown(out)} ({dtype}, "
        f"{len(shards.records)} shard(s) beside it, written by the ranks){skipped}"
    )


def faiss_plan(count: int, dim: int, options: Any) -> Any:
    """``ann.plan_index`` for ``count`` vectors of dimension ``dim`` (passed where the planner takes it)."""
    import inspect

    from plmetric.manifold import ann

    extra = {"dim": dim} if "dim" in inspect.signature(ann.plan_index).parameters else {}
    return ann.plan_index(count, options, **extra)
