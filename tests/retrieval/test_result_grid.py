"""The search grid drawn with Pillow (plmetric.retrieval.result_grid): its layout, the captions it draws
(rank, score, the shortened name; the query's in red), the tiles of missing and unreadable files, and its
shortening rule, the same as the change report's."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from plmetric.retrieval import result_grid as rg
from plmetric.training.report import shorten_name as report_shorten_name


def _photo(path, colour) -> str:
    Image.fromarray(np.full((30, 50, 3), colour, np.uint8)).save(path)
    return str(path)


def _drawn_texts(monkeypatch) -> list[tuple[str, object]]:
    texts: list[tuple[str, object]] = []
    original = ImageDraw.ImageDraw.text

    def recording(self, xy, text, fill=None, *args, **kwargs):
        texts.append((text, fill))
        return original(self, xy, text, fill, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", recording)
    return texts


def test_shorten_name_is_the_change_reports_rule():
    names = ["", "a", "IMG_20240517_120000_0042.jpg", "x" * 40, "holiday_2024_beach_sunset_panorama_0001.png", "ü" * 9]
    for name in names:
        for width in range(1, 45):
            assert rg.shorten_name(name, width) == report_shorten_name(name, width), (name, width)
    for width in (0, -1, True, 2.0):
        with pytest.raises(ValueError):
            rg.shorten_name("abc", width)


def test_the_grid_draws_every_caption_and_a_tile_per_image(tmp_path, monkeypatch):
    query = _photo(tmp_path / "query_photo.png", (200, 30, 30))
    results = [_photo(tmp_path / f"result_{i}.png", (30, 30 * i, 200)) for i in range(7)]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    results += [str(tmp_path / "broken.png"), str(tmp_path / "gone.png")]
    scores = [0.9 - 0.05 * i for i in range(len(results))]
    texts = _drawn_texts(monkeypatch)
    out = tmp_path / "grid.png"
    assert rg.draw_results(query, results, scores, out) == out
    captions = rg.grid_captions(query, results, scores)
    lines = [line for caption in captions for line in caption.splitlines()]
    assert [t for t, _ in texts if t not in ("missing", "unreadable")] == lines
    assert captions[0] == "query\nquery_photo.png" and captions[1] == "#1  0.900\nresult_0.png"
    assert [fill for _, fill in texts[:2]] == [rg.QUERY_COLOUR] * 2 and texts[2][1] == rg.TEXT_COLOUR
    assert ("unreadable", rg.TEXT_COLOUR) in texts and ("missing", rg.TEXT_COLOUR) in texts
    cell_w = rg.TILE_SIDE + 2 * rg.MARGIN
    cell_h = 2 * rg.CAPTION_LINE + rg.TILE_SIDE + 2 * rg.MARGIN
    with Image.open(out) as grid:  # 10 tiles: 6 in the first row, 4 in the second
        assert grid.size == (6 * cell_w, 2 * cell_h) and grid.mode == "RGB"
        pixels = np.asarray(grid)
    centre = pixels[rg.MARGIN + 2 * rg.CAPTION_LINE + rg.TILE_SIDE // 2, rg.MARGIN + rg.TILE_SIDE // 2]
    assert tuple(centre) == (200, 30, 30)  # the query's tile shows the query
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_single_image_and_awkward_names_are_drawn(tmp_path):
    odd = tmp_path / "bad\x07name_\udcff.png"  # a control character and an undecodable byte in the name
    _photo(odd, (10, 10, 10))
    out = tmp_path / "grid.png"
    rg.draw_results(str(odd), [], [], out)
    with Image.open(out) as grid:
        assert grid.size == (rg.TILE_SIDE + 2 * rg.MARGIN, 2 * rg.CAPTION_LINE + rg.TILE_SIDE + 2 * rg.MARGIN)
    assert rg.grid_captions(str(odd), [], []) == ["query\nbad\\x07name_\\xff.png"]  # escaped as drawn


def test_captions_show_undecodable_bytes_and_controls_as_the_terminal_does():
    """A caption shows a name's undecodable byte and an escape sequence as ``core.names.shown`` writes
    them (was U+FFFD and ``?``: the byte was lost)."""
    from plmetric.core.names import shown
    from plmetric.retrieval import result_grid

    name = "caf\udce9\x1b]0;t\x07.png"
    assert result_grid._drawable(name) == shown(name) == "caf\\xe9\\x1b]0;t\\x07.png"


def test_images_of_the_same_name_in_class_folders_are_told_apart_by_their_folders(tmp_path, monkeypatch):
    """CUB has a 0034.jpg under every species: each caption names the folders below the images'
    common one on a line of its own (shortened in the middle, keeping start and end), the grid's
    cells one caption line taller to hold it."""
    long_species = "001.Black_footed_Albatross_Phoebastria_nigripes"
    folders = [tmp_path / "cub" / long_species, tmp_path / "cub" / "054.Baltimore_Oriole"]
    for folder in folders:
        folder.mkdir(parents=True)
    for folder in folders:  # as tall as a tile: its last row is the cell's last above the margin
        Image.fromarray(np.full((rg.TILE_SIDE, 50, 3), (40, 40, 200), np.uint8)).save(folder / "0034.png")
    query, result = (str(folder / "0034.png") for folder in folders)
    texts = _drawn_texts(monkeypatch)
    out = tmp_path / "grid.png"
    rg.draw_results(query, [result], [0.5], out)
    captions = rg.grid_captions(query, [result], [0.5])
    assert captions[0].splitlines()[1:] != captions[1].splitlines()[1:]
    head, tail = captions[0].splitlines()[1].split("…")
    assert long_species.startswith(head) and long_species.endswith(tail) and len(head) + 1 + len(tail) == 28
    assert captions[1] == "#1  0.500\n054.Baltimore_Oriole\n0034.png"
    assert [t for t, _ in texts] == [line for caption in captions for line in caption.splitlines()]
    cell_h = 3 * rg.CAPTION_LINE + rg.TILE_SIDE + 2 * rg.MARGIN
    with Image.open(out) as grid:
        assert grid.size == (2 * (rg.TILE_SIDE + 2 * rg.MARGIN), cell_h)
        pixels = np.asarray(grid)
    assert tuple(pixels[cell_h - rg.MARGIN - 1, rg.MARGIN + rg.TILE_SIDE // 2]) == (40, 40, 200)  # below 3 lines
