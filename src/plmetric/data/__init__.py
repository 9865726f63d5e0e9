"""Images in, tensors out: data set layouts, backbones and preprocessing, the decode-once pipeline.

:mod:`~plmetric.data.images` is the one image decoder (upright 8-bit RGB, one pixel limit, regular
files only); :mod:`~plmetric.data.datasets` reads CUB-200-2011, Cars-196, SOP, labelled and unlabelled folders
(and cached feature sets) and walks folders safely; :mod:`~plmetric.data.backbones` builds the pretrained backbones (one
module per family, as timm has) with their transforms and stages, the embedding model, and rebuilds
a model from a checkpoint;
:mod:`~plmetric.data.pipeline` decodes each image once into a uint8 cache
(:mod:`~plmetric.data.image_cache`) and augments on the device;
:mod:`~plmetric.data.preprocess` is the eval transform with Pillow and NumPy alone (the same numbers,
no torch: one search query in about a second); :mod:`~plmetric.data.runtime` runs every forward pass
without gradient through onnxruntime on a CPU (exported once, cached, checked against PyTorch).

May import: :mod:`plmetric.core`, :mod:`plmetric.manifold`. Importing this package imports none
of its modules.
"""
