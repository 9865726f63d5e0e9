"""The one pairwise-distance function of the package.

Three ways to compute ``d_ij = ‖a_i - b_j‖``, which round differently and are kept apart on purpose:

* ``"exact"`` (default): explicit differences (``torch.cdist`` without the matrix-product
  shortcut): no cancellation, error ~ eps·‖a_i - b_j‖, and a zero (finite) gradient where two rows
  coincide. The losses and the pieces use it.
* ``"gram"``: ``‖a_i‖² + ‖b_j‖² - 2 a_i·b_j`` from one matrix product, clamped at 0 (the diagonal
  set to 0 when ``b`` is ``a``): fast, cancellation error ~ eps·(‖a_i‖² + ‖b_j‖²) in the squared
  distance. Kernel-based similarity estimates (Gaussian, STML's W_P) use it.
* ``"torch"``: ``torch.cdist``'s default (the matrix-product shortcut for large inputs), where only
  a ranking or a monitoring mean is needed.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DISTANCE_METHODS", "pairwise_distances"]

DISTANCE_METHODS = ("exact", "gram", "torch")


def pairwise_distances(
    a: Tensor,
    b: Tensor | None = None,
    *,
    squared: bool = False,
    normalize_rows: bool = False,
    method: str = "exact",
) -> Tensor:
    """Distances ``d_ij = ‖a_i - b_j‖`` (``b = a`` when None) between the rows of two matrices.

    Args:
        a: (N, d).
        b: (M, d), or None for the distances within ``a``.
        squared: return ``d_ij²`` (for ``"gram"`` the squared distances are what is computed).
        normalize_rows: divide each row by its mean, ``d_ij / mean_l d_il`` (the zero
            self-distance included when ``b`` is None), clamped below at 1e-12, as STML does.
        method: ``"exact"``, ``"gram"`` or ``"torch"`` (see the module docstring).

    Returns:
        (N, M) distances, on ``a``'s device and dtype.
    """
    same = b is None
    other = a if same else b
    if method == "gram":
        sq_a = a.pow(2).sum(dim=1)
        sq_b = sq_a if same else other.pow(2).sum(dim=1)
        distance = (sq_a.unsqueeze(1) + sq_b.unsqueeze(0) - 2.0 * (a @ other.T)).clamp_min(0)
        if same:
            distance.fill_diagonal_(0.0)
        if not squared:
            distance = distance.sqrt()
    elif method in ("exact", "torch"):
        mode = "donot_use_mm_for_euclid_dist" if method == "exact" else "use_mm_for_euclid_dist_if_necessary"
        distance = torch.cdist(a, other, compute_mode=mode)
        if squared:
            distance = distance.pow(2)
    else:
        raise ValueError(f"pairwise_distances: method must be one of {', '.join(DISTANCE_METHODS)}, got {method!r}")
    if normalize_rows:
        distance = distance / distance.mean(dim=1, keepdim=True).clamp_min(1e-12)
    return distance
