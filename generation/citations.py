"""Finding ``[n]`` citation markers in a streamed answer.

:class:`CitationTracker` is fed the answer as it streams (token by token, so a marker may
arrive as ``[``, ``1``, ``]``) and returns the text to show plus a :class:`CitationEvent`
the first time each source is cited.

The marker grammar is :mod:`generation.markers`'s. Numbers that name no source are removed
from the text (a marker left with none disappears, with the space before it); a marker whose
numbers are all valid is passed through verbatim.

Only a possibly-incomplete marker at the end of the buffer is held back (at most
:data:`MAX_MARKER_CHARS` characters), plus trailing whitespace, which is released with the next
text unless it turns out to precede a removed marker.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from generation.markers import MAX_MARKER_CHARS, parse_marker
from generation.types import CitationEvent
from retrieval.types import Chunk

__all__ = [
    "MAX_MARKER_CHARS",
    "CitationTracker",
    "best_snippet",
    "infer_citations",
    "make_citation",
]

_CLOSING_PUNCTUATION = ".,;:!?)"

_WORD_RE = re.compile(r"[^\W_]+", re.UNICODE)
_SENTENCE_RE = re.compile(r"[^.!?\n]+(?:[.!?]+|$)", re.MULTILINE)
# Words too common to say which sentence of a source supports a claim.
_STOPWORD_TEXT = (
    "a an and are as at be by can do does for from has have how i if in is it its not of on or so "
    "that the their then there these this to use used using was what when which who why will with "
    "you your"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def _content_words(text: str) -> set[str]:
    return {w for w in (m.group(0).lower() for m in _WORD_RE.finditer(text)) if w not in _STOPWORDS}


def best_snippet(chunk: Chunk, claim: str, max_chars: int = 240) -> tuple[str, int, int]:
    """The sentence of ``chunk`` that best supports ``claim``, with its document offsets.

    Sentences are scored by shared content words with ``claim``; with no overlap the chunk's
    opening is used. Long sentences are cut at a word boundary to ``max_chars``.

    Returns:
        ``(snippet, start, end)`` where ``start``/``end`` are offsets in the document's extracted
        text (``chunk.start`` based), so ``extracted[start:end] == snippet``.
    """
    text = chunk.text
    claim_words = _content_words(claim)
    best: tuple[int, int] | None = None
    best_score = 0
    if claim_words:
        for match in _SENTENCE_RE.finditer(text):
            score = len(claim_words & _content_words(match.group(0)))
            if score > best_score:
                best_score, best = score, (match.start(), match.end())
    lo, hi = best if best is not None else (0, len(text))
    # Strip surrounding whitespace, then cap the length at a word boundary.
    while lo < hi and text[lo].isspace():
        lo += 1
    while hi > lo and text[hi - 1].isspace():
        hi -= 1
    if hi - lo > max_chars:
        cut = text.rfind(" ", lo, lo + max_chars)
        hi = cut if cut > lo else lo + max_chars
        while hi > lo and text[hi - 1].isspace():
            hi -= 1
    return text[lo:hi], chunk.start + lo, chunk.start + hi


def make_citation(
    n: int, chunk: Chunk, claim: str = "", *, snippet_chars: int = 240, inferred: bool = False
) -> CitationEvent:
    """A :class:`CitationEvent` for source ``n``, its snippet chosen against ``claim``."""
    snippet, start, end = best_snippet(chunk, claim, snippet_chars)
    return CitationEvent(
        n=n,
        chunk_id=chunk.id,
        document_id=chunk.document_id,
        path=chunk.path,
        title=chunk.title,
        page=chunk.page,
        start=start,
        end=end,
        snippet=snippet,
        chunk=chunk,
        inferred=inferred,
    )


def infer_citations(
    answer: str,
    sources: Mapping[int, Chunk],
    *,
    min_shared: int = 3,
    min_ratio: float = 0.3,
    snippet_chars: int = 240,
) -> list[CitationEvent]:
    """Attribute an answer that has no citation markers to its sources, after the fact.

    Small models often ignore the instruction to cite. For each sentence of ``answer`` the
    source sharing the most content words is credited when it shares at least ``min_shared``
    words and at least ``min_ratio`` of the sentence's content words. Events are marked
    ``inferred=True``, in order of first use; the answer text is not changed.
    """
    events: dict[int, CitationEvent] = {}
    source_words = {n: _content_words(chunk.text) for n, chunk in sources.items()}
    for match in _SENTENCE_RE.finditer(answer):
        sentence = match.group(0).strip()
        words = _content_words(sentence)
        if not words:
            continue
        best_n, best_shared = 0, 0
        for n, vocabulary in source_words.items():
            shared = len(words & vocabulary)
            if shared > best_shared:
                best_n, best_shared = n, shared
        if best_shared >= min_shared and best_shared >= min_ratio * len(words) and best_n not in events:
            events[best_n] = make_citation(
                best_n, sources[best_n], sentence, snippet_chars=snippet_chars, inferred=True
            )
    return list(events.values())


def _claim(text: str) -> str:
    """The sentence a marker at the end of ``text`` refers to (or the two last, if the last is tiny)."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text.rstrip()) if s.strip()]
    if not sentences:
        return ""
    claim = sentences[-1]
    if len(claim.split()) < 3 and len(sentences) > 1:
        claim = sentences[-2] + " " + claim
    return claim


class CitationTracker:
    """Incremental citation parser for one answer.

    Args:
        sources: The citable sources: a sequence numbered from 1, or a mapping number → chunk.
        snippet_chars: Maximum snippet length in citation events.

    Use :meth:`feed` for each text delta and :meth:`finish` once at the end; the concatenation
    of every returned text is :attr:`text`.
    """

    def __init__(self, sources: Sequence[Chunk] | Mapping[int, Chunk] = (), *, snippet_chars: int = 240):
        self._sources: dict[int, Chunk] = (
            dict(sources) if isinstance(sources, Mapping) else dict(enumerate(sources, start=1))
        )
        self._snippet_chars = snippet_chars
        self._buffer = ""  # unscanned text: empty, or a possibly-incomplete marker
        self._pending_space = ""  # whitespace held back in case a removed marker follows it
        self._after_removed = False  # the last thing scanned was a marker we removed
        self._emitted: list[str] = []
        self._started = False  # some non-whitespace text was emitted
        self._citations: dict[int, CitationEvent] = {}

    def add_source(self, n: int, chunk: Chunk) -> None:
        """Make ``[n]`` citable (new sources of a later retrieval round); numbers are never reused."""
        existing = self._sources.get(n)
        if existing is not None and existing.id != chunk.id:
            raise ValueError(f"citation number {n} already names chunk {existing.id}")
        self._sources[n] = chunk

    @property
    def sources(self) -> Mapping[int, Chunk]:
        """The citable sources, by number."""
        return dict(self._sources)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._emitted)

    @property
    def citations(self) -> list[CitationEvent]:
        """Citation events in order of first use."""
        return list(self._citations.values())

    def feed(self, delta: str) -> tuple[str, list[CitationEvent]]:
        """Scan a new piece of answer text.

        Returns:
            The text that can be shown now and the citation events of sources cited for the
            first time in it (in order of appearance).
        """
        self._buffer += delta
        return self._scan(final=False)

    def finish(self) -> tuple[str, list[CitationEvent]]:
        """Flush the held-back text at the end of the answer; an unfinished marker is plain text.

        Trailing whitespace of the answer is dropped.
        """
        text, events = self._scan(final=True)
        self._pending_space = ""
        return text, events

    def _scan(self, *, final: bool) -> tuple[str, list[CitationEvent]]:
        out: list[str] = []
        events: list[CitationEvent] = []
        buffer = self._buffer
        pos = 0
        while pos < len(buffer):
            bracket = buffer.find("[", pos)
            if bracket < 0:
                self._text(buffer[pos:], out)
                pos = len(buffer)
                break
            self._text(buffer[pos:bracket], out)
            status, end, numbers = parse_marker(buffer, bracket)
            if status == "partial" and not final:
                pos = bracket
                break
            if status == "match":
                self._marker(buffer[bracket:end], numbers, out, events)
                pos = end
            else:
                self._text("[", out)
                pos = bracket + 1
        self._buffer = buffer[pos:]
        emitted = "".join(out)
        self._emitted.append(emitted)
        return emitted, events

    def _text(self, piece: str, out: list[str]) -> None:
        if not piece:
            return
        if self._after_removed:
            self._after_removed = False
            # "word [9]." -> "word." and "word [9] more" -> "word more": the space before a removed
            # marker goes when punctuation or another space follows it.
            if piece[0].isspace() or piece[0] in _CLOSING_PUNCTUATION:
                self._pending_space = ""
        piece = self._pending_space + piece
        body = piece.rstrip()
        self._pending_space = piece[len(body) :]
        if body:
            if not self._started:
                body = body.lstrip()  # the answer never starts with whitespace
            self._started = True
            out.append(body)

    def _marker(self, raw: str, numbers: tuple[int, ...], out: list[str], events: list[CitationEvent]) -> None:
        unique = list(dict.fromkeys(numbers))
        valid = [n for n in unique if n in self._sources]
        if not valid:
            self._after_removed = True
            return
        self._after_removed = False
        marker = raw if len(valid) == len(numbers) else "[" + ", ".join(str(n) for n in valid) + "]"
        claim = _claim("".join(self._emitted) + "".join(out))
        out.append(self._pending_space + marker)
        self._pending_space = ""
        self._started = True
        for n in valid:
            if n not in self._citations:
                event = make_citation(n, self._sources[n], claim, snippet_chars=self._snippet_chars)
                self._citations[n] = event
                events.append(event)
