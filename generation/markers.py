"""The ``[n]`` citation-marker grammar: the one place that says what a marker is.

Grammar (spaces allowed around numbers and separators, no newlines)::

    marker := "[" number ( ("," | ";") number | ("-" | "–") number )* "]"
    number := 1 to 3 ASCII digits

so ``[1]``, ``[1, 2]``, ``[1;3]``, ``[2-4]`` and adjacent ``[1][2]`` are markers; ``[2020]``,
``[a]``, ``[1.5]``, ``[]`` and markdown links are plain text. A range spans fewer than
:data:`MAX_RANGE` numbers and a marker is at most :data:`MAX_MARKER_CHARS` characters long.

Everything that looks for markers — the streaming :class:`~generation.citations.CitationTracker`,
prompt cleaning, the repetition guard, FLARE's sentence splitter and confidence judge — goes
through :func:`parse_marker` (directly or via the helpers below), so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

__all__ = [
    "MAX_MARKER_CHARS",
    "MarkerScan",
    "drop_open_marker",
    "iter_markers",
    "marker_after",
    "may_become_marker",
    "parse_marker",
    "strip_citations",
]

MAX_MARKER_CHARS = 32
"""Longest marker, ``[`` and ``]`` included; a streaming reader holds back at most this much."""
MAX_RANGE = 20
_MAX_DIGITS = 3
_DIGITS = "0123456789"
_SEPARATORS = ",;"
_RANGE_DASHES = "-–"
_INLINE_SPACE = " \t"

MarkerScan = tuple[Literal["match", "partial", "none"], int, tuple[int, ...]]


def parse_marker(text: str, start: int) -> MarkerScan:
    """Scan a citation marker at ``text[start]`` (which must be ``[``).

    Returns:
        ``("match", end, numbers)`` for a complete marker ending before ``end``;
        ``("partial", len(text), ())`` when ``text`` ends inside something that could still
        become a marker; ``("none", start + 1, ())`` otherwise.
    """
    numbers: list[int] = []
    range_from: int | None = None
    digits = ""
    expect_number = True
    i = start + 1
    while i < len(text):
        if i - start >= MAX_MARKER_CHARS:
            return "none", start + 1, ()
        c = text[i]
        if c in _DIGITS:
            if not expect_number and not digits:
                return "none", start + 1, ()  # "[1 2]": two numbers without a separator
            digits += c
            if len(digits) > _MAX_DIGITS:
                return "none", start + 1, ()
            expect_number = False
            i += 1
            continue
        if digits:
            value = int(digits)
            digits = ""
            if range_from is not None:
                if not range_from <= value < range_from + MAX_RANGE:
                    return "none", start + 1, ()
                numbers.extend(range(range_from, value + 1))
                range_from = None
            else:
                numbers.append(value)
        if c == " ":
            i += 1
            continue
        if expect_number:
            return "none", start + 1, ()  # "[]", "[,", "[1,]", "[a"
        if c in _SEPARATORS:
            expect_number = True
        elif c in _RANGE_DASHES and numbers and range_from is None:
            range_from = numbers.pop()
            expect_number = True
        elif c == "]":
            return "match", i + 1, tuple(numbers)
        else:
            return "none", start + 1, ()
        i += 1
    return "partial", len(text), ()


def iter_markers(text: str) -> Iterator[tuple[int, int, tuple[int, ...]]]:
    """Every complete marker of ``text``, left to right, as ``(start, end, numbers)``."""
    pos = text.find("[")
    while pos != -1:
        kind, end, numbers = parse_marker(text, pos)
        if kind == "match":
            yield pos, end, numbers
            pos = text.find("[", end)
        else:
            pos = text.find("[", pos + 1)


def strip_citations(text: str, *, replacement: str = "") -> str:
    """``text`` without its markers (and the spaces or tabs right before each one)."""
    out: list[str] = []
    last = 0
    for start, end, _ in iter_markers(text):
        cut = start
        while cut > last and text[cut - 1] in _INLINE_SPACE:
            cut -= 1
        out.append(text[last:cut])
        out.append(replacement)
        last = end
    out.append(text[last:])
    return "".join(out)


def marker_after(text: str, pos: int) -> int | None:
    """The end of a complete marker that follows ``text[pos:]`` after optional whitespace, else None."""
    i = pos
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] == "[":
        kind, end, _ = parse_marker(text, i)
        if kind == "match":
            return end
    return None


def may_become_marker(rest: str) -> bool:
    """Whether ``rest`` is whitespace, possibly followed by the start of a marker still being written."""
    stripped = rest.lstrip()
    return not stripped or (stripped[0] == "[" and parse_marker(stripped, 0)[0] == "partial")


def drop_open_marker(text: str) -> str:
    """``text`` without a marker still being written at its end (``"... [1"`` → ``"..."``)."""
    pos = text.rfind("[")
    if pos != -1 and parse_marker(text, pos)[0] == "partial":
        return text[:pos].rstrip()
    return text
