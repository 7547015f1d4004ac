"""Where sentences end: the one sentence rule of the generation package.

FLARE cuts its look-aheads with :func:`sentence_end`; the grounding guard holds the answer's tokens
until a sentence ends and segments source chunks with :func:`split_sentences` (``soft_newlines``: a
line break inside a paragraph of wrapped text is not a sentence end); citation snippets are whole
sentences. Never an end: a ``.`` inside a number or a name (``1.8 litres``, ``os.path``),
abbreviations (``e.g.``, ``Dr.``), single capital initials, list enumerators at the start of a line
(``1.``). Citation markers right after the punctuation belong to the sentence (their grammar is
:mod:`generation.markers`'s). A line without closing punctuation (a heading) is a segment of its
own, marked ``kind="fragment"`` so that it is never quoted as an answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from generation.markers import marker_after, may_become_marker, strip_citations

__all__ = ["ITEM_LINE_RE", "Segment", "sentence_end", "split_sentences"]

_CLOSERS = "\"')»”’"
_ABBREVIATIONS = frozenset(
    {
        *("e.g", "i.e", "etc", "vs", "cf", "al", "mr", "mrs", "ms", "dr", "prof", "st", "no", "nos"),
        *("fig", "figs", "approx", "ca", "incl", "resp", "sec", "ch", "vol", "p", "pp"),
    }
)
_ENUMERATOR_RE = re.compile(r"(?:\d{1,3}|[a-zA-Z]|[ivxIVX]{1,4})")
# A line that starts a list item: "1. ", "2) ", "- ", "* ", "• ".
ITEM_LINE_RE = re.compile(r"[ \t]*(?:\d{1,3}[.)]|[-*•])[ \t]+")
_HEADING_MAX_WORDS = 10


def _is_abbreviation(text: str, start: int, dot: int) -> bool:
    """Whether the ``.`` at ``dot`` ends an abbreviation, an initial or a list enumerator."""
    word_start = dot
    while word_start > start and not text[word_start - 1].isspace():
        word_start -= 1
    word = text[word_start:dot].lstrip("(\"'")
    if word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isalpha() and word.isupper()):
        return True
    # "1. Install ..." / "a. ..." at the start of a sentence or line: an enumerator, not a sentence.
    line_start = max(text.rfind("\n", 0, dot) + 1, start)
    return not text[line_start:word_start].strip() and bool(_ENUMERATOR_RE.fullmatch(word))


def _soft_break_ends(text: str, start: int, i: int) -> bool:
    """With soft newlines: whether the line break at ``i`` still ends the segment.

    It does before a blank line, before a list item, at the end of the text, and after a short line
    without closing punctuation that is the whole segment so far (a heading) when the next line does
    not go on in lower case. Otherwise it is a wrapped line and reads as a space.
    """
    rest = text[i + 1 :]
    if not rest.strip() or rest.lstrip(" \t").startswith("\n") or ITEM_LINE_RE.match(rest):
        return True
    if rest.lstrip(" \t")[:1].islower():
        return False
    line = text[start:i].strip()
    return "\n" not in line and len(line.split()) <= _HEADING_MAX_WORDS and not line.endswith((".", ",", ";"))


def sentence_end(text: str, *, final: bool, soft_newlines: bool = False) -> int | None:
    """Where the first sentence of ``text`` ends (an index into ``text``), or ``None`` if not yet known.

    A sentence ends at a newline, or after ``.``/``!``/``?`` (repeats and closing quotes included)
    followed by whitespace; citation markers right after the punctuation (``… France. [1]``)
    belong to the sentence. Not ends: a ``.`` inside a number or name (``3.5``, ``os.path``),
    abbreviations (``e.g.``, ``etc.``), single capital initials, list enumerators at the start of
    a line (``1.``). Leading whitespace never makes a sentence.

    Args:
        text: Generated text so far.
        final: The text is complete (the model stopped): its end is a sentence end, and a
            punctuation mark at the very end needs no following whitespace.
        soft_newlines: A single line break inside wrapped prose is not an end (source chunks from
            PDFs and hard-wrapped text files); see :func:`_soft_break_ends`.

    Returns:
        The index just past the sentence (trailing whitespace excluded); ``None`` when ``text``
        holds no complete sentence yet (or only whitespace when ``final``). When ``final`` and no
        boundary was found, the end of the non-whitespace text.
    """
    start = len(text) - len(text.lstrip())
    i = start
    while i < len(text):
        c = text[i]
        if c == "\n":
            if not soft_newlines or _soft_break_ends(text, start, i):
                return len(text[:i].rstrip())
            i += 1
            continue
        if c in ".!?":
            end = i + 1
            while end < len(text) and (text[end] in ".!?" or text[end] in _CLOSERS):
                end += 1
            while (marker_end := marker_after(text, end)) is not None:
                end = marker_end
            rest = text[end:]
            if not final and "\n" not in rest and may_become_marker(rest):
                # "3." may become "3.5", "France. " may be followed by "[1]": wait for more text.
                return None
            if end == len(text):
                return end
            if text[end].isspace() and not (c == "." and _is_abbreviation(text, start, i)):
                return end
            i = end if end > i + 1 else i + 1
            continue
        i += 1
    if final and text.strip():
        return len(text.rstrip())
    return None


@dataclass(frozen=True, slots=True)
class Segment:
    """A sentence of a text: ``text[start:end]``; ``fragment`` when it lacks closing punctuation."""

    start: int
    end: int
    text: str
    kind: Literal["sentence", "fragment"]


def _kind(piece: str) -> Literal["sentence", "fragment"]:
    body = strip_citations(piece).rstrip().rstrip(_CLOSERS)
    return "sentence" if body.endswith((".", "!", "?", ":")) else "fragment"


def split_sentences(text: str, *, soft_newlines: bool = False) -> list[Segment]:
    """Every sentence of a complete ``text``, in order, by :func:`sentence_end`.

    Args:
        text: An answer (``soft_newlines=False``: every line break ends a sentence) or a source
            chunk (``soft_newlines=True``).

    Returns:
        Segments with offsets into ``text`` (surrounding whitespace excluded).
    """
    segments: list[Segment] = []
    pos = 0
    while pos < len(text):
        rest = text[pos:]
        end = sentence_end(rest, final=True, soft_newlines=soft_newlines)
        lead = len(rest) - len(rest.lstrip())
        if end is None or end <= lead:
            break
        piece = rest[lead:end]
        segments.append(Segment(pos + lead, pos + end, piece, _kind(piece)))
        pos += end
    return segments
