"""plmetric.networks: the PCA initialisation of the embedding layer."""

from __future__ import annotations

import numpy as np
import torch
from tiny import tiny_model

from plmetric.networks import init_embedding_pca


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
