"""What a chunk is embedded as: its document's title and heading path, then its text.

A chunk cut from the middle of a document has lost what the document is about: its title
and the headings above it. Prefixing them to the text that is *embedded* gives every chunk
that context back (``bench/chunk_recipes.py`` on faq-dev-small: dense leg nDCG@10 0.676 ->
0.686, and 0.711 once the splitter also stops cutting a heading off alone), while the stored
chunk text, its offsets and the citations built from it stay exactly the document's text. The
BM25 leg indexes the chunk text alone: the context in BM25 moved it by +0.002 and the hybrid
by +0.002 at its best alpha, -0.005 at the default, so it is not worth a second text per chunk.

Pure functions, no I/O; used by the splitter (which budgets the context into the model's
window) and by the ingestion pipeline (which embeds :func:`embedded_text`).
"""

from __future__ import annotations

__all__ = ["CONTEXT_SEPARATOR", "CONTEXT_VERSION", "chunk_context", "embedded_text"]

CONTEXT_VERSION = 1
"""Bump when :func:`chunk_context` or :func:`embedded_text` change what is embedded (it is part of
:class:`retrieval.recipe.IndexRecipe`, so every collection is then reported as needing a reindex)."""

CONTEXT_SEPARATOR = " > "
"""Joins the title and the levels of the heading path ("Guide > Install > Linux")."""


def chunk_context(title: str | None, heading: str | None) -> str | None:
    """The context line of a chunk: ``"title > heading path"``, or whichever of them exists.

    A heading path that already starts with the title (a markdown document whose first
    heading is its title) is not prefixed with it again. Whitespace inside each part is
    collapsed, so the line is one line.

    Returns:
        ``None`` when there is neither a title nor a heading.
    """
    title = " ".join((title or "").split())
    heading = " ".join((heading or "").split())
    if not heading:
        return title or None
    if not title or heading == title or heading.startswith(title + CONTEXT_SEPARATOR):
        return heading
    return f"{title}{CONTEXT_SEPARATOR}{heading}"


def embedded_text(text: str, context: str | None) -> str:
    """The text an embedding model reads for a chunk: the context line, a newline, the text."""
    return f"{context}\n{text}" if context else text
