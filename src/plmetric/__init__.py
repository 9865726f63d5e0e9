"""plmetric: unsupervised deep metric learning with piecewise-linear manifolds."""

__version__ = "0.1.0"
