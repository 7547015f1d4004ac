"""Markdown loader (``.md``, ``.markdown``).

The markdown source is kept verbatim (after decoding and newline normalisation,
as for plain text): the splitter needs the headings to cut along sections and to
label pieces with their heading path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ingest.loaders.base import DEFAULT_MAX_BYTES, LoadedDocument
from ingest.loaders.text import read_text_file

FORMAT = "markdown"

# An ATX heading ("## Title", optional closing hashes) or a code fence opener/closer.
_HEADING_OR_FENCE = re.compile(
    r"^ {0,3}(?:(?P<fence>```|~~~)|(?P<hashes>#{1,6})(?:[ \t]+(?P<title>[^\n]*?))?(?:[ \t]+#+)?[ \t]*$)",
    re.MULTILINE,
)


@dataclass(frozen=True, slots=True)
class Heading:
    """An ATX heading of a markdown text: where its line starts, its level (1-6) and its text."""

    offset: int
    level: int
    title: str


def iter_headings(text: str) -> Iterator[Heading]:
    """Yield the ATX headings of ``text`` in order, skipping those inside fenced code blocks.

    Setext headings (underlined with ``===``/``---``) are not recognised; empty
    headings (a bare ``##``) are skipped.
    """
    in_fence: str | None = None
    for m in _HEADING_OR_FENCE.finditer(text):
        fence = m.group("fence")
        if fence is not None:
            if in_fence is None:
                in_fence = fence
            elif fence == in_fence:
                in_fence = None
            continue
        if in_fence is not None:
            continue
        title = (m.group("title") or "").strip()
        if title:
            yield Heading(offset=m.start(), level=len(m.group("hashes")), title=title)


def first_h1(text: str) -> str | None:
    """Return the text of the first ``# `` heading outside fenced code blocks, if any."""
    return next((h.title for h in iter_headings(text) if h.level == 1), None)


class MarkdownLoader:
    """Loads markdown source verbatim; title = the first ``# `` heading, else the file stem."""

    extensions: tuple[str, ...] = (".md", ".markdown")

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes

    def load(self, path: Path) -> LoadedDocument:
        """Return the markdown source of ``path``; raise a ``LoaderError`` subclass on failure."""
        text, encoding = read_text_file(path, self.max_bytes)
        return LoadedDocument(
            text=text,
            format=FORMAT,
            title=first_h1(text) or path.stem,
            metadata={"encoding": encoding},
        )
