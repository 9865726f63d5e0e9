"""Studies that train and measure: :mod:`~plmetric.studies.similarity`, how well each similarity
estimator recovers the classes, before and after training (``plmetric similarity-study``), on
features from :mod:`~plmetric.studies.features` (a features file, or a data set embedded once and cached).

May import: every library layer below it (core, manifold, data, evaluation, config, methods,
training, retrieval); only the command line imports it. Importing this package imports none of
its modules.
"""
