"""The tables of the pile tools (``neighbours``, ``duplicates``, ``groups``): CSV or Parquet, written
atomically in chunks, recognised as ours before anything is replaced, and read back (``serve``).

One row per image (or per image and neighbour), with these columns:

* ``neighbours``: ``path, rank, neighbour, score`` (rank 1 = most similar; the image itself left out);
* ``duplicates``: ``group, size, path, best_score`` (groups numbered from 1, largest first; groups of
  one are not written; ``best_score`` is the highest cosine similarity of the image to another member);
* ``groups``: ``group, size, path, representative, score`` (groups numbered from 1, largest first;
  group -1 is the "ungrouped" bucket, written last; ``representative`` is 1 for the one member per
  group most similar to the group's mean direction; ``score`` the member's cosine similarity to that
  direction, empty for the ungrouped);
* ``pairs`` (``duplicates --pairs``, one row per duplicate pair): ``path_a, path_b, score, hash_distance,
  signal`` (``score`` the pair's cosine similarity, ``hash_distance`` its perceptual-hash distance, empty
  for an index without hashes, ``signal`` which rule found it: ``embedding``, ``zoom``, ``hash`` or
  ``both``; :mod:`plmetric.retrieval.duplicates`).

A CSV file is ours when its first line is exactly its kind's header (with or without the trailing
``index_id`` column below); a Parquet file when its schema metadata says ``plmetric_table: <kind>``.
Parquet needs pyarrow (``pip install "plmetric[parquet]"``).

How names are written, so that every cell reads back to the same file (:func:`encode_name`,
:func:`csv_text` and their inverses :func:`decode_name`, :func:`read_csv_text`, used by
:func:`read_group_table`; ``search --csv/--json`` and ``serve``'s JSON follow the same rule):

* Names (``path``, ``neighbour``; ``query`` in ``search``'s outputs) are UTF-8 text, as they are. A
  name whose bytes are not UTF-8 (on Linux a file name may hold any bytes but ``/`` and NUL; Python
  holds the undecodable ones as surrogate escapes, :func:`os.fsdecode`), and a name that itself starts
  with ``file:``, is written as ``file:`` followed by its bytes (:func:`os.fsencode`) percent-encoded
  as in a URI (RFC 3986; ``/`` and the unreserved ASCII characters as they are):
  ``/pile/caf\xe9.png`` becomes ``file:/pile/caf%E9.png``, an RFC 8089 file URI. Any reader sees
  text; ``os.fsdecode(urllib.parse.unquote_to_bytes(cell[5:]))`` gives the name back. Paths in these
  tables are absolute (``/...``) or ``item:N``, so a plain name never starts with ``file:``.
* CSV only, against formula injection (OWASP, "CSV Injection"): every text cell is quoted (``"..."``:
  a separator inside a name cannot split it in a spreadsheet that splits on ``;``), and a text cell
  that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return, or with ``'`` itself, gets
  one ``'`` in front: a spreadsheet shows it as text, and a reader removes exactly one leading ``'``
  from a text cell that has one. Numeric cells (``group``, ``size``, ``rank``, ``representative``,
  scores) are written as bare numbers, never prefixed: ``-1`` (the ungrouped group) and a negative
  score stay numbers, which no spreadsheet evaluates as a formula.

**The index a table came from** (:func:`plmetric.retrieval.index.index_identity`, the SHA-256 of the
index's paths and embeddings) is recorded when the pile tools write a table, so that ``serve`` refuses
a table of another index (:func:`recorded_index_id`): in Parquet as the schema metadata
``plmetric_index``; in CSV as a last column ``index_id``, filled in the first row only (empty in the
others). Why a column and not a sidecar ``<table>.json``: the record then lives and dies with the
table (written in the same atomic rename, copied with it, never stale, never a second file to
recognise before replacing it), the first line stays exactly a header, the columns before it (``group``,
``path``, ...) keep their names and places, and the cost is one comma a row. A table without the
record (written by an older plmetric, or re-sorted by hand so that its first row lost it) is checked
by its paths alone.

**Reading is bounded before anything is decoded** (:func:`read_group_table`): the file's size
(:data:`MAX_GROUP_TABLE_BYTES`), its rows (at most one per image of the index it is read for, and
:data:`MAX_GROUP_TABLE_ROWS`), for Parquet from the footer (row count, the group and path columns'
types and uncompressed sizes) before a page is decompressed (a few hundred KB of dictionary-encoded
rows can hold 20 million of them), for CSV while streaming: each physical line (:data:`MAX_LINE_CHARS`)
and each field (:data:`MAX_FIELD_CHARS`) bounded, rows counted as they come.
"""

from __future__ import annotations

import contextlib
import csv
import math
import re
import os
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from plmetric.core import faults
from plmetric.core.checkpoint import temporary_path

COLUMNS: dict[str, tuple[str, ...]] = {
    "neighbours": ("path", "rank", "neighbour", "score"),
    "duplicates": ("group", "size", "path", "best_score"),
    "groups": ("group", "size", "path", "representative", "score"),
    "pairs": ("path_a", "path_b", "score", "hash_distance", "signal"),
}
SUFFIXES = (".csv", ".parquet")
PARQUET_KEY = b"plmetric_table"
PARQUET_INDEX_KEY = b"plmetric_index"
"""Parquet schema metadata: the identity of the index the table was written from."""
INDEX_ID_COLUMN = "index_id"
"""The CSV column recording the index a table was written from (its first row; empty in the others)."""
UNGROUPED = -1
"""The ``group`` of the images a ``groups`` table leaves ungrouped."""
NAME_COLUMNS = frozenset({"path", "neighbour", "query", "path_a", "path_b"})
"""Columns holding file names (written by :func:`encode_name`)."""
_GROUP_FIELD = re.compile(r"-?[0-9]{1,18}")
URI_PREFIX = "file:"
"""The start of a name written as its percent-encoded bytes."""
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What a spreadsheet evaluates at the start of a cell (OWASP, "CSV Injection")."""
TEXT_MARK = "'"
"""Put in front of a CSV text cell starting with one of :data:`FORMULA_STARTS` or with itself."""
MAX_GROUP_TABLE_BYTES = 512 * 2**20
"""``serve`` reads a groups/duplicates table of at most this size (about 4M rows of long paths); for
Parquet, the uncompressed size of its group and path columns, as the footer gives it."""
MAX_GROUP_TABLE_ROWS = 10_000_000
"""Rows of a groups/duplicates table read at most, whatever the index (a table read for an index holds at
most one row per image). Held as Python rows, a row costs about 150 bytes and its path: 10M rows are
about 2-3 GB, as much as an index of 10M images already costs ``serve`` for its paths (and 20 GB for
its embeddings at dimension 512): a bigger table is an attack or a mistake, not a pile ``serve`` shows."""
MAX_FIELD_CHARS = 32_768
"""The longest CSV field read (``csv.field_size_limit`` while reading): a path is at most 4,096 bytes on
Linux (``PATH_MAX``) and 32,767 characters on Windows (extended paths); Python's default, 131,072,
refuses longer fields with an error that named no file."""
MAX_LINE_CHARS = 2 * MAX_FIELD_CHARS + 256
"""The longest physical CSV line read: one path field of :data:`MAX_FIELD_CHARS` characters, every one a
quote (written doubled) and the field quoted, plus the numeric fields. Bounds the fields of a row (the
csv module has no such bound: a line of a hundred million commas is a hundred million fields)."""


def header_line(kind: str, recorded: bool = False) -> str:
    """The first line of a CSV table of ``kind`` (``recorded``: with the :data:`INDEX_ID_COLUMN` column)."""
    return ",".join(COLUMNS[kind] + ((INDEX_ID_COLUMN,) if recorded else ()))


def encode_name(name: str) -> str:
    """``name`` as tables and JSON hold it: unchanged when it is UTF-8 text that does not start with
    ``file:``, else ``file:`` and its bytes percent-encoded (the module docstring's rule).

    A name with a surrogate that :func:`os.fsencode` cannot encode (none that a file system gave)
    has that surrogate's UTF-8 form written instead: it reads back as other text."""
    if name.isascii() and not name.startswith(URI_PREFIX):  # isascii: no scan, the common case
        return name
    if not name.startswith(URI_PREFIX):
        try:
            name.encode("utf-8")
            return name
        except UnicodeEncodeError:
            pass
    try:
        raw = os.fsencode(name)
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogatepass")
    return URI_PREFIX + urllib.parse.quote(raw, safe="/")


def decode_name(cell: str) -> str:
    """The name a cell written by :func:`encode_name` holds (undoes ``file:`` and percent-encoding)."""
    if not cell.startswith(URI_PREFIX):
        return cell
    return os.fsdecode(urllib.parse.unquote_to_bytes(cell[len(URI_PREFIX) :]))


def csv_text(text: str) -> str:
    """One CSV text field, quoted, with :data:`TEXT_MARK` in front of a formula start (or of the mark
    itself), as the module docstring says; :func:`read_csv_text` undoes it."""
    if text.startswith(FORMULA_STARTS) or text.startswith(TEXT_MARK):
        text = TEXT_MARK + text
    return '"' + text.replace('"', '""') + '"'


def read_csv_text(field: str) -> str:
    """The text of a CSV text field written by :func:`csv_text`, as a CSV reader returns it (unquoted):
    one leading :data:`TEXT_MARK` removed."""
    return field[len(TEXT_MARK) :] if field.startswith(TEXT_MARK) else field


def csv_lines(columns: Sequence[Sequence[Any]], names: Sequence[str], float_digits: int | None = 6) -> str:
    """CSV lines (each ending in ``\\n``) of rows given as columns named ``names``: name columns by
    :func:`encode_name` and :func:`csv_text`, other text by :func:`csv_text`, floats with
    ``float_digits`` decimals (None: Python's shortest repr), ``None`` and NaN as empty fields, other
    numbers as they print."""
    fields = [
        _csv_column(column, name in NAME_COLUMNS, float_digits) for name, column in zip(names, columns, strict=True)
    ]
    return "".join(",".join(row) + "\n" for row in zip(*fields, strict=True))


def is_our_table(path: str | os.PathLike, kind: str) -> bool:
    """Whether ``path`` is a table of ``kind`` written by plmetric (a file this command may replace)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq

            metadata = pq.read_schema(path).metadata or {}
        except Exception:  # noqa: BLE001 - any unreadable file is simply not ours
            return False
        return metadata.get(PARQUET_KEY) == kind.encode()
    try:
        with open(path, "rb") as handle:
            first = handle.readline(4096)
    except OSError:
        return False
    return first.rstrip(b"\r\n") in (header_line(kind).encode(), header_line(kind, recorded=True).encode())


def require_pyarrow() -> Any:
    """``(pyarrow, pyarrow.parquet)``, or a ValueError saying how to install them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError('.parquet output needs pyarrow: pip install "plmetric[parquet]" (or write .csv)') from None
    return pa, pq


class TableWriter:
    """Write a table in chunks to a temporary file beside ``out``; :meth:`commit` renames it into place.

    Use as a context manager: leaving it by an exception removes the temporary file and leaves any
    previous ``out`` untouched. Each :meth:`write` takes one chunk as columns (equal-length sequences,
    in the kind's column order); ``None`` or NaN floats are written as empty CSV fields (Parquet nulls).
    ``index_id``: the identity of the index the rows come from
    (:func:`plmetric.retrieval.index.index_identity`), recorded as the module docstring says.
    """

    def __init__(self, out: str | os.PathLike, kind: str, index_id: str | None = None) -> None:
        self.out = Path(out)
        self.kind = kind
        self.index_id = index_id
        self.columns = COLUMNS[kind]
        self.rows = 0
        self._parquet = self.out.suffix.lower() == ".parquet"
        self._tmp: Path | None = None  # created on entering, once the folder exists
        self._handle: Any = None
        self._writer: Any = None
        if self._parquet:
            require_pyarrow()

    def __enter__(self) -> TableWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temporary_path(self.out)
        if self._parquet:
            self._handle = open(self._tmp, "wb")  # noqa: SIM115 - closed in commit/__exit__
        else:
            self._handle = open(self._tmp, "w", encoding="utf-8", newline="")  # noqa: SIM115
            self._handle.write(header_line(self.kind, recorded=self.index_id is not None) + "\n")
        return self

    def write(self, chunk: Sequence[Sequence[Any]]) -> None:
        """Append rows given as columns (one sequence per column, in order)."""
        if len(chunk) != len(self.columns):
            raise ValueError(f"a {self.kind} table has {len(self.columns)} columns, got {len(chunk)}")
        lengths = {len(column) for column in chunk}
        if len(lengths) > 1:
            raise ValueError(f"{self.kind} table columns of unequal lengths {sorted(lengths)}")
        count = lengths.pop() if lengths else 0
        if count == 0:
            return
        if self._parquet:
            self._write_parquet(chunk)
        elif self.index_id is None:
            self._handle.write(csv_lines(chunk, self.columns))
        else:  # the record: in the first row only
            record = [self.index_id if self.rows == 0 else "", *[""] * (count - 1)]
            self._handle.write(csv_lines([*chunk, record], (*self.columns, INDEX_ID_COLUMN)))
        self.rows += count

    def _write_parquet(self, chunk: Sequence[Sequence[Any]]) -> None:
        pa, pq = require_pyarrow()
        arrays = []
        for name, column in zip(self.columns, chunk, strict=True):
            values = [None if isinstance(v, float) and math.isnan(v) else v for v in _plain(column)]
            if name in NAME_COLUMNS:
                values = [v if v is None else encode_name(v) for v in values]
            arrays.append(pa.array(values, type=_PARQUET_TYPES[name](pa)))
        table = pa.Table.from_arrays(arrays, names=list(self.columns))
        if self._writer is None:
            schema = table.schema.with_metadata(self._parquet_metadata())
            self._writer = pq.ParquetWriter(self._handle, schema)
        self._writer.write_table(table.replace_schema_metadata(self._writer.schema.metadata))

    def commit(self) -> Path:
        """Finish the file and move it to ``out`` (the previous file there is replaced only now)."""
        if self._parquet:
            if self._writer is None:  # no rows: an empty table with the kind's schema
                self._write_empty_parquet()
            self._writer.close()
            self._writer = None
        self._handle.flush()
        faults.reached(f"write:{self.out.name}")
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self._tmp, self.out)
        return self.out

    def _write_empty_parquet(self) -> None:
        pa, pq = require_pyarrow()
        schema = pa.schema([(name, _PARQUET_TYPES[name](pa)) for name in self.columns]).with_metadata(
            self._parquet_metadata()
        )
        self._writer = pq.ParquetWriter(self._handle, schema)

    def _parquet_metadata(self) -> dict[bytes, bytes]:
        metadata = {PARQUET_KEY: self.kind.encode()}
        if self.index_id is not None:
            metadata[PARQUET_INDEX_KEY] = self.index_id.encode()
        return metadata

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if self._handle is not None and not self._handle.closed:
            if self._writer is not None:
                try:
                    self._writer.close()
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
            self._handle.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)


_PARQUET_TYPES = {
    "path": lambda pa: pa.string(),
    "neighbour": lambda pa: pa.string(),
    "rank": lambda pa: pa.int32(),
    "group": lambda pa: pa.int64(),
    "size": lambda pa: pa.int64(),
    "representative": lambda pa: pa.int8(),
    "score": lambda pa: pa.float32(),
    "best_score": lambda pa: pa.float32(),
    "path_a": lambda pa: pa.string(),
    "path_b": lambda pa: pa.string(),
    "hash_distance": lambda pa: pa.int16(),
    "signal": lambda pa: pa.string(),
}


def _plain(column: Sequence[Any]) -> list[Any]:
    values = column.tolist() if hasattr(column, "tolist") else list(column)
    return [v.item() if hasattr(v, "item") else v for v in values]  # NumPy/torch scalars: Python numbers


def _csv_column(column: Sequence[Any], names: bool, float_digits: int | None = 6) -> Iterator[str]:
    for value in _plain(column):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            yield ""
        elif isinstance(value, float):
            yield repr(value) if float_digits is None else f"{value:.{float_digits}f}"
        elif isinstance(value, str):
            yield csv_text(encode_name(value) if names else value)
        else:
            yield str(value)


def read_group_table(path: str | os.PathLike, max_rows: int | None = None) -> list[tuple[int, str]]:
    """The ``(group, path)`` rows of a ``duplicates`` or ``groups`` table (CSV or Parquet), in file order.

    Bounded before decoding (the module docstring): at most ``max_rows`` rows (one per image of the
    index it is read for) and :data:`MAX_GROUP_TABLE_ROWS`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a plmetric duplicates/groups table, larger than :data:`MAX_GROUP_TABLE_BYTES`,
            more rows than allowed, a field or line too long, not UTF-8, unreadable Parquet, or a row
            whose group is not an integer (one line naming the file, and the line where there is one).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"groups table not found: {path}")
    if path.stat().st_size > MAX_GROUP_TABLE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_GROUP_TABLE_BYTES // 2**20} MiB; expected a plmetric groups table")
    kind = next((k for k in ("groups", "duplicates") if is_our_table(path, k)), None)
    if kind is None:
        raise ValueError(
            f"{path} is not a table written by plmetric groups or plmetric duplicates "
            f"(expected a .csv starting '{header_line('groups')}' or '{header_line('duplicates')}', or their .parquet)"
        )
    limit = MAX_GROUP_TABLE_ROWS if max_rows is None else min(max_rows, MAX_GROUP_TABLE_ROWS)
    if path.suffix.lower() == ".parquet":
        return _read_parquet_group_rows(path, limit, max_rows)
    return _read_csv_group_rows(path, limit, max_rows)


def recorded_index_id(path: str | os.PathLike) -> str | None:
    """The identity of the index a table of ours was written from (:class:`TableWriter`'s ``index_id``),
    or None when the table records none (an older table; a CSV whose first row lost it). Reads only the
    Parquet footer or the CSV's header and first row.

    Raises:
        ValueError: an unreadable Parquet footer, or a CSV header or first row over the bounds of
            :func:`read_group_table` (one line naming the file).
    """
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        pa, pq = require_pyarrow()
        try:
            metadata = pq.read_schema(path).metadata or {}
        except (pa.ArrowException, OSError, ValueError) as err:
            raise ValueError(f"{path} is not a readable Parquet table ({_first_line(err)})") from None
        recorded = metadata.get(PARQUET_INDEX_KEY)
        return None if recorded is None else recorded.decode("utf-8", "replace")
    with open(path, encoding="utf-8", newline="") as handle, _csv_field_limit(MAX_FIELD_CHARS):
        reader = csv.reader(_bounded_lines(handle, path))
        try:
            names = next(reader, [])
            if INDEX_ID_COLUMN not in names:
                return None
            first = next(reader, [])
        except csv.Error as err:
            raise _csv_error(path, reader.line_num, err) from None
    column = names.index(INDEX_ID_COLUMN)
    return (first[column] if column < len(first) else "") or None


def _read_csv_group_rows(path: Path, limit: int, max_rows: int | None) -> list[tuple[int, str]]:
    """The rows of a CSV table of ours, streamed: lines, fields and rows bounded as they come."""
    with open(path, encoding="utf-8", newline="") as handle, _csv_field_limit(MAX_FIELD_CHARS):
        reader = csv.reader(_bounded_lines(handle, path))
        rows: list[tuple[int, str]] = []
        try:
            names = next(reader)
            g, p = names.index("group"), names.index("path")
            for fields in reader:
                if len(rows) == limit:
                    raise _too_many_rows(path, f"more than {limit:,}", limit, max_rows)
                try:
                    rows.append((_group_number(fields[g]), decode_name(read_csv_text(fields[p]))))
                except (ValueError, IndexError):  # line_num, not the row count: a quoted path may span lines
                    line = reader.line_num
                    raise ValueError(f"{path} line {line}: expected an integer group and a path") from None
        except csv.Error as err:
            raise _csv_error(path, reader.line_num, err) from None
    return rows


def _read_parquet_group_rows(path: Path, limit: int, max_rows: int | None) -> list[tuple[int, str]]:
    """The rows of a Parquet table of ours, refused from its footer (row count, column types and
    uncompressed sizes) before a page is decompressed, and from its paths' decoded length (measured on
    the dictionary-encoded column) before a string is made."""
    pa, pq = require_pyarrow()
    try:
        with pq.ParquetFile(path, read_dictionary=["path"]) as parquet:
            return _checked_parquet_rows(parquet, path, limit, max_rows)
    except KeyError:  # read_dictionary names a column the file lacks
        raise ValueError(f"{path}: expected an integer group and a path in every row") from None
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path} is not a readable Parquet table ({_first_line(err)})") from None


def _checked_parquet_rows(parquet: Any, path: Path, limit: int, max_rows: int | None) -> list[tuple[int, str]]:
    import pyarrow as pa
    import pyarrow.compute as pc

    wrong = f"{path}: expected an integer group and a path in every row"
    footer, schema = parquet.metadata, parquet.schema_arrow
    leaves = {footer.schema.column(i).path: i for i in range(footer.num_columns)}
    if "group" not in leaves or "path" not in leaves:
        raise ValueError(wrong)
    counts = [footer.row_group(r).num_rows for r in range(footer.num_row_groups)]
    rows = max(footer.num_rows, sum(counts))  # the reader trusts each row group's own count
    if rows > limit:
        raise _too_many_rows(path, f"{rows:,}", limit, max_rows)
    group_type, path_type = schema.field("group").type, schema.field("path").type
    if pa.types.is_dictionary(path_type):
        path_type = path_type.value_type
    text = pa.types.is_string(path_type) or pa.types.is_large_string(path_type)
    if not pa.types.is_integer(group_type) or not text:
        raise ValueError(wrong)
    stored = sum(
        footer.row_group(r).column(leaves[name]).total_uncompressed_size
        for r in range(footer.num_row_groups)
        for name in ("group", "path")
    )
    if stored > MAX_GROUP_TABLE_BYTES:
        raise ValueError(
            f"{path}: its group and path columns take {stored / 2**20:,.0f} MiB uncompressed, more than "
            f"the {MAX_GROUP_TABLE_BYTES // 2**20} MiB read; expected a plmetric groups table"
        )
    table = parquet.read(columns=["group", "path"])
    if table.num_rows > limit:  # the footer's counts are all the reader goes by; checked all the same
        raise _too_many_rows(path, f"{table.num_rows:,}", limit, max_rows)
    groups, paths = table.column("group"), table.column("path")
    if groups.null_count or paths.null_count:
        raise ValueError(wrong)
    longest, decoded = 0, 0
    for chunk in paths.chunks:  # dictionary-encoded: the distinct paths' lengths, then taken per row
        values = chunk.dictionary if pa.types.is_dictionary(chunk.type) else chunk
        longest = max(longest, pc.max(pc.utf8_length(values)).as_py() or 0)
        lengths = pc.binary_length(values)
        decoded += pc.sum(pc.take(lengths, chunk.indices) if values is not chunk else lengths).as_py() or 0
    if longest > MAX_FIELD_CHARS:
        raise ValueError(f"{path}: a path of {longest:,} characters; expected at most {MAX_FIELD_CHARS:,}")
    if decoded > MAX_GROUP_TABLE_BYTES:
        raise ValueError(
            f"{path}: its paths take {decoded / 2**20:,.0f} MiB decoded, more than the "
            f"{MAX_GROUP_TABLE_BYTES // 2**20} MiB read; expected a plmetric groups table"
        )
    return [(group, decode_name(member)) for group, member in zip(groups.to_pylist(), paths.to_pylist(), strict=True)]


def _group_number(field: str) -> int:
    """A CSV ``group`` field as the writer writes it: ASCII digits with an optional ``-`` (``int`` alone
    would also take ``" 1 "``, ``"1_0"`` as 10 and other scripts' digits).

    Raises:
        ValueError: anything else.
    """
    if not _GROUP_FIELD.fullmatch(field):
        raise ValueError(field)
    return int(field)


def _too_many_rows(path: Path, found: str, limit: int, max_rows: int | None) -> ValueError:
    why = "one per image of the index" if max_rows is not None and max_rows <= MAX_GROUP_TABLE_ROWS else "the most read"
    return ValueError(f"{path} holds {found} rows; expected at most {limit:,} ({why})")


def _csv_error(path: Path, line: int, err: csv.Error) -> ValueError:
    if "field limit" in str(err):
        return ValueError(f"{path} line {line}: a field longer than {MAX_FIELD_CHARS:,} characters; expected a path")
    return ValueError(f"{path} line {line}: not a readable CSV row ({err})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _bounded_lines(handle: Any, path: Path) -> Iterator[str]:
    """The lines of a text file opened with ``newline=""``, each refused past :data:`MAX_LINE_CHARS`
    characters before more is read (a ValueError naming the file and line; also for text that is
    not UTF-8)."""
    number = 0
    while True:
        try:
            line = handle.readline(MAX_LINE_CHARS + 1)
        except UnicodeDecodeError:  # decoded in blocks ahead of the line: no line to name
            raise ValueError(f"{path}: not UTF-8 text; expected a table written by plmetric") from None
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE_CHARS:
            raise ValueError(
                f"{path} line {number:,}: longer than {MAX_LINE_CHARS:,} characters; "
                "expected a table written by plmetric"
            )
        yield line


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """``csv.field_size_limit(limit)`` inside the block, the previous limit restored after (the limit
    is the process's: tables are read at ``serve``'s start-up, before any other thread reads CSV)."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)
