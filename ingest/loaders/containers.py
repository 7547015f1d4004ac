"""Checks shared by the loaders of zip-based formats (.docx, .pptx, .xlsx, .odt, .epub).

Every such file is read into memory once (within ``max_bytes``), checked here, and only then
handed to its library as a ``BytesIO`` of the same bytes (what was checked is what is parsed).

The zip check refuses, before any member is decompressed:

* a file that is not a zip: an OLE compound file holding an ``EncryptedPackage`` is a
  password-protected Office file (:class:`EncryptedFileError`); any other OLE file is a legacy
  binary document (.doc/.xls/.ppt) under a new extension; anything else is corrupt;
* more members than :data:`MAX_MEMBERS`, members declaring more than
  ``max_uncompressed_bytes`` in total, or a member of at least :data:`RATIO_FLOOR_BYTES` that
  is more than ``max_compression_ratio`` times smaller compressed (:class:`LimitExceededError`).

Declared sizes cannot lie to the libraries: Python's ``zipfile``, which python-docx,
python-pptx, openpyxl, odfpy and ebooklib all read through, stops a member at its declared
size and fails its CRC check if the data goes on.
"""

from __future__ import annotations

import contextlib
import io
import zipfile
from collections.abc import Iterator

from ingest.loaders.base import (
    CorruptFileError,
    EmptyFileError,
    EncryptedFileError,
    LimitExceededError,
    LoaderError,
    LoaderLimits,
)

MAX_MEMBERS = 20_000
"""More members than this in one document is a hostile archive, not an Office file."""
RATIO_FLOOR_BYTES = 1024 * 1024
"""Members smaller than this are not ratio-checked (tiny XML parts compress 100x legitimately)."""

_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ENCRYPTED_PACKAGE = "EncryptedPackage".encode("utf-16-le")


def reason(e: BaseException) -> str:
    """``Type: message`` of an exception, for failure reasons."""
    message = str(e).strip()
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def check_zip(data: bytes, limits: LoaderLimits, *, kind: str) -> zipfile.ZipFile:
    """Check a zip-based document (see the module docstring) and return it opened.

    Args:
        data: The whole file.
        limits: The decompression limits.
        kind: The format's name for messages (``"Word document"``).

    Raises:
        EmptyFileError: ``data`` is empty.
        EncryptedFileError: a password-protected Office file.
        CorruptFileError: not a zip (or a damaged one), or a legacy binary Office file.
        LimitExceededError: a zip bomb by the limits above.
    """
    if not data.strip():
        raise EmptyFileError("empty file")
    if data.startswith(_OLE_MAGIC):
        if _ENCRYPTED_PACKAGE in data:
            raise EncryptedFileError(f"password-protected {kind}: remove the password and ingest it again")
        raise CorruptFileError(
            f"not a {kind}: an old binary Office file (.doc/.xls/.ppt) renamed; save it in the current format"
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise CorruptFileError(f"not a valid {kind} (damaged zip container): {reason(e)}") from e
    if len(members) > MAX_MEMBERS:
        raise LimitExceededError(f"{kind} holds {len(members):,} zip members (the limit is {MAX_MEMBERS:,})")
    total = sum(m.file_size for m in members)
    if total > limits.max_uncompressed_bytes:
        raise LimitExceededError(
            f"{kind} would decompress to {total:,} bytes, over the limit of {limits.max_uncompressed_bytes:,} "
            "(a zip bomb?)"
        )
    for m in members:
        if m.file_size >= RATIO_FLOOR_BYTES:
            ratio = m.file_size / max(m.compress_size, 1)
            if ratio > limits.max_compression_ratio:
                raise LimitExceededError(
                    f"{kind} member {m.filename!r} expands {ratio:,.0f}x ({m.compress_size:,} -> {m.file_size:,} "
                    f"bytes), over the limit of {limits.max_compression_ratio:,.0f}x (a zip bomb?)"
                )
    return archive


@contextlib.contextmanager
def library_errors(kind: str) -> Iterator[None]:
    """Turn whatever a parsing library raises on a damaged file into :class:`CorruptFileError`.

    :class:`LoaderError` passes through; ``MemoryError`` and ``RecursionError`` (both
    ``Exception`` s) are reported as corrupt too: a hostile file, not a bug of ours.
    """
    try:
        yield
    except LoaderError:
        raise
    except Exception as e:  # libraries raise anything from KeyError to lxml's XMLSyntaxError
        raise CorruptFileError(f"unreadable {kind}: {reason(e)}") from e
