"""FLARE over a scripted LLM with chosen log-probabilities: every branch of the loop, and what reaches the client."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from app.schemas.events import wire_dict
from generation.flare import (
    FlareParams,
    LookAhead,
    SentenceJudgement,
    cut_first_sentence,
    default_flare_params,
    interleave,
    judged_tokens,
    low_confidence_spans,
    masked_query,
    reconcile_tokens,
)
from generation.rag import ANSWER_MODES, answer
from generation.sentences import sentence_end
from generation.types import (
    AnswerEvent,
    CitationEvent,
    Completion,
    DoneEvent,
    ErrorEvent,
    GenerationParams,
    RetrievalEvent,
    StreamDelta,
    TokenEvent,
    TokenLogprob,
)
from retrieval.types import ScoredChunk
from tests.unit.fakes_llm import FakeLLM, FakeRetriever, assistant_prefix, make_chunk

pytestmark = pytest.mark.unit

_E = TypeVar("_E")

PARIS = make_chunk(1, "Paris is the capital of France.", title="France")
SEINE = make_chunk(2, "The Seine flows through Paris.", title="Rivers")
LOUVRE = make_chunk(3, "The Louvre is a museum in Paris.", title="Museums")
ROME = make_chunk(4, "Rome is the capital of Italy.", title="Italy")
PARAMS = GenerationParams(max_tokens=64, temperature=0.0)
SURE = -0.01  # p = 0.99
QUESTION = "Tell me about Paris."


def lp(p: float) -> float:
    return math.log(p)


def sure(*tokens: str) -> list[tuple[str, float]]:
    return [(t, SURE) for t in tokens]


async def run(events: AsyncIterator[AnswerEvent]) -> list[AnswerEvent]:
    return [e async for e in events]


def of_type(events: Sequence[AnswerEvent], kind: type[_E]) -> list[_E]:
    return [e for e in events if isinstance(e, kind)]


def flare_answer(llm: FakeLLM, retriever: FakeRetriever, params: FlareParams, **kwargs: Any) -> Any:
    return answer(
        QUESTION, retriever=retriever, llm=llm, mode="flare", params=kwargs.pop("gen", PARAMS), flare=params, **kwargs
    )


# --- sentence boundaries ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "final", "sentence"),
    [
        ("Paris is the capital [1]. It", False, "Paris is the capital [1]."),
        ("It costs 3.5 dollars. Yes", False, "It costs 3.5 dollars."),
        ("It is 3.", False, None),  # may still become 3.5
        ("It is 3.", True, "It is 3."),
        ("It is 3. ", False, None),  # a citation marker may still follow
        ("e.g. this works. Ok", False, "e.g. this works."),
        ("France. [1] Next", False, "France. [1]"),
        ("France. [1, 2] Next", False, "France. [1, 2]"),
        ("France. [1", False, None),  # never cut inside a marker
        ("  \nHello world\nNext", False, "  \nHello world"),
        ("1. Install it. Then", False, "1. Install it."),
        ("Use os.path.join. ok", False, "Use os.path.join."),
        ("Dr. Who is here! Yes", False, "Dr. Who is here!"),
        ('He said "stop." Then', False, 'He said "stop."'),
        ("Steps:\n1. x", False, "Steps:"),
        ("no end", True, "no end"),
        ("no end", False, None),
        ("  \n ", True, None),
    ],
)
def test_sentence_end(text: str, final: bool, sentence: str | None) -> None:
    end = sentence_end(text, final=final)
    assert (None if end is None else text[:end]) == sentence


def test_cut_first_sentence_keeps_whole_tokens_and_knows_the_answer_end() -> None:
    tokens = tuple(TokenLogprob(t, SURE) for t in ["Hi", " there", ".\n", "Next", " one", "."])
    cut = cut_first_sentence(Completion("".join(t.token for t in tokens), tokens, None))
    assert cut is not None and cut.text == "Hi there.\n" and not cut.ends_answer
    last = cut_first_sentence(Completion("Bye.", (TokenLogprob("Bye", SURE), TokenLogprob(".", SURE)), "stop"))
    assert last is not None and last.text == "Bye." and last.ends_answer
    assert cut_first_sentence(Completion("", (), "stop")) is None


def test_judged_tokens_skip_whitespace_markers_and_unknown() -> None:
    tokens = [
        TokenLogprob("Paris", lp(0.9)),
        TokenLogprob(" [", lp(0.01)),
        TokenLogprob("1", lp(0.01)),
        TokenLogprob("]", lp(0.01)),
        TokenLogprob(".", lp(0.9)),
        TokenLogprob("\n", lp(0.01)),
        TokenLogprob(" x", math.nan),
    ]
    assert judged_tokens(tokens) == [0, 4]
    look = LookAhead(tuple(tokens), ends_answer=False, finish_reason=None)
    assert look.min_prob == pytest.approx(0.9)
    assert look.weak(0.95) == (tokens[0], tokens[4])


def test_masked_query_drops_tokens_at_or_below_beta() -> None:
    tokens = [
        TokenLogprob("The", lp(0.9)),
        TokenLogprob(" Louvre", lp(0.1)),
        TokenLogprob(" is", lp(0.9)),
        TokenLogprob(" in", lp(0.29)),  # below β: dropped
        TokenLogprob(" Rome", lp(0.35)),
        TokenLogprob(" [1]", lp(0.9)),
        TokenLogprob(".", lp(0.9)),
    ]
    assert masked_query(tokens, 0.3) == "The is Rome."


def test_low_confidence_spans_widen_to_words() -> None:
    tokens = (
        TokenLogprob("It", lp(0.9)),
        TokenLogprob(" was", lp(0.9)),
        TokenLogprob(" Jo", lp(0.1)),
        TokenLogprob("hann", lp(0.9)),
        TokenLogprob(" in", lp(0.9)),
        TokenLogprob(" 17", lp(0.2)),
        TokenLogprob("50", lp(0.2)),
        TokenLogprob(".", lp(0.9)),
    )
    look = LookAhead(tokens, ends_answer=False, finish_reason=None)
    assert low_confidence_spans(look, beta=0.3, theta=0.5) == ["Johann", "1750"]
    # Nothing at or below β: the spans at or below θ are used.
    assert low_confidence_spans(look, beta=0.05, theta=0.5) == ["Johann", "1750"]


def test_interleave_round_robin_dedupes_and_reranks() -> None:
    a = [ScoredChunk(LOUVRE, 1.0, 1), ScoredChunk(PARIS, 0.5, 2)]
    b = [ScoredChunk(ROME, 1.0, 1), ScoredChunk(LOUVRE, 0.5, 2), ScoredChunk(SEINE, 0.1, 3)]
    merged = interleave([a, b], k=3)
    assert [(h.chunk.id, h.rank) for h in merged] == [(3, 1), (4, 2), (1, 3)]


def test_params_validate_and_override() -> None:
    with pytest.raises(ValueError):
        FlareParams(theta=1.5)
    with pytest.raises(ValueError):
        FlareParams(query_mode="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FlareParams().with_overrides(gamma=1)
    p = FlareParams().with_overrides(theta=0.1, beta=None)
    assert (p.theta, p.beta) == (0.1, 0.4)
    assert FlareParams.from_dict({"theta": 0.2, "note": "x"}, base=p) == p.with_overrides(theta=0.2)
    assert default_flare_params("unknown-model") == FlareParams()
    assert "flare" in ANSWER_MODES


# --- the loop ---------------------------------------------------------------------------------------------


async def test_confident_sentence_is_accepted_without_retrieval() -> None:
    llm = FakeLLM()
    # Citation-marker tokens are unsure (they always are for small models) but are not judged.
    llm.enqueue([*sure("Paris", " is", " the", " capital"), (" [", -3.0), ("1", -3.0), ("]", -3.0), *sure(".", " It")])
    llm.enqueue(sure(" It", " has", " the", " Seine", "."), finish_reason="stop")
    retriever = FakeRetriever([PARIS, SEINE])
    seen: list[SentenceJudgement] = []
    events = await run(flare_answer(llm, retriever, FlareParams(theta=0.8), flare_observer=seen.append))

    assert retriever.queries == [QUESTION]
    assert len(of_type(events, RetrievalEvent)) == 1
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.answer == "Paris is the capital [1]. It has the Seine."
    assert done.mode == "flare" and done.finish_reason == "stop"
    assert [c.n for c in done.citations] == [1]
    assert [j.kind for j in seen] == ["lookahead", "lookahead"] and not any(j.triggered for j in seen)
    # Look-aheads ask for log-probabilities; the second continues the accepted sentence.
    assert [c.params.logprobs for c in llm.calls] == [1, 1]
    assert assistant_prefix(llm.calls[1].prompt) == "Paris is the capital [1]."
    # The first look-ahead was closed as soon as its sentence was complete (the " It" after it).
    assert llm.open_streams == 0 and llm.closed_streams == 2
    assert done.usage.completion_tokens == 9 + 5  # every token the server generated, discarded ones included


async def test_low_confidence_token_triggers_retrieval_with_masked_query() -> None:
    llm = FakeLLM()
    llm.enqueue(
        [
            ("The", SURE),
            (" Louvre", lp(0.1)),
            (" is", SURE),
            (" in", SURE),
            (" Rome", lp(0.4)),
            (".", SURE),
            (" X", SURE),
        ]
    )
    llm.enqueue(sure("The", " Louvre", " is", " in", " Paris", " [", "2", "]", "."), finish_reason="stop")
    retriever = FakeRetriever()
    retriever.enqueue([PARIS])
    retriever.enqueue([LOUVRE])
    events = await run(flare_answer(llm, retriever, FlareParams(theta=0.5, beta=0.3)))

    assert retriever.queries == [QUESTION, "The is in Rome."]
    _first, second = of_type(events, RetrievalEvent)
    assert (second.round, second.reason, second.query) == (1, "low_confidence", "The is in Rome.")
    assert second.trigger is not None
    assert [(t.token, round(t.prob, 2)) for t in second.trigger] == [(" Louvre", 0.1), (" Rome", 0.4)]
    assert [sc.chunk.id for sc in second.chunks] == [3] and second.numbers == (2,)  # numbering continues
    wire = wire_dict(second)
    assert wire["trigger"][0]["token"] == " Louvre" and wire["chunk_ids"] == [3]
    # The sources were replaced: the regeneration prompt shows the Louvre, not France.
    regen = llm.calls[1].prompt
    assert "[2] Museums" in regen and "[1] France" not in regen
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.answer == "The Louvre is in Paris [2]."
    assert [c.chunk_id for c in done.citations] == [3]
    assert "Rome" not in "".join(e.text for e in of_type(events, TokenEvent))


async def test_question_variant_asks_per_span_and_interleaves() -> None:
    llm = FakeLLM()
    llm.enqueue(
        [
            ("The", SURE),
            (" Louvre", lp(0.1)),
            (" is", SURE),
            (" in", SURE),
            (" Rome", lp(0.2)),
            (".", SURE),
            (" X", SURE),
        ]
    )
    llm.enqueue_text("Which museum is it?")
    llm.enqueue_text("Which city is it in?\nignored")
    llm.enqueue(sure("The", " Louvre", " is", " in", " Paris", "."), finish_reason="stop")
    retriever = FakeRetriever()
    retriever.enqueue([PARIS])
    retriever.enqueue([LOUVRE, PARIS])
    retriever.enqueue([ROME, LOUVRE])
    events = await run(flare_answer(llm, retriever, FlareParams(theta=0.5, beta=0.3, query_mode="question")))

    assert retriever.queries == [QUESTION, "Which museum is it?", "Which city is it in?"]
    question_calls = llm.calls[1:3]
    assert '"Louvre"' in question_calls[0].prompt and '"Rome"' in question_calls[1].prompt
    assert all(c.params.logprobs is None and "\n" in c.params.stop for c in question_calls)
    second = of_type(events, RetrievalEvent)[1]
    assert second.query == "Which museum is it?\nWhich city is it in?"
    assert [sc.chunk.id for sc in second.chunks] == [3, 4, 1]  # interleaved, deduplicated
    assert second.numbers == (2, 3, 1)  # PARIS keeps its number
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.answer == "The Louvre is in Paris."


async def test_round_limit_accepts_unsure_sentences_without_retrieval() -> None:
    unsure = lp(0.1)
    llm = FakeLLM()
    llm.enqueue([("One", unsure), (".", SURE), (" Two", SURE)])  # look-ahead 1: triggers round 1
    llm.enqueue(sure("Uno", ".", " Dos"))  # regenerated
    llm.enqueue([(" Two", unsure), (".", SURE)], finish_reason="stop")  # look-ahead 2: over the limit
    retriever = FakeRetriever([PARIS])
    seen: list[SentenceJudgement] = []
    events = await run(flare_answer(llm, retriever, FlareParams(theta=0.5, max_rounds=1), flare_observer=seen.append))
    assert [r.round for r in of_type(events, RetrievalEvent)] == [0, 1]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.answer == "Uno. Two."
    assert [(j.kind, j.triggered, j.over_limit) for j in seen] == [
        ("lookahead", True, False),
        ("regenerated", False, False),
        ("lookahead", False, True),
    ]


async def test_max_rounds_zero_never_reretrieves_and_theta_zero_never_triggers() -> None:
    for params in (FlareParams(theta=0.9, max_rounds=0), FlareParams(theta=0.0)):
        llm = FakeLLM()
        llm.enqueue([("Maybe", lp(0.01)), (".", lp(0.01))], finish_reason="stop")
        retriever = FakeRetriever([PARIS])
        events = await run(flare_answer(llm, retriever, params))
        assert len(of_type(events, RetrievalEvent)) == 1
        assert isinstance(events[-1], DoneEvent) and events[-1].answer == "Maybe."


async def test_token_budget_bounds_look_aheads_and_ends_the_answer() -> None:
    llm = FakeLLM()
    llm.enqueue(sure("One", " two", ".", " Three"))
    llm.enqueue(sure(" Four", " five", " six", " seven", " eight", " nine"))  # no sentence end: cut by the budget
    retriever = FakeRetriever([PARIS])
    events = await run(flare_answer(llm, retriever, FlareParams(theta=0.5), gen=GenerationParams(max_tokens=6)))
    assert [c.params.max_tokens for c in llm.calls] == [6, 3]  # the second asks only for what is left
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.answer == "One two. Four five six"
    assert done.finish_reason == "length"


async def test_look_ahead_length_is_the_lookahead_tokens_parameter() -> None:
    llm = FakeLLM()
    llm.enqueue(sure("a", " b", " c", " d"), finish_reason="stop")
    retriever = FakeRetriever([PARIS])
    await run(flare_answer(llm, retriever, FlareParams(theta=0.5, lookahead_tokens=3)))
    assert llm.calls[0].params.max_tokens == 3


async def test_streaming_order_never_leaks_unaccepted_text() -> None:
    llm = FakeLLM(token_delay=0.001)
    llm.enqueue([*sure("Paris", " is", " big", "."), *sure(" Next")])  # accepted
    llm.enqueue([(" It", SURE), (" has", SURE), (" Rome", lp(0.05)), (".", SURE), (" More", SURE)])  # rejected
    llm.enqueue(sure(" It", " has", " the", " Seine", " [", "2", "]", "."), finish_reason="stop")  # regenerated
    retriever = FakeRetriever()
    retriever.enqueue([PARIS])
    retriever.enqueue([SEINE])
    events: list[AnswerEvent] = []
    streams_when_emitted: list[tuple[int, int]] = []
    async for event in flare_answer(llm, retriever, FlareParams(theta=0.5)):
        events.append(event)
        if isinstance(event, TokenEvent):
            # A sentence reaches the client only after the request that produced it was closed.
            streams_when_emitted.append((llm.open_streams, len(llm.calls)))
    assert not of_type(events, ErrorEvent)
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RetrievalEvent" and kinds[-1] == "DoneEvent"
    second = kinds.index("RetrievalEvent", 1)
    shown_before = "".join(e.text for e in events[:second] if isinstance(e, TokenEvent))
    assert shown_before == "Paris is big."  # the rejected look-ahead was not shown before re-retrieval
    shown = "".join(e.text for e in of_type(events, TokenEvent))
    assert "Rome" not in shown and "More" not in shown and "Next" not in shown
    done = events[-1]
    assert isinstance(done, DoneEvent) and shown == done.answer == "Paris is big. It has the Seine [2]."
    assert all(open_streams == 0 for open_streams, _ in streams_when_emitted)
    # The citation event comes right before the token event with its marker.
    index = events.index(of_type(events, CitationEvent)[0])
    assert isinstance(events[index + 1], TokenEvent) and "[2]" in events[index + 1].text  # type: ignore[union-attr]


async def test_backend_without_logprobs_is_refused() -> None:
    llm = FakeLLM(supports_logprobs=False)
    events = await run(flare_answer(llm, FakeRetriever([PARIS]), FlareParams()))
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "logprobs_unsupported"
    assert llm.calls == []


async def test_top_k_overrides_k() -> None:
    llm = FakeLLM()
    llm.enqueue(sure("Ok", "."), finish_reason="stop")
    retriever = FakeRetriever([PARIS, SEINE, LOUVRE, ROME])
    events = await run(flare_answer(llm, retriever, FlareParams(top_k=2), k=5))
    assert retriever.ks == [2] and len(of_type(events, RetrievalEvent)[0].chunks) == 2


async def test_closing_the_answer_closes_the_look_ahead() -> None:
    llm = FakeLLM(token_delay=0.001)
    llm.enqueue(sure("One", "."), finish_reason="stop")
    stream = flare_answer(llm, FakeRetriever([PARIS]), FlareParams())
    first = await stream.__anext__()
    assert isinstance(first, RetrievalEvent)
    await stream.aclose()  # type: ignore[attr-defined]
    assert llm.open_streams == 0


# --- defaults per model (composition root) ---------------------------------------------------------


def test_calibrated_file_overrides_builtin_defaults(make_settings: Any, tmp_path: Path) -> None:
    from core.wiring import answer_defaults, flare_defaults, flare_defaults_path, save_flare_defaults

    settings = make_settings(llm={"model": "smollm2-135m-instruct"})
    assert flare_defaults(settings) == default_flare_params("smollm2-135m-instruct")
    path = save_flare_defaults(settings, FlareParams(theta=0.03, beta=0.015), {"sentences": 10})
    assert path == flare_defaults_path(settings) == settings.data_dir / "flare" / "smollm2-135m-instruct.json"
    assert json.loads(path.read_text())["calibration"] == {"sentences": 10}
    assert flare_defaults(settings).theta == 0.03
    assert answer_defaults(settings).kwargs()["flare"].theta == 0.03
    path.write_text("{not json")
    assert flare_defaults(settings) == default_flare_params("smollm2-135m-instruct")


# --- servers that hold streamed text back (vLLM does, while it could still become a stop string) ----


class LaggingLLM(FakeLLM):
    """Streams each token's log-probability at once but its text ``lag`` characters late, like vLLM."""

    lag: int = 12

    def stream(self, prompt: str, params: GenerationParams) -> AsyncIterator[StreamDelta]:
        inner = super().stream(prompt, params)

        async def lagged() -> AsyncIterator[StreamDelta]:
            pending = ""
            try:
                async for delta in inner:
                    pending += delta.text
                    if delta.finish_reason or delta.usage:
                        yield StreamDelta(pending, delta.tokens, delta.finish_reason, delta.usage)
                        pending = ""
                        continue
                    release = max(0, len(pending) - self.lag)
                    yield StreamDelta(pending[:release], delta.tokens)
                    pending = pending[release:]
            finally:
                await inner.aclose()  # type: ignore[attr-defined]

        return lagged()


def test_reconcile_tokens_with_held_back_text() -> None:
    tokens = [TokenLogprob("Hi", SURE), TokenLogprob(" there", SURE), TokenLogprob(".", SURE)]
    assert reconcile_tokens("Hi there.", tokens, (), cut=False) == ("Hi there.", tuple(tokens))
    # Cut by us while the server held "re." back: the tokens say what was generated.
    assert reconcile_tokens("Hi the", tokens, (), cut=True) == ("Hi there.", tuple(tokens))
    # Finished by itself with a stop string trimmed from the text: the tokens are trimmed too.
    text, kept = reconcile_tokens("Hi th", tokens, (), cut=False)
    assert text == "Hi th" and [t.token for t in kept] == ["Hi", " th"]
    # Spellings that do not add up: each delta's text goes to its tokens (a late tail to the last).
    raw = [TokenLogprob("bytes:\\xc3", SURE), TokenLogprob("!", SURE)]
    by_delta = (TokenLogprob("é", SURE),)
    assert reconcile_tokens("é!", raw, by_delta, cut=False) == ("é!", (TokenLogprob("é!", SURE),))


async def test_flare_judges_the_right_tokens_when_the_server_holds_text_back() -> None:
    llm = LaggingLLM()
    llm.enqueue([*sure("Paris", " is", " big", "."), (" Rome", lp(0.01)), *sure(" is", " old", ".")])
    llm.enqueue(sure(" Rome", " is", " old", "."), finish_reason="stop")
    retriever = FakeRetriever([PARIS])
    seen: list[SentenceJudgement] = []
    events = await run(flare_answer(llm, retriever, FlareParams(theta=0.5), flare_observer=seen.append))
    # The unsure " Rome" starts the second sentence: the first is accepted without retrieval.
    assert len(of_type(events, RetrievalEvent)) == 1
    assert [j.text for j in seen] == ["Paris is big.", " Rome is old."]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.answer == "Paris is big. Rome is old."
