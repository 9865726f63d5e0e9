"""``plmetric embed`` and ``plmetric index`` under torchrun: 2 CPU processes (gloo) shard the images,
gather them in order, and rank 0 writes the same file as one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from image_trees import make_tree

from plmetric.core.checkpoint import save_model
from plmetric.data.backbones import create_model
from plmetric.retrieval.index import load_embeddings, load_hashes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_embed_and_index_under_torchrun_equal_one_process(tmp_path):
    # 9 files (odd: a shard of 5 and one of 4, no padding duplicates), one of them unreadable
    root, bad = make_tree("images", tmp_path / "photos", classes=3, per_class=3, bad=1)
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=8, pretrained=True)
    ckpt = save_model(
        tmp_path / "model.safetensors", model, {"backbone": "efficientnet_lite0", "embedding_dim": 8, "image_size": 32}
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--checkpoint", str(ckpt), "--device", "cpu", "--num-workers", "0", "--batch-size", "4", "--no-progress"]
    runs = {}
    for name, launcher in (
        ("one", [sys.executable, "-m", "plmetric.cli"]),
        (
            "two",
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_port",
                str(_free_port()),
                "-m",
                "plmetric.cli",
            ],
        ),
    ):
        for command, argv in (
            ("embed", ["embed", "--images", str(root), "--out", str(tmp_path / f"{name}_embed.safetensors")]),
            ("index", ["index", str(root), "--out", str(tmp_path / f"{name}_index.safetensors")]),
        ):
            done = subprocess.run([*launcher, *argv, *common], env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            runs[name, command] = done.stdout
    for command in ("embed", "index"):
        one = load_embeddings(tmp_path / f"one_{command}.safetensors")
        two = load_embeddings(tmp_path / f"two_{command}.safetensors")
        assert one[2] == two[2] and len(one[2]) == 9 - len(bad)  # the same paths, in the same order
        assert str(bad[0]) not in one[2]
        # the same model on the same images in other batches: float32 rounding of the convolutions
        # (a few ulps of unit-norm entries); 1e-5 bounds it
        torch.testing.assert_close(one[0], two[0], rtol=0, atol=1e-5)
        assert one[3]["checkpoint_sha256"] == two[3]["checkpoint_sha256"]
        # rank 0 alone reports, with the unreadable image counted over both shards
        assert runs["two", command].count("wrote 8 embeddings") == 1
        assert "left out 1 unreadable image(s)" in runs["two", command]
    # the perceptual hashes, computed in each rank's workers, gathered in the same order (exactly: integers)
    hashes = [load_hashes(tmp_path / f"{name}_index.safetensors") for name in ("one", "two")]
    assert hashes[0].shape == (8, 16) and (hashes[0] == hashes[1]).all()


def _on_two_nodes(argvs: list[list[str]], env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """Run ``plmetric`` as two torchrun launches of one process each (``--nnodes 2``), standing in for two
    machines: node i runs ``argvs[i]``. Returns both launches' results."""
    port = str(_free_port())
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port, "-m", "plmetric.cli", *argv],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node, argv in enumerate(argvs)
    ]
    done = []
    for launch in launches:
        try:
            out, err = launch.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for other in launches:
                other.kill()
            raise
        done.append(subprocess.CompletedProcess(launch.args, launch.returncode, out, err))
    return done


@pytest.mark.slow
def test_index_and_add_to_on_two_nodes_write_one_shard_set_per_rank_equal_to_one_process(tmp_path):
    """Issue 31: under ``torchrun --nnodes 2`` each rank writes its own shards (no vector is gathered) and
    rank 0 commits; the index equals the one-process index: same paths in the same order, same vectors
    (within float rounding), labels, hashes and file stats; its faiss index is built from the shards."""
    from plmetric.cli import main
    from plmetric.manifold import ann
    from plmetric.retrieval.index import load_faiss_index, load_file_stats, read_index_metadata

    pytest.importorskip("faiss")
    # 12 files in class_01..03, the first of class_01 unreadable: 11 rows; each node lists all 12 and
    # takes 6 contiguous ones (rank 0: class_01 and 2 of class_02, one unreadable)
    root, bad = make_tree("images", tmp_path / "photos", classes=3, per_class=4, bad=1)
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=8, pretrained=True)
    ckpt = save_model(
        tmp_path / "model.safetensors", model, {"backbone": "efficientnet_lite0", "embedding_dim": 8, "image_size": 32}
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--checkpoint", str(ckpt), "--device", "cpu", "--num-workers", "0", "--batch-size", "4", "--no-progress"]
    faiss = ["--faiss", "ivf", "--nlist", "2"]
    one, two, grown = (tmp_path / f"{name}.safetensors" for name in ("one", "two", "grown"))
    assert main(["index", str(root), "--out", str(one), *faiss, *common]) == 0
    # the index --add-to grows: class_01 (the first images in the sorted order), in shards of 2
    first = ["index", str(root / "class_01"), "--out", str(grown), "--shard-rows", "2", "--no-calibrate"]
    assert main([*first, *faiss, *common]) == 0  # 3 rows, 2 IVF cells: --add-to grows them from the new shards
    runs = {
        "index": _on_two_nodes([["index", str(root), "--out", str(two), "--shard-rows", "4", *faiss, *common]] * 2,
                               env),
        "add-to": _on_two_nodes([["index", str(root), "--add-to", str(grown), "--shard-rows", "3", *common]] * 2, env),
    }
    for name, done in runs.items():
        for node in done:
            assert node.returncode == 0, f"{name}: {node.stderr[-3000:]}"
    printed = "".join(node.stdout for node in runs["index"])
    assert printed.count("wrote 11 embeddings") == 1 and "left out 1 unreadable image(s)" in printed  # rank 0 alone
    assert "added 8 images" in runs["add-to"][0].stdout and "now 11" in runs["add-to"][0].stdout

    expected = load_embeddings(one)
    for path in (two, grown):
        found = load_embeddings(path)
        assert found[2] == expected[2] and len(found[2]) == 11 and str(bad[0]) not in found[2]  # same order
        # the same model on the same images in other batches (4 a batch cut from other ranges): float32
        # rounding of the convolutions, a few ulps of unit-norm entries; 1e-5 bounds it
        torch.testing.assert_close(found[0], expected[0], rtol=0, atol=1e-5)
        assert torch.equal(found[1], expected[1])
        assert (load_hashes(path) == load_hashes(one)).all()  # integers from the same decoded images: exact
        assert torch.equal(load_file_stats(path), load_file_stats(one))
    meta = read_index_metadata(two)
    # rank 0 wrote rows 0-4 as shards of 4 + 1, rank 1 rows 5-10 as 4 + 2, named in rank order
    assert meta["layout"] == "sharded" and [s["count"] for s in meta["shards"]] == [4, 1, 4, 2]
    assert [s["count"] for s in read_index_metadata(grown)["shards"]] == [2, 1, 3, 3, 2]  # old 2 + 1, new 3 | 3 + 2
    assert "duplicates_calibration" in meta and "duplicates_calibration" in read_index_metadata(one)
    for path in (two, grown):  # built from the shards / grown by the new shards
        index, plan = load_faiss_index(path)
        assert plan.kind == "ivf" and index.ntotal == 11
        _, ids = ann.search_index(index, load_embeddings(path)[0], 1, plan)  # nprobe = nlist: exact
        assert torch.equal(ids[:, 0], torch.arange(11))  # faiss ids are the rows
    named = {s["file"] for p in (one, two, grown) for s in (read_index_metadata(p).get("shards") or [])}
    assert {p.name for p in tmp_path.glob("*.shard.safetensors")} == named  # no stray shard
    assert not list(tmp_path.glob(".*staged*"))  # no staged main file left


@pytest.mark.slow
def test_nodes_that_list_different_images_stop_before_embedding_in_one_line(tmp_path):
    """Two nodes that do not see the same images (another folder, a local disk) would cut different lists:
    rank 0 refuses in one line before any embedding, and nothing is written."""
    root, _ = make_tree("images", tmp_path / "photos", classes=2, per_class=2, bad=0)
    other, _ = make_tree("images", tmp_path / "elsewhere", classes=2, per_class=3, bad=0)
    out = tmp_path / "pile.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--out", str(out), "--device", "cpu", "--num-workers", "0", "--image-size", "32", "--no-progress"]
    argvs = [["embed", "--images", str(folder), *common] for folder in (root, other)]
    node0, node1 = _on_two_nodes(argvs, env)
    assert node0.returncode != 0 and node1.returncode == 0  # rank 0 reports; rank 1 leaves quietly
    lines = [line for line in node0.stderr.splitlines() if "the ranks list different images" in line]
    assert len(lines) == 1 and "Traceback" not in node0.stderr.split(lines[0])[0][-2000:]
    assert not list(tmp_path.glob("*.safetensors"))  # no index, no shard
