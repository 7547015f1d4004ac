"""The grounding guard: segmentation, support scoring, re-pointing, fallback, abstention, every mode."""

from __future__ import annotations

from typing import Any

import pytest

from app.schemas.events import wire_dict
from generation.flare import FlareParams
from generation.grounding import (
    SupportScorer,
    abstains,
    cite_targets,
    copies_source_header,
    extractive_answer,
    marker_numbers,
    split_sentences,
)
from generation.guard import GroundingParams
from generation.prompts import NO_ANSWER
from generation.rag import ANSWER_MODES, answer
from generation.types import (
    AnswerEvent,
    CitationEvent,
    DoneEvent,
    GenerationParams,
    RetrievalEvent,
    SupportEvent,
    TokenEvent,
)
from tests.unit.fakes_llm import FakeLLM, FakeRetriever, make_chunk
from tests.unit.fakes_retrieval import HashEmbedder

pytestmark = pytest.mark.unit

KETTLE = make_chunk(
    1,
    "The ZX-9 kettle holds 1.8 litres of water. It boils in about 3 minutes. "
    "Descale it monthly, e.g. with citric acid.",
    title="ZX-9 manual",
)
GARDEN = make_chunk(2, "Tomatoes need full sun and regular watering. Prune the side shoots weekly.", title="Garden")
PARAMS = GenerationParams(max_tokens=200, temperature=0.0)
QUESTION = "How much water does the ZX-9 kettle hold?"


def texts(events: list[AnswerEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenEvent))


def supports(events: list[AnswerEvent]) -> list[SupportEvent]:
    return [e for e in events if isinstance(e, SupportEvent)]


async def run(
    reply: str | None,
    *,
    mode: str = "single",
    chunks: tuple[Any, ...] = (KETTLE, GARDEN),
    question: str = QUESTION,
    **grounding: Any,
) -> list[AnswerEvent]:
    llm = FakeLLM(responder=(lambda call: [reply]) if reply is not None else None)
    return [
        e
        async for e in answer(
            question,
            retriever=FakeRetriever(list(chunks)),
            llm=llm,
            mode=mode,  # type: ignore[arg-type]
            params=PARAMS,
            grounding=GroundingParams(**grounding),
            flare=FlareParams(theta=0.0),
        )
    ]


# --- segmentation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("It holds 1.8 litres. It boils fast.", ["It holds 1.8 litres.", "It boils fast."]),
        ("Use a mild acid, e.g. vinegar. Rinse.", ["Use a mild acid, e.g. vinegar.", "Rinse."]),
        ("Ask Dr. Smith today. Or not.", ["Ask Dr. Smith today.", "Or not."]),
        ("Steps:\n1. Fill it.\n2. Boil it.", ["Steps:", "1. Fill it.", "2. Boil it."]),
        ("Paris is big [1]. It is old [2].", ["Paris is big [1].", "It is old [2]."]),
        ("Use os.path.join here. Done", ["Use os.path.join here.", "Done"]),
    ],
)
def test_split_sentences_of_an_answer(text: str, sentences: list[str]) -> None:
    assert [s.text for s in split_sentences(text)] == sentences


def test_split_sentences_of_a_wrapped_source_keeps_headings_apart() -> None:
    text = "Installation\nThe kettle is filled\nthrough the lid. Close it.\n\n3.2 Cleaning\nWipe it."
    segments = split_sentences(text, soft_newlines=True)
    assert [s.text for s in segments] == [
        "Installation",
        "The kettle is filled\nthrough the lid.",
        "Close it.",
        "3.2 Cleaning",
        "Wipe it.",
    ]
    assert [s.kind for s in segments] == ["fragment", "sentence", "sentence", "fragment", "sentence"]
    assert all(text[s.start : s.end] == s.text for s in segments)


def test_marker_numbers() -> None:
    assert marker_numbers("a [2] b [1, 3] c [4-5] d [2]") == [2, 1, 3, 4, 5]


# --- scoring ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("embedder", [None, HashEmbedder()])
def test_support_verdicts_and_spans(embedder: HashEmbedder | None) -> None:
    scorer = SupportScorer(embedder, threshold=0.5)
    scorer.add_sources({1: KETTLE, 2: GARDEN})
    good = scorer.judge("The kettle holds 1.8 litres of water [2].")
    assert good.verdict == "supported" and good.source is not None
    assert good.source.n == 1 and good.source.text == "The ZX-9 kettle holds 1.8 litres of water."
    assert KETTLE.text[good.source.start : good.source.end] == good.source.text
    bad = scorer.judge("The capital of France is Paris.")
    assert bad.verdict == "unsupported"
    wrong_number = scorer.judge("The ZX-9 kettle holds 2.5 litres of water.")
    assert wrong_number.verdict == "unsupported" and wrong_number.missing_numbers == ("2.5",)


def test_a_wrong_citation_is_repointed_a_right_one_kept() -> None:
    scorer = SupportScorer(None, threshold=0.5)
    scorer.add_sources({1: KETTLE, 2: GARDEN})
    support = scorer.judge("The kettle holds 1.8 litres of water.")
    assert cite_targets(support, [2], threshold=0.5) == [1]
    assert cite_targets(support, [1], threshold=0.5) == [1]
    assert cite_targets(support, [], threshold=0.5) == [1]


def test_extractive_answer_quotes_whole_sentences_of_the_best_chunk_within_budget() -> None:
    scorer = SupportScorer(None)
    scorer.add_sources({1: GARDEN, 2: KETTLE})
    picks = extractive_answer(scorer.relevance(QUESTION), max_words=14, rank_bonus=0.0)
    assert [p.sentence.text for p in picks] == [
        "The ZX-9 kettle holds 1.8 litres of water.",
        "It boils in about 3 minutes.",
    ]


def test_detectors_and_abstention_rule() -> None:
    assert copies_source_header("[1] 007d10cab0e5efc8.txt", {})
    assert copies_source_header("See [1] ZX-9 manual for this.", {1: KETTLE})
    assert copies_source_header("Read doc1.md first.", {1: KETTLE})
    assert not copies_source_header("The kettle holds 1.8 litres.", {1: KETTLE})
    assert not copies_source_header("See http://example.org/README.html for more.", {})
    assert abstains(0.3, 0.2, retrieval_threshold=0.5, relevance_threshold=0.4)
    assert not abstains(0.7, 0.2, retrieval_threshold=0.5, relevance_threshold=0.4)
    assert not abstains(0.3, 0.6, retrieval_threshold=0.5, relevance_threshold=0.4)
    assert abstains(None, 0.2, retrieval_threshold=0.5, relevance_threshold=0.4)


# --- the guard in the answer stream ----------------------------------------------------------------


async def test_supported_sentences_stream_with_support_events_and_repointed_citations() -> None:
    events = await run("The kettle holds 1.8 litres of water [2]. It boils in about 3 minutes.")
    done = events[-1]
    assert isinstance(done, DoneEvent) and not done.no_answer
    assert texts(events) == done.answer == "The kettle holds 1.8 litres of water [1]. It boils in about 3 minutes [1]."
    verdicts = supports(events)
    assert [s.verdict for s in verdicts] == ["supported", "supported"]
    assert verdicts[0].chunk_id == KETTLE.id and verdicts[0].n == 1
    assert verdicts[0].start is not None and verdicts[0].end is not None
    assert KETTLE.text[verdicts[0].start : verdicts[0].end] == "The ZX-9 kettle holds 1.8 litres of water."
    # one citation, of the kettle chunk (the model's [2] named the garden), its span a whole sentence
    assert [(c.n, c.chunk_id, c.snippet) for c in done.citations] == [
        (1, KETTLE.id, "The ZX-9 kettle holds 1.8 litres of water.")
    ]
    # every sentence's tokens come before its support event, citation events before their tokens
    kinds = [e.type for e in events if not isinstance(e, RetrievalEvent)]
    assert kinds == ["citation", "token", "support", "token", "support", "done"]
    assert wire_dict(verdicts[0])["type"] == "support"
    assert wire_dict(done)["no_answer"] is False


async def test_a_failed_answer_falls_back_to_quoting_the_sources() -> None:
    events = await run("Tomatoes are red. The moon is far away. Cats sleep a lot.", early_stop=0)
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.finish_reason == "guard"
    assert done.answer.startswith("The ZX-9 kettle holds 1.8 litres of water [1].")
    assert "moon" not in done.answer and "Cats" not in done.answer
    assert {s.origin for s in done.supports} == {"extractive"}
    assert all(s.verdict == "supported" for s in done.supports)


async def test_fallback_keeps_the_models_supported_sentences() -> None:
    events = await run("The kettle holds 1.8 litres of water. The moon is far. Cats sleep. Dogs bark.")
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.answer.startswith("The kettle holds 1.8 litres of water [1].")
    assert done.supports[0].origin == "model"
    assert "moon" not in done.answer
    assert any(s.origin == "extractive" for s in done.supports)
    # the quoted sentence the model already said is not quoted again
    assert done.answer.count("1.8 litres") == 1


async def test_a_passing_answer_keeps_its_unsupported_sentence_in_fallback_but_not_in_strict() -> None:
    reply = "The kettle holds 1.8 litres of water. It boils in about 3 minutes. The lid is blue."
    fallback = (await run(reply))[-1]
    strict = (await run(reply, policy="strict"))[-1]
    assert isinstance(fallback, DoneEvent) and isinstance(strict, DoneEvent)
    assert fallback.answer.endswith("The lid is blue.")
    assert [s.verdict for s in fallback.supports] == ["supported", "supported", "unsupported"]
    assert fallback.supports[-1].n is None and fallback.supports[-1].reason == "low_support"
    assert "blue" not in strict.answer
    assert [s.verdict for s in strict.supports] == ["supported", "supported"]


async def test_annotate_never_changes_the_text() -> None:
    events = await run("Tomatoes are red. The moon is far away.", policy="annotate")
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.answer == "Tomatoes are red. The moon is far away."
    assert [s.verdict for s in done.supports] == ["unsupported", "unsupported"]


async def test_repeats_and_copied_headers_never_reach_the_answer() -> None:
    reply = "[1] ZX-9 manual\nThe kettle holds 1.8 litres of water.\nThe kettle holds 1.8 litres of water.\n"
    done = (await run(reply))[-1]
    assert isinstance(done, DoneEvent)
    assert done.answer.count("1.8 litres") == 1
    assert "manual" not in done.answer
    assert done.finish_reason == "repetition"


async def test_the_guard_stops_the_model_after_unsupported_sentences() -> None:
    llm = FakeLLM()
    llm.enqueue_text("The moon is far away. Cats sleep a lot. " + "Dogs bark at night. " * 20)
    events = [
        e
        async for e in answer(
            QUESTION,
            retriever=FakeRetriever([KETTLE, GARDEN]),
            llm=llm,
            params=PARAMS,
            grounding=GroundingParams(early_stop=2),
        )
    ]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.finish_reason == "guard"
    assert llm.closed_streams == 1 and "Dogs" not in done.answer
    assert "1.8 litres" in done.answer


async def test_weak_retrieval_abstains_without_asking_the_model() -> None:
    llm = FakeLLM()  # any request would fail: nothing is scripted
    events = [
        e
        async for e in answer(
            "Who painted the Mona Lisa?",
            retriever=FakeRetriever([GARDEN]),
            llm=llm,
            params=PARAMS,
            grounding=GroundingParams(),
        )
    ]
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.no_answer and done.answer == NO_ANSWER and done.citations == ()
    assert texts(events) == NO_ANSWER
    assert not llm.calls


async def test_an_answer_over_the_word_budget_is_cut_at_a_sentence() -> None:
    reply = "The kettle holds 1.8 litres of water. It boils in about 3 minutes. Descale it monthly."
    done = (await run(reply, max_words=15))[-1]
    assert isinstance(done, DoneEvent)
    assert done.answer == "The kettle holds 1.8 litres of water [1]. It boils in about 3 minutes [1]."
    assert done.finish_reason == "length"


@pytest.mark.parametrize("mode", ANSWER_MODES)
async def test_every_mode_passes_through_the_guard(mode: str) -> None:
    events = await run("The kettle holds 1.8 litres of water.", mode=mode)
    done = events[-1]
    assert isinstance(done, DoneEvent), events
    assert done.mode == mode
    assert isinstance(events[0], RetrievalEvent)
    assert done.supports and all(s.verdict == "supported" for s in done.supports)
    assert "1.8 litres" in done.answer
    assert [c.n for c in done.citations] == list(range(1, len(done.citations) + 1))
    assert all(isinstance(c, CitationEvent) for c in done.citations)


async def test_extractive_mode_needs_no_model_and_quotes_only() -> None:
    llm = FakeLLM()
    events = [e async for e in answer(QUESTION, retriever=FakeRetriever([KETTLE, GARDEN]), llm=llm, mode="extractive")]
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert not llm.calls
    assert done.answer.startswith("The ZX-9 kettle holds 1.8 litres of water [1].")
    assert all(s.origin == "extractive" for s in done.supports)


async def test_a_true_sentence_from_an_unrelated_source_is_off_topic() -> None:
    reply = "Tomatoes need full sun and regular watering. The kettle holds 1.8 litres of water."
    done = (await run(reply, policy="strict"))[-1]
    assert isinstance(done, DoneEvent)
    assert done.answer == "The kettle holds 1.8 litres of water [1]."
    annotated = (await run("Tomatoes need full sun and regular watering.", policy="annotate"))[-1]
    assert isinstance(annotated, DoneEvent)
    assert [(s.verdict, s.reason) for s in annotated.supports] == [("unsupported", "off_topic")]
    assert annotated.supports[0].chunk_id == GARDEN.id  # the closest source is still named


def test_a_context_free_follow_up_retrieves_with_the_earlier_question() -> None:
    from generation.rag import standalone_query
    from generation.types import ChatMessage

    history = [ChatMessage("user", "Why are Python strings immutable?"), ChatMessage("assistant", "Speed [1].")]
    assert standalone_query("Why is that?", history) == "Why are Python strings immutable?\nWhy is that?"
    assert standalone_query("How do I join two paths in Python?", history) == "How do I join two paths in Python?"
    assert standalone_query("Why is that?", []) == "Why is that?"
