"""``plmetric neighbours``, ``duplicates`` and ``groups`` end to end on an index whose embeddings are
planted (so the right answer is known): tables, grids, faiss paths, rewriting their own outputs and
refusing anything else."""

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
from plmetric.manifold.ann import faiss_available
from plmetric.retrieval.index import index_identity, load_embeddings, read_index_metadata, save_embeddings

DIM = 16
# float32 inner products of unit vectors in DIM dimensions (the commands score in float32)
BOUND = gamma(DIM, torch.float32) + 2 * gamma(1, torch.float32)


def _planted(n_distinct: int = 14, seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    """Unit vectors: image 0 with three near copies (1, 2, 3: noise of norm ~0.04, cosine > 0.995), image 4 with one (5),
    and ``n_distinct`` far apart (random in 16-d: cosines below 0.9 with each other and the rest)."""
    rng = np.random.default_rng(seed)
    while True:
        base = rng.normal(size=(2 + n_distinct, DIM))
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        gram = base @ base.T
        np.fill_diagonal(gram, -1)
        if gram.max() < 0.8:
            break
    rows = [base[0]]
    for _ in range(3):
        v = base[0] + 0.01 * rng.normal(size=DIM)
        rows.append(v / np.linalg.norm(v))
    rows.append(base[1])
    v = base[1] + 0.01 * rng.normal(size=DIM)
    rows.append(v / np.linalg.norm(v))
    rows += list(base[2:])
    return np.asarray(rows, dtype=np.float32), [[0, 1, 2, 3], [4, 5]]


@pytest.fixture()
def pile(tmp_path: Path) -> dict[str, object]:
    """An index of 20 real image files (a random-weight checkpoint), its embeddings replaced by planted ones."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    vectors, groups = _planted()
    for i in range(len(vectors)):
        pixels = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=DIM, pretrained=False)
    ckpt = save_model(
        tmp_path / "model.safetensors", model, {"backbone": "efficientnet_lite0", "embedding_dim": DIM, "image_size": 32}
    )
    index = tmp_path / "index.safetensors"
    small = ["--image-size", "32", "--no-progress", "--num-workers", "0"]
    assert main(["index", str(folder), "--checkpoint", str(ckpt), "--out", str(index), *small]) == 0
    _, labels, paths, description = load_embeddings(index)
    order = np.argsort(paths)  # index rows in path order: img00 .. img19 = planted rows 0 .. 19
    planted = np.empty_like(vectors)
    planted[order] = vectors
    save_embeddings(index, torch.from_numpy(planted), labels, paths, description)
    by_row = [paths[i] for i in order]
    return {"index": index, "paths": by_row, "vectors": vectors, "groups": groups, "tmp": tmp_path, "small": small}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _reference_neighbours(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    x = vectors.astype(np.float64)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def test_neighbours_table_is_every_images_top_k_others(pile, capsys):
    out = pile["tmp"] / "neighbours.csv"
    assert main(["neighbours", str(pile["index"]), "--k", "3", "--out", str(out), "--no-progress"]) == 0
    rows = _rows(out)
    paths, vectors = pile["paths"], pile["vectors"]
    assert list(rows[0]) == ["path", "rank", "neighbour", "score", "index_id"]  # the index, recorded last
    embeddings, _, indexed, _ = load_embeddings(pile["index"])
    assert rows[0]["index_id"] == index_identity(embeddings, indexed) and not any(r["index_id"] for r in rows[1:])
    assert len(rows) == 3 * len(paths)
    ref_scores, ref_ids = _reference_neighbours(vectors, 3)
    position = {p: i for i, p in enumerate(paths)}
    for row in rows:
        i, rank = position[row["path"]], int(row["rank"])
        assert row["neighbour"] != row["path"], "an image is never its own neighbour"
        # the score as written (6 decimals) within the float32 bound of the float64 reference
        assert abs(float(row["score"]) - ref_scores[i, rank - 1]) <= BOUND + 5e-7
    # ranks where the reference's gap to the next score exceeds twice the bound name the same image
    for row in rows:
        i, rank = position[row["path"]], int(row["rank"])
        gaps = np.abs(ref_scores[i] - ref_scores[i, rank - 1])
        gaps[rank - 1] = np.inf
        if gaps.min() > 2 * BOUND:
            assert position[row["neighbour"]] == ref_ids[i, rank - 1]
    # the table is ours: writing it again replaces it; k larger than N-1 is cut to N-1
    assert main(["neighbours", str(pile["index"]), "--k", "50", "--out", str(out), "--no-progress"]) == 0
    assert len(_rows(out)) == len(paths) * (len(paths) - 1)


def test_neighbours_parquet_matches_csv(pile):
    pq = pytest.importorskip("pyarrow.parquet")
    out_csv, out_pq = pile["tmp"] / "n.csv", pile["tmp"] / "n.parquet"
    for out in (out_csv, out_pq):
        assert main(["neighbours", str(pile["index"]), "--k", "4", "--out", str(out), "--no-progress"]) == 0
    table = pq.read_table(out_pq).to_pylist()
    rows = _rows(out_csv)
    assert [(r["path"], int(r["rank"]), r["neighbour"]) for r in rows] == [
        (r["path"], r["rank"], r["neighbour"]) for r in table
    ]
    assert np.allclose([float(r["score"]) for r in rows], [r["score"] for r in table], atol=5e-7)


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])  # ivfpq: its candidates re-ranked from the rows
def test_neighbours_and_duplicates_through_a_faiss_index_agree_with_exact(pile, kind):
    from plmetric.manifold import ann
    from plmetric.retrieval.index import write_index

    embeddings, labels, paths, description = load_embeddings(pile["index"])
    faiss_indexed = pile["tmp"] / f"{kind}.safetensors"
    plan = ann.plan_index(len(paths), None, kind=kind, dim=embeddings.shape[1])
    write_index(faiss_indexed, embeddings, labels, paths, description, plan)
    assert read_index_metadata(faiss_indexed)["ann"]["kind"] == kind
    tables = {}
    for name, index, extra in (("exact", pile["index"], []), (kind, faiss_indexed, [])):
        out = pile["tmp"] / f"n_{name}.csv"
        assert main(["neighbours", str(index), "--k", "2", "--out", str(out), "--no-progress", *extra]) == 0
        tables[name] = [(r["path"], r["rank"], r["neighbour"]) for r in _rows(out)]
        dup = pile["tmp"] / f"d_{name}.csv"
        assert main(["duplicates", str(index), "--threshold", "0.99", "--out", str(dup), "--no-progress"]) == 0
        tables[f"d_{name}"] = [(r["group"], r["path"]) for r in _rows(dup)]
    # 20 planted vectors, well separated: the approximate graph finds the same top-2 (ties excepted: none here)
    assert tables["exact"] == tables[kind]
    assert tables["d_exact"] == tables[f"d_{kind}"]


def test_duplicates_are_the_planted_groups(pile, capsys):
    out, grid = pile["tmp"] / "dups.csv", pile["tmp"] / "dups.png"
    argv = ["duplicates", str(pile["index"]), "--threshold", "0.99", "--out", str(out), "--grid", str(grid)]
    assert main([*argv, "--no-progress"]) == 0
    rows = _rows(out)
    assert list(rows[0]) == ["group", "size", "path", "best_score", "index_id"]
    found = {}
    for row in rows:
        found.setdefault(int(row["group"]), []).append(row["path"])
        assert int(row["size"]) in (4, 2)
    paths = pile["paths"]
    assert {frozenset(v) for v in found.values()} == {frozenset(paths[i] for i in g) for g in pile["groups"]}
    # surest first: by the weakest pair inside each group (float64 reference)
    x = pile["vectors"].astype(np.float64)
    weakest = [min(x[a] @ x[c] for a in g for c in g if a < c) for g in pile["groups"]]
    first = pile["groups"][int(np.argmax(weakest))]
    assert abs(weakest[0] - weakest[1]) > 2 * BOUND and len(found[1]) == len(first)
    # best_score: each member's highest cosine to another image (float64 reference, the written 6 decimals)
    x = pile["vectors"].astype(np.float64)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    position = {p: i for i, p in enumerate(paths)}
    scores = [float(r["best_score"]) for r in rows]
    for row, score in zip(rows, scores, strict=True):
        assert abs(score - sims[position[row["path"]]].max()) <= BOUND + 5e-7
    for number in found:  # members by best score
        group_scores = [s for r, s in zip(rows, scores, strict=True) if int(r["group"]) == number]
        assert group_scores == sorted(group_scores, reverse=True)
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.info.get("Software") == "plmetric duplicates"
    # its own outputs are replaced; a threshold of 1 keeps only identical vectors: none here, an empty table
    assert main(["duplicates", str(pile["index"]), "--threshold", "1", "--out", str(out), "--grid", str(grid)]) == 0
    assert _rows(out) == [] and out.read_text().startswith("group,size,path,best_score")


def test_outputs_that_are_not_ours_are_never_replaced(pile, capsys):
    tmp = pile["tmp"]
    foreign_csv = tmp / "mine.csv"
    foreign_csv.write_text("name,value\na,1\n")
    foreign_png = tmp / "photo.png"
    Image.new("RGB", (8, 8)).save(foreign_png)
    neighbours_table = tmp / "neighbours.csv"
    assert main(["neighbours", str(pile["index"]), "--k", "1", "--out", str(neighbours_table), "--no-progress"]) == 0
    before = {p: p.read_bytes() for p in (foreign_csv, foreign_png, neighbours_table)}
    attempts = [
        ["neighbours", str(pile["index"]), "--out", str(foreign_csv)],
        ["duplicates", str(pile["index"]), "--out", str(neighbours_table)],  # another command's table
        ["groups", str(pile["index"]), "--out", str(foreign_csv)],
        ["duplicates", str(pile["index"]), "--out", str(tmp / "d.csv"), "--grid", str(foreign_png)],
        ["groups", str(pile["index"]), "--out", str(tmp / "g.csv"), "--grid", str(foreign_png)],
        ["neighbours", str(pile["index"]), "--out", str(pile["paths"][0]).replace(".png", ".csv")],  # fine: no file
    ]
    for argv in attempts[:-1]:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not a file this command writes" in err[0], err
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp / "d.csv").exists() and not (tmp / "g.csv").exists()


def test_groups_partition_the_pile_with_an_ungrouped_bucket(tmp_path, capsys):
    """Three tight planted clusters (12, 8, 6 images) and 4 scattered images: three groups by size,
    one representative each (the member nearest the group's mean direction), the scattered ungrouped."""
    rng = np.random.default_rng(0)
    centres = np.eye(DIM)[:3]
    vectors = [c + 0.02 * rng.normal(size=DIM) for c, n in zip(centres, (12, 8, 6), strict=True) for _ in range(n)]
    vectors += [np.eye(DIM)[3 + 3 * i] + np.eye(DIM)[4 + 3 * i] for i in range(4)]  # far from all and each other
    vectors = np.asarray(vectors)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = []
    for i in range(len(vectors)):
        path = folder / f"img{i:02d}.png"
        Image.new("RGB", (8, 8), (i, i, i)).save(path)
        paths.append(str(path.resolve()))
    model = {
        "checkpoint": None,
        "checkpoint_sha256": None,
        "backbone": "efficientnet_lite0",
        "embedding_dim": 0,
        "output_dim": DIM,
        "image_size": 32,
        "weights": None,
        "weights_sha256": None,
    }
    index = tmp_path / "index.safetensors"
    save_embeddings(index, torch.tensor(vectors, dtype=torch.float32), torch.full((len(paths),), -1), paths, model)
    out = tmp_path / "groups.csv"
    grid = tmp_path / "g.png"
    assert main(["groups", str(index), "--out", str(out), "--min-size", "4", "--method", "hdbscan", "--grid", str(grid)]) == 0
    rows = _rows(out)
    assert list(rows[0]) == ["group", "size", "path", "representative", "score", "index_id"]
    groups: dict[int, list[str]] = {}
    for row in rows:
        groups.setdefault(int(row["group"]), []).append(row["path"])
    assert [int(r["group"]) for r in rows] == sorted(int(r["group"]) for r in rows if r["group"] != "-1") + [-1] * 4
    assert {g: len(m) for g, m in groups.items()} == {1: 12, 2: 8, 3: 6, -1: 4}
    assert set(groups[1]) == set(paths[:12]) and set(groups[2]) == set(paths[12:20]) and set(groups[-1]) == set(paths[26:])
    for g, members in groups.items():
        mine = [r for r in rows if int(r["group"]) == g]
        reps = [r for r in mine if r["representative"] == "1"]
        if g == -1:
            assert not reps and all(r["score"] == "" for r in mine)
            continue
        x = vectors[[paths.index(p) for p in members]]
        direction = x.sum(0) / np.linalg.norm(x.sum(0))
        reference = x @ direction
        assert len(reps) == 1 and reps[0]["path"] == members[int(np.argmax(reference))] == mine[0]["path"]
        assert np.allclose([float(r["score"]) for r in mine], reference, atol=BOUND + 5e-7)
    assert "3 groups" in capsys.readouterr().out
    # the default, k-means, with --groups 3: the three clusters, every image somewhere (the four scattered
    # ones join a cluster: k-means leaves only groups below --min-size ungrouped)
    assert main(["groups", str(index), "--out", str(out), "--min-size", "4", "--groups", "3", "--grid", str(grid)]) == 0
    rows = _rows(out)
    members = {}
    for row in rows:
        members.setdefault(int(row["group"]), set()).add(row["path"])
    assert sorted(members) == [1, 2, 3] and sum(len(m) for m in members.values()) == len(paths)
    for cluster in (paths[:12], paths[12:20], paths[20:26]):
        assert any(set(cluster) <= m for m in members.values())


def test_an_index_of_one_image_is_refused_in_one_line(tmp_path, capsys):
    model = {"backbone": "efficientnet_lite0", "embedding_dim": 0, "output_dim": 4, "image_size": 32}
    index = tmp_path / "one.safetensors"
    save_embeddings(index, torch.eye(4)[:1], torch.tensor([-1]), ["item:0"], model)
    for command in ("neighbours", "duplicates", "groups"):
        capsys.readouterr()
        assert main([command, str(index), "--out", str(tmp_path / f"{command}.csv")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "at least 2" in err[0]
        assert not (tmp_path / f"{command}.csv").exists()


def test_check_crops_keeps_every_plain_group_and_skips_files_changed_since_indexing(pile, capsys):
    """--check-crops only ever raises a pair's score (the best of plain and zoomed views), so each plain
    group lies inside a group found with it; a candidate file rewritten after indexing is not re-read
    (its zoomed view would be of another image): one warning, its pairs keep their plain scores."""
    tmp = pile["tmp"]
    plain, crops = tmp / "plain.csv", tmp / "crops.csv"
    base = ["duplicates", str(pile["index"]), "--threshold", "0.99", "--no-progress", "--num-workers", "0"]
    assert main([*base, "--out", str(plain)]) == 0
    capsys.readouterr()
    assert main([*base, "--out", str(crops), "--check-crops", "--candidates", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "--check-crops:" in err and "zoomed views to embed" in err and "warning" not in err

    def groups(path: Path) -> list[set[str]]:
        found: dict[str, set[str]] = {}
        for row in _rows(path):
            found.setdefault(row["group"], set()).add(row["path"])
        return list(found.values())

    assert all(any(g <= h for h in groups(crops)) for g in groups(plain))
    Image.new("RGB", (30, 30), (1, 2, 3)).save(pile["paths"][0])  # another image where img00 was
    assert main([*base, "--out", str(crops), "--check-crops", "--candidates", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "1 candidate images were changed, moved or unreadable" in err
    assert all(any(g <= h for h in groups(crops)) for g in groups(plain))


def test_tables_written_in_chunks_equal_one_chunk(pile, monkeypatch):
    """duplicates and groups write their rows in chunks (Parquet row groups): small chunks change nothing."""
    from plmetric.cli.commands import duplicates as duplicates_command
    from plmetric.cli.commands import groups as groups_command

    tmp = pile["tmp"]
    runs = {
        "duplicates": ["duplicates", str(pile["index"]), "--threshold", "0.99", "--no-progress"],
        "groups": ["groups", str(pile["index"]), "--min-size", "2", "--groups", "4"],
    }
    whole = {}
    for name, argv in runs.items():
        assert main([*argv, "--out", str(tmp / f"{name}_whole.csv")]) == 0
        whole[name] = (tmp / f"{name}_whole.csv").read_text()
    from plmetric.retrieval import duplicates as duplicates_library

    monkeypatch.setattr(duplicates_library, "GROUP_ROWS_PER_CHUNK", 1)
    monkeypatch.setattr(groups_command, "ROWS_PER_CHUNK", 3)
    for name, argv in runs.items():
        assert main([*argv, "--out", str(tmp / f"{name}_chunked.csv")]) == 0
        assert (tmp / f"{name}_chunked.csv").read_text() == whole[name]
    assert whole["duplicates"].count("\n") == 1 + 6 and whole["groups"].count("\n") == 1 + 20
