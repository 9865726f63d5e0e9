"""Indexes are self-contained and self-checking: absolute paths, the model's hash, no random heads."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from plmetric.core.checkpoint import file_sha256, save_model
from plmetric.cli import main
from plmetric.data.backbones import create_model
from plmetric.retrieval.index import (
    IndexMismatchError,
    load_embedding_model,
    load_embeddings,
    model_from_description,
    read_index_metadata,
    save_embeddings,
)

SMALL = ["--image-size", "32", "--no-progress", "--num-workers", "0"]


def photos(folder: Path, n: int = 6) -> list[Path]:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        colour = rng.integers(0, 256, 3)
        pixels = np.clip(colour + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
        paths.append(folder / f"img{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = create_model("efficientnet_lite0", embedding_dim=16, pretrained=False)
    meta = {"backbone": "efficientnet_lite0", "embedding_dim": 16, "output_dim": 16, "image_size": 32}
    return save_model(path, model, meta)


def top_result(capsys, *argv: str) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_index_without_checkpoint_refuses_a_random_embedding_layer(tmp_path, capsys):
    photos(tmp_path / "p")
    out = tmp_path / "i.safetensors"
    code, _, err = top_result(capsys, "index", str(tmp_path / "p"), "--embedding-dim", "128", "--out", str(out), *SMALL)
    assert code == 2 and "--embedding-dim 128 without --checkpoint" in err and not out.exists()
    with pytest.raises(ValueError, match="untrained, random embedding layer"):
        load_embedding_model(None, "efficientnet_lite0", 128)


def test_index_records_absolute_paths_and_the_model_hash(tmp_path, capsys, monkeypatch):
    paths = photos(tmp_path / "p")
    ckpt = checkpoint(tmp_path / "model.safetensors", seed=0)
    monkeypatch.chdir(tmp_path)
    assert main(["index", "p", "--checkpoint", "model.safetensors", "--out", "i.safetensors", *SMALL]) == 0
    _, _, recorded, model = load_embeddings(tmp_path / "i.safetensors")
    assert recorded == [str(p.resolve()) for p in paths]
    assert model["checkpoint"] == str(ckpt.resolve()) and model["checkpoint_sha256"] == file_sha256(ckpt)
    assert model["preprocessing"]["center_crop"] == 32 and model["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    meta = read_index_metadata(tmp_path / "i.safetensors")
    assert meta["format"] == "plmetric-index" and meta["count"] == 6 and meta["dim"] == 16
    # search from another folder: the indexed image itself comes first (--include-self), its tile is readable
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    argv = ["search", str(paths[2]), "--index", "../i.safetensors", "--top-k", "3", "--out", "g.png", "--include-self"]
    code, lines, _ = top_result(capsys, *argv)
    assert code == 0 and lines[0].split()[-1] == str(paths[2].resolve())
    assert "missing" not in "\n".join(lines) and (elsewhere / "g.png").is_file()


def test_search_refuses_an_index_whose_model_changed(tmp_path, capsys):
    paths = photos(tmp_path / "p")
    ckpt = checkpoint(tmp_path / "model.safetensors", seed=0)
    index = tmp_path / "i.safetensors"
    assert main(["index", str(tmp_path / "p"), "--checkpoint", str(ckpt), "--out", str(index), *SMALL]) == 0
    before = file_sha256(ckpt)
    checkpoint(ckpt, seed=1)  # the run wrote its next epoch over model.safetensors
    after = file_sha256(ckpt)
    code, _, err = top_result(capsys, "search", str(paths[0]), "--index", str(index), "--out", str(tmp_path / "g.png"))
    assert code == 2 and before[:16] in err and after[:16] in err and str(ckpt) in err
    assert not (tmp_path / "g.png").exists()
    ckpt.unlink()
    code, _, err = top_result(capsys, "search", str(paths[0]), "--index", str(index), "--out", str(tmp_path / "g.png"))
    assert code == 2 and "no longer exists" in err
    _, _, _, model = load_embeddings(index)
    with pytest.raises(IndexMismatchError):
        model_from_description(model, index)


def test_search_says_when_indexed_images_moved(tmp_path, capsys):
    paths = photos(tmp_path / "p")
    index = tmp_path / "i.safetensors"
    assert main(["index", str(tmp_path / "p"), "--out", str(index), *SMALL]) == 0
    query = tmp_path / "query.png"
    query.write_bytes(paths[1].read_bytes())
    (tmp_path / "p").rename(tmp_path / "moved")
    code, lines, err = top_result(
        capsys, "search", str(query), "--index", str(index), "--top-k", "2", "--out", str(tmp_path / "g.png")
    )
    assert code == 0 and "(missing: moved or deleted since indexing)" in lines[0]
    assert "2 of 2 results no longer exist" in err


def test_index_and_model_files_follow_the_umask(tmp_path):
    photos(tmp_path / "p", n=3)
    ckpt = checkpoint(tmp_path / "model.safetensors", seed=0)
    index = tmp_path / "i.safetensors"
    assert main(["index", str(tmp_path / "p"), "--checkpoint", str(ckpt), "--out", str(index), *SMALL]) == 0
    mask = os.umask(0)
    os.umask(mask)
    for path in (ckpt, index, ckpt.with_suffix(".json")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_index_output_is_checked_before_any_work(tmp_path, capsys):
    photos(tmp_path / "p", n=3)
    ckpt = checkpoint(tmp_path / "model.safetensors", seed=0)
    before = ckpt.read_bytes()
    for out, expected in (
        (ckpt, "is also an input"),
        (tmp_path / "i.npz", "expected a file name ending in .safetensors"),
    ):
        code, _, err = top_result(capsys, "index", str(tmp_path / "p"), "--checkpoint", str(ckpt), "--out", str(out))
        assert code == 2 and expected in err and "embedding" not in err
    other = tmp_path / "other.safetensors"  # an existing file that is not an index is never replaced
    checkpoint(other, seed=3)
    code, _, err = top_result(capsys, "index", str(tmp_path / "p"), "--out", str(other), *SMALL)
    assert code == 2 and "is not a file this command writes" in err
    assert ckpt.read_bytes() == before


def test_save_and_load_round_trip_and_foreign_files(tmp_path):
    emb = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    out = save_embeddings(tmp_path / "e.safetensors", emb, torch.arange(4), ["a.png", "b.png", "item:2", "d"], {})
    with pytest.raises(ValueError, match="not a valid plmetric index"):
        load_embeddings(out)  # the model description is empty
    model = {"backbone": "efficientnet_lite0", "checkpoint": None}
    save_embeddings(out, emb, torch.arange(4), ["a.png", "b.png", "item:2", "d"], model)
    got, labels, paths, _ = load_embeddings(out)
    torch.testing.assert_close(got, emb, rtol=0, atol=0)
    assert paths[2] == "item:2" and Path(paths[0]).is_absolute() and labels.tolist() == [0, 1, 2, 3]
    (tmp_path / "t.safetensors").write_bytes(b"\xff\xfe not a safetensors file")
    with pytest.raises(ValueError, match="is not a plmetric index"):
        load_embeddings(tmp_path / "t.safetensors")


def test_batch_search_writes_json_csv_and_a_grid_per_query(tmp_path, capsys):
    import csv
    import json

    paths = photos(tmp_path / "p")
    index = tmp_path / "i.safetensors"
    assert main(["index", str(tmp_path / "p"), "--out", str(index), *SMALL]) == 0
    listing = tmp_path / "queries.txt"
    listing.write_text(f"# two more queries\n{paths[4]}\n{paths[5]}\n")
    out_dir = tmp_path / "grids"
    args = ["search", str(paths[0]), str(paths[1]), "--queries-file", str(listing), "--index", str(index)]
    args += [
        "--top-k",
        "2",
        "--out-dir",
        str(out_dir),
        "--json",
        str(tmp_path / "r.json"),
        "--csv",
        str(tmp_path / "r.csv"),
    ]
    code, lines, _ = top_result(capsys, *args)
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [q["query"] for q in report["queries"]] == [
        str(p.resolve()) for p in (paths[0], paths[1], paths[4], paths[5])
    ]
    for query in report["queries"]:  # every indexed query: the --top-k others, itself left out
        assert query["query"] not in [r["path"] for r in query["results"]] and len(query["results"]) == 2
        assert query["results"][0]["score"] >= query["results"][1]["score"]
    rows = list(csv.reader((tmp_path / "r.csv").open()))
    assert rows[0] == ["query", "rank", "path", "score"] and len(rows) == 1 + 4 * 2
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"{p.stem}_results.png" for p in (paths[0], paths[1], paths[4], paths[5])
    )
    # a folder of queries, no grids asked for
    code, lines, _ = top_result(capsys, "search", str(tmp_path / "p"), "--index", str(index), "--top-k", "1")
    assert code == 0 and sum(line.startswith("query ") for line in lines) == 6 and "no grids drawn" in lines[-1]
    code, _, err = top_result(
        capsys, "search", str(paths[0]), str(paths[1]), "--index", str(index), "--out", str(tmp_path / "g.png")
    )
    assert code == 2 and "--out-dir" in err


# ----------------------------------------------------------------------------- faiss indexes, growing an index


def _search_json(capsys, tmp_path, index: Path, queries: list[Path], *extra: str) -> list[dict]:
    import json

    out = tmp_path / "r.json"
    out.unlink(missing_ok=True)
    code, _, err = top_result(
        capsys, "search", *map(str, queries), "--index", str(index), "--top-k", "4", "--json", str(out), *extra
    )
    assert code == 0, err
    return json.loads(out.read_text())["queries"]


def _same_results(a: list[dict], b: list[dict], tolerance: float) -> None:
    assert [q["query"] for q in a] == [q["query"] for q in b]
    for qa, qb in zip(a, b, strict=True):
        assert [r["path"] for r in qa["results"]] == [r["path"] for r in qb["results"]]
        assert max(abs(ra["score"] - rb["score"]) for ra, rb in zip(qa["results"], qb["results"], strict=True)) <= (
            tolerance
        )


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_a_faiss_index_searches_like_the_exact_search(tmp_path, capsys, kind):
    """On 6 photos every kind searches exhaustively (IVF: one cell; HNSW: a beam wider than the
    index; ivfpq, on 20 photos (its codebooks need 16): one cell, all re-ranked exactly from the stored
    embeddings), so the results are those of ``--exact``: same paths, scores within 2 γ_16 (float32 dot
    products of the 16-d unit embeddings, see test_ann's flat test)."""
    pytest.importorskip("faiss")
    from numerics import gamma

    count = 20 if kind == "ivfpq" else 6
    paths = photos(tmp_path / "p", n=count)
    ckpt = checkpoint(tmp_path / "model.safetensors", seed=0)
    index = tmp_path / "i.safetensors"
    args = ["index", str(tmp_path / "p"), "--checkpoint", str(ckpt), "--out", str(index), "--faiss", kind, *SMALL]
    code, lines, _ = top_result(capsys, *args)
    meta = read_index_metadata(index)["ann"]
    faiss_file = tmp_path / meta["file"]
    assert code == 0 and meta["kind"] == kind and meta["count"] == count and meta["metric"] == "inner_product"
    assert faiss_file.is_file() and meta["sha256"] == file_sha256(faiss_file) and str(faiss_file) in lines[-1]
    assert faiss_file.name == f"i.{meta['sha256'][:12]}.faiss"
    fast = _search_json(capsys, tmp_path, index, paths[:3])
    exact = _search_json(capsys, tmp_path, index, paths[:3], "--exact")
    _same_results(fast, exact, 2 * gamma(16, torch.float32) * (1 + 1e-6))
    assert all(q["query"] not in [r["path"] for r in q["results"]] and len(q["results"]) == 4 for q in fast)


def test_adding_images_equals_indexing_them_all_at_once(tmp_path, capsys):
    """Exact and faiss flat indexes grown by --add-to equal the index built in one go (batch size 1:
    every image's embedding is computed alone, so it does not depend on its batch)."""
    pytest.importorskip("faiss")
    paths = photos(tmp_path / "p")
    ckpt = checkpoint(tmp_path / "model.safetensors", seed=0)
    opts = ["--checkpoint", str(ckpt), *SMALL, "--batch-size", "1"]
    whole = tmp_path / "whole.safetensors"
    assert main(["index", str(tmp_path / "p"), "--out", str(whole), "--faiss", "flat", *opts]) == 0
    (tmp_path / "later").mkdir()
    for p in paths[4:]:
        p.rename(tmp_path / "later" / p.name)
    for kind in ("none", "flat"):
        assert (
            main(["index", str(tmp_path / "p"), "--out", str(tmp_path / f"{kind}.safetensors"), "--faiss", kind, *opts])
            == 0
        )
    for p in paths[4:]:
        (tmp_path / "later" / p.name).rename(p)
    for kind in ("none", "flat"):
        part = tmp_path / f"{kind}.safetensors"
        old_faiss = (read_index_metadata(part).get("ann") or {}).get("file")
        code, lines, _ = top_result(capsys, "index", str(tmp_path / "p"), "--add-to", str(part), *opts)
        assert code == 0 and lines[0] == f"added 2 images to {part} (now 6); skipped 4 already in the index"
        a, b = load_embeddings(whole), load_embeddings(part)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]
        if kind == "flat":  # the same faiss file, content for content; the replaced one, named by no index, removed
            assert read_index_metadata(part)["ann"]["sha256"] == read_index_metadata(whole)["ann"]["sha256"]
            assert (tmp_path / read_index_metadata(part)["ann"]["file"]).is_file()
            assert not (tmp_path / old_faiss).exists()
            removed = f"removed the previous faiss file {tmp_path / old_faiss}"
            assert lines[-1] == f"{removed} (no other index in its folder names it)"
            assert _search_json(capsys, tmp_path, part, paths[4:]) == _search_json(capsys, tmp_path, whole, paths[4:])
        else:
            assert "ann" not in read_index_metadata(part)
    before = part.read_bytes()
    code, lines, _ = top_result(capsys, "index", str(tmp_path / "p"), "--add-to", str(part), *opts)
    assert code == 0 and lines == [f"added 0 images to {part} (still 6); skipped 6 already in the index"]
    assert part.read_bytes() == before  # nothing to add: nothing rewritten


def test_adding_to_an_ivfpq_index_encodes_the_new_images_without_retraining(tmp_path, capsys):
    """--add-to on an ivfpq index adds the new embeddings with the trained cells and codebooks unchanged
    (the plan's ``trained_on`` stays the build's count), and its search re-ranks them like the exact search."""
    pytest.importorskip("faiss")
    import faiss
    from numerics import gamma

    from plmetric.manifold import ann

    paths = photos(tmp_path / "p", n=20)  # 4-bit codebooks: at least 16 to train
    ckpt = checkpoint(tmp_path / "model.safetensors", seed=0)
    opts = ["--checkpoint", str(ckpt), *SMALL]
    (tmp_path / "later").mkdir()
    for p in paths[16:]:
        p.rename(tmp_path / "later" / p.name)
    index = tmp_path / "i.safetensors"
    assert main(["index", str(tmp_path / "p"), "--out", str(index), "--faiss", "ivfpq", *opts]) == 0
    before = read_index_metadata(index)["ann"]
    trained = ann.read_index(tmp_path / before["file"])
    for p in paths[16:]:
        (tmp_path / "later" / p.name).rename(p)
    code, lines, _ = top_result(capsys, "index", str(tmp_path / "p"), "--add-to", str(index), *opts)
    after = read_index_metadata(index)["ann"]
    assert code == 0 and lines[0] == f"added 4 images to {index} (now 20); skipped 16 already in the index"
    assert after["kind"] == "ivfpq" and after["count"] == 20 and after["params"] == before["params"]
    assert before["params"]["trained_on"] == 16
    grown = ann.read_index(tmp_path / after["file"])
    assert grown.ntotal == 20 and trained.ntotal == 16
    for a, b in ((trained, grown), (faiss.extract_index_ivf(trained).quantizer, faiss.extract_index_ivf(grown).quantizer)):
        if hasattr(a, "pq"):
            assert np.array_equal(faiss.vector_to_array(a.pq.centroids), faiss.vector_to_array(b.pq.centroids))
        else:
            assert np.array_equal(a.reconstruct_n(0, a.ntotal), b.reconstruct_n(0, b.ntotal))
    fast = _search_json(capsys, tmp_path, index, paths[16:])
    exact = _search_json(capsys, tmp_path, index, paths[16:], "--exact")
    _same_results(fast, exact, 2 * gamma(16, torch.float32) * (1 + 1e-6))


def test_adding_keeps_a_faiss_file_that_another_index_names_or_plmetric_did_not_write(tmp_path, capsys):
    """--add-to removes the faiss file it replaced only when no other index in the folder names it (a
    copy of the index does: kept, and said which) and only when it is the very file the index recorded
    (a link to it is kept, and so is its target); a FIFO named like an index is not opened (no hang);
    no other file is touched."""
    import os
    import shutil

    pytest.importorskip("faiss")
    paths = photos(tmp_path / "p", n=7)
    (tmp_path / "later").mkdir()
    for p in paths[4:]:
        p.rename(tmp_path / "later" / p.name)
    index, copy = tmp_path / "i.safetensors", tmp_path / "copy.safetensors"
    assert main(["index", str(tmp_path / "p"), "--out", str(index), "--faiss", "flat", *SMALL]) == 0
    shutil.copyfile(index, copy)  # names the same faiss file
    os.mkfifo(tmp_path / "fifo.safetensors")
    (tmp_path / "notes.faiss").write_text("not ours")

    def add(name: str) -> tuple[list[str], Path]:
        (tmp_path / "later" / name).rename(tmp_path / "p" / name)
        before = tmp_path / read_index_metadata(index)["ann"]["file"]
        code, lines, _ = top_result(capsys, "index", str(tmp_path / "p"), "--add-to", str(index), *SMALL)
        assert code == 0 and (tmp_path / read_index_metadata(index)["ann"]["file"]).is_file()
        return lines, before

    lines, first = add(paths[4].name)
    assert lines[-1] == f"kept the previous faiss file {first}: copy.safetensors in its folder names it too"
    assert first.is_file()
    assert main(["search", str(paths[0]), "--index", str(copy), "--json", str(tmp_path / "r.json")]) == 0
    copy.unlink()
    lines, second = add(paths[5].name)
    assert lines[-1] == f"removed the previous faiss file {second} (no other index in its folder names it)"
    assert not second.exists() and first.is_file()  # only the file it replaced
    current = tmp_path / read_index_metadata(index)["ann"]["file"]
    real = tmp_path / "elsewhere" / "real.faiss"
    real.parent.mkdir()
    current.rename(real)
    current.symlink_to(real)  # the index still finds its file, through a link
    lines, third = add(paths[6].name)
    assert third == current and lines[-1].startswith(f"kept the previous faiss file {third}: it is not the file")
    assert third.is_symlink() and real.is_file() and (tmp_path / "notes.faiss").read_text() == "not ours"


def test_adding_to_an_index_refuses_another_model_and_other_structure(tmp_path, capsys):
    pytest.importorskip("faiss")
    photos(tmp_path / "p", n=3)
    ckpt = checkpoint(tmp_path / "model.safetensors", seed=0)
    other = checkpoint(tmp_path / "other.safetensors", seed=1)
    index = tmp_path / "i.safetensors"
    assert (
        main(["index", str(tmp_path / "p"), "--checkpoint", str(ckpt), "--out", str(index), "--faiss", "flat", *SMALL])
        == 0
    )
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    photos(tmp_path / "p" / "new", n=2)
    code, _, err = top_result(
        capsys, "index", str(tmp_path / "p"), "--add-to", str(index), "--checkpoint", str(other), *SMALL
    )
    assert code == 2 and str(other) in err and str(ckpt.resolve()) in err
    assert file_sha256(other)[:16] in err and file_sha256(ckpt)[:16] in err and len(err.strip().splitlines()) == 1
    for extra, expected in (
        (["--faiss", "hnsw"], "--faiss: --add-to keeps the index's own kind and structure (--faiss flat)"),
        (["--nprobe", "3"], "--nprobe does not apply to"),
    ):
        code, _, err = top_result(capsys, "index", str(tmp_path / "p"), "--add-to", str(index), *extra, *SMALL)
        assert code == 2 and expected in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_search_detects_a_missing_or_mismatched_faiss_file(tmp_path, capsys):
    pytest.importorskip("faiss")
    paths = photos(tmp_path / "p", n=4)
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    assert main(["index", str(tmp_path / "p"), "--out", str(one), "--faiss", "flat", *SMALL]) == 0
    assert main(["index", str(tmp_path / "p"), "--out", str(two), "--faiss", "hnsw", *SMALL]) == 0
    faiss_one = tmp_path / read_index_metadata(one)["ann"]["file"]
    faiss_two = tmp_path / read_index_metadata(two)["ann"]["file"]
    good = faiss_one.read_bytes()
    faiss_one.write_bytes(faiss_two.read_bytes())  # another index's faiss file under this one's name
    query = ["search", str(paths[0]), "--index", str(one), "--out", str(tmp_path / "g.png")]
    code, _, err = top_result(capsys, *query)
    assert code == 2 and "is not the one index" in err and file_sha256(faiss_two)[:16] in err
    assert read_index_metadata(one)["ann"]["sha256"][:16] in err and not (tmp_path / "g.png").exists()
    code, lines, _ = top_result(capsys, *query, "--exact", "--include-self")  # the embeddings alone still search
    assert code == 0 and lines[0].split()[-1] == str(paths[0].resolve())
    faiss_one.write_bytes(good)
    assert top_result(capsys, *query)[0] == 0
    faiss_one.unlink()
    code, _, err = top_result(capsys, *query)
    assert code == 2 and "which is missing" in err and str(faiss_one) in err


def test_without_faiss_the_faiss_options_say_how_to_install_it(tmp_path, capsys, monkeypatch):
    import sys

    from plmetric.manifold.ann import faiss_available

    photos(tmp_path / "p", n=3)
    with_faiss = tmp_path / "f.safetensors"
    if faiss_available():
        assert main(["index", str(tmp_path / "p"), "--out", str(with_faiss), "--faiss", "flat", *SMALL]) == 0
    else:  # an index that names a faiss file, as one built where faiss is installed
        assert main(["index", str(tmp_path / "p"), "--out", str(with_faiss), *SMALL]) == 0
        emb, labels, paths, model = load_embeddings(with_faiss)
        ann = {"kind": "flat", "params": {}, "file": "f.000000000000.faiss", "sha256": "0" * 64}
        save_embeddings(with_faiss, emb, labels, paths, model, ann=ann)
    monkeypatch.setitem(sys.modules, "faiss", None)
    out = tmp_path / "new.safetensors"
    code, lines, err = top_result(capsys, "index", str(tmp_path / "p"), "--out", str(out), "--faiss", "hnsw", *SMALL)
    assert (
        code == 2
        and err.strip() == 'plmetric: error: --faiss hnsw: faiss is not installed: pip install "plmetric[faiss]"'
    )
    assert not out.exists() and lines == []  # refused before any image was embedded
    query = ["search", str(tmp_path / "p" / "img0.png"), "--index", str(with_faiss), "--out", str(tmp_path / "g.png")]
    code, _, err = top_result(capsys, *query)
    assert code == 2 and 'pip install "plmetric[faiss]"' in err and "--exact" in err
    assert top_result(capsys, *query, "--exact")[0] == 0
    assert main(["index", str(tmp_path / "p"), "--out", str(out), "--faiss", "auto", *SMALL]) == 0  # 3 < 50,000: exact


@pytest.mark.slow
def test_a_crash_while_adding_keeps_the_old_index_whole(tmp_path):
    """SIGKILL after the new faiss file is written, before the new index replaces the old one: the
    old pair still loads and searches (the .safetensors file is the commit point)."""
    import subprocess
    import sys

    pytest.importorskip("faiss")
    paths = photos(tmp_path / "p", n=5)
    (tmp_path / "later").mkdir()
    paths[4].rename(tmp_path / "later" / paths[4].name)
    index = tmp_path / "i.safetensors"
    assert main(["index", str(tmp_path / "p"), "--out", str(index), "--faiss", "flat", *SMALL]) == 0
    old = index.read_bytes()
    (tmp_path / "later" / paths[4].name).rename(paths[4])
    env = {**os.environ, "PLMETRIC_FAULT": "write:i.safetensors"}
    command = [sys.executable, "-m", "plmetric.cli", "index", str(tmp_path / "p"), "--add-to", str(index), *SMALL]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    assert index.read_bytes() == old
    assert len(list(tmp_path.glob("i.*.faiss"))) == 2  # the old one and the new, unnamed one
    from plmetric.retrieval.index import load_faiss_index

    faiss_index, plan = load_faiss_index(index)
    assert faiss_index.ntotal == 4 and plan.kind == "flat"


def test_index_help_shows_the_faiss_defaults(capsys):
    from plmetric.manifold import ann
    from plmetric.core.options import IndexOptions

    assert main(["index", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"default: {IndexOptions.kind} = exact torch search" in text
    assert f"auto = exact below {ann.AUTO_EXACT_BELOW:,} vectors, else {ann.AUTO_KIND}" in text
    assert f"(default: {IndexOptions.hnsw_m})" in text and "(default: ceil(nlist / 16), at least 8;" in text
    # the size rules the help states are the ones plan_index applies
    assert "(default: round(4 sqrt(n)), at most n / 39;" in text and ann.default_nlist(10_000) == 256
    assert "ivfpq: the power of two nearest 4 sqrt(n))" in text and ann.default_ivfpq_nlist(10_000_000) == 16384
    assert "ivfpq: ceil(sqrt(nlist)), at least 16)" in text
    assert [ann.default_ivfpq_nprobe(n) for n in (4, 100, 16384)] == [4, 16, 128]
    from plmetric.core.options import MEMORY_BUDGET_MIB

    assert f"--memory-budget MIB MiB the faiss index may take in memory (default: {MEMORY_BUDGET_MIB})" in text
    assert "its estimate (n (4 d + 8 M + 16) bytes) fits" in text and ann.hnsw_memory_bytes(1, 2, 3) == 8 + 24 + 16
    assert "(default: the largest of 128, 96, 64, ... with at least 4 dimensions each" in text
    assert ann.PQ_M_CHOICES[:3] == (128, 96, 64)
    assert "(default: 80 below 100k vectors, 128 below 1M, else 200)" in text
    assert [ann.default_ef_construction(n) for n in (99_999, 100_000, 999_999, 10**6)] == [80, 128, 128, 200]
    assert "(default: 64 below 1M vectors, else 128)" in text
    assert [ann.default_ef_search(n) for n in (999_999, 10**6)] == [64, 128]
    assert [ann.default_nprobe(n) for n in (7, 128, 129, 1265)] == [7, 8, 9, 80]


# ----------------------------------------------------------------------------- copies, renames, locks, file records


def _faiss_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*.faiss")}


def test_adding_to_a_copy_leaves_the_original_index_working(tmp_path, capsys):
    """A copy of an index names the original's faiss file: --add-to on the copy writes its own,
    content-named faiss file and deletes or overwrites no faiss file."""
    pytest.importorskip("faiss")
    paths = photos(tmp_path / "p")
    (tmp_path / "later").mkdir()
    for p in paths[4:]:
        p.rename(tmp_path / "later" / p.name)
    original, copy = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["index", str(tmp_path / "p"), "--out", str(original), "--faiss", "flat", *SMALL]) == 0
    copy.write_bytes(original.read_bytes())
    before = _faiss_files(tmp_path)
    for p in paths[4:]:
        (tmp_path / "later" / p.name).rename(p)
    code, lines, err = top_result(capsys, "index", str(tmp_path / "p"), "--add-to", str(copy), *SMALL)
    assert code == 0 and lines[0] == f"added 2 images to {copy} (now 6); skipped 4 already in the index", err
    after = _faiss_files(tmp_path)
    assert all(after[name] == data for name, data in before.items())  # nothing deleted or overwritten
    assert read_index_metadata(copy)["ann"]["file"] == f"b.{read_index_metadata(copy)['ann']['sha256'][:12]}.faiss"
    for index, count in ((original, 4), (copy, 6)):
        assert len(load_embeddings(index)[2]) == count
        # through the faiss file, checked by its hash; --include-self: each query finds itself first
        results = _search_json(capsys, tmp_path, index, paths[:2], "--include-self")
        assert [q["results"][0]["path"] for q in results] == [str(p.resolve()) for p in paths[:2]]


def test_an_index_and_its_faiss_file_renamed_together_still_pair_up(tmp_path, capsys):
    pytest.importorskip("faiss")
    from plmetric.retrieval.index import load_faiss_index

    paths = photos(tmp_path / "p", n=4)
    index = tmp_path / "i.safetensors"
    assert main(["index", str(tmp_path / "p"), "--out", str(index), "--faiss", "hnsw", *SMALL]) == 0
    ann_meta = read_index_metadata(index)["ann"]
    moved = tmp_path / "moved"
    moved.mkdir()
    renamed = moved / "renamed.safetensors"
    index.rename(renamed)
    (tmp_path / ann_meta["file"]).rename(moved / f"renamed.{ann_meta['sha256'][:12]}.faiss")
    faiss_index, plan = load_faiss_index(renamed)
    assert faiss_index.ntotal == 4 and plan.kind == "hnsw"
    results = _search_json(capsys, tmp_path, renamed, paths[:2], "--include-self")
    assert [q["results"][0]["path"] for q in results] == [str(p.resolve()) for p in paths[:2]]
    # renamed to a name its faiss file does not follow: still the missing file named, one line
    (moved / f"renamed.{ann_meta['sha256'][:12]}.faiss").rename(moved / "other.faiss")
    query = ["search", str(paths[0]), "--index", str(renamed), "--out", str(tmp_path / "g.png")]
    code, _, err = top_result(capsys, *query)
    assert code == 2 and "which is missing" in err and ann_meta["file"] in err


def test_a_second_add_to_on_the_same_index_stops_at_once(tmp_path, capsys):
    """While one --add-to holds an index (its flock), another stops with one line, exit 2, and
    changes nothing; once the lock is released it runs."""
    import fcntl

    paths = photos(tmp_path / "p", n=3)
    index = tmp_path / "i.safetensors"
    (tmp_path / "later").mkdir()
    paths[2].rename(tmp_path / "later" / paths[2].name)
    assert main(["index", str(tmp_path / "p"), "--out", str(index), *SMALL]) == 0
    (tmp_path / "later" / paths[2].name).rename(paths[2])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with open(index, "rb") as holder:  # as the first --add-to holds it
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, lines, err = top_result(capsys, "index", str(tmp_path / "p"), "--add-to", str(index), *SMALL)
    assert code == 2 and lines == [] and len(err.strip().splitlines()) == 1
    assert f"--add-to {index}: another plmetric command is extending this index now" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # no lock file either
    code, lines, _ = top_result(capsys, "index", str(tmp_path / "p"), "--add-to", str(index), *SMALL)
    assert code == 0 and lines[0] == f"added 1 images to {index} (now 3); skipped 2 already in the index"


def test_an_index_records_each_files_size_and_mtime(tmp_path):
    """``file_stat`` holds (size, mtime_ns) per image (-1 -1 for an item); an index written before
    they were recorded loads, and growing it records the new images only."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from plmetric.retrieval.index import FILE_STAT_KEY, extend_index, file_stats, load_file_stats

    paths = photos(tmp_path / "p", n=3)
    index = tmp_path / "i.safetensors"
    assert main(["index", str(tmp_path / "p"), "--out", str(index), *SMALL]) == 0
    stats = load_file_stats(index)
    assert stats.tolist() == [[p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
    assert file_stats(["item:0", str(tmp_path / "none.png")]).tolist() == [[-1, -1], [-1, -1]]
    emb, labels, recorded, _ = load_embeddings(index)
    old = tmp_path / "old.safetensors"  # as an older plmetric wrote it: no file_stat tensor
    meta = {**read_index_metadata(index), "paths": recorded[:2], "count": 2}
    save_file({"embeddings": emb[:2], "labels": labels[:2]}, str(old), metadata={"plmetric_index": json.dumps(meta)})
    assert load_file_stats(old) is None and load_embeddings(old)[2] == recorded[:2]
    extend_index(old, old, emb[2:], labels[2:], recorded[2:])
    assert load_file_stats(old).tolist() == [[-1, -1], [-1, -1], stats[2].tolist()]
    with safe_open(str(old), framework="pt") as handle:
        assert FILE_STAT_KEY in handle.keys()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("image_size", 3000, r"'image_size' must be an integer from 8 to 1024"),
        ("image_size", True, r"'image_size' must be an integer from 8 to 1024"),
        ("backbone", "vgg16", r"'backbone': unknown backbone 'vgg16'"),
        ("output_dim", "16", r"'output_dim' must be an integer >= 1"),
    ],
)
def test_an_index_model_description_is_checked_like_a_checkpoint(tmp_path, field, value, message):
    emb = torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
    model = {"backbone": "efficientnet_lite0", "checkpoint": None, "image_size": 32, field: value}
    out = save_embeddings(tmp_path / "e.safetensors", emb, torch.arange(2), ["a.png", "b.png"], model)
    with pytest.raises(ValueError, match=rf"index .*e\.safetensors: model {message}"):
        load_embeddings(out)


@pytest.mark.parametrize(
    "recorded, message",
    [
        ({"count": 500000}, r"records count 500000, but its embeddings tensor has shape \[2, 3\]"),
        ({"dim": 500000}, r"records dim 500000, but its embeddings tensor has shape \[2, 3\]"),
        ({"dim": "3"}, r"records dim '3'"),
        ({"model": {"output_dim": 16}}, r"records model 'output_dim' 16, but its embeddings tensor has shape \[2, 3\]"),
        ({"model": {"output_dim": 500000}}, r"'output_dim' must be an integer >= 1 and <= 16384, got 500000"),
    ],
)
def test_an_index_s_recorded_sizes_must_be_its_tensors(tmp_path, recorded, message):
    """count, dim and the model's output_dim are checked against the embeddings tensor (issue 30)."""
    import json

    from safetensors.torch import save_file

    emb = torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
    model = {"backbone": "efficientnet_lite0", "checkpoint": None, "image_size": 32, "output_dim": 3}
    out = save_embeddings(tmp_path / "e.safetensors", emb, torch.arange(2), ["a.png", "b.png"], model)
    assert load_embeddings(out)[0].shape == (2, 3)
    meta = read_index_metadata(out)
    meta["model"].update(recorded.pop("model", {}))
    meta.update(recorded)
    save_file({"embeddings": emb, "labels": torch.arange(2)}, str(out), metadata={"plmetric_index": json.dumps(meta)})
    with pytest.raises(ValueError, match=message):
        load_embeddings(out)


def test_search_csv_and_json_name_queries_by_the_same_absolute_path(tmp_path, capsys, monkeypatch):
    import csv
    import json

    photos(tmp_path / "p", n=3)
    index = tmp_path / "i.safetensors"
    assert main(["index", str(tmp_path / "p"), "--out", str(index), *SMALL]) == 0
    monkeypatch.chdir(tmp_path)  # the queries as typed: relative, one through ".."
    queries = ["p/img0.png", "p/../p/img1.png", "p/missing_typo.png"]
    (tmp_path / "p" / "missing_typo.png").write_text("not an image")
    args = ["search", *queries, "--index", str(index), "--top-k", "2", "--json", "r.json", "--csv", "r.csv"]
    code, _, _ = top_result(capsys, *args)
    assert code == 0
    expected = [str((tmp_path / "p" / name).resolve()) for name in ("img0.png", "img1.png")]
    report = json.loads((tmp_path / "r.json").read_text())
    assert [q["query"] for q in report["queries"]] == expected
    assert report["unreadable_queries"] == [str((tmp_path / "p" / "missing_typo.png").resolve())]
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [row["query"] for row in rows] == [e for e in expected for _ in range(2)]
    assert all(Path(row["query"]).is_absolute() and Path(row["path"]).is_absolute() for row in rows)


def test_search_with_json_or_csv_draws_no_grid_unless_out_is_given(tmp_path, capsys, monkeypatch):
    """One query with --json or --csv and no --out writes the tables only (it used to drop
    QUERY_results.png into the working folder too); --out still draws its grid beside them, and a
    query with none of them keeps the default grid (the only output that shows the results)."""
    paths = photos(tmp_path / "p", n=3)
    index = tmp_path / "i.safetensors"
    assert main(["index", str(tmp_path / "p"), "--out", str(index), *SMALL]) == 0
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    base = ["search", str(paths[0]), "--index", str(index), "--top-k", "2"]
    for tables in (["--json", "r.json"], ["--csv", "r.csv"], ["--json", "r.json", "--csv", "r.csv"]):
        for name in ("r.json", "r.csv"):
            (work / name).unlink(missing_ok=True)
        code, _, _ = top_result(capsys, *base, *tables)
        written = sorted(path.name for path in work.iterdir())
        assert code == 0 and written == sorted(tables[1::2]), (tables, written)
        assert not list(tmp_path.rglob("*_results.png"))
    code, _, _ = top_result(capsys, *base, "--json", "r.json", "--out", "asked.png")
    assert code == 0 and (work / "asked.png").is_file() and (work / "r.json").is_file()
    code, _, _ = top_result(capsys, *base)
    assert code == 0 and (work / f"{paths[0].stem}_results.png").is_file()


def test_grid_captions_are_shortened_in_the_middle(tmp_path):
    from plmetric.retrieval.index import GRID_CAPTION_CHARS, draw_results
    from plmetric.retrieval.result_grid import grid_captions

    names = [f"holiday_2024_beach_sunset_panorama_{i:04d}.png" for i in range(3)]
    paths = photos(tmp_path / "p", n=3)
    for path, name in zip(paths, names, strict=True):
        path.rename(path.with_name(name))
    long_paths = [str(path.with_name(name)) for path, name in zip(paths, names, strict=True)]
    draw_results(long_paths[0], long_paths[1:], [0.9, 0.8], tmp_path / "grid.png")  # draws these captions
    assert (tmp_path / "grid.png").is_file()
    shown = [caption.splitlines()[-1] for caption in grid_captions(long_paths[0], long_paths[1:], [0.9, 0.8])]
    assert len(shown) == 3 and len(set(shown)) == 3  # the tails tell the files apart
    for name, caption in zip(names, shown, strict=True):
        assert len(caption) == GRID_CAPTION_CHARS and "…" in caption and name.endswith(caption.split("…")[1])
