"""Plain-text loader (``.txt``, ``.text``).

Decoding: a BOM wins (UTF-8, UTF-16, UTF-32), else strict UTF-8, else cp1252,
else latin-1; the choice is recorded in ``metadata["encoding"]``. Binary content
(NUL bytes or many control bytes in the first 8 KiB) is refused.
"""

from __future__ import annotations

from pathlib import Path

from ingest.loaders.base import (
    DEFAULT_MAX_BYTES,
    EmptyFileError,
    LoadedDocument,
    decode_text,
    normalize_newlines,
    read_bytes,
)

FORMAT = "text"


def read_text_file(path: Path, max_bytes: int) -> tuple[str, str]:
    """Read, decode and newline-normalise a text file; return ``(text, encoding)``.

    Raises:
        FileTooLargeError, LoaderError: see :func:`~ingest.loaders.base.read_bytes`.
        BinaryFileError: the content is binary.
        EmptyFileError: the file is empty or holds only whitespace.
    """
    data = read_bytes(path, max_bytes)
    if not data:
        raise EmptyFileError("empty file")
    text, encoding = decode_text(data)
    text = normalize_newlines(text)
    if not text.strip():
        raise EmptyFileError("file contains only whitespace")
    return text, encoding


class TextLoader:
    """Loads plain text as is (newlines normalised); the title is the file stem."""

    extensions: tuple[str, ...] = (".txt", ".text")

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes

    def load(self, path: Path) -> LoadedDocument:
        """Return the decoded text of ``path``; raise a ``LoaderError`` subclass on failure."""
        text, encoding = read_text_file(path, self.max_bytes)
        return LoadedDocument(text=text, format=FORMAT, title=path.stem, metadata={"encoding": encoding})
