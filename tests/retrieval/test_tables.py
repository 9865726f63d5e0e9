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


@pytest.mark.parametrize("kind", ["groups", "duplicates", "neighbours"])
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
            if name in ("path", "neighbour"):
                assert field == value  # commas, quotes and non-ASCII survive
            elif isinstance(value, float | np.floating):
                assert field == ("" if math.isnan(value) else f"{float(value):.6f}")
            else:
                assert field == str(int(value))


@pytest.mark.parametrize("kind", ["groups", "duplicates", "neighbours"])
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
            if isinstance(value, float | np.floating) and math.isnan(value):
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


@pytest.mark.parametrize("bad", ["x", "1.5", ""])
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
