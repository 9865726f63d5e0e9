"""Any timm model as ``timm:NAME``: the name checked against timm's registry, its `BackboneSpec` from timm's
pretrained config, `TimmTrunk` (the model's own pooled features, its stages for ``model.frozen_stages``),
its weights files in timm's names, and its pretrained weights from the Hugging Face cache (or one quick
download attempt; none with HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import timm
import torch
from torch import Tensor, nn

from plmetric.core.validation import shown
from plmetric.data.backbones.specs import (
    BACKBONE_CHOICES,
    INTERPOLATIONS,
    TIMM_PREFIX,
    BackboneSpec,
    WeightsUnavailableError,
)
from plmetric.data.backbones.weights import StateDict, first_line, match_keys


def timm_model_name(name: str, where: str = "backbone") -> str:
    """The timm model name of ``timm:NAME``, checked against timm's registry.

    A plain architecture must satisfy ``timm.is_model``; one with a pretrained tag (``arch.tag``)
    must be listed by ``timm.list_pretrained`` (``is_model`` ignores the tag).
    """
    model_name = name[len(TIMM_PREFIX) :]
    known = timm.is_model(model_name) and ("." not in model_name or model_name in timm.list_pretrained(model_name))
    if not model_name or not known:
        raise ValueError(
            f"{where} {shown(name)}: timm knows no model {shown(model_name)} (timm.list_models() and "
            f"timm.list_pretrained() list them); expected {BACKBONE_CHOICES}"
        )
    return model_name


def create_timm(model_name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, num_classes=0)``, with ``dynamic_img_size=True`` where accepted."""
    extra = {"dynamic_img_size": True} if _timm_accepts_dynamic_size(model_name) else {}
    return timm.create_model(model_name, pretrained=pretrained, num_classes=0, **extra, **kwargs)


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
def timm_spec(name: str) -> BackboneSpec:
    """The `BackboneSpec` of ``timm:NAME`` from the model (``num_features``) and timm's pretrained
    config (``resolve_data_config``: input size, mean/std, interpolation), built on the meta device."""
    model_name = timm_model_name(name)
    extra = {"dynamic_img_size": True} if _timm_accepts_dynamic_size(model_name) else {}
    model = _shape_only_timm(model_name, num_classes=0, **extra)
    config = timm.data.resolve_data_config({}, model=model)
    channels, height, width = config["input_size"]
    mean, std = tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"])
    if channels != 3 or len(mean) != 3 or len(std) != 3:
        raise ValueError(f"backbone {name!r} takes {channels}-channel input; plmetric feeds RGB images (3 channels)")
    interpolation = config.get("interpolation", "bicubic")
    interpolation = interpolation if interpolation in INTERPOLATIONS else "bicubic"  # timm's "random": train only
    return BackboneSpec(name, int(model.num_features), mean, std, int(max(height, width)), interpolation)


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


def match_timm_state_dict(state: StateDict, target: Mapping[str, Tensor], backbone: str, origin: str) -> StateDict:
    """``state`` in timm's own names (without `TimmTrunk`'s ``model.``, or with it) matched to the keys
    of ``target``; the classifier named by the model's pretrained config is dropped."""
    if not all(k.startswith("model.") for k in state):
        state = {"model." + k: v for k, v in state.items()}
    heads = tuple(f"model.{c}." for c in _timm_spec_classifier(backbone))
    return match_keys(state, target, heads, backbone, origin)


def timm_trunk(name: str) -> TimmTrunk:
    """The `TimmTrunk` of ``timm:NAME`` with random weights."""
    model_name = timm_model_name(name)
    return TimmTrunk(create_timm(model_name, pretrained=False), model_name)


@functools.lru_cache(maxsize=64)
def _timm_spec_classifier(backbone: str) -> tuple[str, ...]:
    """Names of the classifier modules of ``timm:NAME`` (its pretrained config's ``classifier``)."""
    classifier = _shape_only_timm(timm_model_name(backbone)).pretrained_cfg.get("classifier")
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    return names or ("head", "fc", "classifier")


def timm_filtered(state: StateDict, trunk: TimmTrunk) -> StateDict:
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


_UNAVAILABLE_ADVICE = (
    "they must be downloaded once, on a machine with network (timm stores them in the Hugging Face cache, "
    "HF_HOME), or given as a local file (train: --set model.weights=FILE; eval/embed/index: --weights FILE)"
)
#: Seconds the one look at the Hugging Face Hub may wait for an answer (HF_HUB_ETAG_TIMEOUT overrides).
_HUB_PROBE_TIMEOUT = 5.0


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now, or was when huggingface_hub was imported."""
    import huggingface_hub

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    truthy = {"1", "ON", "YES", "TRUE"}
    return huggingface_hub.constants.HF_HUB_OFFLINE or any((v or "").upper() in truthy for v in flags)


def _hub_weight_files(cfg: Any) -> tuple[str, ...]:
    """The files of a timm model's Hugging Face repository its weights are read from, in timm's order
    (``timm.models._hub.load_state_dict_from_hf``: a ``.safetensors`` twin of a ``.bin`` first)."""
    name = cfg.hf_hub_filename or "pytorch_model.bin"
    if cfg.custom_load or not name.endswith(".bin"):
        return (name,)
    twins = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
    return (twins.get(name, name.removesuffix(".bin") + ".safetensors"), name)


def _timm_weights_source(model_name: str) -> dict[str, Any]:
    """Where timm should read ``model_name``'s pretrained weights: ``{"file": PATH}`` when the Hugging
    Face cache holds them (no network at all), else ``{}`` (timm downloads them) once one quick look
    at the Hub (no retries) has answered.

    Raises:
        WeightsUnavailableError: not cached and HF_HUB_OFFLINE is set, or the Hub cannot be reached.
    """
    import huggingface_hub

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or not cfg.hf_hub_id or cfg.file or cfg.state_dict:
        return {}  # weights from a URL (the torch hub cache; one attempt) or a file timm is given
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    files = _hub_weight_files(cfg)
    for name in () if cfg.custom_load else files:  # a custom loader reads what timm downloads itself
        cached = huggingface_hub.try_to_load_from_cache(repo_id, name, revision=revision or None)
        if isinstance(cached, str):
            return {"file": cached}
    if _hub_offline():
        raise WeightsUnavailableError(
            f"pretrained weights of backbone {TIMM_PREFIX + model_name!r} are not in the Hugging Face cache "
            f"({huggingface_hub.constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: {_UNAVAILABLE_ADVICE}"
        )
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or _HUB_PROBE_TIMEOUT)
    for name in files:
        url = huggingface_hub.hf_hub_url(repo_id, name, revision=revision or None)
        try:
            huggingface_hub.get_hf_file_metadata(url, timeout=timeout)  # one request, no retries
        except huggingface_hub.errors.RemoteEntryNotFoundError:
            continue  # the Hub answered: not this file name
        except Exception as exc:  # no network, refused, timed out, a proxy's error page
            raise WeightsUnavailableError(
                f"pretrained weights of backbone {TIMM_PREFIX + model_name!r} are unavailable: the Hugging Face Hub "
                f"did not answer ({type(exc).__name__}: {first_line(exc)}): {_UNAVAILABLE_ADVICE}"
            ) from exc
        break
    return {}


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub's log lines (retry notices) off for a block: errors reach the user as one line."""
    hub_logger = logging.getLogger("huggingface_hub")
    previous = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(previous)


def pretrained_timm_trunk(backbone: str) -> TimmTrunk:
    """``timm:NAME`` with its pretrained weights: from the Hugging Face cache when it holds them, else
    downloaded by timm on first use (after one quick look at the Hub, see `_timm_weights_source`).

    Raises:
        WeightsUnavailableError: the weights could not be obtained (no network, no such file upstream).
    """
    model_name = timm_model_name(backbone)
    try:
        with _quiet_hub():
            source = _timm_weights_source(model_name)
            model = create_timm(model_name, pretrained=True, pretrained_cfg_overlay=source)
    except WeightsUnavailableError:
        raise
    except Exception as exc:  # huggingface_hub/httpx/urllib errors share no base class
        raise WeightsUnavailableError(
            f"pretrained weights of backbone {backbone!r} are unavailable ({type(exc).__name__}: {first_line(exc)}): "
            f"{_UNAVAILABLE_ADVICE}"
        ) from exc
    return TimmTrunk(model, model_name)
