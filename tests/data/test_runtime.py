"""The inference runtime (plmetric.data.runtime): onnxruntime gives PyTorch's numbers within the float32
rounding bound on real images (EfficientNet-Lite0 with its ImageNet weights, a timm test model), its
export is cached by key, and every way it cannot be used falls back to PyTorch in one line (auto) or is
one clear error (onnxruntime)."""

from __future__ import annotations

import copy
import importlib.util
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from plmetric.data import runtime as rt
from plmetric.data.backbones import build_transform, create_model

needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")


def _real_images(cub_root: Path, backbone: str, size: int, count: int = 6) -> torch.Tensor:
    """``count`` CUB photos of different species, through the backbone's eval transform."""
    transform = build_transform(backbone, image_size=size, train=False)
    folders = sorted((cub_root / "CUB_200_2011" / "images").iterdir())[:count]
    images = []
    for folder in folders:
        with Image.open(sorted(folder.iterdir())[0]) as img:
            images.append(transform(img))
    return torch.stack(images)


def test_tolerance_is_the_relative_bound_times_the_outputs_scale():
    assert rt.tolerance(torch.tensor([0.5, -0.25])) == pytest.approx(rt.RELATIVE_TOLERANCE)  # unit scale at least
    assert rt.tolerance(torch.tensor([3.0, -12.0])) == pytest.approx(12 * rt.RELATIVE_TOLERANCE)
    assert rt.tolerance(torch.empty(0)) == pytest.approx(rt.RELATIVE_TOLERANCE)


def test_torch_runtime_returns_the_module_itself_and_unknown_runtimes_are_refused():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    assert rt.inference_model(net, (3, 2, 2), "torch") is net
    assert rt.runtime_of(net) == "torch"
    with pytest.raises(ValueError, match="runtime must be one of auto, torch, onnxruntime"):
        rt.inference_model(net, (3, 2, 2), "tensorrt")


@needs_ort
@pytest.mark.parametrize(
    ("backbone", "pretrained", "size"),
    [("efficientnet_lite0", True, 224), ("timm:test_efficientnet", False, 96)],
)
def test_onnxruntime_equals_pytorch_on_real_images_within_the_float32_bound(backbone, pretrained, size, cub_root):
    torch.manual_seed(0)
    model = create_model(backbone, embedding_dim=0 if pretrained else 32, pretrained=pretrained).eval()
    images = _real_images(cub_root, backbone, size)
    runner = rt.inference_model(model, (3, size, size), "onnxruntime")
    assert isinstance(runner, rt.OrtModule) and rt.runtime_of(runner) == "onnxruntime"
    with torch.no_grad():
        expected = model(images)
        pooled = model.pooled_features(images)  # the head setting's cached features: not unit-norm
    got = runner(images)
    error, bound = float((got - expected).abs().max()), rt.tolerance(expected)
    print(f"{backbone}: max |onnxruntime - torch| = {error:.2e} (bound {bound:.1e}, probe {runner.check_error:.2e})")
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert error <= bound
    # the pooled features (scale ~10) through the same path: the bound scales with the outputs
    trunk = rt.inference_model(_Pooled(model), (3, size, size), "onnxruntime")
    assert float((trunk(images) - pooled).abs().max()) <= rt.tolerance(pooled)
    # the neighbours of the real images are the same (their cosines differ by far less than their gaps)
    assert torch.equal((expected @ expected.T).argsort(1, descending=True)[:, :2],
                       (got @ got.T).argsort(1, descending=True)[:, :2])


class _Pooled(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.pooled_features(x)


@needs_ort
def test_the_export_is_cached_by_the_weights_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("PLMETRIC_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    first = rt.inference_model(net, (3, 8, 8), "onnxruntime")
    assert first.cache_file is not None and first.cache_file.parent == tmp_path / "cache" / "onnx"
    assert first.cache_file.name == f"{rt.model_key(net, (3, 8, 8))}.onnx"
    exports = []
    monkeypatch.setattr(rt, "_export_onnx", lambda *a: exports.append(a) or pytest.fail("exported again"))
    again = rt.inference_model(net, (3, 8, 8), "onnxruntime")  # a cache hit: no export, the recorded check
    assert again.cache_file == first.cache_file and again.check_error == first.check_error and not exports
    x = torch.randn(5, 3, 8, 8)
    assert torch.equal(again(x), first(x))
    # another weight (one entry, by 1e-3), another input size: other keys
    other = copy.deepcopy(net)
    with torch.no_grad():
        other[0].weight[0, 0, 0, 0] += 1e-3
    key = rt.model_key(net, (3, 8, 8))
    assert rt.model_key(other, (3, 8, 8)) != key and rt.model_key(net, (3, 9, 9)) != key
    assert rt.model_key(copy.deepcopy(net), (3, 8, 8)) == key


@needs_ort
def test_a_damaged_cache_file_is_exported_again(tmp_path, monkeypatch):
    monkeypatch.setenv("PLMETRIC_CACHE", str(tmp_path))
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten()).eval()
    first = rt.inference_model(net, (3, 4, 4), "onnxruntime")
    first.cache_file.write_bytes(b"not an onnx model")
    again = rt.inference_model(net, (3, 4, 4), "onnxruntime")
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert float((again(x) - net(x)).abs().max()) <= rt.tolerance(net(x))
    assert again.cache_file.read_bytes() != b"not an onnx model"


@needs_ort
def test_batches_are_run_in_pieces_and_other_shapes_are_refused():
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten()).eval()
    runner = rt.inference_model(net, (3, 4, 4), "onnxruntime", cache=False)
    assert runner.cache_file is None
    x = torch.randn(2 * rt.ORT_ROWS_PER_RUN + 3, 3, 4, 4)
    with torch.no_grad():
        assert float((runner(x) - net(x)).abs().max()) <= rt.tolerance(net(x))
    assert runner(x[:0]).shape == (0, 32)
    with pytest.raises(ValueError, match=r"exported for inputs \(batch, 3, 4, 4\)"):
        runner(torch.randn(1, 3, 5, 5))
    assert rt.inference_model(runner, (3, 4, 4), "auto") is runner  # already the runtime's model


def test_without_onnxruntime_auto_falls_back_in_one_line_and_onnxruntime_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(rt, "onnxruntime_version", lambda: None)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    assert rt.inference_model(net, (3, 2, 2), "auto") is net
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "onnxruntime is not installed" in err[0] and "PyTorch" in err[0]
    with pytest.raises(rt.RuntimeUnavailableError, match="--runtime onnxruntime: onnxruntime is not installed"):
        rt.inference_model(net, (3, 2, 2), "onnxruntime")


@needs_ort
def test_a_network_that_does_not_export_or_disagrees_falls_back_in_one_line(monkeypatch, capsys):
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))

    def broken(*args):
        raise RuntimeError("Unsupported: ONNX export of operator foo\nmore lines")

    monkeypatch.setattr(rt, "_export_onnx", broken)
    assert rt.inference_model(net, (3, 2, 2), "auto", cache=False) is net
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not be run by onnxruntime (Unsupported: ONNX export of operator foo)" in err[0]
    with pytest.raises(rt.RuntimeUnavailableError, match="operator foo"):
        rt.inference_model(net, (3, 2, 2), "onnxruntime", cache=False)
    monkeypatch.undo()

    class Wrong(nn.Module):  # its trace (the first call) is not the function later calls compute
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return x.flatten(1) * (1.0 if self.calls == 1 else 2.0)

    assert rt.inference_model(Wrong(), (3, 2, 2), "auto", cache=False).__class__ is Wrong
    assert "differs from PyTorch" in capsys.readouterr().err


def test_onnxruntime_on_a_gpu_device_is_refused_and_auto_keeps_pytorch():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    assert rt.inference_model(net, (3, 2, 2), "auto", device="cuda") is net
    with pytest.raises(rt.RuntimeUnavailableError, match="runs on the CPU"):
        rt.inference_model(net, (3, 2, 2), "onnxruntime", device="cuda")


@needs_ort
def test_embed_dataset_through_onnxruntime_equals_torch(cub_root):
    from plmetric.data.datasets import load_dataset
    from plmetric.evaluation.metrics import embed_dataset

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=16, pretrained=True).eval()
    transform = build_transform("efficientnet_lite0", image_size=64, train=False)
    test = load_dataset("cub200", str(cub_root), test_transform=transform).test
    part = torch.utils.data.Subset(test, list(range(10)))
    a, la, ia = embed_dataset(model, part, batch_size=4, runtime="torch")
    b, lb, ib = embed_dataset(model, part, batch_size=4, runtime="onnxruntime", cache_model=False)
    assert torch.equal(la, lb) and torch.equal(ia, ib) and a.shape == b.shape == (10, 16)
    assert float((a - b).abs().max()) <= rt.tolerance(a)
    assert model.training is False


@needs_ort
def test_an_index_built_with_one_runtime_searches_the_same_with_the_other(cub_root, tmp_path, capsys):
    import json

    from plmetric.cli import main
    from plmetric.retrieval.index import read_index_metadata

    photos = tmp_path / "photos"
    photos.mkdir()
    for folder in sorted((cub_root / "CUB_200_2011" / "images").iterdir())[:6]:
        for image in sorted(folder.iterdir())[:2]:
            shutil.copy(image, photos / f"{folder.name[:3]}_{image.name}")
    common = ["--backbone", "efficientnet_lite0", "--image-size", "96", "--no-progress", "--num-workers", "0"]
    results = {}
    for built in ("torch", "onnxruntime"):
        index = tmp_path / f"{built}.safetensors"
        assert main(["index", str(photos), "--out", str(index), "--runtime", built, *common]) == 0
        assert read_index_metadata(index)["model"]["runtime"]["used"] == built
        for searched in ("torch", "onnxruntime"):
            out = tmp_path / f"{built}-{searched}.json"
            query = sorted(photos.iterdir())[0]
            argv = ["search", str(query), "--index", str(index), "--runtime", searched, "--top-k", "5",
                    "--out", str(tmp_path / f"{built}-{searched}.png"), "--json", str(out)]
            assert main(argv) == 0
            results[built, searched] = json.loads(out.read_text())["queries"][0]["results"]
    capsys.readouterr()
    reference = results["torch", "torch"]
    # a score is q.d of unit vectors whose entries are each within e = RELATIVE_TOLERANCE of PyTorch's:
    # |dq.d| <= ||dq|| ||d|| <= sqrt(D) e (Cauchy-Schwarz), for the query and the indexed vector: 2 sqrt(D) e
    # from PyTorch's score, twice that between two runtimes' scores
    bound = 2 * 2 * math.sqrt(1280) * rt.RELATIVE_TOLERANCE
    for key, found in results.items():
        assert max(abs(a["score"] - b["score"]) for a, b in zip(found, reference, strict=True)) <= bound, key
        for a, b in zip(found, reference, strict=True):  # the same image at each rank, unless two tie within it
            assert a["path"] == b["path"] or abs(a["score"] - b["score"]) <= bound, key
