"""The incremental citation parser: markers split across tokens, invalid numbers, repeats."""

from __future__ import annotations

import pytest

from generation.citations import CitationTracker, best_snippet, infer_citations
from generation.markers import parse_marker
from generation.types import CitationEvent
from retrieval.types import Chunk
from tests.unit.fakes_llm import make_chunk, split_tokens

pytestmark = pytest.mark.unit

SOURCES = [
    make_chunk(11, "Paris is the capital of France. It lies on the Seine.", title="France", page=3),
    make_chunk(22, "Berlin is the capital of Germany.", path="docs/de.md"),
    make_chunk(33, "Rome is the capital of Italy."),
]


def run(pieces: list[str], sources: list[Chunk] | None = None) -> tuple[str, list[str], list[CitationEvent]]:
    """Feed pieces, finish; returns (full text, emitted pieces, events)."""
    tracker = CitationTracker(SOURCES if sources is None else sources)
    emitted: list[str] = []
    events: list[CitationEvent] = []
    for piece in pieces:
        text, new = tracker.feed(piece)
        emitted.append(text)
        events.extend(new)
    text, new = tracker.finish()
    emitted.append(text)
    events.extend(new)
    assert "".join(emitted) == tracker.text
    assert [e.n for e in tracker.citations] == [e.n for e in events]
    return tracker.text, emitted, events


def test_whole_marker() -> None:
    text, _, events = run(["Paris is the capital [1]."])
    assert text == "Paris is the capital [1]."
    assert [(e.n, e.chunk_id, e.path, e.page, e.title) for e in events] == [(1, 11, "docs/doc11.md", 3, "France")]


def test_marker_split_across_tokens_is_held_then_emitted_once_complete() -> None:
    tracker = CitationTracker(SOURCES)
    assert tracker.feed("Paris is the capital ") == ("Paris is the capital", [])
    assert tracker.feed("[") == ("", [])
    assert tracker.feed("1") == ("", [])
    text, events = tracker.feed("]")
    assert text == " [1]"
    assert [e.n for e in events] == [1]
    assert tracker.feed(". Next")[0] == ". Next"
    assert tracker.finish() == ("", [])
    assert tracker.text == "Paris is the capital [1]. Next"


def test_text_without_brackets_streams_immediately() -> None:
    tracker = CitationTracker(SOURCES)
    assert tracker.feed("Hello") == ("Hello", [])
    assert tracker.feed(" world") == (" world", [])


@pytest.mark.parametrize(
    ("raw", "expected", "numbers"),
    [
        ("A [1, 2].", "A [1, 2].", [1, 2]),
        ("A [1,2].", "A [1,2].", [1, 2]),
        ("A [1][2].", "A [1][2].", [1, 2]),
        ("A [2] [1].", "A [2] [1].", [2, 1]),
        ("A [1; 3].", "A [1; 3].", [1, 3]),
        ("A [1-3].", "A [1-3].", [1, 2, 3]),
        ("A [ 2 ].", "A [ 2 ].", [2]),
    ],
)
def test_multiple_and_adjacent_markers(raw: str, expected: str, numbers: list[int]) -> None:
    for pieces in ([raw], list(raw), split_tokens(raw)):
        text, _, events = run(pieces)
        assert text == expected
        assert [e.n for e in events] == numbers


@pytest.mark.parametrize(
    ("raw", "expected", "numbers"),
    [
        ("Paris [7].", "Paris.", []),
        ("Paris [7] is nice.", "Paris is nice.", []),
        ("Paris [0].", "Paris.", []),
        ("Paris [1, 7].", "Paris [1].", [1]),
        ("Paris [7][2].", "Paris [2].", [2]),
        ("[9] Paris.", "Paris.", []),
        ("Paris [1, 1].", "Paris [1].", [1]),
        ("Paris [7]", "Paris", []),
    ],
)
def test_numbers_without_source_are_removed(raw: str, expected: str, numbers: list[int]) -> None:
    for pieces in ([raw], list(raw)):
        text, _, events = run(pieces)
        assert text == expected
        assert [e.n for e in events] == numbers


def test_repeated_citation_emits_one_event() -> None:
    text, _, events = run(["Paris [1]. It is big [1]. Berlin [2]. Again [1][2]."])
    assert [e.n for e in events] == [1, 2]
    assert text.count("[1]") == 3


@pytest.mark.parametrize(
    "raw",
    ["Year [2020].", "See [a].", "A [1.5] b", "A [link](http://x.y) b", "A [1 2] b", "[]", "a[", "x [1-"],
)
def test_non_markers_pass_through_verbatim(raw: str) -> None:
    for pieces in ([raw], list(raw)):
        text, _, events = run(pieces)
        assert text == raw.strip()
        assert events == []


def test_incomplete_marker_at_end_is_flushed_as_text() -> None:
    tracker = CitationTracker(SOURCES)
    assert tracker.feed("see [1") == ("see", [])
    assert tracker.finish() == (" [1", [])


def test_long_bracketed_text_is_not_held_back() -> None:
    tracker = CitationTracker(SOURCES)
    text, _ = tracker.feed("x [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2")
    assert text.startswith("x [1, 2")


def test_sources_can_be_added_with_explicit_numbers() -> None:
    tracker = CitationTracker({4: SOURCES[0]})
    assert tracker.feed("A [1] [4].")[0] == "A [4]."
    tracker.add_source(5, SOURCES[1])
    text, events = tracker.feed(" B [5].")
    assert text == " B [5]."
    assert [e.chunk_id for e in events] == [22]
    with pytest.raises(ValueError, match="already names"):
        tracker.add_source(5, SOURCES[2])


def test_citation_snippet_is_the_supporting_sentence_with_document_offsets() -> None:
    document = "Intro text. " + "Paris is the capital of France. The Seine flows through Paris."
    chunk = make_chunk(1, document[12:], start=12)
    assert document[chunk.start : chunk.end] == chunk.text
    tracker = CitationTracker([chunk])
    tracker.feed("The river through Paris is the Seine [1].")
    (event,) = tracker.citations
    assert event.snippet == "The Seine flows through Paris."
    assert document[event.start : event.end] == event.snippet


def test_snippet_falls_back_to_the_opening_and_is_capped() -> None:
    chunk = make_chunk(1, "word " * 200, start=100)
    snippet, start, end = best_snippet(chunk, "nothing in common", max_chars=50)
    assert len(snippet) <= 50
    assert snippet.startswith("word")
    assert (start, end) == (100, 100 + len(snippet))


def test_parse_marker_states() -> None:
    assert parse_marker("[12]", 0) == ("match", 4, (12,))
    assert parse_marker("x[1,", 1) == ("partial", 4, ())
    assert parse_marker("[1234]", 0)[0] == "none"
    assert parse_marker("[5-2]", 0)[0] == "none"


def test_infer_citations_attributes_unmarked_sentences_by_overlap() -> None:
    sources = {1: SOURCES[0], 2: SOURCES[1], 3: SOURCES[2]}
    answer = "Berlin is the capital city of Germany. Paris lies on the Seine river. I like cake."
    events = infer_citations(answer, sources)
    assert [(e.n, e.inferred) for e in events] == [(2, True), (1, True)]
    assert events[1].snippet == "It lies on the Seine."
    assert infer_citations("Nothing relevant here at all.", sources) == []
