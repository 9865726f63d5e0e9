"""GoogLeNet (Inception v1, the paper's backbone): torchvision's network as a trunk, its ImageNet weights
and the keys of its classifier heads."""

from __future__ import annotations

import torchvision.models as tvm
from torch import Tensor

GOOGLENET_HEADS = ("fc.", "aux1.", "aux2.")  # the classifier's keys, dropped from a weights file for the trunk
GOOGLENET_WEIGHTS = tvm.GoogLeNet_Weights.IMAGENET1K_V1  # downloaded through the torch hub cache


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
