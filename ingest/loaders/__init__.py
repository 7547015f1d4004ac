"""Document loaders: one per format, chosen by file extension.

Public API::

    loader_for(path, *, max_bytes=DEFAULT_MAX_BYTES) -> Loader | None
    LoaderRegistry(loaders) .for_path(path) / .extensions
    default_loaders(*, max_bytes) -> tuple[Loader, ...]
    LoadedDocument, PageSpan, Loader (protocol)
    LoaderError > CorruptFileError | BinaryFileError | EmptyFileError | FileTooLargeError

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
    FileTooLargeError,
    LoadedDocument,
    Loader,
    LoaderError,
    PageSpan,
)
from ingest.loaders.html import HtmlLoader
from ingest.loaders.markdown import MarkdownLoader
from ingest.loaders.pdf import PdfLoader
from ingest.loaders.text import TextLoader

__all__ = [
    "DEFAULT_MAX_BYTES",
    "BinaryFileError",
    "CorruptFileError",
    "EmptyFileError",
    "FileTooLargeError",
    "HtmlLoader",
    "LoadedDocument",
    "Loader",
    "LoaderError",
    "LoaderRegistry",
    "MarkdownLoader",
    "PageSpan",
    "PdfLoader",
    "TextLoader",
    "default_loaders",
    "loader_for",
    "supported_extensions",
]


def default_loaders(*, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Loader, ...]:
    """Return the built-in loaders (text, markdown, HTML, PDF), each limited to ``max_bytes``."""
    return (
        TextLoader(max_bytes=max_bytes),
        MarkdownLoader(max_bytes=max_bytes),
        HtmlLoader(max_bytes=max_bytes),
        PdfLoader(max_bytes=max_bytes),
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
def _default_registry(max_bytes: int) -> LoaderRegistry:
    return LoaderRegistry(default_loaders(max_bytes=max_bytes))


def loader_for(path: Path | str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Loader | None:
    """Return the built-in loader for ``path`` by lowercase extension, or ``None`` if none handles it.

    Handled: ``.txt .text .md .markdown .html .htm .pdf``. Loaders are stateless
    apart from ``max_bytes`` and safe to share between threads.
    """
    return _default_registry(max_bytes).for_path(path)


def supported_extensions() -> tuple[str, ...]:
    """The extensions the built-in loaders read (lowercase, with the dot, sorted): for messages and docs."""
    return tuple(sorted(_default_registry(DEFAULT_MAX_BYTES).extensions))
