"""Tests of plmetric.training.report: the neighbour change and the "what training changed" report."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from numerics import assert_within, gamma, qr_orthonormality
from PIL import Image

from plmetric.training import report
from plmetric.training.report import (
    CAPTION_CHARS,
    SCORES_NOTE,
    THUMBNAIL_SIDE,
    caption_lines,
    choose_queries,
    common_folder,
    load_thumbnail,
    neighbour_change,
    shorten_name,
    top_results,
    write_change_report,
)

# --------------------------------------------------------------------------------------------------
# NumPy float64 references and the rounding bounds under which they must agree
# --------------------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _cosines(x: np.ndarray) -> np.ndarray:
    """(N, N) cosine similarities in float64, the diagonal at -inf (a row is never its own neighbour)."""
    x = _unit(x)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return sims


def _reference_change(start: np.ndarray, kept: np.ndarray, k: int) -> np.ndarray:
    """``1 - |kNN_start(i) ∩ kNN_kept(i)| / k`` with plain NumPy, one row at a time."""
    a = np.argsort(-_cosines(start), axis=1, kind="stable")[:, :k]
    b = np.argsort(-_cosines(kept), axis=1, kind="stable")[:, :k]
    return np.array([1.0 - len(np.intersect1d(a[i], b[i])) / k for i in range(len(a))])


def _cosine_error(d: int, dtype: torch.dtype) -> float:
    """Bound on |computed - exact| cosine of two rows of length d computed in ``dtype``: rounding
    the input and normalising move each unit row by <= γ_{d+4} (relative, a chain of d + 4
    operations), which moves the dot product by <= 2 γ_{d+4}; the dot product of unit rows adds
    <= γ_d Σ|x_i y_i| <= γ_d (Cauchy-Schwarz). Together <= 3 γ_{d+5}."""
    return 3.0 * gamma(d + 5, dtype)


def _assert_stable_ranks(x: np.ndarray, k: int, error: float) -> None:
    """In every row, the k-th and the (k+1)-th cosine differ by more than twice ``error`` (each
    may move by ``error``), so the top-k *set* is the exact one whatever the rounding."""
    ranked = -np.sort(-_cosines(x), axis=1)
    gaps = ranked[:, k - 1] - ranked[:, k]
    assert (gaps > 2.0 * error).all(), f"a rank-{k} gap {gaps.min():.2e} lies within the rounding error {error:.2e}"


def _random_pair(n: int, d1: int, d2: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d1)), rng.standard_normal((n, d2))


def _related_pair(n: int, d1: int, d2: int, seed: int, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """start and a kept embedding that keeps some of its neighbours: a projection to d2 < d1
    dimensions plus noise."""
    rng = np.random.default_rng(seed)
    start = rng.standard_normal((n, d1))
    projection, _ = np.linalg.qr(rng.standard_normal((d1, d2)))
    return start, start @ projection + noise * rng.standard_normal((n, d2))


# --------------------------------------------------------------------------------------------------
# neighbour_change
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_neighbour_change_matches_the_numpy_reference(dtype: torch.dtype, k: int) -> None:
    n, d1, d2 = 90, 16, 11
    start, kept = _related_pair(n, d1, d2, seed=3)
    bound = _cosine_error(max(d1, d2), dtype) + _cosine_error(max(d1, d2), torch.float64)
    _assert_stable_ranks(start, k, bound)
    _assert_stable_ranks(kept, k, bound)
    expected = _reference_change(start, kept, k)
    assert 0.05 < expected.mean() < 0.95  # the data distinguishes a right answer from a trivial one
    for chunk_rows in (None, 13):  # all rows at once; chunks of 13 rows, the last one shorter
        got = neighbour_change(
            torch.tensor(start, dtype=dtype), torch.tensor(kept, dtype=dtype), k, chunk_rows=chunk_rows
        )
        assert got.shape == (n,) and got.dtype == dtype
        # once the neighbour sets are the exact ones, only 1 - shared / k rounds: a division and a
        # subtraction, <= γ_2 on values <= 1 (1/k apart, so a wrong count cannot hide in it)
        assert_within(got, expected, gamma(2, dtype), f"neighbour change, k={k}, chunk_rows={chunk_rows}")


def test_neighbour_change_ranks_rows_in_chunks_of_bounded_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory O(chunk × N): with CHUNK_ELEMENTS = 3 N every similarity block has <= 3 rows."""
    n = 40
    start, kept = _random_pair(n, 8, 8, seed=5)
    blocks: list[int] = []
    ranked = report._top_others

    def recording(x: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks.append(len(rows))
        return ranked(x, rows, k)

    monkeypatch.setattr(report, "_top_others", recording)
    monkeypatch.setattr(report, "CHUNK_ELEMENTS", 3 * n)
    got = neighbour_change(torch.tensor(start), torch.tensor(kept), 4)
    assert max(blocks) == 3 and sum(blocks) == 2 * n  # both embeddings, every row once
    _assert_stable_ranks(start, 4, 2 * _cosine_error(8, torch.float64))
    _assert_stable_ranks(kept, 4, 2 * _cosine_error(8, torch.float64))
    np.testing.assert_array_equal(got.numpy(), _reference_change(start, kept, 4))


def test_identical_embeddings_change_nothing() -> None:
    x = torch.randn(50, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(neighbour_change(x, x.clone(), 10), torch.zeros(50))


def test_a_rotation_into_more_dimensions_changes_nothing() -> None:
    """kept = start · Q with orthonormal rows of Q (12 -> 20 dimensions): every cosine is kept."""
    n, d1, d2, k = 80, 12, 20, 10
    rng = np.random.default_rng(7)
    start = _unit(rng.standard_normal((n, d1)))
    basis, _ = np.linalg.qr(rng.standard_normal((d2, d1)))  # (d2, d1), orthonormal columns
    kept = start @ basis.T
    # the rotation moves a cosine by its orthonormality error, the float64 arithmetic by its own
    bound = qr_orthonormality(d2, d1) + 2 * _cosine_error(d2, torch.float64)
    _assert_stable_ranks(start, k, bound)
    got = neighbour_change(torch.tensor(start), torch.tensor(kept), k)
    assert torch.equal(got, torch.zeros(n, dtype=torch.float64))
    # a different embedding of the same points is not mistaken for a rotation
    assert neighbour_change(torch.tensor(start), torch.tensor(rng.standard_normal((n, d2))), k).min() > 0


def _crossed_clusters(k: int, spread: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(k+1)² points on a grid (r, c): start clusters them by row r, kept by column c, each cluster
    tight around its own axis. A row and a column share only the point itself, which is excluded,
    so every image's k neighbours (the rest of its cluster) are all different."""
    m = k + 1
    rng = np.random.default_rng(11)
    r, c = np.divmod(np.arange(m * m), m)
    start = np.eye(m)[r] + spread * rng.standard_normal((m * m, m))
    kept = np.eye(m)[c] + spread * rng.standard_normal((m * m, m))
    return torch.tensor(start), torch.tensor(kept)


def test_neighbours_that_are_all_different_change_entirely() -> None:
    k = 4
    start, kept = _crossed_clusters(k)
    for x, label in ((start.numpy(), np.divmod(np.arange(25), 5)[0]), (kept.numpy(), np.divmod(np.arange(25), 5)[1])):
        sims = _cosines(x)
        same = label[:, None] == label[None, :]
        np.fill_diagonal(same, False)
        assert sims[same].min() > sims[~same & np.isfinite(sims)].max()  # the construction holds
    got = neighbour_change(start, kept, k)
    assert torch.equal(got, torch.ones(25, dtype=torch.float64))
    # one neighbour fewer per cluster member: still all different; k = N - 1: nothing can change
    assert torch.equal(neighbour_change(start, kept, k - 1), torch.ones(25, dtype=torch.float64))
    assert torch.equal(neighbour_change(start, kept, 24), torch.zeros(25, dtype=torch.float64))


def test_k_is_clipped_to_n_minus_1() -> None:
    start, kept = _random_pair(9, 5, 7, seed=2)
    start_t, kept_t = torch.tensor(start), torch.tensor(kept)
    assert torch.equal(neighbour_change(start_t, kept_t, 100), torch.zeros(9, dtype=torch.float64))
    assert torch.equal(neighbour_change(start_t, kept_t, 100), neighbour_change(start_t, kept_t, 8))
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.equal(neighbour_change(two, torch.randn(2, 3), 10), torch.zeros(2))


@pytest.mark.parametrize(
    ("start", "kept", "k", "message"),
    [
        (torch.randn(5, 3), torch.randn(6, 3), 2, "same images"),
        (torch.randn(1, 3), torch.randn(1, 3), 2, "at least 2 rows"),
        (torch.randn(5, 3), torch.randn(5, 3), 0, "k must be an integer >= 1"),
        (torch.randn(5), torch.randn(5, 3), 2, "2-D"),
        (torch.ones(5, 3, dtype=torch.long), torch.randn(5, 3), 2, "floating-point"),
    ],
)
def test_neighbour_change_rejects_bad_input(start: torch.Tensor, kept: torch.Tensor, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        neighbour_change(start, kept, k)


def test_top_results_match_the_numpy_reference() -> None:
    x, _ = _random_pair(60, 9, 1, seed=4)
    _assert_stable_ranks(x, 5, 2 * _cosine_error(9, torch.float32))
    queries = [0, 17, 59]
    scores, indices = top_results(torch.tensor(x, dtype=torch.float32), torch.tensor(queries), 5)
    sims = _cosines(x)[queries]
    expected = np.argsort(-sims, axis=1)[:, :5]
    np.testing.assert_array_equal(indices.numpy(), expected)
    bound = 2 * _cosine_error(9, torch.float32)
    assert np.abs(scores.numpy() - np.take_along_axis(sims, expected, axis=1)).max() <= bound
    assert not (indices.numpy() == np.array(queries)[:, None]).any()  # a query is not its own result


# --------------------------------------------------------------------------------------------------
# thumbnails and names
# --------------------------------------------------------------------------------------------------


def test_shorten_name_keeps_the_start_and_the_end() -> None:
    assert shorten_name("IMG_20240517_120000_0042.jpg") == "IMG_20240…0_0042.jpg"
    assert shorten_name("cat.jpg") == "cat.jpg"
    assert shorten_name("x" * 20) == "x" * 20
    assert len(shorten_name("y" * 21)) == 20
    name = "IMG_20240517_holiday_beach_sunset_0042.jpg"
    for width in range(1, len(name) + 2):
        got = shorten_name(name, width)
        assert len(got) == min(width, len(name))
        if width < len(name):
            head, tail = got.split("…")
            assert name.startswith(head) and name.endswith(tail) and len(tail) - len(head) in (0, 1)
    with pytest.raises(ValueError, match="width"):
        shorten_name(name, 0)


def test_a_thumbnail_follows_the_exif_orientation(tmp_path: Path) -> None:
    """Orientation 6: the stored 40 × 20 image shows as 20 × 40, its left half (red) on top."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    thumb, ok = load_thumbnail(path)
    assert ok and thumb.mode == "RGB" and thumb.size == (20, 40)
    top, bottom = np.asarray(thumb)[5, 10].astype(int), np.asarray(thumb)[35, 10].astype(int)
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_a_16_bit_image_is_rescaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    thumb, ok = load_thumbnail(path)
    rgb = np.asarray(thumb).astype(int)
    assert ok and thumb.mode == "RGB" and thumb.size == (64, 32)
    assert rgb[:, 0].max() <= 8 and rgb[:, -1].min() >= 247 and 100 < rgb.mean() < 155  # a ramp, not white


def test_an_unreadable_file_gets_a_grey_placeholder(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a JPEG")
    for path in (broken, tmp_path / "missing.png"):
        thumb, ok = load_thumbnail(path)
        assert not ok and thumb.mode == "RGB" and thumb.size == (THUMBNAIL_SIDE, THUMBNAIL_SIDE)
        assert tuple(np.asarray(thumb)[2, 2]) == report.PLACEHOLDER_GREY


# --------------------------------------------------------------------------------------------------
# write_change_report
# --------------------------------------------------------------------------------------------------


def _image_folder(folder: Path) -> list[str]:
    """20 small image files: colours and patterns in several modes and formats, a corrupt file,
    a 16-bit PNG, an EXIF-rotated JPEG and names that need escaping or would trip mathtext."""
    rng = np.random.default_rng(0)
    paths = []

    def add(name: str, image: Image.Image, **save: object) -> None:
        path = folder / name
        image.save(path, **save)
        paths.append(str(path))

    for i in range(10):
        pixels = np.zeros((24, 32, 3), dtype=np.uint8)
        pixels[...] = rng.integers(0, 256, 3)
        pixels[:: 2 + i % 3, :, i % 3] = 255 - pixels[0, 0, i % 3]  # stripes
        add(f"IMG_20240517_1200{i:02d}_{i:04d}.{'jpg' if i % 2 else 'png'}", Image.fromarray(pixels))
    add("grey.png", Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)))
    add("alpha.png", Image.new("RGBA", (30, 20), (255, 0, 0, 128)))
    add("palette.gif", Image.new("RGB", (20, 30), (0, 128, 0)).convert("P"))
    add("cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)))
    add("bilevel.png", Image.new("1", (16, 16), 1))
    add("deep.png", Image.fromarray(np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (20, 1))))
    exif = Image.Exif()
    exif[0x0112] = 6
    add("rotated.jpg", Image.new("RGB", (40, 20), (0, 0, 255)), exif=exif)
    add("a<b>&.png", Image.new("RGB", (20, 20), (255, 255, 0)))
    add("price_$5$.png", Image.new("RGB", (20, 20), (0, 255, 255)))
    broken = folder / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff this is not a JPEG")
    paths.append(str(broken))
    assert Image.open(folder / "deep.png").mode == "I;16" and len(paths) == 20
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return _image_folder(tmp_path_factory.mktemp("images"))


def _embeddings(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    start, kept = _random_pair(n, 8, 6, seed)
    return torch.tensor(start, dtype=torch.float32), torch.tensor(kept, dtype=torch.float32)


REPORT = {"criterion": "mutual_knn", "start_score": 0.4213, "kept_score": 0.6875}


def _figures(block: str) -> list[tuple[int, str]]:
    """(data-index, class) of every thumbnail in an HTML fragment, in order."""
    return [
        (int(index), klass or "")
        for klass, index in re.findall(r'<figure(?: class="([^"]*)")? data-index="(\d+)"', block)
    ]


def test_the_report_shows_every_query_before_and_after(tmp_path: Path, images: list[str]) -> None:
    n = len(images)
    start, kept = _embeddings(n, seed=1)
    label = "epoch 7 of 20, picked without labels by mutual_knn"
    summary = write_change_report(tmp_path / "out", images, start, kept, **REPORT, kept_label=label, queries=n, top=3)

    assert set(summary) == {
        "criterion", "start", "kept", "neighbours_changed_mean", "top1_changed", "k", "queries", "report_html",
        "report_png",
    }
    assert (summary["criterion"], summary["start"], summary["kept"]) == ("mutual_knn", 0.4213, 0.6875)
    assert summary["k"] == 10 and summary["queries"] == images  # every image is a query here
    assert summary["neighbours_changed_mean"] == pytest.approx(float(neighbour_change(start, kept, 10).mean()))
    assert summary["top1_changed"] == pytest.approx(float(neighbour_change(start, kept, 1).mean()))
    assert 0 < summary["neighbours_changed_mean"] < 1
    assert (summary["report_html"], summary["report_png"]) == ("report.html", "report.png")

    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    for text in ("mutual_knn", "0.4213", "0.6875", label, f"{100 * summary['neighbours_changed_mean']:.1f}%"):
        assert text in page, text
    assert "a&lt;b&gt;&amp;.png" in page and "a<b>" not in page and "<b>&" not in page
    assert "IMG_20240…3_0003.jpg" in page  # shortened in the middle

    # self-contained: every thumbnail is an embedded JPEG that decodes
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == n * (1 + 2 * 3)
    for uri in sources:
        assert uri.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= THUMBNAIL_SIDE

    # per query: before = the start's top 3, after = the kept model's (float64 reference)
    _assert_stable_ranks(start.double().numpy(), 3, 2 * _cosine_error(8, torch.float32))
    _assert_stable_ranks(kept.double().numpy(), 3, 2 * _cosine_error(6, torch.float32))
    before_ref = np.argsort(-_cosines(start.double().numpy()), axis=1)[:, :3]
    after_ref = np.argsort(-_cosines(kept.double().numpy()), axis=1)[:, :3]
    tables = re.findall(r'<table class="query" data-query="(\d+)">(.*?)</table>', page, flags=re.S)
    assert [int(q) for q, _ in tables] == list(range(n))
    broken = images.index(next(p for p in images if p.endswith("broken.jpg")))
    for q, table in tables:
        q = int(q)
        before = re.search(r'<td class="before">(.*?)</td>', table, flags=re.S).group(1)
        after = re.search(r'<td class="after">(.*?)</td>', table, flags=re.S).group(1)
        assert [i for i, _ in _figures(before)] == before_ref[q].tolist()
        assert [i for i, _ in _figures(after)] == after_ref[q].tolist()
        for index, klass in _figures(table):  # only the corrupt file is shown as unreadable
            assert ("unreadable" in klass) == (index == broken)
        assert all(("new" in c) == (i not in before_ref[q]) for i, c in _figures(after))

    with Image.open(tmp_path / "out" / "report.png") as png:
        assert png.format == "PNG" and png.size[0] > 7 * THUMBNAIL_SIDE and png.size[1] > n * THUMBNAIL_SIDE
        png.verify()


def test_captions_name_the_folder_that_tells_images_of_the_same_name_apart() -> None:
    assert common_folder(["/pile/a/1.jpg", "/pile/b/c/1.jpg", "/pile/a/2.jpg"]) == "/pile"
    assert common_folder(["/pile/a/1.jpg", "/pile/a/2.jpg"]) is None  # one folder: the names suffice
    assert common_folder(["/pile/a/1.jpg", "a/2.jpg"]) is None
    assert caption_lines("/pile/a/1.jpg", "/pile") == ["a", "1.jpg"]
    assert caption_lines("/pile/b/c/1.jpg", "/pile") == ["b/c", "1.jpg"]
    assert caption_lines("/pile/1.jpg", "/pile") == ["1.jpg"] and caption_lines("/pile/a/1.jpg", None) == ["1.jpg"]
    folder = "echinoderm_seacucumber_auricularia_larva"  # shortened in the middle: its start and its end
    assert caption_lines(f"/p/{folder}/31107.jpg", "/p") == [shorten_name(folder), "31107.jpg"]
    assert shorten_name(folder).endswith("larva") and len(shorten_name(folder)) == CAPTION_CHARS
    assert caption_lines("/p/a\x1b/b\u202e.jpg", "/") == ["p/a\\x1b", "b\\u202e.jpg"]  # control, bidi: escaped


def test_the_report_tells_class_folders_apart_and_says_why_scores_differ(tmp_path: Path) -> None:
    """A pile of class folders whose files share their names (CUB's 0034.jpg under every species):
    every caption names its folder (the captions were the file names alone: 0034.jpg, 0034.jpg, ...),
    each tile's title is its full path, and the page says that the scores before and after are on
    their own scales."""
    species = ["054.Baltimore_Oriole", "055.Red_winged_Blackbird_of_the_marshes", "056.Pine_Grosbeak"]
    paths = []
    for k, name in enumerate(species):
        (tmp_path / "pile" / name).mkdir(parents=True)
        for i in range(3):
            path = tmp_path / "pile" / name / f"{i:04d}.jpg"
            Image.new("RGB", (16, 16), (80 * k, 40 * i, 0)).save(path)
            paths.append(str(path))
    start, kept = _embeddings(len(paths), seed=4)
    write_change_report(tmp_path / "out", paths, start, kept, **REPORT, kept_label="x", queries=9, top=4)
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    figures = re.findall(r'<figure[^>]* data-index="(\d+)" title="([^"]*)">.*?<figcaption>(.*?)</figcaption>', page)
    assert len(figures) == 9 * (1 + 2 * 4)
    for index, title, caption in figures:
        path = Path(paths[int(index)])
        assert title == str(path) and caption.split("<br>")[:2] == [shorten_name(path.parent.name), path.name]
    assert len({caption.split("<br>")[0] for _, _, caption in figures}) == 3  # the three species
    assert "055.Red_w…he_marshes" in page  # a long folder keeps its end
    assert SCORES_NOTE.replace("'", "&#x27;") in page and "not the numbers" in SCORES_NOTE
    with Image.open(tmp_path / "out" / "report.png") as png:
        png.verify()


def test_the_queries_are_fixed_by_the_seed(tmp_path: Path, images: list[str]) -> None:
    n = len(images)
    first = write_change_report(tmp_path / "a", images, *_embeddings(n, 1), **REPORT, kept_label="a")
    again = write_change_report(tmp_path / "b", images, *_embeddings(n, 2), **REPORT, kept_label="b")
    other = write_change_report(tmp_path / "c", images, *_embeddings(n, 1), **REPORT, kept_label="c", seed=1)
    assert first["queries"] == again["queries"] != other["queries"]
    assert first["queries"] == [images[i] for i in choose_queries(n, 6, 0)]
    assert len(set(first["queries"])) == 6
    page = (tmp_path / "a" / "report.html").read_text(encoding="utf-8")
    assert len(re.findall(r"<img ", page)) == 6 * (1 + 2 * 8)  # defaults: 6 queries, top 8


def test_top_is_clipped_to_the_other_images(tmp_path: Path, images: list[str]) -> None:
    start, kept = _embeddings(4, seed=3)
    summary = write_change_report(tmp_path, images[:4], start, kept, **REPORT, kept_label="x", top=8, k=10)
    assert summary["k"] == 3 and summary["neighbours_changed_mean"] == 0.0  # all others are neighbours
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert len(re.findall(r"<img ", page)) == 4 * (1 + 2 * 3)


def test_a_single_image_has_nothing_to_compare(tmp_path: Path, images: list[str]) -> None:
    summary = write_change_report(
        tmp_path, images[:1], torch.randn(1, 8), torch.randn(1, 4), **REPORT, kept_label="the untrained start"
    )
    assert summary["queries"] == images[:1] and summary["k"] == 0
    assert summary["neighbours_changed_mean"] is None and summary["top1_changed"] is None
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "nothing to compare" in page and "0.4213" in page and "the untrained start" in page
    with Image.open(tmp_path / "report.png") as png:
        png.verify()


def test_the_report_rejects_mismatched_input(tmp_path: Path, images: list[str]) -> None:
    start, kept = _embeddings(5, seed=0)
    with pytest.raises(ValueError, match="4 paths but 5 embeddings"):
        write_change_report(tmp_path, images[:4], start, kept, **REPORT, kept_label="x")
    with pytest.raises(ValueError, match="same images"):
        write_change_report(tmp_path, images[:5], start, kept[:4], **REPORT, kept_label="x")
    with pytest.raises(ValueError, match="queries must be an integer >= 1"):
        write_change_report(tmp_path, images[:5], start, kept, **REPORT, kept_label="x", queries=0)
    assert not (tmp_path / "report.html").exists()
