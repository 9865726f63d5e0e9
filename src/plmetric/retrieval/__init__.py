"""Using a trained embedding: indexes and search, embedding files, export, the local web page.

:mod:`~plmetric.retrieval.index` writes self-checking indexes of a folder and searches them (exact,
or through a faiss index of :mod:`plmetric.manifold.ann`; :mod:`~plmetric.retrieval.faiss_files` removes
the faiss file an extended index no longer names; :mod:`~plmetric.retrieval.stored` maps an index's
vectors and paths without reading them and writes the sharded layout, its sizes in
:mod:`~plmetric.retrieval.shard_sizes`), :mod:`~plmetric.retrieval.quick_search` answers
one query without torch (the cached ONNX export the index names) and :mod:`~plmetric.retrieval.result_grid`
draws a search's grid with Pillow; :mod:`~plmetric.retrieval.embedding_files`
writes embeddings as ``.npy`` + paths or Parquet for other tools; :mod:`~plmetric.retrieval.export`
exports a checkpoint's image-to-embedding function to ONNX/TorchScript;
:mod:`~plmetric.retrieval.serve` is the web page over an index (``plmetric serve``; its template in
``templates/``), with its parts: :mod:`~plmetric.retrieval.served_files` (which file may be served),
:mod:`~plmetric.retrieval.group_tables` (the groups/duplicates tables it browses) and
:mod:`~plmetric.retrieval.serve_requests` (the numbers a request may give). The pile tools read an
index's embeddings: :mod:`~plmetric.retrieval.neighbours` (every image's nearest others),
:mod:`~plmetric.retrieval.duplicates` (near-duplicate groups), :mod:`~plmetric.retrieval.groups` (groups of similar images); :mod:`~plmetric.retrieval.tables` writes
and reads their CSV/Parquet tables.

May import: :mod:`plmetric.core`, :mod:`plmetric.manifold`, :mod:`plmetric.data`,
:mod:`plmetric.evaluation`, :mod:`plmetric.config`, :mod:`plmetric.methods`,
:mod:`plmetric.training`. Importing this package imports none of its modules.
"""
