"""ResNet-50: torchvision's network as a trunk, its ImageNet weights and the keys of its classifier."""

from __future__ import annotations

import torchvision.models as tvm
from torch import Tensor
from torchvision.models.resnet import Bottleneck

RESNET50_HEADS = ("fc.",)  # the classifier's keys, dropped from a weights file for the trunk
# the classic weights used by the metric-learning literature, downloaded through the torch hub cache
RESNET50_WEIGHTS = tvm.ResNet50_Weights.IMAGENET1K_V1


class ResNet50Trunk(tvm.ResNet):
    """torchvision ResNet-50 up to ``layer4``; returns the ``(B, 2048, h, w)`` feature map."""

    def __init__(self) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3])
        del self.avgpool, self.fc

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, 3, H, W)`` ImageNet-normalised images to the ``(B, 2048, h, w)`` feature map."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
