"""What training changed, for a run on unlabelled images: the neighbour change and the change report.

Two models embed the same N images, the untrained start as ``s_i`` and the kept model as ``t_i``
(L2-normalised, dimensions may differ). With ``kNN_s(i)`` the k images most cosine-similar to
image i under the start (i itself excluded) and ``kNN_t(i)`` the same under the kept model, the
neighbour change of image i is ``c_i = 1 - |kNN_s(i) ∩ kNN_t(i)| / k`` (0: the same neighbours,
1: all new), computed in row chunks so that memory stays O(chunk × N)
(:func:`neighbour_change`). :func:`write_change_report` shows it to the user:
``report.html`` (self-contained, thumbnails as data URIs) and ``report.png`` with, for a few
seeded random query images, their top results before and after training, the label-free
criterion's score for both models, the mean of ``c_i`` and the share of images whose top-1 changed.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import os
from collections.abc import Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from plmetric.core.checkpoint import atomic_write_bytes, atomic_write_figure
from plmetric.core.names import CAPTION_CHARS, caption_lines, common_folder, shorten_name  # noqa: F401 - their old home
from plmetric.core.names import shown as visible
from plmetric.core.validation import check_embeddings, check_int

__all__ = [
    "CHUNK_ELEMENTS",
    "THUMBNAIL_SIDE",
    "caption_lines",
    "choose_queries",
    "common_folder",
    "load_thumbnail",
    "neighbour_change",
    "shorten_name",
    "top_results",
    "write_change_report",
]

# Similarities held at once per embedding while ranking neighbours: rows per chunk = this // N.
CHUNK_ELEMENTS = 1 << 24
# Thumbnails fit in a square of this many pixels.
THUMBNAIL_SIDE = 96
PLACEHOLDER_GREY = (160, 160, 160)


def _ranking_dtype(*tensors: Tensor) -> torch.dtype:
    """The common floating dtype of ``tensors``, at least float32 (half precision ranks badly)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _paired_embeddings(start: Any, kept: Any, where: str, min_rows: int) -> tuple[Tensor, Tensor]:
    """``start`` and ``kept`` checked, unit rows, on start's device in a common dtype."""
    start = check_embeddings(start, f"{where}: start", min_rows=min_rows)
    kept = check_embeddings(kept, f"{where}: kept", min_rows=min_rows)
    if start.shape[0] != kept.shape[0]:
        raise ValueError(
            f"{where}: start and kept must embed the same images, got {start.shape[0]} and {kept.shape[0]} rows"
        )
    dtype = _ranking_dtype(start, kept)
    return (
        F.normalize(start.detach().to(dtype), dim=1),
        F.normalize(kept.detach().to(device=start.device, dtype=dtype), dim=1),
    )


def _top_others(x: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Cosine scores and indices (each (len(rows), k), best first) of the k rows of unit ``x`` most
    similar to ``x[rows]``, the row itself excluded (by index, so an identical duplicate stays)."""
    sims = x[rows] @ x.T
    sims.scatter_(1, rows.unsqueeze(1), float("-inf"))
    return sims.topk(k, dim=1)


@torch.no_grad()
def _changes(start: Tensor, kept: Tensor, ks: Sequence[int], chunk_rows: int | None) -> list[Tensor]:
    """``1 - |kNN_start(i) ∩ kNN_kept(i)| / k`` for each k of ``ks`` (each <= N - 1) from one
    ranking pass over row chunks of unit ``start`` and ``kept``."""
    n = start.shape[0]
    k_max = max(ks)
    rows_per_chunk = chunk_rows if chunk_rows is not None else max(1, CHUNK_ELEMENTS // n)
    out = [torch.empty(n, dtype=start.dtype, device=start.device) for _ in ks]
    for first in range(0, n, rows_per_chunk):
        last = min(first + rows_per_chunk, n)
        rows = torch.arange(first, last, device=start.device)
        before = _top_others(start, rows, k_max).indices
        after = _top_others(kept, rows, k_max).indices
        for slot, k in enumerate(ks):
            member = torch.zeros(len(rows), n, dtype=torch.bool, device=start.device)
            member.scatter_(1, before[:, :k], True)
            shared = member.gather(1, after[:, :k]).sum(dim=1)
            out[slot][first:last] = 1.0 - shared.to(start.dtype) / k
    return out


def neighbour_change(start: Tensor, kept: Tensor, k: int = 10, *, chunk_rows: int | None = None) -> Tensor:
    """The share of each image's k nearest neighbours that changed between two embeddings.

    ``c_i = 1 - |kNN_start(i) ∩ kNN_kept(i)| / k``, where ``kNN_e(i)`` are the k rows most
    cosine-similar to row i under embedding e, row i itself excluded. Rows are normalised here
    (cosine); ties are broken as ``torch.topk`` breaks them.

    Args:
        start: (N, D1) embeddings of N images by the start model, N >= 2.
        kept: (N, D2) the same images by the kept model (moved to start's device).
        k: neighbours per image, clipped to N - 1.
        chunk_rows: rows ranked at once (default ``CHUNK_ELEMENTS // N``): memory O(chunk_rows × N).

    Returns:
        (N,) values in [0, 1], multiples of 1/k, on start's device, in the inputs' common dtype
        (at least float32).

    Raises:
        ValueError: not two finite floating (N, d) tensors with the same N >= 2, or k < 1.
    """
    start, kept = _paired_embeddings(start, kept, "neighbour_change", min_rows=2)
    k = min(check_int("k", k, 1, where="neighbour_change: "), start.shape[0] - 1)
    if chunk_rows is not None:
        check_int("chunk_rows", chunk_rows, 1, where="neighbour_change: ")
    return _changes(start, kept, (k,), chunk_rows)[0]


@torch.no_grad()
def top_results(embeddings: Tensor, queries: Tensor, top: int) -> tuple[Tensor, Tensor]:
    """The ``top`` most cosine-similar images to each query, the query itself excluded.

    Computes only the (len(queries), N) similarities ``x_q · x_j`` of unit rows, never N × N.

    Args:
        embeddings: (N, D) embeddings, N >= 2.
        queries: (Q,) integer row indices of the queries.
        top: results per query, clipped to N - 1.

    Returns:
        ``(scores, indices)``, each (Q, top), best first.
    """
    x = check_embeddings(embeddings, "top_results: embeddings", min_rows=2)
    x = F.normalize(x.detach().to(_ranking_dtype(x)), dim=1)
    top = min(check_int("top", top, 1, where="top_results: "), x.shape[0] - 1)
    queries = torch.as_tensor(queries, dtype=torch.long, device=x.device).reshape(-1)
    if queries.numel() and (int(queries.min()) < 0 or int(queries.max()) >= x.shape[0]):
        raise ValueError(f"top_results: query indices must lie in [0, {x.shape[0]}), got {queries.tolist()}")
    scores, indices = _top_others(x, queries, top)
    return scores, indices


def _captions(paths: Sequence[str], shown: Sequence[int]) -> dict[int, list[str]]:
    """The caption lines of the images ``shown`` together (:func:`caption_lines`): the folders below
    their :func:`common_folder` tell them apart."""
    folder = common_folder([paths[i] for i in shown])
    return {i: caption_lines(paths[i], folder) for i in shown}


def _printable(text: str) -> str:
    """``text`` safe to encode as UTF-8 and to draw: undecodable bytes of a file name, control and
    bidirectional characters as visible escapes (:func:`plmetric.core.names.shown`, as the terminal
    and ``serve``'s page show names)."""
    return visible(text)


def _placeholder(side: int) -> Any:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side), PLACEHOLDER_GREY)
    with contextlib.suppress(Exception):  # a placeholder without its word is still a placeholder
        ImageDraw.Draw(image).text((4, side // 2 - 6), "unreadable", fill=(255, 255, 255))
    return image


def load_thumbnail(path: str | os.PathLike, side: int = THUMBNAIL_SIDE) -> tuple[Any, bool]:
    """The image at ``path`` as an RGB PIL image that fits in ``side`` × ``side`` (aspect kept,
    EXIF orientation applied, any mode as 8-bit RGB: :func:`plmetric.data.images.open_image`), and
    True; a grey ``side`` × ``side`` placeholder and False when the file is missing, not a regular
    file, over the pixel limit or does not decode. Never raises for a bad file."""
    from plmetric.data.images import open_image

    side = check_int("side", side, 1, where="load_thumbnail: ")
    try:
        image = open_image(path, "thumbnail", max_side=2 * side)  # JPEG: decoded at a reduced scale
        image.thumbnail((side, side))
        return image, True
    except Exception:  # noqa: BLE001: a thumbnail never stops the report
        return _placeholder(side), False


def _jpeg_data_uri(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"write_change_report: {name} must be a number, got {value!r}")
    return float(value)


def _format(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}g}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}%"


def choose_queries(n: int, queries: int, seed: int) -> list[int]:
    """``min(queries, n)`` distinct indices in [0, n), sorted, drawn by ``numpy.random.default_rng(seed)``:
    the same for every call with the same n, queries and seed (whatever the embeddings)."""
    n, queries = check_int("n", n, 1), check_int("queries", queries, 1)
    rng = np.random.default_rng(check_int("seed", seed, 0))
    return sorted(int(i) for i in rng.choice(n, size=min(queries, n), replace=False))


SCORES_NOTE = (
    "Scores are cosine similarities, each in its own model's embedding: the start's (the backbone's features) "
    "and the kept model's (a trained embedding, often of another dimension) are on different scales, and a pair's "
    "cosine can be much higher or lower after training while its rank stays. Compare which images come back and "
    "in what order, not the numbers of one row with the other's."
)
"""Why the scores before and after differ, said on the page and in short in report.png."""


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .4em}
.summary{margin:.2em 0 1em;line-height:1.5}
.summary code{background:#eee;padding:0 .3em}
table.query{border-collapse:collapse;margin-bottom:1.2em;background:#fff;border:1px solid #ddd}
table.query td{padding:4px;vertical-align:top}
td.label{font-size:.8em;color:#555;white-space:nowrap;vertical-align:middle}
figure{display:inline-block;margin:2px;width:110px;text-align:center;vertical-align:top}
figure img{max-width:96px;max-height:96px;display:block;margin:0 auto;border:2px solid transparent}
figure.new img{border-color:#2a7}
figure.gone img{border-color:#c44}
figure.unreadable img{border-color:#999}
figcaption{font-size:10px;line-height:1.25;word-break:break-all}
.query-cell figure{width:120px}
"""


def _figure_html(
    path: str, index: int, uri: str, score: float | None, css: str, readable: bool, lines: list[str]
) -> str:
    """One thumbnail: its caption ``lines`` (:func:`caption_lines`), its score, the full path as its title."""
    caption = "<br>".join(html.escape(line) for line in lines)
    alt = html.escape("/".join(lines))
    tip = html.escape(_printable(path))
    klass = " ".join(c for c in (css, "" if readable else "unreadable") if c)
    klass = f' class="{klass}"' if klass else ""
    score_line = "" if score is None else f"<br>{score:.3f}"
    note = "" if readable else "<br>(unreadable)"
    return (
        f'<figure{klass} data-index="{index}" title="{tip}">'
        f'<img src="{uri}" alt="{alt}"><figcaption>{caption}{score_line}{note}</figcaption></figure>'
    )


def _page(header: str, body: str) -> bytes:
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>What training changed</title><style>{_STYLE}</style></head>\n"
        f"<body>\n<h1>What training changed</h1>\n{header}\n{body}\n</body></html>\n"
    )
    return page.encode("utf-8")


def _header_html(
    criterion: str, start_score: float, kept_score: float, kept_label: str, k: int, changed: float | None,
    top1: float | None,
) -> str:
    crit = html.escape(_printable(criterion))
    lines = [
        f"Label-free criterion <code>{crit}</code>: "
        f"<b>{_format(start_score)}</b> for the start, <b>{_format(kept_score)}</b> for the kept model.",
        f"Kept model: {html.escape(_printable(kept_label))}",
    ]
    if changed is not None:
        lines.append(
            f"On average <b>{_percent(changed)}</b> of each image's {k} nearest neighbours changed; "
            f"the nearest neighbour (top-1) changed for <b>{_percent(top1)}</b> of the images."
        )
        lines.append(f'<span class="scores">{html.escape(SCORES_NOTE)}</span>')
    return '<p class="summary">' + "<br>\n".join(lines) + "</p>"


def _draw_png(
    path: Path,
    cells: list[tuple[int, list[tuple[int, float]], list[tuple[int, float]]]],
    thumbs: dict[int, Any],
    captions: dict[int, list[str]],
    title: str,
) -> None:
    """The grid as one image: rows = queries, columns = query | before top | after top, captions
    under each thumbnail (one ``figimage`` of the composed grid: fast for a hundred thumbnails)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # a caption: up to 3 lines (folder, name, score) of 6 pt at 100 dpi, 1.1 apart: 28 px under the thumbnail
    side, cell_w, cell_h, gap, head, top_band = THUMBNAIL_SIDE, 124, THUMBNAIL_SIDE + 40, 24, 18, 52
    top = max((len(b) for _, b, _ in cells), default=0)
    columns = [0] + [cell_w + gap + j * cell_w for j in range(top)]
    columns += [cell_w + 2 * gap + (top + j) * cell_w for j in range(top)]
    width = max(columns[-1] + cell_w, 480)
    height = top_band + head + max(len(cells), 1) * cell_h
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    placed: list[tuple[float, float, str]] = []
    for row, (query, before, after) in enumerate(cells):
        y0 = top_band + head + row * cell_h
        items = [(query, None)] + before + after
        for x0, (index, score) in zip(columns, items, strict=False):
            thumb = np.asarray(thumbs[index])
            h, w = thumb.shape[:2]
            ty, tx = y0 + (side - h) // 2, x0 + (cell_w - w) // 2
            canvas[ty : ty + h, tx : tx + w] = thumb
            text = "\n".join(captions[index]) + ("" if score is None else f"\n{score:.3f}")
            placed.append((x0 + cell_w / 2, y0 + side + 2, text))
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.figimage(canvas, xo=0, yo=0, origin="upper")  # pixel for pixel: no resampling

    def text(x: float, y: float, words: str, **style: Any) -> None:  # x, y: pixels from the top left
        fig.text(x / width, 1.0 - y / height, words, parse_math=False, **style)

    text(6, 6, title, fontsize=8, va="top", ha="left", wrap=True)
    if cells and top:
        y = top_band + head / 2
        text(cell_w / 2, y, "query", fontsize=8, ha="center", va="center", weight="bold")
        text((columns[1] + columns[top] + cell_w) / 2, y, "before (start)", fontsize=8, ha="center", va="center",
             weight="bold")
        text((columns[top + 1] + columns[-1] + cell_w) / 2, y, "after (kept)", fontsize=8, ha="center", va="center",
             weight="bold")
    for x, y, caption in placed:
        text(x, y, caption, fontsize=6, ha="center", va="top", linespacing=1.1)
    atomic_write_figure(fig, path, dpi=dpi)


Cell = tuple[int, list[tuple[int, float]], list[tuple[int, float]]]  # query, (index, score) before, after


def _before_and_after(
    start: Tensor, kept: Tensor, chosen: list[int], k: int, top: int
) -> tuple[int, int, float | None, float | None, list[Cell]]:
    """``(k, top, mean neighbour change, top-1 change share, cells)``: k and top clipped to N - 1, each
    query's ``top`` most similar others under both models; with N = 1, k = 0, no shares, empty cells."""
    n = start.shape[0]
    if n < 2:
        return 0, top, None, None, [(q, [], []) for q in chosen]
    k, top = min(k, n - 1), min(top, n - 1)
    changed, changed_top1 = _changes(start, kept, (k, 1), None)
    rows = torch.tensor(chosen, device=start.device)
    before_scores, before_idx = _top_others(start, rows, top)
    after_scores, after_idx = _top_others(kept, rows, top)
    cells = [
        (
            q,
            list(zip(before_idx[r].tolist(), before_scores[r].tolist(), strict=True)),
            list(zip(after_idx[r].tolist(), after_scores[r].tolist(), strict=True)),
        )
        for r, q in enumerate(chosen)
    ]
    return k, top, float(changed.mean()), float(changed_top1.mean()), cells


def _thumbnails(paths: Sequence[str], cells: list[Cell]) -> tuple[dict[int, Any], dict[int, bool]]:
    """The thumbnail of every image the cells show (queries and results), and whether it was readable."""
    shown = sorted({q for q, _, _ in cells} | {i for _, b, a in cells for i, _ in b + a})
    thumbs: dict[int, Any] = {}
    readable: dict[int, bool] = {}
    for index in shown:
        thumbs[index], readable[index] = load_thumbnail(paths[index])
    return thumbs, readable


def _query_blocks(
    paths: Sequence[str],
    cells: list[Cell],
    uris: dict[int, str],
    readable: dict[int, bool],
    top: int,
    captions: dict[int, list[str]],
) -> list[str]:
    """The page's HTML blocks: per query its results before and after (results that left the top
    marked "gone", new ones "new") and the legend; with one image, that there is nothing to compare."""
    n = len(paths)

    def figure(i: int, score: float | None, css: str) -> str:
        return _figure_html(paths[i], i, uris[i], score, css, readable[i], captions[i])

    blocks = []
    if n < 2:
        blocks.append('<p class="nothing">Only one image: there is nothing to compare.</p>')
    for q, before, after in cells:
        if n < 2:
            blocks.append(f'<div class="query-cell">{figure(q, None, "")}</div>')
            continue
        before_set, after_set = {i for i, _ in before}, {i for i, _ in after}
        before_html = "".join(figure(i, s, "" if i in after_set else "gone") for i, s in before)
        after_html = "".join(figure(i, s, "" if i in before_set else "new") for i, s in after)
        query_html = figure(q, None, "")
        blocks.append(
            f'<table class="query" data-query="{q}"><tr><td class="query-cell" rowspan="2">{query_html}</td>'
            f'<td class="label">before<br>(start)</td><td class="before">{before_html}</td></tr>'
            f'<tr><td class="label">after<br>(kept)</td><td class="after">{after_html}</td></tr></table>'
        )
    if n >= 2:
        blocks.append(
            '<p class="summary">Green frame: a result that the start did not rank in its top '
            f"{top}; red frame: a result that training dropped from it. Hover a thumbnail for its path.</p>"
        )
    return blocks


def _png_title(
    criterion: str,
    start_score: float,
    kept_score: float,
    kept_label: str,
    k: int,
    changed_mean: float | None,
    top1: float | None,
    n: int,
) -> str:
    """The title lines of report.png: the criterion's scores, how much the neighbours changed, and that the
    scores of before and after are on their own scales."""
    return (
        f"{_printable(criterion)}: start {_format(start_score)}, kept {_format(kept_score)} "
        f"({_printable(kept_label)})\n"
        + (
            f"{_percent(changed_mean)} of each image's {k} nearest neighbours changed; "
            f"top-1 changed for {_percent(top1)}\n"
            "scores: each model's own cosines, on its own scale: compare which images, not the numbers"
            if n >= 2
            else "Only one image: there is nothing to compare."
        )
    )



def write_change_report(
    out_dir: str | os.PathLike,
    paths: Sequence[str],
    start: Tensor,
    kept: Tensor,
    *,
    criterion: str,
    start_score: float,
    kept_score: float,
    kept_label: str,
    queries: int = 6,
    top: int = 8,
    k: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``out_dir/report.html`` and ``out_dir/report.png``: what training changed.

    For ``min(queries, N)`` query images drawn by :func:`choose_queries` (the same for a fixed seed
    and N), the ``min(top, N - 1)`` most cosine-similar other images under ``start`` ("before")
    and under ``kept`` ("after"), thumbnails captioned by their folder and file name
    (:func:`caption_lines`) and score; a header with the label-free criterion's score for both models,
    ``kept_label``, the mean neighbour change ``mean_i c_i`` (:func:`neighbour_change`, k clipped to
    N - 1), the share of images whose top-1 changed and why the scores differ (:data:`SCORES_NOTE`).
    Only (Q, N) similarities are formed for the queries; the neighbour change runs in row chunks.
    Both files are written atomically. With N = 1 the page says that there is nothing to compare.

    Args:
        out_dir: folder to write in (created when missing).
        paths: the N image files, in the rows' order.
        start, kept: (N, D1) and (N, D2) embeddings of the images by the start and the kept model.
        criterion: name of the label-free selection criterion.
        start_score, kept_score: its value for the start and the kept model.
        kept_label: which model was kept, e.g. ``"epoch 7 of 20, picked without labels by mutual_knn"``.
        queries, top, k, seed: query images, results per query, neighbours per image, query seed.

    Returns:
        For summary.json: ``{"criterion", "start", "kept", "neighbours_changed_mean",
        "top1_changed", "k", "queries", "report_html", "report_png"}``; ``k`` is the k used
        (clipped), the two shares are None when N = 1, ``queries`` the query paths.

    Raises:
        ValueError: bad embeddings, row counts that differ from ``len(paths)``, or bad counts.
    """
    where = "write_change_report"
    start, kept = _paired_embeddings(start, kept, where, min_rows=1)
    if start.shape[0] != len(paths):
        raise ValueError(f"{where}: {len(paths)} paths but {start.shape[0]} embeddings")
    queries = check_int("queries", queries, 1, where=f"{where}: ")
    top = check_int("top", top, 1, where=f"{where}: ")
    k = check_int("k", k, 1, where=f"{where}: ")
    seed = check_int("seed", seed, 0, where=f"{where}: ")
    start_score, kept_score = _number("start_score", start_score), _number("kept_score", kept_score)
    criterion, kept_label = str(criterion), str(kept_label)
    paths = [os.fspath(p) for p in paths]
    out_dir = Path(out_dir)
    n = len(paths)
    chosen = choose_queries(n, queries, seed)

    k, top, changed_mean, top1, cells = _before_and_after(start, kept, chosen, k, top)
    thumbs, readable = _thumbnails(paths, cells)
    uris = {index: _jpeg_data_uri(image) for index, image in thumbs.items()}
    captions = _captions(paths, list(thumbs))
    header = _header_html(criterion, start_score, kept_score, kept_label, k, changed_mean, top1)
    blocks = _query_blocks(paths, cells, uris, readable, top, captions)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "report.html", _page(header, "\n".join(blocks)))
    title = _png_title(criterion, start_score, kept_score, kept_label, k, changed_mean, top1, n)
    _draw_png(out_dir / "report.png", cells, thumbs, captions, title)

    return {
        "criterion": criterion,
        "start": start_score,
        "kept": kept_score,
        "neighbours_changed_mean": changed_mean,
        "top1_changed": top1,
        "k": k,
        "queries": [paths[q] for q in chosen],
        "report_html": "report.html",
        "report_png": "report.png",
    }
