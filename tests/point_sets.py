"""Point sets with known answers: clusters on the sphere, crossing lines (similarity tests), planted
near-duplicates and their noisy copies (search indexes)."""

from __future__ import annotations

import math

import torch


def sphere_clusters(n_per: int = 30, classes: int = 3, d: int = 8, spread: float = 0.05, seed: int = 0):
    """Tight clusters around orthogonal unit vectors, projected back onto the unit sphere."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(d, dtype=torch.float64)[:classes]
    x = centres.repeat_interleave(n_per, 0) + spread * torch.randn(classes * n_per, d, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=1), torch.arange(classes).repeat_interleave(n_per)


def crossing_lines(n: int = 40, angle_deg: float = 60.0, d: int = 3, noise: float = 0.005, seed: int = 0):
    """Two classes, each a segment through the origin; they cross at 60 degrees."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(-1, 1, n, dtype=torch.float64)
    a = torch.zeros(d, dtype=torch.float64)
    b = torch.zeros(d, dtype=torch.float64)
    a[0] = 1.0
    b[0], b[1] = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    x = torch.cat([t[:, None] * a, t[:, None] * b]) + noise * torch.randn(2 * n, d, generator=g, dtype=torch.float64)
    return x, torch.arange(2).repeat_interleave(n)


def planted_duplicates(n: int = 5000, d: int = 64, group: int = 10, noise: float = 0.75, seed: int = 0):
    """Unit vectors in groups of ``group`` near-duplicates around random centres (``noise``: the
    norm of each member's offset), so that a point's nearest neighbours are its group: (n, d) float32."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(-(-n // group), d, generator=g), dim=1)
    x = centres.repeat_interleave(group, 0)[:n] + noise / math.sqrt(d) * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def noisy_copies(x: torch.Tensor, count: int, noise: float = 0.3, seed: int = 1):
    """``count`` unit queries, each a noisy copy of a distinct random row of ``x``: (queries, sources)."""
    g = torch.Generator().manual_seed(seed)
    sources = torch.randperm(len(x), generator=g)[:count]
    q = x[sources] + noise / math.sqrt(x.shape[1]) * torch.randn(count, x.shape[1], generator=g)
    return torch.nn.functional.normalize(q, dim=1), sources
