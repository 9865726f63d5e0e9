"""Sharded embedding under torchrun (issue 31), the parts that need no process group: the rank ranges,
rank 0's commit of shards that other ranks wrote, and faiss built from stored shards without
gathering the vectors. ``test_distributed_embed.py`` runs the whole thing under torchrun."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from plmetric.cli.rank_shards import RankCommit, RankShards, rank_range
from plmetric.retrieval.index import (
    build_faiss_from_stored,
    grow_faiss_from_stored,
    load_embeddings,
    load_hashes,
    read_index_metadata,
    write_index,
)
from plmetric.retrieval.quick_search import IndexMismatchError
from plmetric.retrieval.stored import ShardedIndexWriter, open_index

MODEL = {"checkpoint": None, "backbone": "efficientnet_lite0", "embedding_dim": 0, "output_dim": 8, "image_size": 32}


def _vectors(n: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def _names(n: int, start: int = 0) -> list[str]:
    return [f"/pile/img_{i:04d}.png" for i in range(start, start + n)]


@pytest.mark.parametrize("n,world", [(0, 3), (1, 4), (9, 2), (10, 3), (1000, 7), (12, 12)])
def test_rank_ranges_cover_the_items_once_in_order(n, world):
    ranges = [rank_range(n, world, r) for r in range(world)]
    assert [i for start, stop in ranges for i in range(start, stop)] == list(range(n))  # rank order = item order
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1


def _rank_shards(out: Path, x: torch.Tensor, names: list[str], shares: list[int], rows: int, first: int = 0):
    """What ``write_rank_shards`` leaves: each rank's rows written by its own writer after the rows of the
    ranks before, and the records rank 0 gathers, in rank order."""
    records, start = [], 0
    hashes = np.arange(len(x) * 16).reshape(-1, 16).astype(np.uint8)
    for share in shares:
        writer = ShardedIndexWriter(out, x.shape[1], "float32", rows, first_row=first + start)
        stop = start + share
        writer.add(x[start:stop], torch.arange(start, stop), names[start:stop], None, hashes[start:stop])
        writer.flush()
        records += writer.records
        start = stop
    return RankShards(records, len(x), x.shape[1], 0, 1.0)


def test_rank_commit_equals_the_one_process_index(tmp_path):
    x, names = _vectors(11), _names(11)
    shards = _rank_shards(tmp_path / "two.safetensors", x, names, [6, 5], rows=4)
    with RankCommit(tmp_path / "two.safetensors", shards, MODEL, "float32") as staged:
        assert staged.stored.count == 11 and len(staged.stored.shard_files) == 4  # 4 + 2 and 4 + 1
        staged.commit(extra={"note": "kept"})
    write_index(tmp_path / "one.safetensors", x, torch.arange(11), names, MODEL,
                hashes=np.arange(11 * 16).reshape(-1, 16).astype(np.uint8))
    one, two = load_embeddings(tmp_path / "one.safetensors"), load_embeddings(tmp_path / "two.safetensors")
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]) and one[2] == two[2]
    assert (load_hashes(tmp_path / "one.safetensors") == load_hashes(tmp_path / "two.safetensors")).all()
    assert read_index_metadata(tmp_path / "two.safetensors")["note"] == "kept"
    assert not list(tmp_path.glob(".two.staged-*"))  # the staged main file is gone


@pytest.mark.parametrize("damage", ["missing", "truncated", "foreign"])
def test_rank_commit_refuses_a_damaged_shard_and_keeps_the_old_index(tmp_path, damage):
    out = tmp_path / "pile.safetensors"
    write_index(out, _vectors(3, seed=5), torch.zeros(3, dtype=torch.long), _names(3, 100), MODEL)  # a good old index
    before = out.read_bytes()
    x, names = _vectors(8), _names(8)
    shards = _rank_shards(out, x, names, [4, 4], rows=4)
    victim = tmp_path / shards.records[1]["file"]  # rank 1's shard, e.g. written on a node's local disk
    if damage == "missing":
        victim.unlink()
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-8])
    else:  # a shard of the same shape from another run, under the recorded name
        other = _rank_shards(tmp_path / "other.safetensors", x, names, [4, 4], rows=4)
        (tmp_path / other.records[1]["file"]).replace(victim)
    with pytest.raises(IndexMismatchError) as raised:
        with RankCommit(out, shards, MODEL, "float32"):
            raise AssertionError("the staged index must not open")
    message = str(raised.value)
    assert "\n" not in message and str(victim) in message and {"missing": "missing", "truncated": "bytes",
                                                                 "foreign": "not the shard"}[damage] in message
    assert out.read_bytes() == before  # nothing replaced the good index
    assert not any((tmp_path / r["file"]).exists() for r in shards.records[:1])  # this run's shards removed
    assert not list(tmp_path.glob(".pile.staged-*"))


def test_rank_commit_removes_the_new_shards_when_rank_0_fails_after_staging(tmp_path):
    out = tmp_path / "pile.safetensors"
    shards = _rank_shards(out, _vectors(6), _names(6), [3, 3], rows=4)
    with pytest.raises(RuntimeError), RankCommit(out, shards, MODEL, "float32"):
        raise RuntimeError("the faiss build failed")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_rank_commit_grows_a_sharded_index_keeping_its_shards(tmp_path):
    out = tmp_path / "pile.safetensors"
    x = _vectors(10)
    write_index(out, x[:4], torch.arange(4), _names(4), MODEL, rows_per_shard=3)
    stored = open_index(out)
    old = ShardedIndexWriter.extending(stored, out).kept
    shards = _rank_shards(out, x[4:], _names(6, 4), [3, 3], rows=4, first=stored.count)
    with RankCommit(out, shards, MODEL, "float32", kept=old, kept_rows=stored.count) as staged:
        staged.commit()
    grown = load_embeddings(out)
    assert torch.equal(grown[0], x) and grown[2] == _names(10)
    assert all((tmp_path / r["file"]).exists() for r in old)


def _stored(tmp_path: Path, x: torch.Tensor, rows: int = 10):
    model = {**MODEL, "output_dim": x.shape[1]}
    write_index(tmp_path / "pile.safetensors", x, torch.zeros(len(x), dtype=torch.long), _names(len(x)), model,
                rows_per_shard=rows)
    return open_index(tmp_path / "pile.safetensors")


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_faiss_built_from_shards_block_by_block_is_the_one_built_in_memory(tmp_path, kind):
    pytest.importorskip("faiss")
    from plmetric.manifold import ann

    x = _vectors(300, dim=16)
    stored = _stored(tmp_path, x, rows=70)  # blocks of 64 cross the shards' boundaries
    plan = ann.plan_index(300, kind=kind, nlist=4) if kind == "ivf" else ann.plan_index(300, kind=kind)
    from_shards = build_faiss_from_stored(stored, plan, rows_per_block=64)
    in_memory = ann.build_index(x, plan)
    # 300 rows <= 256 a cell: both train on every row in the same order; adding rows in blocks files
    # each row as adding them at once does: the same bytes
    assert ann.serialize_index(from_shards) == ann.serialize_index(in_memory)


def test_hnsw_built_from_shards_finds_every_row(tmp_path):
    pytest.importorskip("faiss")
    from plmetric.manifold import ann

    x = _vectors(200, dim=16)
    plan = ann.plan_index(200, kind="hnsw")
    index = build_faiss_from_stored(_stored(tmp_path, x, rows=50), plan, rows_per_block=32)
    assert index.ntotal == 200
    _, ids = ann.search_index(index, x, 1, plan)
    assert torch.equal(ids[:, 0], torch.arange(200))  # ids are rows: each row finds itself


def test_faiss_grown_from_new_shards_is_the_one_grown_in_memory(tmp_path):
    pytest.importorskip("faiss")
    from plmetric.manifold import ann

    x = _vectors(300, dim=16)
    plan = ann.plan_index(200, kind="ivf", nlist=4)
    stored = _stored(tmp_path, x, rows=70)
    grown, new_plan = grow_faiss_from_stored((ann.build_index(x[:200], plan), plan), stored, 200, nprobe=3,
                                             rows_per_block=32)
    expected = ann.build_index(x[:200], plan)
    ann.add_vectors(expected, x[200:])
    assert ann.serialize_index(grown) == ann.serialize_index(expected) and new_plan.params["nprobe"] == 3
    assert grow_faiss_from_stored(None, stored, 200) == (None, None)


@pytest.fixture
def one_rank_group():
    """A gloo process group of one process (what torchrun sets up), for ``write_rank_shards`` in-process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def _pile(tmp_path: Path):
    import argparse

    from image_trees import make_tree

    from plmetric.data.datasets import load_unlabelled_folder
    from plmetric.retrieval.index import load_embedding_model

    root, bad = make_tree("images", tmp_path / "photos", classes=2, per_class=3, bad=1)
    model, description = load_embedding_model(None, "efficientnet_lite0", 0, None, image_size=32)
    args = argparse.Namespace(device="cpu", batch_size=4, num_workers=0, no_progress=True, runtime="torch")
    return args, model, description, load_unlabelled_folder(root).train, bad


def test_write_rank_shards_writes_this_ranks_rows_after_first_row(tmp_path, one_rank_group):
    from plmetric.cli.rank_shards import write_rank_shards

    args, model, description, dataset, bad = _pile(tmp_path)
    out = tmp_path / "pile.safetensors"
    shards = write_rank_shards(args, model, description, dataset, out, dtype="float16", rows_per_shard=2, hashes=True)
    assert (shards.count, shards.unreadable, [r["count"] for r in shards.records]) == (5, 1, [2, 2, 1])
    with RankCommit(out, shards, description, "float16") as staged:
        assert str(bad[0]) not in staged.stored.paths and staged.stored.hashes().shape == (5, 16)
        staged.commit()
    assert read_index_metadata(out)["dtype"] == "float16"


def test_a_rank_that_cannot_write_its_shards_fails_the_run_in_one_line_leaving_none(tmp_path, one_rank_group,
                                                                                    monkeypatch):
    from plmetric.cli.common import CLIError
    from plmetric.cli.rank_shards import write_rank_shards

    args, model, description, dataset, _ = _pile(tmp_path)
    out = tmp_path / "pile.safetensors"
    written = ShardedIndexWriter._write_shard

    def refused_after_one_shard(self, rows):  # e.g. a node whose mount of the shared folder turned read-only
        if self.records:
            raise PermissionError(13, "Permission denied")
        written(self, rows)

    monkeypatch.setattr(ShardedIndexWriter, "_write_shard", refused_after_one_shard)
    with pytest.raises(CLIError) as raised:  # bad input: exit status 2, the rank and the folder named
        write_rank_shards(args, model, description, dataset, out, dtype="float32", rows_per_shard=2)
    assert str(raised.value) == f"rank 0: cannot write its shards beside {out}: [Errno 13] Permission denied"
    assert not list(tmp_path.glob("*.shard.safetensors")) and not out.exists()  # the shard written is removed

    def broken(self, rows):
        raise TypeError("a bug")

    monkeypatch.setattr(ShardedIndexWriter, "_write_shard", broken)
    with pytest.raises(RuntimeError, match="^rank 0: cannot write its shards beside .*: a bug$"):  # exit 1
        write_rank_shards(args, model, description, dataset, out, dtype="float32", rows_per_shard=2)
