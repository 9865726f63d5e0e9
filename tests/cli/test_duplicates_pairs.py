"""``plmetric index`` records perceptual hashes (``phash``) and ``--add-to`` appends them; ``duplicates`` uses
them as its second signal and writes ``--pairs``; an old index without them still works; a forged record is
one line, exit 2."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from plmetric.cli import main
from plmetric.core.checkpoint import save_model
from plmetric.data.backbones import create_model
from plmetric.data.images import open_image
from plmetric.retrieval.hashes import hash_distances, perceptual_hashes
from plmetric.retrieval.index import HASH_KEY, load_embeddings, load_hashes, save_embeddings
from shared_data import shared_data_root

SMALL = ["--image-size", "32", "--no-progress", "--num-workers", "0", "--batch-size", "1"]


def photos(folder: Path, n: int = 6) -> list[Path]:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        pixels = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 40, (40, 48, 3)).cumsum(axis=0) / 4, 0, 255)
        paths.append(folder / f"img{k}.png")
        Image.fromarray(pixels.astype(np.uint8)).save(paths[-1])
    return paths


def checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=16, pretrained=False)
    meta = {"backbone": "efficientnet_lite0", "embedding_dim": 16, "output_dim": 16, "image_size": 32}
    return save_model(path, model, meta)


def test_index_records_each_images_hashes_and_add_to_appends_them(tmp_path, capsys):
    paths = photos(tmp_path / "p")
    ckpt = checkpoint(tmp_path / "model.safetensors")
    whole, part = tmp_path / "whole.safetensors", tmp_path / "part.safetensors"
    assert main(["index", str(tmp_path / "p"), "--checkpoint", str(ckpt), "--out", str(whole), *SMALL]) == 0
    _, _, indexed, _ = load_embeddings(whole)
    hashes = load_hashes(whole)
    assert hashes.dtype == np.uint8 and hashes.shape == (6, 16)
    expected = np.stack([perceptual_hashes(open_image(p)) for p in indexed])  # the decoded image's own hashes
    np.testing.assert_array_equal(hashes, expected)
    (tmp_path / "later").mkdir()
    for p in paths[4:]:
        p.rename(tmp_path / "later" / p.name)
    assert main(["index", str(tmp_path / "p"), "--checkpoint", str(ckpt), "--out", str(part), *SMALL]) == 0
    for p in paths[4:]:
        (tmp_path / "later" / p.name).rename(p)
    assert main(["index", str(tmp_path / "p"), "--add-to", str(part), *SMALL]) == 0
    assert load_embeddings(part)[2] == indexed
    np.testing.assert_array_equal(load_hashes(part), hashes)  # as a fresh index of the same files


def test_an_old_index_without_hashes_still_works_and_grows_without_them(tmp_path, capsys):
    photos(tmp_path / "p", n=4)
    ckpt = checkpoint(tmp_path / "model.safetensors")
    index = tmp_path / "i.safetensors"
    assert main(["index", str(tmp_path / "p"), "--checkpoint", str(ckpt), "--out", str(index), *SMALL]) == 0
    save_embeddings(index, *load_embeddings(index))  # rewritten as an older plmetric did: no phash
    assert load_hashes(index) is None
    capsys.readouterr()
    out = tmp_path / "d.csv"
    assert main(["duplicates", str(index), "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("records no perceptual hashes") == 1 and "no hashes in the index" in captured.out
    photos(tmp_path / "p2", n=2)
    for p in (tmp_path / "p2").iterdir():
        p.rename(tmp_path / "p" / f"new_{p.name}")
    assert main(["index", str(tmp_path / "p"), "--add-to", str(index), *SMALL]) == 0
    assert "records no perceptual hashes" in capsys.readouterr().out
    assert load_hashes(index) is None and len(load_embeddings(index)[2]) == 6


def test_a_forged_hash_record_is_one_line_exit_2(tmp_path, capsys):
    photos(tmp_path / "p", n=3)
    ckpt = checkpoint(tmp_path / "model.safetensors")
    index = tmp_path / "i.safetensors"
    assert main(["index", str(tmp_path / "p"), "--checkpoint", str(ckpt), "--out", str(index), *SMALL]) == 0
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(index), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(index))
    tensors[HASH_KEY] = torch.zeros(2, 16, dtype=torch.uint8)  # 2 rows for 3 images
    save_file(tensors, str(index), metadata=metadata)
    capsys.readouterr()
    for argv in (["duplicates", str(index), "--out", str(tmp_path / "d.csv")], ["index", str(tmp_path / "p"), "--add-to", str(index), *SMALL]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"'{HASH_KEY}' tensor is torch.uint8 [2, 16], expected uint8 [3, 16]" in err
    assert not (tmp_path / "d.csv").exists()


def planted_copy_pile(tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    """Six real plankton images (30-120 px) and a half-size copy of the first; skips without the data."""
    root = shared_data_root() / "plankton106"
    if not root.is_dir():
        pytest.skip(f"no plankton106 data at {root}")
    sources = sorted(root.rglob("*.jpg"))[::500][:6]
    folder = tmp_path / "pile"
    folder.mkdir()
    for k, source in enumerate(sources):
        shutil.copy(source, folder / f"{k}_{source.name}")
    original = folder / f"0_{sources[0].name}"
    with Image.open(original) as image:
        half = image.convert("RGB").resize((max(1, image.width // 2), max(1, image.height // 2)), Image.BILINEAR)
    copy = folder / "copy_half.png"
    half.save(copy)
    return original, copy, sorted(folder.iterdir())


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_half_size_plankton_copy_is_found_by_the_hash_below_the_threshold(tmp_path, capsys, suffix):
    if suffix == ".parquet":
        pq = pytest.importorskip("pyarrow.parquet")
    original, copy, _ = planted_copy_pile(tmp_path)
    ckpt = checkpoint(tmp_path / "model.safetensors")
    index = tmp_path / "i.safetensors"
    assert main(["index", str(tmp_path / "pile"), "--checkpoint", str(ckpt), "--out", str(index), *SMALL]) == 0
    embeddings, _, paths, _ = load_embeddings(index)
    hashes = load_hashes(index)
    a, b = paths.index(str(original.resolve())), paths.index(str(copy.resolve()))
    cosine = float(embeddings[a] @ embeddings[b])
    assert hash_distances(hashes[a], hashes[b])[0] <= 6  # the copy keeps its hash...
    threshold = min(1.0, cosine + 0.01)  # ...while the embedding alone misses it
    floor = cosine - 0.05
    out, pairs = tmp_path / "d.csv", tmp_path / f"pairs{suffix}"
    argv = ["duplicates", str(index), "--threshold", f"{threshold}", "--candidates", f"{floor}", "--out", str(out)]
    assert main([*argv, "--hash-distance", "off", "--no-progress"]) == 0
    with open(out, newline="", encoding="utf-8") as handle:
        assert not any({row["path"] for row in csv.DictReader(handle)} & {paths[a], paths[b]})
    capsys.readouterr()
    assert main([*argv, "--pairs", str(pairs), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "by the hash alone (distance <= 6" in printed
    if suffix == ".csv":
        with open(pairs, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0]) == ["path_a", "path_b", "score", "hash_distance", "signal", "index_id"]
    else:
        rows = pq.read_table(pairs).to_pylist()
    planted = [r for r in rows if {r["path_a"], r["path_b"]} == {paths[a], paths[b]}]
    assert len(planted) == 1 and planted[0]["signal"] == "hash"
    assert abs(float(planted[0]["score"]) - cosine) <= 1e-5 and int(planted[0]["hash_distance"]) <= 6
    with open(out, newline="", encoding="utf-8") as handle:
        groups = {}
        for row in csv.DictReader(handle):
            groups.setdefault(row["group"], set()).add(row["path"])
    assert {paths[a], paths[b]} in groups.values()


def test_pairs_output_is_checked_before_any_work(tmp_path, capsys):
    photos(tmp_path / "p", n=3)
    ckpt = checkpoint(tmp_path / "model.safetensors")
    index = tmp_path / "i.safetensors"
    assert main(["index", str(tmp_path / "p"), "--checkpoint", str(ckpt), "--out", str(index), *SMALL]) == 0
    out = tmp_path / "d.csv"
    cases = [
        (["--pairs", str(out)], "--pairs"),
        (["--pairs", str(tmp_path / "p.txt")], "--pairs"),
        (["--hash-distance", "65"], "--hash-distance"),
        (["--hash-distance", "-1"], "--hash-distance"),
    ]
    (tmp_path / "mine.csv").write_text("not a table\n")
    cases.append((["--pairs", str(tmp_path / "mine.csv")], "--pairs"))
    for extra, option in cases:
        capsys.readouterr()
        assert main(["duplicates", str(index), "--out", str(out), *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and option in err, err
        assert not out.exists()
    assert (tmp_path / "mine.csv").read_text() == "not a table\n"
