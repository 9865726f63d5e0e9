"""The geometry of an embedding space: distances, nearest neighbours, linear pieces, similarities.

:mod:`~plmetric.manifold.distances` holds the one pairwise-distance function;
:mod:`~plmetric.manifold.pieces` PLM's piecewise-linear approximation of the data manifold (the
pieces, their point and proxy similarities, all batched); :mod:`~plmetric.manifold.ann` exact and
faiss nearest-neighbour indexes (the only module that imports faiss, an optional extra).

May import: :mod:`plmetric.core`. The names below are re-exported for users
(``from plmetric.manifold import plm_similarity``).
"""

from plmetric.manifold.pieces import (
    Pieces,
    Proxies,
    directional_similarity,
    fit_pieces,
    orthogonal_and_parallel,
    orthonormal_columns,
    piece_purity,
    plm_similarity,
    plm_similarity_and_pieces,
    point_similarity,
    proxy_point_similarity,
    similarity_correlation,
    symmetrize_similarity,
)

__all__ = [
    "Pieces",
    "Proxies",
    "directional_similarity",
    "fit_pieces",
    "orthogonal_and_parallel",
    "orthonormal_columns",
    "piece_purity",
    "plm_similarity",
    "plm_similarity_and_pieces",
    "point_similarity",
    "proxy_point_similarity",
    "similarity_correlation",
    "symmetrize_similarity",
]
