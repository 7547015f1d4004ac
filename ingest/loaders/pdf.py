"""PDF loader (``.pdf``) built on pypdf: text per page, pages joined by a blank line.

pypdf is lenient (``strict=False``) and raises many exception types on damaged
files; this module is the boundary that turns all of them into
:class:`~ingest.loaders.base.CorruptFileError` with the underlying reason. A page
whose extraction fails is skipped (and listed in ``metadata["failed_pages"]``)
rather than failing a 700-page manual.

OCR: a page whose text layer holds fewer than :data:`OCR_BELOW_CHARS` non-space characters
(a scan, a photographed page, an image-only PDF) is rendered and read by Tesseract when the
loader has an OCR engine (:mod:`ingest.loaders.ocr`); the longer of the two texts is kept.
Pages read that way are listed in ``ocr_pages``; a page OCR could not read is a warning, not a
failure. Without an engine (``RAG_INGEST__OCR=false``) or without Tesseract installed, such
pages stay empty and the extraction report says why.

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
    EncryptedFileError,
    LoadedDocument,
    PageSpan,
    normalize_newlines,
    read_bytes,
)
from ingest.loaders.ocr import OcrError, OcrStats, TesseractOcr, timed_page_text

FORMAT = "pdf"
PAGE_SEPARATOR = "\n\n"
"""What joins the text of consecutive pages in :attr:`LoadedDocument.text`."""

OCR_BELOW_CHARS = 16
"""A page whose text layer has fewer non-space characters than this is OCR'd (when OCR is on)."""

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
    ``ocr`` reads pages without a text layer (``None``: they stay empty).
    """

    extensions: tuple[str, ...] = (".pdf",)

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES, ocr: TesseractOcr | None = None) -> None:
        self.max_bytes = max_bytes
        self.ocr = ocr

    def load(self, path: Path) -> LoadedDocument:
        """Return the text of ``path`` with one span per page.

        Raises:
            FileTooLargeError, LoaderError: the file cannot be read within the limit.
            CorruptFileError: not a PDF, or damaged.
            EncryptedFileError: encrypted with a password.
            EmptyFileError: the file is empty or no page has extractable text (OCR included).
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
                raise EncryptedFileError(f"encrypted PDF: {_reason(e)}") from e
            if not opened:
                raise EncryptedFileError("encrypted PDF: a password is required")
        pages = reader.pages
        page_count = len(pages)
        if page_count == 0:
            raise EmptyFileError("PDF has no pages")

        texts: list[str | None] = []  # None: extraction failed
        failed: list[tuple[int, str]] = []
        for number in range(1, page_count + 1):
            try:
                raw = pages[number - 1].extract_text()
            except Exception as e:  # one bad page must not lose the rest of the document
                failed.append((number, _reason(e)))
                logger.warning("%s: text extraction failed on page %d: %s", path, number, _reason(e))
                texts.append(None)
                continue
            texts.append(clean_page_text(raw or ""))

        warnings = [f"page {number}: text extraction failed: {why}" for number, why in failed]
        stats = OcrStats()
        textless = [i for i, text in enumerate(texts) if len("".join((text or "").split())) < OCR_BELOW_CHARS]
        if textless:
            self._ocr_pages(data, texts, textless, stats, warnings)

        parts: list[str] = []
        spans: list[PageSpan] = []
        offset = 0
        for number, text in enumerate(texts, start=1):
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
            raise EmptyFileError(f"no extractable text: {self._why_no_text(stats, warnings)}")

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
            ocr_pages=tuple(stats.pages),
            ocr_seconds=stats.seconds,
            warnings=tuple(warnings),
        )

    def _ocr_pages(
        self, data: bytes, texts: list[str | None], indexes: list[int], stats: OcrStats, warnings: list[str]
    ) -> None:
        """OCR the pages at ``indexes`` (0-based) in place: keep the longer of layer and OCR text."""
        listed = ", ".join(str(i + 1) for i in indexes[:20]) + (" ..." if len(indexes) > 20 else "")
        if self.ocr is None:
            warnings.append(f"pages without a text layer not read (OCR is off): {listed}")
            return
        if not self.ocr.available:
            warnings.append(f"pages without a text layer not read (Tesseract is not installed): {listed}")
            return
        try:
            document = self.ocr.open(data)
        except OcrError as e:
            warnings.append(f"OCR skipped: {e}")
            return
        try:
            for index in indexes:
                try:
                    raw = timed_page_text(self.ocr, document, index, stats)
                except OcrError as e:
                    warnings.append(f"page {index + 1}: OCR failed: {e}")
                    continue
                if raw is None:  # a blank page: nothing to read
                    continue
                text = clean_page_text(raw)
                stats.pages.append(index + 1)
                if len(text) > len(texts[index] or ""):
                    texts[index] = text
        finally:
            self.ocr.close(document)

    def _why_no_text(self, stats: OcrStats, warnings: list[str]) -> str:
        if self.ocr is None:
            return "no page has a text layer (a scan?) and OCR is off (RAG_INGEST__OCR)"
        if not self.ocr.available:
            return "no page has a text layer (a scan?) and Tesseract is not installed"
        if stats.pages:
            return f"no text on any page, OCR included ({len(stats.pages)} pages OCR'd)"
        failures = [w for w in warnings if "OCR failed" in w or "OCR skipped" in w]
        if failures:
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            return f"no page has a text layer and OCR read none: {failures[0]}{more}"
        return "no page has a text layer and every page is blank"
