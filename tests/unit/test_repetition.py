"""The greedy-loop guard: detection, and the answer stopping (and the upstream request closing)."""

from __future__ import annotations

import pytest

from generation.rag import answer
from generation.repetition import repeated_unit
from generation.types import DoneEvent, GenerationParams, TokenEvent
from tests.unit.fakes_llm import FakeLLM, FakeRetriever, make_chunk, split_tokens

pytestmark = pytest.mark.unit

VELDORIA = make_chunk(1, "The capital of Veldoria is Marnhaven.", title="Veldoria")
PARAMS = GenerationParams(max_tokens=200, temperature=0.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The capital is Marnhaven.\nThe capital is Marnhaven.\n", "The capital is Marnhaven."),
        ("The capital is Marnhaven. The capital is Marnhaven. ", "The capital is Marnhaven."),
        # enumerators, citation markers, case and spacing do not make a sentence new
        ("1. You can change it [1].\n2. you can   change it.\n", "You can change it [1]."),
        # the repeat is judged only once it is complete
        ("The capital is Marnhaven.\nThe capital is Marnh", None),
        ("The capital is Marnhaven.\nThe capital is Marnhaven", None),
        # short units never count, different sentences are fine
        ("Yes.\nYes.\n", None),
        ("The capital is Marnhaven.\nIt has 80,000 people.\n", None),
        ("", None),
    ],
)
def test_repeated_unit(text: str, expected: str | None) -> None:
    assert repeated_unit(text) == expected


def test_repeated_unit_can_wait_for_more_copies() -> None:
    twice = "The capital is Marnhaven.\nThe capital is Marnhaven.\n"
    assert repeated_unit(twice, times=3) is None
    assert repeated_unit(twice + "The capital is Marnhaven.\n", times=3) == "The capital is Marnhaven."


async def test_a_looping_answer_stops_at_the_first_repeat() -> None:
    llm = FakeLLM()
    loop = "The capital of Veldoria is Marnhaven [1].\n" * 6
    llm.enqueue(split_tokens(loop))
    events = [e async for e in answer("Capital?", retriever=FakeRetriever([VELDORIA]), llm=llm, params=PARAMS)]
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.finish_reason == "repetition"
    streamed = "".join(e.text for e in events if isinstance(e, TokenEvent))
    assert streamed.count("Marnhaven") == 2  # the sentence, and the repeat that revealed the loop
    assert [c.n for c in done.citations] == [1]
    assert llm.closed_streams == 1  # the upstream request was closed, not read to its end


async def test_the_guard_can_be_turned_off() -> None:
    llm = FakeLLM()
    llm.enqueue(split_tokens("The capital of Veldoria is Marnhaven.\n" * 3))
    events = [
        e
        async for e in answer(
            "Capital?", retriever=FakeRetriever([VELDORIA]), llm=llm, params=PARAMS, stop_on_repetition=False
        )
    ]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.finish_reason == "stop"
    assert done.answer.count("Marnhaven") == 3
