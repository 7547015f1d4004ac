"""Spreadsheet text, shared by the .xlsx and .csv loaders: one line per row, header repeated.

Each sheet's first non-empty row is its header. Every later row becomes one line of
``header: value`` pairs joined by `` | `` (empty cells left out; a column without a header is
named by its letter, ``C``), so every chunk, whichever rows it holds, carries the header names
of its values. The header row itself is a line only for a sheet that has nothing else. Rows are
recorded as :class:`~ingest.loaders.base.RowSpan` with their number in the file, sheets as
:class:`~ingest.loaders.base.PageSpan` named by the sheet; the splitter keeps rows whole.

Limits (:class:`~ingest.loaders.base.LoaderLimits`): rows (every row iterated, empty ones
included) and cells (every cell position iterated) of the whole file; passing either raises
:class:`~ingest.loaders.base.LimitExceededError` at once, so a huge sheet costs no more than
the limit to refuse.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence

from ingest.loaders.base import LimitExceededError, LoaderLimits, PageSpan, RowSpan

SHEET_SEPARATOR = "\n\n"
ROW_SEPARATOR = "\n"
FIELD_SEPARATOR = " | "


def column_letter(index: int) -> str:
    """Spreadsheet column name of a 0-based column index (0 -> A, 26 -> AA)."""
    name = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        name = chr(ord("A") + rest) + name
    return name


def cell_text(value: object) -> str:
    """A cell value as text: whitespace collapsed, integral floats without ``.0``, dates in ISO
    form (without the time when it is midnight), booleans as ``TRUE``/``FALSE``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    if isinstance(value, dt.datetime):
        return value.date().isoformat() if value.time() == dt.time() else value.isoformat(sep=" ")
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    return " ".join(str(value).split())


class TableText:
    """Builds the text, sections and row spans of a spreadsheet file, enforcing the limits."""

    def __init__(self, limits: LoaderLimits, *, kind: str) -> None:
        self._limits = limits
        self._kind = kind
        self._parts: list[str] = []
        self._offset = 0
        self.pages: list[PageSpan] = []
        self.rows: list[RowSpan] = []
        self._rows_read = 0
        self._cells_read = 0
        # The sheet being built.
        self._label: str | None = None
        self._sheet_start = 0
        self._header: list[str] | None = None
        self._header_row = 0
        self._sheet_rows = 0

    def begin_sheet(self, label: str | None) -> None:
        """Start a sheet (``label``: its name; ``None`` for a CSV file)."""
        self._label = label
        self._header = None
        self._sheet_rows = 0

    def add_row(self, number: int, values: Sequence[object]) -> None:
        """Add row ``number`` (1-based, in the file) of the current sheet.

        Raises:
            LimitExceededError: the file passed its row or cell limit.
        """
        self._rows_read += 1
        self._cells_read += len(values)
        if self._rows_read > self._limits.max_sheet_rows:
            raise LimitExceededError(
                f"{self._kind} has more than {self._limits.max_sheet_rows:,} rows (the limit; "
                "RAG_INGEST__MAX_SHEET_ROWS raises it)"
            )
        if self._cells_read > self._limits.max_sheet_cells:
            raise LimitExceededError(
                f"{self._kind} has more than {self._limits.max_sheet_cells:,} cells (the limit; "
                "RAG_INGEST__MAX_SHEET_CELLS raises it)"
            )
        cells = [cell_text(v) for v in values]
        if not any(cells):
            return
        if self._header is None:
            self._header = [c or column_letter(i) for i, c in enumerate(cells)]
            self._header_row = number
            return
        fields = [
            f"{self._header[i] if i < len(self._header) else column_letter(i)}: {c}" for i, c in enumerate(cells) if c
        ]
        self._emit(FIELD_SEPARATOR.join(fields), number)

    def end_sheet(self) -> None:
        """Finish the current sheet (a sheet with only a header row keeps it as its one line)."""
        if self._sheet_rows == 0 and self._header is not None:
            self._emit(FIELD_SEPARATOR.join(self._header), self._header_row)
        if self._sheet_rows:
            self.pages.append(PageSpan(start=self._sheet_start, end=self._offset, page=None, label=self._label))

    def _emit(self, line: str, number: int) -> None:
        separator = ROW_SEPARATOR if self._sheet_rows else (SHEET_SEPARATOR if self.pages else "")
        if separator:
            self._parts.append(separator)
            self._offset += len(separator)
        if not self._sheet_rows:
            self._sheet_start = self._offset
        self._parts.append(line)
        self.rows.append(RowSpan(start=self._offset, end=self._offset + len(line), row=number))
        self._offset += len(line)
        self._sheet_rows += 1

    @property
    def text(self) -> str:
        """The text so far."""
        return "".join(self._parts)
