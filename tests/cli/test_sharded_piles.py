"""``neighbours``, ``duplicates``, ``groups`` and ``serve`` on a sharded float16 index (issue 31): the same
answers as on the same vectors in a one-file index, without ever reading the sharded one whole, and
an estimate printed before long work."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from numerics import gamma
from plmetric.cli import main
from plmetric.core.checkpoint import save_model
from plmetric.data.backbones import create_model
from plmetric.retrieval.index import load_embeddings, load_file_stats, write_index
from plmetric.retrieval.mapped import stored_identity
from plmetric.retrieval.stored import StoredPaths, StoredVectors, open_index

DIM = 16
N = 24
E16 = 2.0**-11 + DIM**0.5 * 2.0**-25
"""float16 rounding of a unit vector: relative 2^-11 a component (unit roundoff), plus 2^-25 absolute
below 2^-14 (subnormals)."""
FLOAT16_BOUND = 2 * E16 + E16**2 + 2 * gamma(DIM, torch.float32) * (1 + E16) ** 2
"""|<a', b'> - <a, b>| for unit a, b stored as float16 (||a' - a|| <= E16), each side computed in float32."""
WRITTEN = 5e-7
"""Tables write scores with 6 decimals."""


def _planted(seed: int = 0) -> np.ndarray:
    """N unit vectors in 3 clusters (cosines ~0.7 inside, lower across) and two planted copies: 1 of 0, 3 of 2."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[np.arange(N) % 3] + 0.6 * rng.normal(size=(N, DIM)) / DIM**0.5
    x[1] = x[0] + 0.002 * rng.normal(size=DIM)
    x[3] = x[2] + 0.002 * rng.normal(size=DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def indexes(tmp_path_factory) -> dict:
    """N real image files indexed once; their embeddings replaced by planted ones, written as a one-file
    float32 index and as a sharded float16 one (shards of 5 rows) with the same paths, stats and model."""
    root = tmp_path_factory.mktemp("sharded_piles")
    folder = root / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(N):
        pixels = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=DIM, pretrained=False)
    ckpt = save_model(root / "model.safetensors", model,
                      {"backbone": "efficientnet_lite0", "embedding_dim": DIM, "image_size": 32})
    first = root / "first.safetensors"
    small = ["--image-size", "32", "--no-progress", "--num-workers", "0", "--no-calibrate"]
    assert main(["index", str(folder), "--checkpoint", str(ckpt), "--out", str(first), *small]) == 0
    _, labels, paths, description = load_embeddings(first)
    stats = load_file_stats(first)
    order = np.argsort(paths)
    paths = [paths[i] for i in order]
    vectors = torch.from_numpy(_planted())
    single, sharded = root / "single.safetensors", root / "sharded.safetensors"
    write_index(single, vectors, labels[order], paths, description, stats=stats[order])
    write_index(sharded, vectors, labels[order], paths, description, stats=stats[order], dtype="float16",
                rows_per_shard=5)
    assert len(open_index(sharded).shard_files) == 5
    return {"root": root, "single": single, "sharded": sharded, "paths": paths, "vectors": vectors.numpy()}


@pytest.fixture()
def never_whole(monkeypatch):
    """``arm()``: from then on, reading a sharded index's vectors or paths whole (or anything through
    load_embeddings) fails the test."""
    import plmetric.retrieval.index as index_module

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a sharded index was read whole")

    def arm() -> None:
        monkeypatch.setattr(StoredVectors, "materialize", refuse)
        monkeypatch.setattr(StoredPaths, "to_list", refuse)
        monkeypatch.setattr(index_module, "load_embeddings", refuse)

    return arm


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _reference(vectors: np.ndarray, k: int) -> np.ndarray:
    sims = vectors.astype(np.float64) @ vectors.astype(np.float64).T
    np.fill_diagonal(sims, -np.inf)
    return -np.sort(-sims, axis=1)[:, :k]


def test_neighbours_of_a_sharded_index_equal_the_one_file_ones_and_are_estimated(
    indexes, never_whole, capsys, monkeypatch
):
    out_single, out_sharded = indexes["root"] / "n_single.csv", indexes["root"] / "n_sharded.csv"
    assert main(["neighbours", str(indexes["single"]), "--k", "4", "--out", str(out_single), "--no-progress"]) == 0
    never_whole()
    monkeypatch.setattr("plmetric.retrieval.neighbours.FAISS_BATCH", 6)  # four query blocks: an estimate
    capsys.readouterr()
    assert main(["neighbours", str(indexes["sharded"]), "--k", "4", "--out", str(out_sharded), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"neighbours of {N} images: about " in err and "(first 6 at " in err
    a, b = _rows(out_single), _rows(out_sharded)
    assert b[0]["index_id"] == stored_identity(open_index(indexes["sharded"]))
    assert len(a) == len(b) == 4 * N
    reference = _reference(indexes["vectors"], 5)  # one past the last rank: a tie across the cut counts
    position = {p: i for i, p in enumerate(indexes["paths"])}
    for row_a, row_b in zip(a, b, strict=True):
        assert (row_a["path"], row_a["rank"]) == (row_b["path"], row_b["rank"])
        assert abs(float(row_a["score"]) - float(row_b["score"])) <= FLOAT16_BOUND + 2 * WRITTEN
        i, rank = position[row_a["path"]], int(row_a["rank"]) - 1
        gaps = np.abs(reference[i] - reference[i, rank])
        gaps[rank] = np.inf
        if gaps.min() > 2 * FLOAT16_BOUND + 2 * gamma(DIM, torch.float32):
            assert row_a["neighbour"] == row_b["neighbour"]


def test_duplicates_and_groups_of_a_sharded_index_equal_the_one_file_ones(indexes, never_whole, capsys, monkeypatch):
    root = indexes["root"]
    monkeypatch.setattr("plmetric.retrieval.groups.FIT_SAMPLE", 12)  # a sample of 12 of the 24 images
    for name in ("single", "sharded"):
        if name == "sharded":
            never_whole()
        assert main(["duplicates", str(indexes[name]), "--threshold", "0.99", "--out", str(root / f"d_{name}.csv"),
                     "--pairs", str(root / f"p_{name}.csv"), "--no-progress"]) == 0
    a, b = _rows(root / "d_single.csv"), _rows(root / "d_sharded.csv")
    paths = indexes["paths"]
    assert sorted((r["size"], r["path"]) for r in a) == sorted((r["size"], r["path"]) for r in b)
    assert {r["path"] for r in b} == {paths[0], paths[1], paths[2], paths[3]}  # the planted copies alone
    pairs_a, pairs_b = _rows(root / "p_single.csv"), _rows(root / "p_sharded.csv")
    assert [(r["path_a"], r["path_b"]) for r in pairs_a] == [(r["path_a"], r["path_b"]) for r in pairs_b]
    for ra, rb in zip(pairs_a, pairs_b, strict=True):
        assert abs(float(ra["score"]) - float(rb["score"])) <= FLOAT16_BOUND + 2 * WRITTEN
    # groups: fitted on a sample of 12 of the 24 images (forced small), the rest assigned block by block
    monkeypatch.undo()
    monkeypatch.setattr("plmetric.retrieval.groups.FIT_SAMPLE", 12)
    for name in ("single", "sharded"):
        if name == "sharded":
            never_whole()
        capsys.readouterr()
        assert main(["groups", str(indexes[name]), "--groups", "3", "--min-size", "2",
                     "--out", str(root / f"g_{name}.csv")]) == 0
        out = capsys.readouterr()
        assert "fitted on a seeded random sample of 12 images" in out.out
    assert "assigning groups of 24 images: about " in out.err  # five shards: blocks after the first
    ga, gb = _rows(root / "g_single.csv"), _rows(root / "g_sharded.csv")
    assert sorted((r["group"], r["path"]) for r in ga) == sorted((r["group"], r["path"]) for r in gb)
    single_score = {r["path"]: float(r["score"]) for r in ga}
    for rb in gb:  # a group's mean direction moves by the float16 rounding too: twice the bound
        assert abs(single_score[rb["path"]] - float(rb["score"])) <= 2 * FLOAT16_BOUND + 2 * WRITTEN
    for group in {r["group"] for r in gb}:  # the representative: the best score, up to rounding (copies tie)
        members = [r for r in gb if r["group"] == group]
        chosen = [r for r in members if r["representative"] in ("1", "True", "true")]
        assert len(chosen) == 1
        best = max(single_score[r["path"]] for r in members)
        assert single_score[chosen[0]["path"]] >= best - 4 * FLOAT16_BOUND - 2 * WRITTEN
    # the planted clusters (rows i = c mod 3), copies 1 and 3 with their originals 0 and 2
    truth = {p: i % 3 for i, p in enumerate(paths)}
    truth[paths[1]], truth[paths[3]] = truth[paths[0]], truth[paths[2]]
    by_group: dict[str, set[int]] = {}
    for r in gb:
        by_group.setdefault(r["group"], set()).add(truth[r["path"]])
    assert all(len(kinds) == 1 for kinds in by_group.values())


def test_serve_starts_on_a_sharded_index_without_reading_its_vectors_and_answers_as_the_one_file_one(
    indexes, never_whole
):
    pytest.importorskip("starlette")
    from plmetric.retrieval.serve import Browser, load_group_table

    root = indexes["root"]
    one_file = Browser(indexes["single"], 5)
    assert main(["duplicates", str(indexes["single"]), "--threshold", "0.99", "--out", str(root / "other.csv"),
                 "--no-progress"]) == 0
    never_whole()

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("serve read the vectors at start")

    with pytest.MonkeyPatch.context() as start:
        for name in ("rows", "block", "blocks"):
            start.setattr(StoredVectors, name, refuse)
        browser = Browser(indexes["sharded"], 5)
        identity = browser.index_id  # a table's record is checked against it: no vector read either
    assert isinstance(browser.paths, StoredPaths) and len(browser) == N
    assert identity == stored_identity(open_index(indexes["sharded"]))
    reference = _reference(indexes["vectors"], 6)  # one past the last rank: a tie across the cut counts
    tie = 2 * FLOAT16_BOUND + 2 * gamma(DIM, torch.float32)
    for image_id in range(N):
        sharded_hits, single_hits = browser.search_id(image_id), one_file.search_id(image_id)
        assert image_id not in [h.id for h in sharded_hits] and len(sharded_hits) == 5
        for rank, (a, b) in enumerate(zip(sharded_hits, single_hits, strict=True)):
            assert abs(a.score - b.score) <= FLOAT16_BOUND and not a.missing
            gaps = np.abs(reference[image_id] - reference[image_id, rank])
            gaps[rank] = np.inf
            if gaps.min() > tie:  # no other image within rounding of this rank's score: the same image
                assert (a.id, a.path) == (b.id, b.path)
    # the copies: each other's first result
    assert browser.search_id(0)[0].id == 1 and browser.search_id(3)[0].id == 2
    # a duplicates table written from the sharded index is served with it; one from the one-file index is not
    assert main(["duplicates", str(indexes["sharded"]), "--threshold", "0.99", "--out", str(root / "served.csv"),
                 "--no-progress"]) == 0
    table = load_group_table(root / "served.csv", "duplicates", browser)
    assert sorted(m for g in table.groups for m in g.members) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="from another index"):
        load_group_table(root / "other.csv", "duplicates", browser)
