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

``extractive``
    Retrieve once and generate nothing: the grounding guard (:mod:`generation.guard`) answers with
    the source sentences that best answer the question, each cited. Needs no model server.

``flare`` (active retrieval, Jiang et al. 2023; :mod:`generation.flare`)
    Retrieve with the question, then sentence by sentence: generate a look-ahead sentence with
    token log-probabilities; accept it if every token is confident (probability > θ), else
    retrieve with it (masked or generated-question query), regenerate it over the new sources
    and accept that. Sentences are emitted only once accepted.

Grounding: with ``grounding`` set, :func:`answer` runs every mode's events through
:func:`generation.guard.guard_stream` (support verdicts, re-pointed citations, fallback to the
extractive answer, abstention); it is the only place the guard is hooked in.

Extending: a mode is a runner over :class:`AnswerSession` (``ground`` / ``stream`` /
``generate`` + ``accept``), registered in :func:`_runner`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

from generation.client import LLMClient, aclosing_iter
from generation.errors import GenerationError
from generation.flare import FlareParams, FlareSession, SentenceJudgement, default_flare_params, run_flare
from generation.guard import GroundingParams, guard_stream
from generation.prompts import CHATML, SYSTEM_PROMPT, ChatTemplate
from generation.queries import continuation_query, standalone_query
from generation.session import AnswerSession
from generation.types import (
    ANSWER_MODES,
    AnswerEvent,
    AnswerMode,
    ChatMessage,
    ErrorEvent,
    GenerationParams,
    RetrievalEvent,
)
from retrieval.types import Embedder, RetrievalError, Retriever, SearchFilters, SearchOptions

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

ModeRunner = Callable[["AnswerSession"], AsyncIterator[AnswerEvent]]


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
    if mode == "extractive":
        return run_extractive
    if mode == "interval":
        return functools.partial(run_interval, interval_tokens=interval_tokens, query_tail_words=query_tail_words)
    if mode == "flare":
        return functools.partial(run_flare, params=flare or FlareParams(), observer=flare_observer)
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
    if mode == "extractive" and grounding is None:
        grounding = GroundingParams(policy="strict")
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
    session_class = FlareSession if mode == "flare" else AnswerSession
    session = session_class(
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
        logger.warning("answer failed in retrieval", extra={"mode": mode, "code": exc.code, "error": str(exc)})
        yield ErrorEvent(code=exc.code, message=str(exc), retryable=exc.retryable)
    except Exception:
        # A bug, not a condition: log it with its traceback, and still end the stream with an
        # error event so the client is never left with a silently truncated answer.
        logger.exception("answer failed unexpectedly", extra={"mode": mode})
        yield ErrorEvent(code="internal_error", message="internal error while answering", retryable=False)
