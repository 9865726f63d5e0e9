"""plmetric serve: the page, the JSON API, uploads and their limits, thumbnails by number only, and
the whole thing end to end in a real headless browser (Debian's chromium, skipped when absent).

The index is built once from eight real CUB images (two of each of four species, copied under
unique names) with a randomly initialised EfficientNet-Lite0 checkpoint at 32 px: what is checked
is the plumbing (which image comes back, at which rank, with which score), not retrieval quality.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
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
    assert [t["name"] for t in tiles] == [p.name for p in pile["images"]]
    assert [t["links"][0] for t in tiles] == [f"/search?id={i}" for i in range(len(pile["images"]))]
    assert 'enctype="multipart/form-data"' in page.text and 'name="image"' in page.text
    assert client.get("/?page=2").status_code == 404 and client.get("/?page=x").status_code == 404


def test_searching_from_an_indexed_image_returns_it_first_with_score_one(client, pile):
    names = {p.name for p in pile["images"]}
    for image_id in (0, 5):
        page = client.get(f"/search?id={image_id}")
        assert page.status_code == 200
        results = Tiles(page.text).results()
        assert len(results) == TOP_K
        assert [int(t["data-rank"]) for t in results] == list(range(1, TOP_K + 1))
        assert int(results[0]["data-id"]) == image_id and results[0]["name"] == pile["images"][image_id].name
        assert abs(float(results[0]["data-score"]) - 1) < SELF_SCORE_TOLERANCE
        assert {t["name"] for t in results} <= names and all(
            f"/thumb/{t['data-id']}" in str(t["imgs"]) for t in results
        )
        assert [t["links"][0] for t in results] == [f"/search?id={t['data-id']}" for t in results]  # click: search on
        api = client.get(f"/api/search?id={image_id}").json()
        assert api["query"] == str(pile["images"][image_id]) and api["query_id"] == image_id and api["top_k"] == TOP_K
        ranks = api["results"]
        assert [r["rank"] for r in ranks] == list(range(1, TOP_K + 1))
        assert ranks[0]["id"] == image_id and abs(ranks[0]["score"] - 1) < SELF_SCORE_TOLERANCE
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
        ({"files": {"image": ("bomb.png", _png_claiming(40000, 40000), "image/png")}}, 400, "too large to decode"),
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
    full = client.get("/image/0")
    assert full.status_code == 200 and full.content == pile["images"][0].read_bytes()
    for out_of_range in ("/thumb/8", "/thumb/123456789", "/thumb/-1", "/image/8", "/image/-1"):
        assert client.get(out_of_range).status_code == 404, out_of_range
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
        assert response.status_code == 404 or response.content in (p.read_bytes() for p in pile["images"]), attempt


def test_images_moved_since_indexing_show_as_missing(client, pile):
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


def test_the_command_line_refuses_bad_input_in_one_line(pile, capsys, monkeypatch):
    capsys.readouterr()
    assert main(["serve", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 127.0.0.1)", "(default: 8000)", "(default: 12)", "index written by 'plmetric index'"):
        assert shown in help_text
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
        assert [t["name"] for t in gallery] == [p.name for p in pile["images"]]
        query = 2
        results = Tiles(dom(f"{base}/search?id={query}")).results()
        assert len(results) == TOP_K
        assert int(results[0]["data-id"]) == query and results[0]["name"] == pile["images"][query].name
        assert all(t["name"] in {p.name for p in pile["images"]} for t in results)
        # every thumbnail was fetched and decoded by the browser (each <img> sets data-loaded on load)
        assert all(t["imgs"] and t["imgs"][0].get("data-loaded") == "1" for t in results), results
        # a click on a result is its link: a plain <a href>, followed here as the browser would
        second = results[1]
        again = Tiles(dom(base + second["links"][0])).results()
        assert len(again) == TOP_K and again[0]["data-id"] == second["data-id"]
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
    assert server.returncode == 0 and log.read_text().rstrip().endswith("plmetric serve: stopped")
