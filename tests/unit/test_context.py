"""Fitting sources and history into the context window, and the prompt format."""

from __future__ import annotations

import pytest

from generation.context import (
    assign_numbers,
    fit_history,
    fit_sources,
    plan_context,
    skeleton_prompt,
    trim_to_tokens,
)
from generation.errors import ContextTooLong
from generation.prompts import (
    CHATML,
    NO_SOURCES,
    SYSTEM_PROMPT,
    build_messages,
    format_source,
    render_chatml,
    source_header,
    strip_citations,
)
from generation.types import ChatMessage
from tests.unit.fakes_llm import count_words, make_chunk

pytestmark = pytest.mark.unit


def words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


CHUNKS = [make_chunk(i, words(50, f"c{i}w")) for i in (1, 2, 3, 4)]
BLOCK = count_words(format_source(1, CHUNKS[0]))  # every block costs the same here


def test_all_sources_fit() -> None:
    fitted = fit_sources(CHUNKS, 10_000, count_words)
    assert [(s.n, s.chunk.id, s.trimmed) for s in fitted.sources] == [
        (1, 1, False),
        (2, 2, False),
        (3, 3, False),
        (4, 4, False),
    ]
    assert fitted.dropped == ()
    assert fitted.tokens <= 10_000


def test_lowest_ranked_sources_are_dropped_first() -> None:
    fitted = fit_sources(CHUNKS, 2 * BLOCK + 2 + 10, count_words, min_trim_tokens=20)
    assert [s.chunk.id for s in fitted.sources] == [1, 2]
    assert [c.id for c in fitted.dropped] == [3, 4]


def test_the_first_source_that_does_not_fit_is_trimmed_when_enough_fits() -> None:
    header = count_words(format_source(3, CHUNKS[2], "")) + 1
    budget = 2 * BLOCK + 2 + (2 + header) + 30
    fitted = fit_sources(CHUNKS, budget, count_words, min_trim_tokens=20)
    assert [(s.chunk.id, s.trimmed) for s in fitted.sources] == [(1, False), (2, False), (3, True)]
    assert [c.id for c in fitted.dropped] == [4]
    last = fitted.sources[-1]
    assert last.text.endswith("…")
    assert last.text.startswith("c3w0 c3w1")
    assert fitted.tokens <= budget


def test_kept_sources_are_a_prefix_of_the_ranking() -> None:
    # A tiny fourth chunk would fit, but ranking order wins: it is dropped with the third.
    chunks = [*CHUNKS[:3], make_chunk(9, "tiny")]
    fitted = fit_sources(chunks, 2 * BLOCK + 2 + 10, count_words, min_trim_tokens=20)
    assert [s.chunk.id for s in fitted.sources] == [1, 2]
    assert [c.id for c in fitted.dropped] == [3, 9]


def test_numbering_keeps_known_numbers_and_continues_after_them() -> None:
    assert assign_numbers(CHUNKS[:3], {3: 1}, next_number=2) == [2, 3, 1]
    fitted = fit_sources(CHUNKS[:3], 10_000, count_words, numbering={3: 1}, next_number=2)
    assert [(s.chunk.id, s.n) for s in fitted.sources] == [(1, 2), (2, 3), (3, 1)]
    assert fitted.sources[2].block.startswith("[1] ")


def test_trim_to_tokens() -> None:
    text = words(100, "w")
    assert trim_to_tokens(text, 1000, count_words) == text
    trimmed = trim_to_tokens(text, 20, count_words)
    assert count_words(trimmed) <= 20
    assert trimmed.endswith(" …")
    assert trim_to_tokens(text, 0, count_words) == ""


def test_history_keeps_most_recent_whole_turns() -> None:
    history = [
        ChatMessage("user", words(10, "q1")),
        ChatMessage("assistant", words(10, "a1")),
        ChatMessage("user", words(10, "q2")),
        ChatMessage("assistant", words(10, "a2")),
        ChatMessage("user", words(10, "q3")),
        ChatMessage("assistant", words(10, "a3")),
    ]
    turn = 2 * (10 + 6)
    assert fit_history(history, 10_000, count_words) == tuple(history)
    assert fit_history(history, 2 * turn, count_words) == tuple(history[2:])
    assert fit_history(history, 2 * turn - 1, count_words) == tuple(history[4:])
    assert fit_history(history, turn - 1, count_words) == ()


def test_plan_respects_the_window_and_reserves_the_answer() -> None:
    history = [ChatMessage("user", "earlier?"), ChatMessage("assistant", "yes [1].")]
    for max_model_len in (300, 400, 500, 1000):
        plan = plan_context(
            "What is c1w3?",
            CHUNKS,
            count_tokens=count_words,
            template=CHATML,
            max_model_len=max_model_len,
            max_tokens=100,
            history=history,
            margin=0,
        )
        assert plan.prompt_tokens + 100 <= max_model_len
        assert len(plan.sources) + len(plan.dropped) == len(CHUNKS)
        assert plan.prompt.startswith("<|im_start|>system\n" + SYSTEM_PROMPT)
        assert plan.prompt.endswith("<|im_start|>assistant\n")
    assert [s.chunk.id for s in plan.sources] == [1, 2, 3, 4]
    assert plan.history == tuple(history)


def test_plan_counts_the_assistant_prefix() -> None:
    kwargs = {
        "count_tokens": count_words,
        "template": CHATML,
        "max_model_len": 400,
        "max_tokens": 50,
        "margin": 0,
    }
    without = plan_context("q?", CHUNKS, **kwargs)  # type: ignore[arg-type]
    prefix = words(60, "p")
    with_prefix = plan_context("q?", CHUNKS, assistant_prefix=prefix, **kwargs)  # type: ignore[arg-type]
    assert with_prefix.prompt.endswith(prefix)
    assert with_prefix.source_budget == without.source_budget - 60
    assert with_prefix.prompt_tokens + 50 <= 400


def test_plan_raises_when_even_the_question_does_not_fit() -> None:
    with pytest.raises(ContextTooLong) as info:
        plan_context(
            words(500, "q"),
            CHUNKS,
            count_tokens=count_words,
            template=CHATML,
            max_model_len=300,
            max_tokens=50,
        )
    assert info.value.max_context == 300


def test_chatml_rendering_matches_smollm2_template() -> None:
    messages = [ChatMessage("system", "S"), ChatMessage("user", "U"), ChatMessage("assistant", "A")]
    assert render_chatml(messages) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chatml(messages[:2], assistant_prefix="Part").endswith("<|im_start|>assistant\nPart")
    assert "<|im_end|>" in CHATML.stop


def test_messages_layout_and_history_cleanup() -> None:
    chunk = make_chunk(5, "Some   text\n\n\n\nmore", title="Guide", path="a/b.pdf", page=7)
    assert source_header(2, chunk) == "[2] Guide, page 7"
    # No path in the prompt (a small model copies it into the answer); the file name stands in for a title.
    assert source_header(1, make_chunk(1, "x", path="/srv/docs/a/b.md")) == "[1] b.md"
    assert format_source(2, chunk) == "[2] Guide, page 7\nSome text\n\nmore"
    messages = build_messages(
        "Why?",
        [format_source(2, chunk)],
        [
            ChatMessage("system", "ignored"),
            ChatMessage("user", "Before?"),
            ChatMessage("assistant", "Because [1][2]."),
        ],
    )
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2].content == "Because."
    assert messages[3].content.startswith("Sources:\n\n[2] Guide")
    assert "Question: Why?" in messages[3].content
    assert NO_SOURCES in build_messages("Why?", [])[-1].content
    assert strip_citations("a [1, 2] b [3-4].") == "a b."


def test_skeleton_is_the_prompt_without_sources() -> None:
    skeleton = skeleton_prompt("Why?", template=CHATML, assistant_prefix="So")
    assert "Question: Why?" in skeleton
    assert skeleton.endswith("<|im_start|>assistant\nSo")
