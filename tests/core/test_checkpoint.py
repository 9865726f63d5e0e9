"""Checkpoints: safetensors round trip, metadata, atomic writes, refusal of foreign files."""

from __future__ import annotations

import os

import pytest
import torch

from plmetric.core.checkpoint import atomic_write_json, read_metadata, save_model
from plmetric.data.backbones import load_model
from plmetric.data.backbones import create_model


def test_round_trip_gives_the_same_embeddings(tmp_path):
    model = create_model("efficientnet_lite0", embedding_dim=8, pretrained=False).eval()
    path = save_model(
        tmp_path / "m.safetensors", model, {"backbone": "efficientnet_lite0", "embedding_dim": 8, "image_size": 64}
    )
    loaded, meta = load_model(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert meta["image_size"] == 64 and meta["format_version"] == 1
    assert (tmp_path / "m.json").is_file()
    assert read_metadata(path)["backbone"] == "efficientnet_lite0"


def test_foreign_or_missing_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_model(tmp_path / "nothing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_model(bad)
    with pytest.raises(ValueError, match=".safetensors"):
        save_model(tmp_path / "m.pt", torch.nn.Linear(2, 2), {"backbone": "x", "embedding_dim": 2})


def test_mismatched_weights_are_named(tmp_path):
    model = create_model("efficientnet_lite0", embedding_dim=8, pretrained=False)
    path = save_model(tmp_path / "m.safetensors", model, {"backbone": "efficientnet_lite0", "embedding_dim": 16})
    with pytest.raises(ValueError, match="does not match|size mismatch"):
        load_model(path)


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"a": 2})
    assert path.read_text().strip().endswith("}") and '"a": 1' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
