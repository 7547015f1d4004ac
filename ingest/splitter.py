"""Token-aware splitting of a :class:`~ingest.loaders.base.LoadedDocument` into pieces.

The cutting is langchain-text-splitters' ``RecursiveCharacterTextSplitter``
(paragraphs, then lines, then sentences, then words, then characters; for
markdown, headings, fences and rules first), measuring lengths in tokens of the
embedding model's own tokenizer, so a piece of ``chunk_tokens`` tokens fits the
model's window (all-MiniLM-L6-v2: 256 including ``[CLS]``/``[SEP]``).

Contract of :meth:`Splitter.split`, for every returned piece ``p``:

* ``doc.text[p.start:p.end] == p.text`` and ``p.text`` is not whitespace only
  (nor has leading/trailing whitespace);
* ordinals are 0, 1, 2...; starts never decrease; consecutive pieces may overlap
  by up to about ``overlap_tokens`` tokens;
* pieces never straddle a page: a paged document (PDF) is cut at every page
  start first, so ``p.page`` (the page holding ``p.start``; ``None`` if the
  document has no pages) is the page of the whole piece and citations are exact.
  Short pages give short pieces; that is the price;
* ``p.heading`` is, for markdown (and the formats loaders render as markdown: .docx,
  .odt, .epub), the path of the nearest heading at or before the piece's first line that is
  not a heading (``p.start`` if it holds only headings): "Install > Linux" for a piece that
  starts "## Install", "### Linux", then text;
  else the name of the section holding it (a sheet, a slide's title, an e-mail attachment),
  else ``None``;
* rows stay whole (one rule, for spreadsheets): a document with row spans is cut between rows
  only, consecutive rows of a section packed into a piece while they fit its budget, without
  overlap (a row is never repeated); a single row longer than the budget is cut like text;
* ``p.location`` is :func:`~ingest.loaders.base.location_label` of the piece's page or slide,
  heading (or section name) and rows: ``page 4``, ``slide 2, Launch plan``, ``Prices, rows
  2-14``, ``Install > Linux``; ``None`` for plain text;
* ``p.token_count`` is the number of tokens of ``p.text`` without special tokens;
* together the pieces cover every non-whitespace character of the text;
* with ``context_tokens > 0``, ``p.context`` is the document's title and ``p.heading``
  (:func:`retrieval.chunk_context.chunk_context`), cut to ``context_tokens`` tokens, else
  ``None``; the pieces of such a document are budgeted so that the embedded text
  (:func:`retrieval.chunk_context.embedded_text`) fits ``window_tokens``: its pieces get at
  most ``window_tokens - 1 -`` (tokens of the document's longest context line) tokens, when
  that is below ``chunk_tokens``. ``p.text`` is the document's text either way;
* with ``min_piece_tokens > 0``, a piece shorter than that is merged into the next piece of
  its page, and a short last piece of a page into the previous one when the union fits the
  budget (langchain cuts ``min_piece_tokens`` short of the budget, so merged pieces fit it);
  a short piece remains only where its page is short or that union would not fit.

Speed: token counting is the hot path. langchain's own
``from_huggingface_tokenizer`` calls ``tokenizer.tokenize`` on every candidate
split (often two or three times each); here the same count comes from the Rust
``tokenizers`` backend with a per-document memo, and splits longer than
``8 × chunk_tokens`` characters, which langchain is going to cut further anyway,
are not tokenized at all.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

from ingest.loaders.base import LoadedDocument, RowSpan, location_label
from ingest.loaders.markdown import iter_headings
from retrieval.chunk_context import CONTEXT_SEPARATOR, chunk_context

HEADING_SEPARATOR = CONTEXT_SEPARATOR
"""Joins the levels of :attr:`Piece.heading` ("Install > Linux")."""

# Between lines and words: cut after a sentence end. Zero-width lookbehind keeps the
# punctuation with its sentence; the whitespace goes to the start of the next split.
_SENTENCE_END = r"(?<=[.!?])\s+"
_TEXT_SEPARATORS = ["\n\n", "\n", _SENTENCE_END, " ", ""]
_NON_SPACE = re.compile(r"\S")
# Above this many characters per token of the limit, a split is taken as over-long untokenized.
_MAX_CHARS_PER_TOKEN = 8


def _markdown_separators() -> list[str]:
    separators = RecursiveCharacterTextSplitter.get_separators_for_language(Language.MARKDOWN)
    separators = list(separators)
    # langchain's list goes from "\n" straight to " "; add sentence ends in between.
    if " " in separators:
        separators.insert(separators.index(" "), _SENTENCE_END)
    return separators


class HuggingFaceTokenizer(Protocol):
    """What the splitter needs of a Hugging Face tokenizer (``PreTrainedTokenizerBase``).

    A fast tokenizer also has ``backend_tokenizer`` (a ``tokenizers.Tokenizer``),
    which the splitter uses directly when present.
    """

    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` into tokens, without special tokens."""
        ...


@dataclass(frozen=True, slots=True)
class Piece:
    """A contiguous span of a document's text, sized for the embedding model.

    ``text == doc.text[start:end]``; ``page`` is the 1-based page or slide where known;
    ``heading`` is the heading path of its text, else its section's name (see
    :meth:`Splitter.split`); ``token_count`` excludes special tokens;
    ``context`` is what is embedded before ``text`` (title and heading path), if anything;
    ``location`` is where a citation says it is (``slide 2, Launch plan``), if anything is known.
    """

    ordinal: int
    text: str
    start: int
    end: int
    page: int | None
    token_count: int
    heading: str | None
    context: str | None = None
    location: str | None = None


class _TokenCounter:
    """Counts tokens without special tokens, through the Rust backend when there is one."""

    def __init__(self, tokenizer: HuggingFaceTokenizer) -> None:
        backend: Any = getattr(tokenizer, "backend_tokenizer", None)
        self._slow: Callable[[str], list[str]] | None = None
        self._backend: Any = None
        if backend is not None and hasattr(backend, "to_str"):
            # A private copy: the tokenizer.json of sentence-transformers models carries a
            # truncation setting (128 tokens for MiniLM) that would cap every count, and the
            # embedder may share (and reconfigure) the original.
            own = type(backend).from_str(backend.to_str())
            own.no_truncation()
            own.no_padding()
            self._backend = own
        else:
            self._slow = tokenizer.tokenize
        # True for WordPiece (BERT, MiniLM, MPNet): whitespace only separates tokens.
        self.ignores_whitespace = self.count(" \n\t ") == 0 and self.count(" \n word \t") == self.count("word")

    def count(self, text: str) -> int:
        if self._backend is not None:
            return len(self._backend.encode(text, add_special_tokens=False).ids)
        assert self._slow is not None
        return len(self._slow(text))

    def truncate(self, text: str, limit: int) -> str:
        """The longest prefix of ``text`` (cut at a token end) of at most ``limit`` tokens."""
        if self.count(text) <= limit:
            return text
        if self._backend is not None:
            offsets = self._backend.encode(text, add_special_tokens=False).offsets
            return text[: offsets[limit - 1][1]].rstrip() if limit > 0 else ""
        lo, hi = 0, len(text)  # slow tokenizers: the longest character prefix that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.count(text[:mid]) <= limit else (lo, mid - 1)
        return text[:lo].rstrip()

    def count_many(self, texts: Sequence[str]) -> list[int]:
        if self._backend is not None and texts:
            encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
            return [len(e.ids) for e in encodings]
        return [self.count(t) for t in texts]


class Splitter:
    """Splits loaded documents into overlapping, token-bounded :class:`Piece` s.

    Args:
        tokenizer: The embedding model's Hugging Face tokenizer (fast or slow).
        chunk_tokens: Target maximum tokens per piece (special tokens excluded).
            A piece can exceed it by a few tokens where tokens do not add up across
            a cut (inside a word), never by whole words.
        overlap_tokens: Up to this many tokens at the end of a piece are repeated
            at the start of the next one.
        context_tokens: Give pieces a ``context`` (title and heading path) of at most this
            many tokens; 0: no context.
        window_tokens: Tokens the embedding model reads without special tokens (254 for
            all-MiniLM-L6-v2); a document's pieces shrink below ``chunk_tokens`` where
            needed so that context and piece fit. ``None``: ``chunk_tokens + context_tokens + 1``
            (pieces never shrink).
        min_piece_tokens: Pieces shorter than this are merged into a neighbour (langchain then
            cuts this much short of the budget, so that merged pieces fit it); 0: no merging.

    Thread-safe: ``split`` keeps its state in locals.

    Raises:
        ValueError: If a size is out of range, or a maximal context leaves a piece no more
            than ``overlap_tokens`` tokens.
    """

    def __init__(
        self,
        tokenizer: HuggingFaceTokenizer,
        *,
        chunk_tokens: int = 240,
        overlap_tokens: int = 40,
        context_tokens: int = 0,
        window_tokens: int | None = None,
        min_piece_tokens: int = 0,
    ) -> None:
        if chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")
        if not 0 <= overlap_tokens < chunk_tokens:
            raise ValueError(f"overlap_tokens must be in [0, chunk_tokens), got {overlap_tokens}")
        if context_tokens < 0:
            raise ValueError(f"context_tokens must be >= 0, got {context_tokens}")
        if window_tokens is None:
            window_tokens = chunk_tokens + context_tokens + 1
        if min_piece_tokens < 0:
            raise ValueError(f"min_piece_tokens must be >= 0, got {min_piece_tokens}")
        if min(chunk_tokens, window_tokens - context_tokens - 1) - min_piece_tokens <= overlap_tokens:
            raise ValueError(
                f"window_tokens {window_tokens} leaves pieces with a {context_tokens}-token context "
                f"and {min_piece_tokens} tokens for merging no more than overlap_tokens ({overlap_tokens})"
            )
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens
        self.context_tokens = context_tokens
        self.window_tokens = window_tokens
        self.min_piece_tokens = min_piece_tokens
        self._counter = _TokenCounter(tokenizer)
        self._markdown_separators = _markdown_separators()

    def count_tokens(self, text: str) -> int:
        """Return the number of tokens of ``text``, without special tokens."""
        return self._counter.count(text)

    def split(self, doc: LoadedDocument) -> list[Piece]:
        """Cut ``doc.text`` into pieces; see the module docstring for the guarantees."""
        text = doc.text
        if not text.strip():
            return []
        markdown = doc.is_markdown
        headings = _HeadingIndex(text) if markdown else None
        labels = sorted({span.label for span in doc.pages if span.label})
        # Headings are compared and shown without code backticks; so is a markdown title.
        contexts = self._contexts(
            _plain_heading(doc.title) if markdown and doc.title else doc.title,
            [*(headings.paths if headings is not None else ()), *labels],
        )
        # The longest context line of the document decides its pieces' budget ("\n" joins them,
        # and one token of slack: a piece may exceed its budget where a cut splits a word).
        longest = max(map(self._counter.count, contexts.values()), default=0)
        budget = min(self.chunk_tokens, self.window_tokens - longest - 1) if longest else self.chunk_tokens
        # Token counts of the splits langchain measured, for this document only.
        memo: dict[str, int] = {}
        # langchain cuts short of the budget by min_piece_tokens, so that a short piece merged
        # into its neighbour still fits it.
        splitter = self._langchain_splitter(markdown=markdown, memo=memo, chunk_tokens=budget - self.min_piece_tokens)

        located: list[tuple[str, int, tuple[int, int] | None]] = []
        row_starts = [row.start for row in doc.rows]
        for base, end in _segments(doc):
            segment = text[base:end]
            if not segment.strip():
                continue
            rows = doc.rows[bisect.bisect_left(row_starts, base) : bisect.bisect_left(row_starts, end)]
            if rows:
                located += [(text[a:b], a, r) for a, b, r in self._row_pieces(text, rows, budget, splitter)]
                continue
            spans = [(base + a, base + b) for a, b in self._split_segment(segment, splitter)]
            located += [(text[a:b], a, None) for a, b in self._merge_short(text, spans, budget, memo)]

        counts = self._piece_counts([chunk for chunk, _, _ in located], memo)
        pieces = []
        for ordinal, ((chunk, start, rows_of_piece), count) in enumerate(zip(located, counts, strict=True)):
            section = doc.span_at(start)
            heading = headings.at(_body_start(text, start, start + len(chunk))) if headings is not None else None
            if heading is None and section is not None:
                heading = section.label
            page = section.page if section is not None else None
            pieces.append(
                Piece(
                    ordinal=ordinal,
                    text=chunk,
                    start=start,
                    end=start + len(chunk),
                    page=page,
                    token_count=count,
                    heading=heading,
                    context=contexts.get(heading),
                    location=location_label(unit=doc.page_unit, page=page, heading=heading, rows=rows_of_piece),
                )
            )
        return pieces

    def _split_segment(self, segment: str, splitter: RecursiveCharacterTextSplitter) -> list[tuple[int, int]]:
        """langchain's pieces of ``segment`` as ``(start, end)`` offsets into it."""
        previous_start, previous_end = -1, 0
        spans: list[tuple[int, int]] = []
        for chunk in splitter.split_text(segment):
            if not chunk.strip():
                continue
            start = self._locate(segment, chunk, previous_start, previous_end)
            spans.append((start, start + len(chunk)))
            previous_start, previous_end = start, start + len(chunk)
        return spans

    def _row_pieces(
        self, text: str, rows: Sequence[RowSpan], budget: int, splitter: RecursiveCharacterTextSplitter
    ) -> list[tuple[int, int, tuple[int, int]]]:
        """Pack consecutive whole rows into pieces of at most ``budget`` tokens: ``(start, end,
        (first row, last row))``. A row over the budget alone is cut like text (its pieces all
        carry its row number); rows are never repeated across pieces."""
        counts = self._counter.count_many([text[row.start : row.end] for row in rows])
        # The newline between two rows costs a token only where whitespace is not free.
        joint = 0 if self._counter.ignores_whitespace else 1
        out: list[tuple[int, int, tuple[int, int]]] = []
        group: list[RowSpan] = []
        total = 0
        for row, n in zip(rows, counts, strict=True):
            if group and (n > budget or total + joint + n > budget):
                out.append((group[0].start, group[-1].end, (group[0].row, group[-1].row)))
                group, total = [], 0
            if n > budget:
                segment = text[row.start : row.end]
                out += [
                    (row.start + a, row.start + b, (row.row, row.row))
                    for a, b in self._split_segment(segment, splitter)
                ]
                continue
            total += (joint if group else 0) + n
            group.append(row)
        if group:
            out.append((group[0].start, group[-1].end, (group[0].row, group[-1].row)))
        return out

    def _merge_short(
        self, text: str, spans: list[tuple[int, int]], budget: int, memo: dict[str, int]
    ) -> list[tuple[int, int]]:
        """Merge pieces under ``min_piece_tokens`` into the next piece of their segment (the last
        one into the previous, if the union fits ``budget``). langchain leaves such pieces where
        a split too long to merge follows a short one: a heading line alone before its long
        section, a sentence before a long code block. Alone, they embed as little more than a
        few keywords and rank high by chance; merged, their text stays exact and searchable."""
        if not self.min_piece_tokens or len(spans) < 2:
            return spans

        def count(start: int, end: int) -> int:
            piece = text[start:end]
            n = memo.get(piece)
            if n is None:
                n = memo[piece] = self._counter.count(piece)
            return n

        out: list[tuple[int, int]] = []
        pending: tuple[int, int] | None = None  # a short piece (or run of them) waiting for the next
        for start, end in spans:
            if pending is not None:
                start, end = pending[0], max(pending[1], end)
                pending = None
            if count(start, end) < self.min_piece_tokens:
                pending = (start, end)
            else:
                out.append((start, end))
        if pending is not None:
            if out and count(out[-1][0], pending[1]) <= budget:
                out[-1] = (out[-1][0], max(out[-1][1], pending[1]))
            else:
                out.append(pending)
        return out

    def _contexts(self, title: str | None, headings: Sequence[str]) -> dict[str | None, str]:
        """Context line by heading path or section name (``None``: before any heading), cut to
        ``context_tokens``."""
        if not self.context_tokens:
            return {}
        out: dict[str | None, str] = {}
        for heading in (None, *headings):
            line = chunk_context(title, heading)
            if line is not None and heading not in out:
                line = self._counter.truncate(line, self.context_tokens)
                if line:
                    out[heading] = line
        return out

    def _locate(self, text: str, chunk: str, previous_start: int, previous_end: int) -> int:
        """Return where ``chunk``, the piece after ``text[previous_start:previous_end]``, starts.

        langchain returns strings, not offsets, and its ``add_start_index`` guesses
        a start from a character count and ``find``s from there, which misplaces
        pieces of repetitive text. Two facts pin the start down instead: pieces
        advance (it is after ``previous_start``), and they lose nothing but
        whitespace (it is at or before the first non-space character from
        ``previous_end`` on). Inside that window the piece almost always occurs
        once; if it occurs more than once (text repeating within a piece's
        length), the first occurrence whose overlap with the previous piece is
        within ``overlap_tokens`` is taken, which is how langchain chose it.
        Whatever the choice, ``text[start:start + len(chunk)] == chunk`` holds.
        """
        nonspace = _NON_SPACE.search(text, previous_end)
        last = nonspace.start() if nonspace is not None else len(text)
        window_end = last + len(chunk)
        first = text.find(chunk, previous_start + 1, window_end)
        if first < 0:
            # Outside the guarantees above (cannot happen with langchain's splitters): any
            # occurrence at or after the previous piece, else anywhere, keeps text[start:end] exact.
            start = text.find(chunk, max(previous_start, 0))
            start = start if start >= 0 else text.find(chunk)
            if start < 0:
                raise AssertionError("the splitter produced text that is not in the document")
            return start
        candidate = first
        while candidate >= 0:
            if candidate >= previous_end or self.count_tokens(text[candidate:previous_end]) <= self.overlap_tokens:
                return candidate
            candidate = text.find(chunk, candidate + 1, window_end)
        return first

    def _piece_counts(self, pieces: list[str], memo: dict[str, int]) -> list[int]:
        """Token counts of the pieces: from the memo where a piece is one measured split, else batched."""
        counts = [memo.get(piece, -1) for piece in pieces]
        missing = [i for i, n in enumerate(counts) if n < 0]
        for i, n in zip(missing, self._counter.count_many([pieces[i] for i in missing]), strict=True):
            counts[i] = n
        return counts

    def _langchain_splitter(
        self, *, markdown: bool, memo: dict[str, int], chunk_tokens: int
    ) -> RecursiveCharacterTextSplitter:
        # A fresh splitter (cheap) per document, so the memo and the budget are the document's.
        count = self._counter.count
        # Pieces are stripped splits; where whitespace carries no tokens, a split's count is also
        # its stripped form's, and a piece made of one split needs no second tokenization.
        strip_keys = self._counter.ignores_whitespace
        # A split this long is over the limit in any realistic text (prose runs 4-5 characters a
        # token): report it as too long without tokenizing it, since langchain only uses the
        # number to decide to cut it further. Were it wrong, the split would merely be cut at
        # its own separators and merged back, never producing a piece over the limit.
        too_long_chars = chunk_tokens * _MAX_CHARS_PER_TOKEN

        def length(s: str) -> int:
            if len(s) > too_long_chars:
                return chunk_tokens
            n = memo.get(s)
            if n is None:
                n = memo[s] = count(s)
                if strip_keys:
                    memo[s.strip()] = n
            return n

        return RecursiveCharacterTextSplitter(
            separators=self._markdown_separators if markdown else _TEXT_SEPARATORS,
            is_separator_regex=True,
            keep_separator="start",
            chunk_size=chunk_tokens,
            chunk_overlap=self.overlap_tokens,
            length_function=length,
            strip_whitespace=True,
        )


_HEADING_LINE = re.compile(r" {0,3}#{1,6}(?:[ \t]|$)")


def _body_start(text: str, start: int, end: int) -> int:
    """Where the first line of ``text[start:end]`` that is neither blank nor an ATX heading
    starts; ``start`` if there is none. The heading path there is the one of the piece's text."""
    offset = start
    while offset < end:
        line_end = text.find("\n", offset, end)
        line_end = end if line_end < 0 else line_end
        line = text[offset:line_end]
        if line.strip() and not _HEADING_LINE.match(line):
            return offset
        offset = line_end + 1
    return start


def _segments(doc: LoadedDocument) -> list[tuple[int, int]]:
    """Cut the text at every page start, so that no piece straddles two pages."""
    starts = sorted({0, *(span.start for span in doc.pages if 0 < span.start < len(doc.text))})
    return list(zip(starts, [*starts[1:], len(doc.text)], strict=True))


class _HeadingIndex:
    """Heading paths of a markdown text, looked up by offset."""

    def __init__(self, text: str) -> None:
        self._offsets: list[int] = []
        self._paths: list[str] = []
        stack: list[tuple[int, str]] = []
        for h in iter_headings(text):
            while stack and stack[-1][0] >= h.level:
                stack.pop()
            stack.append((h.level, _plain_heading(h.title)))
            self._offsets.append(h.offset)
            self._paths.append(HEADING_SEPARATOR.join(title for _, title in stack))

    @property
    def paths(self) -> list[str]:
        """Every heading path of the text, in text order."""
        return self._paths

    def at(self, offset: int) -> str | None:
        i = bisect.bisect_right(self._offsets, offset) - 1
        return self._paths[i] if i >= 0 else None


def _plain_heading(title: str) -> str:
    """Drop code backticks from a heading for display ("`fs.open()`" -> "fs.open()")."""
    return title.replace("`", "").strip() or title
