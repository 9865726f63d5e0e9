"""Indexes larger than memory (issue 31): mapped reading of both layouts, float16, shards, --add-to by shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from plmetric.cli import main
from plmetric.core.checkpoint import save_model
from plmetric.data.backbones import create_model
from plmetric.retrieval.index import (
    extend_index,
    load_embeddings,
    load_file_stats,
    load_hashes,
    read_index_metadata,
    save_embeddings,
    top_k,
    top_k_blocks,
    write_index,
)
from plmetric.retrieval.quick_search import IndexMismatchError
from plmetric.retrieval.stored import ShardedIndexWriter, StoredPaths, open_index

MODEL = {"checkpoint": None, "backbone": "efficientnet_lite0", "embedding_dim": 0, "output_dim": 8, "image_size": 32}
SMALL = ["--image-size", "32", "--no-progress", "--num-workers", "0"]
HALF_ULP = 2.0**-11
"""float16 keeps 11 significant bits: round to nearest errs by at most half a unit in the last place,
2^-11 of the value (normal numbers); below 2^-14 the spacing is 2^-24, half of it 2^-25 absolute."""


def _vectors(n: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def _names(n: int, folder: str = "/data/été") -> list[str]:
    """Absolute paths with non-ASCII names and an undecodable byte (a surrogate-escaped file name)."""
    return [f"{folder}/bild_{i}_\u00fc\u4e2d\udce9.png" for i in range(n)]


def _hashes(n: int) -> np.ndarray:
    return np.arange(n * 16, dtype=np.int64).reshape(n, 16).astype(np.uint8)


def _sharded(path: Path, x: torch.Tensor, names: list[str], dtype: str = "float32", rows: int = 4) -> Path:
    write_index(path, x, torch.arange(len(x)) % 3, names, MODEL, hashes=_hashes(len(x)), dtype=dtype,
                rows_per_shard=rows)
    return path


@pytest.mark.parametrize("layout,dtype", [("single", "float32"), ("sharded", "float32"), ("sharded", "float16")])
def test_both_layouts_round_trip_vectors_paths_labels_stats_and_hashes(tmp_path, layout, dtype):
    x, names = _vectors(11), _names(11)
    index = tmp_path / "i.safetensors"
    stats = torch.stack([torch.arange(11), torch.arange(11) * 1000], dim=1)
    if layout == "single":
        save_embeddings(index, x, torch.arange(11) % 3, names, MODEL, stats=stats, hashes=_hashes(11))
    else:
        write_index(index, x, torch.arange(11) % 3, names, MODEL, stats=stats, hashes=_hashes(11), dtype=dtype,
                    rows_per_shard=4)
    stored = open_index(index)
    assert (stored.count, stored.dim, stored.dtype, stored.layout) == (11, 8, dtype, layout)
    assert len(stored.shard_files) == (3 if layout == "sharded" else 0)  # 4 + 4 + 3 rows
    got = stored.vectors.materialize()
    assert got.dtype == torch.float32 and got.shape == (11, 8)
    if dtype == "float32":
        assert torch.equal(got, x)
    else:
        assert ((got - x).abs() <= HALF_ULP * x.abs() + 2.0**-25).all()
        assert not torch.equal(got, x)  # stored as float16 indeed
    assert stored.paths.to_list() == names and [stored.paths[i] for i in (0, 5, -1)] == [names[0], names[5], names[-1]]
    assert stored.paths.slice(3, 9) == names[3:9] and list(stored.paths) == names
    assert stored.paths.find(names[9]) == 9 and stored.paths.find("/data/none.png") is None
    assert torch.equal(stored.labels(), torch.arange(11) % 3)
    assert torch.equal(stored.file_stats(), stats) and np.array_equal(stored.hashes(), _hashes(11))
    assert stored.model == MODEL and "paths" not in stored.meta
    # the materialising readers give the same for both layouts
    emb, labels, paths, model = load_embeddings(index)
    assert torch.equal(emb, got) and torch.equal(labels, torch.arange(11) % 3) and paths == names and model == MODEL
    assert torch.equal(load_file_stats(index), stats) and np.array_equal(load_hashes(index), _hashes(11))


def test_rows_blocks_and_exact_search_equal_the_materialised_vectors(tmp_path):
    x, names = _vectors(23, seed=1), _names(23)
    stored = open_index(_sharded(tmp_path / "i.safetensors", x, names, "float16", rows=5))
    whole = stored.vectors.materialize()
    ids = np.random.default_rng(0).integers(0, 23, 40)
    ids[:4] = [22, 0, 22, 5]  # repeated, unordered, both ends, across shard boundaries
    assert np.array_equal(stored.vectors.rows(ids), whole[ids].numpy())
    assert stored.vectors.rows(np.zeros(0, np.int64)).shape == (0, 8)
    with pytest.raises(IndexError):
        stored.vectors.rows([23])
    assert np.array_equal(stored.vectors.block(3, 17), whole[3:17].numpy())  # spans three shards
    blocks = list(stored.vectors.blocks(7))
    assert [s for s, _ in blocks] == [0, 7, 14, 21]
    assert np.array_equal(np.concatenate([b for _, b in blocks]), whole.numpy())
    queries = _vectors(4, seed=2)
    expected_scores, expected_ids = top_k(queries, whole, 6)
    scores, found = top_k_blocks(queries, stored.vectors, 6, rows_per_block=4)
    assert torch.equal(found, expected_ids) and torch.allclose(scores, expected_scores, atol=1e-6)


def test_paths_take_their_bytes_and_8_bytes_a_path_not_a_list_of_strings(tmp_path):
    """1M paths: a mapped StoredPaths allocates O(number of shards); one packed in memory, the UTF-8
    bytes plus 8 bytes a path (the int64 ends); a list of the same strings costs 49 + len bytes a string
    (CPython's compact ASCII str) plus an 8-byte pointer, more than twice as much."""
    n = 1_000_000
    names = [f"/pile/{i:07d}.jpg" for i in range(n)]  # 17 ASCII bytes each
    utf8 = sum(len(p) for p in names)
    tracemalloc.start()
    packed = StoredPaths.from_list(names)
    current = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert current <= utf8 + 8 * n + 1_000_000  # what stays: bytes + ends (+ small change)
    as_list = sum(sys.getsizeof(p) for p in names) + 8 * n
    assert current < as_list / 2
    assert packed[123_456] == names[123_456] and packed.find(names[999_999]) == 999_999
    # written as shards and mapped: opening allocates next to nothing for the paths
    x = torch.zeros(n, 1)
    x[:, 0] = 1
    index = tmp_path / "big.safetensors"
    with ShardedIndexWriter(index, 1, "float16", 400_000) as writer:
        writer.add(x, torch.zeros(n, dtype=torch.long), names, stats=torch.zeros(n, 2, dtype=torch.long))
        writer.commit(MODEL | {"output_dim": 1})
    del names
    tracemalloc.start()
    stored = open_index(index)
    first, last = stored.paths[0], stored.paths[n - 1]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (first, last) == ("/pile/0000000.jpg", "/pile/0999999.jpg")
    # the only allocation that grows: checking one shard's path ends rise (np.diff: 8 bytes a row, its sign
    # test: 1 byte a row), at most 9 x 400,000 bytes at a time; a list of the paths would be > 60 MB
    assert peak < 9 * 400_000 + 2**20, f"opening a mapped index of 1M paths allocated {peak:,} bytes"


def test_adding_to_a_sharded_index_appends_shards_and_leaves_the_old_ones_untouched(tmp_path):
    x, names = _vectors(14, seed=3), _names(14)
    index = _sharded(tmp_path / "i.safetensors", x[:9], names[:9], "float16", rows=4)
    before = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns, p.read_bytes()) for p in open_index(index).shard_files}
    count, faiss_path, plan = extend_index(index, index, x[9:], torch.arange(9, 14) % 3, names[9:],
                                           hashes=_hashes(14)[9:], rows_per_shard=3)
    assert (count, faiss_path, plan) == (14, None, None)
    stored = open_index(index)
    assert stored.shard_files[:3] == list(before) and len(stored.shard_files) == 5  # 4 4 1 | 3 2
    for shard, (inode, mtime, data) in before.items():
        assert (os.stat(shard).st_ino, os.stat(shard).st_mtime_ns) == (inode, mtime) and shard.read_bytes() == data
    assert stored.paths.to_list() == names and stored.dtype == "float16"
    assert ((stored.vectors.materialize() - x).abs() <= HALF_ULP * x.abs() + 2.0**-25).all()
    assert np.array_equal(stored.hashes(), _hashes(14))
    with pytest.raises(ValueError, match="already in index"):
        extend_index(index, index, x[:1], torch.zeros(1, dtype=torch.long), names[:1])


def test_a_one_file_index_outgrowing_one_file_becomes_sharded_once(tmp_path, monkeypatch):
    from plmetric.retrieval import stored as stored_module

    monkeypatch.setattr(stored_module, "DEFAULT_SHARD_ROWS", 6)
    x, names = _vectors(9, seed=4), _names(9)
    index = tmp_path / "i.safetensors"
    save_embeddings(index, x[:5], torch.zeros(5, dtype=torch.long), names[:5], MODEL)
    extend_index(index, index, x[5:], torch.zeros(4, dtype=torch.long), names[5:])
    stored = open_index(index)
    assert stored.layout == "sharded" and len(stored.shard_files) == 2 and torch.equal(stored.vectors.materialize(), x)


def _damaged(tmp_path: Path, fault: str) -> tuple[Path, Path]:
    """A sharded index with its second shard missing, truncated, a link, or a shard of another index."""
    x, names = _vectors(10, seed=5), _names(10)
    index = _sharded(tmp_path / "i.safetensors", x, names, rows=4)
    other = _sharded(tmp_path / "other" / "o.safetensors", x, names, rows=4)
    shard, foreign = open_index(index).shard_files[1], open_index(other).shard_files[1]
    if fault == "missing":
        shard.unlink()
    elif fault == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif fault == "link":
        data = shard.read_bytes()
        shard.unlink()
        (tmp_path / "elsewhere.bin").write_bytes(data)
        shard.symlink_to(tmp_path / "elsewhere.bin")
    else:
        assert foreign.stat().st_size == shard.stat().st_size  # same rows, same size: only its id differs
        shard.write_bytes(foreign.read_bytes())
    return index, shard


@pytest.mark.parametrize(
    "fault,message",
    [("missing", "is missing"), ("truncated", "bytes, the index recorded"), ("link", "is a link"),
     ("foreign", "is not the shard the index recorded")],
)
def test_a_missing_truncated_linked_or_foreign_shard_is_refused_naming_it(tmp_path, capsys, fault, message):
    index, shard = _damaged(tmp_path, fault)
    with pytest.raises(IndexMismatchError, match=message) as caught:
        open_index(index)
    assert str(shard) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(IndexMismatchError, match=message):
        load_embeddings(index)
    capsys.readouterr()
    assert main(["neighbours", str(index), "--out", str(tmp_path / "n.csv"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(shard) in err and message in err and "Traceback" not in err
    assert not (tmp_path / "n.csv").exists()


def test_a_forged_or_truncated_main_file_is_one_line(tmp_path):
    x, names = _vectors(6), _names(6)
    index = _sharded(tmp_path / "i.safetensors", x, names, rows=4)
    meta = read_index_metadata(index)
    meta["count"] = 7
    from safetensors.torch import save_file

    save_file({}, str(tmp_path / "forged.safetensors"), metadata={"plmetric_index": json.dumps(meta)})
    with pytest.raises(ValueError, match="forged.safetensors.*malformed sharded-index field count"):
        open_index(tmp_path / "forged.safetensors")
    single = tmp_path / "single.safetensors"
    save_embeddings(single, x, torch.zeros(6, dtype=torch.long), names, MODEL)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(single.read_bytes()[:-40])
    with pytest.raises(ValueError, match="index .*cut.safetensors is truncated or damaged: its tensor"):
        open_index(cut)


def test_a_crash_between_shard_writes_and_the_commit_keeps_the_old_index(tmp_path):
    """SIGKILL after the 2nd new shard (and, apart, after the new main file's temporary is written):
    the old index opens with its old rows; the new shards are files no index names."""
    x, names = _vectors(12, seed=6), _names(12)
    index = _sharded(tmp_path / "i.safetensors", x[:5], names[:5], rows=2)
    old_main, old_shards = index.read_bytes(), set(open_index(index).shard_files)
    script = (
        "import torch, sys\n"
        "from plmetric.retrieval.index import extend_index\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"extend_index({str(index)!r}, {str(index)!r}, x[5:], torch.zeros(7, dtype=torch.long), {names[5:]!r}, "
        "rows_per_shard=2)\n"
    )
    torch.save(x, tmp_path / "x.pt")
    env_path = {"PYTHONPATH": os.pathsep.join(sys.path)}
    for fault in ("write:shard@2", "write:i.safetensors"):
        env = {**os.environ, **env_path, "PLMETRIC_FAULT": fault}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == -9, done.stderr
        assert index.read_bytes() == old_main
        stored = open_index(index)
        assert set(stored.shard_files) == old_shards and torch.equal(stored.vectors.materialize(), x[:5])
        assert stored.paths.to_list() == names[:5]
    extend_index(index, index, x[5:], torch.zeros(7, dtype=torch.long), names[5:], rows_per_shard=2)
    assert torch.equal(open_index(index).vectors.materialize(), x)


def test_a_failed_write_removes_its_shards(tmp_path):
    x, names = _vectors(6), _names(6)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedIndexWriter(tmp_path / "i.safetensors", 8, "float32", 2) as writer:
            writer.add(x, torch.zeros(6, dtype=torch.long), names, stats=torch.zeros(6, 2, dtype=torch.long))
            assert len(list(tmp_path.glob("i.*.shard.safetensors"))) == 3
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the commands


def _photos(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        pixels = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
        paths.append(folder / f"bild_{i}_ü.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=16, pretrained=False)
    meta = {"backbone": "efficientnet_lite0", "embedding_dim": 16, "output_dim": 16, "image_size": 32}
    return save_model(path, model, meta)


def _search(capsys, index: Path, query: Path, *extra: str) -> list[tuple[str, float]]:
    out = index.with_suffix(".json")
    capsys.readouterr()
    assert main(["search", str(query), "--index", str(index), "--json", str(out), "--top-k", "4", *extra]) == 0
    results = json.loads(out.read_text())["queries"][0]["results"]
    out.unlink()
    return [(r["path"], r["score"]) for r in results]


def test_index_float16_shards_add_to_and_search_through_the_cli(tmp_path, capsys):
    paths = _photos(tmp_path / "p", 7)
    opts = ["--checkpoint", str(_checkpoint(tmp_path / "model.safetensors")), *SMALL, "--batch-size", "1"]
    whole = tmp_path / "whole.safetensors"
    assert main(["index", str(tmp_path / "p"), "--out", str(whole), *opts]) == 0
    assert read_index_metadata(whole)["version"] == 2  # small: one file, as before
    (tmp_path / "later").mkdir()
    for p in paths[5:]:
        p.rename(tmp_path / "later" / p.name)
    half = tmp_path / "half.safetensors"
    capsys.readouterr()
    assert main(["index", str(tmp_path / "p"), "--out", str(half), "--float16", "--shard-rows", "2", *opts]) == 0
    assert "(float16, 3 shard(s) beside it)" in capsys.readouterr().out
    for p in paths[5:]:
        (tmp_path / "later" / p.name).rename(p)
    old = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in open_index(half).shard_files}
    capsys.readouterr()
    assert main(["index", str(tmp_path / "p"), "--add-to", str(half), *opts]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"added 2 images to {half} (now 7); skipped 5 already in the index"
    stored = open_index(half)
    assert len(stored.shard_files) == 4 and all((os.stat(p).st_ino, os.stat(p).st_mtime_ns) == v for p, v in old.items())
    a, b = load_embeddings(whole), load_embeddings(half)
    assert a[2] == b[2] and ((a[0] - b[0]).abs() <= HALF_ULP * a[0].abs() + 2.0**-25).all()
    # search reads the mapped index: the same images, scores within float16 rounding of a cosine (sum of
    # 16 products each off by 2^-11 of its size: at most 2^-11 * sum|q_i x_i| <= 2^-11 for unit vectors)
    exact, mapped = _search(capsys, whole, paths[6]), _search(capsys, half, paths[6])
    assert [p for p, _ in exact] == [p for p, _ in mapped]
    assert all(abs(s - t) <= 2.0**-11 + 1e-6 for (_, s), (_, t) in zip(exact, mapped, strict=True))
    capsys.readouterr()
    assert main(["index", str(tmp_path / "p"), "--add-to", str(whole), "--float16", *opts]) == 2
    assert "--float16: --add-to keeps the index's own storage" in capsys.readouterr().err


def test_search_and_add_to_through_faiss_on_a_sharded_index(tmp_path, capsys):
    pytest.importorskip("faiss")
    paths = _photos(tmp_path / "p", 6)
    opts = ["--checkpoint", str(_checkpoint(tmp_path / "model.safetensors")), *SMALL, "--batch-size", "1"]
    (tmp_path / "later").mkdir()
    paths[5].rename(tmp_path / "later" / paths[5].name)
    index = tmp_path / "s.safetensors"
    assert main(["index", str(tmp_path / "p"), "--out", str(index), "--faiss", "flat", "--shard-rows", "2", *opts]) == 0
    (tmp_path / "later" / paths[5].name).rename(paths[5])
    assert main(["index", str(tmp_path / "p"), "--add-to", str(index), *opts]) == 0
    meta = read_index_metadata(index)
    assert meta["ann"]["count"] == 6 and meta["count"] == 6 and len(meta["shards"]) == 4
    through_faiss, exact = _search(capsys, index, paths[5]), _search(capsys, index, paths[5], "--exact")
    assert [p for p, _ in through_faiss] == [p for p, _ in exact]
    # float32 sums of 16 products in another order: each off by at most 16 x 2^-24 of the unit norms
    assert all(abs(s - t) <= 16 * 2.0**-24 for (_, s), (_, t) in zip(through_faiss, exact, strict=True))


def test_an_index_written_over_a_sharded_one_removes_the_shards_no_index_names(tmp_path):
    x, names = _vectors(6), _names(6)
    index = _sharded(tmp_path / "i.safetensors", x, names, rows=2)
    old_shards = open_index(index).shard_files
    kept_copy = tmp_path / "copy.safetensors"
    kept_copy.write_bytes(index.read_bytes())  # a copy of the old main file names the old shards: kept
    _sharded(index, x, names, rows=3)
    assert all(s.is_file() for s in old_shards) and torch.equal(open_index(kept_copy).vectors.materialize(), x)
    kept_copy.unlink()
    newer = open_index(index).shard_files
    save_embeddings_over = _sharded(index, x, names, rows=6)  # replaces the 3-row shards, named by no index now
    assert not any(s.exists() for s in newer) and all(s.is_file() for s in old_shards)  # those are not its own
    assert len(open_index(save_embeddings_over).shard_files) == 1


def test_embed_float16_writes_a_sharded_index_and_refuses_other_outputs(tmp_path, capsys):
    _photos(tmp_path / "p", 3)
    opts = ["--checkpoint", str(_checkpoint(tmp_path / "model.safetensors")), *SMALL]
    out = tmp_path / "e.safetensors"
    assert main(["embed", "--images", str(tmp_path / "p"), "--out", str(out), "--float16", *opts]) == 0
    stored = open_index(out)
    assert (stored.layout, stored.dtype, stored.count) == ("sharded", "float16", 3)
    capsys.readouterr()
    assert main(["embed", "--images", str(tmp_path / "p"), "--out", str(tmp_path / "e.npy"), "--float16", *opts]) == 2
    assert "--float16 applies to a .safetensors index" in capsys.readouterr().err
    assert not (tmp_path / "e.npy").exists()
