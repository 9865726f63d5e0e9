"""Embeddings for other tools: NumPy ``.npy`` with a paths file, or Parquet (paths + vectors).

``plmetric embed --out X.safetensors`` writes plmetric's own self-checking index format
(:func:`plmetric.retrieval.index.write_index`); these writers are for tools that do not read it:

* ``X.npy``: float32 ``(N, D)``, row ``i`` the embedding of line ``i`` of ``X.paths.txt``
  (absolute paths, UTF-8, one per line), and ``X.json``: the model's description (backbone,
  preprocessing, checkpoint SHA-256), the labels (-1 where unlabelled) and the row count.
* ``X.parquet``: one row per image, columns ``path`` (string), ``label`` (int64) and
  ``embedding`` (fixed-size list of D float32), the description as JSON in the schema's
  metadata under ``plmetric``. Needs pyarrow (``pip install "plmetric[parquet]"``).

Every file is written atomically (temporary file, then rename); the ``.npy`` rows are written
last, so a half-written export is never mistaken for a whole one.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plmetric.core.checkpoint import atomic_write_bytes, atomic_write_json

FORMAT = "plmetric-embeddings"
SUFFIXES = (".safetensors", ".npy", ".parquet")
PARQUET_KEY = b"plmetric"
INSTALL_HINT = 'pip install "plmetric[parquet]"'


class ParquetDependencyError(ImportError):
    """pyarrow, needed for ``.parquet`` output, is not installed."""


def sidecars(out: str | os.PathLike) -> list[Path]:
    """The files written beside ``out``: ``X.paths.txt`` and ``X.json`` for ``X.npy``; none otherwise."""
    out = Path(out)
    if out.suffix.lower() == ".npy":
        return [out.with_suffix(".paths.txt"), out.with_suffix(".json")]
    return []


def require_parquet() -> Any:
    """Import pyarrow.parquet, or raise :class:`ParquetDependencyError` saying how to install it."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ParquetDependencyError(f".parquet output needs pyarrow: {INSTALL_HINT}") from None
    return pa, pq


def _document(embeddings: torch.Tensor, model: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "rows": int(embeddings.shape[0]), "dim": int(embeddings.shape[1]), "model": model}


def write_npy(
    out: str | os.PathLike, embeddings: torch.Tensor, labels: torch.Tensor, paths: list[str], model: dict[str, Any]
) -> list[Path]:
    """Write ``X.npy`` (float32 rows), ``X.paths.txt`` (row ``i``'s path on line ``i``) and ``X.json``.

    Returns:
        The files written, ``X.npy`` first.
    """
    out = Path(out)
    if len(paths) != embeddings.shape[0] or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{len(paths)} paths and {labels.shape[0]} labels for {embeddings.shape[0]} embeddings")
    if any("\n" in p or "\r" in p for p in paths):
        raise ValueError("a path holds a line break: it cannot be written one per line; use .parquet")
    paths_file, meta_file = sidecars(out)
    atomic_write_bytes(paths_file, ("".join(f"{p}\n" for p in paths)).encode("utf-8"))
    atomic_write_json(meta_file, {**_document(embeddings, model), "labels": labels.tolist()})
    buffer = io.BytesIO()
    np.save(buffer, embeddings.detach().cpu().to(torch.float32).numpy(), allow_pickle=False)
    atomic_write_bytes(out, buffer.getvalue())
    return [out, paths_file, meta_file]


def read_npy(path: str | os.PathLike) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Read what :func:`write_npy` wrote: (embeddings, paths, the JSON document).

    The ``.npy`` header's shape is checked against the file's size (it is memory-mapped, not
    allocated from the header) and, like the document's ``rows`` and ``dim``, against the data.

    Raises:
        ValueError: a file that is not such an export, or sizes that disagree (naming the file).
    """
    path = Path(path)
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)  # a shape larger than the file: ValueError
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npy file of embeddings ({err})") from None
    if mapped.ndim != 2 or mapped.dtype != np.float32:
        raise ValueError(f"{path}: expected float32 embeddings (N, D), got {mapped.dtype} {list(mapped.shape)}")
    paths_file, meta_file = sidecars(path)
    paths = paths_file.read_text(encoding="utf-8").splitlines()
    document = _document_of(meta_file.read_text(encoding="utf-8"), meta_file)
    _check_document(document, mapped.shape, path)
    if len(paths) != mapped.shape[0]:
        raise ValueError(f"{path}: {mapped.shape[0]} rows, {len(paths)} paths in {paths_file.name}")
    return np.array(mapped), paths, document


def _document_of(text: str | bytes, where: Path) -> dict[str, Any]:
    """The JSON description of an export, or ValueError naming ``where``."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply to decode
        document = None
    if not isinstance(document, dict):
        raise ValueError(f"{where}: not the JSON description of a plmetric embeddings export")
    return document


def _check_document(document: dict[str, Any], shape: tuple[int, ...], path: Path) -> None:
    """The document's recorded ``rows`` and ``dim`` must be the data's shape."""
    for field, actual in (("rows", shape[0]), ("dim", shape[1])):
        if field in document and (isinstance(document[field], bool) or document[field] != actual):
            raise ValueError(
                f"{path}: its description records {field} {repr(document[field])[:40]}, but the embeddings have "
                f"shape {list(shape)}"
            )


def write_parquet(
    out: str | os.PathLike, embeddings: torch.Tensor, labels: torch.Tensor, paths: list[str], model: dict[str, Any]
) -> list[Path]:
    """Write ``X.parquet``: columns ``path``, ``label``, ``embedding`` (fixed-size float32 lists)."""
    pa, pq = require_parquet()
    vectors = embeddings.detach().cpu().to(torch.float32).numpy()
    dim = vectors.shape[1]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim)
    table = pa.table(
        {
            "path": pa.array(paths, type=pa.string()),
            "label": pa.array(labels.tolist(), type=pa.int64()),
            "embedding": embedding,
        }
    )
    table = table.replace_schema_metadata({PARQUET_KEY: json.dumps(_document(embeddings, model)).encode("utf-8")})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(Path(out), sink.getvalue().to_pybytes())
    return [Path(out)]


def read_parquet(path: str | os.PathLike) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Read what :func:`write_parquet` wrote: (embeddings, paths, the JSON document)."""
    _, pq = require_parquet()
    table = pq.read_table(path)
    document = _document_of((table.schema.metadata or {}).get(PARQUET_KEY, b"{}"), Path(path))
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    _check_document(document, vectors.shape, Path(path))
    return vectors, table.column("path").to_pylist(), document


def is_embedding_export(path: str | os.PathLike) -> bool:
    """True when ``path`` (``.npy`` or ``.parquet``) was written by this module (``embed`` may replace it)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            meta = sidecars(path)[1]
            return meta.is_file() and json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT
        if path.suffix.lower() == ".parquet":
            _, pq = require_parquet()
            metadata = pq.read_schema(path).metadata or {}
            return json.loads(metadata.get(PARQUET_KEY, b"{}")).get("format") == FORMAT
    except (OSError, ValueError, ImportError, UnicodeDecodeError):
        return False
    except Exception:  # noqa: BLE001 - pyarrow raises its own error types for a file that is not Parquet
        return False
    return False


def write_embeddings(
    out: str | os.PathLike, embeddings: torch.Tensor, labels: torch.Tensor, paths: list[str], model: dict[str, Any]
) -> list[Path]:
    """Write ``.npy`` (+ paths + JSON) or ``.parquet`` by the suffix of ``out``."""
    suffix = Path(out).suffix.lower()
    if suffix == ".npy":
        return write_npy(out, embeddings, labels, paths, model)
    if suffix == ".parquet":
        return write_parquet(out, embeddings, labels, paths, model)
    raise ValueError(f"{out}: expected a file name ending in .npy or .parquet")
