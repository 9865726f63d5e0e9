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
