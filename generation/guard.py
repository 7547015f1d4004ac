"""The grounding guard: a transformer over the answer event stream of every mode.

:func:`guard_stream` sits between a mode runner and the client (:func:`generation.rag.answer`
puts it there when given :class:`GroundingParams`). It

1. passes retrieval events through and segments and embeds the sources that entered the prompt
   (:class:`generation.grounding.SupportScorer`);
2. after the first retrieval, **abstains** when retrieval is weak and no source sentence is
   relevant to the question (:func:`generation.grounding.abstains`): the model is not asked, the
   answer is :data:`generation.prompts.NO_ANSWER`, ``done.no_answer`` is true;
3. holds the model's tokens until a sentence ends (:func:`generation.sentences.sentence_end`),
   judges it, and releases it with a :class:`~generation.types.SupportEvent`. A sentence that
   comes back a second time, or that copies a source header or document id, is dropped; a
   supported sentence cites the source that supports it (the model's ``[n]`` is kept when that
   source supports the sentence, re-pointed otherwise, added when missing); an unsupported one
   loses its markers;
4. at the end, judges the whole model answer: it **failed** when it is empty, when no sentence is
   supported, or when fewer than ``min_support_rate`` of its sentences are. A failed answer is
   replaced by the extractive answer (:func:`generation.grounding.extractive_answer`, quoting the
   sources), keeping the model's supported sentences in front; ``finish_reason`` is ``"guard"``.

Policies (what happens to unsupported sentences):

``annotate``
    Every sentence is shown with its verdict; the text is never replaced (a strong model on a GPU:
    the guard then only adds verdicts, spans and re-pointed citations).
``fallback`` (default)
    Sentences stream while they are supported; from the first unsupported one on, sentences are
    held until the answer ends. If the answer did not fail they are released (with their
    verdicts); if it failed, the held unsupported ones are dropped and the extractive answer
    follows the supported ones.
``strict``
    Unsupported sentences are never shown; a failed answer falls back as above.

The ``extractive`` answer mode (:func:`generation.rag.answer`) runs the guard over a retrieval
without generation, so the answer is the extractive one.

Citations are renumbered for display in order of first use (``[1]`` is the first source the
answer cites); citation events carry the chunk id and the supporting sentence as snippet, so a
client links markers to chunks through them (retrieval events keep the prompt's numbers).
The guard never calls the model and never raises on its own: scoring runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

from opentelemetry import trace

from generation.client import aclosing_iter
from generation.grounding import (
    Support,
    SupportScorer,
    abstains,
    cite_targets,
    copies_source_header,
    extractive_answer,
    marker_numbers,
    normalise_sentence,
    word_count,
)
from generation.markers import strip_citations
from generation.prompts import NO_ANSWER
from generation.sentences import sentence_end
from generation.types import (
    AnswerEvent,
    CitationEvent,
    DoneEvent,
    RetrievalEvent,
    SupportEvent,
    TokenEvent,
)
from retrieval.types import Chunk, Embedder

_tracer = trace.get_tracer(__name__)
T = TypeVar("T")

__all__ = ["GUARD_POLICIES", "GroundingParams", "GuardPolicy", "guard_stream"]

GuardPolicy = Literal["annotate", "fallback", "strict"]
GUARD_POLICIES: tuple[GuardPolicy, ...] = ("annotate", "fallback", "strict")

_TRAILING_PUNCT_RE = re.compile(r"([.!?:;]+[\"')»”’]*)$")


@dataclass(frozen=True, slots=True)
class GroundingParams:
    """Settings of the grounding guard (defaults calibrated on faq-dev-small; docs/grounding.md).

    Attributes:
        policy: ``annotate``, ``fallback`` or ``strict`` (module docstring).
        dense_weight: ``w`` of the support score ``w · cosine + (1 − w) · lexical``.
        support_threshold: A sentence is supported at this score or above.
        min_support_rate: A model answer with a smaller share of supported sentences failed.
        max_words: Word budget of the shown answer (whole sentences; ``finish_reason="length"``).
        fill_words: When the answer that passed has fewer words than this, the most relevant source
            sentences are quoted after it (0: never; for a small model that answers tersely).
        early_stop: Stop the model after this many unsupported sentences with none supported yet
            (``finish_reason="guard"``; 0: never). ``annotate`` never stops.
        abstain: Apply the abstention rule after the first retrieval.
        abstain_retrieval: Retrieval (best dense cosine) below this is weak.
        abstain_relevance: Best question relevance of a source sentence below this is weak.
        extra_threshold: Relevance a sentence of another chunk needs to be quoted.
        rank_bonus: Weight of the retrieval rank when the extractive answer picks its chunk.
        topic_margin: A supported sentence whose source scores more than this below the most
            relevant source (question relevance of its best sentence + ``rank_bonus / rank``) is
            off topic: true to a source, but that source does not answer the question (the small
            model copies sentences of any source). 1.0 turns the check off.
    """

    policy: GuardPolicy = "fallback"
    dense_weight: float = 0.5
    support_threshold: float = 0.7
    min_support_rate: float = 0.5
    max_words: int = 100
    fill_words: int = 0
    early_stop: int = 2
    abstain: bool = True
    abstain_retrieval: float = 0.45
    abstain_relevance: float = 0.6
    extra_threshold: float = 1.0
    rank_bonus: float = 0.2
    topic_margin: float = 0.1

    def __post_init__(self) -> None:
        if self.policy not in GUARD_POLICIES:
            raise ValueError(f"policy must be one of {GUARD_POLICIES}, not {self.policy!r}")
        if self.max_words < 1:
            raise ValueError("max_words must be at least 1")


@dataclass
class _Sentence:
    """A judged sentence, before and after release."""

    text: str  # without markers
    support: Support
    origin: Literal["model", "extractive"]
    separator: str
    cited: list[int] = field(default_factory=list)  # prompt numbers the model wrote
    reason: str | None = None

    @property
    def supported(self) -> bool:
        return self.support.verdict == "supported" and self.reason is None


def _with_markers(text: str, numbers: Sequence[int]) -> str:
    if not numbers:
        return text
    marker = "[" + ", ".join(str(n) for n in numbers) + "]"
    match = _TRAILING_PUNCT_RE.search(text)
    if match is None:
        return f"{text} {marker}"
    return f"{text[: match.start()].rstrip()} {marker}{match.group(1)}"


class _Guard:
    def __init__(
        self,
        question: str,
        params: GroundingParams,
        embedder: Embedder | None,
        clock: Callable[[], float],
    ) -> None:
        self.question = question
        self.params = params
        self.scorer = SupportScorer(embedder, dense_weight=params.dense_weight, threshold=params.support_threshold)
        self.clock = clock
        self.started = clock()
        self.ttft_ms: float | None = None
        self.sources: dict[int, Chunk] = {}
        self.pending = ""
        self.model_sentences: list[_Sentence] = []  # every judged model sentence (shown, held or dropped)
        self.shown: list[_Sentence] = []
        self.held: list[_Sentence] = []
        self.seen: set[str] = set()
        self.text_parts: list[str] = []
        self.display: dict[int, int] = {}  # prompt number -> display number
        self.citations: list[CitationEvent] = []
        self.supports: list[SupportEvent] = []
        self.words = 0
        self.unsupported_run = 0
        self.stop: str | None = None  # why the guard stopped reading the model
        self.no_answer = False
        self.retrieval_score: float | None = None
        self.chunk_relevance: dict[int, float] = {}  # citation number -> question relevance of its source

    async def _check(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a scorer call off the event loop (it embeds text), inside a ``grounding.check`` span."""
        with _tracer.start_as_current_span("grounding.check", attributes={"rag.check": what}):
            return await asyncio.to_thread(fn, *args)

    # --- sources and abstention --------------------------------------------------------------

    async def add_retrieval(self, event: RetrievalEvent) -> None:
        new = {n: sc.chunk for sc, n in zip(event.chunks, event.numbers, strict=False) if n is not None}
        self.sources.update(new)
        await self._check("add_sources", self.scorer.add_sources, new)
        if event.round > 0:
            await self._relevance()
        if event.round == 0:
            dense = [sc.dense.score for sc in event.chunks if sc.dense is not None]
            self.retrieval_score = max(dense) if dense else None

    async def _relevance(self) -> float:
        """Refresh the question relevance per source; returns the best sentence relevance."""
        relevance = await self._check("relevance", self.scorer.relevance, self.question)
        self.chunk_relevance = {}
        for sentence, r in relevance:
            score = r + self.params.rank_bonus / sentence.n
            self.chunk_relevance[sentence.n] = max(self.chunk_relevance.get(sentence.n, score), score)
        return max((r for _, r in relevance), default=0.0)

    async def abstains(self) -> bool:
        best = await self._relevance()
        if not self.params.abstain:
            return False
        return abstains(
            self.retrieval_score,
            best,
            retrieval_threshold=self.params.abstain_retrieval,
            relevance_threshold=self.params.abstain_relevance,
        )

    # --- model sentences ---------------------------------------------------------------------

    async def feed(self, text: str, *, final: bool) -> list[AnswerEvent]:
        self.pending += text
        out: list[AnswerEvent] = []
        while self.stop is None:
            end = sentence_end(self.pending, final=final)
            if end is None:
                break
            lead = len(self.pending) - len(self.pending.lstrip())
            if end <= lead:
                self.pending = ""
                break
            separator, raw = self.pending[:lead], self.pending[lead:end]
            self.pending = self.pending[end:]
            out.extend(await self._model_sentence(separator, raw))
        return out

    async def _model_sentence(self, separator: str, raw: str) -> list[AnswerEvent]:
        plain = strip_citations(raw).strip()
        key = normalise_sentence(plain)
        if not key:
            return []  # a marker or punctuation on its own
        if key in self.seen:
            self.stop = "repetition"  # what follows a repeat is more repeats
            return []
        self.seen.add(key)
        cited = [n for n in marker_numbers(raw) if n in self.sources]
        support = await self._check("judge", self.scorer.judge, plain)
        sentence = _Sentence(plain, support, "model", separator, cited)
        if copies_source_header(raw, self.sources):
            sentence.reason = "source_header"
        elif plain.strip().lower().rstrip(".") == NO_ANSWER.lower().rstrip("."):
            sentence.reason = "model_no_answer"
        elif support.source is None:
            sentence.reason = "no_sources"
        elif support.missing_numbers:
            sentence.reason = "number"
        elif support.verdict != "supported":
            sentence.reason = "low_support"
        elif self._off_topic(support):
            sentence.reason = "off_topic"
        self.model_sentences.append(sentence)
        policy = self.params.policy
        if sentence.supported:
            self.unsupported_run = 0
        else:
            self.unsupported_run += 1
            if (
                policy != "annotate"
                and self.params.early_stop
                and self.unsupported_run >= self.params.early_stop
                and not any(s.supported for s in self.model_sentences)
            ):
                self.stop = "guard"
        if sentence.reason == "source_header" or (policy == "strict" and not sentence.supported):
            return []
        if policy == "fallback" and (self.held or not sentence.supported):
            self.held.append(sentence)
            return []
        return self._release(sentence)

    def _off_topic(self, support: Support) -> bool:
        if support.source is None or not self.chunk_relevance:
            return False
        best = max(self.chunk_relevance.values())
        return self.chunk_relevance.get(support.source.n, best) < best - self.params.topic_margin

    # --- release ---------------------------------------------------------------------------------

    def _release(self, sentence: _Sentence) -> list[AnswerEvent]:
        count = word_count(sentence.text)
        if self.words and self.words + count > self.params.max_words:
            self.stop = self.stop or "length"
            return []
        events: list[AnswerEvent] = []
        source = sentence.support.source
        numbers: list[int] = []
        if sentence.supported and source is not None:
            targets = (
                cite_targets(sentence.support, sentence.cited, threshold=self.params.support_threshold)
                if sentence.origin == "model"
                else [source.n]
            )
            for n in targets:
                if n not in self.display:
                    self.display[n] = len(self.display) + 1
                    citation = self._citation(self.display[n], n, sentence)
                    self.citations.append(citation)
                    events.append(citation)
                numbers.append(self.display[n])
        shown = _with_markers(sentence.text, numbers)
        separator = "" if not self.shown else ("\n" if "\n" in sentence.separator else " ")
        if self.ttft_ms is None:
            self.ttft_ms = (self.clock() - self.started) * 1000.0
        events.append(TokenEvent(separator + shown))
        self.text_parts.append(separator + shown)
        support = SupportEvent(
            index=len(self.shown),
            sentence=shown,
            verdict="supported" if sentence.supported else "unsupported",
            score=sentence.support.score,
            origin=sentence.origin,
            n=self.display[source.n] if sentence.supported and source is not None else None,
            chunk_id=None if source is None else source.chunk.id,
            start=None if source is None else source.start,
            end=None if source is None else source.end,
            reason=sentence.reason,
        )
        events.append(support)
        self.supports.append(support)
        self.shown.append(sentence)
        self.words += count
        return events

    def _citation(self, display_n: int, n: int, sentence: _Sentence) -> CitationEvent:
        chunk = self.sources[n]
        source = sentence.support.source
        if source is not None and source.n == n:
            lo, hi = source.start, source.end
        else:  # a kept citation of the model's: its own best sentence for this claim
            best = max(
                (s for s in self.scorer.sentences if s.n == n),
                key=lambda s: len(s.words & source.words) if source is not None else 0,
                default=None,
            )
            lo, hi = (best.start, best.end) if best is not None else (0, len(chunk.text))
        return CitationEvent(
            n=display_n,
            chunk_id=chunk.id,
            document_id=chunk.document_id,
            path=chunk.path,
            title=chunk.title,
            page=chunk.page,
            start=chunk.start + lo,
            end=chunk.start + hi,
            snippet=chunk.text[lo:hi],
            chunk=chunk,
        )

    # --- the end -------------------------------------------------------------------------------

    def failed(self) -> bool:
        judged = [s for s in self.model_sentences if s.reason != "source_header"]
        supported = [s for s in judged if s.supported]
        if not supported:
            return True
        return len(supported) < self.params.min_support_rate * len(self.model_sentences)

    async def finish(self, *, extractive: bool) -> list[AnswerEvent]:
        events: list[AnswerEvent] = []
        if self.no_answer:
            return self._no_answer()
        failed = extractive or self.failed()
        if self.params.policy == "annotate" and not extractive:
            failed = False
        held, self.held = self.held, []
        for sentence in held:
            if not failed or sentence.supported:
                events.extend(self._release(sentence))
        if (failed or self.words < self.params.fill_words) and self.scorer.sentences:
            events.extend(await self._quote())
        if not self.shown:
            return events + self._no_answer()
        return events

    async def _quote(self) -> list[AnswerEvent]:
        relevance = await self._check("relevance", self.scorer.relevance, self.question)
        exclude = [
            (s.support.source.chunk.id, s.support.source.start, s.support.source.end)
            for s in self.shown
            if s.supported and s.support.source is not None
        ]
        picks = extractive_answer(
            relevance,
            max_words=self.params.max_words,
            exclude=exclude,
            used_words=self.words,
            rank_bonus=self.params.rank_bonus,
            extra_threshold=self.params.extra_threshold,
        )
        events: list[AnswerEvent] = []
        for pick in picks:
            # The source's own bracketed footnote numbers would read as citations.
            text = " ".join(strip_citations(pick.sentence.text).split())
            if normalise_sentence(text) in self.seen:
                continue
            self.seen.add(normalise_sentence(text))
            support = Support(
                "supported", 1.0, 1.0, 1.0, pick.sentence, {pick.sentence.n: 1.0}
            )  # a quote supports itself
            quoted = _Sentence(text, support, "extractive", " ")
            events.extend(self._release(quoted))
        self.stop = self.stop or "guard"
        return events

    def _no_answer(self) -> list[AnswerEvent]:
        self.no_answer = True
        self.stop = "guard"
        self.text_parts = [NO_ANSWER]
        self.citations = []
        self.supports = []
        return [TokenEvent(NO_ANSWER)]

    def done(self, inner: DoneEvent) -> DoneEvent:
        timings = dict(inner.timings)
        timings["ttft_ms"] = self.ttft_ms if self.ttft_ms is not None else (self.clock() - self.started) * 1000.0
        timings["guard_total_ms"] = (self.clock() - self.started) * 1000.0
        finish = inner.finish_reason
        if self.stop in ("guard", "length"):
            finish = self.stop
        elif self.stop == "repetition":
            finish = "repetition"
        return replace(
            inner,
            answer="".join(self.text_parts),
            citations=tuple(self.citations),
            finish_reason=finish,
            no_answer=self.no_answer,
            supports=tuple(self.supports),
        )


async def guard_stream(
    events: AsyncIterator[AnswerEvent],
    *,
    finish: Callable[[], list[AnswerEvent]],
    question: str,
    params: GroundingParams,
    embedder: Embedder | None = None,
    extractive: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> AsyncIterator[AnswerEvent]:
    """Judge, filter and cite the answer events of a mode runner (see the module docstring).

    Args:
        events: The runner's events (retrieval, citation, token), without the final ones.
        finish: Produces the session's final events (its :class:`DoneEvent` last); called once,
            after ``events`` is exhausted or closed.
        question: The user's question (extractive answer and abstention).
        params: Policy and thresholds.
        embedder: The embedding model for the support score (``None``: lexical only).
        extractive: Quote only: the model's text (normally none) is ignored.
        clock: Monotonic clock in seconds.

    Yields:
        Retrieval events as they come, token + support (+ citation) events per released sentence,
        then the :class:`DoneEvent` with the guard's text, citations, verdicts and ``no_answer``.
    """
    guard = _Guard(question, params, embedder, clock)
    async with aclosing_iter(events) as stream:
        async for event in stream:
            if isinstance(event, RetrievalEvent):
                yield event
                await guard.add_retrieval(event)
                if event.round == 0 and await guard.abstains():
                    guard.no_answer = True
                    break  # leaving the ``async with`` closes the runner: the model is not asked
            elif isinstance(event, TokenEvent):
                if extractive:
                    continue
                for out in await guard.feed(event.text, final=False):
                    yield out
                if guard.stop is not None:
                    break  # closes the upstream request
            elif isinstance(event, CitationEvent):
                continue  # the guard cites what supports each sentence itself
            else:
                yield event
    inner: DoneEvent | None = None
    for event in finish():
        if isinstance(event, DoneEvent):
            inner = event
        elif isinstance(event, TokenEvent) and guard.stop is None and not guard.no_answer and not extractive:
            for out in await guard.feed(event.text, final=False):
                yield out
    if guard.stop is None and not guard.no_answer:
        for out in await guard.feed("", final=True):
            yield out
    for out in await guard.finish(extractive=extractive):
        yield out
    if inner is not None:
        yield guard.done(inner)
