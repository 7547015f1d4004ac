"""Spreadsheet loaders: ``.xlsx``/``.xlsm`` (openpyxl) and ``.csv``/``.tsv`` (the standard library).

The text of a sheet is one line per row with the header repeated (see :mod:`ingest.loaders.table`);
a chunk's location is its sheet and rows (``Prices, rows 2-14``; a CSV file has no sheet name).

XLSX: openpyxl in read-only mode (rows streamed, not the whole sheet in memory), cached values
of formulas (``data_only``: what the last program that saved the file computed; a formula never
computed reads as empty). Every sheet is read, hidden ones too (noted as a warning); chart
sheets have no cells. The sheet's declared dimensions are ignored (``reset_dimensions``): a file
can declare a million rows and hold ten, and openpyxl would pad to the declaration.

CSV: the encoding is found as for text files; the dialect (delimiter, quoting) is sniffed from
the first 64 KiB, falling back to commas (tabs for ``.tsv``). Row numbers are record numbers
(the header is row 1), which is what a spreadsheet program shows when it opens the file.
"""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

from ingest.loaders.base import (
    CorruptFileError,
    EmptyFileError,
    LoadedDocument,
    LoaderLimits,
    decode_text,
    normalize_newlines,
    read_bytes,
)
from ingest.loaders.containers import check_zip, library_errors
from ingest.loaders.table import TableText

XLSX_FORMAT = "xlsx"
CSV_FORMAT = "csv"
_SNIFF_CHARS = 64 * 1024


class XlsxLoader:
    """Loads every sheet of an Excel workbook as header-repeating row lines."""

    extensions: tuple[str, ...] = (".xlsx", ".xlsm")

    def __init__(self, *, limits: LoaderLimits | None = None) -> None:
        self.limits = limits or LoaderLimits()

    def load(self, path: Path) -> LoadedDocument:
        """Return the rows of every sheet of ``path``.

        Raises:
            FileTooLargeError, LoaderError: the file cannot be read within the limit.
            EncryptedFileError: the workbook is password-protected.
            CorruptFileError: not a workbook, or damaged.
            LimitExceededError: a zip bomb, or more rows or cells than the limits allow.
            EmptyFileError: no sheet has a non-empty cell.
        """
        data = read_bytes(path, self.limits.max_bytes)
        check_zip(data, self.limits, kind="Excel workbook")
        import openpyxl  # imported lazily: only needed once a workbook shows up

        table = TableText(self.limits, kind="workbook")
        warnings: list[str] = []
        with library_errors("Excel workbook"):
            workbook = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
            try:
                sheet_count = len(workbook.worksheets)
                for sheet in workbook.worksheets:
                    if getattr(sheet, "sheet_state", "visible") != "visible":
                        warnings.append(f"sheet {sheet.title!r} is hidden; it was read")
                    table.begin_sheet(sheet.title)
                    if hasattr(sheet, "reset_dimensions"):
                        sheet.reset_dimensions()
                    for number, values in enumerate(sheet.iter_rows(values_only=True), start=1):
                        table.add_row(number, values)
                    table.end_sheet()
                title = workbook.properties.title if workbook.properties is not None else None
            finally:
                workbook.close()
        if not table.rows:
            raise EmptyFileError("the workbook has no non-empty cell")
        return LoadedDocument(
            text=table.text,
            format=XLSX_FORMAT,
            pages=tuple(table.pages),
            rows=tuple(table.rows),
            title=(title or "").strip() or path.stem,
            page_count=sheet_count,
            warnings=tuple(warnings),
        )


class CsvLoader:
    """Loads a CSV (or TSV) file as header-repeating row lines."""

    extensions: tuple[str, ...] = (".csv", ".tsv")

    def __init__(self, *, limits: LoaderLimits | None = None) -> None:
        self.limits = limits or LoaderLimits()

    def load(self, path: Path) -> LoadedDocument:
        """Return the rows of ``path``.

        Raises:
            FileTooLargeError, LoaderError: the file cannot be read within the limit.
            BinaryFileError: the file holds binary content.
            CorruptFileError: malformed (e.g. a field over the csv module's 128 KiB limit).
            LimitExceededError: more rows or cells than the limits allow.
            EmptyFileError: no non-empty cell.
        """
        data = read_bytes(path, self.limits.max_bytes)
        if not data.strip():
            raise EmptyFileError("empty file")
        text, encoding = decode_text(data)
        text = normalize_newlines(text)
        dialect: type[csv.Dialect] | csv.Dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
        with contextlib.suppress(csv.Error):  # not enough to tell: the extension's default
            dialect = csv.Sniffer().sniff(text[:_SNIFF_CHARS], delimiters=",;\t|")
        table = TableText(self.limits, kind="CSV file")
        table.begin_sheet(None)
        try:
            for number, values in enumerate(csv.reader(io.StringIO(text), dialect), start=1):
                table.add_row(number, values)
        except csv.Error as e:
            raise CorruptFileError(f"malformed CSV: {e} (field limit {csv.field_size_limit():,} characters)") from e
        table.end_sheet()
        if not table.rows:
            raise EmptyFileError("the file has no non-empty cell")
        return LoadedDocument(
            text=table.text,
            format=CSV_FORMAT,
            pages=tuple(table.pages),
            rows=tuple(table.rows),
            title=path.stem,
            metadata={"encoding": encoding, "delimiter": dialect.delimiter},
        )
