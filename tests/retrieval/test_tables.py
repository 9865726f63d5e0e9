"""The pile tools' tables (plmetric.retrieval.tables): CSV and Parquet written atomically in chunks, NaN as
an empty field / null, recognised as ours only by their header or metadata, read back by
``read_group_table``, which refuses anything else with one line naming the file."""

from __future__ import annotations

import csv
import math
import os
import sys

import numpy as np
import pytest

from plmetric.retrieval import tables
from plmetric.retrieval.tables import (
    COLUMNS,
    PARQUET_KEY,
    TableWriter,
    header_line,
    is_our_table,
    read_group_table,
    recorded_index_id,
)

SUFFIXES = [".csv", ".parquet"]
PATHS = ["/pile/a,b.jpg", '/pile/say "cheese".png', "/pile/ünï cödé.jpg", "/pile/plain.jpg", "/pile/x.png"]


def needs(suffix: str) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")


def chunks(kind: str) -> list[list]:
    """Two chunks of columns of ``kind`` (numpy and plain lists, NaN in the float columns)."""
    if kind == "groups":
        return [
            [np.array([1, 1, 2]), np.array([2, 2, 1]), PATHS[:3], np.array([1, 0, 1]), np.array([0.9, 0.8, 0.7], "f4")],
            [[-1, -1], [2, 2], PATHS[3:], [0, 0], [math.nan, float("nan")]],
        ]
    if kind == "duplicates":
        return [
            [np.array([1, 1]), np.array([3, 3]), PATHS[:2], np.array([0.99, 0.97], np.float32)],
            [[1, 2, 2], [3, 2, 2], PATHS[2:], [0.96, math.nan, 0.955]],
        ]
    if kind == "pairs":
        return [
            [PATHS[:2], PATHS[2:4], np.array([0.99, 0.71], np.float32), np.array([3, 0], np.int16), ["embedding", "hash"]],
            [PATHS[4:], PATHS[:1], [0.9], [None], ["both"]],  # no hashes: an empty field / a null
        ]
    return [[PATHS[:2], [1, 2], PATHS[2:4], [0.5, math.nan]]]


def write(out, kind: str, parts: list[list] | None = None):
    with TableWriter(out, kind) as table:
        for part in chunks(kind) if parts is None else parts:
            table.write(part)
        table.commit()
    return table


def rows_of(kind: str) -> list[tuple]:
    return [row for part in chunks(kind) for row in zip(*[list(column) for column in part], strict=True)]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("kind", ["groups", "duplicates"])
def test_group_tables_round_trip(tmp_path, suffix, kind):
    needs(suffix)
    out = tmp_path / f"t{suffix}"
    table = write(out, kind)
    assert table.rows == 5 and is_our_table(out, kind)
    assert not is_our_table(out, "groups" if kind == "duplicates" else "duplicates")
    expected = [(int(row[0]), row[2]) for row in rows_of(kind)]
    assert read_group_table(out) == expected
    assert all(type(g) is int and type(p) is str for g, p in read_group_table(out))
    assert os.listdir(tmp_path) == [out.name], "a temporary file was left"


@pytest.mark.parametrize("kind", ["groups", "duplicates", "neighbours", "pairs"])
def test_csv_holds_the_header_and_nan_as_an_empty_field(tmp_path, kind):
    out = tmp_path / "t.csv"
    write(out, kind)
    with open(out, encoding="utf-8", newline="") as handle:
        lines = list(csv.reader(handle))
    assert out.read_text(encoding="utf-8").splitlines()[0] == header_line(kind) == ",".join(COLUMNS[kind])
    assert lines[0] == list(COLUMNS[kind])
    expected = rows_of(kind)
    assert len(lines) == 1 + len(expected)
    for fields, row in zip(lines[1:], expected, strict=True):
        for name, field, value in zip(COLUMNS[kind], fields, row, strict=True):
            if isinstance(value, str):
                assert field == value  # commas, quotes and non-ASCII survive
            elif value is None:
                assert field == ""
            elif isinstance(value, float | np.floating):
                assert field == ("" if math.isnan(value) else f"{float(value):.6f}")
            else:
                assert field == str(int(value))


@pytest.mark.parametrize("kind", ["groups", "duplicates", "neighbours", "pairs"])
def test_parquet_holds_types_nulls_and_our_metadata(tmp_path, kind):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "t.parquet"
    write(out, kind)
    table = pq.read_table(out)
    assert table.column_names == list(COLUMNS[kind])
    assert table.schema.metadata[PARQUET_KEY] == kind.encode()
    expected = rows_of(kind)
    assert table.num_rows == len(expected)
    for name, column in zip(COLUMNS[kind], zip(*expected, strict=True), strict=True):
        read = table.column(name).to_pylist()
        for got, value in zip(read, column, strict=True):
            if value is None or isinstance(value, float | np.floating) and math.isnan(value):
                assert got is None  # a null, not a NaN
            elif isinstance(value, float | np.floating):
                assert got == float(np.float32(value))  # stored as float32
            else:
                assert got == (value if isinstance(value, str) else int(value))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_numpy_and_torch_scalars_are_written_as_numbers_nan_as_empty(tmp_path, suffix):
    needs(suffix)
    import torch

    out = tmp_path / f"t{suffix}"
    scores = list(np.array([0.25, np.nan], np.float32))  # a list of NumPy scalars, not an array
    write(out, "duplicates", parts=[[[np.int64(1), np.int64(1)], [torch.tensor(2)] * 2, ["a", "b"], scores]])
    if suffix == ".csv":
        assert out.read_text().splitlines()[1:] == ['1,2,"a",0.250000', '1,2,"b",']  # text quoted, numbers bare
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        assert pq.read_table(out).column("best_score").to_pylist() == [0.25, None]
        assert pq.read_table(out).column("size").to_pylist() == [2, 2]
    assert read_group_table(out) == [(1, "a"), (1, "b")]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_an_empty_table_is_ours_and_reads_as_no_rows(tmp_path, suffix):
    needs(suffix)
    out = tmp_path / f"empty{suffix}"
    table = write(out, "groups", parts=[[[], [], [], [], []]])
    assert table.rows == 0 and is_our_table(out, "groups") and read_group_table(out) == []


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_the_folder_of_the_table_is_created(tmp_path, suffix):
    needs(suffix)
    out = tmp_path / "new" / "deeper" / f"t{suffix}"
    write(out, "duplicates")
    assert read_group_table(out)[0] == (1, PATHS[0])
    assert os.listdir(out.parent) == [out.name]


def test_chunks_of_the_wrong_shape_are_refused(tmp_path):
    with TableWriter(tmp_path / "t.csv", "duplicates") as table:
        with pytest.raises(ValueError, match="a duplicates table has 4 columns, got 3"):
            table.write([[1], [1], ["a"]])
        with pytest.raises(ValueError, match=r"columns of unequal lengths \[1, 2\]"):
            table.write([[1], [1, 2], ["a"], [0.5]])
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- atomic


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_failing_writer_leaves_no_temporary_and_the_previous_file_untouched(tmp_path, suffix):
    needs(suffix)
    out = tmp_path / f"t{suffix}"
    write(out, "groups")
    before = out.read_bytes()
    stat = out.stat()
    with pytest.raises(RuntimeError, match="embedding failed"):
        with TableWriter(out, "groups") as table:
            table.write(chunks("groups")[1])
            assert len(os.listdir(tmp_path)) == 2  # the temporary beside it while writing
            raise RuntimeError("embedding failed")
    assert out.read_bytes() == before and out.stat().st_mtime_ns == stat.st_mtime_ns
    assert os.listdir(tmp_path) == [out.name]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_leaving_without_commit_writes_nothing(tmp_path, suffix):
    needs(suffix)
    with TableWriter(tmp_path / f"t{suffix}", "neighbours") as table:
        table.write(chunks("neighbours")[0])
    assert os.listdir(tmp_path) == []


def test_parquet_without_pyarrow_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r'\.parquet output needs pyarrow: pip install "plmetric\[parquet\]"'):
        TableWriter(tmp_path / "t.parquet", "groups")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- is_our_table


@pytest.mark.parametrize("kind", ["groups", "duplicates", "neighbours"])
def test_is_our_table_knows_our_csv_header_only(tmp_path, kind):
    ours = tmp_path / "ours.csv"
    ours.write_text(header_line(kind) + "\r\n")  # written elsewhere with CRLF: still ours
    assert is_our_table(ours, kind)
    other = tmp_path / "other.csv"
    other.write_text("id,path,score\n1,a.jpg,0.5\n")
    longer = tmp_path / "longer.csv"
    longer.write_text(header_line(kind) + ",extra\n")
    binary = tmp_path / "random.csv"
    binary.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    for path in (other, longer, binary, tmp_path / "missing.csv", tmp_path):
        assert not is_our_table(path, kind), path


def test_is_our_table_knows_our_parquet_metadata_only(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    columns = {name: [1] if name in ("group", "size", "representative") else ["a"] for name in COLUMNS["groups"]}
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table(columns), plain)  # our columns, no metadata key
    other_key = tmp_path / "other.parquet"
    pq.write_table(pa.table(columns).replace_schema_metadata({b"plmetric_table": b"embeddings"}), other_key)
    csv_named_parquet = tmp_path / "fake.parquet"
    csv_named_parquet.write_text(header_line("groups") + "\n")
    binary = tmp_path / "random.parquet"
    binary.write_bytes(b"PAR1" + bytes(range(256)) * 10 + b"PAR1")
    for path in (plain, other_key, csv_named_parquet, binary, tmp_path / "missing.parquet"):
        assert not is_our_table(path, "groups"), path
    ours = tmp_path / "ours.parquet"
    pq.write_table(pa.table(columns).replace_schema_metadata({PARQUET_KEY: b"groups"}), ours)
    assert is_our_table(ours, "groups") and not is_our_table(ours, "duplicates")


# ----------------------------------------------------------------------------- read_group_table refusals


def test_read_group_table_refuses_a_foreign_file(tmp_path):
    foreign = tmp_path / "labels.csv"
    foreign.write_text("group,path\n1,a.jpg\n")
    with pytest.raises(ValueError, match=rf"^{foreign} is not a table written by plmetric groups or plmetric dup"):
        read_group_table(foreign)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_read_group_table_refuses_a_neighbours_table(tmp_path, suffix):
    needs(suffix)
    out = tmp_path / f"n{suffix}"
    write(out, "neighbours")
    assert is_our_table(out, "neighbours")
    with pytest.raises(ValueError, match="is not a table written by plmetric groups or plmetric duplicates"):
        read_group_table(out)


@pytest.mark.parametrize("bad", ["x", "1.5", "", "1_0", " 1", "\u0661", "+1"])  # 1_0, " 1", Arabic-Indic 1: int() takes them
def test_read_group_table_names_the_file_and_line_of_a_non_integer_group(tmp_path, bad):
    table = tmp_path / "g.csv"
    table.write_text(f"{header_line('groups')}\n1,2,a.jpg,1,0.9\n{bad},2,b.jpg,0,0.8\n")
    with pytest.raises(ValueError, match=rf"^{table} line 3: expected an integer group and a path$"):
        read_group_table(table)


def test_the_line_named_counts_the_lines_of_a_quoted_multi_line_path(tmp_path):
    table = tmp_path / "g.csv"
    table.write_text(f'{header_line("groups")}\n1,2,"two\nlines.jpg",1,0.9\nx,2,b.jpg,0,0.8\n')
    with pytest.raises(ValueError, match=rf"^{table} line 4: expected an integer group and a path$"):
        read_group_table(table)
    write(table, "groups", parts=[[[1], [1], ["/pile/two\nlines.jpg"], [1], [0.5]]])
    assert read_group_table(table) == [(1, "/pile/two\nlines.jpg")]


def test_read_group_table_names_a_short_row(tmp_path):
    table = tmp_path / "d.csv"
    table.write_text(f"{header_line('duplicates')}\n1,2\n")
    with pytest.raises(ValueError, match=rf"^{table} line 2: expected an integer group and a path$"):
        read_group_table(table)


def test_read_group_table_refuses_a_null_group_in_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    columns = {"group": pa.array([1, None], pa.int64()), "size": [1, 1], "path": ["a", "b"], "best_score": [0.9, 0.9]}
    table = tmp_path / "d.parquet"
    pq.write_table(pa.table(columns).replace_schema_metadata({PARQUET_KEY: b"duplicates"}), table)
    with pytest.raises(ValueError, match=rf"^{table}: expected an integer group and a path in every row$"):
        read_group_table(table)


def test_read_group_table_refuses_a_missing_or_too_large_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="groups table not found"):
        read_group_table(tmp_path / "none.csv")
    out = tmp_path / "g.csv"
    write(out, "groups")
    monkeypatch.setattr(tables, "MAX_GROUP_TABLE_BYTES", out.stat().st_size - 1)
    with pytest.raises(ValueError, match=rf"{out} is larger than"):
        read_group_table(out)


# ----------------------------------------------------------------------------- reading bounds (issue 30)

ATTACK_ROWS = 4_000_000


def _dictionary_table(out, rows: int, path: str = "/pile/a.jpg", kind: str = "duplicates"):
    """A table of ``kind`` holding ``rows`` rows of one dictionary-encoded path (a few hundred KB on disk)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    paths = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), pa.array([path]))
    ones = pa.array(np.ones(rows, np.int64))
    columns = {"group": ones, "size": ones, "path": paths, "best_score": pa.array(np.ones(rows, np.float32))}
    pq.write_table(pa.table(columns).replace_schema_metadata({PARQUET_KEY: kind.encode()}), out)
    return out


def test_millions_of_dictionary_encoded_rows_are_refused_from_the_footer_in_bounded_memory(tmp_path):
    """The attack of issue 30: a small Parquet file of millions of rows of one dictionary value. Refused
    from the footer's row count, nothing decoded: measured in a subprocess (its own peak RSS after
    importing, then after the refusal), the peak grows by less than 32 MiB. Decoding would not fit:
    the group column alone is 8 bytes a row (32 MB), and the rows as Python tuples of an int and a
    string take over 100 bytes a row (over 400 MB; the original code grew by about that much)."""
    import subprocess

    out = _dictionary_table(tmp_path / "attack.parquet", ATTACK_ROWS)
    assert out.stat().st_size < 2**20  # a few hundred KB claiming millions of rows
    script = f"""
import resource, sys
import pyarrow.compute, pyarrow.parquet
from plmetric.retrieval.tables import read_group_table
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_group_table({str(out)!r}, max_rows=1000)
except ValueError as err:
    message = str(err)
else:
    message = "accepted"
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after, message, sep="\\n")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    before, after, message = done.stdout.splitlines()
    assert message == f"{out} holds {ATTACK_ROWS:,} rows; expected at most 1,000 (one per image of the index)"
    assert (int(after) - int(before)) * 1024 < 32 * 2**20, (before, after)  # ru_maxrss: KiB on Linux


def test_the_absolute_row_cap_holds_without_an_index(tmp_path, monkeypatch):
    out = _dictionary_table(tmp_path / "d.parquet", 11)
    monkeypatch.setattr(tables, "MAX_GROUP_TABLE_ROWS", 10)
    with pytest.raises(ValueError, match=rf"^{out} holds 11 rows; expected at most 10 \(the most read\)$"):
        read_group_table(out)
    with pytest.raises(ValueError, match=r"expected at most 10 \(the most read\)"):
        read_group_table(out, max_rows=50)  # an index larger than the cap: the cap still holds
    csv_table = tmp_path / "d.csv"
    write(csv_table, "duplicates", parts=[[[1] * 11, [11] * 11, [f"/p/{i}.jpg" for i in range(11)], [0.9] * 11]])
    with pytest.raises(ValueError, match=rf"^{csv_table} holds more than 10 rows; expected at most 10"):
        read_group_table(csv_table)
    monkeypatch.setattr(tables, "MAX_GROUP_TABLE_ROWS", 11)
    assert len(read_group_table(csv_table)) == len(read_group_table(out)) == 11


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_rows_are_bounded_by_the_index_they_are_read_for(tmp_path, suffix):
    needs(suffix)
    out = tmp_path / f"t{suffix}"
    write(out, "groups")  # 5 rows
    assert len(read_group_table(out, max_rows=5)) == 5
    found = "5" if suffix == ".parquet" else "more than 4"
    expected = rf"^{out} holds {found} rows; expected at most 4 \(one per image of the index\)$"
    with pytest.raises(ValueError, match=expected):
        read_group_table(out, max_rows=4)


def test_a_csv_field_or_line_too_long_is_one_line_naming_the_file_and_line(tmp_path):
    """A 200,000-character field ended in "internal error" (the csv module's own limit); a line of a
    million commas would be a million fields. Both are refused as they are read, and the process's
    csv.field_size_limit is left as it was."""
    limit = csv.field_size_limit()
    header = header_line("groups")
    cases = {
        "long.csv": (f'{header}\n1,2,"{"a" * 200_000}",1,0.9\n', "line 2: longer than 65,792 characters"),
        "commas.csv": (f"{header}\n1,2,a{',' * 1_000_000}\n", "line 2: longer than 65,792 characters"),
        "lines.csv": (  # a quoted field of short lines: only the field bound sees it
            f'{header}\n1,2,a.jpg,1,0.9\n1,2,"{("b" * 1000 + chr(10)) * 40}",1,0.9\n',
            f"line {3 + 32}: a field longer than 32,768 characters; expected a path",
        ),
        "latin1.csv": (None, "not UTF-8 text"),
    }
    (tmp_path / "latin1.csv").write_bytes(f"{header}\n1,2,caf\xe9.jpg,1,0.9\n".encode("latin-1"))
    for name, (text, message) in cases.items():
        table = tmp_path / name
        if text is not None:
            table.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError) as caught:
            read_group_table(table)
        assert str(caught.value).startswith(str(table)) and message in str(caught.value), str(caught.value)
        assert len(str(caught.value).splitlines()) == 1
        assert csv.field_size_limit() == limit
    longest = "/" + "p" * (tables.MAX_FIELD_CHARS - 1)  # the longest field read is still read
    table = tmp_path / "longest.csv"
    write(table, "groups", parts=[[[1], [1], [longest], [1], [0.5]]])
    assert read_group_table(table) == [(1, longest)] and csv.field_size_limit() == limit


def test_parquet_paths_are_bounded_before_they_are_decoded(tmp_path, monkeypatch):
    """One long path repeated on every row is one dictionary entry on disk: its length, and the paths'
    length decoded (the entry's length times its rows), are measured on the dictionary and refused
    before any string is made."""
    longest = _dictionary_table(tmp_path / "longest.parquet", 3, "/" + "p" * (tables.MAX_FIELD_CHARS - 1))
    assert read_group_table(longest) == [(1, "/" + "p" * (tables.MAX_FIELD_CHARS - 1))] * 3
    long = _dictionary_table(tmp_path / "long.parquet", 3, "/" + "p" * tables.MAX_FIELD_CHARS)
    with pytest.raises(ValueError, match=rf"^{long}: a path of 32,769 characters; expected at most 32,768$"):
        read_group_table(long)
    repeated = _dictionary_table(tmp_path / "repeated.parquet", 2000, "/" + "p" * 999)  # 2 MB decoded
    assert repeated.stat().st_size < 2**20
    monkeypatch.setattr(tables, "MAX_GROUP_TABLE_BYTES", 2**20)
    with pytest.raises(ValueError, match=rf"^{repeated}: its paths take 2 MiB decoded, more than the 1 MiB read"):
        read_group_table(repeated)


def test_a_parquet_table_of_the_wrong_types_or_unreadable_is_one_line(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    meta = {PARQUET_KEY: b"groups"}
    good = {"group": [1], "size": [1], "path": ["a"], "representative": [1], "score": [0.5]}
    cases = {
        "text_group": {**good, "group": ["1"]},
        "number_path": {**good, "path": [5]},
        "no_path": {k: v for k, v in good.items() if k != "path"},
        "null_path": {name: column * 2 for name, column in good.items()} | {"path": ["a", None]},
    }
    for name, columns in cases.items():
        table = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table(columns).replace_schema_metadata(meta), table)
        with pytest.raises(ValueError, match=rf"^{table}: expected an integer group and a path in every row$"):
            read_group_table(table)
    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.table(good).replace_schema_metadata(meta), whole)
    data = bytearray(whole.read_bytes())
    chunk = pq.ParquetFile(whole).metadata.row_group(0).column(2)  # the path column's pages
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data[start : start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    broken = tmp_path / "broken.parquet"  # our footer, the path column's pages overwritten
    broken.write_bytes(bytes(data))
    assert is_our_table(broken, "groups")
    with pytest.raises(ValueError, match=rf"^{broken} is not a readable Parquet table \(") as caught:
        read_group_table(broken)
    assert len(str(caught.value).splitlines()) == 1


# ----------------------------------------------------------------------------- the index a table came from

INDEX_ID = "ab" * 32


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("kind", ["groups", "duplicates", "neighbours"])
def test_a_table_records_the_index_it_was_written_from(tmp_path, suffix, kind):
    needs(suffix)
    out = tmp_path / f"t{suffix}"
    with TableWriter(out, kind, index_id=INDEX_ID) as table:
        for part in chunks(kind):
            table.write(part)
        table.commit()
    assert is_our_table(out, kind) and recorded_index_id(out) == INDEX_ID
    if kind != "neighbours":
        assert read_group_table(out) == [(int(row[0]), row[2]) for row in rows_of(kind)]  # the same rows
    if suffix == ".csv":  # the header first, the record last, in the first row only: the columns keep their places
        with open(out, encoding="utf-8", newline="") as handle:
            lines = list(csv.reader(handle))
        assert out.read_text(encoding="utf-8").splitlines()[0] == header_line(kind, recorded=True)
        assert lines[0] == [*COLUMNS[kind], "index_id"]
        assert [line[-1] for line in lines[1:]] == [INDEX_ID] + [""] * (len(lines) - 2)
        assert [line[:-1] for line in lines[1:]] == [line for line in _written_without_record(tmp_path, kind)[1:]]
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        written = pq.read_table(out)
        assert written.column_names == list(COLUMNS[kind])
        assert written.schema.metadata[PARQUET_KEY] == kind.encode()
        assert written.schema.metadata[tables.PARQUET_INDEX_KEY] == INDEX_ID.encode()
    write(out, kind)  # written without the record (as an older plmetric did): none read back
    assert recorded_index_id(out) is None


def _written_without_record(tmp_path, kind: str) -> list[list[str]]:
    plain = tmp_path / "plain.csv"
    write(plain, kind)
    with open(plain, encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle))


def test_a_csv_whose_first_row_lost_the_record_records_none(tmp_path):
    out = tmp_path / "g.csv"
    with TableWriter(out, "groups", index_id=INDEX_ID) as table:
        table.write(chunks("groups")[0])
        table.write(chunks("groups")[1])  # a second chunk: no record again
        table.commit()
    lines = out.read_text(encoding="utf-8").splitlines()
    assert sum(INDEX_ID in line for line in lines) == 1
    resorted = tmp_path / "resorted.csv"
    resorted.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n", encoding="utf-8")
    assert is_our_table(resorted, "groups") and recorded_index_id(resorted) is None
    empty = tmp_path / "empty.csv"
    with TableWriter(empty, "groups", index_id=INDEX_ID) as table:
        table.commit()
    assert is_our_table(empty, "groups") and recorded_index_id(empty) is None and read_group_table(empty) == []
