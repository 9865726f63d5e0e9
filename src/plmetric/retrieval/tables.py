"""The tables of the pile tools (``neighbours``, ``duplicates``, ``groups``): CSV or Parquet, written
atomically in chunks, recognised as ours before anything is replaced, and read back (``serve``).

One row per image (or per image and neighbour), with these columns:

* ``neighbours``: ``path, rank, neighbour, score`` (rank 1 = most similar; the image itself left out);
* ``duplicates``: ``group, size, path, best_score`` (groups numbered from 1, largest first; groups of
  one are not written; ``best_score`` is the highest cosine similarity of the image to another member);
* ``groups``: ``group, size, path, representative, score`` (groups numbered from 1, largest first;
  group -1 is the "ungrouped" bucket, written last; ``representative`` is 1 for the one member per
  group most similar to the group's mean direction; ``score`` the member's cosine similarity to that
  direction, empty for the ungrouped).

A CSV file is ours when its first line is exactly its kind's header; a Parquet file when its schema
metadata says ``plmetric_table: <kind>``. Parquet needs pyarrow (``pip install "plmetric[parquet]"``).

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
"""

from __future__ import annotations

import csv
import math
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
}
SUFFIXES = (".csv", ".parquet")
PARQUET_KEY = b"plmetric_table"
UNGROUPED = -1
"""The ``group`` of the images a ``groups`` table leaves ungrouped."""
NAME_COLUMNS = frozenset({"path", "neighbour", "query"})
"""Columns holding file names (written by :func:`encode_name`)."""
URI_PREFIX = "file:"
"""The start of a name written as its percent-encoded bytes."""
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What a spreadsheet evaluates at the start of a cell (OWASP, "CSV Injection")."""
TEXT_MARK = "'"
"""Put in front of a CSV text cell starting with one of :data:`FORMULA_STARTS` or with itself."""
MAX_GROUP_TABLE_BYTES = 512 * 2**20
"""``serve`` reads a groups/duplicates table of at most this size (about 4M rows of long paths)."""


def header_line(kind: str) -> str:
    """The first line of a CSV table of ``kind``."""
    return ",".join(COLUMNS[kind])


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
    return first.rstrip(b"\r\n") == header_line(kind).encode()


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
    """

    def __init__(self, out: str | os.PathLike, kind: str) -> None:
        self.out = Path(out)
        self.kind = kind
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
            self._handle.write(header_line(self.kind) + "\n")
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
        else:
            self._handle.write(csv_lines(chunk, self.columns))
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
            schema = table.schema.with_metadata({PARQUET_KEY: self.kind.encode()})
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
            {PARQUET_KEY: self.kind.encode()}
        )
        self._writer = pq.ParquetWriter(self._handle, schema)

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


def read_group_table(path: str | os.PathLike) -> list[tuple[int, str]]:
    """The ``(group, path)`` rows of a ``duplicates`` or ``groups`` table (CSV or Parquet), in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a plmetric duplicates/groups table, larger than :data:`MAX_GROUP_TABLE_BYTES`,
            or a row whose group is not an integer (one line naming the file and the row).
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
    if path.suffix.lower() == ".parquet":
        _, pq = require_pyarrow()
        table = pq.read_table(path, columns=["group", "path"])
        groups, paths = table.column("group").to_pylist(), table.column("path").to_pylist()
        rows = list(zip(groups, paths, strict=True))
    else:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            names = next(reader)
            g, p = names.index("group"), names.index("path")
            rows = []
            for fields in reader:
                try:
                    rows.append((int(fields[g]), read_csv_text(fields[p])))
                except (ValueError, IndexError):  # line_num, not the row count: a quoted path may span lines
                    line = reader.line_num
                    raise ValueError(f"{path} line {line}: expected an integer group and a path") from None
    for group, member in rows:
        if not isinstance(group, int) or not isinstance(member, str):
            raise ValueError(f"{path}: expected an integer group and a path in every row")
    return [(group, decode_name(member)) for group, member in rows]
