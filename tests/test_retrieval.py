"""Indexes are self-contained and self-checking: absolute paths, the model's hash, no random heads."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from plmetric.checkpoint import file_sha256, save_model
from plmetric.cli import main
from plmetric.models import create_model
from plmetric.retrieval import (
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
    # search from another folder: the indexed image itself comes first, its tile is readable
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, lines, _ = top_result(
        capsys, "search", str(paths[2]), "--index", "../i.safetensors", "--top-k", "3", "--out", "g.png"
    )
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
    for query in report["queries"]:  # every indexed query finds itself first
        assert query["results"][0]["path"] == query["query"] and len(query["results"]) == 2
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
