"""plmetric: unsupervised deep metric learning with piecewise-linear manifolds.

The package is layered; each subpackage imports only from the ones listed before it
(``tests/test_architecture.py`` checks it):

1. :mod:`plmetric.core`: validation, options and the method registry, devices, DDP, checkpoint I/O
2. :mod:`plmetric.manifold`: distances, nearest neighbours, linear pieces and similarities
3. :mod:`plmetric.data`: data set layouts, backbones and preprocessing, the decode-once pipeline
4. :mod:`plmetric.evaluation`: retrieval metrics, similarity estimators, label-free selection
5. :mod:`plmetric.config`: the run configuration and its presets
6. :mod:`plmetric.methods`: one module per training method, with its loss terms
7. :mod:`plmetric.training`: the loop, passes, run folder, optimiser, networks, sampling
8. :mod:`plmetric.retrieval`: index and search, embedding files, export, the web page
9. :mod:`plmetric.studies`: the similarity study (it trains)
10. :mod:`plmetric.cli`: the command line, one module per command (imported by nobody)
"""

__version__ = "0.1.0"
