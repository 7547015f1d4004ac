"""Word loader (``.docx``) built on python-docx: body text in document order as markdown.

Paragraphs and tables are read in the order they appear in the body. Paragraphs styled
``Title`` or ``Heading 1``-``Heading 9`` (by name or by the built-in style id, so localized
documents work too) become markdown headings, which give chunks their heading path: a Word
document has no fixed pages (the layout is computed when it is displayed), so the heading path
is its location, and each heading starts a section no chunk crosses. Not read: headers and
footers, footnotes, comments, text boxes, images.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

from ingest.loaders.base import EmptyFileError, LoadedDocument, LoaderLimits, read_bytes
from ingest.loaders.containers import check_zip, library_errors
from ingest.loaders.structured import MarkdownText, collapse, heading_sections

FORMAT = "docx"
_HEADING = re.compile(r"^heading\s*([1-9])$", re.IGNORECASE)


def heading_level(style: Any) -> int | None:
    """The heading level of a paragraph style (``Title`` is 1), or ``None`` for body text."""
    if style is None:
        return None
    for name in (getattr(style, "name", None), getattr(style, "style_id", None)):
        if not name:
            continue
        if name.lower() == "title":
            return 1
        m = _HEADING.match(name)
        if m:
            return int(m.group(1))
    return None


class DocxLoader:
    """Loads the body of a Word document as markdown; title = the core ``title`` property, else the stem."""

    # Not .docm: python-docx refuses the macro-enabled content type.
    extensions: tuple[str, ...] = (".docx",)

    def __init__(self, *, limits: LoaderLimits | None = None) -> None:
        self.limits = limits or LoaderLimits()

    def load(self, path: Path) -> LoadedDocument:
        """Return the text of ``path``.

        Raises:
            FileTooLargeError, LoaderError: the file cannot be read within the limit.
            EncryptedFileError: the document is password-protected.
            CorruptFileError: not a Word document, or damaged.
            LimitExceededError: a zip bomb.
            EmptyFileError: the body has no text.
        """
        data = read_bytes(path, self.limits.max_bytes)
        check_zip(data, self.limits, kind="Word document")
        import docx  # imported lazily: only needed once a document shows up
        from docx.table import Table

        out = MarkdownText()
        with library_errors("Word document"):
            document = docx.Document(io.BytesIO(data))
            for block in document.iter_inner_content():
                if isinstance(block, Table):
                    out.table([cell.text for cell in row.cells] for row in block.rows)
                    continue
                level = heading_level(block.style)
                if level is not None:
                    out.heading(level, block.text)
                else:
                    out.paragraph(block.text)
            title = collapse(document.core_properties.title or "")
        if not out.text.strip():
            raise EmptyFileError("the document has no text")
        text = out.text
        return LoadedDocument(
            text=text, format=FORMAT, pages=heading_sections(text), title=title or path.stem, markdown=True
        )
