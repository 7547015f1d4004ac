"""OpenDocument text loader (``.odt``) built on odfpy: body text in document order as markdown.

``text:h`` headings (with their outline level) become markdown headings, which give chunks
their heading path (the location: like a Word document, an ODT file has no fixed pages; each
heading starts a section no chunk crosses); paragraphs, list items, sections and tables are
read in order. A password-protected file (its manifest lists encryption data) is refused as
such. Not read: headers and footers, notes, frames, images.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ingest.loaders.base import EmptyFileError, EncryptedFileError, LoadedDocument, LoaderLimits, read_bytes
from ingest.loaders.containers import check_zip, library_errors
from ingest.loaders.structured import MarkdownText, collapse, heading_sections

FORMAT = "odt"
_TEXT_NS = "urn:oasis:names:tc:opendocument:xmlns:text:1.0"
_TABLE_NS = "urn:oasis:names:tc:opendocument:xmlns:table:1.0"
# Containers whose children are read in order.
_CONTAINERS = {
    (_TEXT_NS, "section"),
    (_TEXT_NS, "list"),
    (_TEXT_NS, "list-item"),
    (_TEXT_NS, "list-header"),
    (_TEXT_NS, "index-body"),
}


def _walk(node: Any, out: MarkdownText, extract: Any) -> None:
    # Iterative: hostile files can nest lists deeper than the recursion limit.
    stack = list(reversed(node.childNodes))
    while stack:
        child = stack.pop()
        qname = getattr(child, "qname", None)
        if qname == (_TEXT_NS, "h"):
            level = child.getAttribute("outlinelevel")
            out.heading(int(level) if level and str(level).isdigit() else 1, extract(child))
        elif qname == (_TEXT_NS, "p"):
            out.paragraph(extract(child))
        elif qname == (_TABLE_NS, "table"):
            rows = [
                [extract(cell) for cell in row.childNodes if getattr(cell, "qname", None) == (_TABLE_NS, "table-cell")]
                for row in child.getElementsByType(_table_row())
            ]
            out.table(rows)
        elif qname in _CONTAINERS:
            stack.extend(reversed(child.childNodes))


def _table_row() -> Any:
    from odf.table import TableRow

    return TableRow


class OdtLoader:
    """Loads an OpenDocument text as markdown; title = the ``dc:title`` metadata, else the stem."""

    extensions: tuple[str, ...] = (".odt",)

    def __init__(self, *, limits: LoaderLimits | None = None) -> None:
        self.limits = limits or LoaderLimits()

    def load(self, path: Path) -> LoadedDocument:
        """Return the text of ``path``.

        Raises:
            FileTooLargeError, LoaderError: the file cannot be read within the limit.
            EncryptedFileError: the document is password-protected.
            CorruptFileError: not an OpenDocument file, or damaged.
            LimitExceededError: a zip bomb.
            EmptyFileError: the body has no text.
        """
        data = read_bytes(path, self.limits.max_bytes)
        archive = check_zip(data, self.limits, kind="OpenDocument text")
        with library_errors("OpenDocument text"):
            names = set(archive.namelist())
            if "META-INF/manifest.xml" in names and b"encryption-data" in archive.read("META-INF/manifest.xml"):
                raise EncryptedFileError(
                    "password-protected OpenDocument text: remove the password and ingest it again"
                )
            from odf import dc, teletype
            from odf.opendocument import load

            document = load(io.BytesIO(data))
            out = MarkdownText()
            _walk(document.text, out, teletype.extractText)
            titles = document.meta.getElementsByType(dc.Title)
            title = collapse(teletype.extractText(titles[0])) if titles else ""
        if not out.text.strip():
            raise EmptyFileError("the document has no text")
        text = out.text
        return LoadedDocument(
            text=text, format=FORMAT, pages=heading_sections(text), title=title or path.stem, markdown=True
        )
