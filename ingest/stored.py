"""A document's extracted text as the database keeps it, for re-chunking without the file.

The pipeline stores each indexed document's text (``documents.text``) and what the splitter needs
besides it (``documents.layout``: :func:`layout_of`); :func:`stored_document` turns them back into
the :class:`~ingest.loaders.base.LoadedDocument` the splitter cut, so a reindex with the same
recipe makes the same pieces, and the offsets of new pieces index the same text as the old ones.

Documents ingested before the text was kept have only their chunks: :func:`rebuilt_document`
joins the chunk texts at their offsets. The chunks cover every non-whitespace character, so the
rebuilt text equals the original except for whitespace between pieces that did not overlap, which
becomes newlines (the most common separator there); section spans come from the chunks' page
numbers, spreadsheet row spans are lost (those documents are then cut like text).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ingest.loaders.base import LoadedDocument, PageSpan, RowSpan

__all__ = ["StoredChunk", "layout_of", "rebuilt_document", "stored_document"]

_PAGE_UNITS = {"pptx": "slide"}

StoredChunk = tuple[str, int, int, int | None]
"""``(text, start, end, page)`` of a stored chunk row."""


def layout_of(document: LoadedDocument) -> dict[str, Any]:
    """The JSON-ready structure of ``document`` that :func:`stored_document` needs with its text."""
    return {
        "markdown": document.markdown,
        "page_unit": document.page_unit,
        "pages": [[p.start, p.end, p.page, p.label] for p in document.pages],
        "rows": [[r.start, r.end, r.row] for r in document.rows],
    }


def stored_document(text: str, layout: Mapping[str, Any] | None, *, format: str, title: str | None) -> LoadedDocument:
    """The loaded document a stored ``text`` and ``layout`` came from (as far as splitting goes).

    Raises:
        ValueError: A malformed layout.
    """
    layout = layout or {}
    try:
        pages = tuple(
            PageSpan(int(a), int(b), None if p is None else int(p), lbl) for a, b, p, lbl in layout.get("pages", ())
        )
        rows = tuple(RowSpan(int(a), int(b), int(r)) for a, b, r in layout.get("rows", ()))
    except (TypeError, ValueError) as e:
        raise ValueError(f"malformed document layout: {e}") from e
    return LoadedDocument(
        text=text,
        format=format,
        title=title,
        pages=pages,
        rows=rows,
        markdown=bool(layout.get("markdown", False)),
        page_unit=str(layout.get("page_unit", _PAGE_UNITS.get(format, "page"))),
    )


def rebuilt_document(chunks: Sequence[StoredChunk], *, format: str, title: str | None) -> LoadedDocument:
    """A document's text rebuilt from its chunk rows (see the module docstring for what is lost)."""
    length = max((end for _, _, end, _ in chunks), default=0)
    buffer = ["\n"] * length
    for text, start, end, _page in chunks:
        buffer[start:end] = text
    text = "".join(buffer)
    pages: list[PageSpan] = []
    for _, start, _, page in sorted(chunks, key=lambda c: c[1]):
        if page is not None and (not pages or pages[-1].page != page):
            if pages:
                pages[-1] = PageSpan(pages[-1].start, start, pages[-1].page)
            pages.append(PageSpan(start if pages else 0, length, page))
    return LoadedDocument(
        text=text,
        format=format,
        title=title,
        pages=tuple(pages),
        page_unit=_PAGE_UNITS.get(format, "page"),
    )
