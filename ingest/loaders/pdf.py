"""PDF loader (``.pdf``) built on pypdf: text per page, pages joined by a blank line.

pypdf is lenient (``strict=False``) and raises many exception types on damaged
files; this module is the boundary that turns all of them into
:class:`~ingest.loaders.base.CorruptFileError` with the underlying reason. A page
whose extraction fails is skipped (and listed in ``metadata["failed_pages"]``)
rather than failing a 700-page manual.

pypdf (and fontTools, which it uses for some fonts) log a warning for every odd
font or object they meet. On first use this module lowers the ``pypdf`` and
``fontTools`` loggers to ERROR, unless the application already gave them a level.
"""

from __future__ import annotations

import functools
import io
import logging
from pathlib import Path
from typing import Any

from ingest.loaders.base import (
    DEFAULT_MAX_BYTES,
    CorruptFileError,
    EmptyFileError,
    LoadedDocument,
    PageSpan,
    normalize_newlines,
    read_bytes,
)

FORMAT = "pdf"
PAGE_SEPARATOR = "\n\n"
"""What joins the text of consecutive pages in :attr:`LoadedDocument.text`."""

logger = logging.getLogger(__name__)

_NOISY_LOGGERS = ("pypdf", "fontTools")
_METADATA_FIELDS = ("title", "author", "subject", "creator", "producer")


@functools.cache
def _quiet_pdf_loggers() -> None:
    for name in _NOISY_LOGGERS:
        noisy = logging.getLogger(name)
        if noisy.level == logging.NOTSET:
            noisy.setLevel(logging.ERROR)


def _reason(e: BaseException) -> str:
    message = str(e).strip()
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def clean_page_text(text: str) -> str:
    """Normalise one page's extracted text: ``\\n`` newlines, no NUL, no lone surrogates, trimmed."""
    text = normalize_newlines(text).replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Broken ToUnicode maps can yield lone surrogates, which neither UTF-8 nor PostgreSQL accept.
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def _metadata(reader: Any) -> dict[str, str]:
    try:
        info = reader.metadata
        if info is None:
            return {}
        found = {name: getattr(info, name, None) for name in _METADATA_FIELDS}
    except Exception as e:  # a damaged /Info dictionary must not fail the document
        logger.debug("unreadable PDF metadata: %s", _reason(e))
        return {}
    return {name: " ".join(str(value).split()) for name, value in found.items() if value and str(value).strip()}


class PdfLoader:
    """Loads the text of a PDF page by page with pypdf.

    The text of page *n* is ``text[span.start:span.end]`` for the :class:`PageSpan`
    with ``page == n``; pages without text have no span. ``page_count`` is the number
    of physical pages; ``title`` is the document-info title, else the file stem;
    ``metadata`` holds the document-info fields that are set (``title``, ``author``,
    ``subject``, ``creator``, ``producer``) and ``failed_pages`` if any page failed.
    """

    extensions: tuple[str, ...] = (".pdf",)

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes

    def load(self, path: Path) -> LoadedDocument:
        """Return the text of ``path`` with one span per page.

        Raises:
            FileTooLargeError, LoaderError: the file cannot be read within the limit.
            CorruptFileError: not a PDF, damaged, or encrypted with a password.
            EmptyFileError: the file is empty or no page has extractable text.
        """
        data = read_bytes(path, self.max_bytes)
        if not data.strip():
            raise EmptyFileError("empty file")
        if b"%PDF-" not in data[:1024]:
            raise CorruptFileError("not a PDF file (no %PDF- header)")
        _quiet_pdf_loggers()
        try:
            return self._extract(path, data)
        except (CorruptFileError, EmptyFileError):
            raise
        except Exception as e:  # pypdf raises anything from PdfReadError to KeyError on damaged files
            raise CorruptFileError(f"unreadable PDF: {_reason(e)}") from e

    def _extract(self, path: Path, data: bytes) -> LoadedDocument:
        from pypdf import PdfReader  # imported lazily: only needed once a PDF shows up

        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            # Many PDFs are encrypted with an owner password only: the empty user password opens them.
            try:
                opened = reader.decrypt("")
            except Exception as e:  # e.g. AES without the cryptography package
                raise CorruptFileError(f"encrypted PDF: {_reason(e)}") from e
            if not opened:
                raise CorruptFileError("encrypted PDF: a password is required")
        pages = reader.pages
        page_count = len(pages)
        if page_count == 0:
            raise EmptyFileError("PDF has no pages")

        parts: list[str] = []
        spans: list[PageSpan] = []
        failed: list[tuple[int, str]] = []
        offset = 0
        for number in range(1, page_count + 1):
            try:
                raw = pages[number - 1].extract_text()
            except Exception as e:  # one bad page must not lose the rest of the document
                failed.append((number, _reason(e)))
                logger.warning("%s: text extraction failed on page %d: %s", path, number, _reason(e))
                continue
            text = clean_page_text(raw or "")
            if not text:
                continue
            if parts:
                parts.append(PAGE_SEPARATOR)
                offset += len(PAGE_SEPARATOR)
            parts.append(text)
            spans.append(PageSpan(start=offset, end=offset + len(text), page=number))
            offset += len(text)

        if not spans:
            if failed and len(failed) == page_count:
                raise CorruptFileError(f"text extraction failed on every page: {failed[0][1]}")
            raise EmptyFileError("no extractable text (scanned?)")

        metadata = _metadata(reader)
        title = metadata.get("title")
        if failed:
            metadata["failed_pages"] = ",".join(str(number) for number, _ in failed)
        return LoadedDocument(
            text="".join(parts),
            format=FORMAT,
            pages=tuple(spans),
            title=title or path.stem,
            metadata=metadata,
            page_count=page_count,
        )
