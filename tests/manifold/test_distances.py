"""plmetric.manifold.distances: the one pairwise-distance function, against a float64 NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numerics import assert_within, distance_error, gram_distance_error

from plmetric.manifold.distances import pairwise_distances


def np_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))


@pytest.mark.parametrize("method", ["exact", "torch", "gram"])
def test_distances_match_numpy(method):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 5)), rng.standard_normal((4, 5))
    ref = np_distances(a, b)
    got = pairwise_distances(torch.tensor(a), torch.tensor(b), method=method)
    squared = pairwise_distances(torch.tensor(a), torch.tensor(b), squared=True, method=method)
    if method == "gram":
        # the squared distance is off by the Gram route's cancellation δ; |√x - √y| <= √|x - y|,
        # plus the square root's own rounding (u relative)
        delta = gram_distance_error(5, torch.float64, np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
        assert_within(squared, ref**2, delta + 2 * distance_error(5) * ref**2, "gram squared")
        assert_within(got, ref, np.sqrt(delta) + 2 * distance_error(5) * ref, "gram")
    else:  # explicit differences (both small inputs: torch's cdist does not switch to matrix products)
        bound = distance_error(5, torch.float64) * ref
        assert_within(got, ref, 2 * bound, method)  # ours and NumPy's, each within γ_{d+3}
        assert_within(squared, ref**2, 2 * (2 * bound * ref + bound**2) + 2 * distance_error(5) * ref**2, method)


def test_within_one_set_the_diagonal_is_zero_and_rows_can_be_normalised():
    x = torch.randn(6, 3, dtype=torch.float64)
    for method in ("exact", "gram"):
        d = pairwise_distances(x, method=method)
        assert torch.equal(torch.diagonal(d), torch.zeros(6, dtype=torch.float64)), method
    d = pairwise_distances(x)
    normalised = pairwise_distances(x, normalize_rows=True)
    torch.testing.assert_close(normalised, d / d.mean(1, keepdim=True), rtol=0, atol=0)
    with pytest.raises(ValueError, match="method must be exact, gram or torch|method must be one of"):
        pairwise_distances(x, method="manhattan")


def test_exact_distances_have_a_finite_gradient_at_coincident_points():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    pairwise_distances(x).sum().backward()
    assert torch.isfinite(x.grad).all()
