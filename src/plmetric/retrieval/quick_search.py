"""One query through an index without importing torch: the cached ONNX export, NumPy and Pillow.

``plmetric search`` with one query spent most of its ~14 s importing torch, torchvision and timm and
rebuilding the model. When ``plmetric index`` ran the network through onnxruntime it recorded the key
of the cached export (``model.runtime.onnx_key``, :mod:`plmetric.data.runtime`); this module finds
that export and embeds the query with it, preprocessed by :mod:`plmetric.data.preprocess` (the eval
transform's numbers bit for bit), and searches exactly with NumPy: the same results as the PyTorch
path within float32 rounding, in about a second.

It is used only when it gives the same answer; :func:`open_quick_index` returns None (and the
PyTorch path runs, unchanged) unless all of these hold:

* ``--runtime`` is ``auto`` or ``onnxruntime`` and onnxruntime is installed; one query;
* the index is well formed (the checks of :func:`plmetric.retrieval.index.load_embeddings`: embeddings
  ``N x d`` float32, labels ``N``, ``N`` paths, a model description with a valid image size and
  preprocessing) and is searched exactly (no faiss file, or ``--exact``);
* it records an ``onnx_key`` of exactly 64 lowercase hex digits (the index is untrusted input: the
  key names a file inside the cache folder, nothing else) whose ``.onnx`` and ``.json`` are in the cache
  (:func:`cache_dir`), with the export's check against PyTorch passed and the input shape of the
  index's image size, and a session that takes ``(batch, 3, S, S)`` and gives ``(batch, d)``.

The model is checked as the PyTorch path checks it (:func:`check_same_file`, SHA-256 with
``hashlib``): a changed or missing checkpoint (or weights file) is refused with the same
:class:`IndexMismatchError`. The export's key was computed, when the index was built, from the
weights of that checkpoint; an index that names the key of another cached export only gets wrong
results, as one with wrong embeddings would (the cache holds plmetric's own checked exports only).

It imports the standard library, NumPy, Pillow, safetensors (its NumPy framework), onnxruntime and
torch-free plmetric modules only (``tests/retrieval/test_quick_search.py`` runs a search in a fresh
interpreter and checks that torch was never imported).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from plmetric.core.checkpoint import file_sha256
from plmetric.core.runtime_cache import INPUT_NAME, OUTPUT_NAME, cache_dir, entry_files, read_check

__all__ = [
    "INDEX_KEY",
    "IndexMismatchError",
    "QuickIndex",
    "cache_dir",
    "check_same_file",
    "exact_top_k",
    "open_quick_index",
]

INDEX_KEY = "plmetric_index"
"""The safetensors metadata key of an index's JSON description."""
QUICK_RUNTIMES = ("auto", "onnxruntime")


class IndexMismatchError(ValueError):
    """The model an index records is not the model found now (changed or missing checkpoint)."""


def check_same_file(path: str, recorded: str | None, what: str, index_path: str | os.PathLike) -> None:
    """Refuse a model file (``what``: ``checkpoint`` or ``weights file``) that is not the one index
    ``index_path`` was built with: missing, without a recorded SHA-256, or with another SHA-256.

    Raises:
        IndexMismatchError: naming the file, the index and both hashes.
    """
    if not Path(path).is_file():
        raise IndexMismatchError(
            f"index {index_path} was built with the {what} {path}, which no longer exists; "
            "rebuild the index (plmetric index) with the model you want to search with"
        )
    if recorded is None:
        raise IndexMismatchError(
            f"index {index_path} records no SHA-256 of its {what} {path} (an index from an older plmetric): "
            "it cannot be checked; rebuild it with plmetric index"
        )
    found = file_sha256(path)
    if found != recorded:
        raise IndexMismatchError(
            f"the {what} {path} has changed since index {index_path} was built (SHA-256 {recorded[:16]}... then, "
            f"{found[:16]}... now): the index's embeddings came from another model; rebuild the index, or keep "
            "the model an index is built with (e.g. copy best.safetensors) instead of a run's latest model"
        )


def exact_top_k(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k of each query row among the database rows, best first: ``(similarities, ids)``,
    ``(Q, min(k, N))`` float32 and int64 (:func:`plmetric.retrieval.index.top_k` in NumPy; equal
    scores in id order)."""
    if k < 1:
        raise ValueError(f"top_k: k must be >= 1, got {k}")
    k = min(k, database.shape[0])
    sims = queries.astype(np.float32, copy=False) @ database.astype(np.float32, copy=False).T
    if k < sims.shape[1]:
        candidates = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    else:
        candidates = np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
    ids = np.empty((len(sims), k), dtype=np.int64)
    for row, found in enumerate(candidates):  # one row per query: k values to order
        order = np.lexsort((found, -sims[row, found]))
        ids[row] = found[order]
    return np.take_along_axis(sims, ids, axis=1), ids


class QuickIndex:
    """An index ready to be searched without torch (from :func:`open_quick_index`).

    Attributes:
        path: the index file; ``paths``: its images (absolute); ``database``: ``N x d`` float32;
        description: its model description; ``onnx_file``: the cached export; ``preprocessing``:
        the query's :class:`plmetric.data.preprocess.EvalPreprocessing`.
    """

    def __init__(self, path: Path, paths: list[str], database: np.ndarray, description: dict[str, Any],
                 onnx_file: Path, preprocessing: Any) -> None:
        self.path, self.paths, self.database, self.description = path, paths, database, description
        self.onnx_file, self.preprocessing = onnx_file, preprocessing
        self.session: Any = None

    def load_model(self) -> bool:
        """Check the model file as the PyTorch path does, then open the export's session.

        Returns:
            True when the session is ready; False when onnxruntime cannot open it or it takes or
            gives other shapes (then the PyTorch path must run).

        Raises:
            IndexMismatchError: the checkpoint (or weights file) is missing or changed, as
                :func:`plmetric.retrieval.index.model_from_description` says it.
        """
        model = self.description
        if model.get("checkpoint"):
            check_same_file(model["checkpoint"], model.get("checkpoint_sha256"), "checkpoint", self.path)
            if not _checkpoint_agrees(model["checkpoint"], self.database.shape[1], self.preprocessing.resize):
                return False  # the PyTorch path names what is wrong with it
        elif model.get("weights"):
            check_same_file(model["weights"], model.get("weights_sha256"), "weights file", self.path)
        try:
            session = _session(self.onnx_file)
            (given,), (taken,) = session.get_inputs(), session.get_outputs()
        except Exception:  # noqa: BLE001 - any failure to open it: PyTorch computes the same
            return False
        size = self.preprocessing.image_size
        if (
            given.name != INPUT_NAME
            or taken.name != OUTPUT_NAME
            or list(given.shape[1:]) != [3, size, size]
            or len(taken.shape) != 2
            or taken.shape[1] != self.database.shape[1]
        ):
            return False
        self.session = session
        return True

    def embed(self, image_path: str | os.PathLike) -> np.ndarray:
        """The query image's embedding, ``(1, d)`` float32.

        Raises:
            FileNotFoundError, ValueError: an unreadable or oversized image, as the PyTorch path says it.
        """
        from plmetric.data.images import open_image
        from plmetric.data.preprocess import eval_input

        if self.session is None:
            raise RuntimeError("QuickIndex.embed before load_model")
        x = eval_input(open_image(image_path, "query image"), self.preprocessing)[None]
        return np.asarray(self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0], dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k (:func:`exact_top_k`) of ``queries`` among the index's embeddings."""
        return exact_top_k(queries, self.database, k)


def open_quick_index(index_path: str | os.PathLike, *, runtime: str, exact: bool, queries: int) -> QuickIndex | None:
    """The index at ``index_path`` ready for the torch-free path, or None when that path cannot give
    the PyTorch path's answer (see the module docstring); nothing is raised for a malformed index
    (the PyTorch path says what is wrong with it)."""
    if runtime not in QUICK_RUNTIMES or queries != 1 or importlib.util.find_spec("onnxruntime") is None:
        return None
    path = Path(index_path)
    read = _read_index(path)
    if read is None:
        return None
    meta, database = read
    model = meta["model"]
    if meta.get("ann") is not None and not exact:
        return None  # a faiss index: searched through faiss by the PyTorch path
    from plmetric.core.validation import check_image_size
    from plmetric.data.preprocess import EvalPreprocessing

    try:
        _check_model_fields(model)
        size = check_image_size("image_size", model.get("image_size"))
        preprocessing = EvalPreprocessing.from_record(model.get("preprocessing"), size)
    except ValueError:
        return None
    output_dim = model.get("output_dim")
    if output_dim is not None and output_dim != database.shape[1]:
        return None
    onnx_file = _cached_export(model.get("runtime"), size)
    if onnx_file is None:
        return None
    return QuickIndex(path, meta["paths"], database, model, onnx_file, preprocessing)


def _read_index(path: Path) -> tuple[dict[str, Any], np.ndarray] | None:
    """``(metadata, embeddings)`` of a well-formed index (the checks of ``load_embeddings``), else None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            meta = json.loads((handle.metadata() or {})[INDEX_KEY])
            names = set(handle.keys())
            if not {"embeddings", "labels"} <= names:
                return None
            labels_shape = handle.get_slice("labels").get_shape()
            embeddings = handle.get_tensor("embeddings")
    except Exception:  # noqa: BLE001 - unreadable, not an index: the PyTorch path names the problem
        return None
    if not isinstance(meta, dict):
        return None
    paths, model = meta.get("paths"), meta.get("model")
    if (
        embeddings.dtype != np.float32
        or embeddings.ndim != 2
        or not isinstance(paths, list)
        or not isinstance(model, dict)
        or len(paths) != embeddings.shape[0]
        or list(labels_shape) != [embeddings.shape[0]]
        or not all(isinstance(p, str) for p in paths)
        or not isinstance(model.get("backbone"), str)
        or meta.get("count", embeddings.shape[0]) != embeddings.shape[0]  # recorded sizes: the tensor's
        or meta.get("dim", embeddings.shape[1]) != embeddings.shape[1]
    ):
        return None
    return meta, embeddings


def _check_model_fields(model: dict[str, Any]) -> None:
    """The checks of :func:`plmetric.data.backbones.check_model_metadata` that need no backbone table
    (the backbone's name is not resolved: the network is the cached export). Raises ValueError."""
    from plmetric.core.validation import MAX_EMBEDDING_DIM, check_int, check_triple

    for key, minimum, maximum in (("embedding_dim", 0, MAX_EMBEDDING_DIM), ("output_dim", 1, MAX_EMBEDDING_DIM),
                                  ("epoch", 0, None)):
        if key in model:
            check_int(key, model[key], minimum, maximum=maximum)
    for fields in (model, model.get("preprocessing") or {}):
        if not isinstance(fields, dict):
            raise ValueError("preprocessing must be a JSON object")
        for key in ("mean", "std"):
            if key in fields:
                check_triple(key, fields[key], positive=key == "std")
    if "interpolation" in model and model["interpolation"] not in ("bilinear", "bicubic"):
        raise ValueError("interpolation must be bilinear or bicubic")
    rule, preprocessing = model.get("eval_resize", "center_crop"), model.get("preprocessing") or {}
    if rule not in ("center_crop", "whole"):
        raise ValueError("eval_resize must be center_crop or whole")
    if preprocessing and preprocessing.get("resize", "center_crop") != rule:
        raise ValueError("eval_resize must be the rule its preprocessing records")  # what the PyTorch path embeds
    for key in ("config", "metrics"):
        if model.get(key) is not None and not isinstance(model[key], dict):
            raise ValueError(f"{key} must be a JSON object")


def _checkpoint_agrees(path: str, dim: int, rule: str) -> bool:
    """Whether a checkpoint's recorded sizes (bounded) describe its embedding layer's shapes and give
    ``dim``-d embeddings, and it records the eval rule ``rule`` (``center_crop`` when it records none),
    read from its header alone (no torch, no tensor data): the torch-free path trusts the checkpoint's
    sizes no more than :func:`plmetric.data.backbones.load_model` does."""
    from plmetric.core.checkpoint import read_metadata, tensor_shapes

    try:
        meta = read_metadata(path)
        _check_model_fields(meta)
        shapes = tensor_shapes(path, ("embedding.weight", "embedding.bias"))
    except (OSError, ValueError):
        return False
    recorded, weight, bias = meta["embedding_dim"], shapes.get("embedding.weight"), shapes.get("embedding.bias")
    layer_ok = (weight is not None and weight[0] == recorded and bias == [recorded]) if recorded else weight is None
    same_rule = meta.get("eval_resize", "center_crop") == rule
    return layer_ok and same_rule and (recorded or dim) == dim and meta.get("output_dim", dim) == dim


def _cached_export(record: Any, size: int) -> Path | None:
    """The cached ONNX export that ``model.runtime`` names, if its key is well formed, its files exist
    and its recorded check passed for inputs ``(3, size, size)``; else None."""
    key = record.get("onnx_key") if isinstance(record, dict) else None
    try:
        onnx_file, check_file = entry_files(key)
    except ValueError:
        return None
    check = read_check(check_file) if onnx_file.is_file() else None
    if check is None or check.get("input_shape") != [3, size, size]:
        return None
    return onnx_file


def _session(onnx_file: Path) -> Any:
    """An onnxruntime CPU session as :mod:`plmetric.data.runtime` opens one (``OMP_NUM_THREADS``
    threads when set, else onnxruntime's default: the physical cores)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    options.intra_op_num_threads = int(threads) if threads.isdigit() and int(threads) > 0 else 0
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
