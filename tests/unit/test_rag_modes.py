"""Answer modes over a scripted LLM and retriever: event order, retrieval rounds, errors, cancellation."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

import pytest

from app.schemas.events import wire_dict
from generation.errors import LLMUnavailable
from generation.rag import answer, continuation_query
from generation.types import (
    AnswerEvent,
    ChatMessage,
    CitationEvent,
    DoneEvent,
    ErrorEvent,
    GenerationParams,
    RetrievalEvent,
    TokenEvent,
)
from retrieval.types import Chunk, IndexCorruptError, RetrievalError
from tests.unit.fakes_llm import FakeCall, FakeLLM, FakeRetriever, assistant_prefix, make_chunk, split_tokens

pytestmark = pytest.mark.unit

_E = TypeVar("_E")

PARIS = make_chunk(1, "Paris is the capital of France.", title="France")
SEINE = make_chunk(2, "The Seine flows through Paris.", title="Rivers")
LOUVRE = make_chunk(3, "The Louvre is a museum in Paris.", title="Museums")
ROME = make_chunk(4, "Rome is the capital of Italy.", title="Italy")
PARAMS = GenerationParams(max_tokens=64, temperature=0.0)


async def run(events: AsyncIterator[AnswerEvent]) -> list[AnswerEvent]:
    return [e async for e in events]


def of_type(events: Sequence[AnswerEvent], kind: type[_E]) -> list[_E]:
    return [e for e in events if isinstance(e, kind)]


def continue_script(script: str) -> FakeLLM:
    """An LLM whose answer is ``script``: each request continues it from the prompt's assistant prefix."""

    def responder(call: FakeCall) -> list[str]:
        done = assistant_prefix(call.prompt)
        assert script.startswith(done), (script, done)
        return split_tokens(script[len(done) :])

    return FakeLLM(responder=responder)


async def test_single_mode_event_order_and_done_contents() -> None:
    llm = FakeLLM()
    llm.enqueue(
        [
            "Paris",
            " is",
            " the",
            " capital",
            " [",
            "1",
            "]",
            ".",
            " It",
            " has",
            " the",
            " Seine",
            " [2",
            "][",
            "1",
            "]",
            ".",
        ]
    )
    retriever = FakeRetriever([PARIS, SEINE])
    events = await run(answer("What is the capital of France?", retriever=retriever, llm=llm, params=PARAMS))

    assert retriever.queries == ["What is the capital of France?"]
    assert isinstance(events[0], RetrievalEvent)
    assert isinstance(events[-1], DoneEvent)
    assert events[0].numbers == (1, 2)
    assert (events[0].round, events[0].reason) == (0, "initial")

    done = events[-1]
    tokens = "".join(e.text for e in of_type(events, TokenEvent))
    assert tokens == done.answer == "Paris is the capital [1]. It has the Seine [2][1]."
    assert [c.n for c in done.citations] == [1, 2]
    assert [c.chunk_id for c in of_type(events, CitationEvent)] == [1, 2]
    assert done.mode == "single"
    assert done.finish_reason == "stop"
    assert done.usage.completion_tokens == 17
    assert done.usage.prompt_tokens > 0
    assert {"retrieval_ms", "ttft_ms", "total_ms", "generation_ms", "prompt_ms"} <= set(done.timings)
    assert len(done.retrievals) == 1

    # A citation event comes right before the token event that carries its first marker.
    index = events.index(of_type(events, CitationEvent)[0])
    following = events[index + 1]
    assert isinstance(following, TokenEvent)
    assert "[1]" in following.text

    (call,) = llm.calls
    assert call.kind == "completion"
    assert "[1] France\nParis is the capital of France." in call.prompt
    assert "[2] Rivers\n" in call.prompt and "docs/doc2.md" not in call.prompt
    assert "Question: What is the capital of France?" in call.prompt
    assert call.prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_end|>" in call.params.stop
    assert call.params.max_tokens == 64
    assert call.params.logprobs is None


async def test_events_serialize_to_json_ready_dicts() -> None:
    llm = FakeLLM()
    llm.enqueue_text("Paris [1].")
    events = await run(answer("Capital?", retriever=FakeRetriever([PARIS]), llm=llm, params=PARAMS))
    wire = [wire_dict(e) for e in events]
    json.dumps(wire)
    assert [w["type"] for w in wire] == ["retrieval", "token", "citation", "token", "token", "done"]
    assert wire[0]["chunks"][0]["n"] == 1
    assert wire[2]["snippet"] == "Paris is the capital of France."
    assert "chunk" not in wire[2]


async def test_invalid_citation_numbers_are_removed_from_the_answer() -> None:
    llm = FakeLLM()
    llm.enqueue_text("Paris [7] is the capital [1].")
    events = await run(answer("Capital?", retriever=FakeRetriever([PARIS]), llm=llm, params=PARAMS))
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.answer == "Paris is the capital [1]."
    assert [c.n for c in done.citations] == [1]


async def test_history_goes_into_the_prompt_without_old_citations() -> None:
    llm = FakeLLM()
    llm.enqueue_text("Yes [1].")
    history = [ChatMessage("user", "Where is Paris?"), ChatMessage("assistant", "In France [3].")]
    await run(answer("Is it big?", retriever=FakeRetriever([PARIS]), llm=llm, params=PARAMS, history=history))
    prompt = llm.calls[0].prompt
    assert "<|im_start|>user\nWhere is Paris?<|im_end|>\n<|im_start|>assistant\nIn France.<|im_end|>" in prompt


async def test_interval_mode_retrieves_every_n_tokens_and_continues_the_answer() -> None:
    script = "Paris is the capital of France [1]. The Seine flows through it [2]. The Louvre is there [3]."
    llm = continue_script(script)
    retriever = FakeRetriever()
    retriever.enqueue([PARIS, SEINE])
    retriever.enqueue([SEINE, LOUVRE])  # SEINE keeps number 2, LOUVRE gets 3
    retriever.by_query = lambda query: [LOUVRE, PARIS]  # later rounds
    events = await run(
        answer(
            "Tell me about Paris.",
            retriever=retriever,
            llm=llm,
            mode="interval",
            params=PARAMS,
            interval_tokens=8,
            query_tail_words=4,
        )
    )
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.answer == script
    assert done.mode == "interval"
    assert done.finish_reason == "stop"
    rounds = of_type(events, RetrievalEvent)
    assert len(rounds) == len(llm.calls) > 2
    assert [r.round for r in rounds] == list(range(len(rounds)))
    assert [r.reason for r in rounds] == ["initial"] + ["interval"] * (len(rounds) - 1)
    assert rounds[1].numbers == (2, 3)
    assert rounds[2].numbers == (3, 1)
    assert [c.n for c in done.citations] == [1, 2, 3]
    assert [c.chunk_id for c in done.citations] == [1, 2, 3]

    # Each request asks for at most interval_tokens and continues the answer so far.
    assert all(c.params.max_tokens <= 8 for c in llm.calls)
    assert assistant_prefix(llm.calls[0].prompt) == ""
    assert assistant_prefix(llm.calls[1].prompt) == script[: len(assistant_prefix(llm.calls[1].prompt))] != ""
    # Round 1's prompt shows SEINE as [2] and LOUVRE as [3]; PARIS is not in it.
    assert "[2] Rivers" in llm.calls[1].prompt
    assert "[3] Museums" in llm.calls[1].prompt
    assert "[1] France" not in llm.calls[1].prompt

    # Later queries are the question plus the tail of the answer so far, without citation markers.
    assert retriever.queries[0] == "Tell me about Paris."
    assert retriever.queries[1].startswith("Tell me about Paris.\n")
    assert "[" not in retriever.queries[1]
    assert done.usage.completion_tokens == len(split_tokens(script))


async def test_interval_mode_stops_at_max_tokens() -> None:
    llm = continue_script("one two three four five six seven eight nine ten eleven twelve")
    events = await run(
        answer(
            "Count.",
            retriever=FakeRetriever([PARIS]),
            llm=llm,
            mode="interval",
            params=GenerationParams(max_tokens=10),
            interval_tokens=4,
        )
    )
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.answer == "one two three four five six seven eight nine ten"
    assert done.finish_reason == "length"
    assert [c.params.max_tokens for c in llm.calls] == [4, 4, 2]


async def test_interval_continuation_moves_trailing_space_out_of_the_prompt() -> None:
    llm = FakeLLM()
    llm.enqueue(["Hello", " "], finish_reason="length")  # the round ends on a space
    llm.enqueue([" world", " [", "1"], finish_reason="length")  # the model re-emits it; marker split
    llm.enqueue(["]", "."])
    events = await run(
        answer(
            "Greet.",
            retriever=FakeRetriever([PARIS]),
            llm=llm,
            mode="interval",
            params=PARAMS,
            interval_tokens=3,
        )
    )
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert assistant_prefix(llm.calls[1].prompt) == "Hello"
    assert assistant_prefix(llm.calls[2].prompt) == "Hello world [1"
    assert done.answer == "Hello world [1]."
    assert [c.n for c in done.citations] == [1]


async def test_model_failure_mid_answer_becomes_a_final_error_event() -> None:
    llm = FakeLLM()
    llm.enqueue_error(LLMUnavailable("lost the connection"), after=["Paris", " is"])
    events = await run(answer("Capital?", retriever=FakeRetriever([PARIS]), llm=llm, params=PARAMS))
    assert isinstance(events[-1], ErrorEvent)
    assert (events[-1].code, events[-1].retryable) == ("llm_unavailable", True)
    assert not of_type(events, DoneEvent)
    assert "".join(e.text for e in of_type(events, TokenEvent)) == "Paris is"
    assert llm.open_streams == 0


async def test_retriever_failure_becomes_an_error_event() -> None:
    llm = FakeLLM()
    events = await run(
        answer("Q?", retriever=FakeRetriever(error=IndexCorruptError("bad snapshot")), llm=llm, params=PARAMS)
    )
    assert len(events) == 1
    assert isinstance(events[0], ErrorEvent)
    # The error's own code: a corrupt index is 503 index_corrupt everywhere (the worker rebuilds it).
    assert events[0].code == "index_corrupt" and events[0].retryable
    assert llm.calls == []
    other = await run(answer("Q?", retriever=FakeRetriever(error=RetrievalError("odd")), llm=llm, params=PARAMS))
    assert isinstance(other[0], ErrorEvent) and other[0].code == "retrieval_error" and not other[0].retryable


async def test_question_that_cannot_fit_becomes_context_too_long() -> None:
    events = await run(
        answer("why " * 3000, retriever=FakeRetriever([PARIS]), llm=FakeLLM(), params=PARAMS, max_model_len=512)
    )
    assert isinstance(events[-1], ErrorEvent)
    assert events[-1].code == "context_too_long"


async def test_sources_are_fitted_to_the_context_window() -> None:
    long_chunks: list[Chunk] = [make_chunk(i, " ".join(f"w{i}x{j}" for j in range(150))) for i in range(1, 6)]
    llm = FakeLLM()
    llm.enqueue_text("Answer [1].")
    events = await run(
        answer(
            "Q?",
            retriever=FakeRetriever(long_chunks),
            llm=llm,
            params=GenerationParams(max_tokens=100),
            max_model_len=600,
        )
    )
    retrieval = events[0]
    assert isinstance(retrieval, RetrievalEvent)
    shown = [n for n in retrieval.numbers if n is not None]
    assert shown == list(range(1, len(shown) + 1))
    assert 0 < len(shown) < 5
    assert await llm.count_tokens(llm.calls[0].prompt) + 100 <= 600


async def test_closing_the_answer_stream_closes_the_model_stream() -> None:
    llm = FakeLLM()
    llm.enqueue_text("Paris is the capital of France and a large city [1].")
    events = answer("Capital?", retriever=FakeRetriever([PARIS]), llm=llm, params=PARAMS)
    async for event in events:
        if isinstance(event, TokenEvent):
            break
    assert llm.open_streams == 1
    await events.aclose()  # type: ignore[attr-defined]
    assert llm.open_streams == 0
    assert llm.closed_streams == 1


async def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="unknown answer mode"):
        await run(answer("Q?", retriever=FakeRetriever(), llm=FakeLLM(), mode="psychic"))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await run(answer("Q?", retriever=FakeRetriever(), llm=FakeLLM(), k=0))


def test_continuation_query() -> None:
    assert continuation_query("Q?", "a b [1] c d e", 3) == "Q?\nc d e"
    assert continuation_query(" Q? ", "", 3) == "Q?"


async def test_missing_citations_can_be_inferred() -> None:
    llm = FakeLLM()
    llm.enqueue_text("The Seine river flows through Paris.")
    events = await run(
        answer("River?", retriever=FakeRetriever([PARIS, SEINE]), llm=llm, params=PARAMS, infer_missing_citations=True)
    )
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert [(c.n, c.inferred) for c in done.citations] == [(2, True)]
    assert isinstance(events[-2], CitationEvent)
    assert done.answer == "The Seine river flows through Paris."
