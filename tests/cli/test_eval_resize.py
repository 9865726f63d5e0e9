"""The eval rule travels with the model (issue 27): ``train --set data.eval_resize=whole`` records
``eval_resize`` in its checkpoint, and ``index``, ``search`` (PyTorch and torch-free) and ``eval`` embed
with the checkpoint's rule; a checkpoint without the field is a centre-crop one (old checkpoints give
the same results); a forged rule in a checkpoint or an index is one line, exit 2, nothing written.

Bounds: an index built ``--runtime torch`` runs the same PyTorch model on the same inputs as the test
(another batch size only): its rows equal the test's within a few float32 ulps of unit-norm entries
(1e-5, as tests/retrieval/test_export.py's TorchScript bound). The two rules' embeddings of the same
wide photo differ by far more (checked), so an index or query embedded with the wrong rule fails.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from plmetric.cli import main
from plmetric.core.checkpoint import read_metadata
from plmetric.data.backbones import build_transform, load_model
from plmetric.retrieval.index import INDEX_KEY, load_embeddings, preprocessing, read_index_metadata

SIZE = 32
SAME = 1e-5  # the bound above
COMMON = ["--no-progress", "--num-workers", "0"]


def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in out + err, (code, err)
    return lines[0]


def _with_metadata(source: Path, target: Path, change: dict) -> Path:
    """A copy of checkpoint ``source`` whose metadata has ``change`` (a value None: the field removed)."""
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
    meta = json.loads(metadata["plmetric"])
    for key, value in change.items():
        meta.pop(key, None) if value is None else meta.__setitem__(key, value)
    metadata["plmetric"] = json.dumps(meta)
    save_file(load_file(str(source)), str(target), metadata=metadata)
    return target


def _with_index_model(source: Path, target: Path, change: dict) -> Path:
    """A copy of one-file index ``source`` whose recorded model has ``change``."""
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
    meta = json.loads(metadata[INDEX_KEY])
    meta["model"].update(change)
    metadata[INDEX_KEY] = json.dumps(meta)
    save_file(load_file(str(source)), str(target), metadata=metadata)
    return target


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """12 wide photos (64 x 32, each half its own colour: the centre crop cuts both ends off), a run
    trained on them with ``data.eval_resize=whole`` (method none: the start model, 32 px), and the same
    checkpoint without the field (an old one)."""
    root = tmp_path_factory.mktemp("eval_resize")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        halves = [np.broadcast_to(rng.integers(0, 256, 3), (32, 32, 3)) for _ in range(2)]
        pixels = np.concatenate(halves, axis=1) + rng.normal(0, 25, (32, 64, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(photos / f"p{i:02d}.png")
    small = ["data.eval_resize=whole", f"data.image_size={SIZE}", "data.num_workers=0", "train.device=cpu"]
    small.append("model.embedding_dim=16")
    run = root / "run"
    argv = ["train", "--images", str(photos), "--out", str(run), "--no-progress", "--method", "none"]
    assert main([*argv, *[f"--set={s}" for s in small]]) == 0
    ckpt = run / "model.safetensors"
    old = _with_metadata(ckpt, root / "old.safetensors", {"eval_resize": None})
    return {"root": root, "photos": photos, "ckpt": ckpt, "old": old}


def _embed(ckpt: Path, photos: list[str], eval_resize: str) -> torch.Tensor:
    """The checkpoint's embeddings of ``photos`` with the eval rule ``eval_resize``, computed here."""
    model, _ = load_model(ckpt)
    transform = build_transform("efficientnet_lite0", image_size=SIZE, eval_resize=eval_resize)
    batch = []
    for path in photos:
        with Image.open(path) as img:
            batch.append(transform(img))
    with torch.no_grad():
        return model(torch.stack(batch))


def _index(ws, ckpt: Path, name: str, *extra: str) -> Path:
    out = ws["root"] / name
    if not out.exists():
        argv = ["index", str(ws["photos"]), "--checkpoint", str(ckpt), "--out", str(out), "--no-calibrate"]
        assert main([*argv, *COMMON, *extra]) == 0
    return out


def test_the_trained_checkpoint_records_its_rule_and_index_embeds_with_it(ws):
    meta = read_metadata(ws["ckpt"])
    assert meta["eval_resize"] == "whole" and meta["config"]["data"]["eval_resize"] == "whole"
    index = _index(ws, ws["ckpt"], "whole_torch.safetensors", "--runtime", "torch")
    model = read_index_metadata(index)["model"]
    assert model["eval_resize"] == "whole"
    assert model["preprocessing"] == preprocessing("efficientnet_lite0", SIZE, "whole")
    embeddings, _, paths, _ = load_embeddings(index)
    whole, crop = _embed(ws["ckpt"], paths, "whole"), _embed(ws["ckpt"], paths, "center_crop")
    assert float((embeddings - whole).abs().max()) <= SAME
    apart = float((whole - crop).abs().max(dim=1).values.min())
    print(f"whole vs crop embeddings of the same photo: at least {apart:.3f} apart")
    assert apart > 100 * SAME  # the wrong rule would fail the line above


def test_an_old_checkpoint_without_the_field_embeds_with_the_centre_crop(ws):
    assert "eval_resize" not in read_metadata(ws["old"])
    index = _index(ws, ws["old"], "old_index.safetensors", "--runtime", "torch")
    model = read_index_metadata(index)["model"]
    assert model["eval_resize"] == "center_crop"
    assert model["preprocessing"] == preprocessing("efficientnet_lite0", SIZE)  # today's fields exactly
    assert "resize" not in model["preprocessing"] and model["preprocessing"]["center_crop"] == SIZE
    embeddings, _, paths, _ = load_embeddings(index)
    assert float((embeddings - _embed(ws["old"], paths, "center_crop")).abs().max()) <= SAME


@pytest.mark.parametrize("runtime", ["torch", "auto"])
def test_search_embeds_the_query_with_the_indexs_rule(ws, runtime, tmp_path, monkeypatch):
    """A photo searched in the index of its own folder finds itself with score 1: the query went through
    the index's (the checkpoint's) rule, on the PyTorch path and on the torch-free one (an index built
    through onnxruntime names its cached export; then one query goes through
    :mod:`plmetric.retrieval.quick_search`, checked by a spy)."""
    from plmetric.data import runtime as rt
    from plmetric.retrieval import quick_search as qs

    if runtime == "auto" and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime not installed")
    index = _index(ws, ws["ckpt"], f"whole_{runtime}.safetensors", "--runtime", runtime)
    embedded: list[str] = []
    original = qs.QuickIndex.embed
    monkeypatch.setattr(qs.QuickIndex, "embed", lambda self, p: embedded.append(str(p)) or original(self, p))
    query = sorted(ws["photos"].iterdir())[5]
    out = tmp_path / "r.json"
    argv = ["search", str(query), "--index", str(index), "--top-k", "3", "--include-self", "--json", str(out)]
    assert main([*argv, "--runtime", runtime]) == 0
    assert embedded == ([str(query)] if runtime == "auto" else [])
    top = json.loads(out.read_text())["queries"][0]["results"][0]
    # onnxruntime: each entry within RELATIVE_TOLERANCE of PyTorch's, the score of two such unit vectors
    # within 2 sqrt(D) of it (tests/retrieval/test_quick_search.py's bound); PyTorch alone: SAME
    bound = 2 * math.sqrt(16) * rt.RELATIVE_TOLERANCE if runtime == "auto" else SAME
    assert top["path"] == str(query.resolve()) and top["score"] >= 1 - bound
    whole, crop = _embed(ws["ckpt"], [str(query)], "whole"), _embed(ws["ckpt"], [str(query)], "center_crop")
    assert float((whole * crop).sum()) < 1 - 10 * bound  # a query cropped would not score 1


def test_a_forged_rule_in_a_checkpoint_is_one_line_and_nothing_is_written(ws, capsys):
    forged = _with_metadata(ws["ckpt"], ws["root"] / "forged.safetensors", {"eval_resize": "stretch"})
    out = ws["root"] / "forged_index.safetensors"
    line = _one_line_error(capsys, ["index", str(ws["photos"]), "--checkpoint", str(forged), "--out", str(out)])
    assert "forged.safetensors" in line and "'eval_resize' must be center_crop or whole, got 'stretch'" in line
    assert not out.exists()
    line = _one_line_error(capsys, ["export", "--format", "torchscript", str(forged), "--out", str(out) + ".pt"])
    assert "'eval_resize' must be center_crop or whole" in line and not Path(str(out) + ".pt").exists()


def test_an_index_whose_rule_is_not_its_checkpoints_or_its_preprocessings_is_one_line(ws, capsys):
    index = _index(ws, ws["ckpt"], "whole_torch.safetensors", "--runtime", "torch")
    query = str(sorted(ws["photos"].iterdir())[0])
    crop_record = preprocessing("efficientnet_lite0", SIZE)
    cases = {
        # the model says the crop, its preprocessing the whole image
        "disagrees": ({"eval_resize": "center_crop"}, "'preprocessing' resizes 'whole', but its 'eval_resize' is"),
        # both say the crop, but the checkpoint (the same file, its SHA-256 checked) was made with whole
        "not_the_checkpoints": (
            {"eval_resize": "center_crop", "preprocessing": crop_record},
            "its model records eval_resize 'center_crop', but checkpoint",
        ),
        "unknown": ({"eval_resize": 7}, "'eval_resize' must be center_crop or whole, got 7"),
    }
    for name, (change, message) in cases.items():
        forged = _with_index_model(index, ws["root"] / f"index_{name}.safetensors", change)
        before = forged.read_bytes()
        for runtime in ("torch", "auto"):  # the torch-free path leaves it to the PyTorch path, which refuses
            line = _one_line_error(capsys, ["search", query, "--index", str(forged), "--runtime", runtime])
            assert message in line and str(forged) in line, (name, line)
        assert forged.read_bytes() == before


def test_eval_of_a_whole_checkpoint_uses_its_rule(ws, monkeypatch):
    """``plmetric eval --checkpoint`` builds the test transform with the checkpoint's rule (a spy on
    ``build_transform``, which the command imports when it runs)."""
    import plmetric.data.backbones as backbones

    built: list[str] = []
    real = backbones.build_transform

    def spy(*args, **kwargs):
        built.append(kwargs.get("eval_resize", "center_crop"))
        return real(*args, **kwargs)

    monkeypatch.setattr(backbones, "build_transform", spy)
    for ckpt, rule in ((ws["ckpt"], "whole"), (ws["old"], "center_crop")):
        built.clear()
        argv = ["eval", "--dataset", "digits", "--checkpoint", str(ckpt), "--runtime", "torch", *COMMON]
        assert main(argv) == 0
        assert built == [rule]


def test_a_bad_eval_resize_setting_is_one_line(ws, capsys):
    run = ws["root"] / "bad_run"
    argv = ["train", "--images", str(ws["photos"]), "--out", str(run), "--set", "data.eval_resize=stretch"]
    line = _one_line_error(capsys, argv)
    assert "data.eval_resize must be center_crop or whole, got 'stretch'" in line and not run.exists()


def test_serve_embeds_uploads_with_the_indexs_rule(ws):
    """``plmetric serve``'s browser prepares an upload with the index's (the checkpoint's) rule."""
    from plmetric.retrieval.serve import Browser

    whole = _index(ws, ws["ckpt"], "whole_torch.safetensors", "--runtime", "torch")
    old = _index(ws, ws["old"], "old_index.safetensors", "--runtime", "torch")
    with Image.open(sorted(ws["photos"].iterdir())[0]) as img:
        img.load()
    for index, rule in ((whole, "whole"), (old, "center_crop")):
        expected = build_transform("efficientnet_lite0", image_size=SIZE, eval_resize=rule)(img)
        assert torch.equal(Browser(index, 3, runtime="torch").transform(img), expected)
