"""PowerPoint loader (``.pptx``) built on python-pptx: a slide is a page.

Each slide's text, in reading order (shapes sorted top to bottom, then left to right; groups
opened), becomes one section numbered like the slide, named by the slide's title: a chunk's
location is ``slide 3, Quarterly results``. Tables are rows of `` | ``-joined cells; speaker
notes follow the slide's text after ``Notes:``. Not read: charts, SmartArt, images.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ingest.loaders.base import EmptyFileError, LoadedDocument, LoaderLimits, PageSpan, read_bytes
from ingest.loaders.containers import check_zip, library_errors
from ingest.loaders.structured import MarkdownText, collapse

FORMAT = "pptx"
SLIDE_SEPARATOR = "\n\n"


def _shapes_in_reading_order(shapes: Any) -> Iterator[Any]:
    """Shapes, groups opened, top to bottom then left to right (placeholders without a position last)."""

    def key(shape: Any) -> tuple[int, int]:
        top, left = getattr(shape, "top", None), getattr(shape, "left", None)
        return (top if top is not None else 1 << 40, left if left is not None else 1 << 40)

    for shape in sorted(shapes, key=key):
        inner = getattr(shape, "shapes", None)  # a group shape
        if inner is not None:
            yield from _shapes_in_reading_order(inner)
        else:
            yield shape


def slide_text(slide: Any) -> tuple[str, str | None]:
    """The text of one slide (title first) and its title, if it has one."""
    out = MarkdownText()
    title_shape = slide.shapes.title
    title = collapse(title_shape.text_frame.text) if title_shape is not None and title_shape.has_text_frame else ""
    if title:
        out.paragraph(title)
    for shape in _shapes_in_reading_order(slide.shapes):
        if title_shape is not None and shape.shape_id == title_shape.shape_id:
            continue
        if getattr(shape, "has_table", False) and shape.has_table:
            out.table([cell.text for cell in row.cells] for row in shape.table.rows)
        elif getattr(shape, "has_text_frame", False) and shape.has_text_frame:
            out.paragraph("\n".join(p.text for p in shape.text_frame.paragraphs))
    if slide.has_notes_slide:
        notes = slide.notes_slide.notes_text_frame
        if notes is not None and notes.text.strip():
            out.paragraph("Notes: " + notes.text)
    return out.text, title or None


class PptxLoader:
    """Loads a presentation slide by slide; ``page_count`` is the number of slides."""

    extensions: tuple[str, ...] = (".pptx", ".pptm")

    def __init__(self, *, limits: LoaderLimits | None = None) -> None:
        self.limits = limits or LoaderLimits()

    def load(self, path: Path) -> LoadedDocument:
        """Return the text of every slide of ``path``, one section per slide.

        Raises:
            FileTooLargeError, LoaderError: the file cannot be read within the limit.
            EncryptedFileError: the presentation is password-protected.
            CorruptFileError: not a presentation, or damaged.
            LimitExceededError: a zip bomb.
            EmptyFileError: no slide has text.
        """
        data = read_bytes(path, self.limits.max_bytes)
        check_zip(data, self.limits, kind="PowerPoint presentation")
        import pptx  # imported lazily: only needed once a presentation shows up

        parts: list[str] = []
        spans: list[PageSpan] = []
        offset = 0
        with library_errors("PowerPoint presentation"):
            presentation = pptx.Presentation(io.BytesIO(data))
            slides = list(presentation.slides)
            for number, slide in enumerate(slides, start=1):
                text, title = slide_text(slide)
                if not text:
                    continue
                if parts:
                    parts.append(SLIDE_SEPARATOR)
                    offset += len(SLIDE_SEPARATOR)
                parts.append(text)
                spans.append(PageSpan(start=offset, end=offset + len(text), page=number, label=title))
                offset += len(text)
            title = collapse(presentation.core_properties.title or "")
        if not spans:
            raise EmptyFileError("no slide has text")
        return LoadedDocument(
            text="".join(parts),
            format=FORMAT,
            pages=tuple(spans),
            title=title or path.stem,
            page_count=len(slides),
            page_unit="slide",
        )
