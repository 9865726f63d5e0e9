"""The groups and duplicates tables the web page (:mod:`plmetric.retrieval.serve`) browses, mapped onto
its index: :func:`check_group_table` reads a table's header (before the model is loaded),
:func:`load_group_table` its rows, each path mapped to its number in the index once (afterwards only
numbers are used); :class:`GroupTable` holds the :class:`Group` objects the pages list.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from plmetric.core.files import require_regular_file
from plmetric.retrieval.serve_requests import QueryError, parse_number, shown_name
from plmetric.retrieval.tables import UNGROUPED, header_line, is_our_table, read_group_table, recorded_index_id

GROUP_KINDS = ("groups", "duplicates")
"""The tables the page can browse, by the command that writes them (also their route and option)."""


class BrowsedIndex(Protocol):
    """The index a table is mapped onto (a :class:`plmetric.retrieval.serve.Browser`): its file, its
    identity (:func:`plmetric.retrieval.index.index_identity`) and its images' recorded paths."""

    index_path: Path
    paths: Sequence[str]

    @property
    def index_id(self) -> str: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Group:
    """One group of a groups/duplicates table: its number in the table (:data:`UNGROUPED` for the
    ungrouped bucket) and its members' index numbers, in the table's order."""

    number: int
    members: tuple[int, ...]

    @property
    def slug(self) -> str:
        """The group's part of its URL: its number, or ``ungrouped``."""
        return "ungrouped" if self.number == UNGROUPED else str(self.number)

    @property
    def label(self) -> str:
        """The group's name on the page: ``group N`` or ``ungrouped``."""
        return "ungrouped" if self.number == UNGROUPED else f"group {self.number}"

    @property
    def size(self) -> int:
        """The number of members."""
        return len(self.members)


class GroupTable:
    """A table of ``plmetric groups`` or ``plmetric duplicates`` mapped onto an index (:func:`load_group_table`):
    its groups by ascending number, the ungrouped bucket last."""

    def __init__(self, kind: str, source: Path, groups: list[Group]) -> None:
        self.kind = kind
        self.source = source
        self.groups = groups
        self._by_slug = {group.slug: group for group in groups}

    @property
    def images(self) -> int:
        """The number of rows (member images) of the table."""
        return sum(group.size for group in self.groups)

    @property
    def ungrouped(self) -> int:
        """The size of the ungrouped bucket (0 when the table has none)."""
        bucket = self._by_slug.get("ungrouped")
        return 0 if bucket is None else bucket.size

    def group(self, text: str) -> Group:
        """The group a request names: its number (ASCII digits) or ``ungrouped``.

        Raises:
            QueryError: 400 anything else; 404 no such group in the table.
        """
        if text != "ungrouped":
            try:
                number = parse_number(text, "group")
            except QueryError as err:
                raise QueryError(f"{err} (or 'ungrouped')" if self.ungrouped else str(err)) from None
            text = text if number is None else str(number)  # "007" is group 7
        group = self._by_slug.get(text)
        if group is None:
            shown = text if len(text) <= 24 else text[:24] + "..."
            raise QueryError(f"no group {shown!r} in the {self.kind} table {self.source.name}", 404)
        return group


def check_group_table(path: str | os.PathLike, kind: str) -> Path:
    """``path`` if it is a table written by ``plmetric <kind>`` (``kind``: groups or duplicates), read
    only as far as its header (CSV) or schema (Parquet).

    Raises:
        FileNotFoundError: no such file (named with its option ``--<kind>``).
        ValueError: the other command's table, any other file, or Parquet without pyarrow.
    """
    path = Path(path)
    option = f"--{kind}"
    require_regular_file(
        path, option, missing=f"{option} {path}: file not found; expected a table written by plmetric {kind}"
    )
    if path.suffix.lower() == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise ValueError(f'{option} {path}: reading .parquet needs pyarrow: pip install "plmetric[parquet]"')
    if is_our_table(path, kind):
        return path
    other = next(k for k in GROUP_KINDS if k != kind)
    if is_our_table(path, other):
        raise ValueError(f"{option} {path} is a table of plmetric {other}: give it as --{other}")
    raise ValueError(
        f"{option} {path} is not a table written by plmetric {kind} "
        f"(expected a .csv starting '{header_line(kind)}', or its .parquet)"
    )


def load_group_table(path: str | os.PathLike, kind: str, browser: BrowsedIndex) -> GroupTable:
    """Read the table of ``plmetric <kind>`` at ``path`` and map every row's path to its number in
    ``browser``'s index (the recorded string, else the path resolved): afterwards only numbers are used.

    Groups must be numbered from 1 (or be :data:`UNGROUPED`); they are listed by number, the
    ungrouped bucket last, each group's members in the table's order.

    A table that records the index it was written from must record this one (else it is refused before
    its rows are read); a table without the record (an older one) is checked by its paths alone. At
    most one row per indexed image is read (:func:`plmetric.retrieval.tables.read_group_table`).

    Raises:
        FileNotFoundError, ValueError: as :func:`check_group_table`; a table recorded from another index;
            more rows than the index has images, or a row or file over the reading bounds; a path that
            is not an image of the index, or a group number below 1 (one line naming the option, the
            table and the row).
    """
    path = check_group_table(path, kind)
    option = f"--{kind}"
    try:
        recorded = recorded_index_id(path)
        if recorded is not None and recorded != browser.index_id:
            raise ValueError(
                f"{path} was written by plmetric {kind} from another index (or from {browser.index_path} "
                f"before it changed), not from {browser.index_path}: write its table again with "
                f"'plmetric {kind} {browser.index_path} --out FILE', or serve the index it was written from"
            )
        rows = read_group_table(path, max_rows=len(browser))
    except ValueError as err:
        raise ValueError(f"{option} {err}") from None
    from plmetric.retrieval.mapped import path_ids

    # the rows of the table's paths only (a 10M-image index: no dictionary of every indexed path)
    ids = path_ids(browser.paths, {member for _, member in rows})
    resolved: dict[str, str] = {}
    for _, member in rows:
        if member not in ids and member not in resolved:
            try:
                resolved[member] = str(Path(member).expanduser().resolve())
            except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte: not an indexed path
                pass
    if resolved:
        ids_resolved = path_ids(browser.paths, set(resolved.values()))
    members: dict[int, list[int]] = {}
    for row, (number, member) in enumerate(rows, start=1):
        image_id = ids.get(member)
        if image_id is None and member in resolved:
            image_id = ids_resolved.get(resolved[member])
        if image_id is None:
            raise ValueError(
                f"{option} {path} row {row}: {shown_name(member)} is not an image of the index {browser.index_path}; "
                f"expected a table written by plmetric {kind} from this index"
            )
        if number < 1 and number != UNGROUPED:
            raise ValueError(
                f"{option} {path} row {row}: group {number}; "
                f"expected groups numbered from 1 (or {UNGROUPED}, ungrouped)"
            )
        members.setdefault(number, []).append(image_id)
    order = sorted(members, key=lambda number: (number == UNGROUPED, number))
    return GroupTable(kind, path, [Group(number, tuple(members[number])) for number in order])
