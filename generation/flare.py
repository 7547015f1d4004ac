"""FLARE: forward-looking active retrieval, the ``flare`` answer mode.

Jiang et al., "Active Retrieval Augmented Generation" (EMNLP 2023, arXiv 2305.06983), in the
FLARE-direct form the reference code (jzbjyb/FLARE, ``configs/2wikihop_flare_config.json``) runs:

1. Retrieve with the question (``look_ahead_pre_retrieval="first"``).
2. Generate a look-ahead of up to ``lookahead_tokens`` tokens with per-token log-probabilities
   and cut it to its first sentence (:func:`sentence_end`). The request is streamed and closed as
   soon as the first sentence is known to be complete, so the server does not spend time on the
   rest of the look-ahead.
3. If every judged token of the sentence has probability > θ, accept it. Otherwise retrieve
   with a query formed from the sentence and **replace** the sources with the new hits:

   - ``masked`` (the reference's ``look_ahead_mask_method="simple"``): the sentence without the
     tokens of probability ≤ β (the reference queries with the look-ahead only,
     ``only_use_look_ahead``; an empty masked sentence falls back to the question);
   - ``question`` (the paper's generated-question variant): for each low-confidence span (runs
     of tokens ≤ β, or ≤ θ when none is that low) ask the model for a question whose answer is
     that span, retrieve for each question, interleave the result lists and deduplicate.

4. Regenerate the sentence over the new sources (the first sentence of a fresh look-ahead) and
   accept it without a second check; continue from step 2 with the new sources.
5. Stop when the model ends its answer, when ``params.max_tokens`` answer tokens are used, or
   continue without retrieval once ``max_rounds`` re-retrievals happened (sentences are then
   accepted as they come).

Judged tokens are the sentence's content tokens: whitespace-only tokens and the tokens of
``[n]`` citation markers are left out, because which source number to cite says nothing about
whether the model knows the fact (and small models are always unsure of it).

Streaming: a sentence is emitted (token and citation events) only after it is accepted, so no
text that is later discarded ever reaches the client. Each re-retrieval is a
:class:`~generation.types.RetrievalEvent` with ``reason="low_confidence"``, its round, the query,
the chunks and ``trigger`` (the tokens at or below θ with their log-probabilities).

Prefix caching: every look-ahead of a round sends the same system prompt, sources and question
followed by the answer so far, so vLLM's automatic prefix caching serves all but the newest
sentence from cache; only a re-retrieval changes the prefix (after the system prompt).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from generation.client import aclosing_iter
from generation.context import ContextPlan
from generation.errors import LogprobsUnsupported
from generation.markers import iter_markers, strip_citations
from generation.sentences import sentence_end
from generation.session import AnswerSession
from generation.types import AnswerEvent, ChatMessage, Completion, RetrievalEvent, TokenLogprob, Usage
from retrieval.types import ScoredChunk

__all__ = [
    "MODEL_DEFAULTS",
    "QUERY_MODES",
    "FlareParams",
    "FlareSession",
    "LookAhead",
    "QueryMode",
    "SentenceJudgement",
    "cut_first_sentence",
    "default_flare_params",
    "interleave",
    "judged_tokens",
    "look_ahead",
    "low_confidence_spans",
    "masked_query",
    "question_prompt",
    "reconcile_tokens",
    "run_flare",
]

QueryMode = Literal["masked", "question"]
QUERY_MODES: tuple[QueryMode, ...] = ("masked", "question")

# Alternatives asked per token: the sampled token's own log-probability is what FLARE needs.
_LOGPROBS = 1
_MAX_QUERY_WORDS = 64  # the reference's max_query_length
_MAX_SPANS = 3  # generated questions per re-retrieval (each costs a model request)
_QUESTION_TOKENS = 40


@dataclass(frozen=True, slots=True)
class FlareParams:
    """Per-request parameters of the ``flare`` mode.

    Attributes:
        theta: A look-ahead sentence is accepted when every judged token has probability > θ;
            otherwise it triggers a re-retrieval. 0 never retrieves again, 1 always does.
        beta: ``masked`` queries drop tokens of probability ≤ β; ``question`` queries ask about
            spans of such tokens.
        lookahead_tokens: Most tokens generated for one look-ahead sentence.
        top_k: Chunks per retrieval; ``None`` uses the answer's ``k``.
        max_rounds: Most re-retrievals per answer; afterwards sentences are accepted unchecked.
        query_mode: ``masked`` or ``question`` (see the module docstring).

    Raises:
        ValueError: A value out of range.
    """

    theta: float = 0.8
    beta: float = 0.4
    lookahead_tokens: int = 64
    top_k: int | None = None
    max_rounds: int = 3
    query_mode: QueryMode = "masked"

    def __post_init__(self) -> None:
        if not (0.0 <= self.theta <= 1.0 and 0.0 <= self.beta <= 1.0):
            raise ValueError("theta and beta must be probabilities in [0, 1]")
        if self.lookahead_tokens < 1:
            raise ValueError("lookahead_tokens must be at least 1")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be at least 1 (or None)")
        if self.max_rounds < 0:
            raise ValueError("max_rounds must be >= 0")
        if self.query_mode not in QUERY_MODES:
            raise ValueError(f"query_mode must be one of {QUERY_MODES}, not {self.query_mode!r}")

    def with_overrides(self, **overrides: Any) -> FlareParams:
        """A copy with the given fields changed; ``None`` values keep the current value.

        Raises:
            ValueError: Unknown field or invalid value.
        """
        unknown = set(overrides) - set(self.to_dict())
        if unknown:
            raise ValueError(f"unknown FLARE parameters: {sorted(unknown)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base: FlareParams | None = None) -> FlareParams:
        """Parameters from a mapping (a stored default); missing fields come from ``base``.

        Unknown keys are ignored (stored defaults carry calibration notes next to the values).

        Raises:
            ValueError: A value out of range.
        """
        start = base or cls()
        known = {k: data[k] for k in start.to_dict() if k in data}
        return replace(start, **known)


MODEL_DEFAULTS: dict[str, FlareParams] = {
    # From `rag flare calibrate` on ../shared/eval/faq-dev-small, 40 questions (docs/flare.md), on
    # the INT8 W8A8 checkpoint `rag llm prepare` builds: with the reference's θ=0.8, 74% of its
    # look-ahead sentences would re-retrieve, with θ=0.312 40% do. (The earlier 4-bit checkpoint was
    # far less sure of itself and needed θ=0.03.)
    "smollm2-135m-instruct": FlareParams(theta=0.312, beta=0.156, lookahead_tokens=64, max_rounds=3),
}
"""Defaults per served model name; a calibrated file in the data dir takes precedence (``core/wiring.py``)."""


def default_flare_params(model: str) -> FlareParams:
    """The built-in defaults for a served model name (generic reference values for unknown models)."""
    return MODEL_DEFAULTS.get(model, FlareParams())


# --- the session ---------------------------------------------------------------------------------


class FlareSession(AnswerSession):
    """An :class:`AnswerSession` that can also generate without showing (look-aheads), make a
    look-ahead part of the answer, and send side requests (question generation)."""

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
            (``"".join(t.token for t in tokens) == text``; see :func:`reconcile_tokens`).
        """
        start = self.clock()
        params = self.request_params(max_tokens, logprobs)
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
                        by_delta.extend(align_tokens(delta.text, delta.tokens))
                    if delta.text:
                        text.append(delta.text)
                    if until is not None and (delta.text or delta.tokens):
                        so_far = "".join(t.token for t in tokens) if tokens else "".join(text)
                        if until(so_far):
                            finish_reason, cut = None, True
                            break
        finally:
            self.timings["generation_ms"] += self.ms_since(start)
        full_text, aligned = reconcile_tokens("".join(text), tokens, by_delta, cut=cut)
        completion = Completion(full_text, aligned, finish_reason, usage)
        counted = len(completion.tokens) or self.counter(completion.text)
        self.account(completion.usage, plan.prompt_tokens, counted)
        return completion

    async def side_request(self, prompt: str, *, max_tokens: int, stop: Sequence[str] = ()) -> Completion:
        """A request that is not part of the answer (FLARE's question generation), greedy.

        Usage and generation time are accounted like any other request of this answer.
        """
        start = self.clock()
        params = replace(
            self.request_params(max_tokens, None),
            temperature=0.0,
            stop=tuple(dict.fromkeys((*self.template.stop, *stop))),
        )
        try:
            completion = await self.llm.complete(prompt, params)
        finally:
            self.timings["generation_ms"] += self.ms_since(start)
        self.account(completion.usage, self.counter(prompt), len(completion.tokens) or self.counter(completion.text))
        return completion

    def accept(self, completion: Completion) -> list[AnswerEvent]:
        """Make a look-ahead part of the answer; returns the events to yield."""
        text = self.drop_carried_space(completion.text)
        self.raw_answer += text
        tokens = (
            completion.usage.completion_tokens
            if completion.usage
            else (len(completion.tokens) or self.counter(completion.text))
        )
        self.last_round_tokens = tokens
        self.generated_tokens += tokens
        self.finish_reason = completion.finish_reason
        return self.emit(text) if text else []


def reconcile_tokens(
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


def align_tokens(text: str, tokens: Sequence[TokenLogprob]) -> tuple[TokenLogprob, ...]:
    """Make one delta's tokens spell exactly its text (see :meth:`AnswerSession.generate`)."""
    if len(tokens) == 1:
        return (tokens[0] if tokens[0].token == text else replace(tokens[0], token=text),)
    if "".join(t.token for t in tokens) == text:
        return tuple(tokens)
    # Pieces that do not add up (byte fallback, a server's own spelling): the text goes to the
    # last token so offsets stay right and no token claims text it did not produce.
    return (*(replace(t, token="") for t in tokens[:-1]), replace(tokens[-1], token=text))


# --- confidence ---------------------------------------------------------------------------------


def _offsets(tokens: Sequence[TokenLogprob]) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    pos = 0
    for t in tokens:
        spans.append((pos, pos + len(t.token)))
        pos += len(t.token)
    return spans


def judged_tokens(tokens: Sequence[TokenLogprob]) -> list[int]:
    """Indexes of the tokens whose confidence counts: not whitespace, not in a ``[n]`` marker, logprob known."""
    text = "".join(t.token for t in tokens)
    markers = [(start, end) for start, end, _ in iter_markers(text)]
    judged: list[int] = []
    for index, (token, (lo, hi)) in enumerate(zip(tokens, _offsets(tokens), strict=True)):
        stripped = token.token.strip()
        if not stripped or math.isnan(token.logprob):
            continue
        content_lo = lo + (len(token.token) - len(token.token.lstrip()))
        content_hi = hi - (len(token.token) - len(token.token.rstrip()))
        if any(m_lo <= content_lo and content_hi <= m_hi for m_lo, m_hi in markers):
            continue
        judged.append(index)
    return judged


@dataclass(frozen=True, slots=True)
class LookAhead:
    """A look-ahead cut to its first sentence.

    Attributes:
        tokens: The sentence's tokens (their texts concatenate to :attr:`text`).
        ends_answer: The model ended its answer within this sentence.
        finish_reason: The request's finish reason (``None`` when it was closed at the sentence end).
    """

    tokens: tuple[TokenLogprob, ...]
    ends_answer: bool
    finish_reason: str | None

    @property
    def text(self) -> str:
        """The sentence as generated (leading whitespace included)."""
        return "".join(t.token for t in self.tokens)

    @property
    def judged(self) -> tuple[TokenLogprob, ...]:
        """The tokens whose confidence counts (:func:`judged_tokens`)."""
        return tuple(self.tokens[i] for i in judged_tokens(self.tokens))

    @property
    def min_prob(self) -> float:
        """Lowest probability among judged tokens (1.0 when none is judged)."""
        return min((t.prob for t in self.judged), default=1.0)

    def weak(self, theta: float) -> tuple[TokenLogprob, ...]:
        """Judged tokens with probability ≤ ``theta`` (what triggers a re-retrieval)."""
        return tuple(t for t in self.judged if t.prob <= theta)

    def completion(self) -> Completion:
        """As a completion for :meth:`AnswerSession.accept` (its tokens count against the budget)."""
        return Completion(self.text, self.tokens, self.finish_reason if self.ends_answer else None)


def cut_first_sentence(completion: Completion) -> LookAhead | None:
    """The first sentence of a look-ahead completion (``None`` when it produced nothing).

    The cut is at token granularity: every token that starts before the sentence end belongs
    to the sentence, so the accepted text is exactly what the model generated and the next
    look-ahead continues from a token boundary.
    """
    tokens = completion.tokens
    if not tokens or not completion.text:
        return None
    text = "".join(t.token for t in tokens)
    stopped = completion.finish_reason is not None and completion.finish_reason != "length"
    end = sentence_end(text, final=stopped)
    if end is None:
        # Ran out of look-ahead tokens (or was cut without a complete sentence): take it all.
        end = len(text)
    count = sum(1 for lo, _hi in _offsets(tokens) if lo < end) or len(tokens)
    rest = "".join(t.token for t in tokens[count:])
    ends_answer = stopped and not rest.strip()
    return LookAhead(tokens[:count], ends_answer, completion.finish_reason)


# --- queries --------------------------------------------------------------------------------------


def _clean_query(text: str) -> str:
    words = strip_citations(text).split()
    return " ".join(words[:_MAX_QUERY_WORDS])


def masked_query(tokens: Sequence[TokenLogprob], beta: float) -> str:
    """The sentence without its tokens of probability ≤ β (citation markers and extra spaces removed).

    Tokens without a reported log-probability are kept.
    """
    kept = "".join(t.token for t in tokens if math.isnan(t.logprob) or t.prob > beta)
    return _clean_query(kept)


def low_confidence_spans(look: LookAhead, beta: float, theta: float, limit: int = _MAX_SPANS) -> list[str]:
    """Spans of the sentence the model is unsure of, widened to whole words, in order.

    A span is a run of judged tokens with probability ≤ β; when no token is that low, the runs at
    or below θ are used instead (the sentence was triggered by θ).
    """
    judged = judged_tokens(look.tokens)
    threshold = beta if any(look.tokens[i].prob <= beta for i in judged) else theta
    low = {i for i in judged if look.tokens[i].prob <= threshold}
    text = look.text
    offsets = _offsets(look.tokens)
    spans: list[str] = []
    index = 0
    while index < len(look.tokens):
        if index not in low:
            index += 1
            continue
        last = index
        while last + 1 in low or (last + 1 < len(look.tokens) and _continues_word(look.tokens[last + 1].token)):
            last += 1
        lo, hi = offsets[index][0], offsets[last][1]
        while lo < hi and text[lo].isspace():
            lo += 1
        while lo > 0 and not text[lo - 1].isspace():
            lo -= 1
        span = _clean_query(text[lo:hi]).strip(".,;:!?\"'()")
        if span and any(c.isalnum() for c in span) and span not in spans:
            spans.append(span)
        index = last + 1
    return spans[:limit]


def _continues_word(token: str) -> bool:
    return bool(token) and not token[0].isspace() and token[0].isalnum()


def question_prompt(question: str, answer_so_far: str, span: str) -> list[ChatMessage]:
    """The conversation that asks the model for a question whose answer is ``span``."""
    context = _clean_query(answer_so_far) if answer_so_far.strip() else ""
    body = f"User question: {question.strip()}\nAnswer: {context}\n\n" if context else f"User question: {question}\n\n"
    return [
        ChatMessage("system", "You write short search questions."),
        ChatMessage(
            "user",
            f'{body}Write one question, using the text above, whose answer is "{span}". Reply with the question only.',
        ),
    ]


def interleave(results: Sequence[Sequence[ScoredChunk]], k: int) -> list[ScoredChunk]:
    """Round-robin merge of several ranked lists, duplicates dropped, at most ``k``, re-ranked from 1."""
    merged: list[ScoredChunk] = []
    seen: set[int] = set()
    depth = max((len(r) for r in results), default=0)
    for rank in range(depth):
        for result in results:
            if rank < len(result) and result[rank].chunk.id not in seen:
                seen.add(result[rank].chunk.id)
                merged.append(replace(result[rank], rank=len(merged) + 1))
    return merged[:k]


# --- the runner -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SentenceJudgement:
    """One look-ahead sentence as FLARE judged it (given to ``flare_observer``).

    Attributes:
        text: The sentence.
        probs: Probabilities of its judged tokens, in order.
        min_prob: Lowest of ``probs`` (1.0 when there are none).
        kind: ``"lookahead"`` (judged against θ) or ``"regenerated"`` (after a re-retrieval; accepted).
        triggered: This look-ahead caused a re-retrieval.
        round: Re-retrievals done before this sentence was generated.
        over_limit: Below θ but not re-retrieved because ``max_rounds`` was reached.
    """

    text: str
    probs: tuple[float, ...]
    min_prob: float
    kind: Literal["lookahead", "regenerated"]
    triggered: bool
    round: int
    over_limit: bool = False
    tokens: tuple[TokenLogprob, ...] = field(default=(), repr=False)


def _judgement(
    look: LookAhead, kind: Literal["lookahead", "regenerated"], *, triggered: bool, round: int, over_limit: bool
) -> SentenceJudgement:
    judged = look.judged
    return SentenceJudgement(
        text=look.text,
        probs=tuple(t.prob for t in judged),
        min_prob=look.min_prob,
        kind=kind,
        triggered=triggered,
        round=round,
        over_limit=over_limit,
        tokens=look.tokens,
    )


def _sentence_complete(text: str) -> bool:
    # Stop reading once the first sentence is known to be over (its end and one more character).
    end = sentence_end(text, final=False)
    return end is not None and end < len(text)


async def look_ahead(session: FlareSession, plan: ContextPlan, params: FlareParams) -> LookAhead | None:
    """Generate (hidden) and cut the next sentence; ``None`` when the budget is spent or nothing came."""
    step = min(params.lookahead_tokens, session.remaining_tokens)
    if step <= 0:
        return None
    completion = await session.generate(plan, max_tokens=step, logprobs=_LOGPROBS, until=_sentence_complete)
    if completion.text and not completion.tokens:
        raise LogprobsUnsupported("the model server returned no log-probabilities; FLARE needs them")
    return cut_first_sentence(completion)


async def _question_retrieval(
    session: FlareSession, look: LookAhead, params: FlareParams
) -> tuple[str, list[ScoredChunk], float]:
    spans = low_confidence_spans(look, params.beta, params.theta)
    prefix = session.raw_answer + look.text
    questions: list[str] = []
    for span in spans:
        prompt = session.template.render(question_prompt(session.question, prefix, span))
        generated = await session.side_request(prompt, max_tokens=_QUESTION_TOKENS, stop=("\n",))
        lines = generated.text.strip().splitlines()  # the first line, whether or not the server honours stop
        asked = _clean_query(lines[0]) if lines else ""
        if asked and asked not in questions:
            questions.append(asked)
    if not questions:
        questions = [masked_query(look.tokens, params.beta) or session.question]
    results: list[list[ScoredChunk]] = []
    elapsed = 0.0
    for asked in questions:
        hits, ms = await session.retrieve(asked)
        results.append(hits)
        elapsed += ms
    return "\n".join(questions), interleave(results, session.k), elapsed


async def _reretrieve(
    session: FlareSession, look: LookAhead, params: FlareParams, round: int
) -> tuple[RetrievalEvent, ContextPlan]:
    trigger = look.weak(params.theta)
    if params.query_mode == "question":
        query, hits, elapsed = await _question_retrieval(session, look, params)
        return await session.ground(
            query, round=round, reason="low_confidence", trigger=trigger, hits=hits, elapsed_ms=elapsed
        )
    query = masked_query(look.tokens, params.beta) or session.question
    return await session.ground(query, round=round, reason="low_confidence", trigger=trigger)


async def run_flare(
    session: FlareSession,
    *,
    params: FlareParams,
    observer: Callable[[SentenceJudgement], None] | None = None,
) -> AsyncIterator[AnswerEvent]:
    """``flare`` mode: the loop described in the module docstring.

    Raises:
        LogprobsUnsupported: The backend cannot report token log-probabilities.
    """
    if not session.llm.supports_logprobs:
        raise LogprobsUnsupported(f"the {session.llm.model!r} backend does not report log-probabilities")

    def observe(judgement: SentenceJudgement) -> None:
        if observer is not None:
            observer(judgement)

    event, plan = await session.ground(session.query, round=0, reason="initial")
    yield event
    rounds = 0
    while True:
        look = await look_ahead(session, plan, params)
        if look is None:
            break
        weak = look.weak(params.theta)
        triggered = bool(weak) and rounds < params.max_rounds
        over_limit = bool(weak) and not triggered
        observe(_judgement(look, "lookahead", triggered=triggered, round=rounds, over_limit=over_limit))
        if triggered:
            rounds += 1
            event, plan = await _reretrieve(session, look, params, rounds)
            yield event
            look = await look_ahead(session, plan, params)
            if look is None:
                break
            observe(_judgement(look, "regenerated", triggered=False, round=rounds, over_limit=False))
        for answer_event in session.accept(look.completion()):
            yield answer_event
        if look.ends_answer or not look.text.strip() or session.remaining_tokens <= 0:
            break
        plan = await session.plan()
    if session.finish_reason is None:
        session.finish_reason = "length" if session.remaining_tokens <= 0 else "stop"
