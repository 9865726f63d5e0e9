"""The full passes' choices that need no training run (plmetric.training.passes)."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_config

from plmetric.data.backbones import backbone_spec
from plmetric.data.datasets import ImageDataset
from plmetric.training.passes import build_cached_images


def test_the_device_pipeline_is_never_used_for_a_backbone_that_resizes_bicubic(tmp_path) -> None:
    """The device augmentation resizes bilinear: a bicubic backbone would train on inputs that
    `embed` never produces, so `auto` streams with PIL and an explicit `cached` is refused."""
    backbone = "timm:test_efficientnet"
    assert backbone_spec(backbone).interpolation == "bicubic"  # else the check is vacuous
    dataset = ImageDataset([str(tmp_path / "a.png")], [0])
    cuda = torch.device("cuda")  # only its type is read before any image is touched
    auto = tiny_config(data__pipeline="auto", model__backbone=backbone)
    assert build_cached_images(auto, dataset, cuda) is None
    cached = tiny_config(data__pipeline="cached", model__backbone=backbone)
    with pytest.raises(ValueError, match="data.pipeline=pil"):
        build_cached_images(cached, dataset, cuda)


def test_training_passes_choose_their_runtime_from_the_option_the_data_and_the_pass_size(tmp_path) -> None:
    """train.runtime reaches the passes over images; cached features always run PyTorch (the network is the
    trained part), and under auto a pass too small to pay for an export every epoch keeps PyTorch."""
    from plmetric.data.datasets import ViewFeatureDataset
    from plmetric.training.passes import PASS_RUNTIME_MIN_IMAGES, pass_runtime

    big = ImageDataset([str(tmp_path / f"{i}.png") for i in range(PASS_RUNTIME_MIN_IMAGES)], None)
    small = ImageDataset([str(tmp_path / "a.png")], None)
    features = ViewFeatureDataset(torch.zeros(2, 3, 4), [0, 1, 2])
    for option in ("auto", "torch", "onnxruntime"):
        cfg = tiny_config(train__runtime=option)
        assert pass_runtime(cfg, big) == option
        assert pass_runtime(cfg, features) == "torch"
        assert pass_runtime(cfg, small) == ("torch" if option == "auto" else option)
        assert pass_runtime(cfg, big, count=PASS_RUNTIME_MIN_IMAGES - 1) == ("torch" if option == "auto" else option)
