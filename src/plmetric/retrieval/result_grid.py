"""The PNG grid of a search: the query beside its results, drawn with Pillow (no matplotlib, no torch).

Each tile is the image, shrunk to fit a square of :data:`TILE_SIDE` pixels, under its caption:
``query`` (in red) or ``#rank  score``, then, when the images lie in more than one folder, the folders
below their common one (CUB has a ``0034.jpg`` under every species), then the file name, each line
shortened in the middle to :data:`GRID_CAPTION_CHARS` characters
(:func:`plmetric.core.names.caption_lines`); a file that is gone or cannot be decoded is a grey tile
saying so. At most :data:`GRID_COLUMNS` tiles a row. Importing matplotlib alone takes about a second (more
on a busy machine), several times what drawing the grid takes: ``plmetric search`` with one query
must answer within two seconds.

It imports the standard library, NumPy and Pillow (through :mod:`plmetric.data.images`) and
:mod:`plmetric.core.checkpoint` and :mod:`plmetric.core.names` only.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
from pathlib import Path
from typing import Any

from plmetric.core.checkpoint import atomic_write_bytes
from plmetric.core.names import caption_lines, common_folder, shorten_name, shown

__all__ = [
    "GRID_CAPTION_CHARS",
    "GRID_COLUMNS",
    "GRID_DECODE_SIDE",
    "TILE_SIDE",
    "draw_results",
    "grid_captions",
    "shorten_name",
]

GRID_DECODE_SIDE = 512
"""Grid tiles are about 200 px wide: JPEGs are decoded at the smallest DCT scale that keeps this side."""
GRID_CAPTION_CHARS = 28
"""A grid tile's caption fits about this many characters of a file name."""
GRID_COLUMNS = 6
TILE_SIDE = 198
"""The square each image is shrunk into (2.2 inches at 90 dpi, the size of the earlier matplotlib grid)."""
FONT_PIXELS = 11
CAPTION_LINE = FONT_PIXELS + 3
MARGIN = 6
QUERY_COLOUR = (214, 39, 40)  # matplotlib's tab:red, the query's caption colour since the first grids
TEXT_COLOUR = (0, 0, 0)
PLACEHOLDER_GREY = (200, 200, 200)
PNG_COMPRESSION = 1
"""zlib level of the grid: photos barely compress further at 6 (Pillow's default), which takes 5x as long."""


def grid_captions(query_path: str, result_paths: list[str], scores: list[float]) -> list[str]:
    """The captions of a grid, query first: ``query\\n<name>``, then ``#<rank>  <score>\\n<name>``
    with the score to 3 decimals; ``<name>`` is the file name, after the folders below the images'
    common folder on a line of their own when they lie in more than one (:func:`caption_lines`,
    every line shortened in the middle to :data:`GRID_CAPTION_CHARS`)."""
    folder = common_folder([query_path, *result_paths])
    heads = ["query"] + [f"#{i + 1}  {s:.3f}" for i, s in enumerate(scores)]
    paths = [query_path, *result_paths]
    return [
        "\n".join([head, *caption_lines(path, folder, GRID_CAPTION_CHARS)])
        for head, path in zip(heads, paths, strict=True)
    ]


def draw_results(query_path: str, result_paths: list[str], scores: list[float], out: str | os.PathLike) -> Path:
    """Draw the query beside its results as a PNG grid (captions: :func:`grid_captions`), atomically.

    Returns:
        ``out`` as a Path.
    """
    from PIL import Image, ImageDraw

    captions = grid_captions(query_path, result_paths, scores)
    files = [query_path, *result_paths]
    cols = min(len(files), GRID_COLUMNS)
    rows = (len(files) + cols - 1) // cols
    lines = max(len(caption.splitlines()) for caption in captions)  # 2, or 3 with the folders
    cell_w, cell_h = TILE_SIDE + 2 * MARGIN, lines * CAPTION_LINE + TILE_SIDE + 2 * MARGIN
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for n, (image_path, caption) in enumerate(zip(files, captions, strict=True)):
        x0, y0 = (n % cols) * cell_w + MARGIN, (n // cols) * cell_h + MARGIN
        colour = QUERY_COLOUR if n == 0 else TEXT_COLOUR
        for line_no, line in enumerate(caption.splitlines()):
            _centred_text(draw, (x0 + TILE_SIDE / 2, y0 + line_no * CAPTION_LINE), _drawable(line), font, colour)
        top = y0 + lines * CAPTION_LINE
        tile = _tile(image_path)
        if tile is None:
            draw.rectangle((x0, top, x0 + TILE_SIDE - 1, top + TILE_SIDE - 1), fill=PLACEHOLDER_GREY)
            word = "missing" if not Path(image_path).exists() else "unreadable"
            _centred_text(draw, (x0 + TILE_SIDE / 2, top + TILE_SIDE / 2 - FONT_PIXELS / 2), word, font, TEXT_COLOUR)
        else:
            canvas.paste(tile, (x0 + (TILE_SIDE - tile.width) // 2, top + (TILE_SIDE - tile.height) // 2))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", compress_level=PNG_COMPRESSION)
    atomic_write_bytes(out, buffer.getvalue())
    return Path(out)


def _tile(path: str) -> Any:
    """The image at ``path`` shrunk to fit ``TILE_SIDE`` square (aspect kept), or None when it cannot be read."""
    from PIL import Image

    from plmetric.data.images import open_image

    try:
        image = open_image(path, max_side=GRID_DECODE_SIDE)
    except (OSError, ValueError):
        return None
    image.thumbnail((TILE_SIDE, TILE_SIDE), Image.Resampling.BICUBIC)
    return image


@functools.lru_cache(maxsize=1)
def _font() -> Any:
    """DejaVu Sans (shipped with matplotlib, found without importing it: wide script coverage), else
    Pillow's own scalable font, else its bitmap font (Pillow < 10.1)."""
    from PIL import ImageFont

    spec = importlib.util.find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        try:
            return ImageFont.truetype(str(candidate), FONT_PIXELS)
        except OSError:  # no such file, or Pillow without FreeType
            continue
    try:
        return ImageFont.load_default(size=FONT_PIXELS)
    except TypeError:  # Pillow < 10.1: no size
        return ImageFont.load_default()


def _drawable(text: str) -> str:
    """``text`` that Pillow can draw, as a terminal shows it (:func:`plmetric.core.names.shown`): an
    undecodable byte of a file name as ``\\xNN``, control and bidi characters as escapes."""
    return shown(text)


def _centred_text(
    draw: Any, centre_top: tuple[float, float], text: str, font: Any, colour: tuple[int, int, int]
) -> None:
    """``text`` centred horizontally on ``centre_top[0]``, its top at ``centre_top[1]``."""
    x, y = centre_top
    try:
        width = draw.textlength(text, font=font)
        draw.text((x - width / 2, y), text, fill=colour, font=font)
    except (UnicodeError, ValueError, OSError):  # a glyph the font cannot encode: the ASCII rest
        fallback = text.encode("ascii", "replace").decode("ascii")
        draw.text((x - draw.textlength(fallback, font=font) / 2, y), fallback, fill=colour, font=font)
