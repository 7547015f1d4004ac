"""The state and building blocks of one answer, shared by every answer mode.

An answer mode (:mod:`generation.rag`'s ``single`` and ``interval``, :mod:`generation.flare`)
is a runner over an :class:`AnswerSession`: it calls :meth:`~AnswerSession.ground` (retrieve and
fit a prompt) and :meth:`~AnswerSession.stream` (generate and emit) as often as it likes;
:func:`generation.rag.answer` calls :meth:`~AnswerSession.finish` at the end.

How a partial answer is continued: the session renders the chat template itself
(:func:`generation.prompts.render_chatml`) and calls the **completions** API with the partial
answer as the open assistant turn (``<|im_start|>assistant\\n{partial}``). The chat API cannot
continue an assistant turn portably, and the raw prompt lets us count its tokens exactly.
Trailing whitespace of the partial answer is moved out of the prompt (BPE tokenizers put the
space at the start of the next word's token) and the same amount of leading whitespace of the
continuation is dropped.

Citation numbers are stable across rounds: a chunk gets a number the first time it is put in
a prompt and keeps it in every later prompt; new chunks get the next unused numbers. So
``[n]`` always means the same source to the model, to the citation tracker and to the user.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace

from opentelemetry import trace

from generation.citations import CitationTracker, infer_citations
from generation.client import LLMClient, aclosing_iter
from generation.context import ContextPlan, assign_numbers, plan_context, skeleton_prompt
from generation.errors import ContextTooLong
from generation.prompts import ChatTemplate, format_source
from generation.queries import standalone_query
from generation.repetition import repeated_unit
from generation.tokenizer import CachedTokenCounter
from generation.types import (
    AnswerEvent,
    ChatMessage,
    DoneEvent,
    GenerationParams,
    RetrievalEvent,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from retrieval.types import Retriever, ScoredChunk, SearchFilters, SearchOptions

__all__ = ["AnswerSession"]

# How often the prompt may be re-fitted when the exact count disagrees with the planning count.
_MAX_REFITS = 3

# The OpenTelemetry API only: a no-op unless the process configured the SDK (core.wiring.configure_tracing).
_tracer = trace.get_tracer(__name__)


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
        """What the first retrieval searches with (:func:`generation.queries.standalone_query`)."""
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

    def ms_since(self, start: float) -> float:
        return (self.clock() - start) * 1000.0

    # --- retrieval and prompt -----------------------------------------------------------------

    async def retrieve(self, query: str) -> tuple[list[ScoredChunk], float]:
        """Ask the retriever; returns the hits (duplicates removed) and the milliseconds it took."""
        start = self.clock()
        found = await self.retriever.search(query, k=self.k, filters=self.filters, options=self.search_options)
        elapsed = self.ms_since(start)
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
        with _tracer.start_as_current_span("generation.prompt") as span:
            plan = await self._plan(hits)
            if span.is_recording():
                span.set_attributes(
                    {
                        "rag.prompt_tokens": plan.prompt_tokens,
                        "rag.sources": len(plan.sources),
                        "rag.max_model_len": self.max_model_len,
                        "rag.reserved_tokens": self.remaining_tokens,
                    }
                )
            return plan

    async def _plan(self, hits: Sequence[ScoredChunk] | None) -> ContextPlan:
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
        self.timings["prompt_ms"] += self.ms_since(start)
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
        with _tracer.start_as_current_span("generation.round") as span:
            if span.is_recording():
                span.set_attributes({"rag.round": round, "rag.reason": reason})
                if trigger:
                    span.set_attribute("rag.trigger_tokens", [t.token for t in trigger])
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

    def request_params(self, max_tokens: int, logprobs: int | None) -> GenerationParams:
        stop = tuple(dict.fromkeys((*self.params.stop, *self.template.stop)))
        return replace(self.params, max_tokens=max_tokens, stop=stop, logprobs=logprobs)

    def drop_carried_space(self, text: str) -> str:
        # The prompt's prefix lost its trailing whitespace (already shown to the user); the model
        # typically re-generates it at the start of its continuation.
        while self._skip_space and text and text[0].isspace():
            text = text[1:]
            self._skip_space -= 1
        if text:
            self._skip_space = 0
        return text

    def emit(self, text: str) -> list[AnswerEvent]:
        shown, citations = self.tracker.feed(text)
        events: list[AnswerEvent] = list(citations)
        if shown:
            if self._first_token is None:
                self._first_token = self.clock()
                self.timings["ttft_ms"] = (self._first_token - self._started) * 1000.0
            events.append(TokenEvent(shown))
        return events

    def account(self, usage: Usage | None, prompt_tokens: int, counted: int) -> int:
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
        # Not the current span: it stays open across yields, where the consumer's code runs.
        span = _tracer.start_span("llm.request", attributes={"rag.max_tokens": max_tokens})
        try:
            deltas = self.llm.stream(plan.prompt, self.request_params(max_tokens, logprobs))
            async with aclosing_iter(deltas) as stream:
                async for delta in stream:
                    if counted == 0 and span.is_recording():
                        span.set_attribute("rag.ttft_ms", self.ms_since(start))
                    usage = delta.usage or usage
                    finish_reason = delta.finish_reason or finish_reason
                    counted += len(delta.tokens) or (1 if delta.text else 0)
                    text = self.drop_carried_space(delta.text)
                    if text:
                        self.raw_answer += text
                        for event in self.emit(text):
                            yield event
                        if self.stop_on_repetition and repeated_unit(self.raw_answer) is not None:
                            # A sentence came back: a greedy loop. Leaving the ``async with``
                            # closes the request, so the server stops generating the repeats.
                            finish_reason = "repetition"
                            break
        finally:
            self.timings["generation_ms"] += self.ms_since(start)
            if span.is_recording():
                span.set_attributes(
                    {
                        "rag.prompt_tokens": plan.prompt_tokens,
                        "rag.completion_tokens": usage.completion_tokens if usage else counted,
                        "rag.finish_reason": finish_reason or "",
                    }
                )
            span.end()
        self.last_round_tokens = self.account(usage, plan.prompt_tokens, counted)
        self.generated_tokens += self.last_round_tokens
        self.finish_reason = finish_reason

    def finish(self) -> list[AnswerEvent]:
        """Flush the citation tracker and build the final :class:`DoneEvent`."""
        with _tracer.start_as_current_span("generation.citations") as span:
            text, citations = self.tracker.finish()
            events: list[AnswerEvent] = list(citations)
            if text:
                events.extend(self._emit_flushed(text))
            cited = self.tracker.citations
            if not cited and self.infer_missing_citations:
                cited = infer_citations(self.tracker.text, self.tracker.sources)
                events.extend(cited)
            if span.is_recording():
                span.set_attributes({"rag.citations": len(cited), "rag.inferred": any(c.inferred for c in cited)})
        self.timings["total_ms"] = self.ms_since(self._started)
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
