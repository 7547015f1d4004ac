"""Markdown text for formats that carry their structure (.docx, .odt, .epub, .pptx tables).

Headings become ATX headings (``## Title``), so the splitter cuts along sections and gives
each chunk its heading path, exactly as for a markdown file. Paragraphs are separated by a
blank line, table rows are lines of cells joined by `` | ``. A paragraph that would read as
markdown structure (it starts with ``#``, a fence or is a ``---`` rule) gets a backslash in
front, so it stays a paragraph.

:func:`heading_sections` makes every heading (or run of consecutive headings) start a section
(:class:`~ingest.loaders.base.PageSpan` without number or name): the splitter never puts two
sections in one chunk, so a chunk's heading path is exactly where its text is, however short
the sections.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ingest.loaders.base import PageSpan
from ingest.loaders.markdown import iter_headings

MAX_HEADING_LEVEL = 6
_STRUCTURE = re.compile(r"^ {0,3}(#|```|~~~)")


def collapse(text: str) -> str:
    """Runs of whitespace (newlines included) as one space, trimmed."""
    return " ".join(text.split())


class MarkdownText:
    """Accumulates headings, paragraphs and tables into markdown text."""

    def __init__(self) -> None:
        self._blocks: list[str] = []

    def heading(self, level: int, text: str) -> None:
        """Add a heading of ``level`` (1-based, capped at 6); an empty heading is dropped."""
        text = collapse(text)
        if text:
            self._blocks.append("#" * max(1, min(level, MAX_HEADING_LEVEL)) + " " + text)

    def paragraph(self, text: str) -> None:
        """Add a paragraph; its line breaks are kept, blank lines inside it dropped."""
        lines = [" ".join(line.split()) for line in text.split("\n")]
        body = "\n".join(line for line in lines if line)
        if body:
            self._blocks.append("\\" + body if _STRUCTURE.match(body) else body)

    def table(self, rows: Iterable[Iterable[str]]) -> None:
        """Add a table: one line per non-empty row, cells joined by `` | `` (a cell repeated by a
        horizontal merge is written once)."""
        lines: list[str] = []
        for row in rows:
            cells: list[str] = []
            for cell in row:
                cell = collapse(cell)
                if cell and (not cells or cells[-1] != cell):
                    cells.append(cell)
            if cells:
                lines.append(" | ".join(cells))
        if lines:
            self.paragraph("\n".join(lines))

    @property
    def text(self) -> str:
        """The markdown so far."""
        return "\n\n".join(self._blocks)


def heading_sections(text: str, starts: Iterable[int] = ()) -> tuple[PageSpan, ...]:
    """Sections of markdown ``text`` that start at each heading run and at each of ``starts``.

    A run is headings separated by blank lines only ("# Guide" then "## Install"): it starts one
    section, so a heading is never a section of its own. Spans cover ``text`` without the
    whitespace between sections; empty sections are dropped.
    """
    bounds = {0, *(s for s in starts if 0 < s < len(text))}
    previous_end = -1
    for heading in iter_headings(text):
        line_end = text.find("\n", heading.offset)
        line_end = len(text) if line_end < 0 else line_end
        if previous_end < 0 or text[previous_end : heading.offset].strip():
            bounds.add(heading.offset)
        previous_end = line_end
    ordered = sorted(bounds)
    spans: list[PageSpan] = []
    for start, end in zip(ordered, [*ordered[1:], len(text)], strict=True):
        body = text[start:end]
        stripped = body.strip()
        if not stripped:
            continue
        first = start + body.index(stripped[0])
        spans.append(PageSpan(start=first, end=first + len(stripped), page=None))
    return tuple(spans)
