"""Where a sentence ends: the one sentence-boundary rule of the generation package.

Used by FLARE to cut a look-ahead after its first sentence and by anything else that judges an
answer sentence by sentence. Numbers (``3.5``, ``1.8 litres``), names (``os.path``),
abbreviations (``e.g.``), single capital initials and list enumerators at the start of a line
(``1.``) do not end a sentence; citation markers right after the punctuation belong to it.
"""

from __future__ import annotations

import re

from generation.markers import marker_after, may_become_marker

__all__ = ["sentence_end"]

_CLOSERS = "\"')»”’"
_ABBREVIATIONS = frozenset(
    {
        *("e.g", "i.e", "etc", "vs", "cf", "al", "mr", "mrs", "ms", "dr", "prof", "st", "no", "nos"),
        *("fig", "figs", "approx", "ca", "incl", "resp", "sec", "ch", "vol", "p", "pp"),
    }
)
_ENUMERATOR_RE = re.compile(r"(?:\d{1,3}|[a-zA-Z]|[ivxIVX]{1,4})")


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


def sentence_end(text: str, *, final: bool) -> int | None:
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
            return len(text[:i].rstrip())
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
