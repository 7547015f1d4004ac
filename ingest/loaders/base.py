"""The loader contract: what a loader returns, how it fails, and shared byte-level helpers.

A loader turns one file into a :class:`LoadedDocument`: the full extracted text
plus what is known about its structure (page spans for PDFs, a title, string
metadata). Loaders are synchronous and CPU-bound; the worker runs them on an
executor. They never read the environment: limits such as ``max_bytes`` are
constructor arguments.

Exception tree (every message is a human-readable reason, stored as is in the
document's ``error`` column)::

    LoaderError               the file could not be turned into text (also: unreadable file)
    ├── CorruptFileError      the container is damaged, encrypted or not what its extension says
    │   └── EncryptedFileError    it needs a password (Office, OpenDocument, PDF, DRM'd EPUB)
    ├── BinaryFileError       a text format holds binary content
    ├── EmptyFileError        the file has no extractable text
    ├── FileTooLargeError     the file is larger than the loader's ``max_bytes``
    └── LimitExceededError    reading it would pass a limit of :class:`LoaderLimits` (a zip bomb
                              inside an Office file, a sheet with too many rows or cells)

Location: a chunk of a document is cited by one label, :func:`location_label`, built from what
the loader knows: the numbered page or slide (:class:`PageSpan`), a named section (a sheet, an
e-mail attachment: :attr:`PageSpan.label`), the heading path and, for spreadsheets, the rows
(:class:`RowSpan`). It is the one rule for every format.
"""

from __future__ import annotations

import bisect
import codecs
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
"""Default size limit of a loader (100 MiB); larger files raise :class:`FileTooLargeError`."""

SNIFF_BYTES = 8192
"""How much of the start of a file the binary-content heuristics look at."""

# Share of control bytes (other than tab, newline, carriage return, form feed, escape, backspace)
# above which a file that claims to be text is treated as binary.
_MAX_CONTROL_RATIO = 0.10
_TEXT_CONTROLS = frozenset(b"\t\n\r\f\b\x1b")
_CONTROL_BYTES = bytes(sorted(frozenset(range(0x20)) - _TEXT_CONTROLS | {0x7F}))

_BOMS: tuple[tuple[bytes, str], ...] = (
    # UTF-32 first: its little-endian BOM starts with the UTF-16 one.
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class LoaderError(Exception):
    """Base class of loader failures; ``reason`` is the human-readable message recorded in the DB."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CorruptFileError(LoaderError):
    """The file is damaged, encrypted, or not a valid file of its format."""


class BinaryFileError(LoaderError):
    """A file with a text extension holds binary content."""


class EmptyFileError(LoaderError):
    """The file is empty, whitespace only, or has no extractable text."""


class FileTooLargeError(LoaderError):
    """The file is larger than the loader's ``max_bytes`` limit."""


class EncryptedFileError(CorruptFileError):
    """The file is protected by a password (or DRM) and cannot be read without it."""


class LimitExceededError(LoaderError):
    """Reading the file would pass one of the :class:`LoaderLimits` (decompressed size,
    compression ratio, spreadsheet rows or cells): refused before it can exhaust memory or time."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoaderLimits:
    """What a loader may spend on one file; hashable, so a registry can be cached per value.

    Attributes:
        max_bytes: Files larger than this on disk are refused (:class:`FileTooLargeError`).
        max_uncompressed_bytes: A zip container (.docx, .pptx, .xlsx, .odt, .epub) whose members
            declare more than this in total is refused before any member is parsed.
        max_compression_ratio: A zip member of at least 1 MiB uncompressed that is more than this
            many times smaller compressed is refused (zip bombs reach 1,000x; Office XML 5-30x).
        max_sheet_rows: Rows read from one spreadsheet file (.xlsx, .csv; all sheets together).
        max_sheet_cells: Non-empty cells read from one spreadsheet file (all sheets together).
        ocr: Read the text of PDF pages without a text layer with Tesseract.
        ocr_language: Tesseract language(s), e.g. ``eng`` or ``eng+deu``.
        ocr_dpi: Resolution at which a page is rendered for OCR.
        ocr_timeout_seconds: Give up on one page's OCR after this long (a warning, not a failure).
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    max_uncompressed_bytes: int = 512 * 1024 * 1024
    max_compression_ratio: float = 200.0
    max_sheet_rows: int = 100_000
    max_sheet_cells: int = 2_000_000
    ocr: bool = True
    ocr_language: str = "eng"
    ocr_dpi: int = 300
    ocr_timeout_seconds: float = 120.0


@dataclass(frozen=True, slots=True)
class PageSpan:
    """Where one section's text lies in :attr:`LoadedDocument.text`: ``text[start:end]``.

    A section is a page (PDF), a slide (PPTX), a sheet (XLSX), a chapter (EPUB) or a part of
    an e-mail: no chunk crosses its boundaries. ``page`` is its 1-based number where the format
    numbers them (pages, slides), else ``None``; ``label`` names it where it has a name (a sheet,
    a slide's title, ``attachment notes.txt``), else ``None``.
    """

    start: int
    end: int
    page: int | None
    label: str | None = None


@dataclass(frozen=True, slots=True)
class RowSpan:
    """One spreadsheet row's text, ``text[start:end]``; ``row`` is its number in the file (1-based,
    as a spreadsheet program shows it; the header row included). Chunks hold whole rows."""

    start: int
    end: int
    row: int


def location_label(
    *, unit: str = "page", page: int | None = None, heading: str | None = None, rows: tuple[int, int] | None = None
) -> str | None:
    """The one human-readable location of a chunk, as citations show it.

    Parts, joined by ``", "``: ``"<unit> <page>"`` (``page 4``, ``slide 3``), the heading path or
    section name (``Install > Linux``, ``Prices``), and ``row N`` / ``rows N-M``. Examples:
    ``"page 4"``, ``"slide 3, Quarterly results"``, ``"Prices, rows 2-14"``. ``None`` when
    nothing is known (a plain-text file).
    """
    parts: list[str] = []
    if page is not None:
        parts.append(f"{unit} {page}")
    if heading:
        parts.append(heading)
    if rows is not None:
        first, last = rows
        parts.append(f"row {first}" if first == last else f"rows {first}-{last}")
    return ", ".join(parts) or None


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadedDocument:
    """The text extracted from one file and what is known about its structure.

    Attributes:
        text: The full extracted text, newlines normalised to ``\\n``. Every offset
            in the ingestion pipeline (pieces, chunks, page spans) indexes this string.
        pages: The span of each section that produced text (pages, slides, sheets, chapters,
            e-mail parts), in order, non-overlapping; empty for formats without sections.
        title: A display title (the built-in loaders fall back to the file stem).
        metadata: Format-specific string facts (e.g. ``encoding``, PDF ``author``).
        page_count: Number of physical pages (PDF), slides (PPTX) or sheets (XLSX), else ``None``.
        format: The loader's format name: ``text``, ``markdown``, ``html``, ``pdf``, ``docx``,
            ``pptx``, ``xlsx``, ``csv``, ``odt``, ``epub`` or ``eml``.
        markdown: The text is markdown (ATX headings give chunks their heading path); set by the
            markdown loader and by loaders that render document structure as markdown headings.
        page_unit: What a numbered :class:`PageSpan` is called in a location (``page``, ``slide``).
        rows: Spreadsheet rows, in order; chunks are cut between rows, never inside one (unless
            a row alone exceeds a chunk).
        ocr_pages: Pages whose text came from OCR.
        ocr_seconds: Time spent in OCR (rendering and Tesseract).
        warnings: What was skipped or doubtful (a page that failed, an attachment not read).
    """

    text: str
    format: str
    pages: tuple[PageSpan, ...] = ()
    title: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    page_count: int | None = None
    markdown: bool = False
    page_unit: str = "page"
    rows: tuple[RowSpan, ...] = ()
    ocr_pages: tuple[int, ...] = ()
    ocr_seconds: float = 0.0
    warnings: tuple[str, ...] = ()

    @property
    def is_markdown(self) -> bool:
        """Whether the splitter reads the text as markdown (headings, fences)."""
        return self.markdown or self.format == "markdown"

    def report(self) -> dict[str, Any]:
        """The extraction report stored with the document and the job: sections read (pages,
        slides, sheets; ``None`` for formats without them), pages OCR'd, characters, OCR
        seconds and warnings."""
        return {
            "format": self.format,
            "pages": self.page_count,
            "pages_ocr": len(self.ocr_pages),
            "characters": len(self.text),
            "ocr_seconds": round(self.ocr_seconds, 3),
            "warnings": list(self.warnings),
        }

    def page_at(self, offset: int) -> int | None:
        """Return the 1-based page holding ``offset`` (or the last page starting before it).

        Offsets that fall between two pages (in the separator) belong to the earlier
        page; offsets before the first page belong to the first page. Returns ``None``
        when the document has no page spans or the section holding ``offset`` is not numbered.
        """
        span = self.span_at(offset)
        return span.page if span is not None else None

    def span_at(self, offset: int) -> PageSpan | None:
        """The section holding ``offset``, by the rule of :meth:`page_at`; ``None`` without sections."""
        if not self.pages:
            return None
        i = bisect.bisect_right(self.pages, offset, key=lambda span: span.start) - 1
        return self.pages[max(i, 0)]


class Loader(Protocol):
    """Turns files with one of ``extensions`` (lowercase, with the dot) into a :class:`LoadedDocument`.

    ``load`` raises a :class:`LoaderError` subclass for every expected failure
    (unreadable, too large, corrupt, binary, empty); anything else is a bug.
    """

    extensions: tuple[str, ...]

    def load(self, path: Path) -> LoadedDocument:
        """Read ``path`` and return its text; raise :class:`LoaderError` if it cannot."""
        ...


def read_bytes(path: Path, max_bytes: int) -> bytes:
    """Read a whole file, refusing files larger than ``max_bytes``.

    Raises:
        FileTooLargeError: the file is (or grew to be) larger than ``max_bytes``.
        LoaderError: the file cannot be read (missing, permissions, a directory...).
    """
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise FileTooLargeError(_too_large(size, max_bytes))
        with path.open("rb") as f:
            # Read one byte more than allowed so a file that grew since stat() is caught too.
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise LoaderError(f"cannot read file: {e.strerror or e}") from e
    if len(data) > max_bytes:
        raise FileTooLargeError(_too_large(len(data), max_bytes))
    return data


def _too_large(size: int, max_bytes: int) -> str:
    return f"file too large: {size:,} bytes, the limit is {max_bytes:,} bytes"


def sniff_bom(data: bytes) -> str | None:
    """Return the Python codec named by a byte-order mark at the start of ``data``, if any.

    The codec strips the BOM while decoding (``utf-8-sig``, ``utf-16``, ``utf-32``).
    """
    for bom, codec in _BOMS:
        if data.startswith(bom):
            return codec
    return None


def check_not_binary(data: bytes) -> None:
    """Raise :class:`BinaryFileError` if the first :data:`SNIFF_BYTES` of ``data`` look binary.

    Binary means a NUL byte, or more than 10% control bytes other than the usual
    whitespace controls. Call it only on data without a UTF-16/32 BOM (those legitimately hold NULs).
    """
    head = data[:SNIFF_BYTES]
    if not head:
        return
    if b"\x00" in head:
        raise BinaryFileError("binary content (NUL bytes) in a text file")
    controls = len(head) - len(head.translate(None, _CONTROL_BYTES))
    if controls / len(head) > _MAX_CONTROL_RATIO:
        raise BinaryFileError(f"binary content ({controls} control bytes in the first {len(head)})")


def decode_text(data: bytes) -> tuple[str, str]:
    """Decode the bytes of a text file; return ``(text, encoding)``.

    Order: a BOM (UTF-8/16/32, stripped), else strict UTF-8, else cp1252, else
    latin-1 (which cannot fail). Binary content is refused before guessing.
    Newlines are *not* normalised here (see :func:`normalize_newlines`).

    Raises:
        BinaryFileError: no BOM and the content looks binary.
        CorruptFileError: a BOM announces an encoding the bytes do not follow.
    """
    codec = sniff_bom(data)
    if codec is not None:
        try:
            return data.decode(codec), codec.removesuffix("-sig")
        except UnicodeDecodeError as e:
            raise CorruptFileError(f"invalid {codec.removesuffix('-sig')} text after its BOM: {e}") from e
    check_not_binary(data)
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        # cp1252 leaves five bytes undefined; latin-1 maps every byte.
        return data.decode("latin-1"), "latin-1"


def normalize_newlines(text: str) -> str:
    """Turn ``\\r\\n`` and lone ``\\r`` into ``\\n``."""
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")
