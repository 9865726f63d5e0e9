"""plmetric.training.networks: the PCA initialisation of the embedding layer."""

from __future__ import annotations

import numpy as np
import torch
from tiny import tiny_model

from plmetric.training.networks import init_embedding_pca


def test_pca_initialisation_is_the_projection_on_principal_axes():
    torch.manual_seed(0)
    model = tiny_model(embedding_dim=4)
    feats = torch.randn(200, 24) @ torch.diag(torch.linspace(3, 0.1, 24))
    init_embedding_pca(model, feats)
    w, b = model.embedding.weight.detach().double(), model.embedding.bias.detach().double()
    x = feats.double().numpy()
    xc = x - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    projected = (torch.from_numpy(x) @ w.T + b).numpy()
    reference = xc @ vt[:4].T
    # same subspace and per-axis agreement up to sign
    np.testing.assert_allclose(np.abs(projected), np.abs(reference), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(w @ w.T, np.eye(4), atol=1e-5)


def test_split_backbone_and_tail_model_reproduce_the_network():
    from plmetric.data.backbones import create_model
    from plmetric.training.networks import backbone_stages, split_backbone, tail_model

    model = create_model("efficientnet_lite0", embedding_dim=16, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    for frozen in (0, 6, len(backbone_stages(model.backbone))):
        prefix, tail = split_backbone(model, frozen)
        assert torch.equal(tail(prefix(x)), model.backbone(x)), frozen  # the same modules in the same order
    prefix, _ = split_backbone(model, 6)
    tail = tail_model(model, 6).eval()
    assert torch.equal(tail(prefix(x)), model(x)) and tail.embedding is model.embedding
    assert not set(map(id, prefix.parameters())) & set(map(id, tail.parameters()))
    import pytest

    with pytest.raises(ValueError, match="frozen must lie in"):
        split_backbone(model, 99)
