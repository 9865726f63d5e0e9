"""Captions of images shown together (plmetric.core.names): the middle shortening, the common folder and
the caption lines that the change report, the search grid, the duplicates grid and ``serve`` share."""

from __future__ import annotations

import pytest

from plmetric.core.names import CAPTION_CHARS, caption_lines, common_folder, shorten_name


def test_the_middle_ellipsis_keeps_the_start_and_the_end() -> None:
    name = "001.Black_footed_Albatross_Phoebastria_nigripes_0034.jpg"
    for width in range(2, len(name)):
        head, tail = shorten_name(name, width).split("…")
        assert len(head) + 1 + len(tail) == width and len(tail) - len(head) in (0, 1)
        assert name.startswith(head) and name.endswith(tail)
    assert shorten_name(name, 1) == "…" and shorten_name(name, len(name)) == name
    for width in (0, -3, True, 2.0, None):
        with pytest.raises(ValueError, match="shorten_name: width"):
            shorten_name(name, width)


def test_two_files_of_the_same_name_in_class_folders_get_captions_that_name_their_folders() -> None:
    """CUB has a 0034.jpg under every species: the file name alone does not tell them apart."""
    paths = ["/cub/images/054.Baltimore_Oriole/0034.jpg", "/cub/images/001.Black_footed_Albatross/0034.jpg"]
    folder = common_folder(paths)
    assert folder == "/cub/images"
    first, second = (caption_lines(p, folder, 24) for p in paths)
    assert first != second
    assert first == ["054.Baltimore_Oriole", "0034.jpg"] and second == ["001.Black_f…ed_Albatross", "0034.jpg"]
    assert common_folder(paths[:1]) is None and caption_lines(paths[0], None) == ["0034.jpg"]


def test_a_caption_line_is_escaped_before_it_is_shortened() -> None:
    """Escapes (``\\x1b`` is four characters) count toward the width: no line is ever wider."""
    lines = caption_lines("/p/" + "\x1b" * 30 + "/b.jpg", "/p")
    assert all(len(line) <= CAPTION_CHARS for line in lines) and lines[0].startswith("\\x1b")
