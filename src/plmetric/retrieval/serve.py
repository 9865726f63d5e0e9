"""A local web page to browse an index: pick or upload a query image, see its top-k results.

``plmetric serve INDEX`` opens the index (:func:`plmetric.retrieval.mapped.open_pile`: a one-file index read
into memory; a sharded one mapped, its vectors and paths never read whole, so that a 10M-image index
starts in seconds: searches go through its faiss index, re-ranked from the stored vectors, or exactly
over the mapped vectors block by block when it has none) and its model
(:func:`plmetric.retrieval.index.model_from_description`, which checks the checkpoint's SHA-256) once and
serves, on 127.0.0.1 unless told otherwise:

* ``GET /`` (``?page=P``): the indexed images, each a link that searches from it, and an upload form;
* ``GET /search?id=N``: the top-k results of indexed image N (its stored embedding: nothing decoded),
  image N itself left out (by its number, never by score: an identical copy stays) unless the page
  runs with ``include_self``;
* ``POST /search``: the top-k results of an uploaded image (multipart field ``image``; an upload is
  never "itself": nothing is left out);
* ``GET /api/search?id=N``, ``POST /api/search``: the same as JSON, ``{"index", "top_k", "query",
  "query_id", "results": [{"rank", "id", "path", "score", "missing"}]}``; ``?top_k=K`` (1 to
  :data:`MAX_API_TOP_K`) asks for K results instead of the page's ``--top-k``; ``missing`` is true
  when ``/image/N`` would refuse the image without decoding it (:meth:`Browser.unavailable`); an
  error is ``{"error": "..."}`` with status 400 (a malformed id or top_k: anything but ASCII digits;
  a top_k outside its range), 404 (an id outside the index), 413 (an upload over
  :data:`MAX_UPLOAD_BYTES` or :data:`MAX_UPLOAD_PIXELS`) or 429 (every decode slot busy for
  :data:`DECODE_WAIT_S`);
* ``GET /thumb/N``, ``GET /image/N``: a downscaled JPEG, the full image re-encoded (JPEG for a JPEG
  file, else PNG), of indexed image N;
* with a groups or duplicates table (``plmetric serve --groups FILE`` / ``--duplicates FILE``, the
  tables of ``plmetric groups`` / ``plmetric duplicates``, :func:`load_group_table`):
  ``GET /groups`` (``?page=P``) the groups, each its size and up to :data:`GROUP_PREVIEW` members;
  ``GET /groups/G`` (``?page=P``) all members of group G (``/groups/ungrouped``: the ungrouped
  bucket, listed last); the same under ``/duplicates``. 400 for a group or page that is not ASCII
  digits, 404 for one not in the table. Every path of a table is mapped to its index number at
  start-up (a path outside the index refuses the table), so these pages, too, show images only by
  number, through ``/thumb`` and ``/search``. A table that records the index it was written from
  (:mod:`plmetric.retrieval.tables`) is refused when that is not this index; one is read only up to
  one row per indexed image (:func:`plmetric.retrieval.tables.read_group_table`'s bounds).

What is served (:meth:`Browser.open_indexed`, through :mod:`plmetric.retrieval.served_files`; the class
of attacks it closes):

* Images are addressed by their number in the index only: no route takes a path.
* A file is opened only at the path the index recorded (an absolute path with every link resolved
  at indexing), only if that path still resolves to itself (no link anywhere on it now: a file or
  folder swapped for a link is refused, ``O_NOFOLLOW`` on the open, and the opened descriptor's path
  checked on Linux), only if it is a regular file, and only if its size and modification time are
  those recorded at indexing (``file_stat`` of :mod:`plmetric.retrieval.index`; 410 when changed).
  An index written before they were recorded is served on the decode check alone (said once at start).
* Bytes of a file never reach a response: the image is decoded (:func:`plmetric.data.images.open_image`)
  and re-encoded; a file that does not decode as an image answers 404 with a short message.

Memory: an upload's pixel count is read from its header and refused (413) over
:data:`MAX_UPLOAD_PIXELS` before anything is decoded; at most :data:`DECODE_SLOTS` images (uploads,
thumbnails, full images) are decoded at once, so decoding holds at most ``DECODE_SLOTS`` decoded
images; uploads waiting for a slot stay in Starlette's spooled files (on disk past 1 MiB).

Images moved or deleted since indexing show as missing (their ``/thumb`` and ``/image`` answer
404). The web packages are the optional extra ``serve``.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import importlib.util
import io
import ipaddress
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import torch

from plmetric.core.files import require_regular_file
from plmetric.core import names
from plmetric.data.images import MAX_IMAGE_PIXELS, ImageTooLargeError, image_size, open_image
from plmetric.retrieval.group_tables import (
    GROUP_KINDS,
    Group,
    GroupTable,
    check_group_table,
    load_group_table,
)
from plmetric.retrieval.index import model_from_description, top_k
from plmetric.retrieval.served_files import open_unchanged, unavailable
from plmetric.retrieval.serve_requests import (
    ID_MAX_DIGITS,
    MAX_API_TOP_K,
    SHOWN_NAME_CHARS,
    QueryError,
    api_top_k,
    page_count,
    page_number,
    parse_number,
    shown_name,
)
from plmetric.retrieval.tables import encode_name

# the page's names, with those of its parts (group_tables, serve_requests) that were defined here before
__all__ = [
    "GROUP_KINDS", "ID_MAX_DIGITS", "MAX_API_TOP_K", "SHOWN_NAME_CHARS", "Browser", "Group", "GroupTable", "Hit",
    "Query", "QueryError", "ServeDependencyError", "api_top_k", "check_group_table", "create_app",
    "load_group_table", "page_count", "page_number", "parse_number", "serve", "shown_name",
]

INSTALL_HINT = 'pip install "plmetric[serve]"'
REQUIRED_MODULES = {
    "starlette": "starlette",
    "uvicorn": "uvicorn",
    "jinja2": "jinja2",
    "python_multipart": "python-multipart",
}
"""Import name -> distribution name of every package ``plmetric serve`` needs."""
MAX_UPLOAD_BYTES = 20 * 2**20
"""Largest accepted upload (the image file; the form around it may add a few KiB)."""
MAX_UPLOAD_PIXELS = min(50_000_000, MAX_IMAGE_PIXELS)
"""Largest accepted upload in pixels (width × height, read from the header before decoding): 50 MP
admits a 48 MP phone photo or a 45 MP full-frame one, well below Pillow's bomb warning (89.5 MP) and
the data layer's :data:`plmetric.data.images.MAX_IMAGE_PIXELS`. Decoded, Pillow holds RGB in 4
bytes a pixel: at most 200 MB an upload."""
DECODE_SLOTS = 2
"""Images decoded at once (uploads, thumbnails, full images); the others wait for a slot."""
DECODE_WAIT_S = 20.0
"""How long a request waits for a decode slot before it is answered 429 (busy)."""
FULL_IMAGE_JPEG_QUALITY = 92
MMAP_THRESHOLD_BYTES = 8 * 2**20
"""glibc: allocations from this size up (Pillow's 16 MiB image blocks) are mapped and unmapped on their
own, so a freed decoded image goes back to the system (:func:`return_freed_images_to_the_system`)."""
FORM_OVERHEAD_BYTES = 64 * 2**10
THUMB_SIDE = 256
GALLERY_PAGE_SIZE = 48
GROUPS_PAGE_SIZE = 50
"""Groups listed on one page of ``/groups`` or ``/duplicates``."""
GROUP_PREVIEW = 6
"""Members shown for each group in the list (the first ones in the table's order)."""
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


class ServeDependencyError(ImportError):
    """A package of the ``serve`` extra is not installed (the message says how to install it)."""


@dataclass(frozen=True)
class Hit:
    """One result: its rank (1 = most similar), its number and path in the index, its cosine score;
    ``folder``: the common folder of the images on the page with it (:func:`in_common_folder`)."""

    rank: int
    id: int
    path: str
    score: float
    missing: bool
    folder: str | None = None

    @property
    def name(self) -> str:
        """The file name."""
        return Path(self.path).name

    @property
    def caption(self) -> str:
        """The file name shown on its tile, shortened in the middle (:data:`CAPTION_CHARS`)."""
        return names.caption_lines(self.path, None, CAPTION_CHARS)[-1]

    @property
    def folder_caption(self) -> str:
        """The folders between ``folder`` and the file, shortened in the middle, shown above the name
        (``054.Baltimore_Oriole`` above ``0034.jpg``); empty when there are none."""
        lines = names.caption_lines(self.path, self.folder, CAPTION_CHARS)
        return lines[0] if len(lines) > 1 else ""

    def as_json(self) -> dict[str, Any]:
        """The result in the JSON API: its path as tables write it (:func:`plmetric.retrieval.tables.encode_name`)."""
        path = encode_name(self.path)
        return {"rank": self.rank, "id": self.id, "path": path, "score": self.score, "missing": self.missing}


@dataclass(frozen=True)
class Query:
    """What was searched from: an indexed image (``id``) or an upload (``thumbnail`` as a data URI)."""

    name: str
    id: int | None = None
    path: str | None = None
    thumbnail: str | None = None
    folder: str | None = None

    @property
    def caption(self) -> str:
        """The name shown under the query, shortened in the middle (:data:`CAPTION_CHARS`)."""
        return names.shorten_name(names.shown(self.name), CAPTION_CHARS)

    @property
    def folder_caption(self) -> str:
        """As :attr:`Hit.folder_caption` for an indexed query; empty for an upload."""
        lines = names.caption_lines(self.path, self.folder, CAPTION_CHARS) if self.path else []
        return lines[0] if len(lines) > 1 else ""


CAPTION_CHARS = 24
"""A tile's caption fits about this many characters of a file name (170 px at 12 px), and as many of
its folders on the line above; the full path is the caption's tooltip."""


def in_common_folder(tiles: Sequence[Hit], *others: str) -> list[Hit]:
    """``tiles`` with their ``folder`` set to the common folder of their paths and ``others`` (the
    images shown on the same page, :func:`plmetric.core.names.common_folder`): a pile of class folders
    (CUB has a ``0034.jpg`` under every species) is told apart by the folder line of each tile."""
    folder = names.common_folder([*others, *(tile.path for tile in tiles)])
    return [replace(tile, folder=folder) for tile in tiles]


def require_packages() -> None:
    """Check that the ``serve`` extra is installed.

    Raises:
        ServeDependencyError: naming the missing packages and ``pip install "plmetric[serve]"``.
    """
    missing = [dist for module, dist in REQUIRED_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ServeDependencyError(f"plmetric serve needs {', '.join(missing)} (not installed): {INSTALL_HINT}")


def thumbnail_jpeg(image: Any, side: int) -> bytes:
    """A JPEG of ``image`` (a PIL image) shrunk to fit in ``side`` × ``side``, aspect kept. The image
    is shrunk in place (no full-size copy: its pixels are not needed afterwards)."""
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def shown_on_page(value: Any) -> Any:
    """A value as the page shows it: text (not markup the templates made) through
    :func:`plmetric.core.names.shown`, so that a file name's undecodable bytes, control and
    bidirectional characters show as escapes (and the page encodes as UTF-8); anything else as it is."""
    from markupsafe import Markup

    return names.shown(value) if isinstance(value, str) and not isinstance(value, Markup) else value


class Browser:
    """An index and its model, loaded once: searches from an indexed image or an uploaded one.

    ``include_self``: keep an indexed query image in its own results (by default it is left out and
    the ``top_k`` other images come back).

    Raises (on construction):
        FileNotFoundError, ValueError: not a readable plmetric index.
        IndexMismatchError: the index's checkpoint changed or is gone.
    """

    def __init__(self, index: str | os.PathLike, top_k: int, include_self: bool = False, runtime: str = "auto") -> None:
        from plmetric.data.backbones import description_transform
        from plmetric.data.runtime import inference_model

        if top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {top_k}")
        self.index_path = Path(index)
        self.top_k = top_k
        self.include_self = include_self
        from plmetric.retrieval.index import load_faiss_index
        from plmetric.retrieval.mapped import open_pile

        self.pile = open_pile(index)
        self.embeddings, self.paths, description = self.pile.vectors, self.pile.paths, self.pile.model
        if len(self.paths) == 0:
            raise ValueError(f"index {index} holds no images")
        size = int(description.get("image_size", 224))
        self.transform = description_transform(description)
        # uploads go through the fastest runtime that computes the same embedding (plmetric.data.runtime)
        self.model = inference_model(model_from_description(description, index), (3, size, size), runtime, "cpu",
                                     what="the index's model")
        # a sharded index searches through its faiss index when it has one (a one-file index: exactly, in memory)
        self.faiss_index = load_faiss_index(index, self.pile.meta) if self.pile.stored is not None else None
        output_dim = int(description.get("output_dim", self.embeddings.shape[1]))
        if output_dim != self.embeddings.shape[1]:
            raise ValueError(
                f"index {index}: its model embeds in dimension {output_dim}, "
                f"its embeddings have dimension {self.embeddings.shape[1]}"
            )
        self._model_lock = threading.Lock()  # one forward pass at a time (requests run in a thread pool)
        self._decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
        self.file_stats = self.pile.file_stats()
        self.note = (
            None
            if self.file_stats is not None
            else f"note: index {index} records no file sizes and times (written by an older plmetric): its images "
            "are served if they decode as images, but a file replaced by another image is not detected; "
            "rebuild the index (plmetric index) to record them"
        )

    def __len__(self) -> int:
        return len(self.paths)

    @functools.cached_property
    def index_id(self) -> str:
        """The index's identity (:func:`plmetric.retrieval.mapped.stored_identity`), computed once when
        first asked (a table's record is compared with it)."""
        return self.pile.identity()

    def recorded_stat(self, image_id: int) -> list[int] | None:
        """Indexed image ``image_id``'s ``[size, mtime_ns]`` recorded at indexing (None: the index has none)."""
        return None if self.file_stats is None else self.file_stats[image_id].tolist()

    def unavailable(self, image_id: int) -> bool:
        """Whether :meth:`open_indexed` would refuse indexed image ``image_id``: an item without a file,
        moved or deleted, reached through a link now, not a regular file, or changed since indexing
        (its size or mtime; :func:`plmetric.retrieval.served_files.unavailable`). What shows an image
        as missing; only a file that no longer decodes is found out later, by ``/thumb`` and ``/image``."""
        return unavailable(self.paths[image_id], self.recorded_stat(image_id))

    def path_of(self, image_id: int) -> Path:
        """The recorded path of indexed image ``image_id``.

        Raises:
            QueryError: 404 for a number outside the index.
        """
        if not 0 <= image_id < len(self.paths):
            raise QueryError(f"no image number {image_id}: the index holds images 0 to {len(self.paths) - 1}", 404)
        return Path(self.paths[image_id])

    def image_id(self, text: str | None) -> int:
        """The number of an indexed image from a request's text.

        Raises:
            QueryError: 400 not ASCII digits; 404 outside the index.
        """
        number = parse_number(text, "id")
        if number is None:
            raise QueryError(
                f"no image number {text[:12]}... ({len(text)} digits): the index holds images 0 to {len(self) - 1}",
                404,
            )
        self.path_of(number)
        return number

    @contextlib.contextmanager
    def decode_slot(self) -> Iterator[None]:
        """Hold one of :data:`DECODE_SLOTS` decode slots, waiting at most :data:`DECODE_WAIT_S`.

        Raises:
            QueryError: 429 when none became free in time.
        """
        if not self._decode_slots.acquire(timeout=DECODE_WAIT_S):
            raise QueryError(
                f"the server is busy decoding {DECODE_SLOTS} other images (waited {DECODE_WAIT_S:g} s): "
                "try again in a moment",
                429,
            )
        try:
            yield
        finally:
            self._decode_slots.release()

    def open_indexed(self, image_id: int) -> IO[bytes]:
        """The file of indexed image ``image_id``, opened only if it is still the file that was indexed
        (:func:`plmetric.retrieval.served_files.open_unchanged`: no link on its path now, a regular
        file, its recorded size and mtime).

        Raises:
            QueryError: 404 unknown number, missing file, a link, not a regular file, unreadable;
                410 changed since indexing.
        """
        path = str(self.path_of(image_id))
        return open_unchanged(path, image_id, self.recorded_stat(image_id))

    def _encode_indexed(self, image_id: int, max_side: int | None, encode: Callable[[Any, bool], Any]) -> Any:
        """``encode(image, is_jpeg)`` of indexed image ``image_id`` decoded, all in one decode slot
        (the decoded image never outlives the slot)."""
        with self.open_indexed(image_id) as handle, self.decode_slot():
            is_jpeg = handle.peek(3)[:3] == b"\xff\xd8\xff"
            try:
                image = open_image(handle, f"image {image_id}", max_side=max_side)
            except ValueError as err:
                raise QueryError(f"{err}: not shown", 404) from None
            return encode(image, is_jpeg)

    def search_id(self, image_id: int, top_k: int | None = None) -> list[Hit]:
        """The top-k results of indexed image ``image_id`` (its stored embedding): the ``top_k`` (default:
        the page's) most similar other images, ``image_id`` itself left out by its number (an identical
        copy stays); with ``include_self`` the plain top-k, which holds the image itself (score 1)."""
        self.path_of(image_id)
        from plmetric.retrieval.mapped import rows_of

        query = torch.from_numpy(rows_of(self.embeddings, [image_id]))
        return self._hits(query, None if self.include_self else image_id, top_k)

    def search_upload(
        self, upload: bytes | IO[bytes], name: str, top_k: int | None = None
    ) -> tuple[list[Hit], bytes]:
        """The ``top_k`` (default: the page's) results of an uploaded image file (its bytes, or a binary
        file read here, in a decode slot) and its thumbnail (JPEG bytes).

        Raises:
            QueryError: 413 over :data:`MAX_UPLOAD_BYTES` or :data:`MAX_UPLOAD_PIXELS` (from the
                header, before decoding); 400 empty or not an image; 429 no decode slot in time (one
                line naming the upload by its file name).
        """
        shown = f"upload {shown_name(name)}"
        with self.decode_slot():
            if not isinstance(upload, bytes):
                upload.seek(0)
                upload = upload.read(MAX_UPLOAD_BYTES + 1)
            if len(upload) > MAX_UPLOAD_BYTES:
                raise QueryError(f"{shown} is larger than the limit of {MAX_UPLOAD_BYTES // 2**20} MiB", 413)
            if not upload:
                raise QueryError(f"{shown} is empty: choose an image file")
            too_large = f"{shown} is too large to decode"
            try:
                width, height = image_size(upload, shown)
                if width * height > MAX_UPLOAD_PIXELS:
                    raise QueryError(
                        f"{too_large}: {width} x {height} = {width * height:,} pixels, over the limit of "
                        f"{MAX_UPLOAD_PIXELS:,} ({MAX_UPLOAD_PIXELS / 1e6:g} megapixels) for an upload; "
                        "downscale it first",
                        413,
                    )
                image = open_image(upload, shown)
            except QueryError:
                raise
            except ImageTooLargeError:
                limit = f"{MAX_UPLOAD_PIXELS / 1e6:g} megapixels"
                raise QueryError(f"{too_large}: over the limit of {limit}", 413) from None
            except ValueError as err:
                raise QueryError(str(err)) from None
            del upload
            with self._model_lock, torch.no_grad():
                embedding = self.model(self.transform(image).unsqueeze(0))
            return self._hits(embedding, None, top_k), thumbnail_jpeg(image, THUMB_SIDE)

    def thumbnail(self, image_id: int) -> bytes:
        """A JPEG thumbnail of indexed image ``image_id`` (checked by :meth:`open_indexed`, decoded).

        Raises:
            QueryError: as :meth:`open_indexed`; 404 not an image; 429 no decode slot in time.
        """
        return self._encode_indexed(image_id, THUMB_SIDE, lambda image, _: thumbnail_jpeg(image, THUMB_SIDE))

    def full_image(self, image_id: int) -> tuple[bytes, str]:
        """Indexed image ``image_id`` decoded and re-encoded (never the file's bytes): ``(data, media
        type)``, JPEG (quality :data:`FULL_IMAGE_JPEG_QUALITY`) for a JPEG file, else PNG.

        Raises:
            QueryError: as :meth:`thumbnail`.
        """

        def encode(image: Any, is_jpeg: bool) -> tuple[bytes, str]:
            buffer = io.BytesIO()
            if is_jpeg:
                image.save(buffer, "JPEG", quality=FULL_IMAGE_JPEG_QUALITY)
            else:
                image.save(buffer, "PNG", compress_level=3)
            return buffer.getvalue(), "image/jpeg" if is_jpeg else "image/png"

        return self._encode_indexed(image_id, None, encode)

    def _hits(self, query: torch.Tensor, exclude: int | None = None, count: int | None = None) -> list[Hit]:
        """The ``count`` (default ``top_k``) nearest images, ``exclude`` (an index number) left out: one
        more is asked for, then ``exclude`` dropped if found, else the last."""
        count = self.top_k if count is None else count
        asked = count if exclude is None else count + 1
        if isinstance(self.embeddings, torch.Tensor) and self.faiss_index is None:
            scores, indices = top_k(query, self.embeddings, asked)
        else:  # mapped: faiss (re-ranked) or exact block by block (plmetric.retrieval.mapped.search_vectors)
            from plmetric.retrieval.mapped import search_vectors

            scores, indices = search_vectors(query.float(), asked, self.embeddings, self.faiss_index)
        found = [
            (score, i)
            for score, i in zip(scores[0].tolist(), indices[0].tolist(), strict=True)
            if i != exclude and i >= 0  # -1: a slot an approximate index could not fill
        ]
        return [
            Hit(rank, i, self.paths[i], score, self.unavailable(i))
            for rank, (score, i) in enumerate(found[:count], start=1)
        ]


@contextlib.asynccontextmanager
async def received_upload(request: Any) -> AsyncIterator[tuple[str, IO[bytes]]]:
    """The file name and the spooled file (in memory up to 1 MiB, then on disk) of the ``image``
    field of a multipart upload, received with a size limit; the form is closed on exit.

    Raises:
        QueryError: 413 over the limit (checked while reading, before the whole body has arrived);
            400 not multipart, malformed, or without a file in ``image``.
    """
    from starlette.formparsers import MultiPartException, MultiPartParser

    too_large = QueryError(f"the upload is larger than the limit of {MAX_UPLOAD_BYTES // 2**20} MiB", 413)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise QueryError("expected a multipart/form-data upload with the image file in the field 'image'")
    limit = MAX_UPLOAD_BYTES + FORM_OVERHEAD_BYTES
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large

    async def limited() -> Any:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise too_large
            yield chunk

    try:
        form = await MultiPartParser(request.headers, limited(), max_files=1, max_fields=4).parse()
    except MultiPartException as err:
        raise QueryError(f"malformed upload: {err.message}") from None
    try:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise QueryError("no image file in the upload (expected the field 'image')")
        yield upload.filename or "upload", upload.file
    finally:
        await form.close()


def create_app(
    browser: Browser, allowed_hosts: list[str] | None = None, tables: tuple[GroupTable, ...] = ()
) -> Any:
    """The Starlette application serving ``browser`` (see the module docstring for its routes): the
    page's renderer, the search routes, the image routes, each table's pages, the host check.

    Args:
        allowed_hosts: accept only requests whose ``Host`` header is one of these (a page bound to
            127.0.0.1 then cannot be read by another site through DNS rebinding); None accepts any.
        tables: groups/duplicates tables mapped onto ``browser``'s index (:func:`load_group_table`),
            browsed under ``/<kind>``.
    """
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    render = page_renderer(browser, tables)
    routes = [*search_routes(browser, render), *image_routes(browser)]
    for table in tables:
        routes += group_routes(browser, table, render)
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts else []
    return Starlette(routes=routes, middleware=middleware)


def page_renderer(browser: Browser, tables: tuple[GroupTable, ...] = ()) -> Callable[..., Any]:
    """``render(status=200, **context)``: the page's template filled with the index's facts, the
    tables' links and ``context`` (every ``{{ value }}`` through :func:`shown_on_page`), an HTML response."""
    from jinja2 import Environment, PackageLoader, select_autoescape
    from starlette.responses import HTMLResponse

    templates = Environment(
        loader=PackageLoader("plmetric.retrieval", "templates"),
        autoescape=select_autoescape(["html"]),
        finalize=shown_on_page,  # every {{ value }}: a name's control characters and undecodable bytes visible
    )
    template = templates.get_template("serve.html")
    table_links = [table.kind for table in tables]

    def render(status: int = 200, **context: Any) -> HTMLResponse:
        html = template.render(
            index=browser.index_path.name,
            count=len(browser),
            top_k=browser.top_k,
            max_upload_mib=MAX_UPLOAD_BYTES // 2**20,
            max_upload_megapixels=f"{MAX_UPLOAD_PIXELS / 1e6:g}",
            table_links=table_links,
            **context,
        )
        return HTMLResponse(html, status_code=status)

    return render


def gallery_tile(browser: Browser, image_id: int) -> Hit:
    """Indexed image ``image_id`` as a tile of a gallery: without a rank or score."""
    return Hit(0, image_id, browser.paths[image_id], 0.0, browser.unavailable(image_id))


def search_routes(browser: Browser, render: Callable[..., Any]) -> list[Any]:
    """``/`` (the gallery, :data:`GALLERY_PAGE_SIZE` images a page), ``/search`` (the results page)
    and ``/api/search`` (the same as JSON), each from an indexed image (``?id=N``) or an upload (POST)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    pages = page_count(len(browser), GALLERY_PAGE_SIZE)

    async def run_query(request: Any, count: int | None = None) -> tuple[Query, list[Hit]]:
        if request.method == "POST":
            async with received_upload(request) as (name, file):
                hits, thumb = await run_in_threadpool(browser.search_upload, file, name, count)
            thumbnail = "data:image/jpeg;base64," + base64.b64encode(thumb).decode()
            return Query(name=name, thumbnail=thumbnail), in_common_folder(hits)
        image_id = browser.image_id(request.query_params.get("id"))
        path = browser.paths[image_id]
        hits = in_common_folder(browser.search_id(image_id, count), path)
        folder = names.common_folder([path, *(hit.path for hit in hits)])
        return Query(name=Path(path).name, id=image_id, path=path, folder=folder), hits

    async def home(request: Any) -> HTMLResponse:
        try:
            page = page_number(request.query_params.get("page", "1"), pages)
        except QueryError as err:
            return render(err.status, error=str(err))
        first = (page - 1) * GALLERY_PAGE_SIZE
        gallery = in_common_folder(
            [gallery_tile(browser, i) for i in range(first, min(first + GALLERY_PAGE_SIZE, len(browser)))]
        )
        return render(gallery=gallery, page=page, pages=pages, page_base="/?page=")

    async def search_page(request: Any) -> HTMLResponse:
        try:
            query, hits = await run_query(request)
        except QueryError as err:
            return render(err.status, error=str(err))
        return render(query=query, hits=hits)

    async def search_api(request: Any) -> JSONResponse:
        try:
            count = api_top_k(request.query_params.get("top_k"), browser.top_k)
            query, hits = await run_query(request, count)
        except QueryError as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        return JSONResponse(
            {
                "index": str(browser.index_path.resolve()),
                "top_k": count,
                "query": encode_name(query.path) if query.path else query.name,
                "query_id": query.id,
                "results": [hit.as_json() for hit in hits],
            }
        )

    return [
        Route("/", home),
        Route("/search", search_page, methods=["GET", "POST"]),
        Route("/api/search", search_api, methods=["GET", "POST"]),
    ]


def image_routes(browser: Browser) -> list[Any]:
    """``/thumb/N`` and ``/image/N``: indexed image N as a thumbnail or re-encoded in full
    (:meth:`Browser.thumbnail`, :meth:`Browser.full_image`), never sniffed as anything else; plain
    functions: Starlette runs them in its thread pool."""
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    safe = {"X-Content-Type-Options": "nosniff"}

    def thumb(request: Any) -> Response:
        try:
            data = browser.thumbnail(browser.image_id(request.path_params["image_id"]))
        except QueryError as err:
            return PlainTextResponse(str(err), status_code=err.status, headers=safe)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=60", **safe})

    def image(request: Any) -> Response:
        try:
            data, media_type = browser.full_image(browser.image_id(request.path_params["image_id"]))
        except QueryError as err:
            return PlainTextResponse(str(err), status_code=err.status, headers=safe)
        return Response(data, media_type=media_type, headers=safe)

    return [Route("/thumb/{image_id}", thumb), Route("/image/{image_id}", image)]


def group_routes(browser: Browser, table: GroupTable, render: Callable[..., Any]) -> list[Any]:
    """``/<kind>`` (the groups, :data:`GROUPS_PAGE_SIZE` a page, each with :data:`GROUP_PREVIEW`
    members) and ``/<kind>/<group>`` (one group's members, a page at a time); plain functions:
    Starlette runs them in its thread pool (they look at the files to mark missing ones)."""
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    listed_pages = page_count(len(table.groups), GROUPS_PAGE_SIZE)

    def listing(request: Any) -> HTMLResponse:
        try:
            page = page_number(request.query_params.get("page", "1"), listed_pages)
        except QueryError as err:
            return render(err.status, error=str(err))
        first = (page - 1) * GROUPS_PAGE_SIZE
        listed = table.groups[first : first + GROUPS_PAGE_SIZE]
        previews = [[gallery_tile(browser, i) for i in group.members[:GROUP_PREVIEW]] for group in listed]
        tiles = iter(in_common_folder([tile for preview in previews for tile in preview]))  # the page's folder
        shown = [(group, [next(tiles) for _ in preview]) for group, preview in zip(listed, previews, strict=True)]
        return render(
            view="groups",
            table=table.kind,
            groups=shown,
            group_count=len(table.groups) - (table.ungrouped > 0),
            ungrouped=table.ungrouped,
            page=page,
            pages=listed_pages,
            page_base=f"/{table.kind}?page=",
        )

    def members(request: Any) -> HTMLResponse:
        try:
            group = table.group(request.path_params["group"])
            member_pages = page_count(group.size, GALLERY_PAGE_SIZE)
            page = page_number(request.query_params.get("page", "1"), member_pages)
        except QueryError as err:
            return render(err.status, error=str(err))
        first = (page - 1) * GALLERY_PAGE_SIZE
        return render(
            view="members",
            table=table.kind,
            group=group,
            gallery=in_common_folder(
                [gallery_tile(browser, i) for i in group.members[first : first + GALLERY_PAGE_SIZE]]
            ),
            page=page,
            pages=member_pages,
            page_base=f"/{table.kind}/{group.slug}?page=",
        )

    return [Route(f"/{table.kind}", listing), Route(f"/{table.kind}/{{group}}", members)]


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port``, so that the printed URL is known to work.

    Raises:
        ValueError: the host cannot be resolved or the address cannot be bound (in use, not this machine's).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ValueError(f"--host {host}: cannot resolve it ({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ValueError(
            f"cannot listen on --host {host} --port {port} ({err.strerror}): choose another --port or --host"
        ) from None
    return sock


def return_freed_images_to_the_system() -> bool:
    """Fix glibc's ``M_MMAP_THRESHOLD`` at :data:`MMAP_THRESHOLD_BYTES` in this process (``mallopt``).

    By default glibc raises the threshold after the first large block is freed, so later decoded
    images are allocated in per-thread arenas and kept there when freed: the page's memory then grows
    with every thread of the pool that ever decoded a large image (measured: 36 MP uploads decoded one
    at a time took RSS up by 5 images' worth, not 1) and stays there. Returns whether it was set
    (False off glibc: nothing changes).
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # <malloc.h>
    return bool(mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(MMAP_THRESHOLD_BYTES)))


def serve(
    index: str | os.PathLike,
    *,
    host: str,
    port: int,
    top_k: int,
    include_self: bool = False,
    groups: str | os.PathLike | None = None,
    duplicates: str | os.PathLike | None = None,
    runtime: str = "auto",
) -> None:
    """Load ``index`` and its model (through ``runtime``: :func:`plmetric.data.runtime.inference_model`) (and the ``groups``/``duplicates`` tables, mapped onto the index),
    print the page's URL and serve it until Ctrl+C (or SIGTERM). Every bad input is refused before
    anything listens.

    Raises:
        ServeDependencyError: the ``serve`` extra is missing.
        FileNotFoundError, ValueError: a bad index or table, or an address that cannot be bound.
    """
    require_regular_file(index, "index file")  # before the dependencies: the file is the first thing to get right
    given = [(kind, path) for kind, path in zip(GROUP_KINDS, (groups, duplicates), strict=True) if path is not None]
    for kind, path in given:  # the tables' headers before the model is loaded
        check_group_table(path, kind)
    require_packages()
    import uvicorn

    browser = Browser(index, top_k, include_self, runtime)
    tables = tuple(load_group_table(path, kind, browser) for kind, path in given)
    loopback = is_loopback(host)
    allowed = sorted({*LOOPBACK_NAMES, f"[{host}]" if ":" in host else host}) if loopback else None
    sock = listen_socket(host, port)
    address = f"[{host}]" if ":" in host else host
    print(
        f"plmetric serve: {len(browser):,} images of {names.shown(index)} at http://{address}:{port}/ (Ctrl+C stops)",
        flush=True,
    )
    for table in tables:
        ungrouped = f" ({table.ungrouped:,} ungrouped)" if table.ungrouped else ""
        print(
            f"plmetric serve: {table.kind}: {len(table.groups) - (table.ungrouped > 0):,} groups of "
            f"{table.images - table.ungrouped:,} images{ungrouped} from {names.shown(table.source)} "
            f"at http://{address}:{port}/{table.kind}",
            flush=True,
        )
    if not loopback:
        print(
            f"plmetric: warning: --host {names.shown(host)} lets other machines browse these images (no login)",
            flush=True,
        )
    if browser.note:
        print(names.shown(browser.note), flush=True)
    return_freed_images_to_the_system()
    config = uvicorn.Config(create_app(browser, allowed, tables), log_level="warning", access_log=False)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, restores the handlers it found, then raises the
    # signal again: Ctrl+C then arrives as KeyboardInterrupt, SIGTERM as _Stopped from the handler below.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_on_signal) if main_thread else None
    how = ""
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        how = " (Ctrl+C)"
    except _Stopped as stop:
        how = f" ({stop})"
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(f"plmetric serve: stopped{how}", flush=True)


class _Stopped(Exception):  # noqa: N818 - a signal, not an error
    """SIGTERM arrived: the page stops as after Ctrl+C (exit status 0)."""


def _stop_on_signal(signum: int, frame: Any) -> None:
    raise _Stopped(signal.Signals(signum).name)
