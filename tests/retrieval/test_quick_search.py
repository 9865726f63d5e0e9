"""``plmetric search`` with one query without torch (plmetric.retrieval.quick_search): on real CUB photos
it gives the PyTorch path's results (the same images, scores within the float32 bound) and the same
outputs, never imports torch, and every index it cannot answer for exactly (a tampered or unknown export
key, a missing or failed cache entry, a faiss index, another runtime, several queries) goes to the
PyTorch path, while a changed checkpoint is refused with the same message.

Bound on scores (as in tests/data/test_runtime.py): a score is q.d of unit vectors whose entries are each
within e = RELATIVE_TOLERANCE of PyTorch's; |dq.d| <= ||dq|| ||d|| <= sqrt(D) e (Cauchy-Schwarz), for
the query and the indexed vector 2 sqrt(D) e from PyTorch's score, twice that between an index built
through one runtime and searched through the other.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from plmetric.cli import main
from plmetric.core.checkpoint import save_model
from plmetric.core.runtime_cache import ONNX_KEY
from plmetric.data import runtime as rt
from plmetric.data.backbones import create_model
from plmetric.retrieval import quick_search as qs
from plmetric.retrieval.index import INDEX_KEY, IndexMismatchError, read_index_metadata, top_k

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")

DIM, SIZE, TOP_K = 24, 96, 5
BOUND = 2 * 2 * math.sqrt(DIM) * rt.RELATIVE_TOLERANCE
COMMON = ["--no-progress", "--num-workers", "0"]


@pytest.fixture(scope="module")
def built(cub_root, tmp_path_factory) -> dict[str, Path]:
    """12 CUB photos (2 of each of 6 species) indexed through onnxruntime with a checkpoint (pretrained
    Lite0 and a 24-d embedding layer, 96 px), and a photo of a 7th species as an outside query."""
    root = tmp_path_factory.mktemp("quick_search")
    photos = root / "photos"
    photos.mkdir()
    species = sorted((cub_root / "CUB_200_2011" / "images").iterdir())
    for folder in species[:6]:
        for image in sorted(folder.iterdir())[:2]:
            shutil.copy(image, photos / f"{folder.name[:3]}_{image.name}")
    outside = root / "outside.jpg"
    shutil.copy(sorted(species[6].iterdir())[0], outside)
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=DIM, pretrained=True)
    ckpt = save_model(root / "model.safetensors", model, {"backbone": "efficientnet_lite0", "embedding_dim": DIM,
                                                           "image_size": SIZE})
    index = root / "index.safetensors"
    argv = ["index", str(photos), "--checkpoint", str(ckpt), "--out", str(index), "--runtime", "auto", *COMMON]
    assert main(argv) == 0
    runtime = read_index_metadata(index)["model"]["runtime"]
    assert runtime["used"] == "onnxruntime" and ONNX_KEY.fullmatch(runtime["onnx_key"])
    return {"root": root, "photos": photos, "outside": outside, "ckpt": ckpt, "index": index}


def _search(capsys, index: Path, query: Path, out: Path, *extra: str, top_k: int = TOP_K) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = main(["search", str(query), "--index", str(index), "--top-k", str(top_k), "--out", str(out / "grid.png"),
                 "--json", str(out / "r.json"), "--csv", str(out / "r.csv"), *extra])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def _spy(monkeypatch) -> list[str]:
    """Record each query the torch-free path embeds."""
    embedded: list[str] = []
    original = qs.QuickIndex.embed

    def recording(self, image_path):
        embedded.append(str(image_path))
        return original(self, image_path)

    monkeypatch.setattr(qs.QuickIndex, "embed", recording)
    return embedded


def _same_results(fast: list[dict], slow: list[dict], top_k: int = TOP_K) -> None:
    assert len(fast) == len(slow) == top_k
    for a, b in zip(fast, slow, strict=True):
        assert abs(a["score"] - b["score"]) <= BOUND
        assert a["path"] == b["path"] or abs(a["score"] - b["score"]) <= BOUND  # the same image unless a tie
        assert a["rank"] == b["rank"] and a["missing"] == b["missing"]


@pytest.mark.parametrize("which", ["indexed", "outside"])
def test_the_torch_free_path_gives_the_torch_paths_results_and_outputs(which, built, tmp_path, capsys, monkeypatch):
    query = sorted(built["photos"].iterdir())[3] if which == "indexed" else built["outside"]
    embedded = _spy(monkeypatch)
    (tmp_path / "fast").mkdir()
    (tmp_path / "torch").mkdir()
    code, fast_lines, fast_err = _search(capsys, built["index"], query, tmp_path / "fast")
    assert code == 0 and embedded == [str(query)]
    code, torch_lines, torch_err = _search(capsys, built["index"], query, tmp_path / "torch", "--runtime", "torch")
    assert code == 0 and embedded == [str(query)]  # the torch path did not go through it
    assert fast_err == torch_err == ""

    fast, slow = (json.loads((tmp_path / d / "r.json").read_text()) for d in ("fast", "torch"))
    assert {k: v for k, v in fast.items() if k != "queries"} == {k: v for k, v in slow.items() if k != "queries"}
    assert fast["queries"][0]["query"] == slow["queries"][0]["query"] == str(query.resolve())
    _same_results(fast["queries"][0]["results"], slow["queries"][0]["results"])
    paths = [r["path"] for r in fast["queries"][0]["results"]]
    assert str(query.resolve()) not in paths  # the query's own file is left out (--include-self not given)

    fast_rows, slow_rows = (list(csv.reader((tmp_path / d / "r.csv").open())) for d in ("fast", "torch"))
    assert fast_rows[0] == slow_rows[0] == ["query", "rank", "path", "score"]
    for a, b in zip(fast_rows[1:], slow_rows[1:], strict=True):
        assert a[:2] == b[:2] and abs(float(a[3]) - float(b[3])) <= BOUND  # the paths: compared in the JSON
    # the printed lines: rank, score to 4 decimals, path; then the files written
    assert len(fast_lines) == len(torch_lines) == TOP_K + 1 and fast_lines[-1].startswith("wrote ")
    for a, b in zip(fast_lines[:-1], torch_lines[:-1], strict=True):
        (rank_a, score_a, _), (rank_b, score_b, _) = a.split(), b.split()
        assert rank_a == rank_b and abs(float(score_a) - float(score_b)) <= BOUND + 1e-4
    with Image.open(tmp_path / "fast" / "grid.png") as fast_grid, Image.open(tmp_path / "torch" / "grid.png") as grid:
        assert fast_grid.size == grid.size and fast_grid.mode == grid.mode == "RGB"


def test_include_self_and_a_moved_image_are_reported_the_same(built, tmp_path, capsys, monkeypatch):
    photos = tmp_path / "photos"
    shutil.copytree(built["photos"], photos)
    index = tmp_path / "index.safetensors"
    assert main(["index", str(photos), "--checkpoint", str(built["ckpt"]), "--out", str(index), *COMMON]) == 0
    query = sorted(photos.iterdir())[0]
    gone = sorted(photos.iterdir())[1]
    gone_path = str(gone.resolve())
    gone.rename(tmp_path / gone.name)
    embedded = _spy(monkeypatch)
    results, errors, everything = {}, {}, len(list(built["photos"].iterdir()))
    for runtime in ("auto", "torch"):
        out = tmp_path / runtime
        out.mkdir()
        code, _, errors[runtime] = _search(
            capsys, index, query, out, "--include-self", "--runtime", runtime, top_k=everything
        )
        assert code == 0
        results[runtime] = json.loads((out / "r.json").read_text())["queries"][0]["results"]
    assert embedded == [str(query)]
    _same_results(results["auto"], results["torch"], top_k=everything)
    assert results["auto"][0]["path"] == str(query.resolve())  # itself first: --include-self
    assert [r["path"] for r in results["auto"] if r["missing"]] == [gone_path]
    assert errors["auto"] == errors["torch"] and f"1 of {everything} results no longer exist" in errors["auto"]


def test_the_torch_free_path_never_imports_torch(built, tmp_path):
    """A fresh interpreter: the search's output, and whether torch (or torchvision, timm, matplotlib)
    was imported by the time it ended."""
    code = (
        "import sys\n"
        "from plmetric.cli import main\n"
        f"status = main(['search', {str(built['outside'])!r}, '--index', {str(built['index'])!r}, "
        f"'--top-k', '3', '--out', {str(tmp_path / 'g.png')!r}, '--json', {str(tmp_path / 'r.json')!r}])\n"
        "print('STATUS', status)\n"
        "print('HEAVY', sorted(m for m in ('torch', 'torchvision', 'timm', 'matplotlib') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    assert "STATUS 0" in done.stdout and "HEAVY []" in done.stdout, done.stdout + done.stderr
    assert (tmp_path / "g.png").is_file() and len(json.loads((tmp_path / "r.json").read_text())["queries"]) == 1


def _rewrite(index: Path, out: Path, change) -> Path:
    """A copy of ``index`` whose metadata ``change(meta)`` edited (tensors unchanged)."""
    from safetensors import safe_open

    with safe_open(str(index), framework="np") as handle:
        meta = json.loads(handle.metadata()[INDEX_KEY])
    change(meta)
    save_numpy(load_numpy(str(index)), str(out), metadata={INDEX_KEY: json.dumps(meta)})
    return out


def _set_key(value):
    def change(meta):
        meta["model"]["runtime"]["onnx_key"] = value

    return change


def test_an_export_the_path_cannot_trust_or_find_goes_to_the_torch_path(built, tmp_path, capsys, monkeypatch):
    key = read_index_metadata(built["index"])["model"]["runtime"]["onnx_key"]
    assert qs.open_quick_index(built["index"], runtime="auto", exact=False, queries=1) is not None
    cache = qs.cache_dir() / "onnx"
    export, record = (cache / f"{key}.onnx").read_bytes(), json.loads((cache / f"{key}.json").read_text())

    def plant(folder: Path, name: str) -> None:
        """A valid export and its check as ``<folder>/onnx/<name>.onnx`` (``name`` may climb out)."""
        target = folder / "onnx" / f"{name}.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(export)
        target.with_suffix(".json").write_text(json.dumps(record))

    # every tampered key names a valid export that exists: only the key's own check keeps it out
    monkeypatch.setenv("PLMETRIC_CACHE", str(tmp_path / "planted"))
    for name in (key, "../x", "../" + key[3:], key.upper(), key[:-1], key + "\n", "0" * 63 + "g"):
        plant(tmp_path / "planted", name)
    assert (tmp_path / "planted" / "x.onnx").is_file()

    def no_runtime(meta):
        del meta["model"]["runtime"]

    def faiss(meta):
        meta["ann"] = {"kind": "flat", "file": "i.0123456789ab.faiss", "sha256": "0" * 64, "params": {}}

    def other_size(meta):
        meta["model"]["image_size"] = 128  # the export was checked for 96 px inputs

    def other_size_consistent(meta):  # a preprocessing for 128 px: the export's check was for 96 px
        meta["model"]["image_size"] = 128
        meta["model"]["preprocessing"].update(resize_shorter_side=146, center_crop=128)

    def bad_mean(meta):
        meta["model"]["preprocessing"]["mean"] = [0.5, "x", 0.5]

    tampered = {
        "traversal": _set_key("../x"),
        "traversal_64": _set_key("../" + key[3:]),
        "upper_case": _set_key(key.upper()),
        "short": _set_key(key[:-1]),
        "newline": _set_key(key + "\n"),
        "not_hex": _set_key("0" * 63 + "g"),
        "not_a_string": _set_key(7),
        "unknown_key": _set_key("0" * 64),
        "no_runtime": no_runtime,
        "faiss": faiss,
        "other_size": other_size,
        "other_size_consistent": other_size_consistent,
        "bad_mean": bad_mean,
    }
    for name, change in tampered.items():
        index = _rewrite(built["index"], tmp_path / f"{name}.safetensors", change)
        assert qs.open_quick_index(index, runtime="auto", exact=False, queries=1) is None, name
    faiss_index = tmp_path / "faiss.safetensors"
    assert qs.open_quick_index(faiss_index, runtime="auto", exact=True, queries=1) is not None  # --exact: no faiss
    for runtime, queries in (("torch", 1), ("auto", 2)):
        assert qs.open_quick_index(built["index"], runtime=runtime, exact=False, queries=queries) is None

    # the cache entry itself: missing .onnx or .json, a failed or damaged check, a check of another shape
    monkeypatch.setenv("PLMETRIC_CACHE", str(tmp_path / "cache"))
    mine = tmp_path / "cache" / "onnx"
    plant(tmp_path / "cache", key)
    index = built["index"]
    assert qs.open_quick_index(index, runtime="auto", exact=False, queries=1) is not None
    (mine / f"{key}.json").unlink()
    assert qs.open_quick_index(index, runtime="auto", exact=False, queries=1) is None  # no .json
    for broken in ({**record, "error": 2 * record["bound"] + 1}, {**record, "error": float("nan")},
                   {**record, "input_shape": [3, 64, 64]}, {"bound": 1}, "[not json"):
        (mine / f"{key}.json").write_text(broken if isinstance(broken, str) else json.dumps(broken))
        assert qs.open_quick_index(index, runtime="auto", exact=False, queries=1) is None, broken
    (mine / f"{key}.json").write_text(json.dumps(record))
    assert qs.open_quick_index(index, runtime="auto", exact=False, queries=1) is not None
    (mine / f"{key}.onnx").write_bytes(b"not an onnx model")  # opens no session: the torch path
    quick = qs.open_quick_index(index, runtime="auto", exact=False, queries=1)
    assert quick is not None and quick.load_model() is False
    (mine / f"{key}.onnx").unlink()
    assert qs.open_quick_index(index, runtime="auto", exact=False, queries=1) is None

    # end to end: a tampered key searches through the torch path, with its results
    embedded = _spy(monkeypatch)
    monkeypatch.setenv("PLMETRIC_CACHE", str(cache.parent))
    (tmp_path / "out").mkdir()
    code, lines, _ = _search(capsys, tmp_path / "traversal.safetensors", built["outside"], tmp_path / "out")
    assert code == 0 and embedded == [] and len(lines) == TOP_K + 1


def test_a_changed_or_missing_checkpoint_is_refused_as_by_the_torch_path(built, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "model.safetensors"
    shutil.copy(built["ckpt"], ckpt)
    index = tmp_path / "index.safetensors"
    assert main(["index", str(built["photos"]), "--checkpoint", str(ckpt), "--out", str(index), *COMMON]) == 0
    torch.manual_seed(1)
    other = create_model("efficientnet_lite0", embedding_dim=DIM, pretrained=False)
    save_model(ckpt, other, {"backbone": "efficientnet_lite0", "embedding_dim": DIM, "image_size": SIZE})
    embedded = _spy(monkeypatch)
    for state in ("changed", "missing"):
        if state == "missing":
            ckpt.unlink()
        errors = {}
        for runtime in ("auto", "torch"):
            out = tmp_path / f"{state}-{runtime}"
            out.mkdir()
            code, lines, errors[runtime] = _search(capsys, index, built["outside"], out, "--runtime", runtime)
            assert code == 2 and lines == [] and not any(out.iterdir())
        assert errors["auto"] == errors["torch"] and str(ckpt) in errors["auto"], errors
        assert ("has changed since index" if state == "changed" else "no longer exists") in errors["auto"]
    assert embedded == []
    quick = qs.open_quick_index(index, runtime="auto", exact=False, queries=1)
    with pytest.raises(IndexMismatchError, match="no longer exists"):
        quick.load_model()


def test_exact_top_k_orders_like_torch():
    rng = np.random.default_rng(0)
    database = rng.normal(size=(500, 16)).astype(np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    queries = database[:3] + np.float32(0.1) * rng.normal(size=(3, 16)).astype(np.float32)
    for k in (1, 7, 500, 900):
        scores, ids = qs.exact_top_k(queries, database, k)
        expected_scores, expected_ids = top_k(torch.from_numpy(queries), torch.from_numpy(database), k)
        assert ids.dtype == np.int64 and ids.shape == tuple(expected_ids.shape) == (3, min(k, 500))
        # scores of 16 products of unit vectors: within 16 eps of each other (two summation orders)
        np.testing.assert_allclose(scores, expected_scores.numpy(), rtol=0, atol=16 * np.finfo(np.float32).eps)
        assert np.all(np.diff(scores, axis=1) <= 0)
        if k <= 7:  # the first few are far apart: the same ids; all of them: the same set
            assert np.array_equal(ids, expected_ids.numpy())
        assert all(set(a) == set(b) for a, b in zip(ids.tolist(), expected_ids.tolist(), strict=True))
    tied = np.ones((4, 2), np.float32) / np.sqrt(np.float32(2))  # equal scores: in id order
    assert qs.exact_top_k(tied[:1], tied, 3)[1].tolist() == [[0, 1, 2]]
    with pytest.raises(ValueError, match="k must be >= 1"):
        qs.exact_top_k(queries, database, 0)




def test_a_checkpoint_whose_sizes_disagree_goes_to_the_torch_path_which_names_it(built, tmp_path, capsys):
    """The torch-free path trusts a checkpoint's recorded sizes no more than load_model: a checkpoint (with
    the SHA-256 the index records) claiming embedding_dim 500000, or a layer other than its tensors', opens
    no session; the torch path refuses it in one line, before building a model (issue 30)."""
    from safetensors.torch import load_file, save_file

    from plmetric.core.checkpoint import file_sha256

    state = load_file(str(built["ckpt"]))
    recorded = read_index_metadata(built["index"])
    for name, dim in (("huge", 500_000), ("other", DIM + 1)):
        ckpt = tmp_path / f"{name}.safetensors"
        meta = {"backbone": "efficientnet_lite0", "embedding_dim": dim, "image_size": SIZE}
        save_file(state, str(ckpt), metadata={"plmetric": json.dumps(meta)})
        index = _rewrite(
            built["index"],
            tmp_path / f"index-{name}.safetensors",
            lambda m, c=ckpt: m["model"].update(checkpoint=str(c), checkpoint_sha256=file_sha256(c)),
        )
        assert read_index_metadata(index)["model"]["runtime"] == recorded["model"]["runtime"]
        quick = qs.open_quick_index(index, runtime="auto", exact=False, queries=1)
        assert quick is not None and quick.load_model() is False, name
        out = tmp_path / f"out-{name}"
        out.mkdir()
        code, lines, err = _search(capsys, index, built["outside"], out)
        assert code == 2 and lines == [] and ckpt.name in err, err
