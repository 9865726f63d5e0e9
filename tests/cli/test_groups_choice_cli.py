"""``plmetric groups`` prints how its number of groups was chosen (issue 29), and ``--groups K`` overrides it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from plmetric.cli import main
from plmetric.retrieval.index import save_embeddings

DIM = 32


def _index(tmp_path: Path, clusters: int = 8, per: int = 20) -> Path:
    """An index of ``clusters`` x ``per`` real (tiny) image files whose embeddings are planted: clusters
    around the axes e0 .. e(clusters-1), sqrt(2) apart, members about 0.4 apart (every 5-NN link inside
    its cluster: the modularity peaks at the true k)."""
    rng = np.random.default_rng(0)
    vectors = np.concatenate([np.eye(DIM)[i] + 0.05 * rng.normal(size=(per, DIM)) for i in range(clusters)])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = []
    for i in range(len(vectors)):
        path = folder / f"img{i:03d}.png"
        Image.new("RGB", (8, 8), (i % 256, i // 256, 0)).save(path)
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
    return index


def test_groups_prints_the_chosen_k_and_why_and_groups_k_overrides(tmp_path, capsys):
    index = _index(tmp_path)
    assert main(["groups", str(index), "--out", str(tmp_path / "a.csv")]) == 0
    out = capsys.readouterr().out
    assert "k=8 chosen by the k-NN graph's modularity (resolution 4, 5 neighbours: Q=" in out
    assert "8 groups (kmeans) of 160 images; 0 ungrouped" in out
    assert main(["groups", str(index), "--out", str(tmp_path / "b.csv"), "--groups", "5"]) == 0
    out = capsys.readouterr().out
    assert "chosen by" not in out and "5 groups (kmeans) of 160 images" in out


def test_groups_hdbscan_prints_its_cluster_selection(tmp_path, capsys):
    index = _index(tmp_path)
    assert main(["groups", str(index), "--out", str(tmp_path / "h.csv"), "--method", "hdbscan"]) == 0
    out = capsys.readouterr().out
    assert "HDBSCAN cluster selection '" in out and "eom: " in out and "leaf: " in out
    assert "8 groups (hdbscan)" in out


def test_groups_says_when_a_structureless_pile_is_cut_arbitrarily(tmp_path, capsys):
    index = _index(tmp_path, clusters=1, per=150)  # one Gaussian blob: its best Q is that of its own null
    assert main(["groups", str(index), "--out", str(tmp_path / "w.csv")]) == 0
    out = capsys.readouterr().out
    assert "chosen by the k-NN graph's modularity" in out
    assert "weak structure: Q=" in out
    assert "for structureless data of the same spread; the groups are arbitrary cuts" in out


def test_groups_finds_three_separated_groups(tmp_path, capsys):
    index = _index(tmp_path, clusters=3, per=50)  # at resolution 4 three groups score 1 - 4/3 < 0
    assert main(["groups", str(index), "--out", str(tmp_path / "f.csv")]) == 0
    out = capsys.readouterr().out
    assert "k=3 chosen as few well separated groups" in out and "weak" not in out
    assert "3 groups (kmeans) of 150 images; 0 ungrouped" in out
