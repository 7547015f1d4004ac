"""EPUB loader (``.epub``) built on ebooklib: the spine's documents in reading order, as markdown.

Each document of the spine (a chapter, usually) is an XHTML page whose visible text is read
by the HTML loader's rules, with ``<h1>``-``<h6>`` written as markdown headings: a chunk's
location is its heading path (e-books reflow, they have no fixed pages). Chapters and headings start
sections, so no chunk spans two of them. A book whose content is encrypted (DRM: ``encryption.xml`` names
an AES algorithm; font obfuscation alone is fine) is refused as such. Not read: images, the
navigation document (the table of contents repeats the headings).
"""

from __future__ import annotations

import io
from pathlib import Path

from ingest.loaders.base import EmptyFileError, EncryptedFileError, LoadedDocument, LoaderLimits, PageSpan, read_bytes
from ingest.loaders.containers import check_zip, library_errors
from ingest.loaders.html import html_text
from ingest.loaders.structured import collapse, heading_sections

FORMAT = "epub"
CHAPTER_SEPARATOR = "\n\n"


class EpubLoader:
    """Loads an e-book chapter by chapter; title = the ``dc:title`` metadata, else the stem."""

    extensions: tuple[str, ...] = (".epub",)

    def __init__(self, *, limits: LoaderLimits | None = None) -> None:
        self.limits = limits or LoaderLimits()

    def load(self, path: Path) -> LoadedDocument:
        """Return the text of every chapter of ``path``.

        Raises:
            FileTooLargeError, LoaderError: the file cannot be read within the limit.
            EncryptedFileError: DRM-protected content.
            CorruptFileError: not an EPUB, or damaged.
            LimitExceededError: a zip bomb.
            EmptyFileError: no chapter has text.
        """
        data = read_bytes(path, self.limits.max_bytes)
        archive = check_zip(data, self.limits, kind="EPUB book")
        parts: list[str] = []
        spans: list[PageSpan] = []
        offset = 0
        with library_errors("EPUB book"):
            if "META-INF/encryption.xml" in archive.namelist():
                encryption = archive.read("META-INF/encryption.xml")
                if b"xmlenc#aes" in encryption or b"xmlenc#tripledes" in encryption:
                    raise EncryptedFileError("DRM-protected EPUB: its content is encrypted")
            import ebooklib
            from ebooklib import epub

            book = epub.read_epub(io.BytesIO(data), options={"ignore_ncx": True})
            for idref, _linear in book.spine:
                item = book.get_item_with_id(idref)
                if item is None or item.get_type() != ebooklib.ITEM_DOCUMENT:
                    continue
                text = html_text(item.get_content(), heading_marks=True)
                if not text.strip():
                    continue
                if parts:
                    parts.append(CHAPTER_SEPARATOR)
                    offset += len(CHAPTER_SEPARATOR)
                parts.append(text)
                spans.append(PageSpan(start=offset, end=offset + len(text), page=None))
                offset += len(text)
            titles = book.get_metadata("DC", "title")
            title = collapse(str(titles[0][0])) if titles else ""
        if not spans:
            raise EmptyFileError("no chapter has text")
        text = "".join(parts)
        sections = heading_sections(text, starts=[span.start for span in spans])
        return LoadedDocument(text=text, format=FORMAT, pages=sections, title=title or path.stem, markdown=True)
