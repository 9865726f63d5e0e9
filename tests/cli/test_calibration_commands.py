"""``plmetric index`` calibrates the duplicates threshold and records it; ``plmetric duplicates`` uses it
when ``--threshold`` is not given; a forged calibration is refused in one line (a tiny random backbone)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from plmetric.cli import main
from plmetric.core.checkpoint import save_model
from plmetric.data.backbones import create_model
from plmetric.retrieval.calibration import CALIBRATION_KEY, EDITS, model_identity, recorded_calibration
from plmetric.retrieval.index import load_embeddings, read_index_metadata, save_embeddings

SMALL = ["--image-size", "32", "--no-progress", "--num-workers", "0"]


def _images(folder: Path, count: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """12 images, a random-weight checkpoint, an index calibrated on 6 of them and one not calibrated."""
    tmp = tmp_path_factory.mktemp("calibrated")
    _images(tmp / "photos", 12)
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=8, pretrained=False)
    ckpt = save_model(
        tmp / "model.safetensors", model, {"backbone": "efficientnet_lite0", "embedding_dim": 8, "image_size": 32}
    )
    base = ["index", str(tmp / "photos"), "--checkpoint", str(ckpt), *SMALL]
    assert main([*base, "--out", str(tmp / "index.safetensors"), "--calibration-sample", "6"]) == 0
    assert main([*base, "--out", str(tmp / "plain.safetensors"), "--no-calibrate"]) == 0
    return {"tmp": tmp, "index": tmp / "index.safetensors", "plain": tmp / "plain.safetensors", "ckpt": ckpt}


def _rewrite(index: Path, out: Path, change: dict) -> Path:
    """A copy of ``index`` whose metadata calibration has the fields of ``change``."""
    embeddings, labels, paths, description = load_embeddings(index)
    record = dict(read_index_metadata(index)[CALIBRATION_KEY], **change)
    save_embeddings(out, embeddings, labels, paths, description, extra={CALIBRATION_KEY: record})
    return out


def test_index_records_its_calibration_with_the_model_identity(indexed):
    meta = read_index_metadata(indexed["index"])
    record = meta[CALIBRATION_KEY]
    assert record["sample"] == 6 and record["seed"] == 0 and record["count"] == 12
    assert record["model"] == model_identity(meta["model"])
    assert set(record["recall"]) == set(EDITS) and record["edits"] == list(EDITS)
    recorded = recorded_calibration(meta)
    assert recorded is not None and 0.70 <= recorded.threshold <= 1.0 and -1 <= recorded.hash_distance <= 64
    assert CALIBRATION_KEY not in read_index_metadata(indexed["plain"])  # --no-calibrate


def test_index_announces_and_prints_the_calibration(tmp_path, indexed, capsys):
    capsys.readouterr()
    argv = ["index", str(indexed["tmp"] / "photos"), "--checkpoint", str(indexed["ckpt"]), *SMALL]
    assert main([*argv, "--out", str(tmp_path / "i.safetensors"), "--calibration-sample", "3"]) == 0
    captured = capsys.readouterr()
    assert "calibrating the duplicates threshold: 3 images x 5 copies" in captured.err
    assert " s; --no-calibrate skips it)" in captured.err
    assert "duplicates calibration (3 copies each" in captured.out and "expected recall resize50" in captured.out


def test_duplicates_uses_the_recorded_threshold_and_threshold_overrides(indexed, capsys):
    index = _rewrite(indexed["index"], indexed["tmp"] / "strict.safetensors", {"threshold": 0.9995})
    out = indexed["tmp"] / "d.csv"
    capsys.readouterr()
    assert main(["duplicates", str(index), "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "threshold 0.9995 calibrated at index time on 6 images" in captured.err
    assert "--threshold overrides" in captured.err
    assert "by the embedding (cosine >= 0.9995)" in captured.out
    assert main(["duplicates", str(index), "--out", str(out), "--threshold", "0.75", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "calibrated at index time" not in captured.err and "by the embedding (cosine >= 0.75)" in captured.out


def test_duplicates_without_a_calibration_says_so_and_uses_the_default(indexed, capsys):
    capsys.readouterr()
    out = indexed["tmp"] / "plain.csv"
    assert main(["duplicates", str(indexed["plain"]), "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "threshold 0.82 (the library default)" in captured.err and "records no calibration" in captured.err
    assert "by the embedding (cosine >= 0.82)" in captured.out


@pytest.mark.parametrize(
    "change, field",
    [({"threshold": 7.0}, "threshold"), ({"hash_distance": "6"}, "hash_distance"), ({"model": "f" * 16}, "model")],
)
def test_a_forged_calibration_is_refused_in_one_line(indexed, capsys, change, field):
    index = _rewrite(indexed["index"], indexed["tmp"] / "forged.safetensors", change)
    capsys.readouterr()
    for extra in ([], ["--threshold", "0.9"]):  # refused even when --threshold would not use it
        assert main(["duplicates", str(index), "--out", str(indexed["tmp"] / "f.csv"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"'{CALIBRATION_KEY}' metadata is invalid: {field}" in err
    assert not (indexed["tmp"] / "f.csv").exists()


def test_add_to_keeps_the_calibration_until_the_pile_doubles(indexed, tmp_path, capsys):
    _images(tmp_path / "more", 6, seed=1)
    grown = tmp_path / "grown.safetensors"
    argv = ["index", str(tmp_path / "more"), "--add-to", str(indexed["index"]), "--out", str(grown), *SMALL]
    assert main(argv) == 0
    before = read_index_metadata(indexed["index"])[CALIBRATION_KEY]
    assert read_index_metadata(grown)[CALIBRATION_KEY] == before  # 18 <= 2 x 12 images
    _images(tmp_path / "many", 8, seed=2)
    doubled = tmp_path / "doubled.safetensors"
    argv = ["index", str(tmp_path / "many"), "--add-to", str(grown), "--out", str(doubled), *SMALL]
    capsys.readouterr()
    assert main(argv) == 0
    assert "duplicates calibration was made on 12 images, the index now holds 26" in capsys.readouterr().out
    assert CALIBRATION_KEY not in read_index_metadata(doubled)


def test_add_to_refuses_a_forged_calibration_before_embedding(indexed, tmp_path, capsys):
    forged = _rewrite(indexed["index"], tmp_path / "forged.safetensors", {"sample": -5})
    _images(tmp_path / "more", 2, seed=3)
    argv = ["index", str(tmp_path / "more"), "--add-to", str(forged), *SMALL]
    stamp = forged.stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 2
    assert "metadata is invalid: sample" in capsys.readouterr().err
    assert forged.stat().st_mtime_ns == stamp and json.dumps(read_index_metadata(forged)[CALIBRATION_KEY])
