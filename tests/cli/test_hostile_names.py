"""File names chosen by someone else (issue 30): bytes that are not UTF-8, cells a spreadsheet would
run, escape sequences a terminal would obey. Every table and JSON keeps such a name exactly (read back
by plmetric's readers it opens the same file), no CSV cell starts a formula, and nothing printed holds
a raw control character or an undecodable byte."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from plmetric.cli import main
from plmetric.core.checkpoint import save_model
from plmetric.core.names import shown
from plmetric.data.backbones import create_model
from plmetric.retrieval.index import load_embeddings, save_embeddings
from plmetric.retrieval.tables import (
    COLUMNS,
    FORMULA_STARTS,
    TEXT_MARK,
    TableWriter,
    csv_text,
    decode_name,
    encode_name,
    read_csv_text,
    read_group_table,
)

SPREADSHEET = [b'=HYPERLINK("http:x","y")', b"+1", b"-x", b"@SUM(1)", b"'quoted", b"semi;=1+1", b"\tx", b"\rx"]
NAMES = [
    b"caf\xe9.png",  # Latin-1, not UTF-8
    *(name + b".png" for name in SPREADSHEET),
    b"\x1b[2J\x1b]0;pwned\x07.png",  # clear the screen, set the window title
    b"c1\xc2\x9b31m.png",  # U+009B, the C1 control sequence introducer
    b"\xe2\x80\xaegnp.exe.png",  # U+202E, right-to-left override
    b"new\nline\ttab\rcr.png",
    b"file:not-a-uri.png",
    b"plain.png",
]
RAW = ("\x1b", "\x07", "\x9b", "\u202e")
"""Characters a terminal acts on: never printed as they are."""


def _no_raw_controls(text: str) -> None:
    assert not any(char in text for char in RAW), shown(text)
    assert not any(0xD800 <= ord(char) <= 0xDFFF for char in text), "an undecodable byte was printed raw"


def _csv_cells_are_safe(path: Path) -> list[list[str]]:
    """The CSV's rows (the file strictly UTF-8), after checking that no cell starts like a formula
    unless it is a number."""
    text = path.read_bytes().decode("utf-8")  # strict: any reader can open it
    rows = list(csv.reader(text.splitlines(keepends=True)))
    for row in rows:
        for cell in row:
            if cell.startswith(FORMULA_STARTS):
                float(cell)  # only a number (a negative score, group -1) may start with '-'
    return rows


@pytest.fixture(scope="module")
def pile(tmp_path_factory) -> dict:
    """Real image files under hostile names (each with its own pixels), indexed with a random-weight
    checkpoint; the embeddings then planted: the named images near-copies of each other (one group of
    duplicates), four plain ones far apart."""
    root = tmp_path_factory.mktemp("names")
    folder = root / "photos"
    folder.mkdir()
    extra = [f"far{i}.png".encode() for i in range(4)]
    for i, name in enumerate(NAMES + extra):
        pixels = np.full((12 + i, 12, 3), (17 * i) % 256, np.uint8)
        Image.fromarray(pixels).save(os.path.join(os.fsencode(folder), name), format="PNG")
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=16, pretrained=False)
    ckpt = save_model(
        root / "model.safetensors", model, {"backbone": "efficientnet_lite0", "embedding_dim": 16, "image_size": 32}
    )
    index = root / "index.safetensors"
    small = ["--image-size", "32", "--no-progress", "--num-workers", "0"]
    assert main(["index", str(folder), "--checkpoint", str(ckpt), "--out", str(index), *small]) == 0
    _, labels, paths, description = load_embeddings(index)
    assert sorted(os.path.basename(os.fsencode(p)) for p in paths) == sorted(NAMES + extra)
    rng = np.random.default_rng(0)
    named = np.array([not Path(p).name.startswith("far") for p in paths])
    vectors = rng.normal(size=(len(paths), 16))  # 16-d random directions: cosines far below 0.82
    vectors[named] = rng.normal(size=16) + 0.01 * rng.normal(size=(int(named.sum()), 16))  # cosines > 0.99
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    save_embeddings(index, torch.from_numpy(vectors.astype(np.float32)), labels, paths, description)
    contents = {p: Path(p).read_bytes() for p in paths}
    return {"root": root, "folder": folder, "index": index, "paths": paths, "contents": contents, "named": named}


def _same_files(pile: dict, names: list[str]) -> None:
    """Every name read back is an indexed path, and opens that file (its own pixels)."""
    assert set(names) <= set(pile["paths"])
    for name in names:
        assert Path(name).read_bytes() == pile["contents"][name]


# ----------------------------------------------------------------------------- the rules


def test_shown_escapes_what_a_terminal_would_act_on():
    assert shown("caf\udce9.png") == "caf\\xe9.png"  # the undecodable byte, as its value
    assert shown(b"caf\xe9.png") == "caf\\xe9.png"
    assert shown("\x1b[2J\x1b]0;pwned\x07") == "\\x1b[2J\\x1b]0;pwned\\x07"
    assert shown("a\x9bb\u202ec\u2066d\n\t\r") == "a\\x9bb\\u202ec\\u2066d\\n\\t\\r"
    assert shown("ünïcödé 漢字 emoji 🙂, commas; quotes \"'") == "ünïcödé 漢字 emoji 🙂, commas; quotes \"'"
    assert shown(Path("/x/\x1b.png")) == "/x/\\x1b.png"
    every = "".join(map(chr, range(0x00, 0x200))) + "\ud800\udc00\udfff"
    _no_raw_controls(shown(every))
    assert not [char for char in shown(every) if unicodedata.category(char) in ("Cc", "Cs")]
    shown(every).encode("utf-8")  # strict: prints on any UTF-8 terminal


@pytest.mark.parametrize("raw", NAMES + [b"", b"%41%", b"file:", b"/a/b\xff\xfe/c d.png"])
def test_every_name_round_trips_through_the_table_encoding(raw):
    name = os.fsdecode(raw)
    cell = encode_name(name)
    cell.encode("utf-8")  # strict: a Parquet string, any JSON or CSV reader
    assert decode_name(cell) == name and os.fsencode(decode_name(cell)) == raw
    is_utf8 = raw.decode("utf-8", "replace").encode("utf-8") == raw
    assert (cell == name) == (is_utf8 and not raw.startswith(b"file:"))
    assert read_csv_text(next(csv.reader([csv_text(cell)]))[0]) == cell


@pytest.mark.parametrize("text", ["=1+1", "+1", "-x", "@SUM(1)", "\tx", "\rx", "'", "''x", "x'", "", "a,b\"c\nd"])
def test_csv_text_is_quoted_neutralised_and_undone_exactly(text):
    field = csv_text(text)
    assert field.startswith('"') and field.endswith('"')
    (read,) = next(csv.reader([field]))  # as a spreadsheet or csv module sees the cell
    assert not read.startswith(FORMULA_STARTS)
    assert read == (TEXT_MARK + text if text.startswith((*FORMULA_STARTS, TEXT_MARK)) else text)
    assert read_csv_text(read) == text


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("kind", ["groups", "duplicates", "neighbours"])
def test_table_writer_keeps_bare_hostile_names(tmp_path, suffix, kind):
    """Names as they may reach the writer (not absolute: a formula start first) read back exactly."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    names = [os.fsdecode(raw) for raw in NAMES] + [os.fsdecode(raw) for raw in SPREADSHEET]
    n = len(names)
    columns = {
        "groups": [[-1] * n, [n] * n, names, [0] * n, [float("nan")] * n],
        "duplicates": [[1] * n, [n] * n, names, [-0.5] * n],
        "neighbours": [names, [1] * n, names[::-1], [-0.25] * n],
    }[kind]
    out = tmp_path / f"t{suffix}"
    with TableWriter(out, kind) as table:
        table.write(columns)
        table.commit()
    if suffix == ".csv":
        rows = _csv_cells_are_safe(out)
        assert rows[0] == list(COLUMNS[kind]) and len(rows) == 1 + n
        read = {name: [decode_name(read_csv_text(row[i])) for row in rows[1:]] for i, name in enumerate(rows[0])}
    else:
        import pyarrow.parquet as pq

        read = {name: [decode_name(v) if isinstance(v, str) else v for v in column]
                for name, column in pq.read_table(out).to_pydict().items()}
    assert read["path"] == names
    if kind == "neighbours":
        assert read["neighbour"] == names[::-1]
        assert {float(v) for v in read["score"]} == {-0.25}
    else:
        assert read_group_table(out) == [(columns[0][0], name) for name in names]


# ----------------------------------------------------------------------------- the commands


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_pile_tables_keep_every_name(pile, tmp_path, suffix, capsys):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    index = str(pile["index"])
    n = len(pile["paths"])
    outs = {kind: tmp_path / f"{kind}{suffix}" for kind in ("neighbours", "duplicates", "groups")}
    assert main(["neighbours", index, "--k", str(n - 1), "--out", str(outs["neighbours"]), "--no-progress"]) == 0
    assert main(["duplicates", index, "--out", str(outs["duplicates"]), "--no-progress"]) == 0
    assert main(["groups", index, "--min-size", "2", "--groups", "2", "--out", str(outs["groups"])]) == 0
    printed = capsys.readouterr()
    _no_raw_controls(printed.out + printed.err)
    for kind in ("duplicates", "groups"):
        rows = read_group_table(outs[kind])
        _same_files(pile, [path for _, path in rows])
        if kind == "groups":
            assert sorted(path for _, path in rows) == sorted(pile["paths"])
        else:  # the named images are the one group of near-copies
            assert sorted(path for _, path in rows) == sorted(np.array(pile["paths"])[pile["named"]])
    if suffix == ".csv":
        for out in outs.values():
            _csv_cells_are_safe(out)
        rows = list(csv.DictReader(outs["neighbours"].open(encoding="utf-8", newline="")))
        pairs = [(decode_name(read_csv_text(r["path"])), decode_name(read_csv_text(r["neighbour"]))) for r in rows]
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(outs["neighbours"]).to_pydict()
        pairs = [(decode_name(a), decode_name(b)) for a, b in zip(table["path"], table["neighbour"], strict=True)]
    assert len(pairs) == n * (n - 1) and sorted({a for a, _ in pairs}) == sorted(pile["paths"])
    _same_files(pile, [b for _, b in pairs])


def test_duplicates_prints_every_name_escaped(pile, tmp_path, capsys):
    out = tmp_path / "d.csv"
    assert main(["duplicates", str(pile["index"]), "--out", str(out), "--show", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    _no_raw_controls(printed)
    (line,) = [line for line in printed.splitlines() if line.startswith("  group 1 ")]
    first = [Path(p).name for _, p in read_group_table(out)[:4]]
    assert line.split(": ", 1)[1].startswith(", ".join(shown(name) for name in first))


def test_search_json_and_csv_keep_every_name(pile, tmp_path, capsys):
    query = next(p for p in pile["paths"] if p.endswith("plain.png"))
    n = len(pile["paths"])
    args = ["search", query, "--index", str(pile["index"]), "--top-k", str(n), "--include-self"]
    args += ["--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv"), "--out", str(tmp_path / "g.png")]
    assert main(args) == 0
    printed = capsys.readouterr()
    _no_raw_controls(printed.out + printed.err)
    assert "caf\\xe9.png" in printed.out
    report = json.loads((tmp_path / "r.json").read_bytes().decode("utf-8"))
    (entry,) = report["queries"]
    assert decode_name(entry["query"]) == query
    from_json = [decode_name(hit["path"]) for hit in entry["results"]]
    assert sorted(from_json) == sorted(pile["paths"])
    _same_files(pile, from_json)
    rows = _csv_cells_are_safe(tmp_path / "r.csv")
    assert rows[0] == ["query", "rank", "path", "score"]
    from_csv = [decode_name(read_csv_text(row[2])) for row in rows[1:]]
    assert from_csv == from_json
    assert {decode_name(read_csv_text(row[0])) for row in rows[1:]} == {query}


def test_serve_shows_and_answers_every_name(pile, tmp_path):
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from plmetric.retrieval.serve import Browser, create_app, load_group_table

    groups = tmp_path / "groups.csv"
    assert main(["groups", str(pile["index"]), "--min-size", "2", "--groups", "2", "--out", str(groups)]) == 0
    browser = Browser(pile["index"], len(pile["paths"]) - 1)
    table = load_group_table(groups, "groups", browser)  # serve --groups: every row mapped onto the index
    assert sorted(i for group in table.groups for i in group.members) == list(range(len(pile["paths"])))
    with TestClient(create_app(browser, tables=(table,))) as client:
        for url in ("/", "/search?id=0", "/groups", f"/groups/{table.groups[0].slug}"):
            page = client.get(url)
            assert page.status_code == 200, url
            _no_raw_controls(page.text)
        assert "caf\\xe9.png" in client.get("/").text
        answer = client.get("/api/search?id=0")
        assert answer.status_code == 200
        found = [decode_name(hit["path"]) for hit in answer.json()["results"]]
        assert decode_name(answer.json()["query"]) == pile["paths"][0]
        assert sorted(found + [pile["paths"][0]]) == sorted(pile["paths"])
        _same_files(pile, found)


def test_index_warns_about_unreadable_files_with_their_names_escaped(tmp_path):
    """A real process writing to a UTF-8 terminal: the warning about each unreadable file names it
    escaped (the screen is not cleared, the title not set, the line not refused for its bytes)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "good.png")
    Image.fromarray(np.ones((16, 16, 3), np.uint8)).save(folder / "good2.png")
    bad = [b"\x1b[2J\x1b]0;pwned\x07.jpg", b"caf\xe9\xc2\x9b.jpg"]
    for name in bad:
        with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
            handle.write(b"not an image\n")
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=8, pretrained=False)
    ckpt = save_model(
        tmp_path / "m.safetensors", model, {"backbone": "efficientnet_lite0", "embedding_dim": 8, "image_size": 32}
    )
    args = ["index", str(folder), "--checkpoint", str(ckpt), "--out", str(tmp_path / "i.safetensors")]
    args += ["--image-size", "32", "--no-progress", "--num-workers", "0", "--runtime", "torch"]
    env = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(
        [sys.executable, "-m", "plmetric.cli", *args], capture_output=True, timeout=300, cwd=tmp_path, env=env
    )
    err = done.stderr.decode("utf-8")  # strict: no undecodable byte reached the terminal
    assert done.returncode == 0, err[-2000:]
    _no_raw_controls(err + done.stdout.decode("utf-8"))
    warned = [line for line in err.splitlines() if "skipping unreadable image" in line]
    assert len(warned) == 2 and all(line.startswith("plmetric: warning: ") for line in warned)
    for name in bad:
        assert sum(shown(str(folder / os.fsdecode(name))) in line for line in warned) == 1
