"""plmetric serve: the page, the JSON API, uploads and their limits, thumbnails by number only, and
the whole thing end to end in a real headless browser (Debian's chromium, skipped when absent).

The index is built once from eight real CUB images (two of each of four species, copied under
unique names) with a randomly initialised EfficientNet-Lite0 checkpoint at 32 px: what is checked
is the plumbing (which image comes back, at which rank, with which score), not retrieval quality.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

import plmetric
from plmetric.retrieval import serve as serve_module
from plmetric.core.checkpoint import save_model
from plmetric.cli import main
from plmetric.data.backbones import create_model
from plmetric.retrieval.serve import Browser, create_app

pytest.importorskip("starlette", reason='plmetric serve needs the serve extra: pip install "plmetric[serve]"')
pytest.importorskip("httpx", reason="the web test client needs httpx (the test extra)")

from starlette.testclient import TestClient  # noqa: E402

SPECIES, PER_SPECIES, TOP_K = 4, 2, 5
# A stored embedding is a float32 unit vector of dimension d = 16; its dot product with itself is 1
# up to d rounding errors of at most 2^-24 each (<= 1e-6): 1e-5 leaves a margin of 10.
SELF_SCORE_TOLERANCE = 1e-5
# An upload of an indexed file is decoded and embedded again, alone instead of in a batch: the same
# arithmetic in another summation order, a relative difference of float32 rounding per layer.
UPLOAD_SCORE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pile(tmp_path_factory, cub_root) -> dict:
    """Eight real images, a checkpoint and the index of the images built with it."""
    root = tmp_path_factory.mktemp("serve")
    folder = root / "pile"
    folder.mkdir()
    species = sorted(p for p in (cub_root / "CUB_200_2011" / "images").iterdir() if p.is_dir())[:SPECIES]
    images = []
    for kind in species:
        for source in sorted(kind.glob("*.jpg"))[:PER_SPECIES]:
            images.append(folder / f"{kind.name}_{source.name}")
            shutil.copyfile(source, images[-1])
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=16, pretrained=False)
    meta = {"backbone": "efficientnet_lite0", "embedding_dim": 16, "output_dim": 16, "image_size": 32}
    ckpt = save_model(root / "model.safetensors", model, meta)
    index = root / "pile.safetensors"
    small = ["--image-size", "32", "--no-progress", "--num-workers", "0"]
    assert main(["index", str(folder), "--checkpoint", str(ckpt), "--out", str(index), *small]) == 0
    (root / "secret.txt").write_text("not for the web\n")
    return {"root": root, "images": sorted(p.resolve() for p in images), "index": index, "ckpt": ckpt}


@pytest.fixture(scope="module")
def browser(pile) -> Browser:
    return Browser(pile["index"], TOP_K)


@pytest.fixture(scope="module")
def client(browser) -> TestClient:
    with TestClient(create_app(browser)) as test_client:
        yield test_client


class Tiles(HTMLParser):
    """The tiles of a served page: each ``li.tile`` with its attributes, images, links and file name."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tiles: list[dict] = []
        self.error: list[str] = []
        self._in_name = self._in_error = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "li" and "tile" in classes:
            self.tiles.append({"classes": classes, **attrs, "imgs": [], "links": [], "name": ""})
        elif self.tiles and tag == "img":
            self.tiles[-1]["imgs"].append(attrs)
        elif self.tiles and tag == "a":
            self.tiles[-1]["links"].append(attrs.get("href"))
        self._in_name = self._in_name or (tag == "div" and "name" in classes and bool(self.tiles))
        self._in_error = self._in_error or (tag == "p" and "error" in classes)

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            self._in_name = False
        if tag == "p":
            self._in_error = False

    def handle_data(self, data: str) -> None:
        if self._in_name:
            self.tiles[-1]["name"] += data.strip()
        if self._in_error:
            self.error.append(data.strip())

    def results(self) -> list[dict]:
        return [t for t in self.tiles if "result" in t["classes"]]


def caption(name: str) -> str:
    """A file name as a tile's caption shows it (shortened in the middle; the full path is its tooltip)."""
    from plmetric.retrieval.serve import CAPTION_CHARS
    from plmetric.training.report import shorten_name

    return shorten_name(name, CAPTION_CHARS)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG header that declares a huge image (a decompression bomb) with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def test_the_page_shows_every_indexed_image_as_a_link_to_search_from_it(client, pile):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    tiles = Tiles(page.text).tiles
    assert [t["name"] for t in tiles] == [caption(p.name) for p in pile["images"]]
    assert [t["links"][0] for t in tiles] == [f"/search?id={i}" for i in range(len(pile["images"]))]
    assert 'enctype="multipart/form-data"' in page.text and 'name="image"' in page.text
    assert client.get("/?page=2").status_code == 404 and client.get("/?page=x").status_code == 400


def test_searching_from_an_indexed_image_returns_the_top_k_others(client, browser, pile, monkeypatch):
    """Searching from indexed image N leaves N out and still returns TOP_K results: those of the plain
    top-(k+1) (with ``include_self``: N first, score 1) without N, ranked again from 1."""
    names = {caption(p.name) for p in pile["images"]}
    for image_id in (0, 5):
        monkeypatch.setattr(browser, "include_self", True)
        with_self = client.get(f"/api/search?id={image_id}").json()["results"]
        assert [r["rank"] for r in with_self] == list(range(1, TOP_K + 1))
        assert with_self[0]["id"] == image_id and abs(with_self[0]["score"] - 1) < SELF_SCORE_TOLERANCE
        monkeypatch.setattr(browser, "top_k", TOP_K + 1)
        longer = client.get(f"/api/search?id={image_id}").json()["results"]
        monkeypatch.setattr(browser, "top_k", TOP_K)
        monkeypatch.setattr(browser, "include_self", False)
        page = client.get(f"/search?id={image_id}")
        assert page.status_code == 200
        results = Tiles(page.text).results()
        assert len(results) == TOP_K
        assert [int(t["data-rank"]) for t in results] == list(range(1, TOP_K + 1))
        assert image_id not in [int(t["data-id"]) for t in results]
        assert 'id="query" data-id="%d"' % image_id in page.text  # shown as the query, not as a result
        assert {t["name"] for t in results} <= names and all(
            f"/thumb/{t['data-id']}" in str(t["imgs"]) for t in results
        )
        assert [t["links"][0] for t in results] == [f"/search?id={t['data-id']}" for t in results]  # click: search on
        api = client.get(f"/api/search?id={image_id}").json()
        assert api["query"] == str(pile["images"][image_id]) and api["query_id"] == image_id and api["top_k"] == TOP_K
        ranks = api["results"]
        assert [r["rank"] for r in ranks] == list(range(1, TOP_K + 1))
        assert [(r["id"], r["score"]) for r in ranks] == [(r["id"], r["score"]) for r in longer[1:]]
        assert all(a["score"] >= b["score"] for a, b in zip(ranks, ranks[1:], strict=False))
        assert [r["path"] for r in ranks] == [str(pile["images"][r["id"]]) for r in ranks]
        assert [r["id"] for r in ranks] == [int(t["data-id"]) for t in results]
        assert not any(r["missing"] for r in ranks)
    for bad, status in (("abc", 400), ("-1", 400), ("", 400), ("8", 404), ("99999999999", 404)):
        response = client.get(f"/api/search?id={bad}")
        assert response.status_code == status and "error" in response.json(), bad
        assert client.get(f"/search?id={bad}").status_code == status


def test_an_uploaded_image_is_searched_and_shown(client, pile):
    target = 3
    data = pile["images"][target].read_bytes()
    api = client.post("/api/search", files={"image": ("my query.jpg", data, "image/jpeg")})
    assert api.status_code == 200, api.text
    body = api.json()
    assert body["query"] == "my query.jpg" and body["query_id"] is None and len(body["results"]) == TOP_K
    assert body["results"][0]["id"] == target and abs(body["results"][0]["score"] - 1) < UPLOAD_SCORE_TOLERANCE
    page = client.post("/search", files={"image": ("my query.jpg", data, "image/jpeg")})
    assert page.status_code == 200 and "my query.jpg" in page.text and 'src="data:image/jpeg;base64,' in page.text
    results = Tiles(page.text).results()
    assert len(results) == TOP_K and int(results[0]["data-id"]) == target


def test_bad_uploads_get_one_clear_error(client, pile, monkeypatch):
    text = ("notes.jpg", b"this is not an image\n", "image/jpeg")
    cases = [
        ({"files": {"image": text}}, 400, "cannot read upload 'notes.jpg'"),
        ({"files": {"image": ("empty.png", b"", "image/png")}}, 400, "is empty"),
        ({"files": {"image": ("bomb.png", _png_claiming(40000, 40000), "image/png")}}, 413, "too large to decode"),
        ({"files": {"image": ("big.png", _png_claiming(8000, 6251), "image/png")}}, 413, "50 megapixels"),
        ({"files": {"other": text}}, 400, "field 'image'"),
        ({"data": {"image": "a text field"}, "files": {"x": text}}, 400, "field 'image'"),
        ({"json": {"image": "x"}}, 400, "multipart/form-data"),
        ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data"}}, 400, "malformed upload"),
    ]
    for kwargs, status, message in cases:
        api = client.post("/api/search", **kwargs)
        assert api.status_code == status and message in api.json()["error"], (kwargs, api.text)
        page = client.post("/search", **kwargs)
        assert page.status_code == status and "Traceback" not in page.text
        assert len(Tiles(page.text).error) == 1 and message in Tiles(page.text).error[0] and not Tiles(page.text).tiles

    monkeypatch.setattr(serve_module, "MAX_UPLOAD_BYTES", 2000)
    monkeypatch.setattr(serve_module, "FORM_OVERHEAD_BYTES", 500)
    big = ("big.jpg", pile["images"][0].read_bytes()[:3000], "image/jpeg")
    for path in ("/api/search", "/search"):
        response = client.post(path, files={"image": big})
        assert response.status_code == 413 and "larger than the limit" in response.text
    # without a Content-Length (chunked), the limit holds while the body streams in
    body = (
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n' + big[1] + b"\r\n--b--\r\n"
    )
    chunks = (body[i : i + 512] for i in range(0, len(body), 512))
    response = client.post("/api/search", content=chunks, headers={"content-type": "multipart/form-data; boundary=b"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413 and "larger than the limit" in response.json()["error"]


def test_thumbnails_and_images_are_served_by_number_only(client, pile, monkeypatch):
    with Image.open(pile["images"][0]) as original:
        side = max(original.size) // 3  # the CUB subset's images are small: thumbnails smaller still
    monkeypatch.setattr(serve_module, "THUMB_SIDE", side)
    thumb = client.get("/thumb/0")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as img:
        assert max(img.size) == side
    full = client.get("/image/0")  # decoded and re-encoded: never the file's bytes
    assert full.status_code == 200 and full.headers["content-type"] == "image/jpeg"
    assert full.content != pile["images"][0].read_bytes()
    with Image.open(io.BytesIO(full.content)) as served, Image.open(pile["images"][0]) as original:
        assert served.size == original.size
    for out_of_range in ("/thumb/8", "/thumb/123456789", "/image/8"):
        assert client.get(out_of_range).status_code == 404, out_of_range
    assert client.get("/thumb/-1").status_code == 400 and client.get("/image/-1").status_code == 400
    secrets = [(pile["root"] / "secret.txt").read_bytes(), Path("/etc/passwd").read_bytes()]
    for attempt in (
        "/thumb/..%2Fsecret.txt",
        "/image/..%2F..%2Fsecret.txt",
        "/image/%2e%2e/%2e%2e/secret.txt",
        "/image/0%2F..%2F..%2Fsecret.txt",
        "/image/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/image//etc/passwd",
        "/thumb/0/../../secret.txt",
        f"/image/{pile['root'] / 'secret.txt'}",
        "/image/0?path=../secret.txt",
        "/image/1?id=../../etc/passwd",
    ):
        response = client.get(attempt)
        assert all(s not in response.content for s in secrets), attempt
        assert response.status_code in (400, 404) or response.headers["content-type"].startswith("image/"), attempt


def test_images_moved_since_indexing_show_as_missing(client, browser, pile, monkeypatch):
    monkeypatch.setattr(browser, "include_self", True)  # image 6 among its own results
    moved = pile["images"][6]
    away = moved.with_name("moved.bin")
    moved.rename(away)
    try:
        page = client.get("/search?id=6")  # the stored embedding still answers
        assert page.status_code == 200
        first = Tiles(page.text).results()[0]
        assert int(first["data-id"]) == 6 and "missing" in first["classes"] and not first["imgs"]
        assert "(missing)" in first["name"]
        assert client.get("/api/search?id=6").json()["results"][0]["missing"] is True
        for path in ("/thumb/6", "/image/6"):
            response = client.get(path)
            assert response.status_code == 404 and "moved or deleted since indexing" in response.text
        gallery = Tiles(client.get("/").text).tiles
        assert "missing" in gallery[6]["classes"] and "missing" not in gallery[5]["classes"]
    finally:
        away.rename(moved)


def test_a_page_bound_to_localhost_answers_only_local_host_names(browser):
    app = create_app(browser, allowed_hosts=["127.0.0.1", "localhost"])
    assert TestClient(app, base_url="http://attacker.example").get("/").status_code == 400
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/").status_code == 200


def test_the_command_line_refuses_bad_input_in_one_line(pile, capsys, monkeypatch, tmp_path):
    capsys.readouterr()
    assert main(["serve", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 127.0.0.1)", "(default: 8000)", "(default: 12)", "index written by 'plmetric index'"):
        assert shown in help_text
    for shown in ("--include-self", "--groups FILE", "--duplicates FILE", "'plmetric groups'", "'plmetric duplicates'"):
        assert shown in help_text
    # the routes, with the numbers the page runs with
    for shown in (
        "/search?id=N", "POST /search", "/api/search?id=N", f"&top_k=K (1 to {serve_module.MAX_API_TOP_K})",
        "/thumb/N, /image/N", f"{serve_module.THUMB_SIDE} px", f"{serve_module.GALLERY_PAGE_SIZE} a page",
        f"{serve_module.MAX_UPLOAD_BYTES // 2**20} MiB", f"{serve_module.MAX_UPLOAD_PIXELS / 1e6:g} megapixels",
        "/groups, /groups/G", "/duplicates[/G]", "410 changed since indexing",
    ):
        assert shown in help_text, shown
    # groups/duplicates tables: each refused with one line naming the option and the table, before listening
    images = pile["images"]
    foreign = tmp_path / "foreign.csv"
    foreign.write_text(f"group,path\n1,{images[0]}\n")
    outside = _group_table(tmp_path / "outside.csv", "groups", {1: [images[0], pile["root"] / "secret.txt"]})
    duplicates = _group_table(tmp_path / "dups.csv", "duplicates", {1: images[:2]})
    groups = _group_table(tmp_path / "groups.csv", "groups", {1: images[:2]})
    zero = _group_table(tmp_path / "zero.csv", "groups", {0: images[:2]})
    other_index = "0" * 64  # the identity of another index (index_identity: a SHA-256)
    theirs = _group_table(tmp_path / "theirs.csv", "duplicates", {1: images[:2]}, index_id=other_index)
    for argv, expected in (
        (["--groups", str(tmp_path / "none.csv")], ["--groups", "none.csv", "not found"]),
        (["--groups", str(foreign)], ["--groups", "foreign.csv", "not a table written by plmetric groups"]),
        (["--duplicates", str(foreign)], ["--duplicates", "foreign.csv", "not a table written by plmetric duplicates"]),
        (["--groups", str(outside)], ["--groups", "outside.csv", "row 2", "secret.txt", "not an image of the index"]),
        (["--groups", str(duplicates)], ["--groups", "dups.csv", "give it as --duplicates"]),
        (["--duplicates", str(groups)], ["--duplicates", "groups.csv", "give it as --groups"]),
        (["--groups", str(zero)], ["--groups", "zero.csv", "group 0", "numbered from 1"]),
        (["--duplicates", str(theirs)], ["--duplicates", "theirs.csv", "plmetric duplicates from another index"]),
    ):
        code = main(["serve", str(pile["index"]), "--port", str(_free_port()), *argv])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and all(e in err for e in expected), (argv, err)
        assert "Traceback" not in err
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = str(taken.getsockname()[1])
        for argv, expected in (
            (["serve", str(pile["index"]), "--port", port], ["cannot listen", f"--port {port}"]),
            (["serve", str(pile["index"]), "--port", "65536"], ["--port", "1 to 65535"]),
            (["serve", str(pile["index"]), "--host", "192.0.2.1"], ["cannot listen", "--host 192.0.2.1"]),  # not ours
            (["serve", str(pile["root"] / "none.safetensors")], ["none.safetensors", "not found"]),
            (["serve", str(pile["ckpt"])], ["model.safetensors", "not a plmetric index"]),
        ):
            code = main(argv)
            err = capsys.readouterr().err
            assert code == 2 and len(err.strip().splitlines()) == 1 and all(e in err for e in expected), (argv, err)
    finally:
        taken.close()
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", str(pile["index"])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "uvicorn" in err and 'pip install "plmetric[serve]"' in err


# ---- end to end: `plmetric serve` in a subprocess, Debian's chromium headless as the browser ----

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
START_TIMEOUT_S = 240  # importing torch and loading the model on a loaded 2-core machine
BROWSER_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_serving(url: str, server: subprocess.Popen, log: Path) -> None:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"plmetric serve exited with {server.returncode}: {log.read_text()[-2000:]}")
        try:
            with direct.open(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    pytest.fail(f"plmetric serve did not answer {url} within {START_TIMEOUT_S} s: {log.read_text()[-2000:]}")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGINT)  # Ctrl+C: uvicorn shuts down cleanly
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)


@pytest.mark.slow
def test_end_to_end_in_a_headless_browser(pile, tmp_path):
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None:
        pytest.skip(f"no headless browser found (looked for {', '.join(BROWSERS)}; apt-get install chromium)")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    groups = _group_table(tmp_path / "groups.csv", "groups", {1: [pile["images"][i] for i in (4, 1, 7)]})
    source = [
        str(Path(plmetric.__file__).parents[1]),
        *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(source)}  # the server runs this checkout's plmetric
    command = [
        sys.executable,
        "-m",
        "plmetric.cli",
        "serve",
        str(pile["index"]),
        "--port",
        str(port),
        "--top-k",
        str(TOP_K),
        "--groups",
        str(groups),
    ]
    profile = tmp_path / "profile"
    # Headless Chromium as root needs --no-sandbox; its own profile folder, no proxy, no GPU.
    chrome = [
        found,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-proxy-server",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
    ]

    def dom(url: str) -> str:
        done = subprocess.run([*chrome, "--dump-dom", url], capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
        assert done.returncode == 0 and "<html" in done.stdout, done.stderr[-2000:]
        return done.stdout

    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_serving(base + "/", server, log)
        assert f"at {base}/" in log.read_text()
        gallery = Tiles(dom(base + "/")).tiles
        assert [t["name"] for t in gallery] == [caption(p.name) for p in pile["images"]]
        query = 2
        page = dom(f"{base}/search?id={query}")
        results = Tiles(page).results()
        assert len(results) == TOP_K and query not in [int(t["data-id"]) for t in results]  # itself left out
        assert f'id="query" data-id="{query}"' in page
        assert all(t["name"] in {caption(p.name) for p in pile["images"]} for t in results)
        # every thumbnail was fetched and decoded by the browser (each <img> sets data-loaded on load)
        assert all(t["imgs"] and t["imgs"][0].get("data-loaded") == "1" for t in results), results
        # a click on a result is its link: a plain <a href>, followed here as the browser would
        second = results[1]
        page = dom(base + second["links"][0])
        again = Tiles(page).results()
        assert len(again) == TOP_K and f'id="query" data-id="{second["data-id"]}"' in page
        assert second["data-id"] not in [t["data-id"] for t in again]
        # --groups: the group's members, their thumbnails decoded by the browser, each a link to search from it
        members = Tiles(dom(f"{base}/groups/1")).tiles
        assert [int(t["data-id"]) for t in members] == [4, 1, 7]
        assert all(t["imgs"] and t["imgs"][0].get("data-loaded") == "1" for t in members), members
        assert [t["links"][0] for t in members] == ["/search?id=4", "/search?id=1", "/search?id=7"]
        shot = tmp_path / "results.png"
        done = subprocess.run(
            [
                *chrome,
                "--hide-scrollbars",
                "--window-size=1280,900",
                f"--screenshot={shot}",
                f"{base}/search?id={query}",
            ],
            capture_output=True,
            text=True,
            timeout=BROWSER_TIMEOUT_S,
        )
        assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
        with Image.open(shot) as img:
            assert img.size == (1280, 900)
            colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is not None and len(colours) > 1000  # photographs, not a blank or an error page
        print(f"\nscreenshot: {shot}")
    finally:
        _stop(server)
    assert server.returncode == 0 and log.read_text().rstrip().endswith("plmetric serve: stopped (Ctrl+C)")


# ---- security: only indexed images, decoded and re-encoded; ids; upload limits; memory; SIGTERM ----

SMALL = ["--image-size", "32", "--no-progress", "--num-workers", "0"]


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    """A random EfficientNet-Lite0 checkpoint at 32 px (no real data needed)."""
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=16, pretrained=False)
    meta = {"backbone": "efficientnet_lite0", "embedding_dim": 16, "output_dim": 16, "image_size": 32}
    return save_model(tmp_path_factory.mktemp("ckpt") / "model.safetensors", model, meta)


def _random_image(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    rng = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=rng, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def _every_response(client, count: int) -> list:
    paths = ["/", "/?page=1"] + [
        f"{route}{i}" for i in range(count) for route in ("/image/", "/thumb/", "/search?id=", "/api/search?id=")
    ]
    return [(path, client.get(path)) for path in paths]


def test_never_serves_a_file_outside_the_index(tmp_path, small_ckpt):
    """Indexed files swapped for links (to a system file, to an image elsewhere), a folder swapped for a
    link, a file overwritten by text with its size and mtime forged, an index whose paths were edited
    to a system file, a text file, a FIFO and a folder: none of their bytes is ever in a response,
    each answers 404 or 410 with one short line; untouched images come back decoded and re-encoded."""
    folder, outside = tmp_path / "photos", tmp_path / "outside"
    (folder / "sub").mkdir(parents=True)
    (outside / "sub").mkdir(parents=True)
    names = ["a0.png", "a1.png", "a2.png", "a3.png", "a4.png", "b5.jpg", "sub/c6.png"]
    images = [_random_image(folder / name, seed) for seed, name in enumerate(names)]
    secret = outside / "secret.txt"
    secret.write_bytes(b"TOP-SECRET not an image " * 40)
    elsewhere = _random_image(outside / "other.png", 99)
    _random_image(outside / "sub" / "c6.png", 98)
    index = tmp_path / "i.safetensors"
    assert main(["index", str(folder), "--checkpoint", str(small_ckpt), "--out", str(index), *SMALL]) == 0
    browser = Browser(index, 3)
    assert browser.note is None and [Path(p) for p in browser.paths] == sorted(p.resolve() for p in images)
    order = {Path(p).name: i for i, p in enumerate(browser.paths)}
    secrets = [secret.read_bytes(), Path("/etc/passwd").read_bytes()]

    # the attacks, after the page started
    (folder / "a0.png").unlink()
    (folder / "a0.png").symlink_to("/etc/passwd")
    (folder / "a1.png").unlink()
    (folder / "a1.png").symlink_to(elsewhere)  # an image, but outside the index: a link is never followed
    recorded = (folder / "a2.png").stat()
    forged = secrets[0][: recorded.st_size].ljust(recorded.st_size, b" ")
    (folder / "a2.png").write_bytes(forged)  # text, same size and mtime: only decoding can tell
    os.utime(folder / "a2.png", ns=(recorded.st_atime_ns, recorded.st_mtime_ns))
    secrets.append(forged)
    _random_image(folder / "a3.png", 7, size=(30, 30))  # another image: size/mtime differ
    (folder / "sub").rename(folder / "sub_moved")
    (folder / "sub").symlink_to(outside / "sub", target_is_directory=True)  # a folder on the path now a link

    expected = {"a0.png": 404, "a1.png": 404, "a2.png": 404, "a3.png": 410, "c6.png": 404}
    with TestClient(create_app(browser)) as client:
        for name, status in expected.items():
            for route in ("/image/", "/thumb/"):
                response = client.get(f"{route}{order[name]}")
                assert response.status_code == status, (name, route, response.text)
                assert response.headers["content-type"].startswith("text/plain") and len(response.text) < 400
                assert len(response.text.splitlines()) == 1 and "image" in response.text
        assert "link" in client.get(f"/image/{order['a1.png']}").text
        assert "changed since indexing" in client.get(f"/image/{order['a3.png']}").text
        png = client.get(f"/image/{order['a4.png']}")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content != (folder / "a4.png").read_bytes()  # re-encoded, never the file
        with Image.open(io.BytesIO(png.content)) as served, Image.open(folder / "a4.png") as original:
            assert served.tobytes() == original.convert("RGB").tobytes()  # PNG: the same pixels
        jpeg = client.get(f"/image/{order['b5.jpg']}")
        assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
        assert client.get(f"/thumb/{order['a4.png']}").status_code == 200
        for path, response in _every_response(client, len(browser)):
            assert all(s not in response.content for s in secrets), path

    # an index whose paths were edited (with matching sizes and times, as its editor would write them)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    edited = tmp_path / "edited.safetensors"
    targets = ["/etc/passwd", str(secret), str(fifo), str(outside), str(folder / "a4.png")]
    from plmetric.retrieval.index import load_embeddings, save_embeddings

    emb, labels, _, model = load_embeddings(index)
    save_embeddings(edited, emb[:5], labels[:5], targets, model)
    with TestClient(create_app(Browser(edited, 3))) as client:
        for image_id in range(4):
            for route in ("/image/", "/thumb/"):
                assert client.get(f"{route}{image_id}").status_code == 404, (targets[image_id], route)
        assert client.get("/image/4").status_code == 200  # an image at its real path is still served
        for path, response in _every_response(client, 5):
            assert all(s not in response.content for s in secrets), path

    # an index from before file sizes and times were recorded: the decode check alone, said once
    from safetensors.torch import save_file

    from plmetric.retrieval.index import INDEX_KEY, read_index_metadata

    old = tmp_path / "old.safetensors"
    meta = json.dumps({**read_index_metadata(edited), "paths": targets})
    save_file({"embeddings": emb[:5], "labels": labels[:5]}, str(old), metadata={INDEX_KEY: meta})
    old_browser = Browser(old, 3)
    assert old_browser.note is not None and "records no file sizes and times" in old_browser.note
    with TestClient(create_app(old_browser)) as client:
        assert [client.get(f"/image/{i}").status_code for i in range(5)] == [404, 404, 404, 404, 200]
        for path, response in _every_response(client, 5):
            assert all(s not in response.content for s in secrets), path


BAD_IDS = ["١٢", "²", "１", "-1", "+1", " 1", "1 ", "0x1", "1.0", "1e3", "", "1" * 5000 + "x", "1\n", "٣"]
OUT_OF_RANGE_IDS = ["8", "99999999999", "9" * 19, "1" * 5000]


def test_malformed_ids_answer_400_and_unknown_ones_404(client):
    """Every id that is not ASCII digits is malformed (400), every number outside the index 404, on
    every route; never a 500 (a non-ASCII digit or 5000 digits used to crash int())."""
    for bad in BAD_IDS:
        for response in (
            client.get("/api/search", params={"id": bad}),
            client.get("/search", params={"id": bad}),
            client.get("/", params={"page": bad}),
        ):
            assert response.status_code == 400, (bad[:20], response.url, response.text[:200])
        for route in ("/thumb/", "/image/"):
            if bad.strip():  # an empty or blank path segment is another route: 404
                response = client.get(route + urllib.parse.quote(bad))
                assert response.status_code == 400, (bad[:20], route, response.text[:200])
                assert len(response.text) < 300
    assert client.get("/api/search", params={"id": "١٢"}).json()["error"].startswith("id must be a number")
    for unknown in OUT_OF_RANGE_IDS:
        for response in (
            client.get("/api/search", params={"id": unknown}),
            client.get("/search", params={"id": unknown}),
            client.get("/", params={"page": unknown}),
            client.get("/thumb/" + unknown),
            client.get("/image/" + unknown),
        ):
            assert response.status_code == 404, (unknown[:20], response.url, response.text[:200])
    assert client.get("/thumb/007").status_code == 200  # leading zeros are still a number


def test_uploads_are_bounded_in_pixels_and_decoded_a_few_at_a_time(client, browser, pile, monkeypatch):
    data = pile["images"][0].read_bytes()
    with Image.open(pile["images"][0]) as img:
        pixels = img.size[0] * img.size[1]
    monkeypatch.setattr(serve_module, "MAX_UPLOAD_PIXELS", pixels - 1)  # refused from the header, 413
    response = client.post("/api/search", files={"image": ("photo.jpg", data, "image/jpeg")})
    assert response.status_code == 413 and f"= {pixels:,} pixels, over the limit of {pixels - 1:,}" in response.text
    monkeypatch.setattr(serve_module, "MAX_UPLOAD_PIXELS", pixels)
    assert client.post("/api/search", files={"image": ("photo.jpg", data, "image/jpeg")}).status_code == 200
    # every decode slot held (as by slow decodes): an upload waits DECODE_WAIT_S, then 429
    monkeypatch.setattr(serve_module, "DECODE_WAIT_S", 0.2)
    held = [browser._decode_slots.acquire(timeout=5) for _ in range(serve_module.DECODE_SLOTS)]
    try:
        assert all(held)
        for path in ("/api/search", "/search"):
            response = client.post(path, files={"image": ("photo.jpg", data, "image/jpeg")})
            assert response.status_code == 429 and "busy decoding" in response.text
        assert client.get("/thumb/0").status_code == 429
    finally:
        for _ in held:
            browser._decode_slots.release()
    assert client.post("/api/search", files={"image": ("photo.jpg", data, "image/jpeg")}).status_code == 200


def test_upload_errors_name_the_file_escaped(client):
    """An upload is named by its file name (quoted, HTML-escaped on the page), never by the repr of an
    in-memory file (``<_io.BytesIO object at 0x...>``)."""
    name = "<script>alert(1)</script> été.jpg"
    for path in ("/api/search", "/search"):
        response = client.post(path, files={"image": (name, b"not an image at all", "image/jpeg")})
        assert response.status_code == 400 and "object at 0x" not in response.text and "BytesIO" not in response.text
        if path == "/api/search":
            assert response.json()["error"].startswith(f"cannot read upload {name!r}: not an image")
        else:
            assert "<script>alert" not in response.text
            assert "&lt;script&gt;alert(1)&lt;/script&gt; été.jpg" in response.text


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "plmetric-test-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


UPLOAD_SIDE = (8000, 4500)  # 36 MP, under MAX_UPLOAD_PIXELS; a flat PNG of it is ~100 KB
CONCURRENT_UPLOADS = 6


def run_upload_storm(index: Path, tmp_path: Path, slots: int | None = None) -> dict:
    """Start ``plmetric serve`` (with ``slots`` decode slots if given), upload a 36 MP PNG
    CONCURRENT_UPLOADS times at once, stop it with SIGTERM: the statuses, RSS figures (KiB), log, exit status."""
    import threading

    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc (Linux) to read the server's peak memory")
    buffer = io.BytesIO()
    Image.new("RGB", UPLOAD_SIDE, (120, 60, 30)).save(buffer, "PNG")
    body, content_type = _multipart("huge.png", buffer.getvalue())
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / f"serve-{slots}.log"
    source = [
        str(Path(plmetric.__file__).parents[1]),
        *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(source)}
    launcher = (
        "import sys, plmetric.retrieval.serve as s; from plmetric.cli import main\n"
        "if sys.argv[1] != 'default': s.DECODE_SLOTS = int(sys.argv[1])\n"
        "sys.exit(main(sys.argv[2:]))"
    )
    command = [sys.executable, "-c", launcher, str(slots or "default"), "serve", str(index), "--port", str(port)]
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def post(statuses: list, i: int) -> None:
        request = urllib.request.Request(
            base + "/api/search", data=body, headers={"Content-Type": content_type}, method="POST"
        )
        try:
            with direct.open(request, timeout=120) as response:
                statuses[i] = response.status
        except urllib.error.HTTPError as err:
            statuses[i] = err.code

    try:
        _wait_until_serving(base + "/", server, log)
        warm = [None]
        small, small_type = _multipart("small.png", _random_png_bytes())
        with direct.open(
            urllib.request.Request(base + "/api/search", data=small, headers={"Content-Type": small_type}), timeout=60
        ) as response:
            warm[0] = response.status  # the first forward pass allocates what every later one reuses
        baseline = _proc_kib(server.pid, "VmRSS")
        statuses: list = [None] * CONCURRENT_UPLOADS
        threads = [threading.Thread(target=post, args=(statuses, i)) for i in range(CONCURRENT_UPLOADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        peak, after = _proc_kib(server.pid, "VmHWM"), _proc_kib(server.pid, "VmRSS")
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=15)
    return {
        "statuses": statuses,
        "warm": warm[0],
        "baseline": baseline,
        "peak": peak,
        "after": after,
        "log": log.read_text(),
        "returncode": server.returncode,
    }


def _random_png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 90)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_concurrent_large_uploads_keep_memory_bounded_and_sigterm_stops_cleanly(pile, tmp_path):
    """Six 36 MP PNGs (100 KB each) uploaded at once: the server's peak RSS stays within its baseline
    plus DECODE_SLOTS decoded images, and SIGTERM stops it with one line and exit status 0.

    Bound: Pillow decodes RGB into 4 bytes a pixel, and the decode path holds one full-size image
    (EXIF transpose in place, RGB kept as is, the model's resize and the thumbnail shrink to small
    images); so decoding holds at most DECODE_SLOTS x 4 x P bytes, P = 36e6 pixels (144 MB each).
    The margin, 25 % of that plus 96 MiB, covers the resize's intermediate (P / 8 x 4 bytes at most),
    the request bodies and allocator slack. The test fails without either bound: six decode slots
    measured +828 MiB, and one slot without the fixed glibc mmap threshold +698 MiB (freed images kept
    in the arenas of the threads that decoded them), against +285 MiB with both and a bound of +439.
    Afterwards the freed images are back with the system: RSS within one decoded image of the baseline."""
    result = run_upload_storm(pile["index"], tmp_path)
    pixels = UPLOAD_SIDE[0] * UPLOAD_SIDE[1]
    decode_bytes = serve_module.DECODE_SLOTS * 4 * pixels
    bound_kib = result["baseline"] + (1.25 * decode_bytes + 96 * 2**20) / 1024
    assert result["warm"] == 200 and all(s in (200, 429) for s in result["statuses"]), result["statuses"]
    assert result["statuses"].count(200) >= serve_module.DECODE_SLOTS, result["statuses"]
    assert result["peak"] <= bound_kib, (
        f"peak RSS {result['peak'] / 1024:.0f} MiB over the bound {bound_kib / 1024:.0f} MiB "
        f"(baseline {result['baseline'] / 1024:.0f} MiB)"
    )
    assert result["after"] <= result["baseline"] + 4 * pixels / 1024, (result["after"], result["baseline"])
    assert result["returncode"] == 0, result["log"][-2000:]
    assert result["log"].rstrip().splitlines()[-1] == "plmetric serve: stopped (SIGTERM)", result["log"][-2000:]


def test_page_captions_are_shortened_in_the_middle_and_keep_the_full_path_as_tooltip():
    pytest.importorskip("jinja2")
    from jinja2 import Environment, PackageLoader, select_autoescape

    from plmetric.retrieval.serve import CAPTION_CHARS, Hit, Query

    names = [f"holiday_2024_beach_sunset_panorama_{i:04d}.jpg" for i in (41, 42)]
    hits = [Hit(i + 1, i, f"/photos/{name}", 0.9, False) for i, name in enumerate(names)]
    query = Query(name=names[0], id=0, path=f"/photos/{names[0]}")
    assert hits[0].caption != hits[1].caption  # the ends tell them apart
    assert hits[1].caption.endswith("0042.jpg") and len(hits[1].caption) == CAPTION_CHARS
    assert query.caption == hits[0].caption
    env = Environment(loader=PackageLoader("plmetric.retrieval", "templates"), autoescape=select_autoescape(["html"]))
    page = {"index": "i.safetensors", "count": 2, "top_k": 2, "max_upload_mib": 1, "max_upload_megapixels": "1"}
    html = env.get_template("serve.html").render(**page, query=query, hits=hits)
    for hit in hits:
        assert f">{hit.caption}</a></div>" in html and f'title="{hit.path}"' in html
    gallery = env.get_template("serve.html").render(**page, gallery=hits, page=1, pages=1)
    assert f">{hits[1].caption}</div>" in gallery
    assert 'class="folder"' not in html + gallery  # one folder: the file names suffice


def test_tiles_of_a_pile_of_class_folders_name_their_folders(client, browser, monkeypatch):
    """CUB has a 0034.jpg under every species: each tile shows the folders below the common one of the
    images on its page (shortened in the middle, keeping start and end) above the file name, the full
    path their tooltip; a search's query and results are captioned alike."""
    import re

    from plmetric.retrieval.serve import CAPTION_CHARS
    from plmetric.training.report import shorten_name

    species = ["001.Black_footed_Albatross", "054.Baltimore_Oriole", "055.Indigo_Bunting", "094.Nuthatch"]
    paths = [f"/cub/images/{species[i % 4]}/{34 + i // 4:04d}.jpg" for i in range(len(browser))]
    monkeypatch.setattr(browser, "paths", paths)  # not on disk: missing tiles, their captions as any other

    def folder_lines(page: str) -> list[tuple[str, str]]:
        return re.findall(r'<div class="folder" title="([^"]*)">([^<]*)</div>', page)

    gallery = client.get("/").text
    assert [t["name"] for t in Tiles(gallery).tiles] == [Path(p).name for p in paths]
    assert folder_lines(gallery) == [(p, shorten_name(Path(p).parent.name, CAPTION_CHARS)) for p in paths]
    long_one = folder_lines(gallery)[0][1]  # 26 characters: shortened in the middle
    assert long_one.startswith("001.Black") and long_one.endswith("Albatross") and len(long_one) == CAPTION_CHARS
    tiles = Tiles(gallery).tiles
    captions = [(folder, tile["name"]) for (_, folder), tile in zip(folder_lines(gallery), tiles, strict=True)]
    assert tiles[0]["name"] == tiles[1]["name"] == "0034.jpg" and captions[0] != captions[1]
    page = client.get("/search?id=0").text
    results = Tiles(page).results()
    shown_paths = [paths[0]] + [paths[int(t["data-id"])] for t in results]
    assert [title for title, _ in folder_lines(page)] == shown_paths  # the query first, then each result


# ---- groups and duplicates tables (plmetric groups / plmetric duplicates) browsed by number ----


def _group_table(out: Path, kind: str, groups: dict, index_id: str | None = None) -> Path:
    """A table of ``plmetric <kind>`` (groups or duplicates) holding ``groups``: number -> member paths,
    recording ``index_id`` as the index it was written from (None: no record, as an older plmetric)."""
    from plmetric.retrieval.tables import TableWriter

    rows = [(n, len(members), str(member), j) for n, members in groups.items() for j, member in enumerate(members)]
    numbers, sizes, paths = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    if kind == "groups":
        representative = [int(r[3] == 0 and r[0] != -1) for r in rows]
        columns = [numbers, sizes, paths, representative, [None if r[0] == -1 else 0.9 for r in rows]]
    else:
        columns = [numbers, sizes, paths, [0.95] * len(rows)]
    with TableWriter(out, kind, index_id=index_id) as writer:
        writer.write(columns)
        writer.commit()
    return out


class Groups(HTMLParser):
    """The groups of a ``/groups`` page: each ``li.group`` with its attributes and its tiles' ids and links."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.groups: list[dict] = []
        self.header_links: list[str] = []
        self._in_header = self._in_list = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        self._in_header = self._in_header or tag == "header"
        self._in_list = self._in_list or (tag == "ol" and attrs.get("id") == "groups")
        if tag == "a" and self._in_header:
            self.header_links.append(attrs.get("href"))
        if not self._in_list:
            return
        if tag == "li" and "group" in classes:
            self.groups.append({**attrs, "ids": [], "links": []})
        elif self.groups and tag == "li" and "tile" in classes:
            self.groups[-1]["ids"].append(int(attrs["data-id"]))
        elif self.groups and tag == "a":
            self.groups[-1]["links"].append(attrs.get("href"))

    def handle_endtag(self, tag: str) -> None:
        if tag == "header":
            self._in_header = False
        if tag == "ol":
            self._in_list = False


@pytest.fixture(scope="module")
def tables(pile, tmp_path_factory) -> dict:
    """A groups table (group 1: images 4, 0, 2 (one named through '..'); group 2: 1, 3; ungrouped: 5, 6, 7)
    and a duplicates table (group 1: 0, 1; group 2: 6, 7) of the pile's index."""
    root = tmp_path_factory.mktemp("tables")
    images = pile["images"]
    roundabout = images[0].parent / ".." / images[0].parent.name / images[0].name  # resolved at start-up
    groups = {1: [images[4], roundabout, images[2]], 2: [images[1], images[3]], -1: images[5:]}
    return {
        "groups": _group_table(root / "groups.csv", "groups", groups),
        "duplicates": _group_table(root / "dups.csv", "duplicates", {1: images[:2], 2: images[6:]}),
        "expected": {"1": [4, 0, 2], "2": [1, 3], "ungrouped": [5, 6, 7]},
    }


@pytest.fixture(scope="module")
def group_client(browser, tables) -> TestClient:
    loaded = tuple(serve_module.load_group_table(tables[kind], kind, browser) for kind in ("groups", "duplicates"))
    with TestClient(create_app(browser, tables=loaded)) as test_client:
        yield test_client


def test_groups_and_duplicates_are_listed_with_their_sizes_and_first_members(group_client, tables):
    page = group_client.get("/groups")
    assert page.status_code == 200
    listed = Groups(page.text)
    assert {"/groups", "/duplicates"} <= set(listed.header_links)
    assert [g["data-group"] for g in listed.groups] == ["1", "2", "ungrouped"]  # the ungrouped bucket last
    assert [int(g["data-size"]) for g in listed.groups] == [3, 2, 3]
    assert [g["ids"] for g in listed.groups] == list(tables["expected"].values())
    for group in listed.groups:  # every thumbnail through the checked route, every link to the group's page
        assert set(group["links"]) == {f"/groups/{group['data-group']}"}
        assert all(f'src="/thumb/{i}"' in page.text for i in group["ids"])
    assert ">ungrouped</a>" in page.text and "2 groups · 3 images ungrouped" in page.text
    dups = group_client.get("/duplicates")
    assert dups.status_code == 200 and "near-duplicate groups" in dups.text
    assert [(g["data-group"], g["ids"]) for g in Groups(dups.text).groups] == [("1", [0, 1]), ("2", [6, 7])]
    assert {"/groups", "/duplicates"} <= set(Groups(group_client.get("/").text).header_links)  # on every page


def test_a_group_page_shows_all_its_members_each_a_link_to_search_from_it(group_client, tables):
    for slug, ids in tables["expected"].items():
        page = group_client.get(f"/groups/{slug}")
        assert page.status_code == 200, (slug, page.text[:300])
        assert f"{'ungrouped' if slug == 'ungrouped' else 'group ' + slug} · {len(ids)} images" in page.text
        tiles = Tiles(page.text).tiles
        assert [int(t["data-id"]) for t in tiles] == ids
        assert [t["links"][0] for t in tiles] == [f"/search?id={i}" for i in ids]
        assert all(t["imgs"][0]["src"] == f"/thumb/{i}" for t, i in zip(tiles, ids, strict=True))
    assert [int(t["data-id"]) for t in Tiles(group_client.get("/groups/01").text).tiles] == [4, 0, 2]
    assert [int(t["data-id"]) for t in Tiles(group_client.get("/duplicates/2").text).tiles] == [6, 7]


def test_bad_group_and_page_numbers_answer_400_and_unknown_ones_404(group_client, client):
    for path, status in (
        ("/groups/x", 400),
        ("/groups/-1", 400),
        ("/groups/1.0", 400),
        ("/groups/%D9%A1", 400),  # an Arabic-Indic digit one
        ("/groups/3", 404),
        ("/groups/0", 404),
        ("/groups/" + "9" * 30, 404),
        ("/duplicates/ungrouped", 404),  # a duplicates table has no ungrouped bucket
        ("/groups?page=x", 400),
        ("/groups?page=-1", 400),
        ("/groups?page=0", 404),
        ("/groups?page=2", 404),
        ("/groups/1?page=abc", 400),
        ("/groups/1?page=2", 404),
        ("/duplicates?page=2", 404),
    ):
        response = group_client.get(path)
        assert response.status_code == status, (path, response.text[:300])
        errors = Tiles(response.text).error
        assert len(errors) == 1 and not Tiles(response.text).tiles and "Traceback" not in response.text, path
    assert "digits 0-9, got 'x' (or 'ungrouped')" in Tiles(group_client.get("/groups/x").text).error[0]
    assert client.get("/groups").status_code == 404 and client.get("/duplicates/1").status_code == 404  # not given
    assert 'href="/groups"' not in client.get("/").text


def test_groups_and_their_members_are_paginated(browser, tables, monkeypatch):
    monkeypatch.setattr(serve_module, "GROUPS_PAGE_SIZE", 2)
    monkeypatch.setattr(serve_module, "GALLERY_PAGE_SIZE", 2)
    monkeypatch.setattr(serve_module, "GROUP_PREVIEW", 1)
    loaded = (serve_module.load_group_table(tables["groups"], "groups", browser),)
    with TestClient(create_app(browser, tables=loaded)) as client:
        first, second = client.get("/groups"), client.get("/groups?page=2")
        assert [(g["data-group"], g["ids"]) for g in Groups(first.text).groups] == [("1", [4]), ("2", [1])]
        assert [(g["data-group"], g["ids"]) for g in Groups(second.text).groups] == [("ungrouped", [5])]
        assert 'href="/groups?page=2"' in first.text and 'href="/groups?page=1"' in second.text
        assert client.get("/groups?page=3").status_code == 404
        members = [Tiles(client.get(f"/groups/1?page={n}").text).tiles for n in (1, 2)]
        assert [[int(t["data-id"]) for t in tiles] for tiles in members] == [[4, 0], [2]]
        assert 'href="/groups/1?page=2"' in client.get("/groups/1").text
        assert client.get("/groups/1?page=3").status_code == 404


def test_a_table_is_refused_at_start_up_unless_every_path_is_an_indexed_image(browser, pile, tables, tmp_path):
    from plmetric.retrieval.tables import is_our_table

    images = pile["images"]
    elsewhere = tmp_path / "copy.jpg"
    elsewhere.write_bytes(images[0].read_bytes())  # the same image, but not a file of the index
    foreign = tmp_path / "foreign.csv"
    foreign.write_text(f"group,path\n1,{images[0]}\n")
    cases = [
        (_group_table(tmp_path / "a.csv", "groups", {1: [images[0], elsewhere]}), ValueError, "copy.jpg"),
        (_group_table(tmp_path / "b.csv", "groups", {1: [images[0], "/etc/passwd"]}), ValueError, "/etc/passwd"),
        (_group_table(tmp_path / "c.csv", "groups", {1: ["relative/img.jpg"]}), ValueError, "relative/img.jpg"),
        (foreign, ValueError, "not a table written by plmetric groups"),
        (tables["duplicates"], ValueError, "give it as --duplicates"),
        (tmp_path / "none.csv", FileNotFoundError, "not found"),
    ]
    for table, error, message in cases:
        with pytest.raises(error, match="--groups") as caught:
            serve_module.load_group_table(table, "groups", browser)
        assert message in str(caught.value) and len(str(caught.value).splitlines()) == 1, str(caught.value)
        assert str(table) in str(caught.value)
    assert is_our_table(tmp_path / "a.csv", "groups")  # refused for its paths, not its format


def test_a_parquet_table_is_browsed_like_its_csv(browser, pile, tmp_path):
    pytest.importorskip("pyarrow")
    images = pile["images"]
    groups = {1: [images[3], images[1]], -1: [images[0]]}
    csv_table = serve_module.load_group_table(_group_table(tmp_path / "g.csv", "groups", groups), "groups", browser)
    parquet = _group_table(tmp_path / "g.parquet", "groups", groups)
    table = serve_module.load_group_table(parquet, "groups", browser)
    assert [(g.number, g.members) for g in table.groups] == [(g.number, g.members) for g in csv_table.groups]
    assert [(g.number, g.members) for g in table.groups] == [(1, (3, 1)), (-1, (0,))]


def test_an_identical_copy_stays_in_the_results_only_the_image_itself_is_left_out(tmp_path, small_ckpt):
    """Two indexed files with the same bytes (the same embedding, score 1 both): searching from one
    leaves out exactly that one, by its number; the copy comes first."""
    folder = tmp_path / "photos"
    folder.mkdir()
    images = [_random_image(folder / f"p{i}.png", seed) for i, seed in enumerate((1, 2, 3, 4))]
    twin = folder / "p9_twin.png"
    twin.write_bytes(images[1].read_bytes())
    index = tmp_path / "i.safetensors"
    assert main(["index", str(folder), "--checkpoint", str(small_ckpt), "--out", str(index), *SMALL]) == 0
    browser = Browser(index, 3)
    ids = {Path(p).name: i for i, p in enumerate(browser.paths)}
    for query, other in (("p1.png", "p9_twin.png"), ("p9_twin.png", "p1.png")):
        hits = browser.search_id(ids[query])
        assert [h.rank for h in hits] == [1, 2, 3] and ids[query] not in [h.id for h in hits]
        assert hits[0].id == ids[other] and abs(hits[0].score - 1) < SELF_SCORE_TOLERANCE
    browser.top_k = len(browser)  # more than the others: all of them, nothing padded
    assert sorted(h.id for h in browser.search_id(ids["p1.png"])) == sorted(set(ids.values()) - {ids["p1.png"]})
    browser.include_self = True
    assert len(browser.search_id(ids["p1.png"])) == len(browser)
    upload, _ = Browser(index, 3).search_upload(images[1].read_bytes(), "p1.png")  # an upload is never itself
    assert {ids["p1.png"], ids["p9_twin.png"]} <= {h.id for h in upload}


def test_a_table_recorded_from_another_index_is_refused_at_start_up(browser, pile, tmp_path, capsys):
    """The pile tools record the index a table came from (its paths and embeddings): a table of another
    index over the same files (another model) names only indexed paths, so the paths alone let it
    through; its record refuses it in one line saying what to do. A table of this index is browsed."""
    from plmetric.retrieval.index import index_identity, load_embeddings, save_embeddings

    embeddings, labels, paths, model = load_embeddings(pile["index"])
    other = tmp_path / "other.safetensors"  # the same files, other embeddings (as another model gives)
    save_embeddings(other, -embeddings, labels, paths, model)
    assert index_identity(*load_embeddings(other)[::2]) != browser.index_id == index_identity(embeddings, paths)
    argv = ["--groups", "2", "--min-size", "2", "--seed", "0"]
    assert main(["groups", str(pile["index"]), *argv, "--out", str(tmp_path / "ours.csv")]) == 0
    assert main(["groups", str(other), *argv, "--out", str(tmp_path / "theirs.csv")]) == 0
    assert main(["groups", str(other), *argv, "--out", str(tmp_path / "theirs.parquet")]) == 0
    capsys.readouterr()
    ours = serve_module.load_group_table(tmp_path / "ours.csv", "groups", browser)
    assert sorted(i for group in ours.groups for i in group.members) == list(range(len(browser)))
    for theirs in (tmp_path / "theirs.csv", tmp_path / "theirs.parquet"):
        with pytest.raises(ValueError) as caught:
            serve_module.load_group_table(theirs, "groups", browser)
        message = str(caught.value)
        assert message.startswith(f"--groups {theirs} was written by plmetric groups from another index")
        assert f"'plmetric groups {browser.index_path} --out FILE'" in message and len(message.splitlines()) == 1
    # the same table without its record (as an older plmetric wrote it) is checked by its paths: accepted
    lines = (tmp_path / "theirs.csv").read_text(encoding="utf-8").splitlines()
    older = tmp_path / "older.csv"
    older.write_text("".join(line.rsplit(",", 1)[0] + "\n" for line in lines), encoding="utf-8")
    assert serve_module.load_group_table(older, "groups", browser).images == len(browser)


def test_a_table_of_more_rows_than_the_index_has_images_is_refused(browser, pile, tmp_path):
    images = pile["images"]
    table = _group_table(tmp_path / "d.csv", "duplicates", {1: [images[0]] * (len(browser) + 1)})
    with pytest.raises(ValueError) as caught:
        serve_module.load_group_table(table, "duplicates", browser)
    expected = f"--duplicates {table} holds more than {len(browser)} rows; expected at most {len(browser)}"
    assert str(caught.value).startswith(expected) and "one per image of the index" in str(caught.value)


def test_the_api_honours_top_k_within_its_bounds(client, browser, pile):
    """``?top_k=K`` of /api/search (it was ignored: always --top-k): K results, the first K of a longer
    list; more than the index holds: all the others; 0, text, another script's digits or more than
    MAX_API_TOP_K: 400 naming top_k. The HTML page keeps --top-k."""
    everything = client.get(f"/api/search?id=2&top_k={serve_module.MAX_API_TOP_K}").json()
    assert everything["top_k"] == serve_module.MAX_API_TOP_K and len(everything["results"]) == len(browser) - 1
    for k in (1, 3, TOP_K + 1):
        body = client.get(f"/api/search?id=2&top_k={k}").json()
        assert body["top_k"] == k and [r["id"] for r in body["results"]] == [r["id"] for r in everything["results"][:k]]
    default = client.get("/api/search?id=2").json()
    assert default["top_k"] == TOP_K and len(default["results"]) == TOP_K
    data = pile["images"][3].read_bytes()
    upload = client.post("/api/search?top_k=2", files={"image": ("q.jpg", data, "image/jpeg")}).json()
    assert upload["top_k"] == 2 and len(upload["results"]) == 2 and upload["results"][0]["id"] == 3
    for bad in ("0", "-1", "abc", "", "1.5", "\u0663", str(serve_module.MAX_API_TOP_K + 1), "9" * 40):
        response = client.get("/api/search", params={"id": "2", "top_k": bad})
        assert response.status_code == 400 and "top_k" in response.json()["error"], (bad, response.text)
    assert len(Tiles(client.get("/search?id=2&top_k=2").text).results()) == TOP_K


def test_the_documented_api_answer_is_the_answer(client):
    """The keys that serve's --help and the README list for /api/search are those of its answer."""
    import re

    from plmetric.cli.commands.serve import ROUTES

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    body = client.get("/api/search?id=2").json()
    for documented in (" ".join(ROUTES.split()), readme):
        top, hit = re.search(r'(\{"index".*?\})\]\}', documented).group(1).split('"results": [{')
        assert set(re.findall(r'"(\w+)"', top)) | {"results"} == set(body)
        assert set(re.findall(r'"(\w+)"', hit)) == set(body["results"][0])
    assert set(client.get("/api/search?id=x").json()) == {"error"}


def test_missing_agrees_with_what_the_image_route_answers(client, browser, pile, monkeypatch):
    """An indexed image now reached through a link, or changed since indexing, is refused by /image/N
    (404, 410): the API and the tiles call it missing too (a link used to count as present)."""
    monkeypatch.setattr(browser, "include_self", True)  # image 6 among its own results
    image = pile["images"][6]
    recorded = image.stat()
    original = image.read_bytes()
    away = image.with_name("real.bin")
    image.rename(away)
    image.symlink_to(away)
    try:
        assert client.get("/image/6").status_code == 404 and "link" in client.get("/image/6").text
        first = client.get("/api/search?id=6").json()["results"][0]
        assert first["id"] == 6 and first["missing"] is True
        assert "missing" in Tiles(client.get("/").text).tiles[6]["classes"]
    finally:
        image.unlink()
        away.rename(image)
    assert client.get("/api/search?id=6").json()["results"][0]["missing"] is False
    try:
        image.write_bytes(original + b"\0")  # another size: changed since indexing
        assert client.get("/image/6").status_code == 410
        assert client.get("/api/search?id=6").json()["results"][0]["missing"] is True
    finally:
        image.write_bytes(original)
        os.utime(image, ns=(recorded.st_atime_ns, recorded.st_mtime_ns))
    assert client.get("/image/6").status_code == 200
    assert client.get("/api/search?id=6").json()["results"][0]["missing"] is False
