"""Answering a question from retrieved sources, as one async stream of answer events.

:func:`answer` is the entry point. Every mode yields the same events, in this order::

    retrieval, (citation* token)*, [retrieval, (citation* token)* ...], done
    ... or, at any point: error (and nothing after it)

A :class:`~generation.types.CitationEvent` comes right before the token event that contains
the first ``[n]`` marker of that source.

Modes:

``single``
    Retrieve once with the question, stream the answer.

``interval`` (in-context RALM, Ram et al. 2023)
    Every ``interval_tokens`` generated tokens, retrieve again with the question plus the last
    ``query_tail_words`` words of the answer so far, rebuild the prompt with the new sources and
    continue the answer.

How a partial answer is continued: the answer modes render the chat template themselves
(:func:`generation.prompts.render_chatml`) and call the **completions** API with the partial
answer as the open assistant turn (``<|im_start|>assistant\\n{partial}``), asking for at most
``interval_tokens`` more. The chat API cannot continue an assistant turn portably, and the
raw prompt lets us count its tokens exactly. Trailing whitespace of the partial answer is
moved out of the prompt (BPE tokenizers put the space at the start of the next word's token)
and the same amount of leading whitespace of the continuation is dropped.

Citation numbers are stable across rounds: a chunk gets a number the first time it is put in
a prompt and keeps it in every later prompt; new chunks get the next unused numbers. So
``[n]`` always means the same source to the model, to the citation tracker and to the user.

``flare`` (active retrieval, Jiang et al. 2023; :mod:`generation.flare`)
    Retrieve with the question, then sentence by sentence: generate a look-ahead sentence with
    token log-probabilities; accept it if every token is confident (probability > θ), else
    retrieve with it (masked or generated-question query), regenerate it over the new sources
    and accept that. Sentences are emitted only once accepted.

``extractive``
    Retrieve once and generate nothing: the grounding guard (:mod:`generation.guard`) answers with
    the source sentences that best answer the question, each cited. Needs no model server.

Grounding: with ``grounding`` set, :func:`answer` runs every mode's events through
:func:`generation.guard.guard_stream` (support verdicts, re-pointed citations, fallback to the
extractive answer, abstention); it is the only place the guard is hooked in.

Extending: a mode is a runner over :class:`AnswerSession` (``ground`` / ``stream`` /
``generate`` + ``accept``), registered in :func:`_runner`.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Literal

from generation.citations import CitationTracker, infer_citations
from generation.client import LLMClient, aclosing_iter
from generation.context import ContextPlan, assign_numbers, plan_context, skeleton_prompt
from generation.errors import ContextTooLong, GenerationError
from generation.flare import FlareParams, SentenceJudgement, default_flare_params, run_flare
from generation.grounding import content_words
from generation.guard import GroundingParams, guard_stream
from generation.prompts import CHATML, SYSTEM_PROMPT, ChatTemplate, format_source, strip_citations
from generation.repetition import repeated_unit
from generation.tokenizer import CachedTokenCounter
from generation.types import (
    AnswerEvent,
    ChatMessage,
    Completion,
    DoneEvent,
    ErrorEvent,
    GenerationParams,
    RetrievalEvent,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from retrieval.types import Embedder, RetrievalError, Retriever, ScoredChunk, SearchFilters, SearchOptions

__all__ = [
    "ANSWER_MODES",
    "AnswerMode",
    "AnswerSession",
    "FlareParams",
    "GroundingParams",
    "ModeRunner",
    "answer",
    "continuation_query",
    "run_extractive",
    "run_interval",
    "run_single",
    "standalone_query",
]

logger = logging.getLogger(__name__)

AnswerMode = Literal["single", "interval", "flare", "extractive"]
ANSWER_MODES: tuple[AnswerMode, ...] = ("single", "interval", "flare", "extractive")
ModeRunner = Callable[["AnswerSession"], AsyncIterator[AnswerEvent]]

_OPEN_MARKER_RE = re.compile(r"\s*\[[\d ,;\-–]*$")
# How often the prompt may be re-fitted when the exact count disagrees with the planning count.
_MAX_REFITS = 3


def standalone_query(question: str, history: Sequence[ChatMessage], *, min_words: int = 4) -> str:
    """The retrieval query of a question asked in a conversation.

    A follow-up with fewer than ``min_words`` content words ("Why is that?", "Can you explain that in
    more detail?") says nothing by itself: the last earlier user question is put before it. Any other
    question is its own query. (A rule, not a model: the embedded 135M model cannot rewrite queries.)
    """
    if len(content_words(question)) >= min_words:
        return question
    earlier = [m.content for m in history if m.role == "user" and m.content.strip()]
    return f"{earlier[-1].strip()}\n{question.strip()}" if earlier else question


def continuation_query(question: str, partial_answer: str, tail_words: int = 32) -> str:
    """The retrieval query of a later round: the question plus the end of the answer so far.

    In-context RALM retrieves with the last tokens of the prefix; the question is kept because
    the answer's first words alone often do not say what is being asked.
    """
    # A round can end inside a marker ("... [1"): drop that too, markers are noise to a retriever.
    words = _OPEN_MARKER_RE.sub("", strip_citations(partial_answer)).split()
    tail = " ".join(words[-tail_words:]) if tail_words > 0 else ""
    return f"{question.strip()}\n{tail}" if tail else question.strip()


class AnswerSession:
    """State and building blocks of one answer, shared by every mode.

    A mode runner calls :meth:`ground` (retrieve + fit a prompt) and :meth:`stream` (generate
    and emit) as often as it likes; :func:`answer` calls :meth:`finish` at the end.

    Attributes:
        raw_answer: Everything the model generated for this answer, as generated (the
            continuation prefix). The text shown to the user is ``tracker.text``.
        generated_tokens: Completion tokens that became part of the answer.
        finish_reason: Finish reason of the last generation request.
        last_round_tokens: Completion tokens of the last generation request.
        retrievals: Every retrieval event so far.
        hits: The chunks of the latest retrieval (what :meth:`plan` fits by default).
        usage: Tokens over every request, discarded look-aheads included.
        timings: Milliseconds spent per phase (``retrieval_ms``, ``prompt_ms``, ``generation_ms``,
            ``ttft_ms``, ``total_ms``).
    """

    def __init__(
        self,
        question: str,
        *,
        retriever: Retriever,
        llm: LLMClient,
        mode: str,
        k: int,
        params: GenerationParams,
        history: Sequence[ChatMessage],
        max_model_len: int,
        history_max_tokens: int,
        template: ChatTemplate,
        system_prompt: str,
        filters: SearchFilters | None,
        search_options: SearchOptions | None,
        context_margin: int,
        clock: Callable[[], float],
        infer_missing_citations: bool = False,
        stop_on_repetition: bool = True,
    ) -> None:
        self.question = question
        self.query = standalone_query(question, history)
        """What the first retrieval searches with (:func:`standalone_query`)."""
        self.retriever = retriever
        self.llm = llm
        self.mode = mode
        self.k = k
        self.params = params
        self.history = tuple(history)
        self.max_model_len = max_model_len
        self.history_max_tokens = history_max_tokens
        self.template = template
        self.system_prompt = system_prompt
        self.filters = filters
        self.search_options = search_options
        self.context_margin = context_margin
        self.clock = clock
        self.infer_missing_citations = infer_missing_citations
        self.stop_on_repetition = stop_on_repetition

        self.counter = CachedTokenCounter(llm.count_tokens)
        self.tracker = CitationTracker()
        self.numbering: dict[int, int] = {}  # chunk id -> citation number, stable across rounds
        self.next_number = 1
        self.raw_answer = ""
        self.generated_tokens = 0
        self.last_round_tokens = 0
        self.finish_reason: str | None = None
        self.retrievals: list[RetrievalEvent] = []
        self.hits: list[ScoredChunk] = []
        self.usage = Usage()
        self.timings: dict[str, float] = {"retrieval_ms": 0.0, "prompt_ms": 0.0, "generation_ms": 0.0}
        self._started = clock()
        self._first_token: float | None = None
        self._skip_space = 0  # whitespace moved out of the last prompt's assistant prefix

    @property
    def remaining_tokens(self) -> int:
        """Answer tokens still allowed by ``params.max_tokens``."""
        return max(0, self.params.max_tokens - self.generated_tokens)

    def _ms_since(self, start: float) -> float:
        return (self.clock() - start) * 1000.0

    # --- retrieval and prompt -----------------------------------------------------------------

    async def retrieve(self, query: str) -> tuple[list[ScoredChunk], float]:
        """Ask the retriever; returns the hits (duplicates removed) and the milliseconds it took."""
        start = self.clock()
        found = await self.retriever.search(query, k=self.k, filters=self.filters, options=self.search_options)
        elapsed = self._ms_since(start)
        self.timings["retrieval_ms"] += elapsed
        # A chunk listed twice would get two numbers; keep its best-ranked occurrence.
        hits: list[ScoredChunk] = []
        seen: set[int] = set()
        for hit in found:
            if hit.chunk.id not in seen:
                seen.add(hit.chunk.id)
                hits.append(hit)
        return hits, elapsed

    async def plan(self, hits: Sequence[ScoredChunk] | None = None) -> ContextPlan:
        """Fit ``hits`` (default: the latest retrieval) into a prompt that continues the answer so far.

        The space reserved for generation is everything the answer may still grow
        (:attr:`remaining_tokens`), so the same sources fit whatever the round length.
        Source blocks, history and the skeleton are counted exactly (primed through the
        server's tokenizer), the rendered prompt is re-counted exactly, and the plan is redone
        with a wider margin if it still overflows.

        Raises:
            ContextTooLong: No prompt fits, even without sources.
        """
        start = self.clock()
        chunks = [h.chunk for h in (self.hits if hits is None else hits)]
        prefix = self.raw_answer.rstrip()
        reserve = self.remaining_tokens
        numbers = assign_numbers(chunks, self.numbering, self.next_number)
        skeleton = skeleton_prompt(
            self.question, template=self.template, system_prompt=self.system_prompt, assistant_prefix=prefix
        )
        await self.counter.prime(
            [
                skeleton,
                *(format_source(n, c) for n, c in zip(numbers, chunks, strict=True)),
                *(m.content for m in self.history),
            ]
        )
        margin = self.context_margin
        for _ in range(_MAX_REFITS):
            plan = plan_context(
                self.question,
                chunks,
                count_tokens=self.counter,
                template=self.template,
                max_model_len=self.max_model_len,
                max_tokens=reserve,
                history=self.history,
                history_max_tokens=self.history_max_tokens,
                assistant_prefix=prefix,
                system_prompt=self.system_prompt,
                numbering=self.numbering,
                next_number=self.next_number,
                margin=margin,
            )
            exact = await self.counter.count(plan.prompt)
            overflow = exact + reserve - self.max_model_len
            if overflow <= 0:
                break
            margin += overflow + 8
        else:
            raise ContextTooLong(
                "could not fit the prompt into the context window",
                max_context=self.max_model_len,
                prompt_tokens=exact,
            )
        for source in plan.sources:
            if source.chunk.id not in self.numbering:
                self.numbering[source.chunk.id] = source.n
                self.tracker.add_source(source.n, source.chunk)
                self.next_number = max(self.next_number, source.n + 1)
        self._skip_space = len(self.raw_answer) - len(prefix)
        self.timings["prompt_ms"] += self._ms_since(start)
        return plan

    async def ground(
        self,
        query: str,
        *,
        round: int,
        reason: str,
        trigger: tuple[TokenLogprob, ...] | None = None,
        hits: Sequence[ScoredChunk] | None = None,
        elapsed_ms: float = 0.0,
    ) -> tuple[RetrievalEvent, ContextPlan]:
        """Retrieve with ``query``, fit the hits into a prompt, and record the retrieval event.

        Args:
            query: What to retrieve with (recorded in the event).
            round: Retrieval round (0 = initial).
            reason: Why (``"initial"``, ``"interval"``, ``"low_confidence"``).
            trigger: The low-confidence tokens behind an active retrieval.
            hits: Already retrieved chunks (a runner that merged several searches); then
                ``query`` is only recorded and ``elapsed_ms`` is the time those searches took.
            elapsed_ms: See ``hits``.

        Returns:
            The event to yield (numbers of the chunks that made it into the prompt filled in)
            and the plan to generate with.
        """
        if hits is None:
            found, elapsed = await self.retrieve(query)
        else:
            found, elapsed = list(hits), elapsed_ms
        hits = found
        self.hits = found
        plan = await self.plan(hits)
        shown = {s.chunk.id: s.n for s in plan.sources}
        event = RetrievalEvent(
            round=round,
            query=query,
            chunks=tuple(hits),
            numbers=tuple(shown.get(h.chunk.id) for h in hits),
            trigger=trigger,
            reason=reason,
            elapsed_ms=elapsed,
        )
        self.retrievals.append(event)
        return event, plan

    # --- generation ---------------------------------------------------------------------------

    def _request_params(self, max_tokens: int, logprobs: int | None) -> GenerationParams:
        stop = tuple(dict.fromkeys((*self.params.stop, *self.template.stop)))
        return replace(self.params, max_tokens=max_tokens, stop=stop, logprobs=logprobs)

    def _drop_carried_space(self, text: str) -> str:
        # The prompt's prefix lost its trailing whitespace (already shown to the user); the model
        # typically re-generates it at the start of its continuation.
        while self._skip_space and text and text[0].isspace():
            text = text[1:]
            self._skip_space -= 1
        if text:
            self._skip_space = 0
        return text

    def _emit(self, text: str) -> list[AnswerEvent]:
        shown, citations = self.tracker.feed(text)
        events: list[AnswerEvent] = list(citations)
        if shown:
            if self._first_token is None:
                self._first_token = self.clock()
                self.timings["ttft_ms"] = (self._first_token - self._started) * 1000.0
            events.append(TokenEvent(shown))
        return events

    def _account(self, usage: Usage | None, prompt_tokens: int, counted: int) -> int:
        """Add one request's usage (the server's, else our counts); returns its completion tokens."""
        used = usage or Usage(prompt_tokens=prompt_tokens, completion_tokens=counted)
        self.usage += used
        return used.completion_tokens

    async def stream(
        self, plan: ContextPlan, *, max_tokens: int, logprobs: int | None = None
    ) -> AsyncIterator[AnswerEvent]:
        """Generate with ``plan`` and emit the text as it comes; it becomes part of the answer.

        Updates :attr:`raw_answer`, :attr:`generated_tokens`, :attr:`finish_reason` and
        :attr:`last_round_tokens`. Closing this iterator closes the upstream request, so runners
        iterate it inside :func:`~generation.client.aclosing_iter` (a ``break`` or a closed
        answer stream then stops the server's generation at once, not at garbage collection).
        """
        start = self.clock()
        counted = 0
        usage: Usage | None = None
        finish_reason: str | None = None
        try:
            deltas = self.llm.stream(plan.prompt, self._request_params(max_tokens, logprobs))
            async with aclosing_iter(deltas) as stream:
                async for delta in stream:
                    usage = delta.usage or usage
                    finish_reason = delta.finish_reason or finish_reason
                    counted += len(delta.tokens) or (1 if delta.text else 0)
                    text = self._drop_carried_space(delta.text)
                    if text:
                        self.raw_answer += text
                        for event in self._emit(text):
                            yield event
                        if self.stop_on_repetition and repeated_unit(self.raw_answer) is not None:
                            # A sentence came back: a greedy loop. Leaving the ``async with``
                            # closes the request, so the server stops generating the repeats.
                            finish_reason = "repetition"
                            break
        finally:
            self.timings["generation_ms"] += self._ms_since(start)
        self.last_round_tokens = self._account(usage, plan.prompt_tokens, counted)
        self.generated_tokens += self.last_round_tokens
        self.finish_reason = finish_reason

    async def generate(
        self,
        plan: ContextPlan,
        *,
        max_tokens: int,
        logprobs: int | None = None,
        stop: Sequence[str] = (),
        until: Callable[[str], bool] | None = None,
    ) -> Completion:
        """Generate with ``plan`` without showing anything (a look-ahead); see :meth:`accept`.

        Usage is accounted; the answer is unchanged. ``stop`` adds stop strings (a sentence end).

        Args:
            plan: The prompt.
            max_tokens: Tokens to ask for.
            logprobs: Alternatives per token to ask for (``None``: no log-probabilities).
            stop: Extra stop strings.
            until: Asked with the text so far after every streamed delta; once it returns true the
                request is closed (the server stops generating at once, which is what makes a
                sentence look-ahead cheap) and the completion so far is returned with
                ``finish_reason=None``. With log-probabilities the text so far is spelled from the
                tokens: servers hold back the streamed text while it could still become a stop
                string (vLLM: up to the longest stop string's length), the tokens come at once.

        Returns:
            The completion. When log-probabilities came back its tokens spell its text exactly
            (``"".join(t.token for t in tokens) == text``; see :func:`_reconcile`).
        """
        start = self.clock()
        params = self._request_params(max_tokens, logprobs)
        if stop:
            params = replace(params, stop=tuple(dict.fromkeys((*params.stop, *stop))))
        text: list[str] = []
        tokens: list[TokenLogprob] = []
        by_delta: list[TokenLogprob] = []  # each delta's text given to its tokens (fallback alignment)
        usage: Usage | None = None
        finish_reason: str | None = None
        cut = False
        try:
            async with aclosing_iter(self.llm.stream(plan.prompt, params)) as stream:
                async for delta in stream:
                    usage = delta.usage or usage
                    finish_reason = delta.finish_reason or finish_reason
                    if delta.tokens:
                        tokens.extend(delta.tokens)
                        by_delta.extend(_align_tokens(delta.text, delta.tokens))
                    if delta.text:
                        text.append(delta.text)
                    if until is not None and (delta.text or delta.tokens):
                        so_far = "".join(t.token for t in tokens) if tokens else "".join(text)
                        if until(so_far):
                            finish_reason, cut = None, True
                            break
        finally:
            self.timings["generation_ms"] += self._ms_since(start)
        full_text, aligned = _reconcile("".join(text), tokens, by_delta, cut=cut)
        completion = Completion(full_text, aligned, finish_reason, usage)
        counted = len(completion.tokens) or self.counter(completion.text)
        self._account(completion.usage, plan.prompt_tokens, counted)
        return completion

    async def side_request(self, prompt: str, *, max_tokens: int, stop: Sequence[str] = ()) -> Completion:
        """A request that is not part of the answer (FLARE's question generation), greedy.

        Usage and generation time are accounted like any other request of this answer.
        """
        start = self.clock()
        params = replace(
            self._request_params(max_tokens, None),
            temperature=0.0,
            stop=tuple(dict.fromkeys((*self.template.stop, *stop))),
        )
        try:
            completion = await self.llm.complete(prompt, params)
        finally:
            self.timings["generation_ms"] += self._ms_since(start)
        self._account(completion.usage, self.counter(prompt), len(completion.tokens) or self.counter(completion.text))
        return completion

    def accept(self, completion: Completion) -> list[AnswerEvent]:
        """Make a look-ahead part of the answer; returns the events to yield."""
        text = self._drop_carried_space(completion.text)
        self.raw_answer += text
        tokens = (
            completion.usage.completion_tokens
            if completion.usage
            else (len(completion.tokens) or self.counter(completion.text))
        )
        self.last_round_tokens = tokens
        self.generated_tokens += tokens
        self.finish_reason = completion.finish_reason
        return self._emit(text) if text else []

    def finish(self) -> list[AnswerEvent]:
        """Flush the citation tracker and build the final :class:`DoneEvent`."""
        text, citations = self.tracker.finish()
        events: list[AnswerEvent] = list(citations)
        if text:
            events.extend(self._emit_flushed(text))
        cited = self.tracker.citations
        if not cited and self.infer_missing_citations:
            cited = infer_citations(self.tracker.text, self.tracker.sources)
            events.extend(cited)
        self.timings["total_ms"] = self._ms_since(self._started)
        self.timings.setdefault("ttft_ms", self.timings["total_ms"])
        events.append(
            DoneEvent(
                answer=self.tracker.text,
                citations=tuple(cited),
                retrievals=tuple(self.retrievals),
                usage=self.usage,
                timings=dict(self.timings),
                mode=self.mode,
                finish_reason=self.finish_reason,
            )
        )
        return events

    def _emit_flushed(self, text: str) -> list[AnswerEvent]:
        if self._first_token is None:
            self._first_token = self.clock()
            self.timings["ttft_ms"] = (self._first_token - self._started) * 1000.0
        return [TokenEvent(text)]


async def run_single(session: AnswerSession) -> AsyncIterator[AnswerEvent]:
    """``single`` mode: retrieve once with the question, stream the whole answer."""
    event, plan = await session.ground(session.query, round=0, reason="initial")
    yield event
    async with aclosing_iter(session.stream(plan, max_tokens=session.remaining_tokens)) as stream:
        async for answer_event in stream:
            yield answer_event


async def run_interval(
    session: AnswerSession, *, interval_tokens: int = 32, query_tail_words: int = 32
) -> AsyncIterator[AnswerEvent]:
    """``interval`` mode (in-context RALM): re-retrieve every ``interval_tokens`` generated tokens.

    Each round asks the server for at most ``interval_tokens`` tokens; a round that ends for
    any reason other than ``"length"`` (or that produced nothing) ends the answer, as does
    reaching ``params.max_tokens``.
    """
    query = session.query
    round_no = 0
    while True:
        event, plan = await session.ground(query, round=round_no, reason="initial" if round_no == 0 else "interval")
        yield event
        step = min(interval_tokens, session.remaining_tokens)
        async with aclosing_iter(session.stream(plan, max_tokens=step)) as stream:
            async for answer_event in stream:
                yield answer_event
        if session.finish_reason != "length" or session.last_round_tokens == 0 or session.remaining_tokens <= 0:
            return
        round_no += 1
        query = continuation_query(session.question, session.raw_answer, query_tail_words)


async def run_extractive(session: AnswerSession) -> AsyncIterator[AnswerEvent]:
    """``extractive`` mode: retrieve once, generate nothing; the grounding guard quotes the sources.

    Every hit is numbered (no prompt is built, so the model server is not needed).
    """
    hits, elapsed = await session.retrieve(session.query)
    session.hits = hits
    numbers: list[int | None] = []
    for hit in hits:
        n = session.numbering.setdefault(hit.chunk.id, session.next_number)
        if n == session.next_number:
            session.tracker.add_source(n, hit.chunk)
            session.next_number += 1
        numbers.append(n)
    event = RetrievalEvent(round=0, query=session.query, chunks=tuple(hits), numbers=tuple(numbers), elapsed_ms=elapsed)
    session.retrievals.append(event)
    session.finish_reason = "stop"
    yield event


def _reconcile(
    text: str, tokens: Sequence[TokenLogprob], by_delta: Sequence[TokenLogprob], *, cut: bool
) -> tuple[str, tuple[TokenLogprob, ...]]:
    """The text of a generation and tokens that spell it exactly.

    - The tokens spell the text: as they are.
    - The tokens spell more than the text (text held back for stop-string matching): when the
      request was ``cut`` by us the held-back text is real output and the tokens' spelling is the
      text; when it finished by itself the tail was a stop string (or an end-of-turn token), so
      the tokens are trimmed to the text.
    - Anything else (byte-level pieces spelled oddly): each delta's text attributed to its tokens.
    """
    if not tokens:
        return text, ()
    spelled = "".join(t.token for t in tokens)
    if spelled == text:
        return text, tuple(tokens)
    if spelled.startswith(text):
        if cut:
            return spelled, tuple(tokens)
        kept: list[TokenLogprob] = []
        pos = 0
        for token in tokens:
            if pos >= len(text):
                break
            piece = token.token[: len(text) - pos]
            kept.append(token if piece == token.token else replace(token, token=piece))
            pos += len(piece)
        return text, tuple(kept)
    aligned = list(by_delta)
    joined = "".join(t.token for t in aligned)
    if aligned and len(text) > len(joined) and text.startswith(joined):
        aligned[-1] = replace(aligned[-1], token=aligned[-1].token + text[len(joined) :])
    return "".join(t.token for t in aligned), tuple(aligned)


def _align_tokens(text: str, tokens: Sequence[TokenLogprob]) -> tuple[TokenLogprob, ...]:
    """Make one delta's tokens spell exactly its text (see :meth:`AnswerSession.generate`)."""
    if len(tokens) == 1:
        return (tokens[0] if tokens[0].token == text else replace(tokens[0], token=text),)
    if "".join(t.token for t in tokens) == text:
        return tuple(tokens)
    # Pieces that do not add up (byte fallback, a server's own spelling): the text goes to the
    # last token so offsets stay right and no token claims text it did not produce.
    return (*(replace(t, token="") for t in tokens[:-1]), replace(tokens[-1], token=text))


def _runner(
    mode: str,
    *,
    interval_tokens: int,
    query_tail_words: int,
    flare: FlareParams | None = None,
    flare_observer: Callable[[SentenceJudgement], None] | None = None,
) -> ModeRunner:
    if mode == "single":
        return run_single
    if mode == "interval":
        return functools.partial(run_interval, interval_tokens=interval_tokens, query_tail_words=query_tail_words)
    if mode == "flare":
        return functools.partial(run_flare, params=flare or FlareParams(), observer=flare_observer)
    if mode == "extractive":
        return run_extractive
    raise ValueError(f"unknown answer mode {mode!r}; expected one of {ANSWER_MODES}")


async def answer(
    question: str,
    *,
    retriever: Retriever,
    llm: LLMClient,
    mode: AnswerMode = "single",
    k: int = 5,
    params: GenerationParams | None = None,
    history: Sequence[ChatMessage] = (),
    interval_tokens: int = 32,
    query_tail_words: int = 32,
    max_model_len: int = 2048,
    history_max_tokens: int = 256,
    template: ChatTemplate = CHATML,
    system_prompt: str = SYSTEM_PROMPT,
    filters: SearchFilters | None = None,
    search_options: SearchOptions | None = None,
    context_margin: int = 16,
    infer_missing_citations: bool = False,
    stop_on_repetition: bool = True,
    flare: FlareParams | None = None,
    flare_observer: Callable[[SentenceJudgement], None] | None = None,
    grounding: GroundingParams | None = None,
    embedder: Embedder | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> AsyncIterator[AnswerEvent]:
    """Answer ``question`` from retrieved sources as a stream of events.

    Args:
        question: The user's question.
        retriever: Where sources come from.
        llm: The generator; the prompt is rendered with ``template`` and sent to its completions API.
        mode: ``"single"``, ``"interval"``, ``"flare"`` or ``"extractive"`` (see the module docstring).
        k: Chunks per retrieval (fewer may fit the context window); ``flare.top_k`` overrides it
            in ``flare`` mode.
        params: Sampling parameters; ``max_tokens`` bounds the whole answer, ``logprobs`` is ignored
            (modes ask for log-probabilities when they need them).
        history: Earlier turns of the conversation, oldest first.
        interval_tokens: ``interval`` mode: tokens generated between retrievals.
        query_tail_words: ``interval`` mode: words of the answer so far added to the question.
        max_model_len: The model's context window (vLLM's ``--max-model-len``).
        history_max_tokens: Cap on the tokens of history put into the prompt.
        template: Chat template of the model.
        system_prompt: The instruction.
        filters: Passed to the retriever.
        search_options: Passed to the retriever.
        context_margin: Tokens kept free in the context window for counting drift.
        infer_missing_citations: When the model cited nothing, attribute the answer's sentences to
            sources by word overlap (citation events with ``inferred=True``, sent before ``done``).
        stop_on_repetition: End the answer (``finish_reason="repetition"``) as soon as a sentence or
            line of it comes back a second time (:func:`generation.repetition.repeated_unit`): a greedy
            loop. ``single`` and ``interval`` modes; FLARE's sentence-by-sentence loop is unaffected.
        flare: ``flare`` mode's parameters; ``None``: the defaults for ``llm.model``
            (:func:`generation.flare.default_flare_params`).
        flare_observer: ``flare`` mode: called with every judged look-ahead sentence (calibration
            and evaluation read token probabilities through it); it must not raise.
        grounding: Run the answer through the grounding guard (:mod:`generation.guard`): support
            verdicts per sentence, re-pointed citations, fallback to quoting the sources, abstention.
            ``None``: no guard (the ``extractive`` mode then uses ``GroundingParams(policy="strict")``).
        embedder: The embedding model the guard scores support with (``None``: word overlap only).
        clock: Monotonic clock in seconds (tests inject one).

    Yields:
        Answer events; the last one is a :class:`DoneEvent` or an :class:`ErrorEvent`. Failures of
        the model server or the retriever become an ``ErrorEvent`` (with the error's ``code`` and
        ``retryable``), never an exception or a silent end. Closing the iterator (client gone)
        cancels the upstream generation.

    Raises:
        ValueError: Invalid arguments (unknown mode, ``k`` or ``interval_tokens`` < 1).
    """
    if k < 1 or interval_tokens < 1:
        raise ValueError("k and interval_tokens must be at least 1")
    if mode == "flare":
        flare = flare or default_flare_params(llm.model)
        k = flare.top_k or k
    runner = _runner(
        mode,
        interval_tokens=interval_tokens,
        query_tail_words=query_tail_words,
        flare=flare,
        flare_observer=flare_observer,
    )
    session = AnswerSession(
        question,
        retriever=retriever,
        llm=llm,
        mode=mode,
        k=k,
        params=params or GenerationParams(),
        history=history,
        max_model_len=max_model_len,
        history_max_tokens=history_max_tokens,
        template=template,
        system_prompt=system_prompt,
        filters=filters,
        search_options=search_options,
        context_margin=context_margin,
        clock=clock,
        infer_missing_citations=infer_missing_citations,
        stop_on_repetition=stop_on_repetition,
    )
    if mode == "extractive" and grounding is None:
        grounding = GroundingParams(policy="strict")
    try:
        if grounding is None:
            async with aclosing_iter(runner(session)) as events:
                async for event in events:
                    yield event
            for event in session.finish():
                yield event
        else:
            guarded = guard_stream(
                runner(session),
                finish=session.finish,
                question=session.query,
                params=grounding,
                embedder=embedder,
                extractive=mode == "extractive",
                clock=clock,
            )
            async with aclosing_iter(guarded) as events:
                async for event in events:
                    yield event
    except GenerationError as exc:
        logger.warning("answer failed", extra={"code": exc.code, "mode": mode, "error": str(exc)})
        yield ErrorEvent(code=exc.code, message=str(exc), retryable=exc.retryable)
    except RetrievalError as exc:
        logger.warning("answer failed in retrieval", extra={"mode": mode, "error": str(exc)})
        yield ErrorEvent(code="retrieval_error", message=str(exc), retryable=False)
    except Exception:
        # A bug, not a condition: log it with its traceback, and still end the stream with an
        # error event so the client is never left with a silently truncated answer.
        logger.exception("answer failed unexpectedly", extra={"mode": mode})
        yield ErrorEvent(code="internal_error", message="internal error while answering", retryable=False)
