"""Document loaders: one per format, chosen by file extension.

Public API::

    loader_for(path, *, max_bytes=DEFAULT_MAX_BYTES, limits=None) -> Loader | None
    LoaderRegistry(loaders) .for_path(path) / .extensions
    default_loaders(*, max_bytes, limits) -> tuple[Loader, ...]
    LoaderLimits (sizes, spreadsheet limits, OCR), location_label (the one location rule)
    LoadedDocument, PageSpan, RowSpan, Loader (protocol)
    LoaderError > CorruptFileError (> EncryptedFileError) | BinaryFileError | EmptyFileError
                | FileTooLargeError | LimitExceededError

An unknown extension yields ``None``: the caller counts the file as skipped, not failed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from pathlib import Path

from ingest.loaders.base import (
    DEFAULT_MAX_BYTES,
    BinaryFileError,
    CorruptFileError,
    EmptyFileError,
    EncryptedFileError,
    FileTooLargeError,
    LimitExceededError,
    LoadedDocument,
    Loader,
    LoaderError,
    LoaderLimits,
    PageSpan,
    RowSpan,
    location_label,
)
from ingest.loaders.docx import DocxLoader
from ingest.loaders.eml import EmlLoader
from ingest.loaders.epub import EpubLoader
from ingest.loaders.html import HtmlLoader
from ingest.loaders.markdown import MarkdownLoader
from ingest.loaders.ocr import TesseractOcr
from ingest.loaders.odt import OdtLoader
from ingest.loaders.pdf import PdfLoader
from ingest.loaders.pptx import PptxLoader
from ingest.loaders.spreadsheet import CsvLoader, XlsxLoader
from ingest.loaders.text import TextLoader

__all__ = [
    "DEFAULT_MAX_BYTES",
    "BinaryFileError",
    "CorruptFileError",
    "CsvLoader",
    "DocxLoader",
    "EmlLoader",
    "EmptyFileError",
    "EncryptedFileError",
    "EpubLoader",
    "FileTooLargeError",
    "HtmlLoader",
    "LimitExceededError",
    "LoadedDocument",
    "Loader",
    "LoaderError",
    "LoaderLimits",
    "LoaderRegistry",
    "MarkdownLoader",
    "OdtLoader",
    "PageSpan",
    "PdfLoader",
    "PptxLoader",
    "RowSpan",
    "TesseractOcr",
    "TextLoader",
    "XlsxLoader",
    "default_loaders",
    "loader_for",
    "location_label",
    "supported_extensions",
]


def default_loaders(*, max_bytes: int = DEFAULT_MAX_BYTES, limits: LoaderLimits | None = None) -> tuple[Loader, ...]:
    """Return the built-in loaders: text, markdown, HTML, PDF (with OCR when ``limits.ocr``),
    Word, PowerPoint, Excel, CSV, OpenDocument text, EPUB and e-mail.

    ``limits`` (default: :class:`LoaderLimits` with ``max_bytes``) bounds every loader.
    """
    limits = limits or LoaderLimits(max_bytes=max_bytes)
    max_bytes = limits.max_bytes
    ocr = (
        TesseractOcr(language=limits.ocr_language, dpi=limits.ocr_dpi, timeout_seconds=limits.ocr_timeout_seconds)
        if limits.ocr
        else None
    )
    return (
        TextLoader(max_bytes=max_bytes),
        MarkdownLoader(max_bytes=max_bytes),
        HtmlLoader(max_bytes=max_bytes),
        PdfLoader(max_bytes=max_bytes, ocr=ocr),
        DocxLoader(limits=limits),
        PptxLoader(limits=limits),
        XlsxLoader(limits=limits),
        CsvLoader(limits=limits),
        OdtLoader(limits=limits),
        EpubLoader(limits=limits),
        EmlLoader(limits=limits),
    )


class LoaderRegistry:
    """Maps lowercase file extensions to loaders; a later loader wins an extension both claim."""

    def __init__(self, loaders: Iterable[Loader]) -> None:
        self._by_extension: dict[str, Loader] = {}
        for loader in loaders:
            for extension in loader.extensions:
                self._by_extension[extension.lower()] = loader

    @property
    def extensions(self) -> frozenset[str]:
        """The extensions (lowercase, with the dot) some loader handles."""
        return frozenset(self._by_extension)

    @property
    def by_extension(self) -> Mapping[str, Loader]:
        """A read-only view of the extension -> loader table."""
        return dict(self._by_extension)

    def for_path(self, path: Path | str) -> Loader | None:
        """Return the loader for ``path``'s extension (case-insensitive), or ``None`` if unknown."""
        return self._by_extension.get(Path(path).suffix.lower())


@functools.lru_cache(maxsize=8)
def _default_registry(limits: LoaderLimits) -> LoaderRegistry:
    return LoaderRegistry(default_loaders(limits=limits))


def loader_for(
    path: Path | str, *, max_bytes: int = DEFAULT_MAX_BYTES, limits: LoaderLimits | None = None
) -> Loader | None:
    """Return the built-in loader for ``path`` by lowercase extension, or ``None`` if none handles it.

    Handled: see :func:`supported_extensions`. ``limits`` (default: :class:`LoaderLimits` with
    ``max_bytes``) bounds the loader. Loaders are stateless apart from their limits and safe to
    share between threads (the pipeline prepares files on one thread anyway: PDFium is not
    thread-safe).
    """
    return _default_registry(limits or LoaderLimits(max_bytes=max_bytes)).for_path(path)


def supported_extensions() -> tuple[str, ...]:
    """The extensions the built-in loaders read (lowercase, with the dot, sorted): for messages and docs."""
    return tuple(sorted(_default_registry(LoaderLimits()).extensions))
