"""Detect an answer that has started to repeat itself (a degenerate greedy loop).

Small models decoding greedily fall into loops ("The capital of Veldoria is Marnhaven." over and
over; 13 of 40 development-set answers of the embedded 135M model repeated a sentence three times
or more). Penalties fight loops at a price in answer quality (docs/llm.md), so the answer modes
stop the generation instead once a sentence comes back: what follows a repeat is more repeats.

A *unit* is a line, or a sentence inside a line (ended by ``.``, ``!`` or ``?`` and whitespace).
Units are compared normalised: list enumerators (``2.``, ``-``, ``*``), citation markers, case
and spacing do not count. Short units (fewer than ``min_chars`` letters and digits) never count:
"Yes." twice, or a blank separator, is not a loop.
"""

from __future__ import annotations

import re

from generation.markers import strip_citations

__all__ = ["repeated_unit"]

_BOUNDARY_RE = re.compile(r"\n|(?<=[.!?])[ \t]+")
_ENUMERATOR_RE = re.compile(r"^(?:\d{1,3}[.)]|[-*•])\s+")
_NON_WORD_RE = re.compile(r"[^0-9a-z]+")


def _normalise(unit: str) -> str:
    unit = strip_citations(_ENUMERATOR_RE.sub("", unit.strip()), replacement=" ")
    return _NON_WORD_RE.sub(" ", unit.lower()).strip()


def repeated_unit(text: str, *, min_chars: int = 12, times: int = 2) -> str | None:
    """The last complete unit of ``text`` if it occurs ``times`` times or more among the complete
    units, else None.

    Only complete units are judged: the text after the last boundary may still grow. Call it as the
    answer streams; it returns the repeated unit (as first written) at the moment the repeat ends.
    """
    parts = _BOUNDARY_RE.split(text)
    complete = parts[:-1]  # the last part has no boundary after it yet
    if not complete:
        return None
    last = _normalise(complete[-1])
    if len(last.replace(" ", "")) < min_chars:
        return None
    seen = [unit for unit in complete if _normalise(unit) == last]
    return seen[0].strip() if len(seen) >= times else None
