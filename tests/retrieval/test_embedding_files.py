"""plmetric.retrieval.embedding_files and ``plmetric embed --out X.npy|X.parquet``: the same vectors and paths as
the safetensors index, from a folder, a list of files or a paths file; only its own files replaced."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from image_trees import make_tree

from plmetric.core.checkpoint import save_model
from plmetric.cli import main
from plmetric.retrieval.embedding_files import (
    FORMAT,
    is_embedding_export,
    read_npy,
    read_parquet,
    sidecars,
    write_npy,
    write_parquet,
)
from plmetric.data.backbones import create_model
from plmetric.retrieval.index import load_embeddings

needs_pyarrow = pytest.mark.skipif(
    importlib.util.find_spec("pyarrow") is None, reason='pyarrow not installed (pip install "plmetric[parquet]")'
)
MODEL = {"backbone": "efficientnet_lite0", "embedding_dim": 8, "image_size": 32}


def _random(n: int = 7, dim: int = 5):
    generator = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1)
    labels = torch.tensor([i % 3 for i in range(n)])
    paths = [f"/photos/ä {i}.jpg" for i in range(n)]  # non-ASCII and spaces survive
    return emb, labels, paths


def test_npy_round_trip_is_exact(tmp_path):
    emb, labels, paths = _random()
    written = write_npy(tmp_path / "e.npy", emb, labels, paths, MODEL)
    assert written == [tmp_path / "e.npy", *sidecars(tmp_path / "e.npy")]
    assert [p.name for p in written] == ["e.npy", "e.paths.txt", "e.json"]
    vectors, read_paths, document = read_npy(tmp_path / "e.npy")
    assert vectors.dtype == np.float32 and np.array_equal(vectors, emb.numpy())  # float32 in, float32 out: bit-exact
    assert read_paths == paths
    assert document["format"] == FORMAT and document["labels"] == labels.tolist() and document["model"] == MODEL
    assert is_embedding_export(tmp_path / "e.npy")


def test_npy_refuses_a_path_with_a_line_break(tmp_path):
    emb, labels, paths = _random(2)
    with pytest.raises(ValueError, match="line break"):
        write_npy(tmp_path / "e.npy", emb, labels, ["a\nb.jpg", paths[1]], MODEL)
    assert not list(tmp_path.iterdir())


@needs_pyarrow
def test_parquet_round_trip_is_exact(tmp_path):
    import pyarrow.parquet as pq

    emb, labels, paths = _random()
    write_parquet(tmp_path / "e.parquet", emb, labels, paths, MODEL)
    vectors, read_paths, document = read_parquet(tmp_path / "e.parquet")
    assert np.array_equal(vectors, emb.numpy()) and read_paths == paths and document["model"] == MODEL
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column_names == ["path", "label", "embedding"] and table.column("label").to_pylist() == labels.tolist()
    assert table.schema.field("embedding").type.list_size == emb.shape[1]
    assert is_embedding_export(tmp_path / "e.parquet")


def test_foreign_files_are_not_exports(tmp_path):
    np.save(tmp_path / "mine.npy", np.zeros(3))
    (tmp_path / "mine.parquet").write_bytes(b"PAR1 not really")
    assert not is_embedding_export(tmp_path / "mine.npy") and not is_embedding_export(tmp_path / "mine.parquet")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_files")
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=8, pretrained=True)
    ckpt = save_model(root / "model.safetensors", model, MODEL)
    photos = make_tree("images", root / "photos", classes=2, per_class=3, bad=0)
    photos = photos[0] if isinstance(photos, tuple) else photos
    files = sorted(p for p in photos.rglob("*") if p.is_file())
    index = root / "all.safetensors"
    assert (
        main(["embed", "--images", str(photos), "--checkpoint", str(ckpt), "--out", str(index), "--no-progress"]) == 0
    )
    return {"root": root, "ckpt": ckpt, "photos": photos, "files": files, "index": index}


def _embed(ws, out, *sources: str) -> int:
    return main(["embed", *sources, "--checkpoint", str(ws["ckpt"]), "--out", str(out), "--no-progress"])


def test_npy_and_parquet_hold_the_index_vectors_for_files_and_a_paths_file(ws, capsys):
    reference, _, ref_paths, _ = load_embeddings(ws["index"])
    by_path = dict(zip(ref_paths, reference.numpy(), strict=True))
    files = ws["files"]
    listing = ws["root"] / "list.txt"
    listing.write_text("# the last three\n" + "".join(f"{p}\n" for p in files[3:]) + "\n", encoding="utf-8")
    out = ws["root"] / "some.npy"
    assert _embed(ws, out, "--images", str(files[0]), str(files[1]), str(files[2]), "--paths-file", str(listing)) == 0
    assert "some.paths.txt + some.json" in capsys.readouterr().out
    vectors, paths, document = read_npy(out)
    assert paths == [str(p.resolve()) for p in files]  # the order given: files, then the listing's lines
    # the same model and preprocessing, batched differently: float32 rounding of the convolutions
    # (a few ulps of unit-norm entries); 1e-5 bounds it
    np.testing.assert_allclose(vectors, np.stack([by_path[p] for p in paths]), rtol=0, atol=1e-5)
    assert document["model"]["checkpoint_sha256"] and document["labels"] == [-1] * len(files)
    if importlib.util.find_spec("pyarrow") is not None:
        pq_out = ws["root"] / "all.parquet"
        assert _embed(ws, pq_out, "--images", str(ws["photos"])) == 0
        vectors, paths, _ = read_parquet(pq_out)
        np.testing.assert_allclose(vectors, np.stack([by_path[p] for p in paths]), rtol=0, atol=1e-5)
        assert sorted(paths) == sorted(ref_paths)


def test_embed_replaces_only_its_own_exports(ws, capsys):
    out = ws["root"] / "again.npy"
    assert _embed(ws, out, "--images", str(ws["files"][0])) == 0
    assert _embed(ws, out, "--images", str(ws["files"][1])) == 0  # its own export: replaced
    assert read_npy(out)[1] == [str(ws["files"][1].resolve())]
    foreign = ws["root"] / "foreign.npy"
    np.save(foreign, np.ones(2))
    capsys.readouterr()
    assert _embed(ws, foreign, "--images", str(ws["files"][0])) == 2
    assert "exists and is not a file this command writes" in capsys.readouterr().err
    assert np.array_equal(np.load(foreign), np.ones(2))
    stray = ws["root"] / "stray.npy"
    (ws["root"] / "stray.json").write_text(json.dumps({"mine": 1}))  # somebody's JSON where X.json would go
    assert _embed(ws, stray, "--images", str(ws["files"][0])) == 2
    assert "stray.json exists and is not a file this command writes" in capsys.readouterr().err
    assert json.loads((ws["root"] / "stray.json").read_text()) == {"mine": 1} and not stray.exists()


def test_read_npy_checks_the_recorded_sizes_against_the_data(tmp_path):
    """An .npy header claiming more rows than the file holds is refused from the file size (memory-mapped,
    never allocated), and the description's rows and dim must be the data's shape (issue 30)."""
    from numpy.lib import format as npy_format

    out = tmp_path / "e.npy"
    vectors = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    write_npy(out, vectors, torch.arange(3), ["a", "b", "c"], {"backbone": "efficientnet_lite0"})
    assert read_npy(out)[0].shape == (3, 4)
    paths_file, meta_file = sidecars(out)
    document = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**document, "dim": 500000}))
    with pytest.raises(ValueError, match=r"e\.npy: its description records dim 500000, but the embeddings have shape \[3, 4\]"):
        read_npy(out)
    meta_file.write_text(json.dumps(document))
    with open(out, "wb") as handle:  # a header of 10^12 rows over 48 bytes of data
        npy_format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 4)})
        handle.write(vectors.numpy().tobytes())
    with pytest.raises(ValueError, match=r"e\.npy: not a readable \.npy file"):
        read_npy(out)
    meta_file.write_text("[" * 100_000 + "]" * 100_000)
    np.save(out, vectors.numpy())
    with pytest.raises(ValueError, match=r"e\.json: not the JSON description"):
        read_npy(out)
