"""How good an embedding is: retrieval metrics with labels, similarity estimators, label-free criteria.

:mod:`~plmetric.evaluation.metrics` holds the exact retrieval metrics (Recall@K, MAP@R, R-precision,
NMI) and the embedding pass they run on; :mod:`~plmetric.evaluation.estimators` the similarity
estimators (PLM's and its competitors', e.g. STML's contextual similarity, which the STML method
trains with) and their quality measures; :mod:`~plmetric.evaluation.selection` the label-free
criteria that pick the epoch a run keeps. The similarity *study*, which trains, sits above the
training layer (:mod:`plmetric.studies`).

May import: :mod:`plmetric.core`, :mod:`plmetric.manifold`, :mod:`plmetric.data`. The metrics are
re-exported for users (``from plmetric.evaluation import evaluate``).
"""

from plmetric.evaluation.metrics import (
    nearest_neighbors,
    recall_at_k,
    map_at_r,
    r_precision,
    nmi,
    evaluate,
    embed_dataset,
)

__all__ = [
    "nearest_neighbors",
    "recall_at_k",
    "map_at_r",
    "r_precision",
    "nmi",
    "evaluate",
    "embed_dataset",
]
