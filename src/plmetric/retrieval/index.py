"""Zero-shot image search: self-contained, self-checking indexes, top-k queries and result grids.

An index (or embeddings file) is one safetensors file: ``embeddings`` (N × d, L2-normalised),
``labels`` (N, -1 when unlabelled), ``file_stat`` (N × 2 int64: each image file's size in bytes and
modification time in ns when the index was written, -1 -1 for an item without a file; absent from
indexes of older versions, which stay readable), ``phash`` (N × 16 uint8: each image's perceptual
hashes, :func:`plmetric.retrieval.hashes.perceptual_hashes`, computed by ``plmetric index`` while the
image is decoded for embedding; absent from older indexes and from ``plmetric embed``'s files:
:func:`load_hashes` gives None) and, in its metadata (``plmetric_index``, JSON):

* ``paths``: the absolute path of every image (``search`` works from any folder);
* ``model``: everything needed to embed a query the same way and to check that it is the same
  model: the checkpoint's absolute path *and SHA-256* (a run rewrites ``model.safetensors`` every
  epoch: a changed file is refused with both hashes named), or the pretrained backbone (and the
  weights file with its hash); the embedding and output dimensions, the image size, the eval rule
  (``eval_resize``: ``center_crop`` or ``whole``; absent from older indexes: ``center_crop``) and the
  preprocessing (resize, crop, mean, std);
* ``format``, ``version``, ``created``, ``count``, ``dim``;
* ``ann`` (only with a faiss index, :mod:`plmetric.manifold.ann`): its ``kind`` (flat, ivf, hnsw, ivfpq), resolved
  ``params``, the ``file`` name and ``sha256`` of the faiss index stored beside the index
  (``INDEX.<first 12 hex digits of its SHA-256>.faiss``), its ``count`` and the faiss version.

That is format version 2, which small indexes still write. An index of more than
:data:`~plmetric.retrieval.stored.DEFAULT_SHARD_ROWS` images (or more paths than fit a header, or
written with ``--float16`` or ``--shard-rows``) is written in the sharded layout, version 3: the main
file keeps this metadata with a ``shards`` list instead of ``paths`` and no tensors, and the rows live in
shard files beside it (float16 or float32), memory-mapped when read; :mod:`plmetric.retrieval.stored`
describes it and opens both layouts (:func:`~plmetric.retrieval.stored.open_index`). Every reader here
(:func:`load_embeddings`, :func:`load_hashes`, :func:`load_file_stats`, :func:`extend_index`) reads both.

Writing an index with a faiss file writes the faiss file first, then the ``.safetensors`` file
(atomically, the commit point); it never deletes or overwrites a faiss file that an index names (a
copy of the index elsewhere in the folder may name the replaced one): a crash at any moment leaves a
complete old or new pair (and at most an unnamed ``.faiss`` file). The faiss file is named by its
content and found relative to the index: by its recorded name, else as ``<index stem>.<12 hex
digits>.faiss`` beside it (the index and its faiss file renamed together still pair up). A pair
cannot go stale without a changed file, which search detects by the SHA-256 (and refuses, naming
both hashes; ``--exact`` still searches). Growing an index in place holds an exclusive lock on it
(:func:`exclusive_index_lock`): a second ``--add-to`` on the same index stops at once.

Why size and mtime, not a content hash, identify an indexed file (``file_stat``): recording them is
one ``stat`` per image (about a second for 1M images), where a hash would read every byte again
(hundreds of GB for 1M photos) and ``serve`` would have to hash a file on every request. They detect
every ordinary change (an edit, a copy or a swap over the file: another size or time); only a forger
who also sets the same size and time (``touch -r``) passes, and ``serve`` still shows only an image,
decoded and re-encoded, from the recorded path, never through a link.

An index is never built with an untrained random embedding layer: without a checkpoint only the
backbone's pooled features (``embedding_dim = 0``) are reproducible.

One query is searched without torch by :mod:`plmetric.retrieval.quick_search` when the index names a
cached ONNX export (where :class:`IndexMismatchError` and the model check live, shared with this
module); the result grid is :mod:`plmetric.retrieval.result_grid`'s (Pillow).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from plmetric.core.files import require_regular_file
from plmetric.core.checkpoint import (
    atomic_save_safetensors,
    atomic_write_bytes,
    file_sha256,
)
from plmetric.data.backbones import DEFAULT_EVAL_RESIZE, check_model_metadata, eval_resize_of, load_model
from plmetric.retrieval.quick_search import INDEX_KEY, IndexMismatchError, check_same_file
from plmetric.retrieval.result_grid import GRID_CAPTION_CHARS, GRID_DECODE_SIDE, draw_results  # noqa: F401 - their old home

from plmetric.retrieval.stored import (  # noqa: F401 - their home is the storage layer; named here as ever
    FILE_STAT_KEY,
    HASH_KEY,
    INDEX_FORMAT,
    file_stats,
    is_sharded,
)

INDEX_VERSION = 2


class IndexBusyError(ValueError):
    """Another process holds the index's lock (it is extending the same index now)."""


def preprocessing(backbone: str, image_size: int, eval_resize: str = DEFAULT_EVAL_RESIZE) -> dict[str, Any]:
    """The deterministic input transform of :func:`plmetric.data.backbones.build_transform` as data:
    ``center_crop`` records ``resize_shorter_side`` and ``center_crop`` (the fields of indexes made before
    the rule was a choice), ``whole`` records ``"resize": "whole"`` and ``resize_to`` ``[S, S]``."""
    from plmetric.data.backbones import EVAL_RESIZE_RULES, backbone_spec

    spec = backbone_spec(backbone)
    if eval_resize not in EVAL_RESIZE_RULES:
        raise ValueError(f"eval_resize must be {' or '.join(EVAL_RESIZE_RULES)}, got {eval_resize!r}")
    if eval_resize == "whole":
        geometry: dict[str, Any] = {"resize": "whole", "resize_to": [int(image_size), int(image_size)]}
    else:
        geometry = {"resize_shorter_side": round(image_size * 256 / 224), "center_crop": int(image_size)}
    return {
        **geometry,
        "interpolation": spec.interpolation,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "color": "RGB",
    }


def load_embedding_model(
    checkpoint: str | os.PathLike | None,
    backbone: str,
    embedding_dim: int,
    weights: str | os.PathLike | None = None,
    image_size: int = 224,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A model from a plmetric checkpoint, or a pretrained backbone's pooled features.

    Returns:
        ``(model, description)``; the description is what an index records to rebuild and check
        the model (:func:`model_from_description`). A checkpoint's own image size wins over
        ``image_size``; its eval rule (``eval_resize``, ``center_crop`` when it records none) is the
        description's and its ``preprocessing``'s. A pretrained backbone's is ``center_crop``.

    Raises:
        ValueError: ``embedding_dim > 0`` without a checkpoint (an untrained random layer: no
            later search could rebuild it), or an unreadable checkpoint.
    """
    from plmetric.data.backbones import create_model

    if checkpoint:
        path = Path(checkpoint).expanduser().resolve()
        model, meta = load_model(path)
        size, rule = int(meta.get("image_size", image_size)), eval_resize_of(meta)
        return model, {
            "checkpoint": str(path),
            "checkpoint_sha256": file_sha256(path),
            "backbone": meta["backbone"],
            "embedding_dim": int(meta["embedding_dim"]),
            "output_dim": int(model.embedding_dim),
            "image_size": size,
            "eval_resize": rule,
            "weights": None,
            "weights_sha256": None,
            "preprocessing": preprocessing(meta["backbone"], size, rule),
        }
    if embedding_dim:
        raise ValueError(
            f"--embedding-dim {embedding_dim} without --checkpoint would embed with an untrained, random "
            "embedding layer that no later search could rebuild; pass --checkpoint (a model from plmetric train) "
            "or --embedding-dim 0 (the backbone's pooled features)"
        )
    weights_path = str(Path(weights).expanduser().resolve()) if weights else None
    model = create_model(backbone, embedding_dim=0, pretrained=True, weights=weights_path)
    return model.eval(), {
        "checkpoint": None,
        "checkpoint_sha256": None,
        "backbone": backbone,
        "embedding_dim": 0,
        "output_dim": int(model.embedding_dim),
        "image_size": int(image_size),
        "eval_resize": DEFAULT_EVAL_RESIZE,
        "weights": weights_path,
        "weights_sha256": file_sha256(weights_path) if weights_path else None,
        "preprocessing": preprocessing(backbone, int(image_size)),
    }


def model_from_description(description: dict[str, Any], index_path: str | os.PathLike) -> torch.nn.Module:
    """Rebuild the model an index records, after checking it is the same one.

    Raises:
        IndexMismatchError: the checkpoint (or weights file) is missing or its SHA-256 differs from
            the one recorded when the index was built; the message names both hashes.
    """
    from plmetric.data.backbones import create_model

    from plmetric.data.backbones import backbone_spec

    checkpoint, recorded = description.get("checkpoint"), description.get("output_dim")
    if checkpoint:
        check_same_file(checkpoint, description.get("checkpoint_sha256"), "checkpoint", index_path)
        model, meta = load_model(checkpoint)  # its own recorded sizes checked against its tensors first
        if eval_resize_of(meta) != eval_resize_of(description):
            raise ValueError(
                f"index {index_path}: its model records eval_resize {eval_resize_of(description)!r}, but checkpoint "
                f"{checkpoint} was made with {eval_resize_of(meta)!r}"
            )
    else:
        if recorded is not None and recorded != backbone_spec(description["backbone"]).feature_dim:
            raise ValueError(
                f"index {index_path}: its model records output_dim {recorded}, but backbone "
                f"'{description['backbone']}' has {backbone_spec(description['backbone']).feature_dim} pooled features"
            )
        weights = description.get("weights")
        if weights:
            check_same_file(weights, description.get("weights_sha256"), "weights file", index_path)
        model = create_model(description["backbone"], embedding_dim=0, pretrained=True, weights=weights).eval()
    if recorded is not None and recorded != model.embedding_dim:
        raise ValueError(
            f"index {index_path}: its model records output_dim {recorded}, but checkpoint {checkpoint} outputs "
            f"{model.embedding_dim}"
        )
    return model


def save_embeddings(
    path: str | os.PathLike,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    paths: list[str],
    model: dict[str, Any],
    ann: dict[str, Any] | None = None,
    stats: torch.Tensor | None = None,
    hashes: Any = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write embeddings, labels, absolute image paths, their files' size and mtime and the model
    description to one safetensors file.

    ``ann`` is the description of a faiss file written beside it (see :func:`write_index`);
    ``stats`` the rows of :func:`file_stats` (default: taken now, from the files themselves);
    ``hashes`` the images' perceptual hashes ((N, 16) uint8, stored as ``phash``; None: none stored)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {path}")
    if not (len(embeddings) == len(labels) == len(paths)):
        raise ValueError(f"{len(embeddings)} embeddings, {len(labels)} labels and {len(paths)} paths disagree")
    absolute = [p if p.startswith("item:") else str(Path(p).expanduser().resolve()) for p in paths]
    meta = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "count": len(absolute),
        "dim": int(embeddings.shape[1]) if embeddings.dim() == 2 else 0,
        "paths": absolute,
        "model": model,
    }
    if ann is not None:
        meta["ann"] = ann
    meta.update({k: v for k, v in (extra or {}).items() if k not in meta})  # e.g. duplicates_calibration
    stats = file_stats(absolute) if stats is None else stats.long().reshape(len(absolute), 2)
    tensors = {
        "embeddings": embeddings.float().contiguous().cpu(),
        "labels": labels.long().contiguous().cpu(),
        FILE_STAT_KEY: stats.contiguous().cpu(),
    }
    if hashes is not None:
        from plmetric.retrieval.hashes import check_hashes

        array = check_hashes(hashes, f"perceptual hashes of {path}")
        if len(array) != len(absolute):
            raise ValueError(f"{len(array)} perceptual hashes for {len(absolute)} images")
        tensors[HASH_KEY] = torch.from_numpy(array.copy())
    return atomic_save_safetensors(path, tensors, {INDEX_KEY: json.dumps(meta)})


def read_index_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The index metadata of a plmetric index file, or None when ``path`` is some other file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(INDEX_KEY)
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError):
        return None
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deeply to decode
        return None
    return meta if isinstance(meta, dict) else None


def load_embeddings(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, list[str], dict[str, Any]]:
    """Read a file written by :func:`save_embeddings`: ``(embeddings, labels, paths, model)``.

    Every size the metadata records is checked against the tensors: ``count`` and ``dim`` (when
    recorded) and the model's ``output_dim`` must be the embeddings' rows and columns.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a plmetric index (the message names the file and says why).
    """
    path = Path(path)
    require_regular_file(path, "index/embeddings file")
    meta = read_index_metadata(path)
    if meta is None:
        raise ValueError(
            f"{path} is not a plmetric index (expected a .safetensors file written by plmetric index or "
            f"plmetric embed, with '{INDEX_KEY}' metadata)"
        )
    if is_sharded(meta):
        from plmetric.retrieval.stored import open_index

        stored = open_index(path)
        return stored.vectors.materialize(), stored.labels(), stored.paths.to_list(), stored.model
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable plmetric index: {err}") from None
    embeddings, labels = tensors.get("embeddings"), tensors.get("labels")
    paths, model = meta.get("paths"), meta.get("model")
    if (
        embeddings is None
        or labels is None
        or embeddings.dim() != 2
        or not isinstance(paths, list)
        or not isinstance(model, dict)
        or len(paths) != embeddings.shape[0]
        or labels.shape != (embeddings.shape[0],)
        or not all(isinstance(p, str) for p in paths)
        or not isinstance(model.get("backbone"), str)
    ):
        raise ValueError(
            f"{path} is not a valid plmetric index (embeddings, labels, paths and model disagree or are missing)"
        )
    check_model_metadata(model, f"index {path}: model")  # image_size, backbone, ...: as a checkpoint's
    check_recorded_shape(meta, embeddings, path)
    return embeddings, labels, paths, model


def _shown(value: Any) -> str:
    """A recorded value for a message: an int as it is, anything else as a short repr."""
    return str(value) if type(value) is int and abs(value) < 10**40 else repr(value)[:40]


def check_recorded_shape(meta: dict[str, Any], embeddings: torch.Tensor, path: str | os.PathLike) -> None:
    """Check an index's recorded sizes against its ``embeddings`` tensor: floating point, ``count``
    (when recorded) its rows, ``dim`` and the model's ``output_dim`` (when recorded) its columns.

    Raises:
        ValueError: naming the index, the field, the recorded value and the tensor's shape.
    """
    rows, columns = embeddings.shape
    if not embeddings.is_floating_point():
        raise ValueError(f"{path} is not a valid plmetric index: its embeddings are {embeddings.dtype}, not floats")
    recorded = {"count": (meta.get("count"), rows), "dim": (meta.get("dim"), columns)}
    recorded["model 'output_dim'"] = ((meta.get("model") or {}).get("output_dim"), columns)
    for field, (value, actual) in recorded.items():
        if value is not None and (isinstance(value, bool) or value != actual):
            raise ValueError(
                f"{path} is not a valid plmetric index: it records {field} {_shown(value)}, but its embeddings "
                f"tensor has shape {[rows, columns]}"
            )


def load_file_stats(path: str | os.PathLike) -> torch.Tensor | None:
    """The ``file_stat`` rows of an index (N × 2: size, mtime in ns; -1 unknown), or None for an index
    written before they were recorded (or a malformed record)."""
    if is_sharded(read_index_metadata(path)):
        from plmetric.retrieval.stored import open_index

        try:
            return open_index(path).file_stats()
        except (OSError, ValueError):
            return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if FILE_STAT_KEY not in handle.keys():
                return None
            stats = handle.get_tensor(FILE_STAT_KEY)
            count = handle.get_slice("embeddings").get_shape()[0]
    except (SafetensorError, OSError, ValueError):
        return None
    if stats.dtype != torch.int64 or tuple(stats.shape) != (count, 2):
        return None
    return stats


def load_hashes(index_path: str | os.PathLike) -> Any:
    """The ``phash`` tensor of an index as an ``(N, 16)`` uint8 NumPy array, or None for an index
    written without it (older versions, ``plmetric embed``).

    Raises:
        ValueError: a ``phash`` tensor of another type or shape than ``(N, 16)`` uint8 for the index's
            N images, or an unreadable file (one line naming the index).
    """
    from plmetric.retrieval.hashes import HASH_BYTES

    if is_sharded(read_index_metadata(index_path)):
        from plmetric.retrieval.stored import open_index

        return open_index(index_path).hashes()
    try:
        with safe_open(str(index_path), framework="pt") as handle:
            if HASH_KEY not in handle.keys():
                return None
            hashes = handle.get_tensor(HASH_KEY)
            count = handle.get_slice("embeddings").get_shape()[0]
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{index_path} is not a readable plmetric index: {err}") from None
    if hashes.dtype != torch.uint8 or tuple(hashes.shape) != (count, HASH_BYTES):
        raise ValueError(
            f"{index_path} is not a valid plmetric index: its '{HASH_KEY}' tensor is {hashes.dtype} "
            f"{list(hashes.shape)}, expected uint8 [{count}, {HASH_BYTES}] (one row per image)"
        )
    return hashes.numpy()


def index_identity(embeddings: torch.Tensor, paths: list[str]) -> str:
    """The SHA-256 (hex) of an index's image paths and embeddings, as :func:`load_embeddings` returns
    them: what the pile tools record in their tables (:mod:`plmetric.retrieval.tables`) so that ``serve``
    can refuse a table of another index. The same images embedded by the same model give the same
    identity; any other index (another model, image, order, or this one grown by ``--add-to``)
    another. Hashes the embeddings' bytes in place (about 1 s a GB)."""
    import hashlib

    array = embeddings.detach().to("cpu", torch.float32).contiguous().numpy()
    digest = hashlib.sha256(b"plmetric-index-identity\0")
    digest.update(json.dumps([list(array.shape), paths]).encode("ascii"))  # ASCII: every name escaped
    digest.update(array.astype("<f4", copy=False).data)
    return digest.hexdigest()


def decode_image(source: str | os.PathLike | bytes, what: str = "query image", max_side: int | None = None) -> Any:
    """Decode an image file (or its bytes) to an upright 8-bit RGB ``PIL.Image``: the data layer's one
    decoder, :func:`plmetric.data.images.open_image` (EXIF orientation, every mode, one pixel limit).

    Args:
        source: a path, or the bytes of an image file (an upload).
        what: how the errors name the image, e.g. ``"query image photo.jpg"``; a path is appended.
        max_side: let JPEG decoding shrink the image towards this side (``Image.draft``: thumbnails);
            None decodes at full size (embedding).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a regular file, not a decodable image, or over
            :data:`plmetric.data.images.MAX_IMAGE_PIXELS` ("too large to decode"); one line naming ``what``.
    """
    from plmetric.data.images import open_image

    return open_image(source, what, max_side=max_side)


def read_query_image(
    source: str | os.PathLike | bytes, transform: Callable[[Any], torch.Tensor], what: str = "query image"
) -> torch.Tensor:
    """Decode a query image (a path or an upload's bytes) and apply the index's transform.

    Raises:
        FileNotFoundError, ValueError: as :func:`decode_image`, one clear line for any unreadable
            or oversized file.
    """
    return transform(decode_image(source, what))


def top_k(query: torch.Tensor, database: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k of each query row among the database rows: ``(similarities, indices)``."""
    if k < 1:
        raise ValueError(f"top_k: k must be >= 1, got {k}")
    k = min(k, database.shape[0])
    sims = query.float() @ database.float().T
    return sims.topk(k, dim=1)


# ----------------------------------------------------------------------------- faiss files, growing an index


def faiss_file_name(index_path: str | os.PathLike, digest: str) -> Path:
    """Where the faiss file with SHA-256 ``digest`` of index ``INDEX.safetensors`` lives:
    ``INDEX.<digest[:12]>.faiss`` beside it."""
    index_path = Path(index_path)
    return index_path.with_name(f"{index_path.stem}.{digest[:12]}.faiss")


def faiss_file_for(index_path: Path, meta: dict[str, Any] | None) -> Path | None:
    """The faiss file an index's metadata names, if it is a plain name beside the index: the recorded
    name if that file exists, else ``<index stem>.<sha256[:12]>.faiss`` if that one exists (the pair
    renamed together), else the recorded name (missing)."""
    ann_meta = (meta or {}).get("ann")
    name = ann_meta.get("file") if isinstance(ann_meta, dict) else None
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".faiss"):
        return None
    recorded = index_path.with_name(name)
    digest = ann_meta.get("sha256")
    if not recorded.exists() and isinstance(digest, str) and len(digest) >= 12 and digest.isalnum():
        renamed = faiss_file_name(index_path, digest)
        if renamed.is_file():
            return renamed
    return recorded


@contextlib.contextmanager
def exclusive_index_lock(index_path: str | os.PathLike, what: str = "--add-to") -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on the index file itself while it is read, extended
    and replaced (no lock file is left behind; the lock ends with the process).

    The index is replaced by an atomic rename: a lock taken on a file that was replaced meanwhile is
    dropped and taken again on the current one.

    Raises:
        IndexBusyError: another process holds the lock (one line: wait for it, then run again).
        FileNotFoundError: no such index.
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    index_path = Path(index_path)
    for _ in range(10):
        fd = os.open(index_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise IndexBusyError(
                f"{what} {index_path}: another plmetric command is extending this index now (it holds its lock); "
                "wait until it has finished, then run this again"
            ) from None
        held, current = os.fstat(fd), os.stat(index_path)
        if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
            break
        os.close(fd)  # replaced between open and lock: lock the new file
    else:
        raise IndexBusyError(f"{what} {index_path}: the index keeps being replaced by another command; run this again")
    try:
        yield
    finally:
        os.close(fd)


def write_index(
    path: str | os.PathLike,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    paths: list[str],
    model: dict[str, Any],
    plan: Any = None,
    faiss_index: Any = None,
    stats: torch.Tensor | None = None,
    hashes: Any = None,
    extra: dict[str, Any] | None = None,
    *,
    dtype: str = "float32",
    rows_per_shard: int | None = None,
) -> tuple[Path, Path | None]:
    """Write an index, with a faiss index of ``plan`` (an :class:`plmetric.manifold.ann.AnnPlan`) beside it.

    ``faiss_index`` is a built faiss index of exactly these embeddings (e.g. grown by
    :func:`extend_index`); without it the plan's index is built here. ``stats``, ``hashes``: as in
    :func:`save_embeddings`. ``rows_per_shard`` (or ``dtype`` ``"float16"``) writes the sharded layout
    of :mod:`plmetric.retrieval.stored` (shards of that many rows, default
    :data:`~plmetric.retrieval.stored.DEFAULT_SHARD_ROWS`); else one version-2 file. Write order (see
    the module docstring): the faiss file, the shards, the main ``.safetensors`` file (the commit); the
    faiss file the replaced index named is left in place (another index may name it).

    Returns:
        ``(index path, faiss file path or None)``.
    """
    from plmetric.manifold import ann
    path = Path(path)
    ann_meta, faiss_path = None, None
    if plan is not None:
        if faiss_index is None:
            faiss_index = ann.build_index(embeddings, plan)
        ann_meta, faiss_path = write_faiss_file(path, plan, faiss_index, len(embeddings))
    if rows_per_shard is None and dtype == "float32":
        from plmetric.retrieval.stored import named_shards, retire_shards

        previous = named_shards(path)  # a sharded index replaced by one file: its shards go
        save_embeddings(path, embeddings, labels, paths, model, ann=ann_meta, stats=stats, hashes=hashes, extra=extra)
        retire_shards(previous, path)
        return path, faiss_path
    from plmetric.retrieval.stored import DEFAULT_SHARD_ROWS, ShardedIndexWriter, named_shards, retire_shards

    if path.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {path}")
    if not (len(embeddings) == len(labels) == len(paths)):
        raise ValueError(f"{len(embeddings)} embeddings, {len(labels)} labels and {len(paths)} paths disagree")
    absolute = [p if p.startswith("item:") else str(Path(p).expanduser().resolve()) for p in paths]
    dim = int(embeddings.shape[1]) if embeddings.dim() == 2 else 0
    previous = named_shards(path)
    with ShardedIndexWriter(path, dim, dtype, rows_per_shard or DEFAULT_SHARD_ROWS) as writer:
        writer.add(embeddings, labels, absolute, stats, hashes)
        writer.commit(model, ann_meta, extra)
    retire_shards(previous, path)
    return path, faiss_path


def write_faiss_file(path: Path, plan: Any, faiss_index: Any, count: int) -> tuple[dict[str, Any], Path]:
    """Write ``faiss_index`` (of ``count`` vectors) beside index ``path`` under its content's name
    (kept when that very file is there): ``(the index's 'ann' description, the faiss file)``."""
    import hashlib

    from plmetric.manifold import ann

    if int(faiss_index.ntotal) != count:
        raise ValueError(f"the faiss index holds {faiss_index.ntotal} vectors, the index {count}")
    data = ann.serialize_index(faiss_index)
    digest = hashlib.sha256(data).hexdigest()
    faiss_path = faiss_file_name(path, digest)
    if not (faiss_path.is_file() and file_sha256(faiss_path) == digest):  # the same content: keep it
        atomic_write_bytes(faiss_path, data)
    ann_meta = {
        **plan.to_dict(),
        "metric": "inner_product",
        "file": faiss_path.name,
        "sha256": digest,
        "count": count,
        "faiss_version": ann.import_faiss().__version__,
    }
    return ann_meta, faiss_path


FAISS_BLOCK_ROWS = 65_536
"""Rows added to a faiss index at a time when it is built from stored vectors (65,536 x 512 float32:
128 MiB)."""


def build_faiss_from_stored(stored: Any, plan: Any, *, rows_per_block: int = FAISS_BLOCK_ROWS, seed: int = 0) -> Any:
    """The faiss index of ``plan`` over the vectors of ``stored`` (a
    :class:`~plmetric.retrieval.stored.StoredIndex` or its ``StoredVectors``), built without holding them
    in memory: an IVF kind is trained on a seeded sample of rows read from the shards
    (``ann.training_rows``: at most 256 rows a cell for ivf, all rows when there are fewer), every kind is
    then filled ``rows_per_block`` rows at a time, in row order (ids = rows). Memory: the sample and
    one block besides the faiss index itself.

    The result is that of ``ann.build_index`` on all the vectors: the same training rows, and adding
    rows block by block files each row as adding them at once does (HNSW: an equivalent graph, its
    links depending on the order of insertion as with threads)."""
    import numpy as np

    from plmetric.manifold import ann

    vectors = getattr(stored, "vectors", stored)
    n, dim = int(vectors.count), int(vectors.dim)
    if n < 1:
        raise ValueError("cannot build a faiss index of an empty index")
    needs_sample = plan.kind not in ("flat", "hnsw")
    train_index = getattr(ann, "train_index", None)
    if train_index is not None:  # the split build API of issue 31 (ivfpq)
        rows = ann.training_rows(n, plan, seed) if needs_sample else np.zeros(0, np.int64)
        index = train_index(vectors.rows(rows), plan, dim)
    else:  # before it: build on the sample, then empty the index (IVF keeps its trained cells)
        rows = _training_sample(n, plan, seed) if needs_sample else np.zeros(1, np.int64)
        index = ann.build_index(vectors.rows(rows), plan)
        index.reset()
    for _, block in vectors.blocks(rows_per_block):
        ann.add_vectors(index, block)
    return index


def grow_faiss_from_stored(
    faiss_index: tuple[Any, Any] | None,
    stored: Any,
    start: int,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    rows_per_block: int = FAISS_BLOCK_ROWS,
) -> tuple[Any, Any]:
    """``(faiss index, AnnPlan)`` of ``faiss_index`` (from :func:`load_faiss_index`) with the rows
    ``start..`` of ``stored`` added ``rows_per_block`` at a time and the search parameters replaced
    (as :func:`extend_index` does), or ``(None, None)`` without a faiss index."""
    from plmetric.manifold import ann

    vectors = getattr(stored, "vectors", stored)
    grown, plan = _grown_faiss(faiss_index, torch.empty(0, vectors.dim), nprobe, ef_search)
    if grown is not None:
        for first in range(int(start), vectors.count, rows_per_block):
            ann.add_vectors(grown, vectors.block(first, first + rows_per_block))
    return grown, plan


def _training_sample(n: int, plan: Any, seed: int) -> Any:
    """The sorted rows an IVF of ``plan`` trains on: all n when n <= 256 per cell (faiss's k-means uses no
    more), else a seeded sample of that many (what ``ann.training_rows`` does)."""
    import numpy as np

    wanted = 256 * int(plan.params["nlist"])
    if n <= wanted:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=wanted, replace=False)).astype(np.int64)


def load_faiss_index(index_path: str | os.PathLike, meta: dict[str, Any] | None = None) -> tuple[Any, Any] | None:
    """The faiss index an index file names, checked: ``(faiss index, AnnPlan)``, or None if it names none.

    Raises:
        IndexMismatchError: the faiss file is missing, is not the one the index recorded (its
            SHA-256 differs; both named), or holds another number or dimension of vectors.
        FaissUnavailableError: faiss is not installed.
        ValueError: the index's faiss description is malformed or the file unreadable.
    """
    from plmetric.manifold import ann
    index_path = Path(index_path)
    meta = read_index_metadata(index_path) if meta is None else meta
    ann_meta = (meta or {}).get("ann")
    if ann_meta is None:
        return None
    faiss_path = faiss_file_for(index_path, meta)
    if (
        faiss_path is None
        or ann_meta.get("kind") not in ann.FAISS_KINDS
        or not isinstance(ann_meta.get("params"), dict)
        or not isinstance(ann_meta.get("sha256"), str)
    ):
        raise ValueError(f"{index_path} has a malformed faiss description ('ann' metadata); rebuild the index")
    try:
        ann.import_faiss()
    except ann.FaissUnavailableError as err:
        raise ann.FaissUnavailableError(
            f"index {index_path} has a faiss {ann_meta['kind']} index, but {err} (or search with --exact)"
        ) from None
    if not faiss_path.is_file():
        raise IndexMismatchError(
            f"index {index_path} needs its faiss file {faiss_path}, which is missing: keep it beside the index "
            "(or rebuild the index, or search with --exact)"
        )
    recorded, found = ann_meta["sha256"], file_sha256(faiss_path)
    if found != recorded:
        raise IndexMismatchError(
            f"the faiss file {faiss_path} is not the one index {index_path} was written with (SHA-256 "
            f"{recorded[:16]}... recorded, {found[:16]}... found): rebuild the index, or search with --exact"
        )
    index = ann.read_index(faiss_path)
    count, dim = meta.get("count"), meta.get("dim")
    if int(index.ntotal) != count or int(index.d) != dim:
        raise IndexMismatchError(
            f"the faiss file {faiss_path} holds {index.ntotal} vectors of dimension {index.d}, index {index_path} "
            f"{count} of dimension {dim}: rebuild the index, or search with --exact"
        )
    return index, ann.AnnPlan(ann_meta["kind"], dict(ann_meta["params"]))


EXACT_BLOCK_ROWS = 262_144
"""Rows of a mapped index scored at a time by exact search (262,144 x 512 float32: 512 MiB at most)."""


def search(
    index_path: str | os.PathLike,
    queries: torch.Tensor,
    k: int,
    database: Any,
    faiss_index: tuple[Any, Any] | None = None,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    rerank: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each query: through ``faiss_index`` (from :func:`load_faiss_index`) when given,
    else exactly. ``database`` is a tensor of the index's vectors, or its
    :class:`~plmetric.retrieval.stored.StoredVectors` (memory-mapped): exact search then goes block
    by block (:func:`top_k_blocks`, bounded memory), and an ivfpq index re-ranks its candidates
    (``rerank`` overrides how many) exactly against the stored rows of ``database``. Slots an
    approximate index could not fill have id -1."""
    from plmetric.manifold import ann
    from plmetric.retrieval.stored import StoredVectors

    if faiss_index is None:
        if isinstance(database, StoredVectors):
            return top_k_blocks(queries, database, k)
        return top_k(queries, database, k)
    index, plan = faiss_index
    return ann.search_index(
        index, queries, k, plan, nprobe=nprobe, ef_search=ef_search, vectors=rows_of(database), rerank=rerank
    )


def rows_of(database: Any) -> Callable[[Any], Any] | None:
    """The ``vectors`` callable of :func:`plmetric.manifold.ann.search_index`: int64 ids -> their rows as
    a float32 array, from embeddings in memory or a memory-mapped
    :class:`~plmetric.retrieval.stored.StoredVectors`."""
    from plmetric.retrieval.stored import StoredVectors

    if database is None:
        return None
    if isinstance(database, StoredVectors):
        return database.rows
    table = database.detach().to("cpu", torch.float32)
    return lambda ids: table[torch.from_numpy(ids)].numpy()


def top_k_blocks(
    query: torch.Tensor, database: Any, k: int, rows_per_block: int = EXACT_BLOCK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`top_k` over a :class:`~plmetric.retrieval.stored.StoredVectors`, one block of rows at a
    time: each block's top k merged with the best so far (memory: one block and ``2k`` per query)."""
    if k < 1:
        raise ValueError(f"top_k: k must be >= 1, got {k}")
    k = min(k, database.count)
    q = query.float()
    best_scores = torch.full((q.shape[0], 0), float("-inf"))
    best_ids = torch.zeros((q.shape[0], 0), dtype=torch.long)
    for start, block in database.blocks(rows_per_block):
        scores = q @ torch.from_numpy(block).T
        scores, ids = scores.topk(min(k, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_ids = torch.cat([best_ids, ids + start], dim=1)
        best_scores, chosen = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_ids = merged_ids.gather(1, chosen)
    return best_scores, best_ids


def new_images(candidates: list[Path], indexed: Any) -> tuple[list[Path], int]:
    """The candidate images whose absolute path is not among the index's paths (a list or a
    :class:`~plmetric.retrieval.stored.StoredPaths`, read in blocks: memory for the candidates only),
    in their order, and how many candidates already were."""
    resolved = [str(Path(p).expanduser().resolve()) for p in candidates]
    known = indexed_among(indexed, set(resolved))
    fresh = [p for p, r in zip(candidates, resolved, strict=True) if r not in known]
    return fresh, len(candidates) - len(fresh)


def indexed_among(indexed: Any, wanted: set[str]) -> set[str]:
    """The paths of ``wanted`` that ``indexed`` (a list, or a :class:`~plmetric.retrieval.stored.StoredPaths`
    read 65,536 paths at a time) holds."""
    found: set[str] = set()
    if not wanted:
        return found
    for start in range(0, len(indexed), 65536):
        block = indexed[start : start + 65536] if isinstance(indexed, list) else indexed.slice(start, start + 65536)
        found.update(p for p in block if p in wanted)
    return found


def check_same_model(
    description: dict[str, Any],
    index_path: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
) -> None:
    """Refuse a ``checkpoint`` (or backbone ``weights`` file) other than the one the index was built with.

    The files are compared by SHA-256, so a copy of the same model is accepted.

    Raises:
        IndexMismatchError: naming the given file and its hash and the index's model and its hash.
        FileNotFoundError: the given file does not exist.
    """
    for given, role in ((checkpoint, "checkpoint"), (weights, "weights")):
        if not given:
            continue
        given = Path(given).expanduser()
        if not given.is_file():
            raise FileNotFoundError(f"--{role} not found: {given}")
        found = file_sha256(given)
        recorded_path, recorded = description.get(role), description.get(f"{role}_sha256")
        if found == recorded:
            continue
        built_with = (
            f"the {role} {recorded_path} (SHA-256 {recorded[:16]}...)"
            if recorded_path and recorded
            else f"no {role} (the pretrained {description.get('backbone')} backbone"
            + (f", checkpoint {description['checkpoint']})" if description.get("checkpoint") else ")")
        )
        raise IndexMismatchError(
            f"--{role} {given} (SHA-256 {found[:16]}...) is not the model index {index_path} was built with: "
            f"{built_with}; embeddings of two models cannot share an index: build a new one with --out"
        )


def extend_index(
    index_path: str | os.PathLike,
    out: str | os.PathLike,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    paths: list[str],
    faiss_index: tuple[Any, Any] | None = None,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    hashes: Any = None,
    extra: dict[str, Any] | None = None,
    rows_per_shard: int | None = None,
) -> tuple[int, Path | None, Any]:
    """Append embeddings (with their labels and paths) to the index at ``index_path``, and to its
    faiss index (``faiss_index``, from :func:`load_faiss_index`) if it has one; write the result to
    ``out`` (which may be ``index_path`` itself: the old index stays whole until the new one is
    committed). ``nprobe``/``ef_search`` replace the recorded search parameters. ``hashes``: the new
    images' perceptual hashes, appended to the index's own; an index without them stays without them
    (its old images have none), and new images without them drop the index's.

    Returns:
        ``(number of vectors now, faiss file path or None, its AnnPlan or None)``.

    A sharded index (:mod:`plmetric.retrieval.stored`) gets the new rows as new shards (``rows_per_shard``
    each, default :data:`~plmetric.retrieval.stored.DEFAULT_SHARD_ROWS`) and a new main file: its old
    shards are neither read nor copied. A one-file index that would outgrow one file
    (:func:`~plmetric.retrieval.stored.shard_rows_for`) is rewritten as a sharded one, once.

    Raises:
        ValueError: embeddings of another dimension, or a path already in the index.
    """
    from plmetric.retrieval.stored import open_index, shard_rows_for

    if is_sharded(read_index_metadata(index_path)):
        return _extend_sharded(
            open_index(index_path), Path(out), embeddings, labels, paths, faiss_index, nprobe=nprobe,
            ef_search=ef_search, hashes=hashes, extra=extra, rows_per_shard=rows_per_shard,
        )
    old_embeddings, old_labels, old_paths, model = load_embeddings(index_path)
    if embeddings.dim() != 2 or embeddings.shape[1] != old_embeddings.shape[1]:
        raise ValueError(
            f"new embeddings have shape {tuple(embeddings.shape)}, index {index_path} dimension "
            f"{old_embeddings.shape[1]}"
        )
    absolute = [p if p.startswith("item:") else str(Path(p).expanduser().resolve()) for p in paths]
    repeated = sorted(set(absolute) & set(old_paths))
    if repeated:
        raise ValueError(f"{repeated[0]} is already in index {index_path}")
    grown, plan = _grown_faiss(faiss_index, embeddings, nprobe, ef_search)
    all_embeddings = torch.cat([old_embeddings, embeddings.float().cpu()])
    all_labels = torch.cat([old_labels, labels.long().cpu()])
    old_stats = load_file_stats(index_path)  # an older index without them: unknown (-1) for its images
    old_stats = torch.full((len(old_paths), 2), -1, dtype=torch.int64) if old_stats is None else old_stats
    stats = torch.cat([old_stats, file_stats(absolute)])
    old_hashes = load_hashes(index_path)
    all_hashes = None
    if old_hashes is not None and hashes is not None:
        import numpy as np

        all_hashes = np.concatenate([old_hashes, np.asarray(hashes, dtype=np.uint8).reshape(-1, old_hashes.shape[1])])
    all_paths = old_paths + absolute
    shard_rows = shard_rows_for(len(all_paths), sum(len(p.encode("utf-8", "surrogatepass")) for p in all_paths),
                                shard_rows=rows_per_shard)
    _, faiss_path = write_index(
        out, all_embeddings, all_labels, all_paths, model, plan, faiss_index=grown, stats=stats,
        hashes=all_hashes, extra=extra, rows_per_shard=shard_rows,
    )
    return len(all_embeddings), faiss_path, plan


def _grown_faiss(
    faiss_index: tuple[Any, Any] | None, embeddings: torch.Tensor, nprobe: int | None, ef_search: int | None
) -> tuple[Any, Any]:
    """``(faiss index, AnnPlan)`` with ``embeddings`` added and the search parameters replaced, or
    ``(None, None)`` without a faiss index."""
    from plmetric.manifold import ann

    if faiss_index is None:
        return None, None
    grown, plan = faiss_index
    if len(embeddings):
        ann.add_vectors(grown, embeddings)
    params = dict(plan.params)
    if nprobe is not None and plan.kind in ("ivf", "ivfpq"):
        params["nprobe"] = min(nprobe, params["nlist"])
    if ef_search is not None and plan.kind == "hnsw":
        params["ef_search"] = ef_search
    return grown, ann.AnnPlan(plan.kind, params)


def _extend_sharded(
    stored: Any,
    out: Path,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    paths: list[str],
    faiss_index: tuple[Any, Any] | None,
    *,
    nprobe: int | None,
    ef_search: int | None,
    hashes: Any,
    extra: dict[str, Any] | None,
    rows_per_shard: int | None,
) -> tuple[int, Path | None, Any]:
    """:func:`extend_index` of a sharded index: new shards, the faiss file, then the new main file."""
    from plmetric.retrieval.stored import ShardedIndexWriter, named_shards, retire_shards

    if embeddings.dim() != 2 or embeddings.shape[1] != stored.dim:
        raise ValueError(
            f"new embeddings have shape {tuple(embeddings.shape)}, index {stored.path} dimension {stored.dim}"
        )
    absolute = [p if p.startswith("item:") else str(Path(p).expanduser().resolve()) for p in paths]
    repeated = indexed_among(stored.paths, set(absolute))
    if repeated:
        raise ValueError(f"{min(repeated)} is already in index {stored.path}")
    grown, plan = _grown_faiss(faiss_index, embeddings, nprobe, ef_search)
    previous = named_shards(out)  # --out another sharded index: its shards that none names any more go
    with ShardedIndexWriter.extending(stored, out, rows_per_shard) as writer:
        if absolute:
            writer.add(embeddings, labels, absolute, None, hashes)
        writer.flush()
        ann_meta, faiss_path = (None, None)
        if plan is not None:
            ann_meta, faiss_path = write_faiss_file(out, plan, grown, writer.count)
        writer.commit(stored.model, ann_meta, extra)
    retire_shards(previous, out)
    return writer.count, faiss_path, plan
