"""A local web page to browse an index: pick or upload a query image, see its top-k results.

``plmetric serve INDEX`` loads the index (:func:`plmetric.retrieval.index.load_embeddings`) and its model
(:func:`plmetric.retrieval.index.model_from_description`, which checks the checkpoint's SHA-256) once and
serves, on 127.0.0.1 unless told otherwise:

* ``GET /`` (``?page=P``): the indexed images, each a link that searches from it, and an upload form;
* ``GET /search?id=N``: the top-k results of indexed image N (its stored embedding: nothing decoded);
* ``POST /search``: the top-k results of an uploaded image (multipart field ``image``);
* ``GET /api/search?id=N``, ``POST /api/search``: the same as JSON, ``{"index", "top_k", "query",
  "query_id", "results": [{"rank", "id", "path", "score", "missing"}]}``; an error is
  ``{"error": "..."}`` with status 400 (404: unknown id; 413: upload over :data:`MAX_UPLOAD_BYTES`);
* ``GET /thumb/N``, ``GET /image/N``: a downscaled JPEG, the file itself, of indexed image N.

Images are addressed by their number in the index only: no route takes a path, so no request can
reach a file the index does not list. Images moved or deleted since indexing show as missing (their
``/thumb`` and ``/image`` answer 404). The web packages are the optional extra ``serve``.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import ipaddress
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plmetric.retrieval.index import decode_image, load_embeddings, model_from_description, top_k

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
FORM_OVERHEAD_BYTES = 64 * 2**10
THUMB_SIDE = 256
GALLERY_PAGE_SIZE = 48
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


class ServeDependencyError(ImportError):
    """A package of the ``serve`` extra is not installed (the message says how to install it)."""


class QueryError(ValueError):
    """A request that cannot be answered; ``status`` is its HTTP status (400, 404 or 413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Hit:
    """One result: its rank (1 = most similar), its number and path in the index, its cosine score."""

    rank: int
    id: int
    path: str
    score: float
    missing: bool

    @property
    def name(self) -> str:
        """The file name shown on its tile."""
        return Path(self.path).name

    def as_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "id": self.id, "path": self.path, "score": self.score, "missing": self.missing}


@dataclass(frozen=True)
class Query:
    """What was searched from: an indexed image (``id``) or an upload (``thumbnail`` as a data URI)."""

    name: str
    id: int | None = None
    path: str | None = None
    thumbnail: str | None = None


def require_packages() -> None:
    """Check that the ``serve`` extra is installed.

    Raises:
        ServeDependencyError: naming the missing packages and ``pip install "plmetric[serve]"``.
    """
    missing = [dist for module, dist in REQUIRED_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ServeDependencyError(f"plmetric serve needs {', '.join(missing)} (not installed): {INSTALL_HINT}")


def thumbnail_jpeg(image: Any, side: int) -> bytes:
    """A JPEG of ``image`` (a PIL image) shrunk to fit in ``side`` × ``side``, aspect kept."""
    image = image.copy()
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


class Browser:
    """An index and its model, loaded once: searches from an indexed image or an uploaded one.

    Raises (on construction):
        FileNotFoundError, ValueError: not a readable plmetric index.
        IndexMismatchError: the index's checkpoint changed or is gone.
    """

    def __init__(self, index: str | os.PathLike, top_k: int) -> None:
        from plmetric.data.backbones import build_transform

        if top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {top_k}")
        self.index_path = Path(index)
        self.top_k = top_k
        self.embeddings, _, self.paths, description = load_embeddings(index)
        if len(self.paths) == 0:
            raise ValueError(f"index {index} holds no images")
        self.transform = build_transform(description["backbone"], image_size=int(description.get("image_size", 224)))
        self.model = model_from_description(description, index).eval()
        output_dim = int(description.get("output_dim", self.embeddings.shape[1]))
        if output_dim != self.embeddings.shape[1]:
            raise ValueError(
                f"index {index}: its model embeds in dimension {output_dim}, "
                f"its embeddings have dimension {self.embeddings.shape[1]}"
            )
        self._model_lock = threading.Lock()  # one forward pass at a time (requests run in a thread pool)

    def __len__(self) -> int:
        return len(self.paths)

    def path_of(self, image_id: int) -> Path:
        """The recorded path of indexed image ``image_id``.

        Raises:
            QueryError: 404 for a number outside the index.
        """
        if not 0 <= image_id < len(self.paths):
            raise QueryError(f"no image number {image_id}: the index holds images 0 to {len(self.paths) - 1}", 404)
        return Path(self.paths[image_id])

    def search_id(self, image_id: int) -> list[Hit]:
        """The top-k results of indexed image ``image_id`` (itself first, score 1)."""
        self.path_of(image_id)
        return self._hits(self.embeddings[image_id : image_id + 1])

    def search_upload(self, data: bytes, name: str) -> tuple[list[Hit], bytes]:
        """The top-k results of an uploaded image file and its thumbnail (JPEG bytes).

        Raises:
            QueryError: 413 over :data:`MAX_UPLOAD_BYTES`; 400 empty, not an image, or a
                decompression bomb (one line naming the upload).
        """
        if len(data) > MAX_UPLOAD_BYTES:
            raise QueryError(f"upload {name!r} is larger than the limit of {MAX_UPLOAD_BYTES // 2**20} MiB", 413)
        if not data:
            raise QueryError(f"upload {name!r} is empty: choose an image file")
        try:
            image = decode_image(data, f"upload {name!r}")
        except ValueError as err:
            raise QueryError(str(err)) from None
        with self._model_lock, torch.no_grad():
            embedding = self.model(self.transform(image).unsqueeze(0))
        return self._hits(embedding), thumbnail_jpeg(image, THUMB_SIDE)

    def thumbnail(self, image_id: int) -> bytes:
        """A JPEG thumbnail of indexed image ``image_id``.

        Raises:
            QueryError: 404 for an unknown number, or an image moved, deleted or unreadable since indexing.
        """
        path = self.path_of(image_id)
        try:
            return thumbnail_jpeg(decode_image(path, f"image {image_id}", max_side=THUMB_SIDE), THUMB_SIDE)
        except FileNotFoundError:
            raise QueryError(f"image {image_id} ({path}) is missing: moved or deleted since indexing", 404) from None
        except ValueError as err:
            raise QueryError(str(err), 404) from None

    def image_file(self, image_id: int) -> Path:
        """The file of indexed image ``image_id``.

        Raises:
            QueryError: 404 for an unknown number or a missing file.
        """
        path = self.path_of(image_id)
        if not path.is_file():
            raise QueryError(f"image {image_id} ({path}) is missing: moved or deleted since indexing", 404)
        return path

    def _hits(self, query: torch.Tensor) -> list[Hit]:
        scores, indices = top_k(query, self.embeddings, self.top_k)
        found = zip(scores[0].tolist(), indices[0].tolist(), strict=True)
        return [
            Hit(rank, i, self.paths[i], score, not Path(self.paths[i]).is_file())
            for rank, (score, i) in enumerate(found, start=1)
        ]


def _image_id(text: str | None) -> int:
    if text is None or not text.strip().isdigit():
        raise QueryError(f"id must be the number of an indexed image (0, 1, ...), got {text!r}")
    return int(text)


async def read_upload(request: Any) -> tuple[str, bytes]:
    """The file name and bytes of the ``image`` field of a multipart upload, read with a size limit.

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
        return upload.filename or "upload", await upload.read()
    finally:
        await form.close()


def create_app(browser: Browser, allowed_hosts: list[str] | None = None) -> Any:
    """The Starlette application serving ``browser`` (see the module docstring for its routes).

    Args:
        allowed_hosts: accept only requests whose ``Host`` header is one of these (a page bound to
            127.0.0.1 then cannot be read by another site through DNS rebinding); None accepts any.
    """
    from jinja2 import Environment, PackageLoader, select_autoescape
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    templates = Environment(loader=PackageLoader("plmetric.retrieval", "templates"), autoescape=select_autoescape(["html"]))
    template = templates.get_template("serve.html")
    pages = (len(browser) + GALLERY_PAGE_SIZE - 1) // GALLERY_PAGE_SIZE

    def render(status: int = 200, **context: Any) -> HTMLResponse:
        html = template.render(
            index=browser.index_path.name,
            count=len(browser),
            top_k=browser.top_k,
            max_upload_mib=MAX_UPLOAD_BYTES // 2**20,
            **context,
        )
        return HTMLResponse(html, status_code=status)

    async def run_query(request: Any) -> tuple[Query, list[Hit]]:
        if request.method == "POST":
            name, data = await read_upload(request)
            hits, thumb = await run_in_threadpool(browser.search_upload, data, name)
            return Query(name=name, thumbnail="data:image/jpeg;base64," + base64.b64encode(thumb).decode()), hits
        image_id = _image_id(request.query_params.get("id"))
        hits = browser.search_id(image_id)
        path = browser.paths[image_id]
        return Query(name=Path(path).name, id=image_id, path=path), hits

    async def home(request: Any) -> HTMLResponse:
        text = request.query_params.get("page", "1")
        if not text.isdigit() or not 1 <= int(text) <= pages:
            return render(404, error=f"no page {text!r}: pages 1 to {pages}")
        page = int(text)
        first = (page - 1) * GALLERY_PAGE_SIZE
        gallery = [  # tiles without a rank or score
            Hit(0, i, browser.paths[i], 0.0, not Path(browser.paths[i]).is_file())
            for i in range(first, min(first + GALLERY_PAGE_SIZE, len(browser)))
        ]
        return render(gallery=gallery, page=page, pages=pages)

    async def search_page(request: Any) -> HTMLResponse:
        try:
            query, hits = await run_query(request)
        except QueryError as err:
            return render(err.status, error=str(err))
        return render(query=query, hits=hits)

    async def search_api(request: Any) -> JSONResponse:
        try:
            query, hits = await run_query(request)
        except QueryError as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        return JSONResponse(
            {
                "index": str(browser.index_path.resolve()),
                "top_k": browser.top_k,
                "query": query.path or query.name,
                "query_id": query.id,
                "results": [hit.as_json() for hit in hits],
            }
        )

    def thumb(request: Any) -> Response:  # plain functions run in Starlette's thread pool
        try:
            data = browser.thumbnail(request.path_params["image_id"])
        except QueryError as err:
            return PlainTextResponse(str(err), status_code=err.status)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=60"})

    def image(request: Any) -> Response:
        try:
            path = browser.image_file(request.path_params["image_id"])
        except QueryError as err:
            return PlainTextResponse(str(err), status_code=err.status)
        return FileResponse(path, headers={"X-Content-Type-Options": "nosniff"}, content_disposition_type="inline")

    routes = [
        Route("/", home),
        Route("/search", search_page, methods=["GET", "POST"]),
        Route("/api/search", search_api, methods=["GET", "POST"]),
        Route("/thumb/{image_id:int}", thumb),
        Route("/image/{image_id:int}", image),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts else []
    return Starlette(routes=routes, middleware=middleware)


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


def serve(index: str | os.PathLike, *, host: str, port: int, top_k: int) -> None:
    """Load ``index`` and its model, print the page's URL and serve it until Ctrl+C (or SIGTERM).

    Raises:
        ServeDependencyError: the ``serve`` extra is missing.
        FileNotFoundError, ValueError: a bad index, or an address that cannot be bound.
    """
    if not Path(index).is_file():  # before the dependencies: the file is the first thing to get right
        raise FileNotFoundError(f"index file not found: {index}")
    require_packages()
    import uvicorn

    browser = Browser(index, top_k)
    loopback = is_loopback(host)
    allowed = sorted({*LOOPBACK_NAMES, f"[{host}]" if ":" in host else host}) if loopback else None
    sock = listen_socket(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"plmetric serve: {len(browser):,} images of {index} at http://{shown}:{port}/ (Ctrl+C stops)", flush=True)
    if not loopback:
        print(f"plmetric: warning: --host {host} lets other machines browse these images (no login)", flush=True)
    config = uvicorn.Config(create_app(browser, allowed), log_level="warning", access_log=False)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C closes the page: uvicorn shut down, then re-raised it
        uvicorn.Server(config).run(sockets=[sock])
    print("plmetric serve: stopped", flush=True)
